//! What bounds the proxy listener before a caller is known: connections, requests in flight,
//! and the accounting of everything refused on the way in.
//!
//! - `proxy.max_connections`: the accept loop holds one permit per open connection; at the
//!   limit it stops accepting until a connection closes, so new connections wait in the
//!   kernel's backlog instead of being reset (`creditmeter_connections_limited_total` counts
//!   the times the limit was reached, `creditmeter_connections_open` shows the count).
//! - `proxy.max_in_flight`: [`InFlightLimit`] wraps the proxy's service; a request past the limit
//!   gets a `503 too_many_requests_in_flight` at once (nothing upstream, no ledger row), and an
//!   admitted one keeps its permit until its response body is done and its upstream exchange
//!   has its answer (a caller who resets an h2 stream does not free the slot early).
//! - [`Refusals`]: a refusal before authentication (a limit, junk, a bad attribution header, a
//!   body too large or too slow, a failed TLS handshake, headers too slow, bytes that are not
//!   HTTP) is a count in
//!   `creditmeter_refused_total{reason}` and, at most once per reason per
//!   [`REFUSAL_LOG_EVERY`], a log line with how many there were: strangers knocking on a public
//!   port cost neither a ledger commit nor a log line each.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::forwarded::TrustedProxies;
use super::{Proxy, ProxyBody};

/// One log line per refusal reason at most this often; the line says how many were refused.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

pub use crate::config::validate_proxy_limits as validate;

/// The listener's own metrics (names in DESIGN.md and README).
#[derive(Clone)]
pub struct EdgeMetrics {
    /// `creditmeter_refused_total{reason}`.
    refused: IntCounterVec,
    /// `creditmeter_connections_open`: proxy connections open now.
    pub connections_open: IntGauge,
    /// `creditmeter_connections_limited_total`: times the accept loop reached
    /// `proxy.max_connections` and waited for a connection to close.
    pub connections_limited: IntCounter,
    /// `creditmeter_tls_reloads_total{result}`: certificate reloads (`ok`, `error`).
    pub tls_reloads: IntCounterVec,
}

/// Refusal reasons present from the first scrape (others appear when first counted).
const KNOWN_REASONS: [&str; 11] = [
    "max_in_flight",
    "tls_handshake",
    "header_timeout",
    "malformed_request",
    "connect_refused",
    "absolute_uri_refused",
    "proxy_token_required",
    "invalid_attribution",
    "request_body_too_large",
    "request_body_timeout",
    "request_body_unreadable",
];

impl EdgeMetrics {
    /// Registers the listener's metrics on `registry`, with a `creditmeter_refused_total` of
    /// its own (for tests; the server shares the one `Metrics` registered).
    pub fn register(registry: &Registry) -> Result<EdgeMetrics, prometheus::Error> {
        let refused = IntCounterVec::new(
            Opts::new(
                "creditmeter_refused_total",
                "Requests and connections refused before authentication, by reason (no ledger row each).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(refused.clone()))?;
        Self::register_with(registry, refused)
    }

    /// Registers the listener's metrics on `registry`, counting refusals in `refused`
    /// (`creditmeter_refused_total`, already registered by `Metrics`, which the virtual-key
    /// refusals count in too).
    pub fn register_with(
        registry: &Registry,
        refused: IntCounterVec,
    ) -> Result<EdgeMetrics, prometheus::Error> {
        let connections_open = IntGauge::new(
            "creditmeter_connections_open",
            "Connections open on the proxy listener.",
        )?;
        let connections_limited = IntCounter::new(
            "creditmeter_connections_limited_total",
            "Times the proxy listener reached proxy.max_connections and stopped accepting until a connection closed.",
        )?;
        let tls_reloads = IntCounterVec::new(
            Opts::new(
                "creditmeter_tls_reloads_total",
                "Reloads of the proxy's TLS certificate and key, by result (ok; error: the old pair stays).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(connections_limited.clone()))?;
        registry.register(Box::new(tls_reloads.clone()))?;
        for reason in KNOWN_REASONS {
            refused.with_label_values(&[reason]);
        }
        for result in ["ok", "error"] {
            tls_reloads.with_label_values(&[result]);
        }
        Ok(EdgeMetrics {
            refused,
            connections_open,
            connections_limited,
            tls_reloads,
        })
    }
}

/// Counts refusals and logs them rate-limited.
pub struct Refusals {
    metrics: EdgeMetrics,
    log: Mutex<HashMap<&'static str, LogWindow>>,
    every: Duration,
}

/// The refusals of one reason not yet logged.
struct LogWindow {
    /// When this reason was last logged.
    logged_at: Instant,
    /// Refusals since then.
    unlogged: u64,
}

impl Refusals {
    pub fn new(metrics: EdgeMetrics) -> Refusals {
        Refusals::with_interval(metrics, REFUSAL_LOG_EVERY)
    }

    /// Like [`Refusals::new`], logging each reason at most once per `every`.
    pub fn with_interval(metrics: EdgeMetrics, every: Duration) -> Refusals {
        Refusals {
            metrics,
            log: Mutex::new(HashMap::new()),
            every,
        }
    }

    /// The listener metrics these refusals count into.
    pub fn metrics(&self) -> &EdgeMetrics {
        &self.metrics
    }

    /// Counts one refusal of `reason` (a fixed code: it is a metric label) from `client`,
    /// and logs it unless this reason was logged less than the interval ago; the next line
    /// then says how many were refused in between. `detail` never carries a credential.
    pub fn refuse(&self, reason: &'static str, client: Option<IpAddr>, detail: &str) {
        self.metrics.refused.with_label_values(&[reason]).inc();
        if let Some(n) = self.due(reason, Instant::now()) {
            let client = client.map(|c| c.to_string()).unwrap_or_default();
            tracing::info!(
                reason,
                refused = n,
                since_secs = self.every.as_secs(),
                last_client = %client,
                detail,
                "refused before authentication (logged at most once per reason per interval; creditmeter_refused_total counts each)"
            );
        }
    }

    /// `Some(n)` when `reason` is due to be logged: `n` refusals since the last line (this one
    /// included).
    fn due(&self, reason: &'static str, now: Instant) -> Option<u64> {
        let mut log = match self.log.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        match log.get_mut(reason) {
            None => {
                log.insert(
                    reason,
                    LogWindow {
                        logged_at: now,
                        unlogged: 0,
                    },
                );
                Some(1)
            }
            Some(w) if now.duration_since(w.logged_at) >= self.every => {
                let n = w.unlogged + 1;
                w.logged_at = now;
                w.unlogged = 0;
                Some(n)
            }
            Some(w) => {
                w.unlogged += 1;
                None
            }
        }
    }
}

/// Who sent a request: the TCP peer, and the caller behind it (`X-Forwarded-For` from a
/// trusted proxy, else the peer). Put in each request's extensions by [`InFlightLimit`].
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr {
    pub peer: SocketAddr,
    pub client: IpAddr,
}

impl ClientAddr {
    /// The caller's address from a request's extensions, when the listener recorded one.
    pub fn of(extensions: &http::Extensions) -> Option<IpAddr> {
        extensions.get::<ClientAddr>().map(|c| c.client)
    }
}

/// One request's `proxy.max_in_flight` permit, in the request's extensions so that the
/// upstream exchange (which outlives a caller who hangs up) holds it too: the request counts
/// until both its response body and its upstream exchange are done.
#[derive(Clone)]
pub struct InFlightPermit(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

/// The shared state of the in-flight limit.
pub struct EdgeGuard {
    pub in_flight: Arc<Semaphore>,
    pub max_in_flight: usize,
    pub refusals: Arc<Refusals>,
    pub trusted: TrustedProxies,
}

/// The proxy's service on one connection: records who is calling, and holds one
/// `proxy.max_in_flight` permit per request until its response body is done.
#[derive(Clone)]
pub struct InFlightLimit {
    proxy: Arc<Proxy>,
    guard: Arc<EdgeGuard>,
    peer: SocketAddr,
}

impl InFlightLimit {
    pub fn new(proxy: Arc<Proxy>, guard: Arc<EdgeGuard>, peer: SocketAddr) -> Self {
        Self { proxy, guard, peer }
    }
}

/// The proxy's response body, with the in-flight permit it holds.
pub type LimitedBody = PermitBody<ProxyBody>;

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<LimitedBody>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for InFlightLimit {
    type Response = Response<LimitedBody>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let client = self.guard.trusted.client_ip(self.peer.ip(), req.headers());
        req.extensions_mut().insert(ClientAddr {
            peer: self.peer,
            client,
        });
        let permit = match self.guard.in_flight.clone().try_acquire_owned() {
            Ok(p) => InFlightPermit(Arc::new(p)),
            Err(_) => {
                self.guard.refusals.refuse(
                    "max_in_flight",
                    Some(client),
                    "proxy.max_in_flight requests are already being handled",
                );
                let resp = too_many_in_flight(self.guard.max_in_flight);
                return Box::pin(async move { Ok(resp) });
            }
        };
        req.extensions_mut().insert(permit.clone());
        let proxy = self.proxy.clone();
        Box::pin(async move {
            let resp = match proxy.handle(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            Ok(resp.map(|body| PermitBody::new(body, Some(permit))))
        })
    }
}

/// `503 too_many_requests_in_flight`, JSON, with `Retry-After: 1`.
fn too_many_in_flight(limit: usize) -> Response<LimitedBody> {
    let body = serde_json::json!({
        "error": "too_many_requests_in_flight",
        "message": format!("creditmeter is already handling proxy.max_in_flight ({limit}) requests; nothing was sent upstream, retry shortly"),
        "source": "creditmeter",
    });
    let mut resp = Response::new(PermitBody::new(
        Either::Right(Either::Left(Full::new(Bytes::from(body.to_string())))),
        None,
    ));
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

pin_project_lite::pin_project! {
    /// A body passed through frame by frame, holding a permit until it ends or is dropped.
    pub struct PermitBody<B> {
        #[pin]
        inner: B,
        permit: Option<InFlightPermit>,
    }
}

impl<B> PermitBody<B> {
    pub fn new(inner: B, permit: Option<InFlightPermit>) -> Self {
        Self { inner, permit }
    }
}

impl<B: Body> Body for PermitBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = polled {
            // The body is done: the request no longer counts as in flight.
            this.permit.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProxyConfig;

    fn refusals(every: Duration) -> Refusals {
        let registry = Registry::new();
        Refusals::with_interval(EdgeMetrics::register(&registry).unwrap(), every)
    }

    #[test]
    fn each_reason_is_logged_once_per_interval_with_the_count_in_between() {
        let r = refusals(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(r.due("junk", t0), Some(1), "the first one is logged");
        for i in 1..=41 {
            assert_eq!(r.due("junk", t0 + Duration::from_millis(i * 200)), None);
        }
        assert_eq!(
            r.due("other", t0 + Duration::from_secs(1)),
            Some(1),
            "per reason"
        );
        assert_eq!(
            r.due("junk", t0 + Duration::from_secs(10)),
            Some(42),
            "41 held back plus this one"
        );
        assert_eq!(r.due("junk", t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn every_refusal_is_counted_whether_logged_or_not() {
        let r = refusals(Duration::from_secs(3600));
        for _ in 0..5 {
            r.refuse("invalid_attribution", None, "x");
        }
        assert_eq!(
            r.metrics
                .refused
                .with_label_values(&["invalid_attribution"])
                .get(),
            5
        );
    }

    #[test]
    fn limits_must_be_positive_and_proxies_parse() {
        let bad = |f: fn(&mut ProxyConfig), key: &str| {
            let mut p = ProxyConfig::default();
            f(&mut p);
            let e = validate(&p).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        };
        bad(|p| p.max_connections = 0, "proxy.max_connections");
        bad(|p| p.max_in_flight = 0, "proxy.max_in_flight");
        bad(
            |p| p.h2_max_concurrent_streams = 0,
            "proxy.h2_max_concurrent_streams",
        );
        bad(
            |p| p.trusted_proxies = vec!["10.0.0.0/33".into()],
            "proxy.trusted_proxies",
        );
        validate(&ProxyConfig::default()).unwrap();
    }
}
