//! `[guard]` and `[[budget]]`: how budgets and holds are configured, and their validation.
//!
//! ```toml
//! [guard]
//! time_zone = "Europe/Berlin"      # calendar windows align to local midnight, Monday, the 1st
//! unknown_cost_ceiling = 10        # credits reserved for a call the catalog cannot bound
//! hold_status = 503                # or 429
//!
//! [[budget]]
//! name = "inbound-daily"
//! scope = { table = "Inbound*" }   # or "global"; also workflow, key, tag = { team = "growth" }
//! limit = 500                      # credits; or { total = 500, direct_dial = 200 }
//! window = "day"                   # hour, day, week, month, or "rolling 24h"
//! action = "block"                 # or "alert"
//! warn_at = 80                     # percent
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::scope::{Glob, Scope, ScopeError};
use super::{ConfigError, HumanDuration};

/// Default zone for calendar windows.
pub const DEFAULT_TIME_ZONE: &str = "UTC";
/// Default credits reserved for a call whose worst case the catalog cannot bound (the `other`
/// endpoint, or a bulk call whose record count the request does not give): a 10-record bulk
/// match without phone reveal. The reservation is settled to the priced cost at the end.
pub const DEFAULT_UNKNOWN_COST_CEILING: f64 = 10.0;
/// Default HTTP status for a call paused by a hold.
pub const DEFAULT_HOLD_STATUS: u16 = 503;
/// Default time a call may wait for calls in flight to settle when only their reservations
/// keep it from fitting a budget.
pub const DEFAULT_ADMISSION_WAIT: Duration = Duration::from_secs(10);
/// Default `warn_at`, percent of the limit.
pub const DEFAULT_WARN_AT: f64 = 80.0;
/// The longest rolling window accepted.
pub const MAX_ROLLING: Duration = Duration::from_secs(366 * 86_400);

/// `[guard]`: settings shared by every budget and hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// `guard.time_zone`, default `"UTC"`: the IANA zone calendar windows (hour, day, week,
    /// month) align to, unless a budget names its own. The zone database is compiled in.
    pub time_zone: String,
    /// `guard.unknown_cost_ceiling`, default 10 credits: reserved for a call whose worst-case
    /// cost the catalog cannot bound. 0 lets such calls through any budget.
    pub unknown_cost_ceiling: Credits,
    /// `guard.hold_status`, default 503: the status of a call refused by a hold (503 or 429).
    pub hold_status: u16,
    /// `guard.admission_wait`, default 10s: how long a call that does not fit a budget only
    /// because of the worst cases reserved by calls in flight waits for them to settle (they
    /// usually cost less) before it is refused. `"0s"` refuses at once.
    pub admission_wait: HumanDuration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            time_zone: DEFAULT_TIME_ZONE.to_owned(),
            unknown_cost_ceiling: Credits::from_credits(DEFAULT_UNKNOWN_COST_CEILING),
            hold_status: DEFAULT_HOLD_STATUS,
            admission_wait: HumanDuration(DEFAULT_ADMISSION_WAIT),
        }
    }
}

/// One `[[budget]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Unique; the `budget` metric label and what a rejected caller is told.
    pub name: String,
    /// Which calls count against it.
    pub scope: Scope,
    /// The limit in credits: over all credit types, or per type.
    pub limit: Limit,
    /// The window the limit applies to.
    pub window: WindowSpec,
    /// Overrides `guard.time_zone` for this budget's calendar window.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// `block` (default) refuses calls that would cross the limit; `alert` only reports them.
    #[serde(default)]
    pub action: Action,
    /// Percent of the limit at which a warning is logged and `creditmeter_budget_warning` turns
    /// 1; default 80.
    #[serde(default = "default_warn_at")]
    pub warn_at: f64,
}

fn default_warn_at() -> f64 {
    DEFAULT_WARN_AT
}

/// What a budget does when a call would cross its limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Refuse the call with a 429 before anything goes upstream.
    #[default]
    Block,
    /// Let it through; count it, log it, and report it in the metrics.
    Alert,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Alert => "alert",
        }
    }
}

/// Credits in thousandths, written in config as a number of credits (`500`, `2.5`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Credits(pub i64);

impl Credits {
    pub fn from_credits(c: f64) -> Credits {
        Credits((c * 1000.0).round() as i64)
    }
}

impl<'de> Deserialize<'de> for Credits {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CreditsVisitor)
    }
}

struct CreditsVisitor;

impl Visitor<'_> for CreditsVisitor {
    type Value = Credits;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number of credits, like 500 or 2.5")
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Credits, E> {
        v.checked_mul(1000)
            .map(Credits)
            .ok_or_else(|| E::custom(format!("{v} credits is out of range")))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Credits, E> {
        i64::try_from(v)
            .map_err(|_| E::custom(format!("{v} credits is out of range")))
            .and_then(|v| self.visit_i64(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Credits, E> {
        if !v.is_finite() || v.abs() > 9.0e12 {
            return Err(E::custom(format!("{v} credits is out of range")));
        }
        Ok(Credits::from_credits(v))
    }
}

/// A budget's limits in milli-credits: over all credit types (`total`) and/or per type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limit {
    pub total: Option<i64>,
    pub lead: Option<i64>,
    pub direct_dial: Option<i64>,
    pub export: Option<i64>,
}

impl Limit {
    /// `(credit_type, milli)` for each limit that is set, `all` first.
    pub fn entries(&self) -> impl Iterator<Item = (&'static str, i64)> {
        [
            ("all", self.total),
            ("lead", self.lead),
            ("direct_dial", self.direct_dial),
            ("export", self.export),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LimitVisitor)
    }
}

struct LimitVisitor;

impl<'de> Visitor<'de> for LimitVisitor {
    type Value = Limit;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "credits over all types (limit = 500) or per type (limit = { total = 500, lead = 400, direct_dial = 100, export = 10 })",
        )
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Limit, E> {
        total(CreditsVisitor.visit_i64(v)?)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Limit, E> {
        total(CreditsVisitor.visit_u64(v)?)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Limit, E> {
        total(CreditsVisitor.visit_f64(v)?)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Limit, A::Error> {
        let mut limit = Limit::default();
        while let Some(key) = map.next_key::<String>()? {
            let slot = match key.as_str() {
                "total" => &mut limit.total,
                "lead" => &mut limit.lead,
                "direct_dial" => &mut limit.direct_dial,
                "export" => &mut limit.export,
                other => {
                    return Err(de::Error::unknown_field(
                        other,
                        &["total", "lead", "direct_dial", "export"],
                    ))
                }
            };
            if slot.is_some() {
                return Err(de::Error::custom(format!("`{key}` given twice")));
            }
            *slot = Some(map.next_value::<Credits>()?.0);
        }
        if limit.entries().next().is_none() {
            return Err(de::Error::custom(
                "an empty limit: give `total` and/or `lead`, `direct_dial`, `export` credits",
            ));
        }
        Ok(limit)
    }
}

fn total<E: de::Error>(c: Credits) -> Result<Limit, E> {
    Ok(Limit {
        total: Some(c.0),
        ..Limit::default()
    })
}

/// The window a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowSpec {
    /// Calendar hours in the budget's zone.
    Hour,
    /// Calendar days from local midnight (23 or 25 hours on daylight-saving days).
    Day,
    /// ISO weeks, from Monday 00:00 local time.
    Week,
    /// Calendar months, from the 1st at 00:00 local time.
    Month,
    /// The last so-long, at any moment.
    Rolling(Duration),
}

impl WindowSpec {
    /// Parses `hour`, `day`, `week`, `month` or `rolling <duration>` (e.g. `rolling 24h`).
    pub fn parse(s: &str) -> Result<WindowSpec, WindowError> {
        let s = s.trim();
        Ok(match s {
            "hour" => WindowSpec::Hour,
            "day" => WindowSpec::Day,
            "week" => WindowSpec::Week,
            "month" => WindowSpec::Month,
            _ => match s.strip_prefix("rolling") {
                Some(rest) if rest.starts_with([' ', ':']) => {
                    let d = HumanDuration::parse(rest.trim_start_matches([' ', ':']))?;
                    if d < Duration::from_secs(1) || d > MAX_ROLLING {
                        return Err(WindowError::RollingRange(s.to_owned()));
                    }
                    WindowSpec::Rolling(d)
                }
                _ => return Err(WindowError::Unknown(s.to_owned())),
            },
        })
    }

    pub fn is_calendar(&self) -> bool {
        !matches!(self, WindowSpec::Rolling(_))
    }
}

/// Why a `window` is refused; the message says what to write instead.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    #[error(transparent)]
    Duration(#[from] creditmeter_base::DurationError),
    #[error("{0:?}: a rolling window must be between 1s and 366d")]
    RollingRange(String),
    #[error("unknown window {0:?}: use hour, day, week, month, or rolling <duration> such as \"rolling 24h\"")]
    Unknown(String),
}

impl fmt::Display for WindowSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WindowSpec::Hour => f.write_str("hour"),
            WindowSpec::Day => f.write_str("day"),
            WindowSpec::Week => f.write_str("week"),
            WindowSpec::Month => f.write_str("month"),
            WindowSpec::Rolling(d) => {
                let s = d.as_secs();
                if s % 86_400 == 0 && s > 86_400 {
                    write!(f, "rolling {}d", s / 86_400)
                } else if s % 3600 == 0 {
                    write!(f, "rolling {}h", s / 3600)
                } else if s % 60 == 0 {
                    write!(f, "rolling {}m", s / 60)
                } else {
                    write!(f, "rolling {s}s")
                }
            }
        }
    }
}

impl<'de> Deserialize<'de> for WindowSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        WindowSpec::parse(&s).map_err(de::Error::custom)
    }
}

impl Serialize for WindowSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Resolves an IANA zone name from the compiled-in database.
pub fn time_zone(name: &str) -> Result<jiff::tz::TimeZone, TimeZoneError> {
    jiff::tz::TimeZone::get(name).map_err(|source| TimeZoneError {
        name: name.to_owned(),
        source,
    })
}

/// A time zone name the compiled-in database does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown time zone {name:?} ({source}); use an IANA name such as \"UTC\", \"Europe/Berlin\" or \"America/New_York\"")]
pub struct TimeZoneError {
    pub name: String,
    pub source: jiff::Error,
}

/// The cross-field rules for `[guard]` and every `[[budget]]`; messages say how to fix it.
pub fn validate(guard: &GuardConfig, budgets: &[BudgetConfig]) -> Result<(), ConfigError> {
    let invalid = |key: &'static str, message: String| ConfigError::Invalid { key, message };
    time_zone(&guard.time_zone).map_err(|e| invalid("guard.time_zone", e.to_string()))?;
    if guard.unknown_cost_ceiling.0 < 0 {
        return Err(invalid(
            "guard.unknown_cost_ceiling",
            "must be 0 or more credits".into(),
        ));
    }
    if !matches!(guard.hold_status, 429 | 503) {
        return Err(invalid(
            "guard.hold_status",
            format!(
                "{} is not allowed: use 503 (service unavailable) or 429 (too many requests)",
                guard.hold_status
            ),
        ));
    }
    if guard.admission_wait.0 > Duration::from_secs(300) {
        return Err(invalid(
            "guard.admission_wait",
            "at most \"5m\": a caller waits this long before a refusal".into(),
        ));
    }
    let mut names = std::collections::HashSet::new();
    for (i, b) in budgets.iter().enumerate() {
        let bad = |key: &'static str, message: String| ConfigError::Budget {
            budget: if b.name.trim().is_empty() {
                format!("#{}", i + 1)
            } else {
                format!("#{} {:?}", i + 1, b.name)
            },
            key,
            message,
        };
        if b.name.trim().is_empty() {
            return Err(bad("name", "every budget needs a name".into()));
        }
        if b.name.len() > 128 || b.name.chars().any(char::is_control) {
            return Err(bad(
                "name",
                "must be printable and at most 128 bytes (it is a metric label)".into(),
            ));
        }
        if !names.insert(b.name.as_str()) {
            return Err(bad(
                "name",
                "is used by another budget: names must be unique".into(),
            ));
        }
        b.scope
            .validate()
            .map_err(|e| bad("scope", e.to_string()))?;
        for (ty, milli) in b.limit.entries() {
            if milli < 0 {
                return Err(bad(
                    "limit",
                    format!("the {ty} limit is negative; use 0 or more credits"),
                ));
            }
        }
        if !(b.warn_at > 0.0 && b.warn_at <= 100.0) {
            return Err(bad(
                "warn_at",
                format!("{} is not a percentage above 0 and at most 100", b.warn_at),
            ));
        }
        if let Some(tz) = &b.time_zone {
            time_zone(tz).map_err(|e| bad("time_zone", e.to_string()))?;
            if !b.window.is_calendar() {
                return Err(bad(
                    "time_zone",
                    "a rolling window has no calendar alignment; remove `time_zone` or use hour, day, week or month".into(),
                ));
            }
        }
    }
    Ok(())
}

/// A scope as the admin API and the CLI send it: the same shape as in config.
pub fn scope_from_json(v: &serde_json::Value) -> Result<Scope, ScopeError> {
    let scope = Scope::deserialize(v)?;
    scope.validate()?;
    Ok(scope)
}

/// Builds a scope from CLI flags.
pub fn scope_from_parts(
    table: Option<String>,
    workflow: Option<String>,
    key: Option<String>,
    tags: BTreeMap<String, String>,
) -> Scope {
    Scope {
        table: table.map(Glob::new),
        workflow: workflow.map(Glob::new),
        key: key.map(Glob::new),
        tags: tags
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), Glob::new(v)))
            .collect(),
    }
}
