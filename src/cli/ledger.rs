//! `creditmeter ledger stats|vacuum|prune|bench`: maintenance of the ledger file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use creditmeter::report::{self, Format};

use super::{ledger_path, usage, EX_USAGE};

#[derive(clap::Args)]
pub struct LedgerCmd {
    #[command(subcommand)]
    pub command: LedgerCommand,
}

/// Where the ledger is: `--db`, else `ledger.path` from `--config`, else ./creditmeter.db.
#[derive(clap::Args, Clone)]
pub struct LedgerLocation {
    /// Ledger file.
    #[arg(long)]
    db: Option<PathBuf>,
    #[arg(long, short, env = "CREDITMETER_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum LedgerCommand {
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

impl LedgerCmd {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let cmd = self.command;
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
                // SQLite only: pages, the WAL and `dbstat` are the file's.
                let s = ledger::SqliteStore::file(&path).stats(sizes)?;
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
                // SQLite only: hands free pages back to the file system.
                let o = ledger::SqliteStore::file(&path).vacuum(full)?;
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
                let store =
                    ledger::SqliteStore::open(&path, creditmeter::config::Synchronous::Normal)?;
                let cutoff = maintenance::retention_cutoff(creditmeter::meter::now_ms(), keep);
                let o = ledger::Store::prune(
                    &store,
                    cutoff,
                    maintenance::RETENTION_BATCH,
                    maintenance::RETENTION_PAUSE,
                    &mut || false,
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
                let out = super::ledger_bench::run(&super::ledger_bench::BenchOptions {
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
}
