//! HTTP helpers: an axum app behind an edge Router, a pooled hyper client on the relay,
//! and streaming bodies with checksums.
#![allow(dead_code, unreachable_pub)]

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body as AxumBody;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

/// FNV-1a over a byte stream: enough to prove bytes arrived intact and in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checksum {
    pub hash: u64,
    pub len: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Self {
            hash: 0xcbf2_9ce4_8422_2325,
            len: 0,
        }
    }
}

impl Checksum {
    pub fn update(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.hash = (self.hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
        self.len += bytes.len() as u64;
    }

    pub fn of(bytes: &[u8]) -> Self {
        let mut sum = Self::default();
        sum.update(bytes);
        sum
    }

    pub fn header(&self) -> String {
        format!("{:016x}:{}", self.hash, self.len)
    }
}

/// A body of `len` bytes streamed in 64 KiB chunks of a deterministic pattern.
///
/// Byte `i` (counting from 1) is `i * 31 ^ i >> 8`, truncated: its period is 64 KiB, so
/// every chunk is a slice of one block made once (generating bytes one at a time made
/// the test's backend, not the code under test, the bottleneck of large transfers).
pub struct PatternBody {
    remaining: u64,
}

const PATTERN_BLOCK: usize = 64 * 1024;

fn pattern_block() -> &'static Bytes {
    static BLOCK: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    BLOCK.get_or_init(|| {
        (1..=PATTERN_BLOCK as u64)
            .map(|counter| (counter.wrapping_mul(31) ^ (counter >> 8)) as u8)
            .collect::<Vec<u8>>()
            .into()
    })
}

impl PatternBody {
    pub fn new(len: u64) -> Self {
        Self { remaining: len }
    }

    /// The checksum of the bytes such a body produces.
    pub fn checksum(len: u64) -> Checksum {
        let mut body = Self::new(len);
        let mut sum = Checksum::default();
        while let Some(chunk) = body.next_chunk() {
            sum.update(&chunk);
        }
        sum
    }

    fn next_chunk(&mut self) -> Option<Bytes> {
        if self.remaining == 0 {
            return None;
        }
        let len = self.remaining.min(PATTERN_BLOCK as u64) as usize;
        self.remaining -= len as u64;
        Some(pattern_block().slice(..len))
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.next_chunk().map(|chunk| Ok(Frame::data(chunk))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Reads a body to its end, checksumming as it goes (never holding it whole).
pub async fn checksum_body<B>(body: B) -> Result<Checksum, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut body = body;
    let mut sum = Checksum::default();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            sum.update(&data);
        }
    }
    Ok(sum)
}

/// The largest body `/limited` takes; a longer one is refused with a 413 at once.
pub const LIMITED_BODY: usize = 1024;

/// The test app served on the edge.
pub fn app() -> axum::Router {
    use axum::extract::ws::{Message, WebSocketUpgrade};
    use axum::extract::{Path, Request};
    use axum::routing::{any, get, post};

    axum::Router::new()
        .route("/", get(|| async { "hello from the edge" }))
        .route(
            "/echo",
            post(|body: String| async move { format!("you sent: {body}") }),
        )
        .route(
            "/upload",
            post(|request: Request| async move {
                let sum = checksum_body(request.into_body())
                    .await
                    .expect("upload body");
                sum.header()
            }),
        )
        .route(
            "/download/{len}",
            get(|Path(len): Path<u64>| async move { AxumBody::new(PatternBody::new(len)) }),
        )
        .route(
            "/duplex",
            post(|request: Request| async move {
                // The body goes back as it comes: the answer starts before the upload ends.
                AxumBody::new(request.into_body())
            }),
        )
        .route(
            "/limited",
            post(|body: Bytes| async move { body.len().to_string() })
                .layer(axum::extract::DefaultBodyLimit::max(LIMITED_BODY)),
        )
        .route(
            "/slow/{millis}",
            get(|Path(millis): Path<u64>| async move {
                tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
                "done"
            }),
        )
        .route(
            "/n/{n}",
            get(|Path(n): Path<u64>| async move { format!("reply {n}") }),
        )
        .route(
            "/ws",
            any(|upgrade: WebSocketUpgrade| async move {
                upgrade.on_upgrade(|mut socket| async move {
                    while let Some(Ok(message)) = socket.recv().await {
                        let reply = match message {
                            Message::Text(text) => Message::Text(format!("echo: {text}").into()),
                            Message::Binary(bytes) => Message::Binary(bytes),
                            Message::Close(_) => break,
                            _ => continue,
                        };
                        if socket.send(reply).await.is_err() {
                            break;
                        }
                    }
                })
            }),
        )
}
