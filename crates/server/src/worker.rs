//! Workers take queued jobs one at a time, run them on the backend in a blocking thread, store the outputs,
//! record the outcome and post the webhook. The sweeper deletes expired temp files and old jobs.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::app::App;
use crate::backend::{BackendError, JobControl};
use crate::jobs::{Job, JobResult, Outcome};
use crate::render;
use crate::webhook;

/// A job being generated: its cancel flag and step timing.
pub struct Running {
    cancel: AtomicBool,
    steps_done: AtomicUsize,
    last_step: Mutex<Instant>,
    model: String,
    app: Arc<App>,
}

impl Running {
    /// Asks the job to stop at its next step.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Steps finished so far.
    pub fn steps_done(&self) -> usize {
        self.steps_done.load(Ordering::Relaxed)
    }
}

impl JobControl for Running {
    fn on_step(&self, done: usize, _total: usize) {
        let now = Instant::now();
        let elapsed = {
            let mut last = self.last_step.lock().expect("step clock");
            let e = now - *last;
            *last = now;
            e
        };
        self.steps_done.store(done, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        self.app
            .metrics
            .step_seconds
            .with_label_values(&[&self.model])
            .observe(secs);
        self.app.clock.lock().expect("clock").record(secs);
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// A running average of seconds per denoising step, for `eta`.
#[derive(Debug, Default)]
pub struct StepClock {
    seconds_per_step: Option<f64>,
}

impl StepClock {
    /// Folds in one step's duration.
    pub fn record(&mut self, secs: f64) {
        self.seconds_per_step = Some(match self.seconds_per_step {
            None => secs,
            Some(avg) => avg * 0.8 + secs * 0.2,
        });
    }

    /// Estimated seconds for `steps` steps (one second per step until something was measured).
    pub fn estimate(&self, steps: f64) -> f64 {
        (self.seconds_per_step.unwrap_or(1.0) * steps * 100.0).round() / 100.0
    }
}

/// Steps assumed per waiting job when estimating a queue's wait (the img2img default).
const STEPS_PER_JOB: i64 = 30;

/// Seconds until `jobs` waiting or running jobs are likely done (for `system_load` / `system_details`).
pub fn queue_seconds(app: &App, jobs: i64) -> f64 {
    app.clock
        .lock()
        .expect("clock")
        .estimate((jobs * STEPS_PER_JOB) as f64)
}

/// Seconds until `job` is likely done: the jobs ahead of it plus itself.
pub async fn eta(app: &App, job: &Job) -> f64 {
    let ahead = app.jobs.ahead_of(job.id).await.unwrap_or(0) as f64;
    let own = job.spec.request.steps as f64 * job.spec.request.samples as f64;
    let done = app
        .running
        .lock()
        .expect("running")
        .get(&job.id)
        .map(|r| r.steps_done() as f64)
        .unwrap_or(0.0);
    let steps = (ahead + 1.0) * own - done * job.spec.request.samples as f64;
    app.clock.lock().expect("clock").estimate(steps.max(0.0))
}

/// One worker: runs jobs until the process ends.
pub async fn work(app: Arc<App>, n: usize) {
    tracing::debug!(worker = n, "worker started");
    loop {
        match app.jobs.claim_next().await {
            Ok(Some(job)) => run(&app, job).await,
            Ok(None) => {
                tokio::select! {
                    _ = app.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the job queue");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

async fn run(app: &Arc<App>, job: Job) {
    let id = job.id;
    let started = Instant::now();
    tracing::info!(job = id, family = job.spec.family.label(), model = %job.spec.request.model_id, "job started");
    let outcome = match generate(app, &job).await {
        Ok(result) => Outcome::Success(result),
        Err(message) => Outcome::Failed(message),
    };
    app.running.lock().expect("running").remove(&id);
    let label = match &outcome {
        Outcome::Success(_) => "success",
        Outcome::Failed(_) => "failed",
    };
    app.metrics
        .job_seconds
        .with_label_values(&[label])
        .observe(started.elapsed().as_secs_f64());
    match app.jobs.finish(id, &outcome).await {
        Ok(true) => {}
        Ok(false) => tracing::info!(job = id, "job was cancelled while running"),
        Err(e) => tracing::error!(job = id, error = %e, "cannot record the job's outcome"),
    }
    if let Outcome::Failed(m) = &outcome {
        tracing::warn!(job = id, error = %m, "job failed");
    } else {
        tracing::info!(
            job = id,
            seconds = started.elapsed().as_secs_f64(),
            "job finished"
        );
    }
    let _ = app.finished.send(id);
    notify_webhook(app, id).await;
}

/// Posts the webhook of finished job `id`, if it asked for one, in the background.
pub async fn notify_webhook(app: &Arc<App>, id: i64) {
    let Ok(Some(job)) = app.jobs.get(id).await else {
        return;
    };
    let Some(url) = job.spec.delivery.webhook.clone() else {
        return;
    };
    let app = app.clone();
    tokio::spawn(async move {
        let payload = render::webhook_payload(&job, app.storage.as_ref());
        let status = webhook::deliver(&url, &payload, app.webhook_settings()).await;
        if let Err(e) = app.jobs.set_webhook_status(id, status).await {
            tracing::error!(job = id, error = %e, "cannot record the webhook status");
        }
    });
}

async fn generate(app: &Arc<App>, job: &Job) -> Result<JobResult, String> {
    let init = app
        .storage
        .get(&job.spec.init_key)
        .await?
        .ok_or_else(|| "the stored init image is missing".to_string())?;
    let running = Arc::new(Running {
        cancel: AtomicBool::new(false),
        steps_done: AtomicUsize::new(0),
        last_step: Mutex::new(Instant::now()),
        model: job.spec.request.model_id.clone(),
        app: app.clone(),
    });
    app.running
        .lock()
        .expect("running")
        .insert(job.id, running.clone());
    let backend = app.backend.clone();
    let request = job.spec.request.clone();
    let generated =
        tokio::task::spawn_blocking(move || backend.generate(&request, &init, running.as_ref()))
            .await
            .map_err(|e| format!("the generation crashed: {e}"))?
            .map_err(|e| match e {
                BackendError::Cancelled => "Cancelled: the queue was cleared".to_string(),
                other => other.to_string(),
            })?;
    if generated.png_images.len() != job.spec.output_keys.len() {
        return Err(format!(
            "the backend returned {} images for {} samples",
            generated.png_images.len(),
            job.spec.output_keys.len()
        ));
    }
    for (png, key) in generated.png_images.into_iter().zip(&job.spec.output_keys) {
        let bytes = if job.spec.delivery.base64 {
            base64::engine::general_purpose::STANDARD
                .encode(png)
                .into_bytes()
        } else {
            png
        };
        app.storage.put(key, bytes).await?;
    }
    Ok(JobResult {
        generation_time: (generated.generation_time * 1000.0).round() / 1000.0,
        scheduler: generated.scheduler,
        nsfw_content_detected: generated.nsfw_content_detected,
        notes: generated.notes,
    })
}

/// Deletes expired temp files and jobs past retention, every `sweep_interval`.
pub async fn sweep(app: Arc<App>) {
    loop {
        tokio::time::sleep(app.config.sweep_interval).await;
        match app.storage.older_than("temp/", app.config.temp_ttl).await {
            Ok(keys) => {
                for key in keys {
                    if let Err(e) = app.storage.delete(&key).await {
                        tracing::warn!(key, error = %e, "cannot delete an expired temp file");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list temp files"),
        }
        let before = crate::jobs::now() - app.config.retention.as_secs_f64();
        match app.jobs.delete_finished_before(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "old jobs deleted"),
            Err(e) => tracing::warn!(error = %e, "cannot delete old jobs"),
        }
    }
}
