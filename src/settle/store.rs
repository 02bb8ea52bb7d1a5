//! What the settler reads back from the ledger at start-up: the charges still pending.

use rusqlite::Connection;

use super::Original;
use crate::catalog::Deferred;

/// A row whose deferred charge has no settlement row yet.
#[derive(Debug, Clone)]
pub struct PendingRow {
    pub original: Original,
    pub deferred: Deferred,
}

/// Every call with a `deferred` charge and no row that `settles` it, oldest first. A row whose
/// `deferred` JSON cannot be read is logged and skipped (it cannot be settled or priced).
pub fn pending(conn: &Connection) -> rusqlite::Result<Vec<PendingRow>> {
    let mut stmt = conn.prepare(
        "SELECT c.request_id, c.started_at, c.method, c.path, c.endpoint, c.table_name,
                c.workflow, c.tags, c.key_fp, c.records_requested, c.records_matched, c.deferred
           FROM calls c
          WHERE c.deferred IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM calls s WHERE s.settles = c.request_id)
          ORDER BY c.started_at",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            Original {
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
            },
            r.get::<_, String>(11)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (original, text) = row?;
        match Deferred::from_json(&text) {
            Ok(deferred) => out.push(PendingRow { original, deferred }),
            Err(e) => tracing::error!(
                request_id = %original.request_id,
                error = %e,
                "settle: the ledger's `deferred` of this call cannot be read; it stays pending in reports"
            ),
        }
    }
    Ok(out)
}
