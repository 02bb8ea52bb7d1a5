//! The reconciliation page: the windows in which Apollo's balance fell by more than
//! creditmeter metered, by endpoint where the analysis can name one, and the calls Apollo
//! counted that never passed through the proxy. The figures are `report --reconcile --format
//! json`'s ([`crate::reconcile::answer`]).

use maud::{html, Markup};
use serde_json::Value;

use super::{fmt_credits, layout, milli_of, Ctx, PageError, Query, Win};
use crate::report;

/// Renders `/ui/reconcile`.
pub fn render(ctx: &Ctx, q: &Query) -> Result<Markup, PageError> {
    let win = Win::from_query(q, ctx.now)?;
    let conn = crate::ledger::open_for_read(&ctx.db)?;
    let answer = crate::reconcile::answer::load(&conn, win.since_ms, win.until_ms)?;
    drop(conn);
    let doc = answer.to_json();
    let poller = ctx.reconcile.to_json();
    let arr = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let s = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let windows = arr(&doc["windows"]);
    let outside = arr(&doc["outside_calls"]);
    let body = html! {
        h1 { "Reconciliation" }
        (layout::window_selector("/ui/reconcile?", &win, &[]))
        (win.heading())
        p {
            "The poller " @if poller["enabled"].as_bool().unwrap_or(false) { "is on" } @else { "is off ([reconcile] enabled = false)" }
            "; last result " (s(&poller["last_result"])) ", last success " (s(&poller["last_success"]))
            ". Snapshots in the window: " (s(&doc["status"]["snapshots"])) ", latest ever " (s(&doc["status"]["last_snapshot"])) "."
        }
        @if let Some(n) = doc["status"]["note"].as_str() { p.note { (n) } }
        h2 { "Totals" }
        @let totals = arr(&doc["totals"]);
        @if totals.is_empty() {
            p.note { "No reconciled window in this range." }
        } @else {
            table #reconcile-totals {
                thead { tr { th scope="col" { "credit type" } th scope="col" { "windows" } th scope="col" { "Apollo's balance fell" } th scope="col" { "metered" } th scope="col" { "unmetered" } } }
                tbody {
                    @for t in &totals {
                        tr data-credit-type=(s(&t["credit_type"])) data-unmetered-milli=(milli_of(&t["unmetered"])) {
                            td { (s(&t["credit_type"])) } td { (s(&t["windows"])) }
                            td { (fmt_credits(milli_of(&t["apollo_delta"]))) } td { (fmt_credits(milli_of(&t["metered"]))) }
                            td { (fmt_credits(milli_of(&t["unmetered"]))) }
                        }
                    }
                }
            }
        }
        h2 { "Findings" }
        @let findings = arr(&doc["findings"]);
        @if findings.is_empty() { p.note { "Nothing unexplained." } }
        ul {
            @for f in &findings {
                li.finding data-kind=(s(&f["kind"])) {
                    @match f["kind"].as_str() {
                        Some("catalog_error") => {
                            "Endpoint " strong { (s(&f["endpoint"])) } " looks under-priced: " (s(&f["ratio"])) " unmetered " (s(&f["credit_type"])) " credits per " (s(&f["per"]))
                            " (" (s(&f["agreeing_windows"])) " of " (s(&f["windows_with_volume"])) " windows agree)."
                        }
                        Some("outside_calls") => { (s(&f["summary"])) }
                        _ => {
                            (fmt_credits(milli_of(&f["unmetered"]))) " " (s(&f["credit_type"])) " credits in " (s(&f["windows"])) " window(s) look like traffic outside the proxy."
                        }
                    }
                }
            }
        }
        h2 { "Windows with unmetered credits" }
        @if windows.is_empty() {
            p #unmetered-windows data-rows="0" { "No window in this range had unmetered credits." }
        } @else {
            table #unmetered-windows data-rows=(windows.len()) {
                thead { tr {
                    th scope="col" { "start (UTC)" } th scope="col" { "end" } th scope="col" { "credit type" }
                    th scope="col" { "Apollo's balance fell" } th scope="col" { "metered" } th scope="col" { "unmetered" }
                    th scope="col" { "proxied calls" } th.text scope="col" { "looks like" } th.text scope="col" { "endpoint" } th.text scope="col" { "why" }
                } }
                tbody {
                    @for w in &windows {
                        tr.window data-start=(s(&w["start"])) data-unmetered-milli=(s(&w["unmetered_milli"])) data-endpoint=(s(&w["endpoint"])) {
                            td { (s(&w["start"])) } td { (s(&w["end"])) } td { (s(&w["credit_type"])) }
                            td { (fmt_credits(milli_of(&w["apollo_delta"]))) } td { (fmt_credits(milli_of(&w["metered"]))) }
                            td { (fmt_credits(w["unmetered_milli"].as_i64().unwrap_or(0))) } td { (s(&w["proxied_calls"])) }
                            td.text { (s(&w["kind"])) } td.text { (s(&w["endpoint"])) } td.text { (s(&w["reason"])) }
                        }
                    }
                }
            }
        }
        h2 { "Calls Apollo counted that did not pass through creditmeter" }
        @if outside.is_empty() {
            p.note { "None in this range (from Apollo's per-route call counts, when the poller can read them)." }
        } @else {
            table #outside-calls {
                thead { tr { th scope="col" { "endpoint" } th scope="col" { "start (UTC)" } th scope="col" { "end" } th scope="col" { "Apollo counted" } th scope="col" { "through creditmeter" } th scope="col" { "outside" } } }
                tbody {
                    @for o in &outside {
                        tr data-endpoint=(s(&o["endpoint"])) {
                            td { (s(&o["endpoint"])) } td { (s(&o["start"])) } td { (s(&o["end"])) }
                            td { (s(&o["apollo_calls"])) } td { (s(&o["ledger_calls"])) } td { (s(&o["outside_calls"])) }
                        }
                    }
                }
            }
        }
        p.note { "Same figures as " code { "creditmeter report --reconcile --since " (report::format_time(win.since_ms)) " --until " (report::format_time(win.until_ms)) " --format json" } "." }
    };
    Ok(layout::page(ctx, "Reconciliation", "/ui/reconcile", body))
}
