//! Unit tests for deferred charges in budgets: the worst case stays reserved until settled,
//! and is reserved again at a restart.

use std::sync::Arc;

use super::admission::Blocked;
use super::*;
use crate::catalog::Credits;
use crate::config::Config;
use crate::metrics::Metrics;

const T0: i64 = 1_781_524_800_000; // 2026-06-15T12:00:00Z

const BUDGET_20: &str = r#"
[[budget]]
name = "reveals"
scope = "global"
limit = 20
window = "day"
"#;

fn guard(dir: &std::path::Path) -> Arc<Guard> {
    let config = Config::from_toml(BUDGET_20).unwrap();
    config.validate().unwrap();
    let path = dir.join("ledger.db");
    let store: crate::ledger::SharedStore = Arc::new(
        crate::ledger::SqliteStore::open(&path, crate::config::Synchronous::Normal).unwrap(),
    );
    let metrics = Metrics::new(10, "test", crate::config::OnLedgerError::Spool).unwrap();
    Arc::new(Guard::start(&config.guard, &config.budget, store, metrics.budgets(), T0).unwrap())
}

fn facts() -> CallFacts {
    CallFacts {
        table: Some("phones".into()),
        ..CallFacts::default()
    }
}

/// 1 lead now, up to 8 direct_dial later: a phone reveal's worst case.
fn reveal() -> Option<Credits> {
    Some(Credits {
        lead_milli: 1000,
        direct_dial_milli: 8000,
        export_milli: 0,
    })
}

fn usage(g: &Guard) -> (f64, f64) {
    let snap = g.snapshot(T0);
    let l = &snap["budgets"][0]["limits"][0];
    (
        l["spent"].as_f64().unwrap(),
        l["reserved"].as_f64().unwrap(),
    )
}

#[test]
fn a_deferred_worst_case_stays_reserved_until_it_settles() {
    let dir = tempfile::tempdir().unwrap();
    let g = guard(dir.path());
    let a = g.admit("r1", facts(), T0, reveal()).unwrap();
    assert_eq!(usage(&g), (0.0, 9.0));
    // The answer bills 1 lead; 8 direct_dial may follow.
    let p1 = a.settle_deferred(Amount::of(1000, 0, 0), Amount::of(0, 8000, 0));
    assert_eq!(usage(&g), (1.0, 8.0));
    let a2 = g.admit("r2", facts(), T0, reveal()).unwrap();
    let p2 = a2.settle_deferred(Amount::of(1000, 0, 0), Amount::of(0, 8000, 0));
    assert_eq!(usage(&g), (2.0, 16.0));
    // A third reveal could cross 20 if both jobs find a mobile: refused while they are pending.
    assert!(g.admit("r3", facts(), T0, reveal()).is_err());
    // The first job found no mobile; the second did.
    p1.settle(Amount::default(), "s1");
    p2.settle(Amount::of(0, 8000, 0), "s2");
    assert_eq!(usage(&g), (10.0, 0.0));
    assert!(g.admit("r4", facts(), T0, reveal()).is_ok());
}

#[test]
fn pending_charges_are_reserved_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let g = guard(dir.path());
    let p = g.reserve_pending("r1", facts(), T0 - 60_000, Amount::of(0, 8000, 0), T0);
    assert_eq!(usage(&g), (0.0, 8.0));
    // 8 pending + 9 fits in 20; a second 9 does not.
    let a = g.admit("r2", facts(), T0, reveal()).unwrap();
    assert!(g.admit("r3", facts(), T0, reveal()).is_err());
    drop(a);
    p.settle(Amount::of(0, 8000, 0), "s1");
    assert_eq!(usage(&g), (8.0, 0.0));
    // A charge whose call started before the current window is not reserved in it.
    let old = g.reserve_pending(
        "r0",
        facts(),
        T0 - 2 * 86_400_000,
        Amount::of(0, 8000, 0),
        T0,
    );
    assert_eq!(usage(&g), (8.0, 0.0));
    drop(old);
}

#[test]
fn a_call_blocked_by_pending_charges_is_refused_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let g = guard(dir.path());
    let a = g.admit("r1", facts(), T0, reveal()).unwrap();
    let p1 = a.settle_deferred(Amount::of(1000, 0, 0), Amount::of(0, 8000, 0));
    let a2 = g.admit("r2", facts(), T0, reveal()).unwrap();
    // A call in flight (not yet answered) is worth waiting for: it may settle lower soon.
    assert!(matches!(
        g.try_admit("r3", &facts(), T0, reveal(), false),
        Err(Blocked::Wait(..))
    ));
    // Once it is a pending charge (Apollo's job may take minutes), waiting is pointless.
    let p2 = a2.settle_deferred(Amount::of(1000, 0, 0), Amount::of(0, 8000, 0));
    assert!(matches!(
        g.try_admit("r3", &facts(), T0, reveal(), false),
        Err(Blocked::Final(_))
    ));
    drop((p1, p2));
    assert_eq!(usage(&g), (2.0, 0.0));
}
