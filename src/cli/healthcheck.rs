//! `creditmeter healthcheck`: Exit 0 if URL answers 2xx (for container health checks).

use std::process::ExitCode;

use anyhow::Context as _;

use super::runtime;

#[derive(clap::Args)]
pub struct Healthcheck {
    #[arg(default_value = "http://127.0.0.1:9464/healthz")]
    pub url: String,
}

impl Healthcheck {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let Healthcheck { url } = self;
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
