#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! End-to-end: real sockets on 127.0.0.1, the simulator behind a TLS CA the test makes, and a
//! real SQLite ledger. Each test asserts what a user would notice.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use common::request::Call;
use common::*;
use creditmeter_sim::SimConfig;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn post(url: &str, body: &str) -> http::request::Builder {
    let _ = body;
    Call::post(url).json_type().builder()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_arrive_byte_identical_gzip_included() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let proxy = Proxy::start(config_for(&up.url(), None), dir.path()).await;
    let expected = blob();
    for script in ["blob", "chunked"] {
        let req = http::Request::get(proxy.url(&format!("/api/v1/people/match?script={script}")))
            .header("x-meter-table", "bytes")
            .header("accept-encoding", "gzip")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, h, body) = send(&client(), req).await;
        assert_eq!(status, 200);
        assert_eq!(h.get("content-encoding").unwrap(), "gzip", "{script}");
        assert_eq!(body.len(), expected.len(), "{script}");
        assert!(
            body == expected,
            "{script}: the caller got different bytes than upstream sent"
        );
        if script == "blob" {
            assert_eq!(
                h.get("content-length").unwrap().to_str().unwrap(),
                expected.len().to_string()
            );
        }
    }
    // The copy kept for pricing was decoded: the person in the gzip body was billed.
    let (credits, bytes): (i64, i64) = proxy
        .ledger()
        .query_row(
            "SELECT sum(credits_milli), max(response_bytes) FROM calls WHERE table_name = 'bytes'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(credits, 2000);
    assert_eq!(bytes as usize, expected.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_through_the_proxy_match_the_tls_simulator() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let sim = SimServer::start(
        SimConfig {
            rate_limit_minute: 0,
            ..Default::default()
        },
        Some(&pki),
    )
    .await;
    let proxy = Proxy::start(config_for(&sim.url(true), Some(&pki.ca_pem)), dir.path()).await;

    // A direct TLS client to the simulator, trusting the test CA: the reference answers.
    let direct = direct_tls_client(&pki);
    let c = client();
    let cases: Vec<(&str, &str, Option<&str>, bool)> = vec![
        (
            "POST",
            "/api/v1/people/match",
            Some(r#"{"email":"ada@example.com"}"#),
            true,
        ),
        (
            "POST",
            "/api/v1/people/match",
            Some(r#"{"email":"ada@example.com"}"#),
            false,
        ),
        (
            "POST",
            "/api/v1/people/bulk_match",
            Some(r#"{"details":[{"email":"a@x.com"},{"email":"b@y.com"},{"email":"c@z.com"}]}"#),
            true,
        ),
        (
            "GET",
            "/api/v1/organizations/enrich?domain=apollo.io",
            None,
            true,
        ),
        (
            "POST",
            "/api/v1/mixed_companies/search",
            Some(r#"{"q_organization_name":"acme","page":1}"#),
            true,
        ),
        ("GET", "/api/v1/no/such/endpoint", None, false),
    ];
    for (method, path, body, gzip) in cases {
        let build = |url: String| {
            let mut b = http::Request::builder()
                .method(method)
                .uri(url)
                .header("x-api-key", "test-key")
                .header("content-type", "application/json");
            if gzip {
                b = b.header("accept-encoding", "gzip");
            }
            b.body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
                .unwrap()
        };
        let (ds, dh, db) = send_any(&direct, build(format!("{}{path}", sim.url(true)))).await;
        let mut req = build(proxy.url(path));
        req.headers_mut()
            .insert("x-meter-table", "identity-check".parse().unwrap());
        let (ps, ph, pb) = send(&c, req).await;
        assert_eq!(ps, ds, "{method} {path}: status");
        assert_eq!(
            ph.get("content-encoding"),
            dh.get("content-encoding"),
            "{path}"
        );
        assert_eq!(ph.get("content-type"), dh.get("content-type"), "{path}");
        assert_eq!(
            ph.get("x-sim-billed-milli"),
            dh.get("x-sim-billed-milli"),
            "{path}"
        );
        // Each Apollo answer carries its own request_id; everything else is the same.
        let decode = |b: &Bytes, h: &http::HeaderMap| -> serde_json::Value {
            let raw = if h.get("content-encoding").is_some_and(|v| v == "gzip") {
                let mut out = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&b[..]), &mut out)
                    .unwrap();
                out
            } else {
                b.to_vec()
            };
            let mut v: serde_json::Value =
                serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null);
            if let Some(o) = v.as_object_mut() {
                o.remove("request_id");
            }
            v
        };
        assert_eq!(decode(&pb, &ph), decode(&db, &dh), "{method} {path}");
        if gzip && ps.is_success() {
            assert_eq!(
                ph.get("content-encoding").map(|v| v.to_str().unwrap()),
                Some("gzip")
            );
        }
        assert!(
            ph.get("x-meter-request-id").is_some(),
            "every response carries X-Meter-Request-Id"
        );
    }
}

fn direct_tls_client(
    pki: &TestPki,
) -> hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(&pki.ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https)
}

async fn send_any<C>(
    client: &hyper_util::client::legacy::Client<C, Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
) -> (http::StatusCode, http::HeaderMap, Bytes)
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let resp = client.request(req).await.unwrap();
    let (s, h) = (resp.status(), resp.headers().clone());
    (s, h, resp.into_body().collect().await.unwrap().to_bytes())
}

/// A POST carrying an API key, attribution headers, and a hop-by-hop header named in
/// `Connection`.
fn attributed_post(url: &str) -> http::request::Builder {
    Call::post(url)
        .key("sk-live-123")
        .table("Header Table")
        .workflow("wf-1")
        .tag("team", "growth")
        .json_type()
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "drop-me")
        .builder()
}

/// What upstream must see of an [`attributed_post`]: no `x-meter-*`, no hop-by-hop header,
/// the key, and its own Host.
fn assert_forwarded_clean(s: &Seen, upstream: std::net::SocketAddr) {
    assert!(
        s.headers
            .keys()
            .all(|k| !k.as_str().starts_with("x-meter-")),
        "{:?}",
        s.headers
    );
    assert!(
        s.headers.get("x-hop").is_none(),
        "headers named in Connection are hop-by-hop"
    );
    assert_eq!(s.headers.get("x-api-key").unwrap(), "sk-live-123");
    assert_eq!(
        s.headers.get("host").unwrap().to_str().unwrap(),
        upstream.to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meter_headers_are_stripped_and_everything_else_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let proxy = Proxy::start(config_for(&up.url(), None), dir.path()).await;
    let body = r#"{"first_name":"Ada","last_name":"Lovelace","domain":"example.com"}"#;
    let req = attributed_post(&proxy.url("/api/v1/people/match?reveal_personal_emails=true&meter_table=Q3+Leads&person_titles%5B%5D=CEO"))
        .header("authorization", "Bearer oauth-tok")
        .header("x-custom-thing", "keep-me")
        .header("accept", "application/json")
        .header("user-agent", "clay/1.0")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let (status, headers, _) = send(&client(), req).await;
    assert_eq!(status, 200);
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.method, "POST");
    assert_eq!(
        s.uri,
        "/api/v1/people/match?reveal_personal_emails=true&person_titles%5B%5D=CEO"
    );
    assert_forwarded_clean(s, up.addr);
    assert_eq!(s.headers.get("authorization").unwrap(), "Bearer oauth-tok");
    assert_eq!(s.headers.get("x-custom-thing").unwrap(), "keep-me");
    assert_eq!(s.headers.get("user-agent").unwrap(), "clay/1.0");
    assert_eq!(s.headers.get("accept").unwrap(), "application/json");
    assert_eq!(s.body, Bytes::from(body));
    // The ledger has the attribution, and no trace of the key.
    let id = headers
        .get("x-meter-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let (table, workflow, tags, key_fp, credits): (String, String, String, String, i64) = proxy
        .ledger()
        .query_row(
            "SELECT table_name, workflow, tags, key_fp, credits_milli FROM calls WHERE request_id = ?1",
            [&id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap();
    assert_eq!(table, "Header Table", "the header wins over meter_table");
    assert_eq!(workflow, "wf-1");
    assert_eq!(tags, r#"{"team":"growth"}"#);
    assert_eq!(key_fp.len(), 16);
    assert_eq!(credits, 1000, "a matched person is 1 lead credit");
    let raw = std::fs::read(&proxy.db).unwrap();
    let wal = std::fs::read(proxy.db.with_extension("db-wal")).unwrap_or_default();
    for bytes in [raw, wal] {
        assert!(
            !bytes.windows(11).any(|w| w == b"sk-live-123"),
            "API key written to the ledger"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_workload_ledger_and_metrics_match_what_upstream_billed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let sim = SimServer::start(
        SimConfig {
            rate_limit_minute: 0,
            job_delay: Duration::from_millis(300),
            ..Default::default()
        },
        Some(&pki),
    )
    .await;
    // Phone reveals bill when Apollo's job ends: settlement on, so the ledger learns it.
    std::env::set_var("CREDITMETER_TEST_PROXY_SETTLE_KEY", "settle-key");
    let mut config = config_for(&sim.url(true), Some(&pki.ca_pem));
    config.settle.api_key_env = "CREDITMETER_TEST_PROXY_SETTLE_KEY".into();
    config.settle.first_poll = creditmeter::config::HumanDuration(Duration::from_millis(100));
    let mut proxy = Proxy::start(config, dir.path()).await;

    // What the simulator billed, per table, from the responses the callers received (and,
    // below, from the jobs their request ids started).
    let calls = creditmeter_sim::workload::workload(400);
    let c = client();
    let mut billed_by_table: BTreeMap<String, i64> = BTreeMap::new();
    let mut sent = 0;
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in calls.chunks(50) {
        let chunk = chunk.to_vec();
        let (c, base) = (c.clone(), proxy.url(""));
        tasks.spawn(async move {
            let mut out = Vec::new();
            for call in chunk {
                let mut uri = format!("{base}{}", call.path_and_query);
                let mut b = http::Request::builder()
                    .method(call.method)
                    .header("x-api-key", "k")
                    .header("x-meter-workflow", call.workflow);
                if let Some(t) = call.table {
                    if call.via_query {
                        uri.push(if uri.contains('?') { '&' } else { '?' });
                        uri.push_str(&format!("meter_table={}", t.replace(' ', "+")));
                    } else {
                        b = b.header("x-meter-table", t);
                    }
                }
                let req = b
                    .uri(uri)
                    .body(Full::new(Bytes::from(
                        call.body.clone().unwrap_or_default(),
                    )))
                    .unwrap();
                let (status, h, body) = send(&c, req).await;
                let billed: i64 = h
                    .get("x-sim-billed-milli")
                    .map(|v| v.to_str().unwrap().parse().unwrap())
                    .unwrap_or(0);
                let job = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["request_id"].as_i64());
                out.push((
                    call.table.unwrap_or("_unattributed").to_owned(),
                    status,
                    billed,
                    job,
                ));
            }
            out
        });
    }
    let mut jobs_of: Vec<(String, i64)> = Vec::new();
    while let Some(r) = tasks.join_next().await {
        for (table, status, billed, job) in r.unwrap() {
            assert!(status.is_success(), "{table}: {status}");
            *billed_by_table.entry(table.clone()).or_default() += billed;
            jobs_of.extend(job.map(|j| (table, j)));
            sent += 1;
        }
    }
    assert_eq!(sent, 400);

    let conn = proxy.ledger();
    // Wait for every deferred charge (the demo's phone reveals) to settle, then add what the
    // jobs billed to their tables.
    for _ in 0..400 {
        let pending: i64 = conn
            .query_row(
                "SELECT count(*) FROM calls c WHERE deferred IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM calls s WHERE s.settles = c.request_id)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let job_billed: std::collections::HashMap<i64, i64> = sim
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
    assert!(job_billed.values().any(|m| *m > 0), "some job billed later");
    for (table, job) in jobs_of {
        *billed_by_table.entry(table).or_default() += job_billed.get(&job).copied().unwrap_or(0);
    }
    let ledger = ledger_by_table(&conn);
    for (table, billed) in &billed_by_table {
        assert_eq!(
            ledger.get(table).copied().unwrap_or(0),
            *billed,
            "table {table:?}: ledger vs simulator"
        );
    }
    let total: i64 = billed_by_table.values().sum();
    let sim_total = sim.sim.billed();
    assert_eq!(
        total,
        sim_total.lead_milli + sim_total.direct_dial_milli + sim_total.export_milli
    );
    assert!(
        billed_by_table[creditmeter_sim::workload::HEAVY_TABLE] > billed_by_table["Inbound leads"],
        "the heavy spender spends most"
    );
    // One row per call, plus settlements and creditmeter's own (free) result polls.
    let rows: i64 = conn
        .query_row(
            "SELECT count(*) FROM calls WHERE outcome <> 'settlement' AND table_name IS NOT '_creditmeter'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 400);

    let m = proxy.metrics().await;
    let metric_total = metric_sum(&m, "creditmeter_credits_total", &[]);
    assert!(
        (metric_total - total as f64 / 1000.0).abs() < 1e-6,
        "metrics {metric_total} vs ledger {total}"
    );
    for (table, billed) in &billed_by_table {
        let got = metric_sum(&m, "creditmeter_credits_total", &[("table", table)]);
        assert!(
            (got - *billed as f64 / 1000.0).abs() < 1e-6,
            "metric for {table}: {got}"
        );
    }
    let requests = metric_sum(&m, "creditmeter_requests_total", &[])
        - metric_sum(
            &m,
            "creditmeter_requests_total",
            &[("outcome", "settlement")],
        )
        - metric_sum(
            &m,
            "creditmeter_requests_total",
            &[("table", "_creditmeter")],
        );
    assert_eq!(requests, 400.0);
    let unattributed = creditmeter_sim::workload::workload(400)
        .iter()
        .filter(|c| c.table.is_none())
        .count();
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_requests_total",
            &[("table", "_unattributed")]
        ),
        unattributed as f64
    );
    let (bulk_dd,): (i64,) = conn
        .query_row(
            "SELECT sum(direct_dial_milli) FROM calls WHERE endpoint = 'people_bulk_match'",
            [],
            |r| Ok((r.get(0)?,)),
        )
        .unwrap();
    assert!(bulk_dd > 0, "phone reveals are booked as direct_dial");
    assert!(
        metric_sum(
            &m,
            "creditmeter_credits_total",
            &[("credit_type", "direct_dial")]
        ) > 0.0
    );

    // A restart starts the counters from the ledger, so nothing is lost between scrapes.
    proxy.shutdown().await;
    let proxy2 = Proxy::start(config_for(&sim.url(true), Some(&pki.ca_pem)), dir.path()).await;
    let m2 = proxy2.metrics().await;
    assert!(
        (metric_sum(&m2, "creditmeter_credits_total", &[]) - total as f64 / 1000.0).abs() < 1e-6
    );
    // (Settlements and creditmeter's own polls included, as before the restart.)
    assert_eq!(
        metric_sum(&m2, "creditmeter_requests_total", &[]),
        metric_sum(&m, "creditmeter_requests_total", &[])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_attribution_gets_400_and_nothing_reaches_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let mut cfg = config_for(&up.url(), None);
    cfg.attribution.require_table = true;
    let proxy = Proxy::start(cfg, dir.path()).await;
    let long = "t".repeat(129);
    type Case<'a> = (Vec<(&'a str, &'a [u8])>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![("x-meter-table", long.as_bytes())],
            "",
            "X-Meter-Table",
        ),
        (
            vec![
                ("x-meter-table", b"ok"),
                ("x-meter-workflow", b"\xc3\x28bad"),
            ],
            "",
            "X-Meter-Workflow",
        ),
        (
            vec![("x-meter-table", b"ok"), ("x-meter-tag-team", b"a\tb")],
            "",
            "X-Meter-Tag-team",
        ),
        (vec![], "?meter_table=%FF", "meter_table"),
        (vec![], "", "X-Meter-Table"), // require_table
    ];
    for (headers, query, field) in cases {
        let mut b = http::Request::post(proxy.url(&format!("/api/v1/people/match{query}")))
            .header("x-api-key", "k");
        for (k, v) in &headers {
            b = b.header(*k, http::HeaderValue::from_bytes(v).unwrap());
        }
        let (status, h, body) =
            send(&client(), b.body(Full::new(Bytes::from("{}"))).unwrap()).await;
        assert_eq!(status, 400, "{field}");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["field"], field, "{json}");
        assert!(json["message"].as_str().unwrap().contains(field), "{json}");
        assert!(h.get("x-meter-request-id").is_some());
    }
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing was sent upstream"
    );
    let rejected: i64 = proxy
        .ledger()
        .query_row("SELECT count(*) FROM calls WHERE outcome = 'rejected' AND credits_milli = 0 AND status IS NULL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rejected, 5, "refused calls are recorded too");
    // A valid table passes.
    let req = http::Request::post(proxy.url("/api/v1/people/match?meter_table=Valid"))
        .header("x-api-key", "k")
        .body(Full::new(Bytes::from("{}")))
        .unwrap();
    assert_eq!(send(&client(), req).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_uris_and_connect_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let proxy = Proxy::start(config_for(&up.url(), None), dir.path()).await;
    refused_as_open_proxy(&proxy).await;
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// Sends an absolute-form GET and a CONNECT over raw TCP, checks they get 400 and 405 saying
/// why, and returns the raw responses.
async fn refused_as_open_proxy(proxy: &Proxy) -> Vec<String> {
    let mut answers = Vec::new();
    for (request, want) in [
        (
            "GET http://evil.example.com/steal HTTP/1.1\r\nHost: evil.example.com\r\n\r\n",
            "400",
        ),
        (
            "CONNECT evil.example.com:443 HTTP/1.1\r\nHost: evil.example.com:443\r\n\r\n",
            "405",
        ),
    ] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with(&format!("HTTP/1.1 {want}")), "{text}");
        assert!(
            text.contains("not an open proxy") || text.contains("CONNECT is not supported"),
            "{text}"
        );
        answers.push(text.into_owned());
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_row_is_committed_before_the_caller_sees_the_end_of_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let (_sim, proxy) = proxy_before_sim(SimConfig::default(), dir.path()).await;
    let c = client();
    let conn = proxy.ledger();
    for i in 0..30 {
        let req = http::Request::post(proxy.url("/api/v1/people/match"))
            .header("x-api-key", "k")
            .header("x-meter-table", "durable")
            .body(Full::new(Bytes::from(format!(
                r#"{{"email":"p{i}@example.com"}}"#
            ))))
            .unwrap();
        let (_, h, _) = send(&c, req).await;
        let id = h.get("x-meter-request-id").unwrap().to_str().unwrap();
        // No waiting: the body's end was released only after the commit.
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM calls WHERE request_id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1, "call {i} received in full but not in the ledger");
    }
}

/// A plain-HTTP simulator without rate limits, and a proxy on defaults in front of it.
async fn proxy_before_sim(cfg: SimConfig, dir: &std::path::Path) -> (SimServer, Proxy) {
    let sim = SimServer::start(
        SimConfig {
            rate_limit_minute: 0,
            ..cfg
        },
        None,
    )
    .await;
    let proxy = Proxy::start(config_for(&sim.url(false), None), dir).await;
    (sim, proxy)
}

/// Large answers (here 250 KB searches, gzipped) are priced on the blocking pool, not on an
/// async worker: each must still be priced as the simulator billed and committed before the
/// caller sees its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_gzip_answers_are_priced_off_the_workers_and_committed_first() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimConfig {
        match_rate_pct: 100,
        ..Default::default()
    };
    let (_sim, proxy) = proxy_before_sim(sim, dir.path()).await;
    let c = client();
    let conn = proxy.ledger();
    for page in 1..=8 {
        let req = http::Request::post(proxy.url("/api/v1/mixed_companies/search"))
            .header("x-api-key", "k")
            .header("x-meter-table", "big")
            .header("accept-encoding", "gzip")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!(
                r#"{{"page":{page},"per_page":100}}"#
            ))))
            .unwrap();
        let (status, h, body) = send(&c, req).await;
        assert_eq!(status, 200);
        assert_eq!(h.get("content-encoding").unwrap(), "gzip");
        assert!(
            body.len() * 4 >= creditmeter::meter::OFFLOAD_BYTES,
            "the answer ({} bytes) is too small to take the offloaded path",
            body.len()
        );
        let billed: i64 = h["x-sim-billed-milli"].to_str().unwrap().parse().unwrap();
        let id = h.get("x-meter-request-id").unwrap().to_str().unwrap();
        let (credits, source, bytes): (i64, String, i64) = conn
            .query_row(
                "SELECT credits_milli, credit_source, response_bytes FROM calls WHERE request_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap_or_else(|e| panic!("page {page} received in full but not in the ledger: {e}"));
        assert_eq!(credits, billed, "page {page}");
        assert!(billed > 0, "a page of results is billed");
        assert_eq!(source, "catalog");
        assert_eq!(bytes as usize, body.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_disconnect_mid_body_still_leaves_a_priced_row() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let proxy = Proxy::start(config_for(&up.url(), None), dir.path()).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST /api/v1/people/match?script=slow HTTP/1.1\r\nHost: x\r\nX-Api-Key: k\r\nX-Meter-Table: leaver\r\nContent-Length: 2\r\n\r\n{}")
        .await
        .unwrap();
    // Read until the first chunk of the body arrives, then hang up.
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
    drop(s);
    // Upstream finishes 400 ms later; the proxy reads it to the end and records it.
    let conn = proxy.ledger();
    let mut row = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        row = conn
            .query_row(
                "SELECT outcome, credits_milli, credit_source, status, response_bytes FROM calls WHERE table_name = 'leaver'",
                [],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?, r.get::<_, i64>(4)?)),
            )
            .ok();
        if row.is_some() {
            break;
        }
    }
    let (outcome, credits, source, status, bytes) = row.expect("a row for the cancelled call");
    assert_eq!(outcome, "client_cancelled");
    assert_eq!(status, 200);
    assert_eq!(
        credits, 1000,
        "the person matched, so Apollo billed 1 credit"
    );
    assert_eq!(source, "catalog");
    assert!(bytes > 64 * 1024, "the whole body was read: {bytes}");
    let m = proxy.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_requests_total",
            &[("table", "leaver"), ("outcome", "client_cancelled")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_give_502_or_504_with_json_and_a_row() {
    let dir = tempfile::tempdir().unwrap();
    // A listener that accepts and hangs up without answering: a reset before any response.
    let reset = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reset_addr = reset.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = reset.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    let proxy = Proxy::start(
        config_for(&format!("http://{reset_addr}"), None),
        dir.path(),
    )
    .await;
    let req = http::Request::post(proxy.url("/api/v1/people/match"))
        .header("x-meter-table", "t")
        .header("x-api-key", "k")
        .body(Full::new(Bytes::from("{}")))
        .unwrap();
    let (status, _, body) = send(&client(), req).await;
    assert_eq!(status, 502);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"], "upstream_error");
    let (outcome, st, err): (String, Option<i64>, String) = proxy
        .ledger()
        .query_row("SELECT outcome, status, error FROM calls", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!((outcome.as_str(), st), ("upstream_error", None));
    assert!(!err.is_empty());

    // Nothing listening: connection refused.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let proxy2 = Proxy::start(config_for(&format!("http://{closed}"), None), dir2.path()).await;
    let (status, _, body) = send(
        &client(),
        http::Request::get(proxy2.url("/v1/people/match"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, 502);
    assert!(
        String::from_utf8_lossy(&body).contains("could not connect"),
        "{}",
        String::from_utf8_lossy(&body)
    );

    // A stall past upstream.timeout: 504.
    let up = Scripted::start().await;
    let dir3 = tempfile::tempdir().unwrap();
    let mut cfg = config_for(&up.url(), None);
    cfg.upstream.timeout = creditmeter::config::HumanDuration(Duration::from_millis(500));
    let proxy3 = Proxy::start(cfg, dir3.path()).await;
    let (status, _, body) = send(
        &client(),
        http::Request::get(proxy3.url("/v1/people/match?script=stall"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, 504);
    assert!(String::from_utf8_lossy(&body).contains("upstream_timeout"));
    let outcome: String = proxy3
        .ledger()
        .query_row("SELECT outcome FROM calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(outcome, "upstream_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_mid_body_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = up.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = up.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"person\": {\"id\": 1")
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(s);
        }
    });
    let proxy = Proxy::start(config_for(&format!("http://{up_addr}"), None), dir.path()).await;
    let req = http::Request::post(proxy.url("/api/v1/people/match"))
        .header("x-meter-table", "t")
        .body(Full::new(Bytes::from("{}")))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200, "the head had already been forwarded");
    assert!(
        resp.into_body().collect().await.is_err(),
        "the caller sees the body cut short"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (outcome, credits, source, err): (String, i64, String, String) = proxy
        .ledger()
        .query_row(
            "SELECT outcome, credits_milli, credit_source, error FROM calls",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(outcome, "upstream_error");
    // Apollo answered 200, so it billed: the most a plain match costs, marked as an estimate.
    assert_eq!(
        (credits, source.as_str()),
        (1000, "estimated"),
        "a 2xx cut short is priced at the catalog's worst case"
    );
    assert!(err.contains("upstream response body"), "{err}");
    assert!(err.contains("priced at the catalog's worst case"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_a_body_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let mut proxy = Proxy::start(config_for(&up.url(), None), dir.path()).await;
    let req = http::Request::post(proxy.url("/api/v1/people/match?script=slow"))
        .header("x-meter-table", "drain")
        .body(Full::new(Bytes::from("{}")))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    // Shutdown starts while the body is still streaming (upstream sends the rest 400 ms later).
    let db = proxy.db.clone();
    let stopper = tokio::spawn(async move {
        proxy.shutdown().await;
    });
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("body not cut off")
        .to_bytes();
    assert!(body.ends_with(b"\"request_id\": -1}"));
    stopper.await.unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (outcome, credits): (String, i64) = conn
        .query_row("SELECT outcome, credits_milli FROM calls", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((outcome.as_str(), credits), ("ok", 1000));
    // The listener is closed after shutdown.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_speaks_h2_and_rate_limits_become_gauges() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let sim = SimServer::start(SimConfig::default(), Some(&pki)).await;
    let mut cfg = config_for(&sim.url(true), Some(&pki.ca_pem));
    cfg.proxy.tls_cert = Some(pki.cert_pem.clone());
    cfg.proxy.tls_key = Some(pki.key_pem.clone());
    let proxy = Proxy::start(cfg, dir.path()).await;
    let c = direct_tls_client(&pki);
    let req = http::Request::post(format!(
        "https://localhost:{}/api/v1/people/match",
        proxy.addr.port()
    ))
    .header("x-api-key", "k")
    .header("x-meter-table", "tls")
    .body(Full::new(Bytes::from(r#"{"email":"x@y.com"}"#)))
    .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2, "ALPN picks h2");
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let m = proxy.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_apollo_rate_limit",
            &[("endpoint", "people_match"), ("window", "minute")]
        ),
        1000.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_apollo_rate_limit_remaining",
            &[("endpoint", "people_match"), ("window", "minute")]
        ),
        999.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_requests_total",
            &[("table", "tls"), ("code", "200")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_cap_gives_413_without_calling_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let mut cfg = config_for(&up.url(), None);
    cfg.proxy.max_request_body = creditmeter::config::ByteSize(1024);
    let proxy = Proxy::start(cfg, dir.path()).await;
    let big = "x".repeat(4096);
    let req = post(&proxy.url("/api/v1/people/bulk_match"), &big)
        .body(Full::new(Bytes::from(big.clone())))
        .unwrap();
    let (status, _, body) = send(&client(), req).await;
    assert_eq!(status, 413);
    assert!(String::from_utf8_lossy(&body).contains("max_request_body"));
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_holding_the_ledger_open_blocks_nothing() {
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
    // A person in sqlite3 with a read transaction open for the whole run.
    let reader = rusqlite::Connection::open(&proxy.db).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let before: i64 = reader
        .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    let c = client();
    let started = std::time::Instant::now();
    for i in 0..50 {
        let req = http::Request::post(proxy.url("/api/v1/people/match"))
            .header("x-api-key", "k")
            .header("x-meter-table", "while-reading")
            .body(Full::new(Bytes::from(format!(
                r#"{{"email":"r{i}@example.com"}}"#
            ))))
            .unwrap();
        assert_eq!(send(&c, req).await.0, 200);
    }
    // Far below the 5 s busy timeout a blocked writer would wait on each call.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let during: i64 = reader
        .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(during, before, "the reader keeps its snapshot");
    reader.execute_batch("COMMIT").unwrap();
    let after: i64 = reader
        .query_row(
            "SELECT count(*) FROM calls WHERE table_name = 'while-reading'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(after, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_requires_the_token_when_one_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let mut cfg = config_for(&up.url(), None);
    cfg.admin.token_env = "CREDITMETER_TEST_ADMIN_TOKEN_A".into();
    std::env::set_var("CREDITMETER_TEST_ADMIN_TOKEN_A", "s3cret-admin");
    let proxy = Proxy::start(cfg, dir.path()).await;
    let url = format!("http://{}/api/status", proxy.admin);
    let (status, h, _) = get(&url).await;
    assert_eq!(status, 401);
    assert_eq!(h.get("www-authenticate").unwrap(), "Bearer");
    for bad in [
        "Bearer wrong",
        "Bearer s3cret-admin-and-more",
        "Basic s3cret-admin",
    ] {
        let req = http::Request::get(&url)
            .header("authorization", bad)
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send(&client(), req).await.0, 401, "{bad}");
    }
    let req = http::Request::get(&url)
        .header("authorization", "Bearer s3cret-admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, body) = send(&client(), req).await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["durability"], "commit");
    // Metrics and health stay open for scrapers and probes.
    assert_eq!(get(&format!("http://{}/metrics", proxy.admin)).await.0, 200);
    assert_eq!(get(&format!("http://{}/healthz", proxy.admin)).await.0, 200);
    // The token appears nowhere in what the admin listener serves.
    assert!(!proxy.metrics().await.contains("s3cret-admin"));
}

/// A config for `upstream` with `proxy.metering = false`.
fn unmetered_config(upstream: &str) -> creditmeter::config::Config {
    let mut cfg = config_for(upstream, None);
    cfg.proxy.metering = false;
    cfg
}

/// Rows in `calls` once the proxy has shut down (so nothing can still be queued).
async fn calls_after_shutdown(proxy: &mut Proxy) -> usize {
    proxy.shutdown().await;
    rows(&proxy.ledger(), "1 = 1").len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metering_off_forwards_the_simulators_answer_and_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Two identical simulators: the proxy fronts one, the other gives the reference answer
    // (a sim's answer is a function of its seed and call count, so the bytes must match).
    let sim_cfg = SimConfig {
        rate_limit_minute: 0,
        match_rate_pct: 100,
        ..Default::default()
    };
    let sim = SimServer::start(sim_cfg.clone(), None).await;
    let twin = SimServer::start(sim_cfg, None).await;
    let mut proxy = Proxy::start(unmetered_config(&sim.url(false)), dir.path()).await;
    let (_, _, ready) = get(&format!("http://{}/readyz", proxy.admin)).await;
    let ready: serde_json::Value = serde_json::from_slice(&ready).unwrap();
    assert_eq!(ready["metering"], "off", "{ready}");

    let build = |url: String| {
        http::Request::post(url)
            .header("x-api-key", "test-key")
            .header("content-type", "application/json")
            .header("accept-encoding", "gzip")
    };
    let body = r#"{"email":"ada@example.com"}"#;
    let (ds, dh, db) = send(
        &client(),
        build(format!("{}/api/v1/people/match", twin.url(false)))
            .body(Full::new(Bytes::from(body)))
            .unwrap(),
    )
    .await;
    let (ps, ph, pb) = send(
        &client(),
        build(proxy.url("/api/v1/people/match?meter_table=Bench"))
            .header("x-meter-table", "Bench")
            .body(Full::new(Bytes::from(body)))
            .unwrap(),
    )
    .await;
    assert_eq!(ds, 200);
    assert_eq!(ps, ds, "status");
    assert_eq!(ph.get("content-encoding"), dh.get("content-encoding"));
    assert_eq!(ph.get("content-encoding").unwrap(), "gzip");
    assert!(
        pb == db,
        "the caller got different bytes than the simulator sent"
    );
    assert!(
        ph.get("x-meter-request-id").is_none(),
        "no ledger row, so no request id: {ph:?}"
    );
    // Upstream billed the call; creditmeter recorded none of it.
    assert_eq!(sim.sim.billed().lead_milli, 1000);
    assert_eq!(calls_after_shutdown(&mut proxy).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metering_off_still_strips_meter_headers_before_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let mut proxy = Proxy::start(unmetered_config(&up.url()), dir.path()).await;
    let body = r#"{"email":"ada@example.com"}"#;
    let req =
        attributed_post(&proxy.url(
            "/api/v1/people/match?meter_table=Q3&reveal_personal_emails=true&meter_workflow=wf",
        ))
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let (status, headers, got) = send(&client(), req).await;
    assert_eq!(status, 200);
    assert_eq!(
        got,
        Bytes::from_static(br#"{"person": {"id": "p1", "name": "Echo"}, "request_id": -7}"#)
    );
    assert!(headers.get("x-meter-request-id").is_none(), "{headers:?}");
    // A large streamed gzip body passes through byte for byte, its length announced.
    let req = http::Request::get(proxy.url("/api/v1/people/match?script=blob"))
        .header("accept-encoding", "gzip")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, h, got) = send(&client(), req).await;
    assert_eq!(status, 200);
    assert!(got == blob(), "blob: different bytes than upstream sent");
    assert_eq!(
        h.get("content-length").unwrap().to_str().unwrap(),
        blob().len().to_string()
    );

    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let s = &seen[0];
    assert_eq!(s.uri, "/api/v1/people/match?reveal_personal_emails=true");
    assert_forwarded_clean(s, up.addr);
    assert_eq!(s.body, Bytes::from(body));
    assert_eq!(calls_after_shutdown(&mut proxy).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metering_off_keeps_every_guard() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let mut cfg = unmetered_config(&up.url());
    cfg.proxy.max_request_body = creditmeter::config::ByteSize(1024);
    cfg.proxy.require_token = true;
    cfg.proxy.token_env = "CREDITMETER_TEST_PROXY_TOKEN_METEROFF".into();
    cfg.upstream.timeout = creditmeter::config::HumanDuration(Duration::from_millis(500));
    std::env::set_var("CREDITMETER_TEST_PROXY_TOKEN_METEROFF", "let-me-in");
    let mut proxy = Proxy::start(cfg, dir.path()).await;

    // Not an open proxy.
    for text in refused_as_open_proxy(&proxy).await {
        assert!(!text.to_ascii_lowercase().contains("x-meter-request-id"));
    }

    // The token, attribution and body-cap checks answer as a metered proxy does, and
    // upstream.timeout still bounds the wait for the response head; none is recorded.
    let call = |query: &str, token: Option<&str>, table: &str, body: usize| {
        let mut b = http::Request::post(proxy.url(&format!("/api/v1/people/match{query}")))
            .header("x-api-key", "k")
            .header("x-meter-table", table);
        if let Some(t) = token {
            b = b.header("x-meter-token", t);
        }
        b.body(Full::new(Bytes::from("x".repeat(body)))).unwrap()
    };
    let long = "t".repeat(129);
    for (req, want, code, field) in [
        (
            call("", None, "t", 2),
            401,
            "proxy_token_required",
            Some("X-Meter-Token"),
        ),
        (
            call("", Some("let-me-in"), &long, 2),
            400,
            "invalid_attribution",
            Some("X-Meter-Table"),
        ),
        (
            call("", Some("let-me-in"), "t", 4096),
            413,
            "request_body_too_large",
            None,
        ),
        (
            call("?script=stall", Some("let-me-in"), "t", 2),
            504,
            "upstream_timeout",
            None,
        ),
    ] {
        let (status, h, body) = send(&client(), req).await;
        assert_eq!(status, want, "{code}");
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"], code, "{json}");
        assert_eq!(json["field"].as_str(), field, "{json}");
        assert!(json.get("request_id").is_none(), "{json}");
        assert!(h.get("x-meter-request-id").is_none(), "{code}");
    }
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the call that passed every check was sent upstream"
    );
    assert_eq!(calls_after_shutdown(&mut proxy).await, 0);
}

// --- Requests read as Apollo reads them (issue 13: paths and bodies) ---------------------------

fn gzipped(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// One row's `path`, `endpoint`, `credits_milli`, `credit_source` and `error`.
fn row_by_id(
    conn: &rusqlite::Connection,
    id: &str,
) -> (String, String, i64, String, Option<String>) {
    conn.query_row(
        "SELECT path, endpoint, credits_milli, credit_source, error FROM calls WHERE request_id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    )
    .unwrap()
}

fn request_id(h: &http::HeaderMap) -> String {
    h.get("x-meter-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_forwarded_recorded_and_priced_in_the_form_apollo_routes() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let proxy = Proxy::start(config_for(&up.url(), None), dir.path()).await;
    let c = client();
    // (what the caller sent, what upstream must see and the ledger hold, endpoint, credits)
    let cases = [
        // A base URL with a trailing slash.
        (
            "//api/v1/people/match",
            "/api/v1/people/match",
            "people_match",
            1000,
        ),
        (
            "/api//v1///people/match",
            "/api/v1/people/match",
            "people_match",
            1000,
        ),
        (
            "/api/v1/%70eople/%6Datch",
            "/api/v1/people/match",
            "people_match",
            1000,
        ),
        (
            "/api/v1/people/match/",
            "/api/v1/people/match/",
            "people_match",
            1000,
        ),
        (
            "//v1/./people/x/../match",
            "/v1/people/match",
            "people_match",
            1000,
        ),
        // An escaped reserved character is data, not a separator: forwarded escaped (hex
        // upper-cased, an equivalence), unpriced.
        (
            "/api/v1/people%2fmatch",
            "/api/v1/people%2Fmatch",
            "other",
            0,
        ),
    ];
    for (sent, _, _, _) in &cases {
        let req = http::Request::post(proxy.url(&format!("{sent}?a=1&meter_table=paths")))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"email":"a@x.com"}"#)))
            .unwrap();
        let (status, h, _) = send(&c, req).await;
        assert_eq!(status, 200, "{sent}");
        let (path, endpoint, credits, _, _) = row_by_id(&proxy.ledger(), &request_id(&h));
        let (_, canonical, want_endpoint, want_credits) =
            cases.iter().find(|c| c.0 == *sent).unwrap();
        assert_eq!(
            (path.as_str(), endpoint.as_str(), credits),
            (*canonical, *want_endpoint, *want_credits),
            "{sent}"
        );
    }
    let seen = up.seen.lock().unwrap().clone();
    let forwarded: Vec<&str> = seen.iter().map(|s| s.uri.as_str()).collect();
    let want: Vec<String> = cases.iter().map(|c| format!("{}?a=1", c.1)).collect();
    assert_eq!(
        forwarded, want,
        "upstream sees exactly the path that was priced"
    );

    // The one 2xx no endpoint prices is counted, so a new Apollo endpoint gets noticed.
    let m = proxy.metrics().await;
    assert_eq!(
        metric_sum(&m, "creditmeter_unpriced_total", &[("method", "POST")]),
        1.0
    );
    assert_eq!(
        metric_sum(&m, "creditmeter_unpriced_total", &[("method", "GET")]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_and_gzip_request_bodies_go_upstream_as_sent_and_are_priced_like_json() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let proxy = Proxy::start(config_for(&up.url(), None), dir.path()).await;
    let c = client();
    let json = br#"{"email":"a@x.com","reveal_phone_number":true}"#.to_vec();
    let form = b"email=a%40x.com&reveal_phone_number=true".to_vec();
    let form_type = "application/x-www-form-urlencoded";
    // (content type, content encoding, body)
    let bodies: Vec<(&str, Option<&str>, Vec<u8>)> = vec![
        ("application/json", None, json.clone()),
        (form_type, None, form.clone()),
        ("application/json", Some("gzip"), gzipped(&json)),
        (form_type, Some("gzip"), gzipped(&form)),
    ];
    let mut priced = Vec::new();
    for (content_type, encoding, body) in &bodies {
        let mut req = http::Request::post(proxy.url("/api/v1/people/match"))
            .header("x-meter-table", "bodies")
            .header("content-type", *content_type);
        if let Some(e) = encoding {
            req = req.header("content-encoding", *e);
        }
        let (status, h, _) =
            send(&c, req.body(Full::new(Bytes::from(body.clone()))).unwrap()).await;
        assert_eq!(status, 200);
        let (_, _, credits, source, error) = row_by_id(&proxy.ledger(), &request_id(&h));
        priced.push((credits, source, error));
    }
    // The request went upstream byte for byte, with its headers; only our copy was decoded.
    let seen = up.seen.lock().unwrap().clone();
    for (s, (content_type, encoding, body)) in seen.iter().zip(&bodies) {
        assert_eq!(s.body, Bytes::from(body.clone()));
        assert_eq!(s.headers.get("content-type").unwrap(), *content_type);
        assert_eq!(
            s.headers
                .get("content-encoding")
                .map(|v| v.to_str().unwrap()),
            *encoding
        );
    }
    // Each form of the same request is priced as the JSON one: the phone reveal was read.
    let json_priced = priced[0].clone();
    assert_eq!(json_priced.1, "catalog");
    for (i, p) in priced.iter().enumerate() {
        assert_eq!(*p, json_priced, "body {i} ({:?})", bodies[i].0);
    }

    // A body whose parameters cannot be read: the worst case, estimated, and why.
    let unreadable: Vec<(&str, Option<&str>, Vec<u8>, &str)> = vec![
        (
            "application/json",
            None,
            b"{\"email\": ".to_vec(),
            "request body is not valid JSON",
        ),
        (
            "text/plain",
            None,
            b"email=a".to_vec(),
            "Content-Type `text/plain`",
        ),
        (
            "application/json",
            Some("gzip"),
            json.clone(),
            "could not be decoded: gzip",
        ),
    ];
    for (content_type, encoding, body, why) in unreadable {
        let mut req = http::Request::post(proxy.url("/api/v1/people/match"))
            .header("x-meter-table", "bodies")
            .header("content-type", content_type);
        if let Some(e) = encoding {
            req = req.header("content-encoding", e);
        }
        let (status, h, _) = send(&c, req.body(Full::new(Bytes::from(body))).unwrap()).await;
        assert_eq!(status, 200, "{why}");
        let (_, _, credits, source, error) = row_by_id(&proxy.ledger(), &request_id(&h));
        assert_eq!(source, "estimated", "{why}");
        assert!(credits >= json_priced.0, "{why}: {credits}");
        let error = error.unwrap_or_default();
        assert!(error.contains(why), "{why}: {error}");
    }
}

/// (table, method, path, content type, gzip the body?, body)
type WorkloadCall = (
    &'static str,
    &'static str,
    String,
    Option<&'static str>,
    bool,
    Vec<u8>,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_table_ledger_equals_the_simulator_for_doubled_slashes_forms_and_gzip() {
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
    let c = client();
    let form_type = "application/x-www-form-urlencoded";
    let mut calls: Vec<WorkloadCall> = Vec::new();
    for i in 0..12 {
        calls.push((
            "Slashes",
            "POST",
            "//api/v1/people/match".into(),
            Some("application/json"),
            false,
            format!(r#"{{"email":"s{i}@acme{i}.com"}}"#).into_bytes(),
        ));
        calls.push((
            "Slashes",
            "GET",
            format!("//v1/organizations/enrich?domain=slash{i}.com"),
            None,
            false,
            Vec::new(),
        ));
        calls.push((
            "Slashes",
            "POST",
            "/api//v1/%70eople/bulk_match".into(),
            Some("application/json"),
            false,
            format!(r#"{{"details":[{{"email":"b{i}@x{i}.com"}},{{"email":"c{i}@y{i}.com"}}]}}"#)
                .into_bytes(),
        ));
        calls.push((
            "Forms",
            "POST",
            "/api/v1/people/match".into(),
            Some(form_type),
            false,
            format!("email=f{i}%40forms{i}.com&first_name=Ann").into_bytes(),
        ));
        calls.push(("Forms", "POST", "/api/v1/people/bulk_match".into(), Some(form_type), false,
            format!("details[][email]=g{i}%40a.com&details[][email]=h{i}%40b.com&details[][email]=k{i}%40c.com").into_bytes()));
        calls.push((
            "Gzip",
            "POST",
            "/api/v1/organizations/bulk_enrich".into(),
            Some("application/json"),
            true,
            format!(r#"{{"domains":["gz{i}.com","hz{i}.com"]}}"#).into_bytes(),
        ));
        calls.push((
            "Gzip",
            "POST",
            "/v1/people/match".into(),
            Some(form_type),
            true,
            format!("email=z{i}%40gzip{i}.com").into_bytes(),
        ));
    }
    let mut billed: BTreeMap<String, i64> = BTreeMap::new();
    for (table, method, path, content_type, gzip, body) in &calls {
        let mut req = http::Request::builder()
            .method(*method)
            .uri(proxy.url(path))
            .header("x-api-key", "k")
            .header("x-meter-table", *table);
        if let Some(t) = content_type {
            req = req.header("content-type", *t);
        }
        let body = if *gzip {
            req = req.header("content-encoding", "gzip");
            gzipped(body)
        } else {
            body.clone()
        };
        let (status, h, answer) = send(&c, req.body(Full::new(Bytes::from(body))).unwrap()).await;
        assert!(status.is_success(), "{method} {path}: {status} {answer:?}");
        let milli: i64 = h
            .get("x-sim-billed-milli")
            .map(|v| v.to_str().unwrap().parse().unwrap())
            .unwrap_or(0);
        *billed.entry((*table).to_owned()).or_default() += milli;
    }
    let conn = proxy.ledger();
    let ledger = ledger_by_table(&conn);
    let m = proxy.metrics().await;
    for table in ["Slashes", "Forms", "Gzip"] {
        let want = billed.get(table).copied().unwrap_or(0);
        assert!(want > 0, "{table}: the workload bills something");
        assert_eq!(
            ledger.get(table).copied().unwrap_or(0),
            want,
            "{table}: ledger vs simulator"
        );
        let metric = metric_sum(&m, "creditmeter_credits_total", &[("table", table)]);
        assert!(
            (metric - want as f64 / 1000.0).abs() < 1e-6,
            "{table}: metric {metric}"
        );
    }
    let total = sim.sim.billed();
    assert_eq!(
        billed.values().sum::<i64>(),
        total.lead_milli + total.direct_dial_milli + total.export_milli
    );
    // Every row is priced by its endpoint, under the path Apollo saw, and the form bodies'
    // `details` were counted.
    let (other, doubled): (i64, i64) = conn
        .query_row(
            "SELECT sum(endpoint = 'other'), sum(instr(path, '//') > 0) FROM calls",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((other, doubled), (0, 0));
    let requested: i64 = conn
        .query_row(
            "SELECT sum(records_requested) FROM calls WHERE table_name = 'Forms' AND endpoint = 'people_bulk_match'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(requested, 12 * 3);
}

/// An upstream that answers people/match with a 200 head and half a body, then stalls for
/// `stall` (and then closes).
async fn half_answer_upstream(stall: Duration) -> std::net::SocketAddr {
    let (addr, _) = raw_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"person\": {\"id\": \"p1\"",
        stall,
        false,
    )
    .await;
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2xx_cut_short_settles_its_budget_reservation_at_the_worst_case() {
    let dir = tempfile::tempdir().unwrap();
    let up = half_answer_upstream(Duration::from_millis(50)).await;
    let mut cfg = config_for(&format!("http://{up}"), None);
    let budgets = creditmeter::config::Config::from_toml(
        "[[budget]]\nname = \"all\"\nscope = \"global\"\nlimit = 100\nwindow = \"month\"\n",
    )
    .unwrap();
    cfg.budget = budgets.budget;
    cfg.validate().unwrap();
    let proxy = Proxy::start(cfg, dir.path()).await;
    let req = http::Request::post(proxy.url("/api/v1/people/match"))
        .header("x-meter-table", "cut")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"email":"a@x.com"}"#)))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.into_body().collect().await.is_err(), "cut short");
    let r = wait_rows(&proxy.ledger(), "table_name = 'cut'", 1)
        .await
        .remove(0);
    assert_eq!(
        (
            r.outcome.as_str(),
            r.credits_milli,
            r.credit_source.as_str()
        ),
        ("upstream_error", 1000, "estimated")
    );
    // The reservation was settled at that amount, not handed back.
    let m = proxy.metrics().await;
    assert_eq!(
        metric_sum(&m, "creditmeter_budget_spent_credits", &[("budget", "all")]),
        1.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_budget_reserved_credits",
            &[("budget", "all")]
        ),
        0.0
    );
    assert_eq!(
        metric_sum(&m, "creditmeter_credits_total", &[("table", "cut")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2xx_cut_off_by_the_shutdown_hard_stop_is_priced_at_the_worst_case() {
    let dir = tempfile::tempdir().unwrap();
    let up = half_answer_upstream(Duration::from_secs(30)).await;
    let mut cfg = config_for(&format!("http://{up}"), None);
    cfg.shutdown.grace = creditmeter::config::HumanDuration(Duration::from_millis(300));
    let mut proxy = Proxy::start(cfg, dir.path()).await;
    let req = http::Request::post(proxy.url("/api/v1/people/bulk_match"))
        .header("x-meter-table", "stopped")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from_static(
            b"details[][email]=a%40x.com&details[][email]=b%40y.com",
        )))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let db = proxy.db.clone();
    // The body stalls; shutdown's grace passes and the hard stop cuts the call off.
    let body = tokio::spawn(async move { resp.into_body().collect().await.is_err() });
    proxy.shutdown().await;
    assert!(body.await.unwrap(), "the caller sees the body cut off");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let r = rows(&conn, "table_name = 'stopped'");
    assert_eq!(r.len(), 1, "{r:?}");
    // Two details asked for: at most two lead credits, recorded as an estimate.
    assert_eq!(
        (r[0].status, r[0].credits_milli, r[0].credit_source.as_str()),
        (Some(200), 2000, "estimated"),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_request_bomb_is_decoded_no_further_than_proxy_max_request_body() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let mut cfg = config_for(&up.url(), None);
    cfg.proxy.max_request_body = creditmeter::config::ByteSize(64 << 10);
    let proxy = Proxy::start(cfg, dir.path()).await;
    // 8 MiB of JSON padding in a few KiB: small on the wire, under the body cap.
    let mut json = br#"{"email":"a@x.com","pad":""#.to_vec();
    json.resize(8 << 20, b' ');
    let bomb = gzipped(&json);
    assert!(bomb.len() < 64 << 10);
    let req = http::Request::post(proxy.url("/api/v1/people/match"))
        .header("x-meter-table", "bomb")
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(Full::new(Bytes::from(bomb.clone())))
        .unwrap();
    let (status, h, _) = send(&client(), req).await;
    assert_eq!(
        status, 200,
        "forwarded as sent: Apollo decides what to make of it"
    );
    assert_eq!(up.seen.lock().unwrap()[0].body, Bytes::from(bomb));
    let (_, _, _, source, error) = row_by_id(&proxy.ledger(), &request_id(&h));
    assert_eq!(source, "estimated");
    let error = error.unwrap_or_default();
    assert!(error.contains("decoded body exceeds 64 KiB cap"), "{error}");
}
