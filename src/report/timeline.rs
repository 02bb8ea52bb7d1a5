//! The burn timeline (`report --timeline 1h`) and the spikes view (`report --spikes`).
//!
//! Credits are cut into buckets aligned to the unix epoch (1h buckets start on the hour, 1d
//! buckets at UTC midnight), overall and per group (table by default).
//!
//! **The spike rule.** A bucket's *baseline* is the 90th percentile of the same series over the
//! trailing window before it: 24 hours for buckets under an hour, 7 days for buckets under a day,
//! 28 days otherwise (at least 6 buckets). Buckets before the ledger's first hour do not count,
//! and a bucket with less than half its trailing window of history is not judged. A
//! bucket is a **spike** when its credits exceed `factor` × baseline (default 3) *and* are at
//! least `floor` credits above it (default 50). The rule runs on the total and on each group's
//! own series, so a table that jumps is caught even when the total hides it. The 90th
//! percentile over a week of hours sits at the busy hours of ordinary days: the daily rhythm and
//! Monday mornings stay below it, and a burst of a few hours cannot lift it.
//!
//! The timeline JSON: `{"view": "timeline", "bucket", "bucket_ms", "group_by", "window",
//! "filter", "source", "spike_rule", "buckets": [{"start", "start_ms", "calls", "credits",
//! "credits_milli", "baseline_credits", "ratio", "spike", "total_spike", "jumps": [{"key",
//! "credits", "baseline_credits"}], "series": [{"key", "calls", "credits", "credits_milli"}]}],
//! "total", "notes"}`. `baseline_credits` and `ratio` are null without enough history; `spike`
//! is true when the total or any group jumped, `total_spike` when the total did; `series` holds
//! the top groups (`--top`, default 5) when `--by` was given, else it is empty.
//!
//! The spikes JSON: `{"view": "spikes", "bucket", "bucket_ms", "group_by", "window", "filter",
//! "source", "spike_rule", "spikes": [{"start", "end", "start_ms", "end_ms", "buckets", "calls",
//! "credits", "credits_milli", "usual_credits", "total_spike", "peak": {"start", "credits",
//! "baseline_credits", "ratio"}, "top": [{"key", "credits", "credits_milli", "share",
//! "usual_credits", "jumped"}]}], "notes"}`. Consecutive spike buckets form one window;
//! `usual_credits` sums the baselines over the window's buckets; `top` lists the groups that
//! spent most in the window (`--top`, default 5), jumped ones first.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde_json::json;

use super::{
    align, credits, csv_field, filter_json, filter_label, format_time, retention_window, row_json,
    width_label, Format, ReportError, ReportRequest,
};
use crate::ledger::queries::{self, floor_to, SpendRow, Window, HOUR_MS};
use crate::ledger::Reports;

/// When a bucket counts as a spike.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpikeRule {
    /// Credits must exceed `factor` × the trailing baseline. Default 3.
    pub factor: f64,
    /// ...and be at least this many milli-credits above it. Default 50 credits.
    pub floor_milli: i64,
}

impl Default for SpikeRule {
    fn default() -> Self {
        SpikeRule {
            factor: 3.0,
            floor_milli: 50_000,
        }
    }
}

impl SpikeRule {
    fn is_spike(&self, value: i64, baseline: Option<i64>) -> bool {
        match baseline {
            Some(b) => value as f64 > self.factor * b as f64 && value - b >= self.floor_milli,
            None => false,
        }
    }
}

/// The trailing window a baseline looks at, for a bucket width.
pub fn trailing_ms(bucket_ms: i64) -> i64 {
    if bucket_ms < HOUR_MS {
        86_400_000
    } else if bucket_ms < 86_400_000 {
        7 * 86_400_000
    } else {
        28 * 86_400_000
    }
}

/// One series: credits (and calls) per bucket index, with baselines and spike marks.
#[derive(Debug, Clone, Default)]
struct Series {
    key: String,
    credits: Vec<i64>,
    calls: Vec<u64>,
    baseline: Vec<Option<i64>>,
    spike: Vec<bool>,
    /// Credits per bucket including the trailing history before the displayed window.
    full: Vec<i64>,
}

/// A computed timeline over the displayed buckets.
#[derive(Debug, Clone)]
pub struct Timeline {
    pub bucket_ms: i64,
    /// Displayed window: from the bucket boundary at or before `--since` to `--until`.
    pub window: Window,
    /// Bucket starts, displayed only.
    starts: Vec<i64>,
    /// Per displayed bucket: the whole spend.
    totals: Vec<SpendRow>,
    total: Series,
    /// Every group with spend in the displayed window, biggest first.
    groups: Vec<Series>,
    trailing_buckets: usize,
    min_history: usize,
    /// Index of the first displayed bucket in `Series::full`.
    first: usize,
    /// Index of the first bucket of the ledger's history in `Series::full`.
    history_from: usize,
    pub source: &'static str,
    pub notes: Vec<String>,
}

/// The 90th percentile of `values` (nearest rank).
fn p90(values: &[i64], scratch: &mut Vec<i64>) -> i64 {
    scratch.clear();
    scratch.extend_from_slice(values);
    let k = ((values.len() as f64 * 0.9).ceil() as usize).clamp(1, values.len()) - 1;
    *scratch.select_nth_unstable(k).1
}

/// Computes baselines and spike marks for the displayed part (`first..`) of `s`.
fn judge(
    s: &mut Series,
    first: usize,
    history_from: usize,
    n: usize,
    min_history: usize,
    rule: &SpikeRule,
    prune: bool,
) {
    let len = s.credits.len();
    s.baseline = vec![None; len];
    s.spike = vec![false; len];
    let mut scratch = Vec::with_capacity(n);
    for i in first..len {
        // Small values cannot be spikes whatever the baseline (the floor), so skip the work.
        if prune && s.credits[i] < rule.floor_milli {
            continue;
        }
        let lo = i.saturating_sub(n).max(history_from);
        if i < lo || i - lo < min_history {
            continue;
        }
        let b = p90(&s.credits[lo..i], &mut scratch);
        s.baseline[i] = Some(b);
        s.spike[i] = rule.is_spike(s.credits[i], Some(b));
    }
}

/// Computes the timeline (and what the spikes view lists) for `req`.
pub fn compute(store: &dyn Reports, req: &ReportRequest) -> Result<Timeline, ReportError> {
    let w = req.bucket_ms;
    let n = ((trailing_ms(w) / w).max(6)) as usize;
    let min_history = (n / 2).max(3);
    let first_hour = store.first_hour()?;
    let (window, notes) = retention_window(
        store,
        &req.by,
        Window {
            since_ms: req.since_ms,
            until_ms: req.until_ms,
        },
        Some(w),
        req.source,
    )?;
    let mut start = floor_to(window.since_ms, w);
    if let Some(f) = first_hour {
        start = start.max(floor_to(f, w));
    }
    let end = window.until_ms;
    let empty = |notes| Timeline {
        bucket_ms: w,
        window: Window {
            since_ms: start,
            until_ms: end,
        },
        starts: Vec::new(),
        totals: Vec::new(),
        total: Series::default(),
        groups: Vec::new(),
        trailing_buckets: n,
        min_history,
        first: 0,
        history_from: 0,
        source: "rollup",
        notes,
    };
    let Some(first_hour) = first_hour else {
        return Ok(empty(notes));
    };
    if start >= end {
        return Ok(empty(notes));
    }
    let mut history_start = floor_to(first_hour, w);
    // Buckets answered from detail rows look empty where retention deleted them: they are not
    // history a baseline can learn from.
    let from_rollups =
        req.source == queries::Source::Auto && req.by.has_rollup() && w % HOUR_MS == 0;
    if !from_rollups {
        if let Some(d) = store.detail_deleted_before()? {
            history_start = history_start.max(super::ceil_to(d, w));
        }
    }
    let fetch_start = (start - n as i64 * w).max(history_start);
    let agg = store.aggregate(
        Some(&req.by),
        Window {
            since_ms: fetch_start,
            until_ms: end,
        },
        Some(w),
        &req.filter,
        req.source,
    )?;
    let len = ((end - fetch_start + w - 1) / w) as usize;
    if len > super::MAX_BUCKETS {
        return Err(ReportError::TooManyBuckets {
            buckets: len,
            max: super::MAX_BUCKETS,
        });
    }
    let first = ((start - fetch_start) / w) as usize;
    let history_from = ((history_start - fetch_start).max(0) / w) as usize;
    let mut total = Series {
        key: String::new(),
        credits: vec![0; len],
        calls: vec![0; len],
        ..Default::default()
    };
    let mut totals = vec![SpendRow::default(); len];
    let mut groups: BTreeMap<String, Series> = BTreeMap::new();
    for c in &agg.cells {
        let i = ((c.bucket_ms - fetch_start) / w) as usize;
        if i >= len {
            continue;
        }
        totals[i].add(&c.row);
        total.credits[i] += c.row.credits_milli;
        total.calls[i] += c.row.calls;
        let g = groups.entry(c.row.key.clone()).or_insert_with(|| Series {
            key: c.row.key.clone(),
            credits: vec![0; len],
            calls: vec![0; len],
            ..Default::default()
        });
        g.credits[i] += c.row.credits_milli;
        g.calls[i] += c.row.calls;
    }
    judge(
        &mut total,
        first,
        history_from,
        n,
        min_history,
        &req.rule,
        false,
    );
    let mut groups: Vec<Series> = groups
        .into_values()
        .filter(|g| {
            g.credits[first..].iter().any(|&c| c != 0) || g.calls[first..].iter().any(|&c| c != 0)
        })
        .collect();
    for g in &mut groups {
        judge(g, first, history_from, n, min_history, &req.rule, true);
    }
    let cut = |v: &mut Series| {
        v.full = v.credits.clone();
        v.credits.drain(..first);
        v.calls.drain(..first);
        v.baseline.drain(..first);
        v.spike.drain(..first);
    };
    cut(&mut total);
    for g in &mut groups {
        cut(g);
    }
    groups.sort_by(|a, b| {
        b.credits
            .iter()
            .sum::<i64>()
            .cmp(&a.credits.iter().sum::<i64>())
            .then_with(|| a.key.cmp(&b.key))
    });
    let starts = (first..len).map(|i| fetch_start + i as i64 * w).collect();
    Ok(Timeline {
        bucket_ms: w,
        window: Window {
            since_ms: start,
            until_ms: end,
        },
        starts,
        totals: totals.split_off(first),
        total,
        groups,
        trailing_buckets: n,
        min_history,
        first,
        history_from,
        source: agg.source_label(),
        notes,
    })
}

impl Timeline {
    /// True when the total or any group spiked in bucket `i`.
    fn any_spike(&self, i: usize) -> bool {
        self.total.spike[i] || self.groups.iter().any(|g| g.spike[i])
    }

    /// Groups that spiked in bucket `i`, biggest jump first.
    fn jumps(&self, i: usize) -> Vec<&Series> {
        let mut j: Vec<&Series> = self.groups.iter().filter(|g| g.spike[i]).collect();
        j.sort_by_key(|g| std::cmp::Reverse(g.credits[i] - g.baseline[i].unwrap_or(0)));
        j
    }

    /// A group's baseline at displayed bucket `i`, computed when judging skipped it (values
    /// under the floor are never spikes, but the spikes view still shows what is usual).
    fn baseline_of(&self, g: &Series, i: usize) -> Option<i64> {
        if let Some(b) = g.baseline[i] {
            return Some(b);
        }
        let at = self.first + i;
        let lo = at
            .saturating_sub(self.trailing_buckets)
            .max(self.history_from);
        if at < lo || at - lo < self.min_history {
            return None;
        }
        Some(p90(&g.full[lo..at], &mut Vec::new()))
    }

    /// Runs of consecutive spike buckets: `(first, last)` inclusive.
    fn spike_windows(&self) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        for i in 0..self.starts.len() {
            if !self.any_spike(i) {
                continue;
            }
            match out.last_mut() {
                Some((_, last)) if *last + 1 == i => *last = i,
                _ => out.push((i, i)),
            }
        }
        out
    }

    fn grand_total(&self) -> SpendRow {
        let mut t = SpendRow {
            key: "TOTAL".into(),
            ..Default::default()
        };
        for r in &self.totals {
            t.add(r);
        }
        t
    }

    fn rule_json(&self, rule: &SpikeRule) -> serde_json::Value {
        json!({
            "factor": rule.factor,
            "floor_credits": rule.floor_milli as f64 / 1000.0,
            "baseline": "p90",
            "trailing": width_label(trailing_ms(self.bucket_ms)),
            "trailing_buckets": self.trailing_buckets,
            "min_history_buckets": self.min_history,
        })
    }

    fn rule_text(&self, rule: &SpikeRule) -> String {
        format!(
            "spike = more than {}x the trailing baseline (90th percentile of the previous {} buckets, {}) and at least {} credits above it; judged on the total and on each {}",
            rule.factor,
            self.trailing_buckets,
            width_label(trailing_ms(self.bucket_ms)),
            credits(rule.floor_milli),
            "group"
        )
    }
}

fn ratio(value: i64, baseline: Option<i64>) -> Option<f64> {
    match baseline {
        Some(b) if b > 0 => Some(value as f64 / b as f64),
        _ => None,
    }
}

fn opt_credits(v: Option<i64>) -> serde_json::Value {
    v.map_or(serde_json::Value::Null, |b| json!(b as f64 / 1000.0))
}

/// Renders `--timeline`.
pub fn render_timeline(req: &ReportRequest, t: &Timeline) -> String {
    let top = req.top.unwrap_or(5);
    let columns: Vec<&Series> = if req.series_columns {
        t.groups.iter().take(top).collect()
    } else {
        Vec::new()
    };
    let width = width_label(t.bucket_ms);
    let jump_text = |i: usize| -> String {
        let jumps = t.jumps(i);
        let mut s = String::new();
        if t.total.spike[i] {
            s.push_str("!!");
        } else if !jumps.is_empty() {
            s.push('!');
        }
        for g in jumps.iter().take(3) {
            let _ = write!(
                s,
                " {} +{}",
                g.key,
                credits(g.credits[i] - g.baseline[i].unwrap_or(0))
            );
        }
        s
    };
    match req.format {
        Format::Json => {
            let buckets: Vec<serde_json::Value> = (0..t.starts.len())
                .map(|i| {
                    json!({
                        "start": format_time(t.starts[i]),
                        "start_ms": t.starts[i],
                        "calls": t.totals[i].calls,
                        "credits": t.totals[i].credits_milli as f64 / 1000.0,
                        "credits_milli": t.totals[i].credits_milli,
                        "pending_credits": t.totals[i].pending_milli as f64 / 1000.0,
                        "baseline_credits": opt_credits(t.total.baseline[i]),
                        "ratio": ratio(t.total.credits[i], t.total.baseline[i]),
                        "spike": t.any_spike(i),
                        "total_spike": t.total.spike[i],
                        "jumps": t.jumps(i).iter().map(|g| json!({
                            "key": g.key,
                            "credits": g.credits[i] as f64 / 1000.0,
                            "baseline_credits": opt_credits(g.baseline[i]),
                        })).collect::<Vec<_>>(),
                        "series": columns.iter().map(|g| json!({
                            "key": g.key,
                            "calls": g.calls[i],
                            "credits": g.credits[i] as f64 / 1000.0,
                            "credits_milli": g.credits[i],
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let doc = json!({
                "view": "timeline",
                "bucket": width,
                "bucket_ms": t.bucket_ms,
                "group_by": req.by.label(),
                "window": {"since": format_time(t.window.since_ms), "until": format_time(t.window.until_ms)},
                "filter": filter_json(&req.filter),
                "source": t.source,
                "spike_rule": t.rule_json(&req.rule),
                "buckets": buckets,
                "total": row_json(&t.grand_total()),
                "notes": t.notes,
            });
            format!("{doc:#}\n")
        }
        Format::Csv | Format::Focus => {
            let mut out = String::from("bucket,calls,credits,baseline,ratio,spike,jumped");
            for g in &columns {
                let _ = write!(out, ",{}", csv_field(&g.key));
            }
            out.push('\n');
            for i in 0..t.starts.len() {
                let jumped: Vec<&str> = t.jumps(i).iter().map(|g| g.key.as_str()).collect();
                let _ = write!(
                    out,
                    "{},{},{},{},{},{},{}",
                    format_time(t.starts[i]),
                    t.totals[i].calls,
                    credits(t.totals[i].credits_milli),
                    t.total.baseline[i].map(credits).unwrap_or_default(),
                    ratio(t.total.credits[i], t.total.baseline[i])
                        .map(|r| format!("{r:.2}"))
                        .unwrap_or_default(),
                    t.any_spike(i),
                    csv_field(&jumped.join(";")),
                );
                for g in &columns {
                    let _ = write!(out, ",{}", credits(g.credits[i]));
                }
                out.push('\n');
            }
            out
        }
        Format::Table => {
            let mut header: Vec<String> = ["bucket (UTC)", "calls", "credits", "baseline", "ratio"]
                .map(str::to_owned)
                .to_vec();
            header.extend(columns.iter().map(|g| g.key.clone()));
            header.push("spike".into());
            let mut rows = vec![header];
            for i in 0..t.starts.len() {
                let mut r = vec![
                    format_time(t.starts[i]),
                    t.totals[i].calls.to_string(),
                    credits(t.totals[i].credits_milli),
                    t.total.baseline[i]
                        .map(credits)
                        .unwrap_or_else(|| "-".into()),
                    ratio(t.total.credits[i], t.total.baseline[i])
                        .map(|r| format!("{r:.1}"))
                        .unwrap_or_else(|| "-".into()),
                ];
                r.extend(columns.iter().map(|g| credits(g.credits[i])));
                r.push(jump_text(i));
                rows.push(r);
            }
            let total = t.grand_total();
            let mut foot = vec![
                "TOTAL".to_owned(),
                total.calls.to_string(),
                credits(total.credits_milli),
                String::new(),
                String::new(),
            ];
            foot.extend(columns.iter().map(|g| credits(g.credits.iter().sum())));
            foot.push(String::new());
            rows.push(foot);
            // The spike column reads better left-aligned: pad it after aligning the rest.
            let spike_col: Vec<String> = rows
                .iter_mut()
                .map(|r| r.pop().unwrap_or_default())
                .collect();
            let lines = align(&rows);
            let body_width = lines.iter().map(|l| l.chars().count()).max().unwrap_or(0);
            let mut out = format!(
                "Credits per {width}{}, {} ({} by {})\n{}\n!! the total jumped, ! only a {} jumped; +N = credits above its baseline\n\n",
                filter_label(&req.filter),
                super::window_label(t.window),
                t.source,
                req.by.label(),
                t.rule_text(&req.rule),
                req.by.label(),
            );
            let rule = "-".repeat(body_width);
            let n = lines.len();
            for (i, (l, s)) in lines.iter().zip(&spike_col).enumerate() {
                if i == n - 1 {
                    out.push_str(&rule);
                    out.push('\n');
                }
                if s.is_empty() {
                    out.push_str(l);
                } else {
                    let _ = write!(out, "{l:<body_width$}  {s}");
                }
                out.push('\n');
                if i == 0 {
                    out.push_str(&rule);
                    out.push('\n');
                }
            }
            let spikes = (0..t.starts.len()).filter(|&i| t.any_spike(i)).count();
            let _ = writeln!(
                out,
                "{spikes} spike bucket(s); `--spikes` lists them with their top {}s",
                req.by.label()
            );
            for note in &t.notes {
                let _ = writeln!(out, "note: {note}");
            }
            out
        }
    }
}

/// One spike window, summarised.
struct SpikeWindow<'a> {
    first: usize,
    last: usize,
    calls: u64,
    credits: i64,
    usual: i64,
    peak: usize,
    total_spike: bool,
    /// (group, credits in window, usual credits in window, jumped)
    top: Vec<(&'a Series, i64, i64, bool)>,
}

fn spike_windows<'a>(t: &'a Timeline, top: usize) -> Vec<SpikeWindow<'a>> {
    t.spike_windows()
        .into_iter()
        .map(|(first, last)| {
            let range = first..=last;
            let calls = range.clone().map(|i| t.totals[i].calls).sum();
            let credits = range.clone().map(|i| t.total.credits[i]).sum();
            let usual = range
                .clone()
                .map(|i| t.total.baseline[i].unwrap_or(0))
                .sum();
            let peak = range
                .clone()
                .max_by_key(|&i| (t.total.credits[i], std::cmp::Reverse(i)))
                .unwrap_or(first);
            let total_spike = range.clone().any(|i| t.total.spike[i]);
            let jumped: BTreeSet<&str> = range
                .clone()
                .flat_map(|i| t.jumps(i).into_iter().map(|g| g.key.as_str()))
                .collect();
            let mut groups: Vec<(&Series, i64, i64, bool)> = t
                .groups
                .iter()
                .map(|g| {
                    (
                        g,
                        range.clone().map(|i| g.credits[i]).sum::<i64>(),
                        range
                            .clone()
                            .map(|i| t.baseline_of(g, i).unwrap_or(0))
                            .sum::<i64>(),
                        jumped.contains(g.key.as_str()),
                    )
                })
                .filter(|(_, c, _, j)| *c != 0 || *j)
                .collect();
            groups.sort_by(|a, b| {
                b.3.cmp(&a.3)
                    .then(b.1.cmp(&a.1))
                    .then_with(|| a.0.key.cmp(&b.0.key))
            });
            groups.truncate(top.max(jumped.len()));
            SpikeWindow {
                first,
                last,
                calls,
                credits,
                usual,
                peak,
                total_spike,
                top: groups,
            }
        })
        .collect()
}

/// Renders `--spikes`.
pub fn render_spikes(req: &ReportRequest, t: &Timeline) -> String {
    let windows = spike_windows(t, req.top.unwrap_or(5));
    let w = t.bucket_ms;
    let width = width_label(w);
    match req.format {
        Format::Json => {
            let spikes: Vec<serde_json::Value> = windows
                .iter()
                .map(|s| {
                    json!({
                        "start": format_time(t.starts[s.first]),
                        "end": format_time(t.starts[s.last] + w),
                        "start_ms": t.starts[s.first],
                        "end_ms": t.starts[s.last] + w,
                        "buckets": s.last - s.first + 1,
                        "calls": s.calls,
                        "credits": s.credits as f64 / 1000.0,
                        "credits_milli": s.credits,
                        "usual_credits": s.usual as f64 / 1000.0,
                        "total_spike": s.total_spike,
                        "peak": {
                            "start": format_time(t.starts[s.peak]),
                            "credits": t.total.credits[s.peak] as f64 / 1000.0,
                            "baseline_credits": opt_credits(t.total.baseline[s.peak]),
                            "ratio": ratio(t.total.credits[s.peak], t.total.baseline[s.peak]),
                        },
                        "top": s.top.iter().map(|(g, c, u, j)| json!({
                            "key": g.key,
                            "credits": *c as f64 / 1000.0,
                            "credits_milli": c,
                            "share": if s.credits != 0 { Some(*c as f64 / s.credits as f64) } else { None },
                            "usual_credits": *u as f64 / 1000.0,
                            "jumped": j,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let doc = json!({
                "view": "spikes",
                "bucket": width,
                "bucket_ms": w,
                "group_by": req.by.label(),
                "window": {"since": format_time(t.window.since_ms), "until": format_time(t.window.until_ms)},
                "filter": filter_json(&req.filter),
                "source": t.source,
                "spike_rule": t.rule_json(&req.rule),
                "spikes": spikes,
                "notes": t.notes,
            });
            format!("{doc:#}\n")
        }
        Format::Csv | Format::Focus => {
            let mut out = format!(
                "start,end,window_credits,usual_credits,{},credits,share,usual,jumped\n",
                req.by.label()
            );
            for s in &windows {
                for (g, c, u, j) in &s.top {
                    let _ = writeln!(
                        out,
                        "{},{},{},{},{},{},{},{},{}",
                        format_time(t.starts[s.first]),
                        format_time(t.starts[s.last] + w),
                        credits(s.credits),
                        credits(s.usual),
                        csv_field(&g.key),
                        credits(*c),
                        if s.credits != 0 {
                            format!("{:.4}", *c as f64 / s.credits as f64)
                        } else {
                            String::new()
                        },
                        credits(*u),
                        j
                    );
                }
            }
            out
        }
        Format::Table => {
            let mut out = format!(
                "Spikes per {width}{}, {} ({} by {})\n{}\n\n",
                filter_label(&req.filter),
                super::window_label(t.window),
                t.source,
                req.by.label(),
                t.rule_text(&req.rule),
            );
            if windows.is_empty() {
                out.push_str("No spikes in this window.\n");
            }
            for s in &windows {
                let (a, b) = (t.starts[s.first], t.starts[s.last] + w);
                let peak_ratio = ratio(t.total.credits[s.peak], t.total.baseline[s.peak])
                    .map(|r| format!("{r:.1}x"))
                    .unwrap_or_else(|| "n/a".into());
                let _ = writeln!(
                    out,
                    "{} to {}  {} credits in {} calls (usually {}); peak {} at {} ({} the baseline){}",
                    format_time(a),
                    format_time(b),
                    credits(s.credits),
                    s.calls,
                    credits(s.usual),
                    credits(t.total.credits[s.peak]),
                    format_time(t.starts[s.peak]),
                    peak_ratio,
                    if s.total_spike { "" } else { "; the total stayed within its usual range" }
                );
                let mut rows = vec![vec![
                    format!("  {}", req.by.label()),
                    "credits".into(),
                    "share".into(),
                    "usual".into(),
                    String::new(),
                ]];
                for (g, c, u, j) in &s.top {
                    rows.push(vec![
                        format!("  {}", g.key),
                        credits(*c),
                        if s.credits != 0 {
                            format!("{:.1}%", *c as f64 * 100.0 / s.credits as f64)
                        } else {
                            "-".into()
                        },
                        credits(*u),
                        if *j { "JUMPED".into() } else { String::new() },
                    ]);
                }
                for l in align(&rows) {
                    out.push_str(&l);
                    out.push('\n');
                }
                out.push('\n');
            }
            for note in &t.notes {
                let _ = writeln!(out, "note: {note}");
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p90_is_nearest_rank() {
        let mut s = Vec::new();
        let v: Vec<i64> = (1..=10).collect();
        assert_eq!(p90(&v, &mut s), 9);
        assert_eq!(p90(&[5], &mut s), 5);
        let v: Vec<i64> = (1..=168).rev().collect();
        assert_eq!(p90(&v, &mut s), 152);
    }

    #[test]
    fn the_rule_needs_both_the_factor_and_the_floor() {
        let r = SpikeRule::default();
        assert!(r.is_spike(400_000, Some(100_000)));
        assert!(
            !r.is_spike(300_000, Some(100_000)),
            "exactly 3x is not above 3x"
        );
        assert!(!r.is_spike(40_000, Some(0)), "below the 50-credit floor");
        assert!(r.is_spike(50_000, Some(0)));
        assert!(!r.is_spike(1_000_000, None), "no baseline, no judgement");
    }

    #[test]
    fn judging_skips_buckets_without_enough_history() {
        let rule = SpikeRule::default();
        let mut s = Series {
            key: "t".into(),
            credits: vec![1_000; 30],
            calls: vec![1; 30],
            ..Default::default()
        };
        s.credits[5] = 900_000;
        s.credits[25] = 900_000;
        judge(&mut s, 0, 0, 24, 6, &rule, false);
        assert!(!s.spike[5], "only 5 buckets of history");
        assert!(s.spike[25]);
        assert_eq!(s.baseline[25], Some(1_000));
        assert!(!s.spike[26]);
    }
}
