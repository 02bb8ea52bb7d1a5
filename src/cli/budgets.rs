//! `creditmeter budgets`: Each budget's spend, reservations and limit in its current window, and the holds in

use std::process::ExitCode;

use super::{admin_client, runtime, AdminArgs};

#[derive(clap::Args)]
pub struct Budgets {
    #[command(flatten)]
    pub admin: AdminArgs,
    #[arg(long, value_enum, default_value = "table")]
    pub format: BudgetsFormat,
}

impl Budgets {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let Budgets { admin, format } = self;
        let client = match admin_client(&admin) {
            Ok(c) => c,
            Err(code) => return Ok(code),
        };
        let v = runtime()?.block_on(client.call(http::Method::GET, "/api/budgets", None))?;
        match format {
            BudgetsFormat::Json => println!("{v:#}"),
            BudgetsFormat::Table => print!("{}", admin_client::render_budgets(&v)),
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum BudgetsFormat {
    Table,
    Json,
}
