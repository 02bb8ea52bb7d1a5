//! Admission: a call's worst case reserved against every budget covering it, all or nothing,
//! or a [`Refusal`]; a call blocked only by reservations in flight waits for them.

use std::sync::Arc;

use crate::catalog::Credits;

use super::gauges::{gauges_of, Gauges};
use super::refusal::{BudgetRefusal, Refusal};
use super::settlement::{pending_reserved, PendingCharge};
use super::state::{Crossing, DIMS};
use super::{credits, lock, Action, Amount, CallFacts, Guard, InFlight, State};

/// A call admitted against the budgets. Settle it once with the call's actual cost; dropping it
/// unsettled releases the reservation and counts nothing.
pub struct Admission {
    pub(super) guard: Arc<Guard>,
    pub(super) id: u64,
    pub(super) settled: bool,
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

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").field("id", &self.id).finish()
    }
}

/// The outcome of an admission attempt that did not admit.
pub(super) enum Blocked {
    Final(Refusal),
    /// Only reservations of calls in flight stand in the way: worth waiting for them, on the
    /// wake of one budget that blocked the call (all must free up, so waking on any one of
    /// them and trying again loses nothing), seen at that epoch.
    Wait(Arc<BudgetWake>, u64),
}

/// Wakes the calls waiting on one budget: `epoch` counts its releases, so a call that reads
/// it before registering can tell a release it would otherwise miss.
pub(super) struct BudgetWake {
    pub(super) epoch: std::sync::atomic::AtomicU64,
    pub(super) notify: tokio::sync::Notify,
}

impl BudgetWake {
    pub(super) fn wake(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Guard {
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
    pub(super) fn wake_of(&self, name: &Arc<str>) -> Arc<BudgetWake> {
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
    pub(super) fn try_admit(
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

    pub(super) fn try_admit_locked(
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
    pub(super) fn refusal(
        &self,
        st: &State,
        blocked: &[(usize, Crossing)],
        at: i64,
    ) -> BudgetRefusal {
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
}
