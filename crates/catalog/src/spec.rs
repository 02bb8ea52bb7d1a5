//! The catalog file format (TOML) and its validation into a [`Catalog`].
//!
//! ```toml
//! version = "apollo-2026-12"
//! prefixes = ["/api/v1", "/v1", ""]      # patterns are matched under each; "" = host root
//! # optional: objects that are no match for `present`, `each` and record counts
//! unmatched = { field = "match_confidence", equals = ["none"], unless_data = ["low"] }
//!
//! [[endpoint]]
//! name = "people_match"
//! methods = ["GET", "POST"]
//! paths = ["people/match"]               # `{id}` matches one non-empty segment
//! records_requested = { fixed = 1 }      # or { param_len = "details", max = 10 },
//!                                        # { param_len = ["details", "domains"] } (first given)
//! records_matched = { present = "person" }  # or { nonnull_items = "matches" }, { items = [...] }
//! reported = "credits_consumed"          # optional: the response's own credit figure
//!
//! [[endpoint.charge]]
//! credit_type = "direct_dial"            # lead | direct_dial | export
//! credits = 8                            # per unit; fractions allowed (kept in thousandths)
//! per = "present"                        # present | each | nonempty | success
//! field = "person"                       # `fields = [...]` for nonempty; none for success
//! if_param = "reveal_phone_number"       # optional: only when the request asks for it
//! # unique_by = "id"                     # optional, `each` only: duplicates count once
//!
//! [endpoint.deferred]                    # optional: what Apollo bills later (deferred.rs)
//! job_id = "request_id"
//! result_reported = "credits_consumed"
//! result_people = "people"
//! [[endpoint.deferred.charge]]
//! param = "reveal_phone_number"
//! credit_type = "direct_dial"
//! per = "matched"                        # matched | requested
//! worst = 8                              # per unit; budgets reserve it until settled
//! estimate = 4                           # per unit, when the result cannot be learned
//! result = "mobile"                      # optional: price a result by its mobile numbers
//!
//! # deferred_results = true              # on an endpoint whose 2xx answers are job results
//! ```
//!
//! Unknown keys are rejected. Every error names the file and line, and the endpoint or rule.

use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use super::pattern::Pattern;
use super::project::Projection;
use super::rules::{
    to_milli, Basis, Charge, CreditType, FieldPath, RecordsMatched, RecordsRequested, Unmatched,
};
use super::{Catalog, CatalogError, Endpoint, Route, OTHER};

/// The largest `credits` one charge may name, per unit: far above any Apollo price, low enough
/// that sums of milli-credits cannot overflow in practice.
const MAX_CREDITS: f64 = 1_000_000.0;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogSpec {
    version: Spanned<String>,
    prefixes: Spanned<Vec<Spanned<String>>>,
    unmatched: Option<Spanned<UnmatchedSpec>>,
    #[serde(default, rename = "endpoint")]
    endpoints: Vec<EndpointSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointSpec {
    name: Spanned<String>,
    methods: Spanned<Vec<Spanned<String>>>,
    paths: Spanned<Vec<Spanned<String>>>,
    records_requested: Option<Spanned<RecordsRequestedSpec>>,
    records_matched: Option<Spanned<RecordsMatchedSpec>>,
    reported: Option<Spanned<String>>,
    #[serde(default, rename = "charge")]
    charges: Vec<Spanned<ChargeSpec>>,
    /// `[endpoint.deferred]`: charges Apollo bills later (see `deferred.rs`).
    deferred: Option<Spanned<super::deferred::DeferredToml>>,
    /// `deferred_results = true`: its 2xx answers are results of deferred jobs.
    #[serde(default)]
    deferred_results: bool,
}

/// `unmatched = { field = "match_confidence", equals = ["none"], unless_data = ["low"] }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnmatchedSpec {
    field: String,
    #[serde(default)]
    equals: Vec<String>,
    #[serde(default)]
    unless_data: Vec<String>,
}

/// `records_requested = { param_len = "details" }`, `{ param_len = ["details", "domains"],
/// max = 10 }` or `{ fixed = 1 }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordsRequestedSpec {
    param_len: Option<ParamNames>,
    fixed: Option<i64>,
    max: Option<i64>,
}

/// One parameter name, or several in order of precedence.
#[derive(Deserialize)]
#[serde(untagged)]
enum ParamNames {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum RecordsMatchedSpec {
    Present(String),
    NonnullItems(String),
    Items(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChargeSpec {
    credit_type: CreditType,
    credits: Spanned<f64>,
    per: Per,
    field: Option<String>,
    fields: Option<Vec<String>>,
    unique_by: Option<String>,
    if_param: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Per {
    Present,
    Each,
    Nonempty,
    Success,
}

/// Parses and validates catalog `text`; `origin` names it in errors.
pub(super) fn parse(text: &str, origin: &str) -> Result<Catalog, CatalogError> {
    let cx = Context { text, origin };
    let spec: CatalogSpec = toml::from_str(text).map_err(|e| CatalogError::Syntax {
        origin: origin.to_owned(),
        line: e.span().map(|span| cx.line(span.start)),
        message: e.message().trim_end().to_owned(),
    })?;
    let fail = |(span, problem)| cx.invalid(span, "catalog", problem);

    let version = spec.version.get_ref().trim();
    if version.is_empty() {
        return Err(fail((
            spec.version.span(),
            "`version` must not be empty".to_owned(),
        )));
    }
    let prefixes = compile_list(
        &spec.prefixes,
        "`prefixes` must list at least one prefix (\"\" mounts at the host root)",
        Pattern::prefix,
    )
    .map_err(fail)?;

    let unmatched = (spec.unmatched.as_ref())
        .map(|u| at(u, unmatched(u.get_ref())))
        .transpose()
        .map_err(fail)?;

    let mut endpoints: Vec<Endpoint> = Vec::with_capacity(spec.endpoints.len());
    let mut routes = Vec::new();
    for endpoint_spec in &spec.endpoints {
        let name = endpoint_spec.name.get_ref();
        if endpoints.iter().any(|e| e.name == *name) {
            return Err(cx.invalid(
                endpoint_spec.name.span(),
                format!("endpoint `{name}`"),
                "the name is already used by an earlier endpoint; names must be unique",
            ));
        }
        let (endpoint, patterns) = compile_endpoint(&cx, endpoint_spec, unmatched.as_ref())?;
        for pattern in &patterns {
            for prefix in &prefixes {
                routes.push(Route {
                    pattern: pattern.under(prefix),
                    endpoint: endpoints.len(),
                });
            }
        }
        endpoints.push(endpoint);
    }
    // Most literal segments first; the sort is stable, so ties keep file order.
    routes.sort_by_key(|route| std::cmp::Reverse(route.pattern.literals()));

    Ok(Catalog {
        version: version.to_owned(),
        endpoints,
        routes,
        other: Endpoint::other(),
        unmatched,
    })
}

/// A problem and the span of the value it is about.
type Spot = (Range<usize>, String);

/// Attaches the span of `value` to a problem with it.
fn at<T, V>(value: &Spanned<V>, result: Result<T, String>) -> Result<T, Spot> {
    result.map_err(|problem| (value.span(), problem))
}

/// Compiles each string of a list that must not be empty.
fn compile_list<T>(
    list: &Spanned<Vec<Spanned<String>>>,
    if_empty: &str,
    compile: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, Spot> {
    if list.get_ref().is_empty() {
        return Err((list.span(), if_empty.to_owned()));
    }
    list.get_ref()
        .iter()
        .map(|item| at(item, compile(item.get_ref())))
        .collect()
}

/// Validates one `[[endpoint]]`, returning it with its path patterns (not yet under a prefix).
fn compile_endpoint(
    cx: &Context<'_>,
    spec: &EndpointSpec,
    unmatched: Option<&Unmatched>,
) -> Result<(Endpoint, Vec<Pattern>), CatalogError> {
    let subject = format!("endpoint `{}`", spec.name.get_ref());
    let fail = |(span, problem)| cx.invalid(span, &subject, problem);

    let name = at(&spec.name, endpoint_name(spec.name.get_ref())).map_err(fail)?;
    let methods = compile_list(
        &spec.methods,
        "`methods` must list at least one HTTP method",
        http_method,
    )
    .map_err(fail)?;
    let patterns = compile_list(
        &spec.paths,
        "`paths` must list at least one path pattern",
        Pattern::parse,
    )
    .map_err(fail)?;
    let records_requested = (spec.records_requested.as_ref())
        .map(|r| at(r, records_requested(r.get_ref())))
        .transpose()
        .map_err(fail)?;
    let records_matched = (spec.records_matched.as_ref())
        .map(|r| at(r, records_matched(r.get_ref())))
        .transpose()
        .map_err(fail)?;
    let reported = (spec.reported.as_ref())
        .map(|r| at(r, FieldPath::parse(r.get_ref())))
        .transpose()
        .map_err(fail)?;
    let charges = (spec.charges.iter().enumerate())
        .map(|(i, charge)| {
            compile_charge(charge.get_ref()).map_err(|problem| {
                cx.invalid(
                    charge.span(),
                    format!("{subject}, charge {}", i + 1),
                    problem,
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let deferred = (spec.deferred.as_ref())
        .map(|d| at(d, super::deferred::compile(d.get_ref())))
        .transpose()
        .map_err(fail)?;
    let inspects_body = records_matched.is_some()
        || reported.is_some()
        || charges.iter().any(Charge::needs_body)
        || deferred.is_some()
        || spec.deferred_results;
    let mut projection = Projection::default();
    charges.iter().for_each(|c| c.project(&mut projection));
    if let Some(r) = &records_matched {
        r.project(&mut projection);
    }
    if let Some(field) = &reported {
        projection.full(field.keys());
    }
    if let Some(u) = unmatched {
        projection.unmatched(&u.field);
    }
    let endpoint = Endpoint {
        name,
        methods,
        paths: spec
            .paths
            .get_ref()
            .iter()
            .map(|p| p.get_ref().clone())
            .collect(),
        records_requested,
        records_matched,
        reported,
        charges,
        inspects_body,
        projection,
        catalogued: true,
        deferred,
        deferred_results: spec.deferred_results,
        unmatched: unmatched.cloned(),
    };
    Ok((endpoint, patterns))
}

fn endpoint_name(name: &str) -> Result<String, String> {
    if name == OTHER {
        return Err(format!(
            "`{OTHER}` is reserved for calls no endpoint matches"
        ));
    }
    let label_byte = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    if name.is_empty() || !name.bytes().all(label_byte) {
        return Err(
            "a name must be lower-case letters, digits and `_` (it becomes a metric label)"
                .to_owned(),
        );
    }
    Ok(name.to_owned())
}

/// An HTTP method, upper-cased.
fn http_method(method: &str) -> Result<String, String> {
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(format!("`{method}` is not an HTTP method"));
    }
    Ok(method.to_ascii_uppercase())
}

fn records_requested(spec: &RecordsRequestedSpec) -> Result<RecordsRequested, String> {
    match (&spec.param_len, spec.fixed, spec.max) {
        (Some(names), None, max) => {
            let params = match names {
                ParamNames::One(name) => vec![name.clone()],
                ParamNames::Many(names) => names.clone(),
            };
            if params.is_empty() || params.iter().any(String::is_empty) {
                return Err("`param_len` needs a parameter name (or a list of them)".to_owned());
            }
            if let Some(max) = max.filter(|m| *m < 0) {
                return Err(format!("`max = {max}` must not be negative"));
            }
            Ok(RecordsRequested::ParamLen { params, max })
        }
        (None, Some(n), None) if n < 0 => Err(format!("`fixed = {n}` must not be negative")),
        (None, Some(n), None) => Ok(RecordsRequested::Fixed(n)),
        (None, Some(_), Some(_)) => Err("`max` only applies to `param_len`".to_owned()),
        (Some(_), Some(_), _) => Err("give either `param_len` or `fixed`, not both".to_owned()),
        (None, None, _) => {
            Err("`records_requested` needs `param_len = \"details\"` or `fixed = 1`".to_owned())
        }
    }
}

fn unmatched(spec: &UnmatchedSpec) -> Result<Unmatched, String> {
    if spec.field.is_empty() || spec.field.contains('.') {
        return Err(format!(
            "`unmatched.field = \"{}\"` must be one key of the object, like \"match_confidence\"",
            spec.field
        ));
    }
    if spec.equals.is_empty() && spec.unless_data.is_empty() {
        return Err(
            "`unmatched` needs `equals = [...]` (values that are no match) or `unless_data = [...]` (no match unless the object carries data)"
                .to_owned(),
        );
    }
    if let Some(both) = spec.equals.iter().find(|v| spec.unless_data.contains(v)) {
        return Err(format!(
            "`unmatched`: \"{both}\" is in both `equals` and `unless_data`; give it once"
        ));
    }
    Ok(Unmatched {
        field: spec.field.clone(),
        equals: spec.equals.clone(),
        unless_data: spec.unless_data.clone(),
    })
}

fn records_matched(spec: &RecordsMatchedSpec) -> Result<RecordsMatched, String> {
    match spec {
        RecordsMatchedSpec::Present(field) => FieldPath::parse(field).map(RecordsMatched::Present),
        RecordsMatchedSpec::NonnullItems(field) => {
            FieldPath::parse(field).map(RecordsMatched::NonnullItems)
        }
        RecordsMatchedSpec::Items(fields) if fields.is_empty() => {
            Err("`items` must list at least one field".to_owned())
        }
        RecordsMatchedSpec::Items(fields) => fields
            .iter()
            .map(|f| FieldPath::parse(f))
            .collect::<Result<_, _>>()
            .map(RecordsMatched::Items),
    }
}

/// Validates one `[[endpoint.charge]]`.
fn compile_charge(spec: &ChargeSpec) -> Result<Charge, String> {
    let credits = *spec.credits.get_ref();
    if !(0.0..=MAX_CREDITS).contains(&credits) {
        return Err(format!(
            "`credits = {credits}` must be between 0 and {MAX_CREDITS}"
        ));
    }
    if spec.unique_by.is_some() && spec.per != Per::Each {
        return Err("`unique_by` only applies to per = \"each\"".to_owned());
    }
    if spec.if_param.as_deref() == Some("") {
        return Err("`if_param` needs a parameter name".to_owned());
    }
    let fields = (spec.field.iter().chain(spec.fields.iter().flatten()))
        .map(|f| FieldPath::parse(f))
        .collect::<Result<Vec<_>, _>>()?;
    let one_field = |per: &str| {
        <[FieldPath; 1]>::try_from(fields.clone())
            .map(|[field]| field)
            .map_err(|_| format!("per = \"{per}\" needs exactly one `field`"))
    };
    let basis = match spec.per {
        Per::Success if fields.is_empty() => Basis::Success,
        Per::Success => {
            return Err("per = \"success\" charges every 2xx and takes no `field`".to_owned());
        }
        Per::Present => Basis::Present(one_field("present")?),
        Per::Each => Basis::Each {
            field: one_field("each")?,
            unique_by: spec.unique_by.clone(),
        },
        Per::Nonempty if fields.is_empty() => {
            return Err("per = \"nonempty\" needs `fields = [...]` (or one `field`)".to_owned());
        }
        Per::Nonempty => Basis::Nonempty(fields),
    };
    Ok(Charge {
        credit_type: spec.credit_type,
        milli: to_milli(credits),
        basis,
        if_param: spec.if_param.clone(),
    })
}

/// The text being parsed and its name, for errors.
struct Context<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Context<'_> {
    /// The 1-based line of a byte offset.
    fn line(&self, offset: usize) -> usize {
        let before = self
            .text
            .as_bytes()
            .get(..offset)
            .unwrap_or(self.text.as_bytes());
        before.iter().filter(|&&b| b == b'\n').count() + 1
    }

    fn invalid(
        &self,
        span: Range<usize>,
        subject: impl Into<String>,
        problem: impl Into<String>,
    ) -> CatalogError {
        CatalogError::Invalid {
            origin: self.origin.to_owned(),
            line: self.line(span.start),
            subject: subject.into(),
            problem: problem.into(),
        }
    }
}
