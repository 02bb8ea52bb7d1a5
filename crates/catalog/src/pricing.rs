//! Pricing one finished call: endpoint rules × request parameters × decoded response.
//!
//! Only a 2xx response on a catalogued endpoint costs anything. Its body is decoded and parsed
//! once, then every charge whose `if_param` the request set reads it; a figure Apollo reports
//! itself (`credits_consumed`) wins over the catalog's own count.
//!
//! What cannot be read is priced at the worst case, never at 0, because Apollo billed a 2xx
//! whether or not creditmeter could read it (source [`CreditSource::Estimated`], the reason in
//! [`Pricing::note`]):
//! - a 2xx body a charge needs that cannot be read (cut off after the head, past the upstream
//!   deadline or the shutdown's hard stop, over the inspection cap, corrupt, not JSON, the wrong
//!   shape) is priced at the endpoint's [`synchronous_worst_case`](super::Endpoint::synchronous_worst_case) for the
//!   request;
//! - a request whose body parameters cannot be read is priced as if it had set every
//!   `if_param` a charge depends on.

use serde_json::{Map, Value};

use super::decode::decode_body;
use super::params::{json_kind, RequestParams};
use super::rules::{reported_milli, Body, CreditType};
use super::Endpoint;

/// The response as the metering tap saw it.
#[derive(Debug, Clone, Copy)]
pub struct ResponseView<'a> {
    /// HTTP status code.
    pub status: u16,
    /// The raw `Content-Encoding` header, e.g. `"gzip"` or `"gzip, br"`; anything else is
    /// reported as undecodable.
    pub content_encoding: Option<&'a str>,
    /// The body bytes as upstream sent them, still encoded.
    pub body: &'a [u8],
    /// True when `body` is incomplete: the tap's copy hit its cap, or the body was cut short.
    pub truncated: bool,
    /// The most bytes decoding may produce (a decompression-bomb guard).
    pub max_decoded: usize,
}

/// Credits in thousandths, by Apollo credit type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Credits {
    /// `lead_credit` ("email credits"), milli.
    pub lead_milli: i64,
    /// `direct_dial_credit` (mobile reveals), milli.
    pub direct_dial_milli: i64,
    /// `export_credit`, milli.
    pub export_milli: i64,
}

impl Credits {
    /// All credit types together, milli.
    pub fn total_milli(&self) -> i64 {
        self.lead_milli
            .saturating_add(self.direct_dial_milli)
            .saturating_add(self.export_milli)
    }

    fn add(&mut self, credit_type: CreditType, milli: i64) {
        let slot = match credit_type {
            CreditType::Lead => &mut self.lead_milli,
            CreditType::DirectDial => &mut self.direct_dial_milli,
            CreditType::Export => &mut self.export_milli,
        };
        *slot = slot.saturating_add(milli);
    }

    /// Splits a reported total across credit types using the catalog's own count as a guide:
    /// the catalog's split when the totals agree, otherwise direct dials and exports up to what
    /// the catalog expected, and the rest as lead credits.
    fn split_reported(total_milli: i64, catalog: Credits) -> Credits {
        if total_milli == catalog.total_milli() {
            return catalog;
        }
        let direct_dial_milli = catalog.direct_dial_milli.min(total_milli);
        let export_milli = catalog.export_milli.min(total_milli - direct_dial_milli);
        Credits {
            lead_milli: total_milli - direct_dial_milli - export_milli,
            direct_dial_milli,
            export_milli,
        }
    }
}

/// Where a call's credit figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditSource {
    /// Apollo reported it in the response (`credits_consumed`).
    Reported,
    /// The catalog's rules priced the response.
    Catalog,
    /// The catalog's worst case for what was asked: the answer (or the request's parameters)
    /// could not be read, so the most the call can have cost was recorded.
    Estimated,
    /// Not priced: unknown endpoint or non-2xx response (free), or a body the rules could not
    /// read on an endpoint whose catalog gives no worst case.
    None,
}

impl CreditSource {
    /// The ledger's `credit_source` value: `"reported"`, `"catalog"`, `"estimated"` or `"none"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            CreditSource::Reported => "reported",
            CreditSource::Catalog => "catalog",
            CreditSource::Estimated => "estimated",
            CreditSource::None => "none",
        }
    }
}

/// The price of one call.
#[derive(Debug, Clone)]
pub struct Pricing {
    /// Credits billed, by type.
    pub credits: Credits,
    /// Where the figure came from.
    pub source: CreditSource,
    /// Records the request asked for (e.g. the length of `details`), if the endpoint says how
    /// to count them. Computed for every status, so a rejected bulk call still shows its size.
    pub records_requested: Option<i64>,
    /// Records the response returned (non-null results); `None` unless a 2xx body was read.
    pub records_matched: Option<i64>,
    /// Why something could not be priced or counted, e.g. "response body is not JSON: …".
    pub note: Option<String>,
}

/// Prices a finished call to `ep`; see the module docs.
pub(super) fn price(ep: &Endpoint, req: &RequestParams, resp: &ResponseView<'_>) -> Pricing {
    price_with(ep, req, resp, |json| ep.projection.parse(json))
}

/// Prices with `parse` reading the body: the endpoint's projection, or (in tests) a full parse
/// to check the projection against.
pub(super) fn price_with(
    ep: &Endpoint,
    req: &RequestParams,
    resp: &ResponseView<'_>,
    parse: impl FnOnce(&[u8]) -> Result<Value, serde_json::Error>,
) -> Pricing {
    let mut pricing = Pricing {
        credits: Credits::default(),
        source: CreditSource::None,
        records_requested: ep.records_requested.as_ref().and_then(|r| r.count(req)),
        records_matched: None,
        note: None,
    };
    if !ep.catalogued || !(200..300).contains(&resp.status) {
        return pricing;
    }

    // Endpoints that never look at the body see an empty object, which no rule reads.
    let body: Body = if ep.inspects_body {
        read_json(resp, parse)
    } else {
        Ok(Map::new())
    };
    let mut notes = Notes::default();
    if let Err(note) = &body {
        notes.push(note.clone());
    }

    let mut failed = false;
    for charge in ep.charges.iter().filter(|c| c.applies(req)) {
        match charge.milli_for(&body, ep.unmatched.as_ref()) {
            Ok(milli) => pricing.credits.add(charge.credit_type, milli),
            Err(note) => {
                notes.push(note);
                failed = true;
            }
        }
    }
    if failed {
        // Apollo billed this 2xx whatever creditmeter could read of it: record the most it can
        // have cost. (An endpoint with nothing to charge never gets here: it is correctly
        // priced at 0 whatever its body says.)
        match ep.synchronous_worst_case(req) {
            Some(worst) => {
                pricing.credits = worst;
                pricing.source = CreditSource::Estimated;
                notes.push("priced at the catalog's worst case for the request".to_owned());
            }
            None => notes.push(
                "the catalog gives no worst case for this request, so it is priced at 0".to_owned(),
            ),
        }
    } else {
        pricing.source = CreditSource::Catalog;
    }

    if let Ok(body) = &body {
        if let Some(rule) = &ep.records_matched {
            match rule.count(body, ep.unmatched.as_ref()) {
                Ok(count) => pricing.records_matched = Some(count),
                Err(note) => notes.push(note),
            }
        }
        if let Some(field) = &ep.reported {
            match reported_milli(field, body) {
                Ok(Some(total)) if !failed => {
                    pricing.credits = Credits::split_reported(total, pricing.credits);
                    pricing.source = CreditSource::Reported;
                }
                Ok(_) => {}
                Err(note) => notes.push(note),
            }
        }
    }
    // Conditional charges were applied on the assumption that an unreadable request asked for
    // them (`RequestParams::may_be_set`): that is an estimate, unless Apollo reported its figure.
    if pricing.source == CreditSource::Catalog && ep.reads_params() {
        if let Some(why) = req.note() {
            notes.push(format!(
                "{why}; priced as if it asked for everything a charge depends on"
            ));
            pricing.source = CreditSource::Estimated;
        }
    }
    pricing.note = notes.joined();
    pricing
}

/// Decodes the body and parses its top-level JSON object with `parse` (the endpoint's
/// projection), or says why it cannot.
fn read_json(
    resp: &ResponseView<'_>,
    parse: impl FnOnce(&[u8]) -> Result<Value, serde_json::Error>,
) -> Body {
    if resp.truncated {
        return Err(format!(
            "response body is incomplete ({} bytes kept for pricing)",
            resp.body.len()
        ));
    }
    let decoded = decode_body(resp.content_encoding, resp.body, resp.max_decoded)
        .map_err(|e| error_chain(&e))?;
    match parse(&decoded) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!(
            "response body is a JSON {}, not an object",
            json_kind(&other)
        )),
        Err(e) => Err(format!("response body is not JSON: {e}")),
    }
}

/// An error and its sources as one line: "gzip decode failed: corrupt deflate stream".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Distinct notes in the order they arose.
#[derive(Default)]
struct Notes(Vec<String>);

impl Notes {
    fn push(&mut self, note: String) {
        if !self.0.contains(&note) {
            self.0.push(note);
        }
    }

    fn joined(self) -> Option<String> {
        (!self.0.is_empty()).then(|| self.0.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credits(lead: i64, dd: i64, export: i64) -> Credits {
        Credits {
            lead_milli: lead,
            direct_dial_milli: dd,
            export_milli: export,
        }
    }

    #[test]
    fn reported_totals_follow_the_catalog_split_when_they_agree() {
        let catalog = credits(2000, 16_000, 0);
        assert_eq!(Credits::split_reported(18_000, catalog), catalog);
    }

    #[test]
    fn reported_totals_fill_direct_dial_then_export_then_lead() {
        assert_eq!(
            Credits::split_reported(1010, credits(1000, 0, 0)),
            credits(1010, 0, 0)
        );
        assert_eq!(
            Credits::split_reported(1010, credits(1000, 8000, 0)),
            credits(0, 1010, 0)
        );
        assert_eq!(
            Credits::split_reported(9500, credits(1000, 8000, 0)),
            credits(1500, 8000, 0)
        );
        assert_eq!(
            Credits::split_reported(500, credits(0, 0, 1000)),
            credits(0, 0, 500)
        );
        assert_eq!(
            Credits::split_reported(0, credits(1000, 8000, 1000)),
            credits(0, 0, 0)
        );
        assert_eq!(
            Credits::split_reported(3000, Credits::default()),
            credits(3000, 0, 0)
        );
    }

    #[test]
    fn totals_saturate_instead_of_overflowing() {
        assert_eq!(credits(i64::MAX, 1, 1).total_milli(), i64::MAX);
    }

    #[test]
    fn credit_source_names_match_the_ledger() {
        assert_eq!(CreditSource::Reported.as_str(), "reported");
        assert_eq!(CreditSource::Catalog.as_str(), "catalog");
        assert_eq!(CreditSource::Estimated.as_str(), "estimated");
        assert_eq!(CreditSource::None.as_str(), "none");
    }

    #[test]
    fn notes_are_deduplicated_and_joined() {
        let mut notes = Notes::default();
        assert_eq!(Notes::default().joined(), None);
        notes.push("a".to_owned());
        notes.push("b".to_owned());
        notes.push("a".to_owned());
        assert_eq!(notes.joined().as_deref(), Some("a; b"));
    }
}
