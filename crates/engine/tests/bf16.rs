//! `--precision bf16` (convolutions and linear layers multiplied in bf16 on AMX) against our own fp32
//! output on the tiny diffusers pipelines of tests/fixtures/cases.json: every image at 35 dB PSNR or
//! better, and not bit-identical (the bf16 path really ran). On a CPU without AMX the test says so and
//! checks only that bf16 is refused with a reason.

mod support;

use pictor_engine::kernels;
use pictor_engine::pipeline::StableDiffusion;
use support::{fixtures, generate_case, load_model, GenerationCase};

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

#[test]
fn bf16_images_stay_within_35_db_of_fp32() {
    if !kernels::amx::available() {
        let refused = kernels::set_bf16_products(true).expect_err("bf16 refused without AMX");
        assert!(refused.contains("AMX"), "{refused}");
        eprintln!("this CPU has no AMX: bf16 is refused ({refused}); PSNR not measured");
        return;
    }
    let text = std::fs::read_to_string(fixtures().join("cases.json")).expect("cases.json");
    let cases: Vec<GenerationCase> = serde_json::from_str(&text).expect("cases.json parses");
    // Both pipelines, SD 1 and SD 2 and InstructPix2Pix, several schedulers: every fourth case.
    let chosen: Vec<&GenerationCase> = cases.iter().step_by(4).collect();
    let mut models: Vec<(String, StableDiffusion)> = Vec::new();
    let (mut failures, mut identical, mut images) = (Vec::new(), 0, 0);
    for case in chosen {
        if !models.iter().any(|(n, _)| n == &case.model) {
            models.push((
                case.model.clone(),
                load_model(case.model.trim_end_matches(".safetensors")),
            ));
        }
        let model = &models.iter().find(|(n, _)| n == &case.model).unwrap().1;
        kernels::set_bf16_products(false).unwrap();
        let reference = generate_case(model, case, None);
        kernels::set_bf16_products(true).unwrap();
        let reduced = generate_case(model, case, None);
        kernels::set_bf16_products(false).unwrap();
        for (i, (a, b)) in reference.iter().zip(&reduced).enumerate() {
            let db = psnr(a, b);
            println!("{} image {i}: bf16 vs fp32 PSNR {db:.1} dB", case.name);
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
        "bf16 changed no image: the bf16 path did not run"
    );
}
