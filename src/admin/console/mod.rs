//! The console: server-rendered HTML pages on the admin listener at `/ui/` (`/` redirects
//! there), for the people who ask "which table burned our credits, and when?" without a shell.
//!
//! Every figure comes from the same code as `creditmeter report --format json`: a page asks the
//! report for its JSON and renders it, so the console and the CLI cannot disagree. Whole hours
//! come from the hourly rollups, which keeps each page fast on a ten-million-row ledger
//! (BENCHMARKS.md, "Console"). Charts are inline SVG ([`charts`]); there is no script and no
//! external asset, so the console works offline and behind a firewall.
//!
//! Pages: the overview ([`overview`]), one page per table, workflow, key or endpoint
//! ([`entity`]), reconciliation ([`reconcile`]), guardrails ([`guardrails`]: budgets,
//! holds and the emergency stop), the waste finder ([`repeats`]) and virtual keys ([`keys`]).
//!
//! Access ([`session`]): with an admin token configured, a login form takes the token and sets
//! an `HttpOnly`, `SameSite=Strict` session cookie (`Secure` behind TLS); without one (allowed
//! only on a loopback listener) no login is needed and the page says so. Every mutation is a
//! form post carrying the session's CSRF token; one without it is refused with 403 and changes
//! nothing.

pub mod charts;
pub mod entity;
pub mod guardrails;
pub mod keys;
pub mod layout;
pub mod overview;
pub mod reconcile;
pub mod repeats;
pub mod session;

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use maud::{html, Markup};
use serde_json::Value;

use crate::admin::{Admin, AdminResponse};
use crate::guard::Guard;
use crate::ledger::queries::HOUR_MS;
use crate::meter::now_ms;
use crate::report::{self, Format, ReportArgs};

pub use session::{ConsoleError, Session, Sessions};

/// The largest form body read (a hold's table name and reason).
const MAX_FORM_BODY: usize = 16 * 1024;

/// The console's own state: the session signing key.
pub struct Console {
    pub sessions: Sessions,
}

impl Console {
    /// A console with a fresh session key.
    pub fn new() -> Result<Console, ConsoleError> {
        Ok(Console {
            sessions: Sessions::new()?,
        })
    }
}

/// What a page reads while it renders.
pub struct Ctx {
    pub db: PathBuf,
    pub guard: Arc<Guard>,
    pub reconcile: Arc<crate::reconcile::PollerStatus>,
    pub ledger_healthy: bool,
    /// The session's CSRF token (`None` only on the login page).
    pub csrf: Option<String>,
    /// An admin token is configured, so the console asks for it.
    pub login_required: bool,
    /// `[keys]`, to check a new key's upstream and say whether the proxy takes keys.
    pub keys_config: crate::keys::KeysConfig,
    /// Who the console's changes are audited as: `console:` and the admin API's actor.
    pub actor: String,
    pub now: i64,
}

/// Why a page could not be shown.
#[derive(Debug)]
pub enum PageError {
    /// A parameter is wrong; the message names it.
    BadRequest(String),
    /// The ledger could not be read.
    Internal(String),
}

impl From<report::ReportError> for PageError {
    fn from(e: report::ReportError) -> Self {
        match e {
            report::ReportError::TooManyBuckets { .. } => PageError::BadRequest(e.to_string()),
            e => PageError::Internal(e.to_string()),
        }
    }
}

impl From<rusqlite::Error> for PageError {
    fn from(e: rusqlite::Error) -> Self {
        PageError::Internal(e.to_string())
    }
}

impl From<crate::ledger::LedgerError> for PageError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        PageError::Internal(e.to_string())
    }
}

/// Decoded query (or form) parameters, in order.
#[derive(Debug, Clone, Default)]
pub struct Query(pub Vec<(String, String)>);

impl Query {
    /// Parses `a=1&b=x%20y` (a form body also turns `+` into a space).
    pub fn parse(s: &str, form: bool) -> Query {
        let dec = |v: &str| {
            let v = if form {
                v.replace('+', " ")
            } else {
                v.to_owned()
            };
            String::from_utf8_lossy(&creditmeter_base::percent::percent_decode_bytes(&v))
                .into_owned()
        };
        Query(
            s.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (dec(k), dec(v))
                })
                .collect(),
        )
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first non-empty value of `name`.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.get(name).filter(|v| !v.trim().is_empty())
    }
}

/// The window a page shows: one of the presets or a custom since/until.
#[derive(Debug, Clone)]
pub struct Win {
    /// `24h`, `7d`, `30d` or `custom`.
    pub label: String,
    /// As the user wrote it (custom) or the preset.
    pub since: String,
    pub until: Option<String>,
    pub since_ms: i64,
    pub until_ms: i64,
    /// The timeline's bucket width (`1h`, `6h`, `1d`, `7d`).
    pub bucket: &'static str,
}

/// The default window of every page.
pub const DEFAULT_WINDOW: &str = "7d";

impl Win {
    /// Reads `window` (`24h`, `7d`, `30d`, `custom`), `since` and `until`.
    pub fn from_query(q: &Query, now: i64) -> Result<Win, PageError> {
        let label = q.text("window").unwrap_or(if q.text("since").is_some() {
            "custom"
        } else {
            DEFAULT_WINDOW
        });
        let (label, since) = match label {
            "24h" | "7d" | "30d" => (label.to_owned(), label.to_owned()),
            "custom" => match q.text("since") {
                Some(s) => ("custom".to_owned(), s.trim().to_owned()),
                None => {
                    return Err(PageError::BadRequest(
                        "a custom window needs since (e.g. 2026-11-24 or 2026-11-24T10:00:00Z)"
                            .into(),
                    ))
                }
            },
            other => {
                return Err(PageError::BadRequest(format!(
                    "window={other:?}: use 24h, 7d, 30d or custom"
                )))
            }
        };
        let until = if label == "custom" {
            q.text("until").map(|u| u.trim().to_owned())
        } else {
            None
        };
        // Whole seconds, so the window printed on the page (RFC 3339) is exactly the one used.
        let since_ms = report::parse_time(&since, now)
            .map_err(|e| PageError::BadRequest(format!("since: {e}")))?
            .div_euclid(1000)
            * 1000;
        let until_ms = match &until {
            Some(u) => report::parse_time(u, now)
                .map_err(|e| PageError::BadRequest(format!("until: {e}")))?,
            None => now + 60_000,
        }
        .div_euclid(1000)
            * 1000;
        if since_ms >= until_ms {
            return Err(PageError::BadRequest(format!(
                "since: the window is empty ({} is not before {})",
                report::format_time(since_ms),
                report::format_time(until_ms)
            )));
        }
        let span = until_ms - since_ms;
        let bucket = [("1h", HOUR_MS), ("6h", 6 * HOUR_MS), ("1d", 24 * HOUR_MS)]
            .into_iter()
            .find(|(_, w)| span / w <= 400)
            .map_or("7d", |(l, _)| l);
        Ok(Win {
            label,
            since,
            until,
            since_ms,
            until_ms,
            bucket,
        })
    }

    /// Report arguments for this window (absolute times, so every report of a page covers the
    /// same instants).
    pub fn args(&self) -> ReportArgs {
        ReportArgs {
            since: Some(report::format_time(self.since_ms)),
            until: Some(report::format_time(self.until_ms)),
            ..Default::default()
        }
    }

    /// The query parameters that reproduce this window on another page.
    pub fn query(&self) -> String {
        if self.label == "custom" {
            let mut s = format!("window=custom&since={}", url_encode(&self.since));
            if let Some(u) = &self.until {
                s.push_str(&format!("&until={}", url_encode(u)));
            }
            s
        } else {
            format!("window={}", self.label)
        }
    }

    /// `since to until`, with the times in `data-` attributes (tests run the same report).
    pub fn heading(&self) -> Markup {
        html! {
            p.window data-since=(report::format_time(self.since_ms)) data-until=(report::format_time(self.until_ms)) {
                (report::format_time(self.since_ms)) " to " (report::format_time(self.until_ms)) " (UTC)"
            }
        }
    }
}

/// Runs the report with `args` and returns its JSON: exactly what `creditmeter report
/// --format json` prints for the same parameters.
pub fn report_json(ctx: &Ctx, args: &ReportArgs) -> Result<Value, PageError> {
    let req = args
        .resolve(ctx.db.clone(), ctx.now, Format::Json)
        .map_err(PageError::BadRequest)?;
    let text = report::run(&req)?;
    serde_json::from_str(&text).map_err(|e| PageError::Internal(format!("report JSON: {e}")))
}

/// Milli-credits as people read them: `1,532`, `1.01`, `12,000.5`.
pub fn fmt_credits(milli: i64) -> String {
    let neg = milli < 0;
    let m = milli.unsigned_abs();
    let (whole, frac) = (m / 1000, m % 1000);
    let digits = whole.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if frac != 0 {
        let f = format!("{frac:03}");
        out.push('.');
        out.push_str(f.trim_end_matches('0'));
    }
    if neg {
        format!("-{out}")
    } else {
        out
    }
}

/// A JSON number of credits as milli-credits (the report prints credits as plain numbers
/// exact to the thousandth).
pub fn milli_of(v: &Value) -> i64 {
    v.as_f64().map_or(0, |c| (c * 1000.0).round() as i64)
}

/// Percent-encodes a query parameter value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The link to an entity page.
pub fn entity_link(kind: &str, name: &str, win: &Win) -> String {
    format!("/ui/{kind}?name={}&{}", url_encode(name), win.query())
}

fn html_response(status: StatusCode, body: Markup) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from(body.into_string())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // No script at all; only the page's own inline stylesheet; forms post back here only.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

fn redirect(to: &str) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn with_cookie(mut r: AdminResponse, cookie: Option<String>) -> AdminResponse {
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().append(header::SET_COOKIE, c);
    }
    r
}

/// A small page with a message (errors, refusals).
fn message_page(ctx: &Ctx, status: StatusCode, title: &str, message: &str) -> AdminResponse {
    html_response(
        status,
        layout::page(
            ctx,
            title,
            "",
            html! {
                h1 { (title) }
                p.error role="alert" { (message) }
                p { a href="/ui/" { "Back to the overview" } }
            },
        ),
    )
}

/// True when the request came over TLS (to a proxy in front that says so).
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// True when `given` is the admin token (compared digest to digest, constant time).
fn token_matches(admin: &Admin, given: &str) -> bool {
    match &admin.token_digest {
        None => true,
        Some(want) => {
            let got = ring::digest::digest(&ring::digest::SHA256, given.trim().as_bytes());
            creditmeter_base::constant_time_eq(got.as_ref(), want.as_ref())
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
}

/// True for a path the console serves.
pub fn is_console_path(path: &str) -> bool {
    path == "/" || path == "/ui" || path.starts_with("/ui/")
}

/// Serves one console request.
pub async fn handle(admin: &Admin, req: Request<Incoming>) -> AdminResponse {
    let path = req.uri().path().to_owned();
    if path == "/" || path == "/ui" {
        return redirect("/ui/");
    }
    let now = now_ms();
    let console = &admin.console;
    let secure = over_tls(req.headers());
    let login_required = admin.token_digest.is_some();
    let mut session = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(session::cookie_value)
        .find_map(|v| console.sessions.verify(v, now));
    let mut new_cookie = None;
    let mut ctx = Ctx {
        db: admin.ledger_path.clone(),
        guard: admin.guard.clone(),
        reconcile: admin.reconcile.clone(),
        ledger_healthy: admin.ledger.is_healthy(),
        csrf: None,
        login_required,
        keys_config: admin.keys.config.clone(),
        actor: format!("console:{}", admin.keys.actor),
        now,
    };
    let method = req.method().clone();

    // The login page and form.
    if path == "/ui/login" {
        if !login_required {
            return redirect("/ui/");
        }
        return match method {
            Method::POST => {
                let form = match read_form(req).await {
                    Ok(f) => f,
                    Err(r) => return r,
                };
                let given = form.get("token").unwrap_or("");
                if given.is_empty() || !token_matches(admin, given) {
                    tracing::warn!("console: a login with a wrong admin token was refused");
                    return html_response(
                        StatusCode::UNAUTHORIZED,
                        login_page(&ctx, Some("That is not the admin token.")),
                    );
                }
                match console.sessions.create(now) {
                    Ok((_, value)) => {
                        with_cookie(redirect("/ui/"), Some(session::set_cookie(&value, secure)))
                    }
                    Err(e) => message_page(
                        &ctx,
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "Cannot sign in",
                        &e.to_string(),
                    ),
                }
            }
            Method::GET | Method::HEAD => html_response(StatusCode::OK, login_page(&ctx, None)),
            _ => message_page(
                &ctx,
                StatusCode::METHOD_NOT_ALLOWED,
                "Method not allowed",
                "the login page takes GET and POST",
            ),
        };
    }

    if session.is_none() {
        if login_required {
            // A script may read pages with the bearer token; it gets no session (no CSRF
            // token), so it cannot post the console's forms.
            let bearer_ok = bearer(req.headers()).is_some_and(|t| token_matches(admin, t));
            if !bearer_ok {
                return if method == Method::GET || method == Method::HEAD {
                    redirect("/ui/login")
                } else {
                    message_page(
                        &ctx,
                        StatusCode::FORBIDDEN,
                        "Refused",
                        "sign in first: this change was not made",
                    )
                };
            }
        } else if method == Method::GET || method == Method::HEAD {
            // No token: a session anyway, so that forms carry a CSRF token another site
            // cannot know.
            match console.sessions.create(now) {
                Ok((s, value)) => {
                    session = Some(s);
                    new_cookie = Some(session::set_cookie(&value, secure));
                }
                Err(e) => {
                    return message_page(
                        &ctx,
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "Console unavailable",
                        &e.to_string(),
                    )
                }
            }
        }
    }
    ctx.csrf = session.as_ref().map(|s| console.sessions.csrf(s));

    if method == Method::POST {
        let Some(s) = session else {
            return message_page(
                &ctx,
                StatusCode::FORBIDDEN,
                "Refused",
                "no console session: this change was not made (open the page again and retry)",
            );
        };
        let form = match read_form(req).await {
            Ok(f) => f,
            Err(r) => return r,
        };
        if !form
            .get("csrf")
            .is_some_and(|t| console.sessions.csrf_ok(&s, t))
        {
            tracing::warn!(path = %path, "console: a form post without a valid CSRF token was refused");
            return message_page(
                &ctx,
                StatusCode::FORBIDDEN,
                "Refused",
                "the form's CSRF token is missing or wrong, so nothing was changed: open the page again and retry",
            );
        }
        return match path.as_str() {
            "/ui/logout" => {
                console.sessions.sign_out(&s);
                with_cookie(
                    redirect(if login_required { "/ui/login" } else { "/ui/" }),
                    Some(session::clear_cookie(secure)),
                )
            }
            "/ui/holds" => guardrails::place(&ctx, &form).await,
            "/ui/holds/release" => guardrails::release(&ctx, &form).await,
            "/ui/keys" => keys::create(&ctx, &form).await,
            "/ui/keys/revoke" => keys::revoke(&ctx, &form).await,
            "/ui/keys/rotate" => keys::rotate(&ctx, &form).await,
            _ => message_page(
                &ctx,
                StatusCode::NOT_FOUND,
                "Not found",
                "no console form posts here",
            ),
        };
    }
    if method != Method::GET && method != Method::HEAD {
        return message_page(
            &ctx,
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "console pages take GET; changes are form posts",
        );
    }
    let q = Query::parse(req.uri().query().unwrap_or(""), false);
    let rendered = tokio::task::spawn_blocking(move || {
        let page = match path.as_str() {
            "/ui/" => overview::render(&ctx, &q),
            "/ui/table" | "/ui/workflow" | "/ui/endpoint" | "/ui/key" => {
                entity::render(&ctx, &path["/ui/".len()..], &q)
            }
            "/ui/reconcile" => reconcile::render(&ctx, &q),
            "/ui/guardrails" => guardrails::render(&ctx, &q),
            "/ui/stop" => guardrails::confirm_stop(&ctx, &q),
            "/ui/repeats" => repeats::render(&ctx, &q),
            "/ui/keys" => keys::render(&ctx, &q),
            _ => {
                return message_page(
                    &ctx,
                    StatusCode::NOT_FOUND,
                    "Not found",
                    "no console page here: see the overview",
                )
            }
        };
        match page {
            Ok(m) => html_response(StatusCode::OK, m),
            Err(PageError::BadRequest(m)) => {
                message_page(&ctx, StatusCode::BAD_REQUEST, "Cannot show this page", &m)
            }
            Err(PageError::Internal(m)) => {
                tracing::error!(error = %m, "console: a page failed");
                message_page(
                    &ctx,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "The ledger could not be read",
                    &m,
                )
            }
        }
    })
    .await;
    let r = match rendered {
        Ok(r) => r,
        Err(e) => {
            let mut r = Response::new(Full::new(Bytes::from(format!(
                "console page failed: {e}\n"
            ))));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        }
    };
    with_cookie(r, new_cookie)
}

/// Reads a form post (`application/x-www-form-urlencoded`); anything else is refused.
async fn read_form(req: Request<Incoming>) -> Result<Query, AdminResponse> {
    let is_form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    if !is_form {
        return Err(plain(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "console forms are application/x-www-form-urlencoded; nothing was changed\n",
        ));
    }
    let body = match Limited::new(req.into_body(), MAX_FORM_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Err(plain(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the form: {e}; nothing was changed\n"),
            ))
        }
    };
    Ok(Query::parse(&String::from_utf8_lossy(&body), true))
}

fn plain(status: StatusCode, text: &str) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from(text.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn login_page(ctx: &Ctx, error: Option<&str>) -> Markup {
    layout::page(
        ctx,
        "Sign in",
        "",
        html! {
            h1 { "Sign in to the creditmeter console" }
            p { "Enter the admin token (the value of the variable named by admin.token_env). The console keeps a session cookie, never the token." }
            @if let Some(e) = error {
                p.error role="alert" { (e) }
            }
            form method="post" action="/ui/login" {
                label for="token" { "Admin token" }
                input #token type="password" name="token" autocomplete="current-password" required;
                " "
                button type="submit" { "Sign in" }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credits_read_like_numbers() {
        assert_eq!(fmt_credits(0), "0");
        assert_eq!(fmt_credits(1_010), "1.01");
        assert_eq!(fmt_credits(1_532_000), "1,532");
        assert_eq!(fmt_credits(12_000_500), "12,000.5");
        assert_eq!(fmt_credits(1_234_567_891), "1,234,567.891");
        assert_eq!(fmt_credits(-2_500), "-2.5");
    }

    #[test]
    fn windows_resolve_and_pick_buckets() {
        let now = 1_700_000_000_000;
        let q = |s: &str| Query::parse(s, false);
        let w = Win::from_query(&q(""), now).unwrap();
        assert_eq!((w.label.as_str(), w.bucket), ("7d", "1h"));
        assert_eq!(w.since_ms, now - 7 * 86_400_000);
        let w = Win::from_query(&q("window=30d"), now).unwrap();
        assert_eq!(w.bucket, "6h");
        let w =
            Win::from_query(&q("window=custom&since=2023-01-01&until=2023-11-01"), now).unwrap();
        assert_eq!(w.bucket, "1d");
        assert!(Win::from_query(&q("window=custom"), now).is_err());
        assert!(Win::from_query(&q("window=1y"), now).is_err());
        assert!(
            Win::from_query(&q("window=custom&since=2024-01-01&until=2023-01-01"), now).is_err()
        );
    }

    #[test]
    fn forms_decode_plus_as_space() {
        let f = Query::parse("table=Inbound+leads&reason=a%26b", true);
        assert_eq!(f.get("table"), Some("Inbound leads"));
        assert_eq!(f.get("reason"), Some("a&b"));
        // Browsers send GET forms the same way; a literal plus arrives as %2B.
        let q = Query::parse("name=a+b&x=a%2Bb", false);
        assert_eq!(q.get("name"), Some("a b"));
        assert_eq!(q.get("x"), Some("a+b"));
        assert_eq!(url_encode("Inbound leads/ü"), "Inbound%20leads%2F%C3%BC");
    }
}
