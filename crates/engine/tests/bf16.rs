//! `--precision bf16` (convolutions and linear layers multiplied in bf16 on AMX or AVX-512 BF16) against our own fp32
//! output on the tiny diffusers pipelines of tests/fixtures/cases.json: every image at 35 dB PSNR or
//! better, and not bit-identical (the bf16 path really ran). On a CPU with neither the test says so and
//! checks only that bf16 is refused with a reason. A model loaded while bf16 products are on (its layers
//! keeping only bf16 weights) draws what bf16 products draw from a model loaded in f32.

mod support;

use std::sync::Mutex;

use pictor_engine::kernels;
use pictor_engine::lora::Lora;
use support::{
    assert_within_35_db_of_fp32, fixtures, generate_case, load_model, models, psnr, GenerationCase,
};

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
    assert_within_35_db_of_fp32("bf16", load_model, |model, case| {
        kernels::set_bf16_products(false).unwrap();
        let reference = generate_case(model, case, None);
        kernels::set_bf16_products(true).unwrap();
        let reduced = generate_case(model, case, None);
        kernels::set_bf16_products(false).unwrap();
        (reference, reduced)
    });
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
