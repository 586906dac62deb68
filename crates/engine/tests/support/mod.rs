//! What the engine's integration tests share: the fixtures folder, loading a fixture model, and comparing
//! tensors with the references (fixture cases and image comparisons are `pictor_engine::parity`'s, which
//! `pictor check-fixtures` uses too).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use pictor_engine::model_store::{self, ModelsDir};
use pictor_engine::models::TomeSettings;
use pictor_engine::parity;
#[allow(unused_imports)] // each test binary uses some of them
pub use pictor_engine::parity::{compare, psnr, GenerationCase};
use pictor_engine::pipeline::{GenerateRequest, Mode, NoProgress, StableDiffusion};
use pictor_engine::schedulers::SchedulerOptions;
use pictor_engine::Runtime;

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

/// The engine request a fixture case describes ([`pictor_engine::parity::request_for`] on the fixtures
/// folder), with token merging when `tome` is given.
pub fn request_for(
    case: &GenerationCase,
    tome: Option<TomeSettings>,
) -> Result<GenerateRequest, String> {
    parity::request_for(&fixtures(), case, tome)
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
            } else if db < parity::MIN_REDUCED_PSNR_DB {
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
