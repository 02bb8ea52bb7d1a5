//! `creditmeter hold`: Emergency stop: refuse calls by table, workflow, key fingerprint or tag (globs), or all

use std::process::ExitCode;

use super::{admin_client, runtime, usage_code, AdminArgs, ScopeArgs};

#[derive(clap::Args)]
pub struct Hold {
    #[command(flatten)]
    pub admin: AdminArgs,
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// Why, shown to refused callers and in `creditmeter budgets`.
    #[arg(long)]
    pub reason: Option<String>,
}

impl Hold {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let Hold {
            admin,
            scope,
            reason,
        } = self;
        let scope = match scope.to_json() {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(usage_code(
            "name what to hold: --table, --workflow, --key, --tag NAME=VALUE, or --all for every call",
        )),
        Err(e) => return Ok(usage_code(&e)),
    };
        let client = match admin_client(&admin) {
            Ok(c) => c,
            Err(code) => return Ok(code),
        };
        let body = serde_json::json!({"scope": scope, "reason": reason});
        let v = runtime()?.block_on(client.call(http::Method::POST, "/api/holds", Some(&body)))?;
        let hold = &v["hold"];
        println!(
            "hold {} {}: {} (release with `creditmeter release {}`)",
            hold["id"],
            if v["created"] == true {
                "placed"
            } else {
                "was already in force"
            },
            hold["scope_text"].as_str().unwrap_or("?"),
            hold["id"],
        );
        if let Some(m) = v["message"].as_str() {
            println!("note: {m}");
        }
        Ok(ExitCode::SUCCESS)
    }
}
