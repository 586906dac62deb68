//! Prompt syntax, long prompts and textual inversion against the references in tests/fixtures/prompts/
//! (written by scripts/make_prompt_fixtures.py): the conditioning tensors of a plain Python implementation of
//! AUTOMATIC1111's rules on transformers' CLIPTextModel, and an img2img image from diffusers after
//! `load_textual_inversion`.

mod support;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use pictor_engine::embeddings::TextualInversion;
use pictor_engine::image_io::load_image;
use pictor_engine::model_store::ModelsDir;
use pictor_engine::parity::compare;
use pictor_engine::pipeline::{GenerateRequest, Mode, NoProgress, StableDiffusion};
use pictor_engine::prompt_syntax::escape;
use pictor_engine::schedulers::SchedulerOptions;
use pictor_engine::EngineError;
use serde_json::Value;
use support::{fixtures, load_model, max_abs_diff};

/// Largest |Δ| allowed between our conditioning and the float32 Python reference (values reach ~4), after the
/// common factor below.
const TOLERANCE: f32 = 1e-5;
/// AUTOMATIC1111's re-weighting rescales a chunk by (unweighted mean / weighted mean). These random tiny
/// encoders have chunk means of ~5e-4, so float32 rounding in the two means moves a weighted chunk by a common
/// factor (up to ~3e-5 here): it is checked on its own, with this tolerance.
const FACTOR_TOLERANCE: f32 = 2e-4;

fn fixture() -> Value {
    let text = std::fs::read_to_string(fixtures().join("prompts/prompts.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The embedding `name`: from `tests/fixtures/prompts/embeddings/` found as the models folder finds it, or the
/// `.safetensors` variant in `embeddings-st/`.
fn embedding(folder: &str, name: &str) -> TextualInversion {
    let root = fixtures().join("prompts");
    let path = match folder {
        "embeddings" => ModelsDir::new(&root).resolve_embedding(name).unwrap(),
        _ => root.join(folder).join(format!("{name}.safetensors")),
    };
    TextualInversion::load(&path, name).unwrap()
}

/// The least-squares factor c with ours ≈ c · theirs, and the max |ours − c · theirs|.
fn fit_scale(ours: &Tensor, theirs: &Tensor) -> (f32, f32) {
    let dot = |a: &Tensor, b: &Tensor| {
        (a * b)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let c = dot(ours, theirs) / dot(theirs, theirs);
    (c, max_abs_diff(ours, &(theirs * c as f64).unwrap()))
}

#[test]
fn conditioning_matches_the_reference() {
    let fx = fixture();
    let reference = candle_core::safetensors::load(
        fixtures().join("prompts/conditioning.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    let mut report = Vec::new();
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let model_name = case["model"].as_str().unwrap();
        let model = models
            .entry(model_name.to_string())
            .or_insert_with(|| load_model(model_name));
        let embeddings: Vec<TextualInversion> = case["embeddings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| embedding("embeddings", e.as_str().unwrap()))
            .collect();
        let prompt = case["prompt"].as_str().unwrap();
        let clip_skip = case["clip_skip"].as_u64().unwrap() as usize;
        let ours = model
            .encode_prompts(&[(prompt, clip_skip)], &embeddings)
            .unwrap()
            .into_iter()
            .map(|e| e.context)
            .collect::<Vec<_>>();
        let theirs = &reference[name];
        assert_eq!(
            ours[0].dims(),
            theirs.dims(),
            "{name}: chunks differ ({} expected)",
            case["chunks"]
        );
        for k in 0..ours[0].dims()[1] / 77 {
            let ours = ours[0].narrow(1, 77 * k, 77).unwrap();
            let theirs = theirs.narrow(1, 77 * k, 77).unwrap();
            let (factor, residual) = fit_scale(&ours, &theirs);
            report.push(format!(
                "{name} chunk {k}: common factor 1{:+e}, then max |Δ| {residual:e}",
                factor - 1.0
            ));
            assert!(
                (factor - 1.0).abs() <= FACTOR_TOLERANCE && residual <= TOLERANCE,
                "{report:#?}"
            );
        }
    }
    eprintln!("{report:#?}");
}

#[test]
fn prompt_and_negative_get_the_same_length() {
    let model = load_model("sd1-tiny");
    let long = fixture()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "long")
        .unwrap()["prompt"]
        .as_str()
        .unwrap()
        .to_string();
    let both = model
        .encode_prompts(&[("blurry", 1), (&long, 2)], &[])
        .unwrap()
        .into_iter()
        .map(|e| e.context)
        .collect::<Vec<_>>();
    assert_eq!(both[0].dims(), &[1, 154, 48]);
    assert_eq!(both[1].dims(), &[1, 154, 48]);
    // The short one is itself followed by the empty prompt's encoding.
    let alone = model
        .encode_prompts(&[("blurry", 1), ("", 1)], &[])
        .unwrap()
        .into_iter()
        .map(|e| e.context)
        .collect::<Vec<_>>();
    let expected = Tensor::cat(&[&alone[0], &alone[1]], 1).unwrap();
    assert_eq!(max_abs_diff(&both[0], &expected), 0.0);
}

#[test]
fn bad_prompts_and_embeddings_are_clear_errors() {
    let model = load_model("sd1-tiny");
    let e = model.encode_prompts(&[("a (cat", 1)], &[]).unwrap_err();
    assert!(
        matches!(
            e,
            EngineError::InvalidRequest {
                field: "prompt",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("character 3"), "{e}");
    let request = GenerateRequest {
        negative_prompt: "blurry)".into(),
        ..support::small_img2img("a cat")
    };
    let e = model.generate(&request, &mut NoProgress).unwrap_err();
    assert!(
        matches!(
            e,
            EngineError::InvalidRequest {
                field: "negative_prompt",
                ..
            }
        ),
        "{e}"
    );
    let sd2 = embedding("embeddings", "sd2-style");
    assert_eq!(sd2.vector_count(), 2);
    let e = model
        .encode_prompts(&[("sd2-style", 1)], &[sd2])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sd2-style") && e.contains("64-wide") && e.contains("48 wide"),
        "{e}"
    );
}

#[test]
fn embedding_formats_load_the_same_vectors() {
    let pt = embedding("embeddings", "pictor-style");
    let st = embedding("embeddings-st", "pictor-style");
    assert_eq!((pt.vector_count(), pt.hidden_size()), (3, 48));
    assert_eq!(max_abs_diff(&pt.vectors, &st.vectors), 0.0);
    let dot = embedding("embeddings", "pictor-dot");
    assert_eq!((dot.vector_count(), dot.hidden_size()), (1, 48));
}

#[test]
fn textual_inversion_img2img_matches_diffusers() {
    let case = &fixture()["ti_img2img"];
    let s = |k: &str| case[k].as_str().unwrap().to_string();
    let model = load_model(&s("model"));
    let expected_embeds =
        candle_core::safetensors::load(fixtures().join(s("tensors")), &Device::Cpu)
            .unwrap()
            .remove("prompt_embeds")
            .unwrap();
    let theirs = load_image(&fixtures().join(s("image")), 1 << 24).unwrap();
    for folder in ["embeddings", "embeddings-st"] {
        let embeddings = vec![embedding(folder, "pictor-style")];
        let encoded = model
            .encode_prompts(
                &[(&s("prompt"), 1), (&s("negative_prompt"), 1)],
                &embeddings,
            )
            .unwrap()
            .into_iter()
            .map(|e| e.context)
            .collect::<Vec<_>>();
        let batch = Tensor::cat(&[&encoded[1], &encoded[0]], 0).unwrap();
        let d = max_abs_diff(&batch, &expected_embeds);
        assert!(d <= TOLERANCE, "{folder}: prompt_embeds max |Δ| {d:e}");
        let request = GenerateRequest {
            prompt: escape(&s("prompt")),
            negative_prompt: s("negative_prompt"),
            mode: Mode::Img2Img {
                init_image: load_image(&fixtures().join(s("init_image")), 1 << 24).unwrap(),
                strength: case["strength"].as_f64().unwrap(),
            },
            width: 64,
            height: 64,
            samples: 1,
            num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as usize,
            guidance_scale: case["guidance_scale"].as_f64().unwrap(),
            seed: case["seed"].as_u64(),
            scheduler: None,
            scheduler_options: SchedulerOptions::default(),
            clip_skip: 1,
            embeddings,
            tome: None,
        };
        let generation = model.generate(&request, &mut NoProgress).unwrap();
        let (max, mean) = compare(&generation.images[0], &theirs);
        assert!(
            max <= pictor_engine::parity::MAX_ABS_DIFF
                && mean <= pictor_engine::parity::MAX_MEAN_ABS_DIFF,
            "{folder}: max |Δ| {max}, mean |Δ| {mean:.3}"
        );
        // Without the embedding the image is different: the vectors were used.
        if folder == "embeddings" {
            let plain = model
                .generate(
                    &GenerateRequest {
                        embeddings: Vec::new(),
                        tome: None,
                        ..request.clone()
                    },
                    &mut NoProgress,
                )
                .unwrap();
            let (max, _) = compare(&plain.images[0], &theirs);
            assert!(max > 3, "the embedding made no difference");
        }
    }
}
