//! TLS for public listeners: the certificate for each connection chosen by SNI (exact
//! names and `*.domain` wildcards), reloaded from files without dropping connections.
//!
//! A relay answers for many names (`relay.example.com`, `*.tunnels.example.com`, …), each
//! possibly from its own certificate file, and certificates are renewed while clients are
//! connected. [`Certificates`] picks the certificate per handshake by asking each one
//! whether it is valid for the name the client sent (the same check a client makes, so
//! wildcards follow RFC 6125: one label, leftmost only), preferring an exact name over a
//! wildcard. [`ReloadableCertificates`] re-reads the files on demand (a relay calls it on
//! SIGHUP): handshakes after the reload use the new set, connections already established
//! keep theirs, and a reload that fails keeps the old set and says why.

mod certificates;
mod reload;

pub use certificates::{CertificateFiles, Certificates};
pub use reload::ReloadableCertificates;

/// ALPN protocol ids for HTTP/2 and HTTP/1.1, in order of preference.
pub const HTTP_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];
