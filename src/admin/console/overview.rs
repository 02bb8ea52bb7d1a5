//! The overview: spend in the window by table, the burn timeline with its spikes (each with
//! its top tables), the credits left at the last balance snapshot, pending deferred credits,
//! and the alerts that would fire.
//!
//! Every figure is the report's (`report --by table`, `--timeline`, `--spikes`), computed
//! from the hourly rollups for whole hours and the detail rows only for the ragged edge hours:
//! never a scan of `calls` over the window.

use maud::{html, Markup};
use serde_json::Value;

use super::charts::{self, Bucket};
use super::{entity_link, fmt_credits, layout, milli_of, report_json, Ctx, PageError, Query, Win};
use crate::report::{self, ReportArgs};

/// The table hourly spend above which `CreditmeterTableHourlySpendHigh` fires, unless the
/// rules file overrides it per table (`creditmeter:table_credits_per_hour:threshold_default`
/// in deploy/prometheus/creditmeter-rules.yml).
pub const TABLE_HOURLY_THRESHOLD_MILLI: i64 = 500_000;

/// One alert rule as the console evaluates it from the ledger and the running state.
pub struct Alert {
    pub name: &'static str,
    pub firing: bool,
    /// What is true now (or why not).
    pub detail: String,
}

/// Renders `/ui/`.
pub fn render(ctx: &Ctx, q: &Query) -> Result<Markup, PageError> {
    let win = Win::from_query(q, ctx.now)?;
    let spend = report_json(
        ctx,
        &ReportArgs {
            by: Some("table".into()),
            ..win.args()
        },
    )?;
    let timeline = report_json(
        ctx,
        &ReportArgs {
            timeline: Some(win.bucket.into()),
            ..win.args()
        },
    )?;
    let spikes = report_json(
        ctx,
        &ReportArgs {
            timeline: Some(win.bucket.into()),
            spikes: true,
            top: Some(3),
            ..win.args()
        },
    )?;
    let workflows = report_json(
        ctx,
        &ReportArgs {
            by: Some("workflow".into()),
            top: Some(10),
            ..win.args()
        },
    )?;
    let endpoints = report_json(
        ctx,
        &ReportArgs {
            by: Some("endpoint".into()),
            ..win.args()
        },
    )?;
    let conn = crate::ledger::open_for_read(&ctx.db)?;
    let balances = crate::reconcile::store::latest_balances(&conn)?;
    let last_snapshot: Option<i64> = conn
        .query_row("SELECT max(sent_at) FROM balance_snapshots", [], |r| {
            r.get(0)
        })
        .unwrap_or(None);
    let alerts = evaluate_alerts(ctx, &conn)?;
    drop(conn);

    let total = &spend["total"];
    let buckets = buckets_of(&timeline);
    let firing = alerts.iter().filter(|a| a.firing).count();
    let body = html! {
        h1 { "Who burned the credits, and when" }
        (layout::window_selector("/ui/?", &win, &[]))
        (win.heading())
        div.cards {
            div.card #total-credits data-milli=(milli_of(&total["credits"])) {
                div.label { "Credits spent in the window" }
                div.value { (fmt_credits(milli_of(&total["credits"]))) }
            }
            div.card #total-calls data-calls=(total["calls"]) {
                div.label { "Calls" }
                div.value { (total["calls"]) }
            }
            div.card #pending data-milli=(milli_of(&total["pending_credits"])) {
                div.label { "Pending deferred credits" }
                div.value { (fmt_credits(milli_of(&total["pending_credits"]))) }
            }
            div.card #credits-left {
                div.label { "Credits left (last balance snapshot)" }
                @if balances.is_empty() {
                    div.value { "—" }
                    div.note { "no balance snapshot yet (reconcile stores one per poll of Apollo's usage_stats)" }
                } @else {
                    @for (t, _, left) in &balances {
                        div data-credit-type=(t.as_str()) data-left-milli=[left] {
                            (t.as_str()) ": " strong { (left.map_or("unknown".into(), fmt_credits)) }
                        }
                    }
                    @if let Some(at) = last_snapshot {
                        div.note { "at " (report::format_time(at)) }
                    }
                }
            }
            div.card #alerts-firing data-firing=(firing) {
                div.label { "Alerts that would fire" }
                div.value { (firing) }
            }
        }
        h2 { "Burn timeline" }
        (charts::timeline(&buckets, win.bucket, "Credits per bucket, all tables"))
        h2 { "Spikes" }
        p.note { (spikes["spike_rule"]["factor"]) "x the trailing baseline (90th percentile of the previous " (spikes["spike_rule"]["trailing"].as_str().unwrap_or("")) ") and at least " (spikes["spike_rule"]["floor_credits"]) " credits above it, judged on the total and on each table." }
        (spike_list(&spikes, &win))
        h2 { "Spend by table" }
        (spend_table(&spend, "table", Some("table"), &win))
        h2 { "Spend by workflow" }
        (spend_table(&workflows, "workflow", Some("workflow"), &win))
        h2 { "Spend by endpoint" }
        (spend_table(&endpoints, "endpoint", Some("endpoint"), &win))
        h2 { "Alerts" }
        (alert_list(&alerts))
        @for n in notes_of(&spend).iter().chain(notes_of(&timeline).iter()) {
            p.note { "Note: " (n) }
        }
    };
    Ok(layout::page(ctx, "Overview", "/ui/", body))
}

/// The timeline JSON's buckets as chart bars.
pub fn buckets_of(timeline: &Value) -> Vec<Bucket> {
    timeline["buckets"]
        .as_array()
        .map(|bs| {
            bs.iter()
                .map(|b| Bucket {
                    start_ms: b["start_ms"].as_i64().unwrap_or(0),
                    start: b["start"].as_str().unwrap_or("").to_owned(),
                    credits_milli: b["credits_milli"].as_i64().unwrap_or(0),
                    calls: b["calls"].as_u64().unwrap_or(0),
                    spike: b["spike"].as_bool().unwrap_or(false),
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn notes_of(doc: &Value) -> Vec<String> {
    doc["notes"]
        .as_array()
        .map(|n| {
            n.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The spikes JSON as a list: each window with its credits, usual credits and top groups.
pub fn spike_list(spikes: &Value, win: &Win) -> Markup {
    let list = spikes["spikes"].as_array().cloned().unwrap_or_default();
    html! {
        @if list.is_empty() {
            p #spikes data-spikes="0" { "No spikes in this window." }
        } @else {
            ol #spikes data-spikes=(list.len()) {
                @for s in &list {
                    li.spike data-start=(s["start"].as_str().unwrap_or("")) data-credits-milli=(s["credits_milli"]) {
                        strong { (s["start"].as_str().unwrap_or("")) " to " (s["end"].as_str().unwrap_or("")) }
                        ": " (fmt_credits(s["credits_milli"].as_i64().unwrap_or(0))) " credits in " (s["calls"]) " calls (usually "
                        (fmt_credits(milli_of(&s["usual_credits"]))) ")"
                        @if !s["total_spike"].as_bool().unwrap_or(false) { "; the total stayed within its usual range" }
                        ". Top tables: "
                        @for (i, t) in s["top"].as_array().cloned().unwrap_or_default().iter().enumerate() {
                            @if i > 0 { ", " }
                            @let key = t["key"].as_str().unwrap_or("");
                            a href=(entity_link("table", key, win)) { (key) }
                            " " (fmt_credits(t["credits_milli"].as_i64().unwrap_or(0)))
                            @if t["jumped"].as_bool().unwrap_or(false) { " (jumped)" }
                        }
                    }
                }
            }
        }
    }
}

/// A spend report's rows as a table, each key linking to its page (`link`), with the total.
pub fn spend_table(doc: &Value, heading: &str, link: Option<&str>, win: &Win) -> Markup {
    let rows = doc["rows"].as_array().cloned().unwrap_or_default();
    let pct = |v: &Value| {
        v.as_f64()
            .map_or("-".to_owned(), |m| format!("{:.1}%", m * 100.0))
    };
    let cpm = |v: &Value| v.as_f64().map_or("-".to_owned(), |c| format!("{c:.2}"));
    let row = |r: &Value, total: bool| {
        let key = r["key"].as_str().unwrap_or("");
        html! {
            tr.row data-key=(key) data-credits-milli=(r["credits_milli"]) data-calls=(r["calls"]) {
                td.text {
                    @match (link, total) {
                        (Some(kind), false) => a href=(entity_link(kind, key, win)) { (key) },
                        _ => (key),
                    }
                }
                td { (r["calls"]) }
                td.credits { (fmt_credits(r["credits_milli"].as_i64().unwrap_or(0))) }
                td { (fmt_credits(milli_of(&r["lead_credits"]))) }
                td { (fmt_credits(milli_of(&r["direct_dial_credits"]))) }
                td { (fmt_credits(milli_of(&r["export_credits"]))) }
                td { (r["records_requested"]) }
                td { (r["records_matched"]) }
                td { (pct(&r["match_rate"])) }
                td { (cpm(&r["credits_per_match"])) }
                td { (fmt_credits(r["pending_milli"].as_i64().unwrap_or(0))) }
            }
        }
    };
    html! {
        @if rows.is_empty() {
            p.note data-rows="0" { "Nothing in this window." }
        } @else {
            table.spend data-group-by=(heading) {
                thead { tr {
                    th scope="col" { (heading) } th scope="col" { "calls" } th scope="col" { "credits" }
                    th scope="col" { "lead" } th scope="col" { "direct dial" } th scope="col" { "export" }
                    th scope="col" { "requested" } th scope="col" { "matched" } th scope="col" { "match rate" }
                    th scope="col" { "credits/match" } th scope="col" { "pending" }
                } }
                tbody { @for r in &rows { (row(r, false)) } }
                tfoot { (row(&doc["total"], true)) }
            }
        }
    }
}

fn alert_list(alerts: &[Alert]) -> Markup {
    html! {
        p.note { "Evaluated here from the ledger and the running state, as deploy/prometheus/creditmeter-rules.yml defines them (over the last rolling hour, without the rules' for: delays). The burn-spike, rate-limit, upstream-error, backlog, label-cap and up/absent alerts need Prometheus's history and are not evaluated here." }
        table #alerts {
            thead { tr { th scope="col" { "alert" } th scope="col" { "state" } th.text scope="col" { "why" } } }
            tbody {
                @for a in alerts {
                    tr.alert data-alert=(a.name) data-firing=(a.firing) {
                        td { (a.name) }
                        td { @if a.firing { span.firing { "would fire" } } @else { span.quiet { "quiet" } } }
                        td.text { (a.detail) }
                    }
                }
            }
        }
    }
}

/// The alert rules the console can judge from what it holds.
pub fn evaluate_alerts(ctx: &Ctx, conn: &rusqlite::Connection) -> Result<Vec<Alert>, PageError> {
    let mut out = Vec::new();
    let hour = report_json(
        ctx,
        &ReportArgs {
            by: Some("table".into()),
            since: Some(report::format_time(ctx.now - 3_600_000)),
            until: Some(report::format_time(ctx.now + 60_000)),
            ..Default::default()
        },
    )?;
    let rows = hour["rows"].as_array().cloned().unwrap_or_default();
    let high: Vec<String> = rows
        .iter()
        .filter(|r| r["key"] != "_unattributed")
        .filter(|r| r["credits_milli"].as_i64().unwrap_or(0) > TABLE_HOURLY_THRESHOLD_MILLI)
        .map(|r| {
            format!(
                "{} spent {}",
                r["key"].as_str().unwrap_or(""),
                fmt_credits(r["credits_milli"].as_i64().unwrap_or(0))
            )
        })
        .collect();
    out.push(Alert {
        name: "CreditmeterTableHourlySpendHigh",
        firing: !high.is_empty(),
        detail: if high.is_empty() {
            format!("no table spent more than {} credits in the last hour (the rules' default threshold; per-table overrides live in the rules file)", fmt_credits(TABLE_HOURLY_THRESHOLD_MILLI))
        } else {
            format!("in the last hour: {} (threshold {} credits)", high.join(", "), fmt_credits(TABLE_HOURLY_THRESHOLD_MILLI))
        },
    });
    let total = hour["total"]["credits_milli"].as_i64().unwrap_or(0);
    let unattributed = rows
        .iter()
        .find(|r| r["key"] == "_unattributed")
        .and_then(|r| r["credits_milli"].as_i64())
        .unwrap_or(0);
    let ratio = if total > 0 {
        unattributed as f64 / total as f64
    } else {
        0.0
    };
    out.push(Alert {
        name: "CreditmeterUnattributedSpend",
        firing: ratio > 0.10 && unattributed >= 10_000,
        detail: format!(
            "{} credits without a table in the last hour, {:.1}% of {} (fires above 10% and 10 credits)",
            fmt_credits(unattributed),
            ratio * 100.0,
            fmt_credits(total)
        ),
    });
    let answer = crate::reconcile::answer::load(conn, ctx.now - 3_600_000, ctx.now)?;
    let mut unmetered: std::collections::BTreeMap<&'static str, i64> = Default::default();
    for w in answer.windows.iter().filter(|w| !w.cycle_reset) {
        *unmetered.entry(w.credit_type.as_str()).or_default() += w.unmetered;
    }
    let over: Vec<String> = unmetered
        .iter()
        .filter(|(_, m)| **m >= 10_000)
        .map(|(t, m)| format!("{} {t}", fmt_credits(*m)))
        .collect();
    out.push(Alert {
        name: "CreditmeterUnmeteredSpend",
        firing: !over.is_empty(),
        detail: if over.is_empty() {
            "under 10 unmetered credits of each type in the last hour's reconciled windows".into()
        } else {
            format!("unmetered in the last hour: {}", over.join(", "))
        },
    });
    let poller = ctx.reconcile.to_json();
    let failing = poller["enabled"].as_bool().unwrap_or(false)
        && poller["consecutive_failures"].as_u64().unwrap_or(0) > 0
        && poller["last_success"]
            .as_str()
            .and_then(|s| report::parse_time(s, ctx.now).ok())
            .is_none_or(|t| t < ctx.now - 3_600_000);
    out.push(Alert {
        name: "CreditmeterReconcileFailing",
        firing: failing,
        detail: if poller["enabled"].as_bool().unwrap_or(false) {
            format!(
                "last result {}, {} failure(s) in a row, last success {}",
                poller["last_result"].as_str().unwrap_or("none yet"),
                poller["consecutive_failures"],
                poller["last_success"].as_str().unwrap_or("never")
            )
        } else {
            "reconciliation is off ([reconcile] enabled = false)".into()
        },
    });
    out.push(Alert {
        name: "CreditmeterLedgerErrors",
        firing: !ctx.ledger_healthy,
        detail: if ctx.ledger_healthy {
            "the ledger is writable".into()
        } else {
            "the ledger is failing: see /readyz and the log".into()
        },
    });
    let budgets = ctx.guard.snapshot(ctx.now);
    let mut warned = Vec::new();
    let mut refusing = Vec::new();
    for b in budgets["budgets"].as_array().cloned().unwrap_or_default() {
        let name = b["name"].as_str().unwrap_or("").to_owned();
        for l in b["limits"].as_array().cloned().unwrap_or_default() {
            if l["warning"].as_bool().unwrap_or(false) {
                warned.push(format!(
                    "{name} at {}% of its {} limit",
                    l["used_percent"],
                    l["credit_type"].as_str().unwrap_or("")
                ));
            }
        }
        if b["rejections"].as_u64().unwrap_or(0) > 0 {
            refusing.push(format!("{name} ({} refused)", b["rejections"]));
        }
    }
    out.push(Alert {
        name: "CreditmeterBudgetWarning",
        firing: !warned.is_empty(),
        detail: if warned.is_empty() {
            "no budget has passed its warn_at".into()
        } else {
            warned.join("; ")
        },
    });
    out.push(Alert {
        name: "CreditmeterBudgetExhausted",
        firing: !refusing.is_empty(),
        detail: if refusing.is_empty() {
            "no budget has refused a call since creditmeter started".into()
        } else {
            format!(
                "budgets that refused calls since creditmeter started (the rule looks at the last 5 minutes): {}",
                refusing.join(", ")
            )
        },
    });
    let holds = ctx.guard.holds();
    let old = holds
        .iter()
        .filter(|h| h.created_at < ctx.now - 2 * 3_600_000)
        .count();
    out.push(Alert {
        name: "CreditmeterHoldActive",
        firing: old > 0,
        detail: format!(
            "{} hold(s) in force, {old} of them for over 2 hours (the rule's for: 2h)",
            holds.len()
        ),
    });
    Ok(out)
}
