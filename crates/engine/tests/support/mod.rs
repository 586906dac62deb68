//! What the engine's integration tests share: the fixtures folder, loading a fixture model, and comparing
//! images and tensors with the references.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use pictor_engine::model_store::{self, ModelsDir};
use pictor_engine::pipeline::StableDiffusion;
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
