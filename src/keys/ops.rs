//! Key operations shared by the CLI (`creditmeter keys …`) and the admin API (`/api/keys`):
//! checking a new key's binding, making, listing, revoking and rotating keys, each change
//! written to the audit log with its actor in the same transaction, and the JSON both print.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::ledger::audit::{self, Entry};
use crate::ledger::keys::{self as store, Issued, KeyRow, KeyStoreError, NewKey};

/// Why a key could not be made or changed; the message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum KeyOpError {
    /// The request is wrong (a 400, or exit code 64).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] KeyStoreError),
}

impl From<crate::ledger::LedgerError> for KeyOpError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        KeyOpError::Store(KeyStoreError::Ledger(e))
    }
}

/// What `keys create` and `POST /api/keys` take.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub table: String,
    pub workflow: Option<String>,
    /// `name=value` pairs.
    pub tags: BTreeMap<String, String>,
    pub name: Option<String>,
    /// A span from now (`90d`) or a time (RFC 3339 or a date).
    pub expires: Option<String>,
    pub upstream: Option<String>,
}

/// `k=v` (from `--tag k=v`) into a pair; the name is lower-cased like `X-Meter-Tag-*` names.
pub fn parse_tag(s: &str) -> Result<(String, String), KeyOpError> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| KeyOpError::Invalid(format!("--tag {s:?}: write NAME=VALUE")))?;
    Ok((k.trim().to_ascii_lowercase(), v.to_owned()))
}

fn invalid(e: impl std::fmt::Display) -> KeyOpError {
    KeyOpError::Invalid(e.to_string())
}

/// When a key made at `now` expires: `90d` from now, or a time.
fn expiry(s: &str, now: i64) -> Result<i64, KeyOpError> {
    if let Ok(d) = crate::config::HumanDuration::parse(s) {
        if d.is_zero() {
            return Err(invalid("--expires must be longer than zero, e.g. 90d"));
        }
        return Ok(now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
    }
    let starts_with_digit_run_and_unit = s.trim().ends_with(|c: char| c.is_ascii_alphabetic())
        && !s.contains('-')
        && !s.contains(':');
    if starts_with_digit_run_and_unit {
        return Err(invalid(format!(
            "--expires {s:?}: write a span such as 90d, 12h or 30m, or a time such as 2027-01-31"
        )));
    }
    let t = crate::report::parse_time(s, now).map_err(|e| invalid(format!("--expires: {e}")))?;
    if t <= now {
        return Err(invalid(format!("--expires {s:?} is in the past")));
    }
    Ok(t)
}

/// Checks a request and turns it into what the store keeps. `config`, when known, says
/// which `--upstream` names exist.
pub fn check(
    req: &CreateRequest,
    config: Option<&super::KeysConfig>,
    now: i64,
) -> Result<NewKey, KeyOpError> {
    let table = crate::attribution::check_name("table", &req.table).map_err(invalid)?;
    let workflow = req
        .workflow
        .as_deref()
        .map(|w| crate::attribution::check_name("workflow", w))
        .transpose()
        .map_err(invalid)?;
    if req.tags.len() > crate::attribution::MAX_TAGS {
        return Err(invalid(format!(
            "at most {} tags",
            crate::attribution::MAX_TAGS
        )));
    }
    let mut tags = BTreeMap::new();
    for (k, v) in &req.tags {
        let name = k.trim().to_ascii_lowercase();
        if name.is_empty()
            || http::HeaderName::from_bytes(format!("x-meter-tag-{name}").as_bytes()).is_err()
        {
            return Err(invalid(format!(
                "tag name {k:?} must be usable as a header name (X-Meter-Tag-{k})"
            )));
        }
        let v = crate::attribution::check_tag(&format!("tag {name}"), v).map_err(invalid)?;
        tags.insert(name, v);
    }
    if let Some(name) = &req.name {
        if !super::config::valid_name(name) {
            return Err(invalid(format!(
                "name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )));
        }
        if crate::guard::scope::is_fingerprint_pattern(name) {
            return Err(invalid(format!(
                "name {name:?} looks like a key id or fingerprint (hex digits only); choose a name with other letters"
            )));
        }
        if name.starts_with(store::KEY_PREFIX) {
            return Err(invalid(format!(
                "name {name:?} may not start with {}",
                store::KEY_PREFIX
            )));
        }
    }
    if let (Some(u), Some(c)) = (&req.upstream, config) {
        if !c.has_upstream(u) {
            let known: Vec<&String> = c.upstreams.keys().collect();
            return Err(invalid(format!(
                "--upstream {u:?} is not configured: add [keys.upstreams.{u}] with key_env to the config (configured: {known:?})"
            )));
        }
    }
    if let Some(u) = &req.upstream {
        if !super::config::valid_name(u) {
            return Err(invalid(format!("--upstream {u:?} is not an upstream name")));
        }
    }
    let expires_at = req.expires.as_deref().map(|e| expiry(e, now)).transpose()?;
    Ok(NewKey {
        name: req.name.clone(),
        table,
        workflow,
        tags,
        upstream: req.upstream.clone(),
        expires_at,
    })
}

/// Makes a key (audited as `actor`).
pub fn create(
    ledger: &Path,
    req: &CreateRequest,
    config: Option<&super::KeysConfig>,
    actor: &str,
    now: i64,
) -> Result<Issued, KeyOpError> {
    let new = check(req, config, now)?;
    let mut conn = audit::open_for_admin(ledger)?;
    Ok(store::create(
        &mut conn,
        &new,
        now,
        &Entry::new(now, actor, audit::action::KEY_CREATED),
    )?)
}

/// Revokes a key by id or name (audited as `actor`): `(row, changed)`; revoking a revoked key
/// changes nothing.
pub fn revoke(
    ledger: &Path,
    id_or_name: &str,
    actor: &str,
    now: i64,
) -> Result<(KeyRow, bool), KeyOpError> {
    let mut conn = audit::open_for_admin(ledger)?;
    match store::revoke(
        &mut conn,
        id_or_name,
        now,
        &Entry::new(now, actor, audit::action::KEY_REVOKED),
    )? {
        Some(row) => Ok((row, true)),
        None => {
            let row = store::find(&conn, id_or_name)
                .map_err(KeyStoreError::from)?
                .ok_or_else(|| KeyStoreError::NotFound(id_or_name.to_owned()))?;
            Ok((row, false))
        }
    }
}

/// Gives a key a new secret (audited as `actor`).
pub fn rotate(
    ledger: &Path,
    id_or_name: &str,
    actor: &str,
    now: i64,
) -> Result<Issued, KeyOpError> {
    let mut conn = audit::open_for_admin(ledger)?;
    Ok(store::rotate(
        &mut conn,
        id_or_name,
        now,
        &Entry::new(now, actor, audit::action::KEY_ROTATED),
    )?)
}

/// Every key.
pub fn list(ledger: &Path) -> Result<Vec<KeyRow>, KeyOpError> {
    let conn = crate::ledger::open_for_read(ledger)?;
    Ok(store::list(&conn).map_err(KeyStoreError::from)?)
}

fn time(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, |t| {
        Value::String(crate::report::format_time(t))
    })
}

/// `live`, `revoked` or `expired`.
pub fn status(row: &KeyRow, now: i64) -> &'static str {
    if row.revoked_at.is_some() {
        "revoked"
    } else if !row.is_live(now) {
        "expired"
    } else {
        "live"
    }
}

/// A key as `keys list --format json` and `GET /api/keys` show it (times in RFC 3339, and
/// in unix ms under `*_ms`).
pub fn row_json(row: &KeyRow, now: i64) -> Value {
    json!({
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "table": row.table,
        "workflow": row.workflow,
        "tags": row.tags,
        "upstream": row.upstream,
        "status": status(row, now),
        "created_at": time(Some(row.created_at)),
        "expires_at": time(row.expires_at),
        "last_used_at": time(row.last_used_at),
        "revoked_at": time(row.revoked_at),
        "rotated_at": time(row.rotated_at),
        "created_at_ms": row.created_at,
        "expires_at_ms": row.expires_at,
        "last_used_at_ms": row.last_used_at,
        "revoked_at_ms": row.revoked_at,
    })
}

/// A newly issued key: the row, and the secret under `key` (shown this once).
pub fn issued_json(issued: &Issued, now: i64) -> Value {
    let mut v = row_json(&issued.row, now);
    v["key"] = Value::String(issued.key.clone());
    v
}

/// An audit entry as `creditmeter audit --format json` and `GET /api/audit` show it.
pub fn audit_json(e: &Entry) -> Value {
    json!({
        "id": e.id,
        "at": crate::report::format_time(e.at),
        "at_ms": e.at,
        "actor": e.actor,
        "action": e.action,
        "subject": e.subject,
        "detail": e.detail,
    })
}

/// `keys list` as a table.
pub fn list_table(rows: &[KeyRow], now: i64) -> String {
    let mut out = format!(
        "{:<16}  {:<20}  {:<12}  {:<8}  {:<24}  {:<20}  {:<20}  {}\n",
        "ID", "NAME", "PREFIX", "STATUS", "TABLE", "CREATED", "LAST USED", "SCOPE"
    );
    for r in rows {
        let mut scope = Vec::new();
        if let Some(w) = &r.workflow {
            scope.push(format!("workflow={w}"));
        }
        for (k, v) in &r.tags {
            scope.push(format!("tag.{k}={v}"));
        }
        if let Some(u) = &r.upstream {
            scope.push(format!("upstream={u}"));
        }
        if let Some(e) = r.expires_at {
            scope.push(format!("expires={}", crate::report::format_time(e)));
        }
        out.push_str(&format!(
            "{:<16}  {:<20}  {:<12}  {:<8}  {:<24}  {:<20}  {:<20}  {}\n",
            r.id,
            r.name.as_deref().unwrap_or("-"),
            r.prefix,
            status(r, now),
            r.table,
            crate::report::format_time(r.created_at),
            r.last_used_at
                .map_or("never".into(), crate::report::format_time),
            scope.join(" ")
        ));
    }
    out
}

/// The audit log as a table.
pub fn audit_table(entries: &[Entry]) -> String {
    let mut out = format!(
        "{:<20}  {:<28}  {:<22}  {:<16}  {}\n",
        "AT", "ACTOR", "ACTION", "SUBJECT", "DETAIL"
    );
    for e in entries {
        out.push_str(&format!(
            "{:<20}  {:<28}  {:<22}  {:<16}  {}\n",
            crate::report::format_time(e.at),
            e.actor,
            e.action,
            e.subject.as_deref().unwrap_or("-"),
            if e.detail.is_null() {
                String::new()
            } else {
                e.detail.to_string()
            }
        ));
    }
    out
}
