//! Metering: turns a finished call into a priced ledger row and metric increments.
//!
//! The proxy creates one [`CallMeter`] per call and hands it along with the call (into the
//! upstream task, then into the response body). It records the call exactly once: through
//! [`CallMeter::finish`], or, if the call is abandoned anywhere on the way, from its `Drop`, so a
//! call can never vanish without a row. A call admitted against budgets carries its
//! [`Admission`] here, so the same exactly-once finish settles its reservation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::attribution::Attribution;
use crate::catalog::{Catalog, CreditSource, Deferred, RequestParams, ResponseView};
use crate::config::Durability;
use crate::guard::{Admission, Amount, CallFacts, PendingCharge};
use crate::inflight::InFlightGuard;
use crate::ledger::writer::{Ack, AckSender, RowExpected};
use crate::ledger::{CallRecord, LedgerHandle, Outcome};
use crate::metrics::Metrics;

/// Shared by every call: where rows and counts go.
pub struct Meter {
    pub ledger: LedgerHandle,
    pub metrics: Arc<Metrics>,
    pub durability: Durability,
    /// Cap on the encoded response bytes kept for pricing.
    pub max_inspect: usize,
    /// Cap on decoded bytes while pricing.
    pub max_decoded: usize,
    /// Calls in flight by start time, so reconciliation knows when a window's calls are all
    /// in the ledger (see `inflight`).
    pub inflight: Arc<crate::inflight::InFlight>,
    /// Deferred charges: calls that leave one register it here, and job results seen on the
    /// way through settle it (`settle`). `None`: deferred charges are only written on the row.
    pub settle: Option<Arc<dyn Deferrals>>,
}

/// The call a deferred charge belongs to: what its settlement row copies.
#[derive(Debug, Clone)]
pub struct Original {
    pub request_id: String,
    pub started_at: i64,
    pub method: String,
    pub path: String,
    pub endpoint: String,
    pub table_name: Option<String>,
    pub workflow: Option<String>,
    pub tags: Option<String>,
    pub key_fp: Option<String>,
    pub records_requested: Option<i64>,
    pub records_matched: Option<i64>,
}

impl Original {
    /// The original call of a row about to be stored.
    pub fn of(r: &CallRecord) -> Original {
        Original {
            request_id: r.request_id.clone(),
            started_at: r.started_at,
            method: r.method.clone(),
            path: r.path.clone(),
            endpoint: r.endpoint.clone(),
            table_name: r.table_name.clone(),
            workflow: r.workflow.clone(),
            tags: r.tags.clone(),
            key_fp: r.key_fp.clone(),
            records_requested: r.records_requested,
            records_matched: r.records_matched,
        }
    }
}

/// Where a finished call leaves what Apollo bills later: the settler's book (`settle::Book`).
/// The meter knows it only through this seam, so `settle`, whose pollers record their own polls
/// through the meter, sits above it.
pub trait Deferrals: Send + Sync {
    /// Adds the deferred charge of a call whose row was just handed to the ledger, with its
    /// reservation in budgets (if it was admitted against any).
    fn register(&self, original: Original, deferred: Deferred, reservation: Option<PendingCharge>);

    /// A 2xx answer of the `webhook_result` endpoint (decoded body), whoever polled it.
    /// Returns true when it settled a charge.
    fn observe_result(&self, path: &str, body: &[u8]) -> bool;
}

pub use creditmeter_base::now_ms;

/// Makes `request_id`s: time-ordered, unique across restarts (random per-process part).
pub struct RequestIds {
    process: u32,
    counter: AtomicU64,
}

impl RequestIds {
    pub fn new() -> Self {
        let mut b = [0u8; 4];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Self {
            process: u32::from_le_bytes(b) ^ nanos.rotate_left(16) ^ std::process::id(),
            counter: AtomicU64::new(0),
        }
    }

    /// 32 hex digits: 12 of unix ms, 8 of process id, 12 of a per-process counter.
    pub fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff_ffff;
        format!(
            "{:012x}{:08x}{:012x}",
            now_ms() as u64 & 0xffff_ffff_ffff,
            self.process,
            n
        )
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

/// What is known about a call before it goes upstream.
pub struct CallContext {
    pub request_id: String,
    pub started_at: i64,
    pub method: String,
    pub path: String,
    /// The catalog the call was classified with; a reload mid-call does not change its price.
    pub catalog: Arc<Catalog>,
    pub endpoint: crate::catalog::EndpointId,
    pub params: RequestParams,
    pub attribution: Attribution,
    pub key_fp: Option<String>,
    pub request_bytes: i64,
}

impl CallContext {
    /// What budget and hold scopes match the call on.
    pub fn facts(&self) -> CallFacts {
        CallFacts {
            table: self.attribution.table.clone(),
            workflow: self.attribution.workflow.clone(),
            key_fp: self.key_fp.clone(),
            tags: self.attribution.tags.clone(),
        }
    }

    /// The most the call can cost, by its catalog; `None` when the catalog cannot bound it.
    pub fn worst_case(&self) -> Option<crate::catalog::Credits> {
        self.catalog
            .endpoint(self.endpoint)
            .worst_case(&self.params)
    }
}

/// The response bytes kept for pricing: shared `Bytes` chunks, no copies until the end.
#[derive(Default)]
pub struct Captured {
    chunks: Vec<Bytes>,
    len: usize,
    truncated: bool,
    /// The body outgrew the cap (as opposed to being cut short), so nothing was kept.
    over_cap: bool,
}

impl Captured {
    /// Keeps `data` if it fits under `cap`; past the cap, marks the capture truncated.
    pub fn push(&mut self, data: &Bytes, cap: usize) {
        if self.truncated {
            return;
        }
        if self.len + data.len() > cap {
            self.truncated = true;
            self.over_cap = true;
            self.chunks.clear();
            return;
        }
        self.len += data.len();
        self.chunks.push(data.clone());
    }

    /// Marks the copy incomplete (the body was cut short), so body-based charges don't apply.
    pub fn mark_truncated(&mut self) {
        self.truncated = true;
    }

    fn contiguous(&self) -> std::borrow::Cow<'_, [u8]> {
        match self.chunks.as_slice() {
            [] => std::borrow::Cow::Borrowed(&[]),
            [one] => std::borrow::Cow::Borrowed(one.as_ref()),
            many => {
                let mut v = Vec::with_capacity(self.len);
                for c in many {
                    v.extend_from_slice(c);
                }
                std::borrow::Cow::Owned(v)
            }
        }
    }
}

/// How a call ended, as the proxy saw it.
pub struct Finish {
    pub outcome: Outcome,
    pub body: Captured,
    pub response_bytes: u64,
    pub error: Option<String>,
}

/// One call's meter. Records exactly once (see the module docs).
pub struct CallMeter {
    meter: Arc<Meter>,
    ctx: Option<Box<CallContext>>,
    status: Option<u16>,
    content_encoding: Option<String>,
    upstream_started: Option<Instant>,
    admission: Option<Admission>,
    /// Tells the ledger writer a row is on its way, until it is submitted.
    expected: Option<RowExpected>,
    /// Keeps the call in `Meter::inflight` until its row is submitted.
    inflight: Option<InFlightGuard>,
}

impl CallMeter {
    pub fn new(meter: Arc<Meter>, ctx: CallContext) -> Self {
        Self {
            inflight: Some(meter.inflight.register(ctx.started_at)),
            expected: Some(meter.ledger.expect_row()),
            meter,
            ctx: Some(Box::new(ctx)),
            status: None,
            content_encoding: None,
            upstream_started: None,
            admission: None,
        }
    }

    /// Attaches the call's budget reservation, settled when the call is recorded.
    pub fn with_admission(mut self, admission: Admission) -> Self {
        self.admission = Some(admission);
        self
    }

    /// The call's `request_id`.
    pub fn request_id(&self) -> &str {
        self.ctx
            .as_ref()
            .map(|c| c.request_id.as_str())
            .unwrap_or("")
    }

    /// Whether pricing needs the response body (otherwise the proxy keeps no copy).
    pub fn inspects_body(&self) -> bool {
        self.ctx
            .as_ref()
            .is_some_and(|c| c.catalog.endpoint(c.endpoint).inspects_body())
    }

    /// The cap on the kept response copy.
    pub fn max_inspect(&self) -> usize {
        self.meter.max_inspect
    }

    /// Marks the moment the call was sent upstream.
    pub fn upstream_sent(&mut self) {
        self.upstream_started = Some(Instant::now());
    }

    /// Notes the upstream response head: status, encoding, and Apollo's rate-limit headers.
    pub fn response_head(&mut self, status: u16, headers: &http::HeaderMap) {
        self.status = Some(status);
        self.content_encoding = headers
            .get(http::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if let Some(ctx) = &self.ctx {
            let limits = crate::catalog::headers::parse(headers);
            if !limits.is_empty() {
                let name = ctx.catalog.endpoint(ctx.endpoint).name();
                self.meter.metrics.observe_rate_limits(name, &limits);
            }
        }
    }

    /// Prices and records the call. Returns the commit acknowledgement to wait for when the
    /// ledger runs in `commit` durability.
    ///
    /// A large response (see [`OFFLOAD_BYTES`]) is priced on tokio's blocking pool, so that
    /// inflating and scanning it never holds up the other calls on an async worker; a small
    /// one is priced here, where a thread hand-off would cost more than the work.
    pub fn finish(&mut self, f: Finish) -> Option<Ack> {
        let ctx = self.ctx.take()?;
        let weight = if self.content_encoding.is_some() {
            f.body.len.saturating_mul(ENCODED_WEIGHT)
        } else {
            f.body.len
        };
        let call = Finished {
            meter: self.meter.clone(),
            status: self.status,
            content_encoding: self.content_encoding.take(),
            upstream_started: self.upstream_started,
            admission: self.admission.take(),
            ctx: Some(ctx),
            finish: Some(f),
            _expected: self.expected.take(),
            _inflight: self.inflight.take(),
        };
        let runtime = tokio::runtime::Handle::try_current().ok();
        match runtime.filter(|_| weight >= OFFLOAD_BYTES) {
            None => call.record(None),
            Some(rt) => {
                let (ack_tx, ack_rx) = if self.meter.durability == Durability::Commit {
                    let (t, r) = self.meter.ledger.ack_channel();
                    (Some(t), Some(r))
                } else {
                    (None, None)
                };
                let mut call = Offloaded(Some((call, ack_tx)));
                rt.spawn_blocking(move || call.record());
                ack_rx
            }
        }
    }
}

/// `calls.table_name` of the calls creditmeter makes itself (the balance poller's, workflow
/// `reconcile`, and the settler's, workflow `settle`), so they are plainly labelled in reports
/// and left out of the proxied traffic a reconciliation window is judged by.
pub const POLLER_TABLE: &str = "_creditmeter";

/// Finishes a call creditmeter makes itself (the balance and settlement pollers' polls) and
/// waits for its row's commit, whatever the durability asks of proxied calls.
pub async fn record_and_wait(
    call: &mut CallMeter,
    outcome: Outcome,
    error: Option<String>,
    body: Captured,
    response_bytes: u64,
) {
    if let Some(ack) = call.finish(Finish {
        outcome,
        body,
        response_bytes,
        error,
    }) {
        let _ = ack.await;
    }
}

/// Responses at least this large (encoded bytes × [`ENCODED_WEIGHT`] when compressed) are
/// priced off the async workers. Measured (BENCHMARKS.md): at 32 KiB, handing every 64 KB
/// search to the pool cost more in thread wake-ups than its ~60 µs scan; a gzipped 250 KB
/// search (about 1 ms to inflate and scan) is worth moving.
pub const OFFLOAD_BYTES: usize = 128 * 1024;

/// A compressed body inflates to several times its size before it is scanned.
const ENCODED_WEIGHT: usize = 4;

/// A call handed to the blocking pool. If the pool never runs it (the runtime is shutting
/// down), dropping it records the call right there: it is never lost.
struct Offloaded(Option<(Finished, Option<AckSender>)>);

impl Offloaded {
    fn record(&mut self) {
        if let Some((call, ack)) = self.0.take() {
            call.record(ack);
        }
    }
}

impl Drop for Offloaded {
    fn drop(&mut self) {
        self.record();
    }
}

/// A finished call with everything pricing needs, owned, so it can move to another thread.
struct Finished {
    meter: Arc<Meter>,
    status: Option<u16>,
    content_encoding: Option<String>,
    upstream_started: Option<Instant>,
    admission: Option<Admission>,
    /// Both always set; taken once by `record`.
    ctx: Option<Box<CallContext>>,
    finish: Option<Finish>,
    /// Dropped with the call, after its row is submitted.
    _expected: Option<RowExpected>,
    /// Likewise: the call leaves `Meter::inflight` once its row is submitted.
    _inflight: Option<InFlightGuard>,
}

impl Finished {
    /// Prices the call, settles its budget reservation, counts it and hands the row to the
    /// ledger. With `ack` the commit is reported there; otherwise the returned
    /// acknowledgement (if durability asks for one) reports it.
    fn record(mut self, ack: Option<AckSender>) -> Option<Ack> {
        let (ctx, f) = (self.ctx.take()?, self.finish.take()?);
        let (record, later) = self.build(*ctx, f);
        let actual = Amount::of(
            record.lead_milli,
            record.direct_dial_milli,
            record.export_milli,
        );
        // A deferred charge keeps its worst case reserved until it settles.
        let pending = match (self.admission.take(), &later) {
            (Some(admission), Later::Deferred(d)) => {
                let w = crate::catalog::Credits::from(d.worst);
                Some(admission.settle_deferred(
                    actual,
                    Amount::of(w.lead_milli, w.direct_dial_milli, w.export_milli),
                ))
            }
            (Some(admission), _) => {
                admission.settle(actual);
                None
            }
            (None, _) => None,
        };
        let original = matches!(later, Later::Deferred(_)).then(|| Original::of(&record));
        let path = matches!(later, Later::Result(_)).then(|| record.path.clone());
        self.meter.metrics.observe_call(&record);
        let ack = match ack {
            Some(tx) => {
                self.meter.ledger.submit_acked(record, Some(tx));
                None
            }
            None => {
                let want_ack = self.meter.durability == Durability::Commit;
                self.meter.ledger.submit(record, want_ack)
            }
        };
        // After the row, so its settlement (at once when settlement is off) follows it.
        if let Some(book) = &self.meter.settle {
            match later {
                Later::Deferred(d) => {
                    if let Some(o) = original {
                        book.register(o, d, pending);
                    }
                }
                Later::Result(body) => {
                    book.observe_result(path.as_deref().unwrap_or(""), &body);
                }
                Later::Nothing => {}
            }
        }
        ack
    }

    fn build(&self, ctx: CallContext, f: Finish) -> (CallRecord, Later) {
        let catalog = ctx.catalog.clone();
        let ep = catalog.endpoint(ctx.endpoint);
        let body = f.body.contiguous();
        let view = match self.status {
            Some(status) => ResponseView {
                status,
                content_encoding: self.content_encoding.as_deref(),
                body: &body,
                // An incomplete body can never justify a body-based charge.
                truncated: f.body.truncated
                    || f.outcome != Outcome::Ok && f.outcome != Outcome::ClientCancelled,
                max_decoded: self.meter.max_decoded,
            },
            None => ResponseView {
                status: 0,
                content_encoding: None,
                body: &[],
                truncated: true,
                max_decoded: self.meter.max_decoded,
            },
        };
        let pricing = catalog.price(ep, &ctx.params, &view);
        let later = later_of(&catalog, ep, &ctx.params, &view, &pricing);
        // The copy was dropped at the cap: say so, rather than "incomplete (0 bytes kept)".
        let note = match pricing.note {
            Some(n) if f.body.over_cap => Some(format!(
                "response body is larger than catalog.max_inspect ({} bytes), so it was not kept for pricing{}",
                self.meter.max_inspect,
                match n.rfind("; ") {
                    Some(i) if pricing.source == CreditSource::Estimated => &n[i..],
                    _ => "",
                }
            )),
            note => note,
        };
        let error = match (
            f.error,
            note.filter(|_| pricing.source != CreditSource::Reported),
        ) {
            (Some(e), Some(n)) if self.status.is_some_and(|s| (200..300).contains(&s)) => {
                Some(format!("{e}; pricing: {n}"))
            }
            (Some(e), _) => Some(e),
            (None, Some(n))
                if self.status.is_some_and(|s| (200..300).contains(&s))
                    && (ep.inspects_body() || pricing.source == CreditSource::Estimated) =>
            {
                Some(format!("pricing: {n}"))
            }
            (None, _) => None,
        };
        let kinds = ctx.params.identifier_kinds();
        let deferred = match &later {
            Later::Deferred(d) => Some(d),
            _ => None,
        };
        let record = CallRecord {
            request_id: ctx.request_id,
            started_at: ctx.started_at,
            finished_at: now_ms(),
            method: ctx.method,
            path: ctx.path,
            endpoint: ep.name().to_owned(),
            status: self.status,
            outcome: f.outcome,
            table_name: ctx.attribution.table.clone(),
            workflow: ctx.attribution.workflow.clone(),
            tags: ctx.attribution.tags_json(),
            key_fp: ctx.key_fp,
            lead_milli: pricing.credits.lead_milli,
            direct_dial_milli: pricing.credits.direct_dial_milli,
            export_milli: pricing.credits.export_milli,
            credit_source: pricing.source.as_str().into(),
            records_requested: pricing.records_requested,
            records_matched: pricing.records_matched,
            catalog_version: catalog.version().to_owned(),
            upstream_ms: self
                .upstream_started
                .filter(|_| self.status.is_some())
                .map(|t| t.elapsed().as_millis() as i64),
            request_bytes: ctx.request_bytes,
            response_bytes: f.response_bytes as i64,
            error,
            id_kinds: (!kinds.is_empty()).then(|| kinds.join(",")),
            settles: None,
            deferred: deferred.map(crate::catalog::Deferred::to_json),
            deferred_milli: deferred.map_or(0, crate::catalog::Deferred::worst_milli),
        };
        (record, later)
    }
}

/// What a finished call leaves for the settler.
enum Later {
    Nothing,
    /// Apollo bills part of it later (`[endpoint.deferred]`).
    Deferred(crate::catalog::Deferred),
    /// A job result (`webhook_result` 2xx), decoded.
    Result(Vec<u8>),
}

fn later_of(
    catalog: &Catalog,
    ep: &crate::catalog::Endpoint,
    params: &RequestParams,
    view: &ResponseView<'_>,
    pricing: &crate::catalog::Pricing,
) -> Later {
    let units = crate::catalog::Units {
        requested: pricing.records_requested,
        matched: pricing.records_matched,
    };
    if let Some(d) = catalog.deferred(ep, params, view, units) {
        return Later::Deferred(d);
    }
    if ep.deferred_results() && (200..300).contains(&view.status) && !view.truncated {
        if let Ok(body) =
            crate::catalog::decode_body(view.content_encoding, view.body, view.max_decoded)
        {
            return Later::Result(body.into_owned());
        }
    }
    Later::Nothing
}

impl Drop for CallMeter {
    fn drop(&mut self) {
        if self.ctx.is_some() {
            // Abandoned on the way (task cancelled at shutdown, runtime gone): still a row.
            let outcome = if self.status.is_some() {
                Outcome::ClientCancelled
            } else {
                Outcome::UpstreamError
            };
            self.finish(Finish {
                outcome,
                body: Captured::default(),
                response_bytes: 0,
                error: Some("call abandoned before it completed (shutdown)".into()),
            });
        }
    }
}
