//! The AUTOMATIC1111 web UI API dialect (`/sdapi/v1/...`): its txt2img / img2img bodies translated into the
//! canonical [`Submission`] (one per image, as A1111 gives each image of a batch its own seed), its answers
//! (`images`, `parameters`, `info` as a JSON string, the "infotext") and its error shapes (FastAPI's).

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use crate::backend::{LoraChoice, PipelineKind};
use crate::params::Body;
use crate::request::{
    check_denoising_steps, pair_loras, Echo, Submission, MAX_SAMPLES, MAX_SIDE, MAX_STEPS,
};
use crate::responses::ApiError;
use crate::samplers::{self, SchedulerChoice};

/// An error in A1111's shapes: FastAPI's `{"detail": …}` (422 with a list for bad fields) or A1111's own
/// exception body (`{"error", "detail", "body", "errors"}`) for failures.
#[derive(Debug)]
pub struct A1111Error(pub ApiError);

impl From<ApiError> for A1111Error {
    fn from(e: ApiError) -> Self {
        A1111Error(e)
    }
}

impl IntoResponse for A1111Error {
    fn into_response(self) -> Response {
        let text = self.0.to_string();
        let (status, body) = match &self.0 {
            ApiError::Field { field, .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"detail": [{"loc": ["body", field], "msg": text, "type": "value_error"}]}),
            ),
            ApiError::Message(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"detail": [{"loc": ["body"], "msg": text, "type": "value_error"}]}),
            ),
            ApiError::InvalidKey => {
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Basic")],
                    Json(json!({"detail": "Incorrect username or password"})),
                )
                    .into_response()
            }
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, json!({"detail": text})),
            ApiError::QueueFull { .. } => (StatusCode::TOO_MANY_REQUESTS, json!({"detail": text})),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, json!({"detail": text})),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "RuntimeError", "detail": "", "body": "", "errors": text}),
            ),
        };
        (status, Json(body)).into_response()
    }
}

/// What an A1111 generation body asks for, read and checked.
#[derive(Debug, Clone)]
pub struct A1111Request {
    /// One submission per image (`batch_size × n_iter`), image i with seed + i.
    pub submissions: Vec<Submission>,
    /// The sampler as A1111 names it (for the infotext).
    pub sampler_name: String,
    /// The schedule type label (for the infotext).
    pub schedule: &'static str,
    /// `batch_size` as sent.
    pub batch_size: u32,
    /// Whether the answer carries the images (`send_images`).
    pub send_images: bool,
    /// The body as sent, returned as `parameters`.
    pub parameters: Value,
}

/// Fields that change the picture in ways Pictor cannot do yet: refused when they ask for something.
fn refuse_unsupported(body: &Body) -> Result<(), ApiError> {
    for (field, what) in [
        ("enable_hr", "hires fix"),
        ("restore_faces", "face restoration"),
        ("tiling", "tiling"),
    ] {
        if body.flag(&[field])?.unwrap_or(false) {
            return Err(ApiError::field(
                field,
                format!("{what} is not supported by this server"),
            ));
        }
    }
    for field in ["mask", "mask_image"] {
        if body.get(&[field]).is_some() {
            return Err(ApiError::field(field, "inpainting is not supported yet"));
        }
    }
    if body.float(&["subseed_strength"])?.unwrap_or(0.0) != 0.0 {
        return Err(ApiError::field(
            "subseed_strength",
            "variation seeds are not supported; send 0",
        ));
    }
    if let Some(name) = body.string(&["script_name"])? {
        return Err(ApiError::field(
            "script_name",
            format!("scripts are not supported (got {name:?})"),
        ));
    }
    if let Some((_, Value::Object(scripts))) = body.get(&["alwayson_scripts"]) {
        if let Some(name) = scripts.keys().next() {
            return Err(ApiError::field(
                "alwayson_scripts",
                format!("extensions are not supported (got {name:?})"),
            ));
        }
    }
    if let Some((_, Value::Array(styles))) = body.get(&["styles"]) {
        if !styles.is_empty() {
            return Err(ApiError::field(
                "styles",
                "saved prompt styles are not supported",
            ));
        }
    }
    Ok(())
}

/// A1111's `<lora:name:weight>` tags taken out of `prompt`: the prompt without them and the LoRAs.
pub fn take_lora_tags(prompt: &str) -> Result<(String, Vec<LoraChoice>), ApiError> {
    let mut rest = String::with_capacity(prompt.len());
    let mut names = Vec::new();
    let mut strengths = Vec::new();
    let mut text = prompt;
    while let Some(start) = text.find("<lora:") {
        let Some(len) = text[start..].find('>') else {
            break;
        };
        rest.push_str(&text[..start]);
        let tag = &text[start + "<lora:".len()..start + len];
        let mut parts = tag.split(':');
        let name = parts.next().unwrap_or("").trim();
        if name.is_empty() {
            return Err(ApiError::field("prompt", "a <lora:…> tag names no LoRA"));
        }
        let weight = match parts.next() {
            None => 1.0,
            Some(w) => w.trim().parse::<f64>().map_err(|_| {
                ApiError::field(
                    "prompt",
                    format!("<lora:{tag}>: the weight {w:?} is not a number"),
                )
            })?,
        };
        names.push(name.to_string());
        strengths.push(weight);
        text = &text[start + len + 1..];
    }
    rest.push_str(text);
    let loras = pair_loras(names, strengths)
        .map_err(|e| ApiError::field("prompt", format!("<lora:…> tags: {e}")))?;
    Ok((rest.trim().to_string(), loras))
}

/// A size field: A1111's default 512, rounded down to a multiple of 8.
fn side(body: &Body, name: &str) -> Result<u32, ApiError> {
    Ok(body
        .integer_in(&[name], 8, MAX_SIDE as i64)?
        .map(|v| v as u32 / 8 * 8)
        .unwrap_or(512))
}

/// Reads a `/sdapi/v1/txt2img` (`kind` Text2Img) or `/img2img` body. `current_model` is the caller's model
/// from `/sdapi/v1/options`, used unless `override_settings.sd_model_checkpoint` names another.
pub fn parse(
    kind: PipelineKind,
    body: &Body,
    current_model: Option<&str>,
) -> Result<A1111Request, ApiError> {
    refuse_unsupported(body)?;
    let (prompt, loras) = take_lora_tags(&body.string(&["prompt"])?.unwrap_or_default())?;
    let (negative_prompt, negative_loras) =
        take_lora_tags(&body.string(&["negative_prompt"])?.unwrap_or_default())?;
    if !negative_loras.is_empty() {
        return Err(ApiError::field(
            "negative_prompt",
            "<lora:…> tags belong in the prompt",
        ));
    }
    let init_image = match kind {
        PipelineKind::Text2Img => None,
        _ => match body.get(&["init_images"]) {
            Some((_, Value::Array(images))) if images.len() == 1 => Some(
                images[0]
                    .as_str()
                    .ok_or_else(|| ApiError::field("init_images", "must be base64 strings"))?
                    .to_string(),
            ),
            Some((_, Value::Array(images))) if images.len() > 1 => {
                return Err(ApiError::field(
                    "init_images",
                    "one init image per request is supported",
                ))
            }
            _ => return Err(ApiError::required("init_images")),
        },
    };
    let overrides = match body.get(&["override_settings"]) {
        None => Body::default(),
        Some((_, Value::Object(map))) => Body(map.clone()),
        Some((field, _)) => return Err(ApiError::field(field, "must be an object")),
    };
    let model_id = overrides
        .string(&["sd_model_checkpoint"])?
        .map(|title| model_id_of_title(&title))
        .or_else(|| current_model.map(str::to_string));
    let clip_skip = overrides
        .integer_in(&["CLIP_stop_at_last_layers"], 1, 12)
        .map_err(|e| ApiError::field("override_settings", e.to_string()))?
        .unwrap_or(1) as u32;
    let vae = overrides
        .string(&["sd_vae"])?
        .filter(|v| !matches!(v.as_str(), "Automatic" | "None" | "automatic" | "none"))
        .map(|v| v.trim_end_matches(".safetensors").to_string());

    let sampler_name = body
        .string(&["sampler_name", "sampler_index"])?
        .unwrap_or_else(|| "Euler".into());
    let schedule = body.string(&["scheduler"])?;
    let SchedulerChoice {
        scheduler,
        use_karras_sigmas,
        algorithm_type,
    } = samplers::from_a1111(&sampler_name, schedule.as_deref())
        .map_err(|e| ApiError::field("sampler_name", e))?;

    let batch_size = body
        .integer_in(&["batch_size"], 1, MAX_SAMPLES)?
        .unwrap_or(1) as u32;
    let n_iter = body.integer_in(&["n_iter"], 1, MAX_SAMPLES)?.unwrap_or(1) as u32;
    if (batch_size * n_iter) as i64 > MAX_SAMPLES {
        return Err(ApiError::field(
            "batch_size",
            format!("batch_size × n_iter is at most {MAX_SAMPLES} images per request"),
        ));
    }
    let steps = body.integer_in(&["steps"], 1, MAX_STEPS)?.unwrap_or(20) as u32;
    let strength = match kind {
        PipelineKind::Img2Img => body
            .float_in(&["denoising_strength"], 0.0, 1.0)?
            .unwrap_or(0.75),
        _ => 0.0,
    };
    if kind == PipelineKind::Img2Img {
        check_denoising_steps(("denoising_strength", strength), ("steps", steps))?;
    }
    let seed = match body.integer(&["seed"])? {
        None | Some(-1) => rand::random::<u32>() as u64,
        Some(s) if s >= 0 => s as u64,
        Some(s) => {
            return Err(ApiError::field(
                "seed",
                format!("must be -1 (random) or a non-negative number, got {s}"),
            ))
        }
    };
    let base = Submission {
        model_id,
        negative_prompt,
        init_image: init_image.clone(),
        width: Some(side(body, "width")?),
        height: Some(side(body, "height")?),
        steps,
        guidance_scale: body.float_in(&["cfg_scale"], 1.0, 30.0)?.unwrap_or(7.0),
        strength,
        image_guidance_scale: body
            .float_in(&["image_cfg_scale"], 0.0, 20.0)?
            .unwrap_or(1.5),
        scheduler: Some(scheduler.to_string()),
        use_karras_sigmas,
        algorithm_type: algorithm_type.map(str::to_string),
        seed: Some(seed),
        clip_skip,
        loras,
        vae,
        echo: Echo {
            init_image: if init_image.is_some() {
                "base64".into()
            } else {
                String::new()
            },
            ..Echo::default()
        },
        ..Submission::plain(kind, prompt)
    };
    let submissions = (0..batch_size * n_iter)
        .map(|i| Submission {
            seed: Some(seed + i as u64),
            ..base.clone()
        })
        .collect();
    let mut parameters = body.0.clone();
    // Images are not echoed (A1111 returns them as sent; they are large and the client has them).
    parameters.insert("init_images".into(), Value::Null);
    parameters.insert("seed".into(), json!(seed));
    parameters.insert("sampler_name".into(), json!(sampler_name));
    Ok(A1111Request {
        submissions,
        sampler_name,
        schedule: if use_karras_sigmas {
            "Karras"
        } else {
            "Uniform"
        },
        batch_size,
        send_images: body.flag(&["send_images"])?.unwrap_or(true),
        parameters: Value::Object(parameters),
    })
}

/// The model id an A1111 checkpoint title names: `"name.safetensors [hash]"`, `"name.ckpt"` or `"name"`.
pub fn model_id_of_title(title: &str) -> String {
    let title = title.trim();
    let title = match title.rfind(" [") {
        Some(i) if title.ends_with(']') => &title[..i],
        _ => title,
    };
    title
        .trim_end_matches(".safetensors")
        .trim_end_matches(".ckpt")
        .to_string()
}

/// The `info` JSON (as A1111 builds it) for a finished request: `seeds` are the images' seeds in order.
pub fn info(req: &A1111Request, model_id: &str, seeds: &[u64], infotexts: &[String]) -> Value {
    let first = &req.submissions[0];
    let mut info = Map::new();
    let mut put = |k: &str, v: Value| {
        info.insert(k.into(), v);
    };
    put("prompt", json!(first.prompt));
    put("all_prompts", json!(vec![&first.prompt; seeds.len()]));
    put("negative_prompt", json!(first.negative_prompt));
    put(
        "all_negative_prompts",
        json!(vec![&first.negative_prompt; seeds.len()]),
    );
    put("seed", json!(seeds.first().copied().unwrap_or_default()));
    put("all_seeds", json!(seeds));
    put("subseed", json!(-1));
    put("all_subseeds", json!(vec![-1; seeds.len()]));
    put("subseed_strength", json!(0));
    put("width", json!(first.width));
    put("height", json!(first.height));
    put("sampler_name", json!(req.sampler_name));
    put("cfg_scale", json!(first.guidance_scale));
    put("steps", json!(first.steps));
    put("batch_size", json!(req.batch_size));
    put("restore_faces", json!(false));
    put("sd_model_name", json!(model_id));
    put("sd_model_hash", Value::Null);
    put("sd_vae_name", json!(first.vae));
    put("seed_resize_from_w", json!(-1));
    put("seed_resize_from_h", json!(-1));
    put(
        "denoising_strength",
        match first.kind {
            PipelineKind::Img2Img => json!(first.strength),
            _ => Value::Null,
        },
    );
    put(
        "extra_generation_params",
        json!({"Schedule type": req.schedule}),
    );
    put("index_of_first_image", json!(0));
    put("infotexts", json!(infotexts));
    put("styles", json!([]));
    put("clip_skip", json!(first.clip_skip));
    put("is_using_inpainting_conditioning", json!(false));
    put(
        "version",
        json!(format!("pictor {}", env!("CARGO_PKG_VERSION"))),
    );
    Value::Object(info)
}

/// Per-key A1111 state on this node: the model `POST /sdapi/v1/options` chose (A1111's "current checkpoint",
/// kept per key so one user's choice is not another's), and the jobs of the key's requests in flight (for
/// `/progress` and `/interrupt`; a request is held by the node that accepted it).
#[derive(Debug, Default)]
pub struct Sessions {
    models: std::sync::Mutex<std::collections::HashMap<String, String>>,
    in_flight: std::sync::Mutex<std::collections::HashMap<String, Vec<i64>>>,
}

impl Sessions {
    /// The model `owner` chose, if any.
    pub fn model(&self, owner: &str) -> Option<String> {
        self.models.lock().expect("sessions").get(owner).cloned()
    }

    /// Records `owner`'s model choice.
    pub fn set_model(&self, owner: &str, model_id: String) {
        self.models
            .lock()
            .expect("sessions")
            .insert(owner.to_string(), model_id);
    }

    /// Records jobs `ids` of a request of `owner` in flight.
    pub fn start(&self, owner: &str, ids: &[i64]) {
        self.in_flight
            .lock()
            .expect("sessions")
            .entry(owner.to_string())
            .or_default()
            .extend_from_slice(ids);
    }

    /// Forgets jobs `ids` of `owner` (their request was answered or dropped).
    pub fn end(&self, owner: &str, ids: &[i64]) {
        let mut in_flight = self.in_flight.lock().expect("sessions");
        if let Some(jobs) = in_flight.get_mut(owner) {
            jobs.retain(|id| !ids.contains(id));
            if jobs.is_empty() {
                in_flight.remove(owner);
            }
        }
    }

    /// `owner`'s jobs in flight, oldest first.
    pub fn jobs(&self, owner: &str) -> Vec<i64> {
        self.in_flight
            .lock()
            .expect("sessions")
            .get(owner)
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Body {
        Body::parse(v.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn lora_tags_leave_the_prompt() {
        let (prompt, loras) = take_lora_tags("a cat <lora:tiny:0.6>, sharp <lora:b>").unwrap();
        assert_eq!(prompt, "a cat , sharp");
        assert_eq!(
            loras
                .iter()
                .map(|l| (l.name.as_str(), l.strength))
                .collect::<Vec<_>>(),
            vec![("tiny", 0.6), ("b", 1.0)]
        );
        assert!(take_lora_tags("<lora::1>").is_err());
        assert!(take_lora_tags("<lora:a:strong>").is_err());
        assert_eq!(take_lora_tags("no tags").unwrap().0, "no tags");
    }

    #[test]
    fn webuiapi_defaults_are_accepted_and_what_cannot_run_is_refused() {
        // What webuiapi 0.9 sends for txt2img with its defaults.
        let sent = json!({"enable_hr": false, "hr_scale": 2, "denoising_strength": 0.7, "prompt": "a cat",
            "styles": [], "seed": 5, "subseed": -1, "subseed_strength": 0.0, "batch_size": 2, "n_iter": 1,
            "steps": 4, "cfg_scale": 7.0, "width": 64, "height": 64, "restore_faces": false, "tiling": false,
            "negative_prompt": "", "eta": 1.0, "override_settings": {}, "sampler_name": "Euler a",
            "scheduler": "automatic", "sampler_index": "Euler a", "script_name": null, "script_args": [],
            "send_images": true, "save_images": false, "alwayson_scripts": {}});
        let r = parse(PipelineKind::Text2Img, &body(sent.clone()), Some("m")).unwrap();
        assert_eq!(r.submissions.len(), 2);
        assert_eq!(r.submissions[0].seed, Some(5));
        assert_eq!(r.submissions[1].seed, Some(6));
        let s = &r.submissions[0];
        assert_eq!(s.model_id.as_deref(), Some("m"));
        assert_eq!(
            s.scheduler.as_deref(),
            Some("EulerAncestralDiscreteScheduler")
        );
        assert_eq!((s.width, s.height, s.steps), (Some(64), Some(64), 4));
        assert_eq!(s.init_image, None);

        for (field, value) in [
            ("enable_hr", json!(true)),
            ("restore_faces", json!(true)),
            ("subseed_strength", json!(0.5)),
            ("styles", json!(["x"])),
            ("alwayson_scripts", json!({"ControlNet": {"args": []}})),
            ("sampler_name", json!("DPM++ 2S a")),
            ("batch_size", json!(3)),
            ("width", json!(4096)),
        ] {
            let mut b = sent.clone();
            b[field] = value;
            if field == "batch_size" {
                b["n_iter"] = json!(2);
            }
            let err = parse(PipelineKind::Text2Img, &body(b), None).unwrap_err();
            assert_eq!(err.field_name(), Some(field), "{err}");
        }
        // img2img needs exactly one init image; the override picks the model.
        let mut b = sent.clone();
        b["override_settings"] = json!({"sd_model_checkpoint": "sd1-tiny.safetensors [abc123]",
                                        "CLIP_stop_at_last_layers": 2});
        let err = parse(PipelineKind::Img2Img, &body(b.clone()), None).unwrap_err();
        assert_eq!(err.field_name(), Some("init_images"));
        b["init_images"] = json!(["aGVsbG8="]);
        let r = parse(PipelineKind::Img2Img, &body(b), Some("other")).unwrap();
        assert_eq!(r.submissions[0].model_id.as_deref(), Some("sd1-tiny"));
        assert_eq!(r.submissions[0].clip_skip, 2);
        assert_eq!(r.submissions[0].strength, 0.7);
    }
}
