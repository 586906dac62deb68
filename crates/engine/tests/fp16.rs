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
