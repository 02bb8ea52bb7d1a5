//! `creditmeter release`: Lift a hold: by its id, or by the same scope flags it was placed with.

use std::process::ExitCode;

use super::{admin_client, runtime, usage_code, AdminArgs, ScopeArgs};

#[derive(clap::Args)]
pub struct Release {
    /// The hold's id (`creditmeter budgets` lists them).
    pub id: Option<i64>,
    #[command(flatten)]
    pub admin: AdminArgs,
    #[command(flatten)]
    pub scope: ScopeArgs,
}

impl Release {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let Release { id, admin, scope } = self;
        let wanted = match (id, scope.to_json()) {
        (_, Err(e)) => return Ok(usage_code(&e)),
        (Some(_), Ok(Some(_))) => {
            return Ok(usage_code("give a hold id or scope flags, not both"))
        }
        (None, Ok(None)) => {
            return Ok(usage_code(
                "name the hold: its id (see `creditmeter budgets`), or the scope flags it was placed with",
            ))
        }
        (id, Ok(scope)) => (id, scope),
    };
        let client = match admin_client(&admin) {
            Ok(c) => c,
            Err(code) => return Ok(code),
        };
        let rt = runtime()?;
        let id = match wanted {
            (Some(id), _) => id,
            (None, scope) => {
                let v = rt.block_on(client.call(http::Method::GET, "/api/holds", None))?;
                let found = v["holds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|h| Some(&h["scope"]) == scope.as_ref())
                    .and_then(|h| h["id"].as_i64());
                match found {
                    Some(id) => id,
                    None => {
                        eprintln!(
                            "creditmeter: no hold with that scope is in force; holds in force:"
                        );
                        eprint!(
                            "{}",
                            admin_client::render_holds(
                                v["holds"].as_array().map(Vec::as_slice).unwrap_or(&[])
                            )
                        );
                        return Ok(ExitCode::from(1));
                    }
                }
            }
        };
        let v =
            rt.block_on(client.call(http::Method::DELETE, &format!("/api/holds/{id}"), None))?;
        println!(
            "hold {id} released: {}",
            v["released"]["scope_text"].as_str().unwrap_or("?")
        );
        if let Some(m) = v["message"].as_str() {
            println!("note: {m}");
        }
        Ok(ExitCode::SUCCESS)
    }
}
