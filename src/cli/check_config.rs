//! `creditmeter check-config`: Validate the config and the catalog, and print what is in force.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{load_config, EX_USAGE};

#[derive(clap::Args)]
pub struct CheckConfig {
    #[arg(long, short, env = "CREDITMETER_CONFIG")]
    pub config: Option<PathBuf>,
}

impl CheckConfig {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let CheckConfig { config } = self;
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
}
