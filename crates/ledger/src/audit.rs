//! The audit log: who changed what, when. One row per admin action: virtual keys created,
//! revoked and rotated, holds placed and lifted, configuration reloads. The actor is `cli`
//! (the `creditmeter` command on this machine), `admin` (the admin API without a token, on
//! loopback), `token:<admin.token_env>` (the admin API with its token) or `sighup`. The detail is
//! JSON saying what changed; it never holds a key. Knows nothing of HTTP.

use rusqlite::{params, Connection};
use serde::Serialize;

/// What happened, as stored in `audit.action`.
pub mod action {
    pub const KEY_CREATED: &str = "key_created";
    pub const KEY_REVOKED: &str = "key_revoked";
    pub const KEY_ROTATED: &str = "key_rotated";
    pub const HOLD_PLACED: &str = "hold_placed";
    pub const HOLD_LIFTED: &str = "hold_lifted";
    pub const CONFIG_RELOADED: &str = "config_reloaded";
    pub const CONFIG_RELOAD_REFUSED: &str = "config_reload_refused";
}

/// The actor of changes made with the `creditmeter` command.
pub const ACTOR_CLI: &str = "cli";

/// One audit row, to write or as read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// `None` until stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    /// unix ms, UTC.
    pub at: i64,
    pub actor: String,
    pub action: String,
    /// The key id or hold id changed, if any.
    pub subject: Option<String>,
    /// What changed (JSON).
    pub detail: serde_json::Value,
}

impl Entry {
    pub fn new(at: i64, actor: &str, action: &str) -> Entry {
        Entry {
            id: None,
            at,
            actor: actor.to_owned(),
            action: action.to_owned(),
            subject: None,
            detail: serde_json::Value::Null,
        }
    }

    /// This entry about `subject`, saying `detail`.
    pub fn with_subject(&self, subject: &str, detail: serde_json::Value) -> Entry {
        Entry {
            subject: Some(subject.to_owned()),
            detail,
            ..self.clone()
        }
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> Entry {
        self.detail = detail;
        self
    }
}

/// Appends `e` (inside the caller's transaction, if any).
pub fn insert(conn: &Connection, e: &Entry) -> rusqlite::Result<i64> {
    let detail = (!e.detail.is_null()).then(|| e.detail.to_string());
    conn.execute(
        "INSERT INTO audit (at, actor, action, subject, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![e.at, e.actor, e.action, e.subject, detail],
    )?;
    Ok(conn.last_insert_rowid())
}

/// Entries at or after `since_ms`, oldest first, at most `limit`.
pub fn since(conn: &Connection, since_ms: i64, limit: usize) -> rusqlite::Result<Vec<Entry>> {
    let mut stmt = conn.prepare(
        "SELECT id, at, actor, action, subject, detail FROM audit
          WHERE at >= ?1 ORDER BY at, id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![since_ms, limit as i64], |r| {
        let detail: Option<String> = r.get(5)?;
        Ok(Entry {
            id: Some(r.get(0)?),
            at: r.get(1)?,
            actor: r.get(2)?,
            action: r.get(3)?,
            subject: r.get(4)?,
            detail: detail
                .and_then(|d| serde_json::from_str(&d).ok())
                .unwrap_or(serde_json::Value::Null),
        })
    })?;
    rows.collect()
}

/// Appends `e` on a connection of its own to the ledger at `path` (for processes and tasks
/// that hold no write connection: the admin API, the reload loop, the CLI).
pub fn append_at(path: &std::path::Path, e: &Entry) -> Result<i64, super::LedgerError> {
    let conn = open_for_admin(path)?;
    Ok(insert(&conn, e)?)
}

/// A read-write connection for admin changes (keys, audit), waiting up to 5 s for the writer.
pub fn open_for_admin(path: &std::path::Path) -> Result<Connection, super::LedgerError> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| super::LedgerError::Open {
        path: path.to_owned(),
        source,
    })?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}
