//! SDXL beyond the images of tests/fixtures/sdxl/cases.json (which `parity.rs` runs): the conditioning tensor
//! for tensor against diffusers' own (recorded by scripts/make_sdxl_fixtures.py), the prompt features on two
//! encoders, and the errors that name what an SDXL model cannot do or what a folder lacks.

mod support;

use std::path::Path;

use candle_core::{safetensors::load, Device, Tensor};
use pictor_engine::embeddings::TextualInversion;
use pictor_engine::error::EngineError;
use pictor_engine::lora::Lora;
use pictor_engine::model_store::{self, ModelsDir};
use pictor_engine::pipeline::{Mode, NoProgress};
use pictor_engine::prompt_syntax::escape;
use pictor_engine::Runtime;
use support::{copy_dir_all, fixtures, load_model, max_abs_diff, models, small_img2img};

/// The tensors diffusers recorded for an SDXL case.
fn recorded(case: &str) -> std::collections::HashMap<String, Tensor> {
    load(
        fixtures().join(format!("sdxl/cases/{case}/tensors.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

/// The prompt of every SDXL case, as Pictor's syntax spells diffusers' literal text.
fn prompt() -> String {
    escape("a photo of a cat, ((cinematic lighting))")
}

#[test]
fn sdxl_conditioning_equals_diffusers_tensor_for_tensor() {
    let model = load_model("sdxl-tiny");
    let t = recorded("sdxl-euler-s42");
    // diffusers' first UNet call: [negative, prompt] along the batch.
    let encoded = model
        .encode_prompts(&[(&prompt(), 1), ("blurry", 1)], &[])
        .unwrap();
    let (positive, negative) = (&encoded[0], &encoded[1]);
    let context = Tensor::cat(&[&negative.context, &positive.context], 0).unwrap();
    let pooled = Tensor::cat(
        &[
            negative.pooled.as_ref().unwrap(),
            positive.pooled.as_ref().unwrap(),
        ],
        0,
    )
    .unwrap();
    assert_eq!(context.dims(), t["prompt_embeds"].dims());
    assert!(max_abs_diff(&context, &t["prompt_embeds"]) < 1e-4);
    assert!(max_abs_diff(&pooled, &t["text_embeds"]) < 1e-4);
    // Both encoders matter: CLIP-L fills the first 48 columns, bigG the other 80.
    assert_eq!(context.dims(), &[2, 77, 128]);

    // The refiner: bigG alone.
    let refiner = load_model("sdxl-refiner-tiny");
    let t = recorded("sdxl-refiner-euler-s3");
    let encoded = refiner
        .encode_prompts(&[(&prompt(), 1), ("blurry", 1)], &[])
        .unwrap();
    let context = Tensor::cat(&[&encoded[1].context, &encoded[0].context], 0).unwrap();
    assert_eq!(context.dims(), &[2, 77, 80]);
    assert!(max_abs_diff(&context, &t["prompt_embeds"]) < 1e-4);
}

#[test]
fn sdxl_long_prompts_weights_and_break_reach_both_encoders() {
    let model = load_model("sdxl-tiny");
    let long = vec!["cat"; 100].join(" ");
    let encoded = model
        .encode_prompts(&[("blurry", 1), (&long, 1)], &[])
        .unwrap();
    // Two 77-token windows on every prompt, both encoders side by side; the pooled embedding is the first
    // window's, as AUTOMATIC1111 does.
    assert_eq!(encoded[0].context.dims(), &[1, 154, 128]);
    assert_eq!(encoded[1].context.dims(), &[1, 154, 128]);
    assert_eq!(encoded[1].pooled.as_ref().unwrap().dims(), &[1, 40]);
    let plain = model.encode_prompts(&[("a cat", 1)], &[]).unwrap();
    let weighted = model.encode_prompts(&[("a (cat:1.5)", 1)], &[]).unwrap();
    let split = model.encode_prompts(&[("a BREAK cat", 1)], &[]).unwrap();
    assert!(max_abs_diff(&plain[0].context, &weighted[0].context) > 1e-3);
    // Weights change the hidden states, not the pooled embedding.
    assert!(
        max_abs_diff(
            plain[0].pooled.as_ref().unwrap(),
            weighted[0].pooled.as_ref().unwrap()
        ) < 1e-6
    );
    assert_eq!(split[0].context.dims(), &[1, 154, 128]);
}

fn invalid_field(e: EngineError) -> (String, String) {
    match e {
        EngineError::InvalidRequest { field, message } => (field.to_string(), message),
        other => panic!("expected an invalid-request error, got {other}"),
    }
}

/// Asserts that `ours` is diffusers' image `fixture` (a path under tests/fixtures) within the parity
/// tolerance: max |Δ| ≤ 3, mean |Δ| ≤ 0.5.
fn assert_like_reference(ours: &image::RgbImage, fixture: &str, case: &str) {
    let theirs = pictor_engine::image_io::load_image(&fixtures().join(fixture), 1 << 24).unwrap();
    let (max, mean) = support::compare(ours, &theirs);
    assert!(
        max <= pictor_engine::parity::MAX_ABS_DIFF
            && mean <= pictor_engine::parity::MAX_MEAN_ABS_DIFF,
        "{case}: max {max}, mean {mean:.3}"
    );
}

/// One case of tests/fixtures/sdxl/lora_cases.json (written by scripts/make_sdxl_fixtures.py).
#[derive(serde::Deserialize)]
struct LoraCase {
    name: String,
    prompt: String,
    negative_prompt: String,
    seed: u64,
    num_inference_steps: usize,
    guidance_scale: f64,
    strength: f64,
    scheduler: String,
    loras: Vec<(String, f64)>,
    images: Vec<String>,
}

/// SDXL LoRAs in sd-scripts' naming (lora_te1_/lora_te2_, LDM UNet paths) and diffusers/PEFT naming
/// (text_encoder_2.) give diffusers' images; the loaded model is left as it was.
#[test]
fn sdxl_loras_match_diffusers() {
    let model = load_model("sdxl-tiny");
    let text = std::fs::read_to_string(fixtures().join("sdxl/lora_cases.json")).unwrap();
    let cases: Vec<LoraCase> = serde_json::from_str(&text).unwrap();
    assert_eq!(cases.len(), 3);
    let init =
        pictor_engine::image_io::load_image(&fixtures().join("init-64.png"), 1 << 24).unwrap();
    let run = |m: &pictor_engine::pipeline::StableDiffusion, case: &LoraCase| {
        let req = pictor_engine::pipeline::GenerateRequest {
            prompt: case.prompt.clone(),
            negative_prompt: case.negative_prompt.clone(),
            mode: Mode::Img2Img {
                init_image: init.clone(),
                strength: case.strength,
            },
            num_inference_steps: case.num_inference_steps,
            guidance_scale: case.guidance_scale,
            seed: Some(case.seed),
            scheduler: Some(case.scheduler.clone()),
            ..small_img2img("")
        };
        m.generate(&req, &mut NoProgress).unwrap().images.remove(0)
    };
    let before = run(&model, &cases[0]);
    for case in &cases {
        let variant = model_store::variant(&model, &models(), &case.loras, None).unwrap();
        let ours = run(&variant, case);
        assert_like_reference(&ours, &format!("sdxl/{}", case.images[0]), &case.name);
        assert!(variant.extra_bytes() > 0);
    }
    assert_eq!(
        run(&model, &cases[0]),
        before,
        "merging changed the loaded model"
    );
}

/// SDXL textual inversion (clip_l for CLIP-L, clip_g for ViT-bigG; the refiner reads clip_g alone) gives
/// diffusers' images with the embedding loaded into both encoders.
#[test]
fn sdxl_embeddings_match_diffusers() {
    let text = std::fs::read_to_string(fixtures().join("sdxl/embedding_cases.json")).unwrap();
    let cases: Vec<support::GenerationCase> = serde_json::from_str(&text).unwrap();
    let images: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let embedding = TextualInversion::load(
        &fixtures().join("sdxl/embeddings/sdxlstyle.safetensors"),
        "sdxlstyle",
    )
    .unwrap();
    assert!(embedding.is_sdxl());
    for (case, record) in cases.iter().zip(&images) {
        let model = load_model(&case.model);
        let req = pictor_engine::pipeline::GenerateRequest {
            embeddings: vec![embedding.clone()],
            ..support::request_for(case, None).unwrap()
        };
        let ours = model
            .generate(&req, &mut NoProgress)
            .unwrap()
            .images
            .remove(0);
        assert_like_reference(&ours, record["images"][0].as_str().unwrap(), &case.name);
    }
    // An SDXL embedding on SD 1 is refused by name.
    let mut req = small_img2img("sdxlstyle");
    req.embeddings = vec![embedding];
    let (field, message) = invalid_field(
        load_model("sd1-tiny")
            .generate(&req, &mut NoProgress)
            .unwrap_err(),
    );
    assert_eq!(field, "embeddings_model");
    assert!(message.contains("is an SDXL embedding"), "{message}");
}

#[test]
fn sdxl_refuses_what_it_cannot_do_yet_by_name() {
    let model = load_model("sdxl-tiny");
    // An SD 1 LoRA's UNet layers are not in an SDXL UNet.
    let lora = Lora::load(&models().resolve_lora("tiny-kohya").unwrap(), "tiny-kohya").unwrap();
    let (field, message) = invalid_field(model.with_loras(&[(&lora, 1.0)]).err().unwrap());
    assert_eq!(field, "lora_model");
    assert!(message.contains("another architecture"), "{message}");
    // An SDXL LoRA on SD 1, and a LoRA for CLIP-L on the refiner (which has only ViT-bigG).
    let sdxl_lora = Lora::load(
        &models().resolve_lora("tiny-sdxl-kohya").unwrap(),
        "tiny-sdxl-kohya",
    )
    .unwrap();
    let (_, message) = invalid_field(
        load_model("sd1-tiny")
            .with_loras(&[(&sdxl_lora, 1.0)])
            .err()
            .unwrap(),
    );
    assert!(message.contains("is it an SDXL LoRA"), "{message}");
    let (_, message) = invalid_field(
        load_model("sdxl-refiner-tiny")
            .with_loras(&[(&sdxl_lora, 1.0)])
            .err()
            .unwrap(),
    );
    assert!(message.contains("refiner"), "{message}");

    let mut req = small_img2img("a cat");
    req.embeddings = vec![TextualInversion::from_tensor(
        "tiny-emb",
        Tensor::zeros((1, 48), candle_core::DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap()];
    let (field, message) = invalid_field(model.generate(&req, &mut NoProgress).unwrap_err());
    assert_eq!(field, "embeddings_model");
    assert!(message.contains("SDXL"), "{message}");

    // The refiner cannot start from text; validate says so before anything runs.
    let text = pictor_engine::pipeline::GenerateRequest {
        mode: Mode::Text2Img,
        ..small_img2img("a cat")
    };
    let (field, message) =
        invalid_field(load_model("sdxl-refiner-tiny").validate(&text).unwrap_err());
    assert_eq!(field, "model_id");
    assert!(message.contains("refiner"), "{message}");
    assert!(model.validate(&text).is_ok());

    // clip skip counts from the penultimate layer: 3 layers allow 1 to 3.
    assert_eq!(model.max_clip_skip(), 3);
    let mut req = small_img2img("a cat");
    req.clip_skip = 4;
    let (field, _) = invalid_field(model.generate(&req, &mut NoProgress).unwrap_err());
    assert_eq!(field, "clip_skip");
    req.clip_skip = 3;
    assert_eq!(
        model.generate(&req, &mut NoProgress).unwrap().images.len(),
        1
    );
}

/// Loads `id` from `root` and returns the error text.
fn load_error(root: &Path, id: &str) -> String {
    let rt = Runtime::cpu();
    let dir = ModelsDir::new(root);
    let result = dir
        .resolve_id(id)
        .and_then(|location| model_store::load(&location, &rt.device, rt.dtype));
    match result {
        Ok(_) => panic!("{id} loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sdxl_folders_that_do_not_fit_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let checkpoints = tmp.path().join("checkpoints");
    let source = fixtures().join("models/checkpoints");
    let copy = |from: &str, to: &str| {
        copy_dir_all(&source.join(from), &checkpoints.join(to));
        checkpoints.join(to)
    };

    let no_tokenizer = copy("sdxl-tiny", "no-tokenizer");
    std::fs::remove_dir_all(no_tokenizer.join("tokenizer_2")).unwrap();
    let e = load_error(tmp.path(), "no-tokenizer");
    assert!(e.contains("tokenizer_2/"), "{e}");

    let no_second = copy("sdxl-tiny", "no-second");
    std::fs::remove_dir_all(no_second.join("text_encoder_2")).unwrap();
    let e = load_error(tmp.path(), "no-second");
    assert!(e.contains("SDXL") && e.contains("text_encoder_2/"), "{e}");

    // An SD 1 UNet with an SDXL second text encoder beside it.
    let mixed = copy("sd1-tiny", "mixed");
    copy_dir_all(
        &source.join("sdxl-tiny/text_encoder_2"),
        &mixed.join("text_encoder_2"),
    );
    copy_dir_all(
        &source.join("sdxl-tiny/tokenizer_2"),
        &mixed.join("tokenizer_2"),
    );
    let e = load_error(tmp.path(), "mixed");
    assert!(e.contains("no SDXL add embedding"), "{e}");

    // SDXL InstructPix2Pix / inpainting UNets are refused before anything is loaded.
    let wide = copy("sdxl-tiny", "wide");
    let config = wide.join("unet/config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"in_channels\": 4", "\"in_channels\": 8");
    std::fs::write(&config, text).unwrap();
    let location = ModelsDir::new(tmp.path()).resolve_id("wide").unwrap();
    let e = model_store::peek_kind(&location).unwrap_err().to_string();
    assert!(e.contains("SDXL") && e.contains("8 input channels"), "{e}");
}

/// A VAE from a single file (no config) takes the SDXL model's scaling factor, as AUTOMATIC1111 does with
/// `sdxl_vae.safetensors`; SD 1's 0.18215 would scale SDXL latents wrongly.
#[test]
fn sdxl_with_a_single_file_vae_keeps_sdxl_scaling() {
    let model = load_model("sdxl-tiny");
    assert_eq!(model.vae_config().scaling_factor, 0.13025);
    let swapped = model_store::variant(&model, &models(), &[], Some("tiny-alt-ldm")).unwrap();
    assert_eq!(swapped.vae_config().scaling_factor, 0.13025);
    let sd1 = load_model("sd1-tiny");
    let swapped = model_store::variant(&sd1, &models(), &[], Some("tiny-alt-ldm")).unwrap();
    assert_eq!(swapped.vae_config().scaling_factor, 0.18215);
}

/// Token merging works where tomesd works: at the full latent resolution only (`max_downsample` 1), where
/// SDXL has no attention, so it leaves an SDXL image exactly as it was — as tomesd leaves diffusers'. With
/// `max_downsample` 2 it reaches SDXL's first attention level and changes the image.
#[test]
fn sdxl_token_merging_follows_tomesd_levels() {
    use pictor_engine::models::TomeSettings;
    let model = load_model("sdxl-tiny");
    let plain = model
        .generate(&small_img2img("a cat"), &mut NoProgress)
        .unwrap();
    let merged = |tome: TomeSettings| {
        let req = pictor_engine::pipeline::GenerateRequest {
            tome: Some(tome),
            ..small_img2img("a cat")
        };
        model.generate(&req, &mut NoProgress).unwrap().images
    };
    assert_eq!(merged(TomeSettings::default()), plain.images);
    let deeper = merged(TomeSettings {
        max_downsample: 2,
        ..TomeSettings::default()
    });
    assert_ne!(deeper, plain.images);
}
