#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Test harness: a TLS CA made with rcgen, the simulator behind it, creditmeter on ephemeral
//! ports, a scripted upstream for faults, and clients. Real sockets on 127.0.0.1 only.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use creditmeter::config::Config;
use creditmeter_sim::{Sim, SimConfig};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A CA and a leaf for `localhost`/127.0.0.1, as PEM files in `dir`.
pub struct TestPki {
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

pub fn make_pki(dir: &Path) -> TestPki {
    make_pki_with(dir, false)
}

/// Like [`make_pki`], with a leaf that expired years ago when `expired` (the CA stays valid).
pub fn make_pki_with(dir: &Path, expired: bool) -> TestPki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "creditmeter test CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf_params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    if expired {
        leaf_params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        leaf_params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let pki = TestPki {
        ca_pem: dir.join("ca.pem"),
        cert_pem: dir.join("cert.pem"),
        key_pem: dir.join("key.pem"),
    };
    std::fs::write(&pki.ca_pem, ca_cert.pem()).unwrap();
    std::fs::write(&pki.cert_pem, leaf.pem()).unwrap();
    std::fs::write(&pki.key_pem, leaf_key.serialize_pem()).unwrap();
    pki
}

/// The simulator on an ephemeral port, over TLS when `pki` is given.
pub struct SimServer {
    pub sim: Sim,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl SimServer {
    pub async fn start(cfg: SimConfig, pki: Option<&TestPki>) -> SimServer {
        let sim = Sim::new(cfg);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = pki.map(|p| {
            creditmeter::proxy::listener::tls_acceptor(&p.cert_pem, &p.key_pem)
                .unwrap()
                .config()
                .clone()
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let s = sim.clone();
        tokio::spawn(async move {
            s.serve(listener, tls, async {
                let _ = stopped.await;
            })
            .await
        });
        SimServer {
            sim,
            addr,
            stop: Some(stop),
        }
    }

    pub fn url(&self, tls: bool) -> String {
        if tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// creditmeter on ephemeral ports.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub db: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), creditmeter::RunError>>>,
}

impl Proxy {
    pub async fn start(mut config: Config, dir: &Path) -> Proxy {
        if config.ledger.path == Path::new(creditmeter::config::DEFAULT_LEDGER_PATH) {
            config.ledger.path = dir.join("ledger.db");
        }
        let db = config.ledger.path.clone();
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = proxy.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(creditmeter::run(config, proxy, admin, async {
            let _ = stopped.await;
        }));
        let proxy = Proxy {
            addr,
            admin: admin_addr,
            db,
            stop: Some(stop),
            task: Some(task),
        };
        proxy.wait_ready().await;
        proxy
    }

    /// Polls `/readyz` until the ledger is open and the listeners serve.
    pub async fn wait_ready(&self) {
        let c = client();
        for _ in 0..200 {
            let req = http::Request::get(format!("http://{}/readyz", self.admin))
                .body(Full::new(Bytes::new()))
                .unwrap();
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_millis(500), c.request(req)).await
            {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("creditmeter did not become ready");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends the shutdown signal and waits for `run` to return (ledger flushed).
    pub async fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("shutdown within 60s")
                .unwrap()
                .unwrap();
        }
    }

    pub fn ledger(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open_with_flags(
            &self.db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c
    }

    pub async fn metrics(&self) -> String {
        let (_, _, body) = get(&format!("http://{}/metrics", self.admin)).await;
        String::from_utf8(body.to_vec()).unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub fn config_for(upstream: &str, ca: Option<&Path>) -> Config {
    let mut c = Config::default();
    c.upstream.base_url = upstream.to_owned();
    c.upstream.ca_file = ca.map(Path::to_path_buf);
    c.shutdown.grace = creditmeter::config::HumanDuration(Duration::from_secs(10));
    c
}

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn get(url: &str) -> (http::StatusCode, http::HeaderMap, Bytes) {
    send(
        &client(),
        http::Request::get(url)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

pub async fn send(
    client: &HttpClient,
    req: http::Request<Full<Bytes>>,
) -> (http::StatusCode, http::HeaderMap, Bytes) {
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("response within 30s")
        .expect("request failed");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, body)
}

/// Parses a metric line's value: `name{labels} value`. Sums every series matching all `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What the scripted upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// A scripted upstream for exact observation and faults. Behaviour by the `script` query
/// parameter (paths stay catalogued, so calls are priced as usual):
/// - `script=slow`: a people/match 200 with a person, sent in two chunks 400 ms apart;
/// - `script=stall`: headers after 3 s;
/// - `script=blob`: [`blob`] as gzip in 16 KiB frames with a content-length;
/// - `script=chunked`: [`blob`] as gzip in 16 KiB frames, chunked (no content-length);
/// - `script=status&code=N`: status N with Apollo's JSON error shape and `retry-after: 1`;
/// - `script=drip`: a people/match 200 whose 4,000-byte body trickles 100 bytes per 100 ms;
/// - `script=truncgz`: a complete HTTP message whose gzip body is cut in half;
/// - `script=malformed`: a 200 whose JSON body stops mid-object;
/// - `script=shape`: a 200 with `{"person": "yes"}` (a string where an object belongs);
/// - `script=array`: a 200 whose body is a JSON array of people/match answers;
/// - `script=huge&mb=N`: a valid people/match 200 padded to N MiB, generated as it streams;
/// - `script=bomb&mb=N`: gzip whose body decodes to N MiB of valid JSON (see [`gzip_bomb`]);
/// - `script=trailers`: a chunked people/match 200 declaring `Trailer: x-checksum, x-rows` and
///   ending with those trailers (see [`TRAILER_CHECKSUM`]);
/// - anything else: `{"person": {...}}`; every request is recorded in `seen`.
pub struct Scripted {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub hits: Arc<AtomicUsize>,
}

pub const SLOW_FIRST: &str =
    "{\"person\": {\"id\": \"p1\", \"name\": \"Slow Person\", \"padding\": \"";

impl Scripted {
    pub async fn start() -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let hits = Arc::new(AtomicUsize::new(0));
        let (seen2, hits2) = (seen.clone(), hits.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let (seen, hits) = (seen2.clone(), hits2.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (seen, hits) = (seen.clone(), hits.clone());
                            async move {
                                hits.fetch_add(1, Ordering::SeqCst);
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|c| c.to_bytes())
                                    .unwrap_or_default();
                                seen.lock().unwrap().push(Seen {
                                    method: parts.method.to_string(),
                                    uri: parts.uri.to_string(),
                                    version: parts.version,
                                    headers: parts.headers.clone(),
                                    body,
                                });
                                Ok::<_, std::convert::Infallible>(
                                    scripted_response(parts.uri.query().unwrap_or("")).await,
                                )
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Scripted { addr, seen, hits }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

type ScriptBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// A fixed gzip-encoded people/match body of a few hundred KiB.
pub fn blob() -> Bytes {
    use std::io::Write;
    let people: Vec<serde_json::Value> = (0..2000)
        .map(|i| serde_json::json!({"id": format!("p{i}"), "title": "VP Sales", "seq": i}))
        .collect();
    let json = serde_json::json!({"person": {"id": "p0", "employment_history": people}, "request_id": -42});
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(json.to_string().as_bytes()).unwrap();
    Bytes::from(gz.finish().unwrap())
}

/// The value of `name` in a query string (no decoding: scripts use plain values).
pub fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

fn fixed(
    status: u16,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> http::Response<ScriptBody> {
    let mut b = http::Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(BodyExt::boxed(Full::new(body.into()))).unwrap()
}

/// A body that sends `frames` in order, each after `gap` (none for zero).
fn paced(frames: Vec<Bytes>, gap: Duration) -> ChannelBody {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        for f in frames {
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            if tx.send(f).await.is_err() {
                break;
            }
        }
    });
    ChannelBody(rx)
}

/// The head of the `huge` script's body; the rest is padding and [`HUGE_TAIL`].
pub const HUGE_HEAD: &[u8] = br#"{"person": {"id": "p-huge", "name": "Big Body"}, "padding": ""#;
pub const HUGE_TAIL: &[u8] = b"\"}";

/// Bytes of the `huge` script's body for `mb` MiB.
pub fn huge_len(mb: usize) -> usize {
    mb << 20
}

/// A gzip body that decodes to `mb` MiB of valid people/match JSON: concatenated gzip members
/// (a JSON head, `mb - 1` members of 1 MiB of spaces inside a string, a tail), so it is about a
/// kilobyte per decoded MiB on the wire and cheap to build.
pub fn gzip_bomb(mb: usize) -> Bytes {
    use std::io::Write;
    fn member(data: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }
    static MIB_OF_SPACES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let spaces = MIB_OF_SPACES.get_or_init(|| member(&vec![b' '; 1 << 20]));
    let mut out = member(br#"{"person": {"id": "p-bomb"}, "padding": ""#);
    for _ in 1..mb {
        out.extend_from_slice(spaces);
    }
    out.extend(member(b"\"}"));
    Bytes::from(out)
}

async fn scripted_response(query: &str) -> http::Response<ScriptBody> {
    let script = query_param(query, "script").unwrap_or("");
    let mb = || {
        query_param(query, "mb")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1)
    };
    let json = [("content-type", "application/json")];
    match script {
        "status" => {
            let code: u16 = query_param(query, "code")
                .and_then(|c| c.parse().ok())
                .unwrap_or(500);
            return fixed(
                code,
                &[("content-type", "application/json"), ("retry-after", "1")],
                format!(r#"{{"error": "upstream says {code}", "error_code": "INTERNAL"}}"#),
            );
        }
        "truncgz" => {
            let full = blob();
            let cut = full.slice(..full.len() / 2);
            return fixed(
                200,
                &[
                    ("content-type", "application/json"),
                    ("content-encoding", "gzip"),
                ],
                cut,
            );
        }
        "malformed" => {
            return fixed(200, &json, &br#"{"person": {"id": "p1", "name": "#[..]);
        }
        "shape" => return fixed(200, &json, &br#"{"person": "yes"}"#[..]),
        "array" => {
            return fixed(
                200,
                &json,
                &br#"[{"person": {"id": "p1"}}, {"person": {"id": "p2"}}]"#[..],
            )
        }
        "drip" => {
            let mut body = br#"{"person": {"id": "p-drip", "padding": ""#.to_vec();
            body.resize(3998, b'.');
            body.extend_from_slice(b"\"}");
            let frames = body.chunks(100).map(Bytes::copy_from_slice).collect();
            return http::Response::builder()
                .header("content-type", "application/json")
                .header("content-length", 4000)
                .body(BodyExt::boxed(paced(frames, Duration::from_millis(100))))
                .unwrap();
        }
        "huge" => {
            // Generated while it streams: the same shared 64 KiB of padding in every frame.
            let total = huge_len(mb());
            let pad = Bytes::from(vec![b'x'; 64 << 10]);
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                let mut left = total - HUGE_HEAD.len() - HUGE_TAIL.len();
                if tx.send(Bytes::from_static(HUGE_HEAD)).await.is_err() {
                    return;
                }
                while left > 0 {
                    let n = left.min(pad.len());
                    if tx.send(pad.slice(..n)).await.is_err() {
                        return;
                    }
                    left -= n;
                }
                let _ = tx.send(Bytes::from_static(HUGE_TAIL)).await;
            });
            return http::Response::builder()
                .header("content-type", "application/json")
                .header("content-length", total)
                .body(BodyExt::boxed(ChannelBody(rx)))
                .unwrap();
        }
        "bomb" => {
            let bomb = gzip_bomb(mb());
            let frames = bomb.chunks(16 << 10).map(|c| bomb.slice_ref(c)).collect();
            return http::Response::builder()
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .header("content-length", bomb.len())
                .body(BodyExt::boxed(paced(frames, Duration::ZERO)))
                .unwrap();
        }
        "trailers" => {
            let (tx, rx) = tokio::sync::mpsc::channel::<http_body::Frame<Bytes>>(4);
            tokio::spawn(async move {
                for part in [
                    &br#"{"person": {"id": "p-trailer", "#[..],
                    &br#""name": "T"}}"#[..],
                ] {
                    let _ = tx
                        .send(http_body::Frame::data(Bytes::from_static(part)))
                        .await;
                    tokio::task::yield_now().await;
                }
                let mut t = http::HeaderMap::new();
                t.insert(
                    "x-checksum",
                    http::HeaderValue::from_static(TRAILER_CHECKSUM),
                );
                t.insert("x-rows", http::HeaderValue::from_static("1"));
                let _ = tx.send(http_body::Frame::trailers(t)).await;
            });
            return http::Response::builder()
                .header("content-type", "application/json")
                .header("trailer", "x-checksum, x-rows")
                .body(BodyExt::boxed(FrameBody(rx)))
                .unwrap();
        }
        _ => {}
    }
    if script == "stall" {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    if script == "blob" || script == "chunked" {
        let data = blob();
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let frames: Vec<Bytes> = data.chunks(16 * 1024).map(Bytes::copy_from_slice).collect();
        tokio::spawn(async move {
            for f in frames {
                if tx.send(f).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
        });
        let mut b = http::Response::builder()
            .header("content-type", "application/json")
            .header("content-encoding", "gzip");
        if script == "blob" {
            b = b.header("content-length", data.len());
        }
        return b.body(BodyExt::boxed(ChannelBody(rx))).unwrap();
    }
    if script == "slow" {
        let padding = "x".repeat(64 * 1024);
        let first = Bytes::from(format!("{SLOW_FIRST}{padding}"));
        let rest = Bytes::from_static(b"\"}, \"request_id\": -1}");
        let len = first.len() + rest.len();
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
        tokio::spawn(async move {
            let _ = tx.send(first).await;
            tokio::time::sleep(Duration::from_millis(400)).await;
            let _ = tx.send(rest).await;
        });
        let body = ChannelBody(rx);
        return http::Response::builder()
            .header("content-type", "application/json")
            .header("content-length", len)
            .body(BodyExt::boxed(body))
            .unwrap();
    }
    let body = Bytes::from_static(br#"{"person": {"id": "p1", "name": "Echo"}, "request_id": -7}"#);
    http::Response::builder()
        .header("content-type", "application/json")
        .header("x-rate-limit-minute", "600")
        .header("x-minute-usage", "5")
        .header("x-minute-requests-left", "595")
        .body(BodyExt::boxed(Full::new(body)))
        .unwrap()
}

/// A body fed by a channel: each message is one data frame.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|m| m.map(|b| Ok(http_body::Frame::data(b))))
    }
}

/// The `x-checksum` trailer the `trailers` script ends with.
pub const TRAILER_CHECKSUM: &str = "sha256=5e1f00d";

/// A body fed by a channel of whole frames (data or trailers).
pub struct FrameBody(pub tokio::sync::mpsc::Receiver<http_body::Frame<Bytes>>);

impl http_body::Body for FrameBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|m| m.map(Ok))
    }
}

/// Credits per table in the ledger, in milli.
pub fn ledger_by_table(conn: &rusqlite::Connection) -> BTreeMap<String, i64> {
    let mut stmt = conn
        .prepare("SELECT COALESCE(table_name, '_unattributed'), sum(credits_milli) FROM calls GROUP BY 1")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// A raw TCP upstream for faults a well-behaved server never produces: for each connection it
/// reads the request head, writes `reply` verbatim, waits `linger`, then resets the connection
/// (RST, via SO_LINGER 0) when `reset`, or closes it cleanly. Counts connections.
pub async fn raw_upstream(
    reply: &'static [u8],
    linger: Duration,
    reset: bool,
) -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let hits2 = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            hits2.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(reply).await;
                let _ = s.flush().await;
                tokio::time::sleep(linger).await;
                if reset {
                    let _ = s.set_zero_linger();
                }
                drop(s);
            });
        }
    });
    (addr, hits)
}

/// Prints a figure for the test log straight to stderr, past libtest's output capture, so the
/// numbers show in CI's output whether or not the test fails.
pub fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Peak resident memory (`VmHWM`) of process `pid` in KiB, from `/proc/<pid>/status`.
pub fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// One row of `calls`, the columns fault tests look at.
#[derive(Debug, Clone)]
pub struct Row {
    pub outcome: String,
    pub status: Option<i64>,
    pub credits_milli: i64,
    pub credit_source: String,
    pub error: Option<String>,
    pub response_bytes: i64,
    pub table_name: Option<String>,
}

/// Every row of `calls` matching `where_sql`, oldest first.
pub fn rows(conn: &rusqlite::Connection, where_sql: &str) -> Vec<Row> {
    let sql = format!(
        "SELECT outcome, status, credits_milli, credit_source, error, response_bytes, table_name \
         FROM calls WHERE {where_sql} ORDER BY started_at, request_id"
    );
    let mut stmt = conn.prepare(&sql).unwrap();
    stmt.query_map([], |r| {
        Ok(Row {
            outcome: r.get(0)?,
            status: r.get(1)?,
            credits_milli: r.get(2)?,
            credit_source: r.get(3)?,
            error: r.get(4)?,
            response_bytes: r.get(5)?,
            table_name: r.get(6)?,
        })
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Waits (up to 10 s) until `where_sql` matches `n` rows, then returns them.
pub async fn wait_rows(conn: &rusqlite::Connection, where_sql: &str, n: usize) -> Vec<Row> {
    for _ in 0..200 {
        let found = rows(conn, where_sql);
        if found.len() >= n {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "fewer than {n} rows match {where_sql}: {:?}",
        rows(conn, where_sql)
    );
}

pub mod binary;
pub mod request;
