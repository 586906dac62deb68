//! The shared job store: PostgreSQL, for deployments of several API and worker nodes. Claims lock with
//! `FOR UPDATE SKIP LOCKED`, every time is the database's clock, and a trigger announces queued, finished and
//! cancelled jobs on the `pictor_jobs` channel, which [`PostgresJobs::listen`] turns into local [`Signals`].

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};

use super::service::Signals;
use super::sql::{job_store, Dialect};
use super::StoreResult;

/// Jobs in a PostgreSQL database.
#[derive(Clone)]
pub struct PostgresJobs {
    pool: PgPool,
}

/// The notification channel the trigger writes to.
const CHANNEL: &str = "pictor_jobs";

impl PostgresJobs {
    const DIALECT: Dialect = Dialect {
        now: "pictor_now()",
        lock: "FOR UPDATE OF j SKIP LOCKED",
        in_json_list: "j.model_id IN (SELECT jsonb_array_elements_text($2::jsonb))",
        owner_lock: Some("SELECT pg_advisory_xact_lock(hashtext($1))"),
    };

    /// Connects to `url` and brings the schema up to date (migrations are embedded; concurrent starts
    /// serialise on the migrator's lock).
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(PostgresJobs { pool })
    }

    /// Forwards the database's notifications into `signals` until the process ends. Notifications sent while
    /// the connection is down are lost: every waiter also polls, so they only make things faster.
    pub fn listen(&self, signals: Arc<Signals>) {
        let pool = self.pool.clone();
        tokio::spawn(async move {
            loop {
                match PgListener::connect_with(&pool).await {
                    Ok(mut listener) => {
                        if let Err(e) = listener.listen(CHANNEL).await {
                            tracing::warn!(error = %e, "cannot LISTEN for job notifications");
                        } else {
                            loop {
                                match listener.try_recv().await {
                                    Ok(Some(n)) => signals.announce(n.payload()),
                                    // The connection was lost and is re-established by the next call;
                                    // whatever happened meanwhile is found by polling.
                                    Ok(None) => signals.announce_all(),
                                    Err(e) => {
                                        tracing::warn!(error = %e, "job notifications interrupted");
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot connect for job notifications"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}

job_store!(PostgresJobs, sqlx::postgres::PgRow);
