//! The answer bodies — success, processing, failed — and each family's `meta`, built from a stored job.

use serde_json::{json, Map, Value};

use crate::family::Family;
use crate::jobs::{Job, JobStatus};
use crate::storage::Storage;

/// The `tip` on v6 success bodies.
const V6_TIP: &str = "Self-hosted by Pictor: results stay on this server.";

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Public URLs of a job's outputs (known before they exist): in the key's own bucket once written there
/// (`update_s3`), else the service's.
pub fn output_urls(job: &Job, storage: &dyn Storage) -> Vec<String> {
    if let Some(r) = &job.result {
        if !r.external_urls.is_empty() && r.external_urls.len() == job.spec.output_keys.len() {
            return r.external_urls.clone();
        }
    }
    job.spec
        .output_keys
        .iter()
        .map(|k| storage.url(k))
        .collect()
}

/// The absolute fetch URL the family's clients poll.
pub fn fetch_url(job: &Job, public_url: &str) -> String {
    format!("{public_url}{}{}", job.spec.family.fetch_path(), job.id)
}

/// The family's `meta` object.
pub fn meta(job: &Job) -> Value {
    let s = &job.spec;
    let r = &s.request;
    let d = &s.delivery;
    let scheduler = job
        .result
        .as_ref()
        .map(|x| x.scheduler.clone())
        .or_else(|| r.scheduler.clone())
        .unwrap_or_else(|| "default".into());
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_string(), v);
    };
    // What ran: "unavailable" once a job that asked for the check finished without one (no checker installed).
    let unchecked = job
        .result
        .as_ref()
        .is_some_and(|x| x.nsfw_content_detected.is_empty());
    let safety = match r.safety_checker {
        Some(_) if unchecked => "unavailable",
        Some(_) => "yes",
        None => "no",
    };
    let safety_type = |default: &str| {
        json!(r
            .safety_checker
            .map(|t| t.name().to_string())
            .or_else(|| s.echo.safety_checker_type.clone())
            .unwrap_or_else(|| default.to_string()))
    };
    let loras = if r.loras.is_empty() {
        Value::Null
    } else {
        json!(r
            .loras
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(","))
    };
    let lora_strength = if r.loras.is_empty() {
        Value::Null
    } else {
        json!(r
            .loras
            .iter()
            .map(|l| l.strength.to_string())
            .collect::<Vec<_>>()
            .join(","))
    };
    let embeddings = if r.embeddings.is_empty() {
        Value::Null
    } else {
        json!(r.embeddings.join(","))
    };
    match s.family {
        Family::V3 => {
            put("H", json!(r.height));
            put("W", json!(r.width));
            put("enable_attention_slicing", json!("true"));
            put("model", json!(r.model_id));
            put("safety_checker", json!(safety));
            put("vae", json!(r.vae));
            put("lora", loras.clone());
            put("lora_strength", lora_strength.clone());
            put("tomesd", json!(yes_no(r.tomesd)));
        }
        Family::V4Dreambooth | Family::Enterprise | Family::V6Images | Family::V7 => {
            put("model_id", json!(r.model_id));
            put("W", json!(r.width));
            put("H", json!(r.height));
            put("multi_lingual", json!("no"));
            put("full_url", json!("no"));
            put("upscale", json!("no"));
            put("use_karras_sigmas", json!(yes_no(r.use_karras_sigmas)));
            put(
                "algorithm_type",
                json!(r.algorithm_type.clone().unwrap_or_else(|| "no".into())),
            );
            put("clip_skip", json!(r.clip_skip));
            put("temp", json!(yes_no(d.temp)));
            put("base64", json!(yes_no(d.base64)));
            put("tomesd", json!(yes_no(r.tomesd)));
            put("vae", json!(r.vae));
            put("lora", loras.clone());
            put("lora_strength", lora_strength.clone());
            put("embeddings", embeddings.clone());
            if matches!(s.family, Family::V6Images | Family::V7) {
                put("safety_checker", json!(safety));
                put("safety_checker_type", safety_type("sensitive_content_text"));
                put("instant_response", json!(yes_no(d.instant_response)));
                put("enhance_prompt", json!(yes_no(s.echo.enhance_prompt)));
                put("enhance_style", json!(s.echo.enhance_style));
                put("ip_adapter_id", Value::Null);
                put("watermark", json!("no"));
            } else {
                put("safetychecker", json!(safety));
            }
        }
        Family::V6Realtime | Family::EnterpriseRealtime => {
            put("width", json!(r.width));
            put("height", json!(r.height));
            put("model_id", json!(r.model_id));
            put("base64", json!(yes_no(d.base64)));
            put("temp", json!(yes_no(d.temp)));
            put("instant_response", json!(yes_no(d.instant_response)));
            put("enhance_prompt", json!(yes_no(s.echo.enhance_prompt)));
            put("enhance_style", json!(s.echo.enhance_style));
            put("safety_checker", json!(safety));
            put("safety_checker_type", safety_type("black"));
        }
        Family::V5Pix2Pix => {
            put("model_id", json!(r.model_id));
            put("W", json!(r.width));
            put("H", json!(r.height));
            put("image_guidance_scale", json!(r.image_guidance_scale));
        }
    }
    put("prompt", json!(r.prompt));
    put("negative_prompt", json!(r.negative_prompt));
    put("scheduler", json!(scheduler));
    put("guidance_scale", json!(r.guidance_scale));
    if r.kind.takes_image() {
        put("init_image", json!(s.echo.init_image));
    }
    put("steps", json!(r.steps));
    put("n_samples", json!(r.samples));
    if r.kind == crate::backend::PipelineKind::Img2Img {
        put("strength", json!(r.strength));
    }
    put("seed", json!(r.seed));
    put("outdir", json!("out"));
    put("file_prefix", json!(s.file_prefix));
    put("webhook", json!(d.webhook));
    put("track_id", json!(d.track_id));
    put("id", json!(job.id.to_string()));
    Value::Object(m)
}

fn with_warnings(mut body: Value, job: &Job) -> Value {
    let mut warnings = job.spec.echo.warnings.clone();
    if let Some(result) = &job.result {
        warnings.extend(result.notes.iter().cloned());
    }
    if !warnings.is_empty() {
        body["warnings"] = json!(warnings);
    }
    body
}

/// Whether the safety checker flagged any image of a finished job.
fn nsfw_detected(job: &Job) -> bool {
    job.result
        .as_ref()
        .is_some_and(|r| r.nsfw_content_detected.iter().any(|f| *f))
}

/// The success body: the same whether answered at once, fetched later or posted to a webhook.
pub fn success(job: &Job, storage: &dyn Storage) -> Value {
    let family = job.spec.family;
    let urls = output_urls(job, storage);
    let output = if family.output_is_string() {
        json!(urls.first().cloned().unwrap_or_default())
    } else {
        json!(urls)
    };
    let time = job
        .result
        .as_ref()
        .map(|r| r.generation_time)
        .unwrap_or(0.0);
    let mut body = json!({
        "status": "success",
        "generationTime": time,
        "id": job.id,
        "output": output,
    });
    if family != Family::V5Pix2Pix {
        body["meta"] = meta(job);
    }
    if family.has_proxy_links() {
        body["proxy_links"] = json!(urls);
        body["nsfw_content_detected"] = json!(nsfw_detected(job));
    }
    if family.has_webhook_status() {
        body["webhook_status"] = json!(job.webhook_status);
    }
    if family.is_v6() {
        body["tip"] = json!(V6_TIP);
    }
    with_warnings(body, job)
}

/// The answer to a request that is still queued or running when it is answered.
pub fn processing(job: &Job, storage: &dyn Storage, public_url: &str, eta: f64) -> Value {
    let family = job.spec.family;
    let fetch = fetch_url(job, public_url);
    let message = family.processing_message();
    let urls = output_urls(job, storage);
    let mut body = json!({
        "status": "processing",
        "tip": family.processing_tip(&fetch),
        "eta": eta,
        "message": message,
        "messege": message,
        "fetch_result": fetch,
        "id": job.id,
        "output": if family.output_is_string() { json!("") } else { json!([]) },
        "meta": meta(job),
        "future_links": urls,
    });
    if family.has_webhook_status() {
        body["webhook_status"] = json!(job.webhook_status);
    }
    if family.has_proxy_links() {
        body["proxy_links"] = json!(urls);
    }
    with_warnings(with_progress(body, job), job)
}

/// The failure body.
pub fn failed(job: &Job) -> Value {
    let message = job
        .error
        .clone()
        .unwrap_or_else(|| "Failed, Try Again".into());
    json!({
        "status": "failed",
        "id": job.id,
        "message": message,
        "messege": message,
        "output": "",
    })
}

/// What a fetch route answers for `job`.
pub fn fetch(job: &Job, storage: &dyn Storage, public_url: &str, eta: f64) -> Value {
    match job.status {
        JobStatus::Success => success(job, storage),
        JobStatus::Failed => failed(job),
        JobStatus::Queued | JobStatus::Running => with_progress(
            json!({
                "status": "processing",
                "id": job.id,
                "message": "try again later.",
                "messege": "try again later.",
                "eta": eta,
                "output": "",
                "fetch_result": fetch_url(job, public_url),
                "future_links": output_urls(job, storage),
            }),
            job,
        ),
    }
}

/// Adds the progress its worker last reported to a running job's body (`step`, `steps`, `progress` from 0 to 1:
/// extra fields, which ModelsLab clients ignore).
fn with_progress(mut body: Value, job: &Job) -> Value {
    if job.status == JobStatus::Running {
        body["step"] = json!(job.step);
        body["steps"] = json!(job.steps);
        body["progress"] = json!(if job.steps > 0 {
            (job.step as f64 / job.steps as f64 * 1000.0).round() / 1000.0
        } else {
            0.0
        });
    }
    body
}

/// The webhook payload: the final body plus `track_id`.
pub fn webhook_payload(job: &Job, storage: &dyn Storage) -> Value {
    let mut body = match job.status {
        JobStatus::Success => success(job, storage),
        _ => failed(job),
    };
    body["track_id"] = json!(job.spec.delivery.track_id);
    body
}
