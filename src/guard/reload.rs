//! Reload (SIGHUP): new budgets swapped in, keeping the spend of those that count the same
//! calls and rebuilding the others.

use std::collections::HashSet;

use serde::Serialize;

use super::rebuild::{count_rows, spends};
use super::state::{BudgetState, DIMS};
use super::{
    compile, credits, lock, BudgetConfig, Guard, GuardConfig, GuardError, RECENT_STARTED_MS,
};

/// What a reload did, by budget name.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct ReloadSummary {
    /// Kept their counted spend (same scope and window; limit, action or warn_at may differ).
    pub kept: Vec<String>,
    /// New, or counting differently: rebuilt from the ledger and the calls in flight.
    pub rebuilt: Vec<String>,
    pub removed: Vec<String>,
}

impl Guard {
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
                let (groups, ids) = self.store.spend_snapshot(since, ids_since)?;
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
}
