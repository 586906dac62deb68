//! What the engine's integration tests share: the fixtures folder, loading a fixture model, and comparing
//! images and tensors with the references.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use pictor_engine::image_io::load_image;
use pictor_engine::model_store::{self, ModelsDir};
use pictor_engine::models::TomeSettings;
use pictor_engine::pipeline::{GenerateRequest, Mode, NoProgress, StableDiffusion};
use pictor_engine::prompt_syntax::escape;
use pictor_engine::schedulers::SchedulerOptions;
use pictor_engine::Runtime;
use serde::Deserialize;

/// The repository's `tests/fixtures` folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The fixtures' models folder.
pub fn models() -> ModelsDir {
    ModelsDir::new(fixtures().join("models"))
}

/// A fixture model (by id in `tests/fixtures/models/checkpoints`) loaded for the CPU in float32.
pub fn load_model(id: &str) -> StableDiffusion {
    let rt = Runtime::cpu();
    let location = models().resolve_id(id).expect("fixture model");
    model_store::load(&location, &rt.device, rt.dtype).expect("fixture model loads")
}

/// Maximum and mean absolute difference between two RGB images of the same size (0–255 scale).
pub fn compare(a: &image::RgbImage, b: &image::RgbImage) -> (u8, f64) {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes");
    let mut max = 0u8;
    let mut sum = 0u64;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += d as u64;
    }
    (max, sum as f64 / a.as_raw().len() as f64)
}

/// The largest absolute elementwise difference of two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "tensor shapes");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The generation a fixture case describes (the fields every `cases.json` shares).
#[derive(Debug, Clone, Deserialize)]
pub struct GenerationCase {
    pub name: String,
    pub model: String,
    pub pipeline: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub init_image: Option<String>,
    pub width: u32,
    pub height: u32,
    pub samples: usize,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    pub strength: Option<f64>,
    pub image_guidance_scale: Option<f64>,
    pub seed: u64,
    pub scheduler: String,
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    #[serde(default)]
    pub algorithm_type: Option<String>,
    pub clip_skip: usize,
    #[serde(default)]
    pub images: Vec<String>,
}

/// The engine request a fixture case describes (its prompts are plain text to diffusers, so they are escaped
/// for Pictor's prompt syntax), with token merging when `tome` is given.
pub fn request_for(
    case: &GenerationCase,
    tome: Option<TomeSettings>,
) -> Result<GenerateRequest, String> {
    let init = || -> Result<_, String> {
        let path = case
            .init_image
            .as_deref()
            .ok_or("the case has no init image")?;
        load_image(&fixtures().join(path), 1 << 24).map_err(|e| e.to_string())
    };
    let mode = match case.pipeline.as_str() {
        "txt2img" => Mode::Text2Img,
        "img2img" => Mode::Img2Img {
            init_image: init()?,
            strength: case.strength.ok_or("img2img case without a strength")?,
        },
        "pix2pix" => Mode::Pix2Pix {
            init_image: init()?,
            image_guidance_scale: case
                .image_guidance_scale
                .ok_or("pix2pix case without an image guidance scale")?,
        },
        other => return Err(format!("unknown pipeline {other}")),
    };
    Ok(GenerateRequest {
        mode,
        prompt: escape(&case.prompt),
        negative_prompt: escape(case.negative_prompt.as_deref().unwrap_or_default()),
        width: case.width,
        height: case.height,
        samples: case.samples,
        num_inference_steps: case.num_inference_steps,
        guidance_scale: case.guidance_scale,
        seed: Some(case.seed),
        scheduler: Some(case.scheduler.clone()),
        scheduler_options: SchedulerOptions {
            use_karras_sigmas: case.use_karras_sigmas,
            algorithm_type: case.algorithm_type.clone(),
        },
        clip_skip: case.clip_skip,
        embeddings: Vec::new(),
        tome,
    })
}

/// Runs a fixture case through the engine, with token merging when `tome` is given.
pub fn generate_case(
    model: &StableDiffusion,
    case: &GenerationCase,
    tome: Option<TomeSettings>,
) -> Vec<image::RgbImage> {
    let request = request_for(case, tome).unwrap();
    model
        .generate(&request, &mut NoProgress)
        .expect("generation runs")
        .images
}

/// Peak signal-to-noise ratio of `b` against `a` in dB on the 0–255 scale (infinite when equal).
pub fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    let squared: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let mse = squared / a.as_raw().len() as f64;
    10.0 * (255.0 * 255.0 / mse).log10()
}

/// Runs every fourth case of tests/fixtures/cases.json (both pipelines, SD 1 and SD 2, several schedulers)
/// in float32 and in a reduced precision named `precision`, and asserts that every reduced image is at 35 dB
/// PSNR or better against its float32 twin and that at least one differs (the reduced path really ran).
/// `load` is called once per model id; `run` returns a case's (float32, reduced) images from what it loaded.
pub fn assert_within_35_db_of_fp32<M>(
    precision: &str,
    load: impl Fn(&str) -> M,
    run: impl Fn(&M, &GenerationCase) -> (Vec<image::RgbImage>, Vec<image::RgbImage>),
) {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).expect("cases.json");
    let cases: Vec<GenerationCase> = serde_json::from_str(&text).expect("cases.json parses");
    let mut loaded: Vec<(String, M)> = Vec::new();
    let (mut failures, mut identical, mut images) = (Vec::new(), 0, 0);
    for case in cases.iter().step_by(4) {
        let id = case.model.trim_end_matches(".safetensors");
        if !loaded.iter().any(|(n, _)| n == id) {
            loaded.push((id.to_string(), load(id)));
        }
        let model = &loaded.iter().find(|(n, _)| n == id).unwrap().1;
        let (reference, reduced) = run(model, case);
        assert_eq!(reference.len(), reduced.len(), "{}: image count", case.name);
        for (i, (a, b)) in reference.iter().zip(&reduced).enumerate() {
            let db = psnr(a, b);
            println!(
                "{} image {i}: {precision} vs fp32 PSNR {db:.1} dB",
                case.name
            );
            images += 1;
            if db.is_infinite() {
                identical += 1;
            } else if db < 35.0 {
                failures.push(format!("{} image {i}: {db:.1} dB", case.name));
            }
        }
    }
    assert!(failures.is_empty(), "below 35 dB:\n{}", failures.join("\n"));
    assert!(
        identical < images,
        "{precision} changed no image: the {precision} path did not run"
    );
}

/// Copies a folder tree (e.g. a fixture model into a test's own models folder).
pub fn copy_dir_all(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir_all(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A small img2img request (64 × 64 flat init image, 4 steps, strength 0.5, seed 1) for tests about what a
/// request is allowed, not what it draws; adjust fields with struct update syntax.
pub fn small_img2img(prompt: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        mode: Mode::Img2Img {
            init_image: image::RgbImage::from_pixel(64, 64, image::Rgb([120, 80, 40])),
            strength: 0.5,
        },
        width: 64,
        height: 64,
        samples: 1,
        num_inference_steps: 4,
        guidance_scale: 5.0,
        seed: Some(1),
        scheduler: None,
        scheduler_options: SchedulerOptions::default(),
        clip_skip: 1,
        embeddings: Vec::new(),
        tome: None,
    }
}
