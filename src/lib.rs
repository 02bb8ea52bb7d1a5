//! creditmeter: a metering proxy for Apollo.io.
//!
//! A caller points its Apollo base URL at creditmeter and names its table in a header;
//! creditmeter forwards every call unchanged, prices the credits each response bills, and records
//! them at call time in a SQLite ledger and in Prometheus metrics. [`run`] is the whole service:
//! it takes already-bound listeners and a shutdown future, so `main` binds real ports and tests
//! bind `127.0.0.1:0`.

pub mod admin;
pub mod attribution;
pub mod config;
pub mod guard;
pub mod identifiers;
pub mod inflight;
pub mod keys;
pub mod meter;
pub mod metrics;
pub mod proxy;
pub mod reconcile;
pub mod report;
pub mod settings;
pub mod settle;
pub mod upstream;

/// The pricing catalog (crate `creditmeter-catalog`): pure, knows nothing of sockets.
pub use creditmeter_catalog as catalog;
/// The ledger (crate `creditmeter-ledger`): store, writer, spool, schema, queries; no HTTP.
pub use creditmeter_ledger as ledger;

use std::future::Future;
use std::path::{Path, PathBuf};
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
    #[error("budgets and holds: {0}")]
    Guard(#[from] guard::GuardError),
    #[error("console: {0}")]
    Console(#[from] admin::console::ConsoleError),
}

/// Reads the config file again and builds the settings a reload may change. Keys that need a
/// restart (listeners, upstream, ledger) are reported when they differ.
fn reload_settings(
    path: Option<&Path>,
    running: &Config,
) -> Result<(proxy::ProxySettings, Config), RunError> {
    let new = Config::load(path)?;
    let catalog = Arc::new(load_catalog(&new)?);
    for (key, changed) in [
        (
            "proxy",
            format!("{:?}", new.proxy) != format!("{:?}", running.proxy),
        ),
        (
            "admin",
            format!("{:?}", new.admin) != format!("{:?}", running.admin),
        ),
        (
            "upstream",
            format!("{:?}", new.upstream) != format!("{:?}", running.upstream),
        ),
        (
            "ledger",
            format!("{:?}", new.ledger) != format!("{:?}", running.ledger),
        ),
        ("keys", new.keys != running.keys),
    ] {
        if changed {
            tracing::warn!(
                section = key,
                "this section changed but only takes effect after a restart"
            );
        }
    }
    Ok((
        proxy::ProxySettings {
            catalog,
            require_table: new.attribution.require_table,
        },
        new,
    ))
}

/// Records a configuration reload (or its refusal) in the audit log, actor `sighup`.
async fn audit_reload(ledger: PathBuf, config_path: Option<PathBuf>, error: Option<String>) {
    let entry = ledger::audit::Entry::new(
        meter::now_ms(),
        "sighup",
        if error.is_none() {
            ledger::audit::action::CONFIG_RELOADED
        } else {
            ledger::audit::action::CONFIG_RELOAD_REFUSED
        },
    )
    .with_detail(serde_json::json!({
        "config": config_path.map(|p| p.display().to_string()),
        "error": error,
    }));
    let written =
        tokio::task::spawn_blocking(move || ledger::audit::append_at(&ledger, &entry)).await;
    if !matches!(written, Ok(Ok(_))) {
        tracing::warn!("the configuration reload could not be written to the audit log");
    }
}

/// Loads the configured catalog, or the built-in one.
pub fn load_catalog(config: &Config) -> Result<Catalog, catalog::CatalogError> {
    match &config.catalog.path {
        Some(p) => Catalog::load(p),
        None => Ok(Catalog::builtin()),
    }
}

/// Starts the reconciliation metrics from the ledger: unmetered totals so far and the last
/// balance seen, so a restart neither loses increments nor shows an empty balance.
fn seed_reconcile_metrics(
    config: &Config,
    store: &dyn ledger::Store,
    metrics: &Metrics,
) -> Result<(), ledger::LedgerError> {
    if config.reconcile.enabled {
        let types: Vec<&str> = reconcile::CreditType::pools(config.reconcile.pool)
            .iter()
            .map(|t| t.as_str())
            .collect();
        metrics.init_reconcile(&types, &reconcile::poller::POLL_RESULTS);
    }
    for (endpoint, n) in store.outside_totals()? {
        metrics.add_outside_calls(&endpoint, n);
    }
    for (t, milli) in reconcile::store::unmetered_totals_in(store)? {
        metrics.add_unmetered(t.as_str(), milli);
    }
    for (t, consumed, left) in reconcile::store::latest_balances_in(store)? {
        metrics.observe_balance(t.as_str(), consumed, left);
    }
    Ok(())
}

/// Runs the proxy and admin listeners until `shutdown` resolves, then drains: stop accepting,
/// let in-flight calls finish within `shutdown.grace`, flush the ledger, return.
pub async fn run(
    config: Config,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let (_keep, reload) = tokio::sync::mpsc::channel(1);
    run_with_reload(
        config,
        None,
        proxy_listener,
        admin_listener,
        shutdown,
        reload,
    )
    .await
}

/// Like [`run`], and each message on `reload` re-reads `config_path` (SIGHUP in `main`): the
/// catalog and attribution settings change for new calls, connections and calls in flight are
/// untouched, and a config that does not load is refused with the reason logged, keeping the
/// old settings.
pub async fn run_with_reload(
    config: Config,
    config_path: Option<PathBuf>,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    mut reload: tokio::sync::mpsc::Receiver<()>,
) -> Result<(), RunError> {
    let base = config.upstream_uri()?;
    // The listener actually bound decides: off loopback, the admin token is required.
    config
        .admin
        .check_exposure(admin_listener.local_addr().unwrap_or(config.admin.listen))?;
    let catalog = Arc::new(load_catalog(&config)?);
    let upstream = proxy::upstream::Upstream::new(&config.upstream, &base)?;
    let proxy_token = config.proxy.token()?;
    let upstream_keys = config.keys.resolve()?;

    let store: ledger::SharedStore = Arc::new(ledger::SqliteStore::open(
        &config.ledger.path,
        config.ledger.synchronous,
    )?);
    let secret = store.install_secret()?;
    let metrics = Arc::new(Metrics::new(
        config.metrics.max_label_values,
        catalog.version(),
        config.ledger.on_error,
    )?);
    metrics.seed(&store.seed_totals()?);
    seed_reconcile_metrics(&config, &*store, &metrics)?;
    let edge_metrics =
        proxy::limits::EdgeMetrics::register_with(metrics.registry(), metrics.refused())
            .map_err(metrics::MetricsError::from)?;
    let refusals = Arc::new(proxy::limits::Refusals::new(edge_metrics.clone()));
    // The certificate resolver reloads its pair on SIGHUP and when the files change.
    let tls_cert = match (&config.proxy.tls_cert, &config.proxy.tls_key) {
        (Some(c), Some(k)) => Some(proxy::tls_reload::ReloadingCert::load(
            c,
            k,
            Some(edge_metrics.clone()),
        )?),
        _ => None,
    };
    let tls = match &tls_cert {
        Some(c) => Some(proxy::tls_reload::acceptor_with(c.clone())?),
        None => None,
    };
    // Budgets resume the current windows' spend, and holds stay in force, across restarts.
    // A budget may name a virtual key by name; it covers the key's id (its calls' key_fp).
    let budgets = {
        let conn = ledger::open_for_read(&config.ledger.path)?;
        keys::resolve_budget_keys(&conn, &config.budget)?
    };
    let guard: Arc<guard::Guard> = Arc::new(guard::Guard::start(
        &config.guard,
        &budgets,
        store.clone(),
        metrics.budgets(),
        meter::now_ms(),
    )?);
    // Rows an outage left in the spool are not in `calls` until the writer replays them.
    guard.count_spooled(meter::now_ms())?;
    let guard_for_reload = guard.clone();
    // Deferred charges still pending: read before the writer replays the spool.
    let settle_key = config.settle.resolve()?;
    let spool = ledger::WriterConfig::spool_path_of(store.spool_base());
    let pending_charges = settle::store::pending_with_spool(&*store, &spool)?;
    let sink = store.call_sink(&ledger::SinkOptions {
        busy_timeout: config.ledger.busy_timeout.0,
        secret: secret.clone(),
    })?;
    let (writer, ledger_handle) = LedgerWriter::spawn(
        sink,
        ledger::WriterConfig {
            spool_base: store.spool_base().to_owned(),
            batch_max: config.ledger.batch_max,
            on_error: config.ledger.on_error,
            spool_reserve: config.ledger.spool_reserve.0,
            group_wait: crate::ledger::writer::GROUP_WAIT,
            commit_timeout: config.ledger.commit_timeout.0,
        },
        metrics.ledger(),
    )?;
    // Retention deletes old detail rows on its own thread and connection, in small batches.
    let retention = match config.ledger.retention {
        Some(keep) => Some(store.spawn_retention(keep.0)?),
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

    let proxy_settings = Arc::new(proxy::SettingsCell::new(proxy::ProxySettings {
        catalog: catalog.clone(),
        require_table: config.attribution.require_table,
    }));
    let book = Arc::new(settle::Book::new(
        ledger_handle.clone(),
        metrics.clone(),
        proxy_settings.clone(),
        settle_key.is_some(),
        config.settle.first_poll.0,
        config.settle.max_wait.0,
    ));
    book.restore(pending_charges, &guard);
    let meter = Arc::new(meter::Meter {
        ledger: ledger_handle.clone(),
        metrics: metrics.clone(),
        durability: config.ledger.durability,
        max_inspect: usize::try_from(config.catalog.max_inspect.0).unwrap_or(usize::MAX),
        max_decoded: usize::try_from(config.catalog.max_decoded.0).unwrap_or(usize::MAX),
        inflight: inflight::InFlight::new(),
        settle: Some(book.clone()),
        identifiers: Some(Arc::new(identifiers::IdFingerprinter::new(
            &secret,
            config.attribution.identifier_fingerprints,
        ))),
    });
    let settler = settle_key.map(|api_key| settle::Settler {
        book: book.clone(),
        upstream: upstream.clone(),
        meter: meter.clone(),
        proxy_settings: proxy_settings.clone(),
        fingerprints: attribution::KeyFingerprinter::new(&secret),
        ids: meter::RequestIds::new(),
        api_key,
        api_key_env: config.settle.api_key_env.clone(),
        timeout: config.upstream.timeout.0,
    });
    let reconcile_key = config
        .reconcile
        .enabled
        .then(|| config.reconcile.api_key())
        .flatten();
    let reconcile_status = Arc::new(reconcile::PollerStatus::new(
        config.reconcile.enabled,
        config.reconcile.interval.0,
        &config.reconcile.api_key_env,
        reconcile_key.is_some(),
    ));
    let poller = config.reconcile.enabled.then(|| reconcile::Poller {
        upstream: upstream.clone(),
        meter: meter.clone(),
        proxy_settings: proxy_settings.clone(),
        fingerprints: attribution::KeyFingerprinter::new(&secret),
        ids: meter::RequestIds::new(),
        metrics: metrics.clone(),
        ledger_path: config.ledger.path.clone(),
        api_key: reconcile_key,
        api_key_env: config.reconcile.api_key_env.clone(),
        interval: config.reconcile.interval.0,
        timeout: config.upstream.timeout.0,
        settings: reconcile::poller::settings(
            config.reconcile.balance_lag.0,
            config.upstream.timeout.0,
            config.reconcile.pool,
            config.settle.max_wait.0,
        ),
        status: reconcile_status.clone(),
    });
    let keys = Arc::new(keys::Keys::new(
        config.keys.mode,
        upstream_keys,
        config.ledger.path.clone(),
    ));
    let proxy = Arc::new(Proxy {
        upstream,
        meter,
        guard: guard.clone(),
        fingerprints: attribution::KeyFingerprinter::new(&secret),
        ids: meter::RequestIds::new(),
        settings: proxy_settings.clone(),
        token_digest: proxy_token
            .as_deref()
            .map(|t| ring::digest::digest(&ring::digest::SHA256, t.as_bytes())),
        max_request_body: config.proxy.max_request_body.0,
        body_read_timeout: config.proxy.body_read_timeout.0,
        refusals: refusals.clone(),
        upstream_timeout: config.upstream.timeout.0,
        drain: DrainSettings {
            tracker: tracker.clone(),
            hard_stop: hard_stop.clone(),
            max_bytes: config.proxy.cancelled_drain_max.0,
        },
        metering: config.proxy.metering,
        keys: keys.clone(),
        refused: metrics.refused(),
    });
    let admin_token = config.admin.token();
    let admin = Arc::new(admin::Admin {
        metrics: metrics.clone(),
        guard,
        ledger: ledger_handle.clone(),
        store: store.clone(),
        ledger_path: config.ledger.path.clone(),
        draining: draining.clone(),
        durability,
        catalog_version: catalog.version().to_owned(),
        token_digest: admin::Admin::digest_token(admin_token.as_deref()),
        protect_metrics: config
            .admin
            .metrics_protected_on(admin_listener.local_addr().unwrap_or(config.admin.listen)),
        host_check: admin::lock::HostCheck::new(
            &config.admin.hosts,
            admin_listener.local_addr().unwrap_or(config.admin.listen),
        ),
        reconcile: reconcile_status,
        metering: config.proxy.metering,
        keys: keys::api::KeysApi {
            ledger: config.ledger.path.clone(),
            config: config.keys.clone(),
            actor: match admin_token {
                Some(_) => format!("token:{}", config.admin.token_env.trim()),
                None => "admin".to_owned(),
            },
        },
        console: admin::console::Console::new()?,
    });
    drop(ledger_handle);

    let builder = Arc::new(proxy::listener::http_builder(
        config.proxy.header_read_timeout.0,
        config.proxy.h2_max_concurrent_streams,
    ));
    let edge_guard = Arc::new(proxy::limits::EdgeGuard {
        in_flight: Arc::new(tokio::sync::Semaphore::new(config.proxy.max_in_flight)),
        max_in_flight: config.proxy.max_in_flight,
        refusals: refusals.clone(),
        trusted: proxy::forwarded::TrustedProxies::parse(&config.proxy.trusted_proxies)?,
    });
    tracing::info!(
        proxy = %proxy_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        upstream = %config::redact_url(&base.to_string()),
        tls = tls.is_some(),
        admin_token = admin_token.is_some(),
        ledger = %config.ledger.path.display(),
        durability,
        on_error = config.ledger.on_error.as_str(),
        catalog = catalog.version(),
        metering = config.proxy.metering,
        settle = settler.is_some(),
        "creditmeter serving"
    );
    if settler.is_none() {
        tracing::warn!(
            key_env = %config.settle.api_key_env,
            "settlement is off ([settle]): phone reveals and waterfalls are recorded at the catalog's estimate (credit_source = 'estimated'), not what Apollo bills; set {} to an Apollo key to learn the real figures",
            config.settle.api_key_env
        );
    }
    if !config.proxy.metering {
        tracing::warn!(
            "proxy.metering = false: metering is off; calls are forwarded but no call is recorded, priced, or checked against holds (benchmarks and emergency bypass only)"
        );
    }

    let proxy_task = {
        let proxy = proxy.clone();
        tokio::spawn(proxy::listener::serve(
            proxy_listener,
            tls,
            builder.clone(),
            move |peer| proxy::limits::InFlightLimit::new(proxy.clone(), edge_guard.clone(), peer),
            stop.clone(),
            hard_stop.clone(),
            tracker.clone(),
            config.proxy.header_read_timeout.0,
            Some(proxy::listener::ConnLimits {
                max_connections: config.proxy.max_connections,
                refusals: refusals.clone(),
            }),
        ))
    };
    if let Some(cert) = &tls_cert {
        tracker.spawn(
            cert.clone()
                .watch(config.proxy.tls_reload_interval.0, stop.clone()),
        );
    }
    // The balance poller: its own task, stopped with the proxy; it can fail without touching
    // a single proxied call.
    if let Some(poller) = poller {
        tracker.spawn(poller.run(stop.clone(), hard_stop.clone()));
    }
    // The settler, likewise: deferred charges learned from webhook_result.
    if let Some(settler) = settler {
        tracker.spawn(settler.run(stop.clone(), hard_stop.clone()));
    }
    let admin_stop = CancellationToken::new();
    let admin_hard = CancellationToken::new();
    let admin_tracker = TaskTracker::new();
    let admin_task = tokio::spawn(proxy::listener::serve(
        admin_listener,
        None,
        builder,
        move |_peer| {
            let admin = admin.clone();
            hyper::service::service_fn(move |req| admin.clone().handle(req))
        },
        admin_stop.clone(),
        admin_hard.clone(),
        admin_tracker.clone(),
        config.proxy.header_read_timeout.0,
        None,
    ));

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(()) = reload.recv() => {
                if let Some(cert) = &tls_cert {
                    let c = cert.clone();
                    if let Ok(result) = tokio::task::spawn_blocking(move || c.reload()).await {
                        cert.log("SIGHUP", &result);
                    }
                }
                let loaded = reload_settings(config_path.as_deref(), &config);
                let applied = match loaded {
                    Ok((settings, new)) => {
                        let identifier_fingerprints = new.attribution.identifier_fingerprints;
                        // Budgets first: if they are refused, nothing changes.
                        let guard = guard_for_reload.clone();
                        let ledger_path = config.ledger.path.clone();
                        let budgets = tokio::task::spawn_blocking(move || {
                            let budgets = keys::resolve_budget_keys_at(&ledger_path, &new.budget)?;
                            guard
                                .reload(&new.guard, &budgets, meter::now_ms())
                                .map_err(|e| e.to_string())
                        })
                        .await;
                        match budgets {
                            Ok(Ok(summary)) => {
                                tracing::info!(
                                    catalog = settings.catalog.version(),
                                    require_table = settings.require_table,
                                    budgets = ?summary,
                                    "configuration reloaded"
                                );
                                proxy.reload(settings);
                                if let Some(ids) = &proxy.meter.identifiers {
                                    ids.set_enabled(identifier_fingerprints);
                                }
                                Ok(())
                            }
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = &applied {
                    tracing::error!(error = %e, "configuration reload refused; the previous settings stay in force");
                }
                metrics.config_reloaded(applied.is_ok());
                audit_reload(config.ledger.path.clone(), config_path.clone(), applied.as_ref().err().cloned()).await;
            }
        }
    }
    // Draining behind a load balancer: /readyz turns 503 now, and the proxy keeps accepting
    // and serving for shutdown.drain_delay, so the balancer stops sending new calls before
    // the listener closes.
    draining.store(true, Ordering::Relaxed);
    let drain_delay = config.shutdown.drain_delay.0;
    if !drain_delay.is_zero() {
        tracing::info!(drain_delay = ?drain_delay, "shutting down: /readyz answers 503; still accepting calls until the drain delay ends");
        tokio::time::sleep(drain_delay).await;
    }
    let deadline = Instant::now() + config.shutdown.grace.0;
    tracing::info!(grace = ?config.shutdown.grace.0, "shutting down: no new connections, draining in-flight calls");
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
