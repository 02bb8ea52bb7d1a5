//! Holds (emergency stops): placed and lifted at once, then recorded in the ledger, in the
//! holds spool beside it, or (failing both) in memory only.

use serde_json::Value;

use super::{config, lock, Guard, GuardError, Scope, ScopeError};
use crate::ledger::LedgerError;

/// A hold in force: calls its scope covers are refused until it is released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub id: i64,
    pub scope: Scope,
    pub reason: Option<String>,
    /// Unix ms.
    pub created_at: i64,
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

impl Guard {
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
    pub(super) fn next_hold_id(&self) -> i64 {
        let in_memory = lock(&self.state).holds.iter().map(|h| h.id).max();
        let in_ledger = self.store.max_hold_id().ok();
        let spooled = crate::ledger::guardrails::read_hold_spool(self.store.spool_base())
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
    pub(super) fn persist_hold(&self, op: crate::ledger::guardrails::HoldOp) -> Persisted {
        let in_ledger = self.store.write_hold(Some(&op));
        let refused = match in_ledger {
            Ok(()) => {
                crate::ledger::guardrails::ensure_holds_reserve(self.store.spool_base());
                return Persisted::Ledger;
            }
            Err(e) => e.to_string(),
        };
        match crate::ledger::guardrails::append_hold_spool(self.store.spool_base(), &op) {
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
}

/// Applies hold changes an earlier run left in the holds spool (the ledger refused them), then
/// tries to write them into the ledger.
pub(super) fn apply_spooled_holds(
    holds: &mut Vec<Hold>,
    store: &dyn crate::ledger::Store,
) -> Result<(), GuardError> {
    let ledger_path = store.spool_base();
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
                    .map_err(ScopeError::from)
                    .and_then(|v| config::scope_from_json(&v))
                    .map_err(|source| GuardError::HoldScope { id: *id, source })?;
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
        if let Err(e) = store.write_hold(None) {
            tracing::warn!(error = %e, "hold changes stay in the holds spool: the ledger still refuses them");
        }
    }
    Ok(())
}
