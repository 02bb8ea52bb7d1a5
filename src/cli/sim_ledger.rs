//! `creditmeter sim-ledger`: Write a realistic synthetic ledger (for benchmarks and trying reports).

use std::path::PathBuf;
use std::process::ExitCode;

use creditmeter::report;

use super::usage;

#[derive(clap::Args)]
pub struct SimLedger {
    /// Background calls to write (bursts add their own).
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// The new ledger file (it must not exist yet).
    #[arg(long)]
    pub db: PathBuf,
    /// Days of history, ending at --end.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// End of the history: RFC 3339, a date, or relative (default: now).
    #[arg(long)]
    pub end: Option<String>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Hide a burst: `AT[,table=NAME][,credits=N][,minutes=M]` (default table "Runaway
    /// waterfall", 400000 credits over 60 minutes). Repeatable.
    #[arg(long)]
    pub burst: Vec<String>,
    /// Rows per transaction.
    #[arg(long, default_value_t = 100_000)]
    pub batch: usize,
}

impl SimLedger {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let SimLedger {
            rows,
            db,
            days,
            end,
            seed,
            burst,
            batch,
        } = self;
        use creditmeter_sim::synth;
        let now = creditmeter::meter::now_ms();
        let end_ms = match end.as_deref().map(|e| report::parse_time(e, now)) {
            None => now,
            Some(Ok(t)) => t,
            Some(Err(e)) => return usage(format!("--end: {e}")),
        };
        let mut parsed = Vec::new();
        for b in &burst {
            match synth::Burst::parse(b, |s| report::parse_time(s, now).map_err(|e| e.to_string()))
            {
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
}
