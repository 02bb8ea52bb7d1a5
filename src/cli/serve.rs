//! `creditmeter serve`: Run the proxy (the main job).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use super::{load_config, reload_signal, runtime, shutdown_signal, EX_USAGE};

#[derive(clap::Args)]
pub struct Serve {
    /// Config file (TOML). Without it, every key takes its documented default.
    #[arg(long, short, env = "CREDITMETER_CONFIG")]
    pub config: Option<PathBuf>,
}

impl Serve {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let Serve { config } = self;
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
}
