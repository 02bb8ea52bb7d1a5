//! `report --calls`: the raw ledger rows of a window (oldest first), for finance and for
//! anyone who wants to check a figure call by call. CSV (the default for `--calls` is the
//! format asked for: `--format csv`), JSON (an array of the admin API's call objects) or an
//! aligned table. Honours `--since`, `--until`, `--table`, `--workflow` and `--endpoint`.
//!
//! Written as it is read, a page of rows at a time, so a month of calls never sits in memory.
//!
//! CSV columns: the ledger's own names (`request_id`, `started_at`, `finished_at` as RFC 3339,
//! then `method`, `path`, `endpoint`, `status`, `outcome`, `table_name`, `workflow`, `tags`,
//! `key_fp`, `credits`, `lead_credits`, `direct_dial_credits`, `export_credits`,
//! `credit_source`, `records_requested`, `records_matched`, `upstream_ms`, `id_kinds`,
//! `settles`, `deferred_credits`, `error`). Credits are plain credits (`1.01`).

use std::io::Write;

use rusqlite::Connection;

use super::{credits, csv_field, format_time, Format, ReportError, ReportRequest};
use crate::ledger::queries::{calls_page, CallRow, CallsQuery, Window};

/// Rows fetched per page.
const PAGE: usize = 5_000;

/// The CSV header.
pub const CSV_HEADER: &str = "request_id,started_at,finished_at,method,path,endpoint,status,outcome,table_name,workflow,tags,key_fp,credits,lead_credits,direct_dial_credits,export_credits,credit_source,records_requested,records_matched,upstream_ms,id_kinds,settles,deferred_credits,error";

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(ToString::to_string).unwrap_or_default()
}

/// One CSV line (no newline).
pub fn csv_line(r: &CallRow) -> String {
    let fields = [
        r.request_id.clone(),
        format_time(r.started_at),
        format_time(r.finished_at),
        r.method.clone(),
        r.path.clone(),
        r.endpoint.clone(),
        opt(&r.status),
        r.outcome.clone(),
        opt(&r.table_name),
        opt(&r.workflow),
        r.tags.as_ref().map(|t| t.to_string()).unwrap_or_default(),
        opt(&r.key_fp),
        credits(r.credits_milli),
        credits(r.lead_milli),
        credits(r.direct_dial_milli),
        credits(r.export_milli),
        r.credit_source.clone(),
        opt(&r.records_requested),
        opt(&r.records_matched),
        opt(&r.upstream_ms),
        opt(&r.id_kinds),
        opt(&r.settles),
        credits(r.deferred_milli),
        opt(&r.error),
    ];
    fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",")
}

/// Writes the window's calls to `out` in `req.format`.
pub fn write(
    conn: &Connection,
    req: &ReportRequest,
    out: &mut dyn Write,
) -> Result<(), ReportError> {
    let mut q = CallsQuery {
        window: Some(Window {
            since_ms: req.since_ms,
            until_ms: req.until_ms,
        }),
        filter: req.filter.clone(),
        limit: PAGE,
        ascending: true,
        ..Default::default()
    };
    let io = |e: std::io::Error| ReportError::Output(e);
    match req.format {
        Format::Csv | Format::Focus => writeln!(out, "{CSV_HEADER}").map_err(io)?,
        Format::Json => write!(out, "[").map_err(io)?,
        Format::Table => writeln!(
            out,
            "{:<20}  {:<22}  {:<24}  {:<20}  {:>6}  {:>9}  outcome",
            "started_at", "table", "workflow", "endpoint", "status", "credits"
        )
        .map_err(io)?,
    }
    let mut first = true;
    loop {
        let (rows, next) = calls_page(conn, &q)?;
        for r in &rows {
            match req.format {
                Format::Csv | Format::Focus => writeln!(out, "{}", csv_line(r)).map_err(io)?,
                Format::Json => {
                    let sep = if first { "\n" } else { ",\n" };
                    let v = serde_json::to_string(r).unwrap_or_else(|_| "null".into());
                    write!(out, "{sep}{v}").map_err(io)?;
                }
                Format::Table => writeln!(
                    out,
                    "{:<20}  {:<22}  {:<24}  {:<20}  {:>6}  {:>9}  {}",
                    format_time(r.started_at),
                    r.table_name.as_deref().unwrap_or("_unattributed"),
                    r.workflow.as_deref().unwrap_or("_none"),
                    r.endpoint,
                    opt(&r.status),
                    credits(r.credits_milli),
                    r.outcome
                )
                .map_err(io)?,
            }
            first = false;
        }
        match next {
            Some(c) => q.cursor = Some(c),
            None => break,
        }
    }
    if req.format == Format::Json {
        writeln!(out, "{}]", if first { "" } else { "\n" }).map_err(io)?;
    }
    Ok(())
}
