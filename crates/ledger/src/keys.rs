//! Virtual keys in the ledger: the `virtual_keys` table (only a SHA-256 of each key and a short
//! display prefix, never the key) and the generation counter a running server checks before
//! each lookup. Every change bumps `meta.keys_generation` in the same transaction, so any
//! process that reads the counter sees the change as soon as it is committed. Knows nothing of
//! HTTP.
//!
//! Why SHA-256 and not HMAC with the install secret: a key is 192 random bits, so its hash
//! cannot be searched backwards, and the install secret sits in the same file (an HMAC would add
//! nothing against a stolen copy of it).

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;

use super::LedgerError;

/// Every virtual key starts with this.
pub const KEY_PREFIX: &str = "cmk_";
/// Random bytes in a key (192 bits), written as 48 lower-case hex digits after `cmk_`.
pub const KEY_RANDOM_BYTES: usize = 24;
/// Characters of the key shown by `keys list` (`cmk_` and 8 hex digits: 32 of its 192 bits).
pub const DISPLAY_PREFIX_CHARS: usize = KEY_PREFIX.len() + 8;

/// One virtual key as stored (no secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRow {
    /// 16 hex digits, random; the `key_fp` of every call made with the key.
    pub id: String,
    pub name: Option<String>,
    /// The key's first characters, for recognising it (`cmk_1a2b3c4d`).
    pub prefix: String,
    pub table: String,
    pub workflow: Option<String>,
    pub tags: BTreeMap<String, String>,
    /// `[keys.upstreams.NAME]`; `None`: the key in `keys.upstream_key_env`.
    pub upstream: Option<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub rotated_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

impl KeyRow {
    /// Whether the key may be used at `now` (unix ms).
    pub fn is_live(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }
}

/// What a new key is bound to.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: Option<String>,
    pub table: String,
    pub workflow: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub upstream: Option<String>,
    pub expires_at: Option<i64>,
}

/// A key as handed out once: the secret and its row.
#[derive(Debug, Clone)]
pub struct Issued {
    /// `cmk_…`: shown once, never stored.
    pub key: String,
    pub row: KeyRow,
}

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("a key named {0:?} exists already; choose another name")]
    NameTaken(String),
    #[error("no virtual key {0:?} (`creditmeter keys list` shows ids and names)")]
    NotFound(String),
    #[error("key {0} is revoked; create a new one")]
    Revoked(String),
}

impl From<rusqlite::Error> for KeyStoreError {
    fn from(e: rusqlite::Error) -> Self {
        KeyStoreError::Ledger(LedgerError::Sql(e))
    }
}

/// SHA-256 of a key, as stored in `virtual_keys.key_hash` (64 hex digits).
pub fn hash_key(key: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, key.as_bytes()).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn random_hex(bytes: usize) -> Result<String, LedgerError> {
    let mut buf = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut buf)
        .map_err(|_| LedgerError::Random)?;
    Ok(hex(&buf))
}

/// A new secret: `cmk_` and 192 random bits from the system's random source.
fn new_secret() -> Result<String, LedgerError> {
    Ok(format!("{KEY_PREFIX}{}", random_hex(KEY_RANDOM_BYTES)?))
}

fn display_prefix(key: &str) -> String {
    key.chars().take(DISPLAY_PREFIX_CHARS).collect()
}

/// The counter every key change bumps (0 before the first).
pub fn generation(conn: &Connection) -> rusqlite::Result<i64> {
    let v: Option<i64> = conn
        .prepare_cached("SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'keys_generation'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(v.unwrap_or(0))
}

fn bump_generation(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta(key, value) VALUES ('keys_generation', 1)
         ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
        [],
    )?;
    Ok(())
}

const COLUMNS: &str = "id, name, prefix, table_name, workflow, tags, upstream, created_at, \
                       expires_at, revoked_at, rotated_at, last_used_at";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRow> {
    let tags: Option<String> = r.get(5)?;
    Ok(KeyRow {
        id: r.get(0)?,
        name: r.get(1)?,
        prefix: r.get(2)?,
        table: r.get(3)?,
        workflow: r.get(4)?,
        tags: tags
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default(),
        upstream: r.get(6)?,
        created_at: r.get(7)?,
        expires_at: r.get(8)?,
        revoked_at: r.get(9)?,
        rotated_at: r.get(10)?,
        last_used_at: r.get(11)?,
    })
}

/// Makes a key bound to `new`, returning its secret (the only time it exists outside the
/// caller's hands) and row. `audit` is written in the same transaction.
pub fn create(
    conn: &mut Connection,
    new: &NewKey,
    now: i64,
    audit: &super::audit::Entry,
) -> Result<Issued, KeyStoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let Some(name) = &new.name {
        let taken: Option<String> = tx
            .query_row("SELECT id FROM virtual_keys WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        if taken.is_some() {
            return Err(KeyStoreError::NameTaken(name.clone()));
        }
    }
    let key = new_secret()?;
    let id = random_hex(8)?;
    let tags = (!new.tags.is_empty())
        .then(|| serde_json::to_string(&new.tags).ok())
        .flatten();
    tx.execute(
        "INSERT INTO virtual_keys (id, name, prefix, key_hash, table_name, workflow, tags,
                                   upstream, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            id,
            new.name,
            display_prefix(&key),
            hash_key(&key),
            new.table,
            new.workflow,
            tags,
            new.upstream,
            now,
            new.expires_at
        ],
    )?;
    bump_generation(&tx)?;
    let row = get_in(&tx, &id)?.ok_or_else(|| KeyStoreError::NotFound(id.clone()))?;
    super::audit::insert(&tx, &audit.with_subject(&id, key_detail(&row)))?;
    tx.commit()?;
    Ok(Issued { key, row })
}

/// What an audit entry says about a key: its scope, never its secret.
fn key_detail(row: &KeyRow) -> serde_json::Value {
    serde_json::json!({
        "name": row.name,
        "prefix": row.prefix,
        "table": row.table,
        "workflow": row.workflow,
        "tags": row.tags,
        "upstream": row.upstream,
        "expires_at": row.expires_at,
    })
}

fn get_in(conn: &Connection, id: &str) -> rusqlite::Result<Option<KeyRow>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM virtual_keys WHERE id = ?1"),
        [id],
        row,
    )
    .optional()
}

/// The key with this id, or else this name.
pub fn find(conn: &Connection, id_or_name: &str) -> rusqlite::Result<Option<KeyRow>> {
    conn.query_row(
        &format!(
            "SELECT {COLUMNS} FROM virtual_keys WHERE id = ?1
             UNION ALL SELECT {COLUMNS} FROM virtual_keys WHERE name = ?1 AND id <> ?1 LIMIT 1"
        ),
        [id_or_name],
        row,
    )
    .optional()
}

/// Every key, oldest first (revoked ones included: they are a record).
pub fn list(conn: &Connection) -> rusqlite::Result<Vec<KeyRow>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM virtual_keys ORDER BY created_at, id"
    ))?;
    let rows = stmt.query_map([], row)?;
    rows.collect()
}

/// Live and dead keys by hash, for a lookup cache: `(key_hash, row)`.
pub fn all_by_hash(conn: &Connection) -> rusqlite::Result<Vec<(String, KeyRow)>> {
    let mut stmt = conn.prepare(&format!("SELECT {COLUMNS}, key_hash FROM virtual_keys"))?;
    let rows = stmt.query_map([], |r| Ok((r.get(12)?, row(r)?)))?;
    rows.collect()
}

/// Revokes a key (by id or name): calls with it are refused from the next request on. `None`
/// when it was revoked already (nothing changes, nothing is audited).
pub fn revoke(
    conn: &mut Connection,
    id_or_name: &str,
    now: i64,
    audit: &super::audit::Entry,
) -> Result<Option<KeyRow>, KeyStoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found = find(&tx, id_or_name)?.ok_or_else(|| KeyStoreError::NotFound(id_or_name.into()))?;
    if found.revoked_at.is_some() {
        return Ok(None);
    }
    tx.execute(
        "UPDATE virtual_keys SET revoked_at = ?2 WHERE id = ?1",
        params![found.id, now],
    )?;
    bump_generation(&tx)?;
    let row = get_in(&tx, &found.id)?.ok_or_else(|| KeyStoreError::NotFound(found.id.clone()))?;
    super::audit::insert(&tx, &audit.with_subject(&row.id, key_detail(&row)))?;
    tx.commit()?;
    Ok(Some(row))
}

/// Gives a key a new secret, keeping its id and scope; the old secret stops working at once.
pub fn rotate(
    conn: &mut Connection,
    id_or_name: &str,
    now: i64,
    audit: &super::audit::Entry,
) -> Result<Issued, KeyStoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found = find(&tx, id_or_name)?.ok_or_else(|| KeyStoreError::NotFound(id_or_name.into()))?;
    if found.revoked_at.is_some() {
        return Err(KeyStoreError::Revoked(found.id));
    }
    let key = new_secret()?;
    tx.execute(
        "UPDATE virtual_keys SET key_hash = ?2, prefix = ?3, rotated_at = ?4 WHERE id = ?1",
        params![found.id, hash_key(&key), display_prefix(&key), now],
    )?;
    bump_generation(&tx)?;
    let row = get_in(&tx, &found.id)?.ok_or_else(|| KeyStoreError::NotFound(found.id.clone()))?;
    let mut detail = key_detail(&row);
    detail["old_prefix"] = serde_json::Value::String(found.prefix);
    super::audit::insert(&tx, &audit.with_subject(&row.id, detail))?;
    tx.commit()?;
    Ok(Issued { key, row })
}
