//! The waste finder and the finance exports, over real proxied traffic: the same people sent
//! from two tables (spelled differently) show up in `report --repeats` with the credits the
//! second enrichment cost; identifier values never reach the ledger file; `--format focus`
//! and `--calls` add up to the ledger.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::process::Command;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Value};

use common::{client, config_for, send, Proxy, SimServer};
use creditmeter_sim::SimConfig;

const BIN: &str = env!("CARGO_BIN_EXE_creditmeter");

/// Sends one call through the proxy for `table`; returns the credits the ledger recorded.
async fn call(proxy: &Proxy, table: &str, method: &str, path: &str, body: Option<Value>) -> i64 {
    let mut req = http::Request::builder()
        .method(method)
        .uri(proxy.url(path))
        .header("x-api-key", "test-key")
        .header("x-meter-table", table)
        .header("x-meter-workflow", "enrich");
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let (status, headers, _) = send(&client(), req.body(Full::new(body)).unwrap()).await;
    assert!(status.is_success(), "{method} {path}: {status}");
    let id = headers
        .get("x-meter-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    proxy
        .ledger()
        .query_row(
            "SELECT credits_milli FROM calls WHERE request_id = ?1",
            [&id],
            |r| r.get(0),
        )
        .unwrap()
}

fn person(email: &str) -> Option<Value> {
    Some(json!({ "email": email }))
}

/// Every byte creditmeter wrote for the ledger (file, WAL, shared memory).
fn ledger_bytes(db: &std::path::Path) -> Vec<u8> {
    let mut all = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        if let Ok(b) = std::fs::read(&p) {
            all.extend(b);
        }
    }
    all
}

fn run(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_people_enriched_from_two_tables_are_repeats_with_their_credits() {
    let sim = SimServer::start(
        SimConfig {
            match_rate_pct: 100,
            rate_limit_minute: 0,
            ..Default::default()
        },
        None,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(config_for(&sim.url(false), None), dir.path()).await;
    let m = "/api/v1/people/match";

    // ABM accounts enriches four people and a company first.
    let mut abm = 0;
    for e in ["pat@acme.com", "sam@acme.com", "lee@globex.com"] {
        abm += call(&proxy, "ABM accounts", "POST", m, person(e)).await;
    }
    abm += call(
        &proxy,
        "ABM accounts",
        "POST",
        m,
        Some(json!({"linkedin_url": "https://www.linkedin.com/in/Robin-Roe/"})),
    )
    .await;
    abm += call(
        &proxy,
        "ABM accounts",
        "GET",
        "/api/v1/organizations/enrich?domain=initech.com",
        None,
    )
    .await;
    assert!(abm >= 5000, "the simulator matches everyone: {abm}");

    // Inbound leads then enriches three of the same people, spelled differently, one of them
    // inside a bulk match, the same company, and two new people.
    let mut repeat_credits = 0;
    repeat_credits += call(
        &proxy,
        "Inbound leads",
        "POST",
        m,
        person("  PAT@Acme.com "),
    )
    .await;
    repeat_credits += call(
        &proxy,
        "Inbound leads",
        "POST",
        &format!("{m}?linkedin_url=http%3A%2F%2Flinkedin.com%2Fin%2Frobin-roe%3Ftrk%3Dx"),
        None,
    )
    .await;
    repeat_credits += call(
        &proxy,
        "Inbound leads",
        "GET",
        "/api/v1/organizations/enrich?domain=https%3A%2F%2Fwww.Initech.com%2F",
        None,
    )
    .await;
    let bulk = call(
        &proxy,
        "Inbound leads",
        "POST",
        "/api/v1/people/bulk_match",
        Some(json!({"details": [{"email": "Sam@acme.com"}, {"email": "new1@hooli.com"}]})),
    )
    .await;
    assert_eq!(bulk, 2000, "a bulk match of two found people bills 2");
    repeat_credits += bulk / 2;
    call(&proxy, "Inbound leads", "POST", m, person("new2@hooli.com")).await;
    // A free search carries no enrichment.
    call(
        &proxy,
        "Inbound leads",
        "POST",
        "/api/v1/mixed_people/api_search",
        Some(json!({"person_titles": ["CEO"]})),
    )
    .await;
    // ABM accounts enriching its own person again is a repeat within the table.
    let own = call(&proxy, "ABM accounts", "POST", m, person("lee@globex.com")).await;

    let db = proxy.db.to_str().unwrap().to_owned();
    let json_out = run(&[
        "report",
        "--db",
        &db,
        "--repeats",
        "--since",
        "1h",
        "--format",
        "json",
    ]);
    let doc: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(doc["view"], "repeats");
    let pairs = doc["pairs"].as_array().unwrap();
    let find = |earlier: &str, later: &str| {
        pairs
            .iter()
            .find(|p| p["earlier_table"] == earlier && p["later_table"] == later)
            .unwrap_or_else(|| panic!("no pair {earlier} -> {later} in {doc:#}"))
    };
    let cross = find("ABM accounts", "Inbound leads");
    assert_eq!(cross["items"], 4, "{cross:#}");
    assert_eq!(cross["calls"], 4, "{cross:#}");
    assert_eq!(cross["credits_milli"], repeat_credits, "{cross:#}");
    assert_eq!(cross["by_kind"]["email"], 2);
    assert_eq!(cross["by_kind"]["linkedin_url"], 1);
    assert_eq!(cross["by_kind"]["domain"], 1);
    assert_eq!(cross["what"], "people and companies");
    let within = find("ABM accounts", "ABM accounts");
    assert_eq!(within["items"], 1);
    assert_eq!(within["credits_milli"], own);
    assert_eq!(pairs.len(), 2, "no other pair: {doc:#}");
    assert_eq!(
        doc["total"]["credits_milli"],
        repeat_credits + own,
        "{doc:#}"
    );

    // The table view says it in a sentence.
    let table = run(&["report", "--db", &db, "--repeats", "--since", "1h"]);
    assert!(
        table.contains(
            "Inbound leads re-enriched 4 people and companies that ABM accounts had enriched"
        ),
        "{table}"
    );
    let csv = run(&[
        "report",
        "--db",
        &db,
        "--repeats",
        "--since",
        "1h",
        "--format",
        "csv",
    ]);
    assert!(csv.starts_with("earlier_table,later_table,what,items,calls,credits,"));
    assert!(
        csv.contains("ABM accounts,Inbound leads,people and companies,4,4,"),
        "{csv}"
    );

    // The admin API answers what the CLI answers, for the same window.
    let since = doc["window"]["since"].as_str().unwrap();
    let until = doc["window"]["until"].as_str().unwrap();
    let (status, _, body) = common::get(&format!(
        "http://{}/api/repeats?since={since}&until={until}",
        proxy.admin
    ))
    .await;
    assert_eq!(status, 200);
    let api: Value = serde_json::from_slice(&body).unwrap();
    let cli: Value = serde_json::from_str(&run(&[
        "report",
        "--db",
        &db,
        "--repeats",
        "--since",
        since,
        "--until",
        until,
        "--format",
        "json",
    ]))
    .unwrap();
    assert_eq!(api, cli);
    let (status, _, body) =
        common::get(&format!("http://{}/api/repeats?colour=red", proxy.admin)).await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));

    // What is stored: fingerprints, never the values.
    let conn = proxy.ledger();
    let stored: i64 = conn
        .query_row("SELECT count(*) FROM identifiers", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stored, 5 + 6 + 1, "one per identifier of each billed call");
    drop(conn);
    let bytes = ledger_bytes(&proxy.db);
    for value in [
        "pat@acme.com",
        "sam@acme.com",
        "robin-roe",
        "new1@hooli.com",
        "globex",
    ] {
        assert!(
            memchr::memmem::find(&bytes, value.as_bytes()).is_none(),
            "{value} is in the ledger file"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fingerprints_off_nothing_is_kept_and_the_report_says_why() {
    let sim = SimServer::start(
        SimConfig {
            match_rate_pct: 100,
            rate_limit_minute: 0,
            ..Default::default()
        },
        None,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config_for(&sim.url(false), None);
    cfg.attribution.identifier_fingerprints = false;
    let proxy = Proxy::start(cfg, dir.path()).await;
    for table in ["A", "B"] {
        let c = call(
            &proxy,
            table,
            "POST",
            "/api/v1/people/match",
            person("x@y.com"),
        )
        .await;
        assert_eq!(c, 1000);
    }
    let n: i64 = proxy
        .ledger()
        .query_row("SELECT count(*) FROM identifiers", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
    let out = run(&[
        "report",
        "--db",
        proxy.db.to_str().unwrap(),
        "--repeats",
        "--format",
        "json",
    ]);
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["pairs"], json!([]));
    assert!(
        doc["notes"][0]
            .as_str()
            .unwrap()
            .contains("identifier_fingerprints is off"),
        "{doc:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn focus_and_calls_exports_add_up_to_the_ledger() {
    let sim = SimServer::start(
        SimConfig {
            match_rate_pct: 100,
            rate_limit_minute: 0,
            ..Default::default()
        },
        None,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(config_for(&sim.url(false), None), dir.path()).await;
    for i in 0..6 {
        call(
            &proxy,
            if i % 2 == 0 {
                "Inbound leads"
            } else {
                "ABM, accounts"
            },
            "POST",
            "/api/v1/people/match",
            person(&format!("p{i}@x.com")),
        )
        .await;
    }
    call(
        &proxy,
        "ABM, accounts",
        "POST",
        "/api/v1/mixed_companies/search",
        Some(json!({"q_organization_name": "acme", "page": 1})),
    )
    .await;
    let conn = proxy.ledger();
    let (ledger_calls, ledger_milli): (i64, i64) = conn
        .query_row("SELECT count(*), sum(credits_milli) FROM calls", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    drop(conn);
    let db = proxy.db.to_str().unwrap().to_owned();

    let focus = run(&[
        "report",
        "--db",
        &db,
        "--format",
        "focus",
        "--price-per-credit",
        "0.05",
        "--currency",
        "eur",
    ]);
    let mut lines = focus.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    for col in [
        "BilledCost",
        "BillingCurrency",
        "BillingPeriodStart",
        "BillingPeriodEnd",
        "ChargeCategory",
        "ChargeDescription",
        "ChargePeriodStart",
        "ChargePeriodEnd",
        "ConsumedQuantity",
        "ConsumedUnit",
        "EffectiveCost",
        "ProviderName",
        "PublisherName",
        "ServiceCategory",
        "ServiceName",
        "Tags",
    ] {
        assert!(header.contains(&col), "{col} missing from {header:?}");
    }
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let mut reader = Vec::new();
    for line in lines {
        reader.push(split_csv(line));
    }
    assert!(!reader.is_empty());
    let mut qty = 0.0;
    let mut tables = std::collections::BTreeSet::new();
    for r in &reader {
        let q: f64 = r[col("ConsumedQuantity")].parse().unwrap();
        let cost: f64 = r[col("BilledCost")].parse().unwrap();
        assert!((cost - q * 0.05).abs() < 1e-9, "{r:?}");
        assert_eq!(r[col("BillingCurrency")], "EUR");
        assert_eq!(r[col("ServiceName")], "Apollo.io");
        assert_eq!(r[col("ChargeCategory")], "Usage");
        assert_eq!(r[col("ConsumedUnit")], "Credits");
        let tags: Value = serde_json::from_str(&r[col("Tags")]).unwrap();
        tables.insert(tags["table"].as_str().unwrap().to_owned());
        assert_eq!(tags["workflow"], "enrich");
        qty += q;
    }
    assert!((qty * 1000.0 - ledger_milli as f64).abs() < 1e-6, "{focus}");
    assert_eq!(
        tables.into_iter().collect::<Vec<_>>(),
        ["ABM, accounts", "Inbound leads"]
    );

    // The raw calls of the window, one line each, credits adding up.
    let calls = run(&[
        "report", "--db", &db, "--calls", "--since", "1h", "--format", "csv",
    ]);
    let mut lines = calls.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(header[0], "request_id");
    let credits_col = header.iter().position(|h| *h == "credits").unwrap();
    let rows: Vec<Vec<String>> = lines.map(split_csv).collect();
    assert_eq!(rows.len() as i64, ledger_calls);
    let sum: f64 = rows
        .iter()
        .map(|r| r[credits_col].parse::<f64>().unwrap())
        .sum();
    assert!((sum * 1000.0 - ledger_milli as f64).abs() < 1e-6);
    assert!(calls.contains("\"ABM, accounts\""));

    // Focus is a spend export: with spikes it is refused, naming the flag.
    let out = Command::new(BIN)
        .args(["report", "--db", &db, "--spikes", "--format", "focus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("focus"));
}

/// Splits one CSV line (quotes honoured).
fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// The demo's month: 30 days backfilled with a burst hidden in one table and hour; the spike
/// it prints is that hour and table, and the spike rule run on its ledger agrees.
#[test]
fn the_demo_finds_its_hidden_burst_by_hour_and_table() {
    let dir = tempfile::tempdir().unwrap();
    let text = run(&[
        "demo",
        "--calls",
        "200",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        text.contains("not sent through the proxy") && text.contains("backfilled"),
        "the demo says how the history was made: {text}"
    );
    // "(the demo hid one: 2400 credits in table Event attendees from 2026-11-27T14:10:00Z, ...)"
    let hid = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("(the demo hid one: "))
        .unwrap_or_else(|| panic!("no hidden burst line: {text}"));
    let table = hid
        .split(" in table ")
        .nth(1)
        .and_then(|r| r.split(" from ").next())
        .unwrap();
    let at = hid
        .split(" from ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap();
    let hour = format!("{}:00:00Z", &at[..13]);
    let first_spike = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("spike: "))
        .unwrap_or_else(|| panic!("no spike printed: {text}"));
    assert!(
        first_spike.starts_with(&hour) && first_spike.contains(&format!("top table {table} with")),
        "biggest spike {first_spike:?}, hidden at {hour} in {table}"
    );

    // The spike rule on the demo's ledger, as a user would run it, finds the same hour and table.
    let db = dir.path().join("ledger.db");
    let doc: Value = serde_json::from_str(&run(&[
        "report",
        "--db",
        db.to_str().unwrap(),
        "--spikes",
        "--since",
        "31d",
        "--format",
        "json",
    ]))
    .unwrap();
    let spike = doc["spikes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["start"] == hour.as_str())
        .unwrap_or_else(|| panic!("no spike at {hour}: {doc:#}"));
    assert_eq!(spike["top"][0]["key"], table, "{spike:#}");
    // And the ledger holds that spend in that table and hour.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let start_ms = spike["start_ms"].as_i64().unwrap();
    let in_hour: i64 = conn
        .query_row(
            "SELECT sum(credits_milli) FROM calls WHERE table_name = ?1
               AND started_at >= ?2 AND started_at < ?2 + 3600000",
            rusqlite::params![table, start_ms],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        in_hour >= 2_400_000,
        "{in_hour} milli-credits in {table} at {hour}"
    );
    // The month's waste is told too.
    assert!(text.contains("re-enriched"), "{text}");
}

/// `demo --hold` prints the console's address and keeps serving until stopped.
#[test]
fn demo_hold_prints_the_console_url_and_keeps_serving() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["demo", "--calls", "40", "--hold", "--dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut console = None;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(url) = line.strip_prefix("Console: ") {
            console = Some(url.split_whitespace().next().unwrap().to_owned());
        }
        if line.starts_with("Serving:") {
            break;
        }
    }
    let console = console.expect("a Console: line before Serving:");
    let rest = console.strip_prefix("http://127.0.0.1:").unwrap();
    assert!(rest.ends_with("/ui/"), "{console}");
    let port: u16 = rest.trim_end_matches("/ui/").parse().unwrap();
    // Still serving after the report: the admin listener answers.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (status, _) = common::binary::http_get(port, "/healthz").unwrap();
    assert_eq!(status, 200);
    child.kill().unwrap();
    child.wait().unwrap();
}
