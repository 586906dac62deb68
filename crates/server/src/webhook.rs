//! Webhook delivery: POST the final body to the request's `webhook`, with a timeout; the dispatcher (in
//! [`crate::worker`]) makes one attempt per claim of the delivery from the job store and schedules the next after a
//! backoff that doubles, up to the configured number of attempts. The outcome is what `webhook_status` reports.

use std::time::Duration;

use serde_json::Value;

use crate::net_guard::{self, UrlPolicy};

/// How webhooks are sent.
#[derive(Debug, Clone, Copy)]
pub struct WebhookSettings {
    /// Attempts in all (at least 1).
    pub attempts: u32,
    /// Wait before the first retry; doubled for each further one.
    pub backoff: Duration,
    /// Timeout of one POST.
    pub timeout: Duration,
    /// Which addresses may be reached.
    pub policy: UrlPolicy,
}

/// `webhook_status` after a delivery that a receiver acknowledged with 2xx.
pub const DELIVERED: &str = "success";
/// `webhook_status` after every attempt failed.
pub const FAILED: &str = "failed";

/// What one delivery attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The receiver acknowledged it with 2xx.
    Delivered,
    /// It failed in a way a later attempt may not (timeout, network error, non-2xx answer).
    Retry,
    /// It can never succeed (the URL is malformed or not allowed).
    Refused,
}

impl WebhookSettings {
    /// The wait before retry number `attempt` + 1, after `attempt` failed ones (the backoff doubles each time).
    pub fn backoff_after(&self, attempt: u32) -> Duration {
        self.backoff * 2u32.saturating_pow(attempt.saturating_sub(1).min(16))
    }
}

/// Sends `payload` to `url` once.
pub async fn attempt(url: &str, payload: &Value, settings: WebhookSettings) -> Attempt {
    match net_guard::post_json(url, payload, settings.policy, settings.timeout).await {
        Ok(_) => Attempt::Delivered,
        Err(e @ (net_guard::NetError::BadUrl(_) | net_guard::NetError::Refused(_))) => {
            tracing::warn!(error = %e, "webhook address refused");
            Attempt::Refused
        }
        Err(e) => {
            tracing::warn!(error = %e, "webhook attempt failed");
            Attempt::Retry
        }
    }
}

/// Sends `payload` to `url` with the retries and backoff of `settings`, in this task (for notices that are not
/// job results, such as a finished `load_model`); returns the status reached.
pub async fn deliver(url: &str, payload: &Value, settings: WebhookSettings) -> &'static str {
    for made in 1..=settings.attempts.max(1) {
        match attempt(url, payload, settings).await {
            Attempt::Delivered => return DELIVERED,
            Attempt::Refused => return FAILED,
            Attempt::Retry if made < settings.attempts => {
                tokio::time::sleep(settings.backoff_after(made)).await
            }
            Attempt::Retry => {}
        }
    }
    FAILED
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles() {
        let settings = WebhookSettings {
            attempts: 4,
            backoff: Duration::from_secs(2),
            timeout: Duration::from_secs(30),
            policy: UrlPolicy {
                allow_private: false,
            },
        };
        let waits: Vec<u64> = (1..=4)
            .map(|n| settings.backoff_after(n).as_secs())
            .collect();
        assert_eq!(waits, [2, 4, 8, 16]);
        assert_eq!(settings.backoff_after(100), Duration::from_secs(2 << 16));
    }
}
