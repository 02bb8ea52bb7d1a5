//! Accept loops: plain TCP or TLS (tokio-rustls, ALPN h2 + http/1.1), HTTP/1.1 and h2 through
//! hyper-util's auto builder, each connection watched for graceful shutdown.
//!
//! `serve` returns once `stop` is cancelled and it has stopped accepting; the returned
//! [`GracefulShutdown`] then drains open connections (in-flight requests finish, idle
//! keep-alive connections close). Connections still open at `hard_stop` are dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::limits::Refusals;
use super::tap::BoxError;

mod first_bytes;
use first_bytes::FirstBytes;

/// Why the TLS listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("proxy.tls_cert {path}: {source}")]
    Cert {
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("proxy.tls_cert {path}: no certificate in the file")]
    NoCert { path: String },
    #[error("proxy.tls_key {path}: {source}")]
    Key {
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("proxy.tls_cert / proxy.tls_key do not form a usable pair: {0}")]
    Pair(#[source] rustls::Error),
}

/// Loads the certificate chain and key and builds an acceptor offering h2 and HTTP/1.1 with
/// that one pair (the simulator; the proxy uses a [`super::tls_reload::ReloadingCert`]).
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsSetupError> {
    let (certs, key) = super::tls_reload::read_pair(cert, key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(TlsSetupError::Pair)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(TlsSetupError::Pair)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Server-side HTTP settings: `header_read_timeout` for HTTP/1 request heads, at most
/// `h2_max_streams` concurrent streams per h2 connection.
pub fn http_builder(
    header_read_timeout: Duration,
    h2_max_streams: u32,
) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(h2_max_streams)
        .max_pending_accept_reset_streams(50)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

/// The proxy listener's connection limit and accounting (the admin listener has none).
pub struct ConnLimits {
    /// `proxy.max_connections`.
    pub max_connections: usize,
    pub refusals: Arc<Refusals>,
}

/// Accepts until `stop` is cancelled, then returns the handle that drains the open connections.
/// `make_service` builds each connection's service from the peer's address. With `limits`, at
/// most `max_connections` connections are open at once: at the limit the loop stops accepting
/// until one closes (new connections wait in the kernel's backlog).
#[allow(clippy::too_many_arguments)]
pub async fn serve<S, B, F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    make_service: F,
    stop: CancellationToken,
    hard_stop: CancellationToken,
    tracker: TaskTracker,
    handshake_timeout: Duration,
    limits: Option<ConnLimits>,
) -> GracefulShutdown
where
    F: Fn(SocketAddr) -> S,
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let graceful = GracefulShutdown::new();
    let slots = limits
        .as_ref()
        .map(|l| Arc::new(Semaphore::new(l.max_connections)));
    loop {
        // A slot first: at the limit, wait for a connection to close before accepting more.
        let slot = match &slots {
            None => None,
            Some(slots) => match slots.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    if let Some(l) = &limits {
                        l.refusals.metrics().connections_limited.inc();
                        tracing::debug!("proxy.max_connections reached; accepting again when a connection closes");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        p = slots.clone().acquire_owned() => p.ok(),
                    }
                }
            },
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = make_service(peer);
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let hard_stop = hard_stop.clone();
        let accounting = limits.as_ref().map(|l| l.refusals.clone());
        tracker.spawn(async move {
            let _open = accounting.as_ref().map(|r| OpenConnection::new(r, slot));
            let run = async {
                match tls {
                    // The first bytes must arrive within the same limit (see `first_bytes`).
                    None => serve_one(&builder, TokioIo::new(FirstBytes::new(stream, handshake_timeout)), service, watcher, accounting.as_deref(), peer).await,
                    Some(acceptor) => match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => serve_one(&builder, TokioIo::new(FirstBytes::new(tls_stream, handshake_timeout)), service, watcher, accounting.as_deref(), peer).await,
                        Ok(Err(e)) => {
                            if let Some(r) = &accounting {
                                r.refuse("tls_handshake", Some(peer.ip()), &format!("TLS handshake failed: {e}"));
                            }
                        }
                        Err(_) => {
                            if let Some(r) = &accounting {
                                r.refuse("tls_handshake", Some(peer.ip()), "TLS handshake not done within proxy.header_read_timeout");
                            }
                        }
                    },
                }
            };
            tokio::select! {
                _ = run => {}
                _ = hard_stop.cancelled() => tracing::debug!(%peer, "connection dropped at shutdown deadline"),
            }
        });
    }
    graceful
}

/// One open proxy connection: counted in `creditmeter_connections_open`, holding its
/// `max_connections` slot until it closes.
struct OpenConnection {
    gauge: prometheus::IntGauge,
    _slot: Option<OwnedSemaphorePermit>,
}

impl OpenConnection {
    fn new(refusals: &Refusals, slot: Option<OwnedSemaphorePermit>) -> Self {
        let gauge = refusals.metrics().connections_open.clone();
        gauge.inc();
        Self { gauge, _slot: slot }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

async fn serve_one<I, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: TokioIo<I>,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
    accounting: Option<&Refusals>,
    peer: SocketAddr,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let conn = builder.serve_connection(io, service);
    if let Err(e) = watcher.watch(conn).await {
        match (accounting, refusal_reason(e.as_ref())) {
            (Some(r), Some(reason)) => r.refuse(reason, Some(peer.ip()), &e.to_string()),
            _ => tracing::debug!(error = %e, "connection ended with an error"),
        }
    }
}

/// Why hyper gave up on a connection before a request reached the service, when that is a
/// refusal to count: headers (or a connection's first bytes) too slow, or bytes that are not
/// HTTP. Other endings (a caller hanging up, a reset) are not refusals.
fn refusal_reason(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_timeout() {
                return Some("header_timeout");
            }
            if h.is_parse() {
                return Some("malformed_request");
            }
        }
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return Some("header_timeout");
        }
        cur = err.source();
    }
    None
}

/// Waits for `fut` until `deadline`; says whether it finished.
pub async fn until<F: Future>(deadline: tokio::time::Instant, fut: F) -> bool {
    tokio::time::timeout_at(deadline, fut).await.is_ok()
}
