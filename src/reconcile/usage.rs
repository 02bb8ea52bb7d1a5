//! Reading Apollo's `usage_stats/credit_usage_stats` answer: per credit type
//! `{"limit", "consumed", "left_over"}`, plus the current credit cycle.
//!
//! Apollo documents the shape only loosely, so the reader is lenient: numbers may be JSON numbers
//! or numeric strings, `consumed` may be derived from `limit - left_over`, the figures may sit one
//! object down, and the cycle is any `…cycle…start`/`…cycle…end` field (or a `…cycle…` object with
//! `start`/`end`). Credit types other than the three the ledger prices are ignored.

use serde_json::{Map, Value};

use super::CreditType;

/// One credit type's balance, thousandths of a credit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    pub credit_type: CreditType,
    pub limit_milli: Option<i64>,
    pub consumed_milli: i64,
    pub left_milli: Option<i64>,
}

/// A parsed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageStats {
    pub balances: Vec<Balance>,
    pub cycle_start: Option<String>,
    pub cycle_end: Option<String>,
}

/// Why an answer could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    #[error("the answer is not a JSON object")]
    NotJson,
    #[error(
        "the answer has no lead_credit, direct_dial_credit or export_credit figures (keys: {0})"
    )]
    NoCredits(String),
}

/// Parses a 2xx body.
pub fn parse(body: &[u8]) -> Result<UsageStats, UsageError> {
    let Ok(Value::Object(root)) = serde_json::from_slice::<Value>(body) else {
        return Err(UsageError::NotJson);
    };
    // The figures at the top, or in the first nested object that holds them.
    let holder = std::iter::once(&root)
        .chain(root.values().filter_map(Value::as_object))
        .find(|o| {
            CreditType::ALL
                .iter()
                .any(|t| o.contains_key(t.apollo_key()))
        });
    let Some(holder) = holder else {
        let keys: Vec<&str> = root.keys().map(String::as_str).take(12).collect();
        return Err(UsageError::NoCredits(keys.join(", ")));
    };
    let balances: Vec<Balance> = CreditType::ALL
        .iter()
        .filter_map(|&t| balance(t, holder.get(t.apollo_key())?.as_object()?))
        .collect();
    if balances.is_empty() {
        let keys: Vec<&str> = holder.keys().map(String::as_str).take(12).collect();
        return Err(UsageError::NoCredits(keys.join(", ")));
    }
    let (cycle_start, cycle_end) = cycle(&root)
        .or_else(|| {
            (!std::ptr::eq(holder, &root))
                .then(|| cycle(holder))
                .flatten()
        })
        .unwrap_or((None, None));
    Ok(UsageStats {
        balances,
        cycle_start,
        cycle_end,
    })
}

fn balance(credit_type: CreditType, o: &Map<String, Value>) -> Option<Balance> {
    let limit_milli = o.get("limit").and_then(milli);
    let left_milli = o.get("left_over").and_then(milli);
    let consumed_milli = o
        .get("consumed")
        .and_then(milli)
        .or_else(|| Some(limit_milli? - left_milli?))?;
    Some(Balance {
        credit_type,
        limit_milli,
        consumed_milli,
        left_milli,
    })
}

/// A credit figure (number or numeric string) in thousandths.
fn milli(v: &Value) -> Option<i64> {
    let credits = match v {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    credits
        .is_finite()
        .then(|| (credits * 1000.0).round() as i64)
}

/// `(start, end)` of the credit cycle, if the object names one.
fn cycle(o: &Map<String, Value>) -> Option<(Option<String>, Option<String>)> {
    let text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let mut start = None;
    let mut end = None;
    for (k, v) in o {
        let k = k.to_ascii_lowercase();
        if !k.contains("cycle") {
            continue;
        }
        if let Value::Object(inner) = v {
            for (ik, iv) in inner {
                let ik = ik.to_ascii_lowercase();
                if ik.contains("start") {
                    start = start.or_else(|| text(iv));
                } else if ik.contains("end") {
                    end = end.or_else(|| text(iv));
                }
            }
        } else if k.contains("start") {
            start = start.or_else(|| text(v));
        } else if k.contains("end") {
            end = end.or_else(|| text(v));
        }
    }
    (start.is_some() || end.is_some()).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_simulators_and_apollos_shape() {
        let body = br#"{"lead_credit":{"limit":1000,"consumed":12.5,"left_over":987.5},
            "direct_dial_credit":{"limit":100,"consumed":8,"left_over":92},
            "export_credit":{"limit":"50","consumed":"0","left_over":"50"},
            "ai_credit":{"limit":5,"consumed":1,"left_over":4},
            "current_credit_cycle_start":"2026-01-01T00:00:00.000+00:00",
            "current_credit_cycle_end":"2026-02-01T00:00:00.000+00:00"}"#;
        let u = parse(body).unwrap();
        assert_eq!(u.balances.len(), 3);
        assert_eq!(
            u.balances[0],
            Balance {
                credit_type: CreditType::Lead,
                limit_milli: Some(1_000_000),
                consumed_milli: 12_500,
                left_milli: Some(987_500),
            }
        );
        assert_eq!(u.balances[2].limit_milli, Some(50_000));
        assert_eq!(
            u.cycle_start.as_deref(),
            Some("2026-01-01T00:00:00.000+00:00")
        );
        assert_eq!(
            u.cycle_end.as_deref(),
            Some("2026-02-01T00:00:00.000+00:00")
        );
    }

    #[test]
    fn is_lenient_about_nesting_and_missing_consumed() {
        let body = br#"{"usage":{"lead_credit":{"limit":10,"left_over":7}},
            "current_credit_cycle":{"start_date":"2026-03-01","end_date":"2026-04-01"}}"#;
        let u = parse(body).unwrap();
        assert_eq!(u.balances[0].consumed_milli, 3_000);
        assert_eq!(u.cycle_start.as_deref(), Some("2026-03-01"));
        assert_eq!(u.cycle_end.as_deref(), Some("2026-04-01"));
        let u = parse(br#"{"lead_credit":{"consumed":1}}"#).unwrap();
        assert_eq!((u.cycle_start, u.balances[0].limit_milli), (None, None));
    }

    #[test]
    fn says_what_is_wrong() {
        assert_eq!(parse(b"Invalid API key"), Err(UsageError::NotJson));
        assert_eq!(parse(b"[1]"), Err(UsageError::NotJson));
        let e = parse(br#"{"credits":{"pool":5}}"#).unwrap_err();
        assert!(e.to_string().contains("credits"), "{e}");
        // Present but without any usable figure.
        assert!(parse(br#"{"lead_credit":{"limit":"lots"}}"#).is_err());
    }
}
