//! The settler: a background task that learns the results of Apollo's asynchronous jobs.
//!
//! For each pending charge it polls `GET /api/v1/webhook_result/{job_id}` (free) first at
//! `started_at + settle.first_poll`, then as Apollo says: `404 result_pending` honours
//! `retry_after_seconds`, a 429 honours `retry-after`, 5xx answers, timeouts and transport
//! errors back off (doubling from 1 s, capped at 5 minutes). `404 request_id_unknown`,
//! `410 request_id_expired` and `400 invalid_request_id` are terminal: the estimate is recorded,
//! with `error` saying why. Past `settle.max_wait` the estimate is recorded too.
//!
//! Each poll is an ordinary call through the proxy's own upstream client, metered like the
//! reconcile polls: a `calls` row (table `_creditmeter`, workflow `settle`, endpoint
//! `webhook_result`, priced 0). The key goes out in `X-Api-Key` and nowhere else: not in logs,
//! not in the ledger (only its `key_fp`). Polls run one at a time; nothing here holds a lock
//! any proxied call waits on.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, RETRY_AFTER};
use http_body_util::{BodyExt, Full, Limited};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Book, RESULT_PATH, SETTLE_WORKFLOW};
use crate::attribution::{Attribution, KeyFingerprinter};
use crate::catalog::RequestParams;
use crate::ledger::Outcome;
use crate::meter::{
    now_ms, record_and_wait as record, CallContext, CallMeter, Captured, Meter, RequestIds,
    POLLER_TABLE,
};
use crate::upstream::{error_chain, Upstream};

/// Every `result` label of `creditmeter_settle_polls_total`.
pub const POLL_RESULTS: [&str; 5] = ["done", "pending", "rate_limited", "terminal", "error"];
/// The first back-off after a failed poll; it doubles per failure.
const BACKOFF_BASE_MS: i64 = 1_000;
/// The longest back-off.
const BACKOFF_MAX_MS: i64 = 5 * 60_000;
/// No charge is polled again sooner than this, whatever Apollo says (`retry_after_seconds: 0`).
pub(super) const MIN_POLL_GAP_MS: i64 = 200;
/// The longest `retry_after_seconds` / `retry-after` honoured; past it the deadline decides.
const MAX_RETRY_AFTER_MS: i64 = 3_600_000;
/// The longest a result answer may be (ten people with their numbers is a few KiB).
const MAX_ANSWER_BYTES: usize = 16 << 20;
/// The settler wakes at least this often, whatever is pending.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// The pause after `failures` failed polls in a row.
pub(super) fn backoff_ms(failures: u32) -> i64 {
    BACKOFF_BASE_MS
        .saturating_mul(1_i64 << failures.saturating_sub(1).min(16))
        .min(BACKOFF_MAX_MS)
}

/// Everything the settler needs. Built in `run()`, moved into its task.
pub struct Settler {
    pub book: Arc<Book>,
    /// The proxy's upstream client (a clone shares its pool).
    pub upstream: Upstream,
    pub meter: Arc<Meter>,
    /// The catalog in force classifies the poll calls.
    pub proxy_settings: Arc<crate::settings::SettingsCell>,
    pub fingerprints: KeyFingerprinter,
    pub ids: RequestIds,
    /// The polling key (`settle.api_key_env`). Never logged.
    pub api_key: String,
    pub api_key_env: String,
    /// `upstream.timeout`, for one whole poll.
    pub timeout: Duration,
}

/// Apollo's error answer of `webhook_result`.
#[derive(Deserialize, Default)]
struct ErrorAnswer {
    error_code: Option<String>,
    retry_after_seconds: Option<f64>,
}

/// What one poll found.
enum Polled {
    Done(Bytes),
    Pending(Option<i64>),
    Terminal(String),
    RateLimited(Option<i64>),
    Failed(String),
}

impl Settler {
    /// Settles charges until `stop`; a poll in flight is abandoned (and recorded) on `hard_stop`.
    pub async fn run(self, stop: CancellationToken, hard_stop: CancellationToken) {
        tracing::info!(
            key_env = %self.api_key_env,
            pending = self.book.len(),
            "settle: polling Apollo's webhook_result for deferred charges (phone reveals, waterfalls)"
        );
        loop {
            let woken = self.book.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let now = now_ms();
            let plan = self.book.plan(now);
            for p in plan.expired {
                let why = format!(
                    "settle.max_wait passed (the call started {} s ago) before Apollo's result could be learned, so the catalog's estimate is recorded",
                    (now - p.original.started_at) / 1000
                );
                self.book.settle_estimated(p, why);
            }
            for (request_id, job_id) in &plan.due {
                if stop.is_cancelled() {
                    break;
                }
                let polled = tokio::select! {
                    _ = hard_stop.cancelled() => return,
                    p = self.poll(job_id) => p,
                };
                self.handle(request_id, job_id, polled);
            }
            if stop.is_cancelled() {
                break;
            }
            if !plan.due.is_empty() {
                continue; // polls took time: plan again before sleeping
            }
            let sleep = plan
                .next
                .map(|t| Duration::from_millis(u64::try_from(t - now_ms()).unwrap_or(0)))
                .unwrap_or(MAX_SLEEP)
                .min(MAX_SLEEP);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(sleep) => {}
                _ = &mut woken => {}
            }
        }
        tracing::debug!("settle: settler stopped");
    }

    fn handle(&self, request_id: &str, job_id: &str, polled: Polled) {
        match polled {
            Polled::Done(body) => {
                self.book.metrics.observe_settle_poll("done");
                self.book.resolve_polled(request_id, &body);
            }
            Polled::Pending(after) => {
                self.book.metrics.observe_settle_poll("pending");
                self.book.reschedule(request_id, after, false);
            }
            Polled::Terminal(why) => {
                self.book.metrics.observe_settle_poll("terminal");
                tracing::warn!(request_id, job_id, %why, "settle: Apollo will not give this job's result; recording the estimate");
                self.book.settle_terminal(
                    request_id,
                    format!("{why}, so the catalog's estimate is recorded"),
                );
            }
            Polled::RateLimited(after) => {
                self.book.metrics.observe_settle_poll("rate_limited");
                let failures = self.book.reschedule(request_id, after, true);
                tracing::info!(
                    request_id,
                    ?after,
                    failures,
                    "settle: Apollo rate-limited the result poll (429); waiting"
                );
            }
            Polled::Failed(why) => {
                self.book.metrics.observe_settle_poll("error");
                let failures = self.book.reschedule(request_id, None, true);
                tracing::warn!(request_id, job_id, %why, failures, key_env = %self.api_key_env, "settle: polling the job's result failed; backing off");
            }
        }
    }

    /// One poll, recorded in the ledger as an ordinary (free) call.
    async fn poll(&self, job_id: &str) -> Polled {
        let Ok(mut key_header) = HeaderValue::from_str(&self.api_key) else {
            return Polled::Failed(format!(
                "the key in {} is not a valid header value",
                self.api_key_env
            ));
        };
        key_header.set_sensitive(true);
        let path = format!("{RESULT_PATH}{job_id}");
        let catalog = self.proxy_settings.get().catalog.clone();
        let ctx = CallContext {
            request_id: self.ids.next(),
            started_at: now_ms(),
            method: "GET".into(),
            endpoint: catalog.classify_id("GET", &path),
            path: path.clone(),
            catalog,
            params: RequestParams::default(),
            attribution: Attribution {
                table: Some(POLLER_TABLE.into()),
                workflow: Some(SETTLE_WORKFLOW.into()),
                tags: Default::default(),
            },
            key_fp: Some(self.fingerprints.fingerprint(&self.api_key)),
            request_bytes: 0,
        };
        let mut call = CallMeter::new(self.meter.clone(), ctx);
        let uri = match self.upstream.uri_for(&path, None) {
            Ok(u) => u,
            Err(e) => {
                let msg = format!("cannot build the webhook_result URL: {e}");
                record(
                    &mut call,
                    Outcome::Rejected,
                    Some(msg.clone()),
                    Captured::default(),
                    0,
                )
                .await;
                return Polled::Failed(msg);
            }
        };
        let mut req = http::Request::new(Full::new(Bytes::new()));
        *req.method_mut() = http::Method::GET;
        *req.uri_mut() = uri;
        req.headers_mut().insert("x-api-key", key_header);
        req.headers_mut()
            .insert(ACCEPT, HeaderValue::from_static("application/json"));

        let deadline = Instant::now() + self.timeout;
        call.upstream_sent();
        let resp = match tokio::time::timeout_at(deadline, self.upstream.request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let msg = format!("could not reach upstream: {}", error_chain(&e));
                record(
                    &mut call,
                    Outcome::UpstreamError,
                    Some(msg.clone()),
                    Captured::default(),
                    0,
                )
                .await;
                return Polled::Failed(msg);
            }
            Err(_) => {
                let msg = format!("no answer within upstream.timeout ({:?})", self.timeout);
                record(
                    &mut call,
                    Outcome::UpstreamTimeout,
                    Some(msg.clone()),
                    Captured::default(),
                    0,
                )
                .await;
                return Polled::Failed(msg);
            }
        };
        let (parts, incoming) = resp.into_parts();
        call.response_head(parts.status.as_u16(), &parts.headers);
        let collected =
            tokio::time::timeout_at(deadline, Limited::new(incoming, MAX_ANSWER_BYTES).collect())
                .await;
        let bytes = match collected {
            Ok(Ok(c)) => c.to_bytes(),
            Ok(Err(e)) => {
                let msg = format!("reading the answer: {}", error_chain(e.as_ref()));
                record(
                    &mut call,
                    Outcome::UpstreamError,
                    Some(msg.clone()),
                    Captured::default(),
                    0,
                )
                .await;
                return Polled::Failed(msg);
            }
            Err(_) => {
                let msg = format!(
                    "the answer did not finish within upstream.timeout ({:?})",
                    self.timeout
                );
                record(
                    &mut call,
                    Outcome::UpstreamTimeout,
                    Some(msg.clone()),
                    Captured::default(),
                    0,
                )
                .await;
                return Polled::Failed(msg);
            }
        };
        let mut kept = Captured::default();
        if call.inspects_body() {
            kept.push(&bytes, call.max_inspect());
        }
        // The meter hands a 2xx answer to the book too; whichever settles first wins.
        record(&mut call, Outcome::Ok, None, kept, bytes.len() as u64).await;

        let encoding = parts
            .headers
            .get(http::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok());
        let decoded = match crate::catalog::decode_body(encoding, &bytes, MAX_ANSWER_BYTES) {
            Ok(d) => Bytes::from(d.into_owned()),
            Err(e) => return Polled::Failed(format!("the answer could not be decoded: {e}")),
        };
        classify(parts.status.as_u16(), &parts.headers, decoded)
    }
}

/// What a `webhook_result` answer means for the charge.
fn classify(status: u16, headers: &http::HeaderMap, body: Bytes) -> Polled {
    let answer: ErrorAnswer = serde_json::from_slice(&body).unwrap_or_default();
    let code = answer.error_code.as_deref().unwrap_or("");
    let secs_ms =
        |s: f64| (s.is_finite() && s >= 0.0).then(|| ((s * 1000.0) as i64).min(MAX_RETRY_AFTER_MS));
    match status {
        200..=299 => Polled::Done(body),
        404 if code == "result_pending" => {
            Polled::Pending(answer.retry_after_seconds.and_then(secs_ms))
        }
        404 if code == "request_id_unknown" => {
            Polled::Terminal("Apollo does not know this job (404 request_id_unknown)".into())
        }
        410 => Polled::Terminal("Apollo's result has expired (410 request_id_expired)".into()),
        400 => Polled::Terminal("Apollo refused the job id (400 invalid_request_id)".into()),
        429 => Polled::RateLimited(
            headers
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .and_then(secs_ms),
        ),
        _ => Polled::Failed(format!(
            "webhook_result answered {status}{}",
            if code.is_empty() {
                String::new()
            } else {
                format!(" {code}")
            }
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff_ms(1), 1_000);
        assert_eq!(backoff_ms(2), 2_000);
        assert_eq!(backoff_ms(4), 8_000);
        assert_eq!(backoff_ms(40), BACKOFF_MAX_MS);
    }

    #[test]
    fn answers_are_classified_as_apollo_documents_them() {
        let h = http::HeaderMap::new();
        let b = |s: &str| Bytes::from(s.to_owned());
        assert!(matches!(
            classify(
                404,
                &h,
                b(r#"{"error_code":"result_pending","retry_after_seconds":3}"#)
            ),
            Polled::Pending(Some(3000))
        ));
        assert!(matches!(
            classify(404, &h, b(r#"{"error_code":"request_id_unknown"}"#)),
            Polled::Terminal(_)
        ));
        assert!(matches!(
            classify(410, &h, b(r#"{"error_code":"request_id_expired"}"#)),
            Polled::Terminal(_)
        ));
        assert!(matches!(
            classify(400, &h, b(r#"{"error_code":"invalid_request_id"}"#)),
            Polled::Terminal(_)
        ));
        // A 404 that is not Apollo's (a wrong base URL) is not terminal: back off.
        assert!(matches!(
            classify(404, &h, b("Not Found")),
            Polled::Failed(_)
        ));
        assert!(matches!(classify(503, &h, b("")), Polled::Failed(_)));
        let mut h429 = http::HeaderMap::new();
        h429.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert!(matches!(
            classify(429, &h429, b("")),
            Polled::RateLimited(Some(2000))
        ));
        assert!(matches!(classify(200, &h, b("{}")), Polled::Done(_)));
    }
}
