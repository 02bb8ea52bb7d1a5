#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Budgets and holds end to end: real sockets, the simulator (which bills deterministically and
//! says what it billed), a real ledger, restarts. Each test asserts what a user would notice:
//! what the ledger (and Apollo) spent against the limit, which calls were refused and how.

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use creditmeter::config::Config;
use creditmeter_sim::SimConfig;
use http_body_util::Full;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn with_budgets(mut c: Config, toml: &str) -> Config {
    let b = Config::from_toml(toml).unwrap();
    c.guard = b.guard;
    c.budget = b.budget;
    // Bursts here are 300 concurrent calls waiting on budgets: room for all of them in flight
    // (proxy.max_in_flight is tested in tests/it/edge.rs).
    c.proxy.max_in_flight = 1024;
    c.validate().unwrap();
    c
}

/// The variable holding the key creditmeter polls phone-reveal results with.
const SETTLE_KEY_ENV: &str = "CREDITMETER_TEST_BUDGETS_SETTLE_KEY";

/// Turns settlement on: deferred charges (phone reveals) stay reserved until their job's
/// result is learned, polled from `first_poll` after the call.
fn settling(mut c: Config, first_poll: Duration) -> Config {
    std::env::set_var(SETTLE_KEY_ENV, "budgets-settle-key");
    c.settle.api_key_env = SETTLE_KEY_ENV.into();
    c.settle.first_poll = creditmeter::config::HumanDuration(first_poll);
    c
}

/// A simulator whose phone-reveal jobs end after `job_delay`.
async fn sim_with_jobs(match_rate_pct: u8, job_delay: Duration) -> SimServer {
    SimServer::start(
        SimConfig {
            match_rate_pct,
            rate_limit_minute: 0,
            job_delay,
            ..Default::default()
        },
        None,
    )
    .await
}

/// Waits (up to 20 s) until no deferred charge is pending in the ledger.
async fn wait_settled(proxy: &Proxy) {
    for _ in 0..400 {
        let pending = ledger_count(
            proxy,
            "deferred IS NOT NULL AND request_id NOT IN (SELECT settles FROM calls WHERE settles IS NOT NULL)",
        );
        if pending == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("deferred charges still pending after 20 s");
}

/// A simulator that matches every identifier (so a call costs exactly its worst case), or
/// `match_rate_pct` of them, with no rate limit.
async fn sim(match_rate_pct: u8) -> SimServer {
    SimServer::start(
        SimConfig {
            match_rate_pct,
            rate_limit_minute: 0,
            ..Default::default()
        },
        None,
    )
    .await
}

fn people_match(
    proxy: &Proxy,
    table: &str,
    email: &str,
    reveal: bool,
) -> http::Request<Full<Bytes>> {
    // A phone reveal is asynchronous: Apollo wants a webhook_url or poll_only.
    let body =
        json!({"email": email, "reveal_phone_number": reveal, "poll_only": reveal}).to_string();
    http::Request::post(proxy.url("/api/v1/people/match"))
        .header("x-api-key", "test-key")
        .header("x-meter-table", table)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn bulk_match(proxy: &Proxy, table: &str, n: usize, tag: &str) -> http::Request<Full<Bytes>> {
    let details: Vec<Value> = (0..n)
        .map(|i| json!({"email": format!("{tag}-{i}@bulk{i}.example.com")}))
        .collect();
    let body =
        json!({"details": details, "reveal_phone_number": true, "poll_only": true}).to_string();
    http::Request::post(proxy.url("/api/v1/people/bulk_match"))
        .header("x-api-key", "test-key")
        .header("x-meter-table", table)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

async fn api(
    proxy: &Proxy,
    method: http::Method,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (http::StatusCode, Value) {
    // Every mutation is JSON (the admin listener answers others with a 415).
    let json = method != http::Method::GET;
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", proxy.admin));
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if json {
        b = b.header("content-type", "application/json");
    }
    let body = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
    let (status, _, bytes) = send(&client(), b.body(Full::new(body)).unwrap()).await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// (spent, reserved, calls in flight) of a budget's `all` limit, from GET /api/budgets.
async fn usage(proxy: &Proxy, name: &str) -> (f64, f64, u64) {
    let (status, v) = api(proxy, http::Method::GET, "/api/budgets", None, None).await;
    assert_eq!(status, 200, "{v}");
    let b = v["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no budget {name}: {v}"));
    (
        b["limits"][0]["spent"].as_f64().unwrap(),
        b["limits"][0]["reserved"].as_f64().unwrap(),
        v["calls_in_flight"].as_u64().unwrap(),
    )
}

fn ledger_milli(proxy: &Proxy, filter: &str) -> i64 {
    proxy
        .ledger()
        .query_row(
            &format!("SELECT COALESCE(sum(credits_milli), 0) FROM calls WHERE {filter}"),
            [],
            |r| r.get(0),
        )
        .unwrap()
}

fn ledger_count(proxy: &Proxy, filter: &str) -> i64 {
    proxy
        .ledger()
        .query_row(
            &format!("SELECT count(*) FROM calls WHERE {filter}"),
            [],
            |r| r.get(0),
        )
        .unwrap()
}

/// Sends all requests at once; returns the statuses in order.
async fn burst(reqs: Vec<http::Request<Full<Bytes>>>) -> Vec<http::StatusCode> {
    let c = client();
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|r| {
            let c = c.clone();
            tokio::spawn(async move { send(&c, r).await.0 })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

const NESTED: &str = r#"
[[budget]]
name = "everything"
scope = "global"
limit = 70
window = "month"

[[budget]]
name = "table-a"
scope = { table = "A" }
limit = 30
window = "month"

[[budget]]
name = "table-b"
scope = { table = "B*" }
limit = 25
window = "month"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_burst_spends_exactly_up_to_the_limits_and_no_further() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(100).await;
    let proxy = Proxy::start(
        with_budgets(config_for(&sim.url(false), None), NESTED),
        dir.path(),
    )
    .await;
    // 300 calls at once from three tables, each costing exactly 1 credit (every email matches).
    let mut reqs = Vec::new();
    for i in 0..100 {
        for table in ["A", "Bravo", "C"] {
            reqs.push(people_match(
                &proxy,
                table,
                &format!("p{i}@{table}.example.com"),
                false,
            ));
        }
    }
    let statuses = burst(reqs).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(ok + refused, 300, "{statuses:?}");
    // Every call costs its reservation, so the global budget fills exactly: rejections begin
    // at the 71st credit, and the ledger, Apollo and the budget agree.
    assert_eq!(ok, 70);
    assert_eq!(ledger_milli(&proxy, "1"), 70_000);
    assert!(ledger_milli(&proxy, "table_name = 'A'") <= 30_000);
    assert!(ledger_milli(&proxy, "table_name = 'Bravo'") <= 25_000);
    assert_eq!(sim.sim.billed().lead_milli, 70_000, "what Apollo billed");
    assert_eq!(
        sim.sim.billed().calls,
        70,
        "refused calls never went upstream"
    );
    assert_eq!(
        ledger_count(&proxy, "outcome = 'rejected_budget' AND credits_milli = 0"),
        230
    );
    assert_eq!(usage(&proxy, "everything").await, (70.0, 0.0, 0));
    let m = proxy.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_budget_spent_credits",
            &[("budget", "everything")]
        ),
        70.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_budget_limit_credits",
            &[("budget", "table-a")]
        ),
        30.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_budget_reserved_credits",
            &[("budget", "everything")]
        ),
        0.0
    );
    assert!(
        metric_sum(
            &m,
            "creditmeter_budget_rejections_total",
            &[("budget", "everything")]
        ) >= 1.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_requests_total",
            &[("outcome", "rejected_budget")]
        ),
        230.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_misses_in_a_burst_refusals_still_begin_at_the_limit_not_before() {
    // 30% of calls match nothing and cost 0, less than the 1 credit each reserves. Calls that
    // do not fit only because of those reservations wait for them to settle, so no call is
    // refused while the spend is below the limit: the burst spends the budget exactly.
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(70).await;
    let budgets = r#"
[[budget]]
name = "attributed"
scope = { table = "*" }
limit = 50
window = "month"
"#;
    let proxy = Proxy::start(
        with_budgets(config_for(&sim.url(false), None), budgets),
        dir.path(),
    )
    .await;
    let reqs = (0..300)
        .map(|i| {
            people_match(
                &proxy,
                ["A", "B", "C"][i % 3],
                &format!("x{i}@m{i}.example.com"),
                false,
            )
        })
        .collect();
    let statuses = burst(reqs).await;
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count() + refused,
        300
    );
    assert!(refused > 0);
    assert_eq!(
        ledger_milli(&proxy, "1"),
        50_000,
        "the whole budget, and not a credit more"
    );
    let billed = sim.sim.billed();
    assert_eq!(billed.lead_milli, 50_000);
    assert_eq!(usage(&proxy, "attributed").await, (50.0, 0.0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_burst_with_misses_and_bulk_calls_never_crosses_a_limit() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim_with_jobs(70, Duration::from_millis(200)).await;
    let budgets = r#"
[[budget]]
name = "everything"
scope = "global"
limit = 150
window = "rolling 24h"

[[budget]]
name = "mobile"
scope = { table = "M*" }
limit = { direct_dial = 40 }
window = "rolling 24h"
"#;
    let proxy = Proxy::start(
        settling(
            with_budgets(config_for(&sim.url(false), None), budgets),
            Duration::from_millis(100),
        ),
        dir.path(),
    )
    .await;
    let mut reqs = Vec::new();
    for i in 0..60 {
        reqs.push(people_match(
            &proxy,
            "Mobile",
            &format!("m{i}@x{i}.example.com"),
            true,
        ));
        reqs.push(people_match(
            &proxy,
            "Leads",
            &format!("l{i}@y{i}.example.com"),
            false,
        ));
        if i % 6 == 0 {
            reqs.push(bulk_match(&proxy, "Bulk", 3, &format!("b{i}")));
        }
    }
    let statuses = burst(reqs).await;
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().any(|s| *s == 429),
        "the budgets should run out mid-burst"
    );
    // Phone reveals bill when their job ends: once every one has settled, the ledger holds
    // what Apollo billed.
    wait_settled(&proxy).await;
    let total = ledger_milli(&proxy, "1");
    let dd: i64 = proxy
        .ledger()
        .query_row(
            "SELECT COALESCE(sum(direct_dial_milli), 0) FROM calls WHERE table_name = 'Mobile'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(total <= 150_000, "ledger total {total} past the limit");
    assert!(dd <= 40_000, "direct dials {dd} past the limit");
    let billed = sim.sim.billed();
    assert_eq!(
        billed.lead_milli + billed.direct_dial_milli + billed.export_milli,
        total
    );
    let (spent, reserved, in_flight) = usage(&proxy, "everything").await;
    assert_eq!(
        (spent, reserved, in_flight),
        (total as f64 / 1000.0, 0.0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_past_the_limit_gets_a_429_that_explains_itself() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(100).await;
    let budgets = r#"
[guard]
time_zone = "America/New_York"

[[budget]]
name = "inbound-daily"
scope = { table = "Inbound*" }
limit = 5
window = "day"
"#;
    let proxy = Proxy::start(
        with_budgets(config_for(&sim.url(false), None), budgets),
        dir.path(),
    )
    .await;
    let c = client();
    for i in 0..5 {
        let (status, _, _) = send(
            &c,
            people_match(&proxy, "Inbound leads", &format!("a{i}@x.com"), false),
        )
        .await;
        assert_eq!(status, 200, "call {i}");
    }
    let (status, h, body) = send(&c, people_match(&proxy, "Inbound leads", "z@x.com", false)).await;
    assert_eq!(status, 429);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "budget_exhausted");
    assert_eq!(v["budget"], "inbound-daily");
    assert_eq!(v["window"], "day");
    assert_eq!(v["spent"], 5.0);
    assert_eq!(v["limit"], 5.0);
    assert_eq!(v["requested"], 1.0);
    let resets = v["resets_at"].as_str().unwrap();
    assert!(
        resets.ends_with("T00:00:00-04:00") || resets.ends_with("T00:00:00-05:00"),
        "{resets}"
    );
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=25 * 3600).contains(&retry), "{retry}");
    assert_eq!(v["retry_after_seconds"], retry);
    let rid = h["x-meter-request-id"].to_str().unwrap();
    let (outcome, credits, error): (String, i64, String) = proxy
        .ledger()
        .query_row(
            "SELECT outcome, credits_milli, error FROM calls WHERE request_id = ?1",
            [rid],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((outcome.as_str(), credits), ("rejected_budget", 0));
    assert!(error.contains("inbound-daily"), "{error}");
    // Other tables are not in the budget's scope; a bulk call whose worst case alone exceeds
    // the limit is told it can never fit (no Retry-After).
    assert_eq!(
        send(&c, people_match(&proxy, "Outbound", "o@x.com", false))
            .await
            .0,
        200
    );
    let (status, h, body) = send(&c, bulk_match(&proxy, "Inbound", 10, "big")).await;
    assert_eq!(status, 429);
    assert!(h.get("retry-after").is_none());
    assert!(String::from_utf8_lossy(&body).contains("never fit"));
    assert_eq!(sim.sim.billed().calls, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_budgets_report_but_never_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(100).await;
    let budgets = r#"
[[budget]]
name = "watch"
scope = { workflow = "enrich" }
limit = 2
window = "rolling 1h"
action = "alert"
warn_at = 50
"#;
    let proxy = Proxy::start(
        with_budgets(config_for(&sim.url(false), None), budgets),
        dir.path(),
    )
    .await;
    let c = client();
    for i in 0..5 {
        let mut req = people_match(&proxy, "T", &format!("w{i}@x.com"), false);
        req.headers_mut()
            .insert("x-meter-workflow", "enrich".parse().unwrap());
        assert_eq!(send(&c, req).await.0, 200);
    }
    assert_eq!(usage(&proxy, "watch").await, (5.0, 0.0, 0));
    let m = proxy.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_budget_over_limit_calls_total",
            &[("budget", "watch")]
        ),
        3.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_budget_rejections_total",
            &[("budget", "watch")]
        ),
        0.0
    );
    assert_eq!(
        metric_sum(&m, "creditmeter_budget_warning", &[("budget", "watch")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_window_resumes_the_spend_from_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    // Phone-reveal jobs that outlast the test: their worst case stays reserved throughout.
    let sim = sim_with_jobs(100, Duration::from_secs(3600)).await;
    let budgets = r#"
[[budget]]
name = "weekly"
scope = { table = "T" }
limit = 10
window = "rolling 7d"

[[budget]]
name = "monthly-mobile"
scope = "global"
limit = { direct_dial = 16 }
window = "month"
"#;
    let config = settling(
        with_budgets(config_for(&sim.url(false), None), budgets),
        Duration::from_secs(600),
    );
    let mut proxy = Proxy::start(config.clone(), dir.path()).await;
    let c = client();
    for i in 0..6 {
        assert_eq!(
            send(&c, people_match(&proxy, "T", &format!("r{i}@x.com"), false))
                .await
                .0,
            200
        );
    }
    assert_eq!(
        send(&c, people_match(&proxy, "U", "dd1@x.com", true))
            .await
            .0,
        200
    );
    proxy.shutdown().await;

    let proxy = Proxy::start(config, dir.path()).await;
    // The pending phone reveal is back in flight (reserved in monthly-mobile, not weekly).
    assert_eq!(usage(&proxy, "weekly").await, (6.0, 0.0, 1));
    assert_eq!(usage(&proxy, "monthly-mobile").await.1, 8.0);
    let mut statuses = Vec::new();
    for i in 6..12 {
        statuses.push(
            send(&c, people_match(&proxy, "T", &format!("r{i}@x.com"), false))
                .await
                .0
                .as_u16(),
        );
    }
    assert_eq!(statuses, vec![200, 200, 200, 200, 429, 429]);
    assert_eq!(ledger_milli(&proxy, "table_name = 'T'"), 10_000);
    // One more phone reveal fits the 16 direct dials (8 still pending from before the restart,
    // reserved again at start-up); a second not.
    assert_eq!(
        send(&c, people_match(&proxy, "U", "dd2@x.com", true))
            .await
            .0,
        200
    );
    assert_eq!(
        send(&c, people_match(&proxy, "U", "dd3@x.com", true))
            .await
            .0,
        429
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_stop_calls_at_once_and_persist_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(100).await;
    let mut config = config_for(&sim.url(false), None);
    config.admin.token_env = "CREDITMETER_TEST_BUDGETS_HOLD_TOKEN".into();
    std::env::set_var("CREDITMETER_TEST_BUDGETS_HOLD_TOKEN", "s3cret");
    let token = Some("s3cret");
    let mut proxy = Proxy::start(config.clone(), dir.path()).await;
    let c = client();
    let hold = json!({"scope": {"table": "Runaway*"}, "reason": "looping column"});
    let (status, _) = api(
        &proxy,
        http::Method::POST,
        "/api/holds",
        Some(hold.clone()),
        None,
    )
    .await;
    assert_eq!(status, 401, "holds need the admin token");
    let (status, v) = api(
        &proxy,
        http::Method::POST,
        "/api/holds",
        Some(json!({"reason": "x"})),
        token,
    )
    .await;
    assert_eq!(status, 400, "a hold must name its scope: {v}");
    let (status, v) = api(
        &proxy,
        http::Method::POST,
        "/api/holds",
        Some(hold.clone()),
        token,
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let id = v["hold"]["id"].as_i64().unwrap();
    let (status, _) = api(&proxy, http::Method::POST, "/api/holds", Some(hold), token).await;
    assert_eq!(status, 200, "the same hold again is not a second hold");

    let before = sim.sim.billed().calls;
    let (status, h, body) = send(&c, people_match(&proxy, "Runaway table", "h@x.com", false)).await;
    assert_eq!(status, 503);
    assert!(h.get("retry-after").is_none());
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "held");
    assert_eq!(v["hold"]["id"], id);
    assert!(v["message"].as_str().unwrap().contains("looping column"));
    assert_eq!(
        send(&c, people_match(&proxy, "Other", "o@x.com", false))
            .await
            .0,
        200
    );
    assert_eq!(
        sim.sim.billed().calls,
        before + 1,
        "the held call never went upstream"
    );

    proxy.shutdown().await;
    let proxy = Proxy::start(config, dir.path()).await;
    assert_eq!(
        send(&c, people_match(&proxy, "Runaway table", "h2@x.com", false))
            .await
            .0,
        503
    );
    let (status, v) = api(&proxy, http::Method::GET, "/api/budgets", None, token).await;
    assert_eq!(status, 200);
    assert_eq!(v["holds"][0]["scope"]["table"], "Runaway*");
    let (status, _) = api(
        &proxy,
        http::Method::DELETE,
        &format!("/api/holds/{id}"),
        None,
        token,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = api(
        &proxy,
        http::Method::DELETE,
        &format!("/api/holds/{id}"),
        None,
        token,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(
        send(&c, people_match(&proxy, "Runaway table", "h3@x.com", false))
            .await
            .0,
        200
    );
    // A global hold stops everything, attributed or not.
    let (status, _) = api(
        &proxy,
        http::Method::POST,
        "/api/holds",
        Some(json!({"scope": "global"})),
        token,
    )
    .await;
    assert_eq!(status, 201);
    let req = http::Request::get(proxy.url("/api/v1/organizations/enrich?domain=x.com"))
        .header("x-api-key", "k")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&c, req).await.0, 503);
    assert_eq!(ledger_count(&proxy, "outcome = 'rejected_hold'"), 3);
    let m = proxy.metrics().await;
    assert_eq!(metric_sum(&m, "creditmeter_holds_active", &[]), 1.0);
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_hold_rejections_total",
            &[("scope", "global")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_releases_what_a_cheaper_call_did_not_spend() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim_with_jobs(50, Duration::from_secs(3600)).await;
    let budgets = r#"
[[budget]]
name = "b"
scope = "global"
limit = 90
window = "rolling 24h"
"#;
    let proxy = Proxy::start(
        settling(
            with_budgets(config_for(&sim.url(false), None), budgets),
            Duration::from_secs(600),
        ),
        dir.path(),
    )
    .await;
    let c = client();
    // 10 details with phone reveal: 10 x 9 = 90 reserved, the whole budget.
    let (status, h, _) = send(&c, bulk_match(&proxy, "T", 10, "half")).await;
    assert_eq!(status, 200);
    let billed: i64 = h["x-sim-billed-milli"].to_str().unwrap().parse().unwrap();
    assert!(
        billed < 90_000,
        "the sim matched only some details: {billed}"
    );
    // The matched people's phone reveals are still pending: 8 each stays reserved; the rest
    // of the 90 (the unmatched details) was released.
    let matched = billed / 1000;
    assert_eq!(
        usage(&proxy, "b").await,
        (billed as f64 / 1000.0, 8.0 * matched as f64, 1)
    );
    assert_eq!(ledger_milli(&proxy, "1"), billed);
    // The unspent part was released: a 9-credit call fits again, another 90 does not.
    assert_eq!(
        send(&c, people_match(&proxy, "T", "one@x.com", true))
            .await
            .0,
        200
    );
    assert_eq!(send(&c, bulk_match(&proxy, "T", 10, "again")).await.0, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_when_upstream_fails_counts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = gone.local_addr().unwrap();
    drop(gone);
    let budgets = r#"
[[budget]]
name = "b"
scope = "global"
limit = 9
window = "rolling 1h"
"#;
    let proxy = Proxy::start(
        with_budgets(config_for(&format!("http://{addr}"), None), budgets),
        dir.path(),
    )
    .await;
    let c = client();
    for i in 0..3 {
        // Each reserves the whole budget; a leaked reservation would refuse the next one.
        let (status, _, _) =
            send(&c, people_match(&proxy, "T", &format!("f{i}@x.com"), true)).await;
        assert_eq!(status, 502, "call {i}");
    }
    assert_eq!(usage(&proxy, "b").await, (0.0, 0.0, 0));
    assert_eq!(ledger_count(&proxy, "outcome = 'upstream_error'"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_when_the_caller_disconnects_counts_what_apollo_billed() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let budgets = r#"
[[budget]]
name = "b"
scope = "global"
limit = 5
window = "rolling 1h"
"#;
    let proxy = Proxy::start(
        with_budgets(config_for(&up.url(), None), budgets),
        dir.path(),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST /api/v1/people/match?script=slow HTTP/1.1\r\nHost: x\r\nX-Api-Key: k\r\nX-Meter-Table: leaver\r\nContent-Length: 2\r\n\r\n{}")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 8192];
    while !String::from_utf8_lossy(&got).contains("Slow Person") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    // Mid-body: the call's worst case (1 credit) is reserved.
    assert_eq!(usage(&proxy, "b").await, (0.0, 1.0, 1));
    drop(s);
    // Upstream finishes 400 ms later; the drained call settles to what it billed.
    let mut state = (0.0, 0.0, 0);
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        state = usage(&proxy, "b").await;
        if state.2 == 0 {
            break;
        }
    }
    assert_eq!(state, (1.0, 0.0, 0));
    assert_eq!(
        ledger_count(
            &proxy,
            "outcome = 'client_cancelled' AND credits_milli = 1000"
        ),
        1
    );
}
