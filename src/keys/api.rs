//! `/api/keys` and `/api/audit` on the admin listener (behind the admin token when one is
//! set, like every `/api/` route):
//! - `GET /api/keys`: every key (`{"keys": [...]}`), no secrets;
//! - `POST /api/keys` with `{"table", "workflow"?, "tags"?: {k: v}, "name"?, "expires"?,
//!   "upstream"?}`: 201 with the new key under `key` (shown this once);
//! - `DELETE /api/keys/{id or name}`: revokes it (200; 404 if there is no such key);
//! - `POST /api/keys/{id or name}/rotate`: a new secret, same id and scope (200, under `key`);
//! - `GET /api/audit[?since=…&limit=…]`: the audit log, oldest first.
//!
//! Each change is audited with the admin API's actor.

use std::path::PathBuf;

use http::StatusCode;
use serde_json::{json, Value};

use super::ops::{self, CreateRequest, KeyOpError};
use crate::ledger::keys::KeyStoreError;

/// What the routes need.
pub struct KeysApi {
    pub ledger: PathBuf,
    /// `[keys]`, to check `upstream` names.
    pub config: super::KeysConfig,
    /// Who changes made here are audited as: `token:<admin.token_env>`, or `admin` without a
    /// token.
    pub actor: String,
}

/// An answer: status and JSON body.
pub type Answer = (StatusCode, Value);

fn error(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Answer {
    (
        status,
        json!({"error": code, "message": message.to_string()}),
    )
}

fn op_error(e: KeyOpError) -> Answer {
    match e {
        KeyOpError::Invalid(m) => error(StatusCode::BAD_REQUEST, "bad_request", m),
        KeyOpError::Store(KeyStoreError::NotFound(id)) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no virtual key {id:?} (GET /api/keys lists them)"),
        ),
        KeyOpError::Store(e @ KeyStoreError::NameTaken(_)) => {
            error(StatusCode::CONFLICT, "name_taken", e)
        }
        KeyOpError::Store(e @ KeyStoreError::Revoked(_)) => {
            error(StatusCode::CONFLICT, "revoked", e)
        }
        KeyOpError::Store(e) => {
            tracing::error!(error = %e, "a key operation failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "ledger_error", e)
        }
    }
}

fn string(v: &Value, field: &str) -> Result<Option<String>, Answer> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{field} must be a string"),
        )),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KeyOpError> + Send + 'static,
) -> Result<T, Answer> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(op_error),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e)),
    }
}

impl KeysApi {
    /// `GET /api/keys`.
    pub async fn list(&self) -> Answer {
        let ledger = self.ledger.clone();
        match blocking(move || ops::list(&ledger)).await {
            Ok(rows) => {
                let now = crate::meter::now_ms();
                let keys: Vec<Value> = rows.iter().map(|r| ops::row_json(r, now)).collect();
                (StatusCode::OK, json!({ "keys": keys }))
            }
            Err(a) => a,
        }
    }

    /// `POST /api/keys` with a JSON body.
    pub async fn create(&self, body: &[u8]) -> Answer {
        let v: Value = match serde_json::from_slice(body) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "the body must be a JSON object",
                )
            }
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("the body must be JSON: {e}"),
                )
            }
        };
        let known = ["table", "workflow", "tags", "name", "expires", "upstream"];
        if let Some(k) = v
            .as_object()
            .and_then(|m| m.keys().find(|k| !known.contains(&k.as_str())))
        {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("unknown field {k:?}: use {}", known.join(", ")),
            );
        }
        let req = (|| {
            let Some(table) = string(&v, "table")? else {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "name the table the key is for: {\"table\": \"…\"}",
                ));
            };
            let mut tags = std::collections::BTreeMap::new();
            match v.get("tags") {
                None | Some(Value::Null) => {}
                Some(Value::Object(m)) => {
                    for (k, t) in m {
                        let Value::String(t) = t else {
                            return Err(error(
                                StatusCode::BAD_REQUEST,
                                "bad_request",
                                format!("tag {k:?} must be a string"),
                            ));
                        };
                        tags.insert(k.to_ascii_lowercase(), t.clone());
                    }
                }
                Some(_) => {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "tags must be an object of strings",
                    ))
                }
            }
            Ok(CreateRequest {
                table,
                workflow: string(&v, "workflow")?,
                tags,
                name: string(&v, "name")?,
                expires: string(&v, "expires")?,
                upstream: string(&v, "upstream")?,
            })
        })();
        let req = match req {
            Ok(r) => r,
            Err(a) => return a,
        };
        let (ledger, config, actor) =
            (self.ledger.clone(), self.config.clone(), self.actor.clone());
        let now = crate::meter::now_ms();
        match blocking(move || ops::create(&ledger, &req, Some(&config), &actor, now)).await {
            Ok(issued) => {
                tracing::info!(
                    key = issued.row.id,
                    table = issued.row.table,
                    "virtual key created (admin API)"
                );
                (StatusCode::CREATED, ops::issued_json(&issued, now))
            }
            Err(a) => a,
        }
    }

    /// `DELETE /api/keys/{id}`.
    pub async fn revoke(&self, id: &str) -> Answer {
        let (ledger, actor, id) = (self.ledger.clone(), self.actor.clone(), id.to_owned());
        let now = crate::meter::now_ms();
        match blocking(move || ops::revoke(&ledger, &id, &actor, now)).await {
            Ok((row, changed)) => {
                if changed {
                    tracing::info!(key = row.id, "virtual key revoked (admin API)");
                }
                (
                    StatusCode::OK,
                    json!({"revoked": ops::row_json(&row, now), "changed": changed}),
                )
            }
            Err(a) => a,
        }
    }

    /// `POST /api/keys/{id}/rotate`.
    pub async fn rotate(&self, id: &str) -> Answer {
        let (ledger, actor, id) = (self.ledger.clone(), self.actor.clone(), id.to_owned());
        let now = crate::meter::now_ms();
        match blocking(move || ops::rotate(&ledger, &id, &actor, now)).await {
            Ok(issued) => {
                tracing::info!(key = issued.row.id, "virtual key rotated (admin API)");
                (StatusCode::OK, ops::issued_json(&issued, now))
            }
            Err(a) => a,
        }
    }

    /// `GET /api/audit?since=…&limit=…` (default: everything, at most 1000 entries).
    pub async fn audit(&self, pairs: &[(String, String)]) -> Answer {
        let now = crate::meter::now_ms();
        let mut since = i64::MIN;
        let mut limit = 1000usize;
        for (k, v) in pairs {
            match k.as_str() {
                "since" => match crate::report::parse_time(v, now) {
                    Ok(t) => since = t,
                    Err(e) => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "invalid_time",
                            format!("since: {e}"),
                        )
                    }
                },
                "limit" => match v.parse::<usize>() {
                    Ok(n) if (1..=10_000).contains(&n) => limit = n,
                    _ => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "bad_request",
                            format!("limit={v:?}: use 1 to 10000"),
                        )
                    }
                },
                other => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        format!("unknown parameter {other:?}: use since or limit"),
                    )
                }
            }
        }
        let ledger = self.ledger.clone();
        let read = blocking(move || {
            let conn = crate::ledger::open_for_read(&ledger)?;
            crate::ledger::audit::since(&conn, since, limit)
                .map_err(|e| KeyOpError::from(crate::ledger::LedgerError::from(e)))
        })
        .await;
        match read {
            Ok(entries) => {
                let entries: Vec<Value> = entries.iter().map(ops::audit_json).collect();
                (StatusCode::OK, json!({ "entries": entries }))
            }
            Err(a) => a,
        }
    }
}
