//! Webhook delivery: POST the final body to the request's `webhook`, with a timeout and a bounded number of
//! retries spaced by exponential backoff. The outcome is what `webhook_status` reports.

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

/// Sends `payload` to `url`; returns the `webhook_status` to record.
pub async fn deliver(url: &str, payload: &Value, settings: WebhookSettings) -> &'static str {
    let mut wait = settings.backoff;
    for attempt in 1..=settings.attempts.max(1) {
        match net_guard::post_json(url, payload, settings.policy, settings.timeout).await {
            Ok(_) => {
                tracing::info!(attempt, "webhook delivered");
                return DELIVERED;
            }
            Err(e @ (net_guard::NetError::BadUrl(_) | net_guard::NetError::Refused(_))) => {
                tracing::warn!(error = %e, "webhook address refused");
                return FAILED;
            }
            Err(e) => {
                tracing::warn!(attempt, error = %e, "webhook attempt failed");
                if attempt < settings.attempts {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
    }
    FAILED
}
