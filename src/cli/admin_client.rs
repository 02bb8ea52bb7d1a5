//! The shell side of budgets and holds: `creditmeter budgets`, `hold` and `release` talk to a
//! running server's admin API, which applies a hold at once and records it in the ledger (a
//! tool writing the ledger directly would not reach the running server's memory).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use serde_json::Value;

/// Why an admin API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url:?} is not a URL: {source}")]
    Url {
        url: String,
        #[source]
        source: http::Error,
    },
    #[error("cannot reach the admin API at {url} (is `creditmeter serve` running? is --admin right?): {source}")]
    Connect {
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("the admin API at {url} did not answer within 10s")]
    Timeout { url: String },
    #[error("reading the admin API's answer: {0}")]
    Body(#[source] hyper::Error),
    #[error("the admin API answered {status}: {message}")]
    Status { status: StatusCode, message: String },
}

/// The admin URL to use for an `admin.listen` address: a wildcard listener is reached on loopback.
pub fn admin_url(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

/// A client for the admin API's JSON routes.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    /// `base` like `http://127.0.0.1:9464`; `token` is sent as `Authorization: Bearer`.
    pub fn new(base: &str, token: Option<String>) -> AdminClient {
        AdminClient {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http: Client::builder(hyper_util::rt::TokioExecutor::new()).build_http(),
        }
    }

    /// Sends one request; a non-2xx answer is an error carrying the server's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder().method(method).uri(&url);
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let payload = match body {
            Some(b) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|source| ClientError::Url {
                url: url.clone(),
                source,
            })?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.http.request(req))
            .await
            .map_err(|_| ClientError::Timeout { url: url.clone() })?
            .map_err(|source| ClientError::Connect {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(ClientError::Body)?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if !status.is_success() {
            let message = value
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| value.to_string());
            return Err(ClientError::Status { status, message });
        }
        Ok(value)
    }
}

/// A hold's scope from the CLI's flags; `None` when no flag names one.
pub fn scope_json(
    all: bool,
    table: Option<String>,
    workflow: Option<String>,
    key: Option<String>,
    tags: &[String],
) -> Result<Option<Value>, String> {
    let mut tag_map = BTreeMap::new();
    for t in tags {
        let (name, value) = t
            .split_once('=')
            .ok_or_else(|| format!("--tag {t:?}: write NAME=VALUE"))?;
        tag_map.insert(name.to_ascii_lowercase(), value.to_owned());
    }
    let scoped = table.is_some() || workflow.is_some() || key.is_some() || !tag_map.is_empty();
    if all && scoped {
        return Err("--all pauses everything; do not combine it with a narrower scope".into());
    }
    if all {
        return Ok(Some(Value::String("global".into())));
    }
    if !scoped {
        return Ok(None);
    }
    let scope = creditmeter::config::budgets::scope_from_parts(table, workflow, key, tag_map);
    scope.validate().map_err(|e| e.to_string())?;
    Ok(Some(serde_json::to_value(&scope).unwrap_or(Value::Null)))
}

fn num(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 => format!("{f:.0}"),
        Some(f) => format!("{f:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned(),
        None => "-".into(),
    }
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("-")
}

/// `GET /api/budgets` as a table for people.
pub fn render_budgets(v: &Value) -> String {
    let mut rows: Vec<[String; 9]> = vec![[
        "budget".into(),
        "scope".into(),
        "window".into(),
        "action".into(),
        "type".into(),
        "spent / limit".into(),
        "reserved".into(),
        "used".into(),
        "resets".into(),
    ]];
    let empty = Vec::new();
    let budgets = v.get("budgets").and_then(Value::as_array).unwrap_or(&empty);
    for b in budgets {
        let limits = b.get("limits").and_then(Value::as_array).unwrap_or(&empty);
        for (i, l) in limits.iter().enumerate() {
            let first = i == 0;
            let warn = if l.get("warning").and_then(Value::as_bool) == Some(true) {
                " !"
            } else {
                ""
            };
            rows.push([
                if first {
                    text(b, "name").into()
                } else {
                    String::new()
                },
                if first {
                    text(b, "scope_text").into()
                } else {
                    String::new()
                },
                if first {
                    text(b, "window").into()
                } else {
                    String::new()
                },
                if first {
                    text(b, "action").into()
                } else {
                    String::new()
                },
                text(l, "credit_type").into(),
                format!(
                    "{} / {}",
                    num(l.get("spent").unwrap_or(&Value::Null)),
                    num(l.get("limit").unwrap_or(&Value::Null))
                ),
                num(l.get("reserved").unwrap_or(&Value::Null)),
                format!(
                    "{}%{warn}",
                    num(l.get("used_percent").unwrap_or(&Value::Null))
                ),
                if first {
                    b.get("resets_at")
                        .and_then(Value::as_str)
                        .unwrap_or("rolling")
                        .to_owned()
                } else {
                    String::new()
                },
            ]);
        }
    }
    let mut out = String::new();
    if budgets.is_empty() {
        out.push_str("no budgets configured ([[budget]] in the config file)\n");
    } else {
        let widths: Vec<usize> = (0..9)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        for r in &rows {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out.push_str("(! = past warn_at)\n");
    }
    let holds = v.get("holds").and_then(Value::as_array).unwrap_or(&empty);
    if holds.is_empty() {
        out.push_str("no holds in force\n");
    } else {
        out.push_str("holds in force:\n");
        out.push_str(&render_holds(holds));
    }
    out
}

/// Holds, one line each.
pub fn render_holds(holds: &[Value]) -> String {
    let mut out = String::new();
    for h in holds {
        out.push_str(&format!(
            "  hold {}  {}  since {}{}\n",
            h.get("id").map(Value::to_string).unwrap_or_default(),
            text(h, "scope_text"),
            text(h, "created_at"),
            h.get("reason")
                .and_then(Value::as_str)
                .map(|r| format!("  ({r})"))
                .unwrap_or_default()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_flags() {
        assert_eq!(
            scope_json(true, None, None, None, &[]).unwrap(),
            Some(Value::String("global".into()))
        );
        assert_eq!(scope_json(false, None, None, None, &[]).unwrap(), None);
        assert!(scope_json(true, Some("t".into()), None, None, &[]).is_err());
        let v = scope_json(false, Some("t".into()), None, None, &["Team=x".into()])
            .unwrap()
            .unwrap();
        assert_eq!(v, serde_json::json!({"table": "t", "tag": {"team": "x"}}));
        assert!(scope_json(false, None, None, None, &["noequals".into()]).is_err());
        assert!(scope_json(false, None, None, Some("sk_live".into()), &[]).is_err());
        assert_eq!(
            admin_url("0.0.0.0:9464".parse().unwrap()),
            "http://127.0.0.1:9464"
        );
    }

    #[test]
    fn budgets_render_as_a_table() {
        let v = serde_json::json!({
            "budgets": [{"name": "daily", "scope_text": "global", "window": "day", "action": "block",
                         "resets_at": "2026-01-02T00:00:00+00:00",
                         "limits": [{"credit_type": "all", "spent": 12.5, "limit": 100, "reserved": 9,
                                     "used_percent": 12.5, "warning": false},
                                    {"credit_type": "direct_dial", "spent": 80, "limit": 80, "reserved": 0,
                                     "used_percent": 100, "warning": true}]}],
            "holds": [{"id": 3, "scope_text": "table=x", "created_at": "2026-01-01T00:00:00Z", "reason": "runaway"}]
        });
        let out = render_budgets(&v);
        assert!(out.contains("daily"), "{out}");
        assert!(out.contains("12.5 / 100"), "{out}");
        assert!(out.contains("100% !"), "{out}");
        assert!(out.contains("hold 3  table=x"), "{out}");
        assert!(out.contains("(runaway)"), "{out}");
    }
}
