//! `GET /openapi.json`: an OpenAPI 3.1 description of every route, generated from the route table.

use serde_json::{json, Map, Value};

use crate::backend::PipelineKind;
use crate::routes::{table, RouteKind};

fn string() -> Value {
    json!({"type": "string"})
}

fn int_or_string(description: &str) -> Value {
    json!({"oneOf": [{"type": "integer"}, {"type": "string"}], "description": description})
}

fn num_or_string(description: &str) -> Value {
    json!({"oneOf": [{"type": "number"}, {"type": "string"}], "description": description})
}

fn yes_no(description: &str) -> Value {
    json!({"oneOf": [{"type": "boolean"}, {"type": "string", "enum": ["yes", "no"]}], "description": description})
}

fn generation_schema(kind: PipelineKind) -> Value {
    let mut p = Map::new();
    p.insert(
        "key".into(),
        json!({"type": "string", "description": "API key"}),
    );
    p.insert("prompt".into(), string());
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
            json!({"type": "string",
            "description": "http(s) URL, base64 or data URI of a PNG, JPEG or WebP image"}),
        );
    }
    p.insert("model_id".into(), json!({"type": ["string", "null"],
        "description": "Model in the models folder; default: --default-model (v5: --pix2pix-model)"}));
    p.insert("width".into(), int_or_string(size_default));
    p.insert("height".into(), int_or_string(size_default));
    p.insert("samples".into(), int_or_string("1–4"));
    p.insert("guidance_scale".into(), num_or_string("1–20, default 7.5"));
    p.insert(
        "seed".into(),
        json!({"oneOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}],
        "description": "null = random (reported in meta.seed)"}),
    );
    p.insert("scheduler".into(), string());
    p.insert("use_karras_sigmas".into(), yes_no("default yes"));
    p.insert("algorithm_type".into(), string());
    p.insert("clip_skip".into(), int_or_string("1–8"));
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
                int_or_string("1–50, default 30"),
            );
        }
        PipelineKind::Img2Img => {
            p.insert(
                "num_inference_steps".into(),
                int_or_string("1–50, default 30"),
            );
            p.insert("strength".into(), num_or_string("0–1, default 0.7"));
        }
        PipelineKind::Pix2Pix => {
            p.insert("steps".into(), int_or_string("1–50, default 20"));
            p.insert(
                "image_guidance_scale".into(),
                num_or_string("0–20, default 1.5"),
            );
        }
    }
    let required = if kind.takes_image() {
        json!(["key", "prompt", "init_image"])
    } else {
        json!(["key", "prompt"])
    };
    json!({"type": "object", "required": required, "properties": p})
}

fn body(schema: Value) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema}}})
}

fn answer(description: &str) -> Value {
    json!({"200": {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}})
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
                answer(
                    "status success (output URLs), processing (fetch_result, eta), error or failed",
                ),
            ),
            RouteKind::FetchById => (
                "Fetch a job by the id in the path".into(),
                Some(body(
                    json!({"type": "object", "properties": {"key": string()}}),
                )),
                answer("the job's success, processing or failed body"),
            ),
            RouteKind::FetchByBody => (
                "Fetch a job by request_id".into(),
                Some(body(
                    json!({"type": "object", "required": ["key", "request_id"],
                    "properties": {"key": string(), "request_id": int_or_string("the job id")}}),
                )),
                answer("the job's success, processing or failed body"),
            ),
            RouteKind::Manage(name) => (
                format!("Enterprise management: {name} (admin key)"),
                Some(body(
                    json!({"type": "object", "required": ["key"], "properties": {"key": string()}}),
                )),
                answer("status success or error"),
            ),
            RouteKind::SystemLoad => (
                "Queue length and estimated wait".into(),
                None,
                answer("queue_num, queue_time"),
            ),
            RouteKind::File => (
                "A stored output (PNG, or base64 text)".into(),
                None,
                json!({"200": {"description": "the file"}, "404": {"description": "absent or expired"}}),
            ),
            RouteKind::Health => ("Readiness".into(), None, answer("ok once ready")),
            RouteKind::Metrics => (
                "Prometheus metrics".into(),
                None,
                json!({"200": {"description": "text exposition format"}}),
            ),
            RouteKind::OpenApi => ("This document".into(), None, answer("OpenAPI 3.1")),
            RouteKind::OpenAiGenerations => (
                "OpenAI Images API: generate (Bearer key; model = a Pictor model id)".into(),
                Some(body(json!({"type": "object", "required": ["prompt"], "properties": {
                    "prompt": string(), "model": string(), "n": json!({"type": "integer"}),
                    "size": json!({"type": "string", "description": "WIDTHxHEIGHT or auto"}),
                    "response_format": json!({"type": "string", "enum": ["url", "b64_json"]}),
                    "negative_prompt": string(), "seed": json!({"type": "integer"}),
                    "num_inference_steps": json!({"type": "integer"}),
                    "guidance_scale": json!({"type": "number"})}}))),
                answer("{created, data: [{url | b64_json, revised_prompt}]} or {error}"),
            ),
            RouteKind::OpenAiEdits => (
                "OpenAI Images API: edit an image (multipart; img2img, or InstructPix2Pix for such a model)"
                    .into(),
                Some(json!({"required": true, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "required": ["image", "prompt"], "properties": {
                        "image": {"type": "string", "format": "binary"}, "prompt": string(),
                        "model": string(), "n": string(), "size": string(),
                        "response_format": string(), "strength": string()}}}}})),
                answer("{created, data: [{url | b64_json, revised_prompt}]} or {error}"),
            ),
            RouteKind::OpenAiModels => (
                "OpenAI: the models (Bearer key)".into(),
                None,
                answer("{object: list, data: [{id, object, created, owned_by}]}"),
            ),
            RouteKind::Playground => (
                "The playground page (HTML)".into(),
                None,
                json!({"200": {"description": "text/html"}}),
            ),
            RouteKind::Options => (
                "Models, schedulers, LoRAs and styles for the playground (any key: Bearer, key header or ?key=)"
                    .into(),
                None,
                answer("{models: [{id, kind}], schedulers, loras, styles, default_model, pix2pix_model}"),
            ),
            RouteKind::JobEvents => (
                "A job's progress as Server-Sent Events: `progress` (status, step, steps, progress, eta), then \
                 `done` with the fetch body (owner or admin key: Bearer, key header, or ?key=)"
                    .into(),
                None,
                json!({"200": {"description": "text/event-stream"}}),
            ),
            RouteKind::JobCancel => (
                "Cancel a job (owner or admin key): queued never runs, running stops within a step".into(),
                Some(body(json!({"type": "object", "properties": {"key": string()}}))),
                answer("status success with state dequeued, stopping or finished; or error"),
            ),
            RouteKind::NotYet(what) => (
                format!("Not available on this server: {what}"),
                None,
                answer("status error, with the message"),
            ),
            RouteKind::Sdapi(name) => (
                format!("AUTOMATIC1111 API: {name} (HTTP Basic with the API key as password, or Bearer)"),
                (route.method == "POST").then(|| body(json!({"type": "object"}))),
                answer("as AUTOMATIC1111 answers it"),
            ),
        };
        let mut op = Map::new();
        op.insert("summary".into(), json!(summary));
        if let Some(r) = request {
            op.insert("requestBody".into(), r);
        }
        op.insert("responses".into(), responses);
        let mut parameters = Vec::new();
        if route.path.contains("{id}") {
            parameters.push(json!({"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}));
        }
        if route.path.contains("{*key}") {
            parameters.push(json!({"name": "key", "in": "path", "required": true, "schema": {"type": "string"}}));
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
}
