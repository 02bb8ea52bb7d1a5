//! The balance poller: a background task that reads Apollo's credit balance every
//! `reconcile.interval`, stores it, and settles the windows that have become final.
//!
//! Each poll is an ordinary call through the proxy's own upstream client (same pool, same
//! TLS trust) and is metered like any other: a `calls` row (table `_creditmeter`, workflow
//! `reconcile`, endpoint `usage_stats`, priced 0 by the catalog) and the request metrics. The
//! master key goes out in `X-Api-Key` and nowhere else: not in logs, not in the ledger (only
//! its `key_fp`).
//!
//! Failures back off exponentially from the interval (capped at 30 minutes, and never sooner
//! than a 429's `retry-after`), each with one log line that says what to do. Nothing here can
//! touch proxying: the task owns no shared lock, and its ledger writes are tiny transactions on
//! a connection of its own.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, CONTENT_TYPE, RETRY_AFTER};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::store::{self, Reconciled, Settings};
use super::usage::{self, UsageStats};
use super::{
    calls, credits, Pool, API_USAGE_STATS_PATH, POLLER_TABLE, POLLER_WORKFLOW, USAGE_STATS_PATH,
};
use crate::attribution::{Attribution, KeyFingerprinter};
use crate::catalog::RequestParams;
use crate::ledger::Outcome;
use crate::meter::{
    now_ms, record_and_wait as record, CallContext, CallMeter, Captured, Meter, RequestIds,
};
use crate::metrics::Metrics;
use crate::upstream::{error_chain, Upstream};
use creditmeter_base::format_time;

/// The longest pause between two attempts while polls fail (unless the interval is longer).
pub const MAX_BACKOFF: Duration = Duration::from_secs(30 * 60);
/// Time for a submitted row to commit: a window settles this long after its last call's row was
/// handed to the writer (and at the latest this long after `upstream.timeout`).
pub const SETTLE_MARGIN: Duration = Duration::from_secs(1);
/// The usage-stats answer is a few hundred bytes; anything past this is not it.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Every `result` label of `creditmeter_reconcile_polls_total`.
pub const POLL_RESULTS: [&str; 10] = [
    "ok",
    "no_key",
    "unauthorized",
    "forbidden",
    "not_found",
    "rate_limited",
    "http_error",
    "timeout",
    "upstream_error",
    "bad_response",
];

/// Everything the poller needs. Built in `run()`, moved into its task.
pub struct Poller {
    /// The proxy's upstream client (a clone shares its connection pool).
    pub upstream: Upstream,
    pub meter: Arc<Meter>,
    /// The catalog in force (it follows reloads); poll calls are priced by it like any call.
    pub proxy_settings: Arc<crate::settings::SettingsCell>,
    pub fingerprints: KeyFingerprinter,
    pub ids: RequestIds,
    pub metrics: Arc<Metrics>,
    pub ledger_path: PathBuf,
    /// The master key; `None` when `api_key_env` is unset. Never logged.
    pub api_key: Option<String>,
    /// The variable it came from, for log lines.
    pub api_key_env: String,
    pub interval: Duration,
    /// `upstream.timeout`, for the whole poll.
    pub timeout: Duration,
    pub settings: Settings,
    pub status: Arc<PollerStatus>,
}

/// How far back a settlement row's original call may lie, at least: `settle.max_wait`'s
/// default (2h) plus an hour.
pub const SETTLEMENT_LOOKBACK: Duration = Duration::from_secs(3 * 3600);

/// The settling rules that follow from the configuration. A settlement is learned at most
/// `settle.max_wait` after its call (then the estimate is recorded), so the lookback for its
/// original call is that plus an hour, and never less than [`SETTLEMENT_LOOKBACK`].
pub fn settings(
    balance_lag: Duration,
    upstream_timeout: Duration,
    pool: Pool,
    settle_max_wait: Duration,
) -> Settings {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4);
    let settlement_lookback =
        SETTLEMENT_LOOKBACK.max(settle_max_wait.saturating_add(Duration::from_secs(3600)));
    Settings {
        balance_lag_ms: ms(balance_lag),
        settle_ms: ms(upstream_timeout + SETTLE_MARGIN),
        lookback_ms: ms(upstream_timeout * 2 + Duration::from_secs(600)),
        settlement_lookback_ms: ms(settlement_lookback),
        pool,
    }
}

/// What the poller last did, for `GET /api/reconcile`.
#[derive(Debug, Default)]
pub struct PollerStatus {
    inner: Mutex<StatusInner>,
}

#[derive(Debug, Default, Clone)]
struct StatusInner {
    enabled: bool,
    interval_ms: u64,
    api_key_env: String,
    api_key_set: bool,
    last_attempt: Option<i64>,
    last_result: Option<&'static str>,
    last_error: Option<String>,
    last_success: Option<i64>,
    consecutive_failures: u32,
    next_attempt: Option<i64>,
    /// `ok`, or `unavailable: why` for the per-route call counts.
    call_counts: Option<String>,
}

impl PollerStatus {
    /// The status of a poller that will run with these settings.
    pub fn new(enabled: bool, interval: Duration, api_key_env: &str, api_key_set: bool) -> Self {
        Self {
            inner: Mutex::new(StatusInner {
                enabled,
                interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
                api_key_env: api_key_env.to_owned(),
                api_key_set,
                ..Default::default()
            }),
        }
    }

    fn update(&self, f: impl FnOnce(&mut StatusInner)) {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// As JSON: `enabled`, `interval_ms`, `api_key_env`, `api_key_set`, `last_attempt`,
    /// `last_result`, `last_error`, `last_success`, `consecutive_failures`, `next_attempt`
    /// (times RFC 3339, UTC), `call_counts` (`ok`, or `unavailable: …` when Apollo's
    /// `api_usage_stats` cannot be read; null before the first successful poll).
    pub fn to_json(&self) -> serde_json::Value {
        let s = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let t = |ms: Option<i64>| ms.map(super::answer::format_ms);
        json!({
            "enabled": s.enabled,
            "interval_ms": s.interval_ms,
            "api_key_env": s.api_key_env,
            "api_key_set": s.api_key_set,
            "last_attempt": t(s.last_attempt),
            "last_result": s.last_result,
            "last_error": s.last_error,
            "last_success": t(s.last_success),
            "consecutive_failures": s.consecutive_failures,
            "next_attempt": t(s.next_attempt),
            "call_counts": s.call_counts,
        })
    }
}

/// A 2xx answer to one poll.
struct Fetched {
    request_id: String,
    sent_at: i64,
    received_at: i64,
    body: Bytes,
}

/// One successful poll of the call counts.
struct PolledCalls {
    request_id: String,
    sent_at: i64,
    received_at: i64,
    counts: Vec<calls::RouteCount>,
}

/// One successful poll.
struct Polled {
    request_id: String,
    sent_at: i64,
    received_at: i64,
    stats: UsageStats,
}

/// Why a poll gave no snapshot.
#[derive(Debug)]
enum PollError {
    NoKey,
    Status {
        status: u16,
        retry_after: Option<Duration>,
        detail: String,
    },
    Timeout,
    Transport(String),
    BadAnswer(String),
}

impl PollError {
    /// The `result` label.
    fn result(&self) -> &'static str {
        match self {
            PollError::NoKey => "no_key",
            PollError::Status { status: 401, .. } => "unauthorized",
            PollError::Status { status: 403, .. } => "forbidden",
            PollError::Status { status: 404, .. } => "not_found",
            PollError::Status { status: 429, .. } => "rate_limited",
            PollError::Status { .. } => "http_error",
            PollError::Timeout => "timeout",
            PollError::Transport(_) => "upstream_error",
            PollError::BadAnswer(_) => "bad_response",
        }
    }

    /// A short description for `GET /api/reconcile` (never the key).
    fn brief(&self) -> String {
        match self {
            PollError::NoKey => "no master key in the environment".into(),
            PollError::Status { status, detail, .. } => format!("{status}: {detail}"),
            PollError::Timeout => "timed out".into(),
            PollError::Transport(e) | PollError::BadAnswer(e) => e.clone(),
        }
    }
}

/// The pause after the `failures`-th failure in a row: doubling from the interval, capped.
pub fn backoff(interval: Duration, failures: u32) -> Duration {
    let cap = MAX_BACKOFF.max(interval);
    interval
        .saturating_mul(2u32.saturating_pow(failures.min(16)))
        .min(cap)
}

impl Poller {
    /// Polls until `stop`; a poll in flight is abandoned (and recorded as such) on `hard_stop`.
    /// Windows settle alongside, as soon as they are final (see [`Poller::settle_loop`]).
    pub async fn run(self, stop: CancellationToken, hard_stop: CancellationToken) {
        tracing::info!(
            interval = ?self.interval,
            key_env = %self.api_key_env,
            key_set = self.api_key.is_some(),
            pool = self.settings.pool.as_str(),
            "reconcile: polling Apollo's credit balance (usage_stats) to catch credits spent outside creditmeter"
        );
        let (stored_tx, stored_rx) = tokio::sync::watch::channel(i64::MIN);
        tokio::join!(
            self.poll_loop(&stop, &hard_stop, stored_tx),
            self.settle_loop(&stop, stored_rx)
        );
        tracing::debug!("reconcile: poller stopped");
    }

    async fn poll_loop(
        &self,
        stop: &CancellationToken,
        hard_stop: &CancellationToken,
        stored: tokio::sync::watch::Sender<i64>,
    ) {
        let mut delay = Duration::ZERO;
        let mut failures: u32 = 0;
        // Why per-route call counts are not to be had, once said.
        let mut calls_unavailable: Option<String> = None;
        let mut pool_hint_given = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            let attempted = now_ms();
            let polled = tokio::select! {
                _ = hard_stop.cancelled() => break,
                r = self.poll() => r,
            };
            let (snapshot, result, error) = match polled {
                Ok(p) => {
                    if failures > 0 {
                        tracing::info!(
                            after_failures = failures,
                            "reconcile: usage_stats answers again; balance polling resumed"
                        );
                    }
                    failures = 0;
                    delay = self.interval;
                    let only_lead = p
                        .stats
                        .balances
                        .iter()
                        .all(|b| b.credit_type == super::CreditType::Lead);
                    if self.settings.pool == Pool::Typed && only_lead && !pool_hint_given {
                        pool_hint_given = true;
                        tracing::warn!("reconcile: Apollo reports only lead_credit, as on a unified-credit plan, where it includes mobile reveals and exports: set reconcile.pool = \"unified\", or direct-dial and export spend reads as unmetered lead credits");
                    }
                    for b in &p.stats.balances {
                        self.metrics.observe_balance(
                            b.credit_type.as_str(),
                            b.consumed_milli,
                            b.left_milli,
                        );
                    }
                    (Some(p), "ok", None)
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    delay = backoff(self.interval, failures);
                    if let PollError::Status {
                        retry_after: Some(r),
                        ..
                    } = &e
                    {
                        delay = delay.max(*r);
                    }
                    self.log_failure(&e, delay, failures);
                    (None, e.result(), Some(e.brief()))
                }
            };
            // The per-route call counts, right after a balance that could be read.
            let calls = match &snapshot {
                Some(_) => tokio::select! {
                    _ = hard_stop.cancelled() => break,
                    r = self.poll_calls() => match r {
                        Ok(c) => {
                            if let Some(why) = calls_unavailable.take() {
                                tracing::info!(was = %why, "reconcile: api_usage_stats answers again; per-endpoint call counts resumed");
                            }
                            Some(c)
                        }
                        Err(why) => {
                            if calls_unavailable.is_none() {
                                tracing::warn!(%why, "reconcile: per-endpoint call counts (usage_stats/api_usage_stats) are not available: {why}; credits are still reconciled, but calls outside creditmeter cannot be named per endpoint (said once; retried every interval)");
                            }
                            calls_unavailable = Some(why);
                            None
                        }
                    },
                },
                None => None,
            };
            self.metrics.observe_reconcile_poll(result);
            let success = snapshot.as_ref().map(|p| p.received_at);
            let calls_status = calls_unavailable.clone();
            self.status.update(|s| {
                s.last_attempt = Some(attempted);
                s.last_result = Some(result);
                s.last_error = error;
                if success.is_some() {
                    s.last_success = success;
                    s.call_counts = Some(match calls_status {
                        None => "ok".to_owned(),
                        Some(why) => format!("unavailable: {why}"),
                    });
                }
                s.consecutive_failures = failures;
                s.next_attempt = Some(now_ms() + i64::try_from(delay.as_millis()).unwrap_or(0));
            });
            if let Some(received) = self.store(snapshot, calls).await {
                stored.send_replace(received);
            }
        }
    }

    /// Stores a snapshot and its call counts, off the async threads; returns its answer time.
    async fn store(&self, snapshot: Option<Polled>, calls: Option<PolledCalls>) -> Option<i64> {
        let p = snapshot?;
        let path = self.ledger_path.clone();
        let received = p.received_at;
        let done = tokio::task::spawn_blocking(move || -> rusqlite::Result<()> {
            let mut conn = store::open(&path)?;
            store::insert_snapshot(&mut conn, &p.request_id, p.sent_at, p.received_at, &p.stats)?;
            if let Some(c) = calls {
                calls::insert_poll(
                    &mut conn,
                    &c.request_id,
                    c.sent_at,
                    c.received_at,
                    &c.counts,
                )?;
            }
            Ok(())
        })
        .await;
        match done {
            Ok(Ok(())) => Some(received),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, ledger = %self.ledger_path.display(), "reconcile: could not store the balance; this poll is lost, the next one goes on");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "reconcile: the storing task failed");
                None
            }
        }
    }

    /// Settles windows as soon as they are final. A window is final once every call that
    /// started before its closing snapshot was answered is in the ledger, and `balance_lag` has
    /// passed since (deferred charges learned meanwhile may belong to it). The in-flight
    /// tracker (`Meter::inflight`) says when the first holds: no call that started before the
    /// answer is still in flight, and the last of them was handed to the ledger writer at least
    /// [`SETTLE_MARGIN`] ago (time for its commit). Whatever the tracker says, `upstream.timeout`
    /// plus the margin after the answer (`Settings::settle_ms`) bounds the wait. So a window is
    /// known one interval plus `balance_lag` after its spend, not an interval plus
    /// `upstream.timeout`.
    async fn settle_loop(
        &self,
        stop: &CancellationToken,
        mut stored: tokio::sync::watch::Receiver<i64>,
    ) {
        let margin = i64::try_from(SETTLE_MARGIN.as_millis()).unwrap_or(1000);
        let tick =
            (self.interval / 20).clamp(Duration::from_millis(10), Duration::from_millis(250));
        // (observed at, every call that started before this had been submitted then)
        let mut seen: std::collections::VecDeque<(i64, i64)> = Default::default();
        let mut committed_through = i64::MIN;
        // Snapshots stored and not yet settled (their answer times); a restart's backlog is
        // settled on the first pass by the upper bound.
        let mut unsettled: std::collections::VecDeque<i64> = [i64::MIN + 1].into();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(tick) => {}
                changed = stored.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let r = *stored.borrow_and_update();
                    unsettled.push_back(r);
                }
            }
            let now = now_ms();
            seen.push_back((now, self.meter.inflight.oldest_start().unwrap_or(now)));
            while let Some(&(at, clear)) = seen.front() {
                if at + margin > now {
                    break;
                }
                committed_through = committed_through.max(clear);
                seen.pop_front();
            }
            let Some(&oldest) = unsettled.front() else {
                continue;
            };
            let final_through = if self.meter.ledger.is_healthy() {
                // The upper bound never cuts balance_lag short.
                let longest = self
                    .settings
                    .settle_ms
                    .max(self.settings.balance_lag_ms + margin);
                committed_through
                    .min(now - self.settings.balance_lag_ms)
                    .max(now - longest)
            } else {
                // The last commit of calls failed: the ledger may be missing rows, and settling
                // now would turn them into drift. Settle once commits succeed again.
                i64::MIN
            };
            if oldest > final_through {
                continue;
            }
            while unsettled.front().is_some_and(|&r| r <= final_through) {
                unsettled.pop_front();
            }
            self.settle(final_through).await;
        }
    }

    /// Settles every window final through `final_through`, off the async threads, and reports
    /// what it found.
    async fn settle(&self, final_through: i64) {
        let path = self.ledger_path.clone();
        let settings = self.settings;
        let done = tokio::task::spawn_blocking(
            move || -> rusqlite::Result<(Vec<Reconciled>, Vec<calls::CallWindow>)> {
                let mut conn = store::open(&path)?;
                let credits = store::reconcile_pending(&mut conn, &settings, final_through)?;
                let outside = calls::reconcile_pending(&mut conn, &settings, final_through)?;
                Ok((credits, outside))
            },
        )
        .await;
        let (windows, outside) = match done {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, ledger = %self.ledger_path.display(), "reconcile: could not settle windows; retrying next poll");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "reconcile: the settling task failed");
                return;
            }
        };
        for w in outside {
            self.metrics.add_outside_calls(&w.endpoint, w.outside_calls);
            tracing::warn!(
                endpoint = %w.endpoint,
                routes = %w.routes,
                outside_calls = w.outside_calls,
                apollo_calls = w.apollo_calls,
                ledger_calls = w.ledger_calls,
                "reconcile: {}; see `creditmeter report --reconcile`",
                w.summary()
            );
        }
        for w in windows {
            let (start, end) = (format_time(w.window_start), format_time(w.window_end));
            let ty = w.credit_type.as_str();
            if w.cycle_reset {
                tracing::info!(credit_type = ty, %start, %end, "reconcile: Apollo's credit cycle restarted in this window; not counted as drift");
            } else if w.unmetered_milli > 0 {
                self.metrics.add_unmetered(ty, w.unmetered_milli);
                tracing::warn!(
                    credit_type = ty,
                    %start,
                    %end,
                    apollo_delta = %credits(w.apollo_delta_milli.unwrap_or(0)),
                    metered = %credits(w.metered_milli),
                    proxied_calls = w.calls,
                    "reconcile: {} {ty} credits left Apollo's balance without passing through creditmeter; see `creditmeter report --reconcile`",
                    credits(w.unmetered_milli),
                );
            } else if w.drift_milli < 0 {
                tracing::info!(
                    credit_type = ty,
                    %start,
                    %end,
                    "reconcile: creditmeter priced {} more {ty} credits than Apollo took (a catalog rule may over-price)",
                    credits(-w.drift_milli),
                );
            }
        }
    }

    fn log_failure(&self, e: &PollError, retry_in: Duration, failures: u32) {
        let env = &self.api_key_env;
        match e {
            PollError::NoKey => tracing::error!(
                key_env = %env, ?retry_in,
                "reconcile: no Apollo master key: set the environment variable {env} (Apollo: Settings > Integrations > API > create a master key); balance polling is idle"
            ),
            PollError::Status {
                status: 401,
                detail,
                ..
            } => tracing::error!(
                status = 401, key_env = %env, ?retry_in, failures, %detail,
                "reconcile: Apollo rejected the key in {env} (401): check that it is a current API key"
            ),
            PollError::Status {
                status: 403,
                detail,
                ..
            } => tracing::error!(
                status = 403, key_env = %env, ?retry_in, failures, %detail,
                "reconcile: the key in {env} may not read usage stats (403): usage_stats needs a master key, not an ordinary API key"
            ),
            PollError::Status {
                status: 404,
                detail,
                ..
            } => tracing::error!(
                status = 404, ?retry_in, failures, %detail,
                "reconcile: usage_stats not found (404): check upstream.base_url and that the plan offers the usage API"
            ),
            PollError::Status {
                status: 429,
                retry_after,
                ..
            } => tracing::warn!(
                status = 429,
                ?retry_after,
                ?retry_in,
                failures,
                "reconcile: Apollo rate-limited the balance poll (429); backing off"
            ),
            PollError::Status { status, detail, .. } => tracing::warn!(
                status, ?retry_in, failures, %detail,
                "reconcile: usage_stats answered {status}; backing off"
            ),
            PollError::Timeout => tracing::warn!(
                timeout = ?self.timeout, ?retry_in, failures,
                "reconcile: usage_stats did not answer within upstream.timeout; backing off"
            ),
            PollError::Transport(error) => tracing::warn!(
                %error, ?retry_in, failures,
                "reconcile: could not reach Apollo for the balance; backing off"
            ),
            PollError::BadAnswer(error) => tracing::warn!(
                %error, ?retry_in, failures,
                "reconcile: could not read Apollo's usage_stats answer; backing off"
            ),
        }
    }

    /// One balance poll.
    async fn poll(&self) -> Result<Polled, PollError> {
        let f = self.fetch(USAGE_STATS_PATH).await?;
        let stats = usage::parse(&f.body).map_err(|e| PollError::BadAnswer(e.to_string()))?;
        Ok(Polled {
            request_id: f.request_id,
            sent_at: f.sent_at,
            received_at: f.received_at,
            stats,
        })
    }

    /// One poll of the per-route call counts; the error says why they are not to be had.
    async fn poll_calls(&self) -> Result<PolledCalls, String> {
        let f = self
            .fetch(API_USAGE_STATS_PATH)
            .await
            .map_err(|e| match e {
                PollError::Status { status: 404, .. } => {
                    "Apollo answered 404 (the plan may not offer it)".to_owned()
                }
                e => e.brief(),
            })?;
        let catalog = self.proxy_settings.get().catalog.clone();
        let counts = calls::parse(&f.body, &catalog).map_err(|e| e.to_string())?;
        Ok(PolledCalls {
            request_id: f.request_id,
            sent_at: f.sent_at,
            received_at: f.received_at,
            counts,
        })
    }

    /// One POST of `{}` to `path`, recorded in the ledger as an ordinary call; a 2xx answer's
    /// body.
    async fn fetch(&self, path: &'static str) -> Result<Fetched, PollError> {
        let Some(key) = &self.api_key else {
            return Err(PollError::NoKey);
        };
        let Ok(mut key_header) = HeaderValue::from_str(key) else {
            return Err(PollError::Transport(format!(
                "the key in {} is not a valid header value",
                self.api_key_env
            )));
        };
        key_header.set_sensitive(true);
        let body = Bytes::from_static(b"{}");
        let request_id = self.ids.next();
        let sent_at = now_ms();
        let catalog = self.proxy_settings.get().catalog.clone();
        let ctx = CallContext {
            request_id: request_id.clone(),
            started_at: sent_at,
            method: "POST".into(),
            path: path.into(),
            endpoint: catalog.classify_id("POST", path),
            catalog,
            params: RequestParams::parse(None, &body),
            attribution: Attribution {
                table: Some(POLLER_TABLE.into()),
                workflow: Some(POLLER_WORKFLOW.into()),
                tags: Default::default(),
            },
            key_fp: Some(self.fingerprints.fingerprint(key)),
            request_bytes: body.len() as i64,
        };
        let mut call = CallMeter::new(self.meter.clone(), ctx);
        let uri = match self.upstream.uri_for(path, None) {
            Ok(u) => u,
            Err(e) => {
                let msg = format!("cannot build the usage_stats URL: {e}");
                record(
                    &mut call,
                    Outcome::Rejected,
                    Some(msg.clone()),
                    Captured::default(),
                    0,
                )
                .await;
                return Err(PollError::Transport(msg));
            }
        };
        let mut req = http::Request::new(Full::new(body));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        h.insert("x-api-key", key_header);
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(ACCEPT, HeaderValue::from_static("application/json"));

        let deadline = Instant::now() + self.timeout;
        call.upstream_sent();
        let resp = match tokio::time::timeout_at(deadline, self.upstream.request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let what = if e.is_connect() {
                    "could not connect to upstream"
                } else {
                    "upstream failed before sending a response"
                };
                let msg = format!("{what}: {}", error_chain(&e));
                record(
                    &mut call,
                    Outcome::UpstreamError,
                    Some(msg.clone()),
                    Captured::default(),
                    0,
                )
                .await;
                return Err(PollError::Transport(msg));
            }
            Err(_) => {
                let msg = format!(
                    "upstream did not answer within upstream.timeout ({:?})",
                    self.timeout
                );
                record(
                    &mut call,
                    Outcome::UpstreamTimeout,
                    Some(msg),
                    Captured::default(),
                    0,
                )
                .await;
                return Err(PollError::Timeout);
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
                let msg = format!(
                    "reading the usage_stats answer: {}",
                    error_chain(e.as_ref())
                );
                record(
                    &mut call,
                    Outcome::UpstreamError,
                    Some(msg.clone()),
                    Captured::default(),
                    0,
                )
                .await;
                return Err(PollError::Transport(msg));
            }
            Err(_) => {
                let msg = format!(
                    "upstream did not finish its answer within upstream.timeout ({:?})",
                    self.timeout
                );
                record(
                    &mut call,
                    Outcome::UpstreamTimeout,
                    Some(msg),
                    Captured::default(),
                    0,
                )
                .await;
                return Err(PollError::Timeout);
            }
        };
        let received_at = now_ms();
        let mut kept = Captured::default();
        if call.inspects_body() {
            kept.push(&bytes, call.max_inspect());
        }
        record(&mut call, Outcome::Ok, None, kept, bytes.len() as u64).await;

        let status = parts.status.as_u16();
        if !parts.status.is_success() {
            let retry_after = parts
                .headers
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(PollError::Status {
                status,
                retry_after,
                detail: snippet(&bytes),
            });
        }
        Ok(Fetched {
            request_id,
            sent_at,
            received_at,
            body: bytes,
        })
    }
}

/// The start of an error answer, printable, for a log line (Apollo's error bodies carry no key).
fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]);
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_interval_and_is_capped() {
        let i = Duration::from_secs(300);
        assert_eq!(backoff(i, 1), Duration::from_secs(600));
        assert_eq!(backoff(i, 2), Duration::from_secs(1200));
        assert_eq!(backoff(i, 3), MAX_BACKOFF);
        assert_eq!(backoff(i, 40), MAX_BACKOFF);
        // An interval longer than the cap is never shortened.
        let long = Duration::from_secs(3600);
        assert_eq!(backoff(long, 5), long);
        assert_eq!(
            backoff(Duration::from_millis(200), 1),
            Duration::from_millis(400)
        );
    }

    #[test]
    fn results_are_labelled() {
        let s = |status| PollError::Status {
            status,
            retry_after: None,
            detail: String::new(),
        };
        for (e, label) in [
            (s(401), "unauthorized"),
            (s(403), "forbidden"),
            (s(404), "not_found"),
            (s(429), "rate_limited"),
            (s(500), "http_error"),
            (PollError::Timeout, "timeout"),
            (PollError::NoKey, "no_key"),
        ] {
            assert_eq!(e.result(), label);
            assert!(POLL_RESULTS.contains(&label));
        }
        assert_eq!(
            snippet(b"Invalid API key.\n See docs"),
            "Invalid API key.  See docs"
        );
    }
}
