//! Simulated Clay traffic: a deterministic mix of calls from several tables (one of them a heavy
//! spender), and a driver that sends it through a proxy. `creditmeter demo`, the integration
//! tests and the benchmarks reuse it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

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
