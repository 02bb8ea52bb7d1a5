//! Prometheus metrics: an owned registry, label values capped, counters seeded from the ledger.
//!
//! Names and labels are part of the contract (DESIGN.md). `table` and `workflow` come from
//! callers, so their distinct values are capped: past `metrics.max_label_values` a new value is
//! reported as `_other` (the ledger keeps the real one) and `creditmeter_label_overflow_total`
//! counts the substitution.

use std::collections::HashSet;
use std::sync::RwLock;

use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::ledger::queries::SeedTotals;
use crate::ledger::{CallRecord, LedgerMetrics};

/// Label value for calls without a table.
pub const UNATTRIBUTED: &str = "_unattributed";
/// Label value for calls without a workflow.
pub const NO_WORKFLOW: &str = "_none";
/// Label value that replaces values past the cap.
pub const OVERFLOW: &str = "_other";

/// Why the metrics could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("metrics registry: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Every metric creditmeter exports.
pub struct Metrics {
    registry: Registry,
    credits: CounterVec,
    requests: IntCounterVec,
    records: IntCounterVec,
    upstream_duration: HistogramVec,
    rate_limit: IntGaugeVec,
    rate_limit_remaining: IntGaugeVec,
    label_overflow: IntCounterVec,
    ledger: LedgerMetrics,
    tables: LabelCap,
    workflows: LabelCap,
}

impl Metrics {
    /// Registers every metric. `max_label_values` caps `table` and `workflow` each.
    pub fn new(
        max_label_values: usize,
        catalog_version: &str,
        on_error_mode: crate::config::OnLedgerError,
    ) -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let credits = CounterVec::new(
            Opts::new(
                "creditmeter_credits_total",
                "Apollo credits billed, by credit type.",
            ),
            &["table", "workflow", "endpoint", "credit_type"],
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "creditmeter_requests_total",
                "Calls handled, by upstream status code and outcome.",
            ),
            &["table", "endpoint", "code", "outcome"],
        )?;
        let records = IntCounterVec::new(
            Opts::new(
                "creditmeter_records_total",
                "Records requested from and matched by Apollo.",
            ),
            &["table", "endpoint", "result"],
        )?;
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "creditmeter_upstream_duration_seconds",
                "Time from sending a call upstream to its last response byte.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["endpoint"],
        )?;
        let rate_limit = IntGaugeVec::new(
            Opts::new(
                "creditmeter_apollo_rate_limit",
                "Apollo's rate limit per endpoint and window, from its response headers.",
            ),
            &["endpoint", "window"],
        )?;
        let rate_limit_remaining = IntGaugeVec::new(
            Opts::new(
                "creditmeter_apollo_rate_limit_remaining",
                "Calls left in Apollo's current rate-limit window, from its response headers.",
            ),
            &["endpoint", "window"],
        )?;
        let label_overflow = IntCounterVec::new(
            Opts::new(
                "creditmeter_label_overflow_total",
                "Label values replaced by _other because of the cap.",
            ),
            &["label"],
        )?;
        let ledger = LedgerMetrics {
            pending: IntGauge::new(
                "creditmeter_ledger_pending",
                "Ledger rows waiting to be committed.",
            )?,
            commit_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "creditmeter_ledger_commit_seconds",
                    "Time per ledger group commit.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
                ]),
            )?,
            errors: IntCounter::new(
                "creditmeter_ledger_errors_total",
                "Ledger commits that failed.",
            )?,
            spooled: IntGauge::new(
                "creditmeter_ledger_spooled_rows",
                "Rows waiting in the spool file for the ledger to accept writes again.",
            )?,
        };
        let on_error = IntGaugeVec::new(
            Opts::new(
                "creditmeter_ledger_on_error",
                "Always 1; `mode` is ledger.on_error (spool or fail_closed).",
            ),
            &["mode"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "creditmeter_build_info",
                "Always 1; carries the version and catalog version.",
            ),
            &["version", "catalog_version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), catalog_version])
            .set(1);
        for c in [
            Box::new(credits.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(requests.clone()),
            Box::new(records.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(rate_limit.clone()),
            Box::new(rate_limit_remaining.clone()),
            Box::new(label_overflow.clone()),
            Box::new(ledger.pending.clone()),
            Box::new(ledger.commit_seconds.clone()),
            Box::new(ledger.errors.clone()),
            Box::new(ledger.spooled.clone()),
            Box::new(build_info),
        ] {
            registry.register(c)?;
        }
        on_error.with_label_values(&[on_error_mode.as_str()]).set(1);
        registry.register(Box::new(on_error))?;
        // Present from the first scrape, so alerts on them see 0 rather than nothing.
        for label in ["table", "workflow"] {
            label_overflow.with_label_values(&[label]);
        }
        Ok(Metrics {
            registry,
            credits,
            requests,
            records,
            upstream_duration,
            rate_limit,
            rate_limit_remaining,
            label_overflow,
            ledger,
            tables: LabelCap::new(max_label_values),
            workflows: LabelCap::new(max_label_values),
        })
    }

    /// The handles the ledger writer updates.
    pub fn ledger(&self) -> LedgerMetrics {
        self.ledger.clone()
    }

    fn table_label<'a>(&self, table: Option<&'a str>) -> &'a str {
        match table {
            None => UNATTRIBUTED,
            Some(t) => self.capped(&self.tables, t, "table"),
        }
    }

    fn workflow_label<'a>(&self, workflow: Option<&'a str>) -> &'a str {
        match workflow {
            None => NO_WORKFLOW,
            Some(w) => self.capped(&self.workflows, w, "workflow"),
        }
    }

    fn capped<'a>(&self, cap: &LabelCap, value: &'a str, label: &str) -> &'a str {
        if cap.admit(value) {
            value
        } else {
            self.label_overflow.with_label_values(&[label]).inc();
            OVERFLOW
        }
    }

    /// Counts one finished call.
    pub fn observe_call(&self, r: &CallRecord) {
        let table = self.table_label(r.table_name.as_deref());
        let code = status_label(r.status);
        self.requests
            .with_label_values(&[table, &r.endpoint, code.as_ref(), r.outcome.as_str()])
            .inc();
        if r.credits_milli() != 0 {
            let workflow = self.workflow_label(r.workflow.as_deref());
            self.add_credits(
                table,
                workflow,
                &r.endpoint,
                r.lead_milli,
                r.direct_dial_milli,
                r.export_milli,
            );
        }
        self.add_records(table, &r.endpoint, r.records_requested, r.records_matched);
        if let Some(ms) = r.upstream_ms {
            self.upstream_duration
                .with_label_values(&[&r.endpoint])
                .observe(ms as f64 / 1000.0);
        }
    }

    fn add_credits(
        &self,
        table: &str,
        workflow: &str,
        endpoint: &str,
        lead: i64,
        dd: i64,
        export: i64,
    ) {
        for (ty, milli) in [("lead", lead), ("direct_dial", dd), ("export", export)] {
            if milli != 0 {
                self.credits
                    .with_label_values(&[table, workflow, endpoint, ty])
                    .inc_by(milli as f64 / 1000.0);
            }
        }
    }

    fn add_records(
        &self,
        table: &str,
        endpoint: &str,
        requested: Option<i64>,
        matched: Option<i64>,
    ) {
        for (result, n) in [("requested", requested), ("matched", matched)] {
            if let Some(n) = n.filter(|n| *n > 0) {
                self.records
                    .with_label_values(&[table, endpoint, result])
                    .inc_by(n as u64);
            }
        }
    }

    /// Starts the counters from the ledger's totals, so a restart loses no increments.
    pub fn seed(&self, totals: &SeedTotals) {
        for c in &totals.credits {
            let table = self.table_label(c.table_name.as_deref());
            let workflow = self.workflow_label(c.workflow.as_deref());
            self.add_credits(
                table,
                workflow,
                &c.endpoint,
                c.lead_milli,
                c.direct_dial_milli,
                c.export_milli,
            );
        }
        for r in &totals.requests {
            let table = self.table_label(r.table_name.as_deref());
            self.requests
                .with_label_values(&[
                    table,
                    &r.endpoint,
                    status_label(r.status).as_ref(),
                    &r.outcome,
                ])
                .inc_by(r.calls);
        }
        for r in &totals.records {
            let table = self.table_label(r.table_name.as_deref());
            self.add_records(
                table,
                &r.endpoint,
                Some(r.requested as i64),
                Some(r.matched as i64),
            );
        }
    }

    /// Sets the Apollo rate-limit gauges for one endpoint.
    pub fn observe_rate_limits(&self, endpoint: &str, limits: &[crate::ratelimit::WindowLimit]) {
        for l in limits {
            if let Some(limit) = l.limit {
                self.rate_limit
                    .with_label_values(&[endpoint, l.window])
                    .set(limit);
            }
            if let Some(remaining) = l.remaining {
                self.rate_limit_remaining
                    .with_label_values(&[endpoint, l.window])
                    .set(remaining);
            }
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        buf
    }
}

fn status_label(status: Option<u16>) -> std::borrow::Cow<'static, str> {
    match status {
        Some(s) => s.to_string().into(),
        None => "none".into(),
    }
}

/// The set of admitted values for one label, up to a cap.
struct LabelCap {
    cap: usize,
    seen: RwLock<HashSet<String>>,
}

impl LabelCap {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            seen: RwLock::new(HashSet::new()),
        }
    }

    /// True if `value` has its own label value (already admitted, or admitted now).
    fn admit(&self, value: &str) -> bool {
        if let Ok(seen) = self.seen.read() {
            if seen.contains(value) {
                return true;
            }
            if seen.len() >= self.cap {
                return false;
            }
        }
        match self.seen.write() {
            Ok(mut seen) => {
                if seen.contains(value) {
                    return true;
                }
                if seen.len() >= self.cap {
                    return false;
                }
                seen.insert(value.to_owned());
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_cap_admits_up_to_cap_then_overflows() {
        let m = Metrics::new(2, "test", crate::config::OnLedgerError::Spool).unwrap();
        assert_eq!(m.table_label(Some("a")), "a");
        assert_eq!(m.table_label(Some("b")), "b");
        assert_eq!(m.table_label(Some("c")), OVERFLOW);
        assert_eq!(m.table_label(Some("a")), "a");
        assert_eq!(m.table_label(None), UNATTRIBUTED);
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(
            text.contains("creditmeter_label_overflow_total{label=\"table\"} 1"),
            "{text}"
        );
    }
}
