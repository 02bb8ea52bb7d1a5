//! One budget's counters in its current window: credits spent (settled), credits reserved by
//! calls in flight, and for rolling windows the buckets spent credits are forgotten in.
//!
//! The invariant admission keeps, per limited credit type: `spent + reserved <= limit`. A call is
//! reserved only if it fits; settling replaces its reservation by its actual cost, which the
//! catalog's worst case bounds, so the sum never grows past the limit.

use std::collections::VecDeque;
use std::sync::Arc;

use jiff::tz::TimeZone;

use super::config::{self, Action, BudgetConfig, GuardConfig, WindowSpec};
use super::scope::{Scope, ScopeError};
use super::window::{bucket_ms, calendar_bounds, Bounds};

/// Credit types a limit can be set on, in metric label order: `all` is every type together.
pub const DIMS: [&str; 4] = ["all", "lead", "direct_dial", "export"];

/// Milli-credits per dimension of [`DIMS`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount(pub [i64; 4]);

impl Amount {
    /// From the credits of each type; `all` is their sum.
    pub fn of(lead: i64, direct_dial: i64, export: i64) -> Amount {
        Amount([
            lead.saturating_add(direct_dial).saturating_add(export),
            lead,
            direct_dial,
            export,
        ])
    }

    /// The same figure in every dimension: a reservation for a call of unknown type and cost.
    pub fn uniform(milli: i64) -> Amount {
        Amount([milli; 4])
    }

    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|&v| v == 0)
    }

    fn add(&mut self, o: &Amount) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a = a.saturating_add(b);
        }
    }

    fn sub(&mut self, o: &Amount) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a = a.saturating_sub(b);
        }
    }
}

/// A budget from config, checked and with its time zone resolved.
#[derive(Debug, Clone)]
pub struct Budget {
    pub name: Arc<str>,
    pub scope: Scope,
    /// Milli-credits per dimension of [`DIMS`]; `None` = no limit on that type.
    pub limits: [Option<i64>; 4],
    pub window: WindowSpec,
    pub tz: TimeZone,
    pub tz_name: String,
    pub action: Action,
    pub warn_at: f64,
}

/// Why a budget cannot be put in force (config validation refuses both first).
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error(transparent)]
    TimeZone(#[from] config::TimeZoneError),
    #[error(transparent)]
    Scope(#[from] ScopeError),
}

impl Budget {
    pub fn compile(b: &BudgetConfig, guard: &GuardConfig) -> Result<Budget, BudgetError> {
        let tz_name = b
            .time_zone
            .clone()
            .unwrap_or_else(|| guard.time_zone.clone());
        let tz = config::time_zone(&tz_name)?;
        b.scope.validate()?;
        Ok(Budget {
            name: Arc::from(b.name.as_str()),
            scope: b.scope.clone(),
            limits: [
                b.limit.total,
                b.limit.lead,
                b.limit.direct_dial,
                b.limit.export,
            ],
            window: b.window,
            tz,
            tz_name,
            action: b.action,
            warn_at: b.warn_at,
        })
    }

    /// Whether `other` counts the same calls over the same windows, so the spend counted so far
    /// stays valid under it (only the limit, action or warn_at may differ).
    pub fn counts_like(&self, other: &Budget) -> bool {
        self.scope == other.scope
            && self.window == other.window
            && (self.tz_name == other.tz_name || !self.window.is_calendar())
    }

    /// The milli-credits at which `warn_at` is crossed in dimension `d`.
    fn warn_threshold(&self, d: usize) -> Option<i64> {
        let limit = self.limits[d]?;
        Some(((limit as f64) * self.warn_at / 100.0).ceil() as i64)
    }
}

/// Spend in a rolling window, in buckets of `bucket_ms` keyed by bucket index.
#[derive(Debug)]
struct Rolling {
    window_ms: i64,
    bucket_ms: i64,
    buckets: VecDeque<(i64, Amount)>,
    total: Amount,
    /// Buckets below this index have left the window.
    floor: i64,
}

impl Rolling {
    fn new(window_ms: i64) -> Rolling {
        Rolling {
            window_ms,
            bucket_ms: bucket_ms(window_ms),
            buckets: VecDeque::new(),
            total: Amount::default(),
            floor: i64::MIN,
        }
    }

    /// Forgets buckets that lie wholly before `t - window`.
    fn expire(&mut self, t: i64) {
        let floor = (t - self.window_ms).div_euclid(self.bucket_ms);
        self.floor = self.floor.max(floor);
        while let Some((idx, amount)) = self.buckets.front() {
            if *idx >= self.floor {
                break;
            }
            self.total.sub(amount);
            self.buckets.pop_front();
        }
    }

    fn add(&mut self, at: i64, amount: &Amount) {
        let idx = at.div_euclid(self.bucket_ms);
        if idx < self.floor || amount.is_zero() {
            return;
        }
        self.total.add(amount);
        let pos = self.buckets.iter().rposition(|(i, _)| *i <= idx);
        match pos {
            Some(p) if self.buckets[p].0 == idx => self.buckets[p].1.add(amount),
            Some(p) => self.buckets.insert(p + 1, (idx, *amount)),
            None => self.buckets.push_front((idx, *amount)),
        }
    }

    /// When at least `need` milli of dimension `d` will have left the window.
    fn frees_at(&self, d: usize, need: i64) -> Option<i64> {
        let mut freed = 0i64;
        for (idx, amount) in &self.buckets {
            freed = freed.saturating_add(amount.0[d]);
            if freed >= need {
                return Some((idx + 1) * self.bucket_ms + self.window_ms);
            }
        }
        None
    }
}

/// Why a reservation does not fit a budget: the first limited dimension it would cross.
#[derive(Debug, Clone, Copy)]
pub struct Crossing {
    pub dim: usize,
    pub spent: i64,
    pub reserved: i64,
    pub limit: i64,
    pub requested: i64,
}

/// One budget and its counters.
#[derive(Debug)]
pub struct BudgetState {
    pub def: Budget,
    /// The current calendar window; `None` for rolling windows.
    window: Option<Bounds>,
    rolling: Option<Rolling>,
    /// Settled spend in the current calendar window (rolling windows keep theirs in buckets).
    spent: Amount,
    reserved: Amount,
    warned: [bool; 4],
    /// An `alert` budget's crossing was logged in this window.
    pub over_logged: bool,
    /// Calls refused by this budget since start-up.
    pub rejections: u64,
}

impl BudgetState {
    /// Empty counters for the window containing `now`.
    pub fn new(def: Budget, now: i64) -> BudgetState {
        let rolling = match def.window {
            WindowSpec::Rolling(d) => {
                let mut r = Rolling::new(i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2));
                r.expire(now);
                Some(r)
            }
            _ => None,
        };
        let window = def
            .window
            .is_calendar()
            .then(|| calendar_or_hour(&def, now));
        BudgetState {
            def,
            window,
            rolling,
            spent: Amount::default(),
            reserved: Amount::default(),
            warned: [false; 4],
            over_logged: false,
            rejections: 0,
        }
    }

    /// The earliest call start whose spend counts in the current window at `now`.
    pub fn counts_since(&self, now: i64) -> i64 {
        match (&self.window, &self.rolling) {
            (Some(b), _) => b.start,
            (None, Some(r)) => (now - r.window_ms).div_euclid(r.bucket_ms) * r.bucket_ms,
            (None, None) => now,
        }
    }

    /// Adds a settled call found in the ledger (or settled while a reload ran).
    pub fn count(&mut self, started_at: i64, actual: &Amount) {
        match &mut self.rolling {
            Some(r) => r.add(started_at, actual),
            None => {
                if self.window.is_some_and(|b| started_at >= b.start) {
                    self.spent.add(actual);
                }
            }
        }
    }

    /// Moves to the window containing `t`: a new calendar window starts empty (calls still in
    /// flight from the old one settle into the old one, i.e. nowhere); a rolling window forgets
    /// old buckets. Returns true when a calendar window rolled over.
    pub fn roll(&mut self, t: i64) -> bool {
        if let Some(r) = &mut self.rolling {
            r.expire(t);
            let spent = r.total;
            for (d, warned) in self.warned.iter_mut().enumerate() {
                if self.def.warn_threshold(d).is_some_and(|th| spent.0[d] < th) {
                    *warned = false;
                }
            }
            return false;
        }
        match self.window {
            Some(b) if t >= b.end => {
                self.window = Some(calendar_or_hour(&self.def, t));
                self.spent = Amount::default();
                self.reserved = Amount::default();
                self.warned = [false; 4];
                self.over_logged = false;
                true
            }
            _ => false,
        }
    }

    /// Identifies the window a reservation was made in: the calendar window's start (0 for
    /// rolling windows, whose reservations never change window).
    pub fn window_key(&self) -> i64 {
        self.window.map_or(0, |b| b.start)
    }

    pub fn window(&self) -> Option<Bounds> {
        self.window
    }

    pub fn spent(&self) -> Amount {
        match &self.rolling {
            Some(r) => r.total,
            None => self.spent,
        }
    }

    pub fn reserved(&self) -> Amount {
        self.reserved
    }

    pub fn warned(&self, d: usize) -> bool {
        self.warned[d]
    }

    /// The first limited dimension in which `r` does not fit. A dimension the call cannot
    /// spend in (`r` is 0 there) never refuses it, so free calls pass a spent budget.
    pub fn crossing(&self, r: &Amount) -> Option<Crossing> {
        let spent = self.spent();
        (0..4).find_map(|d| {
            let limit = self.def.limits[d]?;
            let requested = r.0[d];
            let used = spent.0[d].saturating_add(self.reserved.0[d]);
            (requested > 0 && used.saturating_add(requested) > limit).then_some(Crossing {
                dim: d,
                spent: spent.0[d],
                reserved: self.reserved.0[d],
                limit,
                requested,
            })
        })
    }

    /// When a refused call of `c` could fit again: the end of the calendar window, or when
    /// enough of a rolling window's spend has aged out. `None`: never (it asks for more than
    /// the whole limit), or not before calls in flight settle.
    pub fn frees_at(&self, c: &Crossing) -> Option<i64> {
        if c.requested > c.limit {
            return None;
        }
        match (&self.window, &self.rolling) {
            (Some(b), _) => Some(b.end),
            (None, Some(r)) => {
                let need = c.spent + c.reserved + c.requested - c.limit;
                r.frees_at(c.dim, need)
            }
            (None, None) => None,
        }
    }

    pub fn reserve(&mut self, r: &Amount) {
        self.reserved.add(r);
    }

    /// Releases a reservation made in window `key` and counts the call's actual cost in the
    /// window its start falls in (the ledger counts it there too).
    pub fn settle(&mut self, key: i64, started_at: i64, reserved: &Amount, actual: &Amount) {
        match &mut self.rolling {
            Some(r) => {
                self.reserved.sub(reserved);
                r.add(started_at, actual);
            }
            None => {
                if self.window_key() == key {
                    self.reserved.sub(reserved);
                    self.spent.add(actual);
                }
            }
        }
    }

    /// Dimensions whose spend reached `warn_at` since the last call, now marked warned.
    pub fn newly_warned(&mut self) -> Vec<usize> {
        let spent = self.spent();
        let mut out = Vec::new();
        for d in 0..4 {
            if let Some(th) = self.def.warn_threshold(d) {
                let over = spent.0[d] > 0 && spent.0[d] >= th;
                if over && !self.warned[d] {
                    out.push(d);
                }
                self.warned[d] = over;
            }
        }
        out
    }

    /// Keeps the counters and takes a new definition that [`Budget::counts_like`] this one.
    pub fn redefine(&mut self, def: Budget) {
        self.def = def;
    }
}

fn calendar_or_hour(def: &Budget, t: i64) -> Bounds {
    // Only instants outside years -9999..9999 have no calendar window.
    calendar_bounds(def.window, &def.tz, t).unwrap_or(Bounds {
        start: t,
        end: t.saturating_add(3_600_000),
    })
}
