//! Rows and metrics for the writer's benchmarks (`creditmeter ledger bench`) and tests: a
//! realistic call row, and ledger metrics registered nowhere.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge};

use crate::{CallRecord, LedgerMetrics, Outcome};

/// Ledger metrics for a benchmark or a test, registered in no registry.
pub fn bench_metrics() -> Result<LedgerMetrics, prometheus::Error> {
    Ok(LedgerMetrics {
        pending: IntGauge::new("bench_pending", "rows pending")?,
        commit_seconds: Histogram::with_opts(HistogramOpts::new(
            "bench_commit_seconds",
            "commit time",
        ))?,
        errors: IntCounter::new("bench_errors_total", "errors")?,
        spooled: IntGauge::new("bench_spooled_rows", "rows spooled")?,
    })
}

/// Call row `i` of a benchmark: a priced people/match with realistic sizes.
pub fn bench_row(i: usize) -> CallRecord {
    let now = creditmeter_base::now_ms();
    CallRecord {
        request_id: format!("bench-{now:x}-{i:08x}-{}", std::process::id()),
        started_at: now,
        finished_at: now + 120,
        method: "POST".into(),
        path: "/api/v1/people/match".into(),
        endpoint: "people_match".into(),
        status: Some(200),
        outcome: Outcome::Ok,
        table_name: Some("_bench".into()),
        workflow: Some(format!("w{}", i % 4)),
        tags: Some(r#"{"env":"bench"}"#.into()),
        key_fp: Some("00000000000bench".into()),
        lead_milli: 1000,
        direct_dial_milli: 0,
        export_milli: 0,
        credit_source: "catalog".into(),
        records_requested: Some(1),
        records_matched: Some(1),
        catalog_version: "bench".into(),
        upstream_ms: Some(120),
        request_bytes: 80,
        response_bytes: 2000,
        error: None,
        id_kinds: Some("email".into()),
        settles: None,
        deferred: None,
        deferred_milli: 0,
        identifiers: Vec::new(),
    }
}
