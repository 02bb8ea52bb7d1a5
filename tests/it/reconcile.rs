#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Reconciliation end to end: the simulator's balance (debited by every billed call, and out of
//! band on demand) polled through the proxy, windows settled in the real ledger, and the answer
//! read back from `GET /api/reconcile` and `creditmeter report --reconcile`.
//!
//! Bursts of traffic and debits are timed against the poller: a test waits for a fresh snapshot
//! and then acts, well inside the next window, so "the right window" is a fact the test knows.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::sync::Once;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::request::Call;
use common::*;
use creditmeter::config::{Config, HumanDuration};
use creditmeter::meter::now_ms;
use creditmeter_sim::SimConfig;
use http_body_util::Full;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_creditmeter");
const MASTER: &str = "cm-test-master-key-7f3a9c";
const KEY_ENV: &str = "CREDITMETER_TEST_RECONCILE_MASTER_KEY";
const ORDINARY_KEY_ENV: &str = "CREDITMETER_TEST_RECONCILE_ORDINARY_KEY";
const UNSET_ENV: &str = "CREDITMETER_TEST_RECONCILE_NEVER_SET";

/// Every test calls this first, so no test thread reads the environment while it is written.
fn env() {
    static ENV: Once = Once::new();
    ENV.call_once(|| {
        std::env::set_var(KEY_ENV, MASTER);
        std::env::set_var(ORDINARY_KEY_ENV, "an-ordinary-api-key");
    });
}

fn config(upstream: &str, interval: &str) -> Config {
    let mut c = config_for(upstream, None);
    c.upstream.timeout = HumanDuration(Duration::from_secs(2));
    c.reconcile.enabled = true;
    c.reconcile.interval = HumanDuration(HumanDuration::parse(interval).unwrap());
    c.reconcile.balance_lag = HumanDuration(Duration::ZERO);
    c.reconcile.api_key_env = KEY_ENV.into();
    c
}

async fn sim() -> SimServer {
    SimServer::start(
        SimConfig {
            master_key: Some(MASTER.into()),
            rate_limit_minute: 0,
            // The legacy paged people search, billed in export credits (Apollo now answers API
            // callers 422), so the traffic bills all three credit types.
            legacy_people_search: true,
            ..Default::default()
        },
        None,
    )
    .await
}

async fn call(proxy: &Proxy, method: &str, path: &str, body: &str) -> http::StatusCode {
    let method = http::Method::from_bytes(method.as_bytes()).unwrap();
    let (status, headers, _) = Call::new(method, proxy.url(path))
        .key("client-key")
        .table("leads")
        .json(body.to_owned())
        .send()
        .await;
    assert!(headers.contains_key("x-meter-request-id"));
    status
}

/// `orgs` organization enrichments and `people` person matches, one after another.
async fn burst(proxy: &Proxy, tag: &str, orgs: usize, people: usize) {
    for i in 0..orgs {
        let path = format!("/api/v1/organizations/enrich?domain={tag}-{i}.example");
        assert_eq!(call(proxy, "GET", &path, "").await, 200);
    }
    for i in 0..people {
        let body = format!(r#"{{"email":"p{i}@{tag}.example"}}"#);
        assert_eq!(
            call(proxy, "POST", "/api/v1/people/match", &body).await,
            200
        );
    }
}

async fn sim_post(sim: &SimServer, path: &str, body: &str) -> Value {
    let req = http::Request::post(format!("http://{}{path}", sim.addr))
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let (status, _, body) = send(&client(), req).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

fn snapshots(proxy: &Proxy) -> i64 {
    proxy
        .ledger()
        .query_row(
            "SELECT count(DISTINCT request_id) FROM balance_snapshots",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

/// Waits for the poller to store its next snapshot; the next one is an interval away.
async fn next_snapshot(proxy: &Proxy) {
    let n = snapshots(proxy);
    let until = Instant::now() + Duration::from_secs(15);
    while snapshots(proxy) <= n {
        assert!(Instant::now() < until, "no new balance snapshot within 15s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Win {
    credit_type: String,
    start: i64,
    end: i64,
    cycle_reset: bool,
    apollo_delta: Option<i64>,
    metered: i64,
    unmetered: i64,
    drift: i64,
    calls: i64,
}

fn windows(proxy: &Proxy) -> Vec<Win> {
    let conn = proxy.ledger();
    let mut stmt = conn
        .prepare(
            "SELECT credit_type, window_start, window_end, cycle_reset, apollo_delta_milli,
                    metered_milli, unmetered_milli, drift_milli, calls
               FROM reconciliation ORDER BY window_start, credit_type",
        )
        .unwrap();
    stmt.query_map([], |r| {
        Ok(Win {
            credit_type: r.get(0)?,
            start: r.get(1)?,
            end: r.get(2)?,
            cycle_reset: r.get(3)?,
            apollo_delta: r.get(4)?,
            metered: r.get(5)?,
            unmetered: r.get(6)?,
            drift: r.get(7)?,
            calls: r.get(8)?,
        })
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Waits until every credit type has a settled window ending at or after `t`.
async fn settled_through(proxy: &Proxy, t: i64) -> Vec<Win> {
    settled_through_types(proxy, t, &["lead", "direct_dial", "export"]).await
}

/// Waits until each of `types` has a settled window ending at or after `t`.
async fn settled_through_types(proxy: &Proxy, t: i64, types: &[&str]) -> Vec<Win> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let ws = windows(proxy);
        let done = types
            .iter()
            .all(|ty| ws.iter().any(|w| w.credit_type == *ty && w.end >= t));
        if done {
            return ws;
        }
        assert!(
            Instant::now() < until,
            "windows not settled through {t}: {ws:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn api_reconcile(proxy: &Proxy) -> Value {
    let (status, _, body) = get(&format!("http://{}/api/reconcile?since=1h", proxy.admin)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

fn cli_report(db: &Path, format: &str) -> String {
    let out = Command::new(BIN)
        .args([
            "report",
            "--reconcile",
            "--since",
            "1h",
            "--format",
            format,
            "--db",
        ])
        .arg(db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_traffic_alone_gives_zero_drift_even_with_calls_at_every_edge() {
    env();
    let dir = tempfile::tempdir().unwrap();
    let sim = sim().await;
    let proxy = Proxy::start(config(&sim.url(false), "200ms"), dir.path()).await;
    next_snapshot(&proxy).await;

    // Four callers for about two seconds: calls straddle many snapshots.
    let started = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|c| {
            let url = proxy.url("");
            tokio::spawn(async move {
                let client = client();
                let mut i = 0;
                while started.elapsed() < Duration::from_secs(2) {
                    let (method, path, body) = match (c + i) % 5 {
                        0 => ("GET", format!("/api/v1/organizations/enrich?domain=d{c}-{i}.example"), String::new()),
                        // Phone reveals bill when their job ends, later: their timing against
                        // the windows is tested with settlement rows of their own below.
                        1 => ("POST", "/api/v1/people/match".to_owned(), format!(r#"{{"email":"e{c}-{i}@x.example"}}"#)),
                        2 => ("POST", "/api/v1/people/bulk_match".to_owned(), format!(r#"{{"details":[{{"email":"a{c}-{i}@y.example"}},{{"email":"b{c}-{i}@y.example"}},{{"email":"c{c}-{i}@y.example"}}]}}"#)),
                        3 => ("POST", "/api/v1/mixed_people/search".to_owned(), format!(r#"{{"q_keywords":"k{c}-{i}","page":1}}"#)),
                        _ => ("POST", "/api/v1/people/match".to_owned(), format!(r#"{{"email":"f{c}-{i}@z.example"}}"#)),
                    };
                    let req = http::Request::builder()
                        .method(method)
                        .uri(format!("{url}{path}"))
                        .header("x-api-key", "client-key")
                        .header("x-meter-table", format!("table-{c}"))
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)))
                        .unwrap();
                    let (status, _, _) = send(&client, req).await;
                    assert_eq!(status, 200);
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(7)).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let ws = settled_through(&proxy, now_ms()).await;

    assert!(ws.len() >= 3 * 8, "expected many windows, got {}", ws.len());
    // Calls were in flight at snapshots (the case that makes naive drift flap).
    let at_edges: i64 = proxy
        .ledger()
        .query_row(
            "SELECT count(*) FROM reconciliation WHERE edge_milli > 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        at_edges >= 2,
        "only {at_edges} windows had calls at their edge"
    );
    let drifting: Vec<&Win> = ws.iter().filter(|w| w.drift != 0).collect();
    assert!(
        drifting.is_empty(),
        "proxied traffic alone drifted: {drifting:?}"
    );
    // Apollo's deltas add up to exactly what the sim billed, type by type.
    let billed = sim.sim.billed();
    for (ty, milli) in [
        ("lead", billed.lead_milli),
        ("direct_dial", billed.direct_dial_milli),
        ("export", billed.export_milli),
    ] {
        let apollo: i64 = ws
            .iter()
            .filter(|w| w.credit_type == ty)
            .map(|w| w.apollo_delta.unwrap())
            .sum();
        assert_eq!(apollo, milli, "{ty}");
        if ty != "direct_dial" {
            assert!(milli > 0, "the traffic should bill {ty}");
        }
    }

    // The polls are ordinary calls, priced 0, with the master key kept only as key_fp.
    let (polls, credits, with_fp): (i64, i64, i64) = proxy
        .ledger()
        .query_row(
            "SELECT count(*), sum(credits_milli), count(key_fp) FROM calls
              WHERE endpoint = 'usage_stats' AND table_name = '_creditmeter'
                AND workflow = 'reconcile' AND status = 200",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert!(polls >= 8, "{polls}");
    assert_eq!((credits, with_fp), (0, polls));
    let metrics = proxy.metrics().await;
    assert!(
        metric_sum(
            &metrics,
            "creditmeter_requests_total",
            &[("table", "_creditmeter"), ("endpoint", "usage_stats")]
        ) >= 8.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "creditmeter_unmetered_credits_total",
            &[("credit_type", "lead")]
        ),
        0.0
    );
    assert!(metrics.contains("creditmeter_unmetered_credits_total{credit_type=\"export\"} 0"));
    assert_eq!(
        metric_sum(
            &metrics,
            "creditmeter_apollo_credits_consumed",
            &[("credit_type", "lead")]
        ),
        billed.lead_milli as f64 / 1000.0
    );

    let answer = api_reconcile(&proxy).await;
    assert_eq!(answer["windows"], Value::Array(vec![]), "{answer:#}");
    assert_eq!(answer["poller"]["last_result"], "ok");
    assert!(!answer.to_string().contains(MASTER));

    let mut proxy = proxy;
    proxy.shutdown().await;
    for name in ["ledger.db", "ledger.db-wal"] {
        if let Ok(bytes) = std::fs::read(dir.path().join(name)) {
            assert!(
                !bytes.windows(MASTER.len()).any(|w| w == MASTER.as_bytes()),
                "the master key is in {name}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_band_debit_shows_up_in_its_window_with_its_amount() {
    env();
    let dir = tempfile::tempdir().unwrap();
    let sim = sim().await;
    let proxy = Proxy::start(config(&sim.url(false), "300ms"), dir.path()).await;
    next_snapshot(&proxy).await;
    burst(&proxy, "before", 3, 3).await;
    next_snapshot(&proxy).await;
    let t0 = now_ms();
    sim_post(
        &sim,
        "/__sim/debit",
        r#"{"credit_type":"lead","credits":5}"#,
    )
    .await;
    let t1 = now_ms();
    next_snapshot(&proxy).await;
    burst(&proxy, "after", 2, 2).await;
    let ws = settled_through(&proxy, now_ms()).await;

    let drifting: Vec<&Win> = ws.iter().filter(|w| w.drift != 0).collect();
    assert_eq!(drifting.len(), 1, "{ws:?}");
    let w = drifting[0];
    assert_eq!(
        (w.credit_type.as_str(), w.unmetered, w.metered, w.calls),
        ("lead", 5000, 0, 0)
    );
    assert!(
        w.start <= t0 && w.end >= t1,
        "debit at {t0}..{t1}, window {w:?}"
    );
    // Windows are back to back: the debit fell in exactly one.
    assert_eq!(
        ws.iter()
            .filter(|x| x.credit_type == "lead" && x.start <= t0 && x.end >= t1)
            .count(),
        1
    );

    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_sum(
            &metrics,
            "creditmeter_unmetered_credits_total",
            &[("credit_type", "lead")]
        ),
        5.0
    );

    // The API and the CLI give the same answer, and call it traffic outside the proxy.
    let api = api_reconcile(&proxy).await;
    let listed = api["windows"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{api:#}");
    assert_eq!(listed[0]["kind"], "outside_proxy");
    assert_eq!(listed[0]["unmetered"], 5.0);
    assert_eq!(listed[0]["start_ms"], w.start);
    assert!(listed[0]["reason"]
        .as_str()
        .unwrap()
        .contains("no proxied calls"));
    assert!(api["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["kind"] == "outside_proxy" && f["unmetered"] == 5.0));
    let cli: Value = serde_json::from_str(&cli_report(&proxy.db, "json")).unwrap();
    assert_eq!(cli["windows"], api["windows"]);
    let table = cli_report(&proxy.db, "table");
    assert!(
        table.contains("outside the proxy (no proxied calls in the window)"),
        "{table}"
    );
    let csv = cli_report(&proxy.db, "csv");
    assert!(
        csv.lines()
            .nth(1)
            .unwrap()
            .contains(",lead,5,0,5,0,outside_proxy,"),
        "{csv}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_under_priced_catalog_rule_is_named_with_its_ratio_next_to_outside_spend() {
    env();
    let dir = tempfile::tempdir().unwrap();
    // A copy of the built-in catalog where organizations_enrich charges half a credit.
    let builtin = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/apollo-catalog.toml"),
    )
    .unwrap();
    let rule = "credits = 1\nper = \"present\"\nfield = \"organization\"";
    assert_eq!(builtin.matches(rule).count(), 1);
    let skewed = builtin
        .replace(
            rule,
            "credits = 0.5\nper = \"present\"\nfield = \"organization\"",
        )
        .replace("version = \"apollo-2026-12\"", "version = \"skewed-test\"");
    let catalog = dir.path().join("skewed-catalog.toml");
    std::fs::write(&catalog, skewed).unwrap();

    let sim = sim().await;
    let mut cfg = config(&sim.url(false), "800ms");
    cfg.catalog.path = Some(catalog);
    let proxy = Proxy::start(cfg, dir.path()).await;
    next_snapshot(&proxy).await;
    // The mix of endpoints changes from window to window, so only one endpoint fits.
    for (i, (orgs, people)) in [(6, 2), (4, 8), (0, 5), (9, 1), (5, 5)]
        .into_iter()
        .enumerate()
    {
        burst(&proxy, &format!("b{i}"), orgs, people).await;
        next_snapshot(&proxy).await;
    }
    // Out of band, alone in a window...
    sim_post(
        &sim,
        "/__sim/debit",
        r#"{"credit_type":"lead","credits":3}"#,
    )
    .await;
    next_snapshot(&proxy).await;
    // ...and in a window where the skewed endpoint also runs.
    burst(&proxy, "mixed", 6, 0).await;
    sim_post(
        &sim,
        "/__sim/debit",
        r#"{"credit_type":"lead","credits":4}"#,
    )
    .await;
    next_snapshot(&proxy).await;
    settled_through(&proxy, now_ms()).await;

    let api = api_reconcile(&proxy).await;
    let findings = api["findings"].as_array().unwrap();
    let catalog_errors: Vec<&Value> = findings
        .iter()
        .filter(|f| f["kind"] == "catalog_error")
        .collect();
    assert_eq!(catalog_errors.len(), 1, "{api:#}");
    let f = catalog_errors[0];
    assert_eq!(f["endpoint"], "organizations_enrich", "{f:#}");
    assert_eq!(f["credit_type"], "lead");
    assert_eq!(f["per"], "matched_record");
    assert_eq!(f["ratio"], 0.5);
    assert_eq!(f["factor"], 2.0);
    assert_eq!(f["also_fits"], Value::Array(vec![]));
    assert!(f["agreeing_windows"].as_u64().unwrap() >= 4, "{f:#}");

    let listed = api["windows"].as_array().unwrap();
    let kinds: Vec<&str> = listed.iter().map(|w| w["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "catalog_error",
            "catalog_error",
            "catalog_error",
            "catalog_error",
            "outside_proxy",
            "catalog_error+outside_proxy"
        ],
        "{api:#}"
    );
    for w in listed.iter().filter(|w| w["kind"] != "outside_proxy") {
        assert_eq!(w["endpoint"], "organizations_enrich");
    }
    assert_eq!(listed[4]["unmetered"], 3.0);
    assert_eq!(listed[4]["proxied_calls"], 0);
    // Apollo's figures are whole credits: a window's split is known to within one credit.
    let mixed_outside = listed[5]["outside"].as_f64().unwrap();
    assert!((mixed_outside - 4.0).abs() <= 1.0, "{:#}", listed[5]);
    let outside = findings
        .iter()
        .find(|f| f["kind"] == "outside_proxy")
        .unwrap();
    assert!(
        (outside["unmetered"].as_f64().unwrap() - 7.0).abs() <= 1.0,
        "{outside:#}"
    );

    // The drift is exactly half a credit per matched organization, all told.
    let matched: i64 = proxy
        .ledger()
        .query_row(
            "SELECT sum(records_matched) FROM calls WHERE endpoint = 'organizations_enrich'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let unmetered: i64 = windows(&proxy).iter().map(|w| w.unmetered).sum();
    // To within the fraction of a credit Apollo's last whole-credit figure hides.
    assert!(
        (unmetered - (matched * 500 + 7000)).abs() < 1000,
        "unmetered {unmetered}, matched {matched}"
    );

    let table = cli_report(&proxy.db, "table");
    if std::env::var_os("SHOW_REPORT").is_some() {
        eprintln!("{table}");
    }
    assert!(
        table.contains("catalog error: organizations_enrich under-prices lead credits: Apollo billed 0.5 more per matched record than the rule (2x what the rule priced)"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_cycle_reset_is_not_drift() {
    env();
    let dir = tempfile::tempdir().unwrap();
    let sim = sim().await;
    let proxy = Proxy::start(config(&sim.url(false), "300ms"), dir.path()).await;
    next_snapshot(&proxy).await;
    burst(&proxy, "old-cycle", 4, 4).await;
    next_snapshot(&proxy).await;
    burst(&proxy, "around-reset", 2, 2).await;
    let stats = sim_post(&sim, "/__sim/reset_cycle", "").await;
    assert_eq!(stats["lead_credit"]["consumed"], 0);
    burst(&proxy, "new-cycle", 2, 2).await;
    next_snapshot(&proxy).await;
    burst(&proxy, "later", 3, 3).await;
    let ws = settled_through(&proxy, now_ms()).await;

    let resets: Vec<&Win> = ws.iter().filter(|w| w.cycle_reset).collect();
    assert_eq!(resets.len(), 3, "one reset window per credit type: {ws:?}");
    assert!(resets
        .iter()
        .all(|w| w.apollo_delta.is_none() && w.drift == 0));
    assert!(ws.iter().all(|w| w.drift == 0), "{ws:?}");
    // After the reset the balance is followed again, exactly.
    let lead_after: i64 = ws
        .iter()
        .filter(|w| w.credit_type == "lead" && w.start >= resets[0].end)
        .map(|w| w.apollo_delta.unwrap())
        .sum();
    assert!(lead_after > 0);

    let api = api_reconcile(&proxy).await;
    assert_eq!(api["status"]["cycle_resets"], 1);
    assert_eq!(api["windows"], Value::Array(vec![]));
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "creditmeter_unmetered_credits_total", &[]),
        0.0
    );
    let table = cli_report(&proxy.db, "table");
    assert!(
        table.contains("1 credit-cycle reset(s), not counted as drift"),
        "{table}"
    );
}

/// Sends `n` concurrent proxied calls and checks each one was answered and recorded.
async fn proxying_works(proxy: &Proxy, tag: &str, n: usize) {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let url = proxy.url("/api/v1/people/match");
            let tag = tag.to_owned();
            tokio::spawn(async move {
                let req = http::Request::post(url)
                    .header("x-api-key", "client-key")
                    .header("x-meter-table", tag.clone())
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(format!(
                        r#"{{"email":"{tag}{i}@w.example"}}"#
                    ))))
                    .unwrap();
                let (status, headers, body) = send(&client(), req).await;
                assert_eq!(status, 200);
                assert!(headers.contains_key("x-meter-request-id"));
                assert!(serde_json::from_slice::<Value>(&body)
                    .unwrap()
                    .get("person")
                    .is_some());
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let rows: i64 = proxy
        .ledger()
        .query_row(
            "SELECT count(*) FROM calls WHERE table_name = ?1 AND status = 200",
            [tag],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, n as i64);
}

async fn wait_for_result(proxy: &Proxy, result: &str) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let m = proxy.metrics().await;
        if metric_sum(
            &m,
            "creditmeter_reconcile_polls_total",
            &[("result", result)],
        ) >= 1.0
        {
            return;
        }
        assert!(Instant::now() < until, "no poll with result {result}:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_without_scope_or_no_key_stalls_reconciliation_not_proxying() {
    env();
    let dir = tempfile::tempdir().unwrap();
    let sim = sim().await;
    // An ordinary API key: usage_stats answers 403 API_INACCESSIBLE.
    let mut cfg = config(&sim.url(false), "100ms");
    cfg.reconcile.api_key_env = ORDINARY_KEY_ENV.into();
    let proxy = Proxy::start(cfg, dir.path()).await;
    wait_for_result(&proxy, "forbidden").await;
    proxying_works(&proxy, "during-403", 24).await;
    assert_eq!(snapshots(&proxy), 0);
    let api = api_reconcile(&proxy).await;
    assert_eq!(api["poller"]["last_result"], "forbidden", "{api:#}");
    assert!(api["poller"]["consecutive_failures"].as_u64().unwrap() >= 1);
    assert!(api["status"]["note"]
        .as_str()
        .unwrap()
        .contains("no balance snapshots"));
    assert!(!api.to_string().contains("an-ordinary-api-key"));
    // The refused polls are in the ledger like any call, free.
    let refused: i64 = proxy
        .ledger()
        .query_row(
            "SELECT count(*) FROM calls WHERE endpoint = 'usage_stats' AND status = 403 AND credits_milli = 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(refused >= 1);
    drop(proxy);

    // No key at all: nothing is sent, the failure is counted, proxying goes on.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&sim.url(false), "100ms");
    cfg.reconcile.api_key_env = UNSET_ENV.into();
    let mut proxy = Proxy::start(cfg, dir.path()).await;
    wait_for_result(&proxy, "no_key").await;
    proxying_works(&proxy, "no-key", 8).await;
    let polls: i64 = proxy
        .ledger()
        .query_row(
            "SELECT count(*) FROM calls WHERE endpoint = 'usage_stats'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(polls, 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apollo_errors_stalls_and_rate_limits_on_the_balance_never_touch_proxying() {
    env();
    let dir = tempfile::tempdir().unwrap();
    let sim = sim().await;
    let mut cfg = config(&sim.url(false), "100ms");
    cfg.upstream.timeout = HumanDuration(Duration::from_secs(1));
    let mut proxy = Proxy::start(cfg, dir.path()).await;
    wait_for_result(&proxy, "ok").await;

    for (fault, result) in [
        (r#"{"status":401}"#, "unauthorized"),
        (r#"{"status":500}"#, "http_error"),
        (r#"{"status":429,"retry_after":1}"#, "rate_limited"),
        (r#"{"stall_ms":3000}"#, "timeout"),
    ] {
        sim_post(&sim, "/__sim/usage_stats_fault", fault).await;
        let tag = format!("during-{result}");
        tokio::join!(
            proxying_works(&proxy, &tag, 12),
            wait_for_result(&proxy, result)
        );
    }
    // A stalled poll is recorded as a timeout, like any call.
    let timeouts: i64 = proxy
        .ledger()
        .query_row(
            "SELECT count(*) FROM calls WHERE endpoint = 'usage_stats' AND outcome = 'upstream_timeout'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(timeouts >= 1);

    // Once Apollo answers again, polling resumes.
    sim_post(&sim, "/__sim/usage_stats_fault", "{}").await;
    let before = snapshots(&proxy);
    let until = Instant::now() + Duration::from_secs(30);
    while snapshots(&proxy) <= before {
        assert!(Instant::now() < until, "polling did not resume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let api = api_reconcile(&proxy).await;
    assert_eq!(api["poller"]["last_result"], "ok");
    assert_eq!(api["poller"]["consecutive_failures"], 0);

    // And a stalled poll does not hold up shutdown.
    sim_post(&sim, "/__sim/usage_stats_fault", r#"{"stall_ms":5000}"#).await;
    let t = Instant::now();
    proxy.shutdown().await;
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_apollo_fails_polls_and_calls_alike_and_nothing_else() {
    env();
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut proxy = Proxy::start(
        config(&format!("http://127.0.0.1:{port}"), "100ms"),
        dir.path(),
    )
    .await;
    wait_for_result(&proxy, "upstream_error").await;
    let req = http::Request::post(proxy.url("/api/v1/people/match"))
        .header("x-meter-table", "t")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let (status, headers, _) = send(&client(), req).await;
    assert_eq!(status, 502);
    assert!(headers.contains_key("x-meter-request-id"));
    let (status, _, _) = get(&format!("http://{}/readyz", proxy.admin)).await;
    assert_eq!(status, 200);
    proxy.shutdown().await;
}

/// A call sent straight to the sim, as Clay's native integration or a script with the key
/// would: Apollo bills and counts it, creditmeter never sees it.
async fn direct_call(sim: &SimServer, method: &str, path: &str, body: &str) {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", sim.addr))
        .header("x-api-key", "someone-elses-key")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let (status, _, body) = send(&client(), req).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

/// A deferred charge learned now, as the settlement side records it (DESIGN.md: outcome
/// `settlement`, `settles` = the original's request_id, the original's `started_at`,
/// `finished_at` = when learned). Written straight into the ledger, as branch `settle` would.
fn insert_settlement(db: &Path, original_started: i64, lead_milli: i64, n: usize) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let has_settles: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('calls') WHERE name = 'settles'")
        .unwrap()
        .exists([])
        .unwrap();
    let now = now_ms();
    conn.execute(
        "INSERT INTO calls (request_id, started_at, finished_at, method, path, endpoint, status,
             outcome, table_name, credits_milli, lead_milli, credit_source, catalog_version)
         VALUES (?1, ?2, ?3, 'POST', '/api/v1/people/bulk_match', 'people_bulk_match', 200,
             'settlement', 'leads', ?4, ?4, 'reported', 'test')",
        rusqlite::params![format!("settle-{n}"), original_started, now, lead_milli],
    )
    .unwrap();
    if has_settles {
        conn.execute(
            "UPDATE calls SET settles = ?1 WHERE request_id = ?2",
            rusqlite::params![format!("orig-{n}"), format!("settle-{n}")],
        )
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fractional_deferred_charges_over_many_windows_show_no_drift_on_whole_credit_balances() {
    env();
    let dir = tempfile::tempdir().unwrap();
    let sim = sim().await;
    let proxy = Proxy::start(config(&sim.url(false), "300ms"), dir.path()).await;
    next_snapshot(&proxy).await;
    // An hour-old bulk match whose waterfall bills 1.01 credits per window as its jobs end
    // (Apollo bills when the job ends; creditmeter learns it a moment later). The originals
    // started long before any window, beyond the lookback ordinary calls get.
    let original = now_ms() - 3_600_000;
    let bulk = r#"{"details":[{"email":"a@frac.example"},{"email":"b@frac.example"}]}"#;
    let mut proxied_bulk = 0;
    for n in 0..12 {
        next_snapshot(&proxy).await;
        sim_post(
            &sim,
            "/__sim/debit",
            r#"{"credit_type":"lead","credits":1.01}"#,
        )
        .await;
        insert_settlement(&proxy.db, original, 1010, n);
        if n % 3 == 0 {
            assert_eq!(
                call(&proxy, "POST", "/api/v1/people/bulk_match", bulk).await,
                200
            );
            proxied_bulk += 1;
        }
    }
    next_snapshot(&proxy).await;
    let ws = settled_through(&proxy, now_ms()).await;
    let lead: Vec<&Win> = ws.iter().filter(|w| w.credit_type == "lead").collect();
    assert!(lead.len() >= 12, "{ws:?}");
    // Apollo's figures are whole credits...
    assert!(
        lead.iter()
            .all(|w| w.apollo_delta.is_some_and(|d| d % 1000 == 0)),
        "{lead:?}"
    );
    // ...and the ledger's 12.12 credits of fractions never show as drift.
    assert!(ws.iter().all(|w| w.drift == 0), "{ws:?}");
    let apollo: i64 = lead.iter().filter_map(|w| w.apollo_delta).sum();
    let metered: i64 = lead.iter().map(|w| w.metered).sum();
    assert_eq!(apollo, metered);
    // The settlements count as credits but not as calls.
    let conn = proxy.ledger();
    let mut stmt = conn
        .prepare("SELECT by_endpoint FROM reconciliation WHERE credit_type = 'lead'")
        .unwrap();
    let (mut calls, mut credits) = (0, 0);
    for by in stmt.query_map([], |r| r.get::<_, String>(0)).unwrap() {
        let by: Value = serde_json::from_str(&by.unwrap()).unwrap();
        calls += by["people_bulk_match"]["calls"].as_i64().unwrap_or(0);
        credits += by["people_bulk_match"]["credits_milli"]
            .as_i64()
            .unwrap_or(0);
    }
    assert_eq!(calls, proxied_bulk);
    let proxied_credits: i64 = conn
        .query_row(
            "SELECT sum(credits_milli) FROM calls WHERE endpoint = 'people_bulk_match' AND outcome = 'ok'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(credits, proxied_credits + 12 * 1010);
    // Nor do they make Apollo's call counts look short or long.
    let outside: i64 = conn
        .query_row(
            "SELECT COALESCE(sum(abs(drift_calls)), 0) FROM reconcile_calls WHERE endpoint = 'people_bulk_match'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(outside, 0);
    let api = api_reconcile(&proxy).await;
    assert_eq!(api["windows"], Value::Array(vec![]), "{api:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unified_pool_is_reconciled_as_one_total() {
    env();
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(
        SimConfig {
            master_key: Some(MASTER.into()),
            rate_limit_minute: 0,
            unified_credits: true,
            ..Default::default()
        },
        None,
    )
    .await;
    let mut cfg = config(&sim.url(false), "300ms");
    cfg.reconcile.pool = creditmeter::reconcile::Pool::Unified;
    let proxy = Proxy::start(cfg, dir.path()).await;
    next_snapshot(&proxy).await;
    burst(&proxy, "u1", 3, 3).await;
    next_snapshot(&proxy).await;
    // A mobile reveal and an export in Apollo's web app: on a unified plan both come out of the
    // one pool that usage_stats calls lead_credit.
    let t0 = now_ms();
    sim_post(
        &sim,
        "/__sim/debit",
        r#"{"credit_type":"direct_dial","credits":8}"#,
    )
    .await;
    sim_post(
        &sim,
        "/__sim/debit",
        r#"{"credit_type":"export","credits":1}"#,
    )
    .await;
    next_snapshot(&proxy).await;
    burst(&proxy, "u2", 2, 2).await;
    next_snapshot(&proxy).await;
    let ws = settled_through_types(&proxy, now_ms(), &["unified"]).await;
    assert!(ws.iter().all(|w| w.credit_type == "unified"), "{ws:?}");
    let drifting: Vec<&Win> = ws.iter().filter(|w| w.drift != 0).collect();
    assert_eq!(drifting.len(), 1, "{ws:?}");
    assert_eq!(drifting[0].unmetered, 9000, "{ws:?}");
    assert!(drifting[0].start <= t0 && drifting[0].end >= t0);
    let metered: i64 = ws.iter().map(|w| w.metered).sum();
    let ledger: i64 = proxy
        .ledger()
        .query_row(
            "SELECT sum(credits_milli) FROM calls WHERE table_name = 'leads'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(metered, ledger);
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_sum(
            &metrics,
            "creditmeter_unmetered_credits_total",
            &[("credit_type", "unified")]
        ),
        9.0
    );
    let api = api_reconcile(&proxy).await;
    let listed = api["windows"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{api:#}");
    assert_eq!(listed[0]["credit_type"], "unified");
    assert_eq!(listed[0]["unmetered"], 9.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_sent_straight_to_apollo_are_named_per_endpoint_with_their_count_and_window() {
    env();
    let dir = tempfile::tempdir().unwrap();
    let sim = sim().await;
    // Windows of 1s, so that the calls below surely fall in one.
    let proxy = Proxy::start(config(&sim.url(false), "1s"), dir.path()).await;
    next_snapshot(&proxy).await;
    burst(&proxy, "before", 2, 2).await;
    next_snapshot(&proxy).await;
    let t0 = now_ms();
    for i in 0..7 {
        let body = format!(r#"{{"email":"direct{i}@outside.example"}}"#);
        direct_call(&sim, "POST", "/api/v1/people/match", &body).await;
    }
    direct_call(
        &sim,
        "GET",
        "/v1/organizations/enrich?domain=outside.example",
        "",
    )
    .await;
    // Proxied traffic in the same window is not mistaken for outside calls.
    burst(&proxy, "during", 3, 2).await;
    let t1 = now_ms();
    next_snapshot(&proxy).await;
    burst(&proxy, "after", 1, 1).await;
    next_snapshot(&proxy).await;
    settled_through(&proxy, now_ms()).await;
    let conn = proxy.ledger();
    let until = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let mut stmt = conn
            .prepare(
                "SELECT endpoint, routes, window_start, window_end, outside_calls FROM reconcile_calls
                  WHERE outside_calls > 0 ORDER BY window_start, endpoint",
            )
            .unwrap();
        let rows: Vec<(String, String, i64, i64, i64)> = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let settled: i64 = conn
            .query_row(
                "SELECT COALESCE(max(window_end), 0) FROM reconcile_calls",
                [],
                |r| r.get(0),
            )
            .unwrap();
        if settled >= t1 {
            break rows;
        }
        assert!(
            Instant::now() < until,
            "call-count windows not settled: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (endpoint, routes, start, end, n) = &rows[1];
    assert_eq!(
        (endpoint.as_str(), routes.as_str(), *n),
        ("people_match", "people/match", 7)
    );
    assert!(
        *start <= t0 && *end >= t1,
        "calls at {t0}..{t1}, window {start}..{end}"
    );
    let org = &rows[0];
    assert_eq!(
        (org.0.as_str(), org.1.as_str(), org.4),
        ("organizations_enrich", "organizations/enrich", 1)
    );

    let metrics = proxy.metrics().await;
    assert_eq!(
        metric_sum(
            &metrics,
            "creditmeter_outside_calls_total",
            &[("endpoint", "people_match")]
        ),
        7.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "creditmeter_outside_calls_total",
            &[("endpoint", "organizations_enrich")]
        ),
        1.0
    );
    let api = api_reconcile(&proxy).await;
    let listed = api["outside_calls"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{api:#}");
    let pm = listed
        .iter()
        .find(|w| w["endpoint"] == "people_match")
        .unwrap();
    assert_eq!(pm["outside_calls"], 7);
    assert!(
        pm["summary"]
            .as_str()
            .unwrap()
            .starts_with("7 people/match calls outside creditmeter between "),
        "{pm:#}"
    );
    assert_eq!(api["poller"]["call_counts"], "ok");
    assert!(api["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["kind"] == "outside_calls"
            && f["endpoint"] == "people_match"
            && f["calls"] == 7));
    let cli: Value = serde_json::from_str(&cli_report(&proxy.db, "json")).unwrap();
    assert_eq!(cli["outside_calls"], api["outside_calls"]);
    let table = cli_report(&proxy.db, "table");
    assert!(
        table.contains("7 people/match calls outside creditmeter between"),
        "{table}"
    );
    assert!(
        table.contains("1 organizations/enrich call outside creditmeter between"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_without_api_usage_stats_still_reconciles_credits_and_says_why() {
    env();
    let dir = tempfile::tempdir().unwrap();
    let sim = SimServer::start(
        SimConfig {
            master_key: Some(MASTER.into()),
            rate_limit_minute: 0,
            api_usage_stats_fault: Some(404),
            ..Default::default()
        },
        None,
    )
    .await;
    let proxy = Proxy::start(config(&sim.url(false), "300ms"), dir.path()).await;
    next_snapshot(&proxy).await;
    direct_call(
        &sim,
        "POST",
        "/api/v1/people/match",
        r#"{"email":"x@outside.example"}"#,
    )
    .await;
    sim_post(
        &sim,
        "/__sim/debit",
        r#"{"credit_type":"lead","credits":2}"#,
    )
    .await;
    next_snapshot(&proxy).await;
    next_snapshot(&proxy).await;
    let ws = settled_through(&proxy, now_ms()).await;
    assert!(ws.iter().any(|w| w.unmetered > 0), "{ws:?}");
    let api = api_reconcile(&proxy).await;
    assert!(
        api["poller"]["call_counts"]
            .as_str()
            .unwrap()
            .starts_with("unavailable: Apollo answered 404"),
        "{:#}",
        api["poller"]
    );
    assert_eq!(api["outside_calls"], Value::Array(vec![]));
    assert_eq!(api["poller"]["last_result"], "ok");
    // Proxying is untouched.
    burst(&proxy, "still", 1, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_settles_once_its_calls_are_in_not_after_upstream_timeout() {
    env();
    let dir = tempfile::tempdir().unwrap();
    let sim = sim().await;
    let mut cfg = config(&sim.url(false), "300ms");
    // The old rule waited upstream.timeout + 1s after every closing snapshot.
    cfg.upstream.timeout = HumanDuration(Duration::from_secs(40));
    let proxy = Proxy::start(cfg, dir.path()).await;
    next_snapshot(&proxy).await;
    burst(&proxy, "quick", 2, 2).await;
    next_snapshot(&proxy).await;
    let (received, _) = last_snapshot(&proxy);
    let ws = settled_through(&proxy, received - 1).await;
    let settled_at = reconciled_at(&proxy, received);
    eprintln!(
        "detection: window closed by the snapshot answered at {received} settled {} ms later",
        settled_at - received
    );
    assert!(ws.iter().all(|w| w.drift == 0), "{ws:?}");
    assert!(
        settled_at - received < 40_000,
        "waited for upstream.timeout"
    );

    // A call in flight across a snapshot holds that window until it has ended: a caller's
    // usage_stats call through the proxy, which Apollo (the sim) holds for 5 s, as it holds the
    // poller's. Sent while the poller's next poll is held (it went out 300 ms after the last
    // snapshot), it is in flight when that poll is answered, and for 3 s more: longer than the
    // commit margin, so a settle that ignored it would come too soon.
    next_snapshot(&proxy).await;
    sim_post(&sim, "/__sim/usage_stats_fault", r#"{"stall_ms": 5000}"#).await;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let req = http::Request::post(proxy.url("/api/v1/usage_stats/credit_usage_stats"))
        .header("x-api-key", MASTER)
        .header("x-meter-table", "slow")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(send(&client(), req).await.0, 200);
    sim_post(&sim, "/__sim/usage_stats_fault", "{}").await;
    let (slow_started, slow_finished): (i64, i64) = proxy
        .ledger()
        .query_row(
            "SELECT started_at, finished_at FROM calls WHERE table_name = 'slow'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    next_snapshot(&proxy).await;
    next_snapshot(&proxy).await;
    let held: Vec<i64> = {
        let conn = proxy.ledger();
        let mut stmt = conn
            .prepare(
                "SELECT DISTINCT received_at FROM balance_snapshots
                  WHERE received_at > ?1 AND received_at < ?2",
            )
            .unwrap();
        stmt.query_map([slow_started, slow_finished], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert!(
        !held.is_empty(),
        "no snapshot was answered while the slow call ({slow_started}..{slow_finished}) was in flight"
    );
    settled_through(&proxy, now_ms() - 1000).await;
    for r in held {
        let settled = reconciled_at(&proxy, r);
        assert!(
            settled >= slow_finished,
            "the window closed by the snapshot answered at {r} settled at {settled}, before the call in flight ended at {slow_finished}"
        );
    }
}

/// `(received_at, sent_at)` of the latest balance snapshot.
fn last_snapshot(proxy: &Proxy) -> (i64, i64) {
    proxy
        .ledger()
        .query_row(
            "SELECT received_at, sent_at FROM balance_snapshots ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
}

/// When the lead window closed by the snapshot answered at `received` was settled.
fn reconciled_at(proxy: &Proxy, received: i64) -> i64 {
    proxy
        .ledger()
        .query_row(
            "SELECT r.reconciled_at FROM reconciliation r JOIN balance_snapshots b ON b.id = r.to_snapshot
              WHERE b.received_at = ?1 AND r.credit_type = 'lead'",
            [received],
            |r| r.get(0),
        )
        .unwrap()
}
