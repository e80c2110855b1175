//! Authentication of edges: a tower service from a claimed name and credentials to a name.
//!
//! On the wire nothing is new: after the QUIC and session handshakes, the edge opens the
//! relay's [`REGISTER_SERVICE`] (`_register`) with structured metadata
//! `{edge: <name>, token: <secret>}` (see [`registration_metadata`]), and the relay answers
//! with an ordinary `OpenResponse`: accepted (the edge is then routable) or rejected with
//! `Unauthorized` and a reason. Any quic-reverse 0.1.2 client can register this way.
//!
//! What the relay does with the credentials is a `tower::Service<AuthRequest>` answering
//! the [`EdgeName`] to register under, so checks can be swapped (a database, a signed
//! token, an external service) and layered (timeouts, rate limits, metrics) like any tower
//! service. [`Tokens`], a constant-time check of per-name tokens, is the default.
//!
//! The service's error decides the answer: [`Error::Unauthorized`] is a refusal (the edge
//! is told why and its source backed off); any other error means authentication could not
//! be done (a database down): the edge is answered `ServiceUnavailable`, not penalised,
//! and may retry.

use std::collections::HashMap;
use std::fmt;
use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::task::{Context, Poll};

use tower::Service;

use super::name::EdgeName;
use crate::error::Error;
use crate::protocol::{Metadata, MetadataValue};

/// The relay service an edge registers through.
pub const REGISTER_SERVICE: &str = "_register";

/// The metadata field naming the edge.
pub const EDGE_FIELD: &str = "edge";

/// The metadata field holding the edge's token.
pub const TOKEN_FIELD: &str = "token";

/// The registration metadata an edge sends with its `_register` open.
///
/// ```
/// use backhaul::relay::{registration_metadata, REGISTER_SERVICE};
/// # async fn register(client: backhaul::SessionClient<backhaul::QuinnConnection>) -> Result<(), backhaul::Error> {
/// client.open(REGISTER_SERVICE, registration_metadata("edge-1", "s3cret")).await?;
/// # Ok(()) }
/// ```
#[must_use]
pub fn registration_metadata(edge: &str, token: &str) -> Metadata {
    let mut fields = HashMap::new();
    fields.insert(
        EDGE_FIELD.to_owned(),
        MetadataValue::String(edge.to_owned()),
    );
    fields.insert(
        TOKEN_FIELD.to_owned(),
        MetadataValue::String(token.to_owned()),
    );
    Metadata::Structured(fields)
}

/// A string field of structured metadata.
pub(crate) fn metadata_text<'a>(metadata: &'a Metadata, key: &str) -> Option<&'a str> {
    match metadata {
        Metadata::Structured(fields) => match fields.get(key) {
            Some(MetadataValue::String(value)) => Some(value),
            _ => None,
        },
        _ => None,
    }
}

/// What an authenticator is asked: an edge claims `edge` and presents `metadata`.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthRequest {
    /// The name the edge claims (the `edge` field), as sent: not yet checked.
    pub edge: String,
    /// The whole registration metadata (the `token` field, and anything else the edge sent).
    pub metadata: Metadata,
    /// The edge's address.
    pub remote: SocketAddr,
}

impl AuthRequest {
    /// The `token` field of the metadata, if it is a string.
    #[must_use]
    pub fn token(&self) -> Option<&str> {
        metadata_text(&self.metadata, TOKEN_FIELD)
    }
}

impl fmt::Debug for AuthRequest {
    // The metadata holds secrets: never in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthRequest")
            .field("edge", &self.edge)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// Which token each edge name must present; the default authenticator.
///
/// Unknown names and wrong tokens take the same path and the same time, and the comparison
/// does not stop at the first differing byte, so answers tell a guesser nothing.
///
/// ```
/// use backhaul::relay::{AuthRequest, Tokens};
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), backhaul::Error> {
/// let tokens = Tokens::parse(["alpha=s3cret", "beta=other"])?;
/// assert!(tokens.check("alpha", "s3cret"));
///
/// let request = AuthRequest {
///     edge: "alpha".into(),
///     metadata: backhaul::relay::registration_metadata("alpha", "wrong"),
///     remote: "192.0.2.1:4433".parse().unwrap(),
/// };
/// let refused = tokens.oneshot(request).await;
/// assert!(matches!(refused, Err(backhaul::Error::Unauthorized { .. })));
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct Tokens {
    by_edge: HashMap<EdgeName, String>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.by_edge.keys().map(EdgeName::as_str).collect();
        names.sort_unstable();
        f.debug_struct("Tokens").field("edges", &names).finish()
    }
}

impl Tokens {
    /// No edge may register.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses `NAME=TOKEN` entries; an entry may hold several, comma-separated (as an
    /// environment variable would). Empty entries are skipped.
    ///
    /// # Errors
    /// [`Error::InvalidEdgeName`] for a name that is not a DNS label,
    /// [`Error::InvalidTokenEntry`] for an entry without `=` or with an empty token.
    pub fn parse<I, S>(entries: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut tokens = Self::new();
        let mut position = 0;
        for list in entries {
            for entry in list.as_ref().split(',') {
                let entry = entry.trim();
                if entry.is_empty() {
                    continue;
                }
                let (name, token) = entry
                    .split_once('=')
                    .ok_or(Error::InvalidTokenEntry { position })?;
                if token.is_empty() {
                    return Err(Error::InvalidTokenEntry { position });
                }
                tokens.insert(EdgeName::new(name)?, token);
                position += 1;
            }
        }
        Ok(tokens)
    }

    /// Lets `edge` register with `token` (replacing its former token).
    pub fn insert(&mut self, edge: EdgeName, token: impl Into<String>) {
        self.by_edge.insert(edge, token.into());
    }

    /// Adds an entry, builder style.
    ///
    /// # Errors
    /// [`Error::InvalidEdgeName`] if `edge` is not a DNS label.
    pub fn with(mut self, edge: &str, token: impl Into<String>) -> Result<Self, Error> {
        self.insert(EdgeName::new(edge)?, token);
        Ok(self)
    }

    /// Edges that may register.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_edge.len()
    }

    /// True if no edge may register.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_edge.is_empty()
    }

    /// True if `token` is `edge`'s token.
    #[must_use]
    pub fn check(&self, edge: &str, token: &str) -> bool {
        let stored = self.by_edge.get(edge);
        let expected = stored.map_or(&[][..], |token| token.as_bytes());
        // Both comparisons always run: an unknown name costs what a wrong token costs.
        constant_time_eq(expected, token.as_bytes()) & stored.is_some()
    }

    fn authenticate(&self, request: &AuthRequest) -> Result<EdgeName, Error> {
        let token = request.token().unwrap_or_default();
        if self.check(&request.edge, token) {
            // Only valid names are stored, so this cannot fail; stay typed anyway.
            return EdgeName::new(request.edge.as_str());
        }
        Err(Error::Unauthorized {
            reason: Some(format!(
                "invalid credentials for edge {:?}",
                super::shown(&request.edge)
            )),
        })
    }
}

impl Service<AuthRequest> for Tokens {
    type Response = EdgeName;
    type Error = Error;
    type Future = Ready<Result<EdgeName, Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: AuthRequest) -> Self::Future {
        ready(self.authenticate(&request))
    }
}

/// Compares in time that depends only on the lengths, not on where the bytes differ.
fn constant_time_eq(expected: &[u8], given: &[u8]) -> bool {
    let mut difference = u8::from(expected.len() != given.len());
    for (index, byte) in given.iter().enumerate() {
        let wanted = expected.get(index).copied().unwrap_or(!*byte);
        difference |= wanted ^ byte;
    }
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_check() {
        let tokens = Tokens::parse(["a=secret,b=other"]).unwrap();
        assert!(tokens.check("a", "secret"));
        assert!(!tokens.check("a", "secreT"));
        assert!(!tokens.check("a", "secret2"));
        assert!(!tokens.check("a", ""));
        assert!(!tokens.check("b", "secret"));
        assert!(!tokens.check("c", "secret"));
        assert!(!tokens.check("c", ""));
    }

    #[test]
    fn parse_errors_are_typed_and_quote_no_secret() {
        assert!(matches!(
            Tokens::parse(["bad name=x"]),
            Err(Error::InvalidEdgeName(_))
        ));
        let error = Tokens::parse(["a=1", "nosecret"]).unwrap_err();
        assert!(matches!(error, Error::InvalidTokenEntry { position: 1 }));
        assert!(!error.to_string().contains("nosecret"));
        assert!(matches!(
            Tokens::parse(["a="]),
            Err(Error::InvalidTokenEntry { position: 0 })
        ));
        assert_eq!(Tokens::parse([" a=1 , ,b=2"]).unwrap().len(), 2);
    }

    #[test]
    fn registration_round_trips() {
        let metadata = registration_metadata("demo", "t0k");
        assert_eq!(metadata_text(&metadata, EDGE_FIELD), Some("demo"));
        assert_eq!(metadata_text(&metadata, TOKEN_FIELD), Some("t0k"));
        assert_eq!(metadata_text(&Metadata::Empty, EDGE_FIELD), None);
    }

    #[test]
    fn the_authenticator_answers_a_name_or_unauthorized() {
        let tokens = Tokens::new().with("alpha", "s").unwrap();
        let request = |edge: &str, token: &str| AuthRequest {
            edge: edge.to_owned(),
            metadata: registration_metadata(edge, token),
            remote: "192.0.2.1:1".parse().unwrap(),
        };
        assert_eq!(
            tokens.authenticate(&request("alpha", "s")).unwrap(),
            "alpha"
        );
        for (edge, token) in [("alpha", "x"), ("Alpha", "s"), ("beta", "s")] {
            assert!(matches!(
                tokens.authenticate(&request(edge, token)),
                Err(Error::Unauthorized { .. })
            ));
        }
        assert!(!format!("{:?}", request("alpha", "s3cr3t")).contains("s3cr3t"));
    }
}
