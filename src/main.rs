//! The `creditmeter` command: parse the CLI, load and validate config, init tracing, run.
//! Exit code 64 (EX_USAGE) on bad configuration or arguments, 1 on runtime failure.
#![allow(clippy::print_stdout)] // this is the CLI's output code

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use creditmeter::config::Config;
use creditmeter::guard::client::{self as guard_client, AdminClient};
use creditmeter::report::{self, Format, ReportArgs};
use tracing_subscriber::EnvFilter;

const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "creditmeter",
    version,
    about = "A metering proxy for Apollo.io: which table burned our credits, and when?"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the main job).
    Serve {
        /// Config file (TOML). Without it, every key takes its documented default.
        #[arg(long, short, env = "CREDITMETER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate the config and the catalog, and print what is in force.
    CheckConfig {
        #[arg(long, short, env = "CREDITMETER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Spend from the ledger: by group, as a burn timeline, or its spikes.
    Report {
        /// Ledger file; default: `ledger.path` from --config, else ./creditmeter.db.
        #[arg(long)]
        db: Option<PathBuf>,
        #[arg(long, short, env = "CREDITMETER_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        args: ReportArgs,
        /// Instead of spend: the windows in which Apollo's credit balance fell by more than
        /// creditmeter saw, and whether that looks like traffic outside the proxy or a catalog
        /// error (needs [reconcile] enabled while serving). Honours --since, --until, --format.
        #[arg(long)]
        reconcile: bool,
    },
    /// Ledger maintenance: stats, vacuum, prune, bench.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Write a realistic synthetic ledger (for benchmarks and trying reports).
    SimLedger {
        /// Background calls to write (bursts add their own).
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        /// The new ledger file (it must not exist yet).
        #[arg(long)]
        db: PathBuf,
        /// Days of history, ending at --end.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// End of the history: RFC 3339, a date, or relative (default: now).
        #[arg(long)]
        end: Option<String>,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Hide a burst: `AT[,table=NAME][,credits=N][,minutes=M]` (default table "Runaway
        /// waterfall", 400000 credits over 60 minutes). Repeatable.
        #[arg(long)]
        burst: Vec<String>,
        /// Rows per transaction.
        #[arg(long, default_value_t = 100_000)]
        batch: usize,
    },
    /// A deterministic stand-in for the Apollo API (tests, benchmarks, demos).
    SimApollo {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Calls per minute per endpoint and key before 429 (0 = unlimited).
        #[arg(long, default_value_t = 1000)]
        rate_limit_minute: u32,
        /// Percent of identifiers (emails, domains, searches) that find a record: 0 matches
        /// nothing, 100 everything (benchmarks use 100 for full-size answers).
        #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
        match_rate: u8,
        /// Leave `credits_consumed` out of bulk_match responses.
        #[arg(long)]
        no_credits_consumed: bool,
        /// How long a phone reveal or waterfall job runs before it ends and bills, and
        /// webhook_result answers 200 ("250ms", "2s", "5m").
        #[arg(long, default_value = "2s", value_parser = creditmeter::config::HumanDuration::parse)]
        job_delay: std::time::Duration,
        /// How long a job's result can be polled after it ends; then 410 request_id_expired.
        #[arg(long, default_value = "30d", value_parser = creditmeter::config::HumanDuration::parse)]
        result_ttl: std::time::Duration,
        /// Percent of people a phone reveal finds a mobile number for (8 direct-dial credits each).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u8).range(0..=100))]
        mobile_rate: u8,
        /// Leave `credits_consumed` out of webhook_result answers (the payload is then priced).
        #[arg(long)]
        no_job_credits_consumed: bool,
        /// A unified-credit plan: `usage_stats` shows one shared pool (`lead_credit`) that
        /// every credit type draws from.
        #[arg(long)]
        unified_credits: bool,
        /// Serve HTTPS with this certificate chain (PEM)...
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// ...and this key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Simulator + proxy + simulated Clay traffic in one command, then the report.
    Demo {
        /// How many calls to send.
        #[arg(long, default_value_t = 3000)]
        calls: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Where to put the ledger (default: a new temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep serving after the report (metrics stay up) until Ctrl-C.
        #[arg(long)]
        hold: bool,
    },
    /// Each budget's spend, reservations and limit in its current window, and the holds in
    /// force (asks the running server's admin API).
    Budgets {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, value_enum, default_value = "table")]
        format: BudgetsFormat,
    },
    /// Emergency stop: refuse calls by table, workflow, key fingerprint or tag (globs), or all
    /// calls, until released. Takes effect at once and persists in the ledger.
    Hold {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        scope: ScopeArgs,
        /// Why, shown to refused callers and in `creditmeter budgets`.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a hold: by its id, or by the same scope flags it was placed with.
    Release {
        /// The hold's id (`creditmeter budgets` lists them).
        id: Option<i64>,
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Exit 0 if URL answers 2xx (for container health checks).
    Healthcheck {
        #[arg(default_value = "http://127.0.0.1:9464/healthz")]
        url: String,
    },
}

/// Where the admin API is, for the commands that use it.
#[derive(clap::Args)]
struct AdminArgs {
    /// Config file: `admin.listen` gives the address and `admin.token_env` the token's variable.
    #[arg(long, short, env = "CREDITMETER_CONFIG")]
    config: Option<PathBuf>,
    /// Admin API base URL, e.g. http://127.0.0.1:9464 (default: from `admin.listen`).
    #[arg(long)]
    admin: Option<String>,
}

/// What a hold covers.
#[derive(clap::Args)]
struct ScopeArgs {
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
    fn to_json(&self) -> Result<Option<serde_json::Value>, String> {
        guard_client::scope_json(
            self.all,
            self.table.clone(),
            self.workflow.clone(),
            self.key.clone(),
            &self.tag,
        )
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BudgetsFormat {
    Table,
    Json,
}

fn admin_client(args: &AdminArgs) -> Result<AdminClient, ExitCode> {
    let config = match &args.config {
        Some(p) => load_config(Some(p))?,
        None => Config::default(),
    };
    let base = args
        .admin
        .clone()
        .unwrap_or_else(|| guard_client::admin_url(config.admin.listen));
    Ok(AdminClient::new(&base, config.admin.token()))
}

fn usage_code(message: &str) -> ExitCode {
    eprintln!("creditmeter: {message}");
    ExitCode::from(EX_USAGE)
}

/// Where the ledger is: `--db`, else `ledger.path` from `--config`, else ./creditmeter.db.
#[derive(clap::Args, Clone)]
struct LedgerLocation {
    /// Ledger file.
    #[arg(long)]
    db: Option<PathBuf>,
    #[arg(long, short, env = "CREDITMETER_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// What the ledger holds and how big it is (read-only).
    Stats {
        #[command(flatten)]
        at: LedgerLocation,
        /// Also the size of each table and index (reads every page: slow on big files).
        #[arg(long)]
        sizes: bool,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Truncate the WAL and return free pages to the file system in small steps (safe while
    /// the proxy runs); --full rewrites the whole file (stop the proxy first).
    Vacuum {
        #[command(flatten)]
        at: LedgerLocation,
        #[arg(long)]
        full: bool,
    },
    /// Delete detail rows older than a span now, as ledger.retention does (rollups are kept).
    Prune {
        #[command(flatten)]
        at: LedgerLocation,
        /// e.g. 90d.
        #[arg(long)]
        older_than: String,
    },
    /// Time reports (rollups vs detail rows vs plain SQL) and writer commits on this file.
    /// Appends benchmark rows (table `_bench`) unless --no-writes.
    Bench {
        #[command(flatten)]
        at: LedgerLocation,
        #[arg(long, default_value_t = 500)]
        commits: usize,
        #[arg(long, default_value_t = 20_000)]
        burst_rows: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long)]
        no_writes: bool,
        /// Also time commits while retention deletes rows older than this (e.g. 300d;
        /// destructive).
        #[arg(long, value_name = "KEEP")]
        during_prune: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("creditmeter: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,hyper=warn,rustls=warn"));
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn load_config(path: Option<&Path>) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("creditmeter: {e}");
        ExitCode::from(EX_USAGE)
    })
}

fn dispatch(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Serve { config } => {
            let config_path = config.clone();
            let config = match load_config(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let rt = runtime()?;
            rt.block_on(async {
                let proxy = tokio::net::TcpListener::bind(config.proxy.listen)
                    .await
                    .with_context(|| format!("binding proxy.listen {}", config.proxy.listen))?;
                let admin = tokio::net::TcpListener::bind(config.admin.listen)
                    .await
                    .with_context(|| format!("binding admin.listen {}", config.admin.listen))?;
                let reload = reload_signal();
                match creditmeter::run_with_reload(
                    config,
                    config_path,
                    proxy,
                    admin,
                    shutdown_signal(),
                    reload,
                )
                .await
                {
                    Ok(()) => Ok(ExitCode::SUCCESS),
                    Err(
                        e @ (creditmeter::RunError::Config(_)
                        | creditmeter::RunError::Catalog(_)
                        | creditmeter::RunError::Tls(_)
                        | creditmeter::RunError::Upstream(_)),
                    ) => {
                        eprintln!("creditmeter: {e}");
                        Ok(ExitCode::from(EX_USAGE))
                    }
                    Err(e) => Err(e.into()),
                }
            })
        }
        Command::CheckConfig { config } => {
            let path = config.clone();
            let config = match load_config(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let catalog = match creditmeter::load_catalog(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("creditmeter: catalog: {e}");
                    return Ok(ExitCode::from(EX_USAGE));
                }
            };
            if let (Some(c), Some(k)) = (&config.proxy.tls_cert, &config.proxy.tls_key) {
                if let Err(e) = creditmeter::proxy::listener::tls_acceptor(c, k) {
                    eprintln!("creditmeter: {e}");
                    return Ok(ExitCode::from(EX_USAGE));
                }
            }
            println!(
                "config: {}",
                path.map(|p| p.display().to_string())
                    .unwrap_or_else(|| "(defaults)".into())
            );
            println!(
                "  proxy.listen            {}{}",
                config.proxy.listen,
                if config.proxy.tls_cert.is_some() {
                    " (TLS)"
                } else {
                    ""
                }
            );
            println!(
                "  proxy.metering          {}",
                if config.proxy.metering {
                    "on"
                } else {
                    "OFF: calls are forwarded but nothing is recorded or priced"
                }
            );
            println!("  admin.listen            {}", config.admin.listen);
            println!(
                "  upstream.base_url       {}",
                creditmeter::config::redact_url(&config.upstream.base_url)
            );
            println!(
                "  upstream.ca_file        {}",
                config
                    .upstream
                    .ca_file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "(webpki roots only)".into())
            );
            println!(
                "  upstream.timeout        {} (connect {})",
                config.upstream.timeout, config.upstream.connect_timeout
            );
            println!(
                "  proxy.max_request_body  {}",
                config.proxy.max_request_body
            );
            println!("  ledger.path             {}", config.ledger.path.display());
            println!("  ledger.durability       {:?}", config.ledger.durability);
            println!(
                "  ledger.retention        {}",
                config
                    .ledger
                    .retention
                    .map(|r| format!("detail rows kept {r}, rollups forever"))
                    .unwrap_or_else(|| "keep every detail row".into())
            );
            println!(
                "  attribution.require_table {}",
                config.attribution.require_table
            );
            let r = &config.reconcile;
            if r.enabled {
                println!(
                    "  reconcile               every {} (balance_lag {}, pool {}), master key from ${} ({})",
                    r.interval,
                    r.balance_lag,
                    r.pool.as_str(),
                    r.api_key_env,
                    if r.api_key().is_some() {
                        "set"
                    } else {
                        "NOT SET: polls will fail with no_key"
                    }
                );
            } else {
                println!("  reconcile               off");
            }
            let st = &config.settle;
            let settle_key = match st.resolve() {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("creditmeter: {e}");
                    return Ok(ExitCode::from(EX_USAGE));
                }
            };
            match settle_key {
                Some(_) => println!(
                    "  settle                  on: webhook_result polled from {} after a call, key from ${}, estimate after {}",
                    st.first_poll, st.api_key_env, st.max_wait
                ),
                None => println!(
                    "  settle                  OFF: phone reveals and waterfalls are recorded at the catalog's estimate (set ${} to learn what Apollo bills)",
                    st.api_key_env
                ),
            }
            println!(
                "catalog: {} ({})",
                catalog.version(),
                config
                    .catalog
                    .path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "built-in".into())
            );
            for ep in catalog.endpoints() {
                println!("  {}", ep.name());
            }
            if let Some(rule) = catalog.unmatched_rule() {
                println!("  unmatched: {rule}");
            }
            println!(
                "guard: time_zone {}, unknown_cost_ceiling {} credits, hold_status {}, admission_wait {}",
                config.guard.time_zone,
                config.guard.unknown_cost_ceiling.0 as f64 / 1000.0,
                config.guard.hold_status,
                config.guard.admission_wait
            );
            if config.budget.is_empty() {
                println!("  no budgets");
            }
            for b in &config.budget {
                let limits: Vec<String> = b
                    .limit
                    .entries()
                    .map(|(ty, milli)| format!("{ty} {}", milli as f64 / 1000.0))
                    .collect();
                println!(
                    "  budget {:?}: {} credits per {} ({}), {}, warn at {}%{}",
                    b.name,
                    limits.join(", "),
                    b.window,
                    b.scope,
                    b.action.as_str(),
                    b.warn_at,
                    b.time_zone
                        .as_deref()
                        .map(|z| format!(", time zone {z}"))
                        .unwrap_or_default()
                );
            }
            println!("ok");
            Ok(ExitCode::SUCCESS)
        }
        Command::Report {
            db,
            config,
            args,
            reconcile,
        } => {
            let db = match ledger_path(db, config) {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            let req = match args.resolve(db, creditmeter::meter::now_ms(), Format::Table) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("creditmeter: --{e}");
                    return Ok(ExitCode::from(EX_USAGE));
                }
            };
            if reconcile && req.format == Format::Focus {
                return usage("--format focus is a spend export; --reconcile takes table, csv or json");
            }
            if reconcile {
                print!(
                    "{}",
                    creditmeter::reconcile::answer::report(
                        &creditmeter::reconcile::answer::Request {
                            db: req.db.clone(),
                            since_ms: req.since_ms,
                            until_ms: req.until_ms,
                            format: req.format,
                        }
                    )?
                );
                return Ok(ExitCode::SUCCESS);
            }
            match report::run_to(&req, &mut std::io::stdout().lock()) {
                Ok(()) => {}
                Err(e @ report::ReportError::TooManyBuckets { .. }) => return usage(e),
                Err(e) => return Err(e.into()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ledger { command } => ledger_command(command),
        Command::SimLedger {
            rows,
            db,
            days,
            end,
            seed,
            burst,
            batch,
        } => sim_ledger(rows, db, days, end, seed, burst, batch),
        Command::SimApollo {
            listen,
            seed,
            rate_limit_minute,
            match_rate,
            no_credits_consumed,
            job_delay,
            result_ttl,
            mobile_rate,
            no_job_credits_consumed,
            unified_credits,
            tls_cert,
            tls_key,
        } => {
            let tls = match (tls_cert, tls_key) {
                (Some(c), Some(k)) => Some(creditmeter::proxy::listener::tls_acceptor(&c, &k)?),
                _ => None,
            };
            let rt = runtime()?;
            rt.block_on(async {
                let sim = creditmeter::sim::Sim::new(creditmeter::sim::SimConfig {
                    seed,
                    rate_limit_minute,
                    match_rate_pct: match_rate,
                    report_credits_consumed: !no_credits_consumed,
                    job_delay,
                    result_ttl,
                    mobile_rate_pct: mobile_rate,
                    report_job_credits_consumed: !no_job_credits_consumed,
                    unified_credits,
                    ..Default::default()
                });
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("binding {listen}"))?;
                eprintln!(
                    "sim-apollo listening on {}://{listen}",
                    if tls.is_some() { "https" } else { "http" }
                );
                let tls_config = tls.map(|a| a.config().clone());
                sim.serve(listener, tls_config, shutdown_signal()).await?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Demo {
            calls,
            concurrency,
            dir,
            hold,
        } => {
            let rt = runtime()?;
            let out = rt.block_on(creditmeter::demo::run(creditmeter::demo::DemoOptions {
                calls,
                concurrency,
                dir,
                hold,
            }))?;
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Budgets { admin, format } => {
            let client = match admin_client(&admin) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let v = runtime()?.block_on(client.call(http::Method::GET, "/api/budgets", None))?;
            match format {
                BudgetsFormat::Json => println!("{v:#}"),
                BudgetsFormat::Table => print!("{}", guard_client::render_budgets(&v)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Hold {
            admin,
            scope,
            reason,
        } => {
            let scope = match scope.to_json() {
                Ok(Some(s)) => s,
                Ok(None) => return Ok(usage_code(
                    "name what to hold: --table, --workflow, --key, --tag NAME=VALUE, or --all for every call",
                )),
                Err(e) => return Ok(usage_code(&e)),
            };
            let client = match admin_client(&admin) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let body = serde_json::json!({"scope": scope, "reason": reason});
            let v =
                runtime()?.block_on(client.call(http::Method::POST, "/api/holds", Some(&body)))?;
            let hold = &v["hold"];
            println!(
                "hold {} {}: {} (release with `creditmeter release {}`)",
                hold["id"],
                if v["created"] == true {
                    "placed"
                } else {
                    "was already in force"
                },
                hold["scope_text"].as_str().unwrap_or("?"),
                hold["id"],
            );
            if let Some(m) = v["message"].as_str() {
                println!("note: {m}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Release { id, admin, scope } => {
            let wanted = match (id, scope.to_json()) {
                (_, Err(e)) => return Ok(usage_code(&e)),
                (Some(_), Ok(Some(_))) => {
                    return Ok(usage_code("give a hold id or scope flags, not both"))
                }
                (None, Ok(None)) => {
                    return Ok(usage_code(
                        "name the hold: its id (see `creditmeter budgets`), or the scope flags it was placed with",
                    ))
                }
                (id, Ok(scope)) => (id, scope),
            };
            let client = match admin_client(&admin) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let rt = runtime()?;
            let id = match wanted {
                (Some(id), _) => id,
                (None, scope) => {
                    let v = rt.block_on(client.call(http::Method::GET, "/api/holds", None))?;
                    let found = v["holds"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|h| Some(&h["scope"]) == scope.as_ref())
                        .and_then(|h| h["id"].as_i64());
                    match found {
                        Some(id) => id,
                        None => {
                            eprintln!(
                                "creditmeter: no hold with that scope is in force; holds in force:"
                            );
                            eprint!(
                                "{}",
                                guard_client::render_holds(
                                    v["holds"].as_array().map(Vec::as_slice).unwrap_or(&[])
                                )
                            );
                            return Ok(ExitCode::from(1));
                        }
                    }
                }
            };
            let v =
                rt.block_on(client.call(http::Method::DELETE, &format!("/api/holds/{id}"), None))?;
            println!(
                "hold {id} released: {}",
                v["released"]["scope_text"].as_str().unwrap_or("?")
            );
            if let Some(m) = v["message"].as_str() {
                println!("note: {m}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Healthcheck { url } => {
            let rt = runtime()?;
            rt.block_on(async {
                use http_body_util::Empty;
                use hyper_util::client::legacy::Client;
                let client: Client<_, Empty<bytes::Bytes>> =
                    Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
                let uri: http::Uri = url
                    .parse()
                    .with_context(|| format!("{url:?} is not a URL"))?;
                let resp =
                    tokio::time::timeout(std::time::Duration::from_secs(5), client.get(uri)).await;
                Ok(match resp {
                    Ok(Ok(r)) if r.status().is_success() => ExitCode::SUCCESS,
                    Ok(Ok(r)) => {
                        eprintln!("{url}: {}", r.status());
                        ExitCode::from(1)
                    }
                    Ok(Err(e)) => {
                        eprintln!("{url}: {e}");
                        ExitCode::from(1)
                    }
                    Err(_) => {
                        eprintln!("{url}: timed out");
                        ExitCode::from(1)
                    }
                })
            })
        }
    }
}

/// A message per SIGHUP: reload the config file.
fn reload_signal() -> tokio::sync::mpsc::Receiver<()> {
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

fn ledger_path(db: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    Ok(match (db, config) {
        (Some(db), _) => db,
        (None, Some(c)) => load_config(Some(&c))?.ledger.path,
        (None, None) => PathBuf::from(creditmeter::config::DEFAULT_LEDGER_PATH),
    })
}

fn usage(msg: impl std::fmt::Display) -> anyhow::Result<ExitCode> {
    eprintln!("creditmeter: {msg}");
    Ok(ExitCode::from(EX_USAGE))
}

fn ledger_command(cmd: LedgerCommand) -> anyhow::Result<ExitCode> {
    use creditmeter::ledger::{self, maintenance};
    let existing = |at: LedgerLocation| -> Result<PathBuf, ExitCode> {
        let p = ledger_path(at.db, at.config)?;
        if !p.exists() {
            eprintln!(
                "creditmeter: ledger {} does not exist (pass --db or --config)",
                p.display()
            );
            return Err(ExitCode::from(EX_USAGE));
        }
        Ok(p)
    };
    match cmd {
        LedgerCommand::Stats { at, sizes, format } => {
            let path = match existing(at) {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            let conn = ledger::open_for_read(&path)?;
            let s = maintenance::stats(&path, &conn, sizes)?;
            if format == Format::Json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(ExitCode::SUCCESS);
            }
            let t = |ms: Option<i64>| ms.map(report::format_time).unwrap_or_else(|| "-".into());
            let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
            println!("ledger          {}", s.path);
            println!(
                "file            {} (+ WAL {})",
                mib(s.file_bytes),
                mib(s.wal_bytes)
            );
            println!(
                "pages           {} of {} bytes, {} free; auto_vacuum {}",
                s.page_count, s.page_size, s.freelist_pages, s.auto_vacuum
            );
            println!("schema version  {}", s.schema_version);
            println!(
                "calls           {} rows, {} to {}",
                s.calls,
                t(s.oldest_call),
                t(s.newest_call)
            );
            println!(
                "rollup_hourly   {} rows, {} to {}; {} calls, {} credits",
                s.rollup_rows,
                t(s.rollup_first_hour),
                t(s.rollup_last_hour),
                s.rollup_calls,
                s.rollup_credits_milli as f64 / 1000.0
            );
            println!(
                "retention       {}",
                match s.detail_deleted_before {
                    Some(ms) => format!(
                        "detail rows before {} deleted (rollups keep them)",
                        report::format_time(ms)
                    ),
                    None => "no detail rows deleted".into(),
                }
            );
            for (name, bytes) in &s.objects {
                println!("  {name:<28} {}", mib(*bytes));
            }
            Ok(ExitCode::SUCCESS)
        }
        LedgerCommand::Vacuum { at, full } => {
            let path = match existing(at) {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            let conn = rusqlite::Connection::open(&path)?;
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            let o = maintenance::vacuum(&path, &conn, full)?;
            println!(
                "vacuum ({}): {:.1} MiB -> {:.1} MiB, {} free pages returned{}",
                o.mode,
                o.file_bytes_before as f64 / (1u64 << 20) as f64,
                o.file_bytes_after as f64 / (1u64 << 20) as f64,
                o.freed_pages,
                if o.wal_busy {
                    "; the WAL is in use and was not truncated"
                } else {
                    ""
                }
            );
            if o.mode == "checkpoint" {
                println!("this file predates incremental auto-vacuum: free pages are reused by new rows; `ledger vacuum --full` (proxy stopped) converts it");
            }
            Ok(ExitCode::SUCCESS)
        }
        LedgerCommand::Prune { at, older_than } => {
            let path = match existing(at) {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            let keep = match creditmeter::config::HumanDuration::parse(&older_than) {
                Ok(d) if d >= creditmeter::config::MIN_RETENTION => d,
                Ok(_) => return usage("--older-than: keep at least 1h"),
                Err(e) => return usage(format!("--older-than: {e}")),
            };
            let mut conn = ledger::open_for_write(&path, creditmeter::config::Synchronous::Normal)?;
            let cutoff = maintenance::retention_cutoff(creditmeter::meter::now_ms(), keep);
            let o = maintenance::prune(
                &mut conn,
                cutoff,
                maintenance::RETENTION_BATCH,
                maintenance::RETENTION_PAUSE,
                || false,
            )?;
            println!(
                "deleted {} detail rows started before {} in {} batches; the rollups keep their totals",
                o.deleted,
                report::format_time(cutoff),
                o.batches
            );
            Ok(ExitCode::SUCCESS)
        }
        LedgerCommand::Bench {
            at,
            commits,
            burst_rows,
            runs,
            no_writes,
            during_prune,
        } => {
            let path = match existing(at) {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            let during_prune = match during_prune
                .as_deref()
                .map(creditmeter::config::HumanDuration::parse)
            {
                None => None,
                Some(Ok(d)) => Some(d),
                Some(Err(e)) => return usage(format!("--during-prune: {e}")),
            };
            let out = creditmeter::scale::run(&creditmeter::scale::BenchOptions {
                db: path,
                commits,
                burst_rows,
                runs,
                no_writes,
                during_prune,
            })?;
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn sim_ledger(
    rows: u64,
    db: PathBuf,
    days: u32,
    end: Option<String>,
    seed: u64,
    bursts: Vec<String>,
    batch: usize,
) -> anyhow::Result<ExitCode> {
    use creditmeter::ledger::synth;
    let now = creditmeter::meter::now_ms();
    let end_ms = match end.as_deref().map(|e| report::parse_time(e, now)) {
        None => now,
        Some(Ok(t)) => t,
        Some(Err(e)) => return usage(format!("--end: {e}")),
    };
    let mut parsed = Vec::new();
    for b in &bursts {
        match synth::Burst::parse(b, |s| report::parse_time(s, now)) {
            Ok(b) => parsed.push(b),
            Err(e) => return usage(format!("--burst: {e}")),
        }
    }
    if days == 0 {
        return usage("--days: at least 1");
    }
    let start_ms = end_ms - i64::from(days) * 86_400_000;
    for b in &parsed {
        if b.at_ms < start_ms || b.at_ms >= end_ms {
            return usage(format!(
                "--burst: {} is outside the history ({} to {})",
                report::format_time(b.at_ms),
                report::format_time(start_ms),
                report::format_time(end_ms)
            ));
        }
    }
    if db.exists() {
        return usage(format!(
            "{} exists; sim-ledger writes a new ledger (remove it first)",
            db.display()
        ));
    }
    let mut conn =
        creditmeter::ledger::open_for_write(&db, creditmeter::config::Synchronous::Normal)?;
    // A throwaway file: no fsync, a big page cache.
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;")?;
    let step = (rows / 10).max(1);
    let mut next_report = step;
    let summary = synth::generate(
        &mut conn,
        &synth::SynthOptions {
            rows,
            days,
            end_ms,
            seed,
            bursts: parsed.clone(),
            batch,
        },
        |n| {
            if n >= next_report {
                eprintln!("  {n} rows");
                next_report = n + step;
            }
        },
    )?;
    conn.execute_batch("PRAGMA optimize; PRAGMA wal_checkpoint(TRUNCATE);")?;
    let total = summary.rows + summary.burst_rows;
    println!(
        "wrote {} calls ({} background + {} burst) to {} in {:.1}s ({:.0} rows/s)",
        total,
        summary.rows,
        summary.burst_rows,
        db.display(),
        summary.elapsed.as_secs_f64(),
        total as f64 / summary.elapsed.as_secs_f64().max(1e-9)
    );
    println!(
        "history {} to {}; {} credits in all",
        report::format_time(summary.first_ms),
        report::format_time(summary.last_ms),
        summary.credits_milli as f64 / 1000.0
    );
    for b in &parsed {
        println!(
            "burst: {} credits by table {:?} from {} over {} minutes",
            b.credits,
            b.table,
            report::format_time(b.at_ms),
            b.minutes
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
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
