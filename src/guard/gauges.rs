//! The budget gauges in Prometheus (`creditmeter_budget_*`, `creditmeter_holds_active`).

use std::sync::Arc;

use super::state::{BudgetState, DIMS};
use super::{credits, lock, Guard, State};

/// A budget's gauge values, taken under the state lock and set after it is released.
pub(super) struct Gauges {
    pub(super) name: Arc<str>,
    /// (credit type, limit, spent, reserved, warned) for each limited type.
    pub(super) values: Vec<(&'static str, f64, f64, f64, bool)>,
}

impl Guard {
    /// Brings every budget to the window of `now` and sets the gauges (before a scrape, so an
    /// idle budget's new window shows without waiting for a call).
    pub fn publish(&self, now: i64) {
        let mut st = lock(&self.state);
        self.publish_locked(&mut st, now);
    }

    pub(super) fn publish_locked(&self, st: &mut State, now: i64) {
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

    pub(super) fn publish_budget(&self, b: &BudgetState) {
        self.set_gauges(&gauges_of(b));
    }

    pub(super) fn set_gauges(&self, g: &Gauges) {
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
pub(super) fn gauges_of(b: &BudgetState) -> Gauges {
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
