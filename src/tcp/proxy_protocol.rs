//! The PROXY protocol, version 2 (binary), as HAProxy specifies it: a header sent before
//! the first byte of a forwarded TCP connection so the backend learns the client's address.
//!
//! A relay terminates the client's TCP connection and the edge opens a new one to the
//! backend, so without this header every connection appears to come from the edge itself.
//! Only what a tunnel needs is written: `PROXY` over TCP for IPv4 and IPv6, and `LOCAL`
//! when the client's address is unknown. [`ProxyHeader::parse`] reads the same (and skips
//! any TLVs), for backends written with this crate and for tests.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

const VERSION_2: u8 = 0x20;
const COMMAND_LOCAL: u8 = 0x00;
const COMMAND_PROXY: u8 = 0x01;
const TCP_OVER_IPV4: u8 = 0x11;
const TCP_OVER_IPV6: u8 = 0x21;
const UNSPECIFIED: u8 = 0x00;

/// What a PROXY v2 header says about a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The connection was proxied from `source` (the client) to `destination` (the
    /// address the client connected to).
    Proxy {
        /// The client's address.
        source: SocketAddr,
        /// The public address the client reached.
        destination: SocketAddr,
    },
    /// The proxy itself made the connection (health checks), or the client is unknown:
    /// the backend should use the connection's real addresses.
    Local,
}

/// Why bytes are not a PROXY v2 header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The bytes do not start with the v2 signature.
    #[error("not a PROXY protocol v2 header")]
    NotProxyV2,
    /// The version nibble is not 2.
    #[error("unsupported PROXY protocol version {0}")]
    Version(u8),
    /// An unknown command.
    #[error("unknown PROXY protocol command {0:#x}")]
    Command(u8),
    /// The address block is shorter than its family requires.
    #[error("PROXY protocol address block too short for its family")]
    Truncated,
}

impl ProxyHeader {
    /// The header's bytes. Mixed families are written as IPv6 (IPv4 addresses mapped).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = SIGNATURE.to_vec();
        match *self {
            ProxyHeader::Local => {
                bytes.extend_from_slice(&[VERSION_2 | COMMAND_LOCAL, UNSPECIFIED, 0, 0]);
            }
            ProxyHeader::Proxy {
                source,
                destination,
            } => match (source.ip(), destination.ip()) {
                (IpAddr::V4(from), IpAddr::V4(to)) => {
                    bytes.extend_from_slice(&[VERSION_2 | COMMAND_PROXY, TCP_OVER_IPV4, 0, 12]);
                    bytes.extend_from_slice(&from.octets());
                    bytes.extend_from_slice(&to.octets());
                    bytes.extend_from_slice(&source.port().to_be_bytes());
                    bytes.extend_from_slice(&destination.port().to_be_bytes());
                }
                (from, to) => {
                    bytes.extend_from_slice(&[VERSION_2 | COMMAND_PROXY, TCP_OVER_IPV6, 0, 36]);
                    bytes.extend_from_slice(&as_v6(from).octets());
                    bytes.extend_from_slice(&as_v6(to).octets());
                    bytes.extend_from_slice(&source.port().to_be_bytes());
                    bytes.extend_from_slice(&destination.port().to_be_bytes());
                }
            },
        }
        bytes
    }

    /// Parses a header at the start of `bytes`: `Ok(None)` if more bytes are needed,
    /// else the header and how many bytes it took (TLVs after the addresses are skipped).
    ///
    /// # Errors
    /// [`ProxyHeaderError`] when the bytes are not a well-formed v2 header.
    pub fn parse(bytes: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyHeaderError> {
        let checked = bytes.len().min(SIGNATURE.len());
        if bytes[..checked] != SIGNATURE[..checked] {
            return Err(ProxyHeaderError::NotProxyV2);
        }
        if bytes.len() < 16 {
            return Ok(None);
        }
        let version_command = bytes[12];
        if version_command & 0xf0 != VERSION_2 {
            return Err(ProxyHeaderError::Version(version_command >> 4));
        }
        let length = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
        let Some(block) = bytes.get(16..16 + length) else {
            return Ok(None);
        };
        let header = match version_command & 0x0f {
            COMMAND_LOCAL => ProxyHeader::Local,
            COMMAND_PROXY => match bytes[13] {
                TCP_OVER_IPV4 => {
                    let block: &[u8; 12] = block
                        .get(..12)
                        .and_then(|b| b.try_into().ok())
                        .ok_or(ProxyHeaderError::Truncated)?;
                    let ip = |at: usize| {
                        IpAddr::from([block[at], block[at + 1], block[at + 2], block[at + 3]])
                    };
                    let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
                    ProxyHeader::Proxy {
                        source: SocketAddr::new(ip(0), port(8)),
                        destination: SocketAddr::new(ip(4), port(10)),
                    }
                }
                TCP_OVER_IPV6 => {
                    let block: &[u8; 36] = block
                        .get(..36)
                        .and_then(|b| b.try_into().ok())
                        .ok_or(ProxyHeaderError::Truncated)?;
                    let ip = |at: usize| {
                        let octets: [u8; 16] = block[at..at + 16].try_into().expect("16 bytes");
                        IpAddr::from(octets)
                    };
                    let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
                    ProxyHeader::Proxy {
                        source: SocketAddr::new(ip(0), port(32)),
                        destination: SocketAddr::new(ip(16), port(34)),
                    }
                }
                // Other families (UDP, UNIX): the addresses are not for us.
                _ => ProxyHeader::Local,
            },
            other => return Err(ProxyHeaderError::Command(other)),
        };
        Ok(Some((header, 16 + length)))
    }
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_has_the_specified_bytes() {
        let header = ProxyHeader::Proxy {
            source: "192.0.2.1:56324".parse().unwrap(),
            destination: "198.51.100.7:443".parse().unwrap(),
        };
        let bytes = header.encode();
        assert_eq!(&bytes[..12], &SIGNATURE);
        assert_eq!(&bytes[12..16], &[0x21, 0x11, 0x00, 0x0c]);
        assert_eq!(&bytes[16..20], &[192, 0, 2, 1]);
        assert_eq!(&bytes[20..24], &[198, 51, 100, 7]);
        assert_eq!(&bytes[24..26], &56324u16.to_be_bytes());
        assert_eq!(&bytes[26..28], &443u16.to_be_bytes());
        assert_eq!(ProxyHeader::parse(&bytes), Ok(Some((header, 28))));
    }

    #[test]
    fn ipv6_and_mixed_families_round_trip() {
        let header = ProxyHeader::Proxy {
            source: "[2001:db8::1]:1000".parse().unwrap(),
            destination: "[2001:db8::2]:22".parse().unwrap(),
        };
        let bytes = header.encode();
        assert_eq!(bytes.len(), 16 + 36);
        assert_eq!(ProxyHeader::parse(&bytes), Ok(Some((header, 52))));

        let mixed = ProxyHeader::Proxy {
            source: "192.0.2.1:1".parse().unwrap(),
            destination: "[2001:db8::2]:2".parse().unwrap(),
        };
        let Some((ProxyHeader::Proxy { source, .. }, _)) =
            ProxyHeader::parse(&mixed.encode()).unwrap()
        else {
            panic!("a proxied header");
        };
        assert_eq!(source.ip(), IpAddr::V6("::ffff:192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn local_partial_and_foreign_input() {
        let local = ProxyHeader::Local.encode();
        assert_eq!(local.len(), 16);
        assert_eq!(
            ProxyHeader::parse(&local),
            Ok(Some((ProxyHeader::Local, 16)))
        );
        let full = ProxyHeader::Proxy {
            source: "10.0.0.1:5".parse().unwrap(),
            destination: "10.0.0.2:6".parse().unwrap(),
        }
        .encode();
        for cut in 0..full.len() {
            assert_eq!(ProxyHeader::parse(&full[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(
            ProxyHeader::parse(b"GET / HTTP/1.1\r\n"),
            Err(ProxyHeaderError::NotProxyV2)
        );
        let mut bad_version = local.clone();
        bad_version[12] = 0x11;
        assert_eq!(
            ProxyHeader::parse(&bad_version),
            Err(ProxyHeaderError::Version(1))
        );
        let mut short = full.clone();
        short[15] = 4;
        assert_eq!(ProxyHeader::parse(&short), Err(ProxyHeaderError::Truncated));
    }
}
