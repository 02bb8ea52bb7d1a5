//! `creditmeter audit [--since …] [--format json]`: the audit log (keys created, revoked and
//! rotated, holds placed and lifted, configuration reloads), read-only from the ledger.

use std::path::PathBuf;
use std::process::ExitCode;

use creditmeter::keys::ops;

use super::keys::Format;

#[derive(clap::Args)]
pub struct AuditArgs {
    /// Ledger file (SQLite).
    #[arg(long)]
    pub db: Option<PathBuf>,
    #[arg(long, short, env = "CREDITMETER_CONFIG")]
    pub config: Option<PathBuf>,
    /// From when: RFC 3339, a date, or relative (24h, 7d). Default: everything.
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many entries (oldest first).
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

pub fn run(args: AuditArgs) -> ExitCode {
    let path = match super::ledger_path(args.db, args.config) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let now = creditmeter::meter::now_ms();
    let since = match args
        .since
        .as_deref()
        .map(|s| creditmeter::report::parse_time(s, now))
    {
        None => i64::MIN,
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            eprintln!("creditmeter: --since: {e}");
            return ExitCode::from(super::EX_USAGE);
        }
    };
    let read = creditmeter::ledger::open_for_read(&path).and_then(|conn| {
        creditmeter::ledger::audit::since(&conn, since, args.limit).map_err(Into::into)
    });
    match read {
        Ok(entries) => {
            match args.format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "entries": entries.iter().map(ops::audit_json).collect::<Vec<_>>()
                    }))
                    .unwrap_or_default()
                ),
                Format::Table => print!("{}", ops::audit_table(&entries)),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("creditmeter: {e}");
            ExitCode::from(1)
        }
    }
}
