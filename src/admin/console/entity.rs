//! A page per table, workflow, key or endpoint: its burn timeline, its endpoints (or tables),
//! its identifier kinds with match rate and credits per match ("email or LinkedIn?"), and its
//! recent calls, paged with a keyset cursor on the `(started_at, id)` order of the calls
//! indexes (never OFFSET over millions of rows).
//!
//! Table, workflow and endpoint pages are the report filtered (`report --table X --timeline`,
//! `--by endpoint`, `--by id_kind`): whole hours from the rollups, except the identifier kinds,
//! which only the detail rows carry (one pass over the entity's calls in the window). The
//! rollups do not carry the key either, so a key's page reads its calls in the window from the
//! detail rows in one pass; keys are reached from the key column of the recent calls.

use std::collections::BTreeMap;

use maud::{html, Markup};
use serde_json::{json, Value};

use super::charts::{self, Bucket};
use super::overview::{buckets_of, notes_of, spend_table, spike_list};
use super::{
    entity_link, fmt_credits, layout, report_json, url_encode, Ctx, PageError, Query, Win,
};
use crate::ledger::queries::{self, CallsQuery, Cursor, SpendRow, Window};
use crate::report::{self, ReportArgs};

/// Calls per page of the recent-calls list.
pub const CALLS_PER_PAGE: usize = 50;

/// Renders `/ui/{kind}?name=…`.
pub fn render(ctx: &Ctx, kind: &str, q: &Query) -> Result<Markup, PageError> {
    let win = Win::from_query(q, ctx.now)?;
    let Some(name) = q.get("name").map(str::to_owned) else {
        return Err(PageError::BadRequest(format!(
            "name the {kind}: /ui/{kind}?name=…"
        )));
    };
    let title = format!("{} {name}", capitalise(kind));
    let base = format!("/ui/{kind}?name={}&", url_encode(&name));
    let filtered = |mut a: ReportArgs| -> ReportArgs {
        match kind {
            "table" => a.table = Some(name.clone()),
            "workflow" => a.workflow = Some(name.clone()),
            _ => a.endpoint = Some(name.clone()),
        }
        a
    };
    let sections = if kind == "key" {
        key_sections(ctx, &name, &win)?
    } else {
        let total = report_json(
            ctx,
            &filtered(ReportArgs {
                by: Some(kind.to_owned()),
                ..win.args()
            }),
        )?;
        let timeline = report_json(
            ctx,
            &filtered(ReportArgs {
                timeline: Some(win.bucket.into()),
                ..win.args()
            }),
        )?;
        let spikes = report_json(
            ctx,
            &filtered(ReportArgs {
                timeline: Some(win.bucket.into()),
                spikes: true,
                top: Some(3),
                ..win.args()
            }),
        )?;
        let (second_by, second_heading) = match kind {
            "endpoint" => ("table", "Tables"),
            _ => ("endpoint", "Endpoints"),
        };
        let second = report_json(
            ctx,
            &filtered(ReportArgs {
                by: Some(second_by.into()),
                ..win.args()
            }),
        )?;
        let third = match kind {
            "table" => Some(("workflow", "Workflows")),
            "workflow" => Some(("table", "Tables")),
            _ => None,
        };
        let third = match third {
            Some((by, heading)) => Some((
                by,
                heading,
                report_json(
                    ctx,
                    &filtered(ReportArgs {
                        by: Some(by.into()),
                        ..win.args()
                    }),
                )?,
            )),
            None => None,
        };
        let ids = report_json(
            ctx,
            &filtered(ReportArgs {
                identifiers: true,
                ..win.args()
            }),
        )?;
        html! {
            h2 { "Spend" }
            (spend_table(&total, kind, None, &win))
            h2 { "Burn timeline" }
            (charts::timeline(&buckets_of(&timeline), win.bucket, &format!("Credits per bucket, {kind} {name}")))
            h2 { "Spikes" }
            (spike_list(&spikes, &win))
            h2 { (second_heading) }
            (spend_table(&second, second_by, Some(second_by), &win))
            @if let Some((by, heading, doc)) = &third {
                h2 { (heading) }
                (spend_table(doc, by, Some(by), &win))
            }
            h2 { "Identifier kinds" }
            p.note { "People enrichment calls that carried identifiers and got a 2xx answer, by the kinds of identifier each request carried: which identifiers find people, and what each match costs." }
            (spend_table(&ids, "id_kind", None, &win))
            @for n in notes_of(&total).iter().chain(notes_of(&ids).iter()) {
                p.note { "Note: " (n) }
            }
        }
    };
    let calls = recent_calls(ctx, kind, &name, &win, q, &base)?;
    let body = html! {
        p { a href={ "/ui/?" (win.query()) } { "Overview" } " › " (kind) }
        h1 #entity data-kind=(kind) data-name=(name) { (title) }
        @if kind == "table" {
            p { a href={ "/ui/stop?table=" (url_encode(&name)) } { "Emergency stop for this table…" } }
        }
        (layout::window_selector(&base, &win, &[("name", name.as_str())]))
        (win.heading())
        (sections)
        h2 { "Recent calls" }
        (calls)
    };
    Ok(layout::page(ctx, &title, "", body))
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// A key's sections, from one pass over its calls in the window (the rollups do not carry
/// `key_fp`).
fn key_sections(ctx: &Ctx, key: &str, win: &Win) -> Result<Markup, PageError> {
    let width = report::parse_width(win.bucket).map_err(PageError::BadRequest)?;
    let conn = crate::ledger::open_for_read(&ctx.db)?;
    let mut stmt = conn.prepare_cached(
        "SELECT started_at, endpoint, id_kinds, status, credits_milli, lead_milli,
                direct_dial_milli, export_milli, coalesce(records_requested, 0),
                coalesce(records_matched, 0), outcome <> 'settlement'
           FROM calls WHERE key_fp = ?1 AND started_at >= ?2 AND started_at < ?3",
    )?;
    let mut rows = stmt.query(rusqlite::params![key, win.since_ms, win.until_ms])?;
    // Like the report's timeline: buckets start at the ledger's first hour at the earliest.
    let mut first = queries::floor_to(win.since_ms, width);
    if let Some(h) = queries::first_hour(&conn)? {
        first = first.max(queries::floor_to(h, width));
    }
    let n = ((win.until_ms - first + width - 1) / width).max(0) as usize;
    let mut buckets = vec![SpendRow::default(); n];
    let mut total = SpendRow {
        key: key.to_owned(),
        ..Default::default()
    };
    let mut endpoints: BTreeMap<String, SpendRow> = BTreeMap::new();
    let mut ids: BTreeMap<String, SpendRow> = BTreeMap::new();
    while let Some(r) = rows.next()? {
        let started: i64 = r.get(0)?;
        let row = SpendRow {
            key: String::new(),
            calls: r.get::<_, i64>(10)?.clamp(0, 1) as u64,
            credits_milli: r.get(4)?,
            lead_milli: r.get(5)?,
            direct_dial_milli: r.get(6)?,
            export_milli: r.get(7)?,
            records_requested: r.get::<_, i64>(8)?.max(0) as u64,
            records_matched: r.get::<_, i64>(9)?.max(0) as u64,
            pending_milli: 0,
        };
        if started >= first {
            if let Some(b) = buckets.get_mut(((started - first) / width) as usize) {
                b.add(&row);
            }
        }
        total.add(&row);
        endpoints
            .entry(r.get::<_, String>(1)?)
            .or_default()
            .add(&row);
        let status: Option<i64> = r.get(3)?;
        if let (Some(kinds), Some(200..=299)) = (r.get::<_, Option<String>>(2)?, status) {
            ids.entry(kinds).or_default().add(&row);
        }
    }
    let doc = |map: BTreeMap<String, SpendRow>| -> Value {
        let mut rows: Vec<SpendRow> = map
            .into_iter()
            .map(|(k, mut r)| {
                r.key = k;
                r
            })
            .collect();
        queries::sort_by_credits(&mut rows);
        let mut t = SpendRow {
            key: "TOTAL".into(),
            ..Default::default()
        };
        for r in &rows {
            t.add(r);
        }
        json!({
            "rows": rows.iter().map(report::row_json).collect::<Vec<_>>(),
            "total": report::row_json(&t),
        })
    };
    let mut total_doc = doc(BTreeMap::from([(key.to_owned(), total.clone())]));
    total_doc["total"]["key"] = json!("TOTAL");
    let bars: Vec<Bucket> = buckets
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let start_ms = first + i as i64 * width;
            Bucket {
                start_ms,
                start: report::format_time(start_ms),
                credits_milli: b.credits_milli,
                calls: b.calls,
                spike: false,
            }
        })
        .collect();
    Ok(html! {
        h2 { "Spend" }
        (spend_table(&total_doc, "key", None, win))
        h2 { "Burn timeline" }
        (charts::timeline(&bars, win.bucket, &format!("Credits per bucket, key {key}")))
        p.note { "A key's timeline is read from the detail rows (the hourly rollups do not carry the key), without spike marks; pending deferred credits are on the table pages." }
        h2 { "Endpoints" }
        (spend_table(&doc(endpoints), "endpoint", Some("endpoint"), win))
        h2 { "Identifier kinds" }
        (spend_table(&doc(ids), "id_kind", None, win))
    })
}

/// The recent calls list: newest first, `CALLS_PER_PAGE` a page, `cursor` continuing after
/// the last row of the previous page.
fn recent_calls(
    ctx: &Ctx,
    kind: &str,
    name: &str,
    win: &Win,
    q: &Query,
    base: &str,
) -> Result<Markup, PageError> {
    let mut cq = CallsQuery {
        limit: CALLS_PER_PAGE,
        window: Some(Window {
            since_ms: win.since_ms,
            until_ms: win.until_ms,
        }),
        ..Default::default()
    };
    match kind {
        "table" => cq.filter.table = Some(name.to_owned()),
        "workflow" => cq.filter.workflow = Some(name.to_owned()),
        "endpoint" => cq.filter.endpoint = Some(name.to_owned()),
        _ => cq.key_fp = Some(name.to_owned()),
    }
    if let Some(c) = q.text("cursor") {
        cq.cursor = Some(Cursor::decode(c).ok_or_else(|| {
            PageError::BadRequest(format!(
                "cursor={c:?} is not a cursor this console gave out"
            ))
        })?);
    }
    let conn = crate::ledger::open_for_read(&ctx.db)?;
    let (rows, next) = queries::calls_page(&conn, &cq)?;
    Ok(html! {
        @if rows.is_empty() {
            p #calls data-rows="0" { "No calls in this window." }
        } @else {
            table #calls data-rows=(rows.len()) {
                thead { tr {
                    th scope="col" { "started (UTC)" } th scope="col" { "endpoint" } th scope="col" { "status" }
                    th scope="col" { "outcome" } th scope="col" { "table" } th scope="col" { "workflow" }
                    th scope="col" { "credits" } th scope="col" { "source" } th scope="col" { "matched" }
                    th scope="col" { "identifiers" } th scope="col" { "key" } th scope="col" { "request id" }
                } }
                tbody {
                    @for r in &rows {
                        tr.call data-request-id=(r.request_id) data-credits-milli=(r.credits_milli) {
                            td { (report::format_time(r.started_at)) }
                            td.text { a href=(entity_link("endpoint", &r.endpoint, win)) { (r.endpoint) } }
                            td { (r.status.map_or("-".to_owned(), |s| s.to_string())) }
                            td.text { (r.outcome) }
                            td.text {
                                @if let Some(t) = &r.table_name { a href=(entity_link("table", t, win)) { (t) } } @else { "-" }
                            }
                            td.text {
                                @if let Some(w) = &r.workflow { a href=(entity_link("workflow", w, win)) { (w) } } @else { "-" }
                            }
                            td { (fmt_credits(r.credits_milli)) }
                            td.text { (r.credit_source) }
                            td { (r.records_matched.map_or("-".to_owned(), |m| format!("{m}/{}", r.records_requested.unwrap_or(0)))) }
                            td.text { (r.id_kinds.as_deref().unwrap_or("-")) }
                            td.text {
                                @if let Some(k) = &r.key_fp { a.key href=(entity_link("key", k, win)) { (k) } } @else { "-" }
                            }
                            td.text { code { (r.request_id) } }
                        }
                    }
                }
            }
            p {
                @if q.text("cursor").is_some() {
                    a href={ (base) (win.query()) } { "Newest calls" } " · "
                }
                @if let Some(c) = next {
                    a #older rel="next" href={ (base) (win.query()) "&cursor=" (c.encode()) } { "Older calls" }
                } @else {
                    "No older calls in this window."
                }
            }
        }
    })
}
