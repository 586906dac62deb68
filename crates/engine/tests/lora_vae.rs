//! LoRAs and replacement VAEs against diffusers: the cases in tests/fixtures/lora_vae/cases.json (written by
//! scripts/make_lora_vae_fixtures.py) run through the engine must match diffusers' images within
//! max |Δ| ≤ 3 and mean |Δ| ≤ 0.5 on the 0–255 scale; merging must leave the base model untouched; files
//! for another architecture are refused with the reason.

mod support;

use pictor_engine::image_io::load_image;
use pictor_engine::lora::Lora;
use pictor_engine::model_store::{self};
use pictor_engine::parity::{self, GenerationCase};
use pictor_engine::pipeline::{NoProgress, StableDiffusion};
use pictor_engine::Runtime;
use support::{compare, fixtures, load_model, models};

type Case = GenerationCase;

fn cases() -> Vec<Case> {
    parity::load_case_file(&fixtures(), "lora_vae/cases.json", "lora_vae").unwrap()
}

fn lora(name: &str) -> Lora {
    Lora::load(&models().resolve_lora(name).unwrap(), name).unwrap()
}

fn generate(model: &StableDiffusion, case: &Case) -> Vec<image::RgbImage> {
    model
        .generate(&support::request_for(case, None).unwrap(), &mut NoProgress)
        .unwrap()
        .images
}

fn assert_matches(case: &Case, images: &[image::RgbImage]) {
    for (ours, path) in images.iter().zip(&case.images) {
        let theirs = load_image(&fixtures().join(path), 1 << 24).unwrap();
        let (max, mean) = compare(ours, &theirs);
        assert!(
            max <= parity::MAX_ABS_DIFF && mean <= parity::MAX_MEAN_ABS_DIFF,
            "{}: max |Δ| {max}, mean |Δ| {mean:.3} against diffusers",
            case.name
        );
    }
}

#[test]
fn loras_and_vaes_match_diffusers_and_leave_the_base_model_alone() {
    let plain = cases().into_iter().next().unwrap();
    let base = load_model(&plain.model);
    let before = generate(&base, &plain);
    for case in cases() {
        assert_eq!(case.model, plain.model, "one base model for every case");
        let loras: Vec<(Lora, f64)> = case.loras.iter().map(|(n, s)| (lora(n), *s)).collect();
        let refs: Vec<(&Lora, f64)> = loras.iter().map(|(l, s)| (l, *s)).collect();
        let mut model = base.with_loras(&refs).unwrap();
        if let Some(vae) = &case.vae {
            let rt = Runtime::cpu();
            let path = models().resolve_vae(vae).unwrap();
            model = model
                .with_vae(
                    model_store::load_vae(&path, vae, 0.18215, &rt.device, rt.dtype, false)
                        .unwrap(),
                )
                .unwrap();
        }
        let images = generate(&model, &case);
        assert_matches(&case, &images);
        let (max, _) = compare(&images[0], &before[0]);
        assert!(
            max > 20,
            "{}: the variant should differ from the base model",
            case.name
        );
    }
    let after = generate(&base, &plain);
    assert_eq!(
        before, after,
        "making variants must not change the base model"
    );
}

#[test]
fn the_ldm_named_vae_file_equals_the_diffusers_folder() {
    let base = load_model("sd1-tiny");
    let case = cases().into_iter().find(|c| c.vae.is_some()).unwrap();
    let rt = Runtime::cpu();
    let file = models().resolve_vae("tiny-alt-ldm").unwrap();
    let vae =
        model_store::load_vae(&file, "tiny-alt-ldm", 0.18215, &rt.device, rt.dtype, false).unwrap();
    assert_matches(&case, &generate(&base.with_vae(vae).unwrap(), &case));
}

#[test]
fn a_single_file_model_takes_the_same_loras() {
    let single = load_model("sd1-tiny-single");
    let case = cases().into_iter().next().unwrap();
    let l = lora(&case.loras[0].0);
    let model = single.with_loras(&[(&l, case.loras[0].1)]).unwrap();
    assert_matches(&case, &generate(&model, &case));
}

#[test]
fn unfit_or_missing_files_are_refused_clearly() {
    let base = load_model("sd1-tiny");
    let sd2 = lora("tiny-sd2-kohya");
    let err = base.with_loras(&[(&sd2, 1.0)]).err().unwrap().to_string();
    assert!(err.contains("another architecture"), "{err}");
    let err = models().resolve_lora("nope").unwrap_err().to_string();
    assert!(err.contains("no LoRA named nope"), "{err}");
    let err = models()
        .resolve_lora("../checkpoints/sd1-tiny")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a valid name"), "{err}");
    let err = models().resolve_vae("nope").unwrap_err().to_string();
    assert!(err.contains("no VAE named nope"), "{err}");
    // A model file is not a LoRA.
    let path = fixtures().join("models/checkpoints/sd1-tiny-single.safetensors");
    let err = Lora::load(&path, "sd1-tiny-single")
        .unwrap_err()
        .to_string();
    assert!(err.contains("neither kohya"), "{err}");
    // A text encoder's weight file is not a VAE.
    let te = fixtures().join("models/checkpoints/sd1-tiny/text_encoder/model.safetensors");
    let rt = Runtime::cpu();
    let err = model_store::load_vae(&te, "te", 0.18215, &rt.device, rt.dtype, false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("holds no VAE"), "{err}");
}
