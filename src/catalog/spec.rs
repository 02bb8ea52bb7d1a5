//! The catalog file format (TOML) and its validation into a [`Catalog`].
//!
//! ```toml
//! version = "apollo-2026-11"
//! prefixes = ["/api/v1", "/v1", ""]      # patterns are matched under each; "" = host root
//!
//! [[endpoint]]
//! name = "people_match"
//! methods = ["GET", "POST"]
//! paths = ["people/match"]               # `{id}` matches one non-empty segment
//! records_requested = { fixed = 1 }      # or { param_len = "details" }
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
//! ```
//!
//! Unknown keys are rejected. Every error names the file and line, and the endpoint or rule.

use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use super::pattern::Pattern;
use super::rules::{
    to_milli, Basis, Charge, CreditType, FieldPath, RecordsMatched, RecordsRequested,
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
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum RecordsRequestedSpec {
    ParamLen(String),
    Fixed(i64),
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
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

    let version = spec.version.get_ref().trim();
    if version.is_empty() {
        return Err(cx.invalid(
            spec.version.span(),
            "catalog",
            "`version` must not be empty",
        ));
    }
    if spec.prefixes.get_ref().is_empty() {
        return Err(cx.invalid(
            spec.prefixes.span(),
            "catalog",
            "`prefixes` must list at least one prefix (\"\" mounts at the host root)",
        ));
    }
    let prefixes = spec
        .prefixes
        .get_ref()
        .iter()
        .map(|p| Pattern::prefix(p.get_ref()).map_err(|m| cx.invalid(p.span(), "catalog", m)))
        .collect::<Result<Vec<_>, _>>()?;

    let mut endpoints: Vec<Endpoint> = Vec::with_capacity(spec.endpoints.len());
    let mut routes = Vec::new();
    for endpoint_spec in spec.endpoints {
        let name = endpoint_spec.name.get_ref();
        if endpoints.iter().any(|e| e.name == *name) {
            return Err(cx.invalid(
                endpoint_spec.name.span(),
                format!("endpoint `{name}`"),
                "the name is already used by an earlier endpoint; names must be unique",
            ));
        }
        let (endpoint, patterns) = compile_endpoint(&cx, endpoint_spec)?;
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
    })
}

/// Validates one `[[endpoint]]`, returning it with its path patterns (not yet under a prefix).
fn compile_endpoint(
    cx: &Context<'_>,
    spec: EndpointSpec,
) -> Result<(Endpoint, Vec<Pattern>), CatalogError> {
    let name = spec.name.get_ref().clone();
    let subject = format!("endpoint `{name}`");
    let invalid = |span: Range<usize>, problem: String| cx.invalid(span, subject.clone(), problem);

    if name == OTHER {
        return Err(invalid(
            spec.name.span(),
            format!("`{OTHER}` is reserved for calls no endpoint matches"),
        ));
    }
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(invalid(
            spec.name.span(),
            "a name must be lower-case letters, digits and `_` (it becomes a metric label)"
                .to_owned(),
        ));
    }

    if spec.methods.get_ref().is_empty() {
        return Err(invalid(
            spec.methods.span(),
            "`methods` must list at least one HTTP method".to_owned(),
        ));
    }
    let methods = spec
        .methods
        .get_ref()
        .iter()
        .map(|m| {
            let method = m.get_ref();
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
                Err(invalid(
                    m.span(),
                    format!("`{method}` is not an HTTP method"),
                ))
            } else {
                Ok(method.to_ascii_uppercase())
            }
        })
        .collect::<Result<Vec<_>, _>>()?;

    if spec.paths.get_ref().is_empty() {
        return Err(invalid(
            spec.paths.span(),
            "`paths` must list at least one path pattern".to_owned(),
        ));
    }
    let patterns = spec
        .paths
        .get_ref()
        .iter()
        .map(|p| Pattern::parse(p.get_ref()).map_err(|m| invalid(p.span(), m)))
        .collect::<Result<Vec<_>, _>>()?;

    let field =
        |text: &str, span: Range<usize>| FieldPath::parse(text).map_err(|m| invalid(span, m));
    let records_requested = match spec.records_requested {
        None => None,
        Some(r) => Some(match r.get_ref() {
            RecordsRequestedSpec::ParamLen(param) if param.is_empty() => {
                return Err(invalid(
                    r.span(),
                    "`param_len` needs a parameter name".to_owned(),
                ));
            }
            RecordsRequestedSpec::ParamLen(param) => RecordsRequested::ParamLen(param.clone()),
            RecordsRequestedSpec::Fixed(n) if *n < 0 => {
                return Err(invalid(
                    r.span(),
                    format!("`fixed = {n}` must not be negative"),
                ));
            }
            RecordsRequestedSpec::Fixed(n) => RecordsRequested::Fixed(*n),
        }),
    };
    let records_matched = match spec.records_matched {
        None => None,
        Some(r) => Some(match r.get_ref() {
            RecordsMatchedSpec::Present(f) => RecordsMatched::Present(field(f, r.span())?),
            RecordsMatchedSpec::NonnullItems(f) => {
                RecordsMatched::NonnullItems(field(f, r.span())?)
            }
            RecordsMatchedSpec::Items(fs) if fs.is_empty() => {
                return Err(invalid(
                    r.span(),
                    "`items` must list at least one field".to_owned(),
                ));
            }
            RecordsMatchedSpec::Items(fs) => RecordsMatched::Items(
                fs.iter()
                    .map(|f| field(f, r.span()))
                    .collect::<Result<_, _>>()?,
            ),
        }),
    };
    let reported = spec
        .reported
        .map(|r| field(r.get_ref(), r.span()))
        .transpose()?;

    let charges = spec
        .charges
        .into_iter()
        .enumerate()
        .map(|(i, charge)| {
            let span = charge.span();
            compile_charge(charge.into_inner()).map_err(|problem| {
                cx.invalid(span, format!("{subject}, charge {}", i + 1), problem)
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let inspects_body =
        records_matched.is_some() || reported.is_some() || charges.iter().any(Charge::needs_body);
    let endpoint = Endpoint {
        name,
        methods,
        paths: spec
            .paths
            .into_inner()
            .into_iter()
            .map(Spanned::into_inner)
            .collect(),
        records_requested,
        records_matched,
        reported,
        charges,
        inspects_body,
        catalogued: true,
    };
    Ok((endpoint, patterns))
}

/// Validates one `[[endpoint.charge]]`; the error is the problem alone, the caller adds where.
fn compile_charge(spec: ChargeSpec) -> Result<Charge, String> {
    let credits = *spec.credits.get_ref();
    if !(0.0..=MAX_CREDITS).contains(&credits) {
        return Err(format!(
            "`credits = {credits}` must be between 0 and {MAX_CREDITS}"
        ));
    }
    let mut fields = spec
        .field
        .into_iter()
        .chain(spec.fields.into_iter().flatten())
        .map(|f| FieldPath::parse(&f))
        .collect::<Result<Vec<_>, _>>()?;
    if spec.unique_by.is_some() && spec.per != Per::Each {
        return Err("`unique_by` only applies to per = \"each\"".to_owned());
    }
    let basis = match spec.per {
        Per::Success if fields.is_empty() => Basis::Success,
        Per::Success => {
            return Err("per = \"success\" charges every 2xx and takes no `field`".to_owned())
        }
        Per::Present | Per::Each if fields.len() != 1 => {
            let per = if spec.per == Per::Each {
                "each"
            } else {
                "present"
            };
            return Err(format!("per = \"{per}\" needs exactly one `field`"));
        }
        Per::Present => Basis::Present(fields.remove(0)),
        Per::Each => Basis::Each {
            field: fields.remove(0),
            unique_by: spec.unique_by,
        },
        Per::Nonempty if fields.is_empty() => {
            return Err("per = \"nonempty\" needs `fields = [...]` (or one `field`)".to_owned());
        }
        Per::Nonempty => Basis::Nonempty(fields),
    };
    if spec.if_param.as_deref() == Some("") {
        return Err("`if_param` needs a parameter name".to_owned());
    }
    Ok(Charge {
        credit_type: spec.credit_type,
        milli: to_milli(credits),
        basis,
        if_param: spec.if_param,
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
