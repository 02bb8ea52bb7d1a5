//! The admin listener: `/metrics` (Prometheus text), `/healthz` (alive) and `/readyz` (ledger
//! writable, config loaded, not shutting down). It is served on its own address, loopback by
//! default, never on the proxy listener.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::ledger::LedgerHandle;
use crate::metrics::Metrics;

/// What the admin endpoints read.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub ledger: LedgerHandle,
    /// Set when shutdown starts: `/readyz` turns 503 so load balancers stop sending traffic.
    pub draining: Arc<AtomicBool>,
    pub durability: &'static str,
}

impl Admin {
    /// Serves one admin request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Ok(text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET is served here\n".into(),
            ));
        }
        Ok(match req.uri().path() {
            "/metrics" => {
                let mut r = Response::new(Full::new(Bytes::from(self.metrics.encode())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            "/healthz" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" => {
                let ledger_ok = self.ledger.is_healthy();
                let draining = self.draining.load(Ordering::Relaxed);
                let body = serde_json::json!({
                    "ready": ledger_ok && !draining,
                    "ledger": if ledger_ok { "writable" } else { "failing" },
                    "config": "loaded",
                    "durability": self.durability,
                    "draining": draining,
                });
                let status = if ledger_ok && !draining {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
                *r.status_mut() = status;
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz or /readyz\n".into(),
            ),
        })
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
