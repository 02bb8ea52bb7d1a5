//! The `creditmeter` command: parse the command line, start tracing, run the subcommand.
//! Exit code 64 (EX_USAGE) on bad configuration or arguments, 1 on runtime failure. Each
//! subcommand lives in its own file under `cli/`.

mod cli;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    cli::init_tracing();
    match cli.command.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("creditmeter: {e:#}");
            ExitCode::from(1)
        }
    }
}
