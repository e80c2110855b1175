//! QUIC endpoints set up for tunnels: TLS, ALPN and transport limits in one place.
//!
//! quinn's defaults suit one request per connection; a tunnel multiplexes everything over
//! one long-lived connection, so it needs more concurrent streams, a keep-alive shorter
//! than the idle timeout (NAT bindings expire), and larger flow-control windows.
//! These helpers build endpoints with those settings; anything else can still be built by
//! hand with quinn and wrapped in [`QuinnConnection`](crate::transport::QuinnConnection).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ClientConfig, Endpoint, ServerConfig, TransportConfig, VarInt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::Error;

pub mod lane;
#[cfg(feature = "self-signed")]
mod persistent;
#[cfg(all(test, feature = "self-signed"))]
pub(crate) mod test_pair;
#[cfg(feature = "self-signed")]
pub use persistent::key_path_beside;

/// The ALPN protocol name backhaul endpoints use unless told otherwise.
pub const DEFAULT_ALPN: &[u8] = b"backhaul";

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    /// The chain, leaf first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

#[cfg(feature = "self-signed")]
impl Identity {
    /// A fresh self-signed certificate for `names` (DNS names or IP addresses), for tests,
    /// development, and relays whose edges pin the certificate.
    ///
    /// # Errors
    /// [`Error::Transport`] if the certificate cannot be generated.
    pub fn self_signed(names: &[&str]) -> Result<Self, Error> {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let certified = rcgen::generate_simple_self_signed(names).map_err(Error::transport)?;
        Ok(Self {
            cert_chain: vec![certified.cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()).into(),
        })
    }
}

impl Identity {
    /// Loads a certificate chain (PEM, or a single DER certificate) and its private key
    /// (PEM: PKCS#8, PKCS#1 or SEC1; or DER PKCS#8).
    ///
    /// # Errors
    /// [`Error::Transport`] naming the file that could not be read or parsed.
    pub fn from_files(
        cert_path: impl AsRef<std::path::Path>,
        key_path: impl AsRef<std::path::Path>,
    ) -> Result<Self, Error> {
        let key_path = key_path.as_ref();
        let key_bytes = read_file(key_path)?;
        let key = if looks_like_pem(&key_bytes) {
            PrivateKeyDer::from_pem_slice(&key_bytes)
                .map_err(|error| file_error(key_path, error))?
        } else {
            PrivatePkcs8KeyDer::from(key_bytes).into()
        };
        Ok(Self {
            cert_chain: load_certs(cert_path)?,
            key,
        })
    }
}

/// Loads certificates from a PEM file (all of them) or a DER file (one).
///
/// # Errors
/// [`Error::Transport`] naming the file that could not be read or holds no certificate.
pub fn load_certs(
    path: impl AsRef<std::path::Path>,
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    if !looks_like_pem(&bytes) {
        return Ok(vec![CertificateDer::from(bytes)]);
    }
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| file_error(path, error))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in file"));
    }
    Ok(certs)
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|window| window == b"-----BEGIN ")
}

fn read_file(path: &std::path::Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|error| file_error(path, error))
}

fn file_error(path: &std::path::Path, error: impl std::fmt::Display) -> Error {
    Error::transport(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{}: {error}", path.display()),
    ))
}

/// Transport settings for a tunnel connection: the peer may open `initial_streams`
/// bidirectional streams at once to begin with, keep-alives every 5 s, a 30 s idle
/// timeout, and flow control sized so that no stream can block another (see
/// [`STREAM_RECEIVE_WINDOW`]).
///
/// The stream limit starts small because quinn sets aside state for every stream the peer
/// may open (about 80 bytes each, 330 KiB at 4 096), which idle tunnels would pay for
/// nothing; a [`QuinnConnection`](crate::transport::QuinnConnection) raises it as its
/// streams fill it, up to its [`StreamLimit`](crate::transport::StreamLimit) maximum
/// ([`DEFAULT_MAX_STREAMS`] by default). The configs built here start at
/// [`INITIAL_STREAMS`].
///
/// The connection-wide receive window is left unlimited on purpose. With a finite one, a
/// few streams whose reader stalls (a relay's public client that stops reading a large
/// response) fill it with unread data, and then nothing else crosses the connection: not
/// other responses, not the control stream's keep-alives, so the tunnel is declared dead.
/// Memory stays bounded per stream instead: at most the stream limit ×
/// [`STREAM_RECEIVE_WINDOW`] of unread data per connection, and only while readers stall.
#[must_use]
pub fn transport_config(initial_streams: u32) -> TransportConfig {
    let mut transport = TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(initial_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::MAX)
        .send_window(SEND_WINDOW);
    if let Ok(idle) = Duration::from_secs(30).try_into() {
        transport.max_idle_timeout(Some(idle));
    }
    transport
}

/// Unread bytes a peer may send on one stream before it must wait for the reader: 1 MiB,
/// enough for about 160 Mbit/s per stream at 50 ms of round-trip time, and the most a
/// stalled reader costs its side of the connection.
pub const STREAM_RECEIVE_WINDOW: u32 = 1024 * 1024;

/// Bytes written but not yet acknowledged that a connection keeps across all its streams.
/// Stalled streams do not count against it: the peer acknowledges what it buffers.
const SEND_WINDOW: u64 = 16 * 1024 * 1024;

/// Concurrent streams the peer may open on a new tunnel connection, before any growth.
pub const INITIAL_STREAMS: u32 = 64;

/// Concurrent streams a tunnel connection's limit grows to at most, by default.
pub const DEFAULT_MAX_STREAMS: u32 = 4096;

fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A quinn server config presenting `identity` and offering `alpn`.
///
/// # Errors
/// [`Error::Transport`] if the certificate or key is unusable.
pub fn server_config(identity: Identity, alpn: &[u8]) -> Result<ServerConfig, Error> {
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::transport)?
        .with_no_client_auth()
        .with_single_cert(identity.cert_chain, identity.key)
        .map_err(Error::transport)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(Error::transport)?;
    let mut config = ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(INITIAL_STREAMS)));
    Ok(config)
}

/// A quinn client config trusting exactly `trusted` certificates and offering `alpn`.
///
/// # Errors
/// [`Error::Transport`] if a certificate is unusable.
pub fn client_config(
    trusted: &[CertificateDer<'static>],
    alpn: &[u8],
) -> Result<ClientConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in trusted {
        roots.add(cert.clone()).map_err(Error::transport)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::transport)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(Error::transport)?;
    let mut config = ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(INITIAL_STREAMS)));
    Ok(config)
}

/// A relay's endpoint: listens on `addr` with `identity`.
///
/// # Errors
/// [`Error::Transport`] if the socket cannot be bound or the identity is unusable.
pub fn server_endpoint(
    addr: SocketAddr,
    identity: Identity,
    alpn: &[u8],
) -> Result<Endpoint, Error> {
    endpoint(addr, Some(server_config(identity, alpn)?), Coalescing::Off)
}

/// A relay's endpoint with a server config of the caller's (other transport limits, say),
/// on the same socket settings as [`server_endpoint`].
///
/// # Errors
/// [`Error::Transport`] if the socket cannot be bound.
pub fn server_endpoint_with_config(
    addr: SocketAddr,
    config: ServerConfig,
) -> Result<Endpoint, Error> {
    endpoint(addr, Some(config), Coalescing::Off)
}

/// An edge's endpoint: dials out, trusting `trusted` certificates.
///
/// # Errors
/// [`Error::Transport`] if the socket cannot be bound or a certificate is unusable.
pub fn client_endpoint(
    trusted: &[CertificateDer<'static>],
    alpn: &[u8],
) -> Result<Endpoint, Error> {
    let bind: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, 0).into();
    let mut endpoint = endpoint(bind, None, Coalescing::On)?;
    endpoint.set_default_client_config(client_config(trusted, alpn)?);
    Ok(endpoint)
}

/// Socket buffers asked for on every endpoint's UDP socket. Linux caps them at
/// `net.core.rmem_max` / `wmem_max` (often 208 KiB), except for a process allowed to
/// administer the network (`CAP_NET_ADMIN`, root), which gets them anyway.
///
/// The kernel's default receive buffer (about 208 KiB on Linux) holds a few hundred
/// datagrams: a burst from many streams at once (or many edges connecting at once)
/// overflows it, and every dropped datagram costs QUIC a loss-recovery delay and a smaller
/// congestion window, on all streams of the connection, control stream included.
pub const UDP_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Receive buffer asked for on a relay's (server endpoint's) socket, where every edge's
/// datagrams arrive: 5 000 edges connecting at once send about 12 MB of Initial packets
/// (a 1 200-byte datagram takes about 2.3 KB of kernel buffer) faster than the
/// handshakes are served, which overflowed [`UDP_SOCKET_BUFFER`] by thousands of
/// datagrams. Memory is only used while datagrams wait.
pub const RELAY_RECEIVE_BUFFER: usize = 32 * 1024 * 1024;

/// Whether the kernel may hand several received datagrams over as one (Linux UDP GRO).
///
/// quinn copies each such batch into one allocation and slices every datagram's stream
/// data out of it, so a single byte left unread pins the whole batch. A relay holds the
/// unread data of every stream whose public client stalled, each batch mixing several
/// streams: with coalescing, 100 stalled responses held 2.7 times the data they buffered
/// (366 MB instead of 147 MB in `tests/proxy_hostile.rs`). Relays turn it off; edges,
/// which read what they receive at once, keep it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coalescing {
    On,
    Off,
}

fn endpoint(
    addr: SocketAddr,
    server: Option<ServerConfig>,
    coalescing: Coalescing,
) -> Result<Endpoint, Error> {
    let runtime = quinn::default_runtime().ok_or_else(|| {
        Error::transport(std::io::Error::other(
            "quinn endpoints need a tokio runtime",
        ))
    })?;
    let receive_buffer = if server.is_some() {
        RELAY_RECEIVE_BUFFER
    } else {
        UDP_SOCKET_BUFFER
    };
    let socket = udp_socket(addr, receive_buffer).map_err(Error::transport)?;
    // quinn turns coalescing on while adopting the socket: turn it off afterwards, through
    // a second handle on the same socket.
    let handle = socket.try_clone().map_err(Error::transport)?;
    let endpoint = Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
        .map_err(Error::transport)?;
    if coalescing == Coalescing::Off {
        turn_off_coalescing(&handle);
    }
    Ok(endpoint)
}

#[cfg(target_os = "linux")]
fn turn_off_coalescing(socket: &std::net::UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt::UdpGroSegment};
    // A kernel without UDP GRO never coalesces in the first place.
    if let Err(error) = setsockopt(socket, UdpGroSegment, &false) {
        tracing::debug!(%error, "cannot turn off UDP receive coalescing");
    }
}

#[cfg(not(target_os = "linux"))]
fn turn_off_coalescing(_socket: &std::net::UdpSocket) {}

fn udp_socket(addr: SocketAddr, receive_buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    request_buffers(&socket, receive_buffer, UDP_SOCKET_BUFFER);
    if addr.is_ipv6() {
        // Dual-stack where the platform allows: an edge on [::] reaches IPv4 relays too.
        let _ = socket.set_only_v6(false);
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Asks for `receive` and `send` bytes of buffer. Larger buffers are an optimisation: a
/// kernel that refuses them still works, so every failure is ignored.
fn request_buffers(socket: &socket2::Socket, receive: usize, send: usize) {
    let _ = socket.set_recv_buffer_size(receive);
    let _ = socket.set_send_buffer_size(send);
    force_buffers(socket, receive, send);
}

/// Past the system-wide cap where the process is allowed to (Linux reports twice the
/// size it grants, for its own bookkeeping, so a granted request reads back doubled).
#[cfg(target_os = "linux")]
fn force_buffers(socket: &socket2::Socket, receive: usize, send: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    if socket
        .recv_buffer_size()
        .is_ok_and(|granted| granted < receive.saturating_mul(2))
    {
        let _ = setsockopt(socket, sockopt::RcvBufForce, &receive);
    }
    if socket
        .send_buffer_size()
        .is_ok_and(|granted| granted < send.saturating_mul(2))
    {
        let _ = setsockopt(socket, sockopt::SndBufForce, &send);
    }
}

#[cfg(not(target_os = "linux"))]
fn force_buffers(_socket: &socket2::Socket, _receive: usize, _send: usize) {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn system_cap(name: &str) -> usize {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(212_992)
    }

    /// Whether this process holds `CAP_NET_ADMIN` (bit 12 of its effective capabilities).
    fn privileged() -> bool {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("CapEff:"))
            .and_then(|bits| u64::from_str_radix(bits.trim(), 16).ok())
            .is_some_and(|bits| bits & (1 << 12) != 0)
    }

    #[test]
    fn udp_buffers_are_granted_up_to_the_cap_or_past_it_when_privileged() {
        let socket = udp_socket("127.0.0.1:0".parse().unwrap(), UDP_SOCKET_BUFFER).expect("socket");
        let cap = system_cap("rmem_max");
        let granted = socket2::SockRef::from(&socket)
            .recv_buffer_size()
            .expect("SO_RCVBUF");
        if privileged() || cap >= UDP_SOCKET_BUFFER {
            assert!(granted >= 2 * UDP_SOCKET_BUFFER, "granted {granted}");
        } else {
            assert!(
                granted >= 2 * cap.min(UDP_SOCKET_BUFFER),
                "granted {granted}"
            );
        }
    }

    #[test]
    fn a_privileged_process_goes_past_the_system_cap() {
        let beyond = system_cap("rmem_max").max(system_cap("wmem_max")) * 2;
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
            .expect("socket");
        request_buffers(&socket, beyond, beyond);
        let (receive, send) = (
            socket.recv_buffer_size().expect("SO_RCVBUF"),
            socket.send_buffer_size().expect("SO_SNDBUF"),
        );
        if privileged() {
            assert!(
                receive >= 2 * beyond && send >= 2 * beyond,
                "{receive} {send}"
            );
        } else {
            // Capped, and nothing failed.
            assert!(receive < 2 * beyond, "{receive}");
        }
    }
}
