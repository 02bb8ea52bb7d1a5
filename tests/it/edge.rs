//! The public side (issue 15, points 2, 3, 4 and 7): limits that hold before a caller is known,
//! refusals counted instead of recorded, the proxy's certificate rotated under load, trusted
//! `X-Forwarded-For`, the locked admin listener, and draining behind a load balancer. Real
//! sockets on 127.0.0.1, real TLS with a CA made here, the real binary where a test needs a
//! process (its memory, its signals, its log).

use crate::common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::binary::{http_get, Served, BIN};
use common::*;
use creditmeter::config::HumanDuration;
use creditmeter_sim::SimConfig;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn sim_config() -> SimConfig {
    SimConfig {
        rate_limit_minute: 0,
        ..SimConfig::default()
    }
}

/// Writes `request` on a fresh connection and reads until the server closes or `wait` passes.
async fn raw_exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(request).await;
    read_until_close(&mut s, wait).await
}

async fn read_until_close(s: &mut TcpStream, wait: Duration) -> String {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A legitimate people/match call: (status, body).
fn legit_request(url: &str, n: usize) -> http::Request<Full<Bytes>> {
    http::Request::post(url)
        .header("x-api-key", "legit-key")
        .header("x-meter-table", "legit")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!(
            r#"{{"email":"person{n}@example.com"}}"#
        ))))
        .unwrap()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Strangers flood the listener (junk over fresh connections, slowloris heads, slow bodies)
/// while real callers keep calling: every real call is answered 200 and metered, no junk
/// reaches the simulator or the ledger, and the proxy's memory stays bounded.
#[test]
fn a_flood_of_junk_and_slow_bodies_leaves_real_callers_served() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimServer::start(sim_config(), None).await;
        let served = Served::start(
            dir.path(),
            &[
                ("upstream.base_url", format!("\"{}\"", sim.url(false))),
                ("proxy.header_read_timeout", "\"1s\"".into()),
                ("proxy.body_read_timeout", "\"1s\"".into()),
                ("proxy.max_connections", "512".into()),
            ],
            &[],
        );
        let addr: SocketAddr = format!("127.0.0.1:{}", served.proxy_port).parse().unwrap();
        let rss_before = vm_rss_kib(served.pid());
        let stop = Arc::new(AtomicBool::new(false));
        let junk_sent = Arc::new(AtomicUsize::new(0));
        let mut flood = Vec::new();

        // Slowloris: a request head trickled one byte per 100 ms, over and over.
        for i in 0..60 {
            let stop = stop.clone();
            flood.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(addr).await else {
                        continue;
                    };
                    let head = format!("POST /api/v1/people/match HTTP/1.1\r\nHost: x\r\nX-Slow-{i}: ");
                    for b in head.bytes().chain(std::iter::repeat(b'a')) {
                        if stop.load(Ordering::Relaxed) || s.write_all(&[b]).await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }));
        }
        // Slow bodies: a whole head, then a 1,000-byte body one byte per 100 ms.
        for _ in 0..60 {
            let stop = stop.clone();
            flood.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(addr).await else {
                        continue;
                    };
                    let head = "POST /api/v1/people/match HTTP/1.1\r\nHost: x\r\nX-Api-Key: k\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{";
                    if s.write_all(head.as_bytes()).await.is_err() {
                        continue;
                    }
                    loop {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        if stop.load(Ordering::Relaxed) || s.write_all(b" ").await.is_err() {
                            break;
                        }
                    }
                }
            }));
        }
        // Junk, as fast as it is answered: garbage, bad attribution, other hosts, CONNECT,
        // enormous declared bodies.
        let junk: [&[u8]; 6] = [
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
            b"POST /api/v1/people/match HTTP/1.1\r\nHost: x\r\nX-Meter-Table: a\x01b\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            b"GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n",
            b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n",
            b"POST /api/v1/people/bulk_match HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\nConnection: close\r\n\r\n{",
            b"POST /api/v1/people/match?meter_table=_other HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        ];
        for w in 0..8 {
            let (stop, junk_sent) = (stop.clone(), junk_sent.clone());
            flood.push(tokio::spawn(async move {
                let mut n = w;
                while !stop.load(Ordering::Relaxed) {
                    let _ = raw_exchange(addr, junk[n % junk.len()], Duration::from_secs(3)).await;
                    junk_sent.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            }));
        }
        // Let the flood build up before the real callers start.
        tokio::time::sleep(Duration::from_millis(1500)).await;

        let latencies = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let url = format!("http://{addr}/api/v1/people/match");
        // bench/flood.sh runs it longer.
        let flood_secs = Duration::from_secs(
            std::env::var("CREDITMETER_FLOOD_SECS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(8),
        );
        let callers: Vec<_> = (0..6)
            .map(|c| {
                let (latencies, failures, url) = (latencies.clone(), failures.clone(), url.clone());
                tokio::spawn(async move {
                    let pooled = client();
                    let started = Instant::now();
                    let mut n = 0;
                    while started.elapsed() < flood_secs {
                        // Every other call on a connection of its own: new connections must
                        // still be accepted during the flood.
                        let fresh = client();
                        let client = if n % 2 == 0 { &pooled } else { &fresh };
                        let t = Instant::now();
                        let got = tokio::time::timeout(
                            Duration::from_secs(30),
                            client.request(legit_request(&url, c * 100_000 + n)),
                        )
                        .await;
                        match got {
                            Ok(Ok(resp)) if resp.status() == 200 => {
                                let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                                match body {
                                    Ok(_) => latencies.lock().unwrap().push(t.elapsed().as_secs_f64() * 1000.0),
                                    Err(e) => failures.lock().unwrap().push(format!("body: {e}")),
                                }
                            }
                            Ok(Ok(resp)) => failures.lock().unwrap().push(format!("status {}", resp.status())),
                            Ok(Err(e)) => failures.lock().unwrap().push(format!("error: {e}")),
                            Err(_) => failures.lock().unwrap().push("no answer in 30 s".into()),
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        for c in callers {
            c.await.unwrap();
        }
        let m = served.metrics();
        let rss_peak = vm_hwm_kib(served.pid());
        stop.store(true, Ordering::Relaxed);
        for f in flood {
            let _ = tokio::time::timeout(Duration::from_secs(10), f).await;
        }

        let failures = failures.lock().unwrap().clone();
        let mut lat = latencies.lock().unwrap().clone();
        lat.sort_by(f64::total_cmp);
        let refused = |reason| metric_sum(&m, "creditmeter_refused_total", &[("reason", reason)]);
        report(&format!(
            "flood: {} real calls answered 200 in {} s by 6 callers (half on new connections), {} failed; latency ms p50 {:.1} p99 {:.1} max {:.1}; \
             junk requests sent {}; refused: invalid_attribution {} absolute_uri {} connect {} body_too_large {} body_timeout {} header_timeout {} malformed {}; \
             connections open at the end {}; proxy RSS {} KiB before the flood, peak {} KiB",
            lat.len(),
            flood_secs.as_secs(),
            failures.len(),
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat.last().copied().unwrap_or(0.0),
            junk_sent.load(Ordering::Relaxed),
            refused("invalid_attribution"),
            refused("absolute_uri_refused"),
            refused("connect_refused"),
            refused("request_body_too_large"),
            refused("request_body_timeout"),
            refused("header_timeout"),
            refused("malformed_request"),
            metric_sum(&m, "creditmeter_connections_open", &[]),
            rss_before,
            rss_peak,
        ));
        assert!(failures.is_empty(), "real calls failed during the flood: {failures:?}");
        assert!(lat.len() >= 12, "real callers made progress: {}", lat.len());
        assert!(refused("request_body_timeout") > 0.0, "slow bodies were cut off");
        assert!(refused("header_timeout") > 0.0, "slow heads were cut off");
        assert!(refused("malformed_request") > 0.0, "garbage was counted");
        assert!(refused("invalid_attribution") > 0.0 && refused("connect_refused") > 0.0);
        // Only the real calls reached Apollo, and only they cost a ledger commit.
        assert_eq!(sim.sim.billed().calls as usize, lat.len(), "junk reached the simulator");
        let conn = rusqlite::Connection::open(&served.ledger).unwrap();
        let (rows, legit): (i64, i64) = conn
            .query_row(
                "SELECT count(*), count(*) FILTER (WHERE table_name = 'legit' AND status = 200) FROM calls",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((rows, legit), (lat.len() as i64, lat.len() as i64));
        assert!(rss_peak < 256 * 1024, "proxy peak RSS {rss_peak} KiB");
        served.stop();
    });
}

/// Resident memory now (`VmRSS`) of `pid`, KiB.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// `proxy.max_in_flight` answers a 503 at once (nothing upstream, no row, counted), and
/// `proxy.max_connections` makes the next connection wait until one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_limits_calls_get_a_503_and_connections_wait() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let mut config = config_for(&up.url(), None);
    config.proxy.max_in_flight = 1;
    config.proxy.max_connections = 2;
    let proxy = Proxy::start(config, dir.path()).await;

    // One call in flight (upstream answers after 3 s) ...
    let slow = {
        let url = proxy.url("/api/v1/people/match?script=stall");
        tokio::spawn(async move { send(&client(), legit_request(&url, 1)).await.0 })
    };
    while up.hits.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ... so the next one is refused at once.
    let (status, h, body) = send(
        &client(),
        legit_request(&proxy.url("/api/v1/people/match"), 2),
    )
    .await;
    assert_eq!(status, 503);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"], "too_many_requests_in_flight", "{json}");
    assert_eq!(h.get("retry-after").unwrap(), "1");
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        1,
        "nothing more went upstream"
    );
    assert_eq!(slow.await.unwrap(), 200, "the call in flight is unharmed");
    let m = proxy.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_refused_total",
            &[("reason", "max_in_flight")]
        ),
        1.0
    );
    let rows: i64 = proxy
        .ledger()
        .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 1, "the refused call is no ledger row");

    // The clients above are dropped; wait until the proxy has seen their connections close,
    // so the two below are the only ones open.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = proxy.metrics().await;
        if metric_sum(&m, "creditmeter_connections_open", &[]) == 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "earlier connections never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Two connections open (idle keep-alive after a call each) fill max_connections = 2.
    let mut held = Vec::new();
    for i in 0..2 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(
            format!("GET /api/v1/auth/health?n={i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 200"), "connection {i}: {head:?}");
        held.push(s);
    }
    let m = proxy.metrics().await;
    assert_eq!(metric_sum(&m, "creditmeter_connections_open", &[]), 2.0);
    // A third connects (the kernel's backlog takes it) but is not served while both stay open.
    let mut third = TcpStream::connect(proxy.addr).await.unwrap();
    third
        .write_all(b"GET /api/v1/auth/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(
        tokio::time::timeout(Duration::from_millis(700), third.read(&mut buf))
            .await
            .is_err(),
        "the third connection was served past proxy.max_connections"
    );
    // One closes: the waiting connection is accepted and answered.
    drop(held.pop());
    let text = read_until_close(&mut third, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let m = proxy.metrics().await;
    assert!(metric_sum(&m, "creditmeter_connections_limited_total", &[]) >= 1.0);
}

/// A body slower than `proxy.body_read_timeout` gets a 408, and nothing goes upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_gets_408_and_nothing_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let mut config = config_for(&up.url(), None);
    config.proxy.body_read_timeout = HumanDuration(Duration::from_millis(500));
    let proxy = Proxy::start(config, dir.path()).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST /api/v1/people/match HTTP/1.1\r\nHost: x\r\nX-Meter-Table: t\r\nContent-Length: 40\r\n\r\n{\"email\":").await.unwrap();
    let text = read_until_close(&mut s, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains("request_body_timeout") && text.contains("proxy.body_read_timeout"),
        "{text}"
    );
    assert_eq!(up.hits.load(Ordering::SeqCst), 0);
    let rows: i64 = proxy
        .ledger()
        .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0);
    let m = proxy.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_refused_total",
            &[("reason", "request_body_timeout")]
        ),
        1.0
    );
}

/// The h2 SETTINGS the proxy announces: `SETTINGS_MAX_CONCURRENT_STREAMS`.
async fn h2_max_streams(addr: SocketAddr) -> Option<u32> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while got.len() < 9
        || got.len() < 9 + ((got[0] as usize) << 16 | (got[1] as usize) << 8 | got[2] as usize)
    {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before SETTINGS");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got[3], 0x4, "the server's first frame is SETTINGS");
    let len = (got[0] as usize) << 16 | (got[1] as usize) << 8 | got[2] as usize;
    got[9..9 + len].chunks(6).find_map(|p| {
        (u16::from_be_bytes([p[0], p[1]]) == 0x3)
            .then(|| u32::from_be_bytes([p[2], p[3], p[4], p[5]]))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_connections_get_32_streams_unless_configured() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let proxy = Proxy::start(config_for(&up.url(), None), dir.path()).await;
    assert_eq!(h2_max_streams(proxy.addr).await, Some(32));
    let dir2 = tempfile::tempdir().unwrap();
    let mut config = config_for(&up.url(), None);
    config.proxy.h2_max_concurrent_streams = 5;
    let proxy2 = Proxy::start(config, dir2.path()).await;
    assert_eq!(h2_max_streams(proxy2.addr).await, Some(5));
}

/// One CA that signs several leaves for `localhost`.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: PathBuf,
}

impl Ca {
    fn new(dir: &Path) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "edge test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, cert.pem()).unwrap();
        Ca {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        }
    }

    /// A new leaf written over `cert`/`key` as cert-manager does (temp file, rename);
    /// returns its DER.
    fn issue(&self, cert: &Path, key: &Path, cn: &str) -> Vec<u8> {
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let leaf = params.signed_by(&leaf_key, &self.issuer).unwrap();
        let tmp = cert.with_extension("new");
        std::fs::write(&tmp, leaf.pem()).unwrap();
        std::fs::rename(&tmp, cert).unwrap();
        std::fs::write(&tmp, leaf_key.serialize_pem()).unwrap();
        std::fs::rename(&tmp, key).unwrap();
        leaf.der().to_vec()
    }

    fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        self.client_config_for(rustls::DEFAULT_VERSIONS, alpn)
    }

    fn client_config_for(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: &[&[u8]],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.pem).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        // Every connection a full handshake: a resumed session shows the certificate of the
        // session it resumes, not the one in force.
        cfg.resumption = rustls::client::Resumption::disabled();
        Arc::new(cfg)
    }
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

fn leaf_of(s: &Tls) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// An HTTP/1.1 connection over `tls`: its sender (the connection runs on its own task).
async fn h1_over(tls: Tls) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// TLS 1.2 or later, ALPN h2 and http/1.1; the certificate is rotated in place under load:
/// no call fails, the open keep-alive connection keeps working, new handshakes see the new
/// certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_rotated_under_load_without_a_failed_call() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let first = ca.issue(&cert, &key, "first");
    let sim = SimServer::start(sim_config(), None).await;
    let mut config = config_for(&sim.url(false), None);
    config.proxy.tls_cert = Some(cert.clone());
    config.proxy.tls_key = Some(key.clone());
    config.proxy.tls_reload_interval = HumanDuration(Duration::from_millis(100));
    let proxy = Proxy::start(config, dir.path()).await;

    // Protocol: h2 when offered, http/1.1 otherwise; TLS 1.2 works, and so does 1.3.
    let h2 = tls_connect(proxy.addr, ca.client_config(&[b"h2", b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let h1 = tls_connect(proxy.addr, ca.client_config(&[b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(h1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(
        h1.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let tls12 = ca.client_config_for(&[&rustls::version::TLS12], &[b"http/1.1"]);
    let s12 = tls_connect(proxy.addr, tls12).await.unwrap();
    assert_eq!(
        s12.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    drop((h2, s12));

    // Origin-form: these requests go over raw connections, not through a client pool.
    let url = "/api/v1/people/match".to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    // The long-lived connection, opened before the rotation.
    let mut keep = h1_over(h1).await;
    let kept_calls = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for w in 0..4 {
        let (stop, failures, seen, cfg, url) = (
            stop.clone(),
            failures.clone(),
            seen.clone(),
            ca.client_config(&[b"http/1.1"]),
            url.clone(),
        );
        let addr = proxy.addr;
        load.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let tls = match tls_connect(addr, cfg.clone()).await {
                    Ok(t) => t,
                    Err(e) => {
                        failures.lock().unwrap().push(format!("handshake: {e}"));
                        continue;
                    }
                };
                seen.lock().unwrap().push(leaf_of(&tls));
                let mut sender = h1_over(tls).await;
                let mut req = legit_request(&url, w * 100_000 + n);
                req.headers_mut()
                    .insert("host", "localhost".parse().unwrap());
                match sender.send_request(req).await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.into_body().collect().await;
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("status {}", r.status())),
                    Err(e) => failures.lock().unwrap().push(format!("request: {e}")),
                }
                n += 1;
            }
        }));
    }
    let mut keep_call = |n: usize| {
        let mut req = legit_request(&url, 900_000 + n);
        req.headers_mut()
            .insert("host", "localhost".parse().unwrap());
        let fut = keep.send_request(req);
        async move {
            let r = fut
                .await
                .expect("the connection opened before the rotation still works");
            let status = r.status();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        }
    };
    keep_call(0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = ca.issue(&cert, &key, "second");
    let rotated = Instant::now();
    let mut n = 1;
    loop {
        keep_call(n).await;
        kept_calls.fetch_add(1, Ordering::Relaxed);
        n += 1;
        if seen.lock().unwrap().contains(&second) {
            break;
        }
        if rotated.elapsed() > Duration::from_secs(30) {
            let m = proxy.metrics().await;
            panic!(
                "no handshake saw the new certificate: {} handshakes, failures {:?}, reloads ok {} error {}",
                seen.lock().unwrap().len(),
                failures.lock().unwrap(),
                metric_sum(&m, "creditmeter_tls_reloads_total", &[("result", "ok")]),
                metric_sum(&m, "creditmeter_tls_reloads_total", &[("result", "error")]),
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    keep_call(n).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    let before = seen.iter().filter(|c| **c == first).count();
    let after = seen.iter().filter(|c| **c == second).count();
    let m = proxy.metrics().await;
    report(&format!(
        "certificate rotation under load: {} handshakes ({before} with the first certificate, {after} with the second), {} calls on the connection opened before the rotation, {} failures; reloads ok {} error {}",
        seen.len(),
        n + 1,
        failures.lock().unwrap().len(),
        metric_sum(&m, "creditmeter_tls_reloads_total", &[("result", "ok")]),
        metric_sum(&m, "creditmeter_tls_reloads_total", &[("result", "error")]),
    ));
    assert!(
        failures.lock().unwrap().is_empty(),
        "{:?}",
        failures.lock().unwrap()
    );
    assert!(before > 0 && after > 0);
    assert_eq!(
        before + after,
        seen.len(),
        "only the two certificates were served"
    );
    // From now on every new handshake gets the new certificate. (The order in `seen` is the
    // order handshakes finished across four tasks, so a handshake that began before the swap
    // may be listed after one that began after it; these are sequential.)
    for _ in 0..5 {
        let tls = tls_connect(proxy.addr, ca.client_config(&[b"http/1.1"]))
            .await
            .unwrap();
        assert_eq!(leaf_of(&tls), second);
    }
    assert!(metric_sum(&m, "creditmeter_tls_reloads_total", &[("result", "ok")]) >= 1.0);
}

/// A request to the admin listener: (status, JSON body).
async fn admin_call(
    admin: SocketAddr,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, serde_json::Value) {
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let (status, _, bytes) = send(
        &client(),
        b.body(Full::new(Bytes::from(body.to_owned()))).unwrap(),
    )
    .await;
    (
        status.as_u16(),
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

/// DNS rebinding and cross-site posts: a foreign `Host` gets a 421, a mutation that is not
/// JSON a 415, and neither changes anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_answers_only_its_own_names_and_json_mutations() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let mut config = config_for(&up.url(), None);
    config.admin.hosts = vec!["creditmeter.internal".into()];
    let proxy = Proxy::start(config, dir.path()).await;
    let a = proxy.admin;
    let port = a.port().to_string();
    for host in [
        "rebound.attacker.example",
        &format!("rebound.attacker.example:{port}"),
        "10.0.0.1",
    ] {
        for path in ["/api/status", "/metrics", "/api/holds"] {
            let (status, j) = admin_call(a, http::Method::GET, path, &[("host", host)], "").await;
            assert_eq!(status, 421, "{host} {path}: {j}");
            assert_eq!(j["error"], "host_not_allowed");
            assert!(
                j["message"].as_str().unwrap().contains("admin.hosts"),
                "{j}"
            );
        }
    }
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        "creditmeter.internal".into(),
    ] {
        let (status, j) =
            admin_call(a, http::Method::GET, "/api/status", &[("host", &host)], "").await;
        assert_eq!(status, 200, "{host}: {j}");
    }
    let hold = r#"{"scope": {"table": "t"}, "reason": "csrf"}"#;
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
    ] {
        let headers: Vec<(&str, &str)> = ct.map(|c| ("content-type", c)).into_iter().collect();
        let (status, j) = admin_call(a, http::Method::POST, "/api/holds", &headers, hold).await;
        assert_eq!(status, 415, "{ct:?}: {j}");
        assert!(
            j["message"].as_str().unwrap().contains("application/json"),
            "{j}"
        );
    }
    let (_, holds) = admin_call(a, http::Method::GET, "/api/holds", &[], "").await;
    assert_eq!(
        holds["holds"].as_array().unwrap().len(),
        0,
        "nothing was held: {holds}"
    );
    let (status, j) = admin_call(
        a,
        http::Method::POST,
        "/api/holds",
        &[("content-type", "application/json")],
        hold,
    )
    .await;
    assert_eq!(status, 201, "{j}");
    let id = j["hold"]["id"].as_i64().unwrap();
    let (status, _) = admin_call(
        a,
        http::Method::DELETE,
        &format!("/api/holds/{id}"),
        &[],
        "",
    )
    .await;
    assert_eq!(status, 415, "a DELETE must say JSON too");
    let (status, j) = admin_call(
        a,
        http::Method::DELETE,
        &format!("/api/holds/{id}"),
        &[("content-type", "application/json")],
        "",
    )
    .await;
    assert_eq!(status, 200, "{j}");
}

/// Off loopback the admin token is required (or `run` refuses, naming the variable), and
/// `/metrics` needs it too unless `admin.protect_metrics = false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_admin_listener_needs_its_token_and_protects_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let up = Scripted::start().await;
    let env = "CREDITMETER_EDGE_TEST_ADMIN_TOKEN";
    let mut config = config_for(&up.url(), None);
    config.admin.token_env = format!("{env}_UNSET");
    config.ledger.path = dir.path().join("l.db");
    let proxy_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_l = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = creditmeter::run(config.clone(), proxy_l, admin_l, async {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("{env}_UNSET")) && err.contains("admin.token_env"),
        "{err}"
    );

    // SAFETY of the test: the variable name is this test's own.
    std::env::set_var(env, "edge-admin-secret");
    config.admin.token_env = env.into();
    let proxy_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_l = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", admin_l.local_addr().unwrap().port())
        .parse()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(creditmeter::run(config, proxy_l, admin_l, async {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(20);
    while admin_call(admin, http::Method::GET, "/healthz", &[], "")
        .await
        .0
        != 200
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = admin_call(admin, http::Method::GET, "/metrics", &[], "").await;
    assert_eq!(status, 401, "/metrics is protected off loopback");
    let (status, _) = admin_call(admin, http::Method::GET, "/api/status", &[], "").await;
    assert_eq!(status, 401);
    let req = http::Request::get(format!("http://{admin}/metrics"))
        .header("authorization", "Bearer edge-admin-secret")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, body) = send(&client(), req).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("creditmeter_refused_total"));
    // Off loopback, a probe naming the pod's address is answered.
    let (status, _) = admin_call(
        admin,
        http::Method::GET,
        "/readyz",
        &[("host", "10.42.0.7:9464")],
        "",
    )
    .await;
    assert_eq!(status, 200);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

fn run_binary(args: &[&str], env: &[(&str, &str)], unset: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    for k in unset {
        cmd.env_remove(k);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_and_serve_refuse_an_open_admin_listener_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"0.0.0.0:0\"\n[ledger]\npath = \"l.db\"\n",
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let unset = ["CREDITMETER_ADMIN_TOKEN"];
    for cmd in ["check-config", "serve"] {
        let (code, err) = run_binary(&[cmd, "--config", cfg], &[], &unset);
        assert_eq!(code, Some(64), "{cmd}: {err}");
        assert!(
            err.contains("CREDITMETER_ADMIN_TOKEN") && err.contains("admin.token_env"),
            "{cmd}: {err}"
        );
    }
    assert!(
        !dir.path().join("l.db").exists(),
        "serve stopped before opening anything"
    );
    let (code, err) = run_binary(
        &["check-config", "--config", cfg],
        &[("CREDITMETER_ADMIN_TOKEN", "t0ken")],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
}

/// SIGTERM: `/readyz` turns 503 at once, the proxy keeps serving new connections for
/// `shutdown.drain_delay`, then closes and the process exits 0. A real process, a real signal.
#[test]
fn sigterm_turns_readyz_503_and_keeps_serving_for_the_drain_delay() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sim = rt.block_on(SimServer::start(sim_config(), None));
    let mut served = Served::start(
        dir.path(),
        &[
            ("upstream.base_url", format!("\"{}\"", sim.url(false))),
            ("shutdown.drain_delay", "\"4s\"".into()),
        ],
        &[],
    );
    assert_eq!(http_get(served.admin_port, "/readyz").unwrap().0, 200);
    let signalled = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &served.pid().to_string()])
        .status()
        .unwrap()
        .success());
    // Not ready any more, very soon ...
    let (status, body) = loop {
        let (status, body) = http_get(served.admin_port, "/readyz").unwrap();
        if status == 503 || signalled.elapsed() > Duration::from_secs(3) {
            break (status, body);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"draining\":true"), "{body}");
    // ... while calls on new connections are still served.
    let url = served.url("/api/v1/people/match");
    let (status, _, _) = rt.block_on(send(&client(), legit_request(&url, 7)));
    assert_eq!(
        status, 200,
        "a call after /readyz said 503, within the drain delay"
    );
    let exit = loop {
        if let Some(s) = served.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(40),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    report(&format!(
        "drain: SIGTERM to exit {:.1} s with shutdown.drain_delay = 4s",
        signalled.elapsed().as_secs_f64()
    ));
    assert_eq!(exit.code(), Some(0));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", served.proxy_port)).is_err(),
        "closed after the drain"
    );
    let log = std::fs::read_to_string(&served.stderr_log).unwrap();
    assert!(log.contains("drain delay"), "{log}");
    let rows: i64 = rusqlite::Connection::open(&served.ledger)
        .unwrap()
        .query_row("SELECT count(*) FROM calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 1, "the call served while draining is in the ledger");
}

/// SIGHUP reloads the certificate in a real process (file polling set to an hour, so only
/// the signal can have done it); a junk certificate on the next SIGHUP keeps the good one.
#[test]
fn sighup_reloads_the_certificate() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let first = ca.issue(&cert, &key, "first");
    let sim = rt.block_on(SimServer::start(sim_config(), None));
    let served = Served::start(
        dir.path(),
        &[
            ("upstream.base_url", format!("\"{}\"", sim.url(false))),
            ("proxy.tls_cert", format!("{:?}", cert.to_str().unwrap())),
            ("proxy.tls_key", format!("{:?}", key.to_str().unwrap())),
            ("proxy.tls_reload_interval", "\"1h\"".into()),
        ],
        &[],
    );
    let addr: SocketAddr = format!("127.0.0.1:{}", served.proxy_port).parse().unwrap();
    let cfg = ca.client_config(&[b"http/1.1"]);
    let leaf = |cfg: &Arc<rustls::ClientConfig>| {
        rt.block_on(async { leaf_of(&tls_connect(addr, cfg.clone()).await.unwrap()) })
    };
    assert_eq!(leaf(&cfg), first);
    let second = ca.issue(&cert, &key, "second");
    assert_eq!(
        leaf(&cfg),
        first,
        "no reload without the signal (polling is hourly)"
    );
    let hup = || {
        assert!(Command::new("kill")
            .args(["-HUP", &served.pid().to_string()])
            .status()
            .unwrap()
            .success())
    };
    hup();
    let deadline = Instant::now() + Duration::from_secs(20);
    while leaf(&cfg) != second {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload the certificate"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    hup();
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric_sum(
        &served.metrics(),
        "creditmeter_tls_reloads_total",
        &[("result", "error")],
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "the bad reload was not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        leaf(&cfg),
        second,
        "a broken file keeps the certificate in force"
    );
    let log = std::fs::read_to_string(&served.stderr_log).unwrap();
    assert!(log.contains("TLS certificate reload refused"), "{log}");
    served.stop();
}

/// `X-Forwarded-For` names the caller only when a trusted proxy sends it, and refusals are
/// logged once per reason per interval with the count, while each is counted.
#[test]
fn forwarded_for_is_believed_only_from_trusted_proxies_and_refusals_log_rate_limited() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sim = rt.block_on(SimServer::start(sim_config(), None));
    let served = Served::start(
        dir.path(),
        &[
            ("upstream.base_url", format!("\"{}\"", sim.url(false))),
            ("proxy.trusted_proxies", "[\"127.0.0.2\"]".into()),
        ],
        &[],
    );
    let port = served.proxy_port;
    rt.block_on(async {
        let from = |local: &'static str, request: &'static str| async move {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(format!("{local}:0").parse().unwrap()).unwrap();
            let mut s = sock.connect(format!("127.0.0.1:{port}").parse().unwrap()).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            read_until_close(&mut s, Duration::from_secs(5)).await
        };
        // From the trusted proxy: the caller is the address it forwarded.
        for _ in 0..30 {
            let text = from("127.0.0.2", "POST /api/v1/people/match HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.1, 203.0.113.9\r\nX-Meter-Table: _other\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}").await;
            assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        }
        // From anyone else: the header is ignored.
        let text = from("127.0.0.1", "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example\r\nX-Forwarded-For: 203.0.113.66\r\nConnection: close\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 405"), "{text}");
    });
    let m = served.metrics();
    assert_eq!(
        metric_sum(
            &m,
            "creditmeter_refused_total",
            &[("reason", "invalid_attribution")]
        ),
        30.0
    );
    let log = std::fs::read_to_string(&served.stderr_log).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused before authentication"))
        .collect();
    let attribution: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("invalid_attribution"))
        .collect();
    assert_eq!(
        attribution.len(),
        1,
        "one line for 30 refusals within 10 s: {lines:#?}"
    );
    assert!(
        attribution[0].contains("last_client=203.0.113.9"),
        "{}",
        attribution[0]
    );
    let connect: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("connect_refused"))
        .collect();
    assert_eq!(connect.len(), 1, "{lines:#?}");
    assert!(
        connect[0].contains("last_client=127.0.0.1") && !log.contains("203.0.113.66"),
        "{}",
        connect[0]
    );
    served.stop();
}
