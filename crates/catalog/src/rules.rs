//! Compiled pricing rules and how each one reads a request or a response.
//!
//! A rule reads the request parameters ([`RecordsRequested`], a charge's `if_param`) or the
//! top-level JSON object of a 2xx response ([`Charge`], [`RecordsMatched`]). A response of
//! the wrong shape is reported as a note (`Err(String)`), never a panic.

use std::collections::HashSet;
use std::fmt;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::params::{json_kind, RequestParams};
use super::project::Projection;

/// The response body as rules see it: its top-level object, or why there is none.
pub(super) type Body = Result<Map<String, Value>, String>;

/// An Apollo credit type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum CreditType {
    /// `lead_credit`: email reveals and enrichment ("email credits").
    Lead,
    /// `direct_dial_credit`: mobile and direct-dial reveals.
    DirectDial,
    /// `export_credit`.
    Export,
}

impl fmt::Display for CreditType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CreditType::Lead => "lead",
            CreditType::DirectDial => "direct_dial",
            CreditType::Export => "export",
        })
    }
}

/// A dotted path to a field of the response object: `person`, `phone_enrichment.status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FieldPath {
    text: String,
}

impl FieldPath {
    pub(super) fn parse(text: &str) -> Result<FieldPath, String> {
        if text.split('.').any(str::is_empty) {
            return Err(format!(
                "field `{text}` must be a key or a dotted path of keys, like `person` or `a.b`"
            ));
        }
        Ok(FieldPath {
            text: text.to_owned(),
        })
    }

    /// Its keys, outermost first.
    pub(super) fn keys(&self) -> impl Iterator<Item = &str> {
        self.text.split('.')
    }

    pub(super) fn lookup<'a>(&self, body: &'a Map<String, Value>) -> Option<&'a Value> {
        let mut keys = self.text.split('.');
        let first = body.get(keys.next()?)?;
        keys.try_fold(first, |value, key| value.as_object()?.get(key))
    }

    /// Whether the field holds a record: a non-empty object or array. Absent, `null`, `{}` and
    /// `[]` are "no record" (Apollo's no-match for `organizations/enrich` is `{}`), and so is
    /// an object the catalog's `unmatched` rule calls a no-match.
    fn present(
        &self,
        body: &Map<String, Value>,
        unmatched: Option<&Unmatched>,
    ) -> Result<bool, String> {
        match self.lookup(body) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Object(map)) => {
                Ok(!map.is_empty() && !unmatched.is_some_and(|u| u.object_is_unmatched(map)))
            }
            Some(Value::Array(items)) => Ok(!items.is_empty()),
            Some(other) => Err(self.wrong_shape(other, "an object")),
        }
    }

    /// The entries of an array field; absent and `null` count as empty.
    fn items<'a>(&self, body: &'a Map<String, Value>) -> Result<&'a [Value], String> {
        match self.lookup(body) {
            None | Some(Value::Null) => Ok(&[]),
            Some(Value::Array(items)) => Ok(items),
            Some(other) => Err(self.wrong_shape(other, "an array")),
        }
    }

    fn wrong_shape(&self, found: &Value, expected: &str) -> String {
        format!(
            "response field `{self}` is {} {}, expected {expected}",
            article(json_kind(found)),
            json_kind(found)
        )
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The catalog's `unmatched` rule: an object (a `person`, an entry of `matches`) whose
/// `field` holds one of the `equals` strings is not a match, whatever else it carries; one
/// whose `field` holds an `unless_data` string is a match only if it carries data (see
/// [`has_data`]). Apollo's waterfall answers mark an unmatched person `match_confidence:
/// "none"` instead of `null`, and bill it nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Unmatched {
    /// A key of the object itself (not a dotted path).
    pub(super) field: String,
    pub(super) equals: Vec<String>,
    pub(super) unless_data: Vec<String>,
}

impl Unmatched {
    /// Whether `value` is an object this rule calls a no-match.
    pub(super) fn is_unmatched(&self, value: &Value) -> bool {
        value
            .as_object()
            .is_some_and(|map| self.object_is_unmatched(map))
    }

    fn object_is_unmatched(&self, map: &Map<String, Value>) -> bool {
        let Some(Value::String(mark)) = map.get(&self.field) else {
            return false;
        };
        if self.equals.iter().any(|e| e == mark) {
            return true;
        }
        self.unless_data.iter().any(|e| e == mark)
            && !map.iter().any(|(k, v)| *k != self.field && has_data(v))
    }
}

impl fmt::Display for Unmatched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |items: &[String]| {
            items
                .iter()
                .map(|i| format!("\"{i}\""))
                .collect::<Vec<_>>()
                .join(" or ")
        };
        let mut cases = Vec::new();
        if !self.equals.is_empty() {
            cases.push(list(&self.equals));
        }
        if !self.unless_data.is_empty() {
            cases.push(format!("{} with no other data", list(&self.unless_data)));
        }
        write!(
            f,
            "an object whose `{}` is {} is no match (free, not counted)",
            self.field,
            cases.join(", or ")
        )
    }
}

/// Whether a value is data: anything but `null`, `""`, `[]` and `{}`.
pub(super) fn has_data(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(items) => !items.is_empty(),
        Value::Object(map) => !map.is_empty(),
        Value::Bool(_) | Value::Number(_) => true,
    }
}

fn article(noun: &str) -> &'static str {
    if noun.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// What a charge counts.
#[derive(Debug, Clone)]
pub(super) enum Basis {
    /// Once per 2xx response; needs no body.
    Success,
    /// Once if the field holds a record (see [`FieldPath::present`]).
    Present(FieldPath),
    /// Once per non-null entry of an array field; with `unique_by`, entries whose key has the
    /// same string or number value count once (Apollo bills duplicates once).
    Each {
        field: FieldPath,
        unique_by: Option<String>,
    },
    /// Once if any of the array fields is non-empty.
    Nonempty(Vec<FieldPath>),
}

/// One `[[endpoint.charge]]`: so many credits of one type per unit of its basis.
#[derive(Debug, Clone)]
pub(super) struct Charge {
    pub(super) credit_type: CreditType,
    /// Credits per unit, in thousandths.
    pub(super) milli: i64,
    pub(super) basis: Basis,
    /// Charge only when this request parameter is truthy.
    pub(super) if_param: Option<String>,
}

impl Charge {
    /// Whether the request asked for what this charge prices.
    /// A request whose body could not be read may have asked for anything, so every
    /// conditional charge applies to it (its worst case).
    pub(super) fn applies(&self, req: &RequestParams) -> bool {
        self.if_param
            .as_deref()
            .is_none_or(|param| req.may_be_set(param))
    }

    pub(super) fn needs_body(&self) -> bool {
        !matches!(self.basis, Basis::Success)
    }

    /// Marks what this charge reads of a response.
    pub(super) fn project(&self, p: &mut Projection) {
        match &self.basis {
            Basis::Success => {}
            Basis::Present(field) => p.matched(field.keys()),
            Basis::Each { field, unique_by } => {
                p.matched(field.keys());
                if let Some(key) = unique_by {
                    p.entry_key(field.keys(), key);
                }
            }
            Basis::Nonempty(fields) => fields.iter().for_each(|f| p.shape(f.keys())),
        }
    }

    /// Credits (milli) this charge adds for a 2xx response; `unmatched` is the catalog's rule
    /// for objects that are no match.
    pub(super) fn milli_for(
        &self,
        body: &Body,
        unmatched: Option<&Unmatched>,
    ) -> Result<i64, String> {
        let units = match &self.basis {
            Basis::Success => 1,
            Basis::Present(field) => i64::from(field.present(body.as_ref()?, unmatched)?),
            Basis::Each { field, unique_by } => count_entries(
                field.items(body.as_ref()?)?,
                unique_by.as_deref(),
                unmatched,
            ),
            Basis::Nonempty(fields) => {
                let body = body.as_ref()?;
                let mut any = false;
                for field in fields {
                    any |= !field.items(body)?.is_empty();
                }
                i64::from(any)
            }
        };
        Ok(self.milli.saturating_mul(units))
    }

    /// The most this charge can add, given how many records the request asked for.
    /// `None` for an `each` charge when that count is unknown.
    pub(super) fn max_milli(&self, records_requested: Option<i64>) -> Option<i64> {
        let units = match self.basis {
            Basis::Each { .. } => records_requested?,
            _ => 1,
        };
        Some(self.milli.saturating_mul(units))
    }
}

impl fmt::Display for Charge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", Milli(self.milli), self.credit_type)?;
        match &self.basis {
            Basis::Success => f.write_str(" per 2xx response")?,
            Basis::Present(field) => write!(f, " if `{field}` is present")?,
            Basis::Each { field, unique_by } => {
                write!(f, " per non-null `{field}` entry")?;
                if let Some(key) = unique_by {
                    write!(f, " (unique by `{key}`)")?;
                }
            }
            Basis::Nonempty(fields) => {
                f.write_str(" if any of ")?;
                for (i, field) in fields.iter().enumerate() {
                    write!(f, "{}`{field}`", if i == 0 { "" } else { ", " })?;
                }
                f.write_str(" is non-empty")?;
            }
        }
        if let Some(param) = &self.if_param {
            write!(f, " when `{param}` is requested")?;
        }
        Ok(())
    }
}

/// Counts non-null entries that are a match, once per distinct `unique_by` value when that
/// key holds a string or a number; entries without such a key always count.
fn count_entries(items: &[Value], unique_by: Option<&str>, unmatched: Option<&Unmatched>) -> i64 {
    let mut seen = HashSet::new();
    let count = items
        .iter()
        .filter(|item| is_match(item, unmatched))
        .filter(|item| {
            let key = unique_by.and_then(|key| item.get(key));
            match key {
                Some(Value::String(s)) => seen.insert(s.clone()),
                Some(Value::Number(n)) => seen.insert(n.to_string()),
                _ => true,
            }
        })
        .count();
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// An entry that is a match: not `null`, and not an object the `unmatched` rule rejects.
fn is_match(item: &Value, unmatched: Option<&Unmatched>) -> bool {
    !item.is_null() && !unmatched.is_some_and(|u| u.is_unmatched(item))
}

/// How many records a request asked for.
#[derive(Debug, Clone)]
pub(super) enum RecordsRequested {
    /// The length of the first of these array parameters the request gives, such as
    /// `details`, then `domains` (Apollo: `details` takes precedence over `domains[]`); unknown
    /// if the first one present is not an array. `max` is the most records one request can
    /// ask for (Apollo refuses more), which bounds the worst case when the count is unknown.
    ParamLen {
        params: Vec<String>,
        max: Option<i64>,
    },
    /// Always this many, such as 1 for a single match.
    Fixed(i64),
}

impl RecordsRequested {
    pub(super) fn count(&self, req: &RequestParams) -> Option<i64> {
        match self {
            RecordsRequested::ParamLen { params, .. } => {
                let value = params
                    .iter()
                    .find_map(|param| req.get(param).filter(|v| !v.is_null()))?;
                value
                    .as_array()
                    .map(|items| i64::try_from(items.len()).unwrap_or(i64::MAX))
            }
            RecordsRequested::Fixed(n) => Some(*n),
        }
    }

    /// The most records the request can be billed for: its count, capped by `max`, or `max`
    /// when the count is unknown.
    pub(super) fn bound(&self, req: &RequestParams) -> Option<i64> {
        match (self.count(req), self) {
            (Some(n), RecordsRequested::ParamLen { max: Some(max), .. }) => Some(n.min(*max)),
            (Some(n), _) => Some(n),
            (None, RecordsRequested::ParamLen { max, .. }) => *max,
            (None, RecordsRequested::Fixed(_)) => None,
        }
    }
}

/// How many records a 2xx response returned.
#[derive(Debug, Clone)]
pub(super) enum RecordsMatched {
    /// 1 if the field holds a record, else 0.
    Present(FieldPath),
    /// The non-null entries of an array field that are a match (duplicates included).
    NonnullItems(FieldPath),
    /// The total length of the array fields.
    Items(Vec<FieldPath>),
}

impl RecordsMatched {
    /// Marks what this count reads of a response.
    pub(super) fn project(&self, p: &mut Projection) {
        match self {
            RecordsMatched::Present(field) | RecordsMatched::NonnullItems(field) => {
                p.matched(field.keys())
            }
            RecordsMatched::Items(fields) => fields.iter().for_each(|f| p.shape(f.keys())),
        }
    }

    /// The count for a 2xx body; `unmatched` is the catalog's rule for objects that are no
    /// match (it does not apply to `items`, which counts every entry).
    pub(super) fn count(
        &self,
        body: &Map<String, Value>,
        unmatched: Option<&Unmatched>,
    ) -> Result<i64, String> {
        let len = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        match self {
            RecordsMatched::Present(field) => field.present(body, unmatched).map(i64::from),
            RecordsMatched::NonnullItems(field) => Ok(len(field
                .items(body)?
                .iter()
                .filter(|v| is_match(v, unmatched))
                .count())),
            RecordsMatched::Items(fields) => fields.iter().try_fold(0_i64, |sum, field| {
                Ok(sum.saturating_add(len(field.items(body)?.len())))
            }),
        }
    }
}

/// A reported credit figure (`credits_consumed`), in milli. `Ok(None)` when it is absent or
/// `null`; an error when it is there but not a non-negative number.
pub(super) fn reported_milli(
    field: &FieldPath,
    body: &Map<String, Value>,
) -> Result<Option<i64>, String> {
    match field.lookup(body) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match value.as_f64() {
            Some(credits) if credits >= 0.0 && credits.is_finite() => Ok(Some(to_milli(credits))),
            _ => Err(format!(
                "reported `{field}` is not a non-negative number; priced from the catalog"
            )),
        },
    }
}

/// Credits to thousandths, rounded to nearest (saturating at the `i64` range).
pub(super) fn to_milli(credits: f64) -> i64 {
    // `as` saturates on overflow, which is what we want for absurd values.
    (credits * 1000.0).round() as i64
}

/// Non-negative thousandths of a credit printed as credits: `1`, `0.5`, `1.01`.
pub(super) struct Milli(pub(super) i64);

impl fmt::Display for Milli {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / 1000, self.0 % 1000);
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let digits = format!("{frac:03}");
            write!(f, "{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn body(value: Value) -> Body {
        match value {
            Value::Object(map) => Ok(map),
            other => Err(format!("not an object: {other}")),
        }
    }

    fn field(text: &str) -> FieldPath {
        FieldPath {
            text: text.to_owned(),
        }
    }

    impl Charge {
        fn milli_for_test(&self, body: &Body) -> Result<i64, String> {
            self.milli_for(body, None)
        }
    }

    fn waterfall_unmatched() -> Unmatched {
        Unmatched {
            field: "match_confidence".to_owned(),
            equals: vec!["none".to_owned()],
            unless_data: vec!["low".to_owned()],
        }
    }

    #[test]
    fn unmatched_objects_are_no_match_for_present_each_and_counts() -> Result<(), String> {
        let u = waterfall_unmatched();
        let present = charge(Basis::Present(field("person")));
        let each = charge(Basis::Each {
            field: field("matches"),
            unique_by: Some("id".to_owned()),
        });
        let none = json!({"id": "p1", "name": "Ada", "match_confidence": "none"});
        let low_empty = json!({"id": null, "name": "", "emails": [], "match_confidence": "low"});
        let low_data = json!({"id": "p2", "match_confidence": "low"});
        let high = json!({"id": "p3", "match_confidence": "high"});
        let plain = json!({"id": "p4"});
        for (person, billed) in [
            (&none, 0),
            (&low_empty, 0),
            (&low_data, 1000),
            (&high, 1000),
            (&plain, 1000),
        ] {
            let b = body(json!({ "person": person }));
            assert_eq!(present.milli_for(&b, Some(&u)), Ok(billed), "{person}");
            assert_eq!(
                RecordsMatched::Present(field("person")).count(b.as_ref()?, Some(&u)),
                Ok(billed / 1000)
            );
            // Without the rule every non-empty object is a match, as before.
            assert_eq!(present.milli_for(&b, None), Ok(1000));
        }
        let b = body(
            json!({"matches": [none, null, low_empty, low_data, high, plain, {"match_confidence": 0}]}),
        );
        assert_eq!(each.milli_for(&b, Some(&u)), Ok(4000));
        assert_eq!(each.milli_for(&b, None), Ok(6000));
        assert_eq!(
            RecordsMatched::NonnullItems(field("matches")).count(b.as_ref()?, Some(&u)),
            Ok(4)
        );
        assert_eq!(
            RecordsMatched::Items(vec![field("matches")]).count(b.as_ref()?, Some(&u)),
            Ok(7)
        );
        assert_eq!(
            u.to_string(),
            "an object whose `match_confidence` is \"none\", or \"low\" with no other data is no match (free, not counted)"
        );
        Ok(())
    }

    fn charge(basis: Basis) -> Charge {
        Charge {
            credit_type: CreditType::Lead,
            milli: 1000,
            basis,
            if_param: None,
        }
    }

    #[test]
    fn present_distinguishes_records_from_empties_and_wrong_shapes() {
        let present = charge(Basis::Present(field("person")));
        assert_eq!(
            present.milli_for_test(&body(json!({"person": {"id": "p"}}))),
            Ok(1000)
        );
        for empty in [json!({"person": null}), json!({"person": {}}), json!({})] {
            assert_eq!(present.milli_for_test(&body(empty)), Ok(0));
        }
        assert_eq!(
            present.milli_for_test(&body(json!({"person": 5}))),
            Err("response field `person` is a number, expected an object".to_owned())
        );
        assert_eq!(
            present.milli_for_test(&Err("no body".to_owned())),
            Err("no body".to_owned())
        );
    }

    #[test]
    fn each_counts_non_null_entries_once_per_unique_key() {
        let each = Charge {
            milli: 8000,
            ..charge(Basis::Each {
                field: field("matches"),
                unique_by: Some("id".to_owned()),
            })
        };
        let matches = json!({"matches": [{"id": "a"}, null, {"id": "a"}, {"id": 7}, {"id": 7}, {"x": 1}, {"x": 1}]});
        assert_eq!(each.milli_for_test(&body(matches)), Ok(4 * 8000));
        assert_eq!(
            each.milli_for_test(&body(json!({"matches": "x"}))),
            Err("response field `matches` is a string, expected an array".to_owned())
        );
    }

    #[test]
    fn nonempty_needs_one_non_empty_array() {
        let nonempty = charge(Basis::Nonempty(vec![
            field("organizations"),
            field("accounts"),
        ]));
        assert_eq!(
            nonempty.milli_for_test(&body(json!({"organizations": [], "accounts": []}))),
            Ok(0)
        );
        assert_eq!(
            nonempty.milli_for_test(&body(json!({"accounts": [{}]}))),
            Ok(1000)
        );
        assert!(nonempty
            .milli_for_test(&body(json!({"organizations": {}})))
            .is_err());
    }

    #[test]
    fn success_ignores_the_body() {
        let success = charge(Basis::Success);
        assert_eq!(success.milli_for_test(&Err("garbage".to_owned())), Ok(1000));
        assert!(!success.needs_body());
    }

    #[test]
    fn dotted_fields_reach_into_objects() {
        let status = field("phone_enrichment.status");
        let b = body(json!({"phone_enrichment": {"status": "pending"}}));
        assert_eq!(
            b.map(|b| status.lookup(&b).cloned()),
            Ok(Some(json!("pending")))
        );
        assert!(FieldPath::parse("a..b").is_err());
        assert!(FieldPath::parse("").is_err());
    }

    #[test]
    fn records_matched_counts() -> Result<(), String> {
        let b = body(json!({"matches": [{}, null, {}], "organizations": [1, 2], "accounts": [3]}))?;
        assert_eq!(
            RecordsMatched::NonnullItems(field("matches")).count(&b, None),
            Ok(2)
        );
        assert_eq!(
            RecordsMatched::Items(vec![field("organizations"), field("accounts")]).count(&b, None),
            Ok(3)
        );
        assert_eq!(
            RecordsMatched::Present(field("person")).count(&b, None),
            Ok(0)
        );
        Ok(())
    }

    #[test]
    fn reported_credits() -> Result<(), String> {
        let credits = field("credits_consumed");
        let read = |v: Value| {
            body(json!({ "credits_consumed": v })).and_then(|b| reported_milli(&credits, &b))
        };
        assert_eq!(read(json!(1.01)), Ok(Some(1010)));
        assert_eq!(read(json!(3)), Ok(Some(3000)));
        assert_eq!(read(Value::Null), Ok(None));
        assert!(read(json!("1.01")).is_err());
        assert!(read(json!(-1)).is_err());
        assert_eq!(reported_milli(&credits, &Map::new()), Ok(None));
        Ok(())
    }

    #[test]
    fn milli_display() {
        assert_eq!(Milli(1000).to_string(), "1");
        assert_eq!(Milli(1010).to_string(), "1.01");
        assert_eq!(Milli(500).to_string(), "0.5");
        assert_eq!(Milli(8000).to_string(), "8");
        assert_eq!(Milli(25).to_string(), "0.025");
        assert_eq!(to_milli(2.5), 2500);
        assert_eq!(to_milli(0.0004), 0);
        assert_eq!(to_milli(f64::MAX), i64::MAX);
    }
}
