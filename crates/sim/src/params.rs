//! Request parameters the way Apollo's Rails stack reads them.
//!
//! The query string is parsed in Rack's nested form (`person_titles[]=CEO`,
//! `revenue_range[min]=1`, `details[][email]=a&details[][email]=b` for a list of objects), into
//! the same JSON shapes a body would carry. A JSON body is then merged over it, the body winning
//! key by key. Query values stay strings, as in Rails; [`truthy`] and [`count`] read either form.

use serde_json::{Map, Value};

/// The merged parameters of one request.
pub(crate) type Params = Map<String, Value>;

/// Deeper `[…]` nesting is refused (Rack refuses past 100).
const MAX_DEPTH: usize = 32;

/// Why a request's parameters could not be read; answered with a 400.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ParamError {
    #[error("invalid query parameter `{0}`")]
    Query(String),
    #[error("request body is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("request body must be a JSON object")]
    NotAnObject,
}

/// Parses a raw (still percent-encoded) query string.
pub(crate) fn parse_query(query: &str) -> Result<Params, ParamError> {
    let mut params = Params::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(key);
        let (name, path) = split_key(&key).unwrap_or((&key, Vec::new()));
        if path.len() > MAX_DEPTH || assign(&mut params, name, &path, decode(value)).is_none() {
            return Err(ParamError::Query(key));
        }
    }
    Ok(params)
}

/// Parses a JSON body; an empty (or all-whitespace) body has no parameters.
pub(crate) fn parse_body(body: &[u8]) -> Result<Params, ParamError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Params::new());
    }
    match serde_json::from_slice(body)? {
        Value::Object(params) => Ok(params),
        _ => Err(ParamError::NotAnObject),
    }
}

/// Query parameters overlaid with body parameters.
pub(crate) fn merge(mut query: Params, body: Params) -> Params {
    query.extend(body);
    query
}

/// The trimmed value of a string parameter, if it is present and not blank.
pub(crate) fn text<'a>(params: &'a Params, key: &str) -> Option<&'a str> {
    params
        .get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|text| !text.is_empty())
}

/// Whether a flag such as `reveal_phone_number` is on: JSON `true`, a non-zero number, or one of
/// Rails' true strings (`true`, `1`, `t`, `yes`, `on`).
pub(crate) fn truthy(value: Option<&Value>) -> bool {
    match value {
        Some(Value::Bool(flag)) => *flag,
        Some(Value::Number(number)) => number.as_f64().is_some_and(|n| n != 0.0),
        Some(Value::String(text)) => ["true", "1", "t", "yes", "on"]
            .iter()
            .any(|yes| text.trim().eq_ignore_ascii_case(yes)),
        _ => false,
    }
}

/// A positive whole number given as a JSON number or a string, such as `page`.
pub(crate) fn count(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::Number(number) => number.as_u64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
    .filter(|n| *n > 0)
}

/// A list parameter: a JSON array, or Rails' indexed form (`details[0][email]=…`), an object
/// whose keys are all indexes, taken in index order.
pub(crate) fn list(value: Option<&Value>) -> Option<Vec<&Value>> {
    match value? {
        Value::Array(items) => Some(items.iter().collect()),
        Value::Object(indexed) => {
            let mut items = indexed
                .iter()
                .map(|(index, item)| Some((index.parse::<usize>().ok()?, item)))
                .collect::<Option<Vec<_>>>()?;
            items.sort_by_key(|(index, _)| *index);
            Some(items.into_iter().map(|(_, item)| item).collect())
        }
        _ => None,
    }
}

/// One `[…]` step of a nested key.
#[derive(Debug, PartialEq)]
enum Step<'a> {
    /// `[name]`: a key of an object.
    Key(&'a str),
    /// `[]`: the next element of a list.
    Push,
}

/// `"a[b][]"` → `("a", [Key("b"), Push])`; `None` when the brackets are malformed, in which case
/// the whole key is a plain name, as Rack treats it.
fn split_key(key: &str) -> Option<(&str, Vec<Step<'_>>)> {
    let Some(open) = key.find('[').filter(|open| *open > 0) else {
        return Some((key, Vec::new()));
    };
    let (name, mut rest) = key.split_at(open);
    let mut path = Vec::new();
    while !rest.is_empty() {
        let (inner, after) = rest.strip_prefix('[')?.split_once(']')?;
        path.push(if inner.is_empty() {
            Step::Push
        } else {
            Step::Key(inner)
        });
        rest = after;
    }
    Some((name, path))
}

/// Stores `value` at `name` + `path` in Rack's way; `None` when the key contradicts the shape an
/// earlier parameter gave it (`a=1&a[b]=2`).
fn assign(map: &mut Params, name: &str, path: &[Step<'_>], value: String) -> Option<()> {
    match path {
        [] => {
            map.insert(name.to_owned(), Value::String(value));
        }
        [Step::Push] => list_at(map, name)?.push(Value::String(value)),
        [Step::Push, Step::Key(child), rest @ ..] => {
            // `details[][email]=a&details[][name]=b` fills one object; a key the last object
            // already has starts the next one.
            let items = list_at(map, name)?;
            let fits_last =
                matches!(items.last(), Some(Value::Object(last)) if !has_path(last, child, rest));
            if !fits_last {
                items.push(Value::Object(Params::new()));
            }
            let Some(Value::Object(last)) = items.last_mut() else {
                return None;
            };
            assign(last, child, rest, value)?;
        }
        [Step::Push, Step::Push, ..] => return None,
        [Step::Key(child), rest @ ..] => {
            let entry = map
                .entry(name)
                .or_insert_with(|| Value::Object(Params::new()));
            let Value::Object(inner) = entry else {
                return None;
            };
            assign(inner, child, rest, value)?;
        }
    }
    Some(())
}

fn list_at<'a>(map: &'a mut Params, name: &str) -> Option<&'a mut Vec<Value>> {
    map.entry(name)
        .or_insert_with(|| Value::Array(Vec::new()))
        .as_array_mut()
}

/// Whether `map` already holds `child` + `rest` (Rack's `params_hash_has_key?`).
fn has_path(map: &Params, child: &str, rest: &[Step<'_>]) -> bool {
    let mut value = map.get(child);
    for step in rest {
        value = match step {
            Step::Key(key) => value.and_then(|v| v.get(*key)),
            Step::Push => return false,
        };
    }
    value.is_some()
}

/// Percent-decoding with `+` as a space; malformed escapes stay as they are.
fn decode(text: &str) -> String {
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        rest = tail;
        match byte {
            b'+' => out.push(b' '),
            b'%' => match escaped(tail) {
                Some(decoded) => {
                    out.push(decoded);
                    rest = tail.get(2..).unwrap_or_default();
                }
                None => out.push(b'%'),
            },
            _ => out.push(byte),
        }
    }
    String::from_utf8(out)
        .unwrap_or_else(|invalid| String::from_utf8_lossy(invalid.as_bytes()).into_owned())
}

/// The byte of the two hex digits that start `tail`.
fn escaped(tail: &[u8]) -> Option<u8> {
    let hex = |byte: u8| char::from(byte).to_digit(16);
    match tail {
        [high, low, ..] => u8::try_from(hex(*high)? << 4 | hex(*low)?).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn query(text: &str) -> Value {
        Value::Object(parse_query(text).unwrap())
    }

    #[test]
    fn parses_plain_and_encoded_values() {
        assert_eq!(
            query("domain=acme.com&name=Ada+Lovelace&email=ada%40acme.com&flag"),
            json!({"domain": "acme.com", "name": "Ada Lovelace", "email": "ada@acme.com", "flag": ""})
        );
        assert_eq!(
            query("a=%zz%4&b=%e2%9c%93"),
            json!({"a": "%zz%4", "b": "✓"})
        );
        assert_eq!(query("a=1&a=2"), json!({"a": "2"}));
        assert_eq!(query(""), json!({}));
    }

    #[test]
    fn parses_rails_lists_and_hashes() {
        assert_eq!(
            query("person_titles[]=CEO&person_titles[]=CTO&revenue_range[min]=1&revenue_range[max]=10"),
            json!({"person_titles": ["CEO", "CTO"], "revenue_range": {"min": "1", "max": "10"}})
        );
        assert_eq!(
            query("person_titles%5B%5D=VP+Sales"),
            json!({"person_titles": ["VP Sales"]})
        );
        assert_eq!(query("a[b][c]=1"), json!({"a": {"b": {"c": "1"}}}));
    }

    #[test]
    fn parses_lists_of_objects_like_rack() {
        assert_eq!(
            query("details[][email]=a@x.com&details[][first_name]=Ann&details[][email]=b@y.com&details[][email]=c@z.com"),
            json!({"details": [
                {"email": "a@x.com", "first_name": "Ann"},
                {"email": "b@y.com"},
                {"email": "c@z.com"},
            ]})
        );
        assert_eq!(
            query("d[][a][x]=1&d[][a][y]=2&d[][a][x]=3"),
            json!({"d": [{"a": {"x": "1", "y": "2"}}, {"a": {"x": "3"}}]})
        );
    }

    #[test]
    fn reads_lists_as_arrays_or_indexed_objects() {
        let params = query("d[1][email]=b&d[0][email]=a&d[10][email]=c&x[a]=1&s=v");
        let emails: Vec<&Value> = list(params.get("d"))
            .unwrap()
            .into_iter()
            .map(|item| &item["email"])
            .collect();
        assert_eq!(emails, [&json!("a"), &json!("b"), &json!("c")]);
        assert_eq!(list(Some(&json!(["a"]))).unwrap(), [&json!("a")]);
        assert!(list(params.get("x")).is_none());
        assert!(list(params.get("s")).is_none());
        assert!(list(None).is_none());
    }

    #[test]
    fn malformed_brackets_are_plain_names() {
        assert_eq!(
            query("a[b=1&[c]=2&d]=3"),
            json!({"a[b": "1", "[c]": "2", "d]": "3"})
        );
    }

    #[test]
    fn rejects_contradictory_shapes() {
        for bad in ["a=1&a[b]=2", "a=1&a[]=2", "a[b]=1&a[]=2", "a[][]=1"] {
            assert!(
                matches!(parse_query(bad), Err(ParamError::Query(_))),
                "{bad}"
            );
        }
        let deep = format!("a{}=1", "[b]".repeat(MAX_DEPTH + 1));
        assert!(parse_query(&deep).is_err());
    }

    #[test]
    fn body_overrides_query_key_by_key() {
        let merged = merge(
            parse_query("page=1&api_key=q").unwrap(),
            parse_body(br#"{"page": 3, "per_page": 10}"#).unwrap(),
        );
        assert_eq!(
            Value::Object(merged),
            json!({"page": 3, "per_page": 10, "api_key": "q"})
        );
        assert!(parse_body(b"  \n").unwrap().is_empty());
        assert!(matches!(parse_body(b"{\"a\":"), Err(ParamError::Json(_))));
        assert!(matches!(parse_body(b"[1]"), Err(ParamError::NotAnObject)));
    }

    #[test]
    fn reads_flags_and_counts_in_either_form() {
        for yes in [
            json!(true),
            json!("true"),
            json!("1"),
            json!(" TRUE "),
            json!(1),
        ] {
            assert!(truthy(Some(&yes)), "{yes}");
        }
        for no in [
            json!(false),
            json!("false"),
            json!("0"),
            json!(0),
            json!(null),
        ] {
            assert!(!truthy(Some(&no)), "{no}");
        }
        assert!(!truthy(None));
        assert_eq!(count(Some(&json!(3))), Some(3));
        assert_eq!(count(Some(&json!("7"))), Some(7));
        assert_eq!(count(Some(&json!(0))), None);
        assert_eq!(count(Some(&json!(-2))), None);
        assert_eq!(count(Some(&json!("x"))), None);
    }
}
