//! Figures as Markdown tables (ready for BENCHMARKS.md), the targets, and JSON.

use anyhow::Result;
use serde_json::{json, Value};

use crate::load::RunStats;
use crate::Target;

/// One target's runs in one scenario, summed over rounds.
pub struct Measured {
    pub stats: RunStats,
    /// CPU seconds the proxy's processes used (none for direct).
    pub cpu_secs: Option<f64>,
    /// Highest resident memory sampled during the runs, in KiB.
    pub peak_rss_kib: Option<u64>,
    /// Rows creditmeter's ledger gained (metered creditmeter only).
    pub ledger_rows: Option<u64>,
}

impl Measured {
    pub fn merge(&mut self, other: &Measured) -> Result<()> {
        self.stats.merge(&other.stats)?;
        self.cpu_secs = add(self.cpu_secs, other.cpu_secs);
        self.peak_rss_kib = self.peak_rss_kib.max(other.peak_rss_kib);
        self.ledger_rows = add(self.ledger_rows, other.ledger_rows);
        Ok(())
    }

    fn p(&self, q: f64) -> f64 {
        self.stats.hist.value_at_quantile(q) as f64 / 1000.0
    }

    /// CPU seconds per 10,000 answers.
    fn cpu_per_10k(&self) -> Option<f64> {
        self.cpu_secs
            .map(|c| c * 10_000.0 / self.stats.answers().max(1) as f64)
    }

    fn rows_per_sec(&self) -> Option<f64> {
        self.ledger_rows
            .map(|r| r as f64 / self.stats.elapsed.as_secs_f64().max(1e-9))
    }
}

fn add<T: std::ops::Add<Output = T>>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Memory with idle keep-alive connections open, for one proxy.
pub struct IdleRow {
    pub target: Target,
    pub before_kib: u64,
    pub with_kib: u64,
    pub conns: usize,
    pub alive: usize,
}

impl IdleRow {
    fn per_conn_kib(&self) -> f64 {
        (self.with_kib as f64 - self.before_kib as f64) / self.conns.max(1) as f64
    }
}

enum Body {
    Load {
        kinds: Vec<&'static str>,
        rows: Vec<(Target, Measured)>,
    },
    /// Fresh proxies with idle connections, and the RSS the load scenarios' processes kept.
    Idle(Vec<IdleRow>, Vec<(Target, u64)>),
    /// `ledger bench` runs: rows/s and the line it printed.
    Ledger(Vec<(f64, String)>),
}

/// What one scenario measured.
pub struct ScenarioResult {
    key: &'static str,
    title: String,
    body: Body,
}

const PERCENTILES: [(&str, f64); 3] = [("p50", 0.50), ("p99", 0.99), ("p99.9", 0.999)];

impl ScenarioResult {
    pub fn load(
        key: &'static str,
        title: String,
        kinds: Vec<&'static str>,
        rows: Vec<(Target, Measured)>,
    ) -> Self {
        ScenarioResult {
            key,
            title,
            body: Body::Load { kinds, rows },
        }
    }

    pub fn idle(title: String, rows: Vec<IdleRow>, after_load: Vec<(Target, u64)>) -> Self {
        ScenarioResult {
            key: "idle",
            title,
            body: Body::Idle(rows, after_load),
        }
    }

    pub fn ledger(runs: Vec<(f64, String)>) -> Self {
        ScenarioResult {
            key: "ledger",
            title: "Ledger writer alone (`creditmeter ledger bench`, 50,000-row bursts in group commits)".into(),
            body: Body::Ledger(runs),
        }
    }

    fn row(&self, t: Target) -> Option<&Measured> {
        match &self.body {
            Body::Load { rows, .. } => rows.iter().find(|(x, _)| *x == t).map(|(_, m)| m),
            _ => None,
        }
    }

    /// A percentile minus direct's, in ms.
    fn added(&self, t: Target, q: f64) -> Option<f64> {
        Some(self.row(t)?.p(q) - self.row(Target::Direct)?.p(q))
    }

    pub fn print(&self) {
        println!("## {}", self.title);
        println!();
        match &self.body {
            Body::Load { kinds, rows } => print_load(self, kinds, rows),
            Body::Idle(rows, after_load) => {
                println!("| target | RSS before | RSS with connections | per connection | still answering after |");
                println!("|---|---:|---:|---:|---:|");
                for r in rows {
                    println!(
                        "| {} | {:.1} MiB | {:.1} MiB | {:.1} KiB | {}/{} |",
                        r.target.label(),
                        mib(r.before_kib),
                        mib(r.with_kib),
                        r.per_conn_kib(),
                        r.alive,
                        r.conns
                    );
                }
                if !after_load.is_empty() {
                    let held: Vec<String> = after_load
                        .iter()
                        .map(|(t, kib)| format!("{} {:.1} MiB", t.label(), mib(*kib)))
                        .collect();
                    println!();
                    println!("The processes that ran the load scenarios above held, idle, afterwards: {}.", held.join(", "));
                }
            }
            Body::Ledger(runs) => {
                for (_, line) in runs {
                    println!("- {line}");
                }
                println!(
                    "- median: {:.0} rows/s",
                    median(runs.iter().map(|r| r.0).collect())
                );
            }
        }
        println!();
    }
}

fn print_load(s: &ScenarioResult, kinds: &[&'static str], rows: &[(Target, Measured)]) {
    if let Some(direct) = s.row(Target::Direct) {
        let sizes: Vec<String> = kinds
            .iter()
            .zip(&direct.stats.per_kind)
            .filter(|(_, (n, _))| *n > 0)
            .map(|(k, (n, b))| format!("{k} {:.1} KB", *b as f64 / *n as f64 / 1000.0))
            .collect();
        println!("Answer sizes on the wire: {}.", sizes.join(", "));
        println!();
    }
    println!("| target | answers/s | errors | p50 ms | p99 ms | p99.9 ms | added p50 | added p99 | added p99.9 | CPU s per 10k | peak RSS | ledger rows/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (t, m) in rows {
        let added: Vec<String> = PERCENTILES
            .iter()
            .map(|(_, q)| match (t, s.added(*t, *q)) {
                (Target::Direct, _) | (_, None) => "—".into(),
                (_, Some(a)) => format!("{a:+.3}"),
            })
            .collect();
        println!(
            "| {} | {:.0} | {} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {} | {} |",
            t.label(),
            m.stats.rate(),
            m.stats.errors,
            m.p(0.50),
            m.p(0.99),
            m.p(0.999),
            added[0],
            added[1],
            added[2],
            m.cpu_per_10k().map_or("—".into(), |c| format!("{c:.2}")),
            m.peak_rss_kib
                .map_or("—".into(), |k| format!("{:.1} MiB", mib(k))),
            m.rows_per_sec().map_or("—".into(), |r| format!("{r:.0}")),
        );
    }
    println!();
    for (t, m) in rows {
        if let Some(e) = &m.stats.first_error {
            println!(
                "- **{}: {} errors**, the first: {e}",
                t.label(),
                m.stats.errors
            );
        }
        if let Some(r) = m.ledger_rows {
            let answers = m.stats.answers();
            if r == answers {
                println!(
                    "- {}: ledger rows = answers = {r} (every call recorded)",
                    t.label()
                );
            } else {
                println!("- **{}: {r} ledger rows for {answers} answers**", t.label());
            }
        }
    }
    if let (Some(cm), Some(ng)) = (s.row(Target::Creditmeter), s.row(Target::Nginx)) {
        let mut parts = vec![format!(
            "throughput {:.2}×",
            cm.stats.rate() / ng.stats.rate()
        )];
        for (name, q) in PERCENTILES {
            if let (Some(a), Some(b)) = (s.added(Target::Creditmeter, q), s.added(Target::Nginx, q))
            {
                parts.push(format!("added {name} {a:+.3} vs {b:+.3} ms"));
            }
        }
        if let (Some(a), Some(b)) = (cm.cpu_per_10k(), ng.cpu_per_10k()) {
            parts.push(format!("CPU per call {:.2}×", a / b));
        }
        if let (Some(a), Some(b)) = (cm.peak_rss_kib, ng.peak_rss_kib) {
            parts.push(format!("peak RSS {:.2}×", a as f64 / b.max(1) as f64));
        }
        println!("- creditmeter / nginx: {}", parts.join(", "));
    }
    if let (Some(cm), Some(off)) = (
        s.row(Target::Creditmeter),
        s.row(Target::CreditmeterNometer),
    ) {
        let mut parts = vec![format!(
            "throughput {:.2}×",
            cm.stats.rate() / off.stats.rate()
        )];
        for (name, q) in PERCENTILES {
            parts.push(format!("{name} {:+.3} ms", cm.p(q) - off.p(q)));
        }
        if let (Some(a), Some(b)) = (cm.cpu_per_10k(), off.cpu_per_10k()) {
            parts.push(format!("CPU per call {:.2}×", a / b));
        }
        println!(
            "- metering's own cost (creditmeter vs metering off): {}",
            parts.join(", ")
        );
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The four targets, each met or missed, with the figure that decides it.
pub fn print_targets(results: &[ScenarioResult]) {
    let find = |key: &str| results.iter().find(|r| r.key == key);
    let verdict = |ok: bool| if ok { "met" } else { "**MISSED**" };
    println!("## Targets");
    println!();
    if let Some(r) = find("rate") {
        if let (Some(cm), Some(ng)) = (
            r.added(Target::Creditmeter, 0.99),
            r.added(Target::Nginx, 0.99),
        ) {
            println!("- added p99 at the fixed rate no higher than nginx's: creditmeter {cm:+.3} ms, nginx {ng:+.3} ms: {}", verdict(cm <= ng));
        }
    }
    if let Some(r) = find("max") {
        if let (Some(cm), Some(ng)) = (r.row(Target::Creditmeter), r.row(Target::Nginx)) {
            let ratio = cm.stats.rate() / ng.stats.rate();
            println!(
                "- throughput at least 0.8× nginx's (metering and durable ledger on): {:.0} vs {:.0} answers/s = {ratio:.2}×: {}",
                cm.stats.rate(),
                ng.stats.rate(),
                verdict(ratio >= 0.8)
            );
        }
    }
    if let Some(Body::Idle(rows, _)) = find("idle").map(|r| &r.body) {
        if let Some(cm) = rows.iter().find(|r| r.target == Target::Creditmeter) {
            println!(
                "- RSS under 64 MiB at {} keep-alive connections: {:.1} MiB: {}",
                cm.conns,
                mib(cm.with_kib),
                verdict(mib(cm.with_kib) < 64.0 && cm.alive == cm.conns)
            );
        }
    }
    if let Some(Body::Ledger(runs)) = find("ledger").map(|r| &r.body) {
        let m = median(runs.iter().map(|r| r.0).collect());
        println!(
            "- ledger sustaining at least 50k rows/s: median {m:.0} rows/s: {}",
            verdict(m >= 50_000.0)
        );
    }
    println!();
}

/// Every figure, for tools.
pub fn json(results: &[ScenarioResult], machine: &str, nginx: &str, smoke: bool) -> Value {
    let scenarios: Vec<Value> = results
        .iter()
        .map(|r| {
            let body = match &r.body {
                Body::Load { rows, .. } => Value::Array(
                    rows.iter()
                        .map(|(t, m)| {
                            json!({
                                "target": t.label(),
                                "answers_per_sec": m.stats.rate(),
                                "answers": m.stats.answers(),
                                "errors": m.stats.errors,
                                "p50_ms": m.p(0.5), "p99_ms": m.p(0.99), "p999_ms": m.p(0.999),
                                "added_p50_ms": r.added(*t, 0.5),
                                "added_p99_ms": r.added(*t, 0.99),
                                "added_p999_ms": r.added(*t, 0.999),
                                "cpu_secs_per_10k": m.cpu_per_10k(),
                                "peak_rss_kib": m.peak_rss_kib,
                                "ledger_rows": m.ledger_rows,
                                "ledger_rows_per_sec": m.rows_per_sec(),
                            })
                        })
                        .collect(),
                ),
                Body::Idle(rows, after_load) => json!({
                    "after_load_rss_kib": after_load.iter().map(|(t, k)| json!({"target": t.label(), "rss_kib": k})).collect::<Vec<_>>(),
                    "fresh": rows.iter()
                        .map(|x| {
                            json!({
                                "target": x.target.label(), "conns": x.conns, "alive": x.alive,
                                "rss_before_kib": x.before_kib, "rss_with_kib": x.with_kib,
                                "per_conn_kib": x.per_conn_kib(),
                            })
                        })
                        .collect::<Vec<_>>(),
                }),
                Body::Ledger(runs) => {
                    json!({ "rows_per_sec": runs.iter().map(|r| r.0).collect::<Vec<_>>() })
                }
            };
            json!({ "scenario": r.key, "title": r.title, "figures": body })
        })
        .collect();
    json!({ "machine": machine, "nginx": nginx, "smoke": smoke, "scenarios": scenarios })
}
