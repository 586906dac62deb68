//! The precision a CUDA GPU runs in (`Runtime::default_for_this_machine` with the `cuda` feature: UNet and
//! VAE in float16, text encoder in float32), exercised on the CPU, where candle runs the same operations in
//! float16: every image of the tiny diffusers pipelines of tests/fixtures/cases.json must load, run and stay
//! close to our float32 output. No GPU is needed (none is available to CI); what this shows is that the
//! models load in f16 and that every dtype hand-over on the way (prompt embeddings, latents, scheduler
//! arithmetic, image decoding) is in place, not the speed or the exact numerics of CUDA kernels.

mod support;

use candle_core::{DType, Device};
use pictor_engine::model_store;
use pictor_engine::pipeline::StableDiffusion;
use support::{fixtures, generate_case, load_model, models, GenerationCase};

/// Peak signal-to-noise ratio of `b` against `a` in dB on the 0–255 scale (infinite when equal).
fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    let squared: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let mse = squared / a.as_raw().len() as f64;
    10.0 * (255.0 * 255.0 / mse).log10()
}

fn load_f16(id: &str) -> StableDiffusion {
    let location = models().resolve_id(id).expect("fixture model");
    let model =
        model_store::load(&location, &Device::Cpu, DType::F16).expect("fixture model loads in f16");
    assert_eq!(model.unet_dtype(), DType::F16, "{id}: UNet weights in f16");
    model
}

#[test]
fn fp16_images_stay_close_to_fp32() {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).expect("cases.json");
    let cases: Vec<GenerationCase> = serde_json::from_str(&text).expect("cases.json parses");
    let chosen: Vec<&GenerationCase> = cases.iter().step_by(4).collect();
    let mut loaded: Vec<(String, StableDiffusion, StableDiffusion)> = Vec::new();
    let (mut failures, mut identical, mut images) = (Vec::new(), 0, 0);
    for case in chosen {
        let id = case.model.trim_end_matches(".safetensors");
        if !loaded.iter().any(|(n, _, _)| n == id) {
            loaded.push((id.to_string(), load_model(id), load_f16(id)));
        }
        let (_, full, half) = loaded.iter().find(|(n, _, _)| n == id).unwrap();
        let reference = generate_case(full, case, None);
        let reduced = generate_case(half, case, None);
        assert_eq!(reference.len(), reduced.len());
        for (i, (a, b)) in reference.iter().zip(&reduced).enumerate() {
            let db = psnr(a, b);
            println!("{} image {i}: fp16 vs fp32 PSNR {db:.1} dB", case.name);
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
        "f16 changed no image: the f16 path did not run"
    );
}
