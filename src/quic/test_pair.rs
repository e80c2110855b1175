//! Two ends of a real quinn connection on 127.0.0.1 with a fresh self-signed certificate,
//! for the crate's unit tests of stream behaviour a memory pipe cannot show (resets).

use super::{client_endpoint, server_endpoint, Identity, DEFAULT_ALPN};
use crate::transport::QuinnConnection;

/// A connected pair: (dialer, acceptor), with the endpoints that keep them running.
pub(crate) struct TestPair {
    pub(crate) dialer: QuinnConnection,
    pub(crate) acceptor: QuinnConnection,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
}

pub(crate) async fn test_pair() -> TestPair {
    let identity = Identity::self_signed(&["localhost"]).expect("certificate");
    let trusted = identity.cert_chain.clone();
    let server = server_endpoint("127.0.0.1:0".parse().unwrap(), identity, DEFAULT_ALPN)
        .expect("server endpoint");
    let client = client_endpoint(&trusted, DEFAULT_ALPN).expect("client endpoint");
    let address = server.local_addr().expect("address");
    let (accepted, dialed) = tokio::join!(
        async { server.accept().await.expect("incoming").await },
        async { client.connect(address, "localhost").expect("connect").await },
    );
    TestPair {
        dialer: QuinnConnection::new(dialed.expect("dialed")),
        acceptor: QuinnConnection::new(accepted.expect("accepted")),
        _endpoints: (server, client),
    }
}
