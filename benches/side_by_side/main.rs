//! Side by side: the Apollo simulator called directly, through nginx (a plain reverse proxy
//! that meters nothing), through creditmeter on its defaults (metering on, durable ledger) and
//! through creditmeter with `proxy.metering = false`. Every scenario runs the targets in
//! alternating rounds on the same machine, and reports figures and ratios.
//!
//! Run it with `bench/run.sh` (installs nginx, raises the open-files limit), or
//! `cargo bench --bench side_by_side -- --help`.

#![allow(clippy::print_stdout)]

mod load;
mod procs;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

use load::{Mix, RunStats};
use procs::{Metering, Service};
use report::{Measured, ScenarioResult};

#[derive(Parser)]
#[command(about = "direct vs nginx vs creditmeter, side by side")]
struct Args {
    /// A short run that proves the harness works end to end (CI). Its figures mean little.
    #[arg(long)]
    smoke: bool,
    /// Rounds per scenario; each round runs every target once, in a rotating order.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds each target runs per round.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Requests per second in the fixed-rate scenario.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Connections in the closed-loop (maximum throughput) and gzip scenarios.
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// Connections the fixed-rate scenario may use (more than it ever needs at a steady rate).
    #[arg(long, default_value_t = 32)]
    rate_conns: usize,
    /// Idle keep-alive connections in the memory scenario.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "rate,max,gzip,idle,ledger"
    )]
    scenarios: Vec<Scenario>,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,nginx,creditmeter,creditmeter-nometer"
    )]
    targets: Vec<Target>,
    /// The nginx binary.
    #[arg(long, default_value = "nginx")]
    nginx: String,
    /// Load-generator threads (they share the machine with the targets and the simulator).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// A setting for the metered creditmeter, `section.key=value` with a TOML value, e.g.
    /// `--set 'ledger.durability="background"'`. Repeatable.
    #[arg(long = "set", value_name = "SETTING")]
    settings: Vec<String>,
    /// Also write every figure as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the working directory (configs, logs, ledger) and print where it is.
    #[arg(long)]
    keep: bool,
    /// `cargo bench` passes this to every benchmark binary.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Fixed moderate rate: added latency at p50/p99/p99.9.
    Rate,
    /// Closed loop, `--conns` connections: maximum throughput.
    Max,
    /// Closed loop on large gzip answers that creditmeter inflates to price.
    Gzip,
    /// `--idle` keep-alive connections held open: memory per connection.
    Idle,
    /// The ledger writer alone: rows/s it sustains in group commits.
    Ledger,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
pub enum Target {
    Direct,
    Nginx,
    Creditmeter,
    CreditmeterNometer,
}

impl Target {
    pub fn label(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Nginx => "nginx",
            Target::Creditmeter => "creditmeter",
            Target::CreditmeterNometer => "creditmeter, metering off",
        }
    }
}

/// The simulator and the proxies in front of it.
struct Lab {
    dir: tempfile::TempDir,
    sim: Service,
    nginx: Option<Service>,
    metered: Option<Service>,
    unmetered: Option<Service>,
}

impl Lab {
    fn service(&self, t: Target) -> Option<&Service> {
        match t {
            Target::Direct => None,
            Target::Nginx => self.nginx.as_ref(),
            Target::Creditmeter => self.metered.as_ref(),
            Target::CreditmeterNometer => self.unmetered.as_ref(),
        }
    }

    fn addr(&self, t: Target) -> Result<std::net::SocketAddr> {
        match t {
            Target::Direct => Ok(self.sim.addr),
            _ => self
                .service(t)
                .map(|s| s.addr)
                .context("target not started"),
        }
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("side_by_side: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(mut args: Args) -> Result<()> {
    if args.smoke {
        args.rounds = 1;
        args.secs = 1.0;
        args.rate = 200.0;
        args.idle = args.idle.min(100);
        args.conns = args.conns.min(16);
    }
    if args.targets.first() != Some(&Target::Direct) {
        args.targets.retain(|t| *t != Target::Direct);
        args.targets.insert(0, Target::Direct);
    }
    let wants_idle = args.scenarios.contains(&Scenario::Idle);
    if wants_idle {
        let need = (args.idle * 2 + 256) as u64;
        match procs::open_files_limit() {
            Some(have) if have < need => bail!(
                "the open-files limit is {have}, and {} idle connections need about {need}: run `ulimit -n 65536` first (bench/run.sh does), or pass --idle",
                args.idle
            ),
            _ => {}
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;

    let dir = tempfile::Builder::new()
        .prefix("creditmeter-bench-")
        .tempdir()?;
    let nginx_version = if args.targets.contains(&Target::Nginx) {
        procs::nginx_version(&args.nginx)?
    } else {
        String::new()
    };
    let sim = procs::start_sim(dir.path())?;
    let mut lab = Lab {
        sim,
        nginx: None,
        metered: None,
        unmetered: None,
        dir,
    };
    for t in args.targets.clone() {
        let svc = start_target(t, lab.dir.path(), lab.sim.addr, &args)?;
        match t {
            Target::Direct => {}
            Target::Nginx => lab.nginx = svc,
            Target::Creditmeter => lab.metered = svc,
            Target::CreditmeterNometer => lab.unmetered = svc,
        }
    }

    println!("# creditmeter side-by-side benchmark");
    println!();
    println!("- machine: {}", procs::machine());
    if !nginx_version.is_empty() {
        println!(
            "- {nginx_version}, `worker_processes auto`, upstream keepalive 128, access log off"
        );
    }
    println!(
        "- creditmeter {} on its defaults (metering on, ledger.durability = \"commit\", WAL, synchronous = normal)",
        env!("CARGO_PKG_VERSION")
    );
    println!(
        "- load: {} rounds × {}s per target per scenario, targets in rotating order, {} load-generator threads on the same machine",
        args.rounds, args.secs, args.threads
    );
    for setting in &args.settings {
        println!("- creditmeter (metered) with `{setting}`");
    }
    if args.smoke {
        println!("- SMOKE RUN: too short for its figures to mean anything");
    }
    println!();

    rt.block_on(fidelity(&lab, &args.targets))?;

    let mut results = Vec::new();
    let dur = Duration::from_secs_f64(args.secs);
    for scenario in args.scenarios.clone() {
        let result = match scenario {
            Scenario::Rate => {
                let mix = Arc::new(Mix::apollo());
                let title = format!(
                    "Fixed rate: {} req/s, open loop (coordinated omission corrected), mix of people/match, bulk_match and company search",
                    args.rate
                );
                let (rate, conns) = (args.rate, args.rate_conns);
                rounds(&rt, &lab, &args, "rate", title, &mix, |addr, mix| {
                    load::open_loop(addr, mix, rate, dur, conns)
                })?
            }
            Scenario::Max => {
                let mix = Arc::new(Mix::apollo());
                let title = format!(
                    "Maximum throughput: closed loop, {} connections, same mix",
                    args.conns
                );
                let conns = args.conns;
                rounds(&rt, &lab, &args, "max", title, &mix, |addr, mix| {
                    load::closed_loop(addr, mix, dur, conns)
                })?
            }
            Scenario::Gzip => {
                let mix = Arc::new(Mix::gzip_search());
                let conns = (args.conns / 4).max(1);
                let title = format!(
                    "Large gzip answers: company search of 100 (gzip on the wire, inflated by creditmeter to price), closed loop, {conns} connections"
                );
                rounds(&rt, &lab, &args, "gzip", title, &mix, |addr, mix| {
                    load::closed_loop(addr, mix, dur, conns)
                })?
            }
            Scenario::Idle => rt.block_on(idle(&lab, &args))?,
            Scenario::Ledger => ledger_capacity(&lab)?,
        };
        result.print();
        results.push(result);
    }
    report::print_targets(&results);
    if args.keep {
        let Lab { dir, .. } = lab;
        println!("working directory kept: {}", dir.keep().display());
    }
    if let Some(path) = &args.json {
        let json = report::json(&results, &procs::machine(), &nginx_version, args.smoke);
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

/// Starts the proxy of target `t` in `dir` in front of the simulator (none for direct).
fn start_target(
    t: Target,
    dir: &std::path::Path,
    sim: std::net::SocketAddr,
    args: &Args,
) -> Result<Option<Service>> {
    Ok(Some(match t {
        Target::Direct => return Ok(None),
        Target::Nginx => procs::start_nginx(dir, &args.nginx, sim)?,
        Target::Creditmeter => {
            procs::start_creditmeter(dir, sim, Metering::Durable, &args.settings)?
        }
        Target::CreditmeterNometer => procs::start_creditmeter(dir, sim, Metering::Off, &[])?,
    }))
}

/// Before any timing: every proxy must hand back exactly what the simulator answers.
async fn fidelity(lab: &Lab, targets: &[Target]) -> Result<()> {
    for mix in [Mix::apollo(), Mix::gzip_search()] {
        for (k, kind) in mix.kinds.iter().enumerate() {
            let i = (0..20u64)
                .find(|i| mix.request(*i, "x").0 == k)
                .unwrap_or(0);
            let direct_addr = lab.addr(Target::Direct)?;
            let (status, headers, body) =
                load::fetch(direct_addr, mix.request(i, &direct_addr.to_string()).1).await?;
            for t in targets.iter().copied().filter(|t| *t != Target::Direct) {
                let addr = lab.addr(t)?;
                let (s, h, b) = load::fetch(addr, mix.request(i, &addr.to_string()).1).await?;
                let same_head = s == status
                    && ["content-type", "content-encoding"]
                        .iter()
                        .all(|k| h.get(*k) == headers.get(*k));
                if !same_head || comparable(&b, &h)? != comparable(&body, &headers)? {
                    bail!(
                        "{} changed the answer to {}: HTTP {s} with {} body bytes, where the simulator answered HTTP {status} with {} bytes",
                        t.label(),
                        kind.name,
                        b.len(),
                        body.len()
                    );
                }
                if t == Target::Creditmeter && h.get("x-meter-request-id").is_none() {
                    bail!(
                        "creditmeter answered {} without X-Meter-Request-Id: was it metered?",
                        kind.name
                    );
                }
            }
            println!(
                "- answers identical through every target (apart from Apollo's per-call request_id): {} ({} body bytes{})",
                kind.name,
                body.len(),
                if headers.get("content-encoding").is_some() { ", gzip" } else { "" }
            );
        }
    }
    println!();
    Ok(())
}

/// An answer's JSON without Apollo's per-call `request_id`, inflated first when gzipped.
fn comparable(body: &[u8], headers: &http::HeaderMap) -> Result<serde_json::Value> {
    let plain = if headers.get("content-encoding").is_some_and(|v| v == "gzip") {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(body), &mut out)
            .context("inflating a gzip answer")?;
        out
    } else {
        body.to_vec()
    };
    let mut json: serde_json::Value =
        serde_json::from_slice(&plain).context("an answer that is not JSON")?;
    if let Some(map) = json.as_object_mut() {
        map.remove("request_id");
    }
    Ok(json)
}

/// Runs one load `rounds` times against every target, in rotating order, and measures each run.
fn rounds<F, Fut>(
    rt: &tokio::runtime::Runtime,
    lab: &Lab,
    args: &Args,
    key: &'static str,
    title: String,
    mix: &Arc<Mix>,
    load: F,
) -> Result<ScenarioResult>
where
    F: Fn(std::net::SocketAddr, Arc<Mix>) -> Fut,
    Fut: std::future::Future<Output = Result<RunStats>>,
{
    let targets = &args.targets;
    let mut rows: Vec<Option<Measured>> = targets.iter().map(|_| None).collect();
    for round in 0..args.rounds {
        for n in 0..targets.len() {
            let idx = (n + round) % targets.len();
            let t = targets[idx];
            let addr = lab.addr(t)?;
            let m = rt.block_on(measure(lab, t, load(addr, mix.clone())))?;
            match &mut rows[idx] {
                Some(sum) => sum.merge(&m)?,
                slot => *slot = Some(m),
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let kinds = mix.kinds.iter().map(|k| k.name).collect();
    Ok(ScenarioResult::load(
        key,
        title,
        kinds,
        targets
            .iter()
            .copied()
            .zip(rows.into_iter().flatten())
            .collect(),
    ))
}

/// One run with the target's CPU time, peak memory and ledger rows around it.
async fn measure<Fut>(lab: &Lab, t: Target, run: Fut) -> Result<Measured>
where
    Fut: std::future::Future<Output = Result<RunStats>>,
{
    let svc = lab.service(t);
    let ledger = (t == Target::Creditmeter).then(|| procs::ledger_path(lab.dir.path()));
    let rows_before = ledger.as_deref().map(procs::ledger_rows).transpose()?;
    let cpu_before = svc.map(Service::cpu_secs);
    let pids: Vec<u32> = svc.map(|s| s.pids.clone()).unwrap_or_default();
    let peak = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop, pids) = (peak.clone(), stop.clone(), pids.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let rss: u64 = pids
                    .iter()
                    .filter_map(|p| procs::status_kib(*p, "VmRSS:"))
                    .sum();
                peak.fetch_max(rss, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let stats = run.await;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let stats = stats?;
    let rows = match (ledger.as_deref(), rows_before) {
        (Some(path), Some(before)) => Some(procs::ledger_rows(path)? - before),
        _ => None,
    };
    Ok(Measured {
        cpu_secs: svc
            .map(Service::cpu_secs)
            .zip(cpu_before)
            .map(|(a, b)| a - b),
        peak_rss_kib: (!pids.is_empty()).then(|| peak.load(Ordering::Relaxed)),
        ledger_rows: rows,
        stats,
    })
}

/// Memory per idle keep-alive connection, on freshly started proxies (so what the allocator
/// kept from the load scenarios does not count as connection memory): RSS before, with `--idle`
/// connections open (each having answered one call), and whether they all still answer
/// afterwards. What the long-running processes hold after the load scenarios is reported too.
async fn idle(lab: &Lab, args: &Args) -> Result<ScenarioResult> {
    let mix = Arc::new(Mix::apollo());
    let mut rows = Vec::new();
    let mut after_load = Vec::new();
    let fresh_dir = lab.dir.path().join("idle");
    std::fs::create_dir_all(&fresh_dir)?;
    for t in args
        .targets
        .iter()
        .copied()
        .filter(|t| *t != Target::Direct)
    {
        if let Some(svc) = lab.service(t) {
            after_load.push((t, svc.rss_kib()));
        }
        let Some(fresh) = start_target(t, &fresh_dir, lab.sim.addr, args)? else {
            continue;
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = fresh.rss_kib();
        let conns = load::open_idle(fresh.addr, mix.clone(), args.idle).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let with = fresh.rss_kib();
        let alive = load::touch_all(conns, mix.clone(), fresh.addr).await;
        rows.push(report::IdleRow {
            target: t,
            before_kib: before,
            with_kib: with,
            conns: args.idle,
            alive,
        });
    }
    Ok(ScenarioResult::idle(
        format!(
            "{} idle keep-alive connections (freshly started proxies)",
            args.idle
        ),
        rows,
        after_load,
    ))
}

/// The ledger writer on its own, through `creditmeter ledger bench`: a burst of rows in group
/// commits, as a busy proxy produces them.
fn ledger_capacity(lab: &Lab) -> Result<ScenarioResult> {
    let db = lab.dir.path().join("ledger-capacity.db");
    let exe = procs::CREDITMETER;
    let status = std::process::Command::new(exe)
        .args(["sim-ledger", "--rows", "20000", "--days", "2", "--db"])
        .arg(&db)
        .output()?;
    if !status.status.success() {
        bail!(
            "sim-ledger failed: {}",
            String::from_utf8_lossy(&status.stderr)
        );
    }
    let mut figures = Vec::new();
    for _ in 0..3 {
        let out = std::process::Command::new(exe)
            .args([
                "ledger",
                "bench",
                "--runs",
                "1",
                "--burst-rows",
                "50000",
                "--db",
            ])
            .arg(&db)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let line = text
            .lines()
            .find(|l| l.starts_with("writer, a burst"))
            .with_context(|| format!("`ledger bench` printed no burst line:\n{text}"))?;
        let rate = line
            .split(" rows/s")
            .next()
            .and_then(|s| s.rsplit(' ').next())
            .and_then(|s| s.parse::<f64>().ok())
            .with_context(|| format!("no rows/s in: {line}"))?;
        figures.push((rate, line.to_owned()));
    }
    Ok(ScenarioResult::ledger(figures))
}
