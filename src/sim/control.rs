//! The sim's own endpoints under `/__sim/`, for tests and demos; Apollo has nothing like them.
//!
//! - `GET /__sim/billed`: the running [`Billed`](super::Billed) totals as JSON.
//! - `POST /__sim/debit` with `{"credit_type":"lead","credits":5}`: spends credits out of band,
//!   as Apollo's web app or another integration would. `usage_stats` shows them as consumed;
//!   `billed` does not count them. Answers with the usage stats.
//! - `POST /__sim/reset_cycle`: starts the next credit cycle (a month later) with nothing
//!   consumed. Answers with the usage stats.
//!
//! They need no API key, are not rate limited, and are not counted as calls.

use std::sync::Mutex;

use http::{Method, StatusCode};
use serde_json::Value;

use super::account::{Account, CreditType};
use super::lock;
use super::params::parse_body;
use super::reply::Reply;

/// Answers `method` on `/__sim/{action}`.
pub(crate) fn answer(
    method: &Method,
    action: &str,
    body: &[u8],
    account: &Mutex<Account>,
) -> Reply {
    match (method, action) {
        (&Method::GET, "billed") => match serde_json::to_value(lock(account).billed()) {
            Ok(billed) => Reply::json(StatusCode::OK, billed),
            Err(err) => Reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL_ERROR",
                err.to_string(),
            ),
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

#[cfg(test)]
mod tests {
    use super::*;

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
