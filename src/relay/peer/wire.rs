//! What relays say to each other, on top of ordinary backhaul opens.
//!
//! - **Hello.** The dialing relay's first open is [`PEER_SERVICE`] (`_peer`) with metadata
//!   `{relay: <its id>, secret: <the cluster secret>}`; an accepted open admits it, an
//!   `Unauthorized` rejection refuses it.
//! - **Forwarded opens.** The service is the edge's own service name; the metadata carries
//!   `_peer.edge` (the edge's name) and `_peer.hops` (relay-to-relay hops so far, 1 from
//!   the first relay) next to the caller's own fields (opaque bytes travel as
//!   `_peer.bytes`). The serving relay strips the `_peer.` fields and passes the rest on.
//! - **Refusals** are ordinary rejections whose reason starts with a tag, so the dialing
//!   relay can tell "not here" from "the edge said no" without guessing from codes the
//!   edge may use too: `not-attached:`, `hop-limit:`, `malformed:`, and `edge:` before the
//!   edge's own reason (its code is passed on unchanged).

use std::collections::HashMap;
use std::net::SocketAddr;

use super::secret::ClusterSecret;
use crate::error::Error;
use crate::protocol::{Metadata, MetadataValue, RejectCode};
use crate::relay::auth::metadata_text;
use crate::relay::directory::RelayId;
use crate::relay::name::EdgeName;

/// The service a relay opens first on a peer, to present the cluster secret.
pub const PEER_SERVICE: &str = "_peer";

/// Relay-to-relay hops a forwarded open may have taken. A relay serves forwarded opens
/// from its own edges only and never forwards them again, so 1 is all a cluster needs;
/// more is a forgery or a bug, and refused.
pub const MAX_HOPS: u8 = 1;

const RELAY_FIELD: &str = "relay";
const SECRET_FIELD: &str = "secret";
const EDGE_FIELD: &str = "_peer.edge";
const HOPS_FIELD: &str = "_peer.hops";
const BYTES_FIELD: &str = "_peer.bytes";
const RESERVED_PREFIX: &str = "_peer.";

const TAG_NOT_ATTACHED: &str = "not-attached";
const TAG_HOP_LIMIT: &str = "hop-limit";
const TAG_MALFORMED: &str = "malformed";
const TAG_EDGE: &str = "edge";

/// The hello's metadata.
pub(super) fn hello(relay: &RelayId, secret: &ClusterSecret) -> Metadata {
    let mut fields = HashMap::new();
    fields.insert(
        RELAY_FIELD.to_owned(),
        MetadataValue::String(relay.as_str().to_owned()),
    );
    fields.insert(
        SECRET_FIELD.to_owned(),
        MetadataValue::String(secret.expose().to_owned()),
    );
    Metadata::Structured(fields)
}

/// The id a hello claims, if its secret is right.
pub(super) fn check_hello(metadata: &Metadata, secret: &ClusterSecret) -> Option<RelayId> {
    let given = metadata_text(metadata, SECRET_FIELD).unwrap_or_default();
    // Checked before looking at anything else, so every refusal costs the same.
    let admitted = secret.check(given);
    let relay = metadata_text(metadata, RELAY_FIELD).unwrap_or("unnamed");
    admitted.then(|| RelayId::new(crate::relay::shown(relay)))
}

/// The metadata of an open forwarded to `edge` after `hops` hops, with the caller's.
pub(super) fn forward_metadata(edge: &EdgeName, hops: i64, metadata: Metadata) -> Metadata {
    let mut fields = match metadata {
        Metadata::Empty => HashMap::new(),
        Metadata::Bytes(bytes) => {
            HashMap::from([(BYTES_FIELD.to_owned(), MetadataValue::Bytes(bytes))])
        }
        Metadata::Structured(mut fields) => {
            fields.retain(|key, _| !key.starts_with(RESERVED_PREFIX));
            fields
        }
    };
    fields.insert(
        EDGE_FIELD.to_owned(),
        MetadataValue::String(edge.as_str().to_owned()),
    );
    fields.insert(HOPS_FIELD.to_owned(), MetadataValue::Integer(hops));
    Metadata::Structured(fields)
}

/// A forwarded open, as the serving relay reads it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Forward {
    /// The edge's name, as sent (not yet checked).
    pub(super) edge: String,
    /// Hops so far.
    pub(super) hops: i64,
    /// The caller's metadata, for the edge.
    pub(super) metadata: Metadata,
}

/// Reads a forwarded open's metadata.
pub(super) fn parse_forward(metadata: Metadata) -> Result<Forward, Refusal> {
    let Metadata::Structured(mut fields) = metadata else {
        return Err(Refusal::Malformed("no structured metadata"));
    };
    let Some(MetadataValue::String(edge)) = fields.remove(EDGE_FIELD) else {
        return Err(Refusal::Malformed("no edge name"));
    };
    let Some(MetadataValue::Integer(hops)) = fields.remove(HOPS_FIELD) else {
        return Err(Refusal::Malformed("no hop count"));
    };
    let bytes = fields.remove(BYTES_FIELD);
    fields.retain(|key, _| !key.starts_with(RESERVED_PREFIX));
    let metadata = match bytes {
        Some(MetadataValue::Bytes(bytes)) if fields.is_empty() => Metadata::Bytes(bytes),
        Some(_) => return Err(Refusal::Malformed("bytes next to fields")),
        None if fields.is_empty() => Metadata::Empty,
        None => Metadata::Structured(fields),
    };
    Ok(Forward {
        edge,
        hops,
        metadata,
    })
}

/// Why a serving relay refused a forwarded open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The edge is not attached here.
    NotAttached,
    /// More hops than [`MAX_HOPS`] (or fewer than one).
    HopLimit(i64),
    /// The metadata is not a forwarded open's.
    Malformed(&'static str),
    /// The edge refused the open.
    Edge(RejectCode, Option<String>),
}

impl Refusal {
    /// The rejection to send for an open to `edge`.
    pub(super) fn to_wire(&self, edge: &str) -> (RejectCode, String) {
        let edge = crate::relay::shown(edge);
        match self {
            Self::NotAttached => (
                RejectCode::ServiceUnavailable,
                format!("{TAG_NOT_ATTACHED}: edge {edge:?} is not attached to this relay"),
            ),
            Self::HopLimit(hops) => (
                RejectCode::Unauthorized,
                format!("{TAG_HOP_LIMIT}: {hops} relay hops, at most {MAX_HOPS} allowed"),
            ),
            Self::Malformed(what) => (
                RejectCode::Unauthorized,
                format!("{TAG_MALFORMED}: not a forwarded open ({what})"),
            ),
            Self::Edge(code, None) => (*code, TAG_EDGE.to_owned()),
            Self::Edge(code, Some(reason)) => (*code, format!("{TAG_EDGE}: {reason}")),
        }
    }
}

/// The error a dialing relay reports for a rejection of its open to `edge` on `relay`.
pub(super) fn refusal_error(
    code: RejectCode,
    reason: Option<String>,
    relay: SocketAddr,
    edge: &EdgeName,
) -> Error {
    let Some(reason) = reason else {
        return Error::StreamRejected { code, reason: None };
    };
    let (tag, rest) = match reason.split_once(':') {
        Some((tag, rest)) => (tag, Some(rest.trim_start())),
        None => (reason.as_str(), None),
    };
    match tag {
        TAG_NOT_ATTACHED => Error::EdgeNotAttached {
            edge: edge.as_str().to_owned(),
            relay,
        },
        TAG_HOP_LIMIT => Error::HopLimitExceeded {
            hops: rest
                .and_then(|rest| rest.split(' ').next())
                .and_then(|hops| hops.parse().ok())
                .unwrap_or(i64::from(MAX_HOPS) + 1),
            limit: MAX_HOPS,
        },
        TAG_EDGE => Error::StreamRejected {
            code,
            reason: rest.map(str::to_owned),
        },
        // A malformed open, or a relay speaking something else: as it came.
        _ => Error::StreamRejected {
            code,
            reason: Some(reason),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge() -> EdgeName {
        EdgeName::new("kiosk").unwrap()
    }

    #[test]
    fn forwarded_metadata_round_trips_the_callers_own() {
        for metadata in [
            Metadata::Empty,
            Metadata::Bytes(b"\x00raw".to_vec()),
            Metadata::Structured(HashMap::from([(
                "tenant".to_owned(),
                MetadataValue::Integer(7),
            )])),
        ] {
            let forward = parse_forward(forward_metadata(&edge(), 1, metadata.clone())).unwrap();
            assert_eq!(
                forward,
                Forward {
                    edge: "kiosk".into(),
                    hops: 1,
                    metadata
                }
            );
        }
    }

    #[test]
    fn a_caller_cannot_smuggle_reserved_fields() {
        let smuggled = Metadata::Structured(HashMap::from([
            (HOPS_FIELD.to_owned(), MetadataValue::Integer(0)),
            (EDGE_FIELD.to_owned(), MetadataValue::String("other".into())),
            ("_peer.x".to_owned(), MetadataValue::Boolean(true)),
        ]));
        let forward = parse_forward(forward_metadata(&edge(), 1, smuggled)).unwrap();
        assert_eq!(forward.edge, "kiosk");
        assert_eq!(forward.hops, 1);
        assert_eq!(forward.metadata, Metadata::Empty);
    }

    #[test]
    fn malformed_opens_are_refused() {
        assert!(matches!(
            parse_forward(Metadata::Empty),
            Err(Refusal::Malformed(_))
        ));
        let no_hops = Metadata::Structured(HashMap::from([(
            EDGE_FIELD.to_owned(),
            MetadataValue::String("kiosk".into()),
        )]));
        assert!(matches!(parse_forward(no_hops), Err(Refusal::Malformed(_))));
    }

    #[test]
    fn refusals_come_back_typed() {
        let relay: SocketAddr = "192.0.2.1:4434".parse().unwrap();
        let back = |refusal: Refusal| {
            let (code, reason) = refusal.to_wire("kiosk");
            refusal_error(code, Some(reason), relay, &edge())
        };
        assert!(matches!(
            back(Refusal::NotAttached),
            Error::EdgeNotAttached { relay: r, .. } if r == relay
        ));
        assert!(matches!(
            back(Refusal::HopLimit(5)),
            Error::HopLimitExceeded { hops: 5, limit: 1 }
        ));
        assert!(matches!(
            back(Refusal::Edge(RejectCode::UnsupportedService, Some("no web: here".into()))),
            Error::StreamRejected { code: RejectCode::UnsupportedService, reason: Some(r) } if r == "no web: here"
        ));
        assert!(matches!(
            back(Refusal::Edge(RejectCode::LimitExceeded, None)),
            Error::StreamRejected {
                code: RejectCode::LimitExceeded,
                reason: None
            }
        ));
        assert!(matches!(
            back(Refusal::Malformed("x")),
            Error::StreamRejected {
                code: RejectCode::Unauthorized,
                reason: Some(_)
            }
        ));
    }

    #[test]
    fn hello_admits_only_the_secret() {
        let secret = ClusterSecret::new("s3cret").unwrap();
        let hello = hello(&RelayId::new("relay-b"), &secret);
        assert_eq!(check_hello(&hello, &secret), Some(RelayId::new("relay-b")));
        let other = ClusterSecret::new("other").unwrap();
        assert_eq!(check_hello(&hello, &other), None);
        assert_eq!(check_hello(&Metadata::Empty, &secret), None);
    }
}
