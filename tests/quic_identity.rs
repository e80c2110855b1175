//! `Identity::load_or_generate`: the relay's self-signed identity survives restarts, its
//! key is private, and a key others can read is refused.
#![cfg(all(feature = "self-signed", unix))]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use backhaul::quic::{key_path_beside, Identity};
use backhaul::Error;

/// A fresh directory under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "backhaul-identity-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&path).expect("a temp dir");
        Self(path)
    }

    fn files(&self) -> (PathBuf, PathBuf) {
        let cert = self.0.join("relay-cert.pem");
        (cert.clone(), key_path_beside(&cert))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_first_start_generates_and_later_starts_load_the_same_identity() {
    let dir = TempDir::new("reload");
    let (cert, key) = dir.files();
    assert_eq!(key, dir.0.join("relay-key.pem"));
    let first = Identity::load_or_generate(&cert, &key, &["relay.example.com"]).expect("generated");
    let mode = std::fs::metadata(&key)
        .expect("the key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "key mode {mode:o}");
    let again = Identity::load_or_generate(&cert, &key, &["other.example.com"]).expect("loaded");
    assert_eq!(first.cert_chain, again.cert_chain);
    assert_eq!(first.key.secret_der(), again.key.secret_der());
    // The saved identity serves QUIC: a server config accepts it.
    backhaul::quic::server_config(again, backhaul::quic::DEFAULT_ALPN).expect("a server config");
}

#[test]
fn a_key_readable_by_others_is_refused() {
    let dir = TempDir::new("exposed");
    let (cert, key) = dir.files();
    let first = Identity::load_or_generate(&cert, &key, &["localhost"]).expect("generated");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    match Identity::load_or_generate(&cert, &key, &["localhost"]) {
        Err(Error::KeyFileExposed { path, mode }) => {
            assert_eq!((path, mode), (key.clone(), 0o644));
        }
        other => panic!("expected KeyFileExposed, got {other:?}"),
    }
    // Nothing was replaced: made private again, the same identity loads.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let again = Identity::load_or_generate(&cert, &key, &["localhost"]).expect("loaded");
    assert_eq!(first.cert_chain, again.cert_chain);
}

#[test]
fn a_key_without_its_certificate_is_an_error_not_a_new_identity() {
    let dir = TempDir::new("orphan");
    let (cert, key) = dir.files();
    Identity::load_or_generate(&cert, &key, &["localhost"]).expect("generated");
    std::fs::remove_file(&cert).expect("removing the certificate");
    assert!(matches!(
        Identity::load_or_generate(&cert, &key, &["localhost"]),
        Err(Error::CertificateMissing { .. })
    ));
    assert!(!cert.exists(), "no certificate was made for the old key");
}

#[test]
fn a_certificate_without_its_key_is_replaced_by_a_new_identity() {
    let dir = TempDir::new("lost-key");
    let (cert, key) = dir.files();
    let first = Identity::load_or_generate(&cert, &key, &["localhost"]).expect("generated");
    std::fs::remove_file(&key).expect("removing the key");
    let second = Identity::load_or_generate(&cert, &key, &["localhost"]).expect("regenerated");
    assert_ne!(first.cert_chain, second.cert_chain);
    assert!(key.exists());
}
