//! SIGHUP reload (driven through `run_with_reload`'s channel) and the proxy access token.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn write_config(path: &std::path::Path, upstream: &str, extra: &str) {
    std::fs::write(
        path,
        format!("[upstream]\nbase_url = \"{upstream}\"\n[ledger]\npath = \"ledger.db\"\n{extra}"),
    )
    .unwrap();
}

async fn wait_metric(admin: std::net::SocketAddr, name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, _, b) = get(&format!("http://{admin}/metrics")).await;
        if metric_sum(&String::from_utf8_lossy(&b), name, labels) == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never reached {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends one request on an open keep-alive connection and reads the response status line.
async fn on_socket(s: &mut tokio::net::TcpStream, table: Option<&str>) -> String {
    let table = table
        .map(|t| format!("X-Meter-Table: {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!(
            "POST /api/v1/people/match HTTP/1.1\r\nHost: x\r\n{table}Content-Length: 2\r\n\r\n{{}}"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Read one whole response (head, then Content-Length bytes) so the next one starts clean.
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16384];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return head.lines().next().unwrap_or("").to_owned();
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_catalog_and_attribution_without_dropping_anything() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let cfg_path = dir.path().join("creditmeter.toml");
    write_config(&cfg_path, &up.url(), "");
    let config = creditmeter::config::Config::load(Some(&cfg_path)).unwrap();
    let proxy_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, admin) = (proxy_l.local_addr().unwrap(), admin_l.local_addr().unwrap());
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(creditmeter::run_with_reload(
        config,
        Some(cfg_path.clone()),
        proxy_l,
        admin_l,
        async {
            let _ = stopped.await;
        },
        reload_rx,
    ));
    wait_metric(
        admin,
        "creditmeter_config_reloads_total",
        &[("result", "ok")],
        0.0,
    )
    .await;

    let mut keepalive = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(
        on_socket(&mut keepalive, None).await.contains("200"),
        "no table needed yet"
    );
    // A call in flight across the reload.
    let slow = tokio::spawn(async move {
        let req = http::Request::post(format!("http://{addr}/api/v1/people/match?script=slow"))
            .header("x-meter-table", "inflight")
            .body(Full::new(Bytes::from("{}")))
            .unwrap();
        let resp = client().request(req).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    // New settings: a table is required, and people_match costs 5 credits in a custom catalog.
    let builtin = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/apollo-catalog.toml"
    ))
    .unwrap();
    let pricier = builtin
        .replacen("version = \"", "version = \"pricier-", 1)
        .replacen(
            "per = \"present\"\nfield = \"person\"",
            "per = \"present\"\nfield = \"person\"\n# reload test",
            1,
        );
    let pricier = pricier.replacen(
        "credits = 1\nper = \"present\"\nfield = \"person\"\n# reload test",
        "credits = 5\nper = \"present\"\nfield = \"person\"",
        1,
    );
    assert!(
        pricier.contains("credits = 5"),
        "test catalog edit did not apply"
    );
    std::fs::write(dir.path().join("pricier.toml"), pricier).unwrap();
    write_config(
        &cfg_path,
        &up.url(),
        "[attribution]\nrequire_table = true\n[catalog]\npath = \"pricier.toml\"\n",
    );
    reload_tx.send(()).await.unwrap();
    wait_metric(
        admin,
        "creditmeter_config_reloads_total",
        &[("result", "ok")],
        1.0,
    )
    .await;

    let body = slow.await.unwrap();
    assert!(
        body.ends_with(b"\"request_id\": -1}"),
        "the call in flight finished whole"
    );
    assert!(
        on_socket(&mut keepalive, None).await.contains("400"),
        "the same connection now needs a table"
    );
    assert!(on_socket(&mut keepalive, Some("after"))
        .await
        .contains("200"));

    // A broken file is refused and the previous settings stay.
    std::fs::write(&cfg_path, "[attribution\nrequire_table = false\n").unwrap();
    reload_tx.send(()).await.unwrap();
    wait_metric(
        admin,
        "creditmeter_config_reloads_total",
        &[("result", "error")],
        1.0,
    )
    .await;
    assert!(
        on_socket(&mut keepalive, None).await.contains("400"),
        "still requiring a table"
    );
    assert!(on_socket(&mut keepalive, Some("after"))
        .await
        .contains("200"));

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("ledger.db")).unwrap();
    let price = |table: &str| -> (i64, String) {
        conn.query_row(
            "SELECT max(credits_milli), max(catalog_version) FROM calls WHERE table_name = ?1",
            [table],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    assert_eq!(
        price("inflight").0,
        1000,
        "priced by the catalog it started with"
    );
    let (after, version) = price("after");
    assert_eq!(after, 5000, "new calls use the reloaded catalog");
    assert!(version.starts_with("pricier-"), "{version}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_token_keeps_strangers_out() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let mut cfg = config_for(&up.url(), None);
    cfg.proxy.require_token = true;
    cfg.proxy.token_env = "CREDITMETER_TEST_PROXY_TOKEN_A".into();
    // Turned on without a token: a clear startup error, not an open door.
    let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = creditmeter::run(cfg.clone(), l1, l2, async {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("proxy.require_token") && err.contains("CREDITMETER_TEST_PROXY_TOKEN_A"),
        "{err}"
    );

    std::env::set_var("CREDITMETER_TEST_PROXY_TOKEN_A", "let-me-in");
    let proxy = Proxy::start(cfg, dir.path()).await;
    for token in [None, Some("wrong"), Some("let-me-in-please")] {
        let mut b =
            http::Request::post(proxy.url("/api/v1/people/match")).header("x-meter-table", "t");
        if let Some(t) = token {
            b = b.header("x-meter-token", t);
        }
        let (status, _, body) =
            send(&client(), b.body(Full::new(Bytes::from("{}"))).unwrap()).await;
        assert_eq!(status, 401, "{token:?}");
        assert!(String::from_utf8_lossy(&body).contains("X-Meter-Token"));
    }
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "strangers reach nothing upstream"
    );
    let req = http::Request::post(proxy.url("/api/v1/people/match"))
        .header("x-meter-table", "t")
        .header("x-meter-token", "let-me-in")
        .body(Full::new(Bytes::from("{}")))
        .unwrap();
    assert_eq!(send(&client(), req).await.0, 200);
    let seen = up.seen.lock().unwrap().clone();
    assert!(
        seen[0].headers.get("x-meter-token").is_none(),
        "the token is not forwarded"
    );
    let rows: i64 = proxy
        .ledger()
        .query_row(
            "SELECT count(*) FROM calls WHERE outcome = 'rejected'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 3, "refused attempts are recorded");
}
