//! The request body readers of every dialect: `params::Body::parse` (the JSON object every route reads), then
//! ModelsLab `request::parse` (every family and pipeline; then `request::choose_model` and `request::finish`,
//! as a submitted job goes on), AUTOMATIC1111 `a1111::parse` (txt2img / img2img; then `a1111::info`) and OpenAI
//! `openai::parse` (generations / edits), and `infotext::format` of the finished request.
//!
//! Input: the first byte picks the dialect, family and pipeline, and whether the rest is the body as sent (raw
//! bytes) or structured: a JSON object whose fields are drawn from the names the dialects read (and a few
//! others), with strings, numbers, booleans, null, arrays and objects as values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pictor_fuzz::Unstructured;
use pictor_server::backend::{ModelInfo, PipelineKind};
use pictor_server::family::Family;
use pictor_server::params::Body;
use pictor_server::request::{self, Defaults, Submission};
use pictor_server::{a1111, infotext, openai};
use serde_json::{Map, Number, Value};

/// Every field name the dialects read (and some they do not).
const FIELDS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "model_id",
    "model",
    "init_image",
    "init_images",
    "image",
    "width",
    "height",
    "samples",
    "num_inference_steps",
    "steps",
    "guidance_scale",
    "strength",
    "image_guidance_scale",
    "scheduler",
    "use_karras_sigmas",
    "algorithm_type",
    "seed",
    "clip_skip",
    "clipskip",
    "lora_model",
    "lora",
    "lora_strength",
    "vae",
    "embeddings",
    "embeddings_model",
    "tomesd",
    "safety_checker",
    "safety_checker_type",
    "webhook",
    "track_id",
    "instant_response",
    "base64",
    "temp",
    "enhance_prompt",
    "enhance_style",
    "multi_lingual",
    "upscale",
    "panorama",
    "self_attention",
    "highres_fix",
    "ip_adapter_id",
    "ip_adapter_image",
    "controlnet_model",
    "mask_image",
    "mask",
    "key",
    "cfg_scale",
    "denoising_strength",
    "image_cfg_scale",
    "sampler_name",
    "sampler_index",
    "batch_size",
    "n_iter",
    "send_images",
    "override_settings",
    "sd_model_checkpoint",
    "sd_vae",
    "CLIP_stop_at_last_layers",
    "enable_hr",
    "restore_faces",
    "tiling",
    "subseed_strength",
    "script_name",
    "alwayson_scripts",
    "styles",
    "n",
    "size",
    "response_format",
    "output_format",
    "background",
    "stream",
    "quality",
    "user",
    "loadbalancer",
    "eta",
    "other",
];

/// Strings the readers give meaning to.
const WORDS: &[&str] = &[
    "yes",
    "no",
    "true",
    "false",
    "null",
    "none",
    "",
    " ",
    "1",
    "0",
    "-1",
    "8",
    "512",
    "1024",
    "1025",
    "7.5",
    "0.75",
    "1e400",
    "NaN",
    "inf",
    "-0",
    "18446744073709551616",
    "512x512",
    "1024x1024",
    "auto",
    "url",
    "b64_json",
    "png",
    "jpeg",
    "transparent",
    "DDIMScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "Euler a",
    "DPM++ 2M Karras",
    "DPM++ SDE",
    "Karras",
    "Automatic",
    "sd1-tiny",
    "sd1-tiny.safetensors [abc123]",
    "dall-e-3",
    "gpt-image-1",
    "a, b",
    "x,y,z",
    "<lora:a:0.5> cat",
    "<lora::1>",
    "<lora:a:x>",
    "(cat:1.2) [dog] BREAK",
    "data:image/png;base64,iVBORw0KGGo=",
    "http://127.0.0.1/x.png",
    "https://example.com/hook",
    "sensitive_content_text",
    "blur",
    "black",
];

fn value(u: &mut Unstructured, depth: u32) -> Value {
    match u.int_in_range(0..=9u8).unwrap_or(0) {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary().unwrap_or(false)),
        2 => Value::from(u.arbitrary::<i64>().unwrap_or(0)),
        3 => Value::from(u.int_in_range(-2..=1100i64).unwrap_or(0)),
        4 => Number::from_f64(u.arbitrary::<f64>().unwrap_or(0.0))
            .map(Value::Number)
            .unwrap_or(Value::Null),
        5 => Value::from(u.arbitrary::<u64>().unwrap_or(0)),
        6 if depth < 3 => {
            let n = u.int_in_range(0..=3u8).unwrap_or(0);
            Value::Array((0..n).map(|_| value(u, depth + 1)).collect())
        }
        7 if depth < 3 => object(u, depth + 1),
        8 => Value::String(u.arbitrary::<String>().unwrap_or_default()),
        _ => Value::String(u.choose(WORDS).map(|w| w.to_string()).unwrap_or_default()),
    }
}

fn object(u: &mut Unstructured, depth: u32) -> Value {
    let mut map = Map::new();
    let n = u.int_in_range(0..=12u8).unwrap_or(0);
    for _ in 0..n {
        let key = if u.ratio(9, 10).unwrap_or(true) {
            u.choose(FIELDS).map(|f| f.to_string()).unwrap_or_default()
        } else {
            u.arbitrary::<String>().unwrap_or_default()
        };
        let v = value(u, depth);
        map.insert(key, v);
    }
    Value::Object(map)
}

fn models() -> Vec<ModelInfo> {
    let model = |id: &str, kind| ModelInfo {
        id: id.into(),
        kind,
        format: "diffusers".into(),
        loaded: false,
        added_at: None,
    };
    vec![
        model("sd1-tiny", PipelineKind::Img2Img),
        model("pix2pix-tiny", PipelineKind::Pix2Pix),
    ]
}

/// What every dialect promises about a submission it accepted.
fn check(s: &Submission) {
    for side in [s.width, s.height].into_iter().flatten() {
        assert!(
            side >= 8 && side % 8 == 0 && side <= request::MAX_SIDE,
            "side {side}"
        );
    }
    assert!(
        s.samples >= 1 && s.samples as i64 <= request::MAX_SAMPLES,
        "samples {}",
        s.samples
    );
    assert!(
        s.steps >= 1 && s.steps as i64 <= request::MAX_STEPS,
        "steps {}",
        s.steps
    );
    assert!(s.loras.len() <= request::MAX_LORAS);
    for lora in &s.loras {
        assert!(lora.strength.is_finite() && lora.strength.abs() <= request::MAX_LORA_STRENGTH);
    }
    let defaults = Defaults {
        default_model: Some("sd1-tiny".into()),
        pix2pix_model: None,
    };
    let model =
        request::choose_model(s, &models(), &defaults).unwrap_or_else(|_| "sd1-tiny".into());
    let finished = request::finish(s, model, s.init_image.as_ref().map(|_| (640, 480)), 42);
    let _ = infotext::parse(&infotext::format(&finished, "EulerDiscreteScheduler"));
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if rest.len() > pictor_fuzz::MAX_BODY_BYTES {
        return;
    }
    let structured;
    let bytes = if selector & 1 == 1 {
        let mut u = Unstructured::new(rest);
        structured = serde_json::to_vec(&object(&mut u, 0)).unwrap();
        &structured[..]
    } else {
        rest
    };
    let Ok(body) = Body::parse(bytes) else { return };
    let kinds = [
        PipelineKind::Text2Img,
        PipelineKind::Img2Img,
        PipelineKind::Pix2Pix,
    ];
    let kind = kinds[(selector >> 1) as usize % 3];
    match (selector >> 3) % 3 {
        0 => {
            let family = Family::ALL[(selector >> 5) as usize % Family::ALL.len()];
            if let Ok(s) = request::parse(family, kind, &body) {
                assert_eq!(s.family, family);
                check(&s);
            }
        }
        1 => {
            let kind = if kind == PipelineKind::Pix2Pix {
                PipelineKind::Img2Img
            } else {
                kind
            };
            if let Ok(r) = a1111::parse(kind, &body, Some("sd1-tiny")) {
                assert!(!r.submissions.is_empty());
                r.submissions.iter().for_each(check);
                let seeds: Vec<u64> = r.submissions.iter().filter_map(|s| s.seed).collect();
                let _ = a1111::info(&r, "sd1-tiny", &seeds, &[]);
            }
        }
        _ => {
            let image = (kind != PipelineKind::Text2Img).then(|| "iVBORw0KGgo=".to_string());
            if let Ok(r) = openai::parse(kind, &body, image) {
                check(&r.submission);
            }
        }
    }
});
