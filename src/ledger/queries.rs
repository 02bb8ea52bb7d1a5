//! Read queries over the ledger: totals that seed the metrics at start-up, and spend grouped for
//! reports. All of them run on a read connection and never block the writer (WAL).

use rusqlite::Connection;
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

/// Reads the all-time totals the metrics counters start from.
pub fn seed_totals(conn: &Connection) -> rusqlite::Result<SeedTotals> {
    let mut out = SeedTotals::default();
    let mut stmt = conn.prepare(
        "SELECT table_name, workflow, endpoint, sum(lead_milli), sum(direct_dial_milli), sum(export_milli)
           FROM calls WHERE credits_milli <> 0 GROUP BY 1, 2, 3",
    )?;
    out.credits = stmt
        .query_map([], |r| {
            Ok(CreditTotals {
                table_name: r.get(0)?,
                workflow: r.get(1)?,
                endpoint: r.get(2)?,
                lead_milli: r.get(3)?,
                direct_dial_milli: r.get(4)?,
                export_milli: r.get(5)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut stmt = conn.prepare(
        "SELECT table_name, endpoint, status, outcome, count(*) FROM calls GROUP BY 1, 2, 3, 4",
    )?;
    out.requests = stmt
        .query_map([], |r| {
            Ok(RequestTotals {
                table_name: r.get(0)?,
                endpoint: r.get(1)?,
                status: r.get(2)?,
                outcome: r.get(3)?,
                calls: r.get::<_, i64>(4)?.max(0) as u64,
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut stmt = conn.prepare(
        "SELECT table_name, endpoint, sum(coalesce(records_requested, 0)), sum(coalesce(records_matched, 0))
           FROM calls GROUP BY 1, 2",
    )?;
    out.records = stmt
        .query_map([], |r| {
            Ok(RecordTotals {
                table_name: r.get(0)?,
                endpoint: r.get(1)?,
                requested: r.get::<_, i64>(2)?.max(0) as u64,
                matched: r.get::<_, i64>(3)?.max(0) as u64,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(out)
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
}

impl GroupBy {
    /// Parses `table`, `workflow`, `endpoint`, `key`, `status`, `outcome` or `tag:<name>`.
    pub fn parse(s: &str) -> Result<GroupBy, String> {
        Ok(match s {
            "table" => GroupBy::Table,
            "workflow" => GroupBy::Workflow,
            "endpoint" => GroupBy::Endpoint,
            "key" => GroupBy::Key,
            "status" => GroupBy::Status,
            "outcome" => GroupBy::Outcome,
            _ => match s.strip_prefix("tag:") {
                Some(name) if !name.is_empty() => GroupBy::Tag(name.to_ascii_lowercase()),
                _ => {
                    return Err(format!(
                        "unknown grouping {s:?}: use table, workflow, endpoint, key, status, outcome or tag:<name>"
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
        }
    }

    fn sql(&self) -> &'static str {
        match self {
            GroupBy::Table => "COALESCE(table_name, '_unattributed')",
            GroupBy::Workflow => "COALESCE(workflow, '_none')",
            GroupBy::Endpoint => "endpoint",
            GroupBy::Key => "COALESCE(key_fp, '_none')",
            GroupBy::Status => "COALESCE(CAST(status AS TEXT), 'none')",
            GroupBy::Outcome => "outcome",
            GroupBy::Tag(_) => "COALESCE(json_extract(tags, ?3), '_none')",
        }
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
    }
}

/// Spend grouped by `by` for calls started in `[since_ms, until_ms)`, most credits first.
pub fn spend(
    conn: &Connection,
    by: &GroupBy,
    since_ms: i64,
    until_ms: i64,
) -> rusqlite::Result<Vec<SpendRow>> {
    let sql = format!(
        "SELECT {k} AS k, count(*), sum(credits_milli), sum(lead_milli), sum(direct_dial_milli),
                sum(export_milli), sum(coalesce(records_requested, 0)), sum(coalesce(records_matched, 0))
           FROM calls
          WHERE started_at >= ?1 AND started_at < ?2
          GROUP BY k
          ORDER BY 3 DESC, 2 DESC, 1",
        k = by.sql()
    );
    let mut stmt = conn.prepare(&sql)?;
    let map = |r: &rusqlite::Row<'_>| {
        Ok(SpendRow {
            key: r.get::<_, Option<String>>(0)?.unwrap_or_default(),
            calls: r.get::<_, i64>(1)?.max(0) as u64,
            credits_milli: r.get(2)?,
            lead_milli: r.get(3)?,
            direct_dial_milli: r.get(4)?,
            export_milli: r.get(5)?,
            records_requested: r.get::<_, i64>(6)?.max(0) as u64,
            records_matched: r.get::<_, i64>(7)?.max(0) as u64,
        })
    };
    let rows = match by {
        GroupBy::Tag(name) => {
            let path = format!("$.\"{}\"", name.replace('"', ""));
            stmt.query_map(rusqlite::params![since_ms, until_ms, path], map)?
                .collect::<Result<Vec<_>, _>>()?
        }
        _ => stmt
            .query_map(rusqlite::params![since_ms, until_ms], map)?
            .collect::<Result<Vec<_>, _>>()?,
    };
    Ok(rows)
}
