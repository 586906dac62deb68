//! Turning one family's request body into the canonical [`GenerationRequest`]: field spellings, defaults, limits,
//! model choice. Every refusal names the field.

use serde::{Deserialize, Serialize};

use crate::backend::{GenerationRequest, LoraChoice, ModelInfo, PipelineKind, SafetyReplacement};
use crate::family::Family;
use crate::params::Body;
use crate::prompt_enhance;
use crate::responses::ApiError;

/// Largest width or height.
pub const MAX_SIDE: u32 = 1024;
/// Most images per request.
pub const MAX_SAMPLES: i64 = 4;
/// Most denoising steps, on every family.
pub const MAX_STEPS: i64 = 50;

/// How the results of a job are delivered.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Outputs as `.base64` text files instead of PNG.
    pub base64: bool,
    /// Outputs under `/temp/`, deleted after the temp lifetime.
    pub temp: bool,
    /// Where to POST the result.
    pub webhook: Option<String>,
    /// Echoed in the webhook payload.
    pub track_id: Option<String>,
    /// Answer `processing` at once instead of waiting.
    pub instant_response: bool,
    /// `loadbalancer: yes`: any worker may run it, even for a key bound to a worker group.
    #[serde(default)]
    pub loadbalancer: bool,
    /// The client's key for retries of this request (`Idempotency-Key` header, else `track_id`): a retry within
    /// [`crate::jobs::IDEMPOTENCY_WINDOW`] answers the first job instead of making another.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// Values the request asked for that are echoed in `meta` but do not change the generation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Echo {
    /// `init_image` as sent when it was a URL, else `"base64"` (`""` for text-to-image).
    pub init_image: String,
    /// `safety_checker_type` as sent.
    pub safety_checker_type: Option<String>,
    /// Whether `enhance_prompt` applied (as sent, else the family's default).
    #[serde(default)]
    pub enhance_prompt: bool,
    /// The `enhance_style` that applied (its canonical id).
    pub enhance_style: Option<String>,
    /// Options accepted but not applied, each with the reason (returned as `warnings`).
    pub warnings: Vec<String>,
}

/// A request body read and checked, before the init image is fetched.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    /// The family it came in through.
    pub family: Family,
    /// The pipeline its route runs.
    pub kind: PipelineKind,
    /// `model_id` as sent.
    pub model_id: Option<String>,
    /// The final prompt: as sent, then `enhance_style` and `enhance_prompt` applied.
    pub prompt: String,
    /// The final negative prompt ("" for none), likewise.
    pub negative_prompt: String,
    /// `init_image` as sent: a URL or base64 (none for text-to-image).
    pub init_image: Option<String>,
    /// Requested width, rounded down to a multiple of 8.
    pub width: Option<u32>,
    /// Requested height, rounded down to a multiple of 8.
    pub height: Option<u32>,
    /// Number of images.
    pub samples: u32,
    /// Denoising steps.
    pub steps: u32,
    /// Guidance scale.
    pub guidance_scale: f64,
    /// img2img strength.
    pub strength: f64,
    /// pix2pix image guidance.
    pub image_guidance_scale: f64,
    /// Scheduler name.
    pub scheduler: Option<String>,
    /// Karras sigmas.
    pub use_karras_sigmas: bool,
    /// DPM-Solver algorithm type.
    pub algorithm_type: Option<String>,
    /// Seed; `None` draws a random one.
    pub seed: Option<u64>,
    /// CLIP skip.
    pub clip_skip: u32,
    /// LoRAs with their strengths.
    pub loras: Vec<LoraChoice>,
    /// Replacement VAE.
    pub vae: Option<String>,
    /// Textual-inversion embeddings.
    pub embeddings: Vec<String>,
    /// Token merging.
    pub tomesd: bool,
    /// Safety check and what replaces flagged images; `None` = no check.
    pub safety_checker: Option<SafetyReplacement>,
    /// How results are delivered.
    pub delivery: Delivery,
    /// What meta echoes.
    pub echo: Echo,
}

/// The family whose shapes jobs of the other dialects (AUTOMATIC1111, OpenAI) are stored in: their answers are
/// made by their own handlers; the ModelsLab fetch routes answer for them in the v6 shape.
pub const FOREIGN_FAMILY: Family = Family::V6Images;

impl Submission {
    /// A submission of another dialect: `kind` with `prompt`, no model named, and the plain defaults (no prompt
    /// enhancement, token merging or safety check, outputs under `/temp/`, random seed, 512 × 512 for
    /// text-to-image, 30 steps, guidance 7.5, strength 0.75). The dialect fills in what its request says.
    pub fn plain(kind: PipelineKind, prompt: String) -> Submission {
        Submission {
            family: FOREIGN_FAMILY,
            kind,
            model_id: None,
            prompt,
            negative_prompt: String::new(),
            init_image: None,
            width: None,
            height: None,
            samples: 1,
            steps: 30,
            guidance_scale: 7.5,
            strength: 0.75,
            image_guidance_scale: 1.5,
            scheduler: None,
            use_karras_sigmas: false,
            algorithm_type: None,
            seed: None,
            clip_skip: 1,
            loras: Vec::new(),
            vae: None,
            embeddings: Vec::new(),
            tomesd: false,
            safety_checker: None,
            delivery: Delivery {
                temp: true,
                ..Delivery::default()
            },
            echo: Echo::default(),
        }
    }
}

/// Most LoRAs one request may merge.
pub const MAX_LORAS: usize = 5;
/// Strongest LoRA strength accepted (either sign).
pub const MAX_LORA_STRENGTH: f64 = 2.0;

/// A list field's text: a string as it is, an array's items joined with commas; `None` for other values.
fn list_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => Some(
            items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string())
                })
                .collect::<Vec<_>>()
                .join(","),
        ),
        _ => None,
    }
}

/// A comma-separated list of names (`"a, b"`), empty entries dropped.
fn name_list(body: &Body, names: &[&str]) -> Result<Vec<String>, ApiError> {
    let Some((field, value)) = body.get(names) else {
        return Ok(Vec::new());
    };
    let text = list_text(value)
        .ok_or_else(|| ApiError::field(field, "must be a comma-separated list of names"))?;
    Ok(text
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty() && *n != "null" && *n != "none")
        .map(str::to_string)
        .collect())
}

/// `lora_model` and `lora_strength`: one strength per LoRA, or one for all, or none (1 each).
fn loras(body: &Body) -> Result<Vec<LoraChoice>, ApiError> {
    let names = name_list(body, &["lora_model", "lora"])?;
    let strengths: Vec<f64> = match body.get(&["lora_strength"]) {
        None => Vec::new(),
        Some((_, serde_json::Value::Number(n))) => vec![n.as_f64().unwrap_or(f64::NAN)],
        Some((_, value)) => {
            let text = list_text(value).unwrap_or_else(|| "?".into());
            text.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| t.parse::<f64>().unwrap_or(f64::NAN))
                .collect()
        }
    };
    pair_loras(names, strengths)
}

/// Pairs LoRA names with strengths: one strength per LoRA, one for all, or none (1 each); at most
/// [`MAX_LORAS`], strengths within ±[`MAX_LORA_STRENGTH`]. Errors name `lora_model` or `lora_strength`.
pub fn pair_loras(names: Vec<String>, strengths: Vec<f64>) -> Result<Vec<LoraChoice>, ApiError> {
    if names.len() > MAX_LORAS {
        return Err(ApiError::field(
            "lora_model",
            format!("at most {MAX_LORAS} LoRAs per request, got {}", names.len()),
        ));
    }
    if let Some(bad) = strengths
        .iter()
        .find(|s| !s.is_finite() || s.abs() > MAX_LORA_STRENGTH)
    {
        return Err(ApiError::field(
            "lora_strength",
            format!(
                "each strength must be a number between -{MAX_LORA_STRENGTH} and {MAX_LORA_STRENGTH} \
                 (comma-separated, one per LoRA), got {bad}"
            ),
        ));
    }
    if strengths.len() > 1 && strengths.len() != names.len() {
        return Err(ApiError::field(
            "lora_strength",
            format!(
                "{} strengths for {} LoRAs: give one strength per LoRA in lora_model, or one for all",
                strengths.len(),
                names.len()
            ),
        ));
    }
    Ok(names
        .into_iter()
        .enumerate()
        .map(|(i, name)| LoraChoice {
            name,
            strength: match strengths.len() {
                0 => 1.0,
                1 => strengths[0],
                _ => strengths[i],
            },
        })
        .collect())
}

/// `safety_checker` (default: on where the family documents it) and `safety_checker_type`.
fn safety(family: Family, body: &Body) -> Result<Option<SafetyReplacement>, ApiError> {
    if !body
        .flag(&["safety_checker"])?
        .unwrap_or(family.options_on_by_default())
    {
        return Ok(None);
    }
    match body.string(&["safety_checker_type"])? {
        None => Ok(Some(SafetyReplacement::SensitiveContentText)),
        Some(name) => SafetyReplacement::from_name(&name)
            .map(Some)
            .ok_or_else(|| {
                let valid: Vec<&str> = SafetyReplacement::ALL.iter().map(|(n, _)| *n).collect();
                ApiError::field(
                    "safety_checker_type",
                    format!("unknown type {name:?}; use one of {}", valid.join(", ")),
                )
            }),
    }
}

/// Options that change the picture and are not built yet: refused rather than silently dropped.
const REFUSED: &[(&str, &str)] = &[
    ("ip_adapter_id", "IP-Adapter is not supported yet"),
    ("ip_adapter_image", "IP-Adapter is not supported yet"),
    (
        "controlnet_model",
        "ControlNet is not supported on img2img routes",
    ),
    ("mask_image", "inpainting is not supported"),
];

/// Yes/no options accepted and not applied (the documents' examples send them): `(field, note when "yes")`.
const IGNORED_WHEN_YES: &[(&str, &str)] = &[
    (
        "multi_lingual",
        "multi_lingual translation is not supported; the prompt was used as sent",
    ),
    (
        "upscale",
        "upscale is not supported; images are returned at the generated size",
    ),
    ("panorama", "panorama is not supported"),
    ("self_attention", "self_attention is not supported"),
    ("highres_fix", "highres_fix is not supported"),
];

fn rounded_side(body: &Body, name: &str) -> Result<Option<u32>, ApiError> {
    Ok(body
        .integer_in(&[name], 8, MAX_SIDE as i64)?
        .map(|v| (v as u32) / 8 * 8))
}

/// Reads a generation body of `family` for a route running `kind`.
pub fn parse(family: Family, kind: PipelineKind, body: &Body) -> Result<Submission, ApiError> {
    let prompt = body
        .string(&["prompt"])?
        .ok_or_else(|| ApiError::required("prompt"))?;
    let init_image = if kind.takes_image() {
        Some(
            body.string(&["init_image", "image"])?
                .ok_or_else(|| ApiError::required("init_image"))?,
        )
    } else {
        None
    };
    for (field, why) in REFUSED {
        if body.get(&[field]).is_some() {
            return Err(ApiError::field(*field, *why));
        }
    }
    let mut warnings = Vec::new();
    for (field, note) in IGNORED_WHEN_YES {
        if body.flag(&[field]).unwrap_or(None) == Some(true) {
            warnings.push(note.to_string());
        }
    }
    let enhance_prompt = body
        .flag(&["enhance_prompt"])?
        .unwrap_or(family.options_on_by_default());
    let enhance_style = body
        .string(&["enhance_style"])?
        .map(|id| {
            prompt_enhance::resolve_style(&id)
                .map_err(|e| ApiError::field(prompt_enhance::UnknownStyle::FIELD, e.to_string()))
        })
        .transpose()?;
    if let Some(id) = enhance_style.filter(|id| prompt_enhance::adds_nothing(id)) {
        warnings.push(format!(
            "enhance_style {id} adds nothing on this server; the prompt was used as sent"
        ));
    }
    let enhanced = prompt_enhance::apply(
        &prompt,
        &body.string(&["negative_prompt"])?.unwrap_or_default(),
        enhance_prompt,
        enhance_style,
    )
    .map_err(|e| ApiError::field(prompt_enhance::UnknownStyle::FIELD, e.to_string()))?;
    let pix2pix = kind == PipelineKind::Pix2Pix;
    let steps_names: &[&str] = if pix2pix {
        &["steps", "num_inference_steps"]
    } else {
        &["num_inference_steps", "steps"]
    };
    let scheduler = body.string(&["scheduler"])?;
    let algorithm_type = body
        .string(&["algorithm_type"])?
        .filter(|a| !matches!(a.as_str(), "no" | "none"));
    let steps = body
        .integer_in(steps_names, 1, MAX_STEPS)?
        .unwrap_or(if pix2pix { 20 } else { 30 }) as u32;
    let strength = body.float_in(&["strength"], 0.0, 1.0)?.unwrap_or(0.7);
    if kind == PipelineKind::Img2Img {
        check_denoising_steps(("strength", strength), (steps_names[0], steps))?;
    }
    Ok(Submission {
        family,
        kind,
        model_id: body.string(&["model_id"])?,
        prompt: enhanced.prompt,
        negative_prompt: enhanced.negative_prompt,
        echo: Echo {
            init_image: match &init_image {
                Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
                    url.clone()
                }
                Some(_) => "base64".into(),
                None => String::new(),
            },
            safety_checker_type: body.string(&["safety_checker_type"])?,
            enhance_prompt,
            enhance_style: enhance_style.map(str::to_string),
            warnings,
        },
        init_image,
        width: rounded_side(body, "width")?,
        height: rounded_side(body, "height")?,
        samples: body.integer_in(&["samples"], 1, MAX_SAMPLES)?.unwrap_or(1) as u32,
        steps,
        guidance_scale: body
            .float_in(&["guidance_scale"], 1.0, 20.0)?
            .unwrap_or(7.5),
        strength,
        image_guidance_scale: body
            .float_in(&["image_guidance_scale"], 0.0, 20.0)?
            .unwrap_or(1.5),
        scheduler,
        use_karras_sigmas: body.flag(&["use_karras_sigmas"])?.unwrap_or(true),
        algorithm_type,
        seed: body.unsigned(&["seed"])?,
        clip_skip: body
            .integer_in(&["clip_skip", "clipskip"], 1, 8)?
            .unwrap_or(1) as u32,
        loras: loras(body)?,
        vae: body
            .string(&["vae"])?
            .map(|v| v.trim().to_string())
            .filter(|v| !matches!(v.as_str(), "" | "null" | "none" | "no")),
        embeddings: name_list(body, &["embeddings_model", "embeddings"])?,
        tomesd: body
            .flag(&["tomesd"])?
            .unwrap_or(family.options_on_by_default()),
        safety_checker: safety(family, body)?,
        delivery: Delivery {
            base64: body.flag(&["base64"])?.unwrap_or(false),
            temp: body.flag(&["temp"])?.unwrap_or(false),
            webhook: body.string(&["webhook"])?,
            track_id: body.string(&["track_id"])?,
            instant_response: body.flag(&["instant_response"])?.unwrap_or(false),
            loadbalancer: body.flag(&["loadbalancer"])?.unwrap_or(false),
            // A retry (the same body, so the same track_id) is the same request; another body with the same
            // track_id is not. An Idempotency-Key header overrides.
            idempotency_key: body.string(&["track_id"])?.map(|t| {
                use sha2::{Digest, Sha256};
                let digest = Sha256::digest(serde_json::Value::Object(body.0.clone()).to_string());
                let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                format!("track_id:{t}:{hex}")
            }),
        },
    })
}

/// img2img denoises `floor(steps × strength)` steps (diffusers' rule): refuses fewer than one, naming the dialect's
/// strength field and steps field.
pub fn check_denoising_steps(
    (strength_field, strength): (&str, f64),
    (steps_field, steps): (&str, u32),
) -> Result<(), ApiError> {
    if (steps as f64 * strength).floor() < 1.0 {
        return Err(ApiError::field(
            strength_field,
            format!(
                "{strength} × {steps} steps leaves no denoising step: raise {strength_field} or {steps_field} \
                 so that their product is at least 1"
            ),
        ));
    }
    Ok(())
}

/// Server settings that resolve what a request leaves open.
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    /// `--default-model`.
    pub default_model: Option<String>,
    /// `--pix2pix-model`.
    pub pix2pix_model: Option<String>,
}

/// Picks the model a submission runs on, from the models the backend has.
pub fn choose_model(
    submission: &Submission,
    models: &[ModelInfo],
    defaults: &Defaults,
) -> Result<String, ApiError> {
    let kind = submission.kind.model_kind();
    let wanted = submission.model_id.clone().or_else(|| match kind {
        PipelineKind::Pix2Pix => defaults.pix2pix_model.clone(),
        _ => defaults.default_model.clone(),
    });
    let candidates: Vec<&ModelInfo> = models.iter().filter(|m| m.kind == kind).collect();
    let id = match wanted {
        Some(id) => id,
        None if candidates.len() == 1 => candidates[0].id.clone(),
        None => {
            let what = match kind {
                PipelineKind::Pix2Pix => "InstructPix2Pix (8-channel) models",
                _ => "Stable Diffusion (4-channel) models",
            };
            return Err(ApiError::field(
                "model_id",
                format!(
                    "The model id field is required: the server has {} {what} and no default model is set",
                    candidates.len()
                ),
            ));
        }
    };
    let Some(model) = models.iter().find(|m| m.id == id) else {
        return Err(ApiError::message(format!("Model id not found: {id}")));
    };
    if model.kind != kind {
        let needs = match kind {
            PipelineKind::Pix2Pix => "an InstructPix2Pix model (8 input channels)",
            _ => "a Stable Diffusion model (4 input channels); use /api/v5/pix2pix for it",
        };
        return Err(ApiError::field(
            "model_id",
            format!("{id} cannot run here: this route needs {needs}"),
        ));
    }
    Ok(id)
}

/// The output size when the request gives none: the init image's own size, scaled down to fit 1024 and rounded
/// down to multiples of 8.
pub fn size_from_image(width: u32, height: u32) -> (u32, u32) {
    let longest = width.max(height).max(1) as f64;
    let scale = (MAX_SIDE as f64 / longest).min(1.0);
    let fit = |v: u32| (((v as f64 * scale).floor() as u32) / 8 * 8).max(8);
    (fit(width), fit(height))
}

/// The output size of text-to-image when the request gives none (the API's documented default).
pub const DEFAULT_TEXT2IMG_SIDE: u32 = 512;

/// The canonical request, once the model, the init image's size (none for text-to-image) and the seed are
/// known.
pub fn finish(
    s: &Submission,
    model_id: String,
    image_size: Option<(u32, u32)>,
    seed: u64,
) -> GenerationRequest {
    let (iw, ih) = match image_size {
        Some((w, h)) => size_from_image(w, h),
        None => (DEFAULT_TEXT2IMG_SIDE, DEFAULT_TEXT2IMG_SIDE),
    };
    GenerationRequest {
        kind: s.kind,
        model_id,
        prompt: s.prompt.clone(),
        negative_prompt: s.negative_prompt.clone(),
        width: s.width.unwrap_or(iw),
        height: s.height.unwrap_or(ih),
        samples: s.samples,
        steps: s.steps,
        guidance_scale: s.guidance_scale,
        strength: s.strength,
        image_guidance_scale: s.image_guidance_scale,
        scheduler: s.scheduler.clone(),
        use_karras_sigmas: s.use_karras_sigmas,
        algorithm_type: s.algorithm_type.clone(),
        seed,
        clip_skip: s.clip_skip,
        loras: s.loras.clone(),
        vae: s.vae.clone(),
        embeddings: s.embeddings.clone(),
        tomesd: s.tomesd,
        safety_checker: s.safety_checker,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: serde_json::Value) -> Body {
        Body::parse(v.to_string().as_bytes()).unwrap()
    }

    fn model(id: &str, kind: PipelineKind) -> ModelInfo {
        ModelInfo {
            id: id.into(),
            kind,
            format: "diffusers".into(),
            loaded: false,
            added_at: None,
        }
    }

    #[test]
    fn documented_example_parses() {
        let s = parse(
            Family::V3,
            Family::V3.image_pipeline(),
            &body(json!({
                "key": "", "prompt": "a cat sitting on a bench", "negative_prompt": null,
                "init_image": "https://example.com/a.png", "width": "512", "height": "512",
                "samples": "1", "num_inference_steps": "30", "safety_checker": "no",
                "enhance_prompt": "yes", "guidance_scale": 7.5, "strength": 0.7, "seed": null,
                "base64": "no", "webhook": null, "track_id": null
            })),
        )
        .unwrap();
        assert_eq!(
            (s.width, s.height, s.samples, s.steps),
            (Some(512), Some(512), 1, 30)
        );
        assert_eq!(s.seed, None);
        assert_eq!(
            s.prompt,
            format!(
                "a cat sitting on a bench, {}",
                prompt_enhance::QUALITY_SUFFIX
            )
        );
        assert_eq!(s.negative_prompt, prompt_enhance::DEFAULT_NEGATIVE);
        assert!(s.echo.enhance_prompt);
        assert!(s.echo.warnings.is_empty(), "{:?}", s.echo.warnings);
        assert!(!s.delivery.base64);
    }

    #[test]
    fn enhance_prompt_defaults_per_family() {
        let plain = json!({"prompt": "a cat", "negative_prompt": "blurry", "init_image": "x"});
        let suffixed = format!("a cat, {}", prompt_enhance::QUALITY_SUFFIX);
        let negative = format!("blurry, {}", prompt_enhance::DEFAULT_NEGATIVE);
        for family in Family::ALL {
            let s = parse(family, family.image_pipeline(), &body(plain.clone())).unwrap();
            let on = matches!(
                family,
                Family::V3 | Family::V4Dreambooth | Family::V6Images | Family::Enterprise
            );
            assert_eq!(s.echo.enhance_prompt, on, "{family:?}");
            if on {
                assert_eq!(
                    (&s.prompt, &s.negative_prompt),
                    (&suffixed, &negative),
                    "{family:?}"
                );
            } else {
                assert_eq!(
                    (s.prompt.as_str(), s.negative_prompt.as_str()),
                    ("a cat", "blurry")
                );
            }
        }
        // Sent values win: "no" on v3, JSON true on realtime.
        let mut off = plain.clone();
        off["enhance_prompt"] = json!("no");
        let s = parse(Family::V3, Family::V3.image_pipeline(), &body(off)).unwrap();
        assert_eq!((s.prompt.as_str(), s.echo.enhance_prompt), ("a cat", false));
        let mut on = plain.clone();
        on["enhance_prompt"] = json!(true);
        let s = parse(
            Family::V6Realtime,
            Family::V6Realtime.image_pipeline(),
            &body(on),
        )
        .unwrap();
        assert_eq!(s.prompt, suffixed);
    }

    #[test]
    fn enhance_style_wraps_the_prompt_and_is_echoed() {
        let b = body(json!({"prompt": "a cat", "init_image": "x", "enhance_style": "Pixel-Art"}));
        let s = parse(Family::V6Realtime, Family::V6Realtime.image_pipeline(), &b).unwrap();
        let (_, style_negative) = prompt_enhance::describe("pixel-art").unwrap();
        assert!(s.prompt.starts_with("pixel art, a cat, "), "{}", s.prompt);
        assert!(!s.prompt.contains(prompt_enhance::QUALITY_SUFFIX));
        assert_eq!(s.negative_prompt, style_negative);
        assert_eq!(s.echo.enhance_style.as_deref(), Some("pixel-art"));

        // Style first, then the suffix (v6 images enhances by default).
        let s = parse(Family::V6Images, Family::V6Images.image_pipeline(), &b).unwrap();
        assert!(s.prompt.starts_with("pixel art, a cat, "));
        assert!(s.prompt.ends_with(prompt_enhance::QUALITY_SUFFIX));
        assert_eq!(
            s.negative_prompt,
            format!("{style_negative}, {}", prompt_enhance::DEFAULT_NEGATIVE)
        );

        // pix2pix: the instruction is wrapped only when asked.
        let s = parse(
            Family::V5Pix2Pix,
            Family::V5Pix2Pix.image_pipeline(),
            &body(json!({"prompt": "make it snow", "init_image": "x", "enhance_style": "anime"})),
        )
        .unwrap();
        assert!(s.prompt.starts_with("anime artwork, make it snow, "));

        // No-op ids are accepted and said to do nothing.
        let s = parse(
            Family::V5Pix2Pix,
            Family::V5Pix2Pix.image_pipeline(),
            &body(json!({"prompt": "a cat", "init_image": "x", "enhance_style": "nsfw"})),
        )
        .unwrap();
        assert_eq!(s.prompt, "a cat");
        assert!(s.echo.warnings[0].contains("nsfw"), "{:?}", s.echo.warnings);

        let err = parse(
            Family::V3,
            Family::V3.image_pipeline(),
            &body(json!({"prompt": "a cat", "init_image": "x", "enhance_style": "animee"})),
        )
        .unwrap_err();
        assert_eq!(err.field_name(), Some("enhance_style"));
        assert!(err.to_string().contains("anime"), "{err}");
        let err = parse(
            Family::V3,
            Family::V3.image_pipeline(),
            &body(json!({"prompt": "a cat", "init_image": "x", "enhance_prompt": "maybe"})),
        )
        .unwrap_err();
        assert_eq!(err.field_name(), Some("enhance_prompt"));
    }

    #[test]
    fn limits_name_their_field() {
        let base = json!({"prompt": "p", "init_image": "https://e.com/a.png"});
        let cases = [
            ("width", json!(5000)),
            ("height", json!("0")),
            ("samples", json!(9)),
            ("num_inference_steps", json!(51)),
            ("guidance_scale", json!(25)),
            ("strength", json!(1.5)),
            ("clip_skip", json!(9)),
            ("lora_strength", json!("0.5,0.7,1")),
            ("lora_strength", json!("strong")),
            ("lora_model", json!("a,b,c,d,e,f")),
            ("safety_checker_type", json!("sepia")),
        ];
        for (field, value) in cases {
            let mut b = base.clone();
            b[field] = value;
            let err = parse(
                Family::V6Images,
                Family::V6Images.image_pipeline(),
                &body(b),
            )
            .unwrap_err();
            assert_eq!(err.field_name(), Some(field), "{err}");
        }
        let err = parse(
            Family::V6Images,
            Family::V6Images.image_pipeline(),
            &body(json!({"prompt": "p"})),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "The init image field is required.");
    }

    #[test]
    fn loras_strengths_and_feature_defaults() {
        let parsed = |v: serde_json::Value| {
            let mut b = json!({"prompt": "p", "init_image": "x"});
            for (k, x) in v.as_object().unwrap() {
                b[k] = x.clone();
            }
            parse(
                Family::V6Images,
                Family::V6Images.image_pipeline(),
                &body(b),
            )
            .unwrap()
        };
        let pairs = |s: &Submission| -> Vec<(String, f64)> {
            s.loras
                .iter()
                .map(|l| (l.name.clone(), l.strength))
                .collect()
        };
        let s = parsed(json!({"lora_model": "a, b", "lora_strength": "0.6,1"}));
        assert_eq!(pairs(&s), vec![("a".into(), 0.6), ("b".into(), 1.0)]);
        let s = parsed(json!({"lora_model": "a,b", "lora_strength": 0.5}));
        assert_eq!(pairs(&s), vec![("a".into(), 0.5), ("b".into(), 0.5)]);
        let s = parsed(json!({"lora_model": "a", "lora_strength": null}));
        assert_eq!(pairs(&s), vec![("a".into(), 1.0)]);
        assert!(parsed(json!({"lora_model": null})).loras.is_empty());
        let s = parsed(json!({"vae": "anime", "embeddings_model": "x,y"}));
        assert_eq!(s.vae.as_deref(), Some("anime"));
        assert_eq!(s.embeddings, vec!["x", "y"]);
        // Defaults: ToMe and the safety checker on for the image families, off for realtime and pix2pix.
        assert!(s.tomesd);
        assert_eq!(
            s.safety_checker,
            Some(SafetyReplacement::SensitiveContentText)
        );
        let s = parsed(
            json!({"tomesd": "no", "safety_checker": "yes", "safety_checker_type": "pixelate"}),
        );
        assert!(!s.tomesd);
        assert_eq!(s.safety_checker, Some(SafetyReplacement::Pixelate));
        let s = parsed(json!({"safety_checker": false, "safety_checker_type": "whatever"}));
        assert_eq!(
            s.safety_checker, None,
            "the type is not checked when the checker is off"
        );
        let rt = parse(
            Family::V6Realtime,
            Family::V6Realtime.image_pipeline(),
            &body(json!({"prompt": "p", "init_image": "x"})),
        )
        .unwrap();
        assert!(!rt.tomesd);
        assert_eq!(rt.safety_checker, None);
        let err = parse(
            Family::V6Images,
            Family::V6Images.image_pipeline(),
            &body(json!({"prompt": "p", "init_image": "x", "lora_model": "a,b,c", "lora_strength": "1,1"})),
        )
        .unwrap_err();
        assert!(err.to_string().contains("2 strengths for 3 LoRAs"), "{err}");
    }

    #[test]
    fn sizes_round_down_and_default_to_the_image() {
        let s = parse(
            Family::V6Images,
            Family::V6Images.image_pipeline(),
            &body(json!({"prompt": "p", "init_image": "x", "width": 515, "height": "767"})),
        )
        .unwrap();
        assert_eq!((s.width, s.height), (Some(512), Some(760)));
        assert_eq!(size_from_image(736, 736), (736, 736));
        assert_eq!(size_from_image(2048, 1000), (1024, 496));
        assert_eq!(size_from_image(3, 3), (8, 8));
    }

    #[test]
    fn model_choice() {
        let models = [
            model("a", PipelineKind::Img2Img),
            model("p", PipelineKind::Pix2Pix),
        ];
        let d = Defaults::default();
        let s = parse(
            Family::V3,
            Family::V3.image_pipeline(),
            &body(json!({"prompt": "p", "init_image": "x"})),
        )
        .unwrap();
        assert_eq!(choose_model(&s, &models, &d).unwrap(), "a");
        let s = parse(
            Family::V5Pix2Pix,
            Family::V5Pix2Pix.image_pipeline(),
            &body(json!({"prompt": "p", "init_image": "x"})),
        )
        .unwrap();
        assert_eq!(choose_model(&s, &models, &d).unwrap(), "p");
        let s = parse(
            Family::V6Images,
            Family::V6Images.image_pipeline(),
            &body(json!({"prompt": "p", "init_image": "x", "model_id": "nope"})),
        )
        .unwrap();
        assert!(choose_model(&s, &models, &d)
            .unwrap_err()
            .to_string()
            .contains("not found"));
        let s = parse(
            Family::V6Images,
            Family::V6Images.image_pipeline(),
            &body(json!({"prompt": "p", "init_image": "x", "model_id": "p"})),
        )
        .unwrap();
        assert_eq!(
            choose_model(&s, &models, &d).unwrap_err().field_name(),
            Some("model_id")
        );
    }
}
