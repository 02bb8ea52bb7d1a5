//! The waste finder (`report --repeats [--within 30d]`, `GET /api/repeats`): credits spent
//! enriching a person or company that had already been enriched within `within` before, by
//! table pair (earlier table → later table).
//!
//! It reads the `identifiers` table (keyed fingerprints of the identifiers billed calls
//! carried; see `ledger::identifiers`). An enrichment is a call that billed credits; an item
//! (one person or company of a call) is a repeat when any of its identifiers had been enriched
//! by another call at most `within` earlier, and it counts once, against the most recent such
//! enrichment. Its credits are its share of the later call's credits.
//!
//! The JSON: `{"view": "repeats", "window": {"since", "until"}, "within", "within_ms",
//! "pairs": [{"earlier_table", "later_table", "items", "calls", "credits", "credits_milli",
//! "mean_gap_seconds", "min_gap_seconds", "max_gap_seconds", "by_kind": {kind: items},
//! "what": "people" | "companies" | "people and companies", "summary"}], "total": {"items",
//! "calls", "credits", "credits_milli"}, "notes": [...]}`.

use std::fmt::Write as _;

use rusqlite::Connection;
use serde_json::json;

use super::{align, credits, csv_field, format_time, window_label, Format};
use crate::ledger::identifiers::{self, RepeatPair};
use crate::ledger::queries::{self, Window};

/// `--within`'s default: 30 days.
pub const DEFAULT_WITHIN_MS: i64 = 30 * 86_400_000;

/// The repeats view, computed: plain data for the CLI, the admin API and the console.
#[derive(Debug, Clone)]
pub struct RepeatsReport {
    pub window: Window,
    pub within_ms: i64,
    /// Most credits first.
    pub pairs: Vec<RepeatPair>,
    pub total_items: i64,
    pub total_calls: i64,
    pub total_credits_milli: i64,
    pub notes: Vec<String>,
}

/// Finds the repeats among enrichments started in `window`, looking back `within_ms`.
pub fn compute(
    conn: &Connection,
    window: Window,
    within_ms: i64,
) -> rusqlite::Result<RepeatsReport> {
    let pairs = identifiers::repeats(conn, window.since_ms, window.until_ms, within_ms)?;
    let mut notes = Vec::new();
    if let Some(deleted) = queries::detail_deleted_before(conn)? {
        if deleted > window.since_ms.saturating_sub(within_ms) {
            notes.push(format!(
                "fingerprints of calls started before {} were deleted by ledger.retention: repeats of enrichments older than that are not found",
                format_time(deleted)
            ));
        }
    }
    let any: bool = conn.query_row("SELECT EXISTS (SELECT 1 FROM identifiers)", [], |r| {
        r.get(0)
    })?;
    if !any {
        notes.push("the ledger holds no identifier fingerprints: no billed call carried an identifier, or attribution.identifier_fingerprints is off".into());
    }
    notes
        .push("bulk calls: each person or company gets an even share of its call's credits".into());
    Ok(RepeatsReport {
        window,
        within_ms,
        total_items: pairs.iter().map(|p| p.items).sum(),
        total_calls: pairs.iter().map(|p| p.calls).sum(),
        total_credits_milli: pairs.iter().map(|p| p.credits_milli).sum(),
        pairs,
        notes,
    })
}

/// `people`, `companies`, or both, from the kinds a pair repeated on.
pub fn what(p: &RepeatPair) -> &'static str {
    let company = |k: &str| k == "domain" || k == "organization_id";
    let companies = p.by_kind.iter().any(|(k, _)| company(k));
    let people = p.by_kind.iter().any(|(k, _)| !company(k));
    match (people, companies) {
        (false, true) => "companies",
        (true, true) => "people and companies",
        _ => "people",
    }
}

/// A span as people say it: `45 seconds`, `20 minutes`, `5 hours`, `3 days`.
pub fn span(ms: i64) -> String {
    let (n, unit) = if ms < 120_000 {
        (ms / 1000, "second")
    } else if ms < 2 * 3_600_000 {
        (ms / 60_000, "minute")
    } else if ms < 2 * 86_400_000 {
        (ms / 3_600_000, "hour")
    } else {
        (ms / 86_400_000, "day")
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// `1,240`.
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// Credits with thousands separators: `1,240`, `3.5`.
fn credits_text(milli: i64) -> String {
    let whole = milli / 1000;
    let frac = credits(milli.rem_euclid(1000));
    match frac.split_once('.') {
        Some((_, f)) => format!("{}.{f}", thousands(whole)),
        None => thousands(whole),
    }
}

/// One sentence for a pair: "Inbound leads re-enriched 1,240 people that ABM accounts had
/// enriched 3 days earlier: 1,240 credits."
pub fn summary(p: &RepeatPair) -> String {
    let earlier = if p.earlier_table == p.later_table {
        "it".to_owned()
    } else {
        p.earlier_table.clone()
    };
    format!(
        "{} re-enriched {} {} that {} had enriched {} earlier{}: {} credits.",
        p.later_table,
        thousands(p.items),
        what(p),
        earlier,
        span(p.mean_gap_ms),
        if p.min_gap_ms != p.max_gap_ms {
            " on average"
        } else {
            ""
        },
        credits_text(p.credits_milli)
    )
}

fn pair_json(p: &RepeatPair) -> serde_json::Value {
    let by_kind: serde_json::Map<String, serde_json::Value> = p
        .by_kind
        .iter()
        .map(|(k, n)| (k.clone(), json!(n)))
        .collect();
    json!({
        "earlier_table": p.earlier_table, "later_table": p.later_table,
        "items": p.items, "calls": p.calls,
        "credits": p.credits_milli as f64 / 1000.0, "credits_milli": p.credits_milli,
        "mean_gap_seconds": p.mean_gap_ms / 1000, "min_gap_seconds": p.min_gap_ms / 1000,
        "max_gap_seconds": p.max_gap_ms / 1000,
        "by_kind": by_kind, "what": what(p), "summary": summary(p),
    })
}

impl RepeatsReport {
    /// The JSON described in the module docs (`report --repeats --format json`,
    /// `GET /api/repeats`).
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "view": "repeats",
            "window": {"since": format_time(self.window.since_ms), "until": format_time(self.window.until_ms)},
            "within": super::width_label(self.within_ms.max(60_000)),
            "within_ms": self.within_ms,
            "pairs": self.pairs.iter().map(pair_json).collect::<Vec<_>>(),
            "total": {
                "items": self.total_items, "calls": self.total_calls,
                "credits": self.total_credits_milli as f64 / 1000.0,
                "credits_milli": self.total_credits_milli,
            },
            "notes": self.notes,
        })
    }

    /// Renders in `format` (table, csv or json).
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Json => format!("{:#}\n", self.to_json()),
            Format::Csv | Format::Focus => {
                let mut out = String::from("earlier_table,later_table,what,items,calls,credits,mean_gap_seconds,min_gap_seconds,max_gap_seconds,by_kind\n");
                for p in &self.pairs {
                    let kinds: Vec<String> =
                        p.by_kind.iter().map(|(k, n)| format!("{k}={n}")).collect();
                    let _ = writeln!(
                        out,
                        "{},{},{},{},{},{},{},{},{},{}",
                        csv_field(&p.earlier_table),
                        csv_field(&p.later_table),
                        csv_field(what(p)),
                        p.items,
                        p.calls,
                        credits(p.credits_milli),
                        p.mean_gap_ms / 1000,
                        p.min_gap_ms / 1000,
                        p.max_gap_ms / 1000,
                        csv_field(&kinds.join(";")),
                    );
                }
                out
            }
            Format::Table => {
                let mut out = format!(
                    "Re-enrichment within {} of an earlier enrichment, {}\n\n",
                    span(self.within_ms),
                    window_label(self.window)
                );
                if self.pairs.is_empty() {
                    out.push_str("No person or company was enriched twice in the window.\n");
                } else {
                    for p in &self.pairs {
                        let _ = writeln!(out, "{}", summary(p));
                    }
                    out.push('\n');
                    let mut rows = vec![[
                        "earlier table",
                        "later table",
                        "items",
                        "calls",
                        "credits",
                        "mean gap",
                        "found on",
                    ]
                    .map(str::to_owned)
                    .to_vec()];
                    for p in &self.pairs {
                        let kinds: Vec<String> =
                            p.by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
                        rows.push(vec![
                            p.earlier_table.clone(),
                            p.later_table.clone(),
                            thousands(p.items),
                            thousands(p.calls),
                            credits_text(p.credits_milli),
                            span(p.mean_gap_ms),
                            kinds.join(", "),
                        ]);
                    }
                    rows.push(vec![
                        "TOTAL".into(),
                        String::new(),
                        thousands(self.total_items),
                        thousands(self.total_calls),
                        credits_text(self.total_credits_milli),
                        String::new(),
                        String::new(),
                    ]);
                    let lines = align(&rows);
                    let width = lines.iter().map(|l| l.chars().count()).max().unwrap_or(0);
                    let n = lines.len();
                    for (i, l) in lines.iter().enumerate() {
                        if i == n - 1 {
                            let _ = writeln!(out, "{}", "-".repeat(width));
                        }
                        let _ = writeln!(out, "{l}");
                        if i == 0 {
                            let _ = writeln!(out, "{}", "-".repeat(width));
                        }
                    }
                }
                for note in &self.notes {
                    let _ = writeln!(out, "note: {note}");
                }
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(kinds: &[(&str, i64)], min: i64, max: i64) -> RepeatPair {
        RepeatPair {
            earlier_table: "ABM accounts".into(),
            later_table: "Inbound leads".into(),
            items: 1240,
            calls: 1240,
            credits_milli: 1_240_000,
            mean_gap_ms: 3 * 86_400_000 + 5_000,
            min_gap_ms: min,
            max_gap_ms: max,
            by_kind: kinds.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect(),
        }
    }

    #[test]
    fn the_sentence_reads_like_the_issue() {
        let p = pair(&[("email", 1240)], 5, 5);
        assert_eq!(
            summary(&p),
            "Inbound leads re-enriched 1,240 people that ABM accounts had enriched 3 days earlier: 1,240 credits."
        );
        let p = pair(&[("domain", 3)], 1, 9);
        assert!(summary(&p).contains("1,240 companies"), "{}", summary(&p));
        assert!(summary(&p).contains("earlier on average"));
    }

    #[test]
    fn numbers_and_spans_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(credits_text(1_240_500), "1,240.5");
        assert_eq!(span(45_000), "45 seconds");
        assert_eq!(span(3_600_000), "60 minutes");
        assert_eq!(span(5 * 3_600_000), "5 hours");
        assert_eq!(span(86_400_000), "24 hours");
        assert_eq!(span(30 * 86_400_000), "30 days");
    }
}
