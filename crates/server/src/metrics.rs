//! Prometheus metrics: requests, queue depth, job and step durations. Served at `GET /metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The service's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route and HTTP status.
    pub requests: IntCounterVec,
    /// Jobs by state (`queued`, `running`), refreshed when scraped.
    pub queue: IntGaugeVec,
    /// Seconds per job by outcome.
    pub job_seconds: HistogramVec,
    /// Seconds per denoising step by model.
    pub step_seconds: HistogramVec,
    /// Cancel requests by what they did (`dequeued`, `stopping`, `finished`).
    pub cancels: IntCounterVec,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "pictor_http_requests_total",
                "HTTP requests by route and status",
            ),
            &["route", "status"],
        )
        .expect("valid metric");
        let queue = IntGaugeVec::new(
            Opts::new("pictor_jobs", "Jobs waiting or running"),
            &["state"],
        )
        .expect("valid metric");
        let job_seconds = HistogramVec::new(
            HistogramOpts::new("pictor_job_duration_seconds", "Job duration by outcome").buckets(
                vec![
                    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                ],
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let step_seconds = HistogramVec::new(
            HistogramOpts::new("pictor_step_duration_seconds", "Denoising step duration")
                .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
            &["model"],
        )
        .expect("valid metric");
        let cancels = IntCounterVec::new(
            Opts::new(
                "pictor_job_cancels_total",
                "Per-job cancels by what they did",
            ),
            &["result"],
        )
        .expect("valid metric");
        for m in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(queue.clone()),
            Box::new(job_seconds.clone()),
            Box::new(step_seconds.clone()),
            Box::new(cancels.clone()),
        ] {
            registry.register(m).expect("unique metric");
        }
        Metrics {
            registry,
            requests,
            queue,
            job_seconds,
            step_seconds,
            cancels,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding");
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
