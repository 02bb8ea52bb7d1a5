//! `creditmeter demo`: the simulator and the proxy on ephemeral ports, a few thousand calls from
//! simulated Clay tables (one of them a heavy spender), then the spend report.
//!
//! The workload and the driver are public so integration tests and benchmarks reuse them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::net::TcpListener;

use crate::config::{Config, EmbeddedKey, HumanDuration};
use crate::ledger::queries::GroupBy;
use crate::report::{self, Format, ReportRequest};
use crate::sim::{Sim, SimConfig};

/// One call of the demo workload.
#[derive(Debug, Clone)]
pub struct DemoCall {
    pub table: Option<&'static str>,
    pub workflow: &'static str,
    pub method: &'static str,
    /// Path and query, e.g. `/api/v1/organizations/enrich?domain=acme.com`.
    pub path_and_query: String,
    pub body: Option<String>,
    /// Attribute through the `meter_table` query parameter instead of the header.
    pub via_query: bool,
}

/// The heavy spender's table name.
pub const HEAVY_TABLE: &str = "Q4 outbound blitz";

/// A deterministic mix of calls from several tables. `HEAVY_TABLE` runs bulk matches with phone
/// reveal, the most expensive call there is.
pub fn workload(n: usize) -> Vec<DemoCall> {
    (0..n)
        .map(|i| {
            let slot = i % 20;
            match slot {
                0..=6 => DemoCall {
                    table: Some("Inbound leads"),
                    workflow: "enrich-person",
                    method: "POST",
                    path_and_query: "/api/v1/people/match".into(),
                    body: Some(json!({"email": format!("lead{i}@example{}.com", i % 97)}).to_string()),
                    via_query: false,
                },
                7..=10 => DemoCall {
                    table: Some("ABM accounts"),
                    workflow: "enrich-company",
                    method: "GET",
                    path_and_query: format!("/api/v1/organizations/enrich?domain=company{i}.com"),
                    body: None,
                    via_query: false,
                },
                11 | 12 => DemoCall {
                    table: Some("ABM accounts"),
                    workflow: "find-lookalikes",
                    method: "POST",
                    path_and_query: "/api/v1/mixed_companies/search".into(),
                    body: Some(json!({"q_organization_name": format!("acme {i}"), "page": 1, "per_page": 25}).to_string()),
                    via_query: false,
                },
                13..=15 => DemoCall {
                    table: Some("Event attendees"),
                    workflow: "verify-employment",
                    method: "POST",
                    path_and_query: "/v1/people/match".into(),
                    body: Some(
                        json!({"linkedin_url": format!("https://www.linkedin.com/in/attendee-{i}")}).to_string(),
                    ),
                    via_query: true,
                },
                16 | 17 => DemoCall {
                    table: Some(HEAVY_TABLE),
                    workflow: "bulk-enrich-phones",
                    method: "POST",
                    path_and_query: "/api/v1/people/bulk_match?reveal_personal_emails=false".into(),
                    body: Some(
                        json!({
                            "reveal_phone_number": true,
                            "webhook_url": "https://hooks.example.com/apollo",
                            "details": (0..10).map(|k| json!({
                                "first_name": "Pat", "last_name": format!("Prospect{}", i * 10 + k),
                                "domain": format!("target{}.com", (i + k) % 50),
                            })).collect::<Vec<_>>(),
                        })
                        .to_string(),
                    ),
                    via_query: false,
                },
                _ => DemoCall {
                    table: None,
                    workflow: "adhoc-script",
                    method: "POST",
                    path_and_query: "/api/v1/mixed_people/api_search".into(),
                    body: Some(json!({"person_titles": ["CEO"], "page": 1}).to_string()),
                    via_query: false,
                },
            }
        })
        .collect()
}

/// What driving a workload produced.
#[derive(Debug, Default, Clone, Copy)]
pub struct DriveStats {
    pub completed: usize,
    pub failed: usize,
    /// Sum of the simulator's `x-sim-billed-milli` over responses received in full.
    pub billed_milli: i64,
}

/// Sends `calls` through the proxy at `proxy` with `concurrency` workers.
pub async fn drive(
    proxy: SocketAddr,
    api_key: &str,
    calls: Vec<DemoCall>,
    concurrency: usize,
) -> DriveStats {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let calls = Arc::new(calls);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, calls, next, key) = (
            client.clone(),
            calls.clone(),
            next.clone(),
            api_key.to_owned(),
        );
        workers.spawn(async move {
            let mut stats = DriveStats::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(call) = calls.get(i) else { break };
                match send(&client, proxy, &key, call).await {
                    Ok(billed) => {
                        stats.completed += 1;
                        stats.billed_milli += billed;
                    }
                    Err(e) => {
                        stats.failed += 1;
                        tracing::debug!(error = %e, "demo call failed");
                    }
                }
            }
            stats
        });
    }
    let mut total = DriveStats::default();
    while let Some(Ok(s)) = workers.join_next().await {
        total.completed += s.completed;
        total.failed += s.failed;
        total.billed_milli += s.billed_milli;
    }
    total
}

async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    proxy: SocketAddr,
    key: &str,
    call: &DemoCall,
) -> Result<i64, Box<dyn std::error::Error + Send + Sync>> {
    let mut uri = format!("http://{proxy}{}", call.path_and_query);
    let mut req = http::Request::builder()
        .method(call.method)
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .header("x-meter-workflow", call.workflow);
    if let Some(t) = call.table {
        if call.via_query {
            let sep = if uri.contains('?') { '&' } else { '?' };
            uri = format!("{uri}{sep}meter_table={}", t.replace(' ', "+"));
        } else {
            req = req.header("x-meter-table", t);
        }
    }
    let body = call.body.clone().map(Bytes::from).unwrap_or_default();
    let resp = client.request(req.uri(uri).body(Full::new(body))?).await?;
    let billed = resp
        .headers()
        .get("x-sim-billed-milli")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<i64>().ok())
        .unwrap_or(0);
    resp.into_body().collect().await?;
    Ok(billed)
}

/// Options of `creditmeter demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub calls: usize,
    pub concurrency: usize,
    pub dir: Option<PathBuf>,
    /// Keep serving after the report until Ctrl-C, so the metrics can be looked at.
    pub hold: bool,
}

/// How long the simulator's phone-reveal jobs run in the demo.
const DEMO_JOB_DELAY: std::time::Duration = std::time::Duration::from_secs(1);
/// The key settlement polls the simulator with (the simulator accepts any key).
const DEMO_SETTLE_KEY: &str = "demo-master-key";
/// How long the demo waits for the pending charges to settle before it reports anyway.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Deferred credits not yet settled, from the ledger.
fn pending_milli(db: &std::path::Path) -> anyhow::Result<i64> {
    let conn = crate::ledger::open_for_read(db)?;
    Ok(conn.query_row(
        "SELECT COALESCE(sum(deferred_milli), 0) FROM calls c
          WHERE deferred IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM calls s WHERE s.settles = c.request_id)",
        [],
        |r| r.get(0),
    )?)
}

/// Runs the demo and returns what to print.
pub async fn run(opts: DemoOptions) -> anyhow::Result<String> {
    let dir = opts.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("creditmeter-demo-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("ledger.db");

    // Phone-reveal jobs end a second after their call, as Apollo's do (later), so the demo shows
    // their credits pending first, then settled.
    let sim = Sim::new(SimConfig {
        rate_limit_minute: 0,
        job_delay: DEMO_JOB_DELAY,
        ..SimConfig::default()
    });
    let sim_listener = TcpListener::bind("127.0.0.1:0").await?;
    let sim_addr = sim_listener.local_addr()?;
    let (sim_stop, sim_stopped) = tokio::sync::oneshot::channel::<()>();
    let sim_task = {
        let sim = sim.clone();
        tokio::spawn(async move {
            sim.serve(sim_listener, None, async {
                let _ = sim_stopped.await;
            })
            .await
        })
    };

    let mut config = Config::default();
    config.upstream.base_url = format!("http://{sim_addr}");
    config.ledger.path = db.clone();
    // No load balancer watches the demo's /readyz: stop at once.
    config.shutdown.drain_delay = HumanDuration(std::time::Duration::ZERO);
    // Settlement polls the simulator's webhook_result with a key of its own (any key works
    // there), starting soon after each call instead of the default 20s.
    config.settle.embedded_key = Some(EmbeddedKey(DEMO_SETTLE_KEY.to_owned()));
    config.settle.first_poll = HumanDuration(DEMO_JOB_DELAY / 2);
    let proxy_listener = TcpListener::bind("127.0.0.1:0").await?;
    let admin_listener = TcpListener::bind("127.0.0.1:0").await?;
    let proxy_addr = proxy_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::run(config, proxy_listener, admin_listener, async {
        let _ = stopped.await;
    }));

    let started = std::time::Instant::now();
    let stats = drive(
        proxy_addr,
        "demo-api-key",
        workload(opts.calls),
        opts.concurrency,
    )
    .await;
    let elapsed = started.elapsed();

    let mut out = String::new();
    out.push_str(&format!(
        "creditmeter demo: {} calls through the proxy in {:.1}s ({} failed), simulated Apollo at http://{sim_addr}\n\n",
        stats.completed, elapsed.as_secs_f64(), stats.failed
    ));
    let by_table = ReportRequest {
        db: db.clone(),
        by: GroupBy::Table,
        format: Format::Table,
        ..ReportRequest::default()
    };
    let pending = pending_milli(&db)?;
    if pending > 0 {
        out.push_str(&format!(
            "Right after the calls: Apollo bills phone reveals when their job ends, so up to {} credits are pending.\n\n",
            report::credits(pending)
        ));
        out.push_str(&report::run(&by_table)?);
        let waited = std::time::Instant::now();
        while pending_milli(&db)? > 0 && waited.elapsed() < SETTLE_WAIT {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        out.push_str(&format!(
            "\n{:.1}s later, creditmeter has polled the jobs' results (webhook_result) and settled them at the calls' own times:\n\n",
            waited.elapsed().as_secs_f64()
        ));
    }
    out.push_str(&report::run(&by_table)?);
    let billed = sim.billed();
    let billed_total = billed.lead_milli + billed.direct_dial_milli + billed.export_milli;
    out.push_str(&format!(
        "\nThe simulated Apollo billed {} credits in all; the ledger above holds what creditmeter metered.\n",
        billed_total as f64 / 1000.0
    ));
    out.push_str(&format!(
        "\nLedger:  {}\nMetrics: http://{admin_addr}/metrics{}\n\nTry:\n  sqlite3 {} \"SELECT table_name, sum(credits_milli)/1000.0 AS credits FROM calls GROUP BY 1 ORDER BY 2 DESC;\"\n  sqlite3 {} \"SELECT * FROM spend_by_hour;\"\n  cargo run --release -- report --db {} --by workflow\n",
        db.display(),
        if opts.hold { "" } else { "   (live only with `demo --hold`)" },
        db.display(),
        db.display(),
        db.display(),
    ));
    if opts.hold {
        #[allow(clippy::print_stdout)]
        {
            print!("{out}");
            println!(
                "\nServing: proxy http://{proxy_addr}  admin http://{admin_addr}  (Ctrl-C to stop)"
            );
        }
        out.clear();
        let _ = tokio::signal::ctrl_c().await;
    }
    let _ = stop.send(());
    server.await??;
    let _ = sim_stop.send(());
    let _ = sim_task.await;
    Ok(out)
}
