//! Reconciliation: catch the credits spent outside creditmeter, and when.
//!
//! creditmeter only sees what passes through it. Apollo's own credit balance
//! (`POST /api/v1/usage_stats/credit_usage_stats`, master key, free) sees everything. The
//! [`poller`] reads that balance every `reconcile.interval` through the proxy's upstream client,
//! records the poll as an ordinary (free) call, and stores the figures in `balance_snapshots`.
//! Each pair of consecutive snapshots is a window; once every call that could belong to it has
//! ended, [`store`] settles it per credit type (or pool) ([`drift`]: Apollo's consumed delta against the
//! ledger's credits, with calls at the edges netted out) into `reconciliation`, and the metrics
//! follow. [`answer`] reads those windows back for `creditmeter report --reconcile` and
//! `GET /api/reconcile`, and says what the drift looks like: traffic outside the proxy, or a
//! catalog rule that under-prices one endpoint. [`calls`] does the same for Apollo's call counts
//! per route (`usage_stats/api_usage_stats`), so calls made outside creditmeter get a name.
//!
//! Apollo's figures are whole credits ([`drift::slack`]); `reconcile.pool = "unified"` reads
//! `lead_credit` as one pool against the ledger's total ([`Pool`]). A window settles as soon
//! as every call that started before its closing snapshot is in the ledger (the poller asks
//! `crate::inflight`), not a fixed `upstream.timeout` later.

pub mod answer;
pub mod calls;
pub mod drift;
pub mod poller;
pub mod store;
pub mod usage;

pub use poller::{Poller, PollerStatus};

/// `calls.table_name` of the poller's own calls (see [`crate::meter::POLLER_TABLE`]).
pub use crate::meter::POLLER_TABLE;
/// `calls.workflow` of the poller's own calls.
pub const POLLER_WORKFLOW: &str = "reconcile";
/// The path polled, under the upstream base URL.
pub const USAGE_STATS_PATH: &str = "/api/v1/usage_stats/credit_usage_stats";
/// The per-route call counts polled next to the balance (see [`calls`]).
pub const API_USAGE_STATS_PATH: &str = "/api/v1/usage_stats/api_usage_stats";

pub use crate::config::Pool;

/// The credit types the ledger prices, and their names on Apollo's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CreditType {
    Lead,
    DirectDial,
    Export,
    /// `reconcile.pool = "unified"`: Apollo's `lead_credit` as one pool holding every credit
    /// type, set against the ledger's total (`credits_milli`). Never in [`CreditType::ALL`].
    Unified,
}

impl CreditType {
    pub const ALL: [CreditType; 3] = [CreditType::Lead, CreditType::DirectDial, CreditType::Export];

    /// What a window is reconciled per: the three types, or the one unified pool.
    pub fn pools(pool: Pool) -> &'static [CreditType] {
        match pool {
            Pool::Typed => &CreditType::ALL,
            Pool::Unified => &[CreditType::Unified],
        }
    }

    /// The credit type whose balance snapshots a pool is judged by (`lead` for the unified
    /// pool: Apollo reports it as `lead_credit`).
    pub fn snapshot_type(self) -> CreditType {
        match self {
            CreditType::Unified => CreditType::Lead,
            t => t,
        }
    }

    /// The ledger's and the metrics' name: `lead`, `direct_dial`, `export`.
    pub fn as_str(self) -> &'static str {
        match self {
            CreditType::Lead => "lead",
            CreditType::DirectDial => "direct_dial",
            CreditType::Export => "export",
            CreditType::Unified => "unified",
        }
    }

    /// The key in Apollo's usage stats: `lead_credit`, `direct_dial_credit`, `export_credit`.
    pub fn apollo_key(self) -> &'static str {
        match self {
            CreditType::Lead => "lead_credit",
            CreditType::DirectDial => "direct_dial_credit",
            CreditType::Export => "export_credit",
            CreditType::Unified => "lead_credit",
        }
    }

    /// The `calls` column holding this type's credits.
    pub fn ledger_column(self) -> &'static str {
        match self {
            CreditType::Lead => "lead_milli",
            CreditType::DirectDial => "direct_dial_milli",
            CreditType::Export => "export_milli",
            CreditType::Unified => "credits_milli",
        }
    }

    /// `lead`, `direct_dial`, `export` (or Apollo's `…_credit` spelling), `unified`.
    pub fn parse(s: &str) -> Option<CreditType> {
        if s == "unified" {
            return Some(CreditType::Unified);
        }
        let s = s.strip_suffix("_credit").unwrap_or(s);
        CreditType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// Credits in thousandths as a short decimal: `5`, `1.5`, `0.001`.
pub fn credits(milli: i64) -> String {
    let s = format!("{:.3}", milli as f64 / 1000.0);
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}
