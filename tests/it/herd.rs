#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]
//! No thundering herd (issue 19, point 5): 2,000 calls wait for room in one budget while
//! 2,000 calls of another table are admitted and settled. Only the calls whose budget changed
//! may wake: the waiting calls do not retry (under the guard's one lock) for every settlement
//! elsewhere, and all of them get in once their own budget frees up.
//!
//! Prints the other table's admission latency with and without the waiting crowd.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use creditmeter::catalog::Credits;
use creditmeter::config::Config;
use creditmeter::guard::{CallFacts, Guard};

const WAITING: usize = 2_000;
const OTHERS: usize = 2_000;

fn facts(table: &str) -> CallFacts {
    CallFacts {
        table: Some(table.to_owned()),
        ..Default::default()
    }
}

fn one_lead() -> Option<Credits> {
    Some(Credits {
        lead_milli: 1000,
        ..Default::default()
    })
}

/// Admits and settles `n` calls for table B one after another; their latencies, sorted.
async fn table_b_calls(guard: &Arc<Guard>, n: usize) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let a = guard
            .admit_waiting(
                &format!("b{i}"),
                facts("B"),
                creditmeter::meter::now_ms(),
                one_lead(),
            )
            .await
            .expect("table B has room");
        lat.push(t.elapsed());
        a.settle(creditmeter::guard::Amount::of(1000, 0, 0));
        tokio::task::yield_now().await;
    }
    lat.sort_unstable();
    lat
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_wakes_only_the_calls_its_budget_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::from_toml(
        r#"
[guard]
admission_wait = "120s"

[[budget]]
name = "a"
scope = { table = "A" }
limit = 10
window = "day"

[[budget]]
name = "b"
scope = { table = "B" }
limit = 1000000
window = "day"
"#,
    )
    .unwrap();
    config.validate().unwrap();
    let path = dir.path().join("ledger.db");
    let store: creditmeter::ledger::SharedStore = Arc::new(
        creditmeter::ledger::SqliteStore::open(&path, creditmeter::config::Synchronous::Normal)
            .unwrap(),
    );
    let metrics =
        creditmeter::metrics::Metrics::new(10, "test", creditmeter::config::OnLedgerError::Spool)
            .unwrap();
    let now = creditmeter::meter::now_ms();
    let guard = Arc::new(
        Guard::start(&config.guard, &config.budget, store, metrics.budgets(), now).unwrap(),
    );

    let quiet = table_b_calls(&guard, OTHERS).await;

    // Table A is fully reserved by ten calls in flight; 2,000 more wait for room.
    let in_flight: Vec<_> = (0..10)
        .map(|i| {
            guard
                .admit(&format!("a{i}"), facts("A"), now, one_lead())
                .unwrap()
        })
        .collect();
    let waiting: Vec<_> = (0..WAITING)
        .map(|i| {
            let guard = guard.clone();
            tokio::spawn(async move {
                let a = guard
                    .admit_waiting(&format!("w{i}"), facts("A"), now, one_lead())
                    .await;
                // Admitted: it settles at once, for nothing, making room for the next.
                a.map(|a| a.settle(creditmeter::guard::Amount::default()))
                    .is_ok()
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while guard.admission_attempts() < (OTHERS + 10 + WAITING) as u64 {
        assert!(Instant::now() < deadline, "the waiting calls never tried");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = guard.admission_attempts();

    let crowded = table_b_calls(&guard, OTHERS).await;
    let retries = guard.admission_attempts() - before - OTHERS as u64;
    common::report(&format!(
        "herd: {OTHERS} table-B calls with {WAITING} calls waiting on budget a: admission p50 {:?}, p99 {:?}, max {:?} \
         (without them: p50 {:?}, p99 {:?}, max {:?}); waiting calls retried {retries} times",
        pct(&crowded, 0.5),
        pct(&crowded, 0.99),
        crowded[crowded.len() - 1],
        pct(&quiet, 0.5),
        pct(&quiet, 0.99),
        quiet[quiet.len() - 1],
    ));
    assert_eq!(
        retries, 0,
        "settlements in budget b woke calls waiting on budget a"
    );

    // Budget a frees up: every waiting call gets in, none is refused.
    for a in in_flight {
        a.settle(creditmeter::guard::Amount::default());
    }
    let mut admitted = 0;
    for w in waiting {
        if w.await.unwrap() {
            admitted += 1;
        }
    }
    assert_eq!(
        admitted, WAITING,
        "every waiting call was admitted once a freed up"
    );
}
