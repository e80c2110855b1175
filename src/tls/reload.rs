//! A certificate set that can be re-read from its files while serving.

use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::certificates::{CertificateFiles, Certificates};
use crate::error::Error;

/// [`Certificates`] loaded from files, swapped for a fresh load on [`reload`](Self::reload);
/// a rustls certificate resolver, so one `ServerConfig` serves across reloads.
///
/// ```no_run
/// use backhaul::tls::{CertificateFiles, ReloadableCertificates, HTTP_ALPN};
///
/// let certificates = ReloadableCertificates::load(vec![
///     CertificateFiles::new("/etc/relay/site.pem", "/etc/relay/site.key"),
/// ])?;
/// let config = certificates.server_config(&HTTP_ALPN);
/// // … on SIGHUP:
/// if let Err(error) = certificates.reload() {
///     eprintln!("kept the previous certificates: {error}");
/// }
/// # let _ = config;
/// # Ok::<(), backhaul::Error>(())
/// ```
#[derive(Debug)]
pub struct ReloadableCertificates {
    files: Vec<CertificateFiles>,
    current: RwLock<Arc<Certificates>>,
}

impl ReloadableCertificates {
    /// Loads `files` (see [`Certificates::from_files`]).
    ///
    /// # Errors
    /// [`Error::Certificate`] for the first file that cannot be used, or when `files` is
    /// empty.
    pub fn load(files: Vec<CertificateFiles>) -> Result<Arc<Self>, Error> {
        let certificates = load(&files)?;
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(Arc::new(certificates)),
        }))
    }

    /// Re-reads every file. On success, new handshakes use the new set (established
    /// connections are unaffected) and the count of certificates is returned; on failure
    /// the current set stays.
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn reload(&self) -> Result<usize, Error> {
        let certificates = Arc::new(load(&self.files)?);
        let count = certificates.len();
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = certificates;
        Ok(count)
    }

    /// The set in use now.
    #[must_use]
    pub fn current(&self) -> Arc<Certificates> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// A rustls server configuration that resolves certificates through this set and
    /// offers `alpn` (e.g. [`HTTP_ALPN`](super::HTTP_ALPN)).
    #[must_use]
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the default protocol versions are supported")
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
        Arc::new(config)
    }
}

impl ResolvesServerCert for ReloadableCertificates {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current().choose(client_hello.server_name())
    }
}

fn load(files: &[CertificateFiles]) -> Result<Certificates, Error> {
    if files.is_empty() {
        return Err(Error::Certificate {
            path: None,
            reason: "no certificate files given".into(),
        });
    }
    Certificates::from_files(files)
}
