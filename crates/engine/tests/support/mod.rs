//! What the engine's integration tests share: the fixtures folder, loading a fixture model, and comparing
//! images and tensors with the references.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use pictor_engine::image_io::load_image;
use pictor_engine::model_store::{self, ModelsDir};
use pictor_engine::models::TomeSettings;
use pictor_engine::pipeline::{Img2ImgRequest, NoProgress, Pix2PixRequest, StableDiffusion};
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

/// The generation a fixture case describes (the fields `cases.json` and `tome/cases.json` share).
#[derive(Debug, Clone, Deserialize)]
pub struct GenerationCase {
    pub name: String,
    pub model: String,
    pub pipeline: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub init_image: String,
    pub width: u32,
    pub height: u32,
    pub samples: usize,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    pub strength: Option<f64>,
    pub image_guidance_scale: Option<f64>,
    pub seed: u64,
    pub scheduler: String,
    pub clip_skip: usize,
}

/// Runs a fixture case through the engine (its prompts are plain text, so they are escaped), with token
/// merging when `tome` is given.
pub fn generate_case(
    model: &StableDiffusion,
    case: &GenerationCase,
    tome: Option<TomeSettings>,
) -> Vec<image::RgbImage> {
    let init = load_image(&fixtures().join(&case.init_image), 1 << 24).unwrap();
    let negative = escape(&case.negative_prompt.clone().unwrap_or_default());
    let generation = match case.pipeline.as_str() {
        "img2img" => model.img2img(
            &Img2ImgRequest {
                prompt: escape(&case.prompt),
                negative_prompt: negative,
                init_image: init,
                width: case.width,
                height: case.height,
                samples: case.samples,
                num_inference_steps: case.num_inference_steps,
                guidance_scale: case.guidance_scale,
                strength: case.strength.unwrap(),
                seed: Some(case.seed),
                scheduler: Some(case.scheduler.clone()),
                scheduler_options: SchedulerOptions::default(),
                clip_skip: case.clip_skip,
                tome,
                embeddings: Vec::new(),
            },
            &mut NoProgress,
        ),
        _ => model.pix2pix(
            &Pix2PixRequest {
                prompt: escape(&case.prompt),
                negative_prompt: negative,
                init_image: init,
                width: case.width,
                height: case.height,
                samples: case.samples,
                num_inference_steps: case.num_inference_steps,
                guidance_scale: case.guidance_scale,
                image_guidance_scale: case.image_guidance_scale.unwrap(),
                seed: Some(case.seed),
                scheduler: Some(case.scheduler.clone()),
                scheduler_options: SchedulerOptions::default(),
                clip_skip: case.clip_skip,
                tome,
                embeddings: Vec::new(),
            },
            &mut NoProgress,
        ),
    };
    generation.expect("generation runs").images
}
