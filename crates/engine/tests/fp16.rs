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
use support::{assert_within_35_db_of_fp32, generate_case, load_model, models};

fn load_f16(id: &str) -> StableDiffusion {
    let location = models().resolve_id(id).expect("fixture model");
    let model =
        model_store::load(&location, &Device::Cpu, DType::F16).expect("fixture model loads in f16");
    assert_eq!(model.unet_dtype(), DType::F16, "{id}: UNet weights in f16");
    model
}

#[test]
fn fp16_images_stay_close_to_fp32() {
    assert_within_35_db_of_fp32(
        "fp16",
        |id| (load_model(id), load_f16(id)),
        |(full, half), case| {
            (
                generate_case(full, case, None),
                generate_case(half, case, None),
            )
        },
    );
}

/// SDXL in float16 (as on a GPU): the UNet in f16, the VAE upcast to f32 (`force_upcast`, as diffusers'
/// SDXL pipelines do, since SDXL's VAE overflows in f16), and the images close to float32's.
#[test]
fn sdxl_fp16_upcasts_its_vae_and_stays_close_to_fp32() {
    let text = std::fs::read_to_string(support::fixtures().join("sdxl/cases.json")).unwrap();
    let cases: Vec<support::GenerationCase> = serde_json::from_str(&text).unwrap();
    for name in [
        "sdxl-euler-s42",
        "sdxl-dpm2m-72x56-s7-n2",
        "sdxl-refiner-euler-s3",
    ] {
        let case = cases.iter().find(|c| c.name == name).unwrap();
        let half = load_f16(&case.model);
        assert_eq!(half.vae_dtype(), DType::F32, "{name}: VAE upcast");
        let full = load_model(&case.model);
        let (a, b) = (
            generate_case(&full, case, None),
            generate_case(&half, case, None),
        );
        for (x, y) in a.iter().zip(&b) {
            let db = support::psnr(x, y);
            assert!(
                db >= pictor_engine::parity::MIN_REDUCED_PSNR_DB,
                "{name}: {db:.1} dB"
            );
        }
    }
}
