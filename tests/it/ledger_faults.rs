//! Ledger faults: the proxy keeps serving (rows spooled and replayed exactly once), or with
//! `fail_closed` refuses calls with a 503. Every test counts rows: none lost, none doubled.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::request::{request_id, Call};
use common::*;
use creditmeter::config::{ByteSize, OnLedgerError};
use creditmeter_sim::SimConfig;
use http_body_util::Full;

/// One people/match call through the proxy; returns (status, request id).
async fn call(proxy: &Proxy, table: &str, i: usize) -> (u16, String) {
    let (status, h, _) = Call::post(proxy.url("/api/v1/people/match"))
        .key("fault-key")
        .table(table)
        .body(format!(r#"{{"email":"f{i}@example.com"}}"#))
        .send()
        .await;
    (status.as_u16(), request_id(&h))
}

async fn readyz(proxy: &Proxy) -> (u16, serde_json::Value) {
    let (s, _, b) = get(&format!("http://{}/readyz", proxy.admin)).await;
    (s.as_u16(), serde_json::from_slice(&b).unwrap())
}

/// Waits until the spool is empty (the ledger recovered).
async fn wait_recovered(proxy: &Proxy) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, j) = readyz(proxy).await;
        if j["spooled_rows"] == 0 && j["ledger"] == "writable" {
            return;
        }
        assert!(Instant::now() < deadline, "ledger did not recover: {j}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every id present exactly once, and nothing else for that table.
fn assert_exactly(db: &Path, table: &str, ids: &BTreeSet<String>) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT request_id FROM calls WHERE table_name = ?1")
        .unwrap();
    let rows: Vec<String> = stmt
        .query_map([table], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let distinct: BTreeSet<String> = rows.iter().cloned().collect();
    assert_eq!(rows.len(), distinct.len(), "duplicated rows");
    let missing: Vec<_> = ids.difference(&distinct).collect();
    assert!(
        missing.is_empty(),
        "{} calls missing from the ledger: {missing:?}",
        missing.len()
    );
    assert_eq!(distinct.len(), ids.len(), "rows for calls nobody made");
    println!(
        "table {table}: {} calls, {} rows, 0 missing, 0 duplicated",
        ids.len(),
        rows.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_ledger_spools_and_replays_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(
        SimConfig {
            rate_limit_minute: 0,
            ..Default::default()
        },
        None,
    )
    .await;
    let mut cfg = config_for(&sim.url(false), None);
    cfg.ledger.spool_reserve = ByteSize(0);
    let proxy = Proxy::start(cfg, dir.path()).await;
    let mut ids = BTreeSet::new();
    for i in 0..10 {
        ids.insert(call(&proxy, "locked", i).await.1);
    }
    // Someone takes the write lock and sits on it (a long `BEGIN IMMEDIATE` in sqlite3).
    let db = proxy.db.clone();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (locked, is_locked) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked.send(()).unwrap();
        released.recv().unwrap();
        c.execute_batch("COMMIT").unwrap();
    });
    is_locked.recv().unwrap();
    let mut slowest = Duration::ZERO;
    for i in 10..60 {
        let t = Instant::now();
        let (status, id) = call(&proxy, "locked", i).await;
        slowest = slowest.max(t.elapsed());
        assert_eq!(status, 200, "calls keep flowing while the ledger is locked");
        ids.insert(id);
    }
    let (status, j) = readyz(&proxy).await;
    assert_eq!(status, 200, "spool mode stays ready: {j}");
    assert_eq!(j["ledger"], "failing");
    assert_eq!(j["on_error"], "spool");
    assert!(j["spooled_rows"].as_u64().unwrap() >= 49, "{j}");
    let m = proxy.metrics().await;
    assert!(metric_sum(&m, "creditmeter_ledger_spooled_rows", &[]) >= 49.0);
    assert!(metric_sum(&m, "creditmeter_ledger_errors_total", &[]) >= 1.0);
    assert_eq!(
        metric_sum(&m, "creditmeter_ledger_on_error", &[("mode", "spool")]),
        1.0
    );
    println!("slowest call while locked: {slowest:?}");
    assert!(
        slowest < Duration::from_secs(3),
        "a locked ledger adds at most about busy_timeout: {slowest:?}"
    );

    release.send(()).unwrap();
    holder.join().unwrap();
    wait_recovered(&proxy).await;
    for i in 60..70 {
        ids.insert(call(&proxy, "locked", i).await.1);
    }
    assert_exactly(&proxy.db, "locked", &ids);
    assert!(
        !sibling(&proxy.db, "spool").exists(),
        "the spool is removed once replayed"
    );
}

fn sibling(path: &Path, ext: &str) -> PathBuf {
    let mut n = path.file_name().unwrap().to_os_string();
    n.push(".");
    n.push(ext);
    path.with_file_name(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_refuses_calls_while_the_ledger_fails() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(
        SimConfig {
            rate_limit_minute: 0,
            ..Default::default()
        },
        None,
    )
    .await;
    let mut cfg = config_for(&sim.url(false), None);
    cfg.ledger.on_error = OnLedgerError::FailClosed;
    cfg.ledger.spool_reserve = ByteSize(0);
    let proxy = Proxy::start(cfg, dir.path()).await;
    let mut ids = BTreeSet::new();
    ids.insert(call(&proxy, "closed", 0).await.1);

    let db = proxy.db.clone();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (locked, is_locked) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked.send(()).unwrap();
        released.recv().unwrap();
        c.execute_batch("COMMIT").unwrap();
    });
    is_locked.recv().unwrap();
    // The first call during the fault finds out: it was already upstream, so its row is spooled.
    let (status, id) = call(&proxy, "closed", 1).await;
    assert_eq!(status, 200);
    ids.insert(id);
    let billed_before = sim.sim.billed().calls;
    let mut refused = BTreeSet::new();
    for i in 2..12 {
        let (status, id) = call(&proxy, "closed", i).await;
        assert_eq!(status, 503, "fail_closed refuses new calls");
        refused.insert(id);
    }
    assert_eq!(
        sim.sim.billed().calls,
        billed_before,
        "nothing reached upstream while closed"
    );
    let (status, j) = readyz(&proxy).await;
    assert_eq!(status, 503, "{j}");
    assert_eq!(j["on_error"], "fail_closed");

    release.send(()).unwrap();
    holder.join().unwrap();
    wait_recovered(&proxy).await;
    let (status, id) = call(&proxy, "closed", 12).await;
    assert_eq!(status, 200, "open again after recovery");
    ids.insert(id);
    // Served calls and refused calls are all recorded, exactly once.
    let all: BTreeSet<String> = ids.union(&refused).cloned().collect();
    assert_exactly(&proxy.db, "closed", &all);
    let conn = rusqlite::Connection::open(&proxy.db).unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM calls WHERE table_name = 'closed' AND outcome = 'rejected' AND status IS NULL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 10);
}

/// A tmpfs of `size` mounted at a fresh directory, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(parent: &Path, size: &str) -> Tmpfs {
        let dir = parent.join("tmpfs");
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mounting a tmpfs needs root (CI runs as root)"
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes zeros until the file system is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_spools_into_the_reserve_and_replays_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(dir.path(), "4m");
    let sim = SimServer::start(
        SimConfig {
            rate_limit_minute: 0,
            ..Default::default()
        },
        None,
    )
    .await;
    let mut cfg = config_for(&sim.url(false), None);
    cfg.ledger.path = fs.0.join("ledger.db");
    cfg.ledger.spool_reserve = ByteSize(512 * 1024);
    let mut proxy = Proxy::start(cfg, dir.path()).await;
    let mut ids = BTreeSet::new();
    for i in 0..5 {
        ids.insert(call(&proxy, "full", i).await.1);
    }
    assert!(sibling(&proxy.db, "spool-reserve").exists());
    let junk = fs.0.join("junk");
    fill(&junk);
    for i in 5..205 {
        let (status, id) = call(&proxy, "full", i).await;
        assert_eq!(status, 200, "calls keep flowing on a full disk");
        ids.insert(id);
    }
    let (_, j) = readyz(&proxy).await;
    assert_eq!(j["ledger"], "failing", "{j}");
    assert!(j["spooled_rows"].as_u64().unwrap() > 0, "{j}");
    assert!(
        !sibling(&proxy.db, "spool-reserve").exists(),
        "the reserve made room for the spool"
    );
    std::fs::remove_file(&junk).unwrap();
    wait_recovered(&proxy).await;
    proxy.shutdown().await;
    assert_exactly(&proxy.db, "full", &ids);
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_ledger_is_recreated_and_keeps_fingerprints() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(
        SimConfig {
            rate_limit_minute: 0,
            ..Default::default()
        },
        None,
    )
    .await;
    let proxy = Proxy::start(config_for(&sim.url(false), None), dir.path()).await;
    call(&proxy, "deleted", 0).await;
    let fp_before: String = rusqlite::Connection::open(&proxy.db)
        .unwrap()
        .query_row("SELECT key_fp FROM calls LIMIT 1", [], |r| r.get(0))
        .unwrap();
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", proxy.db.display()));
    }
    let mut ids = BTreeSet::new();
    for i in 1..30 {
        let (status, id) = call(&proxy, "deleted", i).await;
        assert_eq!(status, 200);
        ids.insert(id);
    }
    wait_recovered(&proxy).await;
    assert!(proxy.db.exists(), "the ledger was recreated");
    assert_exactly(&proxy.db, "deleted", &ids);
    let fp_after: String = rusqlite::Connection::open(&proxy.db)
        .unwrap()
        .query_row("SELECT key_fp FROM calls LIMIT 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(fp_before, fp_after, "the install secret survives the file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_left_in_the_spool_by_a_crash_are_replayed_at_start_once() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    // A first run creates the ledger and records one call.
    let mut first = Proxy::start(config_for(&up.url(), None), dir.path()).await;
    let (_, id) = call(&first, "spooled", 0).await;
    first.shutdown().await;
    // A crash left two rows in the spool, one of them already committed (replay interrupted),
    // and a torn last line.
    let row = |rid: &str| {
        serde_json::json!({
            "request_id": rid, "started_at": 1, "finished_at": 2, "method": "POST",
            "path": "/api/v1/people/match", "endpoint": "people_match", "status": 200,
            "outcome": "ok", "table_name": "spooled", "workflow": null, "tags": null,
            "key_fp": null, "lead_milli": 1000, "direct_dial_milli": 0, "export_milli": 0,
            "credit_source": "catalog", "records_requested": 1, "records_matched": 1,
            "catalog_version": "t", "upstream_ms": 3, "request_bytes": 2, "response_bytes": 10,
            "error": null, "id_kinds": "email"
        })
        .to_string()
    };
    std::fs::write(
        sibling(&first.db, "spool"),
        format!("{}\n{}\n{{\"torn\": ", row(&id), row("from-the-spool")),
    )
    .unwrap();
    let second = Proxy::start(config_for(&up.url(), None), dir.path()).await;
    wait_recovered(&second).await;
    let ids: BTreeSet<String> = [id, "from-the-spool".to_owned()].into_iter().collect();
    assert_exactly(&second.db, "spooled", &ids);
}

/// Takes the ledger's write lock on a thread of its own (a long `BEGIN IMMEDIATE` in sqlite3)
/// until the returned sender is used or dropped.
fn hold_write_lock(db: &Path) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let db = db.to_owned();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (locked, is_locked) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked.send(()).unwrap();
        let _ = released.recv();
        c.execute_batch("COMMIT").unwrap();
    });
    is_locked.recv().unwrap();
    (release, holder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_commit_goes_to_the_spool_after_commit_timeout_and_the_body_completes() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(
        SimConfig {
            rate_limit_minute: 0,
            ..Default::default()
        },
        None,
    )
    .await;
    let mut cfg = config_for(&sim.url(false), None);
    cfg.ledger.spool_reserve = ByteSize(0);
    // The writer's commit waits a minute for the lock: a stall, as a hung fsync would be.
    cfg.ledger.busy_timeout = creditmeter::config::HumanDuration(Duration::from_secs(60));
    cfg.ledger.commit_timeout = creditmeter::config::HumanDuration(Duration::from_millis(300));
    let proxy = Proxy::start(cfg, dir.path()).await;
    let mut ids = BTreeSet::new();
    for i in 0..3 {
        ids.insert(call(&proxy, "stalled", i).await.1);
    }
    let (release, holder) = hold_write_lock(&proxy.db);
    let mut slowest = Duration::ZERO;
    for i in 3..8 {
        let t = Instant::now();
        // Without the deadline each of these would hang until the lock goes (a minute).
        let (status, id) =
            tokio::time::timeout(Duration::from_secs(20), call(&proxy, "stalled", i))
                .await
                .expect("the response completes while the writer is stalled");
        slowest = slowest.max(t.elapsed());
        assert_eq!(status, 200);
        ids.insert(id);
    }
    println!("slowest call while the writer stalled: {slowest:?} (commit_timeout 300ms)");
    let (_, j) = readyz(&proxy).await;
    assert!(
        j["spooled_rows"].as_u64().unwrap() >= 5,
        "the stalled rows are in the spool: {j}"
    );
    release.send(()).unwrap();
    holder.join().unwrap();
    wait_recovered(&proxy).await;
    // Each row was both queued and spooled; the ledger holds it once.
    assert_exactly(&proxy.db, "stalled", &ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_after_a_restart_count_the_spend_still_in_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(
        SimConfig {
            rate_limit_minute: 0,
            match_rate_pct: 100,
            ..Default::default()
        },
        None,
    )
    .await;
    let budget = |mut c: creditmeter::config::Config| {
        let b = creditmeter::config::Config::from_toml(
            "[[budget]]\nname = \"burst\"\nscope = { table = \"burst\" }\nlimit = 6\nwindow = \"day\"\n",
        )
        .unwrap();
        c.budget = b.budget;
        c
    };
    // A first run creates the ledger and spends one credit.
    let mut first = Proxy::start(budget(config_for(&sim.url(false), None)), dir.path()).await;
    let (status, id) = call(&first, "burst", 0).await;
    assert_eq!(status, 200);
    first.shutdown().await;
    // It then went through an outage: four more calls (one already committed, spooled again
    // by its caller), in the spool when the process stopped.
    let now = creditmeter::meter::now_ms();
    let row = |rid: &str| {
        serde_json::json!({
            "request_id": rid, "started_at": now - 1000, "finished_at": now - 900, "method": "POST",
            "path": "/api/v1/people/match", "endpoint": "people_match", "status": 200,
            "outcome": "ok", "table_name": "burst", "workflow": null, "tags": null,
            "key_fp": null, "lead_milli": 1000, "direct_dial_milli": 0, "export_milli": 0,
            "credit_source": "catalog", "records_requested": 1, "records_matched": 1,
            "catalog_version": "t", "upstream_ms": 3, "request_bytes": 2, "response_bytes": 10,
            "error": null, "id_kinds": "email"
        })
        .to_string()
    };
    let spooled: Vec<String> = (0..4).map(|i| format!("outage-{i}")).collect();
    let mut text = format!("{}\n", row(&id));
    for rid in spooled.iter().chain(&spooled[..1]) {
        text.push_str(&row(rid));
        text.push('\n');
    }
    std::fs::write(sibling(&first.db, "spool"), text).unwrap();

    // Restart, and a burst of ten calls at once against 6 - 1 - 4 = 1 credit left.
    let second = Proxy::start(budget(config_for(&sim.url(false), None)), dir.path()).await;
    let billed_before = sim.sim.billed().calls;
    let url = second.url("/api/v1/people/match");
    let burst: Vec<_> = (1..11)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let req = http::Request::post(url)
                    .header("x-api-key", "fault-key")
                    .header("x-meter-table", "burst")
                    .body(Full::new(Bytes::from(format!(
                        r#"{{"email":"b{i}@example.com"}}"#
                    ))))
                    .unwrap();
                send(&client(), req).await.0.as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for h in burst {
        statuses.push(h.await.unwrap());
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    println!("after the restart: {admitted} admitted, {refused} refused (1 credit left)");
    assert_eq!(admitted, 1, "{statuses:?}");
    assert_eq!(refused, 9, "{statuses:?}");
    assert_eq!(
        sim.sim.billed().calls - billed_before,
        1,
        "one call reached Apollo"
    );
    wait_recovered(&second).await;
    let spent: i64 = rusqlite::Connection::open(&second.db)
        .unwrap()
        .query_row(
            "SELECT sum(credits_milli) FROM calls WHERE table_name = 'burst'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        spent, 6000,
        "the ledger holds exactly the limit, each spooled row once"
    );
}

/// `POST /api/holds` (or `DELETE /api/holds/{id}` with `release`); (status, answer).
async fn admin_hold(
    proxy: &Proxy,
    body: Option<serde_json::Value>,
    release: Option<i64>,
) -> (u16, serde_json::Value) {
    let req = match (body, release) {
        (Some(b), _) => http::Request::post(format!("http://{}/api/holds", proxy.admin))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(b.to_string())))
            .unwrap(),
        (None, Some(id)) => http::Request::delete(format!("http://{}/api/holds/{id}", proxy.admin))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::new()))
            .unwrap(),
        (None, None) => unreachable!(),
    };
    let (s, _, b) = send(&client(), req).await;
    (s.as_u16(), serde_json::from_slice(&b).unwrap())
}

/// Holds in force in the ledger's `holds` table for `table`.
fn holds_in_ledger(db: &Path, table: &str) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM holds WHERE released_at IS NULL AND scope LIKE ?1",
            [format!("%\"{table}\"%")],
            |r| r.get(0),
        )
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_placed_while_the_ledger_is_locked_is_in_force_at_once_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(
        SimConfig {
            rate_limit_minute: 0,
            ..Default::default()
        },
        None,
    )
    .await;
    let mut cfg = config_for(&sim.url(false), None);
    cfg.ledger.spool_reserve = ByteSize(0);
    let mut proxy = Proxy::start(cfg.clone(), dir.path()).await;
    assert_eq!(call(&proxy, "runaway", 0).await.0, 200);

    let (release, holder) = hold_write_lock(&proxy.db);
    let (status, j) = admin_hold(
        &proxy,
        Some(serde_json::json!({"scope": {"table": "runaway"}, "reason": "incident"})),
        None,
    )
    .await;
    println!("hold placed with the ledger locked: {status} {j}");
    assert_eq!(status, 201, "{j}");
    assert_eq!(j["persisted"], false, "{j}");
    assert_eq!(j["persisted_to"], "spool", "{j}");
    assert!(
        j["message"].as_str().unwrap().contains("holds spool"),
        "{j}"
    );
    let id = j["hold"]["id"].as_i64().unwrap();
    // In force at once: nothing reaches Apollo for that table; other tables flow.
    let billed = sim.sim.billed().calls;
    for i in 1..4 {
        assert_eq!(call(&proxy, "runaway", i).await.0, 503, "held");
    }
    assert_eq!(
        sim.sim.billed().calls,
        billed,
        "held calls never reach upstream"
    );
    assert_eq!(call(&proxy, "other", 0).await.0, 200);

    release.send(()).unwrap();
    holder.join().unwrap();
    wait_recovered(&proxy).await;
    // The writer's recovery wrote the spooled hold into the ledger.
    let deadline = Instant::now() + Duration::from_secs(10);
    while holds_in_ledger(&proxy.db, "runaway") == 0 {
        assert!(
            Instant::now() < deadline,
            "the spooled hold never reached the ledger"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!dir.path().join("ledger.db.holds-spool").exists());

    // A restart keeps it, under the same id; lifting it works as usual.
    proxy.shutdown().await;
    let proxy = Proxy::start(cfg, dir.path()).await;
    assert_eq!(
        call(&proxy, "runaway", 9).await.0,
        503,
        "still held after a restart"
    );
    let (status, j) = admin_hold(&proxy, None, Some(id)).await;
    assert_eq!(status, 200, "{j}");
    assert_eq!(j["persisted"], true, "{j}");
    assert_eq!(call(&proxy, "runaway", 10).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_placed_on_a_full_disk_is_in_force_at_once_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(dir.path(), "4m");
    let sim = SimServer::start(
        SimConfig {
            rate_limit_minute: 0,
            ..Default::default()
        },
        None,
    )
    .await;
    let mut cfg = config_for(&sim.url(false), None);
    cfg.ledger.path = fs.0.join("ledger.db");
    cfg.ledger.spool_reserve = ByteSize(512 * 1024);
    let mut proxy = Proxy::start(cfg.clone(), dir.path()).await;
    assert_eq!(call(&proxy, "runaway", 0).await.0, 200);
    let junk = fs.0.join("junk");
    fill(&junk);
    // Calls until SQLite refuses (the WAL had room for a few).
    let mut i = 1;
    loop {
        assert_eq!(call(&proxy, "other", i).await.0, 200);
        if readyz(&proxy).await.1["ledger"] == "failing" {
            break;
        }
        i += 1;
        assert!(i < 1000, "the full disk never made SQLite fail");
    }
    // The writer released its reserve for the spool: fill what that freed too.
    assert!(!sibling(&proxy.db, "spool-reserve").exists());
    fill(&fs.0.join("junk2"));
    let (status, j) = admin_hold(
        &proxy,
        Some(serde_json::json!({"scope": {"table": "runaway"}, "reason": "disk full"})),
        None,
    )
    .await;
    println!("hold placed on a full disk: {status} {j}");
    assert_eq!(status, 201, "{j}");
    assert_eq!(j["persisted"], false, "{j}");
    assert_eq!(j["persisted_to"], "spool", "{j}");
    let billed = sim.sim.billed().calls;
    assert_eq!(call(&proxy, "runaway", 1).await.0, 503, "held at once");
    assert_eq!(sim.sim.billed().calls, billed);

    std::fs::remove_file(&junk).unwrap();
    std::fs::remove_file(fs.0.join("junk2")).unwrap();
    proxy.shutdown().await;
    let proxy = Proxy::start(cfg, dir.path()).await;
    assert_eq!(
        call(&proxy, "runaway", 2).await.0,
        503,
        "still held after a restart"
    );
    assert_eq!(
        holds_in_ledger(&proxy.db, "runaway"),
        1,
        "and now in the ledger"
    );
    drop(proxy);
    drop(fs);
}
