//! The admin listener's locks, checked before any route runs.
//!
//! - **Exposure** ([`crate::config::Config::validate_for_serve`]): off loopback, the admin token
//!   is required or creditmeter does not start.
//! - **Host** ([`HostCheck`]): against DNS rebinding, where a web page whose name resolves to
//!   127.0.0.1 reads the admin API with the operator's browser. The `Host` (or h2
//!   `:authority`) must be a loopback address, `localhost`, or a name in `admin.hosts`; any other
//!   IP literal is accepted only when the listener itself is off loopback (a name can be rebound,
//!   an address cannot). Anything else gets a `421 host_not_allowed`. A request without any host
//!   (HTTP/1.0) is not from a browser, and passes.
//! - **Mutations** ([`mutation_refusal`]): every request under `/api/` that is not a GET or HEAD
//!   must say `Content-Type: application/json`, which a cross-site form cannot send without a
//!   CORS preflight (that the admin listener never answers); anything else gets a `415`. This is
//!   the one place a CSRF-protected form post would be admitted too.

use std::net::{IpAddr, SocketAddr};

use http::{header, Method, Request, StatusCode};
use serde_json::json;

use super::{json_response, AdminResponse};

pub use crate::config::validate_admin_hosts as validate_hosts;

/// Which `Host` values the admin listener answers to.
#[derive(Debug, Clone)]
pub struct HostCheck {
    /// `admin.hosts`, lower-cased, without a trailing dot.
    names: Vec<String>,
    /// True when the listener is off loopback: any IP literal is then accepted.
    any_ip: bool,
}

impl HostCheck {
    pub fn new(hosts: &[String], listen: SocketAddr) -> HostCheck {
        HostCheck {
            names: hosts
                .iter()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            any_ip: !listen.ip().is_loopback(),
        }
    }

    /// Whether `host` (a `Host` value, port allowed) names this listener.
    pub fn allows(&self, host: &str) -> bool {
        let Some(name) = host_part(host) else {
            return false;
        };
        if let Ok(ip) = name.parse::<IpAddr>() {
            return ip.is_loopback() || self.any_ip;
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        name == "localhost" || self.names.contains(&name)
    }

    /// `None` when the request's host is allowed, else the 421 to answer.
    pub fn refusal<B>(&self, req: &Request<B>) -> Option<AdminResponse> {
        let host = match req.uri().authority() {
            Some(a) => Some(a.as_str().to_owned()),
            None => req
                .headers()
                .get(header::HOST)
                .map(|v| v.to_str().unwrap_or("\u{fffd}").to_owned()),
        };
        match host {
            None => None,
            Some(h) if self.allows(&h) => None,
            Some(h) => Some(json_response(
                StatusCode::MISDIRECTED_REQUEST,
                &json!({
                    "error": "host_not_allowed",
                    "message": format!(
                        "the admin listener does not answer to Host {:?}: use 127.0.0.1, [::1] or localhost, or add the name to admin.hosts",
                        h.chars().take(100).collect::<String>()
                    ),
                }),
            )),
        }
    }
}

/// The host of a `Host` value: brackets and port removed. `None` when it does not parse.
fn host_part(host: &str) -> Option<&str> {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        let (inner, after) = rest.split_once(']')?;
        return (after.is_empty() || after.strip_prefix(':').is_some_and(is_port)).then_some(inner);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if is_port(port) && !h.contains(':') => Some(h),
        Some(_) if host.parse::<IpAddr>().is_ok() => Some(host),
        Some(_) => None,
        None => Some(host),
    }
    .filter(|h| !h.is_empty())
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

/// `None` when `req` may go on: reads pass; a mutation under `/api/` must carry
/// `Content-Type: application/json` (parameters such as `charset` allowed). Else the 415 to
/// answer. The console's CSRF-protected form post will be admitted here.
pub fn mutation_refusal<B>(req: &Request<B>) -> Option<AdminResponse> {
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return None;
    }
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
    if json {
        return None;
    }
    Some(json_response(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        &json!({
            "error": "unsupported_media_type",
            "message": format!(
                "{} {} changes state and must be sent with Content-Type: application/json (this stops cross-site form posts)",
                req.method(),
                req.uri().path()
            ),
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> SocketAddr {
        "127.0.0.1:9464".parse().unwrap()
    }

    #[test]
    fn loopback_names_pass_and_other_names_do_not() {
        let c = HostCheck::new(&["Creditmeter".into()], loopback());
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9464",
            "[::1]",
            "[::1]:9464",
            "localhost",
            "LOCALHOST:1",
            "localhost.",
            "creditmeter:9464",
            "creditmeter",
        ] {
            assert!(c.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9464",
            "localhost.evil.example",
            "10.0.0.5:9464",
            "",
            "[::1",
            "127.0.0.1:99999999",
            "creditmeter.evil",
        ] {
            assert!(!c.allows(bad), "{bad}");
        }
    }

    #[test]
    fn off_loopback_ip_literals_pass_but_names_still_must_be_listed() {
        let c = HostCheck::new(&[], "0.0.0.0:9464".parse().unwrap());
        assert!(
            c.allows("10.1.2.3:9464"),
            "a kubelet probe names the pod IP"
        );
        assert!(c.allows("[fd00::1]:9464"));
        assert!(!c.allows("rebound.example:9464"));
    }

    #[test]
    fn the_answer_is_421_with_the_key_to_set() {
        let c = HostCheck::new(&[], loopback());
        let req = Request::get("/api/holds")
            .header("host", "attacker.example:9464")
            .body(())
            .unwrap();
        let r = c.refusal(&req).unwrap();
        assert_eq!(r.status(), StatusCode::MISDIRECTED_REQUEST);
        let req = Request::get("http://localhost:9464/metrics")
            .body(())
            .unwrap();
        assert!(c.refusal(&req).is_none(), "h2 :authority");
        let req = Request::get("/metrics").body(()).unwrap();
        assert!(c.refusal(&req).is_none(), "no host at all: not a browser");
    }

    #[test]
    fn mutations_need_json() {
        let with = |m: Method, ct: Option<&str>| {
            let mut b = Request::builder().method(m).uri("/api/holds");
            if let Some(ct) = ct {
                b = b.header("content-type", ct);
            }
            match mutation_refusal(&b.body(()).unwrap()) {
                None => Ok(()),
                Some(r) => Err(r.status()),
            }
        };
        assert_eq!(with(Method::GET, None), Ok(()));
        assert_eq!(with(Method::POST, Some("application/json")), Ok(()));
        assert_eq!(
            with(Method::POST, Some("Application/JSON; charset=utf-8")),
            Ok(())
        );
        assert_eq!(with(Method::DELETE, Some("application/json")), Ok(()));
        for ct in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
            Some("application/jsonp"),
        ] {
            assert_eq!(
                with(Method::POST, ct),
                Err(StatusCode::UNSUPPORTED_MEDIA_TYPE),
                "{ct:?}"
            );
        }
        assert_eq!(
            with(Method::DELETE, None),
            Err(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
    }

    #[test]
    fn hosts_are_bare_names() {
        validate_hosts(&["creditmeter".into(), "a.b-c.example".into()]).unwrap();
        for bad in ["", "http://x", "x:9464", "a/b", "a b"] {
            let e = validate_hosts(&[bad.into()]).unwrap_err().to_string();
            assert!(e.contains("admin.hosts"), "{e}");
        }
    }
}
