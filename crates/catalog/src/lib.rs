//! The pricing catalog: which Apollo endpoint a call hit and what it cost.
//!
//! A [`Catalog`] is loaded once from TOML: the built-in `config/apollo-catalog.toml`, or a
//! file named by `catalog.path` (the format is described in `spec.rs` and in the built-in
//! file). For each proxied call the proxy [`classify`](Catalog::classify)s method and path
//! into an [`Endpoint`], parses the request's [`RequestParams`], copies the response body if
//! the endpoint [`inspects_body`](Endpoint::inspects_body), and at the end of the body asks
//! for its [`price`](Catalog::price): credits by type in thousandths, where the figure came
//! from, and record counts. Nothing here knows about sockets or HTTP libraries.

mod decode;
mod deferred;
pub mod headers;
mod identity;
mod params;
mod pattern;
mod pricing;
mod project;
#[cfg(test)]
mod proptests;
mod rules;
mod spec;
#[cfg(test)]
mod testutil;

use std::fmt;
use std::path::{Path, PathBuf};

pub use decode::{decode_body, DecodeError};
pub use deferred::{Deferred, DeferredSpec, ResultPricing, SettlementSource, TypedMilli, Units};
pub use identity::{normal_domain, normal_linkedin, Identifier, MAX_ITEMS};
pub use params::{RequestBody, RequestParams};
pub use pattern::canonical_path;
pub use pricing::{CreditSource, Credits, Pricing, ResponseView};

use pattern::Pattern;
use project::Projection;
use rules::{Charge, FieldPath, RecordsMatched, RecordsRequested, Unmatched};

/// The built-in Apollo catalog.
const BUILTIN_TOML: &str = include_str!("../../../config/apollo-catalog.toml");

/// How the built-in catalog is named in errors.
const BUILTIN_ORIGIN: &str = "<built-in apollo-catalog.toml>";

/// The endpoint name of calls no catalog entry matches.
const OTHER: &str = "other";

/// The endpoint name of calls no catalog entry matches (`other`), as the ledger and metrics
/// record it.
pub const OTHER_ENDPOINT: &str = OTHER;

/// A loaded, validated catalog. Immutable, `Send + Sync`; share it in an `Arc`.
#[derive(Debug)]
pub struct Catalog {
    version: String,
    /// In file order.
    endpoints: Vec<Endpoint>,
    /// Every endpoint path under every prefix, most specific first.
    routes: Vec<Route>,
    other: Endpoint,
    /// The `unmatched` rule every endpoint applies, if any.
    unmatched: Option<Unmatched>,
}

/// One path pattern, under one prefix, leading to an endpoint.
#[derive(Debug)]
struct Route {
    pattern: Pattern,
    /// Index into `Catalog::endpoints`.
    endpoint: usize,
}

impl Catalog {
    /// The built-in Apollo catalog (`config/apollo-catalog.toml`, compiled in).
    pub fn builtin() -> Catalog {
        // The embedded text is a constant that `tests::builtin_catalog_parses` checks, so the
        // fallback (every call priced as `other`) is unreachable in a tested build.
        Catalog::from_toml(BUILTIN_TOML, BUILTIN_ORIGIN).unwrap_or_else(|_| Catalog {
            version: "invalid-builtin".to_owned(),
            endpoints: Vec::new(),
            routes: Vec::new(),
            other: Endpoint::other(),
            unmatched: None,
        })
    }

    /// Parses and validates a catalog. `origin` (usually the file path) names it in errors.
    ///
    /// # Errors
    /// [`CatalogError::Syntax`] for TOML that is malformed or not the catalog's shape,
    /// [`CatalogError::Invalid`] for a rule that does not make sense.
    pub fn from_toml(text: &str, origin: &str) -> Result<Catalog, CatalogError> {
        spec::parse(text, origin)
    }

    /// Reads and parses a catalog file.
    ///
    /// # Errors
    /// [`CatalogError::Read`] if the file cannot be read, else as [`from_toml`](Self::from_toml).
    pub fn load(path: &Path) -> Result<Catalog, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Read {
            path: path.to_owned(),
            source,
        })?;
        Catalog::from_toml(&text, &path.display().to_string())
    }

    /// The catalog's `version`, recorded with every ledger row (`catalog_version`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// For `check-config`: the catalog's `unmatched` rule in words, if it has one.
    pub fn unmatched_rule(&self) -> Option<String> {
        self.unmatched.as_ref().map(ToString::to_string)
    }

    /// The catalogued endpoints in file order (without the implicit `other`).
    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.iter()
    }

    /// The endpoint for a call. `path` is the request path without its query string, taken in
    /// its [`canonical_path`] form (repeated slashes collapsed, escaped unreserved characters
    /// decoded, as Apollo's router reads it); one trailing `/` is ignored and the method is
    /// compared case-insensitively. When several
    /// endpoints match, the pattern with the most literal segments wins (`people/match` over
    /// `people/{id}`), then the earlier one in the file. No match gives the `other` endpoint,
    /// which charges nothing. Does not allocate unless the path needs canonicalising.
    pub fn classify(&self, method: &str, path: &str) -> &Endpoint {
        self.endpoint(self.classify_id(method, path))
    }

    /// Like [`classify`](Self::classify), but returns a copyable id to keep with a call across
    /// tasks; [`endpoint`](Self::endpoint) turns it back into the endpoint.
    pub fn classify_id(&self, method: &str, path: &str) -> EndpointId {
        let path = canonical_path(path);
        let segments = pattern::segments(&path);
        self.routes
            .iter()
            .filter(|route| route.pattern.matches(segments.clone()))
            .find(|route| {
                self.endpoints
                    .get(route.endpoint)
                    .is_some_and(|ep| ep.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
            })
            .map_or(EndpointId(usize::MAX), |route| EndpointId(route.endpoint))
    }

    /// The endpoint an id from [`classify_id`](Self::classify_id) names (`other` if none).
    pub fn endpoint(&self, id: EndpointId) -> &Endpoint {
        self.endpoints.get(id.0).unwrap_or(&self.other)
    }

    /// Prices a finished call to `ep` (as returned by [`classify`](Self::classify)).
    ///
    /// Non-2xx responses and the `other` endpoint cost 0 with source [`CreditSource::None`].
    /// A 2xx on a catalogued endpoint is priced by its rules (source `Catalog`, even at 0),
    /// unless the response reports its own figure (source `Reported`). Never panics, whatever
    /// the bytes; what could not be read is explained in [`Pricing::note`].
    pub fn price(&self, ep: &Endpoint, req: &RequestParams, resp: &ResponseView<'_>) -> Pricing {
        pricing::price(ep, req, resp)
    }

    /// What a finished call to `ep` left for Apollo to bill later (its `[endpoint.deferred]`),
    /// given the record counts its pricing found. `None` when nothing is deferred: no
    /// parameter that starts a job, a non-2xx answer, or an answer that matched nobody.
    pub fn deferred(
        &self,
        ep: &Endpoint,
        req: &RequestParams,
        resp: &ResponseView<'_>,
        units: Units,
    ) -> Option<Deferred> {
        ep.deferred.as_ref()?.deferred(req, resp, units)
    }

    /// Prices the result of a job started by a call to the endpoint named `endpoint` with
    /// `params` (from its [`Deferred`]); `body` is the decoded result answer. `None` when this
    /// catalog has no `[endpoint.deferred]` for that endpoint; `Err` when the body is not a
    /// result it can read.
    pub fn price_result(
        &self,
        endpoint: &str,
        params: &[String],
        units: Units,
        body: &[u8],
    ) -> Option<Result<ResultPricing, String>> {
        let spec = self.endpoints.iter().find(|e| e.name == endpoint)?;
        Some(spec.deferred.as_ref()?.price_result(params, units, body))
    }

    /// The job id a result answer (`webhook_result`'s 2xx body) names in its `request_id`.
    pub fn result_job_id(body: &[u8]) -> Option<String> {
        deferred::result_job_id(body)
    }
}

/// Names an endpoint of one [`Catalog`]; `other` when no entry matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointId(usize);

/// A named Apollo endpoint and its pricing rules.
#[derive(Debug)]
pub struct Endpoint {
    name: String,
    /// Upper-case.
    methods: Vec<String>,
    /// Path patterns as written in the catalog, relative to the prefixes.
    paths: Vec<String>,
    records_requested: Option<RecordsRequested>,
    records_matched: Option<RecordsMatched>,
    reported: Option<FieldPath>,
    charges: Vec<Charge>,
    inspects_body: bool,
    /// What pricing reads of a response body, compiled from the rules above.
    projection: Projection,
    /// False only for `other`.
    catalogued: bool,
    /// `[endpoint.deferred]`: what Apollo bills later, when the call's job ends.
    deferred: Option<DeferredSpec>,
    /// `deferred_results = true`: its 2xx answers are job results (`webhook_result`).
    deferred_results: bool,
    /// The catalog's `unmatched` rule: objects that are no match for its rules.
    unmatched: Option<Unmatched>,
}

impl Endpoint {
    fn other() -> Endpoint {
        Endpoint {
            name: OTHER.to_owned(),
            methods: Vec::new(),
            paths: Vec::new(),
            records_requested: None,
            records_matched: None,
            reported: None,
            charges: Vec::new(),
            inspects_body: false,
            projection: Projection::default(),
            catalogued: false,
            deferred: None,
            deferred_results: false,
            unmatched: None,
        }
    }

    /// Its `[endpoint.deferred]`, if Apollo bills part of its calls later.
    pub fn deferred(&self) -> Option<&DeferredSpec> {
        self.deferred.as_ref()
    }

    /// True when its 2xx answers are results of deferred jobs (`webhook_result`), to be handed
    /// to the settler.
    pub fn deferred_results(&self) -> bool {
        self.deferred_results
    }

    /// The deferred worst case of a request (zero when it starts no job); `None` when it starts
    /// one whose record count is unknown.
    fn deferred_worst(&self, req: &RequestParams, records: Option<i64>) -> Option<Credits> {
        match &self.deferred {
            Some(d) if d.applies(req) => d.worst(req, records),
            _ => Some(Credits::default()),
        }
    }

    /// The endpoint name (`people_match`, …, or `other`), as used in the ledger and metrics.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The HTTP methods it answers, upper-case.
    pub fn methods(&self) -> &[String] {
        &self.methods
    }

    /// Its path patterns as written in the catalog (relative to the prefixes).
    pub fn paths(&self) -> &[String] {
        &self.paths
    }

    /// True when a charge depends on a request parameter (`if_param`), so a request whose
    /// body cannot be read must be priced at its worst case.
    pub fn reads_params(&self) -> bool {
        self.charges.iter().any(|c| c.if_param.is_some()) || self.deferred.is_some()
    }

    /// True when pricing or record counting reads the response body; the proxy copies the
    /// body only then.
    pub fn inspects_body(&self) -> bool {
        self.inspects_body
    }

    /// The most this request can cost, in milli-credits, by the catalog's rules (a figure the
    /// response reports itself may differ), for budget reservations and for pricing a call
    /// whose answer could not be read, including what its asynchronous job may bill later
    /// (`[endpoint.deferred]`). An `each` charge is bounded by the endpoint's
    /// `records_requested` (its count, capped by its `max`; `max` when the count is unknown).
    /// A request whose body could not be read is assumed to have set every `if_param`. `None`
    /// when there is no bound: the `other` endpoint, or an `each` charge whose record count
    /// neither the request nor a `max` gives.
    pub fn worst_case_milli(&self, req: &RequestParams) -> Option<i64> {
        if !self.catalogued {
            return None;
        }
        let records = self.records_requested.as_ref().and_then(|r| r.bound(req));
        let later = self.deferred_worst(req, records)?.total_milli();
        self.charges
            .iter()
            .filter(|charge| charge.applies(req))
            .try_fold(later, |sum, charge| {
                Some(sum.saturating_add(charge.max_milli(records)?))
            })
    }

    /// [`worst_case_milli`](Self::worst_case_milli) by credit type, for budgets that limit one
    /// type. `None` under the same conditions.
    pub fn worst_case(&self, req: &RequestParams) -> Option<Credits> {
        self.worst_of(req, true)
    }

    /// The worst case of what the answer itself bills, without what a job bills later: what a
    /// 2xx whose answer could not be read is priced at on its own row (its deferred part, if
    /// any, is recorded as a settlement of its own, so it is not counted twice).
    pub fn synchronous_worst_case(&self, req: &RequestParams) -> Option<Credits> {
        self.worst_of(req, false)
    }

    fn worst_of(&self, req: &RequestParams, with_deferred: bool) -> Option<Credits> {
        if !self.catalogued {
            return None;
        }
        let records = self.records_requested.as_ref().and_then(|r| r.bound(req));
        // What the job bills later counts too: budgets keep it reserved until it settles.
        let mut credits = if with_deferred {
            self.deferred_worst(req, records)?
        } else {
            Credits::default()
        };
        for charge in self.charges.iter().filter(|charge| charge.applies(req)) {
            let milli = charge.max_milli(records)?;
            let slot = match charge.credit_type {
                rules::CreditType::Lead => &mut credits.lead_milli,
                rules::CreditType::DirectDial => &mut credits.direct_dial_milli,
                rules::CreditType::Export => &mut credits.export_milli,
            };
            *slot = slot.saturating_add(milli);
        }
        Some(credits)
    }
}

/// One line for `check-config`, such as
/// ```text
/// people_match  GET|POST people/match: 1 lead if `person` is present; …
/// ```
impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}  {} {}: ",
            self.name,
            self.methods.join("|"),
            self.paths.join(", ")
        )?;
        if self.charges.is_empty() {
            f.write_str("free")?;
        }
        for (i, charge) in self.charges.iter().enumerate() {
            write!(f, "{}{charge}", if i == 0 { "" } else { "; " })?;
        }
        if let Some(field) = &self.reported {
            write!(f, " (or the reported `{field}`)")?;
        }
        if let Some(d) = &self.deferred {
            write!(f, "; {d}")?;
        }
        Ok(())
    }
}

/// Why a catalog could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The file could not be read.
    #[error("cannot read catalog {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, or not the catalog's shape (unknown key, wrong type, unknown credit
    /// type). The message is toml's own; the line is where toml places the problem.
    #[error("{origin}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Syntax {
        /// The file (or other origin) given to [`Catalog::from_toml`].
        origin: String,
        /// 1-based line, when toml gives one.
        line: Option<usize>,
        /// toml's message.
        message: String,
    },
    /// Well-formed, but a rule does not make sense (bad pattern, duplicate name, a `per`
    /// without its `field`, …). `subject` names the endpoint or rule.
    #[error("{origin}:{line}: {subject}: {problem}")]
    Invalid {
        /// The file (or other origin) given to [`Catalog::from_toml`].
        origin: String,
        /// 1-based line of the offending value.
        line: usize,
        /// The endpoint or rule at fault, e.g. "endpoint `people_match`, charge 2".
        subject: String,
        /// What is wrong, and how to fix it.
        problem: String,
    },
}

// The proxy shares one catalog across connection tasks in an `Arc`.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Catalog>();
};

#[cfg(test)]
mod tests;
