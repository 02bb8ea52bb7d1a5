#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Deferred charges end to end: phone reveals and waterfalls billed when Apollo's job ends,
//! learned from `webhook_result` (creditmeter's own poll or a caller's), recorded once as a
//! settlement row, counted in the metrics, and kept reserved in budgets until then.
//!
//! The upstream is a small scripted Apollo ([`Jobs`]) that answers as Apollo documents
//! (docs.apollo.io/reference/poll-webhook-result): jobs that end after a delay, a mobile found
//! for only some people, `404 result_pending` with `retry_after_seconds`, the nested 200
//! payload, `410`, `429` on demand. It knows what it billed per job, so each test checks the
//! ledger against it to the milli-credit.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{client, config_for, metric_sum, send, HttpClient, Proxy};
use creditmeter::config::{Config, HumanDuration};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// The variable the tests put the polling key in (shared: every test sets the same value).
const KEY_ENV: &str = "CREDITMETER_TEST_SETTLE_KEY";
const KEY: &str = "settle-test-master-key";
/// A variable no test sets: settlement off.
const UNSET_ENV: &str = "CREDITMETER_TEST_SETTLE_KEY_UNSET";

fn set_key() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| std::env::set_var(KEY_ENV, KEY));
}

// --- the scripted Apollo -------------------------------------------------------------------

#[derive(Default)]
struct Job {
    ends: Option<Instant>,
    /// Milli-credits the job bills when it ends, by (lead, direct_dial).
    lead_milli: i64,
    direct_dial_milli: i64,
    people: Vec<Value>,
}

#[derive(Default)]
struct State {
    next: i64,
    jobs: HashMap<String, Job>,
    /// How long a job runs; `None`: forever.
    job_delay: Option<Duration>,
    /// The next N result polls answer 429.
    rate_limit: usize,
    /// Finished results answer 410 (aged out).
    expired: bool,
    /// Results leave `credits_consumed` out.
    hide_credits: bool,
    /// Result polls seen, with the key they carried.
    polls: Vec<Option<String>>,
    rate_limited: usize,
}

#[derive(Clone)]
struct Jobs {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<State>>,
}

impl Jobs {
    async fn start(job_delay: Option<Duration>) -> Jobs {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            next: -4200,
            job_delay,
            ..State::default()
        }));
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let st = st.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body.collect().await.unwrap().to_bytes();
                                Ok::<_, std::convert::Infallible>(answer(&st, &parts, &body))
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Jobs { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap());
    }

    /// Makes every job end `after` from now.
    fn end_all_in(&self, after: Duration) {
        let mut st = self.state.lock().unwrap();
        for job in st.jobs.values_mut() {
            job.ends = Some(Instant::now() + after);
        }
    }

    /// What job `id` billed so far (0 until it ends), milli.
    fn job_billed(&self, id: &str) -> i64 {
        let st = self.state.lock().unwrap();
        let Some(job) = st.jobs.get(id) else {
            return 0; // a call that started no job
        };
        match job.ends {
            Some(t) if Instant::now() >= t => job.lead_milli + job.direct_dial_milli,
            _ => 0,
        }
    }
}

fn reply(status: u16, headers: &[(&str, String)], body: Value) -> http::Response<Full<Bytes>> {
    let mut b = http::Response::builder()
        .status(status)
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

fn truthy(v: Option<&Value>) -> bool {
    matches!(v, Some(Value::Bool(true)))
}

/// A person for an email: `nobody@…` matches no one; `mobile…@…` has a mobile number.
fn person_for(email: &str) -> Option<(Value, bool)> {
    if email.starts_with("nobody") {
        return None;
    }
    let id = format!("p-{email}");
    Some((
        json!({"id": id, "email": email}),
        email.starts_with("mobile"),
    ))
}

fn answer(
    st: &Mutex<State>,
    parts: &http::request::Parts,
    body: &[u8],
) -> http::Response<Full<Bytes>> {
    let path = parts.uri.path();
    if let Some(id) = path.strip_prefix("/api/v1/webhook_result/") {
        return poll(st, id, parts);
    }
    let params: Value = serde_json::from_slice(body).unwrap_or(json!({}));
    let details: Vec<String> = match path {
        "/api/v1/people/match" => vec![params["email"].as_str().unwrap_or("").to_owned()],
        "/api/v1/people/bulk_match" => params["details"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["email"].as_str().unwrap_or("").to_owned())
            .collect(),
        _ => return reply(404, &[], json!({"error": "no such route"})),
    };
    let found: Vec<Option<(Value, bool)>> = details.iter().map(|e| person_for(e)).collect();
    let matched: Vec<&(Value, bool)> = found.iter().flatten().collect();
    let reveal = truthy(params.get("reveal_phone_number"));
    let wf_email = truthy(params.get("run_waterfall_email"));
    let wf_phone = truthy(params.get("run_waterfall_phone"));
    let sync_milli = 1000 * matched.len() as i64;
    let mut st = st.lock().unwrap();
    st.next -= 7;
    let request_id = st.next;
    if (reveal || wf_email || wf_phone) && !matched.is_empty() {
        // Apollo's job: +8 per mobile found; waterfall lookups bill found or not.
        let mobiles = matched.iter().filter(|(_, m)| *m).count() as i64;
        let n = matched.len() as i64;
        let job = Job {
            ends: st.job_delay.map(|d| Instant::now() + d),
            lead_milli: if wf_email { 500 * n } else { 0 },
            direct_dial_milli: if reveal { 8000 * mobiles } else { 0 }
                + if wf_phone { 2250 * n } else { 0 },
            people: matched
                .iter()
                .map(|(p, mobile)| {
                    let mut numbers =
                        vec![json!({"sanitized_number": "+15550100", "type_cd": "work_hq"})];
                    if *mobile {
                        numbers.push(json!({"sanitized_number": "+15550199", "type_cd": "mobile"}));
                    }
                    json!({"id": p["id"], "status": "success", "phone_numbers": numbers})
                })
                .collect(),
        };
        st.jobs.insert(request_id.to_string(), job);
    }
    let billed = [("x-test-billed-milli", sync_milli.to_string())];
    if path == "/api/v1/people/match" {
        let person = found[0]
            .as_ref()
            .map(|(p, _)| p.clone())
            .unwrap_or(Value::Null);
        return reply(
            200,
            &billed,
            json!({"person": person, "request_id": request_id}),
        );
    }
    let matches: Vec<Value> = found
        .iter()
        .map(|f| f.as_ref().map(|(p, _)| p.clone()).unwrap_or(Value::Null))
        .collect();
    let mut answer = json!({"status": "success", "matches": matches, "request_id": request_id});
    if !(wf_email || wf_phone) {
        answer["credits_consumed"] = json!(sync_milli as f64 / 1000.0);
    }
    reply(200, &billed, answer)
}

fn poll(st: &Mutex<State>, id: &str, parts: &http::request::Parts) -> http::Response<Full<Bytes>> {
    let mut st = st.lock().unwrap();
    let key = parts
        .headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    st.polls.push(key);
    if st.rate_limit > 0 {
        st.rate_limit -= 1;
        st.rate_limited += 1;
        return reply(
            429,
            &[("retry-after", "1".to_owned())],
            json!({"message": "The maximum number of api calls allowed for api/v1/webhook_result is 5 times per minute."}),
        );
    }
    if id.parse::<i64>().is_err() {
        return reply(400, &[], json!({"error_code": "invalid_request_id"}));
    }
    let (expired, hide) = (st.expired, st.hide_credits);
    let Some(job) = st.jobs.get(id) else {
        return reply(404, &[], json!({"error_code": "request_id_unknown"}));
    };
    match job.ends {
        Some(t) if Instant::now() >= t => {
            if expired {
                return reply(410, &[], json!({"error_code": "request_id_expired"}));
            }
            let mut result = json!({"status": "success", "people": job.people});
            if !hide {
                result["credits_consumed"] =
                    json!((job.lead_milli + job.direct_dial_milli) as f64 / 1000.0);
            }
            reply(
                200,
                &[],
                json!({"request_id": id, "webhook_status": "success", "request_type": "phone",
                       "last_dispatched_at": null, "failure_reason": null, "webhook_result": result}),
            )
        }
        _ => reply(
            404,
            &[],
            json!({"error_code": "result_pending", "retry_after_seconds": 1}),
        ),
    }
}

// --- helpers ---------------------------------------------------------------------------------

fn config(jobs: &Jobs, on: bool) -> Config {
    set_key();
    let mut c = config_for(&jobs.url(), None);
    c.settle.api_key_env = if on { KEY_ENV } else { UNSET_ENV }.into();
    c.settle.first_poll = HumanDuration(Duration::from_millis(100));
    c.settle.max_wait = HumanDuration(Duration::from_secs(120));
    c
}

/// What a test sent and what the scripted Apollo billed for it, per table.
#[derive(Default)]
struct Truth {
    /// table -> (sync milli, job ids)
    calls: BTreeMap<String, (i64, Vec<String>)>,
}

impl Truth {
    fn billed(&self, jobs: &Jobs) -> BTreeMap<String, i64> {
        self.calls
            .iter()
            .map(|(t, (sync, ids))| {
                let later: i64 = ids.iter().map(|id| jobs.job_billed(id)).sum();
                (t.clone(), sync + later)
            })
            .collect()
    }
}

async fn enrich(
    c: &HttpClient,
    proxy: &Proxy,
    path: &str,
    table: &str,
    body: Value,
    truth: &mut Truth,
) -> (http::StatusCode, Value) {
    let req = http::Request::post(proxy.url(path))
        .header("content-type", "application/json")
        .header("x-meter-table", table)
        .header("x-api-key", "caller-key")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let (status, headers, body) = send(c, req).await;
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if status == 200 {
        let sync: i64 = headers["x-test-billed-milli"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let entry = truth.calls.entry(table.to_owned()).or_default();
        entry.0 += sync;
        entry.1.push(body["request_id"].to_string());
    }
    (status, body)
}

fn reveal(email: &str) -> Value {
    json!({"email": email, "reveal_phone_number": true, "poll_only": true})
}

/// Deferred charges with no settlement row.
fn pending(conn: &rusqlite::Connection) -> i64 {
    conn.query_row(
        "SELECT count(*) FROM calls c WHERE deferred IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM calls s WHERE s.settles = c.request_id)",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

async fn wait_settled(proxy: &Proxy, within: Duration) {
    let conn = proxy.ledger();
    let deadline = Instant::now() + within;
    while pending(&conn) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} charges still pending after {within:?}",
            pending(&conn)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Settlement rows: (settles, credits_milli, direct_dial_milli, credit_source, error).
fn settlements(conn: &rusqlite::Connection) -> Vec<(String, i64, i64, String, Option<String>)> {
    let mut stmt = conn
        .prepare(
            "SELECT settles, credits_milli, direct_dial_milli, credit_source, error FROM calls
              WHERE outcome = 'settlement' ORDER BY started_at, settles",
        )
        .unwrap();
    stmt.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// The ledger's credits and the metric's, per table (creditmeter's own free polls left out).
async fn ledger_and_metrics(proxy: &Proxy) -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
    let mut ledger = common::ledger_by_table(&proxy.ledger());
    ledger.retain(|t, _| t != "_creditmeter");
    let text = proxy.metrics().await;
    let metrics = ledger
        .keys()
        .map(|t| {
            let credits = metric_sum(&text, "creditmeter_credits_total", &[("table", t)]);
            (t.clone(), (credits * 1000.0).round() as i64)
        })
        .collect();
    (ledger, metrics)
}

// --- tests -----------------------------------------------------------------------------------

#[tokio::test]
async fn a_phone_reveal_bills_only_found_mobiles_when_the_job_ends() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::start(Some(Duration::from_millis(300))).await;
    let mut proxy = Proxy::start(config(&jobs, true), dir.path()).await;
    let c = client();
    let mut truth = Truth::default();
    for (table, email) in [
        ("phones", "mobile-ada@x.com"),
        ("phones", "bob@x.com"),
        ("bulk", ""),
    ] {
        if table == "bulk" {
            let body = json!({"details": [{"email": "mobile-c@x.com"}, {"email": "nobody@x.com"},
                                          {"email": "mobile-d@x.com"}, {"email": "e@x.com"}],
                              "reveal_phone_number": true, "poll_only": true});
            enrich(
                &c,
                &proxy,
                "/api/v1/people/bulk_match",
                table,
                body,
                &mut truth,
            )
            .await;
        } else {
            enrich(
                &c,
                &proxy,
                "/api/v1/people/match",
                table,
                reveal(email),
                &mut truth,
            )
            .await;
        }
    }
    // At once: the answers' part only, and the worst case pending.
    let conn = proxy.ledger();
    let row: (i64, i64, String) = conn
        .query_row(
            "SELECT credits_milli, deferred_milli, deferred FROM calls WHERE table_name = 'bulk'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((row.0, row.1), (3000, 24_000), "{row:?}");
    let d: Value = serde_json::from_str(&row.2).unwrap();
    assert_eq!(
        d["worst"],
        json!({"lead": 0, "direct_dial": 24000, "export": 0})
    );
    assert_eq!(d["params"], json!(["reveal_phone_number"]));
    let text = proxy.metrics().await;
    assert_eq!(metric_sum(&text, "creditmeter_credits_pending", &[]), 40.0);

    wait_settled(&proxy, Duration::from_secs(20)).await;
    let rows = settlements(&conn);
    assert_eq!(rows.len(), 3, "{rows:?}");
    // Two mobiles in the bulk call, one on the first match, none on the second.
    let mut dd: Vec<i64> = rows.iter().map(|r| r.2).collect();
    dd.sort_unstable();
    assert_eq!(dd, vec![0, 8000, 16_000]);
    assert!(rows.iter().all(|r| r.3 == "reported"), "{rows:?}");
    // Settlements carry the call's attribution and start, so timelines book them then.
    let same: i64 = conn
        .query_row(
            "SELECT count(*) FROM calls s JOIN calls c ON s.settles = c.request_id
              WHERE s.table_name IS c.table_name AND s.started_at = c.started_at
                AND s.endpoint = c.endpoint AND s.key_fp IS c.key_fp",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(same, 3);
    // creditmeter's polls: rows priced 0 under _creditmeter/settle, with our key only.
    let polls: (i64, i64) = conn
        .query_row(
            "SELECT count(*), sum(credits_milli) FROM calls WHERE table_name = '_creditmeter'
               AND workflow = 'settle' AND endpoint = 'webhook_result'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(polls.0 >= 3 && polls.1 == 0, "{polls:?}");
    jobs.with(|s| assert!(s.polls.iter().all(|k| k.as_deref() == Some(KEY))));

    let (ledger, metrics) = ledger_and_metrics(&proxy).await;
    assert_eq!(ledger, truth.billed(&jobs));
    assert_eq!(metrics, ledger);
    let text = proxy.metrics().await;
    assert_eq!(metric_sum(&text, "creditmeter_credits_pending", &[]), 0.0);
    assert_eq!(
        metric_sum(
            &text,
            "creditmeter_settlements_total",
            &[("result", "reported")]
        ),
        3.0
    );
    proxy.shutdown().await;
    // The polling key is never stored: only its fingerprint.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()));
    }
}

#[tokio::test]
async fn a_result_seen_by_a_caller_and_by_creditmeter_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::start(Some(Duration::from_millis(200))).await;
    let mut cfg = config(&jobs, true);
    cfg.settle.first_poll = HumanDuration(Duration::from_millis(600));
    let mut proxy = Proxy::start(cfg, dir.path()).await;
    let c = client();
    let mut truth = Truth::default();
    let (_, body) = enrich(
        &c,
        &proxy,
        "/api/v1/people/match",
        "phones",
        reveal("mobile-a@x.com"),
        &mut truth,
    )
    .await;
    let job = body["request_id"].to_string();
    // The caller polls through the proxy, as often as it likes, racing creditmeter's own poll.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut answers = Vec::new();
    for _ in 0..4 {
        let req = http::Request::get(proxy.url(&format!("/api/v1/webhook_result/{job}")))
            .header("x-meter-table", "phones")
            .header("x-api-key", "caller-key")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, _, body) = send(&c, req).await;
        answers.push((status, body));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // The caller's answers are Apollo's, untouched.
    for (status, body) in &answers {
        assert_eq!(*status, 200);
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["webhook_result"]["credits_consumed"], json!(8.0));
    }
    wait_settled(&proxy, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(800)).await; // past creditmeter's own first poll
    let conn = proxy.ledger();
    let rows = settlements(&conn);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].1, rows[0].3.as_str()), (8000, "reported"));
    // The caller's poll came first: creditmeter never needed to poll.
    jobs.with(|s| {
        let ours = s.polls.iter().filter(|k| k.as_deref() == Some(KEY)).count();
        assert_eq!((ours, s.polls.len()), (0, 4));
    });
    let (ledger, metrics) = ledger_and_metrics(&proxy).await;
    assert_eq!(ledger, truth.billed(&jobs));
    assert_eq!(ledger["phones"], 9000);
    assert_eq!(metrics, ledger);
    let text = proxy.metrics().await;
    assert_eq!(metric_sum(&text, "creditmeter_settlements_total", &[]), 1.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_restart_between_the_call_and_its_settlement_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::start(None).await; // the jobs end only after the restart
    let mut cfg = config(&jobs, true);
    cfg.settle.first_poll = HumanDuration(Duration::from_secs(3600));
    cfg.settle.max_wait = HumanDuration(Duration::from_secs(7200));
    let budget: Config = Config::from_toml(
        "[[budget]]\nname = \"phones\"\nscope = { table = \"phones\" }\nlimit = 100\nwindow = \"day\"\n",
    )
    .unwrap();
    cfg.budget = budget.budget;
    let mut proxy = Proxy::start(cfg.clone(), dir.path()).await;
    let c = client();
    let mut truth = Truth::default();
    for email in ["mobile-a@x.com", "b@x.com"] {
        enrich(
            &c,
            &proxy,
            "/api/v1/people/match",
            "phones",
            reveal(email),
            &mut truth,
        )
        .await;
    }
    proxy.shutdown().await;
    assert_eq!(pending(&rusqlite::Connection::open(&proxy.db).unwrap()), 2);

    // Back up: the charges are pending again, reserved in the budget, and get settled.
    cfg.ledger.path = proxy.db.clone();
    cfg.settle.first_poll = HumanDuration(Duration::from_millis(100));
    cfg.settle.max_wait = HumanDuration(Duration::from_secs(7200));
    let mut proxy = Proxy::start(cfg, dir.path()).await;
    let text = proxy.metrics().await;
    assert_eq!(metric_sum(&text, "creditmeter_credits_pending", &[]), 16.0);
    let reserved = |text: &str| {
        metric_sum(
            text,
            "creditmeter_budget_reserved_credits",
            &[("budget", "phones"), ("credit_type", "all")],
        )
    };
    assert_eq!(reserved(&text), 16.0, "the worst cases are reserved again");
    jobs.end_all_in(Duration::from_millis(300));
    wait_settled(&proxy, Duration::from_secs(20)).await;
    let rows = settlements(&proxy.ledger());
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (ledger, metrics) = ledger_and_metrics(&proxy).await;
    assert_eq!(ledger, truth.billed(&jobs));
    assert_eq!(ledger["phones"], 2000 + 8000);
    // Counters started from the ledger: the calls before the restart and the settlements after.
    assert_eq!(metrics, ledger);
    let text = proxy.metrics().await;
    assert_eq!(reserved(&text), 0.0);
    assert_eq!(
        metric_sum(
            &text,
            "creditmeter_budget_spent_credits",
            &[("budget", "phones"), ("credit_type", "all")]
        ),
        10.0
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_expired_result_records_the_estimate_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::start(Some(Duration::from_millis(50))).await;
    jobs.with(|s| s.expired = true);
    let mut proxy = Proxy::start(config(&jobs, true), dir.path()).await;
    let c = client();
    let mut truth = Truth::default();
    enrich(
        &c,
        &proxy,
        "/api/v1/people/match",
        "phones",
        reveal("mobile-a@x.com"),
        &mut truth,
    )
    .await;
    wait_settled(&proxy, Duration::from_secs(10)).await;
    let rows = settlements(&proxy.ledger());
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].1, rows[0].3.as_str()), (4000, "estimated"));
    assert!(rows[0].4.as_deref().unwrap().contains("410"), "{rows:?}");
    let text = proxy.metrics().await;
    assert_eq!(
        metric_sum(
            &text,
            "creditmeter_settlements_total",
            &[("result", "estimated")]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &text,
            "creditmeter_settle_polls_total",
            &[("result", "terminal")]
        ),
        1.0
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_rate_limited_poll_waits_and_then_settles() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::start(Some(Duration::from_millis(50))).await;
    jobs.with(|s| s.rate_limit = 2);
    let mut proxy = Proxy::start(config(&jobs, true), dir.path()).await;
    let c = client();
    let mut truth = Truth::default();
    let started = Instant::now();
    enrich(
        &c,
        &proxy,
        "/api/v1/people/match",
        "phones",
        reveal("mobile-a@x.com"),
        &mut truth,
    )
    .await;
    wait_settled(&proxy, Duration::from_secs(15)).await;
    // Two 429s with retry-after: 1 were honoured before the result came.
    assert!(started.elapsed() >= Duration::from_secs(2));
    jobs.with(|s| assert_eq!(s.rate_limited, 2));
    let rows = settlements(&proxy.ledger());
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].1, rows[0].3.as_str()), (8000, "reported"));
    let text = proxy.metrics().await;
    assert_eq!(
        metric_sum(
            &text,
            "creditmeter_settle_polls_total",
            &[("result", "rate_limited")]
        ),
        2.0
    );
    let (ledger, metrics) = ledger_and_metrics(&proxy).await;
    assert_eq!(ledger, truth.billed(&jobs));
    assert_eq!(metrics, ledger);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_budget_holds_while_charges_are_pending() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::start(Some(Duration::from_millis(400))).await;
    let mut cfg = config(&jobs, true);
    let budget: Config = Config::from_toml(
        "[[budget]]\nname = \"twenty\"\nscope = \"global\"\nlimit = 20\nwindow = \"day\"\n",
    )
    .unwrap();
    cfg.budget = budget.budget;
    cfg.guard.admission_wait = HumanDuration(Duration::ZERO);
    let mut proxy = Proxy::start(cfg, dir.path()).await;
    let c = client();
    let mut truth = Truth::default();
    let mut refused = 0;
    let mut admitted = 0;
    // Every person has a mobile: each reveal can cost 9. Many calls, in waves.
    for wave in 0..4 {
        for i in 0..6 {
            let (status, _) = enrich(
                &c,
                &proxy,
                "/api/v1/people/match",
                "phones",
                reveal(&format!("mobile-{wave}-{i}@x.com")),
                &mut truth,
            )
            .await;
            match status.as_u16() {
                200 => admitted += 1,
                429 => refused += 1,
                s => panic!("unexpected {s}"),
            }
            // Spend so far, settled or billed later, never past 20.
            let billed: i64 = truth.billed(&jobs).values().sum();
            assert!(billed <= 20_000, "billed {billed}");
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    wait_settled(&proxy, Duration::from_secs(20)).await;
    let (ledger, metrics) = ledger_and_metrics(&proxy).await;
    let spent: i64 = ledger.values().sum();
    assert!(spent <= 20_000, "spent {spent}");
    assert_eq!(ledger, truth.billed(&jobs));
    assert_eq!(metrics, ledger);
    // While two reveals were pending (2 + 16 of 20), a third was refused: the bound held
    // with charges still to come, and room came back as they settled.
    assert!(
        refused > 0 && admitted >= 2,
        "admitted {admitted}, refused {refused}"
    );
    assert_eq!(spent, 9000 * admitted);
    proxy.shutdown().await;
}

#[tokio::test]
async fn past_max_wait_the_estimate_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::start(None).await; // jobs that never end
    let mut cfg = config(&jobs, true);
    cfg.settle.max_wait = HumanDuration(Duration::from_millis(1500));
    let mut proxy = Proxy::start(cfg, dir.path()).await;
    let c = client();
    let mut truth = Truth::default();
    let body = json!({"details": [{"email": "mobile-a@x.com"}, {"email": "b@x.com"}],
                      "reveal_phone_number": true, "run_waterfall_email": true, "poll_only": true});
    enrich(
        &c,
        &proxy,
        "/api/v1/people/bulk_match",
        "wf",
        body,
        &mut truth,
    )
    .await;
    wait_settled(&proxy, Duration::from_secs(10)).await;
    let rows = settlements(&proxy.ledger());
    assert_eq!(rows.len(), 1);
    // The estimate: 4 direct_dial per matched record, 1 lead per requested one.
    assert_eq!(
        (rows[0].1, rows[0].2, rows[0].3.as_str()),
        (10_000, 8000, "estimated")
    );
    assert!(
        rows[0].4.as_deref().unwrap().contains("settle.max_wait"),
        "{rows:?}"
    );
    let text = proxy.metrics().await;
    assert!(
        metric_sum(
            &text,
            "creditmeter_settle_polls_total",
            &[("result", "pending")]
        ) >= 1.0
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn with_settlement_off_the_estimate_is_recorded_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::start(Some(Duration::from_millis(50))).await;
    let mut proxy = Proxy::start(config(&jobs, false), dir.path()).await;
    let c = client();
    let mut truth = Truth::default();
    enrich(
        &c,
        &proxy,
        "/api/v1/people/match",
        "phones",
        reveal("mobile-a@x.com"),
        &mut truth,
    )
    .await;
    // No waiting: the row and its settlement are there when the answer is.
    let rows = common::wait_rows(&proxy.ledger(), "outcome = 'settlement'", 1).await;
    assert_eq!(
        (rows[0].credits_milli, rows[0].credit_source.as_str()),
        (4000, "estimated")
    );
    assert!(rows[0]
        .error
        .as_deref()
        .unwrap()
        .contains("settlement is off"));
    assert_eq!(pending(&proxy.ledger()), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    jobs.with(|s| assert!(s.polls.is_empty(), "nothing polls with settlement off"));
    let (ledger, metrics) = ledger_and_metrics(&proxy).await;
    assert_eq!(ledger["phones"], 1000 + 4000);
    assert_eq!(metrics, ledger);
    proxy.shutdown().await;
}

#[tokio::test]
async fn ledger_and_metrics_equal_what_apollo_billed_per_table() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = Jobs::start(Some(Duration::from_millis(300))).await;
    let mut proxy = Proxy::start(config(&jobs, true), dir.path()).await;
    let c = client();
    let mut truth = Truth::default();
    for i in 0..6 {
        let who = if i % 3 == 0 { "mobile" } else { "plain" };
        enrich(
            &c,
            &proxy,
            "/api/v1/people/match",
            "reveals",
            reveal(&format!("{who}-{i}@x.com")),
            &mut truth,
        )
        .await;
        let body = json!({"details": [{"email": format!("mobile-w{i}@x.com")}, {"email": "nobody@x.com"},
                                      {"email": format!("w{i}@x.com")}],
                          "run_waterfall_email": true, "run_waterfall_phone": i % 2 == 0,
                          "reveal_phone_number": i % 2 == 1, "poll_only": true});
        enrich(
            &c,
            &proxy,
            "/api/v1/people/bulk_match",
            "waterfalls",
            body,
            &mut truth,
        )
        .await;
        // A match of nobody starts no job and defers nothing.
        enrich(
            &c,
            &proxy,
            "/api/v1/people/match",
            "misses",
            reveal("nobody@x.com"),
            &mut truth,
        )
        .await;
    }
    wait_settled(&proxy, Duration::from_secs(20)).await;
    let (ledger, metrics) = ledger_and_metrics(&proxy).await;
    let billed = truth.billed(&jobs);
    assert_eq!(ledger, billed);
    assert_eq!(metrics, ledger);
    // Fractional vendor lookups came through to the milli-credit.
    assert_eq!(billed["waterfalls"] % 1000, 500);
    assert_eq!(ledger["misses"], 0);
    let deferred_misses: i64 = proxy
        .ledger()
        .query_row(
            "SELECT count(*) FROM calls WHERE table_name = 'misses' AND deferred IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(deferred_misses, 0);
    proxy.shutdown().await;
}

// --- against the simulator ---------------------------------------------------------------------

fn sim_total(sim: &common::SimServer) -> i64 {
    let b = sim.sim.billed();
    b.lead_milli + b.direct_dial_milli + b.export_milli
}

/// The simulator with jobs that end after `job_delay`, and a proxy in front of it that starts
/// polling results `first_poll` after each call.
async fn sim_and_proxy(
    dir: &std::path::Path,
    job_delay: Duration,
    first_poll: Duration,
) -> (common::SimServer, Proxy) {
    let sim = common::SimServer::start(
        creditmeter_sim::SimConfig {
            job_delay,
            ..creditmeter_sim::SimConfig::default()
        },
        None,
    )
    .await;
    set_key();
    let mut cfg = config_for(&sim.url(false), None);
    cfg.settle.api_key_env = KEY_ENV.into();
    cfg.settle.first_poll = HumanDuration(first_poll);
    let proxy = Proxy::start(cfg, dir).await;
    (sim, proxy)
}

/// The credits of each job the simulator ran, by its `request_id`.
fn sim_jobs(sim: &common::SimServer) -> HashMap<i64, i64> {
    sim.sim
        .jobs()
        .into_iter()
        .map(|j| {
            (
                j.request_id,
                j.lead_milli + j.direct_dial_milli + j.export_milli,
            )
        })
        .collect()
}

/// What the simulator billed per table: each table's synchronous answers
/// (`x-sim-billed-milli`) plus the jobs their answers named (by `request_id`).
fn sim_billed_per_table(
    sim: &common::SimServer,
    calls: &BTreeMap<String, (i64, Vec<i64>)>,
) -> BTreeMap<String, i64> {
    let jobs = sim_jobs(sim);
    calls
        .iter()
        .map(|(t, (sync, ids))| {
            let later: i64 = ids.iter().filter_map(|id| jobs.get(id)).sum();
            (t.clone(), sync + later)
        })
        .collect()
}

/// The simulator (which follows Apollo's documented async billing, written apart from the
/// catalog): phone reveals, waterfalls and misses through the proxy; once the jobs end, the
/// ledger and `creditmeter_credits_total` per table equal what the sim billed, to the milli.
async fn against_the_sim() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, mut proxy) = sim_and_proxy(
        dir.path(),
        Duration::from_millis(300),
        Duration::from_millis(100),
    )
    .await;
    let c = client();
    // table -> (sync milli from x-sim-billed-milli, job request ids)
    let mut calls: BTreeMap<String, (i64, Vec<i64>)> = BTreeMap::new();
    let go = |table: &'static str, path: &'static str, body: Value| {
        let c = c.clone();
        let url = proxy.url(path);
        async move {
            let req = http::Request::post(url)
                .header("content-type", "application/json")
                .header("x-meter-table", table)
                .header("x-api-key", "caller-key")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap();
            let (status, headers, body) = send(&c, req).await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            let sync: i64 = headers
                .get("x-sim-billed-milli")
                .map_or(0, |v| v.to_str().unwrap().parse().unwrap());
            let v: Value = serde_json::from_slice(&body).unwrap();
            (table, sync, v["request_id"].as_i64())
        }
    };
    let mut sent = Vec::new();
    for i in 0..8 {
        sent.push(
            go(
                "reveals",
                "/api/v1/people/match",
                json!({"email": format!("person{i}@acme{i}.com"), "reveal_phone_number": true, "poll_only": true}),
            )
            .await,
        );
        let details: Vec<Value> = (0..4)
            .map(|k| json!({"email": format!("w{i}-{k}@corp{k}.com")}))
            .collect();
        sent.push(
            go(
                "waterfalls",
                "/api/v1/people/bulk_match",
                json!({"details": details, "run_waterfall_email": true,
                       "run_waterfall_phone": i % 2 == 0, "reveal_phone_number": i % 3 == 0,
                       "poll_only": true}),
            )
            .await,
        );
        sent.push(
            go(
                "plain",
                "/api/v1/people/match",
                json!({"email": format!("plain{i}@acme.com")}),
            )
            .await,
        );
    }
    for (table, sync, id) in sent {
        let e = calls.entry(table.to_owned()).or_default();
        e.0 += sync;
        e.1.extend(id);
    }
    wait_settled(&proxy, Duration::from_secs(30)).await;
    let jobs = sim_jobs(&sim);
    let billed = sim_billed_per_table(&sim, &calls);
    let (ledger, metrics) = ledger_and_metrics(&proxy).await;
    assert_eq!(ledger, billed);
    assert_eq!(metrics, ledger);
    // The sim's own total agrees (nothing else billed), and something was billed later.
    let total: i64 = billed.values().sum();
    assert_eq!(total, sim_total(&sim));
    assert!(jobs.values().any(|m| *m > 0));
    let sources: Vec<String> = proxy
        .ledger()
        .prepare("SELECT DISTINCT credit_source FROM calls WHERE outcome = 'settlement' ORDER BY 1")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(sources, vec!["reported".to_owned()]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn against_the_simulator_the_ledger_equals_what_it_billed() {
    against_the_sim().await;
}

#[tokio::test]
async fn against_the_simulator_a_result_without_a_figure_prices_its_mobiles() {
    // Only the phone reveals can be priced from the payload; waterfalls are estimated, so the
    // totals cannot be exact here: check only what the payload decides.
    use creditmeter_sim::SimConfig;
    let dir = tempfile::tempdir().unwrap();
    let sim = common::SimServer::start(
        SimConfig {
            job_delay: Duration::from_millis(200),
            report_job_credits_consumed: false,
            mobile_rate_pct: 50,
            ..SimConfig::default()
        },
        None,
    )
    .await;
    set_key();
    let mut cfg = config_for(&sim.url(false), None);
    cfg.settle.api_key_env = KEY_ENV.into();
    cfg.settle.first_poll = HumanDuration(Duration::from_millis(100));
    let mut proxy = Proxy::start(cfg, dir.path()).await;
    let c = client();
    let mut ids = Vec::new();
    for i in 0..10 {
        let req = http::Request::post(proxy.url("/api/v1/people/match"))
            .header("content-type", "application/json")
            .header("x-meter-table", "reveals")
            .header("x-api-key", "caller-key")
            .body(Full::new(Bytes::from(
                json!({"email": format!("p{i}@acme{i}.com"), "reveal_phone_number": true, "poll_only": true}).to_string(),
            )))
            .unwrap();
        let (_, _, body) = send(&c, req).await;
        let v: Value = serde_json::from_slice(&body).unwrap();
        ids.extend(v["request_id"].as_i64());
    }
    wait_settled(&proxy, Duration::from_secs(20)).await;
    let billed_later: i64 = sim
        .sim
        .jobs()
        .iter()
        .filter(|j| ids.contains(&j.request_id))
        .map(|j| j.direct_dial_milli)
        .sum();
    let settled: i64 = proxy
        .ledger()
        .query_row(
            "SELECT COALESCE(sum(direct_dial_milli), 0) FROM calls WHERE outcome = 'settlement' AND credit_source = 'catalog'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(billed_later > 0, "no mobile found: the test proves nothing");
    assert_eq!(settled, billed_later);
    let (ledger, _) = ledger_and_metrics(&proxy).await;
    assert_eq!(ledger["reveals"], sim_total(&sim));
    proxy.shutdown().await;
}

/// The billing-truth issue's own check, against the simulator: phone reveals, waterfalls,
/// doubled-slash paths (a base URL with a trailing slash), form-encoded and gzipped bodies, and
/// callers polling some results themselves. Once the jobs end, per table, the ledger and
/// `creditmeter_credits_total` equal what the simulator billed, to the milli-credit.
#[tokio::test]
async fn the_issue_workload_equals_the_bill_per_table() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let (sim, mut proxy) = sim_and_proxy(
        dir.path(),
        Duration::from_millis(300),
        Duration::from_millis(700),
    )
    .await;
    let c = client();
    let gzip = |text: &str| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(text.as_bytes()).unwrap();
        e.finish().unwrap()
    };
    /// (table, path, content-type, content-encoding, body)
    type Call = (
        &'static str,
        String,
        &'static str,
        Option<&'static str>,
        Vec<u8>,
    );
    let mut work: Vec<Call> = Vec::new();
    for i in 0..6 {
        work.push((
            "form reveals",
            "//api/v1/people/match".into(),
            "application/x-www-form-urlencoded",
            None,
            format!("email=form{i}%40acme{i}.com&reveal_phone_number=true&poll_only=true")
                .into_bytes(),
        ));
        work.push((
            "form reveals",
            "/api/v1//people/bulk_match".into(),
            "application/x-www-form-urlencoded",
            None,
            format!(
                "details[][email]=a{i}%40corp.com&details[][email]=b{i}%40corp.com&details[][email]=c{i}%40corp.com&reveal_phone_number=true&poll_only=true"
            )
            .into_bytes(),
        ));
        let details: Vec<Value> = (0..5)
            .map(|k| json!({"email": format!("wf{i}-{k}@corp{k}.com")}))
            .collect();
        work.push((
            "waterfalls",
            "/v1/people/bulk_match".into(),
            "application/json",
            Some("gzip"),
            gzip(
                &json!({"details": details, "run_waterfall_email": true,
                        "run_waterfall_phone": i % 2 == 1, "poll_only": true})
                .to_string(),
            ),
        ));
        work.push((
            "slashes",
            "//api/v1/organizations/enrich?domain=acme.com".into(),
            "application/json",
            None,
            Vec::new(),
        ));
    }
    // table -> (sync milli from x-sim-billed-milli, job request ids)
    let mut calls: BTreeMap<String, (i64, Vec<i64>)> = BTreeMap::new();
    for (table, path, ctype, encoding, body) in work {
        let method = if path.contains("organizations/enrich") {
            "GET"
        } else {
            "POST"
        };
        let mut req = http::Request::builder()
            .method(method)
            .uri(proxy.url(&path))
            .header("content-type", ctype)
            .header("x-meter-table", table)
            .header("x-api-key", "caller-key");
        if let Some(e) = encoding {
            req = req.header("content-encoding", e);
        }
        let (status, headers, body) =
            send(&c, req.body(Full::new(Bytes::from(body))).unwrap()).await;
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        let e = calls.entry(table.into()).or_default();
        e.0 += headers
            .get("x-sim-billed-milli")
            .map_or(0, |v| v.to_str().unwrap().parse::<i64>().unwrap());
        let v: Value = serde_json::from_slice(&body).unwrap();
        e.1.extend(v["request_id"].as_i64());
    }
    // Callers poll half the waterfall jobs themselves, through the proxy, before creditmeter's
    // own first poll: those settle from the caller's answer, and only once.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for id in calls["waterfalls"].1.iter().step_by(2) {
        let req = http::Request::get(proxy.url(&format!("/api/v1/webhook_result/{id}")))
            .header("x-api-key", "caller-key")
            .header("x-meter-table", "waterfalls")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, _, body) = send(&c, req).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    wait_settled(&proxy, Duration::from_secs(30)).await;

    let billed = sim_billed_per_table(&sim, &calls);
    let (ledger, metrics) = ledger_and_metrics(&proxy).await;
    assert_eq!(
        ledger, billed,
        "ledger per table against the simulator's bill"
    );
    assert_eq!(
        metrics, ledger,
        "creditmeter_credits_total per table against the ledger"
    );
    assert_eq!(billed.values().sum::<i64>(), sim_total(&sim));
    // Every kind of spend is there: phones found, vendor lookups, the doubled-slash enrich.
    assert!(billed["form reveals"] > 0 && billed["waterfalls"] > 0 && billed["slashes"] > 0);
    let conn = proxy.ledger();
    let (settled, by_caller_table): (i64, i64) = conn
        .query_row(
            "SELECT count(*), (SELECT count(*) FROM calls WHERE endpoint = 'webhook_result'
                                 AND table_name = 'waterfalls' AND status = 200)
               FROM calls WHERE outcome = 'settlement'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    // (An answer that matched nobody carries a request_id too, but starts nothing billable.)
    let deferred: i64 = conn
        .query_row(
            "SELECT count(*) FROM calls WHERE deferred IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(deferred >= 12, "{deferred} calls left a deferred charge");
    assert_eq!(
        settled, deferred,
        "one settlement per deferred charge, none twice"
    );
    assert_eq!(
        by_caller_table, 3,
        "the callers' own polls are recorded, free"
    );
    let paths: Vec<String> = conn
        .prepare("SELECT DISTINCT path FROM calls WHERE table_name = 'slashes'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(paths, vec!["/api/v1/organizations/enrich".to_owned()]);
    proxy.shutdown().await;
}

/// Waterfall answers mark a person Apollo could not match `match_confidence: "none"` (an
/// object, not `null`) and bill it nothing: through the proxy, the ledger per table equals what
/// the simulator billed, its jobs included, and the unmatched details are not counted matched.
#[tokio::test]
async fn against_the_simulator_waterfall_details_marked_none_are_not_billed() {
    use creditmeter_sim::SimConfig;
    let dir = tempfile::tempdir().unwrap();
    let sim = common::SimServer::start(
        SimConfig {
            job_delay: Duration::from_millis(200),
            match_rate_pct: 100,
            ..SimConfig::default()
        },
        None,
    )
    .await;
    set_key();
    let mut cfg = config_for(&sim.url(false), None);
    cfg.settle.api_key_env = KEY_ENV.into();
    cfg.settle.first_poll = HumanDuration(Duration::from_millis(100));
    let mut proxy = Proxy::start(cfg, dir.path()).await;
    let c = client();
    // (table, details: `true` = a person the sim matches, `false` = one it never does)
    let calls: [(&str, &[bool], Value); 4] = [
        (
            "mixed",
            &[true, false, true, false],
            json!({"run_waterfall_email": true}),
        ),
        (
            "mixed",
            &[false, true, false],
            json!({"run_waterfall_phone": true, "reveal_phone_number": true}),
        ),
        (
            "nobody",
            &[false, false, false],
            json!({"run_waterfall_email": true, "run_waterfall_phone": true}),
        ),
        ("plain", &[true, false], json!({})),
    ];
    let mut sync: BTreeMap<String, i64> = BTreeMap::new();
    let mut ids: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut unmatched_seen = 0;
    for (n, (table, who, flags)) in calls.iter().enumerate() {
        let details: Vec<Value> = who
            .iter()
            .enumerate()
            .map(|(k, hit)| {
                if *hit {
                    json!({"email": format!("hit{n}-{k}@corp{k}.com")})
                } else {
                    json!({"id": format!("missing-{n}-{k}")})
                }
            })
            .collect();
        let mut body = json!({"details": details, "poll_only": true});
        body.as_object_mut()
            .unwrap()
            .extend(flags.as_object().unwrap().clone());
        let req = http::Request::post(proxy.url("/api/v1/people/bulk_match"))
            .header("content-type", "application/json")
            .header("x-meter-table", *table)
            .header("x-api-key", "caller-key")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let (status, headers, answer) = send(&c, req).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        let billed: i64 = headers
            .get("x-sim-billed-milli")
            .map_or(0, |v| v.to_str().unwrap().parse().unwrap());
        let v: Value = serde_json::from_slice(&answer).unwrap();
        let matches = v["matches"].as_array().unwrap();
        let waterfall = flags.get("run_waterfall_email").is_some()
            || flags.get("run_waterfall_phone").is_some();
        for (m, hit) in matches.iter().zip(who.iter()) {
            match (hit, waterfall) {
                (true, _) => assert!(m["id"].is_string(), "{m}"),
                (false, true) => {
                    assert_eq!(m["match_confidence"], "none", "{m}");
                    unmatched_seen += 1;
                }
                (false, false) => assert!(m.is_null(), "{m}"),
            }
        }
        *sync.entry((*table).to_owned()).or_default() += billed;
        ids.entry((*table).to_owned())
            .or_default()
            .extend(v["request_id"].as_i64());
    }
    assert_eq!(
        unmatched_seen, 7,
        "the sim did not mark the misses: the test proves nothing"
    );
    wait_settled(&proxy, Duration::from_secs(20)).await;

    let jobs: HashMap<i64, i64> = sim
        .sim
        .jobs()
        .into_iter()
        .map(|j| {
            (
                j.request_id,
                j.lead_milli + j.direct_dial_milli + j.export_milli,
            )
        })
        .collect();
    let billed: BTreeMap<String, i64> = sync
        .iter()
        .map(|(t, s)| {
            let later: i64 = ids[t].iter().filter_map(|id| jobs.get(id)).sum();
            (t.clone(), s + later)
        })
        .collect();
    let (ledger, metrics) = ledger_and_metrics(&proxy).await;
    assert_eq!(ledger, billed);
    assert_eq!(metrics, ledger);
    assert_eq!(
        sync["mixed"], 3_000,
        "one lead per matched detail, none for the misses"
    );
    assert_eq!(ledger["nobody"], 0);
    assert!(ids["mixed"]
        .iter()
        .any(|id| jobs.get(id).is_some_and(|m| *m > 0)));
    let total: i64 = billed.values().sum();
    assert_eq!(total, sim_total(&sim));

    // The call rows count only the matched details; the all-miss call defers nothing.
    let rows: Vec<(String, i64, i64, bool)> = proxy
        .ledger()
        .prepare(
            "SELECT table_name, records_requested, records_matched, deferred IS NOT NULL
               FROM calls WHERE outcome <> 'settlement' AND table_name <> '_creditmeter'
              ORDER BY started_at",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        rows,
        vec![
            ("mixed".to_owned(), 4, 2, true),
            ("mixed".to_owned(), 3, 1, true),
            ("nobody".to_owned(), 3, 0, false),
            ("plain".to_owned(), 2, 1, false),
        ]
    );
    proxy.shutdown().await;
}
