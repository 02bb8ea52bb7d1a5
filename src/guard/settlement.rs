//! Settlement of reservations: a call's actual credits counted and its reservation released,
//! or, for a job Apollo bills later, its worst case kept reserved as a [`PendingCharge`].

use std::sync::Arc;

use creditmeter_base::now_ms;

use super::gauges::gauges_of;
use super::state::DIMS;
use super::{
    credits, lock, Action, Amount, CallFacts, Guard, InFlight, Settled, State, RECENT_KEEP_MS,
    RECENT_MAX,
};

/// A deferred charge's reservation (see [`Admission::settle_deferred`] and
/// [`Guard::reserve_pending`]): its worst case stays reserved until it settles. Dropping it
/// unsettled (shutdown) releases the reservation and counts nothing; the charge is still
/// pending in the ledger, and is reserved again at the next start.
pub struct PendingCharge {
    pub(super) guard: Arc<Guard>,
    pub(super) id: u64,
    pub(super) settled: bool,
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
pub(super) fn pending_reserved(st: &State, name: &Arc<str>, dim: usize) -> i64 {
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

impl Guard {
    pub(super) fn settle(&self, id: u64, actual: Amount) {
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
    pub(super) fn keep_reserved(&self, id: u64, actual: Amount, keep: Amount) {
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
}
