//! The relay's own TLS identity when the operator gives none (`--cert/--key`).
//!
//! Edges pin the relay's certificate, so the relay must present the same one after every
//! restart: the first start generates a self-signed certificate and key and writes both
//! (`--cert-out`, `--key-out`); later starts load them. The key file is created readable
//! by its owner only, and a key file that group or others can read is refused rather than
//! used, since whoever reads it can impersonate the relay to every edge.

use std::io::Write;
use std::path::{Path, PathBuf};

use backhaul::quic::Identity;
use tracing::{info, warn};

use crate::BoxError;

/// The key file next to `cert_out`: `…cert…` becomes `…key…` in the file name
/// (`backhaul-relay-cert.pem` → `backhaul-relay-key.pem`), else `-key` is appended to the stem.
pub fn default_key_path(cert_out: &Path) -> PathBuf {
    let name = cert_out
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let key_name = match name.rfind("cert") {
        Some(at) => format!("{}key{}", &name[..at], &name[at + 4..]),
        None => {
            let stem = cert_out
                .file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("{stem}-key.pem")
        }
    };
    cert_out.with_file_name(key_name)
}

/// Loads the identity kept in `cert_path` + `key_path`, or makes one for `names` and
/// keeps it there.
pub fn persistent_identity(
    cert_path: &Path,
    key_path: &Path,
    names: &[&str],
) -> Result<Identity, BoxError> {
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            check_key_permissions(key_path)?;
            let identity = Identity::from_files(cert_path, key_path)?;
            info!(
                cert = %cert_path.display(),
                key = %key_path.display(),
                "using the relay's saved self-signed identity"
            );
            Ok(identity)
        }
        (false, true) => Err(format!(
            "{} exists but {} does not: restore the certificate, or remove the key to \
             make a new identity (edges will then need the new certificate)",
            key_path.display(),
            cert_path.display()
        )
        .into()),
        (cert_exists, false) => {
            if cert_exists {
                warn!(
                    cert = %cert_path.display(),
                    "a certificate without its key: making a new identity; edges must be given the new certificate"
                );
            }
            let identity = Identity::self_signed(names)?;
            write_identity(&identity, cert_path, key_path)?;
            info!(
                cert = %cert_path.display(),
                key = %key_path.display(),
                "self-signed identity created; give the certificate to edges with --relay-cert"
            );
            Ok(identity)
        }
    }
}

fn write_identity(identity: &Identity, cert_path: &Path, key_path: &Path) -> Result<(), BoxError> {
    let key_pem = pem::encode(&pem::Pem::new(
        "PRIVATE KEY",
        identity.key.secret_der().to_vec(),
    ));
    write_private(key_path, key_pem.as_bytes())
        .map_err(|e| format!("writing {}: {e}", key_path.display()))?;
    let cert_pem = pem::encode(&pem::Pem::new(
        "CERTIFICATE",
        identity.cert_chain[0].to_vec(),
    ));
    std::fs::write(cert_path, cert_pem)
        .map_err(|e| format!("writing {}: {e}", cert_path.display()))?;
    Ok(())
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
fn check_key_permissions(key_path: &Path) -> Result<(), BoxError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(key_path)
        .map_err(|e| format!("{}: {e}", key_path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is readable by group or others (mode {:o}): run `chmod 600 {}`",
            key_path.display(),
            mode & 0o777,
            key_path.display()
        )
        .into());
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_permissions(_key_path: &Path) -> Result<(), BoxError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_path_sits_next_to_the_cert() {
        assert_eq!(
            default_key_path(Path::new("backhaul-relay-cert.pem")),
            Path::new("backhaul-relay-key.pem")
        );
        assert_eq!(
            default_key_path(Path::new("/etc/relay/relay.pem")),
            Path::new("/etc/relay/relay-key.pem")
        );
    }
}
