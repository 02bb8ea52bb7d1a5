//! Prometheus metrics: an owned registry, label values capped, counters seeded from the ledger.
//!
//! Names and labels are part of the contract (DESIGN.md). `table` and `workflow` come from
//! callers, so their distinct values are capped: past `metrics.max_label_values` a new value is
//! reported as `_other` (the ledger keeps the real one) and `creditmeter_label_overflow_total`
//! counts the substitution.

use std::collections::HashSet;
use std::sync::RwLock;

use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
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

/// Reconciliation's metrics (`credit_type` is `lead`, `direct_dial` or `export`).
struct ReconcileMetrics {
    /// `creditmeter_apollo_credits_consumed`: Apollo's consumed figure this cycle, last poll.
    consumed: GaugeVec,
    /// `creditmeter_apollo_credits_left`: Apollo's left-over figure this cycle, last poll.
    left: GaugeVec,
    /// `creditmeter_unmetered_credits_total`: credits Apollo's balance lost that creditmeter did
    /// not see, summed over settled windows.
    unmetered: CounterVec,
    /// `creditmeter_reconcile_polls_total{result}`: balance polls by result.
    polls: IntCounterVec,
    /// `creditmeter_reconcile_last_success_timestamp_seconds`.
    last_success: Gauge,
    /// `creditmeter_outside_calls_total{endpoint}`: calls Apollo counted (api_usage_stats)
    /// beyond those that passed through creditmeter, summed over settled windows.
    outside_calls: IntCounterVec,
}

/// How many distinct unpriced paths are logged (and remembered) per process.
pub const UNPRICED_LOGGED_MAX: usize = 256;

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
    reloads: IntCounterVec,
    /// `creditmeter_unpriced_total{method}`: 2xx answers on endpoint `other`.
    unpriced: IntCounterVec,
    /// The distinct paths of unpriced answers already logged (bounded, see [`UNPRICED_LOGGED_MAX`]).
    unpriced_logged: std::sync::Mutex<std::collections::HashSet<String>>,
    ledger: LedgerMetrics,
    reconcile: ReconcileMetrics,
    budgets: BudgetMetrics,
    settle: SettleMetrics,
    tables: LabelCap,
    workflows: LabelCap,
    /// `creditmeter_refused_total{reason}`: requests refused before authentication (no
    /// ledger row each). Registered here only; everything that refuses shares this handle.
    refused: IntCounterVec,
}

/// `creditmeter_refused_total` reasons counted by the virtual-key check (present from the
/// first scrape).
pub const KEY_REFUSAL_REASONS: [&str; 6] = [
    "virtual_key_required",
    "invalid_virtual_key",
    "virtual_key_revoked",
    "virtual_key_expired",
    "conflicting_keys",
    "virtual_keys_off",
];

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
        let unpriced = IntCounterVec::new(
            Opts::new(
                "creditmeter_unpriced_total",
                "2xx answers on paths no catalog endpoint matches (endpoint `other`, priced 0): \
                 a new or renamed Apollo endpoint shows here first.",
            ),
            &["method"],
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
        let reconcile = ReconcileMetrics {
            consumed: GaugeVec::new(
                Opts::new(
                    "creditmeter_apollo_credits_consumed",
                    "Credits consumed this credit cycle, as Apollo's usage_stats last reported.",
                ),
                &["credit_type"],
            )?,
            left: GaugeVec::new(
                Opts::new(
                    "creditmeter_apollo_credits_left",
                    "Credits left this credit cycle, as Apollo's usage_stats last reported.",
                ),
                &["credit_type"],
            )?,
            unmetered: CounterVec::new(
                Opts::new(
                    "creditmeter_unmetered_credits_total",
                    "Credits Apollo's balance lost beyond what creditmeter metered (reconciled windows).",
                ),
                &["credit_type"],
            )?,
            polls: IntCounterVec::new(
                Opts::new(
                    "creditmeter_reconcile_polls_total",
                    "Apollo balance polls, by result (ok, forbidden, rate_limited, timeout, ...).",
                ),
                &["result"],
            )?,
            last_success: Gauge::new(
                "creditmeter_reconcile_last_success_timestamp_seconds",
                "Unix time of the last successful Apollo balance poll.",
            )?,
            outside_calls: IntCounterVec::new(
                Opts::new(
                    "creditmeter_outside_calls_total",
                    "Calls Apollo counted (usage_stats/api_usage_stats) that did not pass through creditmeter, by endpoint (reconciled windows).",
                ),
                &["endpoint"],
            )?,
        };
        let budgets = BudgetMetrics::new()?;
        let settle = SettleMetrics::new()?;
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
            Box::new(unpriced.clone()),
            Box::new(ledger.pending.clone()),
            Box::new(ledger.commit_seconds.clone()),
            Box::new(ledger.errors.clone()),
            Box::new(ledger.spooled.clone()),
            Box::new(reconcile.consumed.clone()),
            Box::new(reconcile.left.clone()),
            Box::new(reconcile.unmetered.clone()),
            Box::new(reconcile.polls.clone()),
            Box::new(reconcile.last_success.clone()),
            Box::new(reconcile.outside_calls.clone()),
            Box::new(build_info),
            Box::new(budgets.limit.clone()),
            Box::new(budgets.spent.clone()),
            Box::new(budgets.reserved.clone()),
            Box::new(budgets.rejections.clone()),
            Box::new(budgets.warning.clone()),
            Box::new(budgets.over_limit.clone()),
            Box::new(budgets.holds_active.clone()),
            Box::new(budgets.hold_rejections.clone()),
            Box::new(settle.pending.clone()),
            Box::new(settle.settlements.clone()),
            Box::new(settle.polls.clone()),
        ] {
            registry.register(c)?;
        }
        on_error.with_label_values(&[on_error_mode.as_str()]).set(1);
        registry.register(Box::new(on_error))?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "creditmeter_config_reloads_total",
                "SIGHUP reloads, by result (ok, error: the old settings stayed).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(reloads.clone()))?;
        for result in ["ok", "error"] {
            reloads.with_label_values(&[result]);
        }
        // Present from the first scrape, so alerts on them see 0 rather than nothing.
        for label in ["table", "workflow"] {
            label_overflow.with_label_values(&[label]);
        }
        for method in ["GET", "POST"] {
            unpriced.with_label_values(&[method]);
        }
        let refused = IntCounterVec::new(
            Opts::new(
                "creditmeter_refused_total",
                "Requests and connections refused before authentication, by reason (no ledger row each).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(refused.clone()))?;
        for reason in KEY_REFUSAL_REASONS {
            refused.with_label_values(&[reason]);
        }
        Ok(Metrics {
            refused,
            registry,
            credits,
            requests,
            records,
            upstream_duration,
            rate_limit,
            rate_limit_remaining,
            label_overflow,
            reloads,
            unpriced,
            unpriced_logged: std::sync::Mutex::new(std::collections::HashSet::new()),
            ledger,
            reconcile,
            budgets,
            settle,
            tables: LabelCap::new(max_label_values),
            workflows: LabelCap::new(max_label_values),
        })
    }

    /// The registry, for metrics registered by other parts (the proxy listener's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts a configuration reload.
    pub fn config_reloaded(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// `creditmeter_refused_total{reason}`, for whatever refuses a request before
    /// authentication.
    pub fn refused(&self) -> IntCounterVec {
        self.refused.clone()
    }

    /// The handles the ledger writer updates.
    pub fn ledger(&self) -> LedgerMetrics {
        self.ledger.clone()
    }

    /// The handles budgets and holds update.
    pub fn budgets(&self) -> BudgetMetrics {
        self.budgets.clone()
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
        if r.endpoint == crate::catalog::OTHER_ENDPOINT
            && r.status.is_some_and(|s| (200..300).contains(&s))
        {
            self.observe_unpriced(&r.method, &r.path);
        }
        if let Some(ms) = r.upstream_ms {
            self.upstream_duration
                .with_label_values(&[&r.endpoint])
                .observe(ms as f64 / 1000.0);
        }
    }

    /// Counts a 2xx answer on endpoint `other` and logs its path the first time it is seen, so
    /// a new Apollo endpoint is noticed rather than silently recorded as free. At most
    /// [`UNPRICED_LOGGED_MAX`] distinct paths are remembered; past that, one more line says
    /// that further paths are counted but not logged.
    fn observe_unpriced(&self, method: &str, path: &str) {
        let method = match method {
            "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS" => method,
            _ => "other",
        };
        self.unpriced.with_label_values(&[method]).inc();
        let mut logged = match self.unpriced_logged.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        if logged.contains(path) {
            return;
        }
        if logged.len() < UNPRICED_LOGGED_MAX {
            logged.insert(path.to_owned());
            tracing::warn!(
                method,
                path,
                "a 2xx answer on a path the catalog does not price (endpoint `other`, 0 credits); \
                 if Apollo bills this endpoint, add it to the catalog (catalog.path)"
            );
        } else if logged.len() == UNPRICED_LOGGED_MAX {
            // A sentinel no request path can equal (paths start with `/`) marks the notice as given.
            logged.insert(String::new());
            tracing::warn!(
                max = UNPRICED_LOGGED_MAX,
                "more distinct unpriced paths than are remembered; further ones are counted in \
                 creditmeter_unpriced_total but not logged"
            );
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
    pub fn observe_rate_limits(
        &self,
        endpoint: &str,
        limits: &[crate::catalog::headers::WindowLimit],
    ) {
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

    /// Makes the reconciliation series present from the first scrape (at 0), so alerts on
    /// them see 0 rather than nothing. Called when `[reconcile]` is enabled.
    pub fn init_reconcile(&self, credit_types: &[&str], results: &[&str]) {
        for t in credit_types {
            self.reconcile.unmetered.with_label_values(&[t]);
        }
        for r in results {
            self.reconcile.polls.with_label_values(&[r]);
        }
    }

    /// Sets the Apollo balance gauges for one credit type (thousandths of a credit).
    pub fn observe_balance(&self, credit_type: &str, consumed_milli: i64, left_milli: Option<i64>) {
        self.reconcile
            .consumed
            .with_label_values(&[credit_type])
            .set(consumed_milli as f64 / 1000.0);
        if let Some(left) = left_milli {
            self.reconcile
                .left
                .with_label_values(&[credit_type])
                .set(left as f64 / 1000.0);
        }
    }

    /// Adds unmetered credits (thousandths) found in a settled window, or seeds the counter from
    /// the ledger's total at start-up.
    pub fn add_unmetered(&self, credit_type: &str, milli: i64) {
        if milli > 0 {
            self.reconcile
                .unmetered
                .with_label_values(&[credit_type])
                .inc_by(milli as f64 / 1000.0);
        }
    }

    /// Adds calls outside creditmeter found in a settled window, or seeds the counter from the
    /// ledger's total at start-up.
    pub fn add_outside_calls(&self, endpoint: &str, calls: i64) {
        if let Ok(n) = u64::try_from(calls) {
            self.reconcile
                .outside_calls
                .with_label_values(&[endpoint])
                .inc_by(n);
        }
    }

    /// Counts one balance poll by its result; `ok` also stamps the last-success gauge.
    pub fn observe_reconcile_poll(&self, result: &str) {
        self.reconcile.polls.with_label_values(&[result]).inc();
        if result == "ok" {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            self.reconcile.last_success.set(now);
        }
    }

    /// Sets `creditmeter_credits_pending`: the worst case of the deferred charges not yet
    /// settled, milli-credits.
    pub fn set_credits_pending(&self, milli: i64) {
        self.settle.pending.set(milli as f64 / 1000.0);
    }

    /// Makes every `creditmeter_settlements_total` and `creditmeter_settle_polls_total` series
    /// present from the first scrape, at 0.
    pub fn init_settle(&self, results: &[&str], polls: &[&str]) {
        for r in results {
            self.settle.settlements.with_label_values(&[r]);
        }
        for r in polls {
            self.settle.polls.with_label_values(&[r]);
        }
    }

    /// Counts one settlement by where its figure came from (`reported`, `catalog`,
    /// `estimated`). Its credits are counted by [`observe_call`](Self::observe_call) on its row.
    pub fn observe_settlement(&self, result: &str) {
        self.settle.settlements.with_label_values(&[result]).inc();
    }

    /// Counts one `webhook_result` poll of the settler by its result.
    pub fn observe_settle_poll(&self, result: &str) {
        self.settle.polls.with_label_values(&[result]).inc();
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

/// Deferred-charge metrics.
struct SettleMetrics {
    /// `creditmeter_credits_pending`: worst case of the deferred charges not yet settled.
    pending: Gauge,
    /// `creditmeter_settlements_total{result}`: settlements recorded, by the figure's source.
    settlements: IntCounterVec,
    /// `creditmeter_settle_polls_total{result}`: creditmeter's own webhook_result polls.
    polls: IntCounterVec,
}

impl SettleMetrics {
    fn new() -> Result<SettleMetrics, prometheus::Error> {
        Ok(SettleMetrics {
            pending: Gauge::new(
                "creditmeter_credits_pending",
                "Credits Apollo may still bill for calls whose asynchronous job (phone reveal, waterfall) has not settled: their worst case.",
            )?,
            settlements: IntCounterVec::new(
                Opts::new(
                    "creditmeter_settlements_total",
                    "Deferred charges settled, by where the figure came from (reported, catalog, estimated).",
                ),
                &["result"],
            )?,
            polls: IntCounterVec::new(
                Opts::new(
                    "creditmeter_settle_polls_total",
                    "creditmeter's own webhook_result polls, by result (done, pending, rate_limited, terminal, error).",
                ),
                &["result"],
            )?,
        })
    }
}

/// Budget and hold metrics. `budget` is the budget's name (from config, so bounded); `credit_type`
/// is `all` for a limit over every type, else `lead`, `direct_dial` or `export`, and only the
/// types a budget limits appear.
#[derive(Clone)]
pub struct BudgetMetrics {
    /// `creditmeter_budget_limit_credits{budget,credit_type}`.
    pub limit: GaugeVec,
    /// `creditmeter_budget_spent_credits{budget,credit_type}`: settled spend in the current window.
    pub spent: GaugeVec,
    /// `creditmeter_budget_reserved_credits{budget,credit_type}`: worst cases of calls in flight.
    pub reserved: GaugeVec,
    /// `creditmeter_budget_rejections_total{budget}`: calls a `block` budget refused.
    pub rejections: IntCounterVec,
    /// `creditmeter_budget_warning{budget,credit_type}`: 1 while spend in the current window is at
    /// or past `warn_at` percent of the limit.
    pub warning: IntGaugeVec,
    /// `creditmeter_budget_over_limit_calls_total{budget}`: calls an `alert` budget let through
    /// past its limit.
    pub over_limit: IntCounterVec,
    /// `creditmeter_holds_active`: holds in force.
    pub holds_active: IntGauge,
    /// `creditmeter_hold_rejections_total{scope}`: calls refused by a hold, by the hold's scope.
    pub hold_rejections: IntCounterVec,
}

impl BudgetMetrics {
    fn new() -> Result<BudgetMetrics, prometheus::Error> {
        let gauge = |name: &str, help: &str| {
            GaugeVec::new(Opts::new(name, help), &["budget", "credit_type"])
        };
        Ok(BudgetMetrics {
            limit: gauge(
                "creditmeter_budget_limit_credits",
                "A budget's limit, in credits.",
            )?,
            spent: gauge(
                "creditmeter_budget_spent_credits",
                "Credits spent in the budget's current window (settled calls).",
            )?,
            reserved: gauge(
                "creditmeter_budget_reserved_credits",
                "Credits reserved against the budget by calls in flight (their worst case).",
            )?,
            rejections: IntCounterVec::new(
                Opts::new(
                    "creditmeter_budget_rejections_total",
                    "Calls refused because their worst case would cross a block budget.",
                ),
                &["budget"],
            )?,
            warning: IntGaugeVec::new(
                Opts::new(
                    "creditmeter_budget_warning",
                    "1 while the budget's spend in its current window is at or past warn_at percent of the limit.",
                ),
                &["budget", "credit_type"],
            )?,
            over_limit: IntCounterVec::new(
                Opts::new(
                    "creditmeter_budget_over_limit_calls_total",
                    "Calls an alert budget let through although their worst case crossed its limit.",
                ),
                &["budget"],
            )?,
            holds_active: IntGauge::new("creditmeter_holds_active", "Holds in force.")?,
            hold_rejections: IntCounterVec::new(
                Opts::new(
                    "creditmeter_hold_rejections_total",
                    "Calls refused by a hold, by the hold's scope.",
                ),
                &["scope"],
            )?,
        })
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
    fn reconcile_series_are_exported_in_credits() {
        let m = Metrics::new(10, "test", crate::config::OnLedgerError::Spool).unwrap();
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(
            !text.contains("creditmeter_unmetered_credits_total{"),
            "{text}"
        );
        m.init_reconcile(&["lead"], &["ok", "forbidden"]);
        m.observe_balance("lead", 12_500, Some(987_500));
        m.add_unmetered("lead", 5_000);
        m.add_unmetered("lead", -3);
        m.observe_reconcile_poll("forbidden");
        let text = String::from_utf8(m.encode()).unwrap();
        for line in [
            "creditmeter_apollo_credits_consumed{credit_type=\"lead\"} 12.5",
            "creditmeter_apollo_credits_left{credit_type=\"lead\"} 987.5",
            "creditmeter_unmetered_credits_total{credit_type=\"lead\"} 5",
            "creditmeter_reconcile_polls_total{result=\"forbidden\"} 1",
            "creditmeter_reconcile_polls_total{result=\"ok\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn unpriced_answers_are_counted_by_method_and_their_paths_remembered_within_a_bound() {
        let m = Metrics::new(10, "test", crate::config::OnLedgerError::Spool).unwrap();
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(
            text.contains("creditmeter_unpriced_total{method=\"POST\"} 0"),
            "{text}"
        );
        for i in 0..UNPRICED_LOGGED_MAX + 50 {
            m.observe_unpriced("POST", &format!("/api/v1/new_endpoint/{i}"));
            m.observe_unpriced("POST", &format!("/api/v1/new_endpoint/{i}"));
        }
        m.observe_unpriced("BREW", "/coffee");
        let text = String::from_utf8(m.encode()).unwrap();
        let want = format!(
            "creditmeter_unpriced_total{{method=\"POST\"}} {}",
            2 * (UNPRICED_LOGGED_MAX + 50)
        );
        assert!(text.contains(&want), "{want} missing in\n{text}");
        assert!(text.contains("creditmeter_unpriced_total{method=\"other\"} 1"));
        // Memory stays bounded: the cap, plus the marker that the overflow was announced.
        let logged = m.unpriced_logged.lock().map(|l| l.len()).unwrap_or(0);
        assert_eq!(logged, UNPRICED_LOGGED_MAX + 1);
    }

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
