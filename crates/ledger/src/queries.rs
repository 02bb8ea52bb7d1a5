//! Read queries over the ledger: totals that seed the metrics at start-up, spend grouped (and
//! bucketed) for reports, and raw rows paged for the usage API. All of them run on a read
//! connection and never block the writer (WAL).
//!
//! Spend comes from two places that agree to the milli-credit: `rollup_hourly` (one row per
//! UTC hour × table × workflow × endpoint × status × outcome, kept by triggers as rows commit)
//! for whole hours, and `calls` for partial hours and for groupings the rollups do not carry
//! (`key`, `tag:<name>`, `id_kind`). [`aggregate`] decides and merges.

use std::collections::{BTreeMap, HashMap};

use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;

/// Credit totals per (table, workflow, endpoint), to seed `creditmeter_credits_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditTotals {
    pub table_name: Option<String>,
    pub workflow: Option<String>,
    pub endpoint: String,
    pub lead_milli: i64,
    pub direct_dial_milli: i64,
    pub export_milli: i64,
}

/// Call counts per (table, endpoint, status, outcome), to seed `creditmeter_requests_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestTotals {
    pub table_name: Option<String>,
    pub endpoint: String,
    pub status: Option<u16>,
    pub outcome: String,
    pub calls: u64,
}

/// Record counts per (table, endpoint), to seed `creditmeter_records_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordTotals {
    pub table_name: Option<String>,
    pub endpoint: String,
    pub requested: u64,
    pub matched: u64,
}

/// Everything the metrics need at start-up.
#[derive(Debug, Default)]
pub struct SeedTotals {
    pub credits: Vec<CreditTotals>,
    pub requests: Vec<RequestTotals>,
    pub records: Vec<RecordTotals>,
}

/// Reads the all-time totals the metrics counters start from. They come from the hourly
/// rollups, which keep the history after `ledger.retention` deleted detail rows, and which are
/// small, so start-up does not scan a ten-million-row `calls` table.
pub fn seed_totals(conn: &Connection) -> rusqlite::Result<SeedTotals> {
    let mut out = SeedTotals::default();
    let mut stmt = conn.prepare(
        "SELECT table_name, workflow, endpoint, sum(lead_milli), sum(direct_dial_milli), sum(export_milli)
           FROM rollup_hourly GROUP BY 1, 2, 3 HAVING sum(credits_milli) <> 0",
    )?;
    out.credits = stmt
        .query_map([], |r| {
            Ok(CreditTotals {
                table_name: unsentinel(r.get(0)?, UNATTRIBUTED),
                workflow: unsentinel(r.get(1)?, NO_WORKFLOW),
                endpoint: r.get(2)?,
                lead_milli: r.get(3)?,
                direct_dial_milli: r.get(4)?,
                export_milli: r.get(5)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut stmt = conn.prepare(
        "SELECT table_name, endpoint, status, outcome, sum(calls) FROM rollup_hourly
          GROUP BY 1, 2, 3, 4 HAVING sum(calls) > 0",
    )?;
    out.requests = stmt
        .query_map([], |r| {
            let status: i64 = r.get(2)?;
            Ok(RequestTotals {
                table_name: unsentinel(r.get(0)?, UNATTRIBUTED),
                endpoint: r.get(1)?,
                status: u16::try_from(status).ok().filter(|s| *s != 0),
                outcome: r.get(3)?,
                calls: r.get::<_, i64>(4)?.max(0) as u64,
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut stmt = conn.prepare(
        "SELECT table_name, endpoint, sum(records_requested), sum(records_matched)
           FROM rollup_hourly GROUP BY 1, 2",
    )?;
    out.records = stmt
        .query_map([], |r| {
            Ok(RecordTotals {
                table_name: unsentinel(r.get(0)?, UNATTRIBUTED),
                endpoint: r.get(1)?,
                requested: r.get::<_, i64>(2)?.max(0) as u64,
                matched: r.get::<_, i64>(3)?.max(0) as u64,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(out)
}

/// The group key of calls without a table (in reports and `rollup_hourly.table_name`).
pub const UNATTRIBUTED: &str = "_unattributed";
/// The group key of calls without a workflow (in reports and `rollup_hourly.workflow`).
pub const NO_WORKFLOW: &str = "_none";

fn unsentinel(v: String, sentinel: &str) -> Option<String> {
    (v != sentinel).then_some(v)
}

/// A grouping of spend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    Table,
    Workflow,
    Endpoint,
    Key,
    Status,
    Outcome,
    /// `tag:<name>`: the value of one `X-Meter-Tag-<name>`.
    Tag(String),
    /// `id_kind`: the identifier kinds a people enrichment carried (`email`, `linkedin_url`,
    /// `email,linkedin_url`, ...). Only calls that carried identifiers and got a 2xx answer.
    IdKind,
    /// `credit_source`: where each credit figure came from: `reported` (Apollo's own
    /// `credits_consumed`), `catalog` (the catalog's rules), `estimated` (the worst case or an
    /// estimate, when the answer could not be read or a deferred charge was never learned),
    /// `none` (free calls).
    CreditSource,
}

impl GroupBy {
    /// Parses `table`, `workflow`, `endpoint`, `key`, `status`, `outcome`, `tag:<name>` or
    /// `id_kind`.
    pub fn parse(s: &str) -> Result<GroupBy, String> {
        Ok(match s {
            "table" => GroupBy::Table,
            "workflow" => GroupBy::Workflow,
            "endpoint" => GroupBy::Endpoint,
            "key" => GroupBy::Key,
            "status" => GroupBy::Status,
            "outcome" => GroupBy::Outcome,
            "id_kind" | "id_kinds" | "identifier" => GroupBy::IdKind,
            "credit_source" | "source" => GroupBy::CreditSource,
            _ => match s.strip_prefix("tag:") {
                Some(name) if !name.is_empty() => GroupBy::Tag(name.to_ascii_lowercase()),
                _ => {
                    return Err(format!(
                        "unknown grouping {s:?}: use table, workflow, endpoint, key, status, outcome, credit_source, tag:<name> or id_kind"
                    ))
                }
            },
        })
    }

    /// The name shown as the key column's heading.
    pub fn label(&self) -> String {
        match self {
            GroupBy::Table => "table".into(),
            GroupBy::Workflow => "workflow".into(),
            GroupBy::Endpoint => "endpoint".into(),
            GroupBy::Key => "key".into(),
            GroupBy::Status => "status".into(),
            GroupBy::Outcome => "outcome".into(),
            GroupBy::Tag(n) => format!("tag:{n}"),
            GroupBy::IdKind => "id_kind".into(),
            GroupBy::CreditSource => "credit_source".into(),
        }
    }

    /// The key over `calls` (a tag's JSON path is the named parameter `:tag`).
    pub fn raw_sql(&self) -> &'static str {
        match self {
            GroupBy::Table => "COALESCE(table_name, '_unattributed')",
            GroupBy::Workflow => "COALESCE(workflow, '_none')",
            GroupBy::Endpoint => "endpoint",
            GroupBy::Key => "COALESCE(key_fp, '_none')",
            GroupBy::Status => "COALESCE(CAST(status AS TEXT), 'none')",
            GroupBy::Outcome => "outcome",
            GroupBy::Tag(_) => "COALESCE(json_extract(tags, :tag), '_none')",
            GroupBy::IdKind => "id_kinds",
            GroupBy::CreditSource => "credit_source",
        }
    }

    /// The same key over `rollup_hourly`, when the rollups carry it.
    fn rollup_sql(&self) -> Option<&'static str> {
        match self {
            GroupBy::Table => Some("table_name"),
            GroupBy::Workflow => Some("workflow"),
            GroupBy::Endpoint => Some("endpoint"),
            GroupBy::Status => Some("CASE status WHEN 0 THEN 'none' ELSE CAST(status AS TEXT) END"),
            GroupBy::Outcome => Some("outcome"),
            GroupBy::Key | GroupBy::Tag(_) | GroupBy::IdKind | GroupBy::CreditSource => None,
        }
    }

    /// Rows this grouping looks at, beyond the window (empty or starting with ` AND `).
    pub fn raw_where(&self) -> &'static str {
        match self {
            GroupBy::IdKind => " AND id_kinds IS NOT NULL AND status BETWEEN 200 AND 299",
            _ => "",
        }
    }

    /// The JSON path bound to `:tag` in [`GroupBy::raw_sql`], for `tag:<name>`.
    pub fn tag_path(&self) -> Option<String> {
        match self {
            GroupBy::Tag(name) => Some(format!("$.\"{}\"", name.replace('"', ""))),
            _ => None,
        }
    }

    /// True when hourly rollups can answer this grouping (over whole hours).
    pub fn has_rollup(&self) -> bool {
        self.rollup_sql().is_some()
    }
}

/// One group's spend in a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SpendRow {
    pub key: String,
    pub calls: u64,
    pub credits_milli: i64,
    pub lead_milli: i64,
    pub direct_dial_milli: i64,
    pub export_milli: i64,
    pub records_requested: u64,
    pub records_matched: u64,
    /// Deferred credits still to be settled (phone reveals, waterfalls): the worst case of the
    /// group's calls whose settlement row has not arrived. Not part of `credits_milli`.
    pub pending_milli: i64,
}

impl SpendRow {
    /// Matched records over requested records, when any were requested.
    pub fn match_rate(&self) -> Option<f64> {
        (self.records_requested > 0)
            .then(|| self.records_matched as f64 / self.records_requested as f64)
    }

    /// Credits spent per matched record, when any matched.
    pub fn credits_per_match(&self) -> Option<f64> {
        (self.records_matched > 0)
            .then(|| self.credits_milli as f64 / 1000.0 / self.records_matched as f64)
    }

    /// Adds another row's figures into this one (for totals).
    pub fn add(&mut self, o: &SpendRow) {
        self.calls += o.calls;
        self.credits_milli += o.credits_milli;
        self.lead_milli += o.lead_milli;
        self.direct_dial_milli += o.direct_dial_milli;
        self.export_milli += o.export_milli;
        self.records_requested += o.records_requested;
        self.records_matched += o.records_matched;
        self.pending_milli += o.pending_milli;
    }
}

/// Orders rows the way reports list them: most credits first, then most calls, then by key.
pub fn sort_by_credits(rows: &mut [SpendRow]) {
    rows.sort_by(|a, b| {
        b.credits_milli
            .cmp(&a.credits_milli)
            .then(b.calls.cmp(&a.calls))
            .then_with(|| a.key.cmp(&b.key))
    });
}

/// One hour in unix ms; rollups are kept per UTC hour.
pub const HOUR_MS: i64 = 3_600_000;

/// `t` rounded down to a multiple of `step`.
pub fn floor_to(t: i64, step: i64) -> i64 {
    t.div_euclid(step) * step
}

/// `t` rounded up to a multiple of `step`.
pub fn ceil_to(t: i64, step: i64) -> i64 {
    floor_to(t, step) + if t.rem_euclid(step) == 0 { 0 } else { step }
}

/// Narrows a query to one table, workflow and/or endpoint. `_unattributed` and `_none` name
/// calls without a table or workflow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub table: Option<String>,
    pub workflow: Option<String>,
    pub endpoint: Option<String>,
}

impl Filter {
    /// True when nothing is filtered.
    pub fn is_empty(&self) -> bool {
        self.table.is_none() && self.workflow.is_none() && self.endpoint.is_none()
    }

    /// SQL conditions (each starting with ` AND `) and their named parameters.
    pub fn sql(&self, rollup: bool) -> (String, Vec<(&'static str, String)>) {
        let mut sql = String::new();
        let mut params = Vec::new();
        for (value, col, name, sentinel) in [
            (&self.table, "table_name", ":f_table", UNATTRIBUTED),
            (&self.workflow, "workflow", ":f_workflow", NO_WORKFLOW),
            (&self.endpoint, "endpoint", ":f_endpoint", ""),
        ] {
            let Some(v) = value else { continue };
            if !rollup && !sentinel.is_empty() && v == sentinel {
                // Raw rows keep NULL; `IS NULL` also keeps the (table_name, ...) index usable.
                sql.push_str(&format!(" AND {col} IS NULL"));
            } else {
                sql.push_str(&format!(" AND {col} = {name}"));
                params.push((name, v.clone()));
            }
        }
        (sql, params)
    }
}

/// A half-open window of start times, `[since_ms, until_ms)`, unix ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub since_ms: i64,
    pub until_ms: i64,
}

/// Where an aggregate may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Source {
    /// Hourly rollups for the whole hours they can answer, detail rows for the rest (default).
    #[default]
    Auto,
    /// Detail rows only (to check the rollups, or to time the difference).
    Raw,
}

/// One aggregated cell: a bucket (0 without buckets) and a group's spend in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub bucket_ms: i64,
    pub row: SpendRow,
}

/// What [`aggregate`] found, and which tables answered.
#[derive(Debug, Clone, Default)]
pub struct Aggregate {
    /// Cells ordered by bucket, then key.
    pub cells: Vec<Cell>,
    /// The hour-aligned part answered from `rollup_hourly`, if any.
    pub rollup: Option<Window>,
    /// The parts answered from `calls`.
    pub raw: Vec<Window>,
}

impl Aggregate {
    /// `rollup`, `raw` or `rollup+raw`.
    pub fn source_label(&self) -> &'static str {
        match (self.rollup.is_some(), self.raw.is_empty()) {
            (true, true) => "rollup",
            (true, false) => "rollup+raw",
            (false, _) => "raw",
        }
    }
}

/// Spend in `window`, grouped by `by` (or one group with key `""`), optionally cut into
/// buckets of `bucket_ms` aligned to the unix epoch (so `1h` buckets start on the hour and
/// `1d` buckets at UTC midnight).
///
/// Whole hours come from `rollup_hourly` when the grouping and the bucket width allow it (the
/// grouping is one the rollups carry, buckets are whole hours); the partial hours at either
/// edge, and everything else, come from `calls`. Both give the same figures to the milli-credit.
pub fn aggregate(
    conn: &Connection,
    by: Option<&GroupBy>,
    window: Window,
    bucket_ms: Option<i64>,
    filter: &Filter,
    source: Source,
) -> rusqlite::Result<Aggregate> {
    let mut out = Aggregate::default();
    if window.until_ms <= window.since_ms {
        return Ok(out);
    }
    let rollup_ok = source == Source::Auto
        && by.is_none_or(GroupBy::has_rollup)
        && bucket_ms.is_none_or(|w| w % HOUR_MS == 0);
    let (h0, h1) = (
        ceil_to(window.since_ms, HOUR_MS),
        floor_to(window.until_ms, HOUR_MS),
    );
    if rollup_ok && h0 < h1 {
        out.rollup = Some(Window {
            since_ms: h0,
            until_ms: h1,
        });
        if window.since_ms < h0 {
            out.raw.push(Window {
                since_ms: window.since_ms,
                until_ms: h0,
            });
        }
        if h1 < window.until_ms {
            out.raw.push(Window {
                since_ms: h1,
                until_ms: window.until_ms,
            });
        }
    } else {
        out.raw.push(window);
    }
    let mut cells: BTreeMap<(i64, String), SpendRow> = BTreeMap::new();
    if let Some(w) = out.rollup {
        query_cells(conn, by, w, bucket_ms, filter, true, &mut cells)?;
    }
    for w in out.raw.clone() {
        query_cells(conn, by, w, bucket_ms, filter, false, &mut cells)?;
    }
    query_pending(conn, by, window, bucket_ms, filter, &mut cells)?;
    out.cells = cells
        .into_iter()
        .map(|((bucket_ms, key), mut row)| {
            row.key = key;
            Cell { bucket_ms, row }
        })
        .collect();
    Ok(out)
}

/// Adds the deferred credits still pending to each cell: the `deferred_milli` of calls started
/// in `w` whose settlement row has not arrived yet, booked (like their settlement will be) at
/// the call's start. Pending calls are recent and few (a partial index holds them), so this
/// reads detail rows whatever the grouping.
fn query_pending(
    conn: &Connection,
    by: Option<&GroupBy>,
    w: Window,
    bucket_ms: Option<i64>,
    filter: &Filter,
    cells: &mut BTreeMap<(i64, String), SpendRow>,
) -> rusqlite::Result<()> {
    let bucket = match bucket_ms {
        Some(b) => format!("(c.started_at / {b}) * {b}"),
        None => "0".to_owned(),
    };
    let key = by.map_or("''", GroupBy::raw_sql);
    let extra = by.map_or("", GroupBy::raw_where);
    let (filter_sql, filter_params) = filter.sql(false);
    let tag_path = by.and_then(GroupBy::tag_path);
    let mut params: Vec<(&str, &dyn rusqlite::ToSql)> =
        vec![(":since", &w.since_ms), (":until", &w.until_ms)];
    if let Some(p) = &tag_path {
        params.push((":tag", p));
    }
    for (name, v) in &filter_params {
        params.push((name, v));
    }
    // The grouping and filter expressions name bare columns: they resolve to `c` here, the
    // only table in the outer query.
    let sql = format!(
        "SELECT {bucket} AS b, {key} AS k, sum(c.deferred_milli)
           FROM calls c
          WHERE c.deferred IS NOT NULL AND c.deferred_milli > 0 AND c.started_at >= :since AND c.started_at < :until{extra}{filter_sql}
            AND NOT EXISTS (SELECT 1 FROM calls s WHERE s.settles = c.request_id)
          GROUP BY b, k"
    );
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query(params.as_slice())?;
    while let Some(r) = rows.next()? {
        let b: i64 = r.get(0)?;
        let k: Option<String> = r.get(1)?;
        let pending: Option<i64> = r.get(2)?;
        cells
            .entry((b, k.unwrap_or_default()))
            .or_default()
            .pending_milli += pending.unwrap_or(0);
    }
    Ok(())
}

fn query_cells(
    conn: &Connection,
    by: Option<&GroupBy>,
    w: Window,
    bucket_ms: Option<i64>,
    filter: &Filter,
    rollup: bool,
    cells: &mut BTreeMap<(i64, String), SpendRow>,
) -> rusqlite::Result<()> {
    let (time, from, count, rr, rm) = if rollup {
        (
            "hour",
            "rollup_hourly",
            // Settlement rows carry a deferred charge, not a call of their own.
            "sum(CASE WHEN outcome = 'settlement' THEN 0 ELSE calls END)",
            "sum(records_requested)",
            "sum(records_matched)",
        )
    } else {
        (
            "started_at",
            "calls",
            "count(*)",
            "sum(coalesce(records_requested, 0))",
            "sum(coalesce(records_matched, 0))",
        )
    };
    let bucket = match bucket_ms {
        Some(b) => format!("({time} / {b}) * {b}"),
        None => "0".to_owned(),
    };
    let key = match by {
        Some(by) if rollup => by.rollup_sql().unwrap_or("''"),
        Some(by) => by.raw_sql(),
        None => "''",
    };
    let extra = match by {
        Some(by) if !rollup => by.raw_where(),
        _ => "",
    };
    let (filter_sql, filter_params) = filter.sql(rollup);
    let tag_path = match by {
        Some(by) if !rollup => by.tag_path(),
        _ => None,
    };
    let mut params: Vec<(&str, &dyn rusqlite::ToSql)> =
        vec![(":since", &w.since_ms), (":until", &w.until_ms)];
    if let Some(p) = &tag_path {
        params.push((":tag", p));
    }
    for (name, v) in &filter_params {
        params.push((name, v));
    }
    if rollup {
        // A few thousand rollup rows: SQLite groups them.
        let sql = format!(
            "SELECT {bucket} AS b, {key} AS k, {count}, sum(credits_milli), sum(lead_milli),
                    sum(direct_dial_milli), sum(export_milli), {rr}, {rm}
               FROM {from}
              WHERE {time} >= :since AND {time} < :until{extra}{filter_sql}
              GROUP BY b, k"
        );
        let mut stmt = conn.prepare(&sql)?;
        let mut rows = stmt.query(params.as_slice())?;
        while let Some(r) = rows.next()? {
            let b: i64 = r.get(0)?;
            let k: Option<String> = r.get(1)?;
            let cell = cells.entry((b, k.unwrap_or_default())).or_default();
            cell.add(&SpendRow {
                key: String::new(),
                calls: r.get::<_, i64>(2)?.max(0) as u64,
                credits_milli: r.get::<_, Option<i64>>(3)?.unwrap_or(0),
                lead_milli: r.get::<_, Option<i64>>(4)?.unwrap_or(0),
                direct_dial_milli: r.get::<_, Option<i64>>(5)?.unwrap_or(0),
                export_milli: r.get::<_, Option<i64>>(6)?.unwrap_or(0),
                records_requested: r.get::<_, Option<i64>>(7)?.unwrap_or(0).max(0) as u64,
                records_matched: r.get::<_, Option<i64>>(8)?.unwrap_or(0).max(0) as u64,
                pending_milli: 0,
            });
        }
        return Ok(());
    }
    // Detail rows: hundreds of thousands in a 30-day window of a big ledger. SQLite would sort
    // them all for GROUP BY; a hash map over the streamed rows is several times faster.
    let sql = format!(
        "SELECT {bucket}, {key}, credits_milli, lead_milli, direct_dial_milli, export_milli,
                coalesce(records_requested, 0), coalesce(records_matched, 0),
                outcome <> 'settlement'
           FROM calls
          WHERE started_at >= :since AND started_at < :until{extra}{filter_sql}"
    );
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query(params.as_slice())?;
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut groups: Vec<HashMap<i64, SpendRow>> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    while let Some(r) = rows.next()? {
        let b: i64 = r.get(0)?;
        let k = match r.get_ref(1)? {
            rusqlite::types::ValueRef::Text(t) => std::str::from_utf8(t).unwrap_or(""),
            _ => "",
        };
        let g = match index.get(k) {
            Some(&g) => g,
            None => {
                index.insert(k.to_owned(), groups.len());
                names.push(k.to_owned());
                groups.push(HashMap::new());
                groups.len() - 1
            }
        };
        let cell = groups[g].entry(b).or_default();
        // Settlement rows carry a deferred charge, not a call of their own.
        cell.calls += r.get::<_, i64>(8)?.clamp(0, 1) as u64;
        cell.credits_milli += r.get::<_, i64>(2)?;
        cell.lead_milli += r.get::<_, i64>(3)?;
        cell.direct_dial_milli += r.get::<_, i64>(4)?;
        cell.export_milli += r.get::<_, i64>(5)?;
        cell.records_requested += r.get::<_, i64>(6)?.max(0) as u64;
        cell.records_matched += r.get::<_, i64>(7)?.max(0) as u64;
    }
    for (name, buckets) in names.into_iter().zip(groups) {
        for (b, row) in buckets {
            cells.entry((b, name.clone())).or_default().add(&row);
        }
    }
    Ok(())
}

/// Spend grouped by `by` for calls started in `[since_ms, until_ms)`, most credits first.
pub fn spend(
    conn: &Connection,
    by: &GroupBy,
    since_ms: i64,
    until_ms: i64,
) -> rusqlite::Result<Vec<SpendRow>> {
    let agg = aggregate(
        conn,
        Some(by),
        Window { since_ms, until_ms },
        None,
        &Filter::default(),
        Source::Auto,
    )?;
    let mut rows: Vec<SpendRow> = agg.cells.into_iter().map(|c| c.row).collect();
    sort_by_credits(&mut rows);
    Ok(rows)
}

/// Every call with a `deferred` charge and no row that `settles` it, oldest first.
pub fn pending_charges(conn: &Connection) -> rusqlite::Result<Vec<crate::PendingCall>> {
    let mut stmt = conn.prepare(
        "SELECT c.request_id, c.started_at, c.method, c.path, c.endpoint, c.table_name,
                c.workflow, c.tags, c.key_fp, c.records_requested, c.records_matched, c.deferred,
                c.deferred_milli
           FROM calls c
          WHERE c.deferred IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM calls s WHERE s.settles = c.request_id)
          ORDER BY c.started_at",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(crate::PendingCall {
            request_id: r.get(0)?,
            started_at: r.get(1)?,
            method: r.get(2)?,
            path: r.get(3)?,
            endpoint: r.get(4)?,
            table_name: r.get(5)?,
            workflow: r.get(6)?,
            tags: r.get(7)?,
            key_fp: r.get(8)?,
            records_requested: r.get(9)?,
            records_matched: r.get(10)?,
            deferred: r.get(11)?,
            deferred_milli: r.get(12)?,
        })
    })?;
    rows.collect()
}

/// The straightforward SQL a person would type into `sqlite3`: `GROUP BY` over `calls` in the
/// window, (credits, calls) per group. `ledger bench` checks the reports against it.
pub fn plain_group_by(
    conn: &Connection,
    by: &GroupBy,
    w: Window,
) -> rusqlite::Result<BTreeMap<String, (i64, i64)>> {
    let sql = format!(
        "SELECT {} AS k, sum(credits_milli), count(*) FROM calls
          WHERE started_at >= :since AND started_at < :until{} GROUP BY k",
        by.raw_sql(),
        by.raw_where()
    );
    let mut stmt = conn.prepare(&sql)?;
    let tag = by.tag_path();
    let mut params: Vec<(&str, &dyn rusqlite::ToSql)> =
        vec![(":since", &w.since_ms), (":until", &w.until_ms)];
    if let Some(t) = &tag {
        params.push((":tag", t));
    }
    let rows = stmt
        .query_map(params.as_slice(), |r| {
            Ok((
                r.get::<_, Option<String>>(0)?.unwrap_or_default(),
                (r.get(1)?, r.get(2)?),
            ))
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// The earliest hour the rollups know of: when the ledger's history starts.
pub fn first_hour(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.query_row("SELECT min(hour) FROM rollup_hourly", [], |r| r.get(0))
}

/// The `meta` key under which retention records how far it deleted detail rows.
pub const META_DETAIL_DELETED_BEFORE: &str = "detail_deleted_before";

/// Detail rows started before this (unix ms, on the hour) may have been deleted by
/// `ledger.retention`; the rollups still hold them.
pub fn detail_deleted_before(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT CAST(value AS INTEGER) FROM meta WHERE key = ?1",
        [META_DETAIL_DELETED_BEFORE],
        |r| r.get(0),
    )
    .optional()
}

/// A position in a [`calls_page`] listing: the last row's `(started_at, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub started_at: i64,
    pub id: i64,
}

impl Cursor {
    /// The opaque form handed to API clients: `<started_at>.<id>`.
    pub fn encode(&self) -> String {
        format!("{}.{}", self.started_at, self.id)
    }

    /// Reads [`Cursor::encode`]'s form.
    pub fn decode(s: &str) -> Option<Cursor> {
        let (a, b) = s.split_once('.')?;
        Some(Cursor {
            started_at: a.parse().ok()?,
            id: b.parse().ok()?,
        })
    }
}

/// Filters and position for paging through raw `calls` rows.
#[derive(Debug, Clone, Default)]
pub struct CallsQuery {
    pub window: Option<Window>,
    pub filter: Filter,
    pub outcome: Option<String>,
    /// An HTTP status, or `None` inside for "no upstream response".
    pub status: Option<Option<u16>>,
    pub key_fp: Option<String>,
    /// Rows per page (callers cap it).
    pub limit: usize,
    /// Continue after this row.
    pub cursor: Option<Cursor>,
    /// Oldest first instead of newest first.
    pub ascending: bool,
}

/// One row of `calls`, as the usage API returns it (`tags` parsed into a JSON object).
#[derive(Debug, Clone, Serialize)]
pub struct CallRow {
    pub id: i64,
    pub request_id: String,
    pub started_at: i64,
    pub finished_at: i64,
    pub method: String,
    pub path: String,
    pub endpoint: String,
    pub status: Option<u16>,
    pub outcome: String,
    pub table_name: Option<String>,
    pub workflow: Option<String>,
    pub tags: Option<serde_json::Value>,
    pub key_fp: Option<String>,
    pub credits_milli: i64,
    pub lead_milli: i64,
    pub direct_dial_milli: i64,
    pub export_milli: i64,
    pub credit_source: String,
    pub records_requested: Option<i64>,
    pub records_matched: Option<i64>,
    pub catalog_version: String,
    pub upstream_ms: Option<i64>,
    pub request_bytes: i64,
    pub response_bytes: i64,
    pub error: Option<String>,
    pub id_kinds: Option<String>,
    /// Settlement rows: the `request_id` of the call they settle.
    pub settles: Option<String>,
    /// The deferred worst case still to be billed (0 when nothing is deferred).
    pub deferred_milli: i64,
    /// The deferred charge's details (parsed from the `deferred` JSON column).
    pub deferred: Option<serde_json::Value>,
}

/// One page of raw rows in `(started_at, id)` order (newest first unless `ascending`), and the
/// cursor for the next page when there is one. Keyset pagination: a page costs the same at
/// the millionth row as at the first, and rows committed meanwhile never shift a page.
pub fn calls_page(
    conn: &Connection,
    q: &CallsQuery,
) -> rusqlite::Result<(Vec<CallRow>, Option<Cursor>)> {
    let (filter_sql, filter_params) = q.filter.sql(false);
    let mut sql = format!(
        "SELECT id, request_id, started_at, finished_at, method, path, endpoint, status, outcome,
                table_name, workflow, tags, key_fp, credits_milli, lead_milli, direct_dial_milli,
                export_milli, credit_source, records_requested, records_matched, catalog_version,
                upstream_ms, request_bytes, response_bytes, error, id_kinds, settles,
                deferred_milli, deferred
           FROM calls WHERE 1{filter_sql}"
    );
    let mut params: Vec<(&str, &dyn rusqlite::ToSql)> = Vec::new();
    for (name, v) in &filter_params {
        params.push((name, v));
    }
    if let Some(w) = &q.window {
        sql.push_str(" AND started_at >= :since AND started_at < :until");
        params.push((":since", &w.since_ms));
        params.push((":until", &w.until_ms));
    }
    if let Some(o) = &q.outcome {
        sql.push_str(" AND outcome = :outcome");
        params.push((":outcome", o));
    }
    match &q.status {
        Some(Some(s)) => {
            sql.push_str(" AND status = :status");
            params.push((":status", s));
        }
        Some(None) => sql.push_str(" AND status IS NULL"),
        None => {}
    }
    if let Some(k) = &q.key_fp {
        sql.push_str(" AND key_fp = :key");
        params.push((":key", k));
    }
    if let Some(c) = &q.cursor {
        sql.push_str(if q.ascending {
            " AND (started_at, id) > (:c_started, :c_id)"
        } else {
            " AND (started_at, id) < (:c_started, :c_id)"
        });
        params.push((":c_started", &c.started_at));
        params.push((":c_id", &c.id));
    }
    sql.push_str(if q.ascending {
        " ORDER BY started_at, id LIMIT :limit"
    } else {
        " ORDER BY started_at DESC, id DESC LIMIT :limit"
    });
    let limit = q.limit.max(1) as i64 + 1;
    params.push((":limit", &limit));
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt
        .query_map(params.as_slice(), |r| {
            let tags: Option<String> = r.get(11)?;
            Ok(CallRow {
                id: r.get(0)?,
                request_id: r.get(1)?,
                started_at: r.get(2)?,
                finished_at: r.get(3)?,
                method: r.get(4)?,
                path: r.get(5)?,
                endpoint: r.get(6)?,
                status: r.get(7)?,
                outcome: r.get(8)?,
                table_name: r.get(9)?,
                workflow: r.get(10)?,
                tags: tags.and_then(|t| serde_json::from_str(&t).ok()),
                key_fp: r.get(12)?,
                credits_milli: r.get(13)?,
                lead_milli: r.get(14)?,
                direct_dial_milli: r.get(15)?,
                export_milli: r.get(16)?,
                credit_source: r.get(17)?,
                records_requested: r.get(18)?,
                records_matched: r.get(19)?,
                catalog_version: r.get(20)?,
                upstream_ms: r.get(21)?,
                request_bytes: r.get(22)?,
                response_bytes: r.get(23)?,
                error: r.get(24)?,
                id_kinds: r.get(25)?,
                settles: r.get(26)?,
                deferred_milli: r.get(27)?,
                deferred: r
                    .get::<_, Option<String>>(28)?
                    .and_then(|d| serde_json::from_str(&d).ok()),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let next = if rows.len() > q.limit.max(1) {
        rows.truncate(q.limit.max(1));
        rows.last().map(|r| Cursor {
            started_at: r.started_at,
            id: r.id,
        })
    } else {
        None
    };
    Ok((rows, next))
}
