//! The proxy: accepts a caller's request, attributes it, forwards it to the one configured
//! upstream, and streams the response back through the metering tap.
//!
//! Flow of one call: guards (no CONNECT, no absolute-form targets: this is not an open proxy) →
//! attribution (strip `x-meter-*`, 400 on bad values) → read the request body (capped) → classify
//! and read parameters → spawn the upstream exchange as its own task (so a caller that leaves
//! early cannot cancel the metering of a call Apollo may bill) → response head with
//! `X-Meter-Request-Id` → tapped body.

pub mod listener;
pub mod tap;
pub mod upstream;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::attribution::{self, KeyFingerprinter};
use crate::catalog::RequestParams;
use crate::ledger::Outcome;
use crate::meter::{now_ms, CallContext, CallMeter, Captured, Finish, Meter, RequestIds};
use tap::{error_chain, DrainSettings, TapBody};
use upstream::Upstream;

/// The body type the proxy answers with: a tapped upstream body or a small local one.
pub type ProxyBody = Either<TapBody, Full<Bytes>>;

/// The response header carrying the call's ledger `request_id`.
pub const REQUEST_ID_HEADER: &str = "x-meter-request-id";

/// Everything a call needs, shared by all connections.
pub struct Proxy {
    pub upstream: Upstream,
    pub meter: Arc<Meter>,
    pub fingerprints: KeyFingerprinter,
    pub ids: RequestIds,
    pub require_table: bool,
    pub max_request_body: u64,
    pub upstream_timeout: Duration,
    pub drain: DrainSettings,
}

impl Proxy {
    /// Serves one request. Never fails: every problem becomes a JSON error response.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let request_id = self.ids.next();
        let started_at = now_ms();
        let (mut parts, body) = req.into_parts();
        let method = parts.method.clone();
        let path = parts.uri.path().to_owned();
        let endpoint = self.meter.catalog.classify_id(method.as_str(), &path);

        let reject =
            |status: StatusCode, code: &'static str, message: String, field: Option<&str>| {
                let ctx = CallContext {
                    request_id: request_id.clone(),
                    started_at,
                    method: method.to_string(),
                    path: path.clone(),
                    endpoint,
                    params: RequestParams::default(),
                    attribution: Default::default(),
                    key_fp: None,
                    request_bytes: 0,
                };
                (status, code, message, field.map(str::to_owned), ctx)
            };

        // Guards: this proxy reaches exactly one upstream.
        let refused = if method == Method::CONNECT {
            Some(reject(
                StatusCode::METHOD_NOT_ALLOWED,
                "connect_refused",
                "CONNECT is not supported: creditmeter forwards only to its configured upstream"
                    .into(),
                None,
            ))
        } else if parts.version < Version::HTTP_2 && parts.uri.authority().is_some() {
            Some(reject(
                StatusCode::BAD_REQUEST,
                "absolute_uri_refused",
                format!(
                    "request targets another host ({}); creditmeter is not an open proxy: send origin-form paths like /api/v1/people/match",
                    parts.uri.authority().map(|a| a.as_str()).unwrap_or("")
                ),
                None,
            ))
        } else {
            None
        };
        if let Some((status, code, message, field, ctx)) = refused {
            return Ok(self.refuse(ctx, status, code, message, field, None).await);
        }

        // Attribution: read and strip x-meter-*; bad values never reach upstream.
        let (attribution, query) =
            match attribution::extract(&mut parts.headers, parts.uri.query(), self.require_table) {
                Ok(v) => v,
                Err(e) => {
                    let (status, code, message, field, ctx) = reject(
                        StatusCode::BAD_REQUEST,
                        "invalid_attribution",
                        e.to_string(),
                        e.field(),
                    );
                    return Ok(self.refuse(ctx, status, code, message, field, None).await);
                }
            };

        // ledger.on_error = "fail_closed": no credit may be spent while the ledger cannot record it.
        if self.meter.ledger.refuse_new_calls() {
            let (status, code, message, field, ctx) = reject(
                StatusCode::SERVICE_UNAVAILABLE,
                "ledger_unavailable",
                "the ledger cannot record calls right now and ledger.on_error = \"fail_closed\"; nothing was sent upstream".into(),
                None,
            );
            return Ok(self
                .refuse(ctx, status, code, message, field, Some(attribution))
                .await);
        }

        // The request body: small JSON, read whole (capped) because pricing needs its parameters.
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u64>().ok());
        let too_large = || {
            reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_body_too_large",
                format!(
                    "request body exceeds proxy.max_request_body ({} bytes)",
                    self.max_request_body
                ),
                None,
            )
        };
        if declared.is_some_and(|n| n > self.max_request_body) {
            let (status, code, message, field, ctx) = too_large();
            return Ok(self
                .refuse(ctx, status, code, message, field, Some(attribution))
                .await);
        }
        let body_bytes = match Limited::new(body, self.max_request_body as usize)
            .collect()
            .await
        {
            Ok(c) => c.to_bytes(),
            Err(e) => {
                let (status, code, message, field, ctx) =
                    if e.is::<http_body_util::LengthLimitError>() {
                        too_large()
                    } else {
                        reject(
                            StatusCode::BAD_REQUEST,
                            "request_body_unreadable",
                            format!(
                                "could not read the request body: {}",
                                error_chain(e.as_ref())
                            ),
                            None,
                        )
                    };
                return Ok(self
                    .refuse(ctx, status, code, message, field, Some(attribution))
                    .await);
            }
        };

        let params = RequestParams::parse(query.as_deref(), &body_bytes);
        let key_fp = attribution::api_key_from_headers(&parts.headers)
            .or_else(|| params.api_key())
            .map(|k| self.fingerprints.fingerprint(k));
        let ctx = CallContext {
            request_id: request_id.clone(),
            started_at,
            method: method.to_string(),
            path: path.clone(),
            endpoint,
            params,
            attribution,
            key_fp,
            request_bytes: body_bytes.len() as i64,
        };
        let call = CallMeter::new(self.meter.clone(), ctx);

        // The upstream request: same method, path, query (minus meter_*), headers and body.
        let uri = match self.upstream.uri_for(&path, query.as_deref()) {
            Ok(u) => u,
            Err(e) => {
                return Ok(self
                    .fail_before_upstream(
                        call,
                        StatusCode::BAD_REQUEST,
                        "invalid_path",
                        format!("cannot forward this path: {e}"),
                    )
                    .await)
            }
        };
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        parts.headers.remove(header::CONTENT_LENGTH);
        let mut up = Request::new(Full::new(body_bytes));
        *up.method_mut() = method.clone();
        *up.uri_mut() = uri;
        *up.headers_mut() = parts.headers;
        *up.version_mut() = Version::HTTP_11; // the pool picks h2 by ALPN when upstream offers it

        let (tx, rx) = oneshot::channel();
        let this = self.clone();
        self.drain.tracker.spawn(async move {
            let response = this.exchange(up, call, method == Method::HEAD).await;
            // If the caller is gone, the response (and its tap) is dropped here, which meters it.
            let _ = tx.send(response);
        });
        Ok(rx.await.unwrap_or_else(|_| {
            json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the upstream task ended unexpectedly".into(),
                &request_id,
                None,
            )
        }))
    }

    /// Runs the upstream exchange up to the response head, and wraps the body in the tap.
    async fn exchange(
        &self,
        req: Request<Full<Bytes>>,
        mut call: CallMeter,
        head: bool,
    ) -> Response<ProxyBody> {
        let deadline = Instant::now() + self.upstream_timeout;
        call.upstream_sent();
        let sent = tokio::select! {
            r = tokio::time::timeout_at(deadline, self.upstream.request(req)) => r,
            _ = self.drain.hard_stop.cancelled() => {
                return self.fail_upstream(call, StatusCode::SERVICE_UNAVAILABLE, "shutting_down", Outcome::UpstreamError,
                    "creditmeter is shutting down".into()).await;
            }
        };
        let resp = match sent {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                let what = if e.is_connect() {
                    "could not connect to upstream"
                } else {
                    "upstream failed before sending a response"
                };
                return self
                    .fail_upstream(
                        call,
                        StatusCode::BAD_GATEWAY,
                        "upstream_error",
                        Outcome::UpstreamError,
                        format!("{what}: {}", error_chain(&e)),
                    )
                    .await;
            }
            Err(_) => {
                return self
                    .fail_upstream(
                        call,
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        Outcome::UpstreamTimeout,
                        format!(
                            "upstream did not answer within upstream.timeout ({:?})",
                            self.upstream_timeout
                        ),
                    )
                    .await;
            }
        };
        let (mut parts, body) = resp.into_parts();
        call.response_head(parts.status.as_u16(), &parts.headers);
        strip_hop_by_hop(&mut parts.headers);
        if let Ok(v) = HeaderValue::from_str(call.request_id()) {
            parts.headers.insert(REQUEST_ID_HEADER, v);
        }
        let bodiless = head
            || parts.status == StatusCode::NO_CONTENT
            || parts.status == StatusCode::NOT_MODIFIED
            || parts.status.is_informational()
            || body.is_end_stream();
        if bodiless {
            let ack = call.finish(Finish {
                outcome: Outcome::Ok,
                body: Captured::default(),
                response_bytes: 0,
                error: None,
            });
            if let Some(ack) = ack {
                let _ = ack.await;
            }
            return Response::from_parts(parts, Either::Right(Full::new(Bytes::new())));
        }
        let tap = TapBody::new(body, call, deadline, self.drain.clone());
        Response::from_parts(parts, Either::Left(tap))
    }

    /// A call refused before anything went upstream: recorded as `rejected`, answered with JSON.
    async fn refuse(
        &self,
        ctx: CallContext,
        status: StatusCode,
        code: &'static str,
        message: String,
        field: Option<String>,
        attribution: Option<attribution::Attribution>,
    ) -> Response<ProxyBody> {
        let mut ctx = ctx;
        if let Some(a) = attribution {
            ctx.attribution = a;
        }
        let request_id = ctx.request_id.clone();
        tracing::info!(request_id, status = status.as_u16(), code, %message, "call refused");
        let mut call = CallMeter::new(self.meter.clone(), ctx);
        let ack = call.finish(Finish {
            outcome: Outcome::Rejected,
            body: Captured::default(),
            response_bytes: 0,
            error: Some(message.clone()),
        });
        if let Some(ack) = ack {
            let _ = ack.await;
        }
        json_error(status, code, message, &request_id, field.as_deref())
    }

    async fn fail_before_upstream(
        &self,
        call: CallMeter,
        status: StatusCode,
        code: &'static str,
        message: String,
    ) -> Response<ProxyBody> {
        self.fail_with(call, status, code, Outcome::Rejected, message)
            .await
    }

    async fn fail_upstream(
        &self,
        call: CallMeter,
        status: StatusCode,
        code: &'static str,
        outcome: Outcome,
        message: String,
    ) -> Response<ProxyBody> {
        tracing::warn!(request_id = call.request_id(), code, %message, "upstream failure");
        self.fail_with(call, status, code, outcome, message).await
    }

    async fn fail_with(
        &self,
        mut call: CallMeter,
        status: StatusCode,
        code: &'static str,
        outcome: Outcome,
        message: String,
    ) -> Response<ProxyBody> {
        let request_id = call.request_id().to_owned();
        let ack = call.finish(Finish {
            outcome,
            body: Captured::default(),
            response_bytes: 0,
            error: Some(message.clone()),
        });
        if let Some(ack) = ack {
            let _ = ack.await;
        }
        json_error(status, code, message, &request_id, None)
    }
}

/// A JSON error a caller can read: `{"error": code, "message": …, "request_id": …}`.
pub fn json_error(
    status: StatusCode,
    code: &str,
    message: String,
    request_id: &str,
    field: Option<&str>,
) -> Response<ProxyBody> {
    let mut body = serde_json::json!({
        "error": code,
        "message": message,
        "request_id": request_id,
        "source": "creditmeter",
    });
    if let Some(f) = field {
        body["field"] = serde_json::Value::String(f.to_owned());
    }
    let bytes = Bytes::from(body.to_string());
    let mut resp = Response::new(Either::Right(Full::new(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including any named in `Connection`, and `Upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for h in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(h);
    }
    headers.remove(header::UPGRADE);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_end_to_end_stay() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        h.insert("x-api-key", HeaderValue::from_static("k"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["content-encoding", "x-api-key"]);
    }
}
