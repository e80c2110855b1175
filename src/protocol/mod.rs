//! The quic-reverse v1 wire protocol: bytes only, no I/O.
//!
//! Everything here is pure: values in, bytes out, and back. Keeping I/O out makes the codec
//! easy to property-test and lets the session layer decide how frames reach the network.
//!
//! - [`message`]: the control messages as Rust values.
//! - [`codec`]: their byte encoding (bincode-1 layout, byte-identical to quic-reverse 0.1.2).
//! - [`frame`]: the u32 big-endian length prefix and its 64 KiB limit.
//! - [`stream_bind`]: the 13-byte header that starts every data stream.

pub mod codec;
mod error;
pub mod frame;
pub mod message;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod strategies;
pub mod stream_bind;

pub use codec::{decode_payload, encode_payload};
pub use error::ProtocolError;
pub use frame::{decode_frame, encode_frame, MAX_FRAME_SIZE};
pub use message::*;
pub use stream_bind::StreamBind;
