//! `creditmeter-sim`: a deterministic stand-in for the Apollo.io API, for tests, benchmarks and
//! `creditmeter demo`, with the tools that feed it and fill ledgers:
//! [`workload`] (simulated Clay traffic and its driver) and [`synth`] (synthetic ledgers for
//! benchmarks, `creditmeter sim-ledger`).
//!
//! The simulator follows Apollo's documented behaviour, not creditmeter's catalog: it shares no
//! code with `creditmeter-catalog`, so a wrong guess in the catalog shows up as a test failure.
//!
//! One request flows: body read (capped) → path routed as Rails routes it (repeated slashes
//! collapse, percent-encoded unreserved characters decode) → `/__sim/` control endpoint, or an
//! Apollo route (`/api/v1/…`, `/v1/…` or the host root; anything else is
//! `404 {"error":"Not Found"}`) → parameters (Rails-style query merged with the body: JSON or
//! form-encoded, gzip/deflate/br undone) → API key (`X-Api-Key`,
//! `Authorization: Bearer`, or `api_key`; none is Apollo's plain-text 401) → fixed-window rate
//! limit per (key, endpoint) → the answer and its credits → the account is debited → the body
//! is encoded (gzip when accepted).
//!
//! Records are a pure function of ([`SimConfig::seed`], identifier), so a test can predict them
//! and a benchmark repeats exactly. What the sim billed is its own ground truth, kept in
//! [`Sim::billed`] and sent per response as `x-sim-billed-milli` (a sim-only header) so the
//! proxy's ledger can be checked against it.
//!
//! Phone reveals and waterfalls run as asynchronous jobs that bill when they end, polled at
//! `GET webhook_result/{request_id}`; see `jobs.rs`. [`Billed`] includes a job's charge from
//! the moment it ends; `x-sim-billed-milli` is only what the synchronous answer billed.
//!
//! Control endpoints (not Apollo): `GET /__sim/billed`, `GET /__sim/jobs`, `POST /__sim/debit`,
//! `POST /__sim/reset_cycle`, `POST /__sim/usage_stats_fault`,
//! `POST /__sim/webhook_result_fault`; see `control.rs`.

mod account;
mod api;
mod body;
mod control;
mod data;
mod jobs;
mod params;
mod rate;
mod reply;
#[cfg(test)]
mod tests;
mod usage;

pub mod synth;
pub mod workload;

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{request, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use account::{Account, Charge, CreditType};
use control::UsageFault;
use jobs::Jobs;
pub use jobs::{JobState, JobSummary};
use params::{text, Params};
use rate::{Exceeded, RateLimiter};
use reply::Reply;

/// Apollo's 401 body, sent as `text/plain`.
const INVALID_API_KEY: &str =
    "Invalid API key. See https://docs.apollo.io/reference/authentication for how to authenticate.";
/// Sim-only response header: the credits this call billed, in thousandths.
const BILLED_HEADER: HeaderName = HeaderName::from_static("x-sim-billed-milli");
/// Where the control endpoints live.
const CONTROL_PREFIX: &str = "/__sim/";
/// Request bodies larger than this are refused with a 413.
const MAX_BODY_BYTES: usize = 1 << 20;
/// A TLS client that has not finished its handshake by then is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (such as EMFILE) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// How the sim behaves. [`SimConfig::default`] is a paid Apollo plan with a 70% match rate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seeds every generated record and match decision. Default 42.
    pub seed: u64,
    /// Percent of identifiers (emails, domains, searches…) that find a record. Default 70;
    /// 0 matches nothing, 100 or more matches everything.
    pub match_rate_pct: u8,
    /// Calls per minute per (API key, endpoint). Default 1000; 0 = unlimited (an empty limit
    /// header and no usage headers).
    pub rate_limit_minute: u32,
    /// Calls per hour per (API key, endpoint). Default 0 (unlimited).
    pub rate_limit_hourly: u32,
    /// Calls per 24 hours per (API key, endpoint). Default 0 (unlimited).
    pub rate_limit_daily: u32,
    /// Spell the day window's headers as older accounts get them (`x-rate-limit-daily`,
    /// `x-daily-usage`, `x-daily-requests-left`) instead of `…24-hour…`. Default false.
    pub legacy_daily_headers: bool,
    /// Include `credits_consumed` (all credits the call billed) in `people/bulk_match` answers.
    /// Default true.
    pub report_credits_consumed: bool,
    /// Each credit type's allowance per cycle in `usage_stats`, in credits. Default 1,000,000.
    pub initial_credits: i64,
    /// When set, `usage_stats/credit_usage_stats` answers only this key (Apollo's "master key")
    /// and any other key gets Apollo's `403 API_INACCESSIBLE`. Default `None`: any key.
    pub master_key: Option<String>,
    /// How long an asynchronous job (phone reveal, waterfall) runs before it ends, bills, and
    /// `webhook_result` answers 200. Default [`DEFAULT_JOB_DELAY`].
    pub job_delay: Duration,
    /// How long after it ends a job's result can be polled; then `410 request_id_expired`.
    /// Default 30 days, as Apollo documents.
    pub result_ttl: Duration,
    /// Percent of people a phone reveal finds a mobile number for (and bills 8 direct-dial
    /// credits for). Default 60; a function of (seed, person id).
    pub mobile_rate_pct: u8,
    /// Include `credits_consumed` (what the job billed) in `webhook_result` answers. Default
    /// true; false leaves it out, so that pricing a result from its payload can be tested.
    pub report_job_credits_consumed: bool,
    /// Answer `mixed_people/search` as Apollo did before it deprecated the endpoint for API
    /// callers: a page of people, 1 export credit per non-empty page. Default false: the
    /// documented `422` ("deprecated for API callers"), free.
    pub legacy_people_search: bool,
    /// A unified-credit plan: `usage_stats` reports one shared pool, `lead_credit`, that every
    /// credit type draws from (`initial_credits` in all). Default false (a pool per type).
    pub unified_credits: bool,
    /// Answer `usage_stats/api_usage_stats` as some plans do: `Some(404)` not found, `Some(200)`
    /// an empty body. Default `None`: the per-route call counts.
    pub api_usage_stats_fault: Option<u16>,
}

/// [`SimConfig::job_delay`]'s default.
pub const DEFAULT_JOB_DELAY: Duration = Duration::from_secs(2);
/// [`SimConfig::result_ttl`]'s default: Apollo keeps results for 30 days.
pub const DEFAULT_RESULT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            match_rate_pct: 70,
            rate_limit_minute: 1_000,
            rate_limit_hourly: 0,
            rate_limit_daily: 0,
            legacy_daily_headers: false,
            report_credits_consumed: true,
            initial_credits: 1_000_000,
            master_key: None,
            job_delay: DEFAULT_JOB_DELAY,
            result_ttl: DEFAULT_RESULT_TTL,
            mobile_rate_pct: 60,
            report_job_credits_consumed: true,
            legacy_people_search: false,
            unified_credits: false,
            api_usage_stats_fault: None,
        }
    }
}

/// Running totals of what the sim billed, in thousandths of a credit.
///
/// Credits include what asynchronous jobs billed once they ended (not before). `calls` counts
/// every request to an Apollo path (`/__sim/` excluded), answered or refused; `billed_calls`
/// those whose synchronous answer billed anything. Out-of-band debits are not included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Billed {
    /// Lead (email) credits billed.
    pub lead_milli: i64,
    /// Direct-dial (mobile) credits billed.
    pub direct_dial_milli: i64,
    /// Export credits billed.
    pub export_milli: i64,
    /// Requests to Apollo paths.
    pub calls: u64,
    /// Requests whose synchronous answer billed anything.
    pub billed_calls: u64,
}

/// A running Apollo stand-in. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Sim {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: SimConfig,
    limiter: Mutex<RateLimiter>,
    account: Mutex<Account>,
    /// A fault `usage_stats` answers with instead of the balance (set by a control endpoint).
    usage_fault: Mutex<UsageFault>,
    /// Asynchronous jobs and the webhook_result fault.
    jobs: Mutex<Jobs>,
    /// Admitted calls so far; numbers each call for its per-call ids.
    calls: AtomicU64,
    /// The team's call counts per route, for `usage_stats/api_usage_stats`.
    api_usage: Mutex<usage::ApiUsage>,
}

impl fmt::Debug for Sim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sim")
            .field("cfg", &self.inner.cfg)
            .field("billed", &self.billed())
            .finish_non_exhaustive()
    }
}

impl Sim {
    /// A sim with fresh counters and a full balance.
    pub fn new(cfg: SimConfig) -> Sim {
        let limits = [
            cfg.rate_limit_minute,
            cfg.rate_limit_hourly,
            cfg.rate_limit_daily,
        ];
        Sim {
            inner: Arc::new(Inner {
                limiter: Mutex::new(RateLimiter::new(
                    limits,
                    cfg.legacy_daily_headers,
                    Instant::now(),
                )),
                account: Mutex::new(Account::new(cfg.initial_credits, cfg.unified_credits)),
                usage_fault: Mutex::new(UsageFault::default()),
                jobs: Mutex::new(Jobs::default()),
                calls: AtomicU64::new(0),
                api_usage: Mutex::new(usage::ApiUsage::default()),
                cfg,
            }),
        }
    }

    /// Serves HTTP/1.1 and h2 on `listener` (over TLS with `tls`, whose ALPN the caller sets)
    /// until `shutdown` resolves; then stops accepting and waits for open connections to finish
    /// their requests. Connection errors are logged at debug and never end the server.
    pub async fn serve(
        &self,
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        let addr = listener.local_addr()?;
        let tls = tls.map(TlsAcceptor::from);
        let builder = auto::Builder::new(TokioExecutor::new());
        let graceful = GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        info!(%addr, tls = tls.is_some(), "Apollo sim listening");
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let connection = self.clone().serve_connection(
                            stream,
                            peer,
                            tls.clone(),
                            builder.clone(),
                            graceful.watcher(),
                        );
                        tokio::spawn(connection);
                    }
                    Err(err) => {
                        debug!(error = %err, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                },
            }
        }
        drop(listener);
        debug!(connections = graceful.count(), "Apollo sim draining");
        graceful.shutdown().await;
        info!(%addr, "Apollo sim stopped");
        Ok(())
    }

    /// What the sim has billed so far, jobs that have ended included.
    pub fn billed(&self) -> Billed {
        self.billed_at(Instant::now())
    }

    fn billed_at(&self, now: Instant) -> Billed {
        self.advance_jobs(now);
        let deferred = lock(&self.inner.jobs).billed();
        let mut billed = lock(&self.inner.account).billed();
        billed.lead_milli += deferred.lead_milli;
        billed.direct_dial_milli += deferred.direct_dial_milli;
        billed.export_milli += deferred.export_milli;
        billed
    }

    /// Every asynchronous job (phone reveal, waterfall) started so far, in order, with what
    /// each has billed: a test attributes deferred spend by the `request_id` it saw.
    pub fn jobs(&self) -> Vec<JobSummary> {
        let now = Instant::now();
        self.advance_jobs(now);
        lock(&self.inner.jobs).summaries(&self.inner.cfg, now)
    }

    /// Ends the jobs due by `now` and takes what they bill from the balance.
    fn advance_jobs(&self, now: Instant) {
        let due = lock(&self.inner.jobs).advance(now);
        if due.total_milli() == 0 {
            return;
        }
        let mut account = lock(&self.inner.account);
        for (credit_type, milli) in [
            (CreditType::Lead, due.lead_milli),
            (CreditType::DirectDial, due.direct_dial_milli),
            (CreditType::Export, due.export_milli),
        ] {
            if milli > 0 {
                account.debit(credit_type, milli);
            }
        }
    }

    async fn serve_connection(
        self,
        stream: TcpStream,
        peer: SocketAddr,
        tls: Option<TlsAcceptor>,
        builder: auto::Builder<TokioExecutor>,
        watcher: Watcher,
    ) {
        let service = service_fn(move |request| {
            let sim = self.clone();
            async move { Ok::<_, Infallible>(sim.handle(request).await) }
        });
        let served = match tls {
            None => {
                watcher
                    .watch(builder.serve_connection(TokioIo::new(stream), service))
                    .await
            }
            Some(acceptor) => {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        watcher
                            .watch(builder.serve_connection(TokioIo::new(stream), service))
                            .await
                    }
                    Ok(Err(err)) => {
                        debug!(%peer, error = %err, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                }
            }
        };
        if let Err(err) = served {
            debug!(%peer, error = %err, "connection ended with an error");
        }
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let gzip = reply::accepts_gzip(request.headers());
        let (parts, body) = request.into_parts();
        let reply = match Limited::new(body, MAX_BODY_BYTES).collect().await {
            Ok(body) => {
                let stall = self.usage_stall(&parts);
                if !stall.is_zero() {
                    tokio::time::sleep(stall).await;
                }
                self.dispatch(&parts, &body.to_bytes(), Instant::now())
            }
            Err(err) if err.is::<LengthLimitError>() => Reply::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                format!("request body is larger than {MAX_BODY_BYTES} bytes"),
            ),
            Err(err) => {
                debug!(error = %err, "reading a request body failed");
                Reply::error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_REQUEST",
                    "the request body could not be read",
                )
            }
        };
        reply.into_response(gzip)
    }

    /// How long a `usage_stats` call is held before its answer (a fault set by a test).
    fn usage_stall(&self, parts: &request::Parts) -> Duration {
        match api::route(&parts.method, &api::canonical_path(parts.uri.path())) {
            Some(route) if route.endpoint == api::Endpoint::CreditUsageStats => {
                Duration::from_millis(lock(&self.inner.usage_fault).stall_ms)
            }
            _ => Duration::ZERO,
        }
    }

    /// Answers one request whose body has been read, as of `now`.
    fn dispatch(&self, parts: &request::Parts, body: &[u8], now: Instant) -> Reply {
        self.advance_jobs(now);
        let path = api::canonical_path(parts.uri.path());
        if let Some(action) = path.strip_prefix(CONTROL_PREFIX) {
            if (&parts.method, action) == (&http::Method::GET, "billed") {
                return control::billed(self.billed_at(now));
            }
            return control::answer(
                &parts.method,
                action,
                body,
                control::State {
                    cfg: &self.inner.cfg,
                    account: &self.inner.account,
                    usage_fault: &self.inner.usage_fault,
                    jobs: &self.inner.jobs,
                    now,
                },
            );
        }
        if usage::is_api_usage_stats(&parts.method, &path) {
            return self.api_usage_stats(parts, body, now);
        }
        let (mut reply, charge) = match api::route(&parts.method, &path) {
            Some(route) if route.endpoint == api::Endpoint::CreditUsageStats => {
                match lock(&self.inner.usage_fault).reply() {
                    Some(fault) => (fault, Charge::NONE),
                    None => self.call(route, parts, body, now),
                }
            }
            Some(route) => self.call(route, parts, body, now),
            None => (Reply::not_found(), Charge::NONE),
        };
        lock(&self.inner.account).bill(charge);
        if charge.total_milli() > 0 {
            reply
                .headers
                .insert(BILLED_HEADER, HeaderValue::from(charge.total_milli()));
        }
        reply
    }

    /// Authenticates, rate-limits and answers a call of an Apollo endpoint.
    fn call(
        &self,
        route: api::Route<'_>,
        parts: &request::Parts,
        body: &[u8],
        now: Instant,
    ) -> (Reply, Charge) {
        let query = params::parse_query(parts.uri.query().unwrap_or_default());
        let body = body::params(&parts.headers, body, MAX_BODY_BYTES);
        let Some(api_key) = api_key(&parts.headers, [body.as_ref().ok(), query.as_ref().ok()])
        else {
            return (
                Reply::text(StatusCode::UNAUTHORIZED, INVALID_API_KEY),
                Charge::NONE,
            );
        };
        // The team's call counts see every authenticated call, answered or refused.
        lock(&self.inner.api_usage).count(route.endpoint.path(), now);
        if route.endpoint == api::Endpoint::CreditUsageStats
            && self
                .inner
                .cfg
                .master_key
                .as_ref()
                .is_some_and(|master| *master != api_key)
        {
            return (api_inaccessible(route.endpoint), Charge::NONE);
        }
        let rate = lock(&self.inner.limiter).admit(&api_key, route.endpoint.path(), now);
        let (mut reply, charge) = match (rate.exceeded, query, body) {
            (Some(exceeded), _, _) => (too_many_requests(route.endpoint, exceeded), Charge::NONE),
            (None, Ok(query), Ok(body)) => {
                let ctx = api::Ctx {
                    cfg: &self.inner.cfg,
                    call: self.inner.calls.fetch_add(1, Ordering::Relaxed),
                    account: &self.inner.account,
                    jobs: &self.inner.jobs,
                    now,
                };
                let answer = api::answer(&ctx, route, &params::merge(query, body));
                (answer.reply, answer.charge)
            }
            (None, Err(err), _) => (
                Reply::error(StatusCode::BAD_REQUEST, "INVALID_REQUEST", err.to_string()),
                Charge::NONE,
            ),
            (None, _, Err(err)) => (
                Reply::error(err.status(), err.code(), err.to_string()),
                Charge::NONE,
            ),
        };
        rate.write_headers(&mut reply.headers);
        (reply, charge)
    }
}

impl Sim {
    /// `usage_stats/api_usage_stats` (free, master key): the call counts per route, or the
    /// plan's 404 / empty answer when [`SimConfig::api_usage_stats_fault`] says so.
    fn api_usage_stats(&self, parts: &request::Parts, body: &[u8], now: Instant) -> Reply {
        let query = params::parse_query(parts.uri.query().unwrap_or_default());
        let body = params::parse_body(body);
        let Some(api_key) = api_key(&parts.headers, [body.as_ref().ok(), query.as_ref().ok()])
        else {
            return Reply::text(StatusCode::UNAUTHORIZED, INVALID_API_KEY);
        };
        // Counted like any authenticated call, refused or not, and free in the billed totals.
        lock(&self.inner.api_usage).count("usage_stats/api_usage_stats", now);
        lock(&self.inner.account).bill(Charge::NONE);
        let cfg = &self.inner.cfg;
        if cfg.master_key.as_ref().is_some_and(|m| *m != api_key) {
            return Reply::error(
                StatusCode::FORBIDDEN,
                "API_INACCESSIBLE",
                "This API key is not authorized to access api/v1/usage_stats/api_usage_stats",
            );
        }
        match cfg.api_usage_stats_fault {
            Some(404) => Reply::not_found(),
            Some(status) => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                Reply::text(status, "")
            }
            None => {
                let limits = [
                    cfg.rate_limit_minute,
                    cfg.rate_limit_hourly,
                    cfg.rate_limit_daily,
                ];
                Reply::json(
                    StatusCode::OK,
                    lock(&self.inner.api_usage).stats(limits, now),
                )
            }
        }
    }
}

/// The caller's API key: `X-Api-Key`, then `Authorization: Bearer`, then `api_key` in the
/// parameter sets given (body first).
fn api_key(headers: &HeaderMap, params: [Option<&Params>; 2]) -> Option<String> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::trim)
            .filter(|value| !value.is_empty())
    };
    header("x-api-key")
        .or_else(|| header(AUTHORIZATION.as_str()).and_then(bearer_token))
        .or_else(|| {
            params
                .into_iter()
                .flatten()
                .find_map(|p| text(p, "api_key"))
        })
        .map(str::to_owned)
}

/// The token of `Bearer <token>`.
fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Apollo's 403 for a key without access to an endpoint (e.g. not a master key).
fn api_inaccessible(endpoint: api::Endpoint) -> Reply {
    Reply::error(
        StatusCode::FORBIDDEN,
        "API_INACCESSIBLE",
        format!(
            "This API key is not authorized to access api/v1/{}",
            endpoint.path()
        ),
    )
}

/// Apollo's 429, with `retry-after`.
fn too_many_requests(endpoint: api::Endpoint, exceeded: Exceeded) -> Reply {
    let message = format!(
        "The maximum number of api calls allowed for api/v1/{} is {} times per {}. \
         Please upgrade your plan from https://app.apollo.io/#/settings/plans/upgrade.",
        endpoint.path(),
        exceeded.limit,
        exceeded.window.unit(),
    );
    let mut reply = Reply::json(
        StatusCode::TOO_MANY_REQUESTS,
        serde_json::json!({ "message": message }),
    );
    reply.headers.insert(
        http::header::RETRY_AFTER,
        HeaderValue::from(exceeded.retry_after_secs),
    );
    reply
}

/// Locks shared state; a panic elsewhere while holding the lock cannot leave these counters
/// inconsistent, so a poisoned lock is used as is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
