//! The proxy: accepts a caller's request, attributes it, forwards it to the one configured
//! upstream, and streams the response back through the metering tap.
//!
//! Flow of one call: guards (no CONNECT, no absolute-form targets: this is not an open proxy) →
//! attribution (strip `x-meter-*`, 400 on bad values) → read the request body (capped) → classify
//! and read parameters → admission (holds and budgets, see `guard`; 429/503 when refused) →
//! spawn the upstream exchange as its own task (so a caller that leaves early cannot cancel the
//! metering of a call Apollo may bill) → response head with `X-Meter-Request-Id` → tapped body.
//!
//! With `proxy.metering = false` a call takes the same guards, attribution checks, body cap and
//! header hygiene, then goes straight upstream and back: no ledger row, no pricing, no
//! admission, no tap, no spawned task, no request id.

pub mod listener;
pub mod tap;
/// The upstream client is a module of its own (the pollers use it too).
pub use crate::upstream;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::attribution::{self, Attribution, KeyFingerprinter};
use crate::catalog::{canonical_path, RequestBody, RequestParams};
use crate::guard::{Guard, Refusal};
use crate::ledger::Outcome;
use crate::meter::{now_ms, CallContext, CallMeter, Captured, Finish, Meter, RequestIds};
use tap::{error_chain, DrainSettings, TapBody};
use upstream::Upstream;

/// The body type the proxy answers with: a tapped upstream body, a small local one, or, with
/// `proxy.metering = false`, upstream's body passed through untouched.
pub type ProxyBody = Either<TapBody, Either<Full<Bytes>, Incoming>>;

/// The request header carrying the proxy access token (stripped like every `x-meter-*`).
pub const PROXY_TOKEN_HEADER: &str = "x-meter-token";

/// The response header carrying the call's ledger `request_id`.
pub const REQUEST_ID_HEADER: &str = "x-meter-request-id";

pub use crate::settings::{ProxySettings, SettingsCell};

/// Everything a call needs, shared by all connections.
pub struct Proxy {
    pub upstream: Upstream,
    pub meter: Arc<Meter>,
    pub guard: Arc<Guard>,
    pub fingerprints: KeyFingerprinter,
    pub ids: RequestIds,
    pub settings: Arc<SettingsCell>,
    /// SHA-256 of `proxy.require_token`'s token: callers must send it in `X-Meter-Token`.
    pub token_digest: Option<ring::digest::Digest>,
    pub max_request_body: u64,
    pub upstream_timeout: Duration,
    pub drain: DrainSettings,
    /// `proxy.metering`: when false, calls are forwarded unrecorded (see `handle_unmetered`).
    pub metering: bool,
}

impl Proxy {
    /// The settings in force now.
    pub fn settings(&self) -> Arc<ProxySettings> {
        self.settings.get()
    }

    /// Swaps in reloaded settings; calls already running keep the ones they started with.
    pub fn reload(&self, new: ProxySettings) {
        self.settings.set(new);
    }

    /// Serves one request. Never fails: every problem becomes a JSON error response.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        if !self.metering {
            return Ok(self.handle_unmetered(req).await);
        }
        let request_id = self.ids.next();
        let started_at = now_ms();
        let (mut parts, body) = req.into_parts();
        let method = parts.method.clone();
        // Classified, recorded and forwarded in one form: what Apollo's router makes of it.
        let path = canonical_path(parts.uri.path()).into_owned();
        let settings = self.settings();
        let catalog = settings.catalog.clone();
        let endpoint = catalog.classify_id(method.as_str(), &path);
        // What a call refused before its body was read is recorded with.
        let refused = |attribution: Attribution| CallContext {
            request_id: request_id.clone(),
            started_at,
            method: method.to_string(),
            path: path.clone(),
            catalog: catalog.clone(),
            endpoint,
            params: RequestParams::default(),
            attribution,
            key_fp: None,
            request_bytes: 0,
        };

        let (attribution, query) = match self.screen(&mut parts, settings.require_table) {
            Ok(v) => v,
            Err(r) => return Ok(self.refuse(refused(Attribution::default()), r).await),
        };

        // ledger.on_error = "fail_closed": no credit may be spent while the ledger cannot record it.
        if self.meter.ledger.refuse_new_calls() {
            let r = Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ledger_unavailable",
                "the ledger cannot record calls right now and ledger.on_error = \"fail_closed\"; nothing was sent upstream",
            );
            return Ok(self.refuse(refused(attribution), r).await);
        }

        // The request body: small JSON, read whole (capped) because pricing needs its parameters.
        let body_bytes = match self.read_body(&parts.headers, body).await {
            Ok(b) => b,
            Err(r) => return Ok(self.refuse(refused(attribution), r).await),
        };

        // Our copy of the parameters, read as Apollo reads them (JSON or form, decoded); the
        // body itself goes upstream byte for byte.
        let header = |name| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let params = RequestParams::from_request(
            query.as_deref(),
            &RequestBody {
                content_type: header(header::CONTENT_TYPE),
                content_encoding: header(header::CONTENT_ENCODING),
                bytes: &body_bytes,
                // A compressed body may decode to no more than an uncompressed one may be, so
                // decoding it costs the async worker no more than reading that would.
                max_decoded: self
                    .meter
                    .max_decoded
                    .min(usize::try_from(self.max_request_body).unwrap_or(usize::MAX)),
            },
        );
        let key_fp = attribution::api_key_from_headers(&parts.headers)
            .or_else(|| params.api_key())
            .map(|k| self.fingerprints.fingerprint(k));
        let ctx = CallContext {
            request_id: request_id.clone(),
            started_at,
            method: method.to_string(),
            path,
            catalog,
            endpoint,
            params,
            attribution,
            key_fp,
            request_bytes: body_bytes.len() as i64,
        };
        let forward_path = ctx.path.clone();
        // Admission: a held call, or one whose worst case would cross a block budget, costs
        // nothing upstream. An admitted call's reservation settles when its meter finishes.
        // (It may wait up to guard.admission_wait for calls in flight to settle.)
        let admission = match self
            .guard
            .admit_waiting(
                &ctx.request_id,
                ctx.facts(),
                ctx.started_at,
                ctx.worst_case(),
            )
            .await
        {
            Ok(a) => a,
            Err(refusal) => return Ok(self.refuse_guarded(ctx, refusal).await),
        };
        let call = CallMeter::new(self.meter.clone(), ctx).with_admission(admission);

        let up = match self.upstream_request(parts, &forward_path, query.as_deref(), body_bytes) {
            Ok(up) => up,
            Err(r) => return Ok(self.fail_with(call, r, Outcome::Rejected).await),
        };
        let (tx, rx) = oneshot::channel();
        let this = self.clone();
        self.drain.tracker.spawn(async move {
            let response = this.exchange(up, call, method == Method::HEAD).await;
            // If the caller is gone, the response (and its tap) is dropped here, which meters it.
            let _ = tx.send(response);
        });
        Ok(rx.await.unwrap_or_else(|_| {
            Rejection::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the upstream task ended unexpectedly",
            )
            .response(Some(&request_id))
        }))
    }

    /// `proxy.metering = false`: the same guards, attribution checks, body cap and header
    /// hygiene as a metered call, then upstream's answer passed through as it comes. Nothing
    /// is recorded, priced or admitted, and no task is spawned: the call lives on its
    /// connection, and there is no request id to name.
    async fn handle_unmetered(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let up = match self.unmetered_request(req).await {
            Ok(up) => up,
            Err(r) => {
                tracing::info!(status = r.status.as_u16(), code = r.code, message = %r.message, "call refused (metering off)");
                return r.response(None);
            }
        };
        match self
            .send_upstream(up, Instant::now() + self.upstream_timeout)
            .await
        {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Either::Right(Either::Right(body)))
            }
            Err((r, _)) => {
                tracing::warn!(code = r.code, message = %r.message, "upstream failure (metering off)");
                r.response(None)
            }
        }
    }

    /// The upstream request of an unmetered call, or why it may not go upstream.
    async fn unmetered_request(
        &self,
        req: Request<Incoming>,
    ) -> Result<Request<Full<Bytes>>, Rejection> {
        let (mut parts, body) = req.into_parts();
        let (_, query) = self.screen(&mut parts, self.settings().require_table)?;
        let body = self.read_body(&parts.headers, body).await?;
        let path = canonical_path(parts.uri.path()).into_owned();
        self.upstream_request(parts, &path, query.as_deref(), body)
    }

    /// What every call must pass, metered or not: the guards (no CONNECT, no absolute-form
    /// targets: this proxy reaches exactly one upstream), `proxy.require_token`, and
    /// attribution (every `x-meter-*` header and `meter_*` parameter removed, bad values
    /// refused). Returns the attribution and the query string to forward.
    fn screen(
        &self,
        parts: &mut request::Parts,
        require_table: bool,
    ) -> Result<(Attribution, Option<String>), Rejection> {
        if parts.method == Method::CONNECT {
            return Err(Rejection::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "connect_refused",
                "CONNECT is not supported: creditmeter forwards only to its configured upstream",
            ));
        }
        if parts.version < Version::HTTP_2 && parts.uri.authority().is_some() {
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "absolute_uri_refused",
                format!(
                    "request targets another host ({}); creditmeter is not an open proxy: send origin-form paths like /api/v1/people/match",
                    // The host only: an authority can carry `user:password@` (a credential).
                    parts.uri.host().unwrap_or("")
                ),
            ));
        }
        // proxy.require_token: only callers holding the token may spend credits through us.
        if let Some(want) = &self.token_digest {
            let given = parts
                .headers
                .get(PROXY_TOKEN_HEADER)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            let given = ring::digest::digest(&ring::digest::SHA256, given);
            if !creditmeter_base::constant_time_eq(given.as_ref(), want.as_ref()) {
                return Err(Rejection::new(
                    StatusCode::UNAUTHORIZED,
                    "proxy_token_required",
                    "this creditmeter requires X-Meter-Token with the proxy access token (proxy.require_token)",
                )
                .field("X-Meter-Token"));
            }
        }
        // Attribution: read and strip x-meter-*; bad values never reach upstream.
        attribution::extract(&mut parts.headers, parts.uri.query(), require_table).map_err(|e| {
            let r = Rejection::new(
                StatusCode::BAD_REQUEST,
                "invalid_attribution",
                e.to_string(),
            );
            match e.field() {
                Some(f) => r.field(f),
                None => r,
            }
        })
    }

    /// The request body, read whole up to `proxy.max_request_body` (413 past it).
    async fn read_body(&self, headers: &HeaderMap, body: Incoming) -> Result<Bytes, Rejection> {
        let too_large = || {
            Rejection::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_body_too_large",
                format!(
                    "request body exceeds proxy.max_request_body ({} bytes)",
                    self.max_request_body
                ),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_request_body) {
            return Err(too_large());
        }
        match Limited::new(body, self.max_request_body as usize)
            .collect()
            .await
        {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
            Err(e) => Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "request_body_unreadable",
                format!(
                    "could not read the request body: {}",
                    error_chain(e.as_ref())
                ),
            )),
        }
    }

    /// The upstream request: same method, query (minus `meter_*`), headers (minus hop-by-hop
    /// ones and `Host`) and body, byte for byte; the path in its canonical form (`path`, from
    /// [`canonical_path`]), which Apollo's router reads exactly as it reads the caller's.
    fn upstream_request(
        &self,
        mut parts: request::Parts,
        path: &str,
        query: Option<&str>,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, Rejection> {
        let uri = self.upstream.uri_for(path, query).map_err(|e| {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                "invalid_path",
                format!("cannot forward this path: {e}"),
            )
        })?;
        let trailers = accepts_trailers(&parts.headers);
        strip_hop_by_hop(&mut parts.headers);
        if trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        parts.headers.remove(header::HOST);
        parts.headers.remove(header::CONTENT_LENGTH);
        let mut up = Request::new(Full::new(body));
        *up.method_mut() = parts.method;
        *up.uri_mut() = uri;
        *up.headers_mut() = parts.headers;
        *up.version_mut() = Version::HTTP_11; // the pool picks h2 by ALPN when upstream offers it
        Ok(up)
    }

    /// Sends `req` and waits for the response head until `deadline` (or the hard stop of
    /// shutdown). A failure comes back as the JSON error to answer and the outcome to record.
    async fn send_upstream(
        &self,
        req: Request<Full<Bytes>>,
        deadline: Instant,
    ) -> Result<Response<Incoming>, (Rejection, Outcome)> {
        let sent = tokio::select! {
            r = tokio::time::timeout_at(deadline, self.upstream.request(req)) => r,
            _ = self.drain.hard_stop.cancelled() => {
                return Err((
                    Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "creditmeter is shutting down"),
                    Outcome::UpstreamError,
                ));
            }
        };
        match sent {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                let what = if e.is_connect() {
                    "could not connect to upstream"
                } else {
                    "upstream failed before sending a response"
                };
                Err((
                    Rejection::new(
                        StatusCode::BAD_GATEWAY,
                        "upstream_error",
                        format!("{what}: {}", error_chain(&e)),
                    ),
                    Outcome::UpstreamError,
                ))
            }
            Err(_) => Err((
                Rejection::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    format!(
                        "upstream did not answer within upstream.timeout ({:?})",
                        self.upstream_timeout
                    ),
                ),
                Outcome::UpstreamTimeout,
            )),
        }
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
        let resp = match self.send_upstream(req, deadline).await {
            Ok(resp) => resp,
            Err((r, outcome)) => return self.fail_upstream(call, r, outcome).await,
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
            return Response::from_parts(parts, local_body(Bytes::new()));
        }
        let tap = TapBody::new(body, call, deadline, self.drain.clone());
        Response::from_parts(parts, Either::Left(tap))
    }

    /// A call refused before anything went upstream: recorded as `rejected`, answered with JSON.
    async fn refuse(&self, ctx: CallContext, r: Rejection) -> Response<ProxyBody> {
        tracing::info!(request_id = ctx.request_id, status = r.status.as_u16(), code = r.code, message = %r.message, "call refused");
        self.fail_with(
            CallMeter::new(self.meter.clone(), ctx),
            r,
            Outcome::Rejected,
        )
        .await
    }

    /// A call refused by a hold or a budget: recorded with its outcome, answered with the
    /// refusal's JSON and, for a budget, `Retry-After`.
    async fn refuse_guarded(&self, ctx: CallContext, refusal: Refusal) -> Response<ProxyBody> {
        let request_id = ctx.request_id.clone();
        let message = refusal.message();
        tracing::info!(request_id, code = refusal.code(), %message, "call refused by the guard");
        let mut call = CallMeter::new(self.meter.clone(), ctx);
        let ack = call.finish(Finish {
            outcome: refusal.outcome(),
            body: Captured::default(),
            response_bytes: 0,
            error: Some(message),
        });
        if let Some(ack) = ack {
            let _ = ack.await;
        }
        let mut resp = json_reply(
            refusal.status(),
            &refusal.body(&request_id),
            Some(&request_id),
        );
        if let Some(secs) = refusal.retry_after_secs() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }

    async fn fail_upstream(
        &self,
        call: CallMeter,
        r: Rejection,
        outcome: Outcome,
    ) -> Response<ProxyBody> {
        tracing::warn!(request_id = call.request_id(), code = r.code, message = %r.message, "upstream failure");
        self.fail_with(call, r, outcome).await
    }

    /// Records a call that got no upstream body with `outcome`, and answers its JSON error.
    async fn fail_with(
        &self,
        mut call: CallMeter,
        r: Rejection,
        outcome: Outcome,
    ) -> Response<ProxyBody> {
        let request_id = call.request_id().to_owned();
        let ack = call.finish(Finish {
            outcome,
            body: Captured::default(),
            response_bytes: 0,
            error: Some(r.message.clone()),
        });
        if let Some(ack) = ack {
            let _ = ack.await;
        }
        r.response(Some(&request_id))
    }
}

/// Why a call is answered here rather than by upstream: the parts of its JSON error.
struct Rejection {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// The header or parameter at fault, when there is one.
    field: Option<String>,
}

impl Rejection {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    fn field(mut self, field: &str) -> Self {
        self.field = Some(field.to_owned());
        self
    }

    /// The JSON error a caller can read: `{"error": code, "message": …, "request_id": …}`,
    /// with the `X-Meter-Request-Id` header. Without a request id (metering off: no ledger
    /// row to name), neither the key nor the header is sent.
    fn response(self, request_id: Option<&str>) -> Response<ProxyBody> {
        let mut body = serde_json::json!({
            "error": self.code,
            "message": self.message,
            "source": "creditmeter",
        });
        if let Some(id) = request_id {
            body["request_id"] = serde_json::Value::String(id.to_owned());
        }
        if let Some(f) = self.field {
            body["field"] = serde_json::Value::String(f);
        }
        json_reply(self.status, &body, request_id)
    }
}

/// A JSON answer made here, with `X-Meter-Request-Id` when the call has one.
fn json_reply(
    status: StatusCode,
    body: &serde_json::Value,
    request_id: Option<&str>,
) -> Response<ProxyBody> {
    let mut resp = Response::new(local_body(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    if let Some(v) = request_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

/// A small body made here, not by upstream.
fn local_body(bytes: Bytes) -> ProxyBody {
    Either::Right(Either::Left(Full::new(bytes)))
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1). `Trailer` is not
/// one: it is end-to-end (RFC 9110 §6.6.2), and hyper sends a chunked body's trailer fields
/// only when the response declares them in it, so removing it dropped upstream's trailers.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
];

/// True when the caller's `TE` accepts trailers. `TE` is hop-by-hop, but its `trailers` value
/// is passed on: upstreams (hyper among them) send a chunked body's trailers only to a client
/// that says it accepts them, and the tap forwards them.
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
}

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
        h.insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["content-encoding", "trailer", "x-api-key"]);
    }
}
