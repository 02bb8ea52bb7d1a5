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
use creditmeter::sim::{Sim, SimConfig};
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

async fn scripted_response(query: &str) -> http::Response<ScriptBody> {
    let script = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("script="))
        .unwrap_or("");
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
