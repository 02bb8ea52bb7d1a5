//! The upstream client: pooled hyper-util client over hyper-rustls (ring), HTTP/1.1 and h2 by
//! ALPN, trusting webpki's roots plus an optional extra CA. It only ever talks to the configured
//! base URL: request URIs are built here from the base and the caller's path.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::config::UpstreamConfig;

/// Why the upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream.ca_file {path}: {source}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("upstream.ca_file {path}: no certificate in the file")]
    CaFileEmpty { path: PathBuf },
    #[error("upstream.ca_file {path}: certificate rejected: {source}")]
    CaCert {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS client setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// The pooled client and the one destination it may reach. Clones share the pool.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    scheme: Scheme,
    authority: Authority,
    /// The base URL's path without a trailing slash ("" for a bare host).
    base_path: String,
}

impl Upstream {
    /// Builds the client for `base` (already validated by the config).
    pub fn new(cfg: &UpstreamConfig, base: &Uri) -> Result<Upstream, UpstreamError> {
        let mut roots =
            rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &cfg.ca_file {
            add_ca_file(&mut roots, path)?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout.0));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout.0)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);

        let scheme = base.scheme().cloned().unwrap_or(Scheme::HTTPS);
        let authority = base
            .authority()
            .cloned()
            .unwrap_or_else(|| Authority::from_static("api.apollo.io"));
        let base_path = base.path().trim_end_matches('/').to_owned();
        Ok(Upstream {
            client,
            scheme,
            authority,
            base_path,
        })
    }

    /// The upstream URI for a caller's path and (already stripped) query.
    pub fn uri_for(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let mut pq = String::with_capacity(
            self.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        pq.push_str(&self.base_path);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(PathAndQuery::try_from(pq)?)
            .build()
    }

    /// Sends one request on the pool.
    pub fn request(
        &self,
        req: http::Request<Full<Bytes>>,
    ) -> hyper_util::client::legacy::ResponseFuture {
        self.client.request(req)
    }
}

fn add_ca_file(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), UpstreamError> {
    let mut n = 0;
    for cert in CertificateDer::pem_file_iter(path).map_err(|source| UpstreamError::CaFile {
        path: path.to_owned(),
        source,
    })? {
        let cert = cert.map_err(|source| UpstreamError::CaFile {
            path: path.to_owned(),
            source,
        })?;
        roots.add(cert).map_err(|source| UpstreamError::CaCert {
            path: path.to_owned(),
            source,
        })?;
        n += 1;
    }
    if n == 0 {
        return Err(UpstreamError::CaFileEmpty {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// An error and its sources, one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let msg = src.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = src.source();
    }
    s
}
