//! [`EdgeName`]: the name an edge registers under, checked once where it enters.
//!
//! Names come from the network and end up in hostnames (`<edge>.<domain>`), log lines and
//! map keys. Checking them in one constructor means the registry, the directory and the
//! routing code never see a name that is not a DNS label.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use crate::error::Error;

/// Longest edge name: a DNS label's limit.
pub const MAX_EDGE_NAME_LEN: usize = 63;

/// A valid edge name: a lowercase DNS label (1 to 63 of `a-z`, `0-9` and `-`, not
/// starting or ending with `-`).
///
/// ```
/// use backhaul::relay::EdgeName;
///
/// let name = EdgeName::new("edge-1")?;
/// assert_eq!(name.as_str(), "edge-1");
/// assert!(EdgeName::new("Edge").is_err());
/// assert!(EdgeName::new("a.b").is_err());
/// # Ok::<(), backhaul::Error>(())
/// ```
// Shared, not owned: every registry lookup hands out a copy (in an `EdgeHandle`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdgeName(Arc<str>);

impl EdgeName {
    /// Checks `name`.
    ///
    /// # Errors
    /// [`Error::InvalidEdgeName`] if it is not a lowercase DNS label.
    pub fn new(name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        if is_valid(&name) {
            Ok(Self(Arc::from(name)))
        } else {
            Err(Error::InvalidEdgeName(name))
        }
    }

    /// True if `name` would be accepted by [`EdgeName::new`].
    #[must_use]
    pub fn is_valid(name: &str) -> bool {
        is_valid(name)
    }

    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a `String`.
    #[must_use]
    pub fn into_string(self) -> String {
        self.0.to_string()
    }
}

fn is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_EDGE_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl fmt::Display for EdgeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Deref for EdgeName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for EdgeName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for EdgeName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for EdgeName {
    type Error = Error;

    fn try_from(name: &str) -> Result<Self, Error> {
        Self::new(name)
    }
}

impl TryFrom<String> for EdgeName {
    type Error = Error;

    fn try_from(name: String) -> Result<Self, Error> {
        Self::new(name)
    }
}

impl PartialEq<str> for EdgeName {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for EdgeName {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for good in ["edge-1", "a", "0", &"x".repeat(63)] {
            assert!(EdgeName::new(good).is_ok(), "{good:?}");
        }
        for bad in ["", "Edge", "a.b", "-a", "a-", "a b", "é", &"x".repeat(64)] {
            assert!(
                matches!(EdgeName::new(bad), Err(Error::InvalidEdgeName(_))),
                "{bad:?}"
            );
        }
    }
}
