//! creditmeter: a metering proxy for Apollo.io.
//!
//! A caller points its Apollo base URL at creditmeter and names its table in a header;
//! creditmeter forwards every call unchanged, prices the credits each response bills, and records
//! them at call time in a SQLite ledger and in Prometheus metrics. [`run`] is the whole service:
//! it takes already-bound listeners and a shutdown future, so `main` binds real ports and tests
//! bind `127.0.0.1:0`.

pub mod admin;
pub mod attribution;
pub mod catalog;
pub mod config;
pub mod demo;
pub mod ledger;
pub mod meter;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod report;
pub mod scale;
pub mod sim;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::catalog::Catalog;
use crate::config::{Config, Durability};
use crate::ledger::LedgerWriter;
use crate::metrics::Metrics;
use crate::proxy::tap::DrainSettings;
use crate::proxy::Proxy;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("catalog: {0}")]
    Catalog(#[from] catalog::CatalogError),
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error("upstream: {0}")]
    Upstream(#[from] proxy::upstream::UpstreamError),
    #[error(transparent)]
    Tls(#[from] proxy::listener::TlsSetupError),
}

/// Loads the configured catalog, or the built-in one.
pub fn load_catalog(config: &Config) -> Result<Catalog, catalog::CatalogError> {
    match &config.catalog.path {
        Some(p) => Catalog::load(p),
        None => Ok(Catalog::builtin()),
    }
}

/// Runs the proxy and admin listeners until `shutdown` resolves, then drains: stop accepting,
/// let in-flight calls finish within `shutdown.grace`, flush the ledger, return.
pub async fn run(
    config: Config,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let base = config.upstream_uri()?;
    let catalog = Arc::new(load_catalog(&config)?);
    let tls = match (&config.proxy.tls_cert, &config.proxy.tls_key) {
        (Some(c), Some(k)) => Some(proxy::listener::tls_acceptor(c, k)?),
        _ => None,
    };
    let upstream = proxy::upstream::Upstream::new(&config.upstream, &base)?;

    let conn = ledger::open_for_write(&config.ledger.path, config.ledger.synchronous)?;
    let secret = ledger::install_secret(&conn)?;
    let metrics = Arc::new(Metrics::new(
        config.metrics.max_label_values,
        catalog.version(),
        config.ledger.on_error,
    )?);
    metrics.seed(&ledger::queries::seed_totals(&conn).map_err(ledger::LedgerError::from)?);
    let (writer, ledger_handle) = LedgerWriter::spawn(
        conn,
        ledger::WriterConfig {
            path: config.ledger.path.clone(),
            synchronous: config.ledger.synchronous,
            batch_max: config.ledger.batch_max,
            busy_timeout: config.ledger.busy_timeout.0,
            on_error: config.ledger.on_error,
            spool_reserve: config.ledger.spool_reserve.0,
            secret: secret.clone(),
        },
        metrics.ledger(),
    )?;
    // Retention deletes old detail rows on its own thread and connection, in small batches.
    let retention = match config.ledger.retention {
        Some(keep) => Some(ledger::maintenance::Retention::spawn(
            config.ledger.path.clone(),
            config.ledger.synchronous,
            keep.0,
        )?),
        None => None,
    };

    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let draining = Arc::new(AtomicBool::new(false));
    let durability = match config.ledger.durability {
        Durability::Commit => "commit",
        Durability::Background => "background",
    };

    let meter = Arc::new(meter::Meter {
        catalog: catalog.clone(),
        ledger: ledger_handle.clone(),
        metrics: metrics.clone(),
        durability: config.ledger.durability,
        max_inspect: usize::try_from(config.catalog.max_inspect.0).unwrap_or(usize::MAX),
        max_decoded: usize::try_from(config.catalog.max_decoded.0).unwrap_or(usize::MAX),
    });
    let proxy = Arc::new(Proxy {
        upstream,
        meter,
        fingerprints: attribution::KeyFingerprinter::new(&secret),
        ids: meter::RequestIds::new(),
        require_table: config.attribution.require_table,
        max_request_body: config.proxy.max_request_body.0,
        upstream_timeout: config.upstream.timeout.0,
        drain: DrainSettings {
            tracker: tracker.clone(),
            hard_stop: hard_stop.clone(),
            max_bytes: config.proxy.cancelled_drain_max.0,
        },
    });
    let admin_token = config.admin.token();
    let admin = Arc::new(admin::Admin {
        metrics: metrics.clone(),
        ledger: ledger_handle.clone(),
        ledger_path: config.ledger.path.clone(),
        draining: draining.clone(),
        durability,
        catalog_version: catalog.version().to_owned(),
        token_digest: admin::Admin::digest_token(admin_token.as_deref()),
        protect_metrics: config.admin.protect_metrics,
    });
    drop(ledger_handle);

    let builder = Arc::new(proxy::listener::http_builder(
        config.proxy.header_read_timeout.0,
    ));
    tracing::info!(
        proxy = %proxy_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        upstream = %base,
        tls = tls.is_some(),
        admin_token = admin_token.is_some(),
        ledger = %config.ledger.path.display(),
        durability,
        on_error = config.ledger.on_error.as_str(),
        catalog = catalog.version(),
        "creditmeter serving"
    );

    let proxy_task = {
        let proxy = proxy.clone();
        tokio::spawn(proxy::listener::serve(
            proxy_listener,
            tls,
            builder.clone(),
            move || {
                let proxy = proxy.clone();
                hyper::service::service_fn(move |req| proxy.clone().handle(req))
            },
            stop.clone(),
            hard_stop.clone(),
            tracker.clone(),
            config.proxy.header_read_timeout.0,
        ))
    };
    let admin_stop = CancellationToken::new();
    let admin_hard = CancellationToken::new();
    let admin_tracker = TaskTracker::new();
    let admin_task = tokio::spawn(proxy::listener::serve(
        admin_listener,
        None,
        builder,
        move || {
            let admin = admin.clone();
            hyper::service::service_fn(move |req| admin.clone().handle(req))
        },
        admin_stop.clone(),
        admin_hard.clone(),
        admin_tracker.clone(),
        config.proxy.header_read_timeout.0,
    ));

    shutdown.await;
    let deadline = Instant::now() + config.shutdown.grace.0;
    tracing::info!(grace = ?config.shutdown.grace.0, "shutting down: no new connections, draining in-flight calls");
    draining.store(true, Ordering::Relaxed);
    stop.cancel();
    if let Ok(graceful) = proxy_task.await {
        if !proxy::listener::until(deadline, graceful.shutdown()).await {
            tracing::warn!("shutdown grace expired with connections still open; cutting them");
        }
    }
    tracker.close();
    if !proxy::listener::until(deadline, tracker.wait()).await {
        tracing::warn!(
            "shutdown grace expired with calls still draining; recording them as cut short"
        );
    }
    hard_stop.cancel();
    tracker.wait().await;
    drop(proxy);

    admin_stop.cancel();
    if let Ok(graceful) = admin_task.await {
        let _ = proxy::listener::until(
            Instant::now() + std::time::Duration::from_secs(2),
            graceful.shutdown(),
        )
        .await;
    }
    admin_hard.cancel();
    admin_tracker.close();
    admin_tracker.wait().await;

    // Every row handed over so far is committed before we return.
    let _ = tokio::task::spawn_blocking(move || {
        if let Some(r) = retention {
            r.stop();
        }
        writer.close()
    })
    .await;
    tracing::info!("ledger flushed; bye");
    Ok(())
}
