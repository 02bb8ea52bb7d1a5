//! Request bodies the way Apollo's Rails stack takes them: decompressed per `Content-Encoding`
//! (gzip, deflate, br, applied in the order listed), then read as form parameters when
//! `Content-Type` is `application/x-www-form-urlencoded` (Rails keys, as in the query string:
//! `details[][email]=…`), else as JSON. The decoded body is capped like the raw one, so a
//! small compressed body cannot expand without bound.

use std::borrow::Cow;
use std::io::Read;

use flate2::read::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use http::{HeaderMap, StatusCode};

use super::params::{self, ParamError, Params};

/// Buffer size of the brotli decoder.
const BROTLI_BUFFER_BYTES: usize = 4096;

/// Why a request body could not be read; each maps to the status Apollo's stack would answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("Content-Encoding {0:?} is not supported; use gzip, deflate or br")]
    UnsupportedEncoding(String),
    #[error("request body is not valid {encoding}: {source}")]
    Corrupt {
        encoding: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("request body is larger than {0} bytes once decompressed")]
    TooLarge(usize),
    #[error(transparent)]
    Params(#[from] ParamError),
}

impl BodyError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            BodyError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Corrupt { .. } | BodyError::Params(_) => StatusCode::BAD_REQUEST,
        }
    }

    pub(crate) fn code(&self) -> &'static str {
        match self {
            BodyError::UnsupportedEncoding(_) => "UNSUPPORTED_MEDIA_TYPE",
            BodyError::TooLarge(_) => "PAYLOAD_TOO_LARGE",
            BodyError::Corrupt { .. } | BodyError::Params(_) => "INVALID_REQUEST",
        }
    }
}

/// The parameters of a request body (none for an empty one), decoded per its headers and capped
/// at `max_bytes` once decompressed.
pub(crate) fn params(
    headers: &HeaderMap,
    body: &[u8],
    max_bytes: usize,
) -> Result<Params, BodyError> {
    let body = decode(headers, body, max_bytes)?;
    if is_form(headers) {
        let text = String::from_utf8_lossy(&body);
        return Ok(params::parse_query(text.trim())?);
    }
    Ok(params::parse_body(&body)?)
}

/// Whether the body is `application/x-www-form-urlencoded`.
fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| {
            mime.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// The body with every `Content-Encoding` undone (the last one listed was applied last).
fn decode<'a>(
    headers: &HeaderMap,
    body: &'a [u8],
    max_bytes: usize,
) -> Result<Cow<'a, [u8]>, BodyError> {
    let codings: Vec<String> = headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|coding| coding.trim().to_ascii_lowercase())
        .filter(|coding| !coding.is_empty() && coding != "identity")
        .collect();
    let mut data = Cow::Borrowed(body);
    for coding in codings.iter().rev() {
        if data.is_empty() {
            break;
        }
        let (encoding, decoded) = match coding.as_str() {
            "gzip" | "x-gzip" => ("gzip", read_capped(MultiGzDecoder::new(&*data), max_bytes)),
            // HTTP's "deflate" is zlib-wrapped; some clients send raw deflate.
            "deflate" => (
                "deflate",
                read_capped(ZlibDecoder::new(&*data), max_bytes)
                    .or_else(|_| read_capped(DeflateDecoder::new(&*data), max_bytes)),
            ),
            "br" => (
                "br",
                read_capped(
                    brotli::Decompressor::new(&*data, BROTLI_BUFFER_BYTES),
                    max_bytes,
                ),
            ),
            other => return Err(BodyError::UnsupportedEncoding(other.to_owned())),
        };
        data = Cow::Owned(decoded.map_err(|err| match err {
            Capped::TooLarge => BodyError::TooLarge(max_bytes),
            Capped::Io(source) => BodyError::Corrupt { encoding, source },
        })?);
    }
    Ok(data)
}

enum Capped {
    TooLarge,
    Io(std::io::Error),
}

/// Reads all of `reader`, refusing more than `max_bytes`.
fn read_capped(reader: impl Read, max_bytes: usize) -> Result<Vec<u8>, Capped> {
    let mut out = Vec::new();
    reader
        .take(max_bytes as u64 + 1)
        .read_to_end(&mut out)
        .map_err(Capped::Io)?;
    if out.len() > max_bytes {
        return Err(Capped::TooLarge);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use serde_json::{json, Value};
    use std::io::Write;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn brotli(data: &[u8]) -> Vec<u8> {
        let mut enc = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
        enc.write_all(data).unwrap();
        enc.into_inner()
    }

    #[test]
    fn reads_form_bodies_with_rails_keys() {
        let form = b"details[][email]=a%40x.com&details[][first_name]=Ann&details[][email]=b%40y.com&reveal_phone_number=true";
        let params = params(
            &headers(&[(
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )]),
            form,
            1 << 20,
        )
        .unwrap();
        assert_eq!(
            Value::Object(params),
            json!({
                "details": [{"email": "a@x.com", "first_name": "Ann"}, {"email": "b@y.com"}],
                "reveal_phone_number": "true",
            })
        );
    }

    #[test]
    fn undoes_every_content_encoding() {
        let json = br#"{"email":"a@b.com"}"#;
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        zlib.write_all(json).unwrap();
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        raw.write_all(json).unwrap();
        let cases: [(&'static str, Vec<u8>); 5] = [
            ("gzip", gzip(json)),
            ("deflate", zlib.finish().unwrap()),
            ("deflate", raw.finish().unwrap()),
            ("br", brotli(json)),
            ("gzip, br", brotli(&gzip(json))),
        ];
        for (coding, body) in cases {
            let params = params(&headers(&[("content-encoding", coding)]), &body, 1 << 20)
                .unwrap_or_else(|err| panic!("{coding}: {err}"));
            assert_eq!(params["email"], "a@b.com", "{coding}");
        }
        // A compressed form body.
        let form = gzip(b"email=c%40d.com");
        let params = params(
            &headers(&[
                ("content-type", "application/x-www-form-urlencoded"),
                ("content-encoding", "gzip"),
            ]),
            &form,
            1 << 20,
        )
        .unwrap();
        assert_eq!(params["email"], "c@d.com");
    }

    #[test]
    fn refuses_bad_encodings_clearly() {
        let err = params(&headers(&[("content-encoding", "zstd")]), b"x", 1 << 20).unwrap_err();
        assert_eq!(err.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(err.to_string().contains("zstd"));
        let err = params(
            &headers(&[("content-encoding", "gzip")]),
            b"not gzip",
            1 << 20,
        )
        .unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert!(err.to_string().contains("gzip"), "{err}");
        // A bomb: small on the wire, over the cap once decoded.
        let bomb = gzip(&vec![b' '; 64 * 1024]);
        let err = params(&headers(&[("content-encoding", "gzip")]), &bomb, 1024).unwrap_err();
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let ok = params(&headers(&[("content-encoding", "gzip")]), b"", 1024).unwrap();
        assert!(ok.is_empty());
    }
}
