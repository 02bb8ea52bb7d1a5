//! What budgets and holds keep in the ledger and read back from it: the spend of recent calls
//! (to rebuild budget windows at start-up) and the `holds` table. Knows nothing of HTTP.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags};
use serde::{Deserialize, Serialize};

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

/// Which of `request_ids` are in `calls`.
pub fn stored_ids(conn: &Connection, request_ids: &[&str]) -> rusqlite::Result<HashSet<String>> {
    let mut stmt = conn.prepare_cached("SELECT 1 FROM calls WHERE request_id = ?1")?;
    let mut out = HashSet::new();
    for id in request_ids {
        if stmt.exists([id])? {
            out.insert((*id).to_owned());
        }
    }
    Ok(out)
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
/// by the server (a missing file is an error, never a new empty one: the writer recreates it);
/// a hold write waits up to 2 s for another transaction to end, then goes to the holds spool.
pub fn open_for_holds(path: &Path) -> Result<Connection, LedgerError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| LedgerError::Open {
        path: path.to_owned(),
        source,
    })?;
    conn.busy_timeout(Duration::from_secs(2))?;
    Ok(conn)
}

/// The highest hold id the ledger has given out (0 for none).
pub fn max_hold_id(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT coalesce(max(id), 0) FROM holds", [], |r| r.get(0))
}

/// A hold change the ledger refused (locked, disk full), kept in `<ledger>.holds-spool` (one
/// JSON object per line, fsynced) until it can be written: at the next hold change, when the
/// ledger writer recovers, or at the next start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum HoldOp {
    Place {
        id: i64,
        /// The scope's JSON, as the `holds.scope` column keeps it.
        scope: String,
        reason: Option<String>,
        created_at: i64,
    },
    Release {
        id: i64,
        released_at: i64,
    },
}

impl HoldOp {
    pub fn id(&self) -> i64 {
        match self {
            HoldOp::Place { id, .. } | HoldOp::Release { id, .. } => *id,
        }
    }
}

/// Serialises appends to, and replays of, holds spools in this process.
static HOLD_SPOOL: Mutex<()> = Mutex::new(());

fn hold_spool_lock() -> std::sync::MutexGuard<'static, ()> {
    HOLD_SPOOL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `<ledger>.holds-spool`.
pub fn holds_spool_path(ledger: &Path) -> PathBuf {
    let mut name = ledger.as_os_str().to_os_string();
    name.push(".holds-spool");
    PathBuf::from(name)
}

/// Applies one hold change: a placed hold keeps the id it was given (and is not doubled).
pub fn apply_hold_op(conn: &Connection, op: &HoldOp) -> rusqlite::Result<()> {
    match op {
        HoldOp::Place {
            id,
            scope,
            reason,
            created_at,
        } => conn.execute(
            "INSERT OR IGNORE INTO holds (id, scope, reason, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![id, scope, reason, created_at],
        )?,
        HoldOp::Release { id, released_at } => conn.execute(
            "UPDATE holds SET released_at = ?2 WHERE id = ?1 AND released_at IS NULL",
            params![id, released_at],
        )?,
    };
    Ok(())
}

/// The hold changes waiting in the holds spool, oldest first (unreadable lines skipped).
pub fn read_hold_spool(ledger: &Path) -> std::io::Result<Vec<HoldOp>> {
    let _l = hold_spool_lock();
    read_ops(&holds_spool_path(ledger))
}

fn read_ops(path: &Path) -> std::io::Result<Vec<HoldOp>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut ops = Vec::new();
    for line in std::io::BufReader::new(f).lines() {
        let line = line?;
        match serde_json::from_str::<HoldOp>(&line) {
            Ok(op) => ops.push(op),
            Err(e) if !line.trim().is_empty() => {
                tracing::error!(error = %e, text = %line, "skipping an unreadable holds spool line")
            }
            Err(_) => {}
        }
    }
    Ok(ops)
}

/// Appends `op` to the holds spool and fsyncs it. On a full disk the spool's ballast
/// (`<ledger>.spool-reserve`) is released to make room.
pub fn append_hold_spool(ledger: &Path, op: &HoldOp) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(op).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let path = holds_spool_path(ledger);
    let _l = hold_spool_lock();
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        // A torn line from an earlier failure must not swallow this one.
        f.write_all(b"\n")?;
        f.write_all(&line)?;
        f.sync_data()
    };
    match write() {
        Err(e) if e.kind() == std::io::ErrorKind::StorageFull => {
            let released = [".holds-reserve", ".spool-reserve"].iter().any(|ext| {
                let mut reserve = ledger.as_os_str().to_os_string();
                reserve.push(ext);
                std::fs::remove_file(PathBuf::from(reserve)).is_ok()
            });
            if !released {
                return Err(e);
            }
            tracing::warn!("disk full: released a reserve file to make room for the holds spool");
            write()
        }
        other => other,
    }
}

/// Bytes of ballast kept in `<ledger>.holds-reserve`, so that a hold placed on a full disk can
/// still be written to the holds spool (the spool's own reserve goes to call rows).
pub const HOLDS_RESERVE: usize = 64 * 1024;

/// Creates `<ledger>.holds-reserve` if it is missing (best effort).
pub fn ensure_holds_reserve(ledger: &Path) {
    let mut name = ledger.as_os_str().to_os_string();
    name.push(".holds-reserve");
    let path = PathBuf::from(name);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() >= HOLDS_RESERVE as u64) {
        return;
    }
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&vec![0u8; HOLDS_RESERVE])?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&path);
        tracing::debug!(error = %e, "cannot create the holds reserve");
    }
}

/// Writes the hold changes waiting in the holds spool into the ledger, in order and in one
/// transaction, then removes the spool. Returns how many there were.
pub fn replay_hold_spool(conn: &Connection, ledger: &Path) -> Result<usize, LedgerError> {
    let path = holds_spool_path(ledger);
    let _l = hold_spool_lock();
    let ops = read_ops(&path).map_err(|source| LedgerError::Spool {
        path: path.clone(),
        source,
    })?;
    if ops.is_empty() {
        let _ = std::fs::remove_file(&path);
        return Ok(0);
    }
    let tx = conn.unchecked_transaction()?;
    for op in &ops {
        apply_hold_op(&tx, op)?;
    }
    tx.commit()?;
    std::fs::remove_file(&path).map_err(|source| LedgerError::Spool { path, source })?;
    tracing::info!(
        changes = ops.len(),
        "hold changes from the holds spool written to the ledger"
    );
    Ok(ops.len())
}
