//! `creditmeter sim-apollo`: A deterministic stand-in for the Apollo API (tests, benchmarks, demos).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use super::{runtime, shutdown_signal};

#[derive(clap::Args)]
pub struct SimApollo {
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Calls per minute per endpoint and key before 429 (0 = unlimited).
    #[arg(long, default_value_t = 1000)]
    pub rate_limit_minute: u32,
    /// Percent of identifiers (emails, domains, searches) that find a record: 0 matches
    /// nothing, 100 everything (benchmarks use 100 for full-size answers).
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub match_rate: u8,
    /// Leave `credits_consumed` out of bulk_match responses.
    #[arg(long)]
    pub no_credits_consumed: bool,
    /// How long a phone reveal or waterfall job runs before it ends and bills, and
    /// webhook_result answers 200 ("250ms", "2s", "5m").
    #[arg(long, default_value = "2s", value_parser = creditmeter::config::HumanDuration::parse)]
    pub job_delay: std::time::Duration,
    /// How long a job's result can be polled after it ends; then 410 request_id_expired.
    #[arg(long, default_value = "30d", value_parser = creditmeter::config::HumanDuration::parse)]
    pub result_ttl: std::time::Duration,
    /// Percent of people a phone reveal finds a mobile number for (8 direct-dial credits each).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub mobile_rate: u8,
    /// Leave `credits_consumed` out of webhook_result answers (the payload is then priced).
    #[arg(long)]
    pub no_job_credits_consumed: bool,
    /// A unified-credit plan: `usage_stats` shows one shared pool (`lead_credit`) that
    /// every credit type draws from.
    #[arg(long)]
    pub unified_credits: bool,
    /// Serve HTTPS with this certificate chain (PEM)...
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// ...and this key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl SimApollo {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let SimApollo {
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
        } = self;
        let tls = match (tls_cert, tls_key) {
            (Some(c), Some(k)) => Some(creditmeter::proxy::listener::tls_acceptor(&c, &k)?),
            _ => None,
        };
        let rt = runtime()?;
        rt.block_on(async {
            let sim = creditmeter_sim::Sim::new(creditmeter_sim::SimConfig {
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
}
