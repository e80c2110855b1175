//! A self-signed identity that survives restarts.
//!
//! Peers pin a self-signed certificate, so a relay without a CA-issued one must present
//! the same certificate after every restart: the first start generates a certificate and
//! key and writes both; later starts load them. The key file is created readable by its
//! owner only (0600, never overwriting), and a key file that group or others can read is
//! refused rather than used, since whoever reads it can impersonate the relay to every
//! edge.

use std::io::Write;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::Identity;
use crate::error::Error;

impl Identity {
    /// Loads the identity saved in `cert_path` and `key_path` (PEM), or, on the first
    /// start, generates a self-signed one for `names` (DNS names or IP addresses) and
    /// saves it there, the key with mode 0600.
    ///
    /// A certificate without its key is replaced (with a warning: peers must be given the
    /// new certificate); a key without its certificate is an error, since replacing it
    /// would silently change the identity.
    ///
    /// # Errors
    /// - [`Error::KeyFileExposed`] if the key file is readable by group or others;
    /// - [`Error::CertificateMissing`] if the key exists without the certificate;
    /// - [`Error::IdentityFile`] if a file cannot be inspected or written;
    /// - [`Error::Transport`] if the saved files cannot be parsed, or generation fails.
    ///
    /// # Example
    /// ```
    /// use backhaul::quic::Identity;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = std::env::temp_dir().join(format!("backhaul-doc-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir)?;
    /// let (cert, key) = (dir.join("relay-cert.pem"), dir.join("relay-key.pem"));
    /// let first = Identity::load_or_generate(&cert, &key, &["relay.example.com"])?;
    /// let again = Identity::load_or_generate(&cert, &key, &["relay.example.com"])?;
    /// assert_eq!(first.cert_chain, again.cert_chain);
    /// std::fs::remove_dir_all(&dir)?;
    /// # Ok(()) }
    /// ```
    pub fn load_or_generate(
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
        names: &[&str],
    ) -> Result<Self, Error> {
        let (cert_path, key_path) = (cert_path.as_ref(), key_path.as_ref());
        match (exists(cert_path)?, exists(key_path)?) {
            (true, true) => {
                check_key_permissions(key_path)?;
                let identity = Self::from_files(cert_path, key_path)?;
                info!(cert = %cert_path.display(), key = %key_path.display(), "using the saved self-signed identity");
                Ok(identity)
            }
            (false, true) => Err(Error::CertificateMissing {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            }),
            (cert_exists, false) => {
                if cert_exists {
                    warn!(cert = %cert_path.display(), "a certificate without its key: making a new identity; peers must be given the new certificate");
                }
                generate(cert_path, key_path, names)?;
                info!(cert = %cert_path.display(), key = %key_path.display(), "self-signed identity created; give the certificate to peers");
                // Loaded back from disk: what later starts will use is what this one uses.
                Self::from_files(cert_path, key_path)
            }
        }
    }
}

/// The key file conventionally beside `cert_path`: `…cert…` becomes `…key…` in the file
/// name (`relay-cert.pem` → `relay-key.pem`), else `-key.pem` replaces the extension
/// (`relay.pem` → `relay-key.pem`).
#[must_use]
pub fn key_path_beside(cert_path: &Path) -> PathBuf {
    let name = cert_path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let key_name = match name.rfind("cert") {
        Some(at) => format!("{}key{}", &name[..at], &name[at + 4..]),
        None => {
            let stem = cert_path
                .file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("{stem}-key.pem")
        }
    };
    cert_path.with_file_name(key_name)
}

fn exists(path: &Path) -> Result<bool, Error> {
    path.try_exists().map_err(|source| file_error(path, source))
}

fn file_error(path: &Path, source: std::io::Error) -> Error {
    Error::IdentityFile {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a new self-signed certificate and key (the key first, private, never
/// overwriting one).
fn generate(cert_path: &Path, key_path: &Path, names: &[&str]) -> Result<(), Error> {
    let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
    let certified = rcgen::generate_simple_self_signed(names).map_err(Error::transport)?;
    write_private(key_path, certified.key_pair.serialize_pem().as_bytes())
        .map_err(|source| file_error(key_path, source))?;
    std::fs::write(cert_path, certified.cert.pem()).map_err(|source| file_error(cert_path, source))
}

/// Creates `path` readable by its owner only; never overwrites.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(unix)]
fn check_key_permissions(key_path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(key_path)
        .map_err(|source| file_error(key_path, source))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(Error::KeyFileExposed {
            path: key_path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_permissions(_key_path: &Path) -> Result<(), Error> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_path_sits_beside_the_cert() {
        assert_eq!(
            key_path_beside(Path::new("backhaul-relay-cert.pem")),
            Path::new("backhaul-relay-key.pem")
        );
        assert_eq!(
            key_path_beside(Path::new("/etc/relay/relay.pem")),
            Path::new("/etc/relay/relay-key.pem")
        );
    }
}
