//! `creditmeter demo`: the simulator and the proxy on ephemeral ports, a few thousand calls from
//! simulated Clay tables (one of them a heavy spender), then the spend report.
//!
//! The workload and its driver live in `creditmeter_sim::workload`.

use std::path::PathBuf;
use std::process::ExitCode;

use tokio::net::TcpListener;

use creditmeter::config::{Config, EmbeddedKey, HumanDuration};
use creditmeter::ledger::queries::GroupBy;
use creditmeter::report::{self, Format, ReportRequest};
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
    let stats = drive(
        proxy_addr,
        "demo-api-key",
        workload(opts.calls),
        opts.concurrency,
    )
    .await;
    let elapsed = started.elapsed();

    let mut out = String::new();
    out.push_str(&format!(
        "creditmeter demo: {} calls through the proxy in {:.1}s ({} failed), simulated Apollo at http://{sim_addr}\n\n",
        stats.completed, elapsed.as_secs_f64(), stats.failed
    ));
    let by_table = ReportRequest {
        db: db.clone(),
        by: GroupBy::Table,
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
    out.push_str(&format!(
        "\nLedger:  {}\nMetrics: http://{admin_addr}/metrics{}\n\nTry:\n  sqlite3 {} \"SELECT table_name, sum(credits_milli)/1000.0 AS credits FROM calls GROUP BY 1 ORDER BY 2 DESC;\"\n  sqlite3 {} \"SELECT * FROM spend_by_hour;\"\n  cargo run --release -- report --db {} --by workflow\n",
        db.display(),
        if opts.hold { "" } else { "   (live only with `demo --hold`)" },
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
