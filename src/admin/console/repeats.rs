//! The waste finder's page (`/ui/repeats`): credits spent enriching the same person or company
//! again, by table pair, for the page's window and a look-back `within` (default 30d). It is
//! [`crate::report::repeats::compute`], the same code as `report --repeats --format json` and
//! `GET /api/repeats`, so the figures cannot disagree.

use maud::{html, Markup};

use super::{fmt_credits, layout, url_encode, Ctx, PageError, Query, Win};
use crate::report::repeats;

/// The `within` choices offered as links (any other span can be typed in).
const WITHIN_PRESETS: [&str; 4] = ["1d", "7d", "30d", "90d"];

/// Renders `/ui/repeats?window=…&within=…`.
pub fn render(ctx: &Ctx, q: &Query) -> Result<Markup, PageError> {
    let win = Win::from_query(q, ctx.now)?;
    let within_text = q.text("within").map_or("30d", str::trim).to_owned();
    // The report's own argument checks, so `within` means here what `--within` means.
    let req = crate::report::ReportArgs {
        repeats: true,
        within: Some(within_text.clone()),
        ..win.args()
    }
    .resolve(ctx.db.clone(), ctx.now, crate::report::Format::Json)
    .map_err(PageError::BadRequest)?;
    let conn = crate::ledger::open_for_read(&ctx.db)?;
    let r = repeats::compute(
        &conn,
        crate::ledger::queries::Window {
            since_ms: req.since_ms,
            until_ms: req.until_ms,
        },
        req.within_ms,
    )?;
    let base = format!("/ui/repeats?within={}&", url_encode(&within_text));
    let body = html! {
        h1 { "Repeats: the same people and companies enriched again" }
        p { "An item is a repeat when one of its identifiers (email, LinkedIn URL, domain, …) had been enriched by an earlier call at most " strong { (within_text) } " before. creditmeter compares keyed fingerprints of the identifiers, never the values." }
        (win.heading())
        (layout::window_selector(&base, &win, &[("within", within_text.as_str())]))
        div.windows {
            "Within: "
            @for w in WITHIN_PRESETS {
                @if w == within_text {
                    span aria-current="true" { (w) }
                } @else {
                    a href=(format!("/ui/repeats?within={w}&{}", win.query())) { (w) }
                }
            }
        }
        p #repeats-within data-within-ms=(r.within_ms) hidden {}
        @if r.pairs.is_empty() {
            p #no-repeats { "No repeats in this window." }
        } @else {
            ul #summaries {
                @for p in &r.pairs {
                    li.summary { (repeats::summary(p)) }
                }
            }
            table #repeats {
                thead { tr {
                    th.text scope="col" { "earlier table" } th.text scope="col" { "later table" }
                    th scope="col" { "items" } th scope="col" { "calls" } th scope="col" { "credits" }
                    th scope="col" { "mean gap" } th.text scope="col" { "found on" }
                } }
                tbody {
                    @for p in &r.pairs {
                        tr.pair data-earlier=(p.earlier_table) data-later=(p.later_table) data-items=(p.items) data-calls=(p.calls) data-credits-milli=(p.credits_milli) {
                            td.text { (p.earlier_table) } td.text { (p.later_table) }
                            td.items { (repeats::thousands(p.items)) } td { (repeats::thousands(p.calls)) }
                            td.credits { (fmt_credits(p.credits_milli)) }
                            td { (repeats::span(p.mean_gap_ms)) }
                            td.text { (p.by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")) }
                        }
                    }
                }
                tfoot {
                    tr #repeats-total data-items=(r.total_items) data-calls=(r.total_calls) data-credits-milli=(r.total_credits_milli) {
                        td.text colspan="2" { "total" } td { (repeats::thousands(r.total_items)) } td { (repeats::thousands(r.total_calls)) }
                        td.credits { (fmt_credits(r.total_credits_milli)) } td {} td {}
                    }
                }
            }
        }
        @for n in &r.notes {
            p.note { (n) }
        }
    };
    Ok(layout::page(ctx, "Repeats", "/ui/repeats", body))
}
