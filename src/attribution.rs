//! Attribution: which table, workflow and tags a call belongs to, and whose API key it used.
//!
//! Callers name their table with `X-Meter-Table`, their workflow with `X-Meter-Workflow` and any
//! number of `X-Meter-Tag-<name>` headers; callers that cannot set headers use the `meter_table`
//! and `meter_workflow` query parameters. All of them are removed before the call goes upstream.
//! The API key is reduced to an HMAC fingerprint; the key itself is never kept.
//!
//! Values are refused (a 400 naming the header or parameter) rather than cleaned up: a value
//! that is not valid UTF-8, is empty or longer than [`MAX_VALUE_BYTES`], holds control
//! characters or Unicode format characters (bidi overrides such as U+202E, zero-width
//! characters: they make two different names print alike), or, for a table or workflow, is a
//! name creditmeter uses for its own rows ([`RESERVED_NAMES`]). A header or parameter given
//! twice is refused too: which copy to believe is a guess.

use std::collections::BTreeMap;

use http::HeaderMap;

/// Longest accepted attribution value, in bytes.
pub const MAX_VALUE_BYTES: usize = 128;
/// Most `X-Meter-Tag-*` headers on one call.
pub const MAX_TAGS: usize = 32;

/// Table and workflow names creditmeter gives its own rows and metric series: calls without a
/// table (`_unattributed`) or workflow (`_none`), label values past the cap (`_other`), and its
/// own calls to Apollo (`_creditmeter`). A caller's table of that name would merge with them in
/// rollups and metrics, so it is refused (compared without regard to ASCII case).
pub const RESERVED_NAMES: [&str; 4] = ["_unattributed", "_other", "_creditmeter", "_none"];

const TABLE_HEADER: &str = "x-meter-table";
const WORKFLOW_HEADER: &str = "x-meter-workflow";
const TAG_PREFIX: &str = "x-meter-tag-";
const METER_PREFIX: &str = "x-meter-";
const TABLE_PARAM: &str = "meter_table";
const WORKFLOW_PARAM: &str = "meter_workflow";

/// Why a call's attribution was refused (the caller gets a 400 naming the header).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttributionError {
    #[error("{name}: {reason}")]
    Invalid { name: String, reason: String },
    #[error("{name} appears more than once")]
    Duplicate { name: String },
    #[error("more than {MAX_TAGS} X-Meter-Tag-* headers")]
    TooManyTags,
    #[error("X-Meter-Table is required (attribution.require_table = true): name the table or workflow spending these credits")]
    TableRequired,
    #[error("{name}: {value:?} is reserved: creditmeter records its own rows under that name (calls without a table or workflow, metric values past the cap, its own calls to Apollo), so yours would merge with them; choose another name")]
    Reserved { name: String, value: String },
}

impl AttributionError {
    /// The header or parameter at fault, for the JSON error body.
    pub fn field(&self) -> Option<&str> {
        match self {
            AttributionError::Invalid { name, .. }
            | AttributionError::Duplicate { name }
            | AttributionError::Reserved { name, .. } => Some(name),
            AttributionError::TooManyTags => Some("X-Meter-Tag-*"),
            AttributionError::TableRequired => Some("X-Meter-Table"),
        }
    }
}

/// The attribution of one call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attribution {
    pub table: Option<String>,
    pub workflow: Option<String>,
    pub tags: BTreeMap<String, String>,
}

impl Attribution {
    /// Tags as a JSON object, or `None` when there are none.
    pub fn tags_json(&self) -> Option<String> {
        if self.tags.is_empty() {
            None
        } else {
            serde_json::to_string(&self.tags).ok()
        }
    }
}

/// Reads and removes the attribution headers and query parameters.
///
/// Returns the attribution and the query string to forward (unchanged apart from the removed
/// parameters; `None` when nothing is left). Every `x-meter-*` header is removed from `headers`.
pub fn extract(
    headers: &mut HeaderMap,
    query: Option<&str>,
    require_table: bool,
) -> Result<(Attribution, Option<String>), AttributionError> {
    let mut attr = Attribution::default();

    // Collect and remove every x-meter-* header.
    let names: Vec<http::HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(METER_PREFIX))
        .cloned()
        .collect();
    let mut result = Ok(());
    for name in names {
        let values: Vec<http::HeaderValue> = match headers.entry(&name) {
            http::header::Entry::Occupied(e) => e.remove_entry_mult().1.collect(),
            http::header::Entry::Vacant(_) => continue,
        };
        if result.is_err() {
            continue; // keep stripping, report the first problem
        }
        let display = display_header(name.as_str());
        if values.len() > 1 {
            result = Err(AttributionError::Duplicate { name: display });
            continue;
        }
        let Some(raw) = values.first() else { continue };
        let value = match validate(&display, raw.as_bytes()) {
            Ok(v) => v,
            Err(e) => {
                result = Err(e);
                continue;
            }
        };
        match name.as_str() {
            TABLE_HEADER | WORKFLOW_HEADER => {
                if let Err(e) = not_reserved(&display, &value) {
                    result = Err(e);
                    continue;
                }
                if name.as_str() == TABLE_HEADER {
                    attr.table = Some(value);
                } else {
                    attr.workflow = Some(value);
                }
            }
            n => {
                if let Some(tag) = n.strip_prefix(TAG_PREFIX).filter(|t| !t.is_empty()) {
                    if attr.tags.len() >= MAX_TAGS {
                        result = Err(AttributionError::TooManyTags);
                        continue;
                    }
                    attr.tags.insert(tag.to_ascii_lowercase(), value);
                }
                // Other x-meter-* headers are creditmeter's namespace: stripped, ignored.
            }
        }
    }
    result?;

    let forwarded_query = match query {
        None => None,
        Some(q) => {
            let mut kept: Vec<&str> = Vec::new();
            let mut seen = [false; 2];
            for pair in q.split('&') {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                let (slot, index) = match percent_decode(k).as_deref() {
                    Some(TABLE_PARAM) => (&mut attr.table, 0),
                    Some(WORKFLOW_PARAM) => (&mut attr.workflow, 1),
                    _ => {
                        kept.push(pair);
                        continue;
                    }
                };
                let name = percent_decode(k).unwrap_or_default();
                // A repeated parameter is as ambiguous as a repeated header.
                if std::mem::replace(&mut seen[index], true) {
                    return Err(AttributionError::Duplicate { name });
                }
                let decoded = percent_decode(v).ok_or_else(|| AttributionError::Invalid {
                    name: name.clone(),
                    reason: "is not valid percent-encoded UTF-8".into(),
                })?;
                let value = validate(&name, decoded.as_bytes())?;
                not_reserved(&name, &value)?;
                // A header, when present, wins over the query parameter.
                if slot.is_none() {
                    *slot = Some(value);
                }
            }
            let joined = kept.join("&");
            (!joined.is_empty()).then_some(joined)
        }
    };

    if require_table && attr.table.is_none() {
        return Err(AttributionError::TableRequired);
    }
    Ok((attr, forwarded_query))
}

/// A value must be non-empty printable UTF-8 of at most [`MAX_VALUE_BYTES`].
fn validate(name: &str, raw: &[u8]) -> Result<String, AttributionError> {
    let invalid = |reason: String| AttributionError::Invalid {
        name: name.to_owned(),
        reason,
    };
    let s = std::str::from_utf8(raw).map_err(|_| invalid("is not valid UTF-8".into()))?;
    let s = s.trim();
    if s.is_empty() {
        return Err(invalid("is empty".into()));
    }
    if s.len() > MAX_VALUE_BYTES {
        return Err(invalid(format!(
            "is {} bytes long; the limit is {MAX_VALUE_BYTES}",
            s.len()
        )));
    }
    if s.chars().any(char::is_control) {
        return Err(invalid("contains control characters".into()));
    }
    if let Some(c) = s.chars().find(|&c| is_format_char(c)) {
        return Err(invalid(format!(
            "contains the invisible Unicode format character U+{:04X} (a bidi override, zero-width character or similar), which makes different names look alike; remove it",
            u32::from(c)
        )));
    }
    Ok(s.to_owned())
}

/// Refuses a table or workflow named like creditmeter's own rows ([`RESERVED_NAMES`]).
fn not_reserved(name: &str, value: &str) -> Result<(), AttributionError> {
    if RESERVED_NAMES.iter().any(|r| r.eq_ignore_ascii_case(value)) {
        return Err(AttributionError::Reserved {
            name: name.to_owned(),
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// Unicode format characters (general category Cf, as of Unicode 15) and the line and paragraph
/// separators: invisible, or reordering the text around them.
fn is_format_char(c: char) -> bool {
    matches!(
        u32::from(c),
        0x00AD
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x2028..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// `x-meter-tag-team` → `X-Meter-Tag-team`, as users wrote it in their docs.
fn display_header(lower: &str) -> String {
    match lower {
        TABLE_HEADER => "X-Meter-Table".into(),
        WORKFLOW_HEADER => "X-Meter-Workflow".into(),
        other => match other.strip_prefix(TAG_PREFIX) {
            Some(tag) => format!("X-Meter-Tag-{tag}"),
            None => other.to_owned(),
        },
    }
}

/// Decodes a form-encoded component; `None` if the result is not UTF-8.
use creditmeter_base::percent::percent_decode_utf8 as percent_decode;

/// The API key a call carries in its headers: `X-Api-Key` or `Authorization: Bearer …`.
/// (`api_key` in the query string or a JSON body is read by the catalog's parameter parser.)
pub fn api_key_from_headers(headers: &HeaderMap) -> Option<&str> {
    if let Some(k) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        let k = k.trim();
        if !k.is_empty() {
            return Some(k);
        }
    }
    let auth = headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let (scheme, token) = auth.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Turns API keys into `key_fp`: the first 16 hex digits of HMAC-SHA256(install secret, key).
pub struct KeyFingerprinter {
    key: ring::hmac::Key,
}

impl KeyFingerprinter {
    /// Uses the ledger's install secret.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
        }
    }

    /// The fingerprint of `api_key`.
    pub fn fingerprint(&self, api_key: &str) -> String {
        let tag = ring::hmac::sign(&self.key, api_key.as_bytes());
        let mut out = String::with_capacity(16);
        for b in &tag.as_ref()[..8] {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn hdrs(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn headers_are_read_and_stripped() {
        let mut h = hdrs(&[
            ("X-Meter-Table", b"Leads Q3"),
            ("X-Meter-Workflow", b"enrich"),
            ("X-Meter-Tag-Team", b"growth"),
            ("X-Api-Key", b"secret"),
            ("Accept", b"application/json"),
        ]);
        let (a, q) = extract(&mut h, Some("a=1&b=2"), false).unwrap();
        assert_eq!(a.table.as_deref(), Some("Leads Q3"));
        assert_eq!(a.workflow.as_deref(), Some("enrich"));
        assert_eq!(a.tags.get("team").map(String::as_str), Some("growth"));
        assert_eq!(a.tags_json().unwrap(), r#"{"team":"growth"}"#);
        assert_eq!(q.as_deref(), Some("a=1&b=2"));
        assert!(h.keys().all(|k| !k.as_str().starts_with("x-meter-")));
        assert_eq!(h.get("x-api-key").unwrap(), "secret");
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn query_params_are_read_and_stripped_rest_untouched() {
        let mut h = HeaderMap::new();
        let (a, q) = extract(
            &mut h,
            Some("person_titles%5B%5D=CEO&meter_table=Big+Table&x=%2F&meter_workflow=w%C3%A9"),
            false,
        )
        .unwrap();
        assert_eq!(a.table.as_deref(), Some("Big Table"));
        assert_eq!(a.workflow.as_deref(), Some("wé"));
        assert_eq!(q.as_deref(), Some("person_titles%5B%5D=CEO&x=%2F"));
        let (_, q) = extract(&mut HeaderMap::new(), Some("meter_table=t"), false).unwrap();
        assert_eq!(q, None);
    }

    #[test]
    fn header_wins_over_query() {
        let mut h = hdrs(&[("x-meter-table", b"hdr")]);
        let (a, _) = extract(&mut h, Some("meter_table=q"), false).unwrap();
        assert_eq!(a.table.as_deref(), Some("hdr"));
    }

    #[test]
    fn invalid_values_name_the_header() {
        let long = [b'a'; 129];
        for (name, value, want) in [
            ("x-meter-table", &long[..], "X-Meter-Table"),
            ("x-meter-workflow", &b"\xff\xfe"[..], "X-Meter-Workflow"),
            ("x-meter-tag-team", &b"a\tb"[..], "X-Meter-Tag-team"),
            ("x-meter-table", &b"   "[..], "X-Meter-Table"),
        ] {
            let mut h = hdrs(&[(name, value)]);
            let err = extract(&mut h, None, false).unwrap_err();
            assert_eq!(err.field(), Some(want), "{err}");
            assert!(h.is_empty(), "stripped even on error");
        }
        let ok = [b'a'; 128];
        assert!(extract(&mut hdrs(&[("x-meter-table", &ok)]), None, false).is_ok());
        let err = extract(&mut HeaderMap::new(), Some("meter_table=%FF"), false).unwrap_err();
        assert_eq!(err.field(), Some("meter_table"));
        let err = extract(&mut HeaderMap::new(), Some("meter_table=%01x"), false).unwrap_err();
        assert!(err.to_string().contains("control"));
    }

    #[test]
    fn duplicates_and_require_table() {
        let mut h = hdrs(&[("x-meter-table", b"a"), ("x-meter-table", b"b")]);
        assert!(matches!(
            extract(&mut h, None, false),
            Err(AttributionError::Duplicate { .. })
        ));
        assert_eq!(
            extract(&mut HeaderMap::new(), None, true),
            Err(AttributionError::TableRequired)
        );
        assert!(extract(&mut HeaderMap::new(), Some("meter_table=x"), true).is_ok());
        assert!(extract(&mut HeaderMap::new(), None, false)
            .unwrap()
            .0
            .table
            .is_none());
    }

    #[test]
    fn reserved_names_are_refused_for_tables_and_workflows() {
        for name in RESERVED_NAMES {
            for (header, field) in [
                ("x-meter-table", "X-Meter-Table"),
                ("x-meter-workflow", "X-Meter-Workflow"),
            ] {
                let err =
                    extract(&mut hdrs(&[(header, name.as_bytes())]), None, false).unwrap_err();
                assert_eq!(err.field(), Some(field), "{err}");
                assert!(err.to_string().contains("reserved"), "{err}");
            }
            let upper = name.to_ascii_uppercase();
            let err = extract(
                &mut HeaderMap::new(),
                Some(&format!("meter_table={upper}")),
                false,
            )
            .unwrap_err();
            assert_eq!(err.field(), Some("meter_table"), "{err}");
        }
        // A tag may say anything; a name that merely starts with an underscore is fine.
        let mut h = hdrs(&[
            ("x-meter-tag-kind", b"_other"),
            ("x-meter-table", b"_others"),
        ]);
        let (a, _) = extract(&mut h, None, false).unwrap();
        assert_eq!(a.table.as_deref(), Some("_others"));
    }

    #[test]
    fn repeated_query_parameters_are_refused_like_repeated_headers() {
        for q in [
            "meter_table=a&meter_table=b",
            "meter_workflow=a&x=1&meter_workflow=a",
        ] {
            let err = extract(&mut HeaderMap::new(), Some(q), false).unwrap_err();
            assert!(
                matches!(err, AttributionError::Duplicate { .. }),
                "{q}: {err}"
            );
        }
        assert!(extract(
            &mut HeaderMap::new(),
            Some("meter_table=a&meter_workflow=a"),
            false
        )
        .is_ok());
    }

    #[test]
    fn format_characters_are_refused_naming_the_code_point() {
        for (value, point) in [
            ("Leads\u{202E}3Q", "U+202E"),
            ("Le\u{200B}ads", "U+200B"),
            ("\u{FEFF}Leads", "U+FEFF"),
            ("Leads\u{2066}x", "U+2066"),
        ] {
            let err = extract(
                &mut hdrs(&[("x-meter-table", value.as_bytes())]),
                None,
                false,
            )
            .unwrap_err();
            assert!(err.to_string().contains(point), "{err}");
            let q = format!("meter_workflow={}", percent_encode(value));
            let err = extract(&mut HeaderMap::new(), Some(&q), false).unwrap_err();
            assert_eq!(err.field(), Some("meter_workflow"), "{err}");
        }
        // Letters from any script are fine.
        assert!(extract(
            &mut hdrs(&[("x-meter-table", "Příjmy לידים".as_bytes())]),
            None,
            false
        )
        .is_ok());
    }

    fn percent_encode(s: &str) -> String {
        s.bytes().map(|b| format!("%{b:02X}")).collect()
    }

    #[test]
    fn api_keys_from_headers() {
        assert_eq!(
            api_key_from_headers(&hdrs(&[("x-api-key", b"k1")])),
            Some("k1")
        );
        assert_eq!(
            api_key_from_headers(&hdrs(&[("authorization", b"Bearer tok")])),
            Some("tok")
        );
        assert_eq!(
            api_key_from_headers(&hdrs(&[("authorization", b"Basic abc")])),
            None
        );
        assert_eq!(api_key_from_headers(&HeaderMap::new()), None);
    }

    #[test]
    fn fingerprint_is_keyed_and_short() {
        let a = KeyFingerprinter::new(b"secret-one-0123456789");
        let b = KeyFingerprinter::new(b"secret-two-0123456789");
        let fp = a.fingerprint("my-api-key");
        assert_eq!(fp.len(), 16);
        assert!(fp.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(fp, a.fingerprint("my-api-key"));
        assert_ne!(fp, b.fingerprint("my-api-key"));
        assert!(!fp.contains("my-api-key"));
    }
}
