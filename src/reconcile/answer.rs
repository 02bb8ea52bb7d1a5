//! The answer: windows in which Apollo's balance fell by more than creditmeter saw, and what
//! that looks like. Served by `creditmeter report --reconcile` and `GET /api/reconcile`.
//!
//! For each credit type, the windows in the asked range are checked against each endpoint's
//! proxied volume (matched records, successful calls, or the credits its rule priced). A catalog
//! rule that under-prices one endpoint leaves drift proportional to that endpoint's volume, window
//! after window; the fit takes the median ratio (so a few windows with other causes do not move
//! it), and needs at least two windows that agree and few that contradict (drift well below what
//! the ratio predicts). Drift no such ratio explains, in particular in windows with no proxied
//! calls at all, is traffic outside the proxy. A window can be both: the catalog part is what the
//! ratio predicts, the rest is outside.
//!
//! Next to the credits, the per-endpoint call counts ([`super::calls`]) name calls that
//! Apollo counted but creditmeter never saw.
//!
//! JSON shape (stable, for scripts): `{"window": {"since", "until"}, "status": {...},
//! "totals": [...], "findings": [...], "windows": [...], "outside_calls": [...]}`; see
//! [`Answer::to_json`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use rusqlite::Connection;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{credits, CreditType};
use crate::ledger::reconcile::WindowsRead;
use crate::ledger::{LedgerError, ReconcileStore};
use crate::report::{Format, ReportError};
use creditmeter_base::format_time;

/// One endpoint's proxied volume in a window (from `reconciliation.by_endpoint`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Volume {
    pub calls: i64,
    pub ok_calls: i64,
    pub records_matched: i64,
    /// All credits the rule priced, every type.
    pub credits_milli: i64,
    /// The window's credit type only.
    pub type_milli: i64,
}

/// One reconciled window of one credit type.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowRow {
    pub credit_type: CreditType,
    pub start: i64,
    pub end: i64,
    pub cycle_reset: bool,
    pub apollo_delta: Option<i64>,
    pub edge: i64,
    pub metered: i64,
    pub unmetered: i64,
    pub drift: i64,
    pub calls: i64,
    pub by_endpoint: BTreeMap<String, Volume>,
}

/// The unit a catalog error is proportional to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Per {
    MatchedRecord,
    Call,
    MeteredCredit,
}

impl Per {
    const ALL: [Per; 3] = [Per::MatchedRecord, Per::Call, Per::MeteredCredit];

    fn of(self, v: &Volume) -> f64 {
        match self {
            Per::MatchedRecord => v.records_matched as f64,
            Per::Call => v.ok_calls as f64,
            Per::MeteredCredit => v.credits_milli as f64 / 1000.0,
        }
    }

    /// `matched_record`, `call`, `metered_credit`.
    pub fn as_str(self) -> &'static str {
        match self {
            Per::MatchedRecord => "matched_record",
            Per::Call => "call",
            Per::MeteredCredit => "metered_credit",
        }
    }

    fn phrase(self) -> &'static str {
        match self {
            Per::MatchedRecord => "matched record",
            Per::Call => "successful call",
            Per::MeteredCredit => "credit the rule priced",
        }
    }
}

/// A catalog rule that under-prices one endpoint, for one credit type.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogFinding {
    pub credit_type: CreditType,
    pub endpoint: String,
    pub per: Per,
    /// Unmetered credits per unit of `per`.
    pub ratio: f64,
    /// Apollo's charge over the rule's for this endpoint, when the rule priced anything.
    pub factor: Option<f64>,
    /// Windows that agree with the ratio, of those with volume of the endpoint.
    pub agreeing: usize,
    pub with_volume: usize,
    /// Other endpoints the drift fits equally well (their traffic moved in step).
    pub also: Vec<String>,
}

/// What a window's unmetered credits look like.
#[derive(Debug, Clone, PartialEq)]
pub enum Class {
    /// Traffic outside the proxy.
    Outside { reason: String },
    /// A catalog error explains it (`explained` credits, thousandths).
    Catalog { finding: usize, explained: i64 },
    /// Both: `explained` by the catalog error, `outside` beyond it.
    Mixed {
        finding: usize,
        explained: i64,
        outside: i64,
    },
}

/// The analysis of a set of windows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Analysis {
    pub findings: Vec<CatalogFinding>,
    /// For each window with unmetered credits (index into the windows), its class.
    pub classes: Vec<(usize, Class)>,
}

/// Tolerance for "agrees with the ratio", in credits: 20% of the prediction plus rounding.
/// Calls at window edges shift a few units between neighbours; this absorbs that. Apollo's
/// figures are whole credits, so a window's drift is only known to within one credit (see
/// `drift::slack`): a credit of it is rounding too.
fn tolerance(predicted: f64) -> f64 {
    0.2 * predicted.abs() + 1.0015
}

struct Fit {
    endpoint: String,
    per: Per,
    ratio: f64,
    agreeing: usize,
    contradicting: usize,
    with_volume: usize,
    sse: f64,
}

fn fit(ws: &[&WindowRow], endpoint: &str, per: Per) -> Option<Fit> {
    let pts: Vec<(f64, f64)> = ws
        .iter()
        .filter_map(|w| {
            let x = per.of(w.by_endpoint.get(endpoint)?);
            (x > 0.0).then_some((x, w.drift as f64 / 1000.0))
        })
        .collect();
    if pts.len() < 2 {
        return None;
    }
    let mut ratios: Vec<f64> = pts.iter().map(|(x, d)| d / x).collect();
    ratios.sort_by(f64::total_cmp);
    let mid = ratios.len() / 2;
    let ratio = if ratios.len() % 2 == 1 {
        ratios[mid]
    } else {
        (ratios[mid - 1] + ratios[mid]) / 2.0
    };
    if ratio <= 0.0 || !ratio.is_finite() {
        return None;
    }
    let (mut agreeing, mut contradicting, mut sse, mut norm) = (0, 0, 0.0, 0.0);
    for (x, d) in &pts {
        let p = ratio * x;
        if (d - p).abs() <= tolerance(p) {
            agreeing += 1;
            sse += (d - p).powi(2);
            norm += d.powi(2);
        } else if *d < p {
            contradicting += 1;
        }
    }
    // Two windows that agree, and at most a quarter that saw clearly less drift than predicted.
    if agreeing < 2 || contradicting * 4 > pts.len() {
        return None;
    }
    Some(Fit {
        endpoint: endpoint.to_owned(),
        per,
        ratio,
        agreeing,
        contradicting,
        with_volume: pts.len(),
        sse: if norm > 0.0 { sse / norm } else { 0.0 },
    })
}

/// Better evidence first: more agreeing windows, fewer contradicting, closer fit, then the
/// more natural unit.
fn better(a: &Fit, b: &Fit) -> std::cmp::Ordering {
    b.agreeing
        .cmp(&a.agreeing)
        .then(a.contradicting.cmp(&b.contradicting))
        .then(a.sse.total_cmp(&b.sse))
        .then(a.per.cmp(&b.per))
        .then(a.endpoint.cmp(&b.endpoint))
}

/// Finds catalog errors and classifies every window with unmetered credits.
pub fn analyze(windows: &[WindowRow]) -> Analysis {
    let mut out = Analysis::default();
    for t in CreditType::ALL.into_iter().chain([CreditType::Unified]) {
        let ws: Vec<&WindowRow> = windows
            .iter()
            .filter(|w| w.credit_type == t && !w.cycle_reset)
            .collect();
        if !ws.iter().any(|w| w.unmetered > 0) {
            continue;
        }
        let endpoints: BTreeSet<&str> = ws
            .iter()
            .flat_map(|w| w.by_endpoint.keys().map(String::as_str))
            .collect();
        let mut fits: Vec<Fit> = endpoints
            .iter()
            .flat_map(|e| Per::ALL.into_iter().filter_map(|per| fit(&ws, e, per)))
            .collect();
        fits.sort_by(better);
        let finding = fits.first().map(|best| {
            let also: BTreeSet<String> = fits
                .iter()
                .filter(|f| {
                    f.endpoint != best.endpoint
                        && f.agreeing == best.agreeing
                        && f.contradicting == best.contradicting
                })
                .map(|f| f.endpoint.clone())
                .collect();
            // Apollo over the rule, over the windows that agree.
            let (mut rule, mut extra) = (0.0, 0.0);
            for w in &ws {
                if let Some(v) = w.by_endpoint.get(&best.endpoint) {
                    let p = best.ratio * best.per.of(v);
                    if p > 0.0 && (w.drift as f64 / 1000.0 - p).abs() <= tolerance(p) {
                        rule += v.type_milli as f64 / 1000.0;
                        extra += p;
                    }
                }
            }
            CatalogFinding {
                credit_type: t,
                endpoint: best.endpoint.clone(),
                per: best.per,
                ratio: best.ratio,
                factor: (rule > 0.0).then(|| (rule + extra) / rule),
                agreeing: best.agreeing,
                with_volume: best.with_volume,
                also: also.into_iter().collect(),
            }
        });
        let finding_idx = finding.map(|f| {
            out.findings.push(f);
            out.findings.len() - 1
        });
        for (i, w) in windows.iter().enumerate() {
            if w.credit_type != t || w.cycle_reset || w.unmetered <= 0 {
                continue;
            }
            let class = classify(w, finding_idx.map(|i| (i, &out.findings[i])));
            out.classes.push((i, class));
        }
    }
    out.classes.sort_by_key(|(i, _)| *i);
    out
}

fn classify(w: &WindowRow, finding: Option<(usize, &CatalogFinding)>) -> Class {
    if let Some((idx, f)) = finding {
        let x = w.by_endpoint.get(&f.endpoint).map_or(0.0, |v| f.per.of(v));
        if x > 0.0 {
            let predicted = f.ratio * x;
            let unmetered = w.unmetered as f64 / 1000.0;
            let residual = unmetered - predicted;
            return if residual > tolerance(predicted) {
                let outside = (residual * 1000.0).round() as i64;
                Class::Mixed {
                    finding: idx,
                    explained: w.unmetered - outside,
                    outside,
                }
            } else {
                Class::Catalog {
                    finding: idx,
                    explained: w.unmetered,
                }
            };
        }
    }
    let reason = if w.calls == 0 {
        "no proxied calls in the window".to_owned()
    } else if let Some((_, f)) = finding {
        format!(
            "no {} calls in the window, and the drift does not follow the other endpoints' volume",
            f.endpoint
        )
    } else {
        "the drift does not follow any endpoint's proxied volume".to_owned()
    };
    Class::Outside { reason }
}

/// Unix ms as RFC 3339 UTC, with milliseconds when there are any.
pub fn format_ms(ms: i64) -> String {
    let s = format_time(ms);
    match ms.rem_euclid(1000) {
        0 => s,
        frac => format!("{}.{frac:03}Z", s.trim_end_matches('Z')),
    }
}

/// What was read from the ledger for a range.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub since_ms: i64,
    pub until_ms: i64,
    /// False when the ledger predates reconciliation (never served by this version).
    pub has_tables: bool,
    /// Polls that stored a snapshot in the range, and the latest snapshot ever.
    pub snapshots: i64,
    pub last_snapshot: Option<i64>,
    pub windows: Vec<WindowRow>,
    /// Windows where Apollo counted more calls of an endpoint than passed through creditmeter
    /// (`usage_stats/api_usage_stats`; see [`super::calls`]).
    pub outside_calls: Vec<super::calls::CallWindow>,
}

/// Reads the windows overlapping `[since_ms, until_ms)`.
pub fn load(conn: &Connection, since_ms: i64, until_ms: i64) -> rusqlite::Result<Answer> {
    let read = crate::ledger::reconcile::read_windows(conn, since_ms, until_ms)?;
    Ok(answer_of(since_ms, until_ms, read))
}

/// [`load`] through the store.
pub fn load_in<S: ReconcileStore + ?Sized>(
    store: &S,
    since_ms: i64,
    until_ms: i64,
) -> Result<Answer, LedgerError> {
    let read = store.reconcile_windows(since_ms, until_ms)?;
    Ok(answer_of(since_ms, until_ms, read))
}

/// The answer from the rows read: windows of a credit type this build does not know are left
/// out, and a `by_endpoint` that does not parse counts as empty.
fn answer_of(since_ms: i64, until_ms: i64, read: Option<WindowsRead>) -> Answer {
    let mut a = Answer {
        since_ms,
        until_ms,
        ..Default::default()
    };
    let Some(read) = read else {
        return a;
    };
    a.has_tables = true;
    (a.snapshots, a.last_snapshot) = (read.snapshots, read.last_snapshot);
    for w in read.windows {
        if let Some(t) = CreditType::parse(&w.credit_type) {
            a.windows.push(WindowRow {
                credit_type: t,
                start: w.window_start,
                end: w.window_end,
                cycle_reset: w.cycle_reset,
                apollo_delta: w.apollo_delta_milli,
                edge: w.edge_milli,
                metered: w.metered_milli,
                unmetered: w.unmetered_milli,
                drift: w.drift_milli,
                calls: w.calls,
                by_endpoint: serde_json::from_str(&w.by_endpoint).unwrap_or_default(),
            });
        }
    }
    a.windows.sort_by_key(|w| (w.start, w.end, w.credit_type));
    a.outside_calls = read
        .outside
        .into_iter()
        .map(super::calls::CallWindow::from)
        .collect();
    a
}

/// What `creditmeter report --reconcile` asks for.
#[derive(Debug, Clone)]
pub struct Request {
    pub db: PathBuf,
    pub since_ms: i64,
    pub until_ms: i64,
    pub format: Format,
}

/// Runs `creditmeter report --reconcile`.
pub fn report(req: &Request) -> Result<String, ReportError> {
    if !req.db.exists() {
        return Err(ReportError::Missing {
            path: req.db.clone(),
        });
    }
    let store = crate::ledger::SqliteStore::open_read(&req.db)?;
    let answer = load_in(&store, req.since_ms, req.until_ms)?;
    Ok(match req.format {
        Format::Json => format!("{:#}\n", answer.to_json()),
        Format::Csv | Format::Focus => answer.to_csv(),
        Format::Table => answer.to_table(),
    })
}

impl Answer {
    fn totals(&self) -> BTreeMap<CreditType, (i64, i64, i64, usize)> {
        let mut totals = BTreeMap::new();
        for w in self.windows.iter().filter(|w| !w.cycle_reset) {
            let e = totals.entry(w.credit_type).or_insert((0, 0, 0, 0));
            e.0 += w.apollo_delta.unwrap_or(0);
            e.1 += w.metered;
            e.2 += w.unmetered;
            e.3 += 1;
        }
        totals
    }

    /// Distinct windows across which the credit cycle restarted.
    fn resets(&self) -> usize {
        self.windows
            .iter()
            .filter(|w| w.cycle_reset)
            .map(|w| (w.start, w.end))
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// The JSON document: `window {since, until}`; `status {snapshots, last_snapshot, windows,
    /// cycle_resets, note}`; `totals [{credit_type, windows, apollo_delta, metered, unmetered}]`;
    /// `findings [{kind: "catalog_error", credit_type, endpoint, per, ratio, factor, agreeing_windows,
    /// windows_with_volume, also_fits} | {kind: "outside_proxy", credit_type, windows, unmetered} |
    /// {kind: "outside_calls", endpoint, calls, windows, summary}]`; `outside_calls [{endpoint,
    /// routes, start, end, start_ms, end_ms, apollo_calls, ledger_calls, outside_calls,
    /// summary}]` (calls Apollo counted beyond those creditmeter saw, per endpoint and window);
    /// `windows [{start, end, start_ms, end_ms, credit_type, apollo_delta, metered, unmetered,
    /// unmetered_milli, edge, proxied_calls, kind, endpoint, per, ratio, explained, outside,
    /// reason}]`, only those where Apollo's balance fell by more than creditmeter saw. Credits
    /// are plain numbers (thousandths exact).
    pub fn to_json(&self) -> Value {
        let analysis = analyze(&self.windows);
        let c = |milli: i64| milli as f64 / 1000.0;
        let totals: Vec<Value> = self
            .totals()
            .into_iter()
            .map(|(t, (a, m, u, n))| {
                json!({"credit_type": t.as_str(), "windows": n, "apollo_delta": c(a),
                       "metered": c(m), "unmetered": c(u)})
            })
            .collect();
        let mut findings: Vec<Value> = analysis
            .findings
            .iter()
            .map(|f| {
                json!({"kind": "catalog_error", "credit_type": f.credit_type.as_str(),
                       "endpoint": f.endpoint, "per": f.per.as_str(), "ratio": round3(f.ratio),
                       "factor": f.factor.map(round3), "agreeing_windows": f.agreeing,
                       "windows_with_volume": f.with_volume, "also_fits": f.also,
                       "summary": f.summary()})
            })
            .collect();
        for (t, (n, milli)) in outside_totals(&self.windows, &analysis) {
            findings.push(json!({"kind": "outside_proxy", "credit_type": t.as_str(),
                "windows": n, "unmetered": c(milli),
                "summary": outside_summary(t, n, milli)}));
        }
        for (endpoint, (n, calls)) in self.outside_call_totals() {
            findings.push(json!({"kind": "outside_calls", "endpoint": endpoint,
                "calls": calls, "windows": n,
                "summary": format!("{calls} {endpoint} call{} outside creditmeter in {n} window{}",
                    if calls == 1 { "" } else { "s" }, if n == 1 { "" } else { "s" })}));
        }
        let outside_calls: Vec<Value> = self.outside_calls.iter().map(|w| w.to_json()).collect();
        let windows: Vec<Value> = analysis
            .classes
            .iter()
            .map(|(i, class)| {
                let w = &self.windows[*i];
                let mut v = json!({
                    "start": format_ms(w.start), "end": format_ms(w.end),
                    "start_ms": w.start, "end_ms": w.end,
                    "credit_type": w.credit_type.as_str(),
                    "apollo_delta": w.apollo_delta.map(c), "metered": c(w.metered),
                    "unmetered": c(w.unmetered), "unmetered_milli": w.unmetered,
                    "edge": c(w.edge), "proxied_calls": w.calls,
                    "kind": Value::Null, "endpoint": Value::Null, "per": Value::Null,
                    "ratio": Value::Null, "explained": 0.0, "outside": 0.0, "reason": Value::Null,
                });
                match class {
                    Class::Outside { reason } => {
                        v["kind"] = "outside_proxy".into();
                        v["outside"] = c(w.unmetered).into();
                        v["reason"] = reason.clone().into();
                    }
                    Class::Catalog { finding, explained }
                    | Class::Mixed {
                        finding, explained, ..
                    } => {
                        let f = &analysis.findings[*finding];
                        let outside = match class {
                            Class::Mixed { outside, .. } => *outside,
                            _ => 0,
                        };
                        v["kind"] = if outside > 0 {
                            "catalog_error+outside_proxy"
                        } else {
                            "catalog_error"
                        }
                        .into();
                        v["endpoint"] = f.endpoint.clone().into();
                        v["per"] = f.per.as_str().into();
                        v["ratio"] = round3(f.ratio).into();
                        v["explained"] = c(*explained).into();
                        v["outside"] = c(outside).into();
                        v["reason"] = window_phrase(class, f).into();
                    }
                }
                v
            })
            .collect();
        json!({
            "window": {"since": format_ms(self.since_ms.max(0)), "until": format_ms(self.until_ms)},
            "status": {
                "snapshots": self.snapshots,
                "last_snapshot": self.last_snapshot.map(format_ms),
                "windows": self.windows.iter().map(|w| (w.start, w.end)).collect::<BTreeSet<_>>().len(),
                "cycle_resets": self.resets(),
                "note": self.note(),
            },
            "totals": totals,
            "findings": findings,
            "windows": windows,
            "outside_calls": outside_calls,
        })
    }

    /// Per endpoint: windows with calls outside creditmeter, and those calls.
    fn outside_call_totals(&self) -> BTreeMap<String, (usize, i64)> {
        let mut out = BTreeMap::new();
        for w in &self.outside_calls {
            let e: &mut (usize, i64) = out.entry(w.endpoint.clone()).or_default();
            e.0 += 1;
            e.1 += w.outside_calls;
        }
        out
    }

    /// Why there is nothing to show, if so.
    fn note(&self) -> Option<&'static str> {
        if !self.has_tables {
            Some("this ledger predates reconciliation: run `creditmeter serve` on it once with [reconcile] enabled")
        } else if self.last_snapshot.is_none() {
            Some("no balance snapshots yet: enable [reconcile] and set the master key (see the README, Reconciliation)")
        } else if self.windows.is_empty() {
            Some("no reconciled window in this range yet: a window is settled once the calls in flight at its closing snapshot have ended and balance_lag has passed")
        } else {
            None
        }
    }

    fn to_csv(&self) -> String {
        let analysis = analyze(&self.windows);
        let mut out = String::from(
            "window_start,window_end,credit_type,apollo_delta,metered,unmetered,proxied_calls,kind,endpoint,per,ratio,explained,outside\n",
        );
        for (i, class) in &analysis.classes {
            let w = &self.windows[*i];
            let (kind, endpoint, per, ratio, explained, outside) = match class {
                Class::Outside { .. } => ("outside_proxy", "", "", String::new(), 0, w.unmetered),
                Class::Catalog { finding, explained } => {
                    let f = &analysis.findings[*finding];
                    (
                        "catalog_error",
                        f.endpoint.as_str(),
                        f.per.as_str(),
                        format!("{:.3}", f.ratio),
                        *explained,
                        0,
                    )
                }
                Class::Mixed {
                    finding,
                    explained,
                    outside,
                } => {
                    let f = &analysis.findings[*finding];
                    (
                        "catalog_error+outside_proxy",
                        f.endpoint.as_str(),
                        f.per.as_str(),
                        format!("{:.3}", f.ratio),
                        *explained,
                        *outside,
                    )
                }
            };
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{kind},{endpoint},{per},{ratio},{},{}",
                format_ms(w.start),
                format_ms(w.end),
                w.credit_type.as_str(),
                w.apollo_delta.map(credits).unwrap_or_default(),
                credits(w.metered),
                credits(w.unmetered),
                w.calls,
                credits(explained),
                credits(outside),
            );
        }
        out
    }

    fn to_table(&self) -> String {
        let analysis = analyze(&self.windows);
        let mut out = String::new();
        let range = if self.since_ms <= 0 {
            format!("all time to {}", format_ms(self.until_ms))
        } else {
            format!(
                "{} to {}",
                format_ms(self.since_ms),
                format_ms(self.until_ms)
            )
        };
        let _ = writeln!(
            out,
            "Reconciliation: Apollo's credit balance against the ledger, {range}"
        );
        let distinct = self
            .windows
            .iter()
            .map(|w| (w.start, w.end))
            .collect::<BTreeSet<_>>()
            .len();
        let _ = write!(
            out,
            "{distinct} windows settled, {} snapshots in range",
            self.snapshots
        );
        if let Some(last) = self.last_snapshot {
            let _ = write!(out, ", last snapshot {}", format_ms(last));
        }
        let resets = self.resets();
        if resets > 0 {
            let _ = write!(
                out,
                "; {resets} credit-cycle reset(s), not counted as drift"
            );
        }
        out.push('\n');
        if let Some(note) = self.note() {
            let _ = writeln!(out, "\n{note}");
            return out;
        }
        out.push('\n');
        if analysis.classes.is_empty() {
            out.push_str("No window in this range where Apollo's balance fell by more than creditmeter saw.\n");
        } else {
            out.push_str("Windows where Apollo's balance fell by more than creditmeter saw:\n\n");
            let header = [
                "window (UTC)",
                "type",
                "apollo",
                "metered",
                "unmetered",
                "calls",
                "looks like",
            ]
            .map(String::from);
            let mut rows: Vec<[String; 7]> = Vec::new();
            for (i, class) in &analysis.classes {
                let w = &self.windows[*i];
                let looks = match class {
                    Class::Outside { reason } => format!("outside the proxy ({reason})"),
                    Class::Catalog { finding, .. } | Class::Mixed { finding, .. } => {
                        window_phrase(class, &analysis.findings[*finding])
                    }
                };
                rows.push([
                    format!("{} -> {}", format_ms(w.start), format_ms(w.end)),
                    w.credit_type.as_str().to_owned(),
                    w.apollo_delta.map(credits).unwrap_or_default(),
                    credits(w.metered),
                    credits(w.unmetered),
                    w.calls.to_string(),
                    looks,
                ]);
            }
            let mut widths = header.clone().map(|h| h.chars().count());
            for r in &rows {
                for (w, c) in widths.iter_mut().zip(r) {
                    *w = (*w).max(c.chars().count());
                }
            }
            let line = |r: &[String; 7]| {
                let mut s = String::new();
                for (i, (c, w)) in r.iter().zip(widths).enumerate() {
                    match i {
                        0 | 1 => {
                            let _ = write!(s, "{c:<w$}  ");
                        }
                        6 => s.push_str(c),
                        _ => {
                            let _ = write!(s, "{c:>w$}  ");
                        }
                    }
                }
                s.trim_end().to_owned() + "\n"
            };
            out.push_str(&line(&header));
            let rule: usize = widths[..6].iter().sum::<usize>() + 12 + 10;
            out.push_str(&"-".repeat(rule));
            out.push('\n');
            for r in &rows {
                out.push_str(&line(r));
            }
        }
        out.push_str("\nTotals over the settled windows (credits):\n");
        for (t, (a, m, u, n)) in self.totals() {
            let _ = writeln!(
                out,
                "  {:<12} apollo {:>10}  metered {:>10}  unmetered {:>10}  ({n} windows)",
                t.as_str(),
                credits(a),
                credits(m),
                credits(u)
            );
        }
        if !self.outside_calls.is_empty() {
            out.push_str("\nCalls Apollo counted that did not pass through creditmeter (usage_stats/api_usage_stats):\n");
            for w in &self.outside_calls {
                let _ = writeln!(out, "  - {}", w.summary());
            }
        }
        let outside = outside_totals(&self.windows, &analysis);
        if !analysis.findings.is_empty() || !outside.is_empty() {
            out.push_str("\nFindings:\n");
            for f in &analysis.findings {
                let _ = writeln!(out, "  - {}", f.summary());
            }
            for (t, (n, milli)) in outside {
                let _ = writeln!(out, "  - {}", outside_summary(t, n, milli));
            }
        }
        out.push_str(
            "\nA window's figures are exact unless calls were in flight at its edges: those are placed on the\n\
             side that explains Apollo's balance, so drift can move between neighbouring windows by at most\n\
             their credits, and sums over consecutive windows are exact.\n",
        );
        out
    }
}

impl CatalogFinding {
    /// One sentence a person can act on.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "catalog error: {} under-prices {} credits: Apollo billed {} more per {} than the rule",
            self.endpoint,
            self.credit_type.as_str(),
            trim3(self.ratio),
            self.per.phrase(),
        );
        if let Some(f) = self.factor {
            let _ = write!(s, " ({}x what the rule priced)", trim3(f));
        } else {
            s.push_str(" (the rule priced nothing)");
        }
        let _ = write!(
            s,
            ", in {} of {} windows with its traffic. Correct its [[endpoint.charge]] in the catalog (catalog.path)",
            self.agreeing, self.with_volume
        );
        if !self.also.is_empty() {
            let _ = write!(
                s,
                "; {} fit(s) as well (their traffic moved in step): vary the mix to tell them apart",
                self.also.join(", ")
            );
        }
        s.push('.');
        s
    }
}

fn window_phrase(class: &Class, f: &CatalogFinding) -> String {
    let base = format!(
        "catalog error: {} (+{} {} per {})",
        f.endpoint,
        trim3(f.ratio),
        f.credit_type.as_str(),
        f.per.phrase()
    );
    match class {
        Class::Mixed { outside, .. } => {
            format!("{base}, and {} outside the proxy", credits(*outside))
        }
        _ => base,
    }
}

/// Per credit type: windows and credits attributed to traffic outside the proxy.
fn outside_totals(windows: &[WindowRow], a: &Analysis) -> BTreeMap<CreditType, (usize, i64)> {
    let mut out = BTreeMap::new();
    for (i, class) in &a.classes {
        let milli = match class {
            Class::Outside { .. } => windows[*i].unmetered,
            Class::Mixed { outside, .. } => *outside,
            Class::Catalog { .. } => continue,
        };
        let e = out.entry(windows[*i].credit_type).or_insert((0, 0));
        e.0 += 1;
        e.1 += milli;
    }
    out
}

fn outside_summary(t: CreditType, windows: usize, milli: i64) -> String {
    format!(
        "outside the proxy: {} {} credits in {windows} window(s) that no proxied traffic explains: calls made to Apollo \
         directly (another integration such as Clay's native one, Apollo's web app, a key used without creditmeter)",
        credits(milli),
        t.as_str()
    )
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn trim3(x: f64) -> String {
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(calls: i64, matched: i64, type_milli: i64) -> Volume {
        Volume {
            calls,
            ok_calls: calls,
            records_matched: matched,
            credits_milli: type_milli,
            type_milli,
        }
    }

    fn win(start: i64, drift: i64, eps: &[(&str, Volume)]) -> WindowRow {
        let metered: i64 = eps.iter().map(|(_, v)| v.type_milli).sum();
        WindowRow {
            credit_type: CreditType::Lead,
            start,
            end: start + 1000,
            cycle_reset: false,
            apollo_delta: Some(metered + drift),
            edge: 0,
            metered,
            unmetered: drift.max(0),
            drift,
            calls: eps.iter().map(|(_, v)| v.calls).sum(),
            by_endpoint: eps.iter().map(|(e, v)| (e.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn drift_with_no_proxied_calls_is_outside_traffic() {
        let ws = vec![
            win(0, 0, &[("people_match", vol(10, 7, 7000))]),
            win(1000, 5000, &[]),
            win(2000, 0, &[("people_match", vol(4, 3, 3000))]),
        ];
        let a = analyze(&ws);
        assert!(a.findings.is_empty());
        assert_eq!(
            a.classes,
            vec![(
                1,
                Class::Outside {
                    reason: "no proxied calls in the window".into()
                }
            )]
        );
    }

    #[test]
    fn drift_proportional_to_one_endpoint_is_a_catalog_error_with_its_ratio() {
        // organizations_enrich priced 0.5 per match where Apollo bills 1; people_match is right.
        // The mix varies from window to window, so only one endpoint fits.
        let ws = vec![
            win(
                0,
                2000,
                &[
                    ("organizations_enrich", vol(6, 4, 2000)),
                    ("people_match", vol(3, 2, 2000)),
                ],
            ),
            win(
                1000,
                500,
                &[
                    ("organizations_enrich", vol(2, 1, 500)),
                    ("people_match", vol(8, 6, 6000)),
                ],
            ),
            win(2000, 0, &[("people_match", vol(5, 5, 5000))]),
            win(3000, 3500, &[("organizations_enrich", vol(9, 7, 3500))]),
            // Plus 4 credits out of band while the catalog error runs.
            win(4000, 5000, &[("organizations_enrich", vol(3, 2, 1000))]),
        ];
        let a = analyze(&ws);
        assert_eq!(a.findings.len(), 1, "{a:?}");
        let f = &a.findings[0];
        assert_eq!(
            (f.endpoint.as_str(), f.per),
            ("organizations_enrich", Per::MatchedRecord)
        );
        assert!((f.ratio - 0.5).abs() < 1e-9, "{f:?}");
        assert!((f.factor.unwrap() - 2.0).abs() < 1e-9, "{f:?}");
        assert_eq!((f.agreeing, f.with_volume), (3, 4));
        assert!(
            f.summary()
                .contains("organizations_enrich under-prices lead"),
            "{}",
            f.summary()
        );
        let kinds: Vec<&Class> = a.classes.iter().map(|(_, c)| c).collect();
        assert_eq!(kinds.len(), 4);
        assert!(matches!(
            kinds[0],
            Class::Catalog {
                explained: 2000,
                ..
            }
        ));
        assert!(
            matches!(
                kinds[3],
                Class::Mixed {
                    explained: 1000,
                    outside: 4000,
                    ..
                }
            ),
            "{:?}",
            kinds[3]
        );
    }

    #[test]
    fn out_of_band_debits_during_traffic_are_not_blamed_on_an_endpoint() {
        let ws = vec![
            win(0, 0, &[("people_match", vol(10, 7, 7000))]),
            win(1000, 5000, &[("people_match", vol(10, 6, 6000))]),
            win(2000, 0, &[("people_match", vol(10, 8, 8000))]),
            win(3000, 0, &[("people_match", vol(10, 5, 5000))]),
        ];
        let a = analyze(&ws);
        assert!(a.findings.is_empty(), "{a:?}");
        assert!(
            matches!(&a.classes[..], [(1, Class::Outside { reason })] if reason.contains("does not follow"))
        );
    }

    #[test]
    fn endpoints_whose_traffic_moved_in_step_are_named_together() {
        let ws: Vec<WindowRow> = (1..=3)
            .map(|n| {
                win(
                    n * 1000,
                    n * 1000,
                    &[
                        ("a_enrich", vol(n, n, 0)),
                        ("b_enrich", vol(2 * n, 2 * n, 0)),
                    ],
                )
            })
            .collect();
        let a = analyze(&ws);
        assert_eq!(a.findings.len(), 1);
        assert_eq!(a.findings[0].also.len(), 1, "{:?}", a.findings[0]);
        assert_eq!(a.findings[0].factor, None);
        assert!(a.findings[0].summary().contains("priced nothing"));
    }

    #[test]
    fn resets_are_never_listed_and_times_keep_their_milliseconds() {
        let mut w = win(0, 9000, &[]);
        w.cycle_reset = true;
        assert!(analyze(&[w]).classes.is_empty());
        assert_eq!(format_ms(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(format_ms(1_700_000_000_200), "2023-11-14T22:13:20.200Z");
    }
}
