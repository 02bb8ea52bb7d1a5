//! Unit tests: admission and settlement, windows with an injected clock (every call takes its
//! instant explicitly), rebuild from a real ledger file, holds, reload, and config rejections.

use std::sync::Arc;

use jiff::Timestamp;

use http::StatusCode;
use serde_json::Value;

use super::*;
use crate::catalog::{Catalog, Credits};
use crate::config::Config;
use crate::ledger::Outcome;
use crate::metrics::Metrics;

fn ms(s: &str) -> i64 {
    s.parse::<Timestamp>().unwrap().as_millisecond()
}

struct Fixture {
    guard: Arc<Guard>,
    metrics: Arc<Metrics>,
    config: Config,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(toml: &str, now: i64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        Fixture::in_dir(toml, now, dir)
    }

    /// A guard over the ledger in `dir` (created if new), as at a (re)start at `now`.
    fn in_dir(toml: &str, now: i64, dir: tempfile::TempDir) -> Fixture {
        let config = Config::from_toml(toml).unwrap();
        config.validate().unwrap();
        let path = dir.path().join("ledger.db");
        let store: crate::ledger::SharedStore = Arc::new(
            crate::ledger::SqliteStore::open(&path, crate::config::Synchronous::Normal).unwrap(),
        );
        let metrics =
            Arc::new(Metrics::new(10, "test", crate::config::OnLedgerError::Spool).unwrap());
        let guard = Arc::new(
            Guard::start(&config.guard, &config.budget, store, metrics.budgets(), now).unwrap(),
        );
        Fixture {
            guard,
            metrics,
            config,
            dir,
        }
    }

    fn restart(self, toml: &str, now: i64) -> Fixture {
        let Fixture { guard, dir, .. } = self;
        drop(guard);
        Fixture::in_dir(toml, now, dir)
    }

    fn admit(&self, table: &str, at: i64, worst: Option<Credits>) -> Result<Admission, Refusal> {
        self.guard.admit("r", facts(table), at, worst)
    }

    fn budget(&self, now: i64, name: &str) -> Value {
        let snap = self.guard.snapshot(now);
        snap["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no budget {name} in {snap}"))
    }

    /// (spent, reserved) of the first limit of `name`, in credits.
    fn usage(&self, now: i64, name: &str) -> (f64, f64) {
        let b = self.budget(now, name);
        (
            b["limits"][0]["spent"].as_f64().unwrap(),
            b["limits"][0]["reserved"].as_f64().unwrap(),
        )
    }

    /// Inserts a call row as the ledger writer would.
    fn ledger_row(&self, id: &str, table: &str, started_at: i64, lead: i64, dd: i64) {
        let conn = rusqlite::Connection::open(self.dir.path().join("ledger.db")).unwrap();
        conn.execute(
            "INSERT INTO calls (request_id, started_at, finished_at, method, path, endpoint, outcome,
                 table_name, credits_milli, lead_milli, direct_dial_milli, export_milli,
                 credit_source, catalog_version, tags)
             VALUES (?1, ?2, ?2, 'POST', '/api/v1/people/match', 'people_match', 'ok',
                 ?3, ?4 + ?5, ?4, ?5, 0, 'catalog', 'test', '{\"team\":\"growth\"}')",
            rusqlite::params![id, started_at, table, lead, dd],
        )
        .unwrap();
    }
}

fn facts(table: &str) -> CallFacts {
    CallFacts {
        table: Some(table.to_owned()),
        workflow: Some("enrich".into()),
        key_fp: Some("00112233aabbccdd".into()),
        tags: [("team".to_owned(), "growth".to_owned())].into(),
    }
}

fn lead(credits: i64) -> Option<Credits> {
    Some(Credits {
        lead_milli: credits * 1000,
        ..Credits::default()
    })
}

fn lead_and_dd(l: i64, dd: i64) -> Option<Credits> {
    Some(Credits {
        lead_milli: l * 1000,
        direct_dial_milli: dd * 1000,
        ..Credits::default()
    })
}

fn settle_credits(a: Admission, credits: i64) {
    a.settle(Amount::of(credits * 1000, 0, 0));
}

fn budget_refusal(r: Refusal) -> BudgetRefusal {
    match r {
        Refusal::Budget(b) => *b,
        Refusal::Hold { .. } => panic!("expected a budget refusal"),
    }
}

const T0: &str = "2026-06-15T12:00:00Z";

const GLOBAL_10: &str = r#"
[[budget]]
name = "g"
scope = "global"
limit = 10
window = "day"
"#;

#[test]
fn reserves_the_worst_case_and_settles_to_the_actual() {
    let now = ms(T0);
    let f = Fixture::new(GLOBAL_10, now);
    let a = f.admit("t", now, lead(9)).unwrap();
    assert_eq!(f.usage(now, "g"), (0.0, 9.0));
    // 9 reserved, 10 limit: a second 9 does not fit while the first is in flight.
    let r = budget_refusal(f.admit("t", now, lead(9)).unwrap_err());
    assert_eq!(
        (r.spent, r.reserved, r.limit, r.requested),
        (0, 9000, 10_000, 9000)
    );
    settle_credits(a, 2);
    assert_eq!(f.usage(now, "g"), (2.0, 0.0));
    // Now it fits: 2 + 8 = 10, exactly the limit.
    let b = f.admit("t", now, lead(8)).unwrap();
    settle_credits(b, 8);
    assert_eq!(f.usage(now, "g"), (10.0, 0.0));
    assert!(f.admit("t", now, lead(1)).is_err());
    // A free call passes a spent budget.
    assert!(f.admit("t", now, Some(Credits::default())).is_ok());
}

#[test]
fn an_abandoned_or_failed_call_releases_its_reservation() {
    let now = ms(T0);
    let f = Fixture::new(GLOBAL_10, now);
    let a = f.admit("t", now, lead(9)).unwrap();
    drop(a);
    assert_eq!(f.usage(now, "g"), (0.0, 0.0));
    let a = f.admit("t", now, lead(9)).unwrap();
    settle_credits(a, 0); // upstream failed: nothing billed
    assert_eq!(f.usage(now, "g"), (0.0, 0.0));
    assert_eq!(f.guard.snapshot(now)["calls_in_flight"], 0);
}

#[test]
fn the_bound_holds_under_concurrency() {
    // 8 threads race 400 calls each, worst case 1..9 credits, actual anywhere up to it, against
    // a 100-credit budget. A checker thread samples the counters throughout.
    let now = ms(T0);
    let toml = GLOBAL_10.replace("limit = 10", "limit = 100");
    let f = Fixture::new(&toml, now);
    let guard = f.guard.clone();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let checker = {
        let (guard, done) = (guard.clone(), done.clone());
        std::thread::spawn(move || {
            let mut samples = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let b = &guard.snapshot(now)["budgets"][0]["limits"][0];
                let (spent, reserved) = (
                    b["spent"].as_f64().unwrap(),
                    b["reserved"].as_f64().unwrap(),
                );
                assert!(
                    spent + reserved <= 100.0,
                    "spent {spent} + reserved {reserved} > 100"
                );
                samples += 1;
            }
            samples
        })
    };
    let workers: Vec<_> = (0..8u64)
        .map(|w| {
            let guard = guard.clone();
            std::thread::spawn(move || {
                let (mut admitted, mut spent) = (0u64, 0i64);
                for i in 0..400u64 {
                    let worst = (w * 7 + i * 13) % 9 + 1;
                    let actual = (w + i) % (worst + 1);
                    if let Ok(a) =
                        guard.admit("r", facts(&format!("t{w}")), now, lead(worst as i64))
                    {
                        admitted += 1;
                        spent += actual as i64;
                        std::thread::yield_now();
                        settle_credits(a, actual as i64);
                    }
                }
                (admitted, spent)
            })
        })
        .collect();
    let (mut admitted, mut spent) = (0, 0);
    for w in workers {
        let (a, s) = w.join().unwrap();
        admitted += a;
        spent += s;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(checker.join().unwrap() > 0);
    assert!(admitted > 0 && admitted < 3200);
    assert!(spent <= 100, "the callers were billed {spent} > 100");
    assert_eq!(f.usage(now, "g"), (spent as f64, 0.0));
}

#[test]
fn block_refuses_and_alert_only_reports() {
    let now = ms(T0);
    let f = Fixture::new(
        r#"
[[budget]]
name = "soft"
scope = { table = "a*" }
limit = 3
window = "day"
action = "alert"

[[budget]]
name = "hard"
scope = { table = "b*" }
limit = 3
window = "day"
"#,
        now,
    );
    for _ in 0..5 {
        settle_credits(f.admit("alpha", now, lead(1)).unwrap(), 1);
    }
    assert_eq!(
        f.usage(now, "soft"),
        (5.0, 0.0),
        "an alert budget lets spend past the limit"
    );
    let mut refused = 0;
    for _ in 0..5 {
        match f.admit("beta", now, lead(1)) {
            Ok(a) => settle_credits(a, 1),
            Err(_) => refused += 1,
        }
    }
    assert_eq!(refused, 2);
    assert_eq!(f.usage(now, "hard"), (3.0, 0.0));
    let text = String::from_utf8(f.metrics.encode()).unwrap();
    assert!(
        text.contains("creditmeter_budget_over_limit_calls_total{budget=\"soft\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("creditmeter_budget_rejections_total{budget=\"hard\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("creditmeter_budget_rejections_total{budget=\"soft\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("creditmeter_budget_spent_credits{budget=\"soft\",credit_type=\"all\"} 5"),
        "{text}"
    );
    assert!(
        text.contains("creditmeter_budget_limit_credits{budget=\"hard\",credit_type=\"all\"} 3"),
        "{text}"
    );
}

#[test]
fn nested_scopes_reserve_in_every_budget_at_once() {
    let now = ms(T0);
    let f = Fixture::new(
        r#"
[[budget]]
name = "all"
scope = "global"
limit = 8
window = "day"

[[budget]]
name = "table-a"
scope = { table = "A" }
limit = 5
window = "day"
"#,
        now,
    );
    for _ in 0..5 {
        settle_credits(f.admit("A", now, lead(1)).unwrap(), 1);
    }
    let r = budget_refusal(f.admit("A", now, lead(1)).unwrap_err());
    assert_eq!(r.budget, "table-a");
    for _ in 0..3 {
        settle_credits(f.admit("B", now, lead(1)).unwrap(), 1);
    }
    let r = budget_refusal(f.admit("B", now, lead(1)).unwrap_err());
    assert_eq!(r.budget, "all");
    // A call crossing both names both; nothing was reserved in either.
    let r = budget_refusal(f.admit("A", now, lead(1)).unwrap_err());
    assert_eq!(r.also.len(), 1);
    assert_eq!(f.usage(now, "all"), (8.0, 0.0));
    assert_eq!(f.usage(now, "table-a"), (5.0, 0.0));
    // Refused by the inner budget alone: the outer one is not touched either.
    let f = Fixture::new(
        r#"
[[budget]]
name = "all"
scope = "global"
limit = 100
window = "day"

[[budget]]
name = "table-a"
scope = { table = "A" }
limit = 1
window = "day"
"#,
        now,
    );
    assert!(f.admit("A", now, lead(2)).is_err());
    assert_eq!(f.usage(now, "all"), (0.0, 0.0));
}

#[test]
fn per_type_limits_only_count_their_type() {
    let now = ms(T0);
    let f = Fixture::new(
        r#"
[[budget]]
name = "mobile"
scope = "global"
limit = { direct_dial = 16 }
window = "month"
"#,
        now,
    );
    // people_match with phone reveal: 1 lead + 8 direct dial.
    for _ in 0..2 {
        let a = f.admit("t", now, lead_and_dd(1, 8)).unwrap();
        a.settle(Amount::of(1000, 8000, 0));
    }
    let r = budget_refusal(f.admit("t", now, lead_and_dd(1, 8)).unwrap_err());
    assert_eq!(r.credit_type, "direct_dial");
    // Plain matches spend no direct dials and pass.
    assert!(f.admit("t", now, lead(1)).is_ok());
}

#[test]
fn unknown_worst_case_reserves_the_ceiling() {
    let now = ms(T0);
    let f = Fixture::new(
        &format!("[guard]\nunknown_cost_ceiling = 4\n{GLOBAL_10}"),
        now,
    );
    let a = f.admit("t", now, None).unwrap();
    assert_eq!(f.usage(now, "g"), (0.0, 4.0));
    settle_credits(a, 0);
    settle_credits(f.admit("t", now, lead(7)).unwrap(), 7);
    assert!(f.admit("t", now, None).is_err(), "3 left < ceiling 4");
    assert!(f.admit("t", now, lead(3)).is_ok());
}

#[test]
fn a_day_rolls_over_at_local_midnight() {
    // New York in June is UTC-4: local midnight is 04:00 UTC.
    let toml = "[guard]\ntime_zone = \"America/New_York\"\n".to_owned() + GLOBAL_10;
    let late = ms("2026-06-16T03:59:59Z");
    let f = Fixture::new(&toml, late);
    settle_credits(f.admit("t", late, lead(10)).unwrap(), 10);
    let r = budget_refusal(f.admit("t", late + 999, lead(1)).unwrap_err());
    assert_eq!(r.resets_at, Some(ms("2026-06-16T04:00:00Z")));
    let body = Refusal::Budget(Box::new(r.clone())).body("req-1");
    assert_eq!(body["resets_at"], "2026-06-16T00:00:00-04:00");
    assert_eq!(body["window_start"], "2026-06-15T00:00:00-04:00");
    assert_eq!(body["budget"], "g");
    assert_eq!(body["window"], "day");
    assert_eq!(body["spent"], 10.0);
    assert_eq!(body["limit"], 10.0);
    assert_eq!(body["requested"], 1.0);
    assert_eq!(body["request_id"], "req-1");
    assert_eq!(Refusal::Budget(Box::new(r)).retry_after_secs(), Some(1));
    // UTC midnight came and went hours ago; the local day is what counts.
    assert!(f.admit("t", ms("2026-06-16T00:30:00Z"), lead(1)).is_err());
    let a = f.admit("t", ms("2026-06-16T04:00:00Z"), lead(1)).unwrap();
    settle_credits(a, 1);
    assert_eq!(f.usage(ms("2026-06-16T04:00:01Z"), "g"), (1.0, 0.0));
}

#[test]
fn a_daylight_saving_day_is_23_hours_long() {
    // Berlin springs forward on 2026-03-29: that day ends at 22:00 UTC.
    let toml = GLOBAL_10.replace(
        "window = \"day\"",
        "window = \"day\"\ntime_zone = \"Europe/Berlin\"",
    );
    let morning = ms("2026-03-29T06:00:00Z");
    let f = Fixture::new(&toml, morning);
    settle_credits(f.admit("t", morning, lead(10)).unwrap(), 10);
    let r = budget_refusal(
        f.admit("t", ms("2026-03-29T21:59:59.999Z"), lead(1))
            .unwrap_err(),
    );
    assert_eq!(r.resets_at, Some(ms("2026-03-29T22:00:00Z")));
    assert!(f.admit("t", ms("2026-03-29T22:00:00Z"), lead(1)).is_ok());
}

#[test]
fn a_call_in_flight_across_midnight_settles_into_its_own_day() {
    let toml = GLOBAL_10.to_owned();
    let before = ms("2026-06-15T23:59:59Z");
    let f = Fixture::new(&toml, before);
    let a = f.admit("t", before, lead(9)).unwrap();
    // The new day starts empty; the old reservation does not follow it.
    let b = f.admit("t", ms("2026-06-16T00:00:01Z"), lead(10)).unwrap();
    settle_credits(a, 9);
    assert_eq!(f.usage(ms("2026-06-16T00:00:02Z"), "g"), (0.0, 10.0));
    settle_credits(b, 10);
    assert_eq!(f.usage(ms("2026-06-16T00:00:02Z"), "g"), (10.0, 0.0));
}

#[test]
fn rolling_windows_forget_spend_as_it_ages_out() {
    let toml = GLOBAL_10.replace("window = \"day\"", "window = \"rolling 1h\"");
    let t0 = ms(T0);
    let f = Fixture::new(&toml, t0);
    settle_credits(f.admit("t", t0, lead(6)).unwrap(), 6);
    let t1 = t0 + 30 * 60_000;
    settle_credits(f.admit("t", t1, lead(4)).unwrap(), 4);
    let r = budget_refusal(f.admit("t", t1 + 1000, lead(5)).unwrap_err());
    // The 6 credits leave the window one hour (plus at most one bucket) after t0.
    let frees = r.resets_at.unwrap();
    let bucket = window::bucket_ms(3_600_000);
    assert!(
        frees > t0 + 3_600_000 && frees <= t0 + 3_600_000 + bucket,
        "{frees}"
    );
    assert!(f.admit("t", frees - 1, lead(5)).is_err());
    let a = f.admit("t", frees, lead(5)).unwrap();
    settle_credits(a, 5);
    assert_eq!(f.usage(frees, "g"), (9.0, 0.0));
}

#[test]
fn a_call_bigger_than_the_limit_is_told_it_never_fits() {
    let now = ms(T0);
    let f = Fixture::new(GLOBAL_10, now);
    let r = f.admit("t", now, lead(90)).unwrap_err();
    assert_eq!(r.retry_after_secs(), None);
    assert!(r.message().contains("never fit"), "{}", r.message());
}

#[test]
fn spend_in_the_current_window_is_rebuilt_from_the_ledger() {
    let toml = r#"
[[budget]]
name = "a-daily"
scope = { table = "A", tag = { team = "gr*" } }
limit = 10
window = "day"

[[budget]]
name = "rolling"
scope = "global"
limit = { total = 100, direct_dial = 50 }
window = "rolling 2h"
"#;
    let now = ms(T0);
    let f = Fixture::new(toml, now);
    f.ledger_row("y", "A", ms("2026-06-14T23:59:59Z"), 5000, 0); // yesterday
    f.ledger_row("1", "A", ms("2026-06-15T00:00:00Z"), 3000, 0);
    f.ledger_row("2", "A", ms("2026-06-15T11:00:00Z"), 1000, 8000);
    f.ledger_row("3", "B", ms("2026-06-15T11:30:00Z"), 2000, 0); // other table
    let f = f.restart(toml, now);
    assert_eq!(f.usage(now, "a-daily"), (12.0, 0.0));
    let rolling = f.budget(now, "rolling");
    assert_eq!(rolling["limits"][0]["spent"], 11.0); // rows 2 and 3
    assert_eq!(rolling["limits"][1]["credit_type"], "direct_dial");
    assert_eq!(rolling["limits"][1]["spent"], 8.0);
    // Past its limit already (12 > 10, e.g. the limit was lowered): refused from the start.
    assert!(f.admit("A", now, lead(1)).is_err());
    // The warning state is rebuilt too.
    assert_eq!(f.budget(now, "a-daily")["limits"][0]["warning"], true);
}

#[test]
fn holds_refuse_matching_calls_and_survive_a_restart() {
    let now = ms(T0);
    let f = Fixture::new("", now);
    let scope = config::scope_from_json(&serde_json::json!({"table": "Runaway*"})).unwrap();
    let (hold, created) = f
        .guard
        .add_hold(scope.clone(), Some("looping column".into()), now)
        .unwrap();
    assert!(created);
    let (again, created) = f.guard.add_hold(scope, None, now).unwrap();
    assert!(!created);
    assert_eq!(again.id, hold.id);
    match f.admit("Runaway table", now, lead(1)).unwrap_err() {
        Refusal::Hold { hold: h, status } => {
            assert_eq!(h.id, hold.id);
            assert_eq!(status, 503);
        }
        other => panic!("{other:?}"),
    }
    assert!(f.admit("Other", now, lead(1)).is_ok());
    let f = f.restart("[guard]\nhold_status = 429\n", now);
    let r = f.admit("Runaway table", now, None).unwrap_err();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.outcome(), Outcome::RejectedHold);
    assert!(r.message().contains("looping column"), "{}", r.message());
    assert_eq!(r.body("x")["hold"]["scope"]["table"], "Runaway*");
    assert_eq!(
        f.guard.release_hold(hold.id, now).unwrap().unwrap().id,
        hold.id
    );
    assert!(f.guard.release_hold(hold.id, now).unwrap().is_none());
    let f = f.restart("", now);
    assert!(f.admit("Runaway table", now, lead(1)).is_ok());
    // A global hold stops everything, unattributed calls included.
    f.guard.add_hold(Scope::global(), None, now).unwrap();
    assert!(f.guard.admit("r", CallFacts::default(), now, None).is_err());
}

#[test]
fn reload_keeps_spend_and_reservations_of_unchanged_budgets() {
    let now = ms(T0);
    let f = Fixture::new(GLOBAL_10, now);
    settle_credits(f.admit("t", now, lead(4)).unwrap(), 4);
    let inflight = f.admit("t", now, lead(3)).unwrap();
    // Raise the limit and switch to alert: the counted spend stays.
    let toml = GLOBAL_10.replace("limit = 10", "limit = 20\naction = \"alert\"\nwarn_at = 50");
    let cfg = Config::from_toml(&toml).unwrap();
    let summary = f.guard.reload(&cfg.guard, &cfg.budget, now).unwrap();
    assert_eq!(summary.kept, vec!["g".to_owned()]);
    assert_eq!(f.usage(now, "g"), (4.0, 3.0));
    settle_credits(inflight, 3);
    assert_eq!(f.usage(now, "g"), (7.0, 0.0));
    assert_eq!(f.budget(now, "g")["action"], "alert");
    assert_eq!(f.budget(now, "g")["limits"][0]["limit"], 20.0);
    let _ = &f.config;
}

#[test]
fn reload_rebuilds_a_changed_budget_from_ledger_recent_calls_and_calls_in_flight() {
    let now = ms(T0);
    let f = Fixture::new(GLOBAL_10, now);
    f.ledger_row("old-1", "A", now - 60_000, 2000, 0);
    // A call settled but not yet in the ledger, and one in flight.
    let a = f.guard.admit("recent-1", facts("A"), now, lead(5)).unwrap();
    settle_credits(a, 5);
    // ...and one settled and committed: counted once, not twice.
    let a = f.guard.admit("recent-2", facts("A"), now, lead(3)).unwrap();
    settle_credits(a, 3);
    f.ledger_row("recent-2", "A", now, 3000, 0);
    let flying = f.guard.admit("fly-1", facts("A"), now, lead(1)).unwrap();
    let toml = r#"
[[budget]]
name = "g"
scope = { table = "A" }
limit = 10
window = "day"

[[budget]]
name = "new"
scope = "global"
limit = 50
window = "week"
"#;
    let cfg = Config::from_toml(toml).unwrap();
    let summary = f.guard.reload(&cfg.guard, &cfg.budget, now).unwrap();
    assert_eq!(summary.rebuilt, vec!["g".to_owned(), "new".to_owned()]);
    // 2 + 3 from the ledger + 5 settled but uncommitted; 1 reserved in flight.
    assert_eq!(f.usage(now, "g"), (10.0, 1.0));
    assert_eq!(f.usage(now, "new"), (10.0, 1.0));
    settle_credits(flying, 1);
    assert_eq!(f.usage(now, "g"), (11.0, 0.0));
    assert_eq!(f.usage(now, "new"), (11.0, 0.0));
    // Dropping a budget drops its gauges; calls in flight against it settle harmlessly.
    let held = f.admit("B", now, lead(1)).unwrap();
    let cfg = Config::from_toml(&toml.replace(
        "name = \"new\"\nscope = \"global\"\nlimit = 50\nwindow = \"week\"",
        "name = \"other\"\nscope = \"global\"\nlimit = 50\nwindow = \"week\"",
    ))
    .unwrap();
    let summary = f.guard.reload(&cfg.guard, &cfg.budget, now).unwrap();
    assert_eq!(summary.removed, vec!["new".to_owned()]);
    settle_credits(held, 1);
    let text = String::from_utf8(f.metrics.encode()).unwrap();
    assert!(!text.contains("budget=\"new\",credit_type"), "{text}");
}

#[test]
fn warn_at_logs_once_and_sets_the_gauge() {
    let now = ms(T0);
    let f = Fixture::new(
        &GLOBAL_10.replace("limit = 10", "limit = 10\nwarn_at = 50"),
        now,
    );
    settle_credits(f.admit("t", now, lead(4)).unwrap(), 4);
    let warning = |f: &Fixture| {
        let text = String::from_utf8(f.metrics.encode()).unwrap();
        text.contains("creditmeter_budget_warning{budget=\"g\",credit_type=\"all\"} 1")
    };
    assert!(!warning(&f));
    settle_credits(f.admit("t", now, lead(1)).unwrap(), 1);
    assert!(warning(&f));
    // The next day starts below the threshold again.
    f.guard.publish(ms("2026-06-16T00:00:00Z"));
    assert!(!warning(&f));
}

#[test]
fn worst_case_by_credit_type_comes_from_the_catalog() {
    let catalog = Catalog::builtin();
    let ep = catalog.classify("POST", "/api/v1/people/bulk_match");
    let body = br#"{"details":[{"email":"a@x"},{"email":"b@x"}],"reveal_phone_number":true}"#;
    let w = ep
        .worst_case(&crate::catalog::RequestParams::parse(None, body))
        .unwrap();
    assert_eq!(
        (w.lead_milli, w.direct_dial_milli, w.export_milli),
        (2000, 16_000, 0)
    );
    assert_eq!(
        w.total_milli(),
        ep.worst_case_milli(&crate::catalog::RequestParams::parse(None, body))
            .unwrap()
    );
    assert!(catalog
        .classify("GET", "/api/v1/whatever")
        .worst_case(&crate::catalog::RequestParams::default())
        .is_none());
}

// --- configuration ---------------------------------------------------------------------------

fn config_error(toml: &str) -> String {
    match Config::from_toml(toml) {
        Err(e) => e.to_string(),
        Ok(c) => c.validate().unwrap_err().to_string(),
    }
}

#[test]
fn budget_config_parses_every_form() {
    let c = Config::from_toml(
        r#"
[guard]
time_zone = "Europe/Berlin"
unknown_cost_ceiling = 2.5

[[budget]]
name = "a"
scope = { workflow = "enrich*", key = "0011*", tag = { Team = "growth" } }
limit = { total = 500, direct_dial = 80.5 }
window = "rolling 24h"
action = "alert"
warn_at = 90

[[budget]]
name = "b"
scope = "global"
limit = 1
window = "month"
time_zone = "Asia/Tokyo"
"#,
    )
    .unwrap();
    c.validate().unwrap();
    assert_eq!(c.guard.unknown_cost_ceiling.0, 2500);
    let a = &c.budget[0];
    assert_eq!(a.limit.total, Some(500_000));
    assert_eq!(a.limit.direct_dial, Some(80_500));
    assert_eq!(
        a.window,
        WindowSpec::Rolling(std::time::Duration::from_secs(86_400))
    );
    assert_eq!(a.window.to_string(), "rolling 24h");
    assert_eq!(a.action, Action::Alert);
    assert!(a.scope.tags.contains_key("team"));
    assert_eq!(c.budget[1].action, Action::Block);
    assert_eq!(c.budget[1].warn_at, config::DEFAULT_WARN_AT);
}

#[test]
fn budget_config_rejections_say_how_to_fix_them() {
    let base = |extra: &str| {
        format!(
            "[[budget]]\nname = \"b\"\nscope = \"global\"\nlimit = 10\nwindow = \"day\"\n{extra}"
        )
    };
    for (toml, want) in [
        (base("time_zone = \"Mars/Olympus\""), "unknown time zone"),
        (base("warn_at = 0"), "warn_at"),
        (base("warn_at = 150"), "warn_at"),
        (base("action = \"panic\""), "panic"),
        (base("colour = 1"), "colour"),
        (format!("{}{}", base(""), base("")), "unique"),
        (
            base("").replace("window = \"day\"", "window = \"fortnight\""),
            "rolling <duration>",
        ),
        (
            base("").replace("window = \"day\"", "window = \"rolling 0s\""),
            "between 1s",
        ),
        (
            base("time_zone = \"UTC\"").replace("window = \"day\"", "window = \"rolling 1h\""),
            "rolling window has no calendar",
        ),
        (
            base("").replace("scope = \"global\"", "scope = \"everything\""),
            "global",
        ),
        (
            base("").replace("scope = \"global\"", "scope = {}"),
            "empty scope",
        ),
        (
            base("").replace("scope = \"global\"", "scope = { tabel = \"x\" }"),
            "tabel",
        ),
        (
            base("").replace(
                "scope = \"global\"",
                "scope = { key = \"cmk_0123456789abcdef\" }",
            ),
            "creditmeter key",
        ),
        (base("").replace("limit = 10", "limit = -1"), "negative"),
        (
            base("").replace("limit = 10", "limit = { leads = 1 }"),
            "leads",
        ),
        (base("").replace("limit = 10", "limit = {}"), "empty limit"),
        (
            base("").replace("name = \"b\"", "name = \"\""),
            "needs a name",
        ),
        (base("").replace("limit = 10\n", ""), "limit"),
        ("[guard]\nhold_status = 404\n".to_owned(), "hold_status"),
        (
            "[guard]\ntime_zone = \"Nowhere\"\n".to_owned(),
            "guard.time_zone",
        ),
        (
            "[guard]\nunknown_cost_ceiling = -1\n".to_owned(),
            "unknown_cost_ceiling",
        ),
    ] {
        let err = config_error(&toml);
        assert!(err.contains(want), "{toml}\n=> {err}");
    }
    // Errors about one budget name it.
    let err = config_error(&base("warn_at = 0"));
    assert!(err.contains("[[budget]] #1 \"b\""), "{err}");
}

#[tokio::test]
async fn a_call_blocked_only_by_calls_in_flight_waits_for_them_to_settle() {
    let now = ms(T0);
    let f = Fixture::new(GLOBAL_10, now);
    let first = f.admit("t", now, lead(9)).unwrap();
    let waiting = {
        let guard = f.guard.clone();
        tokio::spawn(async move { guard.admit_waiting("w", facts("t"), now, lead(9)).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        !waiting.is_finished(),
        "9 spent-or-reserved + 9 > 10: it waits"
    );
    settle_credits(first, 1); // the first call cost less than its worst case
    let second = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    settle_credits(second, 9);
    assert_eq!(f.usage(now, "g"), (10.0, 0.0));
    // Refused as soon as the settlement shows it cannot fit, not at the deadline.
    let f = Fixture::new(GLOBAL_10, now);
    let first = f.admit("t", now, lead(9)).unwrap();
    let waiting = {
        let guard = f.guard.clone();
        tokio::spawn(async move { guard.admit_waiting("w", facts("t"), now, lead(9)).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    settle_credits(first, 9);
    let refused = waiting.await.unwrap().unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(budget_refusal(refused).spent, 9000);
    // A call that can never fit in this window does not wait at all.
    let started = std::time::Instant::now();
    assert!(f
        .guard
        .admit_waiting("w", facts("t"), now, lead(5))
        .await
        .is_err());
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
}

#[tokio::test]
async fn waiting_ends_at_admission_wait_with_a_counted_refusal() {
    let now = ms(T0);
    let f = Fixture::new(
        &format!("[guard]\nadmission_wait = \"200ms\"\n{GLOBAL_10}"),
        now,
    );
    let _stuck = f.admit("t", now, lead(9)).unwrap();
    let started = std::time::Instant::now();
    let r = f
        .guard
        .admit_waiting("w", facts("t"), now, lead(9))
        .await
        .unwrap_err();
    assert!(started.elapsed() >= std::time::Duration::from_millis(200));
    assert_eq!(budget_refusal(r).reserved, 9000);
    let text = String::from_utf8(f.metrics.encode()).unwrap();
    assert!(
        text.contains("creditmeter_budget_rejections_total{budget=\"g\"} 1"),
        "{text}"
    );
    // "0s" refuses at once.
    let f = Fixture::new(
        &format!("[guard]\nadmission_wait = \"0s\"\n{GLOBAL_10}"),
        now,
    );
    let _stuck = f.admit("t", now, lead(9)).unwrap();
    let started = std::time::Instant::now();
    assert!(f
        .guard
        .admit_waiting("w", facts("t"), now, lead(9))
        .await
        .is_err());
    assert!(started.elapsed() < std::time::Duration::from_millis(100));
}
