//! Deferred charges: what Apollo bills after the answer, when an asynchronous job ends.
//!
//! Phone reveals (`reveal_phone_number`) and waterfall enrichment (`run_waterfall_email`,
//! `run_waterfall_phone`) on people/match and people/bulk_match run as a job. The synchronous
//! answer bills only its own part and carries the job's id (`request_id`); the job bills later
//! (+8 direct_dial per person whose mobile was found; vendor lookups for waterfalls), and its
//! outcome can be polled, free, at `webhook_result/{request_id}`.
//!
//! An endpoint's `[endpoint.deferred]` table says which parameters start a job, where the job
//! id is, the worst case and the estimate per record for each parameter, and how a result
//! payload is priced. From it the catalog gives:
//! - [`DeferredSpec::worst`]: the most a request's job can bill, for budget admission;
//! - [`Catalog::deferred`](super::Catalog::deferred): what a finished call left to come
//!   ([`Deferred`], stored as JSON in the ledger's `deferred` column);
//! - [`Catalog::price_result`](super::Catalog::price_result): the price of a job's result.
//!
//! ```toml
//! [endpoint.deferred]
//! job_id = "request_id"                  # the sync answer's field holding Apollo's job id
//! # the result's own figure (wins when it is a number), and its array of people (priced
//! # otherwise); a list is tried in order, the first field present wins
//! result_reported = ["webhook_result.credits_consumed", "credits_consumed"]
//! result_people = ["webhook_result.people", "people"]
//!
//! [[endpoint.deferred.charge]]
//! param = "reveal_phone_number"          # the request parameter that starts this part
//! credit_type = "direct_dial"
//! per = "matched"                        # matched: per record the sync answer matched;
//!                                        # requested: per record asked for
//! worst = 8                              # credits per unit at most (budgets reserve this)
//! estimate = 4                           # credits per unit when the result cannot be learned
//! result = "mobile"                      # optional: price a result at `worst` per `people`
//!                                        # entry with a `phone_numbers` item of type_cd mobile
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::decode::decode_body;
use super::params::RequestParams;
use super::pricing::{Credits, ResponseView};
use super::rules::{reported_milli, to_milli, CreditType, FieldPath, Milli};

/// The largest per-unit figure a deferred charge may name (as for charges).
const MAX_CREDITS: f64 = 1_000_000.0;

/// `[endpoint.deferred]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeferredToml {
    job_id: String,
    result_reported: Option<OneOrMany>,
    result_people: Option<OneOrMany>,
    #[serde(default, rename = "charge")]
    charges: Vec<DeferredChargeToml>,
}

/// A field path, or several tried in order (the first present wins).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn paths(&self) -> Result<Vec<FieldPath>, String> {
        let list = match self {
            OneOrMany::One(p) => std::slice::from_ref(p),
            OneOrMany::Many(ps) => ps.as_slice(),
        };
        if list.is_empty() {
            return Err("a result field list must name at least one field".into());
        }
        list.iter().map(|p| FieldPath::parse(p)).collect()
    }
}

/// The first of `paths` present (and not null) in `body`.
fn first<'a>(paths: &[FieldPath], body: &'a Map<String, Value>) -> Option<(&'a Value, usize)> {
    paths
        .iter()
        .enumerate()
        .find_map(|(i, p)| p.lookup(body).filter(|v| !v.is_null()).map(|v| (v, i)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeferredChargeToml {
    param: String,
    credit_type: CreditType,
    per: Per,
    worst: f64,
    estimate: f64,
    result: Option<ResultRule>,
}

/// What one unit of a deferred charge is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Per {
    /// A record the synchronous answer matched (a phone is looked up only for a known person).
    Matched,
    /// A record the request asked for (waterfall vendors may bill a lookup that finds nothing).
    Requested,
}

/// How a result payload prices a deferred charge when it reports no figure of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ResultRule {
    /// `worst` per entry of `result_people` with a `phone_numbers` item whose `type_cd` is
    /// `mobile` (Apollo bills a reveal only when a mobile number is returned).
    Mobile,
}

/// A compiled `[endpoint.deferred]`.
#[derive(Debug, Clone)]
pub struct DeferredSpec {
    job_id: FieldPath,
    /// Tried in order; empty: results report no figure.
    result_reported: Vec<FieldPath>,
    /// Tried in order.
    result_people: Vec<FieldPath>,
    charges: Vec<DeferredCharge>,
}

#[derive(Debug, Clone)]
struct DeferredCharge {
    param: String,
    credit_type: CreditType,
    per: Per,
    worst_milli: i64,
    estimate_milli: i64,
    result: Option<ResultRule>,
}

/// What a finished call left for Apollo to bill later: the ledger's `deferred` JSON,
/// `{"job_id":"-4211","worst":{"lead":0,"direct_dial":8000,"export":0},"estimate":{...},
/// "params":["reveal_phone_number"]}` (milli-credits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deferred {
    /// Apollo's job id (`request_id` of the synchronous answer), as a string; `None` when the
    /// answer gave none (the charge cannot be learned and is settled at once).
    pub job_id: Option<String>,
    /// The most the job can bill.
    pub worst: TypedMilli,
    /// What is recorded when the job's result cannot be learned.
    pub estimate: TypedMilli,
    /// The parameters that started the job.
    pub params: Vec<String>,
    /// Why the figures are guesses from the start (the sync answer could not be read), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Milli-credits by type, as the `deferred` JSON spells them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypedMilli {
    pub lead: i64,
    pub direct_dial: i64,
    pub export: i64,
}

impl From<Credits> for TypedMilli {
    fn from(c: Credits) -> Self {
        TypedMilli {
            lead: c.lead_milli,
            direct_dial: c.direct_dial_milli,
            export: c.export_milli,
        }
    }
}

impl From<TypedMilli> for Credits {
    fn from(t: TypedMilli) -> Self {
        Credits {
            lead_milli: t.lead,
            direct_dial_milli: t.direct_dial,
            export_milli: t.export,
        }
    }
}

impl Deferred {
    /// The ledger's `deferred` column.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads the ledger's `deferred` column back.
    pub fn from_json(text: &str) -> Result<Deferred, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// `deferred_milli`: the worst case, all types together.
    pub fn worst_milli(&self) -> i64 {
        Credits::from(self.worst).total_milli()
    }
}

/// Where a settlement's figure came from (the ledger's `credit_source` of settlement rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettlementSource {
    /// The result's own `credits_consumed`.
    Reported,
    /// The catalog applied to the result payload.
    Catalog,
    /// The catalog's estimate: the result could not be learned (or priced).
    Estimated,
}

impl SettlementSource {
    /// `reported`, `catalog` or `estimated`.
    pub fn as_str(self) -> &'static str {
        match self {
            SettlementSource::Reported => "reported",
            SettlementSource::Catalog => "catalog",
            SettlementSource::Estimated => "estimated",
        }
    }
}

/// The price of a job's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultPricing {
    pub credits: Credits,
    pub source: SettlementSource,
    /// Why part of it is an estimate, if it is.
    pub note: Option<String>,
}

/// Record counts of the original call: what `per` units are counted from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Units {
    pub requested: Option<i64>,
    pub matched: Option<i64>,
}

impl DeferredSpec {
    fn applicable<'a>(
        &'a self,
        req: &'a RequestParams,
    ) -> impl Iterator<Item = &'a DeferredCharge> + 'a {
        self.charges
            .iter()
            .filter(move |c| req.may_be_set(&c.param))
    }

    fn applicable_params<'a>(
        &'a self,
        params: &'a [String],
    ) -> impl Iterator<Item = &'a DeferredCharge> + 'a {
        self.charges
            .iter()
            .filter(move |c| params.contains(&c.param))
    }

    /// Whether the request starts a job (one of the parameters is set).
    pub fn applies(&self, req: &RequestParams) -> bool {
        self.applicable(req).next().is_some()
    }

    /// The most the job of a request asking for `requested` records can bill (every record
    /// matched). `None` when the request starts a job but its record count is unknown.
    pub fn worst(&self, req: &RequestParams, requested: Option<i64>) -> Option<Credits> {
        let mut credits = Credits::default();
        for c in self.applicable(req) {
            add(
                &mut credits,
                c.credit_type,
                c.worst_milli.saturating_mul(requested?),
            );
        }
        Some(credits)
    }

    fn totals(
        &self,
        charges: impl Iterator<Item = DeferredCharge>,
        units: Units,
        figure: impl Fn(&DeferredCharge) -> i64,
    ) -> Credits {
        let mut credits = Credits::default();
        for c in charges {
            let n = match c.per {
                Per::Matched => units.matched.or(units.requested),
                Per::Requested => units.requested.or(units.matched),
            }
            .unwrap_or(1)
            .max(0);
            add(&mut credits, c.credit_type, figure(&c).saturating_mul(n));
        }
        credits
    }

    /// What a finished 2xx call left to come, or `None` when it starts no job (no parameter
    /// set, or a readable answer that matched nobody: no person, no job billed).
    pub(super) fn deferred(
        &self,
        req: &RequestParams,
        resp: &ResponseView<'_>,
        units: Units,
    ) -> Option<Deferred> {
        if !(200..300).contains(&resp.status) {
            return None;
        }
        let charges: Vec<DeferredCharge> = self.applicable(req).cloned().collect();
        if charges.is_empty() {
            return None;
        }
        let params = charges.iter().map(|c| c.param.clone()).collect();
        let body = read_object(resp);
        let (job_id, matched, note) = match &body {
            Ok(body) => (
                self.job_id.lookup(body).and_then(job_id_text),
                units.matched,
                None,
            ),
            Err(e) => (None, None, Some(e.clone())),
        };
        if matched == Some(0) {
            return None;
        }
        let units = Units {
            requested: units.requested,
            matched,
        };
        let worst = self.totals(charges.iter().cloned(), units, |c| c.worst_milli);
        // An answer we could not read may still have started a job: assume the worst.
        let estimate = if note.is_some() {
            worst
        } else {
            self.totals(charges.into_iter(), units, |c| c.estimate_milli)
        };
        Some(Deferred {
            job_id,
            worst: worst.into(),
            estimate: estimate.into(),
            params,
            note,
        })
    }

    /// Prices a job's result body (already decoded JSON bytes): the reported figure when it is
    /// a number; else each charge by its `result` rule, or at its estimate when it has none.
    pub(super) fn price_result(
        &self,
        params: &[String],
        units: Units,
        body: &[u8],
    ) -> Result<ResultPricing, String> {
        let body: Map<String, Value> = match serde_json::from_slice(body) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err("the result is not a JSON object".to_owned()),
            Err(e) => return Err(format!("the result is not JSON: {e}")),
        };
        let people = match first(&self.result_people, &body) {
            Some((Value::Array(items), _)) => items.as_slice(),
            _ => &[],
        };
        let mobiles =
            i64::try_from(people.iter().filter(|p| has_mobile(p)).count()).unwrap_or(i64::MAX);
        // The catalog's own count: the guide for splitting a reported total by type.
        let mut catalog = Credits::default();
        let mut guessed: Vec<&str> = Vec::new();
        let mut rest_type = None;
        for c in self.applicable_params(params) {
            match c.result {
                Some(ResultRule::Mobile) => {
                    add(
                        &mut catalog,
                        c.credit_type,
                        c.worst_milli.saturating_mul(mobiles),
                    );
                }
                None => {
                    rest_type.get_or_insert(c.credit_type);
                    guessed.push(&c.param);
                    let one = std::iter::once(c.clone());
                    let est = self.totals(one, units, |c| c.estimate_milli);
                    catalog = sum(catalog, est);
                }
            }
        }
        if let Some(field) =
            first(&self.result_reported, &body).map(|(_, i)| &self.result_reported[i])
        {
            if let Ok(Some(total)) = reported_milli(field, &body) {
                let rest_type = rest_type
                    .or_else(|| self.applicable_params(params).next().map(|c| c.credit_type))
                    .unwrap_or(CreditType::Lead);
                return Ok(ResultPricing {
                    credits: split(total, rest_type, self, params, mobiles),
                    source: SettlementSource::Reported,
                    note: None,
                });
            }
        }
        if guessed.is_empty() {
            return Ok(ResultPricing {
                credits: catalog,
                source: SettlementSource::Catalog,
                note: None,
            });
        }
        Ok(ResultPricing {
            credits: catalog,
            source: SettlementSource::Estimated,
            note: Some(format!(
                "the result reports no credits_consumed, so {} is priced at the catalog's estimate",
                guessed.join(", ")
            )),
        })
    }
}

/// Splits a reported total: the mobile parts first (up to what the payload shows), the rest
/// to the credit type of the parts the payload cannot price (or of the first part).
fn split(
    total: i64,
    rest_type: CreditType,
    spec: &DeferredSpec,
    params: &[String],
    mobiles: i64,
) -> Credits {
    let mut out = Credits::default();
    let mut left = total;
    for c in spec.applicable_params(params) {
        if c.result == Some(ResultRule::Mobile) {
            let part = c.worst_milli.saturating_mul(mobiles).min(left);
            add(&mut out, c.credit_type, part);
            left -= part;
        }
    }
    add(&mut out, rest_type, left);
    out
}

fn sum(a: Credits, b: Credits) -> Credits {
    Credits {
        lead_milli: a.lead_milli.saturating_add(b.lead_milli),
        direct_dial_milli: a.direct_dial_milli.saturating_add(b.direct_dial_milli),
        export_milli: a.export_milli.saturating_add(b.export_milli),
    }
}

fn add(credits: &mut Credits, t: CreditType, milli: i64) {
    let slot = match t {
        CreditType::Lead => &mut credits.lead_milli,
        CreditType::DirectDial => &mut credits.direct_dial_milli,
        CreditType::Export => &mut credits.export_milli,
    };
    *slot = slot.saturating_add(milli);
}

/// Whether a result's person has a mobile number: a `phone_numbers` item with `type_cd`
/// `mobile`.
fn has_mobile(person: &Value) -> bool {
    person
        .get("phone_numbers")
        .and_then(Value::as_array)
        .is_some_and(|numbers| {
            numbers
                .iter()
                .any(|n| n.get("type_cd").and_then(Value::as_str) == Some("mobile"))
        })
}

/// A job id as text: Apollo's is a signed 64-bit integer (often negative), sent as a number
/// or a string. Anything else is no job id: it goes into the path creditmeter polls, so it must
/// never be able to name another path (`../people/match`) that a master key would be billed for.
fn job_id_text(v: &Value) -> Option<String> {
    let id = match v {
        Value::Number(n) => n.as_i64()?,
        Value::String(s) => s.trim().parse::<i64>().ok()?,
        _ => return None,
    };
    Some(id.to_string())
}

/// The response's top-level object, decoded, or why it cannot be read.
fn read_object(resp: &ResponseView<'_>) -> Result<Map<String, Value>, String> {
    if resp.truncated {
        return Err("the answer was incomplete, so the job id and matches are unknown".into());
    }
    let decoded = decode_body(resp.content_encoding, resp.body, resp.max_decoded)
        .map_err(|e| format!("the answer could not be decoded ({e})"))?;
    match serde_json::from_slice(&decoded) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err("the answer is not a JSON object, so the job id is unknown".into()),
    }
}

/// Compiles `[endpoint.deferred]`.
pub(super) fn compile(spec: &DeferredToml) -> Result<DeferredSpec, String> {
    if spec.charges.is_empty() {
        return Err(
            "`[endpoint.deferred]` needs at least one `[[endpoint.deferred.charge]]`".into(),
        );
    }
    let mut charges = Vec::with_capacity(spec.charges.len());
    for (i, c) in spec.charges.iter().enumerate() {
        let at = |problem: String| format!("deferred charge {}: {problem}", i + 1);
        if c.param.trim().is_empty() {
            return Err(at("`param` needs a request parameter name".into()));
        }
        for (key, v) in [("worst", c.worst), ("estimate", c.estimate)] {
            if !(0.0..=MAX_CREDITS).contains(&v) {
                return Err(at(format!(
                    "`{key} = {v}` must be between 0 and {MAX_CREDITS}"
                )));
            }
        }
        if c.estimate > c.worst {
            return Err(at(format!(
                "`estimate = {}` is above `worst = {}`: the worst case bounds every figure budgets count",
                c.estimate, c.worst
            )));
        }
        charges.push(DeferredCharge {
            param: c.param.clone(),
            credit_type: c.credit_type,
            per: c.per,
            worst_milli: to_milli(c.worst),
            estimate_milli: to_milli(c.estimate),
            result: c.result,
        });
    }
    Ok(DeferredSpec {
        job_id: FieldPath::parse(&spec.job_id)?,
        result_reported: match &spec.result_reported {
            Some(list) => list.paths()?,
            None => Vec::new(),
        },
        result_people: match &spec.result_people {
            Some(list) => list.paths()?,
            None => vec![FieldPath::parse("people")?],
        },
        charges,
    })
}

/// For `check-config`: "later, when the job ends: 8 direct_dial per matched record when
/// `reveal_phone_number` is requested (estimate 4), …".
impl fmt::Display for DeferredSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("later, when the job ends: ")?;
        for (i, c) in self.charges.iter().enumerate() {
            let per = match c.per {
                Per::Matched => "matched",
                Per::Requested => "requested",
            };
            write!(
                f,
                "{}up to {} {} per {per} record when `{}` is requested (estimate {})",
                if i == 0 { "" } else { "; " },
                Milli(c.worst_milli),
                c.credit_type,
                c.param,
                Milli(c.estimate_milli),
            )?;
        }
        if let Some(field) = self.result_reported.first() {
            write!(f, " (or the result's `{field}`)")?;
        }
        Ok(())
    }
}

/// Reads a job's result answer (the 2xx body of `webhook_result`): its job id, if it names one.
pub(super) fn result_job_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Head {
        request_id: Option<Value>,
    }
    serde_json::from_slice::<Head>(body)
        .ok()?
        .request_id
        .as_ref()
        .and_then(job_id_text)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::Catalog;
    use super::*;

    fn milli(lead: i64, dd: i64, export: i64) -> Credits {
        Credits {
            lead_milli: lead,
            direct_dial_milli: dd,
            export_milli: export,
        }
    }

    fn price(endpoint: &str, params: &[&str], requested: i64, body: Value) -> ResultPricing {
        let params: Vec<String> = params.iter().map(|p| (*p).to_owned()).collect();
        let units = Units {
            requested: Some(requested),
            matched: Some(requested),
        };
        Catalog::builtin()
            .price_result(endpoint, &params, units, body.to_string().as_bytes())
            .unwrap()
            .unwrap()
    }

    fn person(mobile: bool) -> Value {
        let kind = if mobile { "mobile" } else { "work_hq" };
        json!({"id": "p", "phone_numbers": [{"sanitized_number": "+15550100", "type_cd": kind}]})
    }

    #[test]
    fn a_reported_figure_wins_and_is_split_mobile_first() {
        let r = price(
            "people_bulk_match",
            &["reveal_phone_number"],
            2,
            json!({"request_id": -1, "status": "completed", "credits_consumed": 8,
                   "people": [person(true), person(false)]}),
        );
        assert_eq!(r.source, SettlementSource::Reported);
        assert_eq!(r.credits, milli(0, 8000, 0));
        // A waterfall's fractional vendor lookups on top: the rest goes to its credit type.
        let r = price(
            "people_bulk_match",
            &["reveal_phone_number", "run_waterfall_email"],
            2,
            json!({"credits_consumed": 9.5, "people": [person(true), person(false)]}),
        );
        assert_eq!(r.credits, milli(1500, 8000, 0));
    }

    #[test]
    fn the_documented_nested_result_is_read() {
        // docs.apollo.io/reference/poll-webhook-result: the payload is under `webhook_result`.
        let r = price(
            "people_match",
            &["reveal_phone_number"],
            1,
            json!({"request_id": "-42", "webhook_status": "success", "request_type": "phone",
                   "webhook_result": {"status": "success", "credits_consumed": 8,
                                      "people": [person(true)]}}),
        );
        assert_eq!(
            (r.credits, r.source),
            (milli(0, 8000, 0), SettlementSource::Reported)
        );
        let r = price(
            "people_match",
            &["reveal_phone_number"],
            1,
            json!({"request_id": "-42", "webhook_result": {"people": [person(true)]}}),
        );
        assert_eq!(
            (r.credits, r.source),
            (milli(0, 8000, 0), SettlementSource::Catalog)
        );
        assert_eq!(
            Catalog::result_job_id(br#"{"request_id": "-42", "webhook_result": {}}"#).as_deref(),
            Some("-42")
        );
    }

    #[test]
    fn without_a_figure_the_catalog_prices_mobiles_only() {
        let r = price(
            "people_bulk_match",
            &["reveal_phone_number"],
            3,
            json!({"people": [person(true), person(false), person(true), {"id": "x"}]}),
        );
        assert_eq!(r.source, SettlementSource::Catalog);
        assert_eq!(r.credits, milli(0, 16_000, 0));
        assert_eq!(r.note, None);
        // A waterfall's lookups cannot be read off the payload: estimated, and said so.
        let r = price(
            "people_match",
            &["reveal_phone_number", "run_waterfall_email"],
            1,
            json!({"people": [person(true)]}),
        );
        assert_eq!(r.source, SettlementSource::Estimated);
        assert_eq!(r.credits, milli(1000, 8000, 0));
        assert!(r.note.unwrap().contains("run_waterfall_email"));
    }

    #[test]
    fn unreadable_results_are_errors_not_zeros() {
        let catalog = Catalog::builtin();
        let params = vec!["reveal_phone_number".to_owned()];
        let r = catalog.price_result("people_match", &params, Units::default(), b"{\"people\": [");
        assert!(matches!(r, Some(Err(_))));
        assert!(catalog
            .price_result("organizations_enrich", &params, Units::default(), b"{}")
            .is_none());
    }

    #[test]
    fn a_truncated_answer_defers_the_worst_case_with_no_job() {
        let catalog = Catalog::builtin();
        let ep = catalog.classify("POST", "/api/v1/people/match");
        let req = RequestParams::parse(Some("reveal_phone_number=true"), b"");
        let resp = ResponseView {
            status: 200,
            content_encoding: None,
            body: b"{\"person\": {\"id\"",
            truncated: true,
            max_decoded: 1 << 20,
        };
        let d = catalog.deferred(ep, &req, &resp, Units::default()).unwrap();
        assert_eq!(d.job_id, None);
        assert_eq!(d.estimate, d.worst);
        assert!(d.note.is_some());
        assert_eq!(Deferred::from_json(&d.to_json()).unwrap(), d);
    }

    #[test]
    fn only_a_64_bit_integer_is_a_job_id() {
        assert_eq!(job_id_text(&json!(-4211)).as_deref(), Some("-4211"));
        assert_eq!(job_id_text(&json!(" 42 ")).as_deref(), Some("42"));
        for bad in [
            json!("../people/match"),
            json!("1/../../x"),
            json!("12?a=1"),
            json!(1.5),
            json!(""),
            json!(null),
            json!("99999999999999999999"),
        ] {
            assert_eq!(job_id_text(&bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_deferred_tables_are_refused() {
        let base = |charge: &str| {
            format!(
                "version = \"t\"\nprefixes = [\"\"]\n[[endpoint]]\nname = \"m\"\nmethods = [\"POST\"]\npaths = [\"m\"]\n[endpoint.deferred]\njob_id = \"request_id\"\n{charge}"
            )
        };
        let e = Catalog::from_toml(&base(""), "t").unwrap_err().to_string();
        assert!(e.contains("at least one"), "{e}");
        let e = Catalog::from_toml(
            &base("[[endpoint.deferred.charge]]\nparam = \"p\"\ncredit_type = \"lead\"\nper = \"matched\"\nworst = 1\nestimate = 2\n"),
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("above `worst"), "{e}");
        let e = Catalog::from_toml(
            &base("[[endpoint.deferred.charge]]\nparam = \"p\"\ncredit_type = \"lead\"\nper = \"each\"\nworst = 1\nestimate = 1\n"),
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown variant `each`"), "{e}");
    }
}
