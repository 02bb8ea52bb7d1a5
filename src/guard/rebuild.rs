//! Start-up: budgets from config, their current windows rebuilt from the ledger (and from
//! rows an outage left in the spool), holds from the ledger and the holds spool.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use serde_json::Value;

use crate::ledger::guardrails::SpendGroup;
use crate::ledger::LedgerError;
use crate::metrics::BudgetMetrics;

use super::holds::{apply_spooled_holds, Hold};
use super::state::{BudgetState, DIMS};
use super::{
    compile, config, credits, lock, Amount, BudgetConfig, CallFacts, Guard, GuardConfig,
    GuardError, ScopeError, State,
};

/// Ledger spend as budgets count it.
pub(super) struct Spend {
    pub(super) facts: CallFacts,
    pub(super) started_at: i64,
    pub(super) actual: Amount,
}

pub(super) fn spends(groups: Vec<SpendGroup>) -> Vec<Spend> {
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
    /// the ledger's `calls`, holds from its `holds` table. `store` is the server's ledger
    /// (migrated), where hold changes and reloads go later too.
    pub fn start(
        guard: &GuardConfig,
        budgets: &[BudgetConfig],
        store: crate::ledger::SharedStore,
        metrics: BudgetMetrics,
        now: i64,
    ) -> Result<Guard, GuardError> {
        let defs = compile(guard, budgets)?;
        let mut states: Vec<BudgetState> =
            defs.into_iter().map(|d| BudgetState::new(d, now)).collect();
        if let Some(since) = states.iter().map(|b| b.counts_since(now)).min() {
            let rows = spends(store.spend_since(since)?);
            for b in &mut states {
                count_rows(b, &rows);
            }
        }
        let mut holds = Vec::new();
        for row in store.active_holds()? {
            let scope = serde_json::from_str::<Value>(&row.scope)
                .map_err(ScopeError::from)
                .and_then(|v| config::scope_from_json(&v))
                .map_err(|source| GuardError::HoldScope { id: row.id, source })?;
            holds.push(Hold {
                id: row.id,
                scope,
                reason: row.reason,
                created_at: row.created_at,
            });
        }
        apply_spooled_holds(&mut holds, &*store)?;
        crate::ledger::guardrails::ensure_holds_reserve(store.spool_base());
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
            store,
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
    /// `<ledger>.spool` that the ledger does not hold yet. Start-up calls it after
    /// [`Guard::start`] and before serving: the writer replays the spool only later, and
    /// without this the spend of the outage would be forgotten by every budget. Returns the
    /// rows counted.
    pub fn count_spooled(&self, now: i64) -> Result<u64, GuardError> {
        let since = lock(&self.state)
            .budgets
            .iter()
            .map(|b| b.counts_since(now))
            .min();
        let Some(since) = since else {
            return Ok(0);
        };
        let mut found: Vec<(String, Spend)> = Vec::new();
        crate::ledger::writer::for_each_spooled(self.store.spool_base(), |r| {
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
            path: self.store.spool_base().to_owned(),
            source,
        })?;
        // A row may be spooled twice (queued, and spooled by its caller past commit_timeout),
        // or already committed (a replay cut short): count each call once, and only if the
        // ledger does not count it already.
        let ids: Vec<&str> = found.iter().map(|(id, _)| id.as_str()).collect();
        let stored = self.store.stored_ids(&ids)?;
        let mut seen = HashSet::new();
        let mut rows = Vec::new();
        for (id, spend) in found {
            if !stored.contains(&id) && seen.insert(id) {
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
}

/// Counts the ledger rows that fall in `b`'s current window and scope.
pub(super) fn count_rows(b: &mut BudgetState, rows: &[Spend]) {
    for row in rows {
        if b.def.scope.matches(&row.facts) {
            b.count(row.started_at, &row.actual);
        }
    }
}
