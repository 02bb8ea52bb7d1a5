//! `creditmeter report`: Spend from the ledger: by group, as a burn timeline, or its spikes.

use std::path::PathBuf;
use std::process::ExitCode;

use creditmeter::report::{self, Format, ReportArgs};

use super::{ledger_path, usage, EX_USAGE};

#[derive(clap::Args)]
pub struct Report {
    /// Ledger file; default: `ledger.path` from --config, else ./creditmeter.db.
    #[arg(long)]
    pub db: Option<PathBuf>,
    #[arg(long, short, env = "CREDITMETER_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub args: ReportArgs,
    /// Instead of spend: the windows in which Apollo's credit balance fell by more than
    /// creditmeter saw, and whether that looks like traffic outside the proxy or a catalog
    /// error (needs [reconcile] enabled while serving). Honours --since, --until, --format.
    #[arg(long)]
    pub reconcile: bool,
}

impl Report {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let Report {
            db,
            config,
            args,
            reconcile,
        } = self;
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
                creditmeter::reconcile::answer::report(&creditmeter::reconcile::answer::Request {
                    db: req.db.clone(),
                    since_ms: req.since_ms,
                    until_ms: req.until_ms,
                    format: req.format,
                })?
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
}
