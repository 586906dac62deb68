//! How many claims and heartbeats per second one job database sustains: N simulated workers (no generation)
//! each claim a job, send `--beats` heartbeats and finish it, until the queue of `--jobs` jobs from
//! `--keys` keys is empty. Run by hand (`scripts/bench_queue.sh` starts a throwaway PostgreSQL):
//!
//! ```sh
//! cargo run --release -p pictor-server --example queue_bench -- \
//!     --database-url postgres://postgres@127.0.0.1:5432/bench --workers 16 --jobs 2000 --beats 3
//! ```
//!
//! Prints one JSON line with the rates.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pictor_server::jobs::service::JobService;
use pictor_server::jobs::{JobResult, Outcome, WorkerInfo};

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url: String = arg("--database-url", String::new());
    anyhow::ensure!(!url.is_empty(), "--database-url is required");
    let workers: usize = arg("--workers", 8);
    let jobs: usize = arg("--jobs", 2000);
    let beats: usize = arg("--beats", 3);
    let keys: usize = arg("--keys", 8);
    let service = Arc::new(JobService::open(&url).await?);
    let store = service.store();

    let spec: pictor_server::jobs::JobSpec = serde_json::from_str(SPEC)?;
    let started = Instant::now();
    for i in 0..jobs {
        store
            .insert(&format!("key-{}", i % keys), &spec, None)
            .await?;
    }
    let insert_secs = started.elapsed().as_secs_f64();

    let claims = Arc::new(AtomicU64::new(0));
    let heartbeats = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let service = service.clone();
        let claims = claims.clone();
        let heartbeats = heartbeats.clone();
        tasks.push(tokio::spawn(async move {
            let info = WorkerInfo {
                name: format!("bench-{w}"),
                group: None,
                loaded_models: vec!["m".into()],
            };
            let lease = Duration::from_secs(30);
            while let Some(job) = service.store().claim(&info, lease).await? {
                claims.fetch_add(1, Ordering::Relaxed);
                for step in 0..beats {
                    service
                        .store()
                        .heartbeat(job.lease(), step as i32, beats as i32, lease)
                        .await?;
                    heartbeats.fetch_add(1, Ordering::Relaxed);
                }
                let result = JobResult {
                    generation_time: 0.0,
                    scheduler: "s".into(),
                    nsfw_content_detected: vec![],
                    notes: vec![],
                    external_urls: vec![],
                };
                service
                    .finish(job.lease(), &Outcome::Success(result))
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let claims = claims.load(Ordering::Relaxed) as f64;
    let heartbeats = heartbeats.load(Ordering::Relaxed) as f64;
    println!(
        "{}",
        serde_json::json!({
            "database": url.split(':').next(),
            "workers": workers,
            "jobs": jobs,
            "keys": keys,
            "beats_per_job": beats,
            "inserts_per_s": (jobs as f64 / insert_secs).round(),
            "claims_per_s": (claims / secs).round(),
            "heartbeats_per_s": (heartbeats / secs).round(),
            "statements_per_s": ((claims * 2.0 + heartbeats) / secs).round(),
            "seconds": (secs * 100.0).round() / 100.0,
        })
    );
    Ok(())
}

/// A stored job's spec (what an img2img request becomes), so the rows are the size real ones are.
const SPEC: &str = r#"{"family":"v6_images","request":{"kind":"img2img","model_id":"m","prompt":"a photograph of an astronaut riding a horse, detailed, sharp focus","negative_prompt":"blurry","width":512,"height":512,"samples":1,"steps":30,"guidance_scale":7.5,"strength":0.7,"image_guidance_scale":1.5,"scheduler":null,"use_karras_sigmas":true,"algorithm_type":null,"seed":1,"clip_skip":1,"loras":[],"vae":null,"embeddings":[],"tomesd":true,"safety_checker":null},"delivery":{"base64":false,"temp":false,"webhook":null,"track_id":null,"instant_response":false},"echo":{"init_image":"base64","safety_checker_type":null,"enhance_prompt":false,"enhance_style":null,"warnings":[]},"file_prefix":"u","init_key":"inputs/u.png","output_keys":["generations/0-u.png"]}"#;
