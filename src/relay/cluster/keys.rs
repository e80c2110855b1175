//! Where the directory lives in Redis: key names and the notice channel, in one place so
//! the scripts, the refresh and the resync cannot disagree.
//!
//! Every key of an edge carries its name in braces (`{kiosk}`): a Redis Cluster hash tag,
//! so one edge's keys share a slot and the scripts touching them stay single-slot.

use crate::relay::directory::RelayId;

/// The key layout under one prefix.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// `{prefix}:edge:{name}:owner`: the instance that holds the name, leased.
    pub(super) fn owner(&self, name: &str) -> String {
        format!("{}:edge:{{{name}}}:owner", self.prefix)
    }

    /// `{prefix}:edge:{name}:at:`: followed by a relay id, one attachment's key.
    pub(super) fn attachment_prefix(&self, name: &str) -> String {
        format!("{}:edge:{{{name}}}:at:", self.prefix)
    }

    /// `{prefix}:edge:{name}:at:{relay}`: `instance epoch run`, leased.
    pub(super) fn attachment(&self, name: &str, relay: &RelayId) -> String {
        format!("{}{relay}", self.attachment_prefix(name))
    }

    /// `{prefix}:edge:{name}:relays`: the relays that may hold an attachment (a hint the
    /// scripts check and prune; the attachment keys are the truth).
    pub(super) fn relays_of(&self, name: &str) -> String {
        format!("{}:edge:{{{name}}}:relays", self.prefix)
    }

    /// `{prefix}:relay:{id}`: the relay's address, leased: the relay is alive.
    pub(super) fn relay(&self, relay: &RelayId) -> String {
        format!("{}:relay:{relay}", self.prefix)
    }

    /// The pub/sub channel of attach, detach, alive and gone notices.
    pub(super) fn channel(&self) -> String {
        format!("{}:notices", self.prefix)
    }

    /// SCAN pattern of every attachment key.
    pub(super) fn attachment_pattern(&self) -> String {
        format!("{}:edge:*:at:*", self.prefix)
    }

    /// SCAN pattern of every relay liveness key.
    pub(super) fn relay_pattern(&self) -> String {
        format!("{}:relay:*", self.prefix)
    }

    /// The name and relay of an attachment key.
    pub(super) fn parse_attachment<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix(":edge:{")?;
        let (name, relay) = rest.split_once("}:at:")?;
        (!relay.is_empty()).then_some((name, relay))
    }

    /// The relay of a liveness key.
    pub(super) fn parse_relay<'k>(&self, key: &'k str) -> Option<&'k str> {
        let relay = key.strip_prefix(&self.prefix)?.strip_prefix(":relay:")?;
        (!relay.is_empty()).then_some(relay)
    }
}

/// True for the ids and prefixes the directory accepts: 1 to 128 of `A-Z a-z 0-9 . _ : -`
/// (no spaces: notices are space-separated; no glob characters: keys are SCANned).
pub(super) fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let keys = Keys::new("bh");
        let relay = RelayId::new("relay-1:4433");
        let key = keys.attachment("kiosk", &relay);
        assert_eq!(key, "bh:edge:{kiosk}:at:relay-1:4433");
        assert_eq!(keys.parse_attachment(&key), Some(("kiosk", "relay-1:4433")));
        assert_eq!(keys.parse_attachment("bh:edge:{kiosk}:owner"), None);
        assert_eq!(keys.parse_attachment("other:edge:{kiosk}:at:r"), None);
        assert_eq!(keys.parse_relay(&keys.relay(&relay)), Some("relay-1:4433"));
        assert_eq!(keys.owner("kiosk"), "bh:edge:{kiosk}:owner");
        assert!(is_valid_id("10.0.0.1:4433"));
        assert!(!is_valid_id("a b") && !is_valid_id("a*") && !is_valid_id(""));
    }
}
