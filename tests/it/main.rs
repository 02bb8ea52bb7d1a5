//! creditmeter's integration tests, in one binary (`cargo test --test it [FILTER]`): real sockets
//! on 127.0.0.1, the simulator as Apollo, real SQLite files, the real `creditmeter` binary where a
//! test needs a process. Shared request builders and servers are in `tests/common`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../common/mod.rs"]
mod common;

mod architecture;
mod budgets;
mod cli;
mod config_props;
mod crash;
mod edges;
mod herd;
mod hostile;
mod ledger_cli;
mod ledger_faults;
mod proxy;
mod reconcile;
mod reload;
mod report;
mod secrets;
mod settle;
mod spool_replay;
mod upstream_faults;
