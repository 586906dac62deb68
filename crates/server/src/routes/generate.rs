//! The generation routes of every family: check, store the job, wait up to `--sync-timeout` for it, answer.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::app::App;
use crate::backend::{ModelInfo, PipelineKind};
use crate::family::Family;
use crate::init_image;
use crate::jobs::{Inserted, Job, JobSpec, JobStatus};
use crate::keys::Caller;
use crate::net_guard;
use crate::render;
use crate::request::{self, Defaults, Submission};
use crate::responses::ApiError;
use crate::worker;

/// `POST` of a generation route of `family` running `kind`.
pub async fn handle(
    app: Arc<App>,
    family: Family,
    kind: PipelineKind,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match accept(&app, family, kind, &headers, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn accept(
    app: &Arc<App>,
    family: Family,
    kind: PipelineKind,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = super::auth::read_body(app, body).await?;
    let caller = super::auth::caller(app, &body, headers)?;
    let mut submission = request::parse(family, kind, &body)?;
    if let Some(key) = super::auth::idempotency_key(headers)? {
        submission.delivery.idempotency_key = Some(key);
    }
    let id = submit(app, &caller, &submission).await?;

    let wait = if submission.delivery.instant_response {
        Duration::ZERO
    } else {
        app.node.config.sync_timeout
    };
    let job = app
        .node
        .jobs
        .wait_final(id, wait)
        .await?
        .ok_or_else(|| ApiError::Internal(format!("job {id} vanished")))?;
    Ok(answer(app, &job).await)
}

/// Queues `submission` for `caller`, whatever dialect it came in: the queue limit, the webhook's address, the
/// model, the scheduler, the init image (fetched or decoded, then stored) and the backend's own checks; then
/// the job. Returns its id.
pub(crate) async fn submit(
    app: &Arc<App>,
    caller: &Caller,
    submission: &Submission,
) -> Result<i64, ApiError> {
    let family = submission.family;
    // Nothing is accepted that could not be stored (a retry of an accepted request is refused too: it can come
    // back for its job once there is room).
    app.node.disk.check().map_err(ApiError::Unavailable)?;
    // A cheap early refusal, before any image is read; the insert enforces the limit exactly. (Not for a request
    // with an idempotency key: a retry of an accepted one gets its job even when the queue is full.)
    let active = app.node.jobs.store().active_for_owner(&caller.id).await?;
    if submission.delivery.idempotency_key.is_none()
        && active as usize >= app.node.config.max_queued_per_key
    {
        return Err(ApiError::QueueFull {
            limit: app.node.config.max_queued_per_key,
        });
    }

    if let Some(hook) = &submission.delivery.webhook {
        let url =
            net_guard::parse_url(hook).map_err(|e| ApiError::field("webhook", e.to_string()))?;
        net_guard::resolve_checked(&url, app.node.url_policy())
            .await
            .map_err(|e| ApiError::field("webhook", e.to_string()))?;
    }

    let backend = app.node.backend.clone();
    let (models, schedulers) =
        tokio::task::spawn_blocking(move || (backend.models(), backend.schedulers()))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
    let models = models.map_err(|e| ApiError::Internal(e.to_string()))?;
    let defaults = Defaults {
        default_model: app.node.config.default_model.clone(),
        pix2pix_model: app.node.config.pix2pix_model.clone(),
    };
    let model_id = match request::choose_model(submission, &models, &defaults) {
        Ok(id) => id,
        // Another node may have published it: look (at most every few seconds) and decide again if anything
        // arrived.
        Err(e) => {
            if !app.node.pull_models(false).await {
                return Err(e);
            }
            let models = self::models(app).await?;
            request::choose_model(submission, &models, &defaults).map_err(|_| e)?
        }
    };
    if let Some(name) = &submission.scheduler {
        if !schedulers.iter().any(|s| s == name) {
            return Err(ApiError::field(
                "scheduler",
                format!(
                    "unknown scheduler {name:?}; one of: {}",
                    schedulers.join(", ")
                ),
            ));
        }
    }

    let init = match &submission.init_image {
        Some(source) => Some(
            init_image::resolve(
                source,
                app.node.url_policy(),
                app.node.download_limits(),
                app.node.config.max_image_pixels,
                &app.node.decode_budget,
            )
            .await?,
        ),
        None => None,
    };
    let seed = submission
        .seed
        .unwrap_or_else(|| rand::random::<u32>() as u64);
    let generation = request::finish(
        submission,
        model_id,
        init.as_ref().map(|i| (i.width, i.height)),
        seed,
    );
    let backend = app.node.backend.clone();
    let checked = generation.clone();
    tokio::task::spawn_blocking(move || backend.check(&checked))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;

    let file_prefix = uuid::Uuid::new_v4().to_string();
    let init_key = match init {
        Some(init) => {
            let key = format!("inputs/{file_prefix}.{}", init.format);
            app.node
                .storage
                .put(&key, init.bytes)
                .await
                .map_err(ApiError::Internal)?;
            Some(key)
        }
        None => None,
    };
    let folder = if submission.delivery.temp {
        "temp"
    } else {
        "generations"
    };
    let extension = if submission.delivery.base64 {
        "base64"
    } else {
        "png"
    };
    let output_keys = (0..generation.samples as usize)
        .map(|i| {
            format!(
                "{folder}/{}.{extension}",
                family.output_name(&file_prefix, i)
            )
        })
        .collect();
    let spec = JobSpec {
        family,
        request: generation,
        delivery: submission.delivery.clone(),
        echo: submission.echo.clone(),
        file_prefix,
        init_key,
        output_keys,
    };

    // A key bound to a worker group keeps its jobs there unless the request asks for the load balancer.
    let group = caller
        .group
        .as_deref()
        .filter(|_| !submission.delivery.loadbalancer);
    let limit = app.node.config.max_queued_per_key;
    let inserted = app
        .node
        .jobs
        .submit(&caller.id, &spec, group, limit)
        .await?;
    if !matches!(inserted, Inserted::New(_)) {
        // A retry of an accepted request, or others of this key were accepted while this one was being read
        // (the limit holds at the insert too): this request's stored init image is not needed.
        if let Some(key) = &spec.init_key {
            let _ = app.node.storage.delete(key).await;
        }
    }
    match inserted {
        Inserted::New(id) => {
            tracing::info!(job = id, family = family.label(), "job queued");
            Ok(id)
        }
        Inserted::Existing(id) => {
            tracing::info!(job = id, "a retry answered with its first job");
            Ok(id)
        }
        Inserted::Full => Err(ApiError::QueueFull { limit }),
    }
}

/// Every model the backend has (read on a blocking thread).
pub(crate) async fn models(app: &Arc<App>) -> Result<Vec<ModelInfo>, ApiError> {
    let backend = app.node.backend.clone();
    tokio::task::spawn_blocking(move || backend.models())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// How long a synchronous dialect (AUTOMATIC1111, OpenAI) waits for a job.
const MAX_SYNC_WAIT: Duration = Duration::from_secs(6 * 3600);

/// Waits for job `id` to finish, for the synchronous dialects: the finished job (success or failure).
pub(crate) async fn wait_finished(app: &Arc<App>, id: i64) -> Result<Job, ApiError> {
    let job = app
        .node
        .jobs
        .wait_final(id, MAX_SYNC_WAIT)
        .await?
        .ok_or_else(|| ApiError::Internal(format!("job {id} vanished")))?;
    if !job.status.is_final() {
        return Err(ApiError::Internal(format!(
            "job {id} did not finish in time"
        )));
    }
    Ok(job)
}

/// A finished job's output files as base64, for the dialects that answer with the images.
pub(crate) async fn outputs_base64(app: &Arc<App>, job: &Job) -> Result<Vec<String>, ApiError> {
    use base64::Engine as _;
    let mut images = Vec::with_capacity(job.spec.output_keys.len());
    for key in &job.spec.output_keys {
        let png = app
            .node
            .storage
            .get(key)
            .await
            .map_err(ApiError::Internal)?
            .ok_or_else(|| ApiError::Internal(format!("output {key} is missing")))?;
        images.push(base64::engine::general_purpose::STANDARD.encode(png));
    }
    Ok(images)
}

/// The body for a job just submitted.
async fn answer(app: &Arc<App>, job: &Job) -> Response {
    let body = match job.status {
        JobStatus::Success => render::success(job, app.node.storage.as_ref()),
        JobStatus::Failed => render::failed(job),
        JobStatus::Queued | JobStatus::Running => {
            let eta = worker::eta(&app.node, job).await;
            render::processing(
                job,
                app.node.storage.as_ref(),
                &app.node.config.public_url,
                eta,
            )
        }
    };
    Json(body).into_response()
}
