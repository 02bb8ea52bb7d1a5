//! Keeping a big ledger healthy: retention (deleting old detail rows in small batches, off the
//! hot path), `ledger stats` and `ledger vacuum`.
//!
//! Retention deletes rows from `calls` only. The hourly rollups are never deleted, so reports by
//! table, workflow, endpoint, status and outcome keep the whole history; groupings that need
//! detail rows (`key`, `tag:<name>`, `id_kind`) cover what retention kept. How far retention has
//! gone is recorded in `meta.detail_deleted_before` so reports can say so.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;

use super::queries::{self, floor_to, HOUR_MS, META_DETAIL_DELETED_BEFORE};
use super::LedgerError;
use crate::Synchronous;

/// Rows deleted per retention transaction: small, so the proxy's writer never waits long.
pub const RETENTION_BATCH: usize = 500;
/// Pause between two retention batches, leaving the write lock free for the proxy.
pub const RETENTION_PAUSE: Duration = Duration::from_millis(100);
/// How often the retention thread looks for rows to delete.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(600);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The retention cutoff for `keep`: detail rows started before it go. Rounded down to the hour,
/// so a report's partial edge hour is never half deleted.
pub fn retention_cutoff(now_ms: i64, keep: Duration) -> i64 {
    floor_to(
        now_ms.saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX)),
        HOUR_MS,
    )
}

/// What one retention pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneOutcome {
    pub deleted: u64,
    pub batches: u64,
    /// True when the pass was stopped before it had deleted everything older than the cutoff.
    pub interrupted: bool,
}

/// Deletes detail rows started before `cutoff_ms` in transactions of `batch` rows, pausing
/// `pause` between them and stopping early when `stop()` says so. Records the cutoff in
/// `meta` first, so a report never trusts detail rows that may be half deleted.
pub fn prune(
    conn: &mut Connection,
    cutoff_ms: i64,
    batch: usize,
    pause: Duration,
    mut stop: impl FnMut() -> bool,
) -> rusqlite::Result<PruneOutcome> {
    let mut out = PruneOutcome::default();
    let has_old: Option<i64> = conn
        .query_row(
            "SELECT id FROM calls WHERE started_at < ?1 LIMIT 1",
            [cutoff_ms],
            |r| r.get(0),
        )
        .optional()?;
    if has_old.is_none() {
        return Ok(out);
    }
    {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO meta(key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = max(CAST(value AS INTEGER), excluded.value)",
            rusqlite::params![META_DETAIL_DELETED_BEFORE, cutoff_ms],
        )?;
        tx.commit()?;
    }
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "DELETE FROM calls WHERE id IN
                (SELECT id FROM calls WHERE started_at < ?1 ORDER BY started_at LIMIT ?2)",
            rusqlite::params![cutoff_ms, batch.max(1) as i64],
        )?;
        let ids = super::identifiers::prune_batch(&tx, cutoff_ms, batch)?;
        tx.commit()?;
        out.deleted += n as u64;
        out.batches += 1;
        if n < batch.max(1) && ids < batch.max(1) {
            return Ok(out);
        }
        if stop() {
            out.interrupted = true;
            return Ok(out);
        }
        std::thread::sleep(pause);
    }
}

/// The retention thread: every [`RETENTION_INTERVAL`], deletes detail rows older than `keep`
/// with its own connection, in batches of [`RETENTION_BATCH`]. It never runs on the proxy's
/// threads or the ledger writer's; [`Retention::stop`] interrupts it between batches.
pub struct Retention {
    stop: mpsc::Sender<()>,
    join: Option<JoinHandle<()>>,
}

impl Retention {
    /// Starts the thread. The first pass runs right away.
    pub fn spawn(
        path: PathBuf,
        synchronous: Synchronous,
        keep: Duration,
    ) -> Result<Retention, LedgerError> {
        let (stop, stopped) = mpsc::channel::<()>();
        let join = std::thread::Builder::new()
            .name("ledger-retention".into())
            .spawn(move || retention_loop(&path, synchronous, keep, &stopped))
            .map_err(LedgerError::Thread)?;
        Ok(Retention {
            stop,
            join: Some(join),
        })
    }

    /// Stops the thread (between two batches at the latest) and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop.send(());
        if let Some(join) = self.join.take() {
            if join.join().is_err() {
                tracing::error!("the ledger retention thread panicked");
            }
        }
    }
}

impl Drop for Retention {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn retention_loop(
    path: &Path,
    synchronous: Synchronous,
    keep: Duration,
    stopped: &mpsc::Receiver<()>,
) {
    let stop_requested = || !matches!(stopped.try_recv(), Err(mpsc::TryRecvError::Empty));
    let mut conn = None;
    loop {
        if conn.is_none() {
            match super::open_for_write(path, synchronous) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "retention: cannot open the ledger; will retry")
                }
            }
        }
        if let Some(c) = conn.as_mut() {
            let cutoff = retention_cutoff(now_ms(), keep);
            let started = Instant::now();
            match prune(c, cutoff, RETENTION_BATCH, RETENTION_PAUSE, stop_requested) {
                Ok(o) if o.deleted > 0 => tracing::info!(
                    deleted = o.deleted,
                    batches = o.batches,
                    before = %creditmeter_base::format_time(cutoff),
                    took_ms = started.elapsed().as_millis() as u64,
                    interrupted = o.interrupted,
                    "retention: deleted old detail rows (rollups keep their totals)"
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "retention pass failed; will retry");
                    conn = None;
                }
            }
        }
        match stopped.recv_timeout(RETENTION_INTERVAL) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

/// `creditmeter ledger stats`: what is in the file and how big it is.
#[derive(Debug, Clone, Serialize)]
pub struct LedgerStats {
    pub path: String,
    pub file_bytes: u64,
    pub wal_bytes: u64,
    pub page_size: i64,
    pub page_count: i64,
    pub freelist_pages: i64,
    /// `none`, `full` or `incremental` (new ledgers are incremental).
    pub auto_vacuum: &'static str,
    pub schema_version: i64,
    pub calls: i64,
    pub oldest_call: Option<i64>,
    pub newest_call: Option<i64>,
    pub rollup_rows: i64,
    pub rollup_first_hour: Option<i64>,
    pub rollup_last_hour: Option<i64>,
    pub rollup_calls: i64,
    pub rollup_credits_milli: i64,
    /// Detail rows before this were deleted by retention (the rollups keep them).
    pub detail_deleted_before: Option<i64>,
    /// Bytes per table and index (from `dbstat`), largest first; only when asked for.
    pub objects: Vec<(String, u64)>,
}

/// Reads [`LedgerStats`] through a read-only connection. `sizes` walks every page (`dbstat`):
/// seconds on a multi-gigabyte file.
pub fn stats(path: &Path, conn: &Connection, sizes: bool) -> rusqlite::Result<LedgerStats> {
    let pragma = |name: &str| -> rusqlite::Result<i64> {
        conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
    };
    let file_len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let (calls, oldest, newest): (i64, Option<i64>, Option<i64>) = conn.query_row(
        "SELECT (SELECT count(*) FROM calls), (SELECT min(started_at) FROM calls),
                (SELECT max(started_at) FROM calls)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let (rollup_rows, first, last, rcalls, rcredits): (
        i64,
        Option<i64>,
        Option<i64>,
        Option<i64>,
        Option<i64>,
    ) = conn.query_row(
        "SELECT count(*), min(hour), max(hour), sum(calls), sum(credits_milli) FROM rollup_hourly",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    )?;
    let mut objects = Vec::new();
    if sizes {
        let mut stmt =
            conn.prepare("SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC")?;
        objects = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
            })?
            .collect::<Result<_, _>>()?;
    }
    Ok(LedgerStats {
        path: path.display().to_string(),
        file_bytes: file_len(path),
        wal_bytes: file_len(Path::new(&wal)),
        page_size: pragma("page_size")?,
        page_count: pragma("page_count")?,
        freelist_pages: pragma("freelist_count")?,
        auto_vacuum: match pragma("auto_vacuum")? {
            1 => "full",
            2 => "incremental",
            _ => "none",
        },
        schema_version: pragma("user_version")?,
        calls,
        oldest_call: oldest,
        newest_call: newest,
        rollup_rows,
        rollup_first_hour: first,
        rollup_last_hour: last,
        rollup_calls: rcalls.unwrap_or(0),
        rollup_credits_milli: rcredits.unwrap_or(0),
        detail_deleted_before: queries::detail_deleted_before(conn)?,
        objects,
    })
}

/// What `ledger vacuum` did.
#[derive(Debug, Clone, Serialize)]
pub struct VacuumOutcome {
    pub file_bytes_before: u64,
    pub file_bytes_after: u64,
    pub freed_pages: i64,
    /// `incremental` (pages returned in small steps), `full` (the file rewritten), or
    /// `checkpoint` (the file has no incremental auto-vacuum: only the WAL was truncated).
    pub mode: &'static str,
    /// True when the WAL could not be truncated because a reader or the writer was busy.
    pub wal_busy: bool,
}

/// `creditmeter ledger vacuum`. Without `full`: checkpoints and truncates the WAL, refreshes
/// the planner's statistics, and, on files with incremental auto-vacuum (every ledger this
/// version created), returns free pages to the file system 1,000 pages per transaction, so a
/// running proxy waits at most one short step. With `full`: rewrites the whole file (`VACUUM`)
/// and switches it to incremental auto-vacuum; that holds the write lock for the whole rewrite,
/// so run it with the proxy stopped.
pub fn vacuum(path: &Path, conn: &Connection, full: bool) -> rusqlite::Result<VacuumOutcome> {
    let file_len = || std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let before = file_len();
    let free_before: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let auto: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
    let mode = if full {
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        conn.execute_batch("VACUUM")?;
        "full"
    } else if auto == 2 {
        loop {
            let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
            if free == 0 {
                break;
            }
            // Each call is its own short write transaction.
            conn.execute_batch("PRAGMA incremental_vacuum(1000)")?;
            let after: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
            if after >= free {
                break;
            }
        }
        "incremental"
    } else {
        "checkpoint"
    };
    conn.execute_batch("PRAGMA optimize")?;
    let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
    let free_after: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    Ok(VacuumOutcome {
        file_bytes_before: before,
        file_bytes_after: file_len(),
        freed_pages: free_before - free_after,
        mode,
        wal_busy: busy != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoff_is_on_the_hour_and_keeps_at_least_keep() {
        let now = 1_700_000_123_456;
        let c = retention_cutoff(now, Duration::from_secs(86_400));
        assert_eq!(c % HOUR_MS, 0);
        assert!(c <= now - 86_400_000 && c > now - 86_400_000 - HOUR_MS);
    }
}
