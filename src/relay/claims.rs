//! Cluster-wide name claims: the hook a shared directory uses to refuse an edge whose name
//! another edge holds on another relay.
//!
//! A relay's [`Registry`](super::Registry) decides who holds a name *on this relay*. Relays
//! that serve as one must also agree across relays, so the [`Acceptor`](super::Acceptor)
//! asks a [`NameClaims`] after attaching an edge locally and before telling the edge it is
//! registered: a refused claim undoes the local attach and the edge gets the same refusal
//! as a name taken locally ([`Error::EdgeNameTaken`]). Releasing needs no hook: a shared
//! directory follows [`Registry::subscribe`](super::Registry::subscribe) and releases
//! what the registry detached.
//!
//! Claims are made by *edge instance*, not by session: the same edge (one instance id) may
//! hold sessions to several relays at once, while a different edge claiming the name is
//! refused everywhere. An edge names its instance with the [`INSTANCE_FIELD`] of its
//! registration metadata; an edge that sends none gets one generated per session (so it
//! can hold its name on one relay at a time).
//!
//! The default, [`LocalClaims`], accepts every claim: without a shared directory nothing
//! changes.

use std::fmt;
use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::name::EdgeName;
use super::registry::Epoch;
use crate::error::Error;
use crate::protocol::Metadata;

/// The registration metadata field naming the edge's instance (see [`EdgeInstance`]).
pub const INSTANCE_FIELD: &str = "instance";

/// Longest instance id accepted.
pub const MAX_INSTANCE_LEN: usize = 64;

/// One running edge (a process, a device), as opposed to its name: the same instance may
/// attach to several relays under its name, another instance may not.
///
/// An id is 1 to [`MAX_INSTANCE_LEN`] characters of `A-Z a-z 0-9 . _ : -`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdgeInstance(String);

impl EdgeInstance {
    /// An instance id, if `id` is a valid one.
    #[must_use]
    pub fn parse(id: &str) -> Option<Self> {
        let valid = !id.is_empty()
            && id.len() <= MAX_INSTANCE_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        valid.then(|| Self(id.to_owned()))
    }

    /// A fresh id, different from every other this process generates and (with
    /// overwhelming likelihood) from other processes'.
    #[must_use]
    pub fn generate() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let serial = COUNTER.fetch_add(1, Ordering::Relaxed);
        Self(format!("gen-{:016x}-{serial}", process_nonce()))
    }

    /// The instance named in registration `metadata` ([`INSTANCE_FIELD`]), or a generated
    /// one if it names none or an invalid one.
    #[must_use]
    pub fn from_metadata(metadata: &Metadata) -> Self {
        super::auth::metadata_text(metadata, INSTANCE_FIELD)
            .and_then(Self::parse)
            .unwrap_or_else(Self::generate)
    }

    /// The id.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EdgeInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A random number fixed for this process (std's hasher keys are randomly seeded).
pub(crate) fn process_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static NONCE: OnceLock<u64> = OnceLock::new();
    *NONCE.get_or_init(|| {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_nanos()),
        );
        hasher.write_u32(std::process::id());
        hasher.finish()
    })
}

/// What a relay claims: `name`, for `instance`, attached locally with `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The edge's name.
    pub name: EdgeName,
    /// The edge's instance.
    pub instance: EdgeInstance,
    /// The epoch of the local attach the claim is for.
    pub epoch: Epoch,
}

/// Decides whether a local attach may stand cluster-wide; see the [module docs](self).
///
/// ```
/// use backhaul::relay::{Claim, LocalClaims, NameClaims};
/// # async fn demo(claim: Claim) -> Result<(), backhaul::Error> {
/// LocalClaims.claim(claim).await?; // always accepted
/// # Ok(()) }
/// ```
pub trait NameClaims: Send + Sync + 'static {
    /// The claim's future.
    type Future: Future<Output = Result<(), Error>> + Send + 'static;

    /// Claims `claim.name` for `claim.instance`.
    ///
    /// # Errors
    /// [`Error::EdgeNameTaken`] if another instance holds the name elsewhere;
    /// [`Error::DirectoryUnavailable`] if the shared directory cannot decide now.
    fn claim(&self, claim: Claim) -> Self::Future;
}

/// No shared directory: every claim is accepted (the in-process default).
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalClaims;

impl NameClaims for LocalClaims {
    type Future = Ready<Result<(), Error>>;

    fn claim(&self, _claim: Claim) -> Self::Future {
        ready(Ok(()))
    }
}

impl<N: NameClaims> NameClaims for std::sync::Arc<N> {
    type Future = N::Future;

    fn claim(&self, claim: Claim) -> Self::Future {
        (**self).claim(claim)
    }
}

/// A claim future with its type erased, for the acceptor's connection tasks.
pub(crate) type BoxClaim = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// [`NameClaims`] behind a pointer (its future boxed), so the acceptor needs no type
/// parameter for it.
pub(crate) trait DynClaims: Send + Sync {
    fn claim_boxed(&self, claim: Claim) -> BoxClaim;
}

impl<N: NameClaims> DynClaims for N {
    fn claim_boxed(&self, claim: Claim) -> BoxClaim {
        Box::pin(self.claim(claim))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_checked_and_generated_unique() {
        assert!(EdgeInstance::parse("kiosk-7.a_b:1").is_some());
        for bad in ["", "has space", "new\nline", "ü", &"x".repeat(65)] {
            assert!(EdgeInstance::parse(bad).is_none(), "{bad:?}");
        }
        let (a, b) = (EdgeInstance::generate(), EdgeInstance::generate());
        assert_ne!(a, b);
        assert!(EdgeInstance::parse(a.as_str()).is_some());
        let mut fields = std::collections::HashMap::new();
        fields.insert(
            INSTANCE_FIELD.to_owned(),
            crate::MetadataValue::String("box-1".into()),
        );
        let named = EdgeInstance::from_metadata(&Metadata::Structured(fields));
        assert_eq!(named.as_str(), "box-1");
        assert!(EdgeInstance::from_metadata(&Metadata::Empty)
            .as_str()
            .starts_with("gen-"));
    }
}
