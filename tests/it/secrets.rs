#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! API keys appear nowhere creditmeter writes (issue 5, point 5). The real binary serves a
//! workload at `RUST_LOG=debug` with distinctive keys in every place a caller puts one
//! (`X-Api-Key`, `Authorization: Bearer`, `api_key` in the query and in a JSON body, and a few
//! places creditmeter does not read keys from), through successes and every error path: the
//! simulator's 401 and 400s, upstream failures (502, 504), and creditmeter's own refusals (400,
//! 405, 413). Then every byte it wrote is searched for each key: the ledger and its `-wal` and
//! `-shm` (copied while running, before shutdown checkpoints them away), anything else beside
//! the ledger (a spool file), the captured stdout and stderr, and the `/metrics` text.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::binary::Served;
use common::request::Call;
use common::*;
use creditmeter_sim::SimConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const X_API_KEY: &str = "xak-SECRET-7f3a9c1e-HEADER";
const BEARER: &str = "brr-SECRET-51d2e8aa-TOKEN";
const QUERY_KEY: &str = "qk-SECRET-90b4a177-QUERY";
const BODY_KEY: &str = "jk-SECRET-c3e7d5f0-BODY";
/// Keys in places creditmeter does not read them from: they must not leak either.
const BASIC_KEY: &str = "bk-SECRET-0a9e33c2-BASIC";
const USERINFO_KEY: &str = "ui-SECRET-6b1f04d9-USERINFO";
const PROXY_AUTH_KEY: &str = "pa-SECRET-e52c7b18-PROXYAUTH";
const FORM_KEY: &str = "fk-SECRET-3d8b6a02-FORM";

const ALL_KEYS: [&str; 8] = [
    X_API_KEY,
    BEARER,
    QUERY_KEY,
    BODY_KEY,
    BASIC_KEY,
    USERINFO_KEY,
    PROXY_AUTH_KEY,
    FORM_KEY,
];

fn start(dir: &Path, upstream: &str, extra: &[(&str, String)]) -> Served {
    let mut settings = vec![("upstream.base_url", format!("\"{upstream}\""))];
    settings.extend(extra.iter().cloned());
    Served::start(dir, &settings, &[("RUST_LOG", "debug")])
}

/// A request with the usual attribution, built by `build`.
async fn call(
    served: &Served,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> u16 {
    let method = http::Method::from_bytes(method.as_bytes()).unwrap();
    let mut b = Call::new(method, served.url(path_and_query)).table("secrets");
    // JSON unless the call names its own type (one Content-Type, as a client sends it).
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        b = b.json_type();
    }
    for (k, v) in headers {
        b = b.header(k, v);
    }
    b.body(body.to_owned()).send().await.0.as_u16()
}

/// Writes raw bytes on a fresh connection and returns the status line.
async fn raw(served: &Served, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", served.proxy_port))
        .await
        .unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// The keyed calls every instance gets: each key location, alone.
async fn keyed_calls(served: &Served) -> Vec<u16> {
    let email = r#"{"email": "ada@example.com"}"#;
    vec![
        call(
            served,
            "POST",
            "/api/v1/people/match",
            &[("x-api-key", X_API_KEY)],
            email,
        )
        .await,
        call(
            served,
            "POST",
            "/api/v1/people/match",
            &[("authorization", &format!("Bearer {BEARER}"))],
            email,
        )
        .await,
        call(
            served,
            "GET",
            &format!("/api/v1/people/match?email=ada%40example.com&api_key={QUERY_KEY}"),
            &[],
            "",
        )
        .await,
        call(
            served,
            "POST",
            "/api/v1/people/match",
            &[],
            &format!(r#"{{"api_key": "{BODY_KEY}", "email": "ada@example.com"}}"#),
        )
        .await,
    ]
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Copies every file of a running instance's directory into `into` (the `-wal` and `-shm`
/// files exist only while it runs).
fn snapshot(served: &Served, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    for f in files(&served.dir) {
        let name = f.file_name().unwrap().to_owned();
        std::fs::copy(&f, into.join(name)).unwrap();
    }
}

/// The files' bytes, ASCII-lowercased, read once for every key searched.
struct Haystack(Vec<(PathBuf, Vec<u8>)>);

impl Haystack {
    fn read(files: &[PathBuf]) -> Haystack {
        Haystack(
            files
                .iter()
                .map(|f| (f.clone(), std::fs::read(f).unwrap().to_ascii_lowercase()))
                .collect(),
        )
    }

    /// Where `needle` occurs, in any letter case, as "file @ offset".
    fn occurrences(&self, needle: &str) -> Vec<String> {
        let needle = needle.to_ascii_lowercase();
        let finder = memchr::memmem::Finder::new(needle.as_bytes());
        self.0
            .iter()
            .filter_map(|(f, bytes)| {
                finder
                    .find(bytes)
                    .map(|at| format!("{} @ {at}", f.display()))
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_appear_in_nothing_creditmeter_writes() {
    let root = tempfile::tempdir().unwrap();
    let pki = make_pki(root.path());
    let sim = SimServer::start(SimConfig::default(), Some(&pki)).await;
    let snapshots = root.path().join("snapshots");
    let mut all_files = Vec::new();

    // A: the simulator over TLS. Successes, the sim's 401 and 400s, and creditmeter's refusals.
    let dir_a = root.path().join("a");
    std::fs::create_dir_all(&dir_a).unwrap();
    let a = start(
        &dir_a,
        &sim.url(true),
        &[
            (
                "upstream.ca_file",
                format!("{:?}", pki.ca_pem.display().to_string()),
            ),
            ("proxy.max_request_body", "\"64KiB\"".to_owned()),
        ],
    );
    let statuses = keyed_calls(&a).await;
    assert_eq!(statuses, [200, 200, 200, 200], "each key location works");
    let eleven: Vec<String> = (0..11)
        .map(|i| format!(r#"{{"email": "p{i}@example.com"}}"#))
        .collect();
    let mut seen = vec![
        // The sim refuses more than 10 details (400) and a key it cannot see (401).
        call(
            &a,
            "POST",
            "/api/v1/people/bulk_match",
            &[("x-api-key", X_API_KEY)],
            &format!(r#"{{"details": [{}]}}"#, eleven.join(",")),
        )
        .await,
        call(
            &a,
            "POST",
            "/api/v1/people/match",
            &[("authorization", &format!("Basic {BASIC_KEY}"))],
            r#"{"email": "ada@example.com"}"#,
        )
        .await,
        // A JSON body cut off after its key: not JSON to creditmeter, and no key to the sim (401).
        call(
            &a,
            "POST",
            "/api/v1/people/match",
            &[],
            &format!(r#"{{"api_key": "{BODY_KEY}", "email": "#),
        )
        .await,
        // A form body: read as Apollo reads it (the sim accepts the key there, 200), so the key
        // is fingerprinted like any other, and must not be written anywhere either.
        call(
            &a,
            "POST",
            "/api/v1/people/match",
            &[("content-type", "application/x-www-form-urlencoded")],
            &format!("api_key={FORM_KEY}&email=ada%40example.com"),
        )
        .await,
        // Proxy-Authorization is hop-by-hop: stripped, never forwarded or recorded.
        call(
            &a,
            "POST",
            "/api/v1/people/match",
            &[
                ("x-api-key", X_API_KEY),
                ("proxy-authorization", &format!("Bearer {PROXY_AUTH_KEY}")),
            ],
            r#"{"email": "ada@example.com"}"#,
        )
        .await,
        // creditmeter's own 400s: bad attribution, with the key in each place.
        call(
            &a,
            "POST",
            "/api/v1/people/match",
            &[("x-api-key", X_API_KEY), ("x-meter-workflow", "a\tb")],
            "{}",
        )
        .await,
        call(
            &a,
            "GET",
            &format!("/api/v1/people/match?meter_table=%FF&api_key={QUERY_KEY}"),
            &[("authorization", &format!("Bearer {BEARER}"))],
            "",
        )
        .await,
        call(
            &a,
            "POST",
            "/api/v1/people/match?meter_workflow=%01",
            &[],
            &format!(r#"{{"api_key": "{BODY_KEY}"}}"#),
        )
        .await,
        // 413 past proxy.max_request_body, the key first in the body.
        call(
            &a,
            "POST",
            "/api/v1/people/bulk_match",
            &[("x-api-key", X_API_KEY)],
            &format!(
                r#"{{"api_key": "{BODY_KEY}", "padding": "{}"}}"#,
                "x".repeat(128 << 10)
            ),
        )
        .await,
    ];
    // Absolute-form (with a key in the userinfo and the query) and CONNECT: refused.
    let refused = [
        raw(
            &a,
            &format!("GET http://user:{USERINFO_KEY}@evil.example.com/api/v1/people/match?api_key={QUERY_KEY} HTTP/1.1\r\nHost: evil.example.com\r\nX-Api-Key: {X_API_KEY}\r\nConnection: close\r\n\r\n"),
        )
        .await,
        raw(
            &a,
            &format!("CONNECT evil.example.com:443 HTTP/1.1\r\nHost: evil.example.com:443\r\nProxy-Authorization: Basic {PROXY_AUTH_KEY}\r\nConnection: close\r\n\r\n"),
        )
        .await,
    ];
    seen.extend(
        refused
            .iter()
            .map(|l| l.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)),
    );
    assert_eq!(
        seen,
        [400, 401, 401, 200, 200, 400, 400, 400, 413, 400, 405]
    );
    std::fs::write(dir_a.join("metrics.txt"), a.metrics()).unwrap();
    snapshot(&a, &snapshots.join("a"));
    let ledger_a = a.ledger.clone();
    a.stop();

    // B: an upstream that resets mid-headers (502). C: one that never answers (504).
    let (reset, _) = raw_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-",
        Duration::from_millis(20),
        true,
    )
    .await;
    let (silent, _) = raw_upstream(b"", Duration::from_secs(30), false).await;
    for (name, upstream, extra, want) in [
        ("b", format!("http://{reset}"), vec![], 502),
        (
            "c",
            format!("http://{silent}"),
            vec![("upstream.timeout", "\"300ms\"".to_owned())],
            504,
        ),
    ] {
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let served = start(&dir, &upstream, &extra);
        assert_eq!(keyed_calls(&served).await, [want; 4], "{name}");
        std::fs::write(dir.join("metrics.txt"), served.metrics()).unwrap();
        snapshot(&served, &snapshots.join(name));
        served.stop();
    }

    // The workload really ran, was keyed, and was logged at debug.
    let conn = rusqlite::Connection::open(&ledger_a).unwrap();
    let (rows, keyed): (i64, i64) = conn
        .query_row(
            "SELECT count(*), count(key_fp) FROM calls WHERE table_name = 'secrets' OR table_name IS NULL",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(
        rows >= 13 && keyed >= 6,
        "{rows} rows, {keyed} with a key_fp"
    );
    let fps: i64 = conn
        .query_row("SELECT count(DISTINCT key_fp) FROM calls", [], |r| r.get(0))
        .unwrap();
    // X-Api-Key, Bearer, the query's and the JSON body's api_key, and the form body's.
    assert_eq!(fps, 5, "one fingerprint per key creditmeter reads");
    drop(conn);
    let log_a = std::fs::read_to_string(dir_a.join("stderr.log")).unwrap();
    assert!(log_a.contains("DEBUG"), "RUST_LOG=debug took effect");
    assert!(log_a.contains("call refused"), "the refusals were logged");
    assert!(sim.sim.billed().calls >= 4);

    for dir in [
        root.path().join("a"),
        root.path().join("b"),
        root.path().join("c"),
        snapshots,
    ] {
        all_files.extend(files(&dir));
    }
    // The search itself works: a planted key is found.
    let planted = root.path().join("planted.bin");
    std::fs::write(&planted, format!("xx{}yy", X_API_KEY.to_lowercase())).unwrap();
    assert_eq!(
        Haystack::read(std::slice::from_ref(&planted)).occurrences(X_API_KEY),
        [format!("{} @ 2", planted.display())]
    );

    let written: u64 = all_files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let names: Vec<String> = all_files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    report(&format!(
        "searched {} files ({} KiB: {}) for {} keys",
        all_files.len(),
        written >> 10,
        names.join(", "),
        ALL_KEYS.len()
    ));
    assert!(
        names.iter().any(|n| n.ends_with("-wal")),
        "a WAL was captured: {names:?}"
    );
    let haystack = Haystack::read(&all_files);
    let mut leaks = Vec::new();
    for key in ALL_KEYS {
        for at in haystack.occurrences(key) {
            leaks.push(format!("{key} in {at}"));
        }
    }
    assert!(
        leaks.is_empty(),
        "API keys written to disk:\n{}",
        leaks.join("\n")
    );
}
