//! `--precision bf16` (convolutions and linear layers multiplied in bf16 on AMX or AVX-512 BF16) against our own fp32
//! output on the tiny diffusers pipelines of tests/fixtures/cases.json: every image at 35 dB PSNR or
//! better, and not bit-identical (the bf16 path really ran). On a CPU with neither the test says so and
//! checks only that bf16 is refused with a reason. A model loaded while bf16 products are on (its layers
//! keeping only bf16 weights) draws what bf16 products draw from a model loaded in f32.

mod support;

use std::sync::Mutex;

use pictor_engine::kernels;
use pictor_engine::lora::Lora;
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

/// bf16 products are a process-wide switch: the tests of this file take turns.
static SWITCH: Mutex<()> = Mutex::new(());

#[test]
fn bf16_images_stay_within_35_db_of_fp32() {
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    if !kernels::bf16_available() {
        let refused =
            kernels::set_bf16_products(true).expect_err("bf16 refused without bf16 products");
        assert!(refused.contains("AMX"), "{refused}");
        eprintln!("this CPU has no bf16 products: bf16 is refused ({refused}); PSNR not measured");
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

#[test]
fn a_model_loaded_for_bf16_draws_what_bf16_products_draw_from_f32_weights() {
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    if !kernels::bf16_available() {
        eprintln!("this CPU has no bf16 products: skipped");
        return;
    }
    let text = std::fs::read_to_string(fixtures().join("cases.json")).expect("cases.json");
    let cases: Vec<GenerationCase> = serde_json::from_str(&text).expect("cases.json parses");
    let case = &cases[0];
    let id = case.model.trim_end_matches(".safetensors");
    let loras: Vec<Lora> = ["tiny-kohya", "tiny-peft"]
        .iter()
        .map(|name| Lora::load(&models().resolve_lora(name).unwrap(), name).unwrap())
        .collect();
    let strengths = [(&loras[0], 0.6), (&loras[1], 1.0)];

    // Loaded in f32, its layers pack bf16 copies on first use and keep the f32 weights.
    kernels::set_bf16_products(false).unwrap();
    let from_f32 = load_model(id);
    let from_f32_lora = from_f32.with_loras(&strengths).unwrap();
    kernels::set_bf16_products(true).unwrap();
    let expected = generate_case(&from_f32, case, None);
    let expected_lora = generate_case(&from_f32_lora, case, None);

    // Loaded with bf16 products on, its layers keep only the bf16 copies (and the LoRA base only bf16
    // matrices): the same packed weights, so the same images; a LoRA merged into bf16-rounded weights
    // is rounded twice, so nearly the same.
    let for_bf16 = load_model(id);
    let for_bf16_lora = for_bf16.with_loras(&strengths).unwrap();
    let images = generate_case(&for_bf16, case, None);
    let images_lora = generate_case(&for_bf16_lora, case, None);
    kernels::set_bf16_products(false).unwrap();

    assert_eq!(images, expected, "bf16-only layers changed the image");
    for (a, b) in images_lora.iter().zip(&expected_lora) {
        let db = psnr(a, b);
        assert!(db >= 40.0, "LoRA on bf16 base weights: {db:.1} dB");
    }
    assert_ne!(images_lora, images, "the LoRAs changed nothing");
    assert!(
        for_bf16_lora.extra_bytes() < from_f32_lora.extra_bytes(),
        "the merged UNet matrices are kept in bf16: {} against {} bytes",
        for_bf16_lora.extra_bytes(),
        from_f32_lora.extra_bytes()
    );
}
