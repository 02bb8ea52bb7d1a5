#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Edges a review found (issue 19, points 6–8): upstream trailers reach HTTP/1.1 callers,
//! attribution names that would merge with creditmeter's own rows are refused, and a base URL
//! carrying a password is refused by `check-config` without printing the password.

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads a raw HTTP/1.1 exchange until the server closes (or 10 s pass).
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_trailers_reach_an_http1_caller_whole() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let proxy = Proxy::start(config_for(&up.url(), None), dir.path()).await;

    // A client library's view: the trailers arrive after the body. (HTTP sends trailers to a
    // client that says `TE: trailers`; creditmeter passes that wish upstream.)
    let req = http::Request::get(proxy.url("/api/v1/people/match?script=trailers"))
        .header("x-meter-table", "trailers")
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("trailer").map(|v| v.to_str().unwrap()),
        Some("x-checksum, x-rows"),
        "the Trailer header is end-to-end"
    );
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrived");
    assert_eq!(trailers.get("x-checksum").unwrap(), TRAILER_CHECKSUM);
    assert_eq!(trailers.get("x-rows").unwrap(), "1");
    let body = collected.to_bytes();
    assert_eq!(
        &body[..],
        br#"{"person": {"id": "p-trailer", "name": "T"}}"#,
        "the body is unchanged"
    );

    // On the wire: a chunked body whose last chunk is followed by the trailer fields.
    let text = raw(
        proxy.addr,
        "GET /api/v1/people/match?script=trailers HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\nX-Meter-Table: trailers\r\n\r\n",
    )
    .await;
    assert!(text.contains("transfer-encoding: chunked"), "{text}");
    let tail = text.rsplit("\r\n0\r\n").next().unwrap();
    assert!(
        tail.contains(&format!("x-checksum: {TRAILER_CHECKSUM}")) && tail.contains("x-rows: 1"),
        "trailers after the last chunk: {text}"
    );
    // The call is metered as usual: one lead for the person.
    let rows = wait_rows(&proxy.ledger(), "table_name = 'trailers'", 2).await;
    assert!(rows.iter().all(|r| r.credits_milli == 1000), "{rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_names_repeated_parameters_and_format_characters_get_a_400() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let proxy = Proxy::start(config_for(&up.url(), None), dir.path()).await;
    let ask = |path: &str, table: Option<&str>| {
        let mut b = http::Request::get(proxy.url(path));
        if let Some(t) = table {
            b = b.header("x-meter-table", t);
        }
        b.body(Full::new(Bytes::new())).unwrap()
    };
    let cases: Vec<(http::Request<Full<Bytes>>, &str, &str)> = vec![
        (
            ask("/api/v1/people/match", Some("_unattributed")),
            "X-Meter-Table",
            "reserved",
        ),
        (
            ask("/api/v1/people/match", Some("_other")),
            "X-Meter-Table",
            "reserved",
        ),
        (
            ask("/api/v1/people/match", Some("_Creditmeter")),
            "X-Meter-Table",
            "reserved",
        ),
        (
            ask("/api/v1/people/match?meter_workflow=_other", None),
            "meter_workflow",
            "reserved",
        ),
        (
            ask("/api/v1/people/match?meter_table=a&meter_table=b", None),
            "meter_table",
            "more than once",
        ),
        (
            ask(
                "/api/v1/people/match?meter_table=Leads%E2%80%AEtxt.exe",
                None,
            ),
            "meter_table",
            "U+202E",
        ),
        (
            ask("/api/v1/people/match", Some("Leads\u{200B}")),
            "X-Meter-Table",
            "U+200B",
        ),
    ];
    let c = client();
    for (req, field, why) in cases {
        let what = format!("{} {:?}", req.uri(), req.headers().get("x-meter-table"));
        let (status, _, body) = send(&c, req).await;
        assert_eq!(status, 400, "{what}");
        let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(j["error"], "invalid_attribution", "{what}: {j}");
        assert_eq!(j["field"], field, "{what}: {j}");
        assert!(j["message"].as_str().unwrap().contains(why), "{what}: {j}");
    }
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing went upstream"
    );
    // Creditmeter's own series stay its own: no refused name shows as a table label.
    let m = proxy.metrics().await;
    assert_eq!(
        metric_sum(&m, "creditmeter_requests_total", &[("table", "_other")]),
        0.0,
        "{m}"
    );
    // A name that only starts with an underscore is a name like any other.
    let (status, _, _) = send(&c, ask("/api/v1/people/match", Some("_others"))).await;
    assert_eq!(status, 200);
}

#[test]
fn check_config_refuses_a_password_in_the_base_url_without_printing_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("creditmeter.toml");
    std::fs::write(
        &cfg,
        "[upstream]\nbase_url = \"https://apollo:hunter2-secret@api.apollo.io\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(binary::BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(64), "bad config exits 64: {text}");
    assert!(text.contains("upstream.base_url"), "{text}");
    assert!(text.contains("user name or password"), "{text}");
    assert!(
        !text.contains("hunter2"),
        "the password is never printed: {text}"
    );
    assert!(text.contains("https://***@api.apollo.io"), "{text}");
}
