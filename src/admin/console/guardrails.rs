//! Guardrails: budgets with their spend against each limit, the holds in force (each with a
//! release button), and an emergency stop per table. The stop is two steps: the button on
//! this page opens a confirmation page, whose form places the hold. Both changes are form posts
//! carrying the session's CSRF token, and go through the same [`crate::guard::Guard`] calls as
//! `POST /api/holds` and `DELETE /api/holds/{id}`.
//!
//! Virtual keys have their own page ([`super::keys`], `/ui/keys`), linked from here.

use maud::{html, Markup};
use serde_json::Value;

use super::charts;
use super::{
    entity_link, fmt_credits, layout, message_page, milli_of, redirect, report_json, Ctx,
    PageError, Query, Win,
};
use crate::admin::AdminResponse;
use crate::report::ReportArgs;

/// Renders `/ui/guardrails`.
pub fn render(ctx: &Ctx, q: &Query) -> Result<Markup, PageError> {
    let win = Win::from_query(q, ctx.now)?;
    let snap = ctx.guard.snapshot(ctx.now);
    let holds = ctx.guard.holds();
    let tables = report_json(
        ctx,
        &ReportArgs {
            by: Some("table".into()),
            ..win.args()
        },
    )?;
    let arr = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let s = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let csrf = ctx.csrf.clone().unwrap_or_default();
    let budgets = arr(&snap["budgets"]);
    let body = html! {
        h1 { "Guardrails" }
        @if let Some(id) = q.text("placed") {
            p #placed role="status" { "Hold " (id) " is in force: matching calls are refused (503) until it is released." }
        }
        @if let Some(id) = q.text("released") {
            p #released role="status" { "Hold " (id) " was released." }
        }
        h2 { "Budgets" }
        @if budgets.is_empty() {
            p.note { "No budgets are configured ([[budget]] entries in the config file)." }
        } @else {
            table #budgets {
                thead { tr {
                    th scope="col" { "budget" } th.text scope="col" { "scope" } th scope="col" { "window" } th scope="col" { "credit type" }
                    th scope="col" { "spent" } th scope="col" { "reserved" } th scope="col" { "limit" } th.text scope="col" { "spend against limit" }
                    th scope="col" { "action" } th scope="col" { "resets at" }
                } }
                tbody {
                    @for b in &budgets {
                        @for l in arr(&b["limits"]) {
                            @let spent = milli_of(&l["spent"]);
                            @let limit = milli_of(&l["limit"]);
                            tr.budget data-budget=(s(&b["name"])) data-credit-type=(s(&l["credit_type"])) data-spent-milli=(spent) data-limit-milli=(limit) {
                                td { (s(&b["name"])) } td.text { (s(&b["scope_text"])) } td { (s(&b["window"])) }
                                td { (s(&l["credit_type"])) } td { (fmt_credits(spent)) } td { (fmt_credits(milli_of(&l["reserved"]))) }
                                td { (fmt_credits(limit)) }
                                td.text { (charts::budget_bar(&s(&b["name"]), spent, limit, b["warn_at"].as_f64().unwrap_or(0.8))) " " (s(&l["used_percent"])) "%" }
                                td { (s(&b["action"])) } td { (s(&b["resets_at"])) }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Holds in force" }
        @if holds.is_empty() {
            p #holds data-holds="0" { "No hold is in force." }
        } @else {
            table #holds data-holds=(holds.len()) {
                thead { tr { th scope="col" { "id" } th.text scope="col" { "scope" } th.text scope="col" { "reason" } th scope="col" { "since (UTC)" } th scope="col" { "" } } }
                tbody {
                    @for h in &holds {
                        tr.hold data-hold-id=(h.id) data-scope=(h.scope.to_string()) {
                            td { (h.id) } td.text { (h.scope.to_string()) } td.text { (h.reason.as_deref().unwrap_or("-")) }
                            td { (crate::report::format_time(h.created_at)) }
                            td {
                                form.inline method="post" action="/ui/holds/release" {
                                    input type="hidden" name="csrf" value=(csrf);
                                    input type="hidden" name="id" value=(h.id);
                                    button type="submit" aria-label=(format!("Release hold {}", h.id)) { "Release" }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Emergency stop" }
        p { "Stopping a table places a hold on it: creditmeter refuses its calls with 503 before any credit is spent, until the hold is released. Each button asks for confirmation first." }
        (layout::window_selector("/ui/guardrails?", &win, &[]))
        @let rows = arr(&tables["rows"]);
        @if rows.is_empty() {
            p.note { "No table spent anything in this window." }
        } @else {
            table #stop-tables {
                thead { tr { th scope="col" { "table" } th scope="col" { "credits in the window" } th scope="col" { "" } } }
                tbody {
                    @for r in &rows {
                        @let key = r["key"].as_str().unwrap_or("");
                        tr data-key=(key) {
                            td { a href=(entity_link("table", key, &win)) { (key) } }
                            td { (fmt_credits(r["credits_milli"].as_i64().unwrap_or(0))) }
                            td {
                                @if stoppable(key).is_ok() {
                                    form.inline method="get" action="/ui/stop" {
                                        input type="hidden" name="table" value=(key);
                                        button.danger type="submit" aria-label=(format!("Emergency stop {key}")) { "Emergency stop…" }
                                    }
                                } @else {
                                    span.note { "use creditmeter hold" }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Virtual keys" }
        p { "Create, revoke and rotate virtual keys on the " a href="/ui/keys" { "Keys page" } "." }
    };
    Ok(layout::page(ctx, "Guardrails", "/ui/guardrails", body))
}

/// A table name the stop button can hold exactly: not the unattributed bucket (a hold names a
/// table, and those calls have none) and without glob characters (a hold's scope is a glob).
fn stoppable(table: &str) -> Result<(), String> {
    if table.is_empty() || table == crate::ledger::queries::UNATTRIBUTED {
        return Err("calls without a table cannot be held by table; use creditmeter hold --global to pause everything".into());
    }
    if table.contains(['*', '?']) {
        return Err(format!("{table:?} contains a glob character; use creditmeter hold --table with the pattern you mean"));
    }
    Ok(())
}

/// `/ui/stop?table=…`: the confirmation step before a hold.
pub fn confirm_stop(ctx: &Ctx, q: &Query) -> Result<Markup, PageError> {
    let Some(table) = q.text("table") else {
        return Err(PageError::BadRequest(
            "name the table: /ui/stop?table=…".into(),
        ));
    };
    stoppable(table).map_err(PageError::BadRequest)?;
    let csrf = ctx.csrf.clone().unwrap_or_default();
    let body = html! {
        h1 { "Stop table " (table) "?" }
        p { "Every call from table " strong { (table) } " will be refused with 503 (outcome rejected_hold) before it reaches Apollo, until you release the hold on the Guardrails page." }
        form #confirm-stop method="post" action="/ui/holds" {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="table" value=(table);
            p {
                label for="reason" { "Reason (optional)" }
                input #reason type="text" name="reason" size="50" maxlength="1024" placeholder="runaway waterfall";
            }
            button.danger #confirm type="submit" { "Stop " (table) " now" }
            " "
            a href="/ui/guardrails" { "Cancel" }
        }
    };
    Ok(layout::page(
        ctx,
        "Confirm emergency stop",
        "/ui/guardrails",
        body,
    ))
}

/// `POST /ui/holds` (CSRF already checked): places a hold on `table`.
pub async fn place(ctx: &Ctx, form: &Query) -> AdminResponse {
    let Some(table) = form.text("table").map(str::to_owned) else {
        return message_page(
            ctx,
            http::StatusCode::BAD_REQUEST,
            "Not stopped",
            "name the table to stop; nothing was changed",
        );
    };
    if let Err(e) = stoppable(&table) {
        return message_page(
            ctx,
            http::StatusCode::BAD_REQUEST,
            "Not stopped",
            &format!("{e}; nothing was changed"),
        );
    }
    let reason = form
        .text("reason")
        .map(|r| r.chars().take(1024).collect::<String>())
        .or_else(|| Some("emergency stop from the console".into()));
    let scope =
        crate::guard::config::scope_from_parts(Some(table.clone()), None, None, Default::default());
    let guard = ctx.guard.clone();
    let now = ctx.now;
    match tokio::task::spawn_blocking(move || guard.place_hold(scope, reason, now)).await {
        Ok(Ok(change)) => {
            tracing::warn!(hold = change.hold.id, table = %table, "console: emergency stop placed");
            redirect(&format!("/ui/guardrails?placed={}", change.hold.id))
        }
        Ok(Err(e)) => message_page(
            ctx,
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "Not stopped",
            &format!("the hold could not be recorded, so nothing changed: {e}"),
        ),
        Err(e) => message_page(
            ctx,
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "Not stopped",
            &e.to_string(),
        ),
    }
}

/// `POST /ui/holds/release` (CSRF already checked): lifts hold `id`.
pub async fn release(ctx: &Ctx, form: &Query) -> AdminResponse {
    let Some(id) = form.text("id").and_then(|i| i.parse::<i64>().ok()) else {
        return message_page(
            ctx,
            http::StatusCode::BAD_REQUEST,
            "Not released",
            "the form names no hold id; nothing was changed",
        );
    };
    let guard = ctx.guard.clone();
    let now = ctx.now;
    match tokio::task::spawn_blocking(move || guard.lift_hold(id, now)).await {
        Ok(Ok(Some(_))) => redirect(&format!("/ui/guardrails?released={id}")),
        Ok(Ok(None)) => message_page(
            ctx,
            http::StatusCode::NOT_FOUND,
            "Not released",
            &format!("no hold {id} is in force"),
        ),
        Ok(Err(e)) => message_page(
            ctx,
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "Not released",
            &format!("the release could not be recorded: {e}"),
        ),
        Err(e) => message_page(
            ctx,
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "Not released",
            &e.to_string(),
        ),
    }
}
