//! The sim's own endpoints under `/__sim/`, for tests and demos; Apollo has nothing like them.
//!
//! - `GET /__sim/billed`: the running [`Billed`](super::Billed) totals as JSON.
//! - `POST /__sim/debit` with `{"credit_type":"lead","credits":5}`: spends credits out of band,
//!   as Apollo's web app or another integration would. `usage_stats` shows them as consumed;
//!   `billed` does not count them. Answers with the usage stats.
//! - `POST /__sim/reset_cycle`: starts the next credit cycle (a month later) with nothing
//!   consumed. Answers with the usage stats.
//! - `POST /__sim/usage_stats_fault` with `{"status": 403}` (401, 403, 404, 429, 500 or any
//!   4xx/5xx; 429 carries `retry-after` from `"retry_after"`, default 1) and/or
//!   `{"stall_ms": 3000}`: `usage_stats/credit_usage_stats` answers that way until the fault is
//!   cleared with `{}`. For the reconciliation poller's fault tests. Answers with the fault.
//!
//! - `GET /__sim/jobs`: every asynchronous job (phone reveal, waterfall) in the order it
//!   started: `{"jobs":[{"request_id","endpoint","request_type","state":"pending"|"done"|
//!   "expired","people","lead_milli","direct_dial_milli","export_milli","billed_milli"}]}`,
//!   the credits being what the job billed when it ended (0 while pending). A test attributes
//!   deferred spend with the `request_id` it saw in the synchronous answer.
//! - `POST /__sim/webhook_result_fault` with `{"status": 429, "retry_after": 2}` and optionally
//!   `"calls": N` (only the next N polls) or `"for_ms": M` (only for that long): webhook_result
//!   answers that way (429 with `retry-after`, default 1 s; any other 4xx/5xx as a JSON error)
//!   until then, or until cleared with `{}`. Answers with the fault.
//!
//! They need no API key, are not rate limited, and are not counted as calls.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, StatusCode};
use serde_json::{json, Value};

use super::jobs::{Jobs, PollFault};
use super::{Billed, SimConfig};

use super::account::{Account, CreditType};
use super::params::parse_body;
use super::reply::Reply;
use super::{lock, INVALID_API_KEY};

/// How `usage_stats` misbehaves, if at all.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct UsageFault {
    /// Answer with this status (and Apollo's body for it) instead of the balance.
    pub(crate) status: Option<u16>,
    /// `retry-after` seconds on a 429.
    pub(crate) retry_after: u64,
    /// Hold every answer this long first.
    pub(crate) stall_ms: u64,
}

impl UsageFault {
    /// The reply that replaces the balance, if a status is set.
    pub(crate) fn reply(&self) -> Option<Reply> {
        let status = StatusCode::from_u16(self.status?).ok()?;
        Some(match status.as_u16() {
            401 => Reply::text(status, INVALID_API_KEY),
            403 => Reply::error(
                status,
                "API_INACCESSIBLE",
                "This API key is not authorized to access api/v1/usage_stats/credit_usage_stats",
            ),
            404 => Reply::not_found(),
            429 => {
                let mut reply = Reply::json(
                    status,
                    json!({"message": "The maximum number of api calls allowed for api/v1/usage_stats/credit_usage_stats is 60 times per minute."}),
                );
                reply.headers.insert(
                    http::header::RETRY_AFTER,
                    HeaderValue::from(self.retry_after.max(1)),
                );
                reply
            }
            _ => Reply::error(status, "SIM_FAULT", "injected usage_stats fault"),
        })
    }

    fn json(&self) -> Value {
        json!({"status": self.status, "retry_after": self.retry_after, "stall_ms": self.stall_ms})
    }
}

/// The sim state the control endpoints read and change.
pub(crate) struct State<'a> {
    pub(crate) cfg: &'a SimConfig,
    pub(crate) account: &'a Mutex<Account>,
    pub(crate) usage_fault: &'a Mutex<UsageFault>,
    pub(crate) jobs: &'a Mutex<Jobs>,
    pub(crate) now: Instant,
}

/// `GET /__sim/billed`.
pub(crate) fn billed(billed: Billed) -> Reply {
    match serde_json::to_value(billed) {
        Ok(billed) => Reply::json(StatusCode::OK, billed),
        Err(err) => Reply::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_ERROR",
            err.to_string(),
        ),
    }
}

/// Answers `method` on `/__sim/{action}` (but `GET billed`, which the sim answers itself).
pub(crate) fn answer(method: &Method, action: &str, body: &[u8], state: State<'_>) -> Reply {
    let State {
        cfg,
        account,
        usage_fault,
        jobs,
        now,
    } = state;
    match (method, action) {
        (&Method::GET, "jobs") => Reply::json(StatusCode::OK, lock(jobs).listing(cfg, now)),
        (&Method::POST, "webhook_result_fault") => match parse_poll_fault(body, now) {
            Ok(fault) => {
                let answer = poll_fault_json(&fault, now);
                lock(jobs).fault = fault;
                Reply::json(StatusCode::OK, answer)
            }
            Err(message) => Reply::error(StatusCode::BAD_REQUEST, "INVALID_PARAMETERS", message),
        },
        (&Method::POST, "debit") => match parse_debit(body) {
            Ok((credit_type, milli)) => {
                let mut account = lock(account);
                account.debit(credit_type, milli);
                Reply::json(StatusCode::OK, account.usage_stats())
            }
            Err(message) => Reply::error(StatusCode::BAD_REQUEST, "INVALID_PARAMETERS", message),
        },
        (&Method::POST, "reset_cycle") => {
            let mut account = lock(account);
            account.reset_cycle();
            Reply::json(StatusCode::OK, account.usage_stats())
        }
        (&Method::POST, "usage_stats_fault") => match parse_fault(body) {
            Ok(fault) => {
                let answer = fault.json();
                *lock(usage_fault) = fault;
                Reply::json(StatusCode::OK, answer)
            }
            Err(message) => Reply::error(StatusCode::BAD_REQUEST, "INVALID_PARAMETERS", message),
        },
        _ => Reply::not_found(),
    }
}

/// Reads `{"credit_type": "lead"|"direct_dial"|"export", "credits": <number ≥ 0>}`.
fn parse_debit(body: &[u8]) -> Result<(CreditType, i64), String> {
    let params = parse_body(body).map_err(|err| err.to_string())?;
    let credit_type = params
        .get("credit_type")
        .and_then(Value::as_str)
        .and_then(CreditType::parse)
        .ok_or("credit_type must be one of lead, direct_dial, export")?;
    let credits = params
        .get("credits")
        .and_then(Value::as_f64)
        .filter(|credits| credits.is_finite() && *credits >= 0.0)
        .ok_or("credits must be a number of credits, zero or more")?;
    // `as` saturates, so an absurd amount pins the balance instead of wrapping it.
    Ok((credit_type, (credits * 1_000.0).round() as i64))
}

/// Reads `{"status": 400..=599 (default 429), "retry_after": secs, "calls": n, "for_ms": ms}`,
/// every key optional; an empty body or `{}` clears the fault.
fn parse_poll_fault(body: &[u8], now: Instant) -> Result<PollFault, String> {
    let params = if body.iter().all(u8::is_ascii_whitespace) {
        super::params::Params::new()
    } else {
        parse_body(body).map_err(|err| err.to_string())?
    };
    if params.is_empty() {
        return Ok(PollFault::default());
    }
    let number = |key: &str| -> Result<Option<u64>, String> {
        match params.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("{key} must be a whole number, zero or more")),
        }
    };
    let status = match number("status")?.unwrap_or(429) {
        s @ 400..=599 => StatusCode::from_u16(s as u16).map_err(|err| err.to_string())?,
        _ => return Err("status must be an error status, 400 to 599".into()),
    };
    if let Some(key) = params
        .keys()
        .find(|key| !matches!(key.as_str(), "status" | "retry_after" | "calls" | "for_ms"))
    {
        return Err(format!(
            "unknown key {key:?}; use status, retry_after, calls, for_ms"
        ));
    }
    Ok(PollFault {
        status: Some(status),
        retry_after: number("retry_after")?.unwrap_or(1),
        calls: number("calls")?,
        until: number("for_ms")?.map(|ms| now + Duration::from_millis(ms)),
    })
}

fn poll_fault_json(fault: &PollFault, now: Instant) -> Value {
    json!({
        "status": fault.status.map(|s| s.as_u16()),
        "retry_after": fault.retry_after,
        "calls": fault.calls,
        "for_ms": fault.until.map(|until| until.saturating_duration_since(now).as_millis() as u64),
    })
}

/// Reads `{"status": 400..=599, "retry_after": secs, "stall_ms": ms}`, every key optional.
fn parse_fault(body: &[u8]) -> Result<UsageFault, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(UsageFault::default());
    }
    let params = parse_body(body).map_err(|err| err.to_string())?;
    let number = |key: &str| -> Result<Option<u64>, String> {
        match params.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("{key} must be a whole number, zero or more")),
        }
    };
    let status = match number("status")? {
        None => None,
        Some(s @ 400..=599) => Some(s as u16),
        Some(_) => return Err("status must be an error status, 400 to 599".into()),
    };
    Ok(UsageFault {
        status,
        retry_after: number("retry_after")?.unwrap_or(1),
        stall_ms: number("stall_ms")?.unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_usage_faults() {
        assert_eq!(parse_fault(b"").unwrap(), UsageFault::default());
        assert_eq!(parse_fault(b"{}").unwrap().status, None);
        let f = parse_fault(br#"{"status":429,"retry_after":3}"#).unwrap();
        assert_eq!((f.status, f.retry_after), (Some(429), 3));
        assert_eq!(parse_fault(br#"{"stall_ms":2500}"#).unwrap().stall_ms, 2500);
        for bad in [
            &br#"{"status":200}"#[..],
            br#"{"status":"403"}"#,
            br#"{"stall_ms":-1}"#,
        ] {
            assert!(
                parse_fault(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let reply = parse_fault(br#"{"status":401}"#).unwrap().reply().unwrap();
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        let reply = parse_fault(br#"{"status":429}"#).unwrap().reply().unwrap();
        assert_eq!(reply.headers.get("retry-after").unwrap(), "1");
    }

    #[test]
    fn parses_debits() {
        assert_eq!(
            parse_debit(br#"{"credit_type":"lead","credits":5}"#),
            Ok((CreditType::Lead, 5_000))
        );
        assert_eq!(
            parse_debit(br#"{"credit_type":"export_credit","credits":0.25}"#),
            Ok((CreditType::Export, 250))
        );
        for bad in [
            &br#"{"credit_type":"gold","credits":5}"#[..],
            br#"{"credit_type":"lead","credits":-1}"#,
            br#"{"credit_type":"lead","credits":"5"}"#,
            br#"{"credit_type":"lead"}"#,
            b"{",
        ] {
            assert!(
                parse_debit(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
