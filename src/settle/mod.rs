//! Deferred charges: what Apollo bills after a call's answer, learned and recorded once.
//!
//! Phone reveals and waterfalls on people/match and people/bulk_match are billed when Apollo's
//! asynchronous job ends. The call's own row records the synchronous part and, in `deferred`,
//! what is still to come (see `catalog::Deferred`). The [`Book`] holds those pending charges
//! in memory, keyed by the call's `request_id`, with Apollo's job id, the worst case (still
//! reserved in budgets, through a [`PendingCharge`]), the estimate and the deadline
//! (`started_at + settle.max_wait`).
//!
//! A pending charge settles exactly once, whichever comes first:
//! - the [`Settler`] polls `GET /api/v1/webhook_result/{job_id}` itself ([`poller`]);
//! - a caller polls that path through the proxy: the meter hands every 2xx answer of the
//!   `webhook_result` endpoint to [`Book::observe_result`] (the caller's answer is untouched);
//! - the deadline passes, the result is unknown or expired, or settlement is off: the estimate.
//!
//! Settling takes the charge out of the book under its lock, so a second path finds nothing to
//! do; the row goes to the ledger as a settlement (`outcome = 'settlement'`, `settles` = the
//! call's `request_id`, the call's attribution and `started_at`), its credits are counted in
//! `creditmeter_credits_total` with the call's labels, and its reservation is released with the
//! actual amount. The ledger's partial unique index on `settles` stores it at most once even if
//! a spool replays. At start-up [`store::pending`] rebuilds the book from the ledger (rows with
//! `deferred` and no settlement) and the guard reserves their worst cases again.

pub mod poller;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use crate::catalog::{Credits, Deferred, SettlementSource, Units};
use crate::guard::{Amount, PendingCharge};
use crate::ledger::{CallRecord, LedgerHandle, Outcome};
use crate::meter::{now_ms, RequestIds};
use crate::metrics::Metrics;
use crate::settings::SettingsCell;

pub use poller::Settler;

/// `calls.workflow` of creditmeter's own `webhook_result` polls (table `_creditmeter`).
pub const SETTLE_WORKFLOW: &str = "settle";
/// Where job results are polled, under the upstream base URL; the job id follows.
pub const RESULT_PATH: &str = "/api/v1/webhook_result/";
/// Every `result` label of `creditmeter_settlements_total`.
pub const SETTLEMENT_RESULTS: [&str; 3] = ["reported", "catalog", "estimated"];

pub use crate::meter::Original;

impl Original {
    fn units(&self) -> Units {
        Units {
            requested: self.records_requested,
            matched: self.records_matched,
        }
    }
}

/// One charge waiting for its job's result.
struct Pending {
    original: Original,
    deferred: Deferred,
    /// Unix ms: past it, the estimate is recorded.
    deadline: i64,
    /// Unix ms: the next poll.
    next_poll: i64,
    /// Failed polls in a row, for the back-off.
    failures: u32,
    reservation: Option<PendingCharge>,
}

/// Pending charges, and how each one settles. Shared by the meter (registration, callers'
/// results) and the [`Settler`] task (polls, deadlines).
pub struct Book {
    pending: Mutex<HashMap<String, Pending>>,
    /// Woken when a charge is added, so the settler re-plans its sleep.
    wake: Notify,
    ledger: LedgerHandle,
    metrics: Arc<Metrics>,
    /// The catalog in force prices results (it follows reloads).
    settings: Arc<SettingsCell>,
    ids: RequestIds,
    /// False when `[settle]` is off: every charge settles at once at its estimate.
    polling: bool,
    first_poll_ms: i64,
    max_wait_ms: i64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

impl Book {
    /// An empty book. With `polling` false (settlement off), charges settle at their estimate
    /// as soon as they are registered.
    pub fn new(
        ledger: LedgerHandle,
        metrics: Arc<Metrics>,
        settings: Arc<SettingsCell>,
        polling: bool,
        first_poll: std::time::Duration,
        max_wait: std::time::Duration,
    ) -> Book {
        metrics.init_settle(&SETTLEMENT_RESULTS, &poller::POLL_RESULTS);
        metrics.set_credits_pending(0);
        Book {
            pending: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            ledger,
            metrics,
            settings,
            ids: RequestIds::new(),
            polling,
            first_poll_ms: ms(first_poll),
            max_wait_ms: ms(max_wait),
        }
    }

    /// Whether results are polled (`[settle]` on).
    pub fn polling(&self) -> bool {
        self.polling
    }

    /// Charges waiting for their result.
    pub fn len(&self) -> usize {
        lock(&self.pending).len()
    }

    /// True when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds the deferred charge of a call whose row was just handed to the ledger. It settles
    /// at once at its estimate when settlement is off or the answer named no job to poll.
    pub fn register(
        &self,
        original: Original,
        deferred: Deferred,
        reservation: Option<PendingCharge>,
    ) {
        let deadline = original.started_at.saturating_add(self.max_wait_ms);
        let mut p = Pending {
            next_poll: original.started_at.saturating_add(self.first_poll_ms),
            original,
            deferred,
            deadline,
            failures: 0,
            reservation,
        };
        // Only an integer ever goes into the polled path (a ledger row may have been edited).
        if p.deferred
            .job_id
            .as_deref()
            .is_some_and(|j| j.parse::<i64>().is_err())
        {
            p.deferred.job_id = None;
        }
        if !self.polling {
            let why =
                "settlement is off ([settle] has no key), so the catalog's estimate is recorded"
                    .to_owned();
            return self.settle_estimated(p, why);
        }
        if p.deferred.job_id.is_none() {
            let why = match p.deferred.note.take() {
                Some(n) => format!("{n}; the catalog's worst case is recorded"),
                None => "the answer named no job (request_id) to poll, so the catalog's estimate is recorded".to_owned(),
            };
            return self.settle_estimated(p, why);
        }
        {
            let mut book = lock(&self.pending);
            book.insert(p.original.request_id.clone(), p);
            self.publish(&book);
        }
        self.wake.notify_one();
    }

    /// A 2xx answer of the `webhook_result` endpoint (decoded body), whoever polled it: settles
    /// the charge whose job it names, if that is still pending. A body that cannot be priced
    /// leaves the charge pending (creditmeter's own poll will learn it). Returns true when it
    /// settled a charge.
    pub fn observe_result(&self, path: &str, body: &[u8]) -> bool {
        let job = crate::catalog::Catalog::result_job_id(body).or_else(|| {
            let last = path.rsplit('/').find(|s| !s.is_empty())?;
            last.parse::<i64>().ok().map(|id| id.to_string())
        });
        let Some(job) = job else {
            return false;
        };
        let found = {
            let mut book = lock(&self.pending);
            let id = book
                .iter()
                .find(|(_, p)| p.deferred.job_id.as_deref() == Some(job.as_str()))
                .map(|(id, _)| id.clone());
            let priced = id.and_then(|id| {
                let p = book.get(&id)?;
                let priced = self.price(p, body).filter(|r| r.is_ok())?;
                Some((id, priced))
            });
            let taken = priced.and_then(|(id, r)| Some((book.remove(&id)?, r)));
            self.publish(&book);
            taken
        };
        match found {
            Some((p, Ok((credits, source, note)))) => {
                self.settle(p, credits, source, Some(200), note);
                true
            }
            _ => false,
        }
    }

    /// The result of creditmeter's own poll for charge `request_id` (a 200, decoded body):
    /// settles it if still pending, at the estimate when the body cannot be priced.
    fn resolve_polled(&self, request_id: &str, body: &[u8]) {
        let Some(p) = self.take(request_id) else {
            return; // a caller's poll (or the meter's hook) settled it first
        };
        match self.price(&p, body) {
            Some(Ok((credits, source, note))) => self.settle(p, credits, source, Some(200), note),
            Some(Err(e)) => {
                self.settle_estimated(p, format!("Apollo's result could not be read ({e})"))
            }
            None => self.settle_estimated(
                p,
                "the catalog in force has no [endpoint.deferred] for this endpoint".to_owned(),
            ),
        }
    }

    #[allow(clippy::type_complexity)]
    fn price(
        &self,
        p: &Pending,
        body: &[u8],
    ) -> Option<Result<(Credits, SettlementSource, Option<String>), String>> {
        let catalog = self.settings.get().catalog.clone();
        let priced = catalog.price_result(
            &p.original.endpoint,
            &p.deferred.params,
            p.original.units(),
            body,
        )?;
        Some(priced.map(|r| (r.credits, r.source, r.note)))
    }

    /// Takes a charge out of the book (the one path that settles it).
    fn take(&self, request_id: &str) -> Option<Pending> {
        let mut book = lock(&self.pending);
        let p = book.remove(request_id);
        self.publish(&book);
        p
    }

    /// Settles a charge at its estimate, saying why in the row's `error`.
    fn settle_estimated(&self, p: Pending, why: String) {
        let credits = Credits::from(p.deferred.estimate);
        self.settle(p, credits, SettlementSource::Estimated, None, Some(why));
    }

    /// Settles a pending charge by `request_id` at its estimate (a terminal answer).
    fn settle_terminal(&self, request_id: &str, why: String) {
        if let Some(p) = self.take(request_id) {
            self.settle_estimated(p, why);
        }
    }

    /// Writes the settlement row, counts it, and releases the reservation with its amount.
    fn settle(
        &self,
        p: Pending,
        credits: Credits,
        source: SettlementSource,
        status: Option<u16>,
        note: Option<String>,
    ) {
        let o = p.original;
        let catalog_version = self.settings.get().catalog.version().to_owned();
        let row = CallRecord {
            request_id: self.ids.next(),
            started_at: o.started_at,
            finished_at: now_ms(),
            method: o.method,
            path: o.path,
            endpoint: o.endpoint,
            status,
            outcome: Outcome::Settlement,
            table_name: o.table_name,
            workflow: o.workflow,
            tags: o.tags,
            key_fp: o.key_fp,
            lead_milli: credits.lead_milli,
            direct_dial_milli: credits.direct_dial_milli,
            export_milli: credits.export_milli,
            credit_source: source.as_str().into(),
            records_requested: None,
            records_matched: None,
            catalog_version,
            upstream_ms: None,
            request_bytes: 0,
            response_bytes: 0,
            error: note,
            id_kinds: None,
            settles: Some(o.request_id.clone()),
            deferred: None,
            deferred_milli: 0,
        };
        // One line per settlement: debug, or a busy proxy's log is mostly these. Estimates
        // (what a person should look at) are logged at warn by the settler.
        tracing::debug!(
            settles = %o.request_id,
            job_id = p.deferred.job_id.as_deref().unwrap_or(""),
            source = source.as_str(),
            credits = credits.total_milli() as f64 / 1000.0,
            worst = p.deferred.worst_milli() as f64 / 1000.0,
            note = row.error.as_deref().unwrap_or(""),
            "deferred charge settled"
        );
        if let Some(r) = p.reservation {
            r.settle(
                Amount::of(
                    credits.lead_milli,
                    credits.direct_dial_milli,
                    credits.export_milli,
                ),
                &row.request_id,
            );
        }
        self.metrics.observe_call(&row);
        self.metrics.observe_settlement(source.as_str());
        self.ledger.submit(row, false);
    }

    fn publish(&self, book: &HashMap<String, Pending>) {
        let worst: i64 = book.values().map(|p| p.deferred.worst_milli()).sum();
        self.metrics.set_credits_pending(worst);
    }

    /// What the settler must do at `now`: charges past their deadline (taken out), charges due
    /// for a poll (request id, job id), and when to look again.
    fn plan(&self, now: i64) -> Plan {
        let mut book = lock(&self.pending);
        let expired: Vec<String> = book
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        let expired: Vec<Pending> = expired.iter().filter_map(|id| book.remove(id)).collect();
        let mut due: Vec<(i64, String, String)> = book
            .iter()
            .filter(|(_, p)| p.next_poll <= now)
            .filter_map(|(id, p)| Some((p.next_poll, id.clone(), p.deferred.job_id.clone()?)))
            .collect();
        due.sort();
        let next = book
            .values()
            .map(|p| p.next_poll.min(p.deadline))
            .filter(|t| *t > now)
            .min();
        self.publish(&book);
        Plan {
            expired,
            due: due.into_iter().map(|(_, id, job)| (id, job)).collect(),
            next,
        }
    }

    /// Schedules the next poll of a charge (if still pending): `after` ms from now; a failure
    /// also counts towards its back-off. Returns the failures so far.
    fn reschedule(&self, request_id: &str, after_ms: Option<i64>, failed: bool) -> u32 {
        let mut book = lock(&self.pending);
        let Some(p) = book.get_mut(request_id) else {
            return 0;
        };
        if failed {
            p.failures = p.failures.saturating_add(1);
        } else {
            p.failures = 0;
        }
        let wait = after_ms.unwrap_or_else(|| poller::backoff_ms(p.failures));
        p.next_poll = now_ms().saturating_add(wait.max(poller::MIN_POLL_GAP_MS));
        p.failures
    }

    /// Puts back the charges still pending in the ledger at start-up, each reserved again in
    /// the budgets covering its call (see [`crate::guard::Guard::reserve_pending`]).
    pub fn restore(&self, rows: Vec<store::PendingRow>, guard: &Arc<crate::guard::Guard>) {
        let now = now_ms();
        let n = rows.len();
        let mut worst = 0_i64;
        for row in rows {
            let o = &row.original;
            let facts = crate::guard::CallFacts {
                table: o.table_name.clone(),
                workflow: o.workflow.clone(),
                key_fp: o.key_fp.clone(),
                tags: o
                    .tags
                    .as_deref()
                    .and_then(|t| serde_json::from_str(t).ok())
                    .unwrap_or_default(),
            };
            let w = Credits::from(row.deferred.worst);
            worst += w.total_milli();
            let reservation = guard.reserve_pending(
                &o.request_id,
                facts,
                o.started_at,
                Amount::of(w.lead_milli, w.direct_dial_milli, w.export_milli),
                now,
            );
            self.register(row.original, row.deferred, Some(reservation));
        }
        if n > 0 {
            tracing::info!(
                pending = n,
                worst = worst as f64 / 1000.0,
                "settle: deferred charges still pending in the ledger, reserved again in budgets"
            );
        }
    }
}

/// See [`Book::plan`].
struct Plan {
    expired: Vec<Pending>,
    due: Vec<(String, String)>,
    next: Option<i64>,
}

/// The meter hands deferred charges and job results to the book through this seam.
impl crate::meter::Deferrals for Book {
    fn register(&self, original: Original, deferred: Deferred, reservation: Option<PendingCharge>) {
        Book::register(self, original, deferred, reservation);
    }

    fn observe_result(&self, path: &str, body: &[u8]) -> bool {
        Book::observe_result(self, path, body)
    }
}

#[cfg(test)]
mod tests;
