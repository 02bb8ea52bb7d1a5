//! The JSON the admin API shows: `GET /api/budgets` and a hold.

use serde_json::{json, Value};

use super::state::DIMS;
use super::window::format_local;
use super::{credits, lock, Guard, Hold};

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

impl Guard {
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
}
