//! The embedded job store: one SQLite file in the data folder (WAL journal, so a killed process loses nothing it
//! had committed). For one machine: every node of a deployment on several machines shares a PostgreSQL store.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

use super::sql::{job_store, Dialect};
use super::StoreResult;

/// Jobs in a SQLite database.
#[derive(Clone)]
pub struct SqliteJobs {
    pool: SqlitePool,
}

impl SqliteJobs {
    const DIALECT: Dialect = Dialect {
        now: "unixepoch('subsec')",
        // One writer at a time: the claim's transaction is the lock.
        lock: "",
        in_json_list: "j.model_id IN (SELECT value FROM json_each($2))",
        owner_lock: None,
    };

    /// Opens (creating if needed) `path` and brings its schema up to date.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        Ok(SqliteJobs { pool })
    }
}

job_store!(SqliteJobs, sqlx::sqlite::SqliteRow);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::contract::spec;
    use crate::jobs::{JobStatus, JobStore, WorkerInfo};

    /// A database made by the first versions (no migrations table, the old columns) opens, upgrades in place,
    /// and its job left running by a dead process counts as one attempt.
    #[tokio::test]
    async fn upgrades_a_database_of_the_first_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        {
            let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
                .unwrap()
                .create_if_missing(true);
            let pool = SqlitePoolOptions::new()
                .connect_with(options)
                .await
                .unwrap();
            sqlx::raw_sql(include_str!("../../migrations/sqlite/0001_jobs.sql"))
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO jobs (owner, status, spec, created_at) VALUES ('k', 'running', $1, 1.0)",
            )
            .bind(serde_json::to_string(&spec()).unwrap())
            .execute(&pool)
            .await
            .unwrap();
        }
        let store = SqliteJobs::open(&path).await.unwrap();
        let job = store.get(1).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Running);
        assert_eq!(job.attempt, 1);
        assert_eq!(job.spec, spec());
        assert_eq!(store.expire_leases().await.unwrap(), 1);
        assert_eq!(store.reap(3).await.unwrap().requeued, vec![1]);
        let worker = WorkerInfo {
            name: "w".into(),
            ..Default::default()
        };
        let again = store
            .claim(&worker, Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((again.id, again.attempt), (1, 2));
    }
}
