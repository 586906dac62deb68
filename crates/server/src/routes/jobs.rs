//! Per-job routes for any client: a live progress stream (`GET /api/v1/jobs/{id}/events`, Server-Sent Events)
//! and cancel (`POST /api/v1/jobs/{id}/cancel`), for the job's owner or an admin. Both go through the job
//! store, so they work for jobs running on any machine.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde_json::json;

use crate::app::App;
use crate::jobs::{Cancelled, Job, JobStatus, CANCELLED};
use crate::keys::Caller;
use crate::render;
use crate::responses::ApiError;
use crate::worker;

/// How often the stream looks at the job.
const POLL: Duration = Duration::from_millis(250);

/// The job `raw_id`, if `caller` may see it; the API's not-found error otherwise (also for another key's job).
async fn owned_job(app: &App, caller: &Caller, raw_id: &str) -> Result<Job, ApiError> {
    let id: i64 = raw_id
        .trim()
        .parse()
        .map_err(|_| ApiError::field("id", format!("{raw_id:?} is not a job id")))?;
    let job = app.node.jobs.store().get(id).await?;
    job.filter(|j| caller.admin || j.owner == caller.id)
        .ok_or_else(|| {
            ApiError::message(format!(
                "Request not found: {id} (unknown, made with another key, or older than the retention period)"
            ))
        })
}

/// `GET /api/v1/jobs/{id}/events`: a `progress` event whenever the job's state or step changes (`status`,
/// `step`, `steps`, `progress` 0–1, `eta` seconds), then one `done` event carrying what fetch answers, and the
/// stream ends. The key may also come as `?key=` (browsers' EventSource cannot set headers).
pub async fn events(
    app: Arc<App>,
    raw_id: String,
    query_key: Option<String>,
    headers: HeaderMap,
) -> Response {
    let caller = super::auth::caller_from_query_or_headers(&app, query_key.as_deref(), &headers);
    let job = match caller {
        Ok(caller) => owned_job(&app, &caller, &raw_id).await,
        Err(e) => Err(e),
    };
    match job {
        Ok(job) => Sse::new(progress_stream(app, job.id))
            .keep_alive(KeepAlive::default())
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// What the stream remembers between looks at the job.
struct Watch {
    app: Arc<App>,
    id: i64,
    last: Option<(JobStatus, i32)>,
    finished: bool,
}

fn progress_stream(app: Arc<App>, id: i64) -> impl Stream<Item = Result<Event, Infallible>> {
    let watch = Watch {
        app,
        id,
        last: None,
        finished: false,
    };
    stream::unfold(watch, |mut w| async move {
        if w.finished {
            return None;
        }
        loop {
            let job = match w.app.node.jobs.store().get(w.id).await {
                Ok(Some(job)) => job,
                Ok(None) => {
                    w.finished = true;
                    let event = Event::default()
                        .event("error")
                        .data(json!({"message": "the job is gone"}).to_string());
                    return Some((Ok(event), w));
                }
                // The store is unreachable for now: look again.
                Err(_) => {
                    tokio::time::sleep(POLL).await;
                    continue;
                }
            };
            let eta = worker::eta(&w.app.node, &job).await;
            if job.status.is_final() {
                w.finished = true;
                let body = render::fetch(
                    &job,
                    w.app.node.storage.as_ref(),
                    &w.app.node.config.public_url,
                    eta,
                );
                return Some((Ok(Event::default().event("done").data(body.to_string())), w));
            }
            let now = (job.status, job.step);
            if w.last != Some(now) {
                w.last = Some(now);
                let progress = if job.steps > 0 {
                    job.step as f64 / job.steps as f64
                } else {
                    0.0
                };
                let data = json!({"id": job.id, "status": job.status.as_str(), "step": job.step,
                                  "steps": job.steps, "progress": progress, "eta": eta});
                return Some((
                    Ok(Event::default().event("progress").data(data.to_string())),
                    w,
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    })
}

/// `POST /api/v1/jobs/{id}/cancel`: a queued job never runs, a running one stops within a step; either then
/// fetches as `failed` with the message "Cancelled" (and its webhook says so).
pub async fn cancel(app: Arc<App>, raw_id: String, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let body = super::auth::read_body(&app, body).await?;
        let caller = super::auth::caller(&app, &body, &headers)?;
        let job = owned_job(&app, &caller, &raw_id).await?;
        let outcome = app.node.jobs.cancel(job.id, CANCELLED).await?;
        let (state, message) = match outcome {
            Cancelled::Dequeued => ("dequeued", "the job was queued; it will not run"),
            Cancelled::Stopping => ("stopping", "the job is running; it stops at its next step"),
            Cancelled::AlreadyFinished => ("finished", "the job had already finished"),
            Cancelled::NotFound => {
                return Err(ApiError::message(format!("Request not found: {}", job.id)))
            }
        };
        app.node.metrics.cancels.with_label_values(&[state]).inc();
        Ok(json!({"status": "success", "id": job.id, "state": state, "message": message}))
    };
    match result.await {
        Ok(body) => Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}
