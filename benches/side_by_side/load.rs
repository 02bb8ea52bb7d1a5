//! The load generator. Plain HTTP/1.1 keep-alive connections (hyper's client connection, one
//! request in flight per connection, as wrk and nginx's upstream pool use them), driven three
//! ways: open-loop at a fixed rate with coordinated omission corrected, closed-loop as fast as
//! the target answers, and idle keep-alive connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::header::{HeaderMap, ACCEPT_ENCODING, CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// One kind of Apollo call in a workload.
pub struct Kind {
    pub name: &'static str,
    path: &'static str,
    bodies: Vec<Bytes>,
    gzip: bool,
}

/// A deterministic workload: request `i` is `pattern[i % len]`, with rotating identifiers.
pub struct Mix {
    pub kinds: Vec<Kind>,
    pattern: Vec<usize>,
}

const API_KEY: &str = "bench-key-0123456789";

impl Mix {
    /// Clay-like enrichment traffic: half single matches (~2.4 KB answers), 30% bulk matches of
    /// ten (~16 KB) and 20% company searches of 25 (~64 KB).
    pub fn apollo() -> Self {
        let people_match = (0..512)
            .map(|n| Bytes::from(format!(r#"{{"email":"lead{n}@company{}.com"}}"#, n % 97)))
            .collect();
        let bulk_match = (0..64)
            .map(|n| {
                let details: Vec<String> = (0..10)
                    .map(|d| format!(r#"{{"email":"bulk{n}x{d}@firm{}.io"}}"#, (n + d) % 53))
                    .collect();
                Bytes::from(format!(r#"{{"details":[{}]}}"#, details.join(",")))
            })
            .collect();
        let search = (1..=20)
            .map(|page| Bytes::from(format!(r#"{{"page":{page},"per_page":25}}"#)))
            .collect();
        Mix {
            kinds: vec![
                Kind {
                    name: "people/match",
                    path: "/api/v1/people/match",
                    bodies: people_match,
                    gzip: false,
                },
                Kind {
                    name: "people/bulk_match",
                    path: "/api/v1/people/bulk_match",
                    bodies: bulk_match,
                    gzip: false,
                },
                Kind {
                    name: "mixed_companies/search",
                    path: "/api/v1/mixed_companies/search",
                    bodies: search,
                    gzip: false,
                },
            ],
            pattern: vec![0, 1, 0, 2, 0, 1, 0, 1, 0, 2, 0, 1, 0, 2, 0, 1, 0, 2, 0, 1],
        }
    }

    /// Large gzip answers: company searches of 100 (~250 KB of JSON, ~50 KB gzipped on the wire),
    /// which creditmeter must inflate to price while it streams them.
    pub fn gzip_search() -> Self {
        let search = (1..=20)
            .map(|page| Bytes::from(format!(r#"{{"page":{page},"per_page":100}}"#)))
            .collect();
        Mix {
            kinds: vec![Kind {
                name: "mixed_companies/search gzip",
                path: "/api/v1/mixed_companies/search",
                bodies: search,
                gzip: true,
            }],
            pattern: vec![0],
        }
    }

    /// Request `i` of the workload, and which kind it is.
    pub fn request(&self, i: u64, host: &str) -> (usize, Request<Full<Bytes>>) {
        let k = self.pattern[(i % self.pattern.len() as u64) as usize];
        let kind = &self.kinds[k];
        let body = kind.bodies
            [((i / self.pattern.len() as u64) % kind.bodies.len() as u64) as usize]
            .clone();
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = http::Uri::from_static(kind.path);
        let h = req.headers_mut();
        if let Ok(v) = host.parse() {
            h.insert(HOST, v);
        }
        h.insert(
            CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        h.insert("x-api-key", http::HeaderValue::from_static(API_KEY));
        h.insert(
            "x-meter-table",
            http::HeaderValue::from_static("Bench leads"),
        );
        h.insert(
            "x-meter-workflow",
            http::HeaderValue::from_static("side-by-side"),
        );
        if kind.gzip {
            h.insert(ACCEPT_ENCODING, http::HeaderValue::from_static("gzip"));
        }
        (k, req)
    }
}

/// What one run against one target measured.
pub struct RunStats {
    /// Latency in microseconds: from the intended send time (open loop) or the send (closed).
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Response body bytes as received (compressed when the answer was gzipped).
    pub bytes: u64,
    /// Per kind of call: (answers, body bytes).
    pub per_kind: Vec<(u64, u64)>,
    pub elapsed: Duration,
}

impl RunStats {
    pub fn new(kinds: usize) -> Result<Self> {
        Ok(RunStats {
            hist: Histogram::new_with_bounds(1, 120_000_000, 3)?,
            ok: 0,
            errors: 0,
            first_error: None,
            bytes: 0,
            per_kind: vec![(0, 0); kinds],
            elapsed: Duration::ZERO,
        })
    }

    fn error(&mut self, what: String) {
        self.errors += 1;
        self.first_error.get_or_insert(what);
    }

    /// Adds another run's figures (rounds of the same target, or workers of one run).
    pub fn merge(&mut self, other: &RunStats) -> Result<()> {
        self.hist.add(&other.hist)?;
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.bytes += other.bytes;
        for (a, b) in self.per_kind.iter_mut().zip(&other.per_kind) {
            a.0 += b.0;
            a.1 += b.1;
        }
        self.elapsed += other.elapsed;
        Ok(())
    }

    pub fn answers(&self) -> u64 {
        self.ok + self.errors
    }

    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn record(&mut self, kind: usize, result: Result<(StatusCode, u64)>) -> bool {
        match result {
            Ok((status, n)) => {
                if status == StatusCode::OK {
                    self.ok += 1;
                } else {
                    self.error(format!("HTTP {status}"));
                }
                self.bytes += n;
                self.per_kind[kind].0 += 1;
                self.per_kind[kind].1 += n;
                true
            }
            Err(e) => {
                self.error(format!("{e:#}"));
                false
            }
        }
    }
}

/// A keep-alive HTTP/1.1 connection to `addr`.
pub async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends one request and reads its whole body; the status and the body's size.
async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, u64)> {
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            n += data.len() as u64;
        }
    }
    Ok((status, n))
}

/// One whole answer, for the fidelity check: status, headers and body bytes.
pub async fn fetch(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, HeaderMap, Bytes)> {
    let mut sender = connect(addr).await?;
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    Ok((
        parts.status,
        parts.headers,
        body.collect().await?.to_bytes(),
    ))
}

/// Open loop: request `i` is due at `start + i / rate`, whatever happened to earlier ones. A
/// request that could not be sent on time (every connection busy) counts its latency from when
/// it was due, so a stall is not hidden (coordinated omission). A request whose connection was
/// free counts from its actual send, so the timer's millisecond granularity is not charged.
pub async fn open_loop(
    addr: SocketAddr,
    mix: Arc<Mix>,
    rate: f64,
    dur: Duration,
    conns: usize,
) -> Result<RunStats> {
    let total = (rate * dur.as_secs_f64()).round() as u64;
    let next = Arc::new(AtomicU64::new(0));
    let host = addr.to_string();
    let start = Instant::now() + Duration::from_millis(300);
    let mut workers = JoinSet::new();
    for _ in 0..conns {
        let (next, mix, host) = (next.clone(), mix.clone(), host.clone());
        workers.spawn(async move {
            let mut st = RunStats::new(mix.kinds.len())?;
            let mut sender = connect(addr).await.ok();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let due = start + Duration::from_nanos((i as f64 * 1e9 / rate) as u64);
                let late = Instant::now() > due;
                tokio::time::sleep_until(due).await;
                let origin = if late { due } else { Instant::now() };
                let (k, req) = mix.request(i, &host);
                let result = match sender.as_mut() {
                    Some(s) => send(s, req).await,
                    None => match connect(addr).await {
                        Ok(mut s) => {
                            let r = send(&mut s, req).await;
                            sender = Some(s);
                            r
                        }
                        Err(e) => Err(e),
                    },
                };
                if !st.record(k, result) {
                    sender = None;
                }
                st.hist
                    .saturating_record(origin.elapsed().as_micros() as u64);
            }
            Ok::<_, anyhow::Error>(st)
        });
    }
    let stats = gather(workers, mix.kinds.len()).await?;
    Ok(RunStats {
        elapsed: start.elapsed(),
        ..stats
    })
}

/// Closed loop: every connection sends its next request as soon as the last one is answered.
pub async fn closed_loop(
    addr: SocketAddr,
    mix: Arc<Mix>,
    dur: Duration,
    conns: usize,
) -> Result<RunStats> {
    let next = Arc::new(AtomicU64::new(0));
    let host = addr.to_string();
    let mut senders = Vec::with_capacity(conns);
    for _ in 0..conns {
        senders.push(connect(addr).await?);
    }
    let start = Instant::now();
    let deadline = start + dur;
    let mut workers = JoinSet::new();
    for mut sender in senders {
        let (next, mix, host) = (next.clone(), mix.clone(), host.clone());
        workers.spawn(async move {
            let mut st = RunStats::new(mix.kinds.len())?;
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let (k, req) = mix.request(i, &host);
                let sent = Instant::now();
                let result = send(&mut sender, req).await;
                if !st.record(k, result) {
                    sender = match connect(addr).await {
                        Ok(s) => s,
                        Err(_) => break,
                    };
                }
                st.hist.saturating_record(sent.elapsed().as_micros() as u64);
            }
            Ok::<_, anyhow::Error>(st)
        });
    }
    let stats = gather(workers, mix.kinds.len()).await?;
    Ok(RunStats {
        elapsed: start.elapsed(),
        ..stats
    })
}

async fn gather(mut workers: JoinSet<Result<RunStats>>, kinds: usize) -> Result<RunStats> {
    let mut all = RunStats::new(kinds)?;
    while let Some(done) = workers.join_next().await {
        all.merge(&done.map_err(|e| anyhow!("load worker failed: {e}"))??)?;
    }
    Ok(all)
}

/// Opens `n` keep-alive connections, each answering one call, and keeps them open.
pub async fn open_idle(
    addr: SocketAddr,
    mix: Arc<Mix>,
    n: usize,
) -> Result<Vec<SendRequest<Full<Bytes>>>> {
    let host = addr.to_string();
    let mut open = Vec::with_capacity(n);
    let mut i = 0u64;
    while open.len() < n {
        let batch = (n - open.len()).min(50);
        let mut set = JoinSet::new();
        for _ in 0..batch {
            let (mix, host) = (mix.clone(), host.clone());
            i += 1;
            set.spawn(async move {
                let mut s = connect(addr).await?;
                let (_, req) = mix.request(i, &host);
                let (status, _) = send(&mut s, req).await?;
                if status != StatusCode::OK {
                    bail!("HTTP {status} on a keep-alive connection's first call");
                }
                Ok(s)
            });
        }
        while let Some(done) = set.join_next().await {
            open.push(done.map_err(|e| anyhow!("connection task failed: {e}"))??);
        }
    }
    Ok(open)
}

/// Sends one more call on every idle connection; how many were still open and answered 200.
pub async fn touch_all(
    conns: Vec<SendRequest<Full<Bytes>>>,
    mix: Arc<Mix>,
    addr: SocketAddr,
) -> usize {
    let host = addr.to_string();
    let mut alive = 0;
    let mut conns = conns.into_iter().enumerate();
    loop {
        let mut set = JoinSet::new();
        for (i, mut s) in conns.by_ref().take(50) {
            let (mix, host) = (mix.clone(), host.clone());
            set.spawn(async move {
                let (_, req) = mix.request(i as u64, &host);
                matches!(send(&mut s, req).await, Ok((StatusCode::OK, _)))
            });
        }
        if set.is_empty() {
            return alive;
        }
        while let Some(done) = set.join_next().await {
            alive += usize::from(matches!(done, Ok(true)));
        }
    }
}
