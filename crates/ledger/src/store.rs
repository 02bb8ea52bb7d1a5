//! The store seam: what creditmeter asks of its ledger, whatever keeps it.
//!
//! The server, the spend/timeline/spike reports, the admin API's usage, calls and reconcile
//! answer, the guard (budget rebuild and holds), the settler, the reconcile metrics' seed and
//! `report --reconcile`, and the ledger CLI reach the ledger through these traits, never
//! through a database connection: they hold an `Arc<dyn Store>`, and the writer thread holds a
//! `Box<dyn CallSink>`. Not behind the seam yet (each still opens a connection of its own, and
//! each is the next piece of work before a second backend): the reconcile poller's window
//! settling and its snapshot and poll inserts (`creditmeter::reconcile::{store, calls}`'s
//! `reconcile_pending`, `insert_snapshot`, `insert_poll`; the console's overview and reconcile
//! pages read the windows through [`crate::reconcile`] on a connection too), virtual keys and the audit log ([`crate::keys`],
//! [`crate::audit`], used by `creditmeter::keys`), the waste finder's, FOCUS and raw-calls
//! reports (`creditmeter::report::{repeats, focus, calls}`), and `sim-ledger`'s generator. SQLite ([`crate::sqlite::SqliteStore`]) is the first implementation;
//! Postgres (issue 16, DESIGN.md "Backends") is meant to be the second, added beside it without
//! touching callers.
//!
//! # The traits
//!
//! - [`CallSink`]: the writer's side. One batch of call rows, one transaction, rows already
//!   stored (same `request_id`, or a second settlement of one call) skipped. That is SQLite's
//!   `INSERT OR IGNORE` in one IMMEDIATE transaction, and Postgres's
//!   `INSERT ... ON CONFLICT (request_id) DO NOTHING` in one transaction (or pipeline) per
//!   batch; the spool's exactly-once replay relies on nothing else.
//! - [`Reports`]: read-only queries (`creditmeter report`, `/api/usage`'s spend, `/api/calls`,
//!   the metrics' seed totals).
//! - [`Guardrails`]: the spend budgets rebuild from, and the `holds` table.
//! - [`SettleStore`]: deferred charges still pending.
//! - [`ReconcileStore`]: reconciliation's tables (so far the totals its metrics start from and
//!   the windows its report reads).
//! - [`Store`]: all of the above, plus the install secret, the writer's sink and retention.
//!
//! Local spools (`<ledger>.spool` for call rows, `<ledger>.holds-spool` for hold changes) are
//! not part of a store: they are files beside [`Store::spool_base`], written when the store
//! refuses, and replayed through the store once it takes writes again. A Postgres store keeps
//! them on the replica's own disk the same way.
//!
//! # Why synchronous
//!
//! The traits are blocking and `Send + Sync`. The writer is a thread of its own that blocks on
//! its channel and on each commit; reports run in the CLI or on tokio's blocking pool
//! (`spawn_blocking`); the guard's rebuild runs at start-up and on reload. None of them wants a
//! future, and an async trait would need boxing (`async_trait` or `dyn` futures) on every call.
//! A blocking Postgres client exists (the `postgres` crate, tokio-postgres's blocking wrapper,
//! or a pool of it such as `r2d2_postgres`), so a second implementation fits the same shape;
//! what Postgres adds (LISTEN/NOTIFY for holds and keys, budget reservations with row locks,
//! an install secret shared by replicas) becomes new methods here, each with a SQLite
//! implementation that keeps today's behaviour.
//!
//! # The writer's hot path
//!
//! [`CallSink::commit`] is called once per batch (one dynamic dispatch per group commit, not
//! per row), with the batch borrowed as [`Rows`]: no copy, no allocation, a static iterator.
//!
//! # Adding a table or a query
//!
//! 1. The table: a new entry at the end of `MIGRATIONS` in [`crate::schema`] (the next
//!    `user_version`; never edit an old one). A Postgres store will carry the same migration
//!    in its own dialect under the same version number.
//! 2. The SQL: a function taking a `rusqlite::Connection` in the module that owns the subject
//!    ([`crate::queries`] for reads over `calls` and the rollups, [`crate::guardrails`] for
//!    budgets and holds, or a new module of this crate
//!    for a new subject, such as virtual keys or an audit log). Row types it returns live beside
//!    it and carry no SQL types.
//! 3. The seam: a method on the trait whose callers need it ([`Reports`] for read-only
//!    queries, [`Guardrails`] for admission state, a new small trait for a new subject, added
//!    to [`Store`]'s supertraits), and its implementation in [`crate::sqlite`], which opens
//!    the connection and maps errors ([`crate::sqlite::SqliteStore::read`] for reads,
//!    `write` for short writes off the writer thread).
//! 4. Callers hold an `Arc<dyn Store>` and call the method. Tests of the SQL may keep calling
//!    the function with a connection.
//!
//! Call rows themselves are only ever written through the writer ([`CallSink`]).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::guardrails::{HoldOp, HoldRow, SpendGroup};
use crate::maintenance::{PruneOutcome, Retention};
use crate::queries::{
    Aggregate, CallRow, CallsQuery, Cursor, Filter, GroupBy, SeedTotals, Source, Window,
};
use crate::reconcile::{LatestBalance, WindowsRead};
use crate::{CallRecord, LedgerError};

/// A batch of call rows handed to [`CallSink::commit`], borrowed from the writer: live rows as
/// queued, or a chunk read back from the spool.
#[derive(Clone, Copy)]
pub struct Rows<'a>(RowsInner<'a>);

#[derive(Clone, Copy)]
enum RowsInner<'a> {
    Queued(&'a [crate::writer::Queued]),
    Owned(&'a [CallRecord]),
}

impl<'a> Rows<'a> {
    pub(crate) fn queued(rows: &'a [crate::writer::Queued]) -> Rows<'a> {
        Rows(RowsInner::Queued(rows))
    }

    /// Rows the caller owns (the spool's chunks; tools and tests).
    pub fn owned(rows: &'a [CallRecord]) -> Rows<'a> {
        Rows(RowsInner::Owned(rows))
    }

    pub fn len(&self) -> usize {
        match self.0 {
            RowsInner::Queued(r) => r.len(),
            RowsInner::Owned(r) => r.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows, in the order they came.
    pub fn iter(&self) -> RowsIter<'a> {
        RowsIter { rows: *self, at: 0 }
    }
}

/// The iterator of [`Rows::iter`].
pub struct RowsIter<'a> {
    rows: Rows<'a>,
    at: usize,
}

impl<'a> Iterator for RowsIter<'a> {
    type Item = &'a CallRecord;

    fn next(&mut self) -> Option<&'a CallRecord> {
        let row = match self.rows.0 {
            RowsInner::Queued(r) => r.get(self.at).map(|q| q.row()),
            RowsInner::Owned(r) => r.get(self.at),
        };
        self.at += 1;
        row
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.rows.len().saturating_sub(self.at);
        (left, Some(left))
    }
}

impl ExactSizeIterator for RowsIter<'_> {}

/// The writer thread's connection to the store: it commits batches of call rows.
///
/// The writer owns one sink and calls it from its own thread only. A failed commit makes the
/// writer spool the batch locally and, about once a second, [`CallSink::reopen`] (when
/// [`CallSink::needs_reopen`]) and replay the spool through [`CallSink::commit`].
pub trait CallSink: Send {
    /// Commits `rows` in one transaction. A row whose `request_id` is stored already, or a
    /// settlement of a call that is settled already, is skipped, never doubled: spool replays
    /// and an [`crate::writer::Ack`]'s own spooling rely on it.
    fn commit(&mut self, rows: Rows<'_>) -> Result<(), LedgerError>;

    /// True while the sink has a connection (cheap: the writer asks before every batch).
    fn is_open(&self) -> bool;

    /// True when the connection is gone or points at the wrong place (SQLite: the file was
    /// deleted or replaced), so that [`CallSink::reopen`] must run before the next commit.
    fn needs_reopen(&self) -> bool;

    /// Drops the connection and opens a new one (recreating and migrating the store if it is
    /// gone, with the same install secret).
    fn reopen(&mut self) -> Result<(), LedgerError>;

    /// The store took writes again after refusing them: write what waited elsewhere (hold
    /// changes in the holds spool). Errors are logged by the caller and retried later.
    fn recovered(&mut self) -> Result<(), LedgerError>;
}

/// Read-only queries: reports, the usage API, the metrics' seed. None of them blocks the writer.
pub trait Reports {
    /// All-time totals the metrics counters start from (from the hourly rollups).
    fn seed_totals(&self) -> Result<SeedTotals, LedgerError>;

    /// Spend in `window`, grouped by `by`, optionally bucketed ([`crate::queries::aggregate`]).
    fn aggregate(
        &self,
        by: Option<&GroupBy>,
        window: Window,
        bucket_ms: Option<i64>,
        filter: &Filter,
        source: Source,
    ) -> Result<Aggregate, LedgerError>;

    /// The earliest hour the rollups know of.
    fn first_hour(&self) -> Result<Option<i64>, LedgerError>;

    /// Detail rows started before this may have been deleted by retention.
    fn detail_deleted_before(&self) -> Result<Option<i64>, LedgerError>;

    /// One page of raw rows ([`crate::queries::calls_page`]).
    fn calls_page(&self, q: &CallsQuery) -> Result<(Vec<CallRow>, Option<Cursor>), LedgerError>;
}

/// What budgets and holds keep in the store.
pub trait Guardrails {
    /// Spend of costing calls started at or after `since_ms`, grouped by attribution and minute.
    fn spend_since(&self, since_ms: i64) -> Result<Vec<SpendGroup>, LedgerError>;

    /// [`Guardrails::spend_since`] and the `request_id`s of costing calls started at or after
    /// `ids_since_ms`, read in one snapshot.
    fn spend_snapshot(
        &self,
        since_ms: i64,
        ids_since_ms: Option<i64>,
    ) -> Result<(Vec<SpendGroup>, HashSet<String>), LedgerError>;

    /// Which of `request_ids` are stored as calls.
    fn stored_ids(&self, request_ids: &[&str]) -> Result<HashSet<String>, LedgerError>;

    /// The holds in force, oldest first.
    fn active_holds(&self) -> Result<Vec<HoldRow>, LedgerError>;

    /// The highest hold id given out (0 for none).
    fn max_hold_id(&self) -> Result<i64, LedgerError>;

    /// Writes the hold changes waiting in the holds spool, then `op`. An error leaves both
    /// where they were (the caller spools `op`).
    fn write_hold(&self, op: Option<&HoldOp>) -> Result<(), LedgerError>;
}

/// Reconciliation's tables ([`crate::reconcile`]): so far the totals its metrics start from and
/// the windows its report reads.
pub trait ReconcileStore {
    /// The windows overlapping `[since_ms, until_ms)` and what a report says beside them
    /// ([`crate::reconcile::read_windows`]); `None` when the ledger has no balance tables.
    fn reconcile_windows(
        &self,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Option<WindowsRead>, LedgerError>;

    /// Unmetered credits per stored credit type over all reconciled windows.
    fn unmetered_totals(&self) -> Result<Vec<(String, i64)>, LedgerError>;

    /// The latest balance snapshot of each of `credit_types` that has one, in that order.
    fn latest_balances(&self, credit_types: &[&str]) -> Result<Vec<LatestBalance>, LedgerError>;

    /// Calls outside creditmeter per endpoint over all windows (endpoints with any).
    fn outside_totals(&self) -> Result<Vec<(String, i64)>, LedgerError>;
}

/// A call whose deferred charge has no settlement row yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCall {
    pub request_id: String,
    pub started_at: i64,
    pub method: String,
    pub path: String,
    pub endpoint: String,
    pub table_name: Option<String>,
    pub workflow: Option<String>,
    pub tags: Option<String>,
    pub key_fp: Option<String>,
    pub records_requested: Option<i64>,
    pub records_matched: Option<i64>,
    /// The `deferred` JSON, as stored.
    pub deferred: String,
    /// Its worst case, milli-credits.
    pub deferred_milli: i64,
}

/// What the settler reads back at start-up.
pub trait SettleStore {
    /// Every call with a `deferred` charge and no row that `settles` it, oldest first.
    fn pending_charges(&self) -> Result<Vec<PendingCall>, LedgerError>;

    /// Whether a call with this `request_id` is stored.
    fn is_stored(&self, request_id: &str) -> Result<bool, LedgerError>;
}

/// How the writer's sink is set up ([`Store::call_sink`]).
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// How long a commit waits for a lock held by someone else before the batch is spooled.
    pub busy_timeout: Duration,
    /// The install secret, written back if the store has to be recreated.
    pub secret: Vec<u8>,
}

/// The ledger, whatever keeps it. See the module documentation.
pub trait Store: Reports + Guardrails + SettleStore + ReconcileStore + Send + Sync {
    /// `sqlite` (later `postgres`), for logs.
    fn backend(&self) -> &'static str;

    /// Where local files go: spools are `<spool_base>.spool` and `<spool_base>.holds-spool`
    /// (for SQLite, the ledger file itself).
    fn spool_base(&self) -> &Path;

    /// The install secret used to fingerprint API keys, made once per store.
    fn install_secret(&self) -> Result<Vec<u8>, LedgerError>;

    /// A sink for the writer thread, with its own connection.
    fn call_sink(&self, options: &SinkOptions) -> Result<Box<dyn CallSink>, LedgerError>;

    /// Starts retention: detail rows older than `keep` deleted in small batches, off the hot
    /// path, on a thread of its own.
    fn spawn_retention(&self, keep: Duration) -> Result<Retention, LedgerError>;

    /// One retention pass now (`creditmeter ledger prune`): detail rows started before
    /// `cutoff_ms` deleted in transactions of `batch` rows, `pause` apart, until done or
    /// `stop()` says so. The rollups keep their totals.
    fn prune(
        &self,
        cutoff_ms: i64,
        batch: usize,
        pause: Duration,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<PruneOutcome, LedgerError>;
}

/// A shared store, as callers hold it.
pub type SharedStore = Arc<dyn Store>;
