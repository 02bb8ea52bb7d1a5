//! `creditmeter report`: spend from the ledger — grouped, windowed, as a burn timeline or as a
//! list of spikes — rendered as an aligned table, CSV or JSON. The admin listener's
//! `GET /api/usage` takes the same parameters ([`ReportArgs`]) and answers with the same JSON.
//!
//! It opens the ledger read-only (WAL readers never block the proxy). Whole hours are answered
//! from the hourly rollups, partial hours and groupings the rollups do not carry from the
//! detail rows; both agree to the milli-credit ([`crate::ledger::queries::aggregate`]).
//!
//! The JSON is stable for scripts. The spend view:
//! `{"group_by", "window": {"since", "until"}, "rows": [...], "total": {...}, "view": "spend",
//! "filter": {"table", "workflow", "endpoint"}, "source", "notes": [...]}`, where each row has
//! `key`, `calls`, `credits`, `lead_credits`, `direct_dial_credits`, `export_credits`,
//! `credits_milli`, `records_requested`, `records_matched`, `match_rate` (null when nothing was
//! requested) and `credits_per_match` (null when nothing matched). The timeline and spikes
//! views are described in [`timeline`].

pub mod calls;
pub mod focus;
pub mod repeats;
mod timeline;

use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::json;

use crate::ledger::queries::{
    self, ceil_to, floor_to, Filter, GroupBy, Source, SpendRow, Window, HOUR_MS,
};
use crate::ledger::Reports;
use creditmeter_base::now_ms;

pub use timeline::SpikeRule;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
    /// FinOps FOCUS 1.x cost and usage rows, CSV (`report --format focus`; see [`focus`]).
    Focus,
}

/// Where figures may come from (`--source`). `auto`: rollups where they can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceArg {
    Auto,
    Raw,
}

/// What to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Spend per group over the window.
    Spend,
    /// Credits per time bucket, spikes marked.
    Timeline,
    /// Only the anomalous windows, each with its top groups.
    Spikes,
    /// Re-enrichment of the same identifiers, by table pair ([`repeats`]).
    Repeats,
    /// Raw calls of the window ([`calls`]).
    Calls,
    /// FOCUS rows per period × table × workflow × endpoint × credit type ([`focus`]).
    Focus,
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
    pub filter: Filter,
    pub source: Source,
    pub view: View,
    /// Timeline and spikes: the bucket width, in ms.
    pub bucket_ms: i64,
    /// Timeline: show a column per group (the user asked for `--by`).
    pub series_columns: bool,
    pub rule: SpikeRule,
    /// Repeats: how far back an earlier enrichment counts, ms.
    pub within_ms: i64,
    /// FOCUS: the price put on credits.
    pub pricing: focus::Pricing,
}

impl Default for ReportRequest {
    /// Spend by table over all time, as a table.
    fn default() -> Self {
        ReportRequest {
            db: PathBuf::from(crate::config::DEFAULT_LEDGER_PATH),
            by: GroupBy::Table,
            since_ms: 0,
            until_ms: default_until(),
            top: None,
            format: Format::Table,
            filter: Filter::default(),
            source: Source::Auto,
            view: View::Spend,
            bucket_ms: HOUR_MS,
            series_columns: false,
            rule: SpikeRule::default(),
            within_ms: repeats::DEFAULT_WITHIN_MS,
            pricing: focus::Pricing::default(),
        }
    }
}

/// The report's parameters as a person or a script writes them: the CLI's flags and the usage
/// API's query parameters (same names, `-` or `_`), resolved by [`ReportArgs::resolve`].
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ReportArgs {
    /// Start of the window: RFC 3339, a date, or relative (24h, 7d). Default: all time
    /// (timeline: the last 24h under 1h buckets, 7d under 1d, else 90d; spikes under 1h: 7d).
    #[arg(long)]
    pub since: Option<String>,
    /// End of the window (exclusive). Default: now.
    #[arg(long)]
    pub until: Option<String>,
    /// table, workflow, endpoint, key, status, outcome, credit_source, tag:<name> or id_kind.
    #[arg(long)]
    pub by: Option<String>,
    /// Identifier analytics: match rate and credits per match per identifier kind (= --by id_kind).
    #[arg(long)]
    pub identifiers: bool,
    /// Only the N biggest (spend: rows; timeline: columns; spikes: groups per spike).
    #[arg(long)]
    pub top: Option<usize>,
    /// table, csv or json. Default: table (the API: json).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Only this table (`_unattributed`: calls without one).
    #[arg(long)]
    pub table: Option<String>,
    /// Only this workflow (`_none`: calls without one).
    #[arg(long)]
    pub workflow: Option<String>,
    /// Only this endpoint.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// The burn timeline: credits per bucket (5m, 15m, 1h, 1d, ...), spikes marked.
    #[arg(long, value_name = "WIDTH")]
    pub timeline: Option<String>,
    /// Only the anomalous windows, each with its top tables (buckets: --timeline, default 1h).
    #[arg(long)]
    pub spikes: bool,
    /// A spike exceeds this many times the trailing baseline. Default 3.
    #[arg(long, value_name = "K")]
    pub spike_factor: Option<f64>,
    /// ...and is at least this many credits above it. Default 50.
    #[arg(long, value_name = "CREDITS")]
    pub spike_floor: Option<f64>,
    /// auto (rollups for whole hours, detail rows for the rest) or raw (detail rows only).
    #[arg(long, value_enum)]
    pub source: Option<SourceArg>,
    /// The waste finder: credits spent enriching a person or company again that another (or
    /// the same) table had enriched within --within before, by table pair.
    #[arg(long)]
    pub repeats: bool,
    /// Repeats: how far back an earlier enrichment counts (e.g. 24h, 7d). Default 30d.
    #[arg(long, value_name = "SPAN")]
    pub within: Option<String>,
    /// The raw calls of the window, oldest first (--format csv for a spreadsheet).
    #[arg(long)]
    pub calls: bool,
    /// --format focus: the price of one credit, for BilledCost and EffectiveCost (default: no
    /// price, costs are 0).
    #[arg(long, value_name = "AMOUNT")]
    pub price_per_credit: Option<f64>,
    /// --format focus: the currency of --price-per-credit (ISO 4217). Default USD.
    #[arg(long, value_name = "CODE")]
    pub currency: Option<String>,
}

impl ReportArgs {
    /// Reads URL query parameters (already split and percent-decoded). Unknown names are an
    /// error that names them.
    pub fn from_query<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<ReportArgs, String> {
        let mut a = ReportArgs::default();
        for (k, v) in pairs {
            let k = k.replace('-', "_");
            let text = || Some(v.to_owned()).filter(|v| !v.is_empty());
            let flag = || -> Result<bool, String> {
                match v {
                    "" | "1" | "true" | "yes" => Ok(true),
                    "0" | "false" | "no" => Ok(false),
                    _ => Err(format!("{k}={v:?}: use true or false")),
                }
            };
            let number = |what: &str| -> Result<f64, String> {
                v.parse::<f64>()
                    .map_err(|_| format!("{k}={v:?} is not {what}"))
            };
            match k.as_str() {
                "since" => a.since = text(),
                "until" => a.until = text(),
                "by" => a.by = text(),
                "identifiers" => a.identifiers = flag()?,
                "top" => {
                    a.top = Some(
                        v.parse()
                            .map_err(|_| format!("top={v:?} is not a whole number"))?,
                    )
                }
                "format" => {
                    a.format = Some(
                        <Format as clap::ValueEnum>::from_str(v, true)
                            .map_err(|_| format!("format={v:?}: use json, csv, table or focus"))?,
                    )
                }
                "repeats" => a.repeats = flag()?,
                "within" => a.within = text(),
                "calls" => a.calls = flag()?,
                "price_per_credit" => a.price_per_credit = Some(number("a price")?),
                "currency" => a.currency = text(),
                "table" => a.table = Some(v.to_owned()),
                "workflow" => a.workflow = Some(v.to_owned()),
                "endpoint" => a.endpoint = Some(v.to_owned()),
                "timeline" => a.timeline = text(),
                "spikes" => a.spikes = flag()?,
                "spike_factor" => a.spike_factor = Some(number("a number")?),
                "spike_floor" => a.spike_floor = Some(number("a number of credits")?),
                "source" => {
                    a.source = Some(
                        <SourceArg as clap::ValueEnum>::from_str(v, true)
                            .map_err(|_| format!("source={v:?}: use auto or raw"))?,
                    )
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?}: use since, until, by, identifiers, top, format, table, workflow, endpoint, timeline, spikes, spike_factor, spike_floor, source, repeats, within, calls, price_per_credit or currency"
                    ))
                }
            }
        }
        Ok(a)
    }

    /// Resolves against the clock: relative times, defaults, cross-checks. The message names
    /// the parameter at fault.
    pub fn resolve(
        &self,
        db: PathBuf,
        now: i64,
        default_format: Format,
    ) -> Result<ReportRequest, String> {
        let by = match (&self.by, self.identifiers) {
            (Some(b), false) => GroupBy::parse(b).map_err(|e| format!("by: {e}"))?,
            (None, true) => GroupBy::IdKind,
            (Some(b), true) if GroupBy::parse(b) == Ok(GroupBy::IdKind) => GroupBy::IdKind,
            (Some(_), true) => {
                return Err("identifiers: it is --by id_kind; drop one of them".into())
            }
            (None, false) => GroupBy::Table,
        };
        let chosen: Vec<&str> = [
            (self.spikes, "spikes"),
            (self.repeats, "repeats"),
            (self.calls, "calls"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        if chosen.len() > 1 {
            return Err(format!(
                "{}: choose one of --{}",
                chosen[0],
                chosen.join(", --")
            ));
        }
        let focus = self.format == Some(Format::Focus);
        let view = if self.spikes {
            View::Spikes
        } else if self.repeats {
            View::Repeats
        } else if self.calls {
            View::Calls
        } else if focus {
            View::Focus
        } else if self.timeline.is_some() {
            View::Timeline
        } else {
            View::Spend
        };
        if focus && !matches!(view, View::Focus | View::Calls | View::Repeats) {
            return Err(
                "format: focus is a spend export; it does not combine with --spikes".into(),
            );
        }
        if focus && matches!(view, View::Calls | View::Repeats) {
            return Err(format!(
                "format: focus is the spend export; --{} takes table, csv or json",
                if view == View::Calls {
                    "calls"
                } else {
                    "repeats"
                }
            ));
        }
        if self.within.is_some() && view != View::Repeats {
            return Err("within: it goes with --repeats".into());
        }
        if (self.price_per_credit.is_some() || self.currency.is_some()) && view != View::Focus {
            return Err("price-per-credit: it goes with --format focus".into());
        }
        let within_ms = match &self.within {
            Some(w) => crate::config::HumanDuration::parse(w)
                .map(|d| d.as_millis() as i64)
                .map_err(|e| format!("within: {e}"))
                .and_then(|ms| {
                    if ms >= 1000 {
                        Ok(ms)
                    } else {
                        Err(format!("within: {w:?} is too short; use e.g. 24h or 30d"))
                    }
                })?,
            None => repeats::DEFAULT_WITHIN_MS,
        };
        let mut pricing = focus::Pricing::default();
        if let Some(p) = self.price_per_credit {
            if !(p.is_finite() && p >= 0.0) {
                return Err(format!("price-per-credit: {p} must be zero or more"));
            }
            pricing.per_credit = Some(p);
        }
        if let Some(c) = &self.currency {
            let c = c.trim().to_ascii_uppercase();
            if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!(
                    "currency: {c:?} is not an ISO 4217 code (e.g. USD, EUR)"
                ));
            }
            pricing.currency = c;
        }
        let bucket_ms = match &self.timeline {
            Some(w) => parse_width(w).map_err(|e| format!("timeline: {e}"))?,
            None if view == View::Focus => 86_400_000,
            None => HOUR_MS,
        };
        if view == View::Focus {
            focus::check_period(bucket_ms)?;
        }
        let default_since = match view {
            View::Spend => 0,
            View::Timeline if bucket_ms < HOUR_MS => now - 86_400_000,
            View::Timeline if bucket_ms < 86_400_000 => now - 7 * 86_400_000,
            View::Timeline => now - 90 * 86_400_000,
            View::Spikes if bucket_ms < HOUR_MS => now - 7 * 86_400_000,
            View::Spikes => 0,
            View::Repeats | View::Focus => 0,
            View::Calls => now - 86_400_000,
        };
        let since_ms = match &self.since {
            Some(s) => parse_time(s, now).map_err(|e| format!("since: {e}"))?,
            None => default_since,
        };
        let until_ms = match &self.until {
            Some(s) => parse_time(s, now).map_err(|e| format!("until: {e}"))?,
            None => now + 60_000,
        };
        if since_ms >= until_ms {
            return Err(format!(
                "since: the window is empty ({} is not before {})",
                format_time(since_ms),
                format_time(until_ms)
            ));
        }
        let mut rule = SpikeRule::default();
        if let Some(k) = self.spike_factor {
            if !(k.is_finite() && k > 1.0) {
                return Err(format!("spike-factor: {k} must be above 1 (e.g. 3)"));
            }
            rule.factor = k;
        }
        if let Some(f) = self.spike_floor {
            if !(f.is_finite() && f >= 0.0) {
                return Err(format!("spike-floor: {f} must be zero or more credits"));
            }
            rule.floor_milli = (f * 1000.0).round() as i64;
        }
        if self.top == Some(0) {
            return Err("top: must be at least 1".into());
        }
        Ok(ReportRequest {
            db,
            series_columns: self.by.is_some() || self.identifiers,
            by,
            since_ms,
            until_ms,
            top: self.top,
            format: self.format.unwrap_or(default_format),
            filter: Filter {
                table: self.table.clone(),
                workflow: self.workflow.clone(),
                endpoint: self.endpoint.clone(),
            },
            source: match self.source {
                Some(SourceArg::Raw) => Source::Raw,
                _ => Source::Auto,
            },
            view,
            bucket_ms,
            rule,
            within_ms,
            pricing,
        })
    }
}

/// Parses a bucket width: `5m`, `15m`, `1h`, `6h`, `1d`, ... (at least a minute, at most 31
/// days).
pub fn parse_width(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: i64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a bucket width: use e.g. 5m, 1h or 1d"))?;
    let scale = match unit {
        "m" | "min" => 60_000,
        "h" => HOUR_MS,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "{s:?}: the unit must be m, h or d (e.g. 5m, 1h, 1d)"
            ))
        }
    };
    let w = n.saturating_mul(scale);
    if !(60_000..=31 * 86_400_000).contains(&w) {
        return Err(format!("{s:?}: use a width from 1m to 31d"));
    }
    Ok(w)
}

/// A bucket width as people write it: `5m`, `1h`, `1d`.
pub fn width_label(ms: i64) -> String {
    if ms % 86_400_000 == 0 {
        format!("{}d", ms / 86_400_000)
    } else if ms % HOUR_MS == 0 {
        format!("{}h", ms / HOUR_MS)
    } else {
        format!("{}m", ms / 60_000)
    }
}

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("ledger {path} does not exist (is ledger.path right? pass --db or --config)")]
    Missing { path: PathBuf },
    /// The ledger could not be opened or a query failed ([`crate::ledger::LedgerError::Query`]).
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error("--timeline: {buckets} buckets is too many (at most {max}); narrow the window (--since/--until) or widen the buckets")]
    TooManyBuckets { buckets: usize, max: usize },
    #[error("writing the report: {0}")]
    Output(#[source] std::io::Error),
}

/// The repeats, FOCUS and raw-calls views still query SQLite themselves (they are not behind
/// the store yet, like reconciliation); their query errors are ledger query errors.
impl From<rusqlite::Error> for ReportError {
    fn from(e: rusqlite::Error) -> Self {
        ReportError::Ledger(crate::ledger::LedgerError::Query(e))
    }
}

/// The most buckets a timeline computes (about two years of 5-minute buckets).
pub const MAX_BUCKETS: usize = 200_000;

pub use creditmeter_base::{format_time, parse_time};

/// Runs the report and renders it.
pub fn run(req: &ReportRequest) -> Result<String, ReportError> {
    if !req.db.exists() {
        return Err(ReportError::Missing {
            path: req.db.clone(),
        });
    }
    let store = crate::ledger::SqliteStore::open_read(&req.db)?;
    run_on(&store, req)
}

/// Runs the report on an open store (`req.db` is not read) and renders it.
pub fn run_on(store: &dyn Reports, req: &ReportRequest) -> Result<String, ReportError> {
    match req.view {
        View::Spend => {
            let report = spend_report(store, req)?;
            Ok(render(req, &report))
        }
        View::Timeline | View::Spikes => {
            let t = timeline::compute(store, req)?;
            Ok(if req.view == View::Timeline {
                timeline::render_timeline(req, &t)
            } else {
                timeline::render_spikes(req, &t)
            })
        }
        View::Repeats => {
            let conn = crate::ledger::open_for_read(&req.db)?;
            let r = repeats::compute(
                &conn,
                Window {
                    since_ms: req.since_ms,
                    until_ms: req.until_ms,
                },
                req.within_ms,
            )?;
            Ok(r.render(req.format))
        }
        View::Focus => {
            let conn = crate::ledger::open_for_read(&req.db)?;
            Ok(focus::render(&focus::rows(&conn, req)?, &req.pricing))
        }
        View::Calls => {
            let conn = crate::ledger::open_for_read(&req.db)?;
            let mut out = Vec::new();
            calls::write(&conn, req, &mut out)?;
            Ok(String::from_utf8_lossy(&out).into_owned())
        }
    }
}

/// Like [`run`], writing to `out`; `--calls` streams page by page instead of building the
/// whole answer in memory.
pub fn run_to(req: &ReportRequest, out: &mut dyn std::io::Write) -> Result<(), ReportError> {
    if req.view == View::Calls {
        if !req.db.exists() {
            return Err(ReportError::Missing {
                path: req.db.clone(),
            });
        }
        let conn = crate::ledger::open_for_read(&req.db)?;
        return calls::write(&conn, req, out);
    }
    let text = run(req)?;
    out.write_all(text.as_bytes()).map_err(ReportError::Output)
}

/// The spend view, computed.
#[derive(Debug, Clone)]
pub struct SpendReport {
    /// The window actually covered (retention may round it to whole hours).
    pub window: Window,
    /// Most credits first, cut to `--top`.
    pub rows: Vec<SpendRow>,
    /// Over every group, not only the top ones.
    pub total: SpendRow,
    /// `rollup`, `raw` or `rollup+raw`.
    pub source: &'static str,
    pub notes: Vec<String>,
}

/// Adjusts a window for retention: where detail rows were deleted, groupings the rollups carry
/// are answered over whole hours, and the others only cover what was kept. Returns the window
/// to query and what to tell the reader.
pub(crate) fn retention_window(
    store: &dyn Reports,
    by: &GroupBy,
    window: Window,
    bucket_ms: Option<i64>,
    source: Source,
) -> Result<(Window, Vec<String>), crate::ledger::LedgerError> {
    let mut notes = Vec::new();
    let mut w = window;
    let Some(deleted) = store.detail_deleted_before()? else {
        return Ok((w, notes));
    };
    if w.since_ms >= deleted {
        return Ok((w, notes));
    }
    let rollup_ok =
        source == Source::Auto && by.has_rollup() && bucket_ms.is_none_or(|b| b % HOUR_MS == 0);
    if rollup_ok {
        let since = floor_to(w.since_ms, HOUR_MS);
        let until = if w.until_ms < deleted {
            ceil_to(w.until_ms, HOUR_MS)
        } else {
            w.until_ms
        };
        if since != w.since_ms || until != w.until_ms {
            notes.push(format!(
                "the window was widened to whole hours ({} to {}): detail rows before {} were deleted by ledger.retention, and the hourly rollups keep their totals",
                format_time(since),
                format_time(until),
                format_time(deleted)
            ));
        }
        w = Window {
            since_ms: since,
            until_ms: until,
        };
    } else {
        notes.push(format!(
            "detail rows started before {} were deleted by ledger.retention: grouping by {} covers {} onwards (table, workflow, endpoint, status and outcome keep the whole history in the rollups)",
            format_time(deleted),
            by.label(),
            format_time(deleted.max(w.since_ms))
        ));
        w.since_ms = deleted.min(w.until_ms);
    }
    Ok((w, notes))
}

/// Computes the spend view.
pub fn spend_report(store: &dyn Reports, req: &ReportRequest) -> Result<SpendReport, ReportError> {
    let (window, mut notes) = retention_window(
        store,
        &req.by,
        Window {
            since_ms: req.since_ms,
            until_ms: req.until_ms,
        },
        None,
        req.source,
    )?;
    if req.by == GroupBy::IdKind {
        notes.push(
            "id_kind: people enrichment calls that carried identifiers and got a 2xx answer, grouped by the set of identifier kinds each request carried".into(),
        );
    }
    let agg = store.aggregate(Some(&req.by), window, None, &req.filter, req.source)?;
    let source = agg.source_label();
    let mut rows: Vec<SpendRow> = agg.cells.into_iter().map(|c| c.row).collect();
    queries::sort_by_credits(&mut rows);
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
    Ok(SpendReport {
        window,
        rows,
        total,
        source,
        notes,
    })
}

/// Whole credits from milli-credits, without trailing zeros: `1532`, `1.01`.
pub fn credits(milli: i64) -> String {
    format!("{:.3}", milli as f64 / 1000.0)
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_owned()
}

/// The JSON of one spend row (also the timeline's and spikes' totals).
pub fn row_json(r: &SpendRow) -> serde_json::Value {
    json!({
        "key": r.key, "calls": r.calls,
        "credits": r.credits_milli as f64 / 1000.0, "credits_milli": r.credits_milli,
        "lead_credits": r.lead_milli as f64 / 1000.0,
        "direct_dial_credits": r.direct_dial_milli as f64 / 1000.0,
        "export_credits": r.export_milli as f64 / 1000.0,
        "records_requested": r.records_requested, "records_matched": r.records_matched,
        "match_rate": r.match_rate(), "credits_per_match": r.credits_per_match(),
        "pending_credits": r.pending_milli as f64 / 1000.0, "pending_milli": r.pending_milli,
    })
}

pub(crate) fn filter_json(f: &Filter) -> serde_json::Value {
    json!({"table": f.table, "workflow": f.workflow, "endpoint": f.endpoint})
}

/// ` for table "X", workflow "Y"` or nothing.
pub(crate) fn filter_label(f: &Filter) -> String {
    let mut parts = Vec::new();
    for (name, v) in [
        ("table", &f.table),
        ("workflow", &f.workflow),
        ("endpoint", &f.endpoint),
    ] {
        if let Some(v) = v {
            parts.push(format!("{name} {v:?}"));
        }
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" for {}", parts.join(", "))
    }
}

pub(crate) fn window_label(w: Window) -> String {
    if w.since_ms <= 0 {
        format!("all time to {}", format_time(w.until_ms))
    } else {
        format!("{} to {}", format_time(w.since_ms), format_time(w.until_ms))
    }
}

/// Left-aligns the first column and right-aligns the others, two spaces apart.
pub fn align(rows: &[Vec<String>]) -> Vec<String> {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; cols];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    rows.iter()
        .map(|r| {
            let mut s = String::new();
            for (i, (c, w)) in r.iter().zip(&widths).enumerate() {
                if i == 0 {
                    let _ = write!(s, "{c:<w$}");
                } else {
                    let _ = write!(s, "  {c:>w$}");
                }
            }
            s.trim_end().to_owned()
        })
        .collect()
}

fn render(req: &ReportRequest, report: &SpendReport) -> String {
    let rows = &report.rows;
    let total = &report.total;
    match req.format {
        Format::Json => {
            let doc = json!({
                "group_by": req.by.label(),
                "window": {"since": format_time(report.window.since_ms), "until": format_time(report.window.until_ms)},
                "rows": rows.iter().map(row_json).collect::<Vec<_>>(),
                "total": row_json(total),
                "view": "spend",
                "filter": filter_json(&req.filter),
                "source": report.source,
                "notes": report.notes,
            });
            format!("{doc:#}\n")
        }
        Format::Csv | Format::Focus => {
            let mut out = format!("{},calls,credits,lead,direct_dial,export,records_requested,records_matched,match_rate,credits_per_match,pending\n", req.by.label());
            for r in rows.iter().chain(std::iter::once(total)) {
                let _ = writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{},{}",
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
                    credits(r.pending_milli),
                );
            }
            out
        }
        Format::Table => {
            let header: Vec<String> = [
                req.by.label().as_str(),
                "calls",
                "credits",
                "lead",
                "direct_dial",
                "export",
                "requested",
                "matched",
                "match",
                "cr/match",
                "pending",
            ]
            .map(str::to_owned)
            .to_vec();
            let cells = |r: &SpendRow| -> Vec<String> {
                vec![
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
                    credits(r.pending_milli),
                ]
            };
            let mut table = vec![header];
            table.extend(rows.iter().map(cells));
            table.push(cells(total));
            let lines = align(&table);
            let rule = "-".repeat(lines.iter().map(|l| l.chars().count()).max().unwrap_or(0));
            let mut out = format!(
                "Spend by {}{}, {}\n\n",
                req.by.label(),
                filter_label(&req.filter),
                window_label(report.window)
            );
            let n = lines.len();
            for (i, l) in lines.iter().enumerate() {
                if i == n - 1 {
                    out.push_str(&rule);
                    out.push('\n');
                }
                out.push_str(l);
                out.push('\n');
                if i == 0 {
                    out.push_str(&rule);
                    out.push('\n');
                }
            }
            if total.pending_milli > 0 {
                let _ = writeln!(
                    out,
                    "note: pending: up to {} more credits that Apollo bills when phone reveals and waterfalls finish; each settles into its call's row group (and time) within settle.max_wait",
                    credits(total.pending_milli)
                );
            }
            for note in &report.notes {
                let _ = writeln!(out, "note: {note}");
            }
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
