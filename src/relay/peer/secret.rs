//! The cluster secret: what lets one relay use another as a peer.
//!
//! Every relay of a cluster is configured with the same secret. A dialing relay presents
//! it once per connection, in the metadata of its first open (see [`wire`](super::wire)),
//! and the serving relay compares it in constant time, with the [`Tokens`] check edges
//! already go through, so a wrong secret and a wrong length cost the same time.

use std::fmt;

use crate::error::Error;
use crate::relay::auth::Tokens;
use crate::relay::name::EdgeName;

/// The name the secret is filed under in the [`Tokens`] table it reuses (never sent).
const CLUSTER_ENTRY: &str = "cluster";

/// The secret shared by the relays of one cluster. Its `Debug` output hides it.
///
/// ```
/// use backhaul::relay::peer::ClusterSecret;
///
/// let secret = ClusterSecret::new("a long random string")?;
/// assert!(secret.check("a long random string"));
/// assert!(!secret.check("a long random strinG"));
/// assert!(!format!("{secret:?}").contains("random"));
/// # Ok::<(), backhaul::Error>(())
/// ```
#[derive(Clone)]
pub struct ClusterSecret {
    secret: String,
    tokens: Tokens,
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// A cluster secret.
    ///
    /// # Errors
    /// [`Error::MissingSetting`] if `secret` is empty: an empty secret would let anyone
    /// in.
    pub fn new(secret: impl Into<String>) -> Result<Self, Error> {
        let secret = secret.into();
        if secret.is_empty() {
            return Err(Error::MissingSetting("a non-empty cluster secret"));
        }
        let mut tokens = Tokens::new();
        tokens.insert(EdgeName::new(CLUSTER_ENTRY)?, secret.clone());
        Ok(Self { secret, tokens })
    }

    /// True if `given` is the secret; takes the same time wherever they differ.
    #[must_use]
    pub fn check(&self, given: &str) -> bool {
        self.tokens.check(CLUSTER_ENTRY, given)
    }

    /// The secret, to present to a peer.
    pub(super) fn expose(&self) -> &str {
        &self.secret
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_secret_passes() {
        let secret = ClusterSecret::new("s3cret").unwrap();
        assert!(secret.check("s3cret"));
        for wrong in ["", "s3cre", "s3crett", "S3cret", "cluster"] {
            assert!(!secret.check(wrong), "{wrong:?}");
        }
        assert!(matches!(
            ClusterSecret::new(""),
            Err(Error::MissingSetting(_))
        ));
    }
}
