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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{self, Entry};

    fn ledger() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn =
            crate::open_for_write(&dir.path().join("l.db"), crate::Synchronous::Normal).unwrap();
        (dir, conn)
    }

    fn entry(action: &str) -> Entry {
        Entry::new(1, "cli", action)
    }

    #[test]
    fn only_the_hash_and_prefix_are_stored_and_changes_bump_the_generation() {
        let (_d, mut conn) = ledger();
        assert_eq!(generation(&conn).unwrap(), 0);
        let new = NewKey {
            name: Some("a".into()),
            table: "T".into(),
            ..Default::default()
        };
        let issued = create(&mut conn, &new, 10, &entry(audit::action::KEY_CREATED)).unwrap();
        let key = &issued.key;
        assert!(key.starts_with(KEY_PREFIX));
        assert_eq!(key.len(), KEY_PREFIX.len() + 2 * KEY_RANDOM_BYTES);
        assert_eq!(issued.row.id.len(), 16);
        assert!(
            key.starts_with(&issued.row.prefix) && issued.row.prefix.len() == DISPLAY_PREFIX_CHARS
        );
        assert_eq!(generation(&conn).unwrap(), 1);
        // The whole table, and the audit entry, as text: the key is nowhere.
        let dump: String = conn
            .query_row(
                "SELECT group_concat(id || name || prefix || key_hash || table_name, '|') FROM virtual_keys",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(
            !dump.contains(key.as_str()) && dump.contains(&hash_key(key)),
            "{dump}"
        );
        let audit_text: String = conn
            .query_row(
                "SELECT actor || action || subject || detail FROM audit",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(!audit_text.contains(key.as_str()) && audit_text.contains(&issued.row.id));

        // Names are unique; a taken name changes nothing.
        assert!(matches!(
            create(&mut conn, &new, 11, &entry(audit::action::KEY_CREATED)),
            Err(KeyStoreError::NameTaken(_))
        ));
        assert_eq!(generation(&conn).unwrap(), 1);

        let rotated = rotate(&mut conn, "a", 12, &entry(audit::action::KEY_ROTATED)).unwrap();
        assert_eq!(rotated.row.id, issued.row.id);
        assert_ne!(rotated.key, issued.key);
        let by_hash: std::collections::HashMap<String, KeyRow> =
            all_by_hash(&conn).unwrap().into_iter().collect();
        assert!(by_hash.contains_key(&hash_key(&rotated.key)));
        assert!(!by_hash.contains_key(&hash_key(&issued.key)));
        assert_eq!(generation(&conn).unwrap(), 2);

        let revoked = revoke(
            &mut conn,
            &issued.row.id,
            13,
            &entry(audit::action::KEY_REVOKED),
        )
        .unwrap()
        .unwrap();
        assert_eq!(revoked.revoked_at, Some(13));
        assert!(!revoked.is_live(14));
        assert!(
            revoke(&mut conn, "a", 14, &entry(audit::action::KEY_REVOKED))
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            rotate(&mut conn, "a", 15, &entry(audit::action::KEY_ROTATED)),
            Err(KeyStoreError::Revoked(_))
        ));
        assert!(matches!(
            revoke(&mut conn, "nope", 15, &entry(audit::action::KEY_REVOKED)),
            Err(KeyStoreError::NotFound(_))
        ));
        assert_eq!(generation(&conn).unwrap(), 3);
        let actions: Vec<String> = audit::since(&conn, 0, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.action)
            .collect();
        assert_eq!(actions, ["key_created", "key_rotated", "key_revoked"]);
    }

    #[test]
    fn expiry_and_last_use() {
        let (_d, mut conn) = ledger();
        let issued = create(
            &mut conn,
            &NewKey {
                table: "T".into(),
                expires_at: Some(100),
                ..Default::default()
            },
            10,
            &entry(audit::action::KEY_CREATED),
        )
        .unwrap();
        assert!(issued.row.is_live(99) && !issued.row.is_live(100));
        // A call recorded under the key's id moves last_used_at; a settlement does not.
        for (started, outcome) in [(50, "ok"), (70, "settlement"), (40, "ok")] {
            conn.execute(
                "INSERT INTO calls (request_id, started_at, finished_at, method, path, endpoint, outcome,
                                    key_fp, credit_source, catalog_version)
                 VALUES (?1, ?2, ?2, 'POST', '/p', 'other', ?3, ?4, 'none', 'v')",
                rusqlite::params![format!("r{started}"), started, outcome, issued.row.id],
            )
            .unwrap();
        }
        let row = find(&conn, &issued.row.id).unwrap().unwrap();
        assert_eq!(row.last_used_at, Some(50));
    }
}
