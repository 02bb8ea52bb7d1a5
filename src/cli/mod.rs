//! The `creditmeter` command line: one file per subcommand (as mini-redis's `cmd/`), each an
//! argument struct with a `run`. This file holds the command table and what several
//! subcommands share: config loading, the runtime, signals, exit codes, the admin client.
#![allow(clippy::print_stdout)] // this is the CLI's output code

/// The admin API client behind `budgets`, `hold` and `release` (the CLI side, not the guard).
mod admin_client;
mod budgets;
mod check_config;
mod demo;
mod healthcheck;
mod hold;
mod ledger;
mod ledger_bench;
mod release;
mod report;
mod serve;
mod sim_apollo;
mod sim_ledger;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use admin_client::AdminClient;
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use creditmeter::config::Config;
use tracing_subscriber::EnvFilter;

/// Exit code for bad configuration or arguments (EX_USAGE).
pub const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "creditmeter",
    version,
    about = "A metering proxy for Apollo.io: which table burned our credits, and when?"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the proxy (the main job).
    Serve(serve::Serve),
    /// Validate the config and the catalog, and print what is in force.
    CheckConfig(check_config::CheckConfig),
    /// Spend from the ledger: by group, as a burn timeline, or its spikes.
    Report(report::Report),
    /// Ledger maintenance: stats, vacuum, prune, bench.
    Ledger(ledger::LedgerCmd),
    /// Write a realistic synthetic ledger (for benchmarks and trying reports).
    SimLedger(sim_ledger::SimLedger),
    /// A deterministic stand-in for the Apollo API (tests, benchmarks, demos).
    SimApollo(sim_apollo::SimApollo),
    /// Simulator + proxy + simulated Clay traffic in one command, then the report.
    Demo(demo::Demo),
    /// Each budget's spend, reservations and limit in its current window, and the holds in
    /// force (asks the running server's admin API).
    Budgets(budgets::Budgets),
    /// Emergency stop: refuse calls by table, workflow, key fingerprint or tag (globs), or all
    /// calls, until released. Takes effect at once and persists in the ledger.
    Hold(hold::Hold),
    /// Lift a hold: by its id, or by the same scope flags it was placed with.
    Release(release::Release),
    /// Exit 0 if URL answers 2xx (for container health checks).
    Healthcheck(healthcheck::Healthcheck),
}

impl Command {
    /// Runs the subcommand; its exit code, or an error for `main` to print.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Command::Serve(c) => c.run(),
            Command::CheckConfig(c) => c.run(),
            Command::Report(c) => c.run(),
            Command::Ledger(c) => c.run(),
            Command::SimLedger(c) => c.run(),
            Command::SimApollo(c) => c.run(),
            Command::Demo(c) => c.run(),
            Command::Budgets(c) => c.run(),
            Command::Hold(c) => c.run(),
            Command::Release(c) => c.run(),
            Command::Healthcheck(c) => c.run(),
        }
    }
}

/// Where the admin API is, for the commands that use it.
#[derive(clap::Args)]
pub struct AdminArgs {
    /// Config file: `admin.listen` gives the address and `admin.token_env` the token's variable.
    #[arg(long, short, env = "CREDITMETER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Admin API base URL, e.g. http://127.0.0.1:9464 (default: from `admin.listen`).
    #[arg(long)]
    pub admin: Option<String>,
}

/// What a hold covers.
#[derive(clap::Args)]
pub struct ScopeArgs {
    /// Every call, attributed or not.
    #[arg(long)]
    all: bool,
    /// Table name or glob (`Inbound*`).
    #[arg(long)]
    table: Option<String>,
    /// Workflow name or glob.
    #[arg(long)]
    workflow: Option<String>,
    /// API key fingerprint (`key_fp`, as `creditmeter report --by key` shows), or a glob.
    #[arg(long)]
    key: Option<String>,
    /// NAME=VALUE of an X-Meter-Tag-NAME header (VALUE may be a glob); repeatable.
    #[arg(long)]
    tag: Vec<String>,
}

impl ScopeArgs {
    pub fn to_json(&self) -> Result<Option<serde_json::Value>, String> {
        admin_client::scope_json(
            self.all,
            self.table.clone(),
            self.workflow.clone(),
            self.key.clone(),
            &self.tag,
        )
    }
}

pub fn admin_client(args: &AdminArgs) -> Result<AdminClient, ExitCode> {
    let config = match &args.config {
        Some(p) => load_config(Some(p))?,
        None => Config::default(),
    };
    let base = args
        .admin
        .clone()
        .unwrap_or_else(|| admin_client::admin_url(config.admin.listen));
    Ok(AdminClient::new(&base, config.admin.token()))
}

pub fn usage_code(message: &str) -> ExitCode {
    eprintln!("creditmeter: {message}");
    ExitCode::from(EX_USAGE)
}

pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,hyper=warn,rustls=warn"));
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn load_config(path: Option<&Path>) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("creditmeter: {e}");
        ExitCode::from(EX_USAGE)
    })
}

/// A message per SIGHUP: reload the config file.
pub fn reload_signal() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!("SIGHUP received: reloading the configuration");
                        // A reload already queued covers this one too.
                        let _ = tx.try_send(());
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP; reloads are disabled"),
        }
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
}

pub fn ledger_path(db: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    Ok(match (db, config) {
        (Some(db), _) => db,
        (None, Some(c)) => load_config(Some(&c))?.ledger.path,
        (None, None) => PathBuf::from(creditmeter::config::DEFAULT_LEDGER_PATH),
    })
}

pub fn usage(msg: impl std::fmt::Display) -> anyhow::Result<ExitCode> {
    eprintln!("creditmeter: {msg}");
    Ok(ExitCode::from(EX_USAGE))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT will stop the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
