use super::*;
use crate::shards::Shards;
use tokio::net::TcpStream;
use tokio::time::Instant;

#[test]
fn the_host_field_is_found_in_any_case_and_trimmed() {
    let head = b"GET / HTTP/1.1\r\nAccept: */*\r\nhOsT: \t edge-1.example.com:8080 \r\n\r\n";
    assert_eq!(host_field(head), Some("edge-1.example.com:8080"));
    // Bare line ends too, and a body after the head is not looked at.
    let head = b"GET / HTTP/1.1\nHost: a\n\nHost: b\r\n";
    assert_eq!(host_field(head), Some("a"));
}

#[test]
fn an_incomplete_or_absent_host_names_nothing() {
    // Cut short: the value may go on in the next segment.
    assert_eq!(host_field(b"GET / HTTP/1.1\r\nHost: edge-1.exa"), None);
    // The head ended without one.
    assert_eq!(
        host_field(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\nHost: x\r\n"),
        None
    );
    assert_eq!(host_field(b"GET / HTTP/1.1\r\nHost:   \r\n\r\n"), None);
    assert_eq!(host_field(b""), None);
    assert_eq!(host_field(b"GET / HTTP/1.1"), None);
    // Not UTF-8.
    assert_eq!(
        host_field(b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n"),
        None
    );
    // An HTTP/2 preface has no fields.
    assert_eq!(host_field(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), None);
}

#[test]
fn only_a_handshake_record_or_a_head_without_its_end_is_waited_on() {
    // TLS: a handshake record shorter than its header says, or a header cut short.
    assert!(stops_short(&[22, 3, 1, 0x02, 0x00, 1, 2, 3], true));
    assert!(stops_short(&[22, 3], true));
    assert!(!stops_short(&[22, 3, 1, 0x00, 0x02, 1, 2], true));
    // Anything else on a TLS port names nothing, however long it is waited on.
    assert!(!stops_short(b"GET / HTTP/1.1\r\n", true));
    assert!(!stops_short(&[21, 3, 1, 0x02, 0x00], true));
    // HTTP: a head with neither Host nor its end yet.
    assert!(stops_short(b"GET / HTTP/1.1\r\nAccept: */*\r\n", false));
    assert!(!stops_short(b"GET / HTTP/1.1\r\nHost: a\r\n", false));
    assert!(!stops_short(b"GET / HTTP/1.1\r\n\r\n", false));
}

#[cfg(feature = "tls")]
#[test]
fn the_server_name_is_read_from_a_real_client_hello() {
    use std::sync::Arc;
    let roots = rustls::RootCertStore::empty();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("edge-7.example.com").unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    assert_eq!(server_name(&hello).as_deref(), Some("edge-7.example.com"));
    // Cut short, or not TLS at all: nothing.
    assert_eq!(server_name(&hello[..hello.len() / 2]), None);
    assert_eq!(server_name(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), None);
    assert_eq!(server_name(&[]), None);
}

#[test]
fn a_name_the_placement_knows_goes_to_its_shard_and_the_rest_take_turns() {
    let shards = crate::shards::Shards::new(3).unwrap();
    let set = shards.set();
    let shard_two = shards.block_on({
        let set = set.clone();
        async move {
            set.handle(2)
                .spawn(async { Shards::current().unwrap() })
                .await
                .unwrap()
        }
    });
    let placed = Placed {
        set: set.clone(),
        placement: Arc::new(move |host: &str| (host == "two.example").then_some(shard_two)),
    };
    for _ in 0..5 {
        assert_eq!(
            placed.choose(b"GET / HTTP/1.1\r\nHost: two.example\r\n\r\n", false),
            2
        );
    }
    let turns: Vec<_> = (0..6)
        .map(|_| placed.choose(b"GET / HTTP/1.1\r\nHost: other\r\n\r\n", false))
        .collect();
    let mut sorted = turns.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![0, 0, 1, 1, 2, 2], "in turn: {turns:?}");
    // A shard of another set is not ours.
    let other = crate::shards::Shards::new(1).unwrap();
    let theirs = other.block_on(async { Shards::current().unwrap() });
    let foreign = Placed {
        set,
        placement: Arc::new(move |_: &str| Some(theirs)),
    };
    assert!(foreign.choose(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false) < 3);
}

/// A connected pair: the client's end and the server's accepted one.
async fn pair() -> (TcpStream, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap());
    let (client, accepted) = tokio::join!(client, listener.accept());
    (client.unwrap(), accepted.unwrap().0)
}

#[tokio::test]
async fn first_bytes_in_pieces_are_peeked_again_until_the_name_is_there() {
    use tokio::io::AsyncWriteExt;
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    // A head whose Host line comes in a second segment.
    let (mut client, server) = pair().await;
    client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    let later = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        client.write_all(b"st: e1.test\r\n\r\n").await.unwrap();
        client
    });
    let peeked = peek_first(&server, false, deadline, &Limits::DEFAULT).await;
    assert_eq!(host_field(&peeked), Some("e1.test"));
    let _client = later.await.unwrap();

    // Nothing more comes: given up after the patience, not the deadline.
    let (mut client, server) = pair().await;
    client
        .write_all(b"GET / HTTP/1.1\r\nAccept: */*\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let peeked = peek_first(&server, false, deadline, &Limits::DEFAULT).await;
    assert_eq!(peeked, b"GET / HTTP/1.1\r\nAccept: */*\r\n");
    assert!(
        started.elapsed() < Limits::DEFAULT.placement_patience * 3,
        "{:?}",
        started.elapsed()
    );

    // A whole head without Host is not waited on.
    let (mut client, server) = pair().await;
    client.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let started = Instant::now();
    let _ = peek_first(&server, false, deadline, &Limits::DEFAULT).await;
    assert!(
        started.elapsed() < Limits::DEFAULT.placement_patience,
        "{:?}",
        started.elapsed()
    );
}

#[cfg(feature = "tls")]
#[tokio::test]
async fn a_client_hello_in_two_segments_is_read_whole() {
    use tokio::io::AsyncWriteExt;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("edge-2.example.com").unwrap();
    let mut hello = Vec::new();
    rustls::ClientConnection::new(Arc::new(config), name)
        .unwrap()
        .write_tls(&mut hello)
        .unwrap();
    let (mut client, server) = pair().await;
    let (first, second) = hello.split_at(40);
    client.write_all(first).await.unwrap();
    let second = second.to_vec();
    let later = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        client.write_all(&second).await.unwrap();
        client
    });
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    let peeked = peek_first(&server, true, deadline, &Limits::DEFAULT).await;
    assert_eq!(server_name(&peeked).as_deref(), Some("edge-2.example.com"));
    let _client = later.await.unwrap();
}

#[tokio::test]
async fn the_peek_is_bounded_by_the_limits_given() {
    use tokio::io::AsyncWriteExt;
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    // No patience: what came first, and no wait for the rest.
    let impatient = Limits {
        placement_patience: std::time::Duration::ZERO,
        ..Limits::DEFAULT
    };
    let (mut client, server) = pair().await;
    client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    let started = Instant::now();
    let peeked = peek_first(&server, false, deadline, &impatient).await;
    assert_eq!(peeked, b"GET / HTTP/1.1\r\nHo");
    assert!(started.elapsed() < std::time::Duration::from_millis(20));
    // At most the bytes given, however many are there.
    let short = Limits {
        placement_peek_bytes: 16,
        ..Limits::DEFAULT
    };
    let peeked = peek_first(&server, false, deadline, &short).await;
    assert_eq!(peeked, b"GET / HTTP/1.1\r\n");
    drop(client);
}
