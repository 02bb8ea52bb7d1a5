//! Guardrails: budgets that hold under concurrency and restarts, and holds (emergency stops).
//!
//! Flow of one call: after attribution and classification the proxy asks [`Guard::admit`].
//! Under one lock it checks the holds, then reserves the call's worst-case cost (from the
//! catalog; `guard.unknown_cost_ceiling` when it has none) against every budget whose scope
//! covers the call, all or nothing. A call that would cross a `block` budget, or that a hold
//! covers, is refused before anything goes upstream ([`Refusal`]). An admitted call carries its
//! [`Admission`] inside its `CallMeter`, whose exactly-once finish (end of body, upstream
//! failure, caller gone, or drop) settles it: the reservation is released and the call's actual
//! credits are counted.
//!
//! Because every reservation fits when it is made and a call's actual cost never exceeds the
//! worst case it reserved, `spent + reserved <= limit` holds at every instant, so `spent <=
//! limit` — whatever the concurrency. The one exception is a figure Apollo reports itself
//! (`credits_consumed`) that exceeds the catalog's bound: that overrun is counted, logged, and
//! blocks later calls, but cannot be taken back.
//!
//! A call whose asynchronous job Apollo bills later (a phone reveal, a waterfall) settles in
//! two steps: [`Admission::settle_deferred`] counts its synchronous part and keeps the job's
//! worst case reserved as a [`PendingCharge`], which the settler (`settle`) releases with the
//! amount the job billed. The bound above holds throughout; at start-up
//! [`Guard::reserve_pending`] reserves the charges the ledger still shows pending.
//!
//! Spend is attributed to the window its call *started* in, as the ledger's `started_at` says,
//! so [`Guard::start`] rebuilds each current window from the ledger exactly. Holds are rows of
//! the ledger's `holds` table. [`Guard::reload`] swaps in new budgets and keeps the spend of
//! those that still count the same calls.

/// `[guard]` and `[[budget]]` (they live in `config`, below the guard).
pub use crate::config::budgets as config;
#[cfg(test)]
mod pending_tests;
/// Scopes and call facts (they live in `config`, below the guard).
pub use crate::config::scope;
pub mod state;
#[cfg(test)]
mod tests;
pub mod window;

mod admission;
mod gauges;
mod holds;
mod rebuild;
mod refusal;
mod reload;
mod render;
mod settlement;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

pub use admission::Admission;
pub use config::{Action, BudgetConfig, GuardConfig, WindowSpec};
pub use holds::{Hold, HoldChange, Persisted};
pub use refusal::{BudgetRefusal, Refusal};
pub use reload::ReloadSummary;
pub use scope::{CallFacts, Glob, Scope, ScopeError};
pub use settlement::PendingCharge;
pub use state::Amount;

use crate::ledger::LedgerError;
use crate::metrics::BudgetMetrics;
use admission::BudgetWake;
use state::{Budget, BudgetState};

/// Settled calls remembered for a reload's rebuild: long enough for any row to be committed.
const RECENT_KEEP_MS: i64 = 60_000;
/// ...and at most this many.
const RECENT_MAX: usize = 200_000;
/// How far back a reload looks for `request_id`s of committed calls to tell them from recent
/// settlements: longer than any call lasts (`upstream.timeout` is 2 minutes by default).
const RECENT_STARTED_MS: i64 = 15 * 60_000;

/// Why the guard could not start, reload, or change a hold.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("budget {name:?}: {source}")]
    Budget {
        name: String,
        source: state::BudgetError,
    },
    #[error("hold {id} has an unreadable scope in the ledger: {source}")]
    HoldScope { id: i64, source: ScopeError },
}

fn credits(milli: i64) -> f64 {
    milli as f64 / 1000.0
}

/// A call in flight: what it reserved, and where.
struct InFlight {
    request_id: String,
    facts: CallFacts,
    started_at: i64,
    reserved: Amount,
    /// (budget name, window key) of every reservation.
    charged: Vec<(Arc<str>, i64)>,
}

/// A recently settled, non-free call (see [`Guard::reload`]).
struct Settled {
    at: i64,
    request_id: String,
    facts: CallFacts,
    started_at: i64,
    actual: Amount,
}

struct State {
    ceiling_milli: i64,
    admission_wait: std::time::Duration,
    hold_status: u16,
    budgets: Vec<BudgetState>,
    holds: Vec<Hold>,
    inflight: HashMap<u64, InFlight>,
    next_id: u64,
    recent: VecDeque<Settled>,
    /// Ids in `inflight` that are deferred charges waiting for Apollo's job (see
    /// [`PendingCharge`]): they settle in seconds to hours, so no call waits for them.
    pending: HashSet<u64>,
}

/// Budgets and holds, shared by every call. See the module docs.
pub struct Guard {
    state: Mutex<State>,
    metrics: BudgetMetrics,
    /// The ledger: spend for reloads, hold changes (its holds spool is beside
    /// [`crate::ledger::Store::spool_base`]).
    store: crate::ledger::SharedStore,
    /// Serialises hold changes and reloads (which do ledger I/O outside `state`'s lock).
    writes: Mutex<()>,
    /// Woken whenever reservations are released, for calls waiting on them.
    settled: tokio::sync::Notify,
    /// Per budget: woken when its reservations are released, for the calls it blocks. Only
    /// those wake (a settlement elsewhere does not make a waiting call retry). Taken after
    /// `state`, never before it.
    wakes: Mutex<HashMap<Arc<str>, Arc<BudgetWake>>>,
    /// Admission attempts so far (each takes the state lock): [`Guard::admission_attempts`].
    attempts: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn compile(guard: &GuardConfig, budgets: &[BudgetConfig]) -> Result<Vec<Budget>, GuardError> {
    budgets
        .iter()
        .map(|b| {
            Budget::compile(b, guard).map_err(|source| GuardError::Budget {
                name: b.name.clone(),
                source,
            })
        })
        .collect()
}
