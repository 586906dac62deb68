//! The AUTOMATIC1111 web UI API (`/sdapi/v1/...`), as its clients (webuiapi, editor plug-ins, chat front ends)
//! call it: synchronous txt2img / img2img answering base64 PNGs, the model, sampler, schedule-type and LoRA
//! lists, options (the current model), progress and interrupt. Authenticated as A1111's `--api-auth` clients
//! send it: HTTP Basic with the API key as the password (or the user name), or `Authorization: Bearer`.

use std::sync::Arc;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::a1111::{self, A1111Error};
use crate::app::App;
use crate::backend::PipelineKind;
use crate::jobs::{failure, JobStatus, CANCELLED};
use crate::keys::Caller;
use crate::responses::ApiError;
use crate::samplers;

/// The A1111 routes under `/sdapi/v1/`: (method, name).
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "txt2img"),
    ("POST", "img2img"),
    ("GET", "sd-models"),
    ("GET", "samplers"),
    ("GET", "schedulers"),
    ("GET", "loras"),
    ("GET", "options"),
    ("POST", "options"),
    ("GET", "progress"),
    ("POST", "interrupt"),
    ("POST", "skip"),
];

fn caller(app: &App, headers: &HeaderMap) -> Result<Caller, A1111Error> {
    Ok(super::auth::caller_from_headers(app, headers)?)
}

/// Dispatches one A1111 route.
pub async fn handle(
    app: Arc<App>,
    method: &'static str,
    name: &'static str,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = match (method, name) {
        ("POST", "txt2img") => generate(&app, PipelineKind::Text2Img, &headers, body).await,
        ("POST", "img2img") => generate(&app, PipelineKind::Img2Img, &headers, body).await,
        ("POST", "options") => set_options(&app, &headers, body).await,
        ("POST", "interrupt") => interrupt(&app, &headers, false).await,
        ("POST", "skip") => interrupt(&app, &headers, true).await,
        ("GET", "progress") => progress(&app, &headers).await,
        ("GET", list) => lists(&app, list, &headers).await,
        _ => Err(ApiError::message(format!("no route {method} /sdapi/v1/{name}")).into()),
    };
    match result {
        Ok(value) => Json(value).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Forgets a request's jobs when it is answered or its client goes away.
struct InFlight<'a> {
    app: &'a App,
    owner: String,
    ids: Vec<i64>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.app.a1111.end(&self.owner, &self.ids);
    }
}

/// The model a caller's requests run on when they name none: the one chosen through `/options`, else the
/// server's default.
fn current_model(app: &App, caller: &Caller) -> Option<String> {
    app.a1111
        .model(&caller.id)
        .or_else(|| app.node.config.default_model.clone())
}

async fn generate(
    app: &Arc<App>,
    kind: PipelineKind,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, A1111Error> {
    let caller = caller(app, headers)?;
    let body = super::auth::read_body(app, body).await?;
    let request = a1111::parse(kind, &body, current_model(app, &caller).as_deref())?;
    if let Some(id) = &request.submissions[0].model_id {
        if !super::generate::models(app)
            .await?
            .iter()
            .any(|m| &m.id == id)
        {
            return Err(ApiError::field(
                "sd_model_checkpoint",
                format!("no model {id:?}; GET /sdapi/v1/sd-models lists them"),
            )
            .into());
        }
    }
    let idempotency = super::auth::idempotency_key(headers)?;
    let mut ids = Vec::with_capacity(request.submissions.len());
    for (i, submission) in request.submissions.iter().enumerate() {
        let mut submission = submission.clone();
        // One job per image: image i of a retried request is the first request's image i.
        submission.delivery.idempotency_key = idempotency.as_ref().map(|k| format!("{k}#{i}"));
        let submission = &submission;
        match super::generate::submit(app, &caller, submission).await {
            Ok(id) => ids.push(id),
            Err(e) => {
                for id in ids {
                    let _ = app.node.jobs.cancel(id, CANCELLED).await;
                }
                return Err(e.into());
            }
        }
    }
    app.a1111.start(&caller.id, &ids);
    let _in_flight = InFlight {
        app,
        owner: caller.id.clone(),
        ids: ids.clone(),
    };

    let mut images = Vec::new();
    let mut seeds = Vec::new();
    let mut infotexts = Vec::new();
    let mut model_id = String::new();
    for id in &ids {
        let job = super::generate::wait_finished(app, *id).await?;
        match job.status {
            JobStatus::Failed if job.error.as_deref() == Some(CANCELLED) => continue,
            JobStatus::Failed => return Err(failure(job.error.as_deref()).into()),
            _ => {}
        }
        let r = &job.spec.request;
        model_id = r.model_id.clone();
        let ran = job.result.as_ref().map(|x| x.scheduler.as_str());
        infotexts.push(crate::infotext::format(
            r,
            ran.or(r.scheduler.as_deref()).unwrap_or_default(),
        ));
        seeds.push(r.seed);
        if request.send_images {
            images.extend(super::generate::outputs_base64(app, &job).await?);
        }
    }
    let info = a1111::info(&request, &model_id, &seeds, &infotexts);
    Ok(json!({
        "images": images,
        "parameters": request.parameters,
        "info": info.to_string(),
    }))
}

/// `POST /sdapi/v1/options`: `sd_model_checkpoint` chooses the caller's model; the other settings are A1111's
/// own and are ignored.
async fn set_options(app: &Arc<App>, headers: &HeaderMap, body: Body) -> Result<Value, A1111Error> {
    let caller = caller(app, headers)?;
    let body = super::auth::read_body(app, body).await?;
    if let Some(title) = body.string(&["sd_model_checkpoint"])? {
        let id = a1111::model_id_of_title(&title);
        let models = super::generate::models(app).await?;
        let model = models.iter().find(|m| m.id == id).ok_or_else(|| {
            ApiError::field(
                "sd_model_checkpoint",
                format!("no model {title:?}; GET /sdapi/v1/sd-models lists them"),
            )
        })?;
        app.a1111.set_model(&caller.id, model.id.clone());
    }
    Ok(Value::Null)
}

/// The GET lists: models, samplers, schedule types, LoRAs, options.
async fn lists(app: &Arc<App>, name: &str, headers: &HeaderMap) -> Result<Value, A1111Error> {
    let caller = caller(app, headers)?;
    Ok(match name {
        "sd-models" => Value::Array(
            super::generate::models(app)
                .await?
                .into_iter()
                .map(|m| {
                    json!({"title": m.id, "model_name": m.id, "hash": null, "sha256": null,
                           "filename": m.id, "config": null})
                })
                .collect(),
        ),
        "samplers" => samplers::a1111_samplers_json(),
        "schedulers" => samplers::a1111_schedules_json(),
        "loras" => {
            let backend = app.node.backend.clone();
            let names = tokio::task::spawn_blocking(move || backend.loras())
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            Value::Array(
                names
                    .into_iter()
                    .map(|n| json!({"name": n, "alias": n, "path": n, "metadata": {}}))
                    .collect(),
            )
        }
        "options" => {
            let model = match current_model(app, &caller) {
                Some(m) => Some(m),
                None => super::generate::models(app)
                    .await?
                    .into_iter()
                    .next()
                    .map(|m| m.id),
            };
            json!({"sd_model_checkpoint": model, "sd_checkpoint_hash": null,
                   "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"})
        }
        other => return Err(ApiError::message(format!("no route GET /sdapi/v1/{other}")).into()),
    })
}

/// `GET /sdapi/v1/progress`: the caller's running request, in A1111's shape.
async fn progress(app: &Arc<App>, headers: &HeaderMap) -> Result<Value, A1111Error> {
    let caller = caller(app, headers)?;
    let ids = app.a1111.jobs(&caller.id);
    let mut current = None;
    let mut finished = 0;
    for id in &ids {
        match app
            .node
            .jobs
            .store()
            .get(*id)
            .await
            .map_err(ApiError::from)?
        {
            Some(job) if job.status.is_final() => finished += 1,
            Some(job) => {
                current = Some(job);
                break;
            }
            None => {}
        }
    }
    let Some(job) = current else {
        return Ok(json!({"progress": 0.0, "eta_relative": 0.0,
            "state": {"skipped": false, "interrupted": false, "job": "", "job_count": 0,
                      "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0},
            "current_image": null, "textinfo": null}));
    };
    let fraction = if job.steps > 0 {
        job.step as f64 / job.steps as f64
    } else {
        0.0
    };
    let progress = (finished as f64 + fraction) / ids.len().max(1) as f64;
    let eta = crate::worker::eta(&app.node, &job).await;
    Ok(json!({"progress": progress, "eta_relative": eta,
        "state": {"skipped": false, "interrupted": false, "job": format!("task({})", job.id),
                  "job_count": ids.len(), "job_timestamp": format!("{}", job.created_at as i64),
                  "job_no": finished, "sampling_step": job.step, "sampling_steps": job.steps},
        "current_image": null, "textinfo": null}))
}

/// `POST /sdapi/v1/interrupt` stops every job of the caller's requests; `/skip` only the current one.
async fn interrupt(
    app: &Arc<App>,
    headers: &HeaderMap,
    only_current: bool,
) -> Result<Value, A1111Error> {
    let caller = caller(app, headers)?;
    for id in app.a1111.jobs(&caller.id) {
        let job = app
            .node
            .jobs
            .store()
            .get(id)
            .await
            .map_err(ApiError::from)?;
        if job.as_ref().is_some_and(|j| j.status.is_final()) {
            continue;
        }
        app.node
            .jobs
            .cancel(id, CANCELLED)
            .await
            .map_err(ApiError::from)?;
        if only_current {
            break;
        }
    }
    Ok(Value::Null)
}
