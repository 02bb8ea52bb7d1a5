//! Requests as a caller sends them through creditmeter, one builder for every test file: the
//! Apollo key, the attribution headers (`x-meter-table`, `-workflow`, `-tag-*`), a JSON body.
//!
//! ```ignore
//! let (status, headers, body) = Call::post(proxy.url("/api/v1/people/match"))
//!     .key("test-key")
//!     .table("Inbound")
//!     .json(r#"{"email":"ada@example.com"}"#)
//!     .send()
//!     .await;
//! ```

use bytes::Bytes;
use http_body_util::Full;

use super::{client, send};

/// A request being built. Headers go out in the order they were added.
pub struct Call {
    builder: http::request::Builder,
    body: Bytes,
}

impl Call {
    pub fn new(method: http::Method, url: impl AsRef<str>) -> Call {
        Call {
            builder: http::Request::builder().method(method).uri(url.as_ref()),
            body: Bytes::new(),
        }
    }

    pub fn post(url: impl AsRef<str>) -> Call {
        Call::new(http::Method::POST, url)
    }

    pub fn get(url: impl AsRef<str>) -> Call {
        Call::new(http::Method::GET, url)
    }

    /// Any header, as bytes (a test may send what a client should not).
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Call {
        let value = http::HeaderValue::from_bytes(value.as_ref()).unwrap();
        self.builder = self.builder.header(name, value);
        self
    }

    /// The caller's Apollo key, `x-api-key`.
    pub fn key(self, key: &str) -> Call {
        self.header("x-api-key", key)
    }

    /// `x-meter-table`.
    pub fn table(self, table: &str) -> Call {
        self.header("x-meter-table", table)
    }

    /// `x-meter-workflow`.
    pub fn workflow(self, workflow: &str) -> Call {
        self.header("x-meter-workflow", workflow)
    }

    /// `x-meter-tag-<name>`.
    pub fn tag(self, name: &str, value: &str) -> Call {
        self.header(&format!("x-meter-tag-{name}"), value)
    }

    /// `content-type: application/json`, without setting the body.
    pub fn json_type(self) -> Call {
        self.header("content-type", "application/json")
    }

    /// A JSON body, with its `content-type`.
    pub fn json(self, body: impl Into<Bytes>) -> Call {
        self.json_type().body(body)
    }

    /// A body, with no `content-type` added.
    pub fn body(mut self, body: impl Into<Bytes>) -> Call {
        self.body = body.into();
        self
    }

    /// The headers so far, for a test that adds what this builder does not know.
    pub fn builder(self) -> http::request::Builder {
        self.builder
    }

    pub fn build(self) -> http::Request<Full<Bytes>> {
        self.builder.body(Full::new(self.body)).unwrap()
    }

    /// Sends it on a fresh client: status, headers and the whole body.
    pub async fn send(self) -> (http::StatusCode, http::HeaderMap, Bytes) {
        send(&client(), self.build()).await
    }
}

/// The ledger `request_id` creditmeter answered with (`x-meter-request-id`), or "".
pub fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get("x-meter-request-id")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}
