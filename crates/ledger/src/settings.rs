//! The ledger's settings that config files name: how hard a commit syncs, and what happens while
//! the store refuses writes.

use serde::Deserialize;

/// SQLite `synchronous` level for the ledger (WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    /// Survives a killed process; the last commits can be lost on power failure (default).
    Normal,
    /// fsync on every commit: survives power failure too, at a cost per group commit.
    Full,
}

/// What happens while SQLite refuses writes (disk full, locked, file deleted or unwritable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnLedgerError {
    /// Keep serving; rows go to the spool beside the ledger and are replayed on recovery (default).
    Spool,
    /// Refuse new calls with a 503 until the ledger recovers: no credit is spent unrecorded.
    /// Rows of calls already in flight are spooled.
    FailClosed,
}

impl OnLedgerError {
    /// The config spelling, for logs, `/readyz` and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            OnLedgerError::Spool => "spool",
            OnLedgerError::FailClosed => "fail_closed",
        }
    }
}
