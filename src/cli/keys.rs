//! `creditmeter keys create|list|revoke|rotate`: virtual keys, straight in the ledger
//! (`--config` or `--db`), whether or not the server runs; a running server sees each change
//! before its next lookup. Changes are audited with actor `cli`.

use std::path::PathBuf;
use std::process::ExitCode;

use creditmeter::keys::ops::{self, CreateRequest, KeyOpError};
use creditmeter::ledger::audit::ACTOR_CLI;

use super::EX_USAGE;

/// Where the ledger is, and (with `--config`) which upstreams exist.
#[derive(clap::Args, Clone)]
pub struct Location {
    /// Ledger file (SQLite).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Config file: its `ledger.path`, and its `[keys.upstreams]` for `--upstream`.
    #[arg(long, short, env = "CREDITMETER_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// `creditmeter keys …`.
#[derive(clap::Args)]
pub struct Keys {
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(clap::Subcommand)]
pub enum KeysCommand {
    /// Make a key bound to a table; prints it once (it is stored only as a hash).
    Create {
        #[command(flatten)]
        at: Location,
        /// The table its calls are attributed to.
        #[arg(long)]
        table: String,
        /// The workflow its calls are attributed to.
        #[arg(long)]
        workflow: Option<String>,
        /// NAME=VALUE tags its calls carry; repeatable.
        #[arg(long)]
        tag: Vec<String>,
        /// A name to recognise it by (and to name it in budgets, holds and `keys revoke`).
        #[arg(long)]
        name: Option<String>,
        /// When it stops working: a span from now (90d, 12h) or a time (2027-01-31).
        #[arg(long)]
        expires: Option<String>,
        /// Which Apollo key it is swapped for: a [keys.upstreams.NAME] (default:
        /// keys.upstream_key_env).
        #[arg(long)]
        upstream: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Every key (never the secrets).
    List {
        #[command(flatten)]
        at: Location,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Stop a key working, from the next request on (by id or name).
    Revoke {
        id: String,
        #[command(flatten)]
        at: Location,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Give a key a new secret, same id and scope; the old one stops working at once.
    Rotate {
        id: String,
        #[command(flatten)]
        at: Location,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

/// The ledger (created and migrated if need be) and the `[keys]` config when `--config` says.
fn open(at: &Location) -> Result<(PathBuf, Option<creditmeter::keys::KeysConfig>), ExitCode> {
    let config = match &at.config {
        Some(p) => Some(super::load_config(Some(p))?),
        None => None,
    };
    let path = match (&at.db, &config) {
        (Some(db), _) => db.clone(),
        (None, Some(c)) => c.ledger.path.clone(),
        (None, None) => PathBuf::from(creditmeter::config::DEFAULT_LEDGER_PATH),
    };
    let sync = config
        .as_ref()
        .map(|c| c.ledger.synchronous)
        .unwrap_or(creditmeter::config::LedgerConfig::default().synchronous);
    if let Err(e) = creditmeter::ledger::open_for_write(&path, sync) {
        eprintln!("creditmeter: {e}");
        return Err(ExitCode::from(1));
    }
    Ok((path, config.map(|c| c.keys)))
}

fn failed(e: KeyOpError) -> ExitCode {
    eprintln!("creditmeter: {e}");
    match e {
        KeyOpError::Invalid(_) => ExitCode::from(EX_USAGE),
        KeyOpError::Store(creditmeter::ledger::keys::KeyStoreError::NotFound(_))
        | KeyOpError::Store(creditmeter::ledger::keys::KeyStoreError::NameTaken(_))
        | KeyOpError::Store(creditmeter::ledger::keys::KeyStoreError::Revoked(_)) => {
            ExitCode::from(EX_USAGE)
        }
        KeyOpError::Store(_) => ExitCode::from(1),
    }
}

fn json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub fn run(cmd: KeysCommand) -> ExitCode {
    let now = creditmeter::meter::now_ms();
    match cmd {
        KeysCommand::Create {
            at,
            table,
            workflow,
            tag,
            name,
            expires,
            upstream,
            format,
        } => {
            let (path, keys_config) = match open(&at) {
                Ok(v) => v,
                Err(code) => return code,
            };
            let mut tags = std::collections::BTreeMap::new();
            for t in &tag {
                match ops::parse_tag(t) {
                    Ok((k, v)) => {
                        tags.insert(k, v);
                    }
                    Err(e) => return failed(e),
                }
            }
            let req = CreateRequest {
                table,
                workflow,
                tags,
                name,
                expires,
                upstream,
            };
            match ops::create(&path, &req, keys_config.as_ref(), ACTOR_CLI, now) {
                Ok(issued) => {
                    match format {
                        Format::Json => json(&ops::issued_json(&issued, now)),
                        Format::Table => {
                            println!("{}", issued.key);
                            eprintln!(
                                "key {} for table {:?}{}: shown this once; creditmeter keeps only its hash",
                                issued.row.id,
                                issued.row.table,
                                issued
                                    .row
                                    .name
                                    .as_deref()
                                    .map(|n| format!(" (name {n:?})"))
                                    .unwrap_or_default()
                            );
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => failed(e),
            }
        }
        KeysCommand::List { at, format } => {
            let (path, _) = match open(&at) {
                Ok(v) => v,
                Err(code) => return code,
            };
            match ops::list(&path) {
                Ok(rows) => {
                    match format {
                        Format::Json => json(&serde_json::json!({
                            "keys": rows.iter().map(|r| ops::row_json(r, now)).collect::<Vec<_>>()
                        })),
                        Format::Table => print!("{}", ops::list_table(&rows, now)),
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => failed(e),
            }
        }
        KeysCommand::Revoke { id, at, format } => {
            let (path, _) = match open(&at) {
                Ok(v) => v,
                Err(code) => return code,
            };
            match ops::revoke(&path, &id, ACTOR_CLI, now) {
                Ok((row, changed)) => {
                    match format {
                        Format::Json => json(&serde_json::json!({
                            "revoked": ops::row_json(&row, now),
                            "changed": changed,
                        })),
                        Format::Table if changed => println!("revoked key {}", row.id),
                        Format::Table => println!("key {} was revoked already", row.id),
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => failed(e),
            }
        }
        KeysCommand::Rotate { id, at, format } => {
            let (path, _) = match open(&at) {
                Ok(v) => v,
                Err(code) => return code,
            };
            match ops::rotate(&path, &id, ACTOR_CLI, now) {
                Ok(issued) => {
                    match format {
                        Format::Json => json(&ops::issued_json(&issued, now)),
                        Format::Table => {
                            println!("{}", issued.key);
                            eprintln!(
                                "key {} has a new secret (shown this once); the old one no longer works",
                                issued.row.id
                            );
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => failed(e),
            }
        }
    }
}
