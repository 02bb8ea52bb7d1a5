//! The SQLite store: a ledger file in WAL mode ([`SqliteStore`]), and the writer's sink on it
//! ([`SqliteSink`]), which also runs the background WAL checkpointer.
//!
//! Reads run on read-only connections kept in a small pool (WAL: readers never block the
//! writer). A pooled connection is reused only while the file at the ledger's path is the one
//! it opened, so readers follow a ledger the writer recreated after it was deleted, as they did
//! when every report opened its own connection. Short writes off the writer thread (hold
//! changes) open a read-write connection that waits at most 2 s for a lock.
//! The SQL itself lives in [`crate::queries`], [`crate::guardrails`], [`crate::schema`] and
//! [`crate::maintenance`].

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{params, Connection};

use crate::guardrails::{self, HoldOp, HoldRow, SpendGroup};
use crate::maintenance::{self, LedgerStats, PruneOutcome, Retention, VacuumOutcome};
use crate::queries::{
    self, Aggregate, CallRow, CallsQuery, Cursor, Filter, GroupBy, SeedTotals, Source, Window,
};
use crate::reconcile::{self, LatestBalance, WindowsRead};
use crate::store::{
    CallSink, Guardrails, PendingCall, ReconcileStore, Reports, Rows, SettleStore, SinkOptions,
    Store,
};
use crate::{CallRecord, LedgerError, Synchronous};

/// The ledger in one SQLite file.
pub struct SqliteStore {
    path: PathBuf,
    synchronous: Synchronous,
    /// Idle read-only connections, with the identity of the file each one opened.
    readers: Mutex<Vec<(Connection, Option<FileId>)>>,
}

/// Idle read connections kept for reuse; more may be open at once.
const MAX_IDLE_READERS: usize = 4;

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("synchronous", &self.synchronous)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens the ledger for a server: creates the file (and its directory) if needed, WAL, the
    /// chosen `synchronous`, migrated to this build's schema.
    pub fn open(path: &Path, synchronous: Synchronous) -> Result<SqliteStore, LedgerError> {
        drop(crate::open_for_write(path, synchronous)?);
        Ok(SqliteStore::at(path, synchronous))
    }

    /// The ledger file at `path`, opened by nothing yet: each use opens what it needs (the
    /// maintenance commands, which must not keep a connection of their own around).
    pub fn file(path: &Path) -> SqliteStore {
        SqliteStore::at(path, Synchronous::Normal)
    }

    fn at(path: &Path, synchronous: Synchronous) -> SqliteStore {
        SqliteStore {
            path: path.to_owned(),
            synchronous,
            readers: Mutex::new(Vec::new()),
        }
    }

    /// The ledger at `path` for reading only (reports, tools): nothing is created or migrated.
    /// Fails if the file cannot be opened.
    pub fn open_read(path: &Path) -> Result<SqliteStore, LedgerError> {
        let store = SqliteStore::at(path, Synchronous::Normal);
        let conn = crate::open_for_read(path)?;
        store.put_reader(conn, file_identity(path));
        Ok(store)
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a read-only connection (pooled). A query error is [`LedgerError::Query`].
    pub fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, LedgerError> {
        let identity = file_identity(&self.path);
        let pooled = {
            let mut idle = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
            // Connections to a file that is no longer at the path are closed, not reused.
            idle.retain(|(_, id)| *id == identity);
            idle.pop()
        };
        let conn = match pooled {
            Some((conn, _)) => conn,
            None => crate::open_for_read(&self.path)?,
        };
        let result = f(&conn).map_err(LedgerError::Query);
        if result.is_ok() {
            self.put_reader(conn, identity);
        }
        result
    }

    fn put_reader(&self, conn: Connection, identity: Option<FileId>) {
        let mut idle = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE_READERS {
            idle.push((conn, identity));
        }
    }

    /// Runs `f` on a fresh read-write connection that waits at most 2 s for a lock; the file
    /// must exist (the writer recreates a deleted one, never a short write).
    pub fn write<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        let conn = guardrails::open_for_holds(&self.path)?;
        f(&conn)
    }
}

/// SQLite-only tools: `ledger stats`, `ledger vacuum`, and what `ledger bench` compares the
/// reports with. They have no place on [`Store`]: another backend has its own tools.
impl SqliteStore {
    /// `creditmeter ledger stats`. `sizes` walks every page (`dbstat`).
    pub fn stats(&self, sizes: bool) -> Result<LedgerStats, LedgerError> {
        self.read(|c| maintenance::stats(&self.path, c, sizes))
    }

    /// `creditmeter ledger vacuum` ([`maintenance::vacuum`]).
    pub fn vacuum(&self, full: bool) -> Result<VacuumOutcome, LedgerError> {
        let conn = Connection::open(&self.path).map_err(|source| LedgerError::Open {
            path: self.path.clone(),
            source,
        })?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(maintenance::vacuum(&self.path, &conn, full)?)
    }

    /// Rows in `calls` and the newest `started_at`.
    pub fn call_count(&self) -> Result<(i64, Option<i64>), LedgerError> {
        self.read(|c| {
            c.query_row(
                "SELECT (SELECT count(*) FROM calls), (SELECT max(started_at) FROM calls)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
    }

    /// Rows in `calls` started in `w`.
    pub fn calls_in(&self, w: Window) -> Result<i64, LedgerError> {
        self.read(|c| {
            c.query_row(
                "SELECT count(*) FROM calls WHERE started_at >= ?1 AND started_at < ?2",
                [w.since_ms, w.until_ms],
                |r| r.get(0),
            )
        })
    }

    /// The straightforward SQL a person would write on the same file: `GROUP BY` over `calls`
    /// in the window. (credits, calls) per group.
    pub fn plain_group_by(
        &self,
        by: &GroupBy,
        w: Window,
    ) -> Result<BTreeMap<String, (i64, i64)>, LedgerError> {
        self.read(|c| queries::plain_group_by(c, by, w))
    }
}

impl Reports for SqliteStore {
    fn seed_totals(&self) -> Result<SeedTotals, LedgerError> {
        self.read(queries::seed_totals)
    }

    fn aggregate(
        &self,
        by: Option<&GroupBy>,
        window: Window,
        bucket_ms: Option<i64>,
        filter: &Filter,
        source: Source,
    ) -> Result<Aggregate, LedgerError> {
        self.read(|c| queries::aggregate(c, by, window, bucket_ms, filter, source))
    }

    fn first_hour(&self) -> Result<Option<i64>, LedgerError> {
        self.read(queries::first_hour)
    }

    fn detail_deleted_before(&self) -> Result<Option<i64>, LedgerError> {
        self.read(queries::detail_deleted_before)
    }

    fn calls_page(&self, q: &CallsQuery) -> Result<(Vec<CallRow>, Option<Cursor>), LedgerError> {
        self.read(|c| queries::calls_page(c, q))
    }
}

impl Guardrails for SqliteStore {
    fn spend_since(&self, since_ms: i64) -> Result<Vec<SpendGroup>, LedgerError> {
        self.read(|c| guardrails::spend_since(c, since_ms))
    }

    fn spend_snapshot(
        &self,
        since_ms: i64,
        ids_since_ms: Option<i64>,
    ) -> Result<(Vec<SpendGroup>, HashSet<String>), LedgerError> {
        self.read(|c| guardrails::spend_snapshot(c, since_ms, ids_since_ms))
    }

    fn stored_ids(&self, request_ids: &[&str]) -> Result<HashSet<String>, LedgerError> {
        self.read(|c| guardrails::stored_ids(c, request_ids))
    }

    fn active_holds(&self) -> Result<Vec<HoldRow>, LedgerError> {
        self.read(guardrails::active_holds)
    }

    fn max_hold_id(&self) -> Result<i64, LedgerError> {
        self.read(guardrails::max_hold_id)
    }

    fn write_hold(&self, op: Option<&HoldOp>) -> Result<(), LedgerError> {
        self.write(|conn| {
            guardrails::replay_hold_spool(conn, &self.path)?;
            if let Some(op) = op {
                guardrails::apply_hold_op(conn, op)?;
            }
            Ok(())
        })
    }
}

impl SettleStore for SqliteStore {
    fn pending_charges(&self) -> Result<Vec<PendingCall>, LedgerError> {
        self.read(queries::pending_charges)
    }

    fn is_stored(&self, request_id: &str) -> Result<bool, LedgerError> {
        self.read(|c| {
            c.query_row(
                "SELECT EXISTS (SELECT 1 FROM calls WHERE request_id = ?1)",
                [request_id],
                |row| row.get(0),
            )
        })
    }
}

impl ReconcileStore for SqliteStore {
    fn reconcile_windows(
        &self,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Option<WindowsRead>, LedgerError> {
        self.read(|c| reconcile::read_windows(c, since_ms, until_ms))
    }

    fn unmetered_totals(&self) -> Result<Vec<(String, i64)>, LedgerError> {
        self.read(reconcile::unmetered_totals)
    }

    fn latest_balances(&self, credit_types: &[&str]) -> Result<Vec<LatestBalance>, LedgerError> {
        self.read(|c| reconcile::latest_balances(c, credit_types))
    }

    fn outside_totals(&self) -> Result<Vec<(String, i64)>, LedgerError> {
        self.read(reconcile::outside_totals)
    }
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn spool_base(&self) -> &Path {
        &self.path
    }

    fn install_secret(&self) -> Result<Vec<u8>, LedgerError> {
        let conn = crate::open_for_write(&self.path, self.synchronous)?;
        crate::install_secret(&conn)
    }

    fn call_sink(&self, options: &SinkOptions) -> Result<Box<dyn CallSink>, LedgerError> {
        let conn = crate::open_for_write(&self.path, self.synchronous)?;
        Ok(Box::new(SqliteSink::new(
            conn,
            self.path.clone(),
            self.synchronous,
            options.clone(),
        )?))
    }

    fn spawn_retention(&self, keep: Duration) -> Result<Retention, LedgerError> {
        Retention::spawn(self.path.clone(), self.synchronous, keep)
    }

    fn prune(
        &self,
        cutoff_ms: i64,
        batch: usize,
        pause: Duration,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<PruneOutcome, LedgerError> {
        let mut conn = crate::open_for_write(&self.path, self.synchronous)?;
        Ok(maintenance::prune(
            &mut conn, cutoff_ms, batch, pause, stop,
        )?)
    }
}

/// The writer's own WAL auto-checkpoint, a backstop only: the checkpointer thread keeps the
/// WAL far below it. (SQLite's default, 1000 pages, put a checkpoint with its fsyncs inside
/// a call's commit every few thousand rows: the 5–10 ms commits behind the p99.9.)
const WRITER_AUTOCHECKPOINT_PAGES: i64 = 16_000;

/// How often the checkpointer copies the WAL into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);

/// The writer's sink on a SQLite file: one write connection, a cached prepared INSERT, and
/// the checkpointer thread (stopped when the sink is dropped).
pub struct SqliteSink {
    conn: Option<Connection>,
    /// (device, inode) of the file the connection has open.
    identity: Option<FileId>,
    path: PathBuf,
    synchronous: Synchronous,
    options: SinkOptions,
    _checkpointer: Checkpointer,
}

impl SqliteSink {
    /// A sink on `conn`, an opened and migrated write connection to the ledger at `path`.
    pub fn new(
        conn: Connection,
        path: PathBuf,
        synchronous: Synchronous,
        options: SinkOptions,
    ) -> Result<SqliteSink, LedgerError> {
        conn.busy_timeout(options.busy_timeout)?;
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)?;
        let checkpointer = Checkpointer::spawn(path.clone()).map_err(LedgerError::Thread)?;
        Ok(SqliteSink {
            conn: Some(conn),
            identity: file_identity(&path),
            path,
            synchronous,
            options,
            _checkpointer: checkpointer,
        })
    }
}

impl CallSink for SqliteSink {
    fn commit(&mut self, rows: Rows<'_>) -> Result<(), LedgerError> {
        if file_identity(&self.path) != self.identity {
            // Deleted or replaced under us: writing on would commit into a file nobody can see.
            self.conn = None;
            return Err(LedgerError::Replaced {
                path: self.path.clone(),
            });
        }
        let conn = self.conn.as_mut().ok_or(LedgerError::NotOpen)?;
        insert_rows(conn, rows.iter())?;
        Ok(())
    }

    fn is_open(&self) -> bool {
        self.conn.is_some()
    }

    fn needs_reopen(&self) -> bool {
        self.conn.is_none() || file_identity(&self.path) != self.identity
    }

    fn reopen(&mut self) -> Result<(), LedgerError> {
        self.conn = None;
        let conn = crate::open_for_write(&self.path, self.synchronous)?;
        conn.busy_timeout(self.options.busy_timeout)?;
        // A recreated file gets the same install secret, so key fingerprints stay comparable.
        conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('install_secret', ?1)",
            [&self.options.secret],
        )?;
        self.identity = file_identity(&self.path);
        self.conn = Some(conn);
        tracing::warn!(path = %self.path.display(), "ledger reopened");
        Ok(())
    }

    fn recovered(&mut self) -> Result<(), LedgerError> {
        // Hold changes the ledger refused meanwhile (see `Guard::place_hold`).
        match &self.conn {
            Some(conn) => guardrails::replay_hold_spool(conn, &self.path).map(|_| ()),
            None => Err(LedgerError::NotOpen),
        }
    }
}

/// Inserts `rows` in one IMMEDIATE transaction with the cached prepared statement.
pub fn insert_rows<'a>(
    conn: &mut Connection,
    rows: impl Iterator<Item = &'a CallRecord>,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut stmt = tx.prepare_cached(INSERT_SQL)?;
        for r in rows {
            let inserted = stmt.execute(params![
                r.request_id,
                r.started_at,
                r.finished_at,
                r.method,
                r.path,
                r.endpoint,
                r.status,
                r.outcome.as_str(),
                r.table_name,
                r.workflow,
                r.tags,
                r.key_fp,
                r.credits_milli(),
                r.lead_milli,
                r.direct_dial_milli,
                r.export_milli,
                r.credit_source,
                r.records_requested,
                r.records_matched,
                r.catalog_version,
                r.upstream_ms,
                r.request_bytes,
                r.response_bytes,
                r.error,
                r.id_kinds,
                r.settles,
                r.deferred,
                r.deferred_milli,
            ])?;
            // A replayed row (ignored above) already has its identifiers.
            if inserted == 1 && !r.identifiers.is_empty() {
                crate::identifiers::insert(&tx, tx.last_insert_rowid(), r)?;
            }
        }
    }
    tx.commit()
}

// `INSERT OR IGNORE`: a replayed row (same request_id) is never doubled, and a second
// settlement of one call (same `settles`) is never stored.
const INSERT_SQL: &str = "INSERT OR IGNORE INTO calls (
    request_id, started_at, finished_at, method, path, endpoint, status, outcome,
    table_name, workflow, tags, key_fp, credits_milli, lead_milli, direct_dial_milli,
    export_milli, credit_source, records_requested, records_matched, catalog_version,
    upstream_ms, request_bytes, response_bytes, error, id_kinds, settles, deferred,
    deferred_milli
) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
          ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28)";

/// Checkpoints the WAL on its own thread and connection, so that no call's commit waits for
/// one. `PASSIVE` never blocks the writer: it copies what it can and leaves the rest for the
/// next round.
struct Checkpointer {
    stop: Option<mpsc::Sender<()>>,
    join: Option<JoinHandle<()>>,
}

impl Checkpointer {
    fn spawn(path: PathBuf) -> std::io::Result<Checkpointer> {
        let (stop, stopped) = mpsc::channel::<()>();
        let join = std::thread::Builder::new()
            .name("ledger-checkpoint".into())
            .spawn(move || {
                let mut conn: Option<(Connection, Option<FileId>)> = None;
                while let Err(mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_INTERVAL)
                {
                    // The writer may have recreated a deleted ledger: follow it.
                    let identity = file_identity(&path);
                    if conn.as_ref().is_some_and(|(_, id)| *id != identity) {
                        conn = None;
                    }
                    if conn.is_none() && identity.is_some() {
                        conn = Connection::open_with_flags(
                            &path,
                            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                                | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                        )
                        .ok()
                        .map(|c| (c, identity));
                    }
                    if let Some((c, _)) = &conn {
                        let result: rusqlite::Result<(i64, i64, i64)> =
                            c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                            });
                        if let Err(e) = result {
                            // A full disk or a vanished file: the writer reports those itself.
                            tracing::debug!(error = %e, "background WAL checkpoint failed");
                            conn = None;
                        }
                    }
                }
            })?;
        Ok(Checkpointer {
            stop: Some(stop),
            join: Some(join),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
    }
}

/// (device, inode) of the ledger file, to notice it being deleted or replaced.
type FileId = (u64, u64);

#[cfg(unix)]
fn file_identity(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_identity(path: &Path) -> Option<FileId> {
    std::fs::metadata(path).ok().map(|_| (0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::bench_row;

    fn calls(store: &SqliteStore) -> i64 {
        store
            .read(|c| c.query_row("SELECT count(*) FROM calls", [], |r| r.get(0)))
            .unwrap()
    }

    fn remove_ledger(path: &Path) {
        for ext in ["", "-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(ext);
            let _ = std::fs::remove_file(PathBuf::from(p));
        }
    }

    fn sink(store: &SqliteStore, secret: Vec<u8>) -> Box<dyn CallSink> {
        store
            .call_sink(&SinkOptions {
                busy_timeout: Duration::from_secs(5),
                secret,
            })
            .unwrap()
    }

    #[test]
    fn a_batch_is_committed_once_however_often_it_is_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("l.db"), Synchronous::Normal).unwrap();
        let mut sink = sink(&store, store.install_secret().unwrap());
        let rows = [bench_row(1), bench_row(2), bench_row(1)];
        sink.commit(Rows::owned(&rows)).unwrap();
        sink.commit(Rows::owned(&rows[..2])).unwrap();
        assert_eq!(calls(&store), 2, "a request_id is stored once");
        let mut settle = [bench_row(3), bench_row(4)];
        for (i, s) in settle.iter_mut().enumerate() {
            s.settles = Some("call-a".into());
            s.request_id = format!("settlement-{i}");
        }
        sink.commit(Rows::owned(&settle)).unwrap();
        assert_eq!(calls(&store), 3, "a call is settled once");
    }

    #[test]
    fn readers_and_the_sink_follow_a_replaced_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let store = SqliteStore::open(&path, Synchronous::Normal).unwrap();
        let mut sink = sink(&store, store.install_secret().unwrap());
        sink.commit(Rows::owned(&[bench_row(1)])).unwrap();
        assert_eq!(calls(&store), 1);

        // Someone replaces the file with another ledger holding two other rows.
        drop(sink);
        remove_ledger(&path);
        let other = SqliteStore::open(&path, Synchronous::Normal).unwrap();
        let mut other_sink = Store::call_sink(
            &other,
            &SinkOptions {
                busy_timeout: Duration::from_secs(5),
                secret: vec![7; 32],
            },
        )
        .unwrap();
        other_sink
            .commit(Rows::owned(&[bench_row(2), bench_row(3)]))
            .unwrap();
        drop(other_sink);
        assert_eq!(
            calls(&store),
            2,
            "a pooled reader does not read the old file"
        );
    }

    #[test]
    fn a_deleted_file_is_refused_then_recreated_with_the_same_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let store = SqliteStore::open(&path, Synchronous::Normal).unwrap();
        let secret = store.install_secret().unwrap();
        let mut sink = sink(&store, secret.clone());
        assert!(sink.is_open() && !sink.needs_reopen());
        remove_ledger(&path);
        assert!(sink.needs_reopen());
        let err = sink.commit(Rows::owned(&[bench_row(1)])).unwrap_err();
        assert!(
            matches!(err, LedgerError::Replaced { .. }),
            "a commit into a deleted file is refused: {err}"
        );
        assert!(!sink.is_open());
        sink.reopen().unwrap();
        sink.commit(Rows::owned(&[bench_row(1)])).unwrap();
        assert_eq!(calls(&store), 1);
        assert_eq!(
            store.install_secret().unwrap(),
            secret,
            "key_fp stays comparable"
        );
    }
}
