//! What budgets and holds keep in the ledger and read back from it: the spend of recent calls
//! (to rebuild budget windows at start-up) and the `holds` table. Knows nothing of HTTP.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection};

use super::LedgerError;

/// The credits of calls with one attribution that started within one minute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendGroup {
    pub table_name: Option<String>,
    pub workflow: Option<String>,
    pub key_fp: Option<String>,
    /// The `tags` JSON object, as stored.
    pub tags: Option<String>,
    /// The latest `started_at` in the group. Calendar windows start on whole minutes, so a
    /// group lies wholly inside or outside one; a rolling window forgets it no earlier than
    /// its last call.
    pub started_at: i64,
    pub lead_milli: i64,
    pub direct_dial_milli: i64,
    pub export_milli: i64,
}

/// Spend of the calls that started at or after `since_ms` and cost anything, grouped by
/// attribution and minute: a range scan of the `calls_started_at` index that hands back far
/// fewer rows than calls.
pub fn spend_since(conn: &Connection, since_ms: i64) -> rusqlite::Result<Vec<SpendGroup>> {
    let mut stmt = conn.prepare(
        "SELECT table_name, workflow, key_fp, tags, max(started_at),
                sum(lead_milli), sum(direct_dial_milli), sum(export_milli)
           FROM calls
          WHERE started_at >= ?1 AND credits_milli <> 0
          GROUP BY table_name, workflow, key_fp, tags, started_at / 60000",
    )?;
    let rows = stmt.query_map([since_ms], |r| {
        Ok(SpendGroup {
            table_name: r.get(0)?,
            workflow: r.get(1)?,
            key_fp: r.get(2)?,
            tags: r.get(3)?,
            started_at: r.get(4)?,
            lead_milli: r.get(5)?,
            direct_dial_milli: r.get(6)?,
            export_milli: r.get(7)?,
        })
    })?;
    rows.collect()
}

/// [`spend_since`] and the `request_id`s of the costing calls that started at or after
/// `ids_since_ms`, read in one transaction so both see the same committed rows.
pub fn spend_snapshot(
    conn: &Connection,
    since_ms: i64,
    ids_since_ms: Option<i64>,
) -> rusqlite::Result<(Vec<SpendGroup>, HashSet<String>)> {
    let tx = conn.unchecked_transaction()?;
    let groups = spend_since(&tx, since_ms)?;
    let mut ids = HashSet::new();
    if let Some(t) = ids_since_ms {
        let mut stmt = tx.prepare(
            "SELECT request_id FROM calls WHERE started_at >= ?1 AND credits_milli <> 0",
        )?;
        for id in stmt.query_map([t], |r| r.get::<_, String>(0))? {
            ids.insert(id?);
        }
    }
    tx.finish()?;
    Ok((groups, ids))
}

/// A hold in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRow {
    pub id: i64,
    /// JSON, as the admin API takes it.
    pub scope: String,
    pub reason: Option<String>,
    pub created_at: i64,
}

/// The holds in force, oldest first.
pub fn active_holds(conn: &Connection) -> rusqlite::Result<Vec<HoldRow>> {
    let mut stmt = conn.prepare(
        "SELECT id, scope, reason, created_at FROM holds WHERE released_at IS NULL ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(HoldRow {
            id: r.get(0)?,
            scope: r.get(1)?,
            reason: r.get(2)?,
            created_at: r.get(3)?,
        })
    })?;
    rows.collect()
}

/// Records a new hold and returns its id.
pub fn insert_hold(
    conn: &Connection,
    scope_json: &str,
    reason: Option<&str>,
    created_at: i64,
) -> rusqlite::Result<i64> {
    conn.execute(
        "INSERT INTO holds (scope, reason, created_at) VALUES (?1, ?2, ?3)",
        params![scope_json, reason, created_at],
    )?;
    Ok(conn.last_insert_rowid())
}

/// Marks a hold released. False if no hold with that id is in force.
pub fn release_hold(conn: &Connection, id: i64, released_at: i64) -> rusqlite::Result<bool> {
    let n = conn.execute(
        "UPDATE holds SET released_at = ?2 WHERE id = ?1 AND released_at IS NULL",
        params![id, released_at],
    )?;
    Ok(n > 0)
}

/// A short-lived write connection for a hold change. The ledger is already open and migrated
/// by the server; a hold write waits (up to 5 s) for the writer thread's transaction to end.
pub fn open_for_holds(path: &Path) -> Result<Connection, LedgerError> {
    let conn = Connection::open(path).map_err(|source| LedgerError::Open {
        path: path.to_owned(),
        source,
    })?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}
