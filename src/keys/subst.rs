//! Where a call carries an API key, and swapping a virtual key for the real one in each place:
//! `X-Api-Key`, `Authorization: Bearer …`, `api_key` in the query string, and `api_key` in a
//! JSON or form-encoded body. Everything else in the request stays byte for byte as sent; a
//! rewritten body gets its `Content-Length` from its new length when it is forwarded.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};

use crate::ledger::keys::KEY_PREFIX;

/// A place an API key may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    XApiKey,
    Bearer,
    Query,
    JsonBody,
    FormBody,
}

impl Location {
    /// How a caller would name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Location::XApiKey => "X-Api-Key",
            Location::Bearer => "Authorization",
            Location::Query => "api_key (query)",
            Location::JsonBody => "api_key (JSON body)",
            Location::FormBody => "api_key (form body)",
        }
    }
}

/// Whether `key` has the shape of a virtual key.
pub fn is_virtual(key: &str) -> bool {
    key.starts_with(KEY_PREFIX)
}

fn bearer(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            let token = token.trim();
            (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
        })
        .collect()
}

fn decode(s: &str) -> String {
    String::from_utf8_lossy(&creditmeter_base::percent::percent_decode_bytes(s)).into_owned()
}

/// `name=value` pairs of a query string or form body whose name decodes to `api_key`.
fn api_key_pairs(text: &str) -> Vec<String> {
    text.split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (decode(k) == "api_key").then(|| decode(v).trim().to_owned())
        })
        .filter(|v| !v.is_empty())
        .collect()
}

fn is_form(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|c| {
        c.split(';').next().is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
    })
}

/// What kind of body the request has, for reading and rewriting its `api_key`.
fn body_kind(content_type: Option<&str>, body: &[u8]) -> Option<Location> {
    if body.is_empty() {
        None
    } else if is_form(content_type) {
        Some(Location::FormBody)
    } else {
        Some(Location::JsonBody)
    }
}

/// Every API key the request carries where creditmeter reads keys, with where it was.
/// `body` is read only when it is not content-encoded.
pub fn presented(
    headers: &HeaderMap,
    query: Option<&str>,
    body: &[u8],
    encoded: bool,
) -> Vec<(Location, String)> {
    let mut out = Vec::new();
    for v in headers.get_all("x-api-key") {
        if let Ok(v) = v.to_str() {
            let v = v.trim();
            if !v.is_empty() {
                out.push((Location::XApiKey, v.to_owned()));
            }
        }
    }
    out.extend(bearer(headers).into_iter().map(|t| (Location::Bearer, t)));
    if let Some(q) = query {
        out.extend(api_key_pairs(q).into_iter().map(|v| (Location::Query, v)));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if !encoded {
        match body_kind(content_type, body) {
            Some(Location::FormBody) => {
                if let Ok(text) = std::str::from_utf8(body) {
                    out.extend(
                        api_key_pairs(text)
                            .into_iter()
                            .map(|v| (Location::FormBody, v)),
                    );
                }
            }
            Some(_) => {
                if let Ok(serde_json::Value::Object(m)) =
                    serde_json::from_slice::<serde_json::Value>(body)
                {
                    if let Some(serde_json::Value::String(k)) = m.get("api_key") {
                        if !k.trim().is_empty() {
                            out.push((Location::JsonBody, k.trim().to_owned()));
                        }
                    }
                }
            }
            None => {}
        }
    }
    out
}

/// Why a virtual key could not be swapped out of a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubstError {
    #[error("the {0} holds the virtual key in an escaped form creditmeter does not rewrite; send it as plain text")]
    Escaped(&'static str),
    #[error(
        "the real Apollo key cannot be sent in a header (it holds characters a header may not)"
    )]
    BadHeader,
}

/// `X-Api-Key` and `Authorization: Bearer` values that are virtual keys become `real`.
pub fn replace_headers(headers: &mut HeaderMap, real: &str) -> Result<(), SubstError> {
    let has_virtual_key = headers
        .get_all("x-api-key")
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| is_virtual(v.trim())));
    if has_virtual_key {
        let v = HeaderValue::from_str(real).map_err(|_| SubstError::BadHeader)?;
        headers.insert("x-api-key", v);
    }
    if bearer(headers).iter().any(|t| is_virtual(t)) {
        let v =
            HeaderValue::from_str(&format!("Bearer {real}")).map_err(|_| SubstError::BadHeader)?;
        headers.insert(header::AUTHORIZATION, v);
    }
    Ok(())
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The query string with every `api_key` pair holding a virtual key given `real` instead;
/// every other pair is kept as sent.
pub fn replace_query(query: &str, real: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if decode(k) == "api_key" && is_virtual(decode(v).trim()) => {
                format!("{k}={}", pct(real))
            }
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The body with the virtual key replaced by `real` wherever it appears: a JSON string's
/// content or a form value. The key is 52 plain ASCII characters, so it appears literally in
/// any body that carries it readably; a body where it does not (JSON `\u` escapes, percent
/// escapes) is refused rather than forwarded with the virtual key in it.
pub fn replace_body(
    body: &Bytes,
    headers: &HeaderMap,
    virtual_key: &str,
    real: &str,
) -> Result<Bytes, SubstError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let kind = body_kind(content_type, body);
    let replacement = match kind {
        Some(Location::FormBody) => pct(real),
        Some(_) => {
            let quoted = serde_json::to_string(real).unwrap_or_default();
            quoted
                .strip_prefix('"')
                .and_then(|s| s.strip_suffix('"'))
                .unwrap_or(&quoted)
                .to_owned()
        }
        None => return Ok(body.clone()),
    };
    let needle = virtual_key.as_bytes();
    let finder = memchr::memmem::Finder::new(needle);
    let mut out = Vec::with_capacity(body.len() + replacement.len());
    let mut at = 0;
    let mut found = false;
    while let Some(i) = finder.find(&body[at..]) {
        out.extend_from_slice(&body[at..at + i]);
        out.extend_from_slice(replacement.as_bytes());
        at += i + needle.len();
        found = true;
    }
    if !found {
        return Err(SubstError::Escaped(kind.map_or("body", Location::as_str)));
    }
    out.extend_from_slice(&body[at..]);
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VK: &str = "cmk_0123456789abcdef0123456789abcdef0123456789abcdef";

    fn hdrs(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn every_place_is_found() {
        let h = hdrs(&[
            ("x-api-key", VK),
            ("authorization", &format!("Bearer {VK}")),
            ("content-type", "application/json"),
        ]);
        let body = format!(r#"{{"api_key": "{VK}", "email": "a@b.c"}}"#);
        let p = presented(
            &h,
            Some(&format!("a=1&api%5Fkey={VK}")),
            body.as_bytes(),
            false,
        );
        let places: Vec<Location> = p.iter().map(|(l, _)| *l).collect();
        assert_eq!(
            places,
            [
                Location::XApiKey,
                Location::Bearer,
                Location::Query,
                Location::JsonBody
            ]
        );
        assert!(p.iter().all(|(_, v)| v == VK));
        let form = hdrs(&[(
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8",
        )]);
        let p = presented(
            &form,
            None,
            format!("email=x&api_key={VK}").as_bytes(),
            false,
        );
        assert_eq!(p, [(Location::FormBody, VK.to_owned())]);
        // An encoded body is not read.
        assert!(presented(&hdrs(&[]), None, body.as_bytes(), true).is_empty());
    }

    #[test]
    fn replacements_keep_everything_else() {
        let mut h = hdrs(&[("x-api-key", VK), ("accept", "application/json")]);
        replace_headers(&mut h, "real-key").unwrap();
        assert_eq!(h.get("x-api-key").unwrap(), "real-key");
        assert_eq!(h.get("accept").unwrap(), "application/json");
        let mut h = hdrs(&[("authorization", &format!("bearer {VK}"))]);
        replace_headers(&mut h, "real-key").unwrap();
        assert_eq!(h.get("authorization").unwrap(), "Bearer real-key");

        assert_eq!(
            replace_query(&format!("b=%2F&api_key={VK}&c"), "r e/al"),
            "b=%2F&api_key=r%20e%2Fal&c"
        );

        let json = hdrs(&[("content-type", "application/json")]);
        let body = Bytes::from(format!("{{\"api_key\":\"{VK}\",  \"x\": [1, 2]}}"));
        let out = replace_body(&body, &json, VK, "re\"al").unwrap();
        assert_eq!(&out[..], br#"{"api_key":"re\"al",  "x": [1, 2]}"#);
        let form = hdrs(&[("content-type", "application/x-www-form-urlencoded")]);
        let body = Bytes::from(format!("api_key={VK}&q=a+b"));
        let out = replace_body(&body, &form, VK, "r&k").unwrap();
        assert_eq!(&out[..], b"api_key=r%26k&q=a+b");
        // Escaped in JSON: refused, never forwarded with the virtual key.
        let escaped = Bytes::from(format!("{{\"api_key\":\"\\u0063{}\"}}", &VK[1..]));
        assert!(replace_body(&escaped, &json, VK, "real").is_err());
    }
}
