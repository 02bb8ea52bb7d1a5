//! The parameters of one request, as Apollo's Rails server would see them.
//!
//! Callers send parameters in the query string (Rails form keys such as `details[][email]`),
//! in a body, or both; Rails merges the two, the query string winning key by key
//! (`ActionDispatch::Http::Parameters#parameters` is `request_parameters.merge(query_parameters)`).
//! A body is read as Rails reads it: JSON (`application/json`, `…+json`), or a form
//! (`application/x-www-form-urlencoded`, Rails keys included), after undoing any
//! `Content-Encoding` (gzip, deflate, br; capped like response bodies). Pricing rules read the
//! merged view: `reveal_phone_number` to price a phone reveal, `details` to count requested
//! records. A body that cannot be read leaves the request [`unreadable`](RequestParams::note),
//! and pricing then assumes the worst case for every parameter a charge depends on.

use creditmeter_base::percent::percent_decode_lossy as percent_decode;
use serde_json::{Map, Value};

use super::decode::decode_body;

/// Deepest bracket nesting honoured in a query key (`a[b][c]` has 2 levels). Deeper keys are
/// kept whole as flat keys, which bounds the recursion a hostile query string can cause.
const MAX_KEY_DEPTH: usize = 16;

/// Identifier kinds in the order [`RequestParams::identifier_kinds`] reports them (sorted).
const IDENTIFIER_KINDS: [&str; 5] = ["email", "id", "linkedin_url", "name", "name+domain"];

/// A request body as the caller sent it, with the headers that say how to read it.
#[derive(Debug, Clone, Copy)]
pub struct RequestBody<'a> {
    /// The raw `Content-Type` header, e.g. `application/json; charset=utf-8`.
    pub content_type: Option<&'a str>,
    /// The raw `Content-Encoding` header, e.g. `gzip`.
    pub content_encoding: Option<&'a str>,
    /// The bytes as sent (still encoded).
    pub bytes: &'a [u8],
    /// The most bytes decoding may produce (a decompression-bomb guard).
    pub max_decoded: usize,
}

/// How a body's media type says to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Json,
    Form,
}

/// The merged parameters of a request: the top-level keys of the body, then the query string,
/// which wins on conflict (as in Rails). Query and form values are strings; JSON values keep
/// their JSON types.
#[derive(Debug, Clone, Default)]
pub struct RequestParams {
    params: Map<String, Value>,
    /// Why the body's parameters could not be read, if they could not.
    unreadable: Option<String>,
}

impl RequestParams {
    /// Merges `query` (without the `?`) and a body read as JSON when it looks like JSON and as
    /// a form otherwise (no `Content-Type`, no `Content-Encoding`). See
    /// [`from_request`](Self::from_request).
    pub fn parse(query: Option<&str>, body: &[u8]) -> RequestParams {
        RequestParams::from_request(
            query,
            &RequestBody {
                content_type: None,
                content_encoding: None,
                bytes: body,
                max_decoded: usize::MAX,
            },
        )
    }

    /// Merges `query` (without the `?`) and `body`. Never fails: a body that cannot be read
    /// (an encoding that does not decode or decodes past the cap, malformed JSON, a JSON value
    /// that is not an object, a media type other than JSON or a form) contributes nothing, and
    /// [`note`](Self::note) says why. An empty body is simply absent. Without a
    /// `Content-Type`, a body starting with `{` or `[` is read as JSON and anything else as a
    /// form (Rack reads a typeless POST body as a form).
    pub fn from_request(query: Option<&str>, body: &RequestBody<'_>) -> RequestParams {
        let query = query.map(parse_query).unwrap_or_default();
        let (mut params, unreadable) = match read_body(body) {
            Ok(fields) => (fields, None),
            Err(why) => (Map::new(), Some(why)),
        };
        // Rails: `request_parameters.merge(query_parameters)`, so the query string wins.
        params.extend(query);
        RequestParams { params, unreadable }
    }

    /// Every top-level parameter (query merged over body).
    pub(super) fn top_level(&self) -> &Map<String, Value> {
        &self.params
    }

    /// The value of a top-level parameter.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.params.get(key)
    }

    /// Whether a parameter is set to a true value: `true`, `1`, or the strings `"true"`,
    /// `"1"`, `"yes"` in any case. Absent and anything else is false.
    pub fn truthy(&self, key: &str) -> bool {
        match self.get(key) {
            Some(Value::Bool(b)) => *b,
            Some(Value::Number(n)) => n.as_f64() == Some(1.0),
            Some(Value::String(s)) => ["true", "1", "yes"]
                .iter()
                .any(|t| s.trim().eq_ignore_ascii_case(t)),
            _ => false,
        }
    }

    /// The `api_key` parameter (older clients send it in the query or the body), if it is a
    /// non-empty string.
    pub fn api_key(&self) -> Option<&str> {
        self.get("api_key")
            .and_then(Value::as_str)
            .filter(|key| !key.is_empty())
    }

    /// Why the body's parameters could not be read, if they could not; pricing then assumes
    /// the worst case for every parameter a charge depends on (see
    /// [`may_be_set`](Self::may_be_set)).
    pub fn note(&self) -> Option<&str> {
        self.unreadable.as_deref()
    }

    /// Whether the body's parameters could not be read.
    pub fn body_unreadable(&self) -> bool {
        self.unreadable.is_some()
    }

    /// Whether the request may have set `key` to a true value: it did
    /// ([`truthy`](Self::truthy)), or its body could not be read, so it may have. Charges
    /// that depend on a parameter use this, so an unreadable request is priced at its worst case.
    pub fn may_be_set(&self, key: &str) -> bool {
        self.unreadable.is_some() || self.truthy(key)
    }

    /// The kinds of person identifier the request carries (never their values), sorted:
    /// `email` (`email`, `hashed_email`), `id` (`id`, `person_id`), `linkedin_url`,
    /// `name+domain` (`first_name` and `last_name`, or `name`, plus `domain` or
    /// `organization_name`) and `name` (a name without a company). Top-level parameters and
    /// every object in a bulk `details` array are included.
    pub fn identifier_kinds(&self) -> Vec<&'static str> {
        let mut found = [false; IDENTIFIER_KINDS.len()];
        let details = match self.get("details") {
            Some(Value::Array(items)) => items.as_slice(),
            _ => &[],
        };
        let people = details.iter().filter_map(Value::as_object);
        for person in std::iter::once(&self.params).chain(people) {
            let has = |key: &str| match person.get(key) {
                Some(Value::String(s)) => !s.trim().is_empty(),
                Some(Value::Number(_)) => true,
                _ => false,
            };
            let name = (has("first_name") && has("last_name")) || has("name");
            let company = has("domain") || has("organization_name");
            for (slot, present) in found.iter_mut().zip([
                has("email") || has("hashed_email"),
                has("id") || has("person_id"),
                has("linkedin_url"),
                name && !company,
                name && company,
            ]) {
                *slot |= present;
            }
        }
        IDENTIFIER_KINDS
            .iter()
            .zip(found)
            .filter_map(|(kind, present)| present.then_some(*kind))
            .collect()
    }
}

/// The top-level parameters of a body, or why it cannot be read.
fn read_body(body: &RequestBody<'_>) -> Result<Map<String, Value>, String> {
    if body.bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let kind = match media_type(body.content_type) {
        None => None,
        Some(t) if t == "application/json" || t.ends_with("+json") || t == "text/json" => {
            Some(BodyKind::Json)
        }
        Some(t) if t == "application/x-www-form-urlencoded" => Some(BodyKind::Form),
        Some(t) => {
            return Err(format!(
                "request body has Content-Type {}, which creditmeter does not read \
                 (only JSON and application/x-www-form-urlencoded)",
                quoted_token(&t)
            ));
        }
    };
    let decoded =
        decode_body(body.content_encoding, body.bytes, body.max_decoded).map_err(|e| {
            let mut why = match &e {
                super::decode::DecodeError::Unsupported(token) => format!(
                    "request body could not be decoded: unsupported content-encoding {}",
                    quoted_token(token)
                ),
                e => format!("request body could not be decoded: {e}"),
            };
            if let Some(source) = std::error::Error::source(&e) {
                why.push_str(&format!(": {source}"));
            }
            why
        })?;
    if decoded.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let kind = kind.unwrap_or_else(|| match decoded.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{' | b'[') => BodyKind::Json,
        _ => BodyKind::Form,
    });
    match kind {
        BodyKind::Form => Ok(parse_query(&String::from_utf8_lossy(&decoded))),
        BodyKind::Json => match serde_json::from_slice::<Value>(&decoded) {
            Ok(Value::Object(fields)) => Ok(fields),
            Ok(other) => Err(format!(
                "request body is a JSON {}, not an object",
                json_kind(&other)
            )),
            Err(e) => Err(format!("request body is not valid JSON ({e})")),
        },
    }
}

/// A caller-supplied header token, quoted for an error message (which the ledger keeps) only
/// when it looks like a media type or a coding; anything else (long, or odd bytes, which might
/// be a credential pasted in the wrong place) is not repeated.
fn quoted_token(token: &str) -> String {
    let plain = token.len() <= 64
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-/".contains(&b));
    if plain {
        format!("`{token}`")
    } else {
        "of an unrecognised form".to_owned()
    }
}

/// The media type of a `Content-Type` header, lower-cased, without parameters; `None` when
/// the header is absent or blank.
fn media_type(content_type: Option<&str>) -> Option<String> {
    let t = content_type?.split(';').next()?.trim();
    (!t.is_empty()).then(|| t.to_ascii_lowercase())
}

/// A JSON value's type, for messages.
pub(super) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Parses a query string the way Rails does: `a[]=x` appends to an array, `a[b]=1` nests an
/// object, `a[][k]=v` builds an array of objects, `a[0][k]=v` an indexed array. A plain
/// repeated key keeps its last value.
fn parse_query(query: &str) -> Map<String, Value> {
    let mut params = Map::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key);
        let value = Value::String(percent_decode(value));
        match split_key(&key) {
            Some((base, subkeys)) => insert(&mut params, base, &subkeys, value),
            None if key.is_empty() => {}
            None => {
                params.insert(key, value);
            }
        }
    }
    params.values_mut().for_each(index_to_array);
    params
}

/// Splits `details[][email]` into `details` and `["", "email"]`. `None` for a key without
/// brackets, with malformed brackets, or nested deeper than [`MAX_KEY_DEPTH`].
fn split_key(key: &str) -> Option<(&str, Vec<&str>)> {
    let (base, mut rest) = key.split_at(key.find('[')?);
    if base.is_empty() {
        return None;
    }
    let mut subkeys = Vec::new();
    while !rest.is_empty() {
        let (subkey, after) = rest.strip_prefix('[')?.split_once(']')?;
        subkeys.push(subkey);
        rest = after;
    }
    (subkeys.len() <= MAX_KEY_DEPTH).then_some((base, subkeys))
}

/// Stores `value` at `key` + `subkeys` (Rails' `normalize_params`). A value of the wrong type
/// in the way (`a=1&a[b]=2`) is replaced, where Rails would reject the request.
fn insert(params: &mut Map<String, Value>, key: &str, subkeys: &[&str], value: Value) {
    let Some((first, rest)) = subkeys.split_first() else {
        params.insert(key.to_owned(), value);
        return;
    };
    let slot = params.entry(key).or_insert(Value::Null);
    if first.is_empty() {
        if !slot.is_array() {
            *slot = Value::Array(Vec::new());
        }
        let Value::Array(items) = slot else { return };
        let Some((next, deeper)) = rest.split_first() else {
            items.push(value);
            return;
        };
        // `a[][k]=v` fills the last element until it already holds `k`, then starts a new one.
        let fill_last = matches!(items.last(), Some(Value::Object(last)) if !has_path(last, rest));
        if !fill_last {
            items.push(Value::Object(Map::new()));
        }
        if let Some(Value::Object(last)) = items.last_mut() {
            insert(last, next, deeper, value);
        }
    } else {
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        if let Value::Object(inner) = slot {
            insert(inner, first, rest, value);
        }
    }
}

/// Whether `map` already holds a value at `path`. Paths through `[]` never count as held,
/// as in Rails, so `a[][tags][]=x&a[][tags][]=y` builds one element with two tags.
fn has_path(map: &Map<String, Value>, path: &[&str]) -> bool {
    match path.split_first() {
        Some((&"", _)) | None => false,
        Some((key, [])) => map.contains_key(*key),
        Some((key, rest)) => {
            matches!(map.get(*key), Some(Value::Object(inner)) if has_path(inner, rest))
        }
    }
}

/// Turns objects whose keys are all decimal indexes (`details[0][email]`, `details[1][email]`)
/// into arrays, ordered by index.
fn index_to_array(value: &mut Value) {
    match value {
        Value::Array(items) => items.iter_mut().for_each(index_to_array),
        Value::Object(map) => {
            map.values_mut().for_each(index_to_array);
            let indexed = !map.is_empty()
                && map
                    .keys()
                    .all(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()));
            if indexed {
                let mut entries: Vec<(u64, Value)> = std::mem::take(map)
                    .into_iter()
                    .map(|(k, v)| (k.parse().unwrap_or(u64::MAX), v))
                    .collect();
                entries.sort_by_key(|(index, _)| *index);
                *value = Value::Array(entries.into_iter().map(|(_, v)| v).collect());
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn query(q: &str) -> Value {
        Value::Object(parse_query(q))
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a+b%20c"), "a b c");
        assert_eq!(percent_decode("jane%40acme.com"), "jane@acme.com");
        assert_eq!(percent_decode("%E2%9C%93"), "✓");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
        assert_eq!(percent_decode("plain"), "plain");
    }

    #[test]
    fn plain_keys_last_one_wins() {
        assert_eq!(
            query("a=1&a=2&b&=x&&c="),
            json!({"a": "2", "b": "", "c": ""})
        );
    }

    #[test]
    fn rails_arrays_and_objects() {
        assert_eq!(
            query("person_titles[]=CEO&person_titles[]=VP+Sales&revenue_range[min]=1&revenue_range[max]=10"),
            json!({"person_titles": ["CEO", "VP Sales"], "revenue_range": {"min": "1", "max": "10"}})
        );
        assert_eq!(query("a%5B%5D=x&a%5B%5D=y"), json!({"a": ["x", "y"]}));
    }

    #[test]
    fn rails_arrays_of_objects_start_a_new_element_on_a_repeated_key() {
        assert_eq!(
            query("details[][email]=a@x.com&details[][first_name]=Ann&details[][email]=b@y.com&details[][last_name]=Bo"),
            json!({"details": [
                {"email": "a@x.com", "first_name": "Ann"},
                {"email": "b@y.com", "last_name": "Bo"},
            ]})
        );
        assert_eq!(
            query("a[][tags][]=x&a[][tags][]=y&a[][addr][city]=P&a[][addr][city]=Q"),
            json!({"a": [{"tags": ["x", "y"], "addr": {"city": "P"}}, {"addr": {"city": "Q"}}]})
        );
    }

    #[test]
    fn rails_indexed_arrays() {
        assert_eq!(
            query("details[1][email]=b@y.com&details[0][email]=a@x.com&details[0][id]=7"),
            json!({"details": [{"email": "a@x.com", "id": "7"}, {"email": "b@y.com"}]})
        );
        // A huge index does not allocate a huge array.
        assert_eq!(query("d[99999999999999999999]=x"), json!({"d": ["x"]}));
        // Top-level numeric keys stay keys.
        assert_eq!(query("0=a"), json!({"0": "a"}));
    }

    #[test]
    fn malformed_and_overdeep_keys_stay_flat() {
        assert_eq!(
            query("a[b=1&c]d=2&[x]=3"),
            json!({"a[b": "1", "c]d": "2", "[x]": "3"})
        );
        assert_eq!(query("a[b]c=1"), json!({"a[b]c": "1"}));
        let deep = format!("a{}=1", "[b]".repeat(MAX_KEY_DEPTH + 1));
        assert!(parse_query(&deep).contains_key(&deep[..deep.len() - 2]));
    }

    #[test]
    fn conflicting_shapes_replace_rather_than_fail() {
        assert_eq!(query("a=1&a[b]=2"), json!({"a": {"b": "2"}}));
        assert_eq!(query("a[b]=2&a[]=3"), json!({"a": ["3"]}));
    }

    #[test]
    fn hostile_query_strings_never_panic() {
        // A fixed xorshift sequence over the characters the parser treats specially.
        const ALPHABET: &[u8] = b"[]%&=+a0F";
        let mut state: u32 = 0x9e37_79b9;
        for _ in 0..2000 {
            let text: String = (0..40)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    char::from(ALPHABET[state as usize % ALPHABET.len()])
                })
                .collect();
            let params = RequestParams::parse(Some(&text), text.as_bytes());
            let _ = params.identifier_kinds();
        }
    }

    #[test]
    fn query_only() {
        let p = RequestParams::parse(Some("email=a%40x.com&reveal_phone_number=true"), b"");
        assert_eq!(p.get("email"), Some(&json!("a@x.com")));
        assert!(p.truthy("reveal_phone_number"));
        assert_eq!(p.note(), None);
    }

    #[test]
    fn json_only() {
        let p = RequestParams::parse(
            None,
            br#"{"details":[{"email":"a@x.com"}],"reveal_phone_number":1}"#,
        );
        assert_eq!(p.get("details"), Some(&json!([{"email": "a@x.com"}])));
        assert!(p.truthy("reveal_phone_number"));
    }

    #[test]
    fn query_wins_over_body_as_in_rails() {
        let p = RequestParams::parse(
            Some("domain=q.com&api_key=k1&page=2"),
            br#"{"domain":"b.com","per_page":5}"#,
        );
        assert_eq!(p.get("domain"), Some(&json!("q.com")));
        assert_eq!(p.get("page"), Some(&json!("2")));
        assert_eq!(p.get("per_page"), Some(&json!(5)));
        assert_eq!(p.api_key(), Some("k1"));
    }

    fn with(content_type: Option<&str>, encoding: Option<&str>, bytes: &[u8]) -> RequestParams {
        RequestParams::from_request(
            Some("a=1"),
            &RequestBody {
                content_type,
                content_encoding: encoding,
                bytes,
                max_decoded: 1 << 20,
            },
        )
    }

    #[test]
    fn form_bodies_are_read_with_rails_keys() {
        let form =
            b"details[][email]=a%40x.com&details[][email]=b%40y.com&reveal_phone_number=true";
        for content_type in [
            Some("application/x-www-form-urlencoded"),
            Some("Application/X-WWW-Form-Urlencoded; charset=UTF-8"),
            None,
        ] {
            let p = with(content_type, None, form);
            assert_eq!(p.note(), None, "{content_type:?}");
            assert_eq!(
                p.get("details"),
                Some(&json!([{"email": "a@x.com"}, {"email": "b@y.com"}]))
            );
            assert!(p.truthy("reveal_phone_number"));
            assert_eq!(p.get("a"), Some(&json!("1")));
        }
        let p = with(None, None, b"domains[]=a.com&domains[]=b.com");
        assert_eq!(p.get("domains"), Some(&json!(["a.com", "b.com"])));
    }

    #[test]
    fn json_bodies_are_read_by_media_type_or_by_their_first_byte() {
        let json = br#"{"reveal_phone_number":true,"details":[{"id":"p"}]}"#;
        for content_type in [
            Some("application/json"),
            Some("application/json; charset=utf-8"),
            Some("application/vnd.api+json"),
            None,
        ] {
            let p = with(content_type, None, json);
            assert_eq!(p.note(), None, "{content_type:?}");
            assert!(p.truthy("reveal_phone_number"), "{content_type:?}");
        }
    }

    #[test]
    fn compressed_bodies_are_decoded() -> Result<(), Box<dyn std::error::Error>> {
        use super::super::testutil::{brotli, gzip, zlib};
        let json = br#"{"reveal_phone_number":"true"}"#;
        let form = b"reveal_phone_number=true";
        for (encoding, bytes) in [
            ("gzip", gzip(json)?),
            ("deflate", zlib(json)?),
            ("br", brotli(json)?),
            ("gzip", gzip(form)?),
        ] {
            let p = with(None, Some(encoding), &bytes);
            assert_eq!(p.note(), None, "{encoding}");
            assert!(p.truthy("reveal_phone_number"), "{encoding}");
        }
        Ok(())
    }

    #[test]
    fn unreadable_bodies_say_why_and_assume_the_worst() -> Result<(), Box<dyn std::error::Error>> {
        use super::super::testutil::gzip;
        let broken = {
            let full = gzip(br#"{"details":[{"id":"p"}]}"#)?;
            full[..full.len() / 2].to_vec()
        };
        let bomb = gzip(&vec![b' '; 2 << 20])?;
        for (content_type, encoding, bytes, why) in [
            (
                Some("application/json"),
                None,
                &b"{\"a\":"[..],
                "request body is not valid JSON",
            ),
            (
                None,
                None,
                &b"[1,2]"[..],
                "request body is a JSON array, not an object",
            ),
            (
                Some("text/plain"),
                None,
                &b"x=1"[..],
                "Content-Type `text/plain`",
            ),
            (
                Some("multipart/form-data; boundary=x"),
                None,
                &b"--x"[..],
                "Content-Type `multipart/form-data`",
            ),
            (
                None,
                Some("gzip"),
                &broken[..],
                "request body could not be decoded: gzip",
            ),
            (
                None,
                Some("zstd"),
                &b"x"[..],
                "unsupported content-encoding `zstd`",
            ),
            (
                None,
                Some("sk_live_0123456789abcdef0123456789abcdef0123456789abcdef0123456789"),
                &b"x"[..],
                "unsupported content-encoding of an unrecognised form",
            ),
            (
                Some("x-key=sk_live_123"),
                None,
                &b"x"[..],
                "Content-Type of an unrecognised form",
            ),
            (
                None,
                Some("gzip"),
                &bomb[..],
                "decoded body exceeds 1 MiB cap",
            ),
        ] {
            let p = with(content_type, encoding, bytes);
            let note = p.note().unwrap_or_default();
            assert!(note.contains(why), "{why}: {note}");
            assert!(p.body_unreadable());
            // The query string is still read; every flag may have been set.
            assert_eq!(p.get("a"), Some(&json!("1")));
            assert!(p.may_be_set("reveal_phone_number"));
            assert!(!p.truthy("reveal_phone_number"));
        }
        // Empty and blank bodies are simply absent, whatever their type.
        for content_type in [Some("text/plain"), Some("application/json"), None] {
            assert_eq!(with(content_type, None, b" \r\n").note(), None);
        }
        assert_eq!(with(None, None, b"").note(), None);
        assert!(!with(None, None, b"").may_be_set("reveal_phone_number"));
        Ok(())
    }

    #[test]
    fn truthy_values() {
        let p = RequestParams::parse(
            Some("a=TRUE&b=1&c=Yes&d=false&e=0&f=&g=on"),
            br#"{"h":true,"i":1,"j":1.0,"k":2,"l":false,"m":null,"n":["true"]}"#,
        );
        for key in ["a", "b", "c", "h", "i", "j"] {
            assert!(p.truthy(key), "{key}");
        }
        for key in ["d", "e", "f", "g", "k", "l", "m", "n", "missing"] {
            assert!(!p.truthy(key), "{key}");
        }
    }

    #[test]
    fn api_key_must_be_a_non_empty_string() {
        assert_eq!(
            RequestParams::parse(None, br#"{"api_key":"k"}"#).api_key(),
            Some("k")
        );
        assert_eq!(RequestParams::parse(Some("api_key="), b"").api_key(), None);
        assert_eq!(
            RequestParams::parse(None, br#"{"api_key":5}"#).api_key(),
            None
        );
    }

    #[test]
    fn identifier_kinds_for_a_single_match() {
        let kinds = |q: &str| RequestParams::parse(Some(q), b"").identifier_kinds();
        assert_eq!(kinds("email=a%40x.com"), ["email"]);
        assert_eq!(
            kinds("hashed_email=abc&linkedin_url=http%3A%2F%2Fl"),
            ["email", "linkedin_url"]
        );
        assert_eq!(
            kinds("first_name=A&last_name=B&domain=x.com"),
            ["name+domain"]
        );
        assert_eq!(kinds("name=A+B&organization_name=Acme"), ["name+domain"]);
        assert_eq!(kinds("first_name=A&last_name=B"), ["name"]);
        assert_eq!(kinds("first_name=A&domain=x.com"), Vec::<&str>::new());
        assert_eq!(kinds("id=&email=+"), Vec::<&str>::new());
        assert_eq!(
            RequestParams::parse(None, br#"{"person_id":123,"email":"a@x.com"}"#)
                .identifier_kinds(),
            ["email", "id"]
        );
    }

    #[test]
    fn identifier_kinds_for_bulk_are_the_union_over_details() {
        let p = RequestParams::parse(
            None,
            br#"{"details":[{"email":"a@x.com"},{"id":"p1"},{"email":"b@y.com"},null,
                {"first_name":"A","last_name":"B","domain":"x.com"},{"name":"C"}]}"#,
        );
        assert_eq!(p.identifier_kinds(), ["email", "id", "name", "name+domain"]);

        let p = RequestParams::parse(Some("details[][linkedin_url]=u&details[][email]=e"), b"");
        assert_eq!(p.identifier_kinds(), ["email", "linkedin_url"]);
    }
}
