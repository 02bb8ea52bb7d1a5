//! One sim answer and its bytes on the wire: a JSON body (or Apollo's plain-text 401), gzip when
//! the caller accepts it, and always an exact `content-length`.

use std::io::Write;

use bytes::Bytes;
use flate2::{write::GzEncoder, Compression};
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, VARY};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

const JSON: &str = "application/json; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// A status, extra headers and a body, not yet encoded.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    body: Payload,
}

#[derive(Debug)]
enum Payload {
    Json(Value),
    Text(&'static str),
}

impl Reply {
    pub(crate) fn json(status: StatusCode, body: Value) -> Self {
        Self {
            status,
            headers: HeaderMap::new(),
            body: Payload::Json(body),
        }
    }

    pub(crate) fn text(status: StatusCode, body: &'static str) -> Self {
        Self {
            status,
            headers: HeaderMap::new(),
            body: Payload::Text(body),
        }
    }

    /// Apollo's error shape for a refused request: `{"error": …, "error_code": …}`.
    pub(crate) fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self::json(status, json!({"error": message.into(), "error_code": code}))
    }

    /// `404 {"error":"Not Found"}`.
    pub(crate) fn not_found() -> Self {
        Self::json(StatusCode::NOT_FOUND, json!({"error": "Not Found"}))
    }

    /// The JSON body, for tests that inspect an answer before encoding.
    #[cfg(test)]
    pub(crate) fn body(&self) -> &Value {
        match &self.body {
            Payload::Json(value) => value,
            Payload::Text(_) => &Value::Null,
        }
    }

    /// Encodes the body, gzipped if `gzip`.
    pub(crate) fn into_response(self, gzip: bool) -> Response<Full<Bytes>> {
        let (content_type, plain) = match self.body {
            Payload::Json(value) => (JSON, value.to_string().into_bytes()),
            Payload::Text(text) => (TEXT, text.as_bytes().to_vec()),
        };
        let compressed = if gzip {
            compress(&plain)
                .inspect_err(
                    |err| tracing::debug!(error = %err, "gzip failed, answering uncompressed"),
                )
                .ok()
        } else {
            None
        };
        let mut headers = self.headers;
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(VARY, HeaderValue::from_static("accept-encoding"));
        if compressed.is_some() {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        let body = compressed.unwrap_or(plain);
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = self.status;
        *response.headers_mut() = headers;
        response
    }
}

fn compress(plain: &[u8]) -> std::io::Result<Vec<u8>> {
    // The fastest level: the sim is a benchmark upstream, and ratios barely differ on JSON.
    let mut encoder = GzEncoder::new(Vec::with_capacity(plain.len() / 4), Compression::fast());
    encoder.write_all(plain)?;
    encoder.finish()
}

/// Whether `Accept-Encoding` allows gzip (`gzip`, `x-gzip` or `*`, with a non-zero `q`).
pub(crate) fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or_default();
            let quality = parts
                .find_map(|param| param.strip_prefix("q="))
                .map_or(Some(1.0), |q| q.parse::<f32>().ok());
            ["gzip", "x-gzip", "*"]
                .iter()
                .any(|name| coding.eq_ignore_ascii_case(name))
                && quality.is_some_and(|q| q > 0.0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::io::Read;

    fn accept(value: &str) -> bool {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_str(value).unwrap(),
        );
        accepts_gzip(&headers)
    }

    #[test]
    fn reads_accept_encoding() {
        assert!(accept("gzip"));
        assert!(accept("br, GZIP;q=0.5"));
        assert!(accept("deflate, *"));
        assert!(!accept("gzip;q=0"));
        assert!(!accept("br, deflate"));
        assert!(!accept("identity"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[tokio::test]
    async fn gzips_with_an_exact_length() {
        let body = json!({"organizations": vec!["x".repeat(100); 50]});
        let response = Reply::json(StatusCode::OK, body.clone()).into_response(true);
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(headers[CONTENT_ENCODING], "gzip");
        assert_eq!(headers[CONTENT_TYPE], JSON);
        assert_eq!(headers[CONTENT_LENGTH], bytes.len().to_string().as_str());
        let mut plain = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut plain)
            .unwrap();
        assert_eq!(serde_json::from_str::<Value>(&plain).unwrap(), body);
    }

    #[tokio::test]
    async fn text_stays_identity_without_gzip() {
        let response = Reply::text(StatusCode::UNAUTHORIZED, "nope").into_response(false);
        assert_eq!(response.headers()[CONTENT_TYPE], TEXT);
        assert_eq!(response.headers()[CONTENT_LENGTH], "4");
        assert!(response.headers().get(CONTENT_ENCODING).is_none());
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"nope");
    }
}
