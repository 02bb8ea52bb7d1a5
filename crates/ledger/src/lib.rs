//! The ledger: one row per proxied call, committed at call time, behind the [`store`] seam
//! (SQLite, [`sqlite`], is its first implementation).
//!
//! Callers outside this crate hold an `Arc<dyn Store>` ([`SharedStore`]); see [`store`] for the
//! traits, why they are synchronous, how a table or a query is added, and the callers that do
//! not go through it yet (the reconcile poller's window settling and inserts, virtual keys and
//! the audit log, the repeats, FOCUS and raw-calls reports, `creditmeter_sim::synth`).
//!
//! The file runs in WAL mode so that readers (a person in `sqlite3`, `creditmeter report`) never
//! block the writer. One writer thread owns the store's [`CallSink`] and group-commits rows
//! handed to it over a channel ([`writer`]). This crate knows nothing of HTTP.
//!
//! Triggers keep `rollup_hourly` (spend per hour × table × workflow × endpoint × status ×
//! outcome) in the same transaction as each insert, so reports over big windows read thousands
//! of rollup rows instead of millions of calls ([`queries`]). Retention deletes old detail rows
//! in small batches on its own thread and never touches the rollups ([`maintenance`]).
//! `creditmeter_sim::synth` writes realistic synthetic ledgers for benchmarks.

pub mod audit;
pub mod fixtures;
pub mod guardrails;
pub mod identifiers;
pub mod keys;
pub mod maintenance;
pub mod queries;
pub mod reconcile;
pub mod schema;
pub mod settings;
pub mod sqlite;
pub mod store;
pub mod writer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};

pub use writer::{CommitError, LedgerHandle, LedgerMetrics, LedgerWriter, WriterConfig};

pub use settings::{OnLedgerError, Synchronous};
pub use sqlite::SqliteStore;
pub use store::{
    CallSink, Guardrails, PendingCall, ReconcileStore, Reports, Rows, SettleStore, SharedStore,
    SinkOptions, Store,
};

/// Why the ledger could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create the ledger's directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ledger schema version {found} is newer than this build supports ({supported}); upgrade creditmeter")]
    TooNew { found: i64, supported: i64 },
    #[error("ledger: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A read query failed (reports, the usage API, a budget rebuild).
    #[error("ledger query: {0}")]
    Query(#[source] rusqlite::Error),
    #[error("ledger file {path} was deleted or replaced")]
    Replaced { path: PathBuf },
    #[error("ledger is not open")]
    NotOpen,
    #[error("ledger {path}: journal_mode is {mode}, but WAL is required (is the file on a network file system?)")]
    NotWal { path: PathBuf, mode: String },
    #[error("the system random source failed while making the install secret")]
    Random,
    #[error("ledger spool {path}: {source}")]
    Spool {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the ledger writer thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// What happened to a call, as recorded in `calls.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Upstream answered and the caller received the whole response (any status).
    Ok,
    /// Upstream could not be reached, reset the connection, or sent garbage.
    UpstreamError,
    /// Upstream did not answer within `upstream.timeout`.
    UpstreamTimeout,
    /// The caller went away before the end of the response; upstream was read to the end anyway.
    ClientCancelled,
    /// creditmeter refused the call (bad attribution, body too large, not proxyable); nothing went upstream.
    Rejected,
    /// A `block` budget refused the call: its worst-case cost would cross the limit. Nothing went upstream.
    RejectedBudget,
    /// A hold (emergency stop) covers the call. Nothing went upstream.
    RejectedHold,
    /// Not a call: the credits Apollo billed later for an earlier call's asynchronous job
    /// (phone reveal, waterfall). `settles` names that call's `request_id`.
    Settlement,
}

impl Outcome {
    /// The value stored in the ledger and used as the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamTimeout => "upstream_timeout",
            Outcome::ClientCancelled => "client_cancelled",
            Outcome::Rejected => "rejected",
            Outcome::RejectedBudget => "rejected_budget",
            Outcome::RejectedHold => "rejected_hold",
            Outcome::Settlement => "settlement",
        }
    }
}

/// One row of `calls`. Field names match the columns. Serialized as one JSON line in the spool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallRecord {
    pub request_id: String,
    pub started_at: i64,
    pub finished_at: i64,
    pub method: String,
    pub path: String,
    pub endpoint: String,
    pub status: Option<u16>,
    pub outcome: Outcome,
    pub table_name: Option<String>,
    pub workflow: Option<String>,
    pub tags: Option<String>,
    pub key_fp: Option<String>,
    pub lead_milli: i64,
    pub direct_dial_milli: i64,
    pub export_milli: i64,
    pub credit_source: std::borrow::Cow<'static, str>,
    pub records_requested: Option<i64>,
    pub records_matched: Option<i64>,
    pub catalog_version: String,
    pub upstream_ms: Option<i64>,
    pub request_bytes: i64,
    pub response_bytes: i64,
    pub error: Option<String>,
    pub id_kinds: Option<String>,
    /// Settlement rows only: the `request_id` of the call whose deferred charge this is.
    #[serde(default)]
    pub settles: Option<String>,
    /// What Apollo bills later for this call, as JSON (see `catalog::Deferred`); `None` when
    /// nothing is deferred.
    #[serde(default)]
    pub deferred: Option<String>,
    /// The worst case of `deferred`, milli-credits (0 when nothing is deferred).
    #[serde(default)]
    pub deferred_milli: i64,
    /// Fingerprints of the identifiers the call carried (table `identifiers`); empty unless
    /// it billed credits and `attribution.identifier_fingerprints` is on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identifiers: Vec<identifiers::IdentifierFp>,
}

impl CallRecord {
    /// `credits_milli`: the sum over credit types.
    pub fn credits_milli(&self) -> i64 {
        self.lead_milli + self.direct_dial_milli + self.export_milli
    }
}

/// Opens (creating if needed) the ledger for writing: WAL, the chosen `synchronous`, migrated.
pub fn open_for_write(path: &Path, synchronous: Synchronous) -> Result<Connection, LedgerError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| LedgerError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    let open_err = |source| LedgerError::Open {
        path: path.to_owned(),
        source,
    };
    let mut conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(open_err)?;
    // A new file gets incremental auto-vacuum, so `creditmeter ledger vacuum` can hand pages
    // freed by retention back to the file system in small steps, without a full rewrite.
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .map_err(open_err)?;
    if pages == 0 {
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
            .map_err(open_err)?;
    }
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(LedgerError::NotWal {
            path: path.to_owned(),
            mode,
        });
    }
    let sync = match synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync)
        .map_err(open_err)?;
    schema::migrate(&mut conn).map_err(|e| match e {
        LedgerError::Sql(source) => open_err(source),
        other => other,
    })?;
    Ok(conn)
}

/// Opens the ledger read-only, for reports. Never takes a write lock, so it never blocks the proxy.
pub fn open_for_read(path: &Path) -> Result<Connection, LedgerError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(|source| LedgerError::Open {
        path: path.to_owned(),
        source,
    })?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// The install secret used to fingerprint API keys: 32 random bytes made once, kept in `meta`.
pub fn install_secret(conn: &Connection) -> Result<Vec<u8>, LedgerError> {
    let existing: Option<Vec<u8>> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'install_secret'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(secret) = existing.filter(|s| s.len() >= 16) {
        return Ok(secret);
    }
    let mut secret = vec![0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| LedgerError::Random)?;
    conn.execute(
        "INSERT OR REPLACE INTO meta(key, value) VALUES ('install_secret', ?1)",
        [&secret],
    )?;
    Ok(secret)
}
