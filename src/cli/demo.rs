//! `creditmeter demo`: the simulator and the proxy on ephemeral ports, a few thousand calls from
//! simulated Clay tables (one of them a heavy spender), then the spend report.
//!
//! Before the live calls it backfills 30 days of history straight into the ledger (the
//! synthetic generator `sim-ledger` uses, rollups kept by the same triggers), with one burst
//! hidden in it: one table spending a few thousand credits within one hour of one day. After
//! the live report it tells the month's story: who spent what, when (the spike, found by the
//! `report --spikes` rule, with its hour and table) and what was spent enriching the same
//! people again (`report --repeats`).
//!
//! The workload and its driver live in `creditmeter_sim::workload`.

use std::path::PathBuf;
use std::process::ExitCode;

use tokio::net::TcpListener;

use creditmeter::config::{Config, EmbeddedKey, HumanDuration};
use creditmeter::ledger::queries::GroupBy;
use creditmeter::ledger::queries::{floor_to, Window, HOUR_MS};
use creditmeter::report::{self, Format, ReportRequest, View};
use creditmeter_sim::synth::{self, Burst, SynthOptions};
use creditmeter_sim::workload::{drive, workload};
use creditmeter_sim::{Sim, SimConfig};

use super::runtime;

/// Options of `creditmeter demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub calls: usize,
    pub concurrency: usize,
    pub dir: Option<PathBuf>,
    /// Keep serving after the report until Ctrl-C, so the metrics can be looked at.
    pub hold: bool,
}

/// How long the simulator's phone-reveal jobs run in the demo.
const DEMO_JOB_DELAY: std::time::Duration = std::time::Duration::from_secs(1);
/// The key settlement polls the simulator with (the simulator accepts any key).
const DEMO_SETTLE_KEY: &str = "demo-master-key";
/// How long the demo waits for the pending charges to settle before it reports anyway.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Background calls the demo backfills over the last 30 days.
const BACKFILL_ROWS: u64 = 20_000;
/// Days of backfilled history.
const BACKFILL_DAYS: u32 = 30;
/// The table the hidden burst runs in, and how big it is.
pub const BURST_TABLE: &str = "Event attendees";
const BURST_CREDITS: i64 = 2_400;
/// The burst runs this many days before today, at this UTC hour, for this many minutes.
const BURST_DAYS_AGO: i64 = 9;
const BURST_HOUR: i64 = 14;
const BURST_MINUTES: u32 = 40;

/// The hidden burst for a demo run at `now_ms`: `BURST_DAYS_AGO` days before today, at
/// `BURST_HOUR`:10 UTC.
pub fn burst_at(now_ms: i64) -> Burst {
    Burst {
        at_ms: floor_to(now_ms, 24 * HOUR_MS) - BURST_DAYS_AGO * 24 * HOUR_MS
            + BURST_HOUR * HOUR_MS
            + 10 * 60_000,
        table: BURST_TABLE.to_owned(),
        credits: BURST_CREDITS,
        minutes: BURST_MINUTES,
    }
}

/// Writes 30 days of synthetic history, ending at the current hour, into a new ledger.
fn backfill(db: &std::path::Path, now_ms: i64) -> anyhow::Result<synth::SynthSummary> {
    if db.exists() {
        anyhow::bail!(
            "{} already exists; the demo backfills a new ledger (pass another --dir)",
            db.display()
        );
    }
    let mut conn =
        creditmeter::ledger::open_for_write(db, creditmeter::config::Synchronous::Normal)?;
    Ok(synth::generate(
        &mut conn,
        &SynthOptions {
            rows: BACKFILL_ROWS,
            days: BACKFILL_DAYS,
            end_ms: now_ms,
            seed: 17,
            bursts: vec![burst_at(now_ms)],
            batch: 10_000,
        },
        |_| {},
    )?)
}

/// Indents every line by two spaces (the month's story sits under its headings).
fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// The month's story: who spent what, when, and on what twice.
fn story(db: &std::path::Path, now_ms: i64, burst: &Burst) -> anyhow::Result<String> {
    // The backfilled history: the 30 days up to the current hour, where the live calls begin.
    let until = floor_to(now_ms, HOUR_MS);
    let since = until - i64::from(BACKFILL_DAYS) * 24 * HOUR_MS;
    let mut out = String::new();
    out.push_str(&format!(
        "\nThe {BACKFILL_DAYS} days before the live calls: history backfilled straight into the ledger ({BACKFILL_ROWS} synthetic calls from the sim-ledger generator, not sent through the proxy). Who spent what:\n\n"
    ));
    let by_table = ReportRequest {
        db: db.to_owned(),
        by: GroupBy::Table,
        since_ms: since,
        until_ms: until,
        top: Some(8),
        format: Format::Table,
        ..ReportRequest::default()
    };
    out.push_str(&indent(&report::run(&by_table)?));
    let spikes = ReportRequest {
        db: db.to_owned(),
        by: GroupBy::Table,
        since_ms: since,
        until_ms: until,
        view: View::Spikes,
        bucket_ms: HOUR_MS,
        top: Some(3),
        format: Format::Json,
        ..ReportRequest::default()
    };
    let doc: serde_json::Value = serde_json::from_str(&report::run(&spikes)?)?;
    out.push_str("\nWhen: the hours that spent far above their usual (report --spikes):\n\n");
    let found = doc["spikes"].as_array().cloned().unwrap_or_default();
    if found.is_empty() {
        out.push_str("  no spike found\n");
    }
    // Biggest first: the hidden burst should lead.
    let mut found = found;
    found.sort_by(|a, b| {
        b["credits_milli"]
            .as_i64()
            .unwrap_or(0)
            .cmp(&a["credits_milli"].as_i64().unwrap_or(0))
    });
    for s in found.iter().take(3) {
        let top = &s["top"][0];
        let milli = |v: &serde_json::Value| (v.as_f64().unwrap_or(0.0) * 1000.0).round() as i64;
        out.push_str(&format!(
            "  spike: {} to {}, {} credits (usually {}); top table {} with {} credits\n",
            s["start"].as_str().unwrap_or("?"),
            s["end"].as_str().unwrap_or("?"),
            report::credits(milli(&s["credits"])),
            report::credits(milli(&s["usual_credits"])),
            top["key"].as_str().unwrap_or("?"),
            report::credits(milli(&top["credits"])),
        ));
    }
    out.push_str(&format!(
        "  (the demo hid one: {} credits in table {} from {}, over {} minutes)\n",
        burst.credits,
        burst.table,
        report::format_time(burst.at_ms),
        burst.minutes
    ));
    let conn = creditmeter::ledger::open_for_read(db)?;
    let repeats = report::repeats::compute(
        &conn,
        Window {
            since_ms: since,
            until_ms: until,
        },
        report::repeats::DEFAULT_WITHIN_MS,
    )?;
    out.push_str("\nWaste: credits spent enriching the same people or companies again within 30 days (report --repeats):\n\n");
    for p in repeats.pairs.iter().take(5) {
        out.push_str(&format!("  {}\n", report::repeats::summary(p)));
    }
    out.push_str(&format!(
        "  In all: {} credits on {} re-enrichments.\n",
        report::credits(repeats.total_credits_milli),
        repeats.total_items
    ));
    Ok(out)
}

/// Deferred credits not yet settled, from the ledger.
fn pending_milli(db: &std::path::Path) -> anyhow::Result<i64> {
    use creditmeter::ledger::SettleStore;
    let store = creditmeter::ledger::SqliteStore::open_read(db)?;
    Ok(store
        .pending_charges()?
        .iter()
        .map(|c| c.deferred_milli)
        .sum())
}

/// Runs the demo and returns what to print.
pub async fn run_demo(opts: DemoOptions) -> anyhow::Result<String> {
    let dir = opts.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("creditmeter-demo-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("ledger.db");
    let now = creditmeter::meter::now_ms();
    let burst = burst_at(now);
    let backfilled = backfill(&db, now)?;

    // Phone-reveal jobs end a second after their call, as Apollo's do (later), so the demo shows
    // their credits pending first, then settled.
    let sim = Sim::new(SimConfig {
        rate_limit_minute: 0,
        job_delay: DEMO_JOB_DELAY,
        ..SimConfig::default()
    });
    let sim_listener = TcpListener::bind("127.0.0.1:0").await?;
    let sim_addr = sim_listener.local_addr()?;
    let (sim_stop, sim_stopped) = tokio::sync::oneshot::channel::<()>();
    let sim_task = {
        let sim = sim.clone();
        tokio::spawn(async move {
            sim.serve(sim_listener, None, async {
                let _ = sim_stopped.await;
            })
            .await
        })
    };

    let mut config = Config::default();
    config.upstream.base_url = format!("http://{sim_addr}");
    config.ledger.path = db.clone();
    // No load balancer watches the demo's /readyz: stop at once.
    config.shutdown.drain_delay = HumanDuration(std::time::Duration::ZERO);
    // Settlement polls the simulator's webhook_result with a key of its own (any key works
    // there), starting soon after each call instead of the default 20s.
    config.settle.embedded_key = Some(EmbeddedKey(DEMO_SETTLE_KEY.to_owned()));
    config.settle.first_poll = HumanDuration(DEMO_JOB_DELAY / 2);
    let proxy_listener = TcpListener::bind("127.0.0.1:0").await?;
    let admin_listener = TcpListener::bind("127.0.0.1:0").await?;
    let proxy_addr = proxy_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(creditmeter::run(
        config,
        proxy_listener,
        admin_listener,
        async {
            let _ = stopped.await;
        },
    ));

    let started = std::time::Instant::now();
    let live_since = creditmeter::meter::now_ms();
    let stats = drive(
        proxy_addr,
        "demo-api-key",
        workload(opts.calls),
        opts.concurrency,
    )
    .await;
    let elapsed = started.elapsed();

    let mut out = format!(
        "creditmeter demo: backfilled {} calls over the last {BACKFILL_DAYS} days into the ledger in {:.1}s (synthetic history, written directly, as sim-ledger does)\n",
        backfilled.rows + backfilled.burst_rows,
        backfilled.elapsed.as_secs_f64()
    );
    out.push_str(&format!(
        "creditmeter demo: {} calls through the proxy in {:.1}s ({} failed), simulated Apollo at http://{sim_addr}\n\n",
        stats.completed, elapsed.as_secs_f64(), stats.failed
    ));
    // The live calls only, so the total can be set against what the simulator billed.
    let by_table = ReportRequest {
        db: db.clone(),
        by: GroupBy::Table,
        since_ms: live_since,
        format: Format::Table,
        ..ReportRequest::default()
    };
    let pending = pending_milli(&db)?;
    if pending > 0 {
        out.push_str(&format!(
            "Right after the calls: Apollo bills phone reveals when their job ends, so up to {} credits are pending.\n\n",
            report::credits(pending)
        ));
        out.push_str(&report::run(&by_table)?);
        let waited = std::time::Instant::now();
        while pending_milli(&db)? > 0 && waited.elapsed() < SETTLE_WAIT {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        out.push_str(&format!(
            "\n{:.1}s later, creditmeter has polled the jobs' results (webhook_result) and settled them at the calls' own times:\n\n",
            waited.elapsed().as_secs_f64()
        ));
    }
    out.push_str(&report::run(&by_table)?);
    let billed = sim.billed();
    let billed_total = billed.lead_milli + billed.direct_dial_milli + billed.export_milli;
    out.push_str(&format!(
        "\nThe simulated Apollo billed {} credits in all; the ledger above holds what creditmeter metered.\n",
        billed_total as f64 / 1000.0
    ));
    out.push_str(&story(&db, now, &burst)?);
    out.push_str(&format!(
        "\nLedger:  {}\nConsole: http://{admin_addr}/ui/{}\nMetrics: http://{admin_addr}/metrics\n\nTry:\n  sqlite3 {} \"SELECT table_name, sum(credits_milli)/1000.0 AS credits FROM calls GROUP BY 1 ORDER BY 2 DESC;\"\n  sqlite3 {} \"SELECT * FROM spend_by_hour;\"\n  cargo run --release -- report --db {} --by workflow\n  cargo run --release -- report --db {} --spikes --since 30d\n  cargo run --release -- report --db {} --repeats\n",
        db.display(),
        if opts.hold { "" } else { "   (live only with `demo --hold`)" },
        db.display(),
        db.display(),
        db.display(),
        db.display(),
        db.display(),
    ));
    if opts.hold {
        #[allow(clippy::print_stdout)]
        {
            print!("{out}");
            println!(
                "\nServing: proxy http://{proxy_addr}  admin http://{admin_addr}  (Ctrl-C to stop)"
            );
        }
        out.clear();
        let _ = tokio::signal::ctrl_c().await;
    }
    let _ = stop.send(());
    server.await??;
    let _ = sim_stop.send(());
    let _ = sim_task.await;
    Ok(out)
}

#[derive(clap::Args)]
pub struct Demo {
    /// How many calls to send.
    #[arg(long, default_value_t = 3000)]
    pub calls: usize,
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Where to put the ledger (default: a new temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep serving after the report (metrics stay up) until Ctrl-C.
    #[arg(long)]
    pub hold: bool,
}

impl Demo {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let Demo {
            calls,
            concurrency,
            dir,
            hold,
        } = self;
        let rt = runtime()?;
        let out = rt.block_on(run_demo(DemoOptions {
            calls,
            concurrency,
            dir,
            hold,
        }))?;
        print!("{out}");
        Ok(ExitCode::SUCCESS)
    }
}
