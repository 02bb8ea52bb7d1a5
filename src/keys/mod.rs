//! Virtual keys: creditmeter's own API keys (`cmk_…`), each bound to a table (and optionally a
//! workflow and tags) and to one real Apollo key that stays on creditmeter.
//!
//! A call carrying one, in any place an Apollo key may go ([`subst`]), is authorised here
//! before anything goes upstream: the key is looked up by its SHA-256 in the ledger's
//! `virtual_keys` table, its attribution replaces the caller's (a disagreeing `X-Meter-Table`,
//! `X-Meter-Workflow`, `meter_table`, `meter_workflow` or tag is a 403 `attribution_conflict`),
//! and the real Apollo key takes its place in the request. Unknown, revoked and expired keys
//! are a 401. In `required` mode a call without a valid virtual key is a 401 too.
//!
//! Freshness: before every lookup, [`Keys`] reads the ledger's `keys_generation` counter (one
//! indexed read on its own read-only connection, in `spawn_blocking`), and reloads its cache
//! when the counter moved. So a key created, revoked or rotated by the CLI, by another process
//! or by the admin API is in force for the very next request on every connection, and
//! revocation survives a restart because it is in the ledger.

pub mod api;
/// `[keys]`: the config section lives with the others (config sits below keys).
pub use crate::config::keys as config;
pub mod ops;
pub mod subst;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use rusqlite::Connection;

pub use config::{KeysConfig, KeysMode, UpstreamKeys};

use crate::attribution::Attribution;
use crate::ledger::keys::{self as store, KeyRow};
use subst::Location;

/// Why a call was refused here (nothing went upstream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRefusal {
    pub status: StatusCode,
    /// The JSON `error` code; also the `reason` of `creditmeter_refused_total` for 401s.
    pub code: &'static str,
    pub message: String,
    pub field: Option<&'static str>,
    /// True for refusals before authentication (401): no ledger row is written for them.
    pub unauthenticated: bool,
    /// The key, when it was valid (a 403 conflict is recorded under it).
    pub key: Option<Box<KeyRow>>,
}

impl KeyRefusal {
    fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code,
            message: message.into(),
            field: None,
            unauthenticated: true,
            key: None,
        }
    }
}

/// What a call may do after [`Keys::authorize`].
#[derive(Debug)]
pub enum Decision {
    /// No virtual key, and the mode lets Apollo keys through: forward as is.
    PassThrough,
    /// A valid virtual key, already swapped for the real one.
    Virtual {
        key: Box<KeyRow>,
        /// The key's attribution (the caller's extra tags kept).
        attribution: Attribution,
        /// The query to forward (the key replaced).
        query: Option<String>,
        /// The body to forward (the key replaced).
        body: Bytes,
    },
}

/// What [`Keys::authorize`] reads of a call.
pub struct CallKeys<'a> {
    /// The headers to forward (the `x-meter-*` already removed); keys in them are replaced.
    pub headers: &'a mut HeaderMap,
    /// The query string as the caller sent it (for `meter_*` parameters).
    pub original_query: Option<&'a str>,
    /// The query to forward (`meter_*` removed).
    pub query: Option<String>,
    pub body: Bytes,
    /// Whether the body is content-encoded (then creditmeter cannot rewrite a key in it).
    pub body_encoded: bool,
    /// `api_key` as the catalog's parameter reader found it (query or decoded body).
    pub params_key: Option<&'a str>,
    /// The caller's attribution, from headers and `meter_*` parameters.
    pub attribution: Attribution,
}

/// The lookup cache: every key by hash, as of `generation`.
struct Cache {
    conn: Option<Connection>,
    generation: Option<i64>,
    by_hash: HashMap<String, KeyRow>,
}

/// Virtual keys as the proxy uses them.
pub struct Keys {
    pub mode: KeysMode,
    upstream: UpstreamKeys,
    ledger_path: PathBuf,
    cache: Mutex<Cache>,
}

impl Keys {
    pub fn new(mode: KeysMode, upstream: UpstreamKeys, ledger_path: PathBuf) -> Keys {
        Keys {
            mode,
            upstream,
            ledger_path,
            cache: Mutex::new(Cache {
                conn: None,
                generation: None,
                by_hash: HashMap::new(),
            }),
        }
    }

    /// The key whose hash is `hash`, as the ledger holds it now (blocking).
    fn lookup_blocking(&self, hash: &str) -> Result<Option<KeyRow>, crate::ledger::LedgerError> {
        let mut cache = match self.cache.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        let result = (|| {
            if cache.conn.is_none() {
                cache.conn = Some(crate::ledger::open_for_read(&self.ledger_path)?);
            }
            let Some(conn) = cache.conn.as_ref() else {
                return Ok(None);
            };
            let generation = store::generation(conn)?;
            if cache.generation != Some(generation) {
                let all = store::all_by_hash(conn)?;
                cache.by_hash = all.into_iter().collect();
                cache.generation = Some(generation);
            }
            Ok(cache.by_hash.get(hash).cloned())
        })();
        if result.is_err() {
            // A fresh connection next time; nothing stale is trusted.
            cache.conn = None;
            cache.generation = None;
        }
        result
    }

    /// The key `key` is, as of now; `Err` when the ledger cannot be read.
    pub async fn lookup(self: &Arc<Self>, key: &str) -> Result<Option<KeyRow>, String> {
        let hash = store::hash_key(key);
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.lookup_blocking(&hash)).await {
            Ok(Ok(row)) => Ok(row),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Decides what a call may do, and swaps a virtual key for the real one. See the module
    /// docs for the rules.
    pub async fn authorize(
        self: &Arc<Self>,
        call: CallKeys<'_>,
        now: i64,
    ) -> Result<Decision, KeyRefusal> {
        let presented = subst::presented(
            call.headers,
            call.query.as_deref(),
            &call.body,
            call.body_encoded,
        );
        let virtual_keys: Vec<&(Location, String)> = presented
            .iter()
            .filter(|(_, k)| subst::is_virtual(k))
            .collect();
        if virtual_keys.is_empty() {
            if call.params_key.is_some_and(subst::is_virtual) {
                return Err(KeyRefusal {
                    status: StatusCode::BAD_REQUEST,
                    code: "virtual_key_unreadable",
                    message: "the request body is content-encoded and carries a virtual key (api_key); creditmeter cannot swap it there: send the key in X-Api-Key, or an uncompressed body".into(),
                    field: Some("api_key"),
                    unauthenticated: true,
                    key: None,
                });
            }
            return match self.mode {
                KeysMode::Required => Err(KeyRefusal::unauthorized(
                    "virtual_key_required",
                    "this creditmeter accepts only its own keys (keys.mode = \"required\"): send X-Api-Key: cmk_… (creditmeter keys create makes one); nothing was sent upstream",
                )),
                KeysMode::Off | KeysMode::Optional => Ok(Decision::PassThrough),
            };
        }
        if self.mode == KeysMode::Off {
            return Err(KeyRefusal::unauthorized(
                "virtual_keys_off",
                "this is a creditmeter key (cmk_…), but virtual keys are off here (keys.mode = \"off\"); it was not forwarded",
            ));
        }
        let key = virtual_keys[0].1.clone();
        if presented.iter().any(|(_, k)| *k != key) {
            return Err(KeyRefusal::unauthorized(
                "conflicting_keys",
                "the request carries a creditmeter key and another, different key; send only the creditmeter key",
            ));
        }
        let row = match self.lookup(&key).await {
            Ok(Some(row)) => row,
            Ok(None) => {
                return Err(KeyRefusal::unauthorized(
                    "invalid_virtual_key",
                    "unknown creditmeter key; nothing was sent upstream",
                ))
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read virtual keys from the ledger");
                return Err(KeyRefusal {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    code: "keys_unavailable",
                    message: "creditmeter cannot read its keys from the ledger right now; nothing was sent upstream".into(),
                    field: None,
                    unauthenticated: true,
                    key: None,
                });
            }
        };
        if row.revoked_at.is_some() {
            return Err(KeyRefusal::unauthorized(
                "virtual_key_revoked",
                "this creditmeter key was revoked; nothing was sent upstream",
            ));
        }
        if row.expires_at.is_some_and(|e| now >= e) {
            return Err(KeyRefusal::unauthorized(
                "virtual_key_expired",
                "this creditmeter key has expired; nothing was sent upstream",
            ));
        }
        let attribution = attribution_of(&row, &call.attribution, call.original_query)?;
        let Some(real) = self.upstream.get(row.upstream.as_deref()) else {
            return Err(KeyRefusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "upstream_key_missing",
                message: format!(
                    "this key names the Apollo key {:?}, which is not configured ([keys.upstreams]); nothing was sent upstream",
                    row.upstream.as_deref().unwrap_or("default")
                ),
                field: None,
                unauthenticated: false,
                key: Some(Box::new(row.clone())),
            });
        };
        let bad = |e: subst::SubstError| KeyRefusal {
            status: StatusCode::BAD_REQUEST,
            code: "virtual_key_unreadable",
            message: e.to_string(),
            field: Some("api_key"),
            unauthenticated: false,
            key: Some(Box::new(row.clone())),
        };
        subst::replace_headers(call.headers, real).map_err(bad)?;
        let query = call.query.as_deref().map(|q| subst::replace_query(q, real));
        let body = if presented
            .iter()
            .any(|(l, _)| matches!(l, Location::JsonBody | Location::FormBody))
        {
            // Every literal occurrence is replaced, in whatever field of the body.
            subst::replace_body(&call.body, call.headers, &key, real).map_err(bad)?
        } else {
            call.body
        };
        // The last word: the virtual key must not be anywhere in what is forwarded (a header
        // or parameter creditmeter does not read keys from, another body field).
        let leaked = call
            .headers
            .iter()
            .find(|(_, v)| memchr::memmem::find(v.as_bytes(), key.as_bytes()).is_some())
            .map(|(n, _)| n.as_str().to_owned())
            .or_else(|| {
                query
                    .as_deref()
                    .is_some_and(|q| q.contains(key.as_str()))
                    .then(|| "the query string".to_owned())
            })
            .or_else(|| memchr::memmem::find(&body, key.as_bytes()).map(|_| "the body".to_owned()));
        if let Some(place) = leaked {
            return Err(KeyRefusal {
                status: StatusCode::BAD_REQUEST,
                code: "virtual_key_misplaced",
                message: format!(
                    "the creditmeter key also appears in {place}, where creditmeter does not swap keys; send it only in X-Api-Key, Authorization: Bearer or api_key. Nothing was sent upstream"
                ),
                field: None,
                unauthenticated: false,
                key: Some(Box::new(row.clone())),
            });
        }
        Ok(Decision::Virtual {
            key: Box::new(row),
            attribution,
            query,
            body,
        })
    }
}

/// The key's attribution; a caller's that disagrees is a 403 `attribution_conflict`.
fn attribution_of(
    row: &KeyRow,
    caller: &Attribution,
    original_query: Option<&str>,
) -> Result<Attribution, KeyRefusal> {
    let conflict = |field: &'static str, message: String| KeyRefusal {
        status: StatusCode::FORBIDDEN,
        code: "attribution_conflict",
        message,
        field: Some(field),
        unauthenticated: false,
        key: Some(Box::new(row.clone())),
    };
    // The header wins over the parameter in `caller`; a parameter that disagrees with the key
    // is a conflict too, so both are checked, the parameter first (when it agrees, a
    // disagreeing `caller` value came from the header).
    let (param_table, param_workflow) = meter_params(original_query);
    for (field, given) in [
        ("meter_table", param_table.as_deref()),
        ("X-Meter-Table", caller.table.as_deref()),
    ] {
        if let Some(given) = given.filter(|g| *g != row.table) {
            return Err(conflict(
                field,
                format!(
                    "{field} says {given:?}, but this creditmeter key is bound to table {:?}; drop {field} (the key names the table) or use that table's key. Nothing was sent upstream",
                    row.table
                ),
            ));
        }
    }
    for (field, given) in [
        ("meter_workflow", param_workflow.as_deref()),
        ("X-Meter-Workflow", caller.workflow.as_deref()),
    ] {
        if let Some(given) = given.filter(|g| Some(*g) != row.workflow.as_deref()) {
            return Err(conflict(
                field,
                match &row.workflow {
                    Some(w) => format!("{field} says {given:?}, but this creditmeter key is bound to workflow {w:?}; drop {field}. Nothing was sent upstream"),
                    None => format!("{field} says {given:?}, but this creditmeter key names no workflow, so none may be given; make a key for that workflow (keys create --workflow). Nothing was sent upstream"),
                },
            ));
        }
    }
    let mut tags: BTreeMap<String, String> = caller.tags.clone();
    for (name, value) in &row.tags {
        if let Some(given) = tags.get(name).filter(|g| *g != value) {
            return Err(conflict(
                "X-Meter-Tag-*",
                format!("X-Meter-Tag-{name} says {given:?}, but this creditmeter key sets it to {value:?}; drop the header. Nothing was sent upstream"),
            ));
        }
        tags.insert(name.clone(), value.clone());
    }
    Ok(Attribution {
        table: Some(row.table.clone()),
        workflow: row.workflow.clone(),
        tags,
    })
}

/// `meter_table` and `meter_workflow` from the caller's query string (decoded).
fn meter_params(query: Option<&str>) -> (Option<String>, Option<String>) {
    let (mut table, mut workflow) = (None, None);
    for pair in query.unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = creditmeter_base::percent::percent_decode_bytes(k);
        let v = || {
            String::from_utf8_lossy(&creditmeter_base::percent::percent_decode_bytes(v))
                .trim()
                .to_owned()
        };
        match &k[..] {
            b"meter_table" => table = Some(v()),
            b"meter_workflow" => workflow = Some(v()),
            _ => {}
        }
    }
    (table, workflow)
}

/// A scope's `key` may name a virtual key by name; budgets and holds match `key_fp`, which is
/// the key's id. This turns a name into the id (a fingerprint, an id or a glob is kept).
pub fn resolve_scope_key(conn: &Connection, scope: &mut crate::guard::Scope) -> Result<(), String> {
    let Some(glob) = &scope.key else {
        return Ok(());
    };
    let pattern = glob.as_str();
    if crate::guard::scope::is_fingerprint_pattern(pattern) {
        return Ok(());
    }
    match store::find(conn, pattern) {
        Ok(Some(row)) => {
            scope.key = Some(crate::guard::scope::Glob::new(row.id));
            Ok(())
        }
        Ok(None) => Err(format!(
            "key {pattern:?} is neither a key fingerprint nor the name of a virtual key (`creditmeter keys list` shows them)"
        )),
        Err(e) => Err(format!("cannot read virtual keys: {e}")),
    }
}

/// `[[budget]]` entries with every `key = "<name>"` turned into the key's id (see
/// [`resolve_scope_key`]); a name no virtual key has is an error naming the budget.
pub fn resolve_budget_keys(
    conn: &Connection,
    budgets: &[crate::guard::BudgetConfig],
) -> Result<Vec<crate::guard::BudgetConfig>, crate::config::ConfigError> {
    budgets
        .iter()
        .map(|b| {
            let mut b = b.clone();
            resolve_scope_key(conn, &mut b.scope).map_err(|message| {
                crate::config::ConfigError::Budget {
                    budget: b.name.clone(),
                    key: "scope.key",
                    message,
                }
            })?;
            Ok(b)
        })
        .collect()
}

/// [`resolve_budget_keys`] on a read-only connection to the ledger at `path`.
pub fn resolve_budget_keys_at(
    path: &std::path::Path,
    budgets: &[crate::guard::BudgetConfig],
) -> Result<Vec<crate::guard::BudgetConfig>, String> {
    if budgets.iter().all(|b| {
        b.scope
            .key
            .as_ref()
            .is_none_or(|k| crate::guard::scope::is_fingerprint_pattern(k.as_str()))
    }) {
        return Ok(budgets.to_vec());
    }
    let conn = crate::ledger::open_for_read(path).map_err(|e| e.to_string())?;
    resolve_budget_keys(&conn, budgets).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> KeyRow {
        KeyRow {
            id: "0123456789abcdef".into(),
            name: None,
            prefix: "cmk_01234567".into(),
            table: "T".into(),
            workflow: None,
            tags: [("team".to_owned(), "growth".to_owned())].into(),
            upstream: None,
            created_at: 0,
            expires_at: None,
            revoked_at: None,
            rotated_at: None,
            last_used_at: None,
        }
    }

    #[test]
    fn the_key_decides_attribution_and_extra_tags_are_kept() {
        let caller = Attribution {
            table: Some("T".into()),
            workflow: None,
            tags: [("column".to_owned(), "email".to_owned())].into(),
        };
        let a = attribution_of(&key(), &caller, None).unwrap();
        assert_eq!(a.table.as_deref(), Some("T"));
        assert_eq!(a.tags.len(), 2);
        let forged = Attribution {
            tags: [("team".to_owned(), "sales".to_owned())].into(),
            ..Attribution::default()
        };
        let e = attribution_of(&key(), &forged, None).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::FORBIDDEN, "attribution_conflict")
        );
        // A workflow on a key without one is a conflict too.
        let wf = Attribution {
            workflow: Some("w".into()),
            ..Attribution::default()
        };
        let e = attribution_of(&key(), &wf, None).unwrap_err();
        assert_eq!(e.field, Some("X-Meter-Workflow"));
        let e =
            attribution_of(&key(), &Attribution::default(), Some("x=1&meter_table=U")).unwrap_err();
        assert_eq!(e.field, Some("meter_table"));
        assert!(e.message.contains("\"U\"") && e.message.contains("\"T\""));
    }
}
