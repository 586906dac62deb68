//! The embedded job store: one SQLite file in the data folder (WAL journal, so a killed process loses nothing it
//! had committed).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use super::{now, Job, JobResult, JobSpec, JobStatus, JobStore, Outcome, StoreResult};

/// Jobs in a SQLite database.
#[derive(Clone)]
pub struct SqliteJobs {
    pool: SqlitePool,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    spec TEXT NOT NULL,
    result TEXT,
    error TEXT,
    webhook_status TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, id);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, status);
";

fn db_err(e: sqlx::Error) -> String {
    format!("job database: {e}")
}

impl SqliteJobs {
    /// Opens (creating if needed) `path`.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(db_err)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(db_err)?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await.map_err(db_err)?;
        Ok(SqliteJobs { pool })
    }

    fn row_to_job(row: &sqlx::sqlite::SqliteRow) -> StoreResult<Job> {
        let spec: String = row.get("spec");
        let result: Option<String> = row.get("result");
        let status: String = row.get("status");
        Ok(Job {
            id: row.get("id"),
            owner: row.get("owner"),
            status: JobStatus::parse(&status).ok_or_else(|| format!("bad job status {status}"))?,
            spec: serde_json::from_str::<JobSpec>(&spec)
                .map_err(|e| format!("bad job spec: {e}"))?,
            result: result
                .map(|r| serde_json::from_str::<JobResult>(&r))
                .transpose()
                .map_err(|e| format!("bad job result: {e}"))?,
            error: row.get("error"),
            webhook_status: row.get("webhook_status"),
            created_at: row.get("created_at"),
            finished_at: row.get("finished_at"),
        })
    }
}

#[async_trait]
impl JobStore for SqliteJobs {
    async fn insert(&self, owner: &str, spec: &JobSpec) -> StoreResult<i64> {
        let spec = serde_json::to_string(spec).map_err(|e| e.to_string())?;
        let row = sqlx::query(
            "INSERT INTO jobs (owner, status, spec, created_at) VALUES (?, 'queued', ?, ?) RETURNING id",
        )
        .bind(owner)
        .bind(spec)
        .bind(now())
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(row.get(0))
    }

    async fn get(&self, id: i64) -> StoreResult<Option<Job>> {
        let row = sqlx::query("SELECT * FROM jobs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        row.as_ref().map(Self::row_to_job).transpose()
    }

    async fn claim_next(&self) -> StoreResult<Option<Job>> {
        let row = sqlx::query(
            "UPDATE jobs SET status = 'running', started_at = ?
             WHERE id = (SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1)
               AND status = 'queued'
             RETURNING *",
        )
        .bind(now())
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        row.as_ref().map(Self::row_to_job).transpose()
    }

    async fn finish(&self, id: i64, outcome: &Outcome) -> StoreResult<bool> {
        let (status, result, error) = match outcome {
            Outcome::Success(r) => (
                "success",
                Some(serde_json::to_string(r).map_err(|e| e.to_string())?),
                None,
            ),
            Outcome::Failed(m) => ("failed", None, Some(m.clone())),
        };
        let done = sqlx::query(
            "UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ?
             WHERE id = ? AND status = 'running'",
        )
        .bind(status)
        .bind(result)
        .bind(error)
        .bind(now())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_webhook_status(&self, id: i64, status: &str) -> StoreResult<()> {
        sqlx::query("UPDATE jobs SET webhook_status = ? WHERE id = ?")
            .bind(status)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn requeue_running(&self) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE jobs SET status = 'queued', started_at = NULL WHERE status = 'running'",
        )
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    async fn active_for_owner(&self, owner: &str) -> StoreResult<i64> {
        let row = sqlx::query(
            "SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN ('queued', 'running')",
        )
        .bind(owner)
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(row.get(0))
    }

    async fn depth(&self) -> StoreResult<(i64, i64)> {
        let row = sqlx::query(
            "SELECT COALESCE(SUM(status = 'queued'), 0), COALESCE(SUM(status = 'running'), 0)
             FROM jobs WHERE status IN ('queued', 'running')",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        Ok((row.get(0), row.get(1)))
    }

    async fn ahead_of(&self, id: i64) -> StoreResult<i64> {
        let row = sqlx::query("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND id < ?")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(row.get(0))
    }

    async fn fail_queued(&self, message: &str) -> StoreResult<Vec<i64>> {
        let rows = sqlx::query(
            "UPDATE jobs SET status = 'failed', error = ?, finished_at = ?
             WHERE status = 'queued' RETURNING id",
        )
        .bind(message)
        .bind(now())
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn delete_finished_before(&self, before: f64) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM jobs WHERE status IN ('success', 'failed') AND finished_at < ?",
        )
        .bind(before)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{GenerationRequest, PipelineKind};
    use crate::family::Family;

    fn spec() -> JobSpec {
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
            init_key: "inputs/u.png".into(),
            output_keys: vec!["generations/0-u.png".into()],
        }
    }

    #[tokio::test]
    async fn lifecycle_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let store = SqliteJobs::open(&path).await.unwrap();
        let a = store.insert("k", &spec()).await.unwrap();
        let b = store.insert("k", &spec()).await.unwrap();
        assert!(b > a);
        assert_eq!(store.active_for_owner("k").await.unwrap(), 2);
        assert_eq!(store.ahead_of(b).await.unwrap(), 1);
        let claimed = store.claim_next().await.unwrap().unwrap();
        assert_eq!(claimed.id, a);
        assert_eq!(claimed.spec, spec());
        assert_eq!(store.depth().await.unwrap(), (1, 1));
        drop(store);

        // A new process: the running job goes back to the queue, in order.
        let store = SqliteJobs::open(&path).await.unwrap();
        assert_eq!(store.requeue_running().await.unwrap(), 1);
        assert_eq!(store.claim_next().await.unwrap().unwrap().id, a);
        let result = JobResult {
            generation_time: 1.5,
            scheduler: "DDIMScheduler".into(),
            nsfw_content_detected: vec![true],
            notes: vec!["n".into()],
        };
        assert!(store
            .finish(a, &Outcome::Success(result.clone()))
            .await
            .unwrap());
        let job = store.get(a).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Success);
        assert_eq!(job.result, Some(result));
        assert_eq!(store.fail_queued("cleared").await.unwrap(), vec![b]);
        assert_eq!(
            store.get(b).await.unwrap().unwrap().error.as_deref(),
            Some("cleared")
        );
        assert!(store.claim_next().await.unwrap().is_none());
        assert_eq!(store.delete_finished_before(now() + 1.0).await.unwrap(), 2);
        assert!(store.get(a).await.unwrap().is_none());
    }
}
