//! Workers claim jobs under a lease, run them on the backend in a blocking thread, store the outputs and record
//! the outcome through the job service. While a job runs, a heartbeat extends its lease every third of it, carries
//! its progress and brings back the cancel flag (a cancel announced in this process or by the database arrives
//! at once). Beside the workers run the reaper (re-queues jobs whose worker vanished), the webhook dispatcher
//! (sends due webhooks, at least once), the worker report (for `system_details`) and the sweeper (one node at
//! a time).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::backend::{BackendError, JobControl};
use crate::jobs::{Beat, Job, JobResult, Lease, Outcome, WorkerInfo};
use crate::node::Node;
use crate::render;
use crate::webhook;

/// A job being generated: its cancel flag and progress.
pub struct Running {
    cancel: AtomicBool,
    steps_done: AtomicUsize,
    steps_total: AtomicUsize,
    last_step: Mutex<Instant>,
    /// Woken at every step, so that progress reaches the job store (and the progress streams) soon.
    stepped: tokio::sync::Notify,
    model: String,
    node: Arc<Node>,
}

/// Progress is written to the job store at most this often (besides the lease's own heartbeats).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(300);

impl Running {
    /// Asks the job to stop at its next step.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// (steps done, steps in all) so far.
    pub fn progress(&self) -> (usize, usize) {
        (
            self.steps_done.load(Ordering::Relaxed),
            self.steps_total.load(Ordering::Relaxed),
        )
    }
}

impl JobControl for Running {
    fn on_step(&self, done: usize, total: usize) {
        let now = Instant::now();
        let elapsed = {
            let mut last = self.last_step.lock().expect("step clock");
            let e = now - *last;
            *last = now;
            e
        };
        self.steps_done.store(done, Ordering::Relaxed);
        self.steps_total.store(total, Ordering::Relaxed);
        self.stepped.notify_one();
        let secs = elapsed.as_secs_f64();
        self.node
            .metrics
            .step_seconds
            .with_label_values(&[&self.model])
            .observe(secs);
        self.node.clock.lock().expect("clock").record(secs);
        if !self.node.config.step_delay.is_zero() {
            std::thread::sleep(self.node.config.step_delay);
            *self.last_step.lock().expect("step clock") = Instant::now();
        }
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

    /// The average so far.
    pub fn seconds_per_step(&self) -> Option<f64> {
        self.seconds_per_step
    }
}

/// Seconds per denoising step for estimates: this process's own measurement, else (on an API node) the average
/// the live workers report.
pub async fn seconds_per_step(node: &Node) -> Option<f64> {
    if let Some(own) = node.clock.lock().expect("clock").seconds_per_step() {
        return Some(own);
    }
    let workers = node.jobs.store().live_workers(LIVE_WITHIN).await.ok()?;
    let rates: Vec<f64> = workers.iter().filter_map(|w| w.seconds_per_step).collect();
    (!rates.is_empty()).then(|| rates.iter().sum::<f64>() / rates.len() as f64)
}

/// Estimated seconds for `steps` steps at `rate` seconds each (one second per step until something was measured).
fn estimate(rate: Option<f64>, steps: f64) -> f64 {
    (rate.unwrap_or(1.0) * steps * 100.0).round() / 100.0
}

/// Steps assumed per waiting job when estimating a queue's wait (the img2img default).
const STEPS_PER_JOB: i64 = 30;

/// Seconds until `jobs` waiting or running jobs are likely done (for `system_load` / `system_details`).
pub async fn queue_seconds(node: &Node, jobs: i64) -> f64 {
    estimate(seconds_per_step(node).await, (jobs * STEPS_PER_JOB) as f64)
}

/// Seconds until `job` is likely done: the jobs ahead of it plus itself, less the steps its worker reported.
pub async fn eta(node: &Node, job: &Job) -> f64 {
    let ahead = node.jobs.store().ahead_of(job.id).await.unwrap_or(0) as f64;
    let own = job.spec.request.steps as f64 * job.spec.request.samples as f64;
    let done = if job.steps > 0 {
        own * job.step as f64 / job.steps as f64
    } else {
        0.0
    };
    let steps = (ahead + 1.0) * own - done;
    estimate(seconds_per_step(node).await, steps.max(0.0))
}

/// What this worker tells the store about itself now.
async fn worker_info(node: &Node, n: usize) -> WorkerInfo {
    let backend = node.backend.clone();
    let loaded_models = tokio::task::spawn_blocking(move || backend.system().loaded_models)
        .await
        .unwrap_or_default();
    WorkerInfo {
        name: format!("{}/{n}", node.name),
        group: node.config.server_name.clone(),
        loaded_models,
    }
}

/// One worker: claims and runs jobs until the process ends.
pub async fn work(node: Arc<Node>, n: usize) {
    tracing::debug!(worker = n, "worker started");
    loop {
        // A nearly full disk: starting a job would only fail it (its outputs cannot be stored) or leave its outcome
        // unrecordable. Queued jobs wait in the store until there is room again.
        if node.disk.check().is_err() {
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        let info = worker_info(&node, n).await;
        match node.jobs.store().claim(&info, node.config.lease).await {
            Ok(Some(job)) => run(&node, job).await,
            Ok(None) => node.jobs.signals().next_queued().await,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the job queue");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

async fn run(node: &Arc<Node>, job: Job) {
    let lease = job.lease();
    let started = Instant::now();
    tracing::info!(job = lease.id, attempt = lease.attempt, family = job.spec.family.label(),
        model = %job.spec.request.model_id, "job started");
    let running = Arc::new(Running {
        cancel: AtomicBool::new(false),
        steps_done: AtomicUsize::new(0),
        steps_total: AtomicUsize::new(0),
        last_step: Mutex::new(Instant::now()),
        stepped: tokio::sync::Notify::new(),
        model: job.spec.request.model_id.clone(),
        node: node.clone(),
    });
    let lost = Arc::new(AtomicBool::new(false));
    node.busy.fetch_add(1, Ordering::Relaxed);
    let heartbeat = tokio::spawn(keep_lease(
        node.clone(),
        lease,
        running.clone(),
        lost.clone(),
    ));
    let outcome = match generate(node, &job, running).await {
        Ok(result) => Outcome::Success(result),
        Err(message) => Outcome::Failed(message),
    };
    heartbeat.abort();
    node.busy.fetch_sub(1, Ordering::Relaxed);
    let label = match &outcome {
        Outcome::Success(_) => "success",
        Outcome::Failed(_) => "failed",
    };
    node.metrics
        .job_seconds
        .with_label_values(&[label])
        .observe(started.elapsed().as_secs_f64());
    if lost.load(Ordering::Relaxed) {
        tracing::warn!(
            job = lease.id,
            attempt = lease.attempt,
            "the job's lease was lost; its outcome is not recorded"
        );
        return;
    }
    // The database may be restarting, locked or out of disk: keep trying while it says "not now", so that the
    // work is not lost to a re-run (if the lease ran out meanwhile and the job was queued again, the store answers
    // `false` once it can answer at all). Other errors are tried while the lease would still hold.
    let deadline = Instant::now() + node.config.lease;
    let mut pause = Duration::from_millis(500);
    loop {
        match node.jobs.finish(lease, &outcome).await {
            Ok(true) => {
                // The job is over for good: nothing reads its init image again.
                let deleted = match &job.spec.init_key {
                    Some(key) => node.storage.delete(key).await,
                    None => Ok(()),
                };
                if let Err(e) = deleted {
                    tracing::warn!(job = lease.id, error = %e, "cannot delete the job's init image");
                }
                break;
            }
            Ok(false) => {
                tracing::warn!(job = lease.id, "the job's lease ended before it finished");
                break;
            }
            Err(e) if e.is_transient() || Instant::now() < deadline => {
                tracing::warn!(job = lease.id, error = %e, "cannot record the job's outcome yet; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(8));
            }
            Err(e) => {
                tracing::error!(job = lease.id, error = %e, "cannot record the job's outcome");
                break;
            }
        }
    }
    match &outcome {
        Outcome::Failed(m) => tracing::warn!(job = lease.id, error = %m, "job failed"),
        Outcome::Success(_) => tracing::info!(
            job = lease.id,
            seconds = started.elapsed().as_secs_f64(),
            "job finished"
        ),
    }
}

/// Extends `lease` every third of its length with the job's progress, until aborted; stops the job when a cancel
/// arrives (announced, or seen in the heartbeat's answer) or the lease is lost.
async fn keep_lease(node: Arc<Node>, lease: Lease, running: Arc<Running>, lost: Arc<AtomicBool>) {
    let mut cancels = node.jobs.signals().cancels();
    let period = node.config.lease / 3;
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    let mut last_beat = Instant::now();
    loop {
        tokio::select! {
            announced = cancels.recv() => {
                if matches!(announced, Ok(id) if id == lease.id) {
                    running.cancel();
                }
                continue;
            }
            _ = tick.tick() => {}
            _ = running.stepped.notified() => {
                let since = last_beat.elapsed();
                if since < PROGRESS_INTERVAL {
                    tokio::time::sleep(PROGRESS_INTERVAL - since).await;
                }
            }
        }
        last_beat = Instant::now();
        let (done, total) = running.progress();
        match node
            .jobs
            .store()
            .heartbeat(lease, done as i32, total as i32, node.config.lease)
            .await
        {
            Ok(Beat::Held { cancel }) => {
                if cancel {
                    running.cancel();
                }
            }
            Ok(Beat::Lost) => {
                lost.store(true, Ordering::Relaxed);
                running.cancel();
                return;
            }
            // The database is unreachable: keep generating; if the lease runs out meanwhile, the next beat
            // says so and the result is dropped.
            Err(e) => tracing::warn!(job = lease.id, error = %e, "heartbeat failed"),
        }
    }
}

async fn generate(node: &Arc<Node>, job: &Job, running: Arc<Running>) -> Result<JobResult, String> {
    node.pull_models_for(&job.spec.request.model_id).await;
    let init = match &job.spec.init_key {
        Some(key) => Some(
            node.storage
                .get(key)
                .await?
                .ok_or_else(|| "the stored init image is missing".to_string())?,
        ),
        None => None,
    };
    let backend = node.backend.clone();
    let request = job.spec.request.clone();
    let generated = tokio::task::spawn_blocking(move || {
        backend.generate(&request, init.as_deref(), running.as_ref())
    })
    .await
    .map_err(|e| format!("the generation crashed: {e}"))?
    .map_err(|e| match e {
        BackendError::Cancelled => crate::jobs::CANCELLED.to_string(),
        BackendError::Invalid { field, message } => {
            crate::jobs::invalid_request_failure(&field, &message)
        }
        BackendError::ModelNotFound(id) => {
            crate::jobs::invalid_request_failure("model_id", &format!("Model id not found: {id}"))
        }
        other => other.to_string(),
    })?;
    if generated.png_images.len() != job.spec.output_keys.len() {
        return Err(format!(
            "the backend returned {} images for {} samples",
            generated.png_images.len(),
            job.spec.output_keys.len()
        ));
    }
    let mut notes = generated.notes;
    let destination = destination_of(node, job, &mut notes).await;
    let mut copies = Vec::new();
    for (png, key) in generated.png_images.into_iter().zip(&job.spec.output_keys) {
        let bytes = if job.spec.delivery.base64 {
            base64::engine::general_purpose::STANDARD
                .encode(png)
                .into_bytes()
        } else {
            png
        };
        if destination.is_some() {
            copies.push((key.rsplit('/').next().unwrap_or(key), bytes.clone()));
        }
        node.storage.put(key, bytes).await?;
    }
    let external_urls = match destination {
        Some(d) => d.write_all(copies).await.unwrap_or_else(|e| {
            tracing::warn!(job = job.id, error = %e, "cannot write to the key's S3 bucket");
            notes.push(format!(
                "the results were not written to your S3 bucket ({e}); they are served by this server"
            ));
            Vec::new()
        }),
        None => Vec::new(),
    };
    Ok(JobResult {
        generation_time: (generated.generation_time * 1000.0).round() / 1000.0,
        scheduler: generated.scheduler,
        nsfw_content_detected: generated.nsfw_content_detected,
        notes,
        external_urls,
    })
}

/// The key's own bucket for the job's deploy type (`update_s3`), if it set one; a setting that cannot be read
/// becomes a note instead.
async fn destination_of(
    node: &Node,
    job: &Job,
    notes: &mut Vec<String>,
) -> Option<crate::destination::S3Destination> {
    let deploy = crate::destination::deploy_type_of(job.spec.family);
    let settings = match node.jobs.store().destination(&job.owner, deploy).await {
        Ok(settings) => settings?,
        Err(e) => {
            notes.push(format!(
                "the results were not written to your S3 bucket: {e}"
            ));
            return None;
        }
    };
    match serde_json::from_str(&settings) {
        Ok(d) => Some(d),
        Err(e) => {
            notes.push(format!(
                "your S3 settings are unreadable ({e}): set them again with update_s3"
            ));
            None
        }
    }
}

/// Puts jobs whose worker stopped renewing its lease back in the queue (or fails them after
/// `--max-attempts`), every half lease.
pub async fn reap(node: Arc<Node>) {
    loop {
        match node.jobs.reap(node.config.max_attempts).await {
            Ok(reaped) => {
                if !reaped.requeued.is_empty() {
                    tracing::warn!(jobs = ?reaped.requeued, "jobs whose worker stopped answering were queued again");
                }
                if !reaped.failed.is_empty() {
                    tracing::warn!(jobs = ?reaped.failed, "jobs abandoned after their last attempt");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot reap expired leases"),
        }
        tokio::time::sleep(node.config.lease / 2).await;
    }
}

/// Webhook deliveries sent at once by one node.
const PARALLEL_WEBHOOKS: usize = 16;

/// Sends due webhooks until the process ends, one attempt per claim: a delivery is held in the store for as long
/// as one attempt can take; if this node dies meanwhile, another sends it when the hold ends (at least once).
/// A failed attempt is scheduled again after the doubling backoff, until `--webhook-attempts` were made.
pub async fn dispatch_webhooks(node: Arc<Node>) {
    let hold = node.webhook_settings().timeout + Duration::from_secs(10);
    let slots = Arc::new(tokio::sync::Semaphore::new(PARALLEL_WEBHOOKS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match node.jobs.store().claim_webhook(hold).await {
            Ok(Some(job)) => {
                let node = node.clone();
                tokio::spawn(async move {
                    send_webhook(&node, &job).await;
                    drop(permit);
                });
            }
            Ok(None) => node.jobs.signals().next_webhook().await,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read due webhooks");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

async fn send_webhook(node: &Node, job: &Job) {
    let settings = node.webhook_settings();
    let attempt = match &job.spec.delivery.webhook {
        Some(url) => {
            let payload = render::webhook_payload(job, node.storage.as_ref());
            webhook::attempt(url, &payload, settings).await
        }
        None => webhook::Attempt::Refused,
    };
    let made = job.webhook_attempts.max(1) as u32;
    let recorded = match attempt {
        webhook::Attempt::Delivered => {
            tracing::info!(job = job.id, attempt = made, "webhook delivered");
            node.jobs
                .store()
                .set_webhook_status(job.id, webhook::DELIVERED)
                .await
        }
        webhook::Attempt::Retry if made < settings.attempts => {
            node.jobs
                .store()
                .retry_webhook(job.id, settings.backoff_after(made))
                .await
        }
        webhook::Attempt::Retry | webhook::Attempt::Refused => {
            tracing::warn!(job = job.id, attempts = made, "webhook not delivered");
            node.jobs
                .store()
                .set_webhook_status(job.id, webhook::FAILED)
                .await
        }
    };
    if let Err(e) = recorded {
        tracing::error!(job = job.id, error = %e, "cannot record the webhook's progress");
    }
}

/// How often a node reports its workers for `system_details`.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);
/// A worker counts as live while its last report is this recent (three missed reports and it is gone).
pub const LIVE_WITHIN: Duration = Duration::from_secs(15);

/// Reports this node's workers to the store every [`REPORT_EVERY`].
pub async fn report(node: Arc<Node>) {
    loop {
        let info = WorkerInfo {
            name: node.name.clone(),
            ..worker_info(&node, 0).await
        };
        let per_step = node.clock.lock().expect("clock").seconds_per_step();
        let busy = node.busy.load(Ordering::Relaxed);
        if let Err(e) = node.jobs.store().worker_seen(&info, busy, per_step).await {
            tracing::warn!(error = %e, "cannot report this worker");
        }
        tokio::time::sleep(REPORT_EVERY).await;
    }
}

/// Deletes the stored files under `prefix` older than `age`.
async fn delete_older_than(node: &Node, prefix: &str, age: Duration) {
    match node.storage.older_than(prefix, age).await {
        Ok(keys) => {
            for key in keys {
                if let Err(e) = node.storage.delete(&key).await {
                    tracing::warn!(key, error = %e, "cannot delete an expired file");
                }
            }
        }
        Err(e) => tracing::warn!(prefix, error = %e, "cannot list stored files"),
    }
}

/// Deletes expired temp files, jobs past retention and init images older than retention (a finished job's is
/// deleted when it finishes; these are those of jobs cancelled or abandoned), every `sweep_interval`, on one
/// node at a time.
pub async fn sweep(node: Arc<Node>) {
    loop {
        tokio::time::sleep(node.config.sweep_interval).await;
        let term = node.config.sweep_interval * 2;
        match node.jobs.store().lead("sweeper", &node.name, term).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot take the sweeper's turn");
                continue;
            }
        }
        delete_older_than(&node, "temp/", node.config.temp_ttl).await;
        delete_older_than(&node, "inputs/", node.config.retention).await;
        let before = crate::jobs::now() - node.config.retention.as_secs_f64();
        match node.jobs.store().delete_finished_before(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "old jobs deleted"),
            Err(e) => tracing::warn!(error = %e, "cannot delete old jobs"),
        }
    }
}
