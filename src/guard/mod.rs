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

pub mod client;
pub mod config;
#[cfg(test)]
mod pending_tests;
pub mod scope;
pub mod state;
#[cfg(test)]
mod tests;
pub mod window;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use http::StatusCode;
use serde::Serialize;
use serde_json::{json, Value};

pub use config::{Action, BudgetConfig, GuardConfig, WindowSpec};
pub use scope::{CallFacts, Glob, Scope};
pub use state::Amount;

use crate::catalog::{Catalog, Credits};
use crate::ledger::guardrails::SpendGroup;
use crate::ledger::{LedgerError, Outcome};
use crate::meter::{now_ms, CallContext};
use crate::metrics::BudgetMetrics;
use state::{Budget, BudgetState, Crossing, DIMS};
use window::format_local;

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
    #[error("ledger: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("budget {name:?}: {message}")]
    Budget { name: String, message: String },
    #[error("hold {id} has an unreadable scope in the ledger: {message}")]
    HoldScope { id: i64, message: String },
}

/// A hold in force: calls its scope covers are refused until it is released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub id: i64,
    pub scope: Scope,
    pub reason: Option<String>,
    /// Unix ms.
    pub created_at: i64,
}

impl Hold {
    /// The JSON the admin API and refusals show.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "scope": self.scope,
            "scope_text": self.scope.to_string(),
            "reason": self.reason,
            "created_at": format_local(self.created_at, &jiff::tz::TimeZone::UTC),
            "created_at_ms": self.created_at,
        })
    }
}

/// A call admitted against the budgets. Settle it once with the call's actual cost; dropping it
/// unsettled releases the reservation and counts nothing.
pub struct Admission {
    guard: Arc<Guard>,
    id: u64,
    settled: bool,
}

impl Admission {
    /// Releases the reservation and counts `actual` against every budget it was reserved in.
    pub fn settle(mut self, actual: Amount) {
        self.settled = true;
        self.guard.settle(self.id, actual);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if !self.settled {
            self.guard.settle(self.id, Amount::default());
        }
    }
}

impl Admission {
    /// Settles the synchronous part of a call whose asynchronous job Apollo bills later:
    /// counts `actual`, and keeps `pending` (the job's worst case, within what was reserved)
    /// reserved in the same budgets until the returned charge settles.
    pub fn settle_deferred(mut self, actual: Amount, pending: Amount) -> PendingCharge {
        self.settled = true;
        self.guard.keep_reserved(self.id, actual, pending);
        PendingCharge {
            guard: self.guard.clone(),
            id: self.id,
            settled: false,
        }
    }
}

/// A deferred charge's reservation (see [`Admission::settle_deferred`] and
/// [`Guard::reserve_pending`]): its worst case stays reserved until it settles. Dropping it
/// unsettled (shutdown) releases the reservation and counts nothing; the charge is still
/// pending in the ledger, and is reserved again at the next start.
pub struct PendingCharge {
    guard: Arc<Guard>,
    id: u64,
    settled: bool,
}

impl PendingCharge {
    /// Releases the reservation and counts `actual` (the settlement row's credits, whose
    /// `request_id` is `settlement_id`) in the window of the original call.
    pub fn settle(mut self, actual: Amount, settlement_id: &str) {
        self.settled = true;
        {
            let mut st = lock(&self.guard.state);
            st.pending.remove(&self.id);
            if let Some(call) = st.inflight.get_mut(&self.id) {
                settlement_id.clone_into(&mut call.request_id);
            }
        }
        self.guard.settle(self.id, actual);
    }
}

impl Drop for PendingCharge {
    fn drop(&mut self) {
        if !self.settled {
            lock(&self.guard.state).pending.remove(&self.id);
            self.guard.settle(self.id, Amount::default());
        }
    }
}

/// What deferred charges hold reserved in budget `name`, dimension `dim` (milli).
fn pending_reserved(st: &State, name: &Arc<str>, dim: usize) -> i64 {
    st.pending
        .iter()
        .filter_map(|id| st.inflight.get(id))
        .filter(|call| call.charged.iter().any(|(n, _)| n == name))
        .fold(0_i64, |sum, call| sum.saturating_add(call.reserved.0[dim]))
}

impl std::fmt::Debug for PendingCharge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingCharge")
            .field("id", &self.id)
            .finish()
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").field("id", &self.id).finish()
    }
}

/// The outcome of an admission attempt that did not admit.
enum Blocked {
    Final(Refusal),
    /// Only reservations of calls in flight stand in the way: worth waiting for them, on the
    /// wake of one budget that blocked the call (all must free up, so waking on any one of
    /// them and trying again loses nothing), seen at that epoch.
    Wait(Arc<BudgetWake>, u64),
}

/// Wakes the calls waiting on one budget: `epoch` counts its releases, so a call that reads
/// it before registering can tell a release it would otherwise miss.
struct BudgetWake {
    epoch: std::sync::atomic::AtomicU64,
    notify: tokio::sync::Notify,
}

impl BudgetWake {
    fn wake(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A budget's gauge values, taken under the state lock and set after it is released.
struct Gauges {
    name: Arc<str>,
    /// (credit type, limit, spent, reserved, warned) for each limited type.
    values: Vec<(&'static str, f64, f64, f64, bool)>,
}

/// Why a call was refused.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// A hold covers the call.
    Hold { hold: Box<Hold>, status: u16 },
    /// The call's worst case would cross a `block` budget.
    Budget(Box<BudgetRefusal>),
}

/// The budget that refused a call, and its state at that moment. Credits in milli.
#[derive(Debug, Clone)]
pub struct BudgetRefusal {
    pub budget: String,
    pub window: WindowSpec,
    pub time_zone: String,
    tz: jiff::tz::TimeZone,
    pub credit_type: &'static str,
    pub window_start: Option<i64>,
    pub spent: i64,
    pub reserved: i64,
    pub limit: i64,
    pub requested: i64,
    /// When the call could fit again; `None` when it never can (it asks for more than the
    /// whole limit) or when only calls in flight settling can make room.
    pub resets_at: Option<i64>,
    /// The moment of the refusal (the call's start).
    pub at: i64,
    /// Other block budgets the call would also have crossed.
    pub also: Vec<String>,
}

fn credits(milli: i64) -> f64 {
    milli as f64 / 1000.0
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Hold { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
            Refusal::Budget(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The ledger outcome of the refused call.
    pub fn outcome(&self) -> Outcome {
        match self {
            Refusal::Hold { .. } => Outcome::RejectedHold,
            Refusal::Budget(_) => Outcome::RejectedBudget,
        }
    }

    /// The `error` code in the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Hold { .. } => "held",
            Refusal::Budget(_) => "budget_exhausted",
        }
    }

    /// Seconds until the call could succeed, for `Retry-After`.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Refusal::Hold { .. } => None,
            Refusal::Budget(b) => {
                let wait = b.resets_at? - b.at;
                Some(u64::try_from((wait + 999) / 1000).unwrap_or(0).max(1))
            }
        }
    }

    /// One line for the caller and the ledger's `error` column.
    pub fn message(&self) -> String {
        match self {
            Refusal::Hold { hold, .. } => format!(
                "calls for {} are paused by hold {}{}; lift it with `creditmeter release {}` (DELETE /api/holds/{} on the admin API)",
                describe_scope(&hold.scope),
                hold.id,
                hold.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default(),
                hold.id,
                hold.id,
            ),
            Refusal::Budget(b) => {
                let what = if b.credit_type == "all" {
                    "credits".to_owned()
                } else {
                    format!("{} credits", b.credit_type)
                };
                let left = (b.limit - b.spent - b.reserved).max(0);
                let when = match b.resets_at {
                    _ if b.requested > b.limit => "; this call can never fit: its worst case is more than the whole limit, so split it or raise the limit".to_owned(),
                    Some(t) => format!("; it resets at {}", format_local(t, &b.tz)),
                    None => "; room frees up as calls in flight finish".to_owned(),
                };
                format!(
                    "budget {:?} ({} window) has {} of {} {what} left ({} spent, {} reserved by calls in flight) and this call may cost up to {}{when}",
                    b.budget,
                    b.window,
                    credits(left),
                    credits(b.limit),
                    credits(b.spent),
                    credits(b.reserved),
                    credits(b.requested),
                )
            }
        }
    }

    /// The JSON body of the refusal.
    pub fn body(&self, request_id: &str) -> Value {
        let mut body = json!({
            "error": self.code(),
            "message": self.message(),
            "request_id": request_id,
            "source": "creditmeter",
        });
        match self {
            Refusal::Hold { hold, .. } => body["hold"] = hold.to_json(),
            Refusal::Budget(b) => {
                let fields = json!({
                    "budget": b.budget,
                    "window": b.window,
                    "time_zone": b.time_zone,
                    "window_start": b.window_start.map(|t| format_local(t, &b.tz)),
                    "credit_type": b.credit_type,
                    "spent": credits(b.spent),
                    "reserved": credits(b.reserved),
                    "limit": credits(b.limit),
                    "requested": credits(b.requested),
                    "resets_at": b.resets_at.map(|t| format_local(t, &b.tz)),
                    "retry_after_seconds": self.retry_after_secs(),
                    "also_exhausted": b.also,
                });
                if let (Some(obj), Value::Object(extra)) = (body.as_object_mut(), fields) {
                    obj.extend(extra);
                }
            }
        }
        body
    }
}

fn describe_scope(s: &Scope) -> String {
    if s.is_global() {
        "everything (global hold)".into()
    } else {
        s.to_string()
    }
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
    ledger_path: PathBuf,
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

/// A hold placed or lifted, and where the change was kept.
#[derive(Debug, Clone)]
pub struct HoldChange {
    pub hold: Hold,
    /// False when an identical hold was already in force (nothing changed).
    pub created: bool,
    pub persisted: Persisted,
}

/// Where a hold change was kept. It is in force in memory at once, whatever this says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Persisted {
    /// In the ledger's `holds` table.
    Ledger,
    /// SQLite refused (the reason): kept in `<ledger>.holds-spool`, written to the ledger when
    /// it recovers, and read back at start-up.
    Spool(String),
    /// Neither could be written (the reasons): in force until creditmeter restarts.
    MemoryOnly(String),
}

impl Persisted {
    /// `ledger`, `spool` or `memory`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Persisted::Ledger => "ledger",
            Persisted::Spool(_) => "spool",
            Persisted::MemoryOnly(_) => "memory",
        }
    }

    /// What a person placing the hold should know, when it is not simply in the ledger.
    pub fn message(&self) -> Option<String> {
        match self {
            Persisted::Ledger => None,
            Persisted::Spool(why) => Some(format!(
                "in force now; the ledger refused the write ({why}), so the change is kept in the holds spool beside it and written to the ledger when it recovers (a restart before then reads it back)"
            )),
            Persisted::MemoryOnly(why) => Some(format!(
                "in force now, but recorded nowhere ({why}): it lasts only until creditmeter restarts"
            )),
        }
    }
}

/// What a reload did, by budget name.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct ReloadSummary {
    /// Kept their counted spend (same scope and window; limit, action or warn_at may differ).
    pub kept: Vec<String>,
    /// New, or counting differently: rebuilt from the ledger and the calls in flight.
    pub rebuilt: Vec<String>,
    pub removed: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn compile(guard: &GuardConfig, budgets: &[BudgetConfig]) -> Result<Vec<Budget>, GuardError> {
    budgets
        .iter()
        .map(|b| {
            Budget::compile(b, guard).map_err(|message| GuardError::Budget {
                name: b.name.clone(),
                message,
            })
        })
        .collect()
}

/// Ledger spend as budgets count it.
struct Spend {
    facts: CallFacts,
    started_at: i64,
    actual: Amount,
}

fn spends(groups: Vec<SpendGroup>) -> Vec<Spend> {
    groups
        .into_iter()
        .map(|g| Spend {
            started_at: g.started_at,
            actual: Amount::of(g.lead_milli, g.direct_dial_milli, g.export_milli),
            facts: CallFacts {
                table: g.table_name,
                workflow: g.workflow,
                key_fp: g.key_fp,
                tags: g
                    .tags
                    .as_deref()
                    .and_then(|t| serde_json::from_str(t).ok())
                    .unwrap_or_default(),
            },
        })
        .collect()
}

impl Guard {
    /// Builds the guard at start-up: budgets from config, their current windows rebuilt from
    /// the ledger's `calls`, holds from its `holds` table. `conn` is the server's ledger
    /// connection (migrated); `ledger_path` is where hold changes and reloads go later.
    pub fn start(
        guard: &GuardConfig,
        budgets: &[BudgetConfig],
        conn: &rusqlite::Connection,
        ledger_path: PathBuf,
        metrics: BudgetMetrics,
        now: i64,
    ) -> Result<Guard, GuardError> {
        let defs = compile(guard, budgets)?;
        let mut states: Vec<BudgetState> =
            defs.into_iter().map(|d| BudgetState::new(d, now)).collect();
        if let Some(since) = states.iter().map(|b| b.counts_since(now)).min() {
            let rows = spends(crate::ledger::guardrails::spend_since(conn, since)?);
            for b in &mut states {
                count_rows(b, &rows);
            }
        }
        let mut holds = Vec::new();
        for row in crate::ledger::guardrails::active_holds(conn)? {
            let scope = serde_json::from_str::<Value>(&row.scope)
                .map_err(|e| e.to_string())
                .and_then(|v| config::scope_from_json(&v))
                .map_err(|message| GuardError::HoldScope {
                    id: row.id,
                    message,
                })?;
            holds.push(Hold {
                id: row.id,
                scope,
                reason: row.reason,
                created_at: row.created_at,
            });
        }
        apply_spooled_holds(&mut holds, conn, &ledger_path)?;
        crate::ledger::guardrails::ensure_holds_reserve(&ledger_path);
        let g = Guard {
            state: Mutex::new(State {
                ceiling_milli: guard.unknown_cost_ceiling.0,
                admission_wait: guard.admission_wait.0,
                hold_status: guard.hold_status,
                budgets: states,
                holds,
                inflight: HashMap::new(),
                next_id: 1,
                recent: VecDeque::new(),
                pending: HashSet::new(),
            }),
            metrics,
            ledger_path,
            writes: Mutex::new(()),
            settled: tokio::sync::Notify::new(),
            wakes: Mutex::new(HashMap::new()),
            attempts: std::sync::atomic::AtomicU64::new(0),
        };
        {
            let mut st = lock(&g.state);
            for b in &mut st.budgets {
                b.roll(now);
                let spent = b.spent();
                for d in b.newly_warned() {
                    tracing::warn!(
                        budget = %b.def.name,
                        credit_type = DIMS[d],
                        spent = credits(spent.0[d]),
                        limit = b.def.limits[d].map(credits),
                        warn_at = b.def.warn_at,
                        "budget is past its warn_at threshold at start-up"
                    );
                }
                tracing::info!(
                    budget = %b.def.name,
                    scope = %b.def.scope,
                    window = %b.def.window,
                    action = b.def.action.as_str(),
                    spent = credits(b.spent().0[0]),
                    "budget in force; spend in the current window rebuilt from the ledger"
                );
            }
            for h in &st.holds {
                tracing::warn!(hold = h.id, scope = %h.scope, reason = h.reason.as_deref().unwrap_or(""), "hold in force (from the ledger)");
            }
            g.publish_locked(&mut st, now);
        }
        Ok(g)
    }

    /// Counts, in the budgets' current windows, the spend of rows an outage left in
    /// `<ledger>.spool` that `conn` (the ledger) does not hold yet. Start-up calls it after
    /// [`Guard::start`] and before serving: the writer replays the spool only later, and
    /// without this the spend of the outage would be forgotten by every budget. Returns the
    /// rows counted.
    pub fn count_spooled(&self, conn: &rusqlite::Connection, now: i64) -> Result<u64, GuardError> {
        let since = lock(&self.state)
            .budgets
            .iter()
            .map(|b| b.counts_since(now))
            .min();
        let Some(since) = since else {
            return Ok(0);
        };
        let mut found: Vec<(String, Spend)> = Vec::new();
        crate::ledger::writer::for_each_spooled(&self.ledger_path, |r| {
            let actual = Amount::of(r.lead_milli, r.direct_dial_milli, r.export_milli);
            if r.started_at >= since && !actual.is_zero() {
                let facts = CallFacts {
                    tags: r
                        .tags
                        .as_deref()
                        .and_then(|t| serde_json::from_str(t).ok())
                        .unwrap_or_default(),
                    table: r.table_name,
                    workflow: r.workflow,
                    key_fp: r.key_fp,
                };
                let spend = Spend {
                    facts,
                    started_at: r.started_at,
                    actual,
                };
                found.push((r.request_id, spend));
            }
        })
        .map_err(|source| LedgerError::Spool {
            path: self.ledger_path.clone(),
            source,
        })?;
        // A row may be spooled twice (queued, and spooled by its caller past commit_timeout),
        // or already committed (a replay cut short): count each call once, and only if the
        // ledger does not count it already.
        let mut stmt = conn.prepare("SELECT 1 FROM calls WHERE request_id = ?1")?;
        let mut seen = HashSet::new();
        let mut rows = Vec::new();
        for (id, spend) in found {
            if seen.insert(id.clone()) && !stmt.exists([&id])? {
                rows.push(spend);
            }
        }
        let mut st = lock(&self.state);
        for b in &mut st.budgets {
            count_rows(b, &rows);
            b.roll(now);
            self.publish_budget(b);
        }
        if !rows.is_empty() {
            tracing::warn!(
                rows = rows.len(),
                "budgets count the spend of rows still in the spool (a ledger outage); the writer replays them now"
            );
        }
        Ok(rows.len() as u64)
    }

    /// Admits a call to the budgets, or says why not: [`Guard::admit_waiting`] with what the
    /// call context and the catalog say.
    pub async fn admit_call(
        self: &Arc<Self>,
        ctx: &CallContext,
        catalog: &Catalog,
    ) -> Result<Admission, Refusal> {
        let facts = CallFacts {
            table: ctx.attribution.table.clone(),
            workflow: ctx.attribution.workflow.clone(),
            key_fp: ctx.key_fp.clone(),
            tags: ctx.attribution.tags.clone(),
        };
        let worst = catalog.endpoint(ctx.endpoint).worst_case(&ctx.params);
        self.admit_waiting(&ctx.request_id, facts, ctx.started_at, worst)
            .await
    }

    /// Like [`Guard::admit`], but a call that does not fit only because of the reservations of
    /// calls still in flight (which usually settle lower) waits for them, up to
    /// `guard.admission_wait`, and is refused only if it still does not fit. So under a burst,
    /// refusals begin where the spend meets the limit, not where the worst cases do.
    pub async fn admit_waiting(
        self: &Arc<Self>,
        request_id: &str,
        facts: CallFacts,
        started_at: i64,
        worst_case: Option<Credits>,
    ) -> Result<Admission, Refusal> {
        let wait = lock(&self.state).admission_wait;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Reloads wake everyone (budgets may have changed shape).
            let reloaded = self.settled.notified();
            tokio::pin!(reloaded);
            reloaded.as_mut().enable();
            let last = tokio::time::Instant::now() >= deadline;
            match self.try_admit(request_id, &facts, started_at, worst_case, last) {
                Ok(a) => return Ok(a),
                Err(Blocked::Final(r)) => return Err(r),
                Err(Blocked::Wait(wake, seen)) => {
                    let released = wake.notify.notified();
                    tokio::pin!(released);
                    released.as_mut().enable();
                    // Released between the attempt and the registration: try again now.
                    if wake.epoch() != seen {
                        continue;
                    }
                    tokio::select! {
                        _ = released => {}
                        _ = reloaded => {}
                        _ = tokio::time::sleep_until(deadline) => {}
                    }
                }
            }
        }
    }

    /// How many admission attempts the guard has made (each under its one lock): a waiting
    /// call makes one more each time a budget blocking it releases reservations. For
    /// diagnostics and tests.
    pub fn admission_attempts(&self) -> u64 {
        self.attempts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The wake of budget `name`, made on first use.
    fn wake_of(&self, name: &Arc<str>) -> Arc<BudgetWake> {
        lock(&self.wakes)
            .entry(name.clone())
            .or_insert_with(|| {
                Arc::new(BudgetWake {
                    epoch: std::sync::atomic::AtomicU64::new(0),
                    notify: tokio::sync::Notify::new(),
                })
            })
            .clone()
    }

    /// Checks the holds, then reserves `worst_case` (or the ceiling, when `None`) against every
    /// budget covering `facts`, atomically: all reservations are made, or none. `started_at`
    /// (unix ms) places the call in its windows, as the ledger will. Never waits.
    pub fn admit(
        self: &Arc<Self>,
        request_id: &str,
        facts: CallFacts,
        started_at: i64,
        worst_case: Option<Credits>,
    ) -> Result<Admission, Refusal> {
        loop {
            // With `last`, an attempt never answers `Wait`.
            match self.try_admit(request_id, &facts, started_at, worst_case, true) {
                Ok(a) => return Ok(a),
                Err(Blocked::Final(r)) => return Err(r),
                Err(Blocked::Wait(..)) => continue,
            }
        }
    }

    /// One admission attempt. Unless `last`, a call blocked only by reservations in flight is
    /// not refused (nor counted as refused) but told to wait.
    fn try_admit(
        self: &Arc<Self>,
        request_id: &str,
        facts: &CallFacts,
        started_at: i64,
        worst_case: Option<Credits>,
        last: bool,
    ) -> Result<Admission, Blocked> {
        self.attempts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut gauges = Vec::new();
        let result =
            self.try_admit_locked(request_id, facts, started_at, worst_case, last, &mut gauges);
        // Prometheus gauges are set after the lock is released.
        for g in &gauges {
            self.set_gauges(g);
        }
        result
    }

    fn try_admit_locked(
        self: &Arc<Self>,
        request_id: &str,
        facts: &CallFacts,
        started_at: i64,
        worst_case: Option<Credits>,
        last: bool,
        gauges: &mut Vec<Gauges>,
    ) -> Result<Admission, Blocked> {
        let mut st = lock(&self.state);
        if let Some(hold) = st.holds.iter().find(|h| h.scope.matches(facts)) {
            self.metrics
                .hold_rejections
                .with_label_values(&[&hold.scope.to_string()])
                .inc();
            return Err(Blocked::Final(Refusal::Hold {
                hold: Box::new(hold.clone()),
                status: st.hold_status,
            }));
        }
        let r = match worst_case {
            Some(c) => Amount::of(c.lead_milli, c.direct_dial_milli, c.export_milli),
            None => Amount::uniform(st.ceiling_milli),
        };
        let covering: Vec<usize> = (0..st.budgets.len())
            .filter(|&i| st.budgets[i].def.scope.matches(facts))
            .collect();
        let mut blocked: Vec<(usize, Crossing)> = Vec::new();
        let mut over: Vec<(usize, Crossing)> = Vec::new();
        for &i in &covering {
            let b = &mut st.budgets[i];
            if b.roll(started_at) {
                gauges.push(gauges_of(b));
            }
            if let Some(c) = b.crossing(&r) {
                match b.def.action {
                    Action::Block => blocked.push((i, c)),
                    Action::Alert => over.push((i, c)),
                }
            }
        }
        if !blocked.is_empty() {
            let in_flight_only = blocked.iter().all(|(i, c)| {
                let pending = pending_reserved(&st, &st.budgets[*i].def.name, c.dim);
                c.spent.saturating_add(pending).saturating_add(c.requested) <= c.limit
            });
            if in_flight_only && !last {
                let wake = self.wake_of(&st.budgets[blocked[0].0].def.name);
                let seen = wake.epoch();
                return Err(Blocked::Wait(wake, seen));
            }
            let refusal = Refusal::Budget(Box::new(self.refusal(&st, &blocked, started_at)));
            for (i, _) in &blocked {
                let b = &mut st.budgets[*i];
                b.rejections += 1;
                self.metrics
                    .rejections
                    .with_label_values(&[&b.def.name])
                    .inc();
            }
            return Err(Blocked::Final(refusal));
        }
        for (i, c) in over {
            let b = &mut st.budgets[i];
            self.metrics
                .over_limit
                .with_label_values(&[&b.def.name])
                .inc();
            if !b.over_logged {
                b.over_logged = true;
                tracing::warn!(
                    budget = %b.def.name,
                    credit_type = DIMS[c.dim],
                    spent = credits(c.spent),
                    reserved = credits(c.reserved),
                    limit = credits(c.limit),
                    request_id,
                    "alert budget crossed its limit; calls continue (action = \"alert\")"
                );
            }
        }
        let mut charged = Vec::with_capacity(covering.len());
        for &i in &covering {
            let b = &mut st.budgets[i];
            b.reserve(&r);
            charged.push((b.def.name.clone(), b.window_key()));
            gauges.push(gauges_of(b));
        }
        let id = st.next_id;
        st.next_id += 1;
        st.inflight.insert(
            id,
            InFlight {
                request_id: request_id.to_owned(),
                facts: facts.clone(),
                started_at,
                reserved: r,
                charged,
            },
        );
        Ok(Admission {
            guard: self.clone(),
            id,
            settled: false,
        })
    }

    /// The refusal for a call `blocked` by these budgets: it names the one that frees up last,
    /// since retrying before then cannot succeed.
    fn refusal(&self, st: &State, blocked: &[(usize, Crossing)], at: i64) -> BudgetRefusal {
        let mut primary = 0;
        let mut latest: Option<Option<i64>> = None;
        for (k, (i, c)) in blocked.iter().enumerate() {
            let frees = st.budgets[*i].frees_at(c);
            let later = match (latest, frees) {
                (None, _) => true,
                (Some(None), _) => false,
                (Some(Some(_)), None) => true,
                (Some(Some(l)), Some(f)) => f > l,
            };
            if later {
                latest = Some(frees);
                primary = k;
            }
        }
        let (i, c) = blocked[primary];
        let b = &st.budgets[i];
        BudgetRefusal {
            budget: b.def.name.to_string(),
            window: b.def.window,
            time_zone: b.def.tz_name.clone(),
            tz: b.def.tz.clone(),
            credit_type: DIMS[c.dim],
            window_start: b.window().map(|w| w.start),
            spent: c.spent,
            reserved: c.reserved,
            limit: c.limit,
            requested: c.requested,
            resets_at: latest.flatten(),
            at,
            also: blocked
                .iter()
                .enumerate()
                .filter(|(k, _)| *k != primary)
                .map(|(_, (j, _))| st.budgets[*j].def.name.to_string())
                .collect(),
        }
    }

    fn settle(&self, id: u64, actual: Amount) {
        let mut st = lock(&self.state);
        let Some(call) = st.inflight.remove(&id) else {
            return;
        };
        let mut gauges = Vec::with_capacity(call.charged.len());
        for (name, key) in &call.charged {
            let Some(b) = st.budgets.iter_mut().find(|b| &b.def.name == name) else {
                continue; // removed by a reload
            };
            if b.def.action == Action::Block {
                if let Some(d) =
                    (0..4).find(|&d| b.def.limits[d].is_some() && actual.0[d] > call.reserved.0[d])
                {
                    tracing::warn!(
                        budget = %b.def.name,
                        request_id = call.request_id,
                        credit_type = DIMS[d],
                        reserved = credits(call.reserved.0[d]),
                        actual = credits(actual.0[d]),
                        "a call cost more than the worst case it reserved (a figure Apollo reported); the budget may overrun by the difference"
                    );
                }
            }
            b.settle(*key, call.started_at, &call.reserved, &actual);
            let spent = b.spent();
            for d in b.newly_warned() {
                tracing::warn!(
                    budget = %b.def.name,
                    credit_type = DIMS[d],
                    spent = credits(spent.0[d]),
                    limit = b.def.limits[d].map(credits),
                    warn_at = b.def.warn_at,
                    window = %b.def.window,
                    "budget crossed its warn_at threshold"
                );
            }
            gauges.push(gauges_of(b));
        }
        if !actual.is_zero() {
            let now = now_ms();
            st.recent.push_back(Settled {
                at: now,
                request_id: call.request_id,
                facts: call.facts,
                started_at: call.started_at,
                actual,
            });
            while st
                .recent
                .front()
                .is_some_and(|s| s.at < now - RECENT_KEEP_MS || st.recent.len() > RECENT_MAX)
            {
                st.recent.pop_front();
            }
        }
        drop(st);
        // Only the calls waiting on these budgets are woken; gauges are set outside the lock.
        for g in &gauges {
            self.set_gauges(g);
            if let Some(w) = lock(&self.wakes).get(&g.name).cloned() {
                w.wake();
            }
        }
    }

    /// Settles the synchronous part (`actual`) of call `id` and keeps `keep` reserved for it in
    /// the budgets whose window it still falls in (see [`Admission::settle_deferred`]).
    fn keep_reserved(&self, id: u64, actual: Amount, keep: Amount) {
        let mut st = lock(&self.state);
        let Some(call) = st.inflight.get(&id) else {
            return;
        };
        let (reserved, started_at) = (call.reserved, call.started_at);
        let request_id = call.request_id.clone();
        let facts = call.facts.clone();
        let charged = call.charged.clone();
        let mut still = Vec::with_capacity(charged.len());
        let mut gauges = Vec::with_capacity(charged.len());
        for (name, key) in charged {
            let Some(b) = st.budgets.iter_mut().find(|b| b.def.name == name) else {
                continue; // removed by a reload
            };
            let same_window = b.window().is_none() || b.window_key() == key;
            b.settle(key, started_at, &reserved, &actual);
            if same_window {
                b.reserve(&keep);
                still.push((name, key));
            }
            gauges.push(gauges_of(b));
        }
        if let Some(call) = st.inflight.get_mut(&id) {
            call.reserved = keep;
            call.charged = still;
            st.pending.insert(id);
        }
        if !actual.is_zero() {
            st.recent.push_back(Settled {
                at: now_ms(),
                request_id,
                facts,
                started_at,
                actual,
            });
        }
        drop(st);
        // What the synchronous part did not spend is free again: wake only the calls these
        // budgets block, and set their gauges outside the lock.
        for g in &gauges {
            self.set_gauges(g);
            if let Some(w) = lock(&self.wakes).get(&g.name).cloned() {
                w.wake();
            }
        }
    }

    /// Reserves a deferred charge still pending in the ledger at start-up (`amount`, its worst
    /// case) in every budget covering it whose current window holds its call's start, without
    /// a fit check: it was admitted before the restart.
    pub fn reserve_pending(
        self: &Arc<Self>,
        request_id: &str,
        facts: CallFacts,
        started_at: i64,
        amount: Amount,
        now: i64,
    ) -> PendingCharge {
        let mut st = lock(&self.state);
        let mut charged = Vec::new();
        for b in st.budgets.iter_mut() {
            if !b.def.scope.matches(&facts) {
                continue;
            }
            b.roll(now);
            if started_at < b.counts_since(now) {
                continue;
            }
            b.reserve(&amount);
            charged.push((b.def.name.clone(), b.window_key()));
            self.publish_budget(b);
        }
        let id = st.next_id;
        st.next_id += 1;
        st.inflight.insert(
            id,
            InFlight {
                request_id: request_id.to_owned(),
                facts,
                started_at,
                reserved: amount,
                charged,
            },
        );
        st.pending.insert(id);
        PendingCharge {
            guard: self.clone(),
            id,
            settled: false,
        }
    }

    /// Swaps in new `[guard]` settings and budgets (a SIGHUP reload). A budget whose name,
    /// scope, window and time zone are unchanged keeps its counters exactly, including calls in
    /// flight; its limit, action and warn_at take effect at once. Any other budget is rebuilt
    /// from the ledger, plus calls settled too recently to be committed, plus the reservations
    /// of calls in flight. Removed budgets are dropped. Holds are unaffected.
    pub fn reload(
        &self,
        guard: &GuardConfig,
        budgets: &[BudgetConfig],
        now: i64,
    ) -> Result<ReloadSummary, GuardError> {
        let defs = compile(guard, budgets)?;
        let _w = lock(&self.writes);
        let needs_rows = {
            let st = lock(&self.state);
            defs.iter()
                .filter(|d| {
                    !st.budgets
                        .iter()
                        .any(|b| b.def.name == d.name && b.def.counts_like(d))
                })
                .map(|d| BudgetState::new(d.clone(), now).counts_since(now))
                .min()
        };
        // Read outside the lock: calls settled meanwhile are in `recent`, calls admitted
        // meanwhile are in flight when the new budgets are installed.
        let (rows, in_rows) = match needs_rows {
            Some(since) => {
                // Calls settled lately may or may not be committed yet: read which are, in the
                // same snapshot as the spend, so each is counted exactly once. (A call settling
                // from now on started within the last minutes; one older than that and
                // committed in between would be counted twice, never missed.)
                let ids_since = lock(&self.state)
                    .recent
                    .iter()
                    .map(|s| s.started_at)
                    .chain([now - RECENT_STARTED_MS])
                    .min();
                let conn = crate::ledger::open_for_read(&self.ledger_path)?;
                let (groups, ids) =
                    crate::ledger::guardrails::spend_snapshot(&conn, since, ids_since)?;
                (spends(groups), ids)
            }
            None => (Vec::new(), HashSet::new()),
        };
        let mut st = lock(&self.state);
        let st = &mut *st;
        let mut old: Vec<BudgetState> = std::mem::take(&mut st.budgets);
        let mut summary = ReloadSummary::default();
        for def in defs {
            let name = def.name.to_string();
            match old
                .iter()
                .position(|b| b.def.name == def.name && b.def.counts_like(&def))
            {
                Some(p) => {
                    let mut b = old.swap_remove(p);
                    b.redefine(def);
                    b.roll(now);
                    st.budgets.push(b);
                    summary.kept.push(name);
                }
                None => {
                    let mut b = BudgetState::new(def, now);
                    count_rows(&mut b, &rows);
                    for s in &st.recent {
                        if !in_rows.contains(s.request_id.as_str()) && b.def.scope.matches(&s.facts)
                        {
                            b.count(s.started_at, &s.actual);
                        }
                    }
                    let since = b.counts_since(now);
                    for call in st.inflight.values_mut() {
                        call.charged.retain(|(n, _)| *n != b.def.name);
                        if b.def.scope.matches(&call.facts)
                            && (!b.def.window.is_calendar() || call.started_at >= since)
                        {
                            b.reserve(&call.reserved);
                            call.charged.push((b.def.name.clone(), b.window_key()));
                        }
                    }
                    b.roll(now);
                    st.budgets.push(b);
                    summary.rebuilt.push(name);
                }
            }
        }
        for b in old {
            if !st.budgets.iter().any(|n| n.def.name == b.def.name) {
                summary.removed.push(b.def.name.to_string());
            }
            for (d, _) in DIMS.iter().enumerate() {
                for gauge in [
                    &self.metrics.limit,
                    &self.metrics.spent,
                    &self.metrics.reserved,
                ] {
                    let _ = gauge.remove_label_values(&[&b.def.name, DIMS[d]]);
                }
                let _ = self
                    .metrics
                    .warning
                    .remove_label_values(&[&b.def.name, DIMS[d]]);
            }
        }
        st.ceiling_milli = guard.unknown_cost_ceiling.0;
        st.admission_wait = guard.admission_wait.0;
        st.hold_status = guard.hold_status;
        for b in &mut st.budgets {
            let spent = b.spent();
            for d in b.newly_warned() {
                tracing::warn!(budget = %b.def.name, credit_type = DIMS[d], spent = credits(spent.0[d]),
                    warn_at = b.def.warn_at, "budget is past its warn_at threshold after reload");
            }
        }
        self.publish_locked(st, now);
        self.settled.notify_waiters();
        for w in lock(&self.wakes).values() {
            w.wake();
        }
        tracing::info!(kept = ?summary.kept, rebuilt = ?summary.rebuilt, removed = ?summary.removed, "budgets reloaded");
        Ok(summary)
    }

    /// Places a hold on `scope`: [`Guard::place_hold`] without saying where it was kept.
    pub fn add_hold(
        &self,
        scope: Scope,
        reason: Option<String>,
        now: i64,
    ) -> Result<(Hold, bool), GuardError> {
        self.place_hold(scope, reason, now)
            .map(|c| (c.hold, c.created))
    }

    /// Places a hold on `scope`. It is in force at once, before anything is written: holds
    /// exist for incidents, and a locked ledger or a full disk is one. It is then recorded in
    /// the ledger, or, if SQLite refuses, in `<ledger>.holds-spool` (written to the ledger
    /// later, and read back at start-up), or, if even that fails, kept in memory only; the
    /// answer says which ([`Persisted`]). An identical hold already in force is returned
    /// instead (`created: false`), so repeating the request is harmless.
    pub fn place_hold(
        &self,
        scope: Scope,
        reason: Option<String>,
        now: i64,
    ) -> Result<HoldChange, GuardError> {
        let _w = lock(&self.writes);
        if let Some(h) = lock(&self.state).holds.iter().find(|h| h.scope == scope) {
            return Ok(HoldChange {
                hold: h.clone(),
                created: false,
                persisted: Persisted::Ledger,
            });
        }
        let scope_json = serde_json::to_string(&scope).unwrap_or_else(|_| "\"global\"".into());
        let hold = Hold {
            id: self.next_hold_id(),
            scope,
            reason,
            created_at: now,
        };
        {
            let mut st = lock(&self.state);
            st.holds.push(hold.clone());
            self.metrics.holds_active.set(st.holds.len() as i64);
        }
        tracing::warn!(hold = hold.id, scope = %hold.scope, reason = hold.reason.as_deref().unwrap_or(""), "hold placed: matching calls are refused until it is released");
        let persisted = self.persist_hold(crate::ledger::guardrails::HoldOp::Place {
            id: hold.id,
            scope: scope_json,
            reason: hold.reason.clone(),
            created_at: now,
        });
        Ok(HoldChange {
            hold,
            created: true,
            persisted,
        })
    }

    /// Lifts hold `id`: [`Guard::lift_hold`] without saying where the change was kept.
    pub fn release_hold(&self, id: i64, now: i64) -> Result<Option<Hold>, GuardError> {
        self.lift_hold(id, now).map(|c| c.map(|c| c.hold))
    }

    /// Lifts hold `id` at once, then records that like [`Guard::place_hold`] records a hold.
    /// `None` if no such hold is in force.
    pub fn lift_hold(&self, id: i64, now: i64) -> Result<Option<HoldChange>, GuardError> {
        let _w = lock(&self.writes);
        let hold = {
            let mut st = lock(&self.state);
            let pos = st.holds.iter().position(|h| h.id == id);
            let hold = pos.map(|p| st.holds.remove(p));
            self.metrics.holds_active.set(st.holds.len() as i64);
            hold
        };
        let Some(hold) = hold else {
            return Ok(None);
        };
        tracing::warn!(hold = id, scope = %hold.scope, "hold released");
        let persisted = self.persist_hold(crate::ledger::guardrails::HoldOp::Release {
            id,
            released_at: now,
        });
        Ok(Some(HoldChange {
            hold,
            created: false,
            persisted,
        }))
    }

    /// The next hold id: above every id the ledger, the holds spool and memory know. (Holds
    /// are only changed through this process, under `writes`.) Readers are not blocked by a
    /// locked ledger, and a full disk still reads.
    fn next_hold_id(&self) -> i64 {
        let in_memory = lock(&self.state).holds.iter().map(|h| h.id).max();
        let in_ledger = crate::ledger::open_for_read(&self.ledger_path)
            .ok()
            .and_then(|c| crate::ledger::guardrails::max_hold_id(&c).ok());
        let spooled = crate::ledger::guardrails::read_hold_spool(&self.ledger_path)
            .ok()
            .and_then(|ops| ops.iter().map(|o| o.id()).max());
        [in_memory, in_ledger, spooled]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(0)
            + 1
    }

    /// Records a hold change: in the ledger (after any changes spooled earlier), else in the
    /// holds spool, else nowhere (logged).
    fn persist_hold(&self, op: crate::ledger::guardrails::HoldOp) -> Persisted {
        let in_ledger = (|| -> Result<(), GuardError> {
            let conn = crate::ledger::guardrails::open_for_holds(&self.ledger_path)?;
            crate::ledger::guardrails::replay_hold_spool(&conn, &self.ledger_path)?;
            crate::ledger::guardrails::apply_hold_op(&conn, &op)?;
            Ok(())
        })();
        let refused = match in_ledger {
            Ok(()) => {
                crate::ledger::guardrails::ensure_holds_reserve(&self.ledger_path);
                return Persisted::Ledger;
            }
            Err(e) => e.to_string(),
        };
        match crate::ledger::guardrails::append_hold_spool(&self.ledger_path, &op) {
            Ok(()) => {
                tracing::warn!(hold = op.id(), error = %refused, "the ledger refused the hold change; it is in force and kept in the holds spool until the ledger recovers");
                Persisted::Spool(refused)
            }
            Err(e) => {
                let why = format!("{refused}; the holds spool: {e}");
                tracing::error!(hold = op.id(), error = %why, ?op, "the hold change could not be recorded anywhere; it is in force in memory only, until creditmeter restarts");
                Persisted::MemoryOnly(why)
            }
        }
    }

    /// The holds in force.
    pub fn holds(&self) -> Vec<Hold> {
        lock(&self.state).holds.clone()
    }

    /// Every budget's state at `now`, and the holds: `GET /api/budgets`.
    pub fn snapshot(&self, now: i64) -> Value {
        let mut st = lock(&self.state);
        let st = &mut *st;
        let budgets: Vec<Value> = st
            .budgets
            .iter_mut()
            .map(|b| {
                b.roll(now);
                let spent = b.spent();
                let reserved = b.reserved();
                let limits: Vec<Value> = (0..4)
                    .filter_map(|d| {
                        let limit = b.def.limits[d]?;
                        let used = spent.0[d] + reserved.0[d];
                        Some(json!({
                            "credit_type": DIMS[d],
                            "limit": credits(limit),
                            "spent": credits(spent.0[d]),
                            "reserved": credits(reserved.0[d]),
                            "remaining": credits((limit - used).max(0)),
                            "used_percent": if limit > 0 { (spent.0[d] as f64 * 1000.0 / limit as f64).round() / 10.0 } else { 100.0 },
                            "warning": b.warned(d),
                        }))
                    })
                    .collect();
                let (start, end) = match b.window() {
                    Some(w) => (
                        Some(format_local(w.start, &b.def.tz)),
                        Some(format_local(w.end, &b.def.tz)),
                    ),
                    None => (None, None),
                };
                json!({
                    "name": &*b.def.name,
                    "scope": b.def.scope,
                    "scope_text": b.def.scope.to_string(),
                    "window": b.def.window,
                    "time_zone": if b.def.window.is_calendar() { Some(&b.def.tz_name) } else { None },
                    "window_start": start,
                    "resets_at": end,
                    "action": b.def.action,
                    "warn_at": b.def.warn_at,
                    "limits": limits,
                    "rejections": b.rejections,
                })
            })
            .collect();
        json!({
            "budgets": budgets,
            "holds": st.holds.iter().map(Hold::to_json).collect::<Vec<_>>(),
            "calls_in_flight": st.inflight.len(),
            "unknown_cost_ceiling": credits(st.ceiling_milli),
            "at": format_local(now, &jiff::tz::TimeZone::UTC),
        })
    }

    /// Brings every budget to the window of `now` and sets the gauges (before a scrape, so an
    /// idle budget's new window shows without waiting for a call).
    pub fn publish(&self, now: i64) {
        let mut st = lock(&self.state);
        self.publish_locked(&mut st, now);
    }

    fn publish_locked(&self, st: &mut State, now: i64) {
        for b in &mut st.budgets {
            b.roll(now);
            self.publish_budget(b);
            // Present from the first scrape, so rate() and increase() see the first refusal.
            self.metrics
                .rejections
                .with_label_values(&[&b.def.name])
                .inc_by(0);
        }
        self.metrics.holds_active.set(st.holds.len() as i64);
    }

    fn publish_budget(&self, b: &BudgetState) {
        self.set_gauges(&gauges_of(b));
    }

    fn set_gauges(&self, g: &Gauges) {
        for (dim, limit, spent, reserved, warned) in &g.values {
            let labels = [&*g.name, dim];
            self.metrics.limit.with_label_values(&labels).set(*limit);
            self.metrics.spent.with_label_values(&labels).set(*spent);
            self.metrics
                .reserved
                .with_label_values(&labels)
                .set(*reserved);
            self.metrics
                .warning
                .with_label_values(&labels)
                .set(i64::from(*warned));
        }
    }
}

/// A budget's gauge values now (see [`Gauges`]).
fn gauges_of(b: &BudgetState) -> Gauges {
    let spent = b.spent();
    let reserved = b.reserved();
    Gauges {
        name: b.def.name.clone(),
        values: DIMS
            .iter()
            .enumerate()
            .filter_map(|(d, dim)| {
                let limit = b.def.limits[d]?;
                Some((
                    *dim,
                    credits(limit),
                    credits(spent.0[d]),
                    credits(reserved.0[d]),
                    b.warned(d),
                ))
            })
            .collect(),
    }
}

/// Applies hold changes an earlier run left in the holds spool (the ledger refused them), then
/// tries to write them into the ledger.
fn apply_spooled_holds(
    holds: &mut Vec<Hold>,
    conn: &rusqlite::Connection,
    ledger_path: &std::path::Path,
) -> Result<(), GuardError> {
    let path = crate::ledger::guardrails::holds_spool_path(ledger_path);
    let ops = crate::ledger::guardrails::read_hold_spool(ledger_path)
        .map_err(|source| LedgerError::Spool { path, source })?;
    for op in &ops {
        match op {
            crate::ledger::guardrails::HoldOp::Place {
                id,
                scope,
                reason,
                created_at,
            } => {
                if holds.iter().any(|h| h.id == *id) {
                    continue;
                }
                let scope = serde_json::from_str::<Value>(scope)
                    .map_err(|e| e.to_string())
                    .and_then(|v| config::scope_from_json(&v))
                    .map_err(|message| GuardError::HoldScope { id: *id, message })?;
                holds.push(Hold {
                    id: *id,
                    scope,
                    reason: reason.clone(),
                    created_at: *created_at,
                });
            }
            crate::ledger::guardrails::HoldOp::Release { id, .. } => holds.retain(|h| h.id != *id),
        }
    }
    if !ops.is_empty() {
        if let Err(e) = crate::ledger::guardrails::replay_hold_spool(conn, ledger_path) {
            tracing::warn!(error = %e, "hold changes stay in the holds spool: the ledger still refuses them");
        }
    }
    Ok(())
}

/// Counts the ledger rows that fall in `b`'s current window and scope.
fn count_rows(b: &mut BudgetState, rows: &[Spend]) {
    for row in rows {
        if b.def.scope.matches(&row.facts) {
            b.count(row.started_at, &row.actual);
        }
    }
}
