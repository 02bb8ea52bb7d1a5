//! The ledger writer: one named thread owns the write connection and group-commits rows.
//!
//! It blocks for the first row, drains whatever else is queued (up to `batch_max`), writes the
//! batch in one IMMEDIATE transaction with a cached prepared statement, commits, and then
//! acknowledges every row of the batch. Idle traffic gives single-row commits; load gives big
//! batches; there are no timers. The async side never waits on this thread except through the
//! acknowledgement future, which it polls without blocking.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter, IntGauge};
use rusqlite::{params, Connection};
use tokio::sync::oneshot;

use super::{CallRecord, LedgerError};

/// A row could not be committed. The row itself was logged in full (it is never silently dropped).
#[derive(Debug, Clone, thiserror::Error)]
#[error("ledger commit failed: {0}")]
pub struct CommitError(pub String);

/// The acknowledgement a caller may wait for: `Ok` once the row is committed.
pub type Ack = oneshot::Receiver<Result<(), CommitError>>;

/// Metric handles the writer updates.
#[derive(Clone)]
pub struct LedgerMetrics {
    /// `creditmeter_ledger_pending`: rows handed over and not yet committed.
    pub pending: IntGauge,
    /// `creditmeter_ledger_commit_seconds`: time per group commit.
    pub commit_seconds: Histogram,
    /// `creditmeter_ledger_errors_total`: failed commits.
    pub errors: IntCounter,
}

enum Msg {
    Row(
        Box<CallRecord>,
        Option<oneshot::Sender<Result<(), CommitError>>>,
    ),
    Close,
}

/// A cheap, cloneable handle for submitting rows.
#[derive(Clone)]
pub struct LedgerHandle {
    tx: mpsc::Sender<Msg>,
    metrics: LedgerMetrics,
    healthy: Arc<AtomicBool>,
}

impl LedgerHandle {
    /// Hands a row to the writer. With `want_ack`, returns a receiver that resolves after commit.
    /// Never blocks.
    pub fn submit(&self, row: CallRecord, want_ack: bool) -> Option<Ack> {
        let (ack_tx, ack_rx) = if want_ack {
            let (t, r) = oneshot::channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        self.metrics.pending.inc();
        if let Err(mpsc::SendError(msg)) = self.tx.send(Msg::Row(Box::new(row), ack_tx)) {
            self.metrics.pending.dec();
            self.metrics.errors.inc();
            if let Msg::Row(row, _) = msg {
                log_lost_row(&row, "the ledger writer has stopped");
            }
            return None;
        }
        ack_rx
    }

    /// False after a failed commit, until the next successful one (`/readyz`).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// The writer thread. [`LedgerWriter::close`] flushes every queued row and joins it.
pub struct LedgerWriter {
    tx: mpsc::Sender<Msg>,
    join: Option<JoinHandle<()>>,
}

impl LedgerWriter {
    /// Starts the writer thread on an opened, migrated connection.
    pub fn spawn(
        conn: Connection,
        batch_max: usize,
        metrics: LedgerMetrics,
    ) -> Result<(LedgerWriter, LedgerHandle), LedgerError> {
        let (tx, rx) = mpsc::channel();
        let healthy = Arc::new(AtomicBool::new(true));
        let worker = Worker {
            conn,
            rx,
            batch_max: batch_max.max(1),
            metrics: metrics.clone(),
            healthy: healthy.clone(),
        };
        let join = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || worker.run())
            .map_err(LedgerError::Thread)?;
        let handle = LedgerHandle {
            tx: tx.clone(),
            metrics,
            healthy,
        };
        Ok((
            LedgerWriter {
                tx,
                join: Some(join),
            },
            handle,
        ))
    }

    /// Commits everything queued so far, stops the thread and waits for it.
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

struct Worker {
    conn: Connection,
    rx: mpsc::Receiver<Msg>,
    batch_max: usize,
    metrics: LedgerMetrics,
    healthy: Arc<AtomicBool>,
}

type Batch = Vec<(
    Box<CallRecord>,
    Option<oneshot::Sender<Result<(), CommitError>>>,
)>;

impl Worker {
    fn run(mut self) {
        let mut batch: Batch = Vec::with_capacity(self.batch_max);
        let mut closing = false;
        loop {
            // Block for the first row unless closing, then take what else is queued.
            if !closing {
                match self.rx.recv() {
                    Ok(Msg::Row(r, a)) => batch.push((r, a)),
                    Ok(Msg::Close) => closing = true,
                    Err(_) => closing = true,
                }
            }
            while batch.len() < self.batch_max {
                match self.rx.try_recv() {
                    Ok(Msg::Row(r, a)) => batch.push((r, a)),
                    Ok(Msg::Close) => closing = true,
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                if closing {
                    break;
                }
                continue;
            }
            self.commit_batch(&mut batch);
        }
    }

    fn commit_batch(&mut self, batch: &mut Batch) {
        let n = batch.len() as i64;
        let started = Instant::now();
        let mut result = self.write(batch);
        // A locked or briefly unavailable file: retry a few times before giving up on the batch.
        for delay_ms in [20u64, 100, 500] {
            if result.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(delay_ms));
            result = self.write(batch);
        }
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.pending.sub(n);
        let outcome = match result {
            Ok(()) => {
                self.healthy.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.healthy.store(false, Ordering::Relaxed);
                self.metrics.errors.inc();
                let msg = e.to_string();
                for (row, _) in batch.iter() {
                    log_lost_row(row, &msg);
                }
                Err(CommitError(msg))
            }
        };
        for (_, ack) in batch.drain(..) {
            if let Some(ack) = ack {
                // The caller may be gone; that is fine.
                let _ = ack.send(outcome.clone());
            }
        }
    }

    fn write(&mut self, batch: &Batch) -> rusqlite::Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare_cached(INSERT_SQL)?;
            for (r, _) in batch {
                stmt.execute(params![
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
                ])?;
            }
        }
        tx.commit()
    }
}

// `INSERT OR IGNORE`: a replayed row (same request_id) is never doubled.
const INSERT_SQL: &str = "INSERT OR IGNORE INTO calls (
    request_id, started_at, finished_at, method, path, endpoint, status, outcome,
    table_name, workflow, tags, key_fp, credits_milli, lead_milli, direct_dial_milli,
    export_milli, credit_source, records_requested, records_matched, catalog_version,
    upstream_ms, request_bytes, response_bytes, error, id_kinds
) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
          ?19, ?20, ?21, ?22, ?23, ?24, ?25)";

/// A row that could not be stored is written to the log in full, so it can be recovered by hand.
fn log_lost_row(row: &CallRecord, why: &str) {
    let json = serde_json::to_string(row).unwrap_or_else(|_| row.request_id.clone());
    tracing::error!(reason = why, row = %json, "ledger row NOT committed");
}
