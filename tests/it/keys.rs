//! Virtual keys (issue 15): creditmeter's own keys (`cmk_…`) swapped for the real Apollo key in
//! every place a key may go, attribution taken from the key, forged attribution refused with
//! nothing sent upstream, unknown, revoked and expired keys refused, revocation in force for the
//! next request on open h1 and h2 connections and across a restart, the CLI and `/api/keys`
//! against the same ledger, holds by key, and the audit log. Real sockets, the real binary for
//! the CLI, the scripted upstream where exact bytes matter and the simulator elsewhere.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::binary::BIN;
use common::*;
use creditmeter::config::Config;
use creditmeter::keys::ops::{self, CreateRequest};
use creditmeter::keys::KeysMode;
use creditmeter_sim::SimConfig;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The real Apollo key, in a variable of the test's own (tests in this binary run in parallel).
fn real_key_env(test: &str, value: &str) -> String {
    let name = format!("CM_TEST_KEYS_{}", test.to_ascii_uppercase());
    std::env::set_var(&name, value);
    name
}

fn keyed_config(upstream: &str, mode: KeysMode, env: &str) -> Config {
    let mut c = config_for(upstream, None);
    c.keys.mode = mode;
    c.keys.upstream_key_env = env.to_owned();
    c
}

fn create(db: &Path, table: &str, f: impl FnOnce(&mut CreateRequest)) -> (String, String) {
    let mut req = CreateRequest {
        table: table.to_owned(),
        ..Default::default()
    };
    f(&mut req);
    let issued = ops::create(db, &req, None, "cli", creditmeter::meter::now_ms()).unwrap();
    (issued.key, issued.row.id)
}

/// Runs the real binary; returns (exit code, stdout, stderr).
fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

async fn call(url: &str, method: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let (s, _, b) = send(&client(), request(method, url, headers, body)).await;
    (s.as_u16(), String::from_utf8_lossy(&b).into_owned())
}

fn error_code(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("<not JSON: {body}>"))
}

/// A call to make: what it tests, its URL, headers and body.
type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, String);

/// Everything the upstream saw of a request, as one string to search.
fn seen_text(s: &Seen) -> String {
    let headers: Vec<String> = s
        .headers
        .iter()
        .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
        .collect();
    format!(
        "{} {}\n{}\n\n{}",
        s.method,
        s.uri,
        headers.join("\n"),
        String::from_utf8_lossy(&s.body)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_key_is_swapped_for_the_real_one_in_every_place() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let real = "real-APOLLO-key-4f1c9e";
    let env = real_key_env("every_place", real);
    let mut proxy = Proxy::start(
        keyed_config(&up.url(), KeysMode::Optional, &env),
        dir.path(),
    )
    .await;
    let (vk, id) = create(&proxy.db, "Leads Q3", |r| {
        r.workflow = Some("enrich".into());
        r.tags.insert("team".into(), "growth".into());
    });
    assert!(vk.starts_with("cmk_") && vk.len() >= 4 + 32, "{vk}");

    let url = proxy.url("/api/v1/people/match");
    let json = ("content-type", "application/json");
    let bearer = format!("Bearer {vk}");
    let json_body = format!(r#"{{"api_key": "{vk}", "email": "ada@example.com"}}"#);
    let form_body = format!("email=ada%40example.com&api_key={vk}");
    let cases: Vec<Case> = vec![
        (
            "X-Api-Key",
            url.clone(),
            vec![("x-api-key", vk.as_str()), json],
            r#"{"email":"ada@example.com"}"#.into(),
        ),
        (
            "Bearer",
            url.clone(),
            vec![("authorization", bearer.as_str()), json],
            r#"{"email":"ada@example.com"}"#.into(),
        ),
        (
            "query",
            format!("{url}?email=ada%40example.com&api_key={vk}"),
            vec![],
            String::new(),
        ),
        ("JSON body", url.clone(), vec![json], json_body.clone()),
        (
            "form body",
            url.clone(),
            vec![("content-type", "application/x-www-form-urlencoded")],
            form_body,
        ),
    ];
    for (place, url, headers, body) in &cases {
        let method = if body.is_empty() { "GET" } else { "POST" };
        let (status, answer) = call(url, method, headers, body).await;
        assert_eq!(status, 200, "{place}: {answer}");
    }
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), cases.len(), "every call went upstream once");
    for (s, (place, ..)) in seen.iter().zip(&cases) {
        let text = seen_text(s);
        assert!(
            !text.contains("cmk_"),
            "{place}: the virtual key left creditmeter:\n{text}"
        );
        assert!(
            text.contains(real),
            "{place}: upstream did not get the real key:\n{text}"
        );
        assert!(
            !text.to_ascii_lowercase().contains("x-meter-"),
            "{place}: {text}"
        );
        if !s.body.is_empty() {
            let cl: usize = s.headers["content-length"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(
                cl,
                s.body.len(),
                "{place}: Content-Length fits the rewritten body"
            );
        }
    }
    // The rest of the body arrives as sent: the JSON call's other field, the form's order.
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&seen[3].body).unwrap(),
        serde_json::json!({"api_key": real, "email": "ada@example.com"})
    );
    assert_eq!(
        String::from_utf8_lossy(&seen[4].body),
        format!("email=ada%40example.com&api_key={real}")
    );
    assert_eq!(seen[0].headers["x-api-key"], real);
    assert_eq!(
        seen[1].headers["authorization"],
        format!("Bearer {real}").as_str()
    );

    // The ledger: the key's table, workflow and tags, and its id as key_fp.
    let rows = wait_rows(&proxy.ledger(), "1 = 1", cases.len()).await;
    for r in &rows {
        assert_eq!(r.table_name.as_deref(), Some("Leads Q3"));
    }
    let conn = proxy.ledger();
    let (fps, wf, tags): (String, String, String) = conn
        .query_row(
            "SELECT group_concat(DISTINCT key_fp), group_concat(DISTINCT workflow), group_concat(DISTINCT tags) FROM calls",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        (fps.as_str(), wf.as_str(), tags.as_str()),
        (id.as_str(), "enrich", r#"{"team":"growth"}"#)
    );
    let last_used: Option<i64> = conn
        .query_row(
            "SELECT last_used_at FROM virtual_keys WHERE id = ?1",
            [&id],
            |r| r.get(0),
        )
        .unwrap();
    assert!(last_used.is_some(), "last_used_at is kept");

    // A raw Apollo key still passes in optional mode, recorded under its fingerprint.
    let (status, _) = call(
        &url,
        "POST",
        &[
            ("x-api-key", "raw-apollo-key"),
            ("x-meter-table", "Raw"),
            json,
        ],
        "{}",
    )
    .await;
    assert_eq!(status, 200);
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.last().unwrap().headers["x-api-key"], "raw-apollo-key");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_attribution_is_a_403_and_nothing_goes_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let env = real_key_env("forged", "real-key-forged");
    let mut proxy = Proxy::start(
        keyed_config(&up.url(), KeysMode::Optional, &env),
        dir.path(),
    )
    .await;
    let (vk, id) = create(&proxy.db, "Inbound", |r| r.workflow = Some("enrich".into()));
    let url = proxy.url("/api/v1/people/match");
    let k = ("x-api-key", vk.as_str());
    #[allow(clippy::type_complexity)] // (field, headers, url)
    let forged: Vec<(&str, Vec<(&str, &str)>, String)> = vec![
        (
            "X-Meter-Table",
            vec![k, ("x-meter-table", "Someone Else")],
            url.clone(),
        ),
        (
            "meter_table",
            vec![k],
            format!("{url}?meter_table=Someone%20Else"),
        ),
        // The header agrees, the parameter does not: still a conflict.
        (
            "meter_table",
            vec![k, ("x-meter-table", "Inbound")],
            format!("{url}?meter_table=Other"),
        ),
        (
            "X-Meter-Workflow",
            vec![k, ("x-meter-workflow", "other")],
            url.clone(),
        ),
        (
            "meter_workflow",
            vec![k],
            format!("{url}?meter_workflow=other"),
        ),
    ];
    for (field, headers, url) in &forged {
        let (status, body) = call(url, "POST", headers, r#"{"email":"a@b.c"}"#).await;
        assert_eq!(status, 403, "{field}: {body}");
        assert_eq!(error_code(&body), "attribution_conflict", "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["field"], *field, "{body}");
    }
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing went upstream"
    );
    // Recorded as rejected under the key (whose table it was), with no credits.
    let rows = wait_rows(&proxy.ledger(), "outcome = 'rejected'", forged.len()).await;
    assert!(rows
        .iter()
        .all(|r| r.table_name.as_deref() == Some("Inbound") && r.credits_milli == 0));
    let fp: String = proxy
        .ledger()
        .query_row("SELECT DISTINCT key_fp FROM calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(fp, id);
    // Agreeing attribution is fine.
    let (status, body) = call(
        &url,
        "POST",
        &[
            k,
            ("x-meter-table", "Inbound"),
            ("x-meter-workflow", "enrich"),
        ],
        "{}",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    proxy.shutdown().await;
}

/// An h1 keep-alive connection and an h2 connection to the proxy, each sending `n` calls.
struct Conns {
    h1: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    h2: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
}

impl Conns {
    async fn open(addr: std::net::SocketAddr) -> Conns {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (h2, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .unwrap();
        tokio::spawn(conn);
        Conns { h1, h2 }
    }

    /// Status on the h1 connection, then on the h2 one.
    async fn both(&mut self, addr: std::net::SocketAddr, key: &str) -> (u16, u16) {
        // h1 in origin form (creditmeter refuses absolute-form targets), h2 with its authority.
        let req = |v: http::Version| {
            let host = addr.to_string();
            let uri = if v == http::Version::HTTP_2 {
                format!("http://{addr}/api/v1/people/match")
            } else {
                "/api/v1/people/match".to_owned()
            };
            let mut r = request(
                "POST",
                &uri,
                &[
                    ("x-api-key", key),
                    ("content-type", "application/json"),
                    ("host", &host),
                ],
                "{}",
            );
            *r.version_mut() = v;
            r
        };
        self.h1.ready().await.unwrap();
        let a = self
            .h1
            .send_request(req(http::Version::HTTP_11))
            .await
            .unwrap();
        let a_status = a.status().as_u16();
        a.into_body().collect().await.unwrap();
        self.h2.ready().await.unwrap();
        let b = self
            .h2
            .send_request(req(http::Version::HTTP_2))
            .await
            .unwrap();
        let b_status = b.status().as_u16();
        b.into_body().collect().await.unwrap();
        (a_status, b_status)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_rotation_hold_on_open_connections_and_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let env = real_key_env("revoke", "real-key-revoke");
    let config = keyed_config(&up.url(), KeysMode::Required, &env);
    let mut proxy = Proxy::start(config.clone(), dir.path()).await;
    let db = proxy.db.display().to_string();
    // Made with the real CLI while the server runs.
    let (code, out, err) = cli(&[
        "keys",
        "create",
        "--db",
        &db,
        "--table",
        "Clay leads",
        "--name",
        "clay-leads",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let made: serde_json::Value = serde_json::from_str(&out).unwrap();
    let vk = made["key"].as_str().unwrap().to_owned();
    let id = made["id"].as_str().unwrap().to_owned();
    assert_eq!(made["table"], "Clay leads");
    assert!(vk.starts_with("cmk_") && vk.len() == 52, "{vk}");
    assert!(vk.starts_with(made["prefix"].as_str().unwrap()));

    let mut conns = Conns::open(proxy.addr).await;
    assert_eq!(conns.both(proxy.addr, &vk).await, (200, 200));
    let hits_before = up.hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(hits_before, 2);

    // Rotate by name: the old secret stops at once on both open connections, the new one works.
    let (code, out, err) = cli(&[
        "keys",
        "rotate",
        "clay-leads",
        "--db",
        &db,
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let rotated: serde_json::Value = serde_json::from_str(&out).unwrap();
    let vk2 = rotated["key"].as_str().unwrap().to_owned();
    assert_eq!(rotated["id"], id.as_str(), "same id");
    assert_ne!(vk2, vk);
    assert_eq!(conns.both(proxy.addr, &vk).await, (401, 401));
    assert_eq!(conns.both(proxy.addr, &vk2).await, (200, 200));

    // Revoke: the next request on each open connection is refused.
    let (code, _, err) = cli(&["keys", "revoke", &id, "--db", &db]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(conns.both(proxy.addr, &vk2).await, (401, 401));

    // Required mode: a raw Apollo key, no key, an unknown cmk_ key: 401 with nothing upstream.
    let url = proxy.url("/api/v1/people/match");
    for (what, headers) in [
        ("raw key", vec![("x-api-key", "raw-apollo-key")]),
        ("no key", vec![]),
        (
            "unknown",
            vec![(
                "x-api-key",
                "cmk_00000000000000000000000000000000000000000000dead",
            )],
        ),
        ("revoked", vec![("x-api-key", vk2.as_str())]),
    ] {
        let (status, body) = call(&url, "POST", &headers, "{}").await;
        assert_eq!(status, 401, "{what}: {body}");
    }
    assert_eq!(
        up.hits.load(std::sync::atomic::Ordering::SeqCst),
        4,
        "no refused call went upstream"
    );
    // Refusals before authentication are counted, and are no ledger rows.
    let m = proxy.metrics().await;
    // Revoked: the two open connections and one more call. Unknown: the rotated-out secret on
    // both connections (its hash is gone) and the made-up key.
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_refused_total",
            &[("reason", "virtual_key_revoked")]
        ),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_refused_total",
            &[("reason", "invalid_virtual_key")]
        ),
        3.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_refused_total",
            &[("reason", "virtual_key_required")]
        ),
        2.0
    );
    let rows: i64 = proxy
        .ledger()
        .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 4, "only the four calls that went upstream are rows");

    // A restart: the key stays revoked.
    drop(conns);
    proxy.shutdown().await;
    let mut proxy = Proxy::start(config, dir.path()).await;
    let (status, _) = call(
        &proxy.url("/api/v1/people/match"),
        "POST",
        &[("x-api-key", vk2.as_str())],
        "{}",
    )
    .await;
    assert_eq!(status, 401);

    // list shows the key without its secret; the audit log has the three changes by `cli`.
    let (code, out, _) = cli(&["keys", "list", "--db", &db, "--format", "json"]);
    assert_eq!(code, 0);
    assert!(!out.contains(&vk) && !out.contains(&vk2));
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let k = &listed["keys"][0];
    assert_eq!(
        (k["id"].as_str(), k["name"].as_str(), k["status"].as_str()),
        (Some(id.as_str()), Some("clay-leads"), Some("revoked"))
    );
    assert!(
        k["last_used_at"].is_string() && k["revoked_at"].is_string() && k["created_at"].is_string()
    );
    let (code, out, _) = cli(&["audit", "--db", &db, "--format", "json"]);
    assert_eq!(code, 0);
    assert!(
        !out.contains(&vk) && !out.contains(&vk2),
        "the audit log never holds a key"
    );
    let audit: serde_json::Value = serde_json::from_str(&out).unwrap();
    let actions: Vec<(&str, &str)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["actor"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("key_created", "cli"),
            ("key_rotated", "cli"),
            ("key_revoked", "cli")
        ]
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_keys_and_keys_in_off_mode_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let env = real_key_env("expired", "real-key-expired");
    let mut proxy = Proxy::start(
        keyed_config(&up.url(), KeysMode::Optional, &env),
        dir.path(),
    )
    .await;
    let (vk, _) = create(&proxy.db, "Short lived", |r| r.expires = Some("1s".into()));
    let url = proxy.url("/api/v1/people/match");
    assert_eq!(call(&url, "POST", &[("x-api-key", &vk)], "{}").await.0, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = call(&url, "POST", &[("x-api-key", &vk)], "{}").await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (401, "virtual_key_expired"),
        "{body}"
    );
    // Two different keys in one call: refused rather than guessing which counts.
    let (vk2, _) = create(&proxy.db, "Other", |_| {});
    let (status, body) = call(
        &url,
        "POST",
        &[("x-api-key", &vk2), ("content-type", "application/json")],
        r#"{"api_key": "raw-key"}"#,
    )
    .await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (401, "conflicting_keys"),
        "{body}"
    );
    // The key in a place creditmeter does not swap keys in: refused, never forwarded.
    for (headers, path, body) in [
        (
            vec![("x-api-key", vk2.as_str()), ("x-note", vk2.as_str())],
            "",
            "{}".to_owned(),
        ),
        (
            vec![("x-api-key", vk2.as_str())],
            "?token=",
            "{}".to_owned(),
        ),
        (
            vec![
                ("x-api-key", vk2.as_str()),
                ("content-type", "application/json"),
            ],
            "",
            format!(r#"{{"note": "{vk2}"}}"#),
        ),
    ] {
        let u = if path.is_empty() {
            url.clone()
        } else {
            format!("{url}{path}{vk2}")
        };
        let (status, body) = call(&u, "POST", &headers, &body).await;
        assert_eq!(
            (status, error_code(&body).as_str()),
            (400, "virtual_key_misplaced"),
            "{body}"
        );
    }
    // In a body that also carries it as api_key, every copy is swapped.
    let (status, _) = call(
        &url,
        "POST",
        &[("content-type", "application/json")],
        &format!(r#"{{"api_key": "{vk2}", "note": "{vk2}"}}"#),
    )
    .await;
    assert_eq!(status, 200);
    let last = up.seen.lock().unwrap().last().unwrap().body.clone();
    assert_eq!(
        String::from_utf8_lossy(&last),
        r#"{"api_key": "real-key-expired", "note": "real-key-expired"}"#
    );
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), 2);
    proxy.shutdown().await;

    // keys.mode = "off": a cmk_ key is refused, never forwarded to Apollo.
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = Proxy::start(config_for(&up.url(), None), dir.path()).await;
    let (vk, _) = create(&proxy.db, "Off", |_| {});
    let (status, body) = call(
        &proxy.url("/api/v1/people/match"),
        "POST",
        &[("x-api-key", &vk)],
        "{}",
    )
    .await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (401, "virtual_keys_off"),
        "{body}"
    );
    assert_eq!(up.hits.load(std::sync::atomic::Ordering::SeqCst), 2);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_manages_keys_holds_by_key_and_serves_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let env = real_key_env("admin_api", "real-key-admin");
    let token_env = real_key_env("admin_api_token", "admin-secret-token");
    let mut config = keyed_config(&up.url(), KeysMode::Optional, &env);
    config.admin.token_env = token_env.clone();
    let mut proxy = Proxy::start(config, dir.path()).await;
    let api = |p: &str| format!("http://{}{p}", proxy.admin);
    let auth = ("authorization", "Bearer admin-secret-token");
    let json = ("content-type", "application/json");

    // Without the token: refused.
    assert_eq!(call(&api("/api/keys"), "GET", &[], "").await.0, 401);
    assert_eq!(
        call(&api("/api/keys"), "POST", &[json], r#"{"table": "T"}"#)
            .await
            .0,
        401
    );

    let (status, body) = call(
        &api("/api/keys"),
        "POST",
        &[auth, json],
        r#"{"table": "Enrich", "name": "enrich-key", "tags": {"Team": "ops"}}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let made: serde_json::Value = serde_json::from_str(&body).unwrap();
    let vk = made["key"].as_str().unwrap().to_owned();
    let id = made["id"].as_str().unwrap().to_owned();
    assert_eq!(made["tags"], serde_json::json!({"team": "ops"}));
    // Bad requests name the problem.
    for (bad, want) in [
        (r#"{"workflow": "w"}"#, "table"),
        (r#"{"table": "_unattributed"}"#, "reserved"),
        (r#"{"table": "T", "upstream": "nope"}"#, "nope"),
        (r#"{"table": "T", "tabel": "x"}"#, "tabel"),
        (r#"{"table": "T", "name": "enrich-key"}"#, "exists"),
        (r#"{"table": "T", "expires": "soon"}"#, "expires"),
    ] {
        let (status, body) = call(&api("/api/keys"), "POST", &[auth, json], bad).await;
        assert!(status == 400 || status == 409, "{bad}: {status} {body}");
        assert!(body.contains(want), "{bad}: {body}");
    }
    let (status, body) = call(&api("/api/keys"), "GET", &[auth], "").await;
    assert_eq!(status, 200);
    assert!(!body.contains(&vk), "GET /api/keys never shows a secret");
    assert!(body.contains(&id));

    // A hold on the key, by name: its calls are refused; other calls pass.
    let url = proxy.url("/api/v1/people/match");
    assert_eq!(call(&url, "POST", &[("x-api-key", &vk)], "{}").await.0, 200);
    let (status, body) = call(
        &api("/api/holds"),
        "POST",
        &[auth, json],
        r#"{"scope": {"key": "enrich-key"}, "reason": "runaway"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let hold: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(hold["hold"]["scope"]["key"], id.as_str(), "held by id");
    let (status, body) = call(&url, "POST", &[("x-api-key", &vk)], "{}").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        call(
            &url,
            "POST",
            &[("x-api-key", "raw"), ("x-meter-table", "x")],
            "{}"
        )
        .await
        .0,
        200
    );
    let (status, _) = call(
        &api(&format!("/api/holds/{}", hold["hold"]["id"])),
        "DELETE",
        &[auth, ("content-type", "application/json")],
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(call(&url, "POST", &[("x-api-key", &vk)], "{}").await.0, 200);
    // The same with the CLI: `hold --key NAME`, then `release --key NAME`.
    let admin_url = format!("http://{}", proxy.admin);
    let hold_cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .args(["--admin", &admin_url, "--key", "enrich-key"])
            .env("CREDITMETER_ADMIN_TOKEN", "admin-secret-token")
            .env_remove("CREDITMETER_CONFIG")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = hold_cli(&["hold"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(call(&url, "POST", &[("x-api-key", &vk)], "{}").await.0, 503);
    let (code, out) = hold_cli(&["release"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&id), "{out}");
    assert_eq!(call(&url, "POST", &[("x-api-key", &vk)], "{}").await.0, 200);
    // An unknown name is refused, not held as a pattern that matches nothing.
    let (status, body) = call(
        &api("/api/holds"),
        "POST",
        &[auth, json],
        r#"{"scope": {"key": "no-such-key"}}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // Rotate and revoke through the API.
    let (status, body) = call(
        &api(&format!("/api/keys/{id}/rotate")),
        "POST",
        &[auth, json],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let vk2 = serde_json::from_str::<serde_json::Value>(&body).unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(call(&url, "POST", &[("x-api-key", &vk)], "{}").await.0, 401);
    assert_eq!(
        call(&url, "POST", &[("x-api-key", &vk2)], "{}").await.0,
        200
    );
    let (status, _) = call(&api("/api/keys/enrich-key"), "DELETE", &[auth, json], "").await;
    assert_eq!(status, 200);
    assert_eq!(
        call(&url, "POST", &[("x-api-key", &vk2)], "{}").await.0,
        401
    );
    assert_eq!(
        call(
            &api("/api/keys/ffffffffffffffff"),
            "DELETE",
            &[auth, json],
            ""
        )
        .await
        .0,
        404
    );

    // The audit log: each change, by the token's actor, without a key in it.
    let (status, body) = call(&api("/api/audit"), "GET", &[auth], "").await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains(&vk) && !body.contains(&vk2));
    let audit: serde_json::Value = serde_json::from_str(&body).unwrap();
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "key_created",
            "hold_placed", // by the API
            "hold_lifted",
            "hold_placed", // by the CLI, through the API
            "hold_lifted",
            "key_rotated",
            "key_revoked"
        ]
    );
    let actor = format!("token:{token_env}");
    assert!(audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["actor"] == actor.as_str()));
    assert_eq!(
        audit["entries"][1]["subject"],
        hold["hold"]["id"].to_string().as_str()
    );
    proxy.shutdown().await;
}

/// What Clay's HTTP API column sends (APOLLO.md, "Clay, as deployed"): the URL, method,
/// headers and JSON body the user typed in the column, with column tokens already filled in
/// per row. Here: POST people/match with `X-Api-Key: cmk_…`, `Content-Type: application/json`,
/// `Accept: application/json` and a body built from `{"email": "{{Email}}"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clay_shaped_calls_with_a_virtual_key_are_metered_to_the_keys_table() {
    let dir = tempfile::tempdir().unwrap();
    let real = "real-APOLLO-master-clay";
    let sim = SimServer::start(
        SimConfig {
            master_key: Some(real.to_owned()),
            ..SimConfig::default()
        },
        None,
    )
    .await;
    let env = real_key_env("clay", real);
    let mut proxy = Proxy::start(
        keyed_config(&sim.url(false), KeysMode::Required, &env),
        dir.path(),
    )
    .await;
    let (vk, _) = create(&proxy.db, "Clay: Inbound leads", |r| {
        r.name = Some("clay-inbound".into())
    });
    let clay = |email: &str, extra: &[(&'static str, &'static str)]| {
        let mut headers = vec![
            ("x-api-key", vk.clone()),
            ("content-type", "application/json".to_owned()),
            ("accept", "application/json".to_owned()),
        ];
        headers.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let body = r#"{"email": "{{Email}}", "reveal_personal_emails": false}"#
            .replace("{{Email}}", email);
        (headers, body)
    };
    let url = proxy.url("/api/v1/people/match");
    let mut ok = 0;
    for i in 0..12 {
        let (headers, body) = clay(&format!("row{i}@example.com"), &[]);
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, answer) = call(&url, "POST", &h, &body).await;
        assert_eq!(status, 200, "{answer}");
        ok += 1;
    }
    // The simulator answers credit_usage_stats only for its master key: the real key arrived.
    let (status, answer) = call(
        &proxy.url("/api/v1/usage_stats/credit_usage_stats"),
        "POST",
        &[("x-api-key", &vk), ("content-type", "application/json")],
        "{}",
    )
    .await;
    assert_eq!(status, 200, "upstream got the real key: {answer}");
    // A forged table header from an edited column: 403, nothing spent.
    let billed = sim.sim.billed().calls;
    let (headers, body) = clay(
        "forged@example.com",
        &[("x-meter-table", "Somebody else's table")],
    );
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, answer) = call(&url, "POST", &h, &body).await;
    assert_eq!(
        (status, error_code(&answer).as_str()),
        (403, "attribution_conflict"),
        "{answer}"
    );
    assert_eq!(
        sim.sim.billed().calls,
        billed,
        "nothing reached the simulator"
    );
    // The raw Apollo key pasted into the column: 401 in required mode.
    let (status, _) = call(
        &url,
        "POST",
        &[("x-api-key", real), ("content-type", "application/json")],
        r#"{"email": "x@example.com"}"#,
    )
    .await;
    assert_eq!(status, 401);

    let conn = proxy.ledger();
    let by_table = wait_rows(&conn, "endpoint = 'people_match'", ok).await;
    assert!(by_table
        .iter()
        .all(|r| r.table_name.as_deref() == Some("Clay: Inbound leads")));
    let ledger_milli: i64 = conn
        .query_row(
            "SELECT sum(credits_milli) FROM calls WHERE table_name = 'Clay: Inbound leads'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        ledger_milli,
        {
            let b = sim.sim.billed();
            b.lead_milli + b.direct_dial_milli + b.export_milli
        },
        "the ledger holds what the simulator billed"
    );
    assert!(ledger_milli > 0);
    proxy.shutdown().await;
}

#[test]
fn check_config_refuses_a_mode_whose_key_variable_is_unset_and_prints_what_is_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("creditmeter.toml");
    std::fs::write(
        &cfg,
        "[keys]\nmode = \"required\"\nupstream_key_env = \"CM_TEST_KEYS_SURELY_UNSET\"\n",
    )
    .unwrap();
    let (code, _, err) = cli(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("CM_TEST_KEYS_SURELY_UNSET") && err.contains("keys.mode"),
        "{err}"
    );

    // Set, it passes and says so; a named upstream's variable is checked too.
    std::fs::write(
        &cfg,
        "[keys]\nmode = \"optional\"\nupstream_key_env = \"CM_TEST_KEYS_CHECK_SET\"\n[keys.upstreams.bulk]\nkey_env = \"CM_TEST_KEYS_BULK_UNSET\"\n",
    )
    .unwrap();
    let run = |envs: &[(&str, &str)]| {
        let mut c = Command::new(BIN);
        c.args(["check-config", "--config", cfg.to_str().unwrap()]);
        for (k, v) in envs {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = run(&[("CM_TEST_KEYS_CHECK_SET", "SECRET-VALUE-1")]);
    assert_eq!(code, 64);
    assert!(err.contains("CM_TEST_KEYS_BULK_UNSET"), "{err}");
    let (code, out, err) = run(&[
        ("CM_TEST_KEYS_CHECK_SET", "SECRET-VALUE-1"),
        ("CM_TEST_KEYS_BULK_UNSET", "SECRET-VALUE-2"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("keys: mode optional, upstream key from CM_TEST_KEYS_CHECK_SET, upstream \"bulk\" from CM_TEST_KEYS_BULK_UNSET"),
        "{out}"
    );
    assert!(
        !out.contains("SECRET-VALUE") && !err.contains("SECRET-VALUE"),
        "no key printed: {out}"
    );

    // keys create checks --upstream against the config, and bad input exits 64 naming it.
    let (code, _, err) = cli(&[
        "keys",
        "create",
        "--config",
        cfg.to_str().unwrap(),
        "--table",
        "T",
        "--upstream",
        "nope",
    ]);
    assert_eq!(code, 64);
    assert!(
        err.contains("nope") && err.contains("keys.upstreams"),
        "{err}"
    );
    let db = dir.path().join("ledger.db");
    let db = db.to_str().unwrap();
    for (args, want) in [
        (vec!["--table", "_other"], "reserved"),
        (vec!["--table", "T", "--expires", "yesterday"], "expires"),
        (vec!["--table", "T", "--tag", "novalue"], "NAME=VALUE"),
        (vec!["--table", "T", "--name", "0123abcd"], "hex"),
    ] {
        let mut a = vec!["keys", "create", "--db", db];
        a.extend(args);
        let (code, _, err) = cli(&a);
        assert_eq!(code, 64, "{a:?}");
        assert!(err.contains(want), "{a:?}: {err}");
    }
    let (code, _, err) = cli(&["keys", "revoke", "no-such", "--db", db]);
    assert_eq!(code, 64);
    assert!(err.contains("no-such"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_names_a_key_by_name_and_a_reload_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let env = real_key_env("budget", "real-key-budget");
    // The key first (the budget names it), in a ledger the server then opens.
    let db = dir.path().join("ledger.db");
    creditmeter::ledger::open_for_write(
        &db,
        creditmeter::config::LedgerConfig::default().synchronous,
    )
    .unwrap();
    let (vk, id) = create(&db, "Budgeted", |r| r.name = Some("budgeted".into()));
    let cfg_path = dir.path().join("creditmeter.toml");
    let text = |limit: u32| {
        format!(
            "[upstream]\nbase_url = \"{}\"\n[ledger]\npath = \"ledger.db\"\n[keys]\nmode = \"optional\"\nupstream_key_env = \"{env}\"\n\n[[budget]]\nname = \"per-key\"\nscope = {{ key = \"budgeted\" }}\nlimit = {limit}\nwindow = \"day\"\n",
            up.url()
        )
    };
    std::fs::write(&cfg_path, text(2)).unwrap();
    let config = Config::load(Some(&cfg_path)).unwrap();
    let proxy_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
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
    let url = format!("http://{addr}/api/v1/people/match");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let mut status = 0;
        for _ in 0..100 {
            match client()
                .request(request("POST", &url, &[("x-api-key", &vk)], "{}"))
                .await
            {
                Ok(r) => {
                    status = r.status().as_u16();
                    r.into_body().collect().await.unwrap();
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        statuses.push(status);
    }
    // people/match with a person costs 1 credit: two fit the budget, then it blocks.
    assert_eq!(statuses, [200, 200, 429, 429]);
    // Another key's calls are not in the budget.
    assert_eq!(
        call(
            &url,
            "POST",
            &[("x-api-key", "raw"), ("x-meter-table", "Other")],
            "{}"
        )
        .await
        .0,
        200
    );
    let (_, _, b) = get(&format!("http://{admin}/api/budgets")).await;
    assert!(
        String::from_utf8_lossy(&b).contains(&id),
        "the budget's scope is the key's id"
    );

    // A reload raising the limit: applied, and audited; one naming an unknown key: refused, audited.
    std::fs::write(&cfg_path, text(5)).unwrap();
    reload_tx.send(()).await.unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let wait_audit = |n: i64| {
        let conn = &conn;
        async move {
            for _ in 0..200 {
                let got: i64 = conn
                    .query_row(
                        "SELECT count(*) FROM audit WHERE actor = 'sighup'",
                        [],
                        |r| r.get(0),
                    )
                    .unwrap();
                if got >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("no audit entry for the reload");
        }
    };
    wait_audit(1).await;
    assert_eq!(call(&url, "POST", &[("x-api-key", &vk)], "{}").await.0, 200);
    std::fs::write(
        &cfg_path,
        text(5).replace("key = \"budgeted\"", "key = \"missing-key\""),
    )
    .unwrap();
    reload_tx.send(()).await.unwrap();
    wait_audit(2).await;
    let actions: Vec<(String, Option<String>)> = conn
        .prepare("SELECT action, json_extract(detail, '$.error') FROM audit WHERE actor = 'sighup' ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(actions[0], ("config_reloaded".to_owned(), None));
    assert_eq!(actions[1].0, "config_reload_refused");
    assert!(
        actions[1]
            .1
            .as_deref()
            .unwrap_or("")
            .contains("missing-key"),
        "{actions:?}"
    );
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_metering_off_keys_are_still_swapped_and_required() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let env = real_key_env("unmetered", "real-key-unmetered");
    let mut config = keyed_config(&up.url(), KeysMode::Required, &env);
    config.proxy.metering = false;
    let mut proxy = Proxy::start(config, dir.path()).await;
    let (vk, _) = create(&proxy.db, "Unmetered", |_| {});
    let url = proxy.url("/api/v1/people/match");
    assert_eq!(call(&url, "POST", &[("x-api-key", &vk)], "{}").await.0, 200);
    assert_eq!(
        call(&url, "POST", &[("x-api-key", "raw")], "{}").await.0,
        401
    );
    let (status, body) = call(
        &url,
        "POST",
        &[("x-api-key", &vk), ("x-meter-table", "Other")],
        "{}",
    )
    .await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (403, "attribution_conflict")
    );
    let seen = up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["x-api-key"], "real-key-unmetered");
    proxy.shutdown().await;
}

/// What a virtual key costs a call: sequential calls through creditmeter to the scripted
/// upstream with an Apollo key and with a virtual key (a generation read per call, the cache
/// hit, the swap). Prints figures; asserts only that every call was served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_key_cost_figures() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let env = real_key_env("figures", "real-key-figures");
    let mut proxy = Proxy::start(
        keyed_config(&up.url(), KeysMode::Optional, &env),
        dir.path(),
    )
    .await;
    let (vk, _) = create(&proxy.db, "Figures", |_| {});
    let url = proxy.url("/api/v1/people/match");
    let c = client();
    let mut figures = Vec::new();
    for (what, headers) in [
        (
            "apollo key",
            vec![("x-api-key", "raw-key"), ("x-meter-table", "Figures")],
        ),
        ("virtual key", vec![("x-api-key", vk.as_str())]),
        (
            "apollo key",
            vec![("x-api-key", "raw-key"), ("x-meter-table", "Figures")],
        ),
        ("virtual key", vec![("x-api-key", vk.as_str())]),
    ] {
        let mut us: Vec<u128> = Vec::new();
        for _ in 0..400 {
            let t = std::time::Instant::now();
            let (s, _, _) = send(&c, request("POST", &url, &headers, r#"{"email":"a@b.c"}"#)).await;
            us.push(t.elapsed().as_micros());
            assert_eq!(s, 200);
        }
        us.sort_unstable();
        figures.push(format!(
            "{what}: p50 {} us, p90 {} us, p99 {} us",
            us[us.len() / 2],
            us[us.len() * 9 / 10],
            us[us.len() * 99 / 100]
        ));
    }
    report(&format!(
        "400 sequential calls each ({} build): {}",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        figures.join("; ")
    ));
    proxy.shutdown().await;
}
