//! A set of certificates and the choice among them by server name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;

use crate::error::Error;

/// A certificate chain file and its private key file, both PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// The chain: the server's certificate first, then intermediates.
    pub chain: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl CertificateFiles {
    /// A chain file and its key file.
    pub fn new(chain: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self {
            chain: chain.into(),
            key: key.into(),
        }
    }
}

/// Names remembered per set, so a flood of made-up SNI values cannot grow memory.
const MAX_REMEMBERED_NAMES: usize = 4096;

/// Certificates to choose from by SNI; see the [module docs](super).
///
/// ```
/// use backhaul::quic::Identity;
/// use backhaul::tls::Certificates;
///
/// let identity = Identity::self_signed(&["*.tunnels.test"])?;
/// let mut certificates = Certificates::new();
/// certificates.add(identity.cert_chain, identity.key)?;
/// assert!(certificates.choose(Some("kiosk.tunnels.test")).is_some());
/// assert!(certificates.choose(Some("elsewhere.test")).is_none());
/// # Ok::<(), backhaul::Error>(())
/// ```
#[derive(Debug)]
pub struct Certificates {
    entries: Vec<Arc<CertifiedKey>>,
    chosen: Mutex<HashMap<String, Option<usize>>>,
}

impl Default for Certificates {
    fn default() -> Self {
        Self::new()
    }
}

impl Certificates {
    /// An empty set.
    #[must_use]
    pub fn new() -> Self {
        Self {
            entries: Vec::new(),
            chosen: Mutex::new(HashMap::new()),
        }
    }

    /// Loads each pair of files, in order (the first is the default for clients that send
    /// no name).
    ///
    /// # Errors
    /// [`Error::Certificate`] naming the file that could not be read or used.
    pub fn from_files(files: &[CertificateFiles]) -> Result<Self, Error> {
        let mut certificates = Self::new();
        for pair in files {
            let chain = CertificateDer::pem_file_iter(&pair.chain)
                .and_then(|chain| chain.collect::<Result<Vec<_>, _>>())
                .map_err(|error| certificate_error(&pair.chain, error))?;
            let key = PrivateKeyDer::from_pem_file(&pair.key)
                .map_err(|error| certificate_error(&pair.key, error))?;
            certificates
                .add(chain, key)
                .map_err(|error| certificate_error(&pair.chain, error))?;
        }
        Ok(certificates)
    }

    /// Adds a chain (server certificate first) and its key.
    ///
    /// # Errors
    /// [`Error::Certificate`] if the chain is empty, the certificate cannot be parsed, or
    /// the key is unsupported or does not match it.
    pub fn add(
        &mut self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), Error> {
        let Some(leaf) = chain.first() else {
            return Err(invalid("the certificate chain is empty"));
        };
        webpki::EndEntityCert::try_from(leaf)
            .map_err(|error| invalid(format!("unreadable certificate: {error}")))?;
        let provider = CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        let certified = CertifiedKey::from_der(chain, key, &provider)
            .map_err(|error| invalid(format!("unusable key: {error}")))?;
        self.entries.push(Arc::new(certified));
        self.lock().clear();
        Ok(())
    }

    /// How many certificates the set holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if the set holds none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The certificate for a client that sent `server_name` (SNI): one valid for exactly
    /// that name if any, else one valid for it through a wildcard; the first certificate
    /// when no name was sent. `None` refuses the handshake.
    #[must_use]
    pub fn choose(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = server_name else {
            return self.entries.first().cloned();
        };
        let name = name.to_ascii_lowercase();
        if let Some(known) = self.lock().get(&name) {
            return known.map(|index| Arc::clone(&self.entries[index]));
        }
        let chosen = self.search(&name);
        let mut remembered = self.lock();
        if remembered.len() >= MAX_REMEMBERED_NAMES {
            remembered.clear();
        }
        remembered.insert(name, chosen);
        chosen.map(|index| Arc::clone(&self.entries[index]))
    }

    fn search(&self, name: &str) -> Option<usize> {
        let subject = ServerName::try_from(name).ok()?;
        // A certificate that is also valid for a sibling name (another first label) only
        // matched through a wildcard.
        let sibling = name
            .split_once('.')
            .and_then(|(_, parent)| ServerName::try_from(format!("x--sibling.{parent}")).ok());
        let mut wildcard = None;
        for (index, entry) in self.entries.iter().enumerate() {
            let Ok(leaf) = webpki::EndEntityCert::try_from(&entry.cert[0]) else {
                continue;
            };
            if leaf.verify_is_valid_for_subject_name(&subject).is_err() {
                continue;
            }
            let through_wildcard = sibling
                .as_ref()
                .is_some_and(|sibling| leaf.verify_is_valid_for_subject_name(sibling).is_ok());
            if !through_wildcard {
                return Some(index);
            }
            wildcard.get_or_insert(index);
        }
        wildcard
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<usize>>> {
        self.chosen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::Certificate {
        path: None,
        reason: reason.into(),
    }
}

fn certificate_error(path: &Path, error: impl std::fmt::Display) -> Error {
    Error::Certificate {
        path: Some(path.display().to_string()),
        reason: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quic::Identity;

    fn set(names: &[&[&str]]) -> Certificates {
        let mut certificates = Certificates::new();
        for names in names {
            let identity = Identity::self_signed(names).unwrap();
            certificates.add(identity.cert_chain, identity.key).unwrap();
        }
        certificates
    }

    fn index_of(certificates: &Certificates, name: Option<&str>) -> Option<usize> {
        let chosen = certificates.choose(name)?;
        certificates
            .entries
            .iter()
            .position(|entry| Arc::ptr_eq(entry, &chosen))
    }

    #[test]
    fn exact_names_win_over_wildcards_and_wildcards_cover_one_label() {
        let certificates = set(&[
            &["relay.test"],
            &["*.tunnels.test"],
            &["kiosk.tunnels.test"],
        ]);
        assert_eq!(index_of(&certificates, Some("relay.test")), Some(0));
        assert_eq!(index_of(&certificates, Some("web.tunnels.test")), Some(1));
        assert_eq!(index_of(&certificates, Some("KIOSK.tunnels.test")), Some(2));
        assert_eq!(index_of(&certificates, Some("a.b.tunnels.test")), None);
        assert_eq!(index_of(&certificates, Some("tunnels.test")), None);
        assert_eq!(index_of(&certificates, Some("other.test")), None);
        assert_eq!(
            index_of(&certificates, None),
            Some(0),
            "no SNI: the default"
        );
        // Asked again: the same answers from memory.
        assert_eq!(index_of(&certificates, Some("web.tunnels.test")), Some(1));
        assert_eq!(index_of(&certificates, Some("other.test")), None);
    }

    #[test]
    fn many_made_up_names_stay_bounded() {
        let certificates = set(&[&["*.tunnels.test"]]);
        for index in 0..(MAX_REMEMBERED_NAMES * 2) {
            let name = format!("n{index}.tunnels.test");
            assert!(certificates.choose(Some(&name)).is_some());
        }
        assert!(certificates.lock().len() <= MAX_REMEMBERED_NAMES);
    }

    #[test]
    fn a_key_that_does_not_match_is_refused() {
        let first = Identity::self_signed(&["a.test"]).unwrap();
        let second = Identity::self_signed(&["b.test"]).unwrap();
        let mut certificates = Certificates::new();
        let error = certificates.add(first.cert_chain, second.key).unwrap_err();
        assert!(matches!(error, Error::Certificate { .. }), "{error}");
        assert!(certificates.is_empty());
    }
}
