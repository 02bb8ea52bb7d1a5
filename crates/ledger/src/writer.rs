//! The ledger writer: one named thread owns the store's [`CallSink`] and group-commits rows.
//!
//! It blocks for the first row, drains whatever else is queued (up to `batch_max`), hands the
//! batch to the sink (SQLite: one IMMEDIATE transaction with a cached prepared statement),
//! and then acknowledges every row of the batch. Idle traffic gives single-row commits; load gives big
//! batches. While many calls are on their way ([`GROUP_MIN_EXPECTED`]), a batch also waits
//! until [`GROUP_WAIT`] after the previous commit, since a commit costs about the same for one
//! row as for ten; a quiet proxy never waits. The async side never waits on this thread
//! except through the acknowledgement future, which it polls without blocking.
//!
//! When the store cannot take a batch (SQLite: disk full, a lock held elsewhere past
//! `busy_timeout`, the file deleted, replaced or unwritable), the batch is appended to the
//! spool, a JSON-lines file beside the ledger ([`WriterConfig::spool_base`]), and fsynced; that counts as durable and the rows are acknowledged. While
//! the store refuses, new rows follow them there, and about once a second the writer tries to
//! recover: reopen the store if needed and replay the first chunk. Once it takes writes
//! again, new rows go straight to it and the spool is replayed `batch_max` rows at a time
//! between them (`INSERT OR IGNORE` on the unique `request_id`, so a replay interrupted by a
//! crash is never doubled), with the replayed offset kept in `<ledger>.spool-offset`; so after
//! hours of spooling no call waits for the whole replay, and memory holds one chunk. The spool
//! is removed once replayed. A ballast file kept beside the spool is deleted to make room when
//! the disk is full, so the spool can still be written.
//!
//! A call waits for its acknowledgement at most `commit_timeout` ([`Ack`]): past it (a hung
//! fsync, a stalled disk) the call writes its own row to the spool, under the same lock the
//! writer uses, and its response completes. The writer still holds the row too; whichever copy
//! reaches the store second is ignored.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::sync::oneshot;

use super::{CallRecord, LedgerError};
use crate::store::{CallSink, Rows};
use crate::OnLedgerError;

/// A row could not be committed nor spooled. The row itself was logged in full. `Clone`: one
/// outcome is sent to every row of a batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// The store refused the row and the spool could not be written either.
    #[error("ledger commit failed: cannot write the spool {}: {source}", path.display())]
    Spool {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The row could not be turned into a spool line.
    #[error("ledger commit failed: {0}")]
    Encode(Arc<serde_json::Error>),
    /// Past twice `ledger.commit_timeout`, neither the writer nor the spool had taken the row.
    #[error("ledger commit failed: neither committed nor spooled within ledger.commit_timeout")]
    TimedOut,
    /// The task spooling the row after `ledger.commit_timeout` failed.
    #[error("ledger commit failed: {0}")]
    Rescue(Arc<tokio::task::JoinError>),
}

/// What an [`Ack`] resolves to: `Ok(Ok(()))` once the row is committed or spooled.
pub type AckResult = Result<Result<(), CommitError>, oneshot::error::RecvError>;

/// The acknowledgement a caller may wait for: resolves once the row is committed or spooled.
///
/// Awaited on a tokio runtime, it waits at most `commit_timeout`: then it appends the row to the
/// spool itself (on the blocking pool) and resolves when that is fsynced. If even that takes
/// another `commit_timeout` (the spool's disk hangs too), it gives up waiting, logs the row in
/// full and resolves with an error; the writer still holds the row and commits it if it can.
pub struct Ack {
    rx: oneshot::Receiver<Result<(), CommitError>>,
    rescue: Option<Rescue>,
}

/// What an [`Ack`] needs to spool its row after `commit_timeout`.
struct Rescue {
    handle: LedgerHandle,
    row: Arc<Mutex<Option<Arc<CallRecord>>>>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    job: Option<tokio::task::JoinHandle<Result<(), CommitError>>>,
}

/// The sending half of an [`Ack`]; the writer resolves it.
pub struct AckSender {
    tx: oneshot::Sender<Result<(), CommitError>>,
    /// The row, for the [`Ack`] to spool after `commit_timeout`; set when it is submitted.
    row: Arc<Mutex<Option<Arc<CallRecord>>>>,
}

impl AckSender {
    fn send(self, outcome: Result<(), CommitError>) {
        lock(&self.row).take();
        // The caller may be gone; that is fine.
        let _ = self.tx.send(outcome);
    }
}

impl Ack {
    /// Waits on this thread, without the `commit_timeout` rescue (benchmarks, tools).
    pub fn blocking_recv(self) -> AckResult {
        self.rx.blocking_recv()
    }
}

impl Future for Ack {
    type Output = AckResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<AckResult> {
        let this = &mut *self;
        if let Poll::Ready(r) = Pin::new(&mut this.rx).poll(cx) {
            return Poll::Ready(r);
        }
        let Some(rescue) = this.rescue.as_mut() else {
            return Poll::Pending;
        };
        if let Some(job) = rescue.job.as_mut() {
            if let Poll::Ready(done) = Pin::new(job).poll(cx) {
                return Poll::Ready(Ok(
                    done.unwrap_or_else(|e| Err(CommitError::Rescue(Arc::new(e))))
                ));
            }
        }
        let timeout = rescue.handle.commit_timeout;
        loop {
            let deadline = rescue
                .deadline
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
            if deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            deadline
                .as_mut()
                .reset(tokio::time::Instant::now() + timeout);
            if rescue.job.is_some() {
                let row = lock(&rescue.row).take();
                let what = row
                    .as_deref()
                    .map(|r| r.request_id.clone())
                    .unwrap_or_default();
                tracing::error!(
                    request_id = what,
                    "the ledger did not commit this row, nor could it be spooled, within twice ledger.commit_timeout; the response completes and the writer keeps the row queued"
                );
                return Poll::Ready(Ok(Err(CommitError::TimedOut)));
            }
            // Not handed over yet (still being priced): wait one more period.
            let Some(row) = lock(&rescue.row).clone() else {
                continue;
            };
            let handle = rescue.handle.clone();
            let mut job = tokio::task::spawn_blocking(move || handle.rescue(&row));
            if let Poll::Ready(done) = Pin::new(&mut job).poll(cx) {
                return Poll::Ready(Ok(
                    done.unwrap_or_else(|e| Err(CommitError::Rescue(Arc::new(e))))
                ));
            }
            rescue.job = Some(job);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Metric handles the writer updates.
#[derive(Clone)]
pub struct LedgerMetrics {
    /// `creditmeter_ledger_pending`: rows handed over and not yet committed or spooled.
    pub pending: IntGauge,
    /// `creditmeter_ledger_commit_seconds`: time per group commit.
    pub commit_seconds: Histogram,
    /// `creditmeter_ledger_errors_total`: batches the store refused.
    pub errors: IntCounter,
    /// `creditmeter_ledger_spooled_rows`: rows waiting in the spool for the store to recover.
    pub spooled: IntGauge,
}

/// How the writer is set up. What the store needs (SQLite: `busy_timeout`, the install
/// secret) goes to [`crate::Store::call_sink`] instead.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Where the spool goes: `<spool_base>.spool` ([`crate::Store::spool_base`]; for SQLite,
    /// the ledger file).
    pub spool_base: PathBuf,
    pub batch_max: usize,
    pub on_error: OnLedgerError,
    /// Bytes of ballast kept beside the spool, released when the disk is full (0 = none).
    pub spool_reserve: u64,
    /// The longest an [`Ack`] waits before it spools its row itself (`ledger.commit_timeout`).
    pub commit_timeout: Duration,
    /// Under load, how long after the last commit a batch waits for more rows ([`GROUP_WAIT`]
    /// in the proxy; zero never waits).
    pub group_wait: Duration,
}

impl WriterConfig {
    /// The spool file: `<ledger>.spool`.
    pub fn spool_path(&self) -> PathBuf {
        Self::spool_path_of(&self.spool_base)
    }

    /// The spool file of the ledger at `ledger`.
    pub fn spool_path_of(ledger: &Path) -> PathBuf {
        sibling(ledger, "spool")
    }

    fn reserve_path(&self) -> PathBuf {
        sibling(&self.spool_base, "spool-reserve")
    }
}

fn sibling(path: &Path, ext: &str) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".");
    name.push(ext);
    path.with_file_name(name)
}

enum Msg {
    Row(Queued),
    Close,
}

/// A row handed to the writer, with the acknowledgement its caller waits for.
pub(crate) struct Queued {
    row: Arc<CallRecord>,
    ack: Option<AckSender>,
}

impl Queued {
    pub(crate) fn row(&self) -> &CallRecord {
        &self.row
    }
}

/// State the handles and the writer share.
struct Shared {
    healthy: AtomicBool,
    /// Rows in the spool not yet replayed (mirrors `spool.rows`, read without the lock).
    spooled: AtomicU64,
    /// Calls sent upstream whose rows are not handed over yet (see [`RowExpected`]).
    expected: AtomicUsize,
    /// The spool. The writer appends and replays under this lock; an [`Ack`] past
    /// `commit_timeout` appends its row under it too.
    spool: Mutex<Spool>,
}

/// A call whose row will be submitted soon: counted while it lives, so the writer knows when
/// waiting a moment for more rows will fill a batch (see [`GROUP_WAIT`]). Drop it once the
/// row is submitted.
pub struct RowExpected(Arc<Shared>);

impl Drop for RowExpected {
    fn drop(&mut self) {
        self.0.expected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A cheap, cloneable handle for submitting rows.
#[derive(Clone)]
pub struct LedgerHandle {
    tx: mpsc::Sender<Msg>,
    metrics: LedgerMetrics,
    shared: Arc<Shared>,
    on_error: OnLedgerError,
    commit_timeout: Duration,
}

impl LedgerHandle {
    /// An acknowledgement pair: give the sender to [`LedgerHandle::submit_acked`] with the row.
    pub fn ack_channel(&self) -> (AckSender, Ack) {
        let (tx, rx) = oneshot::channel();
        let row = Arc::new(Mutex::new(None));
        let rescue = tokio::runtime::Handle::try_current().ok().map(|_| Rescue {
            handle: self.clone(),
            row: row.clone(),
            deadline: None,
            job: None,
        });
        (AckSender { tx, row }, Ack { rx, rescue })
    }

    /// Appends `row` to the spool and fsyncs it: an [`Ack`] past `commit_timeout`.
    fn rescue(&self, row: &CallRecord) -> Result<(), CommitError> {
        let mut line = serde_json::to_vec(row).map_err(|e| CommitError::Encode(Arc::new(e)))?;
        line.push(b'\n');
        let mut spool = lock(&self.shared.spool);
        let result = spool.append(&line, 1);
        self.shared.spooled.store(spool.rows, Ordering::Relaxed);
        self.metrics.spooled.set(spool.rows as i64);
        let path = spool.path.display().to_string();
        drop(spool);
        match result {
            Ok(()) => {
                tracing::warn!(
                    request_id = row.request_id,
                    timeout = ?self.commit_timeout,
                    spool = path,
                    "the ledger did not commit this row within ledger.commit_timeout; it is in the spool now, and replayed once the ledger responds"
                );
                Ok(())
            }
            Err(e) => {
                let err = CommitError::Spool {
                    path: PathBuf::from(path),
                    source: Arc::new(e),
                };
                log_lost_row(row, &err.to_string());
                Err(err)
            }
        }
    }

    /// Hands a row to the writer. With `want_ack`, returns a receiver that resolves once the row
    /// is committed (or spooled). Never blocks.
    pub fn submit(&self, row: CallRecord, want_ack: bool) -> Option<Ack> {
        if !want_ack {
            self.submit_acked(row, None);
            return None;
        }
        let (tx, rx) = self.ack_channel();
        self.submit_acked(row, Some(tx));
        Some(rx)
    }

    /// Queues a row; its commit (or spooling) is reported on `ack` when one is given. If the
    /// writer has stopped, the row is logged whole and `ack` is dropped (an error for its
    /// receiver).
    pub fn submit_acked(&self, row: CallRecord, ack: Option<AckSender>) {
        self.metrics.pending.inc();
        let row = Arc::new(row);
        if let Some(a) = &ack {
            *lock(&a.row) = Some(row.clone());
        }
        if let Err(mpsc::SendError(msg)) = self.tx.send(Msg::Row(Queued { row, ack })) {
            self.metrics.pending.dec();
            self.metrics.errors.inc();
            if let Msg::Row(q) = msg {
                log_lost_row(&q.row, "the ledger writer has stopped");
            }
        }
    }

    /// Counts a call whose row will follow; see [`RowExpected`].
    pub fn expect_row(&self) -> RowExpected {
        self.shared.expected.fetch_add(1, Ordering::Relaxed);
        RowExpected(self.shared.clone())
    }

    /// False while the store is refusing writes (rows are being spooled), true once it recovers.
    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    /// Rows waiting in the spool.
    pub fn spooled_rows(&self) -> u64 {
        self.shared.spooled.load(Ordering::Relaxed)
    }

    /// What happens to calls while the store refuses writes.
    pub fn on_error(&self) -> OnLedgerError {
        self.on_error
    }

    /// True when new calls must be refused: the ledger is failing and `on_error = "fail_closed"`.
    pub fn refuse_new_calls(&self) -> bool {
        self.on_error == OnLedgerError::FailClosed && !self.is_healthy()
    }
}

/// The writer thread. [`LedgerWriter::close`] flushes every queued row and joins it.
pub struct LedgerWriter {
    tx: mpsc::Sender<Msg>,
    join: Option<JoinHandle<()>>,
}

impl LedgerWriter {
    /// Starts the writer thread on the store's sink ([`crate::Store::call_sink`]). Rows left
    /// in the spool by an earlier run are replayed first.
    pub fn spawn(
        sink: Box<dyn CallSink>,
        config: WriterConfig,
        metrics: LedgerMetrics,
    ) -> Result<(LedgerWriter, LedgerHandle), LedgerError> {
        let (tx, rx) = mpsc::channel();
        let spool = Spool::open(config.spool_path()).map_err(|source| LedgerError::Spool {
            path: config.spool_path(),
            source,
        })?;
        let shared = Arc::new(Shared {
            healthy: AtomicBool::new(spool.rows == 0),
            spooled: AtomicU64::new(spool.rows),
            expected: AtomicUsize::new(0),
            spool: Mutex::new(spool),
        });
        metrics
            .spooled
            .set(shared.spooled.load(Ordering::Relaxed) as i64);
        let worker = Worker {
            sink,
            rx,
            metrics: metrics.clone(),
            shared: shared.clone(),
            next_recovery: Instant::now(),
            last_commit: Instant::now(),
            last_live: Instant::now(),
            config: config.clone(),
        };
        worker.ensure_reserve();
        let join = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || worker.run())
            .map_err(LedgerError::Thread)?;
        let handle = LedgerHandle {
            tx: tx.clone(),
            metrics,
            shared,
            on_error: config.on_error,
            commit_timeout: config.commit_timeout,
        };
        Ok((
            LedgerWriter {
                tx,
                join: Some(join),
            },
            handle,
        ))
    }

    /// Commits (or spools) everything queued so far, stops the thread and waits for it.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.tx.send(Msg::Close);
        if let Some(join) = self.join.take() {
            if join.join().is_err() {
                tracing::error!("the ledger writer thread panicked");
            }
        }
    }
}

impl Drop for LedgerWriter {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// How often a failing ledger is retried while rows are spooled.
const RECOVERY_INTERVAL: Duration = Duration::from_secs(1);

struct Worker {
    sink: Box<dyn CallSink>,
    rx: mpsc::Receiver<Msg>,
    metrics: LedgerMetrics,
    shared: Arc<Shared>,
    next_recovery: Instant,
    /// When the last batch was committed (or spooled).
    last_commit: Instant,
    /// When live rows last came while the spool was replayed (see [`REPLAY_SHARE`]).
    last_live: Instant,
    config: WriterConfig,
}

/// Under load, a batch waits until this long after the previous commit for more rows
/// (`WriterConfig::group_wait` in the proxy).
///
/// A commit's cost is mostly per transaction (writing the touched pages to the WAL), not per
/// row. Without a wait, a busy proxy's batches were 1–2 rows: the writer kept finishing
/// before the next row came, and took a fifth of the process's CPU (BENCHMARKS.md). The wait
/// applies only while at least [`GROUP_MIN_EXPECTED`] calls are on their way and the writer
/// committed less than this long ago, so a lightly loaded proxy still commits each row at once.
pub const GROUP_WAIT: Duration = Duration::from_millis(1);

/// While live rows come during a replay, spooled rows are replayed `batch_max / REPLAY_SHARE`
/// at a time, so a live row waits behind a short chunk; idle, whole `batch_max` chunks.
const REPLAY_SHARE: usize = 8;

/// Calls on their way (sent upstream, row not yet handed over) that make [`GROUP_WAIT`] worth it.
pub const GROUP_MIN_EXPECTED: usize = 8;

type Batch = Vec<Queued>;

/// Why a batch did not reach the store.
enum WriteFailure {
    /// The store is refusing writes: new rows follow the others into the spool until it
    /// recovers.
    Spooling,
    Store(LedgerError),
}

impl Worker {
    fn run(mut self) {
        let mut batch: Batch = Vec::with_capacity(self.config.batch_max);
        let mut closing = false;
        if self.needs_recovery() {
            self.try_recover();
        }
        loop {
            if !closing {
                // While the ledger is failing, wake up to retry even without traffic; while
                // the spool is replayed, take what has come and replay the next chunk.
                let first = if self.replaying() {
                    match self.rx.try_recv() {
                        Ok(m) => Some(m),
                        Err(mpsc::TryRecvError::Empty) => None,
                        Err(mpsc::TryRecvError::Disconnected) => Some(Msg::Close),
                    }
                } else if self.needs_recovery() {
                    match self.rx.recv_timeout(RECOVERY_INTERVAL) {
                        Ok(m) => Some(m),
                        Err(mpsc::RecvTimeoutError::Timeout) => None,
                        Err(mpsc::RecvTimeoutError::Disconnected) => Some(Msg::Close),
                    }
                } else {
                    Some(self.rx.recv().unwrap_or(Msg::Close))
                };
                match first {
                    Some(Msg::Row(q)) => batch.push(q),
                    Some(Msg::Close) => closing = true,
                    None => {}
                }
            }
            while batch.len() < self.config.batch_max {
                match self.rx.try_recv() {
                    Ok(Msg::Row(q)) => batch.push(q),
                    Ok(Msg::Close) => closing = true,
                    Err(_) => break,
                }
            }
            if !closing && !batch.is_empty() {
                closing = self.gather(&mut batch);
            }
            if self.needs_recovery() {
                if Instant::now() >= self.next_recovery {
                    self.try_recover();
                }
            } else if self.replaying() {
                if !batch.is_empty() {
                    // Live rows first: they have a caller waiting.
                    self.last_live = Instant::now();
                    self.commit_batch(&mut batch);
                }
                self.replay_chunk();
            }
            if batch.is_empty() {
                if closing {
                    break;
                }
                continue;
            }
            self.commit_batch(&mut batch);
        }
        if self.spooled() > 0 {
            self.try_recover();
            while self.replaying() {
                self.replay_chunk();
            }
            if self.spooled() > 0 {
                tracing::warn!(
                    rows = self.spooled(),
                    spool = %self.config.spool_path().display(),
                    "stopping with rows still in the spool; they are replayed at the next start"
                );
            }
        }
    }

    /// Under load, waits until `group_wait` ([`GROUP_WAIT`]) after the last commit for more
    /// rows to join the batch. It sleeps rather than blocking on the queue: a blocked receiver
    /// is woken by every row sent, and those wake-ups cost more than the commits saved.
    /// Returns true if the writer was asked to close meanwhile.
    fn gather(&mut self, batch: &mut Batch) -> bool {
        if batch.len() >= self.config.batch_max
            || self.config.group_wait.is_zero()
            || self.shared.expected.load(Ordering::Relaxed) < GROUP_MIN_EXPECTED
        {
            return false;
        }
        let deadline = self.last_commit + self.config.group_wait;
        if let Some(left) = deadline.checked_duration_since(Instant::now()) {
            std::thread::sleep(left);
        }
        let mut closing = false;
        while batch.len() < self.config.batch_max {
            match self.rx.try_recv() {
                Ok(Msg::Row(q)) => batch.push(q),
                Ok(Msg::Close) => closing = true,
                Err(_) => break,
            }
        }
        closing
    }

    /// The ledger is closed or the last write failed: retry about once a second.
    fn needs_recovery(&self) -> bool {
        !self.sink.is_open() || !self.shared.healthy.load(Ordering::Relaxed)
    }

    /// The store takes writes and rows wait in the spool: replay them between batches.
    fn replaying(&self) -> bool {
        !self.needs_recovery() && self.spooled() > 0
    }

    /// Rows in the spool not yet replayed.
    fn spooled(&self) -> u64 {
        self.shared.spooled.load(Ordering::Relaxed)
    }

    fn spool(&self) -> MutexGuard<'_, Spool> {
        lock(&self.shared.spool)
    }

    fn commit_batch(&mut self, batch: &mut Batch) {
        let n = batch.len() as i64;
        let started = Instant::now();
        let result = if !self.shared.healthy.load(Ordering::Relaxed) {
            Err(WriteFailure::Spooling)
        } else {
            self.sink
                .commit(Rows::queued(batch))
                .map_err(WriteFailure::Store)
        };
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        let outcome = match result {
            Ok(()) => Ok(()),
            Err(failure) => {
                if let WriteFailure::Store(e) = &failure {
                    self.metrics.errors.inc();
                    self.set_healthy(false);
                    self.next_recovery = Instant::now() + RECOVERY_INTERVAL;
                    tracing::error!(
                        error = %e,
                        on_error = self.config.on_error.as_str(),
                        spool = %self.config.spool_path().display(),
                        "ledger write failed; spooling rows until the ledger recovers"
                    );
                }
                self.spool_batch(batch)
            }
        };
        self.metrics.pending.sub(n);
        self.last_commit = Instant::now();
        for q in batch.drain(..) {
            if let Some(ack) = q.ack {
                ack.send(outcome.clone());
            }
        }
    }

    fn spool_batch(&mut self, batch: &Batch) -> Result<(), CommitError> {
        let mut lines = Vec::with_capacity(batch.len() * 512);
        for q in batch {
            if serde_json::to_writer(&mut lines, q.row()).is_ok() {
                lines.push(b'\n');
            }
        }
        let mut spool = self.spool();
        let mut result = spool.append(&lines, batch.len() as u64);
        if matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::StorageFull)
            && self.release_reserve()
        {
            result = spool.append(&lines, batch.len() as u64);
        }
        drop(spool);
        self.publish_spool();
        result.map_err(|e| {
            let err = CommitError::Spool {
                path: self.config.spool_path(),
                source: Arc::new(e),
            };
            let msg = err.to_string();
            for q in batch {
                log_lost_row(q.row(), &msg);
            }
            err
        })
    }

    /// Reopens the ledger if needed and replays the spool's first chunk; once the store takes it,
    /// the ledger is healthy again and the rest is replayed between batches.
    fn try_recover(&mut self) {
        self.next_recovery = Instant::now() + RECOVERY_INTERVAL;
        if self.sink.needs_reopen() {
            match self.sink.reopen() {
                Ok(()) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "ledger still unavailable");
                    return;
                }
            }
        }
        let left = self.spooled();
        if self.replay_one() {
            self.set_healthy(true);
            self.ensure_reserve();
            // Hold changes the ledger refused meanwhile (see `Guard::place_hold`).
            if let Err(e) = self.sink.recovered() {
                tracing::warn!(error = %e, "hold changes stay in the holds spool for now");
            }
            tracing::info!(
                spooled_rows = left,
                "ledger recovered; new rows go to the ledger and the spool is replayed in chunks"
            );
        }
    }

    /// Replays the next chunk of the spool; a failure sends the writer back to recovery.
    fn replay_chunk(&mut self) {
        if !self.replay_one() {
            self.set_healthy(false);
            self.next_recovery = Instant::now() + RECOVERY_INTERVAL;
        }
    }

    /// Commits up to `batch_max` spooled rows in one transaction and moves the replayed offset
    /// past them (removing the spool once all of it is replayed). False if the store refused.
    fn replay_one(&mut self) -> bool {
        // While calls are coming, smaller chunks: a live row waits for at most one of them.
        let max = if self.last_live.elapsed() < Duration::from_secs(1) {
            (self.config.batch_max / REPLAY_SHARE).max(1)
        } else {
            self.config.batch_max
        };
        let chunk = self.spool().read_chunk(max);
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, spool = %self.config.spool_path().display(), "cannot read the spool");
                return false;
            }
        };
        if !chunk.rows.is_empty() {
            if !self.sink.is_open() {
                return false;
            }
            let started = Instant::now();
            if let Err(e) = self.sink.commit(Rows::owned(&chunk.rows)) {
                tracing::debug!(error = %e, "ledger still refusing writes");
                return false;
            }
            self.metrics
                .commit_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        let advanced = self.spool().advance(&chunk);
        if let Err(e) = advanced {
            // The rows are committed; replaying them again is harmless (INSERT OR IGNORE).
            tracing::warn!(error = %e, "cannot record the spool's replayed offset");
        }
        self.publish_spool();
        true
    }

    fn set_healthy(&self, healthy: bool) {
        self.shared.healthy.store(healthy, Ordering::Relaxed);
    }

    fn publish_spool(&self) {
        let rows = self.spool().rows;
        self.shared.spooled.store(rows, Ordering::Relaxed);
        self.metrics.spooled.set(rows as i64);
    }

    /// Keeps `spool_reserve` bytes of ballast beside the spool (best effort).
    fn ensure_reserve(&self) {
        let size = self.config.spool_reserve;
        let path = self.config.reserve_path();
        if size == 0 || std::fs::metadata(&path).is_ok_and(|m| m.len() >= size) {
            return;
        }
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&path)?;
            let chunk = vec![0u8; 64 * 1024];
            let mut left = size;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                f.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&path);
            tracing::warn!(error = %e, path = %path.display(), "cannot create the spool reserve");
        }
    }

    /// Deletes the ballast to make room for the spool. True if there was any.
    fn release_reserve(&self) -> bool {
        let path = self.config.reserve_path();
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::warn!(path = %path.display(), "disk full: released the spool reserve");
                true
            }
            Err(_) => false,
        }
    }
}

/// The append-only spool: one JSON `CallRecord` per line. Rows before `offset` are replayed;
/// the offset is kept in `<spool>-offset` with the spool's identity, so a restart resumes the
/// replay where it stopped (and a stale offset file never skips rows of a newer spool).
struct Spool {
    path: PathBuf,
    offset_path: PathBuf,
    file: Option<File>,
    /// Rows after `offset`.
    rows: u64,
    /// Bytes of the spool already replayed.
    offset: u64,
}

/// One chunk read from the spool: its rows, the lines it covers and where it ends.
struct Chunk {
    rows: Vec<CallRecord>,
    lines: u64,
    end: u64,
}

impl Spool {
    /// Opens (without creating) the spool and counts the rows an earlier run left in it after
    /// the replayed offset.
    fn open(path: PathBuf) -> std::io::Result<Spool> {
        let mut name = path.as_os_str().to_os_string();
        name.push("-offset");
        let offset_path = PathBuf::from(name);
        let mut spool = Spool {
            path,
            offset_path,
            file: None,
            rows: 0,
            offset: 0,
        };
        let f = match File::open(&spool.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(spool),
            Err(e) => return Err(e),
        };
        spool.offset = spool.saved_offset(&f);
        let mut reader = BufReader::new(f);
        reader.seek(SeekFrom::Start(spool.offset))?;
        spool.rows = reader
            .lines()
            .map_while(Result::ok)
            .filter(|l| !l.trim().is_empty())
            .count() as u64;
        Ok(spool)
    }

    /// The offset recorded for this very file (same device and inode), else 0.
    fn saved_offset(&self, f: &File) -> u64 {
        let Ok(text) = std::fs::read_to_string(&self.offset_path) else {
            return 0;
        };
        let mut parts = text.split_whitespace().map(|p| p.parse::<u64>().ok());
        let (Some(Some(dev)), Some(Some(ino)), Some(Some(offset))) =
            (parts.next(), parts.next(), parts.next())
        else {
            return 0;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if open_identity(f) == Some((dev, ino)) && offset <= len {
            offset
        } else {
            0
        }
    }

    /// Appends and fsyncs. Only then are the rows acknowledged.
    fn append(&mut self, lines: &[u8], rows: u64) -> std::io::Result<()> {
        if self.file.is_none() {
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(&self.path)?;
            // A torn last line (a failed append, a crash) must not swallow the next row.
            let len = f.metadata()?.len();
            if len > 0 {
                let mut last = [0u8; 1];
                f.seek(SeekFrom::Start(len - 1))?;
                f.read_exact(&mut last)?;
                if last[0] != b'\n' {
                    f.write_all(b"\n")?;
                }
            }
            self.file = Some(f);
        }
        let Some(f) = self.file.as_mut() else {
            return Err(std::io::Error::other("spool not open"));
        };
        let result = f.write_all(lines).and_then(|()| f.sync_data());
        if result.is_err() {
            // A partial line may have been written; drop the handle so the next append starts
            // on a new line, and let replay skip the torn one.
            self.file = None;
        } else {
            self.rows += rows;
        }
        result
    }

    /// Up to `max` rows after the offset; a torn or corrupt line is logged and skipped.
    fn read_chunk(&self, max: usize) -> std::io::Result<Chunk> {
        let mut chunk = Chunk {
            rows: Vec::new(),
            lines: 0,
            end: self.offset,
        };
        let f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(chunk),
            Err(e) => return Err(e),
        };
        let mut reader = BufReader::new(f);
        reader.seek(SeekFrom::Start(self.offset))?;
        let mut line = Vec::new();
        while chunk.rows.len() < max {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            chunk.end += n as u64;
            let text = String::from_utf8_lossy(&line);
            if text.trim().is_empty() {
                continue;
            }
            chunk.lines += 1;
            match serde_json::from_str::<CallRecord>(&text) {
                Ok(r) => chunk.rows.push(r),
                Err(e) => {
                    tracing::error!(offset = chunk.end - n as u64, error = %e, text = %text, "skipping an unreadable spool line")
                }
            }
        }
        Ok(chunk)
    }

    /// Moves the replayed offset past `chunk`: removes the spool when nothing follows it,
    /// else records the offset.
    fn advance(&mut self, chunk: &Chunk) -> std::io::Result<()> {
        self.offset = chunk.end;
        self.rows = self.rows.saturating_sub(chunk.lines);
        let len = match std::fs::metadata(&self.path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        if self.offset >= len {
            return self.clear();
        }
        let f = File::open(&self.path)?;
        let Some((dev, ino)) = open_identity(&f) else {
            return Ok(());
        };
        let mut tmp = self.offset_path.as_os_str().to_os_string();
        tmp.push(".tmp");
        // No fsync: a lost offset only replays rows again, which INSERT OR IGNORE absorbs.
        std::fs::write(&tmp, format!("{dev} {ino} {}\n", self.offset))?;
        std::fs::rename(&tmp, &self.offset_path)
    }

    /// Every row after the offset, one at a time (for budgets at start-up).
    fn for_each(&self, mut each: impl FnMut(CallRecord)) -> std::io::Result<()> {
        let mut at = Spool {
            path: self.path.clone(),
            offset_path: self.offset_path.clone(),
            file: None,
            rows: 0,
            offset: self.offset,
        };
        loop {
            let chunk = at.read_chunk(1024)?;
            if chunk.end == at.offset {
                return Ok(());
            }
            at.offset = chunk.end;
            chunk.rows.into_iter().for_each(&mut each);
        }
    }

    fn clear(&mut self) -> std::io::Result<()> {
        self.file = None;
        // The offset first: a spool without one is replayed from its start, which is safe; an
        // offset left behind must never apply to a newer spool (it names this file's inode).
        match std::fs::remove_file(&self.offset_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let f = OpenOptions::new()
            .write(true)
            .truncate(true)
            .create(true)
            .open(&self.path)?;
        f.sync_all()?;
        drop(f);
        let _ = std::fs::remove_file(&self.path);
        self.rows = 0;
        self.offset = 0;
        Ok(())
    }
}

/// Calls `each` with every row in `<ledger>.spool` not yet replayed (start-up reads it to
/// count spooled spend in budgets before the writer replays it).
pub fn for_each_spooled(ledger: &Path, each: impl FnMut(CallRecord)) -> std::io::Result<()> {
    Spool::open(sibling(ledger, "spool"))?.for_each(each)
}

/// (device, inode) of an open file.
type FileId = (u64, u64);

#[cfg(unix)]
fn open_identity(f: &File) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    f.metadata().ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn open_identity(f: &File) -> Option<FileId> {
    f.metadata().ok().map(|_| (0, 0))
}

/// A row that could not be stored anywhere is written to the log in full, so it can be
/// recovered by hand.
fn log_lost_row(row: &CallRecord, why: &str) {
    let json = serde_json::to_string(row).unwrap_or_else(|_| row.request_id.clone());
    tracing::error!(reason = why, row = %json, "ledger row NOT committed");
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::fixtures::{bench_metrics, bench_row};

    const WAIT: Duration = Duration::from_millis(400);

    fn start(dir: &Path) -> (LedgerWriter, LedgerHandle, LedgerMetrics) {
        use crate::Store;
        let path = dir.join("ledger.db");
        let store = crate::SqliteStore::open(&path, crate::Synchronous::Normal).unwrap();
        let secret = store.install_secret().unwrap();
        let metrics = bench_metrics().unwrap();
        let sink = store
            .call_sink(&crate::SinkOptions {
                busy_timeout: Duration::from_secs(5),
                secret,
            })
            .unwrap();
        let config = WriterConfig {
            spool_base: path,
            batch_max: 1024,
            on_error: OnLedgerError::Spool,
            spool_reserve: 0,
            group_wait: WAIT,
            commit_timeout: Duration::from_secs(30),
        };
        let (writer, handle) = LedgerWriter::spawn(sink, config, metrics.clone()).unwrap();
        (writer, handle, metrics)
    }

    /// Submits rows `gap` apart as calls do (waiting for the commit), and returns how many
    /// commits they took and how long the slowest one waited for its acknowledgement.
    fn send(
        handle: &LedgerHandle,
        metrics: &LedgerMetrics,
        ids: std::ops::Range<usize>,
        gap: Duration,
    ) -> (u64, Duration) {
        let before = metrics.commit_seconds.get_sample_count();
        let mut acks = Vec::new();
        for i in ids {
            acks.push((Instant::now(), handle.submit(bench_row(i), true).unwrap()));
            std::thread::sleep(gap);
        }
        let mut slowest = Duration::ZERO;
        for (sent, ack) in acks {
            ack.blocking_recv().unwrap().unwrap();
            slowest = slowest.max(sent.elapsed());
        }
        (metrics.commit_seconds.get_sample_count() - before, slowest)
    }

    #[test]
    fn busy_traffic_shares_commits_and_a_quiet_call_never_waits() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, handle, metrics) = start(dir.path());

        // Quiet: no other call on its way, so a row is committed as soon as it comes.
        let (_, slowest) = send(&handle, &metrics, 0..3, Duration::from_millis(5));
        assert!(slowest < WAIT / 2, "a quiet row waited {slowest:?}");

        // Busy: eight calls on their way. Rows arriving 5 ms apart join one commit (two if
        // the first came after the wait), instead of one commit each.
        let on_their_way: Vec<_> = (0..GROUP_MIN_EXPECTED)
            .map(|_| handle.expect_row())
            .collect();
        let (commits, slowest) = send(&handle, &metrics, 3..13, Duration::from_millis(5));
        assert!(commits <= 2, "10 rows took {commits} commits");
        assert!(slowest <= WAIT * 3, "a busy row waited {slowest:?}");

        // Those calls end: back to committing at once.
        drop(on_their_way);
        let (_, slowest) = send(&handle, &metrics, 13..16, Duration::from_millis(5));
        assert!(slowest < WAIT / 2, "a quiet row waited {slowest:?}");

        drop(handle);
        writer.close();
        let conn = rusqlite::Connection::open(dir.path().join("ledger.db")).unwrap();
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 16, "every row committed");
    }

    fn spool_with(dir: &Path, rows: std::ops::Range<usize>) -> PathBuf {
        let path = dir.join("ledger.db.spool");
        let mut text = String::new();
        for i in rows {
            text.push_str(&serde_json::to_string(&bench_row(i)).unwrap());
            text.push('\n');
        }
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_replayed_offset_survives_a_restart_and_never_applies_to_a_newer_spool() {
        let dir = tempfile::tempdir().unwrap();
        let path = spool_with(dir.path(), 0..2500);
        let mut spool = Spool::open(path.clone()).unwrap();
        assert_eq!(spool.rows, 2500);
        let chunk = spool.read_chunk(1000).unwrap();
        assert_eq!(chunk.rows.len(), 1000);
        spool.advance(&chunk).unwrap();
        // A crash here: the next start resumes after the first thousand rows.
        let mut again = Spool::open(path.clone()).unwrap();
        assert_eq!(again.rows, 1500);
        let next = again.read_chunk(1000).unwrap();
        assert!(next.rows[0].request_id.contains(&format!("-{:08x}-", 1000)));
        again.advance(&next).unwrap();
        let last = again.read_chunk(1000).unwrap();
        assert_eq!(last.rows.len(), 500);
        again.advance(&last).unwrap();
        assert_eq!(again.rows, 0);
        assert!(!path.exists() && !again.offset_path.exists(), "cleared");

        // An offset file left beside a different (newer) spool is ignored: nothing skipped.
        let path = spool_with(dir.path(), 0..10);
        std::fs::write(&again.offset_path, "1 2 300\n").unwrap();
        assert_eq!(Spool::open(path).unwrap().rows, 10);
    }

    #[test]
    fn a_torn_last_line_does_not_swallow_the_next_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = spool_with(dir.path(), 0..2);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"request_id\": \"torn").unwrap();
        drop(f);
        let mut spool = Spool::open(path).unwrap();
        let mut line = serde_json::to_vec(&bench_row(7)).unwrap();
        line.push(b'\n');
        spool.append(&line, 1).unwrap();
        let chunk = spool.read_chunk(100).unwrap();
        let seq: Vec<_> = chunk
            .rows
            .iter()
            .map(|r| r.request_id.split('-').nth(2).unwrap().to_owned())
            .collect();
        assert_eq!(
            seq,
            ["00000000", "00000001", "00000007"],
            "the torn line is skipped, the row after it kept"
        );
    }
}
