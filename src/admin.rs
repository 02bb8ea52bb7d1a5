//! The admin listener: `/metrics` (Prometheus text), `/healthz` (alive), `/readyz` (ledger
//! writable, config loaded, not shutting down) and the JSON API under `/api/`: `status`,
//! `budgets` (GET), `holds` (GET, POST to place one, DELETE `/api/holds/{id}` to lift it),
//! `usage` (the report, with the CLI's parameters and JSON) and `calls` (raw ledger rows,
//! keyset-paged). It is served on its own address, loopback by default, never on the proxy
//! listener. Ledger reads run on a read-only connection in `spawn_blocking`.
//!
//! When the environment variable named by `admin.token_env` holds a token, every `/api/` route
//! (and `/metrics` with `admin.protect_metrics`) requires `Authorization: Bearer <token>`,
//! compared in constant time.
//!
//! The console (`/ui/`, and `/` redirecting there) is served here too, by [`crate::admin::console`],
//! with its own login form, session cookie and CSRF-checked form posts.

pub mod console;
pub mod lock;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::guard::Guard;
use crate::ledger::queries::{CallsQuery, Cursor, Window};
use crate::ledger::LedgerHandle;
use crate::meter::now_ms;
use crate::metrics::Metrics;
use crate::report::{self, Format, ReportArgs};

/// The largest admin API request body read (a hold is a few hundred bytes).
const MAX_API_BODY: usize = 64 * 1024;

/// What the admin endpoints read.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    /// Budgets and holds.
    pub guard: Arc<Guard>,
    pub ledger: LedgerHandle,
    /// The ledger, for read-only API queries.
    pub store: crate::ledger::SharedStore,
    /// The ledger file (named in `/readyz`; reconciliation's answer still reads it directly).
    pub ledger_path: PathBuf,
    /// Set when shutdown starts: `/readyz` turns 503 so load balancers stop sending traffic.
    pub draining: Arc<AtomicBool>,
    pub durability: &'static str,
    pub catalog_version: String,
    /// SHA-256 of the admin token, when one is configured.
    pub token_digest: Option<ring::digest::Digest>,
    /// `admin.protect_metrics` as resolved ([`crate::config::AdminConfig::metrics_protected`]).
    pub protect_metrics: bool,
    /// Which `Host` values are answered (DNS rebinding guard, see [`lock`]).
    pub host_check: lock::HostCheck,
    /// What the reconciliation poller last did (`GET /api/reconcile`).
    pub reconcile: Arc<crate::reconcile::PollerStatus>,
    /// `proxy.metering`: false when calls are forwarded unrecorded; `/readyz` says so.
    pub metering: bool,
    /// `/api/keys` and `/api/audit`; its `actor` is also who hold changes are audited as.
    pub keys: crate::keys::api::KeysApi,
    /// The console's session key (`/ui/`).
    pub console: crate::admin::console::Console,
}

/// The admin listener's response type.
pub type AdminResponse = Response<Full<Bytes>>;

impl Admin {
    /// Hashes the token once, so requests are compared digest to digest (constant time, no
    /// length leak).
    pub fn digest_token(token: Option<&str>) -> Option<ring::digest::Digest> {
        token.map(|t| ring::digest::digest(&ring::digest::SHA256, t.as_bytes()))
    }

    /// Serves one admin request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<AdminResponse, Infallible> {
        if let Some(refused) = self.host_check.refusal(&req) {
            return Ok(refused);
        }
        let path = req.uri().path().to_owned();
        let read_only = req.method() == Method::GET || req.method() == Method::HEAD;
        Ok(match path.as_str() {
            "/metrics" | "/healthz" | "/readyz" if !read_only => json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "method_not_allowed", "message": "only GET is served here"}),
            ),
            "/metrics" if self.protect_metrics && !self.authorized(&req) => unauthorized(),
            "/metrics" => {
                // Idle budgets move to their new window before the scrape sees them.
                self.guard.publish(now_ms());
                let mut r = Response::new(Full::new(Bytes::from(self.metrics.encode())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => self.readyz(),
            p if p == "/api" || p.starts_with("/api/") => {
                if !self.authorized(&req) {
                    unauthorized()
                } else if let Some(refused) = lock::mutation_refusal(&req) {
                    refused
                } else {
                    self.api(req).await
                }
            }
            p if crate::admin::console::is_console_path(p) => crate::admin::console::handle(&self, req).await,
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /ui/ (the console), /metrics, /healthz, /readyz, /api/status, /api/usage, /api/calls or /api/budgets\n",
            ),
        })
    }

    /// Ready unless draining, or the ledger is failing under `on_error = "fail_closed"` (then
    /// calls are refused anyway). In `spool` mode a failing ledger stays ready: calls are served
    /// and their rows spooled, and the body says so.
    fn readyz(&self) -> AdminResponse {
        let ledger_ok = self.ledger.is_healthy();
        let draining = self.draining.load(Ordering::Relaxed);
        let ready = !draining && !self.ledger.refuse_new_calls();
        let body = json!({
            "ready": ready,
            "ledger": if ledger_ok { "writable" } else { "failing" },
            "on_error": self.ledger.on_error().as_str(),
            "spooled_rows": self.ledger.spooled_rows(),
            "config": "loaded",
            "durability": self.durability,
            "draining": draining,
            "metering": if self.metering { "on" } else { "off" },
        });
        json_response(
            if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            &body,
        )
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(want) = &self.token_digest else {
            return true;
        };
        let Some(given) = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
        else {
            return false;
        };
        let given = ring::digest::digest(&ring::digest::SHA256, given.trim().as_bytes());
        constant_time_eq(given.as_ref(), want.as_ref())
    }

    /// The JSON API. Read-only routes take GET.
    async fn api(&self, req: Request<Incoming>) -> AdminResponse {
        let path = req.uri().path().to_owned();
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/api/budgets") => {
                json_response(StatusCode::OK, &self.guard.snapshot(now_ms()))
            }
            (Method::GET, "/api/holds") => json_response(
                StatusCode::OK,
                &json!({"holds": self.guard.holds().iter().map(crate::guard::Hold::to_json).collect::<Vec<_>>()}),
            ),
            (Method::POST, "/api/holds") => self.place_hold(req).await,
            (Method::DELETE, p) if p.starts_with("/api/holds/") => {
                self.lift_hold(&p["/api/holds/".len()..]).await
            }
            (Method::GET, "/api/status") => json_response(
                StatusCode::OK,
                &json!({
                    "version": env!("CARGO_PKG_VERSION"),
                    "catalog_version": self.catalog_version,
                    "ledger": self.ledger_path.display().to_string(),
                    "ledger_writable": self.ledger.is_healthy(),
                    "on_error": self.ledger.on_error().as_str(),
                    "spooled_rows": self.ledger.spooled_rows(),
                    "durability": self.durability,
                    "draining": self.draining.load(Ordering::Relaxed),
                }),
            ),
            (Method::GET, "/api/keys") => self.keys_answer(self.keys.list().await),
            (Method::POST, "/api/keys") => match read_api_body(req).await {
                Ok(body) => self.keys_answer(self.keys.create(&body).await),
                Err(r) => r,
            },
            (Method::POST, p) if p.starts_with("/api/keys/") && p.ends_with("/rotate") => {
                let id = &p["/api/keys/".len()..p.len() - "/rotate".len()];
                let id = decode_segment(id);
                self.keys_answer(self.keys.rotate(&id).await)
            }
            (Method::DELETE, p) if p.starts_with("/api/keys/") => {
                let id = decode_segment(&p["/api/keys/".len()..]);
                self.keys_answer(self.keys.revoke(&id).await)
            }
            (Method::GET, "/api/audit") => match decode_query(req.uri().query().unwrap_or("")) {
                Ok(pairs) => self.keys_answer(self.keys.audit(&pairs).await),
                Err(e) => bad_request(&e),
            },
            (Method::GET, "/api/reconcile") => self.reconcile(req.uri().query()).await,
            (Method::GET, "/api/usage") => self.usage(req.uri().query().unwrap_or("")).await,
            (Method::GET, "/api/calls") => self.calls(req.uri().query().unwrap_or("")).await,
            (Method::GET, "/api/repeats") => self.repeats(req.uri().query().unwrap_or("")).await,
            (_, path) => json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "not_found", "message": format!("no admin API route {} {path}", req.method())}),
            ),
        }
    }
}

impl Admin {
    fn keys_answer(&self, (status, body): crate::keys::api::Answer) -> AdminResponse {
        json_response(status, &body)
    }

    /// `GET /api/reconcile[?since=…&until=…]`: what `creditmeter report --reconcile --format json`
    /// prints (default: the last 7 days), plus the poller's status under `poller`.
    async fn reconcile(&self, query: Option<&str>) -> AdminResponse {
        let now = crate::meter::now_ms();
        let mut since = now - 7 * 86_400_000;
        let mut until = crate::report::default_until();
        for (k, v) in query
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
        {
            let target = match k {
                "since" => &mut since,
                "until" => &mut until,
                _ => continue,
            };
            let v = String::from_utf8_lossy(&creditmeter_base::percent::percent_decode_bytes(v))
                .into_owned();
            match crate::report::parse_time(&v, now) {
                Ok(t) => *target = t,
                Err(e) => {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        &json!({"error": "invalid_time", "message": format!("{k}: {e}")}),
                    )
                }
            }
        }
        let store = self.store.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            crate::reconcile::answer::load_in(&*store, since, until)
        })
        .await;
        match loaded {
            Ok(Ok(answer)) => {
                let mut body = answer.to_json();
                body["poller"] = self.reconcile.to_json();
                json_response(StatusCode::OK, &body)
            }
            Ok(Err(e)) => json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"error": "ledger", "message": e.to_string()}),
            ),
            Err(e) => json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({"error": "internal", "message": e.to_string()}),
            ),
        }
    }

    /// `POST /api/holds` with `{"scope": "global" | {"table": …, "workflow": …, "key": …,
    /// "tag": {…}}, "reason": "…"}`: 201 with the new hold, or 200 with the identical hold
    /// already in force.
    async fn place_hold(&self, req: Request<Incoming>) -> AdminResponse {
        let body = match Limited::new(req.into_body(), MAX_API_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return bad_request(&format!("cannot read the request body: {e}")),
        };
        let v: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return bad_request(&format!("the body must be JSON: {e}")),
        };
        let Some(scope) = v.get("scope") else {
            return bad_request("name what to hold: {\"scope\": {\"table\": \"…\"}} (or workflow, key, tag), or {\"scope\": \"global\"} to pause everything");
        };
        let mut scope = match crate::guard::config::scope_from_json(scope) {
            Ok(s) => s,
            Err(e) => return bad_request(&format!("scope: {e}")),
        };
        let reason = match v.get("reason") {
            None | Some(Value::Null) => None,
            Some(Value::String(r)) if r.len() <= 1024 => Some(r.clone()),
            Some(_) => return bad_request("reason must be a string of at most 1024 bytes"),
        };
        let guard = self.guard.clone();
        if let Err(e) = self.resolve_key_scope(&mut scope).await {
            return bad_request(&format!("scope: {e}"));
        }
        match tokio::task::spawn_blocking(move || guard.place_hold(scope, reason, now_ms())).await {
            Ok(Ok(change)) => {
                if change.created {
                    let admin = self.clone_for_audit();
                    let change = change.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        admin.audit_hold(crate::ledger::audit::action::HOLD_PLACED, &change)
                    })
                    .await;
                }
                json_response(
                    if change.created {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    },
                    &hold_change_json("hold", &change),
                )
            }
            Ok(Err(e)) => hold_failed(&e),
            Err(e) => hold_failed(&e),
        }
    }

    /// `DELETE /api/holds/{id}`: 200 with the released hold, 404 if none is in force.
    async fn lift_hold(&self, id: &str) -> AdminResponse {
        let Ok(id) = id.parse::<i64>() else {
            return bad_request(&format!(
                "{id:?} is not a hold id (GET /api/holds lists them)"
            ));
        };
        let guard = self.guard.clone();
        match tokio::task::spawn_blocking(move || guard.lift_hold(id, now_ms())).await {
            Ok(Ok(Some(change))) => {
                let admin = self.clone_for_audit();
                let audited = change.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    admin.audit_hold(crate::ledger::audit::action::HOLD_LIFTED, &audited)
                })
                .await;
                json_response(StatusCode::OK, &hold_change_json("released", &change))
            }
            Ok(Ok(None)) => json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "not_found", "message": format!("no hold {id} is in force (GET /api/holds lists them)")}),
            ),
            Ok(Err(e)) => hold_failed(&e),
            Err(e) => hold_failed(&e),
        }
    }

    /// `GET /api/usage`: the report, with the CLI's parameters (`by`, `since`, `until`, `top`,
    /// `format`, `table`, `workflow`, `endpoint`, `timeline`, `spikes`, `identifiers`,
    /// `spike_factor`, `spike_floor`, `source`), in JSON unless `format` says otherwise. The
    /// JSON is exactly `creditmeter report --format json`'s.
    async fn usage(&self, query: &str) -> AdminResponse {
        let pairs = match decode_query(query) {
            Ok(p) => p,
            Err(e) => return bad_request(&e),
        };
        let args = match ReportArgs::from_query(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        {
            Ok(a) => a,
            Err(e) => return bad_request(&e),
        };
        let req = match args.resolve(self.ledger_path.clone(), now_ms(), Format::Json) {
            Ok(r) => r,
            Err(e) => return bad_request(&e),
        };
        let format = req.format;
        let store = self.store.clone();
        let result = tokio::task::spawn_blocking(move || report::run_on(&*store, &req)).await;
        let body = match result {
            Ok(Ok(body)) => body,
            Ok(Err(e @ report::ReportError::TooManyBuckets { .. })) => {
                return bad_request(&e.to_string())
            }
            Ok(Err(e)) => return server_error(&e.to_string()),
            Err(e) => return server_error(&e.to_string()),
        };
        let mut r = Response::new(Full::new(Bytes::from(body)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(match format {
                Format::Json => "application/json",
                Format::Csv | Format::Focus => "text/csv; charset=utf-8",
                Format::Table => "text/plain; charset=utf-8",
            }),
        );
        r
    }

    /// `GET /api/repeats[?since=…&until=…&within=…]`: the waste finder, exactly
    /// `creditmeter report --repeats --format json` (default: the last 30 days, within 30d).
    async fn repeats(&self, query: &str) -> AdminResponse {
        let pairs = match decode_query(query) {
            Ok(p) => p,
            Err(e) => return bad_request(&e),
        };
        let mut args = ReportArgs {
            since: Some("30d".into()),
            repeats: true,
            ..Default::default()
        };
        for (k, v) in &pairs {
            match k.as_str() {
                "since" => args.since = Some(v.clone()).filter(|v| !v.is_empty()),
                "until" => args.until = Some(v.clone()).filter(|v| !v.is_empty()),
                "within" => args.within = Some(v.clone()).filter(|v| !v.is_empty()),
                other => {
                    return bad_request(&format!(
                        "unknown parameter {other:?}: use since, until or within"
                    ))
                }
            }
        }
        let req = match args.resolve(self.ledger_path.clone(), now_ms(), Format::Json) {
            Ok(r) => r,
            Err(e) => return bad_request(&e),
        };
        let result = tokio::task::spawn_blocking(move || {
            let conn = crate::ledger::open_for_read(&req.db)?;
            report::repeats::compute(
                &conn,
                crate::ledger::queries::Window {
                    since_ms: req.since_ms,
                    until_ms: req.until_ms,
                },
                req.within_ms,
            )
            .map_err(crate::ledger::LedgerError::Query)
        })
        .await;
        match result {
            Ok(Ok(r)) => json_response(StatusCode::OK, &r.to_json()),
            Ok(Err(e)) => server_error(&e.to_string()),
            Err(e) => server_error(&e.to_string()),
        }
    }

    /// `GET /api/calls`: raw ledger rows, newest first (`order=asc`: oldest first), `limit`
    /// per page (default 100, at most 1000), filtered by `table`, `workflow`, `endpoint`,
    /// `outcome`, `status` (a code or `none`), `key` (a key fingerprint), `since` and `until`.
    /// The answer carries `next_cursor`; pass it back as `cursor` for the next page (null at
    /// the end).
    async fn calls(&self, query: &str) -> AdminResponse {
        let pairs = match decode_query(query) {
            Ok(p) => p,
            Err(e) => return bad_request(&e),
        };
        let q = match calls_query(&pairs, now_ms()) {
            Ok(q) => q,
            Err(e) => return bad_request(&e),
        };
        let store = self.store.clone();
        let result = tokio::task::spawn_blocking(move || {
            let page = store.calls_page(&q)?;
            Ok::<_, crate::ledger::LedgerError>((page, q.limit))
        })
        .await;
        match result {
            Ok(Ok(((rows, next), limit))) => json_response(
                StatusCode::OK,
                &json!({
                    "rows": rows,
                    "limit": limit,
                    "next_cursor": next.map(|c| c.encode()),
                }),
            ),
            Ok(Err(e)) => server_error(&e.to_string()),
            Err(e) => server_error(&e.to_string()),
        }
    }
}

/// The body of an admin API mutation, capped at [`MAX_API_BODY`].
async fn read_api_body(req: Request<Incoming>) -> Result<Bytes, AdminResponse> {
    match Limited::new(req.into_body(), MAX_API_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) => Err(bad_request(&format!("cannot read the request body: {e}"))),
    }
}

/// A path segment, percent-decoded (key names may hold `.`, `_`, `-`; ids are hex).
fn decode_segment(s: &str) -> String {
    String::from_utf8_lossy(&creditmeter_base::percent::percent_decode_bytes(s)).into_owned()
}

/// What writing an audit row off the async path needs.
struct AuditWriter {
    ledger_path: PathBuf,
    actor: String,
}

impl AuditWriter {
    fn audit_hold(&self, action: &str, change: &crate::guard::HoldChange) {
        let entry = crate::ledger::audit::Entry::new(now_ms(), &self.actor, action)
            .with_subject(&change.hold.id.to_string(), change.hold.to_json());
        if let Err(e) = crate::ledger::audit::append_at(&self.ledger_path, &entry) {
            tracing::warn!(error = %e, hold = change.hold.id, "the hold change could not be written to the audit log");
        }
    }
}

impl Admin {
    fn clone_for_audit(&self) -> AuditWriter {
        AuditWriter {
            ledger_path: self.ledger_path.clone(),
            actor: self.keys.actor.clone(),
        }
    }

    /// A hold's `key` may name a virtual key: it is held by id.
    async fn resolve_key_scope(&self, scope: &mut crate::guard::Scope) -> Result<(), String> {
        let Some(k) = scope.key.as_ref() else {
            return Ok(());
        };
        if crate::guard::scope::is_fingerprint_pattern(k.as_str()) {
            return Ok(());
        }
        let path = self.ledger_path.clone();
        let mut s = scope.clone();
        let resolved = tokio::task::spawn_blocking(move || {
            let conn = crate::ledger::open_for_read(&path).map_err(|e| e.to_string())?;
            crate::keys::resolve_scope_key(&conn, &mut s)?;
            Ok::<_, String>(s)
        })
        .await
        .map_err(|e| e.to_string())??;
        *scope = resolved;
        Ok(())
    }
}

/// The most rows `/api/calls` returns per page.
pub const MAX_CALLS_LIMIT: usize = 1000;
/// Rows per page when `limit` is not given.
pub const DEFAULT_CALLS_LIMIT: usize = 100;

fn calls_query(pairs: &[(String, String)], now: i64) -> Result<CallsQuery, String> {
    let mut q = CallsQuery {
        limit: DEFAULT_CALLS_LIMIT,
        ..Default::default()
    };
    let (mut since, mut until) = (None, None);
    for (k, v) in pairs {
        match k.as_str() {
            "table" => q.filter.table = Some(v.clone()),
            "workflow" => q.filter.workflow = Some(v.clone()),
            "endpoint" => q.filter.endpoint = Some(v.clone()),
            "outcome" => q.outcome = Some(v.clone()),
            "key" => q.key_fp = Some(v.clone()),
            "status" => {
                q.status = Some(if v == "none" {
                    None
                } else {
                    Some(v.parse().map_err(|_| {
                        format!("status={v:?}: use an HTTP status code or none")
                    })?)
                })
            }
            "since" => since = Some(report::parse_time(v, now).map_err(|e| format!("since: {e}"))?),
            "until" => until = Some(report::parse_time(v, now).map_err(|e| format!("until: {e}"))?),
            "limit" => {
                q.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_CALLS_LIMIT).contains(n))
                    .ok_or_else(|| format!("limit={v:?}: use 1 to {MAX_CALLS_LIMIT}"))?
            }
            "cursor" => {
                q.cursor = Some(
                    Cursor::decode(v)
                        .ok_or_else(|| format!("cursor={v:?} is not a cursor this API gave out"))?,
                )
            }
            "order" => {
                q.ascending = match v.as_str() {
                    "asc" => true,
                    "desc" => false,
                    _ => return Err(format!("order={v:?}: use asc or desc")),
                }
            }
            other => {
                return Err(format!(
                    "unknown parameter {other:?}: use table, workflow, endpoint, outcome, status, key, since, until, limit, cursor or order"
                ))
            }
        }
    }
    if since.is_some() || until.is_some() {
        q.window = Some(Window {
            since_ms: since.unwrap_or(i64::MIN),
            until_ms: until.unwrap_or(i64::MAX),
        });
    }
    Ok(q)
}

/// Splits a query string into percent-decoded pairs; the message names a pair that is not UTF-8.
fn decode_query(query: &str) -> Result<Vec<(String, String)>, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let dec = |s: &str| {
                String::from_utf8(creditmeter_base::percent::percent_decode_bytes(s).into_owned())
                    .map_err(|_| format!("query parameter {k:?} is not UTF-8"))
            };
            Ok((dec(k)?, dec(v)?))
        })
        .collect()
}

fn bad_request(message: &str) -> AdminResponse {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({"error": "bad_request", "message": message}),
    )
}

/// A hold change's answer: the hold under `key`, `created`, and where it was kept:
/// `persisted` (true only once it is in the ledger), `persisted_to` (`ledger`, `spool` or
/// `memory`) and, when not in the ledger, a `message` saying what that means.
fn hold_change_json(key: &str, change: &crate::guard::HoldChange) -> Value {
    let mut v = json!({
        key: change.hold.to_json(),
        "created": change.created,
        "persisted": change.persisted == crate::guard::Persisted::Ledger,
        "persisted_to": change.persisted.as_str(),
    });
    if let Some(m) = change.persisted.message() {
        v["message"] = Value::String(m);
    }
    v
}

fn hold_failed(e: &dyn std::error::Error) -> AdminResponse {
    tracing::error!(error = %e, "changing a hold failed");
    json_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        &json!({"error": "hold_not_recorded", "message": format!("the hold could not be recorded in the ledger, so nothing changed: {e}")}),
    )
}

fn server_error(message: &str) -> AdminResponse {
    json_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        &json!({"error": "ledger_error", "message": message}),
    )
}

pub(crate) use creditmeter_base::constant_time_eq;

fn unauthorized() -> AdminResponse {
    let mut r = json_response(
        StatusCode::UNAUTHORIZED,
        &json!({"error": "unauthorized", "message": "send Authorization: Bearer <the token in admin.token_env>"}),
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn text(status: StatusCode, body: &'static str) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_digests() {
        let a = ring::digest::digest(&ring::digest::SHA256, b"token-a");
        let b = ring::digest::digest(&ring::digest::SHA256, b"token-b");
        assert!(constant_time_eq(a.as_ref(), a.as_ref()));
        assert!(!constant_time_eq(a.as_ref(), b.as_ref()));
        assert!(!constant_time_eq(a.as_ref(), &a.as_ref()[..31]));
    }
}
