//! Edge registration: how an edge proves who it is before anything is routed to it.
//!
//! After the QUIC and session handshakes, the edge opens the relay's `_register` service
//! with structured metadata `{edge: <name>, token: <secret>}`. The relay checks the token
//! for that name in constant time and accepts (the edge is then routable) or rejects with
//! `Unauthorized`. Using an ordinary open keeps registration inside the protocol: no extra
//! stream format, and the answer is a typed `OpenResponse`.

use std::collections::HashMap;

use backhaul::{Metadata, MetadataValue};

/// The relay service an edge registers through.
pub const REGISTER_SERVICE: &str = "_register";

/// The relay refused the edge's credentials.
#[derive(Debug, thiserror::Error)]
#[error("unauthorized: {0}")]
pub struct Unauthorized(pub String);

/// The registration metadata an edge sends.
pub fn registration(edge: &str, token: &str) -> Metadata {
    let mut fields = HashMap::new();
    fields.insert("edge".to_owned(), MetadataValue::String(edge.to_owned()));
    fields.insert("token".to_owned(), MetadataValue::String(token.to_owned()));
    Metadata::Structured(fields)
}

/// Reads `(edge, token)` from registration metadata.
pub fn parse_registration(metadata: &Metadata) -> Option<(String, String)> {
    let Metadata::Structured(fields) = metadata else {
        return None;
    };
    let text = |key: &str| match fields.get(key) {
        Some(MetadataValue::String(value)) => Some(value.clone()),
        _ => None,
    };
    Some((text("edge")?, text("token")?))
}

/// Edge names are DNS labels, since they become subdomains.
pub fn valid_edge_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Which token each edge name must present.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_edge: HashMap<String, String>,
}

impl Tokens {
    /// Parses `name=token` pairs.
    pub fn parse(pairs: &[String]) -> Result<Self, String> {
        let mut by_edge = HashMap::new();
        for pair in pairs.iter().flat_map(|list| list.split(',')) {
            let pair = pair.trim();
            if pair.is_empty() {
                continue;
            }
            let (name, token) = pair
                .split_once('=')
                .ok_or_else(|| format!("edge token {pair:?} is not NAME=TOKEN"))?;
            if !valid_edge_name(name) {
                return Err(format!("edge name {name:?} is not a lowercase DNS label"));
            }
            if token.is_empty() {
                return Err(format!("edge {name:?} has an empty token"));
            }
            by_edge.insert(name.to_owned(), token.to_owned());
        }
        Ok(Self { by_edge })
    }

    pub fn insert(&mut self, edge: &str, token: &str) {
        self.by_edge.insert(edge.to_owned(), token.to_owned());
    }

    /// True if `token` is `edge`'s token. Unknown edges and wrong tokens take the same
    /// path, and the comparison does not stop at the first differing byte.
    pub fn check(&self, edge: &str, token: &str) -> bool {
        let expected = self.by_edge.get(edge).map_or(&[][..], |t| t.as_bytes());
        let known = self.by_edge.contains_key(edge);
        constant_time_eq(expected, token.as_bytes()) && known
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
        let tokens = Tokens::parse(&["a=secret,b=other".to_owned()]).unwrap();
        assert!(tokens.check("a", "secret"));
        assert!(!tokens.check("a", "secreT"));
        assert!(!tokens.check("a", "secret2"));
        assert!(!tokens.check("a", ""));
        assert!(!tokens.check("b", "secret"));
        assert!(!tokens.check("c", "secret"));
    }

    #[test]
    fn names_are_dns_labels() {
        assert!(valid_edge_name("edge-1"));
        assert!(!valid_edge_name("Edge"));
        assert!(!valid_edge_name("a.b"));
        assert!(!valid_edge_name("-a"));
        assert!(Tokens::parse(&["bad name=x".to_owned()]).is_err());
    }

    #[test]
    fn registration_round_trips() {
        let metadata = registration("demo", "t0k");
        assert_eq!(
            parse_registration(&metadata),
            Some(("demo".to_owned(), "t0k".to_owned()))
        );
        assert_eq!(parse_registration(&Metadata::Empty), None);
    }
}
