//! The real binary on synthetic ledgers: sim-ledger hides a burst the spikes view then names,
//! bad report arguments exit 64 naming the flag, and the maintenance commands (stats, prune,
//! vacuum) keep the totals.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_creditmeter");

fn run(args: &[&str], db: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--db")
        .arg(db)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).unwrap()
}

#[test]
fn sim_ledger_hides_a_burst_that_spikes_and_the_timeline_name() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("synthetic.db");
    let text = ok(&run(
        &[
            "sim-ledger",
            "--rows",
            "30000",
            "--days",
            "30",
            "--end",
            "2026-11-24T00:00:00Z",
            "--burst",
            "2026-11-18T14:00:00Z,table=Hidden enrichment,credits=20000,minutes=60",
        ],
        &db,
    ));
    assert!(text.contains("wrote 30"), "{text}");
    assert!(
        text.contains("burst: 20000 credits by table \"Hidden enrichment\""),
        "{text}"
    );

    let spikes = json(&run(&["report", "--spikes", "--format", "json"], &db));
    let list = spikes["spikes"].as_array().unwrap();
    assert_eq!(
        list.len(),
        1,
        "only the burst stands out in a month of ordinary traffic: {spikes:#}"
    );
    assert_eq!(list[0]["start"], "2026-11-18T14:00:00Z");
    assert_eq!(list[0]["end"], "2026-11-18T15:00:00Z");
    assert_eq!(list[0]["top"][0]["key"], "Hidden enrichment");
    assert_eq!(list[0]["top"][0]["credits_milli"], 20_000_000);

    let timeline = ok(&run(
        &[
            "report",
            "--timeline",
            "1h",
            "--since",
            "2026-11-18",
            "--until",
            "2026-11-19",
            "--by",
            "table",
        ],
        &db,
    ));
    let marked: Vec<&str> = timeline
        .lines()
        .filter(|l| l.starts_with("2026-") && l.contains("!"))
        .collect();
    assert_eq!(marked.len(), 1, "{timeline}");
    assert!(
        marked[0].starts_with("2026-11-18T14:00:00Z") && marked[0].contains("Hidden enrichment +"),
        "{timeline}"
    );
    // One of the columns is the burst table's.
    assert!(timeline
        .lines()
        .any(|l| l.starts_with("bucket (UTC)") && l.contains("Hidden enrichment")));

    // The day view names the day; identifier analytics list the kinds the generator used.
    let days = json(&run(
        &[
            "report",
            "--timeline",
            "1d",
            "--since",
            "2026-11-01",
            "--format",
            "json",
        ],
        &db,
    ));
    let top_day = days["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|b| b["credits_milli"].as_i64().unwrap())
        .unwrap();
    assert_eq!(top_day["start"], "2026-11-18T00:00:00Z");
    let ids = json(&run(&["report", "--identifiers", "--format", "json"], &db));
    let kinds: Vec<&str> = ids["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    for k in ["email", "linkedin_url", "name+domain", "id"] {
        assert!(kinds.contains(&k), "{kinds:?}");
    }
    let rate = |k: &str| {
        ids["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["key"] == k)
            .unwrap()["match_rate"]
            .as_f64()
            .unwrap()
    };
    assert!(
        rate("linkedin_url") > rate("email"),
        "the generator's profiles show through"
    );

    // A second run into the same file is refused.
    let again = run(&["sim-ledger", "--rows", "10"], &db);
    assert_eq!(again.status.code(), Some(64));
}

#[test]
fn bad_report_arguments_exit_64_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("l.db");
    ok(&run(&["sim-ledger", "--rows", "100", "--days", "2"], &db));
    for (args, flag) in [
        (vec!["report", "--by", "colour"], "--by"),
        (vec!["report", "--since", "soon"], "--since"),
        (vec!["report", "--timeline", "7 fortnights"], "--timeline"),
        (vec!["report", "--since", "1d", "--until", "2d"], "--since"),
        (
            vec!["report", "--spikes", "--spike-factor", "1"],
            "--spike-factor",
        ),
    ] {
        let out = run(&args, &db);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{args:?}: {err}");
    }
    let out = run(&["report"], &dir.path().join("missing.db"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn prune_stats_and_vacuum_keep_the_totals() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("l.db");
    ok(&run(
        &["sim-ledger", "--rows", "20000", "--days", "60"],
        &db,
    ));
    let before = json(&run(&["ledger", "stats", "--format", "json"], &db));
    assert_eq!(before["calls"], before["rollup_calls"]);
    assert_eq!(before["auto_vacuum"], "incremental");
    assert!(before["detail_deleted_before"].is_null());
    let total_before = json(&run(&["report", "--format", "json"], &db))["total"].clone();

    let out = ok(&run(&["ledger", "prune", "--older-than", "30d"], &db));
    assert!(out.starts_with("deleted "), "{out}");
    let after = json(&run(&["ledger", "stats", "--format", "json"], &db));
    let (calls_before, calls_after) = (
        before["calls"].as_i64().unwrap(),
        after["calls"].as_i64().unwrap(),
    );
    assert!(
        calls_after < calls_before * 6 / 10,
        "{calls_before} -> {calls_after}"
    );
    assert_eq!(after["rollup_calls"], before["rollup_calls"]);
    assert_eq!(
        after["rollup_credits_milli"],
        before["rollup_credits_milli"]
    );
    assert!(after["detail_deleted_before"].is_i64());
    assert!(after["freelist_pages"].as_i64().unwrap() > 0);

    // Reports by table still cover all of it; by key they say what is gone.
    let total_after = json(&run(&["report", "--format", "json"], &db))["total"].clone();
    assert_eq!(total_after["credits_milli"], total_before["credits_milli"]);
    assert_eq!(total_after["calls"], total_before["calls"]);
    let by_key = json(&run(&["report", "--by", "key", "--format", "json"], &db));
    assert!(
        by_key["notes"][0]
            .as_str()
            .unwrap()
            .contains("ledger.retention"),
        "{by_key:#}"
    );
    assert_eq!(by_key["total"]["calls"].as_i64().unwrap(), calls_after);

    let out = ok(&run(&["ledger", "vacuum"], &db));
    assert!(out.contains("vacuum (incremental)"), "{out}");
    let vacuumed = json(&run(&["ledger", "stats", "--format", "json"], &db));
    assert_eq!(vacuumed["freelist_pages"], 0);
    assert!(vacuumed["file_bytes"].as_u64().unwrap() < after["file_bytes"].as_u64().unwrap());
    let text = ok(&run(&["ledger", "stats"], &db));
    assert!(text.contains("detail rows before"), "{text}");
}
