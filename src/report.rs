//! `creditmeter report`: spend from the ledger, grouped, windowed, as a table, CSV or JSON.
//!
//! It opens the ledger read-only (WAL readers never block the proxy). The JSON shape is stable
//! for scripts: `{"group_by", "window": {"since", "until"}, "rows": [...], "total": {...}}` where
//! each row has `key`, `calls`, `credits`, `lead_credits`, `direct_dial_credits`,
//! `export_credits`, `credits_milli`, `records_requested`, `records_matched`, `match_rate`
//! (null when nothing was requested) and `credits_per_match` (null when nothing matched).

use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::json;

use crate::ledger::queries::{self, GroupBy, SpendRow};
use crate::meter::now_ms;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// What to report.
#[derive(Debug, Clone)]
pub struct ReportRequest {
    pub db: PathBuf,
    pub by: GroupBy,
    pub since_ms: i64,
    pub until_ms: i64,
    pub top: Option<usize>,
    pub format: Format,
}

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("ledger {path} does not exist (is ledger.path right? pass --db or --config)")]
    Missing { path: PathBuf },
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error("ledger query: {0}")]
    Query(#[from] rusqlite::Error),
}

/// Parses `--since`/`--until`: RFC 3339 (`2026-11-24T10:00:00Z`), a date (`2026-11-24`, UTC
/// midnight), `now`, or relative to now (`90m`, `24h`, `7d`, `2w`).
pub fn parse_time(s: &str, now: i64) -> Result<i64, String> {
    let s = s.trim();
    if s == "now" {
        return Ok(now);
    }
    if let Some((num, unit)) = s
        .find(|c: char| !c.is_ascii_digit())
        .filter(|&i| i > 0)
        .map(|i| s.split_at(i))
    {
        let scale = match unit {
            "s" => Some(1_000),
            "m" => Some(60_000),
            "h" => Some(3_600_000),
            "d" => Some(86_400_000),
            "w" => Some(7 * 86_400_000),
            _ => None,
        };
        if let (Some(scale), Ok(n)) = (scale, num.parse::<i64>()) {
            return Ok(now - n.saturating_mul(scale));
        }
    }
    parse_rfc3339(s).ok_or_else(|| {
        format!("{s:?} is not a time: use RFC 3339 (2026-11-24T10:00:00Z), a date (2026-11-24), or a relative span (24h, 7d)")
    })
}

fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        std::str::from_utf8(b.get(r)?).ok()?.parse().ok()
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    if b.len() == 10 {
        return Some(days * 86_400_000);
    }
    if !matches!(b[10], b'T' | b't' | b' ') || b.len() < 19 || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut ms = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let frac = std::str::from_utf8(&b[start..i]).ok()?;
        let padded: String = frac.chars().chain("000".chars()).take(3).collect();
        ms = padded.parse::<i64>().ok()?;
    }
    let offset_min = match b.get(i)? {
        b'Z' | b'z' if b.len() == i + 1 => 0,
        sign @ (b'+' | b'-') if b.len() == i + 6 && b[i + 3] == b':' => {
            let m = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if *sign == b'+' {
                m
            } else {
                -m
            }
        }
        _ => return None,
    };
    Some(((days * 86_400 + h * 3600 + mi * 60 + sec) - offset_min * 60) * 1000 + ms)
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix ms → `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Runs the report and renders it.
pub fn run(req: &ReportRequest) -> Result<String, ReportError> {
    if !req.db.exists() {
        return Err(ReportError::Missing {
            path: req.db.clone(),
        });
    }
    let conn = crate::ledger::open_for_read(&req.db)?;
    let mut rows = queries::spend(&conn, &req.by, req.since_ms, req.until_ms)?;
    let mut total = SpendRow {
        key: "TOTAL".into(),
        ..Default::default()
    };
    for r in &rows {
        total.add(r);
    }
    if let Some(n) = req.top {
        rows.truncate(n);
    }
    Ok(render(req, &rows, &total))
}

fn credits(milli: i64) -> String {
    format!("{:.3}", milli as f64 / 1000.0)
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_owned()
}

fn render(req: &ReportRequest, rows: &[SpendRow], total: &SpendRow) -> String {
    match req.format {
        Format::Json => {
            let row = |r: &SpendRow| {
                json!({
                    "key": r.key, "calls": r.calls,
                    "credits": r.credits_milli as f64 / 1000.0, "credits_milli": r.credits_milli,
                    "lead_credits": r.lead_milli as f64 / 1000.0,
                    "direct_dial_credits": r.direct_dial_milli as f64 / 1000.0,
                    "export_credits": r.export_milli as f64 / 1000.0,
                    "records_requested": r.records_requested, "records_matched": r.records_matched,
                    "match_rate": r.match_rate(), "credits_per_match": r.credits_per_match(),
                })
            };
            let doc = json!({
                "group_by": req.by.label(),
                "window": {"since": format_time(req.since_ms), "until": format_time(req.until_ms)},
                "rows": rows.iter().map(row).collect::<Vec<_>>(),
                "total": row(total),
            });
            format!("{doc:#}\n")
        }
        Format::Csv => {
            let mut out = format!("{},calls,credits,lead,direct_dial,export,records_requested,records_matched,match_rate,credits_per_match\n", req.by.label());
            for r in rows.iter().chain(std::iter::once(total)) {
                let _ = writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{}",
                    csv_field(&r.key),
                    r.calls,
                    credits(r.credits_milli),
                    credits(r.lead_milli),
                    credits(r.direct_dial_milli),
                    credits(r.export_milli),
                    r.records_requested,
                    r.records_matched,
                    r.match_rate()
                        .map(|m| format!("{m:.4}"))
                        .unwrap_or_default(),
                    r.credits_per_match()
                        .map(|c| format!("{c:.3}"))
                        .unwrap_or_default(),
                );
            }
            out
        }
        Format::Table => {
            let header = [
                req.by.label(),
                "calls".into(),
                "credits".into(),
                "lead".into(),
                "direct_dial".into(),
                "export".into(),
                "requested".into(),
                "matched".into(),
                "match".into(),
                "cr/match".into(),
            ];
            let cells = |r: &SpendRow| -> [String; 10] {
                [
                    r.key.clone(),
                    r.calls.to_string(),
                    credits(r.credits_milli),
                    credits(r.lead_milli),
                    credits(r.direct_dial_milli),
                    credits(r.export_milli),
                    r.records_requested.to_string(),
                    r.records_matched.to_string(),
                    r.match_rate()
                        .map(|m| format!("{:.1}%", m * 100.0))
                        .unwrap_or_else(|| "-".into()),
                    r.credits_per_match()
                        .map(|c| format!("{c:.2}"))
                        .unwrap_or_else(|| "-".into()),
                ]
            };
            let body: Vec<[String; 10]> = rows.iter().map(cells).collect();
            let foot = cells(total);
            let mut widths = header.clone().map(|h| h.chars().count());
            for r in body.iter().chain(std::iter::once(&foot)) {
                for (w, c) in widths.iter_mut().zip(r) {
                    *w = (*w).max(c.chars().count());
                }
            }
            let line = |r: &[String; 10]| {
                let mut s = String::new();
                for (i, (c, w)) in r.iter().zip(widths).enumerate() {
                    if i == 0 {
                        let _ = write!(s, "{c:<w$}");
                    } else {
                        let _ = write!(s, "  {c:>w$}");
                    }
                }
                s.trim_end().to_owned() + "\n"
            };
            let window = if req.since_ms <= 0 {
                format!("all time to {}", format_time(req.until_ms))
            } else {
                format!(
                    "{} to {}",
                    format_time(req.since_ms),
                    format_time(req.until_ms)
                )
            };
            let mut out = format!("Spend by {}, {window}\n\n", req.by.label());
            out.push_str(&line(&header));
            let rule: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            out.push_str(&"-".repeat(rule));
            out.push('\n');
            for r in &body {
                out.push_str(&line(r));
            }
            out.push_str(&"-".repeat(rule));
            out.push('\n');
            out.push_str(&line(&foot));
            out
        }
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// `--until` default: a minute ahead, so calls being recorded right now are included.
pub fn default_until() -> i64 {
    now_ms() + 60_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse() {
        let now = 1_700_000_000_000;
        assert_eq!(parse_time("24h", now).unwrap(), now - 86_400_000);
        assert_eq!(parse_time("7d", now).unwrap(), now - 7 * 86_400_000);
        assert_eq!(parse_time("now", now).unwrap(), now);
        assert_eq!(parse_time("1970-01-02", now).unwrap(), 86_400_000);
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z", now).unwrap(),
            1_700_000_000_000
        );
        assert_eq!(
            parse_time("2023-11-14T23:13:20.5+01:00", now).unwrap(),
            1_700_000_000_500
        );
        assert!(parse_time("yesterday", now).is_err());
        assert!(parse_time("2023-13-01", now).is_err());
        assert!(parse_time("5x", now).is_err());
    }

    #[test]
    fn time_formats_round_trip() {
        for ms in [0, 1_700_000_000_000, 951_782_400_000 /* 2000-02-29 */] {
            assert_eq!(parse_time(&format_time(ms), 0).unwrap(), ms);
        }
        assert_eq!(format_time(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}
