//! `GET /openapi.json`: an OpenAPI 3.1 description of every route, generated from the route table.

use serde_json::{json, Map, Value};

use crate::backend::PipelineKind;
use crate::routes::{table, RouteKind};

fn string() -> Value {
    json!({"type": "string"})
}

/// A text field that must say something: empty or blank text counts as absent.
fn text() -> Value {
    json!({"type": "string", "pattern": "\\S", "description": "not blank"})
}

fn int_or_string(description: &str) -> Value {
    json!({"oneOf": [{"type": "integer"}, {"type": "string"}], "description": description})
}

/// An integer from `min` to `max`, or the same as a string (the hosted API's clients send both).
fn int_or_string_in(min: i64, max: i64, description: &str) -> Value {
    json!({"oneOf": [{"type": "integer", "minimum": min, "maximum": max}, {"type": "string"}],
           "description": description})
}

/// A number from `min` to `max`, or the same as a string.
fn num_or_string_in(min: f64, max: f64, description: &str) -> Value {
    json!({"oneOf": [{"type": "number", "minimum": min, "maximum": max}, {"type": "string"}],
           "description": description})
}

fn int_in(min: i64, max: i64) -> Value {
    json!({"type": "integer", "minimum": min, "maximum": max})
}

fn num_in(min: f64, max: f64) -> Value {
    json!({"type": "number", "minimum": min, "maximum": max})
}

fn yes_no(description: &str) -> Value {
    json!({"oneOf": [{"type": "boolean"}, {"type": "string", "enum": ["yes", "no"]}], "description": description})
}

fn generation_schema(kind: PipelineKind) -> Value {
    let mut p = Map::new();
    p.insert("key".into(), body_key());
    p.insert("prompt".into(), text());
    let size_default = if kind.takes_image() {
        "8–1024, rounded down to a multiple of 8; default: the init image's size"
    } else {
        "8–1024, rounded down to a multiple of 8; default 512"
    };
    p.insert(
        "negative_prompt".into(),
        json!({"type": ["string", "null"]}),
    );
    if kind.takes_image() {
        p.insert(
            "init_image".into(),
            json!({"type": "string", "pattern": "\\S",
            "description": "http(s) URL, base64 or data URI of a PNG, JPEG or WebP image"}),
        );
    }
    p.insert("model_id".into(), json!({"type": ["string", "null"],
        "description": "Model in the models folder; default: --default-model (v5: --pix2pix-model)"}));
    p.insert("width".into(), int_or_string_in(8, 1024, size_default));
    p.insert("height".into(), int_or_string_in(8, 1024, size_default));
    p.insert("samples".into(), int_or_string_in(1, 4, "1–4"));
    p.insert(
        "guidance_scale".into(),
        num_or_string_in(1.0, 20.0, "1–20, default 7.5"),
    );
    p.insert(
        "seed".into(),
        json!({"oneOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}],
        "description": "null = random (reported in meta.seed)"}),
    );
    p.insert("scheduler".into(), string());
    p.insert("use_karras_sigmas".into(), yes_no("default yes"));
    p.insert("algorithm_type".into(), string());
    p.insert("clip_skip".into(), int_or_string_in(1, 8, "1–8"));
    p.insert("base64".into(), yes_no("outputs as .base64 text files"));
    p.insert(
        "temp".into(),
        yes_no("outputs under /temp/, deleted after 24 hours"),
    );
    p.insert(
        "instant_response".into(),
        yes_no("answer processing at once"),
    );
    p.insert("webhook".into(), json!({"type": ["string", "null"]}));
    p.insert("track_id".into(), json!({"type": ["string", "null"]}));
    match kind {
        PipelineKind::Text2Img => {
            p.insert(
                "num_inference_steps".into(),
                int_or_string_in(1, 50, "1–50, default 30"),
            );
        }
        PipelineKind::Img2Img => {
            p.insert(
                "num_inference_steps".into(),
                int_or_string_in(1, 50, "1–50, default 30"),
            );
            p.insert(
                "strength".into(),
                num_or_string_in(0.0, 1.0, "0–1, default 0.7"),
            );
        }
        PipelineKind::Pix2Pix => {
            p.insert("steps".into(), int_or_string_in(1, 50, "1–50, default 20"));
            p.insert(
                "image_guidance_scale".into(),
                num_or_string_in(0.0, 20.0, "0–20, default 1.5"),
            );
        }
    }
    let required = if kind.takes_image() {
        json!(["prompt", "init_image"])
    } else {
        json!(["prompt"])
    };
    json!({"type": "object", "required": required, "properties": p})
}

fn body(schema: Value) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema}}})
}

fn json_content(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

fn strings() -> Value {
    json!({"type": "array", "items": {"type": "string"}})
}

/// The key, as the ModelsLab dialect takes it in the body.
fn body_key() -> Value {
    json!({"type": "string",
           "description": "API key (or send it as a `key` header or `Authorization: Bearer`)"})
}

/// How each dialect takes its key (see `components.securitySchemes`); the ModelsLab dialect also takes it as the
/// body's `key` (the empty alternative).
fn security(kind: &RouteKind) -> Option<Value> {
    match kind {
        RouteKind::Generate(..)
        | RouteKind::FetchById
        | RouteKind::FetchByBody
        | RouteKind::Manage(_)
        | RouteKind::JobCancel => Some(json!([{}, {"bearer": []}, {"keyHeader": []}])),
        RouteKind::JobEvents | RouteKind::Options => {
            Some(json!([{"bearer": []}, {"keyHeader": []}, {"keyQuery": []}]))
        }
        RouteKind::Sdapi(_) => Some(json!([{"basic": []}, {"bearer": []}, {"keyHeader": []}])),
        RouteKind::OpenAiGenerations | RouteKind::OpenAiEdits | RouteKind::OpenAiModels => {
            Some(json!([{"bearer": []}, {"keyHeader": []}]))
        }
        _ => None,
    }
}

/// The ModelsLab dialect's error: HTTP 200 for anything the requester can fix (a bad key or field), 429 for a
/// full queue, 503 for a dependency down for now (both with `retry_after`), 500 for the service's own failure.
/// The 404 and 405 of unknown routes carry `status` and `message` only.
fn ml_error() -> Value {
    json!({"type": "object", "required": ["status", "message"], "properties": {
        "status": {"const": "error"}, "message": string(), "messege": string(),
        "errors": {"type": "object", "additionalProperties": strings()},
        "tip": string(), "retry_after": {"type": "integer"}}})
}

/// ModelsLab answers: `ok` or the error shape at 200, and the error shape at 429, 503 and 500.
fn ml_answers(description: &str, ok: Value, queued: bool) -> Value {
    let mut answers = Map::new();
    answers.insert(
        "200".into(),
        json_content(description, json!({"anyOf": [ok, ml_error()]})),
    );
    if queued {
        answers.insert(
            "429".into(),
            json_content("the key's queue is full (retry_after seconds)", ml_error()),
        );
    }
    answers.insert(
        "503".into(),
        json_content(
            "a dependency (job store, disk, image decoding budget) is unavailable for now; retry after \
             retry_after seconds",
            ml_error(),
        ),
    );
    answers.insert("500".into(), json_content("the service failed", ml_error()));
    Value::Object(answers)
}

fn output() -> Value {
    json!({"oneOf": [{"type": "string"}, strings()],
           "description": "output URLs (one string on v5, empty while processing)"})
}

fn ml_success() -> Value {
    json!({"type": "object", "required": ["status", "id", "output"], "properties": {
        "status": {"const": "success"}, "generationTime": {"type": "number"}, "id": {"type": "integer"},
        "output": output(), "meta": {"type": "object"}, "proxy_links": strings(),
        "nsfw_content_detected": {"type": "boolean"}, "webhook_status": string(), "tip": string(),
        "warnings": strings()}})
}

fn ml_processing() -> Value {
    json!({"type": "object", "required": ["status", "id", "eta", "fetch_result", "future_links"], "properties": {
        "status": {"const": "processing"}, "id": {"type": "integer"}, "eta": {"type": "number"},
        "message": string(), "messege": string(), "tip": string(), "fetch_result": string(),
        "output": output(), "meta": {"type": "object"}, "future_links": strings(), "proxy_links": strings(),
        "webhook_status": string(), "step": {"type": "integer"}, "steps": {"type": "integer"},
        "progress": {"type": "number"}, "warnings": strings()}})
}

fn ml_failed() -> Value {
    json!({"type": "object", "required": ["status", "id", "message"], "properties": {
        "status": {"const": "failed"}, "id": {"type": "integer"}, "message": string(), "messege": string(),
        "output": string()}})
}

fn ml_job() -> Value {
    json!({"anyOf": [ml_success(), ml_processing(), ml_failed()]})
}

/// AUTOMATIC1111's errors: 401 (with `WWW-Authenticate: Basic`), 422 for a bad field (FastAPI's shape), 429, 503
/// and 500 (its RuntimeError shape).
fn a1111_answers(name: &str, method: &str, ok: Value) -> Value {
    let detail =
        json!({"type": "object", "required": ["detail"], "properties": {"detail": string()}});
    let mut answers = Map::new();
    answers.insert(
        "200".into(),
        json_content("as AUTOMATIC1111 answers it", ok),
    );
    answers.insert(
        "401".into(),
        json!({"description": "missing or unknown key",
               "headers": {"WWW-Authenticate": {"required": true, "schema": {"const": "Basic"}}},
               "content": {"application/json": {"schema": detail}}}),
    );
    if method == "POST" && matches!(name, "txt2img" | "img2img" | "options") {
        answers.insert(
            "422".into(),
            json_content(
                "a field is missing or wrong",
                json!({"type": "object", "required": ["detail"], "properties": {"detail": {
                    "type": "array", "items": {"type": "object", "required": ["loc", "msg", "type"],
                    "properties": {"loc": strings(), "msg": string(), "type": string()}}}}}),
            ),
        );
    }
    if matches!(name, "txt2img" | "img2img") {
        answers.insert(
            "429".into(),
            json_content("the key's queue is full", detail.clone()),
        );
    }
    answers.insert(
        "503".into(),
        json_content("a dependency is unavailable for now", detail),
    );
    answers.insert(
        "500".into(),
        json_content(
            "the service failed",
            json!({"type": "object", "required": ["error", "errors"], "properties": {
                "error": string(), "detail": string(), "body": string(), "errors": string()}}),
        ),
    );
    Value::Object(answers)
}

fn a1111_ok(name: &str, method: &str) -> Value {
    let list = |items: Value| json!({"type": "array", "items": items});
    let nullable = |t: &str| json!({"type": [t, "null"]});
    match (method, name) {
        ("POST", "txt2img" | "img2img") => json!({"type": "object",
            "required": ["images", "parameters", "info"], "properties": {
                "images": strings(), "parameters": {"type": "object"},
                "info": {"type": "string", "description": "JSON text"}}}),
        ("GET", "sd-models") => list(
            json!({"type": "object", "required": ["title", "model_name"],
            "properties": {"title": string(), "model_name": string(), "hash": nullable("string"),
                "sha256": nullable("string"), "filename": string(), "config": nullable("string")}}),
        ),
        ("GET", "samplers") => list(
            json!({"type": "object", "required": ["name", "aliases", "options"],
            "properties": {"name": string(), "aliases": strings(), "options": {"type": "object"}}}),
        ),
        ("GET", "schedulers") => list(json!({"type": "object", "required": ["name", "label"],
            "properties": {"name": string(), "label": string(),
                "aliases": {"type": ["array", "null"], "items": string()},
                "default_rho": {"type": "number"}, "need_inner_model": {"type": "boolean"}}})),
        ("GET", "loras") => list(
            json!({"type": "object", "required": ["name", "alias", "path"],
            "properties": {"name": string(), "alias": string(), "path": string(),
                "metadata": {"type": "object"}}}),
        ),
        ("GET", "options") => json!({"type": "object", "required": ["sd_model_checkpoint"],
            "properties": {"sd_model_checkpoint": nullable("string"),
                "sd_checkpoint_hash": nullable("string"), "CLIP_stop_at_last_layers": {"type": "integer"},
                "sd_vae": string()}}),
        ("GET", "progress") => json!({"type": "object",
            "required": ["progress", "eta_relative", "state"], "properties": {
                "progress": {"type": "number"}, "eta_relative": {"type": "number"},
                "state": {"type": "object", "properties": {
                    "skipped": {"type": "boolean"}, "interrupted": {"type": "boolean"}, "job": string(),
                    "job_count": {"type": "integer"}, "job_timestamp": string(),
                    "job_no": {"type": "integer"}, "sampling_step": {"type": "integer"},
                    "sampling_steps": {"type": "integer"}}},
                "current_image": nullable("string"), "textinfo": nullable("string")}}),
        _ => json!({"type": "null"}),
    }
}

fn a1111_request(name: &str) -> Option<Value> {
    let mut p = Map::new();
    match name {
        "txt2img" | "img2img" => {
            let described = |mut schema: Value, description: &str| {
                schema["description"] = json!(description);
                schema
            };
            p.insert(
                "prompt".into(),
                described(string(), "may carry <lora:NAME:WEIGHT> tags"),
            );
            p.insert("negative_prompt".into(), string());
            for f in ["width", "height"] {
                p.insert(f.into(), described(int_in(8, 1024), "default 512"));
            }
            p.insert("steps".into(), described(int_in(1, 50), "default 20"));
            p.insert("cfg_scale".into(), num_in(1.0, 30.0));
            p.insert("sampler_name".into(), string());
            p.insert("scheduler".into(), string());
            p.insert(
                "seed".into(),
                json!({"type": "integer", "minimum": -1, "description": "-1: random"}),
            );
            p.insert(
                "batch_size".into(),
                described(int_in(1, 4), "batch_size × n_iter: at most 4"),
            );
            p.insert("n_iter".into(), int_in(1, 4));
            p.insert("send_images".into(), json!({"type": "boolean"}));
            p.insert(
                "override_settings".into(),
                json!({"type": "object", "properties": {
                "sd_model_checkpoint": string(), "sd_vae": string(),
                "CLIP_stop_at_last_layers": int_in(1, 12)}}),
            );
            if name == "img2img" {
                p.insert(
                    "init_images".into(),
                    json!({"type": "array", "items": {"type": "string",
                    "description": "base64 or data URI of a PNG, JPEG or WebP image"},
                    "minItems": 1, "maxItems": 1}),
                );
                p.insert(
                    "denoising_strength".into(),
                    described(num_in(0.0, 1.0), "default 0.75; times steps at least 1"),
                );
                p.insert("image_cfg_scale".into(), num_in(0.0, 20.0));
            }
        }
        "options" => {
            p.insert(
                "sd_model_checkpoint".into(),
                json!({"type": "string",
                "description": "the caller's model; A1111's other settings are ignored"}),
            );
        }
        _ => return None,
    }
    let required = if name == "img2img" {
        json!(["init_images"])
    } else {
        json!([])
    };
    Some(body(
        json!({"type": "object", "required": required, "properties": p}),
    ))
}

/// OpenAI's error shape, at the HTTP status its SDKs map to exceptions.
fn openai_answers(description: &str, ok: Value, makes_jobs: bool) -> Value {
    let error = json!({"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"], "properties": {
            "message": string(), "type": string(), "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]}}}}});
    let mut answers = Map::new();
    answers.insert("200".into(), json_content(description, ok));
    if makes_jobs {
        answers.insert(
            "400".into(),
            json_content("a field is missing or wrong", error.clone()),
        );
        answers.insert(
            "429".into(),
            json_content("the key's queue is full", error.clone()),
        );
    }
    answers.insert(
        "401".into(),
        json_content("missing or unknown key", error.clone()),
    );
    answers.insert(
        "503".into(),
        json_content("a dependency is unavailable for now", error.clone()),
    );
    answers.insert("500".into(), json_content("the service failed", error));
    Value::Object(answers)
}

fn openai_images() -> Value {
    json!({"type": "object", "required": ["created", "data"], "properties": {
        "created": {"type": "integer"},
        "data": {"type": "array", "items": {"type": "object", "properties": {
            "url": string(), "b64_json": string(), "revised_prompt": string()}}},
        "size": string(), "output_format": string()}})
}

fn management_ok(name: &str) -> Value {
    match name {
        "system_details" => {
            json!({"type": "object", "required": ["status", "model_count", "queue_length"],
            "properties": {"status": {"const": "ok"}, "model_count": {"type": "integer"},
                "models_loaded": strings(), "queue_length": {"type": "integer"}, "running": {"type": "integer"},
                "queue_time": {"type": "number"}, "device": string(), "dtype": string(),
                "workers": {"type": "integer"}, "servers": {"type": "array"}, "version": string()}})
        }
        "schedulers_list" => json!({"type": "object", "required": ["schedulers"],
            "properties": {"schedulers": strings()}}),
        "get_all_models" => {
            json!({"type": "object", "required": ["status", "models"], "properties": {
            "status": {"const": "success"}, "models": {"type": "array", "items": {"type": "object",
                "required": ["model_id"], "properties": {"model_id": string(), "load_data": string()}}}}})
        }
        "verify_model" => {
            json!({"type": "object", "required": ["status", "message"], "properties": {
            "status": {"enum": ["success", "processing", "error"]}, "message": string()}})
        }
        "nsfw_image_check" => json!({"type": "object", "required": ["status", "has_nsfw_concept"],
            "properties": {"status": {"const": "success"}, "images": string(),
                "has_nsfw_concept": {"type": "array", "items": {"type": "boolean"}}}}),
        "upload_image" => {
            json!({"type": "object", "required": ["status", "image_url"], "properties": {
            "status": {"const": "success"}, "message": string(), "image_url": string()}})
        }
        _ => json!({"type": "object", "required": ["status", "message"], "properties": {
            "status": {"const": "success"}, "message": string(), "model_list": strings()}}),
    }
}

/// One event of `GET /api/v1/jobs/{id}/events` (schema of each event of the stream, as OpenAPI 3.1 reads a
/// `text/event-stream` schema): its name and its JSON data.
fn sse_event() -> Value {
    let event = |name: &str, data: Value| {
        json!({"type": "object", "required": ["event", "data"], "properties": {
            "event": {"const": name},
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data}}})
    };
    json!({"oneOf": [
        event("progress", json!({"type": "object",
            "required": ["id", "status", "step", "steps", "progress", "eta"], "properties": {
                "id": {"type": "integer"}, "status": {"enum": ["queued", "running"]},
                "step": {"type": "integer"}, "steps": {"type": "integer"}, "progress": {"type": "number"},
                "eta": {"type": "number"}}})),
        event("done", ml_job()),
        event("error", json!({"type": "object", "required": ["message"],
            "properties": {"message": string()}})),
    ]})
}

/// The `operationId` of a route: its method and path in one identifier.
pub fn operation_id(method: &str, path: &str) -> String {
    let mut id = method.to_lowercase();
    for c in path.chars() {
        if c.is_ascii_alphanumeric() {
            id.push(c);
        } else if !id.ends_with('_') {
            id.push('_');
        }
    }
    id.trim_end_matches('_').to_string()
}

/// Where a job's `id` leads from the answer of the route that made it: its family's fetch route, its event
/// stream and its cancel route (OpenAPI links, which schemathesis's stateful phase follows).
fn job_links(family: crate::family::Family) -> Value {
    let id = json!({"id": "$response.body#/id"});
    json!({
        "fetch": {"operationId": operation_id("POST", &format!("{}{{id}}", family.fetch_path())),
                  "parameters": id},
        "events": {"operationId": operation_id("GET", "/api/v1/jobs/{id}/events"), "parameters": id},
        "cancel": {"operationId": operation_id("POST", "/api/v1/jobs/{id}/cancel"), "parameters": id},
    })
}

fn idempotency_header() -> Value {
    json!({"name": "Idempotency-Key", "in": "header", "required": false,
           "description": "a retry with the same value (within 24 h) answers the first request's job",
           "schema": {"type": "string", "minLength": 1, "maxLength": 255}})
}

/// The document, with `server_url` as its server.
pub fn document(server_url: &str) -> Value {
    let mut paths = Map::new();
    for route in table() {
        let (summary, request, responses) = match route.kind {
            RouteKind::Generate(family, kind) => (
                format!(
                    "{} generation ({})",
                    family.label(),
                    match kind {
                        PipelineKind::Text2Img => "text-to-image",
                        PipelineKind::Img2Img => "img2img",
                        PipelineKind::Pix2Pix => "InstructPix2Pix",
                    }
                ),
                Some(body(generation_schema(kind))),
                ml_answers(
                    "status success (output URLs), processing (fetch_result, eta), failed, or error",
                    ml_job(),
                    true,
                ),
            ),
            RouteKind::FetchById => (
                "Fetch a job by the id in the path".into(),
                Some(body(
                    json!({"type": "object", "properties": {"key": body_key()}}),
                )),
                ml_answers("the job's success, processing or failed body, or error", ml_job(), false),
            ),
            RouteKind::FetchByBody => (
                "Fetch a job by request_id".into(),
                Some(body(
                    json!({"type": "object", "required": ["request_id"],
                    "properties": {"key": body_key(), "request_id": int_or_string("the job id")}}),
                )),
                ml_answers("the job's success, processing or failed body, or error", ml_job(), false),
            ),
            RouteKind::Manage(name) => (
                format!("Enterprise management: {name} (admin key)"),
                Some(body(
                    json!({"type": "object", "properties": {"key": body_key()}}),
                )),
                ml_answers("status success (ok for system_details), or error", management_ok(name), false),
            ),
            RouteKind::SystemLoad => (
                "Queue length and estimated wait".into(),
                None,
                json!({"200": json_content("queue_num, queue_time", json!({"type": "object",
                    "required": ["queue_num", "queue_time", "status"], "properties": {
                        "queue_num": {"type": "integer"}, "queue_time": {"type": "number"},
                        "status": {"const": "ok"}}}))}),
            ),
            RouteKind::File => (
                "A stored output (PNG, or base64 text)".into(),
                None,
                json!({"200": {"description": "the file", "content": {
                        "image/png": {"schema": {"type": "string", "format": "binary"}},
                        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                        "image/webp": {"schema": {"type": "string", "format": "binary"}},
                        "text/plain": {"schema": {"type": "string"}},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                       "404": json_content("absent or expired", ml_error()),
                       "500": json_content("the file could not be read", ml_error())}),
            ),
            RouteKind::Health => (
                "Readiness".into(),
                None,
                json!({"200": json_content("ok once ready", json!({"type": "object",
                        "required": ["status", "queued", "running"], "properties": {
                            "status": {"const": "ok"}, "queued": {"type": "integer"},
                            "running": {"type": "integer"}}})),
                       "503": json_content("starting, or the job store is unreachable",
                        json!({"type": "object", "required": ["status"], "properties": {
                            "status": {"enum": ["starting", "error"]}, "message": string()}}))}),
            ),
            RouteKind::Metrics => (
                "Prometheus metrics".into(),
                None,
                json!({"200": {"description": "text exposition format",
                               "content": {"text/plain": {"schema": string()}}}}),
            ),
            RouteKind::OpenApi => (
                "This document".into(),
                None,
                json!({"200": json_content("OpenAPI 3.1", json!({"type": "object",
                    "required": ["openapi", "info", "paths"]}))}),
            ),
            RouteKind::OpenAiGenerations => (
                "OpenAI Images API: generate (Bearer key; model = a Pictor model id)".into(),
                Some(body(json!({"type": "object", "required": ["prompt"], "properties": {
                    "prompt": text(), "model": string(), "n": int_in(1, 4),
                    "size": json!({"type": "string", "pattern": "^(auto|[0-9]+x[0-9]+)$",
                        "description": "WIDTHxHEIGHT (each 8–1024) or auto"}),
                    "response_format": json!({"type": "string", "enum": ["url", "b64_json"]}),
                    "negative_prompt": string(), "seed": json!({"type": "integer", "minimum": 0}),
                    "num_inference_steps": int_in(1, 50),
                    "guidance_scale": num_in(0.0, 30.0)}}))),
                openai_answers(
                    "{created, data: [{url | b64_json, revised_prompt}]}",
                    openai_images(),
                    true,
                ),
            ),
            RouteKind::OpenAiEdits => (
                "OpenAI Images API: edit an image (multipart; img2img, or InstructPix2Pix for such a model)"
                    .into(),
                Some(json!({"required": true, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "required": ["image", "prompt"], "properties": {
                        "image": {"type": "string", "format": "binary"}, "prompt": text(),
                        "model": string(), "n": string(), "size": string(),
                        "response_format": string(), "strength": string()}}}}})),
                openai_answers(
                    "{created, data: [{url | b64_json, revised_prompt}]}",
                    openai_images(),
                    true,
                ),
            ),
            RouteKind::OpenAiModels => (
                "OpenAI: the models (Bearer key)".into(),
                None,
                openai_answers(
                    "{object: list, data: [{id, object, created, owned_by}]}",
                    json!({"type": "object", "required": ["object", "data"], "properties": {
                        "object": {"const": "list"}, "data": {"type": "array", "items": {"type": "object",
                            "required": ["id", "object"], "properties": {"id": string(),
                                "object": {"const": "model"}, "created": {"type": "integer"},
                                "owned_by": string()}}}}}),
                    false,
                ),
            ),
            RouteKind::Playground => (
                "The playground page (HTML)".into(),
                None,
                json!({"200": {"description": "the page", "content": {"text/html": {"schema": string()}}}}),
            ),
            RouteKind::Options => (
                "Models, schedulers, LoRAs and styles for the playground (any key: Bearer, key header or ?key=)"
                    .into(),
                None,
                ml_answers(
                    "{models: [{id, kind}], schedulers, loras, styles, default_model, pix2pix_model}, or error",
                    json!({"type": "object", "required": ["models", "schedulers"], "properties": {
                        "models": {"type": "array", "items": {"type": "object", "required": ["id", "kind"],
                            "properties": {"id": string(), "kind": {"enum": ["img2img", "pix2pix"]}}}},
                        "schedulers": strings(), "loras": strings(), "vaes": strings(),
                        "embeddings": strings(), "styles": strings(), "a1111_samplers": {"type": "object"},
                        "default_model": {"type": ["string", "null"]},
                        "pix2pix_model": {"type": ["string", "null"]}}}),
                    false,
                ),
            ),
            RouteKind::JobEvents => {
                let mut answers = ml_answers("", ml_error(), false);
                answers["200"] = json!({
                    "description": "text/event-stream: `progress` events (status, step, steps, progress, eta), \
                        then `done` with the fetch body (or `error` if the job vanished); before any stream, \
                        the error shape as JSON",
                    "content": {"text/event-stream": {"schema": sse_event()},
                                "application/json": {"schema": ml_error()}}});
                (
                    "A job's progress as Server-Sent Events (owner or admin key: Bearer, key header, or ?key=)"
                        .into(),
                    None,
                    answers,
                )
            }
            RouteKind::JobCancel => (
                "Cancel a job (owner or admin key): queued never runs, running stops within a step".into(),
                Some(body(json!({"type": "object", "properties": {"key": body_key()}}))),
                ml_answers(
                    "status success with state dequeued, stopping or finished; or error",
                    json!({"type": "object", "required": ["status", "id", "state", "message"], "properties": {
                        "status": {"const": "success"}, "id": {"type": "integer"},
                        "state": {"enum": ["dequeued", "stopping", "finished"]}, "message": string()}}),
                    false,
                ),
            ),
            RouteKind::NotYet(what) => (
                format!("Not available on this server: {what}"),
                None,
                json!({"200": json_content("status error, with the message", ml_error())}),
            ),
            RouteKind::Sdapi(name) => (
                format!("AUTOMATIC1111 API: {name} (HTTP Basic with the API key as password, or Bearer)"),
                if route.method == "POST" {
                    a1111_request(name)
                } else {
                    None
                },
                a1111_answers(name, route.method, a1111_ok(name, route.method)),
            ),
        };
        let mut responses = responses;
        if let RouteKind::Generate(family, _) = route.kind {
            responses["200"]["links"] = job_links(family);
        }
        let mut op = Map::new();
        op.insert(
            "operationId".into(),
            json!(operation_id(
                route.method,
                &route.path.replace("{*key}", "{key}")
            )),
        );
        op.insert("summary".into(), json!(summary));
        if let Some(r) = request {
            op.insert("requestBody".into(), r);
        }
        op.insert("responses".into(), responses);
        if let Some(s) = security(&route.kind) {
            op.insert("security".into(), s);
        }
        let mut parameters = Vec::new();
        if route.path.contains("{id}") {
            parameters.push(json!({"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}));
        }
        if route.path.contains("{*key}") {
            parameters.push(json!({"name": "key", "in": "path", "required": true, "schema": {"type": "string"}}));
        }
        if matches!(
            route.kind,
            RouteKind::Generate(..) | RouteKind::OpenAiGenerations | RouteKind::OpenAiEdits
        ) || matches!(route.kind, RouteKind::Sdapi("txt2img" | "img2img"))
        {
            parameters.push(idempotency_header());
        }
        if !parameters.is_empty() {
            op.insert("parameters".into(), json!(parameters));
        }
        let path = route.path.replace("{*key}", "{key}");
        let entry = paths.entry(path).or_insert_with(|| json!({}));
        entry[route.method.to_lowercase()] = Value::Object(op);
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Pictor", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Self-hosted Stable Diffusion img2img speaking the ModelsLab / Stable Diffusion API"},
        "servers": [{"url": server_url}],
        "paths": paths,
        "components": {"securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "the API key"},
            "keyHeader": {"type": "apiKey", "in": "header", "name": "key"},
            "keyQuery": {"type": "apiKey", "in": "query", "name": "key",
                         "description": "for browsers' EventSource, which cannot set headers"},
            "basic": {"type": "http", "scheme": "basic",
                      "description": "AUTOMATIC1111's --api-auth: the API key as the password (or the user name)"}}},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_described() {
        let doc = document("http://x");
        let paths = doc["paths"].as_object().unwrap();
        for route in table() {
            let p = route.path.replace("{*key}", "{key}");
            assert!(
                paths[&p][route.method.to_lowercase()].is_object(),
                "{} {}",
                route.method,
                p
            );
        }
        assert!(paths["/api/v6/images/img2img"]["post"]["requestBody"].is_object());
    }

    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let mut ops = Vec::new();
        for (path, methods) in doc["paths"].as_object().unwrap() {
            for (method, op) in methods.as_object().unwrap() {
                ops.push((method.clone(), path.clone(), op.clone()));
            }
        }
        ops
    }

    /// What schemathesis found (scripts/schema_check.sh): the document only promised `200 {"type": "object"}`,
    /// while the dialects answer 400/401/422/429/503 in their own error shapes, lists and nulls (A1111), and an
    /// event stream. Each operation now documents every status its dialect answers with.
    #[test]
    fn each_dialect_documents_its_error_statuses() {
        let doc = document("http://x");
        let paths = &doc["paths"];
        let codes = |path: &str, method: &str| -> Vec<String> {
            let mut codes: Vec<String> = paths[path][method]["responses"]
                .as_object()
                .unwrap_or_else(|| panic!("{method} {path}"))
                .keys()
                .cloned()
                .collect();
            codes.sort();
            codes
        };
        assert_eq!(
            codes("/api/v3/text2img", "post"),
            ["200", "429", "500", "503"]
        );
        assert_eq!(
            codes("/api/v6/images/fetch/{id}", "post"),
            ["200", "500", "503"]
        );
        assert_eq!(
            codes("/sdapi/v1/txt2img", "post"),
            ["200", "401", "422", "429", "500", "503"]
        );
        assert_eq!(
            codes("/sdapi/v1/samplers", "get"),
            ["200", "401", "500", "503"]
        );
        assert_eq!(
            codes("/v1/images/generations", "post"),
            ["200", "400", "401", "429", "500", "503"]
        );
        assert_eq!(codes("/generations/{key}", "get"), ["200", "404", "500"]);
        assert_eq!(codes("/health", "get"), ["200", "503"]);
        // A1111's 200 bodies are lists and nulls, not objects.
        let ok = |path: &str, method: &str| {
            paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"].clone()
        };
        assert_eq!(ok("/sdapi/v1/sd-models", "get")["type"], "array");
        assert_eq!(ok("/sdapi/v1/interrupt", "post")["type"], "null");
        assert_eq!(
            paths["/sdapi/v1/txt2img"]["post"]["responses"]["401"]["headers"]["WWW-Authenticate"]
                ["required"],
            true
        );
        // The event stream: one schema per event (`progress`, `done`, `error`), and JSON errors before it.
        let events = &paths["/api/v1/jobs/{id}/events"]["get"]["responses"]["200"]["content"];
        assert_eq!(
            events["text/event-stream"]["schema"]["oneOf"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        assert!(events["application/json"].is_object());
        // The ModelsLab key may come from a header instead of the body.
        let body = &paths["/api/v3/text2img"]["post"]["requestBody"]["content"]["application/json"]
            ["schema"];
        assert_eq!(body["required"], json!(["prompt"]));
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    }

    #[test]
    fn operation_ids_are_unique_and_links_lead_to_them() {
        let doc = document("http://x");
        let ops = operations(&doc);
        let mut ids: Vec<String> = ops
            .iter()
            .map(|(_, _, op)| op["operationId"].as_str().unwrap().to_string())
            .collect();
        let count = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), count, "operationIds repeat");
        let mut links = 0;
        for (method, path, op) in &ops {
            for (name, link) in op["responses"]["200"]["links"]
                .as_object()
                .into_iter()
                .flatten()
            {
                let target = link["operationId"].as_str().unwrap();
                assert!(
                    ids.binary_search(&target.to_string()).is_ok(),
                    "{method} {path}: link {name} to unknown {target}"
                );
                links += 1;
            }
        }
        let generating = table()
            .iter()
            .filter(|r| matches!(r.kind, RouteKind::Generate(..)))
            .count();
        assert!(generating > 10);
        assert_eq!(
            links,
            3 * generating,
            "every generation route links to its job's routes"
        );
        assert_eq!(
            operation_id("POST", "/api/v6/images/fetch/{id}"),
            "post_api_v6_images_fetch_id"
        );
    }
}
