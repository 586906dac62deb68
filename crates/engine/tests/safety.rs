//! The safety checker against diffusers' `StableDiffusionSafetyChecker` on a tiny random checker
//! (tests/fixtures/safety, written by scripts/make_safety_fixtures.py): the same flags on nine images (six
//! flagged, one of them only through the special-care adjustment), image embeddings within float32 noise
//! of diffusers' when fed the same pixels, our preprocessing within two levels of transformers' (PIL's), both
//! weight namings and folder layouts, clear errors for bad folders, and the replacements applied to
//! exactly the flagged images.

mod support;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use pictor_engine::safety::{replace_flagged, Replacement, SafetyChecker, CLIP_MEAN, CLIP_STD};
use serde_json::Value;
use support::max_abs_diff;

/// `tests/fixtures/safety`, where the checker and its references are.
fn fixtures() -> std::path::PathBuf {
    support::fixtures().join("safety")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
        .unwrap()
}

fn expected_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn images() -> Vec<RgbImage> {
    expected()["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            image::open(fixtures().join(p.as_str().unwrap()))
                .unwrap()
                .to_rgb8()
        })
        .collect()
}

fn expected_flags() -> Vec<bool> {
    expected()["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_bool().unwrap())
        .collect()
}

fn checker() -> SafetyChecker {
    SafetyChecker::load(fixtures(), &Device::Cpu).unwrap()
}

/// diffusers' pixel values, from the uint8 images transformers resized and cropped.
fn diffusers_pixel_values() -> Tensor {
    let resized = expected_tensors()["resized"].to_dtype(DType::F32).unwrap(); // [n, h, w, 3]
    let mean = Tensor::new(&CLIP_MEAN, &Device::Cpu).unwrap();
    let std = Tensor::new(&CLIP_STD, &Device::Cpu).unwrap();
    ((resized / 255.0).unwrap().broadcast_sub(&mean).unwrap())
        .broadcast_div(&std)
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap()
        .contiguous()
        .unwrap()
}

#[test]
fn flags_match_diffusers() {
    let flags = checker().check(&images()).unwrap();
    let expected = expected_flags();
    assert_eq!(flags, expected);
    assert!(flags.iter().any(|f| *f) && flags.iter().any(|f| !*f));
}

#[test]
fn embeddings_and_scores_match_diffusers_on_the_same_pixels() {
    let checker = checker();
    let embeds = checker.image_embeds(&diffusers_pixel_values()).unwrap();
    let reference = &expected_tensors()["image_embeds"];
    let diff = max_abs_diff(&embeds, reference);
    let scale = reference
        .abs()
        .unwrap()
        .max_keepdim(1)
        .unwrap()
        .max(0)
        .unwrap();
    eprintln!("image embeds: max |diff| {diff:.2e} (largest value {scale})");
    assert!(diff < 1e-4, "image embeds differ by {diff}");

    let scores = checker.scores(&embeds).unwrap();
    let expected = expected();
    let special_image = expected["special_care_image"].as_u64().unwrap() as usize;
    for (i, s) in scores.iter().enumerate() {
        for (key, ours) in [
            ("concept_scores", &s.concepts),
            ("special_scores", &s.special_care),
        ] {
            let theirs = expected[key][i].as_array().unwrap();
            assert_eq!(ours.len(), theirs.len());
            for (a, b) in ours.iter().zip(theirs) {
                let b = b.as_f64().unwrap() as f32;
                assert!((a - b).abs() < 1e-5, "image {i} {key}: {a} vs {b}");
            }
        }
        assert_eq!(s.special_care_hit, i == special_image, "image {i}");
    }
    // the special-care image is flagged only thanks to the 0.01 adjustment
    let best = scores[special_image]
        .concepts
        .iter()
        .fold(f32::MIN, |a, b| a.max(*b));
    assert!(best > 0.0 && best - 0.01 < 0.0, "best concept score {best}");
    assert!(scores[special_image].flagged);
}

#[test]
fn preprocessing_is_within_two_levels_of_transformers() {
    let checker = checker();
    let resized = expected_tensors()["resized"].clone();
    let mut worst = 0u8;
    let mut total = 0.0f64;
    let mut count = 0usize;
    for (i, image) in images().iter().enumerate() {
        let ours = checker.processor().resize_and_crop(image);
        let theirs = resized
            .get(i)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        assert_eq!(ours.as_raw().len(), theirs.len());
        let mut image_worst = 0u8;
        for (a, b) in ours.as_raw().iter().zip(&theirs) {
            let d = a.abs_diff(*b);
            image_worst = image_worst.max(d);
            total += d as f64;
        }
        count += theirs.len();
        eprintln!(
            "image {i} ({}x{}): max |diff| {image_worst} levels",
            image.width(),
            image.height()
        );
        worst = worst.max(image_worst);
    }
    let mean = total / count as f64;
    eprintln!("resize + crop vs transformers (PIL bicubic): max {worst}, mean {mean:.3} levels");
    assert!(worst <= 3 && mean < 0.02, "max {worst}, mean {mean}");

    // and the embeddings from our own pixels stay close to diffusers'
    let ours = checker
        .image_embeds(&checker.pixel_values(&images()).unwrap())
        .unwrap();
    let diff = max_abs_diff(&ours, &expected_tensors()["image_embeds"]);
    eprintln!("image embeds from our preprocessing: max |diff| {diff:.2e}");
    assert!(diff < 0.01, "{diff}");
}

/// Copies the fixture's checker folder (and the feature extractor, if asked) to a fresh directory,
/// optionally with the tensors renamed.
fn copy_checker(
    with_feature_extractor: bool,
    rename: impl Fn(&str) -> String,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let checker = dir.path().join("safety_checker");
    std::fs::create_dir_all(&checker).unwrap();
    std::fs::copy(
        fixtures().join("safety_checker/config.json"),
        checker.join("config.json"),
    )
    .unwrap();
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixtures().join("safety_checker/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .map(|(k, v)| (rename(&k), v))
    .collect();
    candle_core::safetensors::save(&tensors, checker.join("model.safetensors")).unwrap();
    if with_feature_extractor {
        std::fs::create_dir_all(dir.path().join("feature_extractor")).unwrap();
        std::fs::copy(
            fixtures().join("feature_extractor/preprocessor_config.json"),
            dir.path()
                .join("feature_extractor/preprocessor_config.json"),
        )
        .unwrap();
    }
    dir
}

#[test]
fn both_layouts_and_both_weight_namings_load() {
    let images = images();
    let expected = expected_flags();
    // the checker folder itself, its feature extractor found beside it
    let direct = SafetyChecker::load(fixtures().join("safety_checker"), &Device::Cpu).unwrap();
    assert_eq!(direct.check(&images).unwrap(), expected);

    // transformers 5's flat naming (`vision_model.embeddings…`)
    let flat = copy_checker(true, |k| {
        k.strip_prefix("vision_model.vision_model.")
            .map(|rest| format!("vision_model.{rest}"))
            .unwrap_or_else(|| k.to_string())
    });
    let checker = SafetyChecker::load(flat.path(), &Device::Cpu).unwrap();
    assert_eq!(checker.check(&images).unwrap(), expected);
    let a = checker.image_embeds(&diffusers_pixel_values()).unwrap();
    let b = direct.image_embeds(&diffusers_pixel_values()).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);

    // no feature extractor: CLIP's defaults, which the fixture's config states anyway
    let bare = copy_checker(false, |k| k.to_string());
    let checker = SafetyChecker::load(bare.path().join("safety_checker"), &Device::Cpu).unwrap();
    assert_eq!(checker.processor(), direct.processor());
    assert_eq!(checker.check(&images).unwrap(), expected);
    assert!(checker.check(&[]).unwrap().is_empty());
}

#[test]
fn bad_folders_are_refused_clearly() {
    let err = |path: &Path| {
        SafetyChecker::load(path, &Device::Cpu)
            .unwrap_err()
            .to_string()
    };

    let missing = err(&fixtures().join("does-not-exist"));
    assert!(missing.contains("no such"), "{missing}");
    let empty = tempfile::tempdir().unwrap();
    let msg = err(empty.path());
    assert!(msg.contains("not a safety checker"), "{msg}");

    // only pickled weights
    let pickled = copy_checker(true, |k| k.to_string());
    let checker_dir = pickled.path().join("safety_checker");
    std::fs::rename(
        checker_dir.join("model.safetensors"),
        checker_dir.join("pytorch_model.bin"),
    )
    .unwrap();
    let msg = err(pickled.path());
    assert!(msg.contains("pickled"), "{msg}");

    // weights that do not fit the config
    let wrong = copy_checker(true, |k| k.to_string());
    let config = wrong.path().join("safety_checker/config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"hidden_size\": 32", "\"hidden_size\": 64");
    std::fs::write(&config, text).unwrap();
    let msg = err(wrong.path());
    assert!(
        msg.contains("safety_checker") && msg.contains("shape"),
        "{msg}"
    );

    // a missing tensor
    let partial = copy_checker(true, |k| {
        k.replace("concept_embeds_weights", "something_else")
    });
    let msg = err(partial.path());
    assert!(msg.contains("concept_embeds_weights"), "{msg}");

    // a feature extractor whose crop does not fit the vision model
    let crop = copy_checker(true, |k| k.to_string());
    let pre = crop
        .path()
        .join("feature_extractor/preprocessor_config.json");
    let text = std::fs::read_to_string(&pre)
        .unwrap()
        .replace("\"height\": 224", "\"height\": 200");
    std::fs::write(&pre, text).unwrap();
    let msg = err(crop.path());
    assert!(msg.contains("224x200"), "{msg}");
}

#[test]
fn replacements_change_exactly_the_flagged_images() {
    let originals = images();
    let flags = checker().check(&originals).unwrap();
    for name in Replacement::NAMES {
        let replacement = Replacement::from_name(name).unwrap();
        let mut out = originals.clone();
        replace_flagged(&mut out, &flags, replacement);
        for (i, ((before, after), flagged)) in originals.iter().zip(&out).zip(&flags).enumerate() {
            assert_eq!(after.dimensions(), before.dimensions());
            // blurring or pixelating a flat image leaves it as it is
            let flat = before.pixels().all(|p| p == before.get_pixel(0, 0));
            if *flagged {
                if !flat
                    || matches!(
                        replacement,
                        Replacement::Black | Replacement::SensitiveContentText
                    )
                {
                    assert_ne!(after, before, "{name}: flagged image {i} unchanged");
                }
                assert_eq!(after, &replacement.apply(before));
            } else {
                assert_eq!(after, before, "{name}: unflagged image {i} changed");
            }
        }
    }
}
