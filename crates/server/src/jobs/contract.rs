//! The contract every [`JobStore`] keeps, run against each implementation: SQLite in a temporary folder and
//! PostgreSQL in a fresh database of the server `PICTOR_TEST_DATABASE_URL` names (`pictor_testkit`; the tests
//! fail rather than skip without it, so a green run always covered both).

use std::sync::Arc;
use std::time::Duration;

use super::postgres::PostgresJobs;
use super::sqlite::SqliteJobs;
use super::*;
use crate::backend::{GenerationRequest, PipelineKind};
use crate::family::Family;

/// A job spec with every field set.
pub fn spec() -> JobSpec {
    JobSpec {
        family: Family::V6Images,
        request: GenerationRequest {
            kind: PipelineKind::Img2Img,
            model_id: "m".into(),
            prompt: "p".into(),
            negative_prompt: String::new(),
            width: 64,
            height: 64,
            samples: 1,
            steps: 2,
            guidance_scale: 7.5,
            strength: 0.7,
            image_guidance_scale: 1.5,
            scheduler: None,
            use_karras_sigmas: true,
            algorithm_type: None,
            seed: 1,
            clip_skip: 1,
            loras: vec![crate::backend::LoraChoice {
                name: "style".into(),
                strength: 0.8,
            }],
            vae: Some("v".into()),
            embeddings: vec!["e".into()],
            tomesd: true,
            safety_checker: Some(crate::backend::SafetyReplacement::Pixelate),
        },
        delivery: Default::default(),
        echo: Default::default(),
        file_prefix: "u".into(),
        init_key: Some("inputs/u.png".into()),
        output_keys: vec!["generations/0-u.png".into()],
    }
}

/// A spec for `model` with a webhook when `hook`.
fn spec_for(model: &str, hook: bool) -> JobSpec {
    let mut s = spec();
    s.request.model_id = model.into();
    if hook {
        s.delivery.webhook = Some("http://127.0.0.1:9/hook".into());
    }
    s
}

fn worker(name: &str) -> WorkerInfo {
    WorkerInfo {
        name: name.into(),
        ..Default::default()
    }
}

const LONG: Duration = Duration::from_secs(60);

/// Lets a zero-length lease (or hold, or term) end: the stores' clocks count in milliseconds.
async fn pass_time() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

async fn lifecycle(store: Arc<dyn JobStore>) {
    let a = store.insert("k", &spec(), None).await.unwrap();
    let b = store.insert("k", &spec(), None).await.unwrap();
    assert!(b > a);
    assert_eq!(store.active_for_owner("k").await.unwrap(), 2);
    assert_eq!(store.active_for_owner("other").await.unwrap(), 0);
    assert_eq!(store.ahead_of(b).await.unwrap(), 1);
    let queued = store.get(a).await.unwrap().unwrap();
    assert_eq!((queued.status, queued.attempt), (JobStatus::Queued, 0));
    assert_eq!(queued.spec, spec());

    let job = store.claim(&worker("w1"), LONG).await.unwrap().unwrap();
    assert_eq!(
        (job.id, job.status, job.attempt),
        (a, JobStatus::Running, 1)
    );
    assert_eq!(job.worker.as_deref(), Some("w1"));
    assert_eq!(store.depth().await.unwrap(), (1, 1));
    assert_eq!(
        store.heartbeat(job.lease(), 3, 10, LONG).await.unwrap(),
        Beat::Held { cancel: false }
    );
    let seen = store.get(a).await.unwrap().unwrap();
    assert_eq!((seen.step, seen.steps), (3, 10));

    let result = JobResult {
        generation_time: 1.5,
        scheduler: "DDIMScheduler".into(),
        nsfw_content_detected: vec![true],
        notes: vec!["n".into()],
        external_urls: vec!["https://cdn.example/0-u.png".into()],
    };
    assert!(store
        .finish(job.lease(), &Outcome::Success(result.clone()))
        .await
        .unwrap());
    let done = store.get(a).await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Success);
    assert_eq!(done.result, Some(result.clone()));
    assert!(done.finished_at.is_some());
    assert_eq!(done.webhook_status, "", "no webhook was asked for");
    // A second finish of the same lease changes nothing.
    assert!(!store
        .finish(job.lease(), &Outcome::Failed("late".into()))
        .await
        .unwrap());
    assert_eq!(store.get(a).await.unwrap().unwrap().result, Some(result));
    assert_eq!(
        store.heartbeat(job.lease(), 4, 10, LONG).await.unwrap(),
        Beat::Lost
    );

    assert!(store.get(b + 1000).await.unwrap().is_none());
    assert_eq!(store.delete_finished_before(now() + 5.0).await.unwrap(), 1);
    assert!(store.get(a).await.unwrap().is_none());
    assert!(
        store.get(b).await.unwrap().is_some(),
        "unfinished jobs stay"
    );
}

async fn expired_leases_are_fenced(store: Arc<dyn JobStore>) {
    let id = store.insert("k", &spec(), None).await.unwrap();
    let first = store
        .claim(&worker("w1"), Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    pass_time().await;
    assert_eq!(
        store.reap(3).await.unwrap(),
        Reaped {
            requeued: vec![id],
            failed: vec![]
        }
    );
    assert_eq!(
        store.get(id).await.unwrap().unwrap().status,
        JobStatus::Queued
    );
    let second = store.claim(&worker("w2"), LONG).await.unwrap().unwrap();
    assert_eq!((second.id, second.attempt), (id, 2));
    // The first worker comes back: its heartbeat and its result are refused.
    assert_eq!(
        store.heartbeat(first.lease(), 5, 5, LONG).await.unwrap(),
        Beat::Lost
    );
    assert!(!store
        .finish(first.lease(), &Outcome::Failed("stale".into()))
        .await
        .unwrap());
    assert_eq!(
        store.get(id).await.unwrap().unwrap().status,
        JobStatus::Running
    );
    // A held lease is not reaped.
    assert_eq!(store.reap(3).await.unwrap(), Reaped::default());
    assert!(store
        .finish(second.lease(), &Outcome::Failed("real".into()))
        .await
        .unwrap());
    let job = store.get(id).await.unwrap().unwrap();
    assert_eq!(job.error.as_deref(), Some("real"));
    assert_eq!(job.worker.as_deref(), Some("w2"));
}

async fn attempts_are_bounded(store: Arc<dyn JobStore>) {
    let id = store.insert("k", &spec_for("m", true), None).await.unwrap();
    assert_eq!(
        store.get(id).await.unwrap().unwrap().webhook_status,
        "waiting"
    );
    for attempt in 1..=2 {
        let job = store
            .claim(&worker("w"), Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(job.attempt, attempt);
        pass_time().await;
        assert_eq!(
            store.reap(2).await.unwrap().requeued.len(),
            usize::from(attempt < 2)
        );
    }
    let job = store.get(id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    assert!(job.error.unwrap().contains("abandoned"));
    assert_eq!(job.webhook_status, "pending", "its webhook says it failed");
    assert!(store.claim(&worker("w"), LONG).await.unwrap().is_none());
}

async fn keys_take_turns(store: Arc<dyn JobStore>) {
    let mut ids = std::collections::HashMap::new();
    for (key, n) in [("a", 3), ("b", 2), ("c", 1)] {
        for i in 0..n {
            ids.insert(
                store.insert(key, &spec(), None).await.unwrap(),
                format!("{key}{i}"),
            );
        }
    }
    let mut order = Vec::new();
    while let Some(job) = store.claim(&worker("w"), LONG).await.unwrap() {
        order.push(ids[&job.id].clone());
    }
    assert_eq!(order, ["a0", "b0", "c0", "a1", "b1", "a2"]);
}

async fn loaded_models_are_preferred_within_a_turn(store: Arc<dyn JobStore>) {
    let cold = store
        .insert("k", &spec_for("cold", false), None)
        .await
        .unwrap();
    let warm = store
        .insert("k", &spec_for("warm", false), None)
        .await
        .unwrap();
    let mut w = worker("w");
    w.loaded_models = vec!["warm".into(), "other".into()];
    assert_eq!(store.claim(&w, LONG).await.unwrap().unwrap().id, warm);
    assert_eq!(store.claim(&w, LONG).await.unwrap().unwrap().id, cold);
}

async fn pinned_jobs_wait_for_their_group(store: Arc<dyn JobStore>) {
    let pinned = store.insert("k", &spec(), Some("gpu-a")).await.unwrap();
    assert_eq!(
        store
            .get(pinned)
            .await
            .unwrap()
            .unwrap()
            .pinned_group
            .as_deref(),
        Some("gpu-a")
    );
    assert!(store
        .claim(&worker("anywhere"), LONG)
        .await
        .unwrap()
        .is_none());
    let mut other = worker("b");
    other.group = Some("gpu-b".into());
    assert!(store.claim(&other, LONG).await.unwrap().is_none());
    let free = store.insert("k", &spec(), None).await.unwrap();
    assert_eq!(store.claim(&other, LONG).await.unwrap().unwrap().id, free);
    let mut mine = worker("a");
    mine.group = Some("gpu-a".into());
    assert_eq!(store.claim(&mine, LONG).await.unwrap().unwrap().id, pinned);
}

async fn cancels(store: Arc<dyn JobStore>) {
    let queued = store.insert("k", &spec_for("m", true), None).await.unwrap();
    let running = store.insert("k", &spec(), None).await.unwrap();
    assert_eq!(
        store
            .cancel(queued, "Cancelled by its owner")
            .await
            .unwrap(),
        Cancelled::Dequeued
    );
    let job = store.get(queued).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.error.as_deref(), Some("Cancelled by its owner"));
    assert_eq!(job.webhook_status, "pending");

    let claimed = store.claim(&worker("w"), LONG).await.unwrap().unwrap();
    assert_eq!(claimed.id, running, "a cancelled job never runs");
    assert_eq!(
        store
            .cancel(running, "Cancelled by its owner")
            .await
            .unwrap(),
        Cancelled::Stopping
    );
    assert!(store.get(running).await.unwrap().unwrap().cancel_requested);
    assert_eq!(
        store.heartbeat(claimed.lease(), 1, 10, LONG).await.unwrap(),
        Beat::Held { cancel: true }
    );
    assert!(store
        .finish(claimed.lease(), &Outcome::Failed("Cancelled".into()))
        .await
        .unwrap());
    let job = store.get(running).await.unwrap().unwrap();
    assert_eq!(
        job.error.as_deref(),
        Some("Cancelled by its owner"),
        "the cancel's reason is kept"
    );
    assert_eq!(
        store.cancel(running, "again").await.unwrap(),
        Cancelled::AlreadyFinished
    );
    assert_eq!(
        store.cancel(running + 1000, "x").await.unwrap(),
        Cancelled::NotFound
    );

    let q = store.insert("k", &spec(), None).await.unwrap();
    let r = store.insert("k", &spec(), None).await.unwrap();
    let r_job = store.claim(&worker("w"), LONG).await.unwrap().unwrap();
    assert_eq!(r_job.id, q);
    assert_eq!(
        store.cancel_all("cleared").await.unwrap(),
        (vec![r], vec![q])
    );
    // A cancelled job whose worker died is failed by the reaper, not queued again.
    let dead = store.insert("k", &spec(), None).await.unwrap();
    let dead_job = store
        .claim(&worker("w"), Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead_job.id, dead);
    store.cancel(dead, "stop").await.unwrap();
    pass_time().await;
    let reaped = store.reap(3).await.unwrap();
    assert!(reaped.failed.contains(&dead), "{reaped:?}");
    assert_eq!(
        store.get(dead).await.unwrap().unwrap().error.as_deref(),
        Some("stop")
    );
}

/// The attempt number of the webhook delivery taken now (one is due).
async fn next_webhook_attempt(store: &dyn JobStore) -> i32 {
    let job = store.claim_webhook(LONG).await.unwrap();
    job.expect("a delivery is due").webhook_attempts
}

async fn webhooks_are_delivered_at_least_once(store: Arc<dyn JobStore>) {
    let id = store.insert("k", &spec_for("m", true), None).await.unwrap();
    assert!(
        store.claim_webhook(LONG).await.unwrap().is_none(),
        "not before it finishes"
    );
    let job = store.claim(&worker("w"), LONG).await.unwrap().unwrap();
    assert!(store
        .finish(job.lease(), &Outcome::Failed("x".into()))
        .await
        .unwrap());
    // Held by a node that then dies: nobody else takes it until the hold ends, then someone does.
    let held = store.claim_webhook(Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(held.id, id);
    pass_time().await;
    let again = store.claim_webhook(LONG).await.unwrap().unwrap();
    assert_eq!((again.id, again.webhook_attempts), (id, 2));
    assert!(store.claim_webhook(LONG).await.unwrap().is_none());
    // A failed attempt is scheduled again after its backoff.
    store.retry_webhook(id, LONG).await.unwrap();
    assert!(store.claim_webhook(LONG).await.unwrap().is_none());
    store.retry_webhook(id, Duration::ZERO).await.unwrap();
    pass_time().await;
    assert_eq!(next_webhook_attempt(store.as_ref()).await, 3);
    // A single process starting again releases the holds its dead predecessor left.
    assert!(store.claim_webhook(LONG).await.unwrap().is_none());
    store.expire_leases().await.unwrap();
    pass_time().await;
    assert_eq!(next_webhook_attempt(store.as_ref()).await, 4);
    // Not deleted while its delivery is pending.
    assert_eq!(store.delete_finished_before(now() + 5.0).await.unwrap(), 0);
    store.set_webhook_status(id, "success").await.unwrap();
    assert_eq!(
        store.get(id).await.unwrap().unwrap().webhook_status,
        "success"
    );
    assert!(store.claim_webhook(Duration::ZERO).await.unwrap().is_none());
    assert_eq!(store.delete_finished_before(now() + 5.0).await.unwrap(), 1);
}

async fn workers_and_leaders(store: Arc<dyn JobStore>) {
    let mut w = worker("gpu-1");
    w.group = Some("g".into());
    w.loaded_models = vec!["m".into()];
    store.worker_seen(&w, 1, Some(0.5)).await.unwrap();
    store.worker_seen(&worker("gpu-2"), 0, None).await.unwrap();
    let live = store.live_workers(LONG).await.unwrap();
    assert_eq!(live.len(), 2);
    assert_eq!(live[0].name, "gpu-1");
    assert_eq!(live[0].group.as_deref(), Some("g"));
    assert_eq!(live[0].models, vec!["m".to_string()]);
    assert_eq!((live[0].running, live[0].seconds_per_step), (1, Some(0.5)));
    assert_eq!(live[1].seconds_per_step, None);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(store
        .live_workers(Duration::from_millis(5))
        .await
        .unwrap()
        .is_empty());

    assert!(store.lead("sweeper", "a", LONG).await.unwrap());
    assert!(!store.lead("sweeper", "b", LONG).await.unwrap());
    assert!(
        store.lead("sweeper", "a", LONG).await.unwrap(),
        "renews its own term"
    );
    assert!(store.lead("other", "b", LONG).await.unwrap());
    assert!(store.lead("sweeper", "a", Duration::ZERO).await.unwrap());
    pass_time().await;
    assert!(
        store.lead("sweeper", "b", LONG).await.unwrap(),
        "takes over an ended term"
    );
}

async fn concurrent_claims_take_each_job_once(store: Arc<dyn JobStore>) {
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(
            store
                .insert(&format!("k{}", i % 4), &spec(), None)
                .await
                .unwrap(),
        );
    }
    let mut tasks = Vec::new();
    for w in 0..6 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(job) = store.claim(&worker(&format!("w{w}")), LONG).await.unwrap() {
                mine.push(job.id);
            }
            mine
        }));
    }
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    claimed.sort_unstable();
    assert_eq!(claimed, ids);
}

async fn sqlite() -> (Arc<dyn JobStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteJobs::open(&dir.path().join("jobs.db")).await.unwrap();
    (Arc::new(store), dir)
}

async fn postgres() -> (Arc<dyn JobStore>, ()) {
    let store = PostgresJobs::connect(&pictor_testkit::fresh_postgres_database().await)
        .await
        .unwrap();
    (Arc::new(store), ())
}

macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (store, _dir) = super::sqlite().await;
                    super::$case(store).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (store, ()) = super::postgres().await;
                    super::$case(store).await;
                }
            )*
        }
    };
}

async fn the_per_key_limit_holds_under_concurrency(store: Arc<dyn JobStore>) {
    let new = |i: Inserted| matches!(i, Inserted::New(_));
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.insert_within("k", &spec(), None, 10).await.unwrap()
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        let inserted = t.await.unwrap();
        assert!(matches!(inserted, Inserted::New(_) | Inserted::Full));
        accepted += usize::from(new(inserted));
    }
    assert_eq!(accepted, 10);
    assert_eq!(store.active_for_owner("k").await.unwrap(), 10);
    assert!(new(store
        .insert_within("other", &spec(), None, 10)
        .await
        .unwrap()));
    // A finished job frees its place.
    let job = store.claim(&worker("w"), LONG).await.unwrap().unwrap();
    assert_eq!(
        store
            .insert_within(&job.owner, &spec(), None, 10)
            .await
            .unwrap(),
        Inserted::Full
    );
    store
        .finish(job.lease(), &Outcome::Failed("x".into()))
        .await
        .unwrap();
    assert!(new(store
        .insert_within(&job.owner, &spec(), None, 10)
        .await
        .unwrap()));
}

/// A request's retries (the same idempotency key from the same owner) get its first job, also when they race
/// and when the owner's queue is full; another owner's key of the same text is its own.
async fn retries_with_an_idempotency_key_get_the_first_job(store: Arc<dyn JobStore>) {
    let keyed = |key: &str| {
        let mut s = spec();
        s.delivery.idempotency_key = Some(key.into());
        s
    };
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let store = store.clone();
        let spec = keyed("retry-1");
        tasks.push(tokio::spawn(async move {
            store.insert_within("k", &spec, None, 10).await.unwrap()
        }));
    }
    let mut new = Vec::new();
    let mut existing = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Inserted::New(id) => new.push(id),
            Inserted::Existing(id) => existing.push(id),
            Inserted::Full => panic!("a retry was refused as a full queue"),
        }
    }
    assert_eq!(new.len(), 1, "{new:?}");
    assert!(existing.iter().all(|id| *id == new[0]), "{existing:?}");
    assert_eq!(store.active_for_owner("k").await.unwrap(), 1);
    // Another owner, the same text: its own job. Another key: a new job.
    let other = store
        .insert_within("k2", &keyed("retry-1"), None, 10)
        .await
        .unwrap();
    assert!(matches!(other, Inserted::New(id) if id != new[0]));
    assert!(matches!(
        store
            .insert_within("k", &keyed("retry-2"), None, 10)
            .await
            .unwrap(),
        Inserted::New(_)
    ));
    // With the queue full, a retry still gets its job; a new request does not.
    assert_eq!(
        store
            .insert_within("k", &keyed("retry-1"), None, 2)
            .await
            .unwrap(),
        Inserted::Existing(new[0])
    );
    assert_eq!(
        store
            .insert_within("k", &keyed("retry-3"), None, 2)
            .await
            .unwrap(),
        Inserted::Full
    );
}

contract!(
    the_per_key_limit_holds_under_concurrency,
    retries_with_an_idempotency_key_get_the_first_job,
    lifecycle,
    expired_leases_are_fenced,
    attempts_are_bounded,
    keys_take_turns,
    loaded_models_are_preferred_within_a_turn,
    pinned_jobs_wait_for_their_group,
    cancels,
    webhooks_are_delivered_at_least_once,
    workers_and_leaders,
    concurrent_claims_take_each_job_once,
);
