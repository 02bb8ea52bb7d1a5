//! The proxy's TLS certificate, reloaded without a restart.
//!
//! certbot and cert-manager renew certificates in place: certbot points `live/…/fullchain.pem`
//! at a new file in `archive/`, cert-manager swaps the Secret volume's `..data` symlink.
//! [`ReloadingCert`] is rustls's certificate resolver: every handshake takes the pair in force
//! at that moment, so connections already open keep the session they negotiated and new ones
//! get the new certificate. The pair is reloaded on SIGHUP and whenever the files' modification
//! time, inode or size changes (checked every `proxy.tls_reload_interval`, following
//! symlinks). A pair that does not load (half-written, key not matching the certificate) is
//! refused with the reason logged, and the old one stays in force; the next change is tried
//! again. `creditmeter_tls_reloads_total{result}` counts both.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::limits::EdgeMetrics;
use super::listener::TlsSetupError;

/// What identifies one version of the two files.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    files: [(Option<SystemTime>, u64, u64); 2],
}

fn file_stamp(p: &Path) -> (Option<SystemTime>, u64, u64) {
    match std::fs::metadata(p) {
        Ok(m) => {
            #[cfg(unix)]
            let ino = std::os::unix::fs::MetadataExt::ino(&m);
            #[cfg(not(unix))]
            let ino = 0;
            (m.modified().ok(), ino, m.len())
        }
        // A file missing for a moment (mid-rename) reads as its own stamp; the next check
        // sees the new file.
        Err(_) => (None, 0, 0),
    }
}

/// Reads a PEM certificate chain and private key.
pub fn read_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsSetupError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsSetupError::Cert {
            path: cert.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCert {
            path: cert.display().to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsSetupError::Key {
        path: key.display().to_string(),
        source,
    })?;
    Ok((certs, key))
}

/// The crypto provider of every TLS server here.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads the pair and checks that the key belongs to the certificate.
fn load_certified(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsSetupError> {
    let (certs, key) = read_pair(cert, key)?;
    CertifiedKey::from_der(certs, key, &provider()).map_err(TlsSetupError::Pair)
}

/// A TLS acceptor around `resolver`: TLS 1.2 and 1.3 only, ALPN h2 then http/1.1.
pub fn acceptor_with(resolver: Arc<dyn ResolvesServerCert>) -> Result<TlsAcceptor, TlsSetupError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsSetupError::Pair)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The certificate resolver that reloads its pair (see the module docs).
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files as last tried, loaded or not: a bad pair is reported once per change.
    tried: Mutex<Stamp>,
    metrics: Option<EdgeMetrics>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Loads the pair; an error here stops start-up.
    pub fn load(
        cert: &Path,
        key: &Path,
        metrics: Option<EdgeMetrics>,
    ) -> Result<Arc<ReloadingCert>, TlsSetupError> {
        let stamp = Self::stamp_of(cert, key);
        let pair = load_certified(cert, key)?;
        Ok(Arc::new(ReloadingCert {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Arc::new(pair)),
            tried: Mutex::new(stamp),
            metrics,
        }))
    }

    fn stamp_of(cert: &Path, key: &Path) -> Stamp {
        Stamp {
            files: [file_stamp(cert), file_stamp(key)],
        }
    }

    /// The end-entity certificate in force now (DER).
    pub fn current_leaf(&self) -> Option<CertificateDer<'static>> {
        self.pair().cert.first().cloned()
    }

    fn pair(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reloads the pair now (SIGHUP), whether or not the files look changed. On error the
    /// pair in force stays.
    pub fn reload(&self) -> Result<(), TlsSetupError> {
        let stamp = Self::stamp_of(&self.cert, &self.key);
        self.try_load(stamp)
    }

    /// Reloads the pair if the files changed since the last try; `None` when they did not.
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsSetupError>> {
        let stamp = Self::stamp_of(&self.cert, &self.key);
        let unchanged = match self.tried.lock() {
            Ok(t) => *t == stamp,
            Err(poisoned) => *poisoned.into_inner() == stamp,
        };
        (!unchanged).then(|| self.try_load(stamp))
    }

    fn try_load(&self, stamp: Stamp) -> Result<(), TlsSetupError> {
        match self.tried.lock() {
            Ok(mut t) => *t = stamp,
            Err(poisoned) => *poisoned.into_inner() = stamp,
        }
        let loaded = load_certified(&self.cert, &self.key);
        let result = if loaded.is_ok() { "ok" } else { "error" };
        if let Some(m) = &self.metrics {
            m.tls_reloads.with_label_values(&[result]).inc();
        }
        let pair = loaded?;
        match self.current.write() {
            Ok(mut c) => *c = Arc::new(pair),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(pair),
        }
        Ok(())
    }

    /// Logs a reload's outcome.
    pub fn log(&self, why: &str, result: &Result<(), TlsSetupError>) {
        match result {
            Ok(()) => tracing::info!(
                cert = %self.cert.display(),
                why,
                "TLS certificate reloaded; new connections use it, open ones keep theirs"
            ),
            Err(e) => tracing::error!(
                error = %e,
                why,
                "TLS certificate reload refused; the previous certificate stays in force"
            ),
        }
    }

    /// Checks the files every `every` until `stop`, reloading on a change.
    pub async fn watch(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let this = self.clone();
            if let Ok(Some(result)) =
                tokio::task::spawn_blocking(move || this.reload_if_changed()).await
            {
                self.log("the certificate or key file changed", &result);
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pair())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        // Written beside and renamed over, as certbot and cert-manager do.
        std::fs::write(dir.join("cert.tmp"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.tmp"), key.serialize_pem()).unwrap();
        std::fs::rename(dir.join("cert.tmp"), &c).unwrap();
        std::fs::rename(dir.join("key.tmp"), &k).unwrap();
        (c, k, cert.der().to_vec())
    }

    #[test]
    fn a_changed_pair_is_loaded_and_a_broken_one_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k, first) = write_pair(dir.path(), "a.example");
        let r = ReloadingCert::load(&c, &k, None).unwrap();
        assert_eq!(r.current_leaf().unwrap().as_ref(), &first[..]);
        assert!(r.reload_if_changed().is_none(), "nothing changed");

        let (_, _, second) = write_pair(dir.path(), "b.example");
        r.reload_if_changed().unwrap().unwrap();
        assert_eq!(r.current_leaf().unwrap().as_ref(), &second[..]);

        // A key that does not match the certificate: refused, the second pair stays.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&k, other.serialize_pem()).unwrap();
        let e = r.reload_if_changed().unwrap().unwrap_err().to_string();
        assert!(e.contains("usable pair"), "{e}");
        assert_eq!(r.current_leaf().unwrap().as_ref(), &second[..]);
        assert!(r.reload_if_changed().is_none(), "reported once per change");
        // Junk in the certificate file: refused too.
        std::fs::write(&c, "not a certificate").unwrap();
        assert!(r.reload().is_err());
        assert_eq!(r.current_leaf().unwrap().as_ref(), &second[..]);
    }
}
