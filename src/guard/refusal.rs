//! Why a call was refused, and how the refusal reads: status, `Retry-After`, message, JSON.

use http::StatusCode;
use serde_json::{json, Value};

use crate::ledger::Outcome;

use super::window::format_local;
use super::{credits, Hold, Scope, WindowSpec};

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
    pub(super) tz: jiff::tz::TimeZone,
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

pub(super) fn describe_scope(s: &Scope) -> String {
    if s.is_global() {
        "everything (global hold)".into()
    } else {
        s.to_string()
    }
}
