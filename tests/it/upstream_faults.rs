#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Upstream faults (issue 5, point 3): for each way Apollo (or the path to it) can misbehave,
//! the caller gets a clear error or exactly the upstream bytes, and the ledger row says what
//! happened (`outcome`, `status`, `error`, `credit_source`). A 2xx whose body cannot be read
//! (cut short, past the deadline, over the cap, corrupt, malformed) was billed by Apollo all the
//! same, so it is priced at the catalog's worst case for what was asked, with source
//! `estimated` (issue 13); a non-2xx or no response at all is priced at 0. The big-body and bomb tests run the real binary as
//! a child process so that its peak memory (`VmHWM`) is creditmeter's alone.

use crate::common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::binary::Served;
use common::request::Call;
use common::*;
use creditmeter::config::HumanDuration;
use creditmeter_sim::SimConfig;
use http_body_util::{BodyExt, Full};

/// What a caller saw: status, headers, the bytes it got, and whether the body ended in error.
struct Seen {
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: Vec<u8>,
    body_error: Option<String>,
}

/// Sends a people/match call for `table` and reads the body frame by frame, keeping what
/// arrived before any error.
async fn call(url: &str, table: &str) -> Seen {
    let req = Call::post(url)
        .json_type()
        .key("fault-key")
        .table(table)
        .body(r#"{"email":"ada@example.com"}"#)
        .build();
    let resp = tokio::time::timeout(Duration::from_secs(30), client().request(req))
        .await
        .expect("response head within 30s")
        .expect("response head");
    let (parts, mut body) = resp.into_parts();
    let mut bytes = Vec::new();
    let mut body_error = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    bytes.extend_from_slice(d);
                }
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                body_error = Some(e.to_string());
                break;
            }
            Err(_) => panic!("body stalled for 30s"),
        }
    }
    Seen {
        status: parts.status,
        headers: parts.headers,
        body: bytes,
        body_error,
    }
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// The one row for `table`.
async fn row(proxy: &Proxy, table: &str) -> Row {
    let mut found = wait_rows(&proxy.ledger(), &format!("table_name = '{table}'"), 1).await;
    assert_eq!(found.len(), 1, "{found:?}");
    found.remove(0)
}

/// A row for a call that never got a response head: no status, nothing priced.
fn assert_unpriced_failure(r: &Row, outcome: &str, error_has: &str) {
    assert_eq!(r.outcome, outcome, "{r:?}");
    assert_eq!(r.status, None, "{r:?}");
    assert_eq!(
        (r.credits_milli, r.credit_source.as_str()),
        (0, "none"),
        "{r:?}"
    );
    let err = r.error.as_deref().unwrap_or("");
    assert!(err.contains(error_has), "error {err:?} lacks {error_has:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_a_502_and_an_unpriced_row() {
    let dir = tempfile::tempdir().unwrap();
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = Proxy::start(config_for(&format!("http://{closed}"), None), dir.path()).await;
    let seen = call(&proxy.url("/api/v1/people/match"), "refused").await;
    assert_eq!(seen.status, 502);
    let body = json(&seen.body);
    assert_eq!(body["error"], "upstream_error");
    assert_eq!(body["source"], "creditmeter");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("could not connect"), "{message}");
    assert!(message.to_lowercase().contains("refused"), "{message}");
    assert_eq!(
        seen.headers
            .get("x-meter-request-id")
            .unwrap()
            .to_str()
            .unwrap(),
        body["request_id"]
    );
    let r = row(&proxy, "refused").await;
    assert_unpriced_failure(&r, "upstream_error", "could not connect");
    let m = proxy.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_requests_total",
            &[
                ("table", "refused"),
                ("code", "none"),
                ("outcome", "upstream_error")
            ]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let real = make_pki(&dir.path().join("real").tap_mkdir());
    let other = make_pki(&dir.path().join("other").tap_mkdir());
    let sim = SimServer::start(SimConfig::default(), Some(&real)).await;
    // creditmeter trusts only `other` (and the public roots): the sim's chain is unknown.
    let proxy = Proxy::start(config_for(&sim.url(true), Some(&other.ca_pem)), dir.path()).await;
    let seen = call(&proxy.url("/api/v1/people/match"), "wrong-ca").await;
    assert_eq!(seen.status, 502);
    let message = json(&seen.body)["message"].as_str().unwrap().to_owned();
    // Both test CAs share a name, so rustls finds the issuer and rejects its signature
    // (`BadSignature`); a CA it had never heard of would be `UnknownIssuer`.
    assert!(message.contains("invalid peer certificate"), "{message}");
    let r = row(&proxy, "wrong-ca").await;
    assert_unpriced_failure(&r, "upstream_error", "invalid peer certificate");
    assert_eq!(
        sim.sim.billed().calls,
        0,
        "no request crossed the failed handshake"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_an_expired_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let expired = make_pki_with(dir.path(), true);
    let sim = SimServer::start(SimConfig::default(), Some(&expired)).await;
    let proxy = Proxy::start(
        config_for(&sim.url(true), Some(&expired.ca_pem)),
        dir.path(),
    )
    .await;
    let seen = call(&proxy.url("/api/v1/people/match"), "expired").await;
    assert_eq!(seen.status, 502);
    let message = json(&seen.body)["message"].as_str().unwrap().to_owned();
    assert!(message.contains("certificate expired"), "{message}");
    let r = row(&proxy, "expired").await;
    assert_unpriced_failure(&r, "upstream_error", "certificate expired");
    assert_eq!(sim.sim.billed().calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_or_close_mid_headers_is_a_502_sent_once() {
    for (table, reset) in [("rst-head", true), ("eof-head", false)] {
        let dir = tempfile::tempdir().unwrap();
        let (addr, hits) = raw_upstream(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-len",
            Duration::from_millis(50),
            reset,
        )
        .await;
        let proxy = Proxy::start(config_for(&format!("http://{addr}"), None), dir.path()).await;
        let seen = call(&proxy.url("/api/v1/people/match"), table).await;
        assert_eq!(seen.status, 502, "{table}");
        let message = json(&seen.body)["message"].as_str().unwrap().to_owned();
        assert!(
            message.contains("upstream failed before sending a response"),
            "{table}: {message}"
        );
        let r = row(&proxy, table).await;
        assert_unpriced_failure(&r, "upstream_error", "before sending a response");
        // The request had been sent, so it must not be retried: a retry could bill twice.
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "{table}: upstream connections"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_body_cuts_the_caller_off_and_is_priced_at_the_worst_case() {
    const HEAD: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n";
    const PART: &[u8] = b"{\"person\": {\"id\": \"p1\", \"name\": \"Cut Short\"";
    static REPLY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let reply = REPLY.get_or_init(|| [HEAD, PART].concat());
    let dir = tempfile::tempdir().unwrap();
    let (addr, _) = raw_upstream(reply, Duration::from_millis(100), true).await;
    let proxy = Proxy::start(config_for(&format!("http://{addr}"), None), dir.path()).await;
    let seen = call(&proxy.url("/api/v1/people/match"), "rst-body").await;
    assert_eq!(seen.status, 200, "the head had already been forwarded");
    assert_eq!(seen.body, PART, "the caller got every byte upstream sent");
    assert!(
        seen.body_error.is_some(),
        "and then an error, not a clean end"
    );
    let r = row(&proxy, "rst-body").await;
    assert_eq!(r.outcome, "upstream_error");
    assert_eq!(r.status, Some(200));
    assert_eq!(
        (r.credits_milli, r.credit_source.as_str()),
        (1000, "estimated"),
        "Apollo answered 200, so it billed: the most a plain match costs"
    );
    assert_eq!(r.response_bytes, PART.len() as i64);
    let err = r.error.unwrap();
    assert!(err.contains("upstream response body"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_past_the_timeout_is_a_504_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let mut cfg = config_for(&up.url(), None);
    cfg.upstream.timeout = HumanDuration(Duration::from_millis(500));
    let proxy = Proxy::start(cfg, dir.path()).await;
    let started = Instant::now();
    let seen = call(&proxy.url("/api/v1/people/match?script=stall"), "stall").await;
    let took = started.elapsed();
    assert_eq!(seen.status, 504);
    assert_eq!(json(&seen.body)["error"], "upstream_timeout");
    assert!(
        took < Duration::from_millis(2500),
        "answered after {took:?}, not at the timeout"
    );
    let r = row(&proxy, "stall").await;
    assert_unpriced_failure(&r, "upstream_timeout", "upstream.timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_drip_is_cut_off_at_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let mut cfg = config_for(&up.url(), None);
    cfg.upstream.timeout = HumanDuration(Duration::from_secs(1));
    let proxy = Proxy::start(cfg, dir.path()).await;
    let started = Instant::now();
    // 4,000 bytes at 100 bytes per 100 ms would take 4 s; the exchange may take 1 s.
    let seen = call(&proxy.url("/api/v1/people/match?script=drip"), "drip").await;
    let took = started.elapsed();
    assert_eq!(seen.status, 200, "the head arrived in time");
    assert!(
        seen.body_error.is_some(),
        "the body is cut off, not ended cleanly"
    );
    assert!(
        (300..4000).contains(&seen.body.len()),
        "got {} bytes",
        seen.body.len()
    );
    assert!(took < Duration::from_millis(2500), "cut off after {took:?}");
    let r = row(&proxy, "drip").await;
    assert_eq!(r.outcome, "upstream_timeout");
    assert_eq!(r.status, Some(200));
    assert_eq!(
        (r.credits_milli, r.credit_source.as_str()),
        (1000, "estimated"),
        "a 200 cut off at the deadline is priced at the worst case"
    );
    assert_eq!(
        r.response_bytes,
        seen.body.len() as i64,
        "counted what was forwarded"
    );
    let err = r.error.unwrap();
    assert!(
        err.contains("did not finish within upstream.timeout"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_storm_is_recorded_call_by_call_and_priced_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let proxy = Proxy::start(config_for(&up.url(), None), dir.path()).await;
    const CALLS: usize = 300;
    let codes = [500u16, 503, 502, 504, 500, 503];
    let c = client();
    let mut tasks = tokio::task::JoinSet::new();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    for i in 0..CALLS {
        let code = codes[i % codes.len()];
        let (c, sem, url) = (
            c.clone(),
            sem.clone(),
            proxy.url(&format!("/api/v1/people/match?script=status&code={code}")),
        );
        tasks.spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let req = http::Request::post(url)
                .header("x-api-key", "storm-key")
                .header("x-meter-table", "storm")
                .body(Full::new(Bytes::from("{}")))
                .unwrap();
            let (status, h, body) = send(&c, req).await;
            assert_eq!(status.as_u16(), code, "the caller gets upstream's status");
            assert_eq!(h.get("retry-after").unwrap(), "1", "and its headers");
            assert!(String::from_utf8_lossy(&body).contains(&format!("upstream says {code}")));
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        CALLS,
        "each call went up exactly once"
    );
    let conn = proxy.ledger();
    let all = rows(&conn, "table_name = 'storm'");
    assert_eq!(all.len(), CALLS, "every 5xx is a row");
    assert!(all
        .iter()
        .all(|r| r.outcome == "ok" && r.credits_milli == 0 && r.credit_source == "none"));
    let m = proxy.metrics().await;
    for code in [500, 502, 503, 504] {
        let want = (0..CALLS)
            .filter(|i| codes[i % codes.len()] == code)
            .count();
        let in_ledger = all.iter().filter(|r| r.status == Some(code.into())).count();
        assert_eq!(in_ledger, want, "ledger rows with status {code}");
        let counted = metric_sum(
            &m,
            "creditmeter_requests_total",
            &[("table", "storm"), ("code", &code.to_string())],
        );
        assert_eq!(counted, want as f64, "requests_total{{code=\"{code}\"}}");
    }
    assert_eq!(
        metric_sum(&m, "creditmeter_credits_total", &[("table", "storm")]),
        0.0
    );
    // Still healthy afterwards.
    let seen = call(&proxy.url("/api/v1/people/match"), "after-storm").await;
    assert_eq!(seen.status, 200);
    assert_eq!(row(&proxy, "after-storm").await.credits_milli, 1000);
}

/// A complete 200 whose body cannot be read: the caller gets exactly upstream's bytes, the row
/// is `ok` with status 200, the worst case of a plain match (1 credit), source `estimated`, and
/// `error` says why.
async fn unreadable_body_case(script: &str, table: &str, error_has: &str, expected: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let proxy = Proxy::start(config_for(&up.url(), None), dir.path()).await;
    let seen = call(
        &proxy.url(&format!("/api/v1/people/match?script={script}")),
        table,
    )
    .await;
    assert_eq!(seen.status, 200, "{script}");
    assert!(seen.body_error.is_none(), "{script}: {:?}", seen.body_error);
    assert!(
        seen.body == expected,
        "{script}: the caller got other bytes than upstream sent"
    );
    let r = row(&proxy, table).await;
    assert_eq!((r.outcome.as_str(), r.status), ("ok", Some(200)), "{r:?}");
    assert_eq!(
        (r.credits_milli, r.credit_source.as_str()),
        (1000, "estimated"),
        "an unreadable 200 is priced at the worst case: {r:?}"
    );
    assert_eq!(r.response_bytes, expected.len() as i64);
    let err = r.error.unwrap_or_default();
    assert!(
        err.contains(error_has),
        "{script}: error {err:?} lacks {error_has:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_gzip_is_forwarded_as_is_and_priced_at_the_worst_case() {
    let full = blob();
    let cut = full.slice(..full.len() / 2);
    unreadable_body_case("truncgz", "truncgz", "gzip decode failed", &cut).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_forwarded_as_is_and_priced_at_the_worst_case() {
    unreadable_body_case(
        "malformed",
        "malformed",
        "response body is not JSON",
        br#"{"person": {"id": "p1", "name": "#,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_of_the_wrong_shape_is_forwarded_as_is_and_priced_at_the_worst_case() {
    unreadable_body_case(
        "shape",
        "shape",
        "response field `person` is a string, expected an object",
        br#"{"person": "yes"}"#,
    )
    .await;
    unreadable_body_case(
        "array",
        "array",
        "response body is a JSON array, not an object",
        br#"[{"person": {"id": "p1"}}, {"person": {"id": "p2"}}]"#,
    )
    .await;
}

/// Streams a GET through `served` and returns (status, bytes received, the last 16 bytes).
async fn stream_through(url: &str, table: &str) -> (u16, u64, Vec<u8>) {
    let req = http::Request::get(url)
        .header("x-api-key", "big-key")
        .header("x-meter-table", table)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let (mut n, mut tail) = (0u64, Vec::new());
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(60), body.frame())
        .await
        .expect("no 60 s stall")
    {
        if let Ok(d) = frame.unwrap().into_data() {
            n += d.len() as u64;
            tail.extend_from_slice(&d);
            if tail.len() > 64 {
                tail.drain(..tail.len() - 16);
            }
        }
    }
    let keep = tail.len().saturating_sub(16);
    (status, n, tail.split_off(keep))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn served_row(served: &Served, table: &str) -> Row {
    let conn = rusqlite::Connection::open_with_flags(
        &served.ledger,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut found = rows(&conn, &format!("table_name = '{table}'"));
    assert_eq!(found.len(), 1, "{table}: {found:?}");
    found.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mib_body_streams_through_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let served = Served::start(
        dir.path(),
        &[("upstream.base_url", format!("\"{}\"", up.url()))],
        &[],
    );
    let baseline = vm_hwm_kib(served.pid());

    // 200 MiB: forwarded whole, never held whole; past the pricing copy's cap
    // (catalog.max_inspect, 16 MiB by default) the copy is dropped, so the person in the body
    // cannot be proven and is not charged.
    let big_mb = 200;
    let started = Instant::now();
    let (status, n, tail) = stream_through(
        &served.url(&format!("/api/v1/people/match?script=huge&mb={big_mb}")),
        "huge",
    )
    .await;
    let took = started.elapsed();
    assert_eq!(
        (status, n),
        (200, huge_len(big_mb) as u64),
        "every byte arrived"
    );
    assert!(tail.ends_with(HUGE_TAIL));
    let after_big = vm_hwm_kib(served.pid());

    // Under the cap: kept, decoded, parsed and priced.
    let small_mb = 12;
    let (status, n, tail) = stream_through(
        &served.url(&format!("/api/v1/people/match?script=huge&mb={small_mb}")),
        "under-cap",
    )
    .await;
    assert_eq!((status, n), (200, huge_len(small_mb) as u64));
    assert!(tail.ends_with(HUGE_TAIL));
    let after_small = vm_hwm_kib(served.pid());
    report(&format!(
        "200 MiB body: {:.1} s through the proxy; creditmeter VmHWM: {:.1} MiB at start, {:.1} MiB after the 200 MiB body, {:.1} MiB after a {small_mb} MiB body that was priced",
        took.as_secs_f64(),
        mib(baseline),
        mib(after_big),
        mib(after_small)
    ));
    check_big_body_rows(&served, small_mb, big_mb);
    // At most 16 MiB of a body is held for pricing, whatever its size.
    assert!(
        after_big < 100 * 1024,
        "creditmeter peaked at {:.1} MiB for a 200 MiB body",
        mib(after_big)
    );
    // A priced body is held, decoded and parsed once: a small multiple of its size.
    assert!(after_small < 160 * 1024, "{:.1} MiB", mib(after_small));
    served.stop();
}

fn check_big_body_rows(served: &Served, small_mb: usize, big_mb: usize) {
    let small = served_row(served, "under-cap");
    assert_eq!((small.outcome.as_str(), small.status), ("ok", Some(200)));
    assert_eq!(
        (small.credits_milli, small.credit_source.as_str()),
        (1000, "catalog"),
        "a complete body under the cap is priced: {small:?}"
    );
    assert_eq!(small.response_bytes, huge_len(small_mb) as i64);
    let big = served_row(served, "huge");
    assert_eq!((big.outcome.as_str(), big.status), ("ok", Some(200)));
    assert_eq!(big.response_bytes, huge_len(big_mb) as i64);
    assert_eq!(
        (big.credits_milli, big.credit_source.as_str()),
        (1000, "estimated"),
        "past the pricing cap the body cannot be read: the worst case: {big:?}"
    );
    let err = big.error.unwrap_or_default();
    report(&format!("200 MiB body row: error = {err:?}"));
    assert!(
        err.contains("larger than catalog.max_inspect (16777216 bytes)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_is_stopped_at_the_decode_cap() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let served = Served::start(
        dir.path(),
        &[("upstream.base_url", format!("\"{}\"", up.url()))],
        &[],
    );
    let baseline = vm_hwm_kib(served.pid());
    // 1 GiB of JSON in about a megabyte of gzip; catalog.max_decoded is 64 MiB by default.
    let mb = 1024;
    let bomb = gzip_bomb(mb);
    let started = Instant::now();
    let req = http::Request::get(served.url(&format!("/api/v1/people/match?script=bomb&mb={mb}")))
        .header("x-api-key", "bomb-key")
        .header("x-meter-table", "bomb")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, h, body) = send(&client(), req).await;
    let took = started.elapsed();
    assert_eq!(status, 200);
    assert_eq!(h.get("content-encoding").unwrap(), "gzip");
    assert!(
        body == bomb,
        "the caller got the compressed bytes untouched"
    );
    let peak = vm_hwm_kib(served.pid());
    report(&format!(
        "gzip bomb: {:.2} MiB on the wire, {mb} MiB decoded if unchecked; answered in {:.1} s; creditmeter VmHWM {:.1} MiB at start, {:.1} MiB after",
        bomb.len() as f64 / (1 << 20) as f64,
        took.as_secs_f64(),
        mib(baseline),
        mib(peak)
    ));
    let r = served_row(&served, "bomb");
    assert_eq!((r.outcome.as_str(), r.status), ("ok", Some(200)));
    assert_eq!(
        (r.credits_milli, r.credit_source.as_str()),
        (1000, "estimated")
    );
    assert_eq!(r.response_bytes, bomb.len() as i64);
    let err = r.error.unwrap_or_default();
    report(&format!("gzip bomb row: error = {err:?}"));
    assert!(err.contains("decoded body exceeds 64 MiB cap"), "{err}");
    // Decoding stops at the cap (64 MiB + 1 byte), so the peak is about the cap, not 1 GiB.
    assert!(
        peak < 200 * 1024,
        "creditmeter peaked at {:.1} MiB decoding a bomb",
        mib(peak)
    );
    served.stop();
}

trait MkDir {
    fn tap_mkdir(self) -> Self;
}

impl MkDir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}
