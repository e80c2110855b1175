//! The messages relays publish on the notice channel, parsed with no trust in their shape.
//!
//! Text, space-separated, one notice per message (every field is checked to hold no
//! space, see `keys::is_valid_id` and `EdgeInstance`):
//! - `attach <name> <relay> <instance> <epoch> <run>`: published by the claim script when
//!   it wrote an attachment;
//! - `detach <name> <relay> <instance> <epoch> <run>`: by the release script when its
//!   compare-and-delete removed one;
//! - `alive <relay> <lease_ms> <address>`: by each relay every lease/3;
//! - `gone <relay>`: by a relay shutting down gracefully.
//!
//! `run` is random per directory start: epochs are compared only within one run, since a
//! restarted relay counts its epochs from 1 again.

use std::time::Duration;

use crate::relay::claims::EdgeInstance;
use crate::relay::directory::RelayId;

/// One attachment as stored: `instance epoch run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Held {
    pub(super) instance: EdgeInstance,
    pub(super) epoch: u64,
    pub(super) run: String,
}

impl Held {
    /// Parses the stored value of an attachment key.
    pub(super) fn parse(value: &str) -> Option<Self> {
        let mut fields = value.split(' ');
        let held = Self::from_fields(&mut fields)?;
        fields.next().is_none().then_some(held)
    }

    fn from_fields<'a>(fields: &mut impl Iterator<Item = &'a str>) -> Option<Self> {
        let instance = EdgeInstance::parse(fields.next()?)?;
        let epoch = fields.next()?.parse().ok()?;
        let run = fields.next().filter(|run| !run.is_empty())?.to_owned();
        Some(Self {
            instance,
            epoch,
            run,
        })
    }

    /// The stored value.
    pub(super) fn value(&self) -> String {
        format!("{} {} {}", self.instance, self.epoch, self.run)
    }
}

/// A notice from the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Notice {
    Attach {
        name: String,
        relay: RelayId,
        held: Held,
    },
    Detach {
        name: String,
        relay: RelayId,
        held: Held,
    },
    Alive {
        relay: RelayId,
        lease: Duration,
        address: String,
    },
    Gone {
        relay: RelayId,
    },
}

impl Notice {
    /// Parses a notice; `None` for anything else (a newer relay's notice, noise).
    pub(super) fn parse(text: &str) -> Option<Self> {
        let (kind, rest) = text.split_once(' ')?;
        match kind {
            "attach" | "detach" => {
                let mut fields = rest.split(' ');
                let name = fields.next()?.to_owned();
                let relay = RelayId::new(fields.next()?);
                let held = Held::from_fields(&mut fields)?;
                if fields.next().is_some() {
                    return None;
                }
                Some(if kind == "attach" {
                    Self::Attach { name, relay, held }
                } else {
                    Self::Detach { name, relay, held }
                })
            }
            "alive" => {
                let mut fields = rest.splitn(3, ' ');
                let relay = RelayId::new(fields.next()?);
                let lease = Duration::from_millis(fields.next()?.parse().ok()?);
                let address = fields.next().unwrap_or_default().to_owned();
                Some(Self::Alive {
                    relay,
                    lease,
                    address,
                })
            }
            "gone" => Some(Self::Gone {
                relay: RelayId::new(rest),
            }),
            _ => None,
        }
    }

    /// The text of an `alive` notice.
    pub(super) fn alive(relay: &RelayId, lease: Duration, address: &str) -> String {
        format!("alive {relay} {} {address}", lease.as_millis())
    }

    /// The text of a `gone` notice.
    pub(super) fn gone(relay: &RelayId) -> String {
        format!("gone {relay}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_parse_strictly() {
        let attach = Notice::parse("attach kiosk r1 box-1 7 ab12").unwrap();
        let Notice::Attach { name, relay, held } = attach else {
            panic!("not an attach")
        };
        assert_eq!((name.as_str(), relay.as_str()), ("kiosk", "r1"));
        assert_eq!(held.value(), "box-1 7 ab12");
        assert_eq!(Held::parse(&held.value()), Some(held));
        assert!(matches!(
            Notice::parse("detach kiosk r1 box-1 7 ab12"),
            Some(Notice::Detach { .. })
        ));
        let alive = Notice::alive(&RelayId::new("r1"), Duration::from_millis(1500), "h:1 x");
        assert_eq!(
            Notice::parse(&alive),
            Some(Notice::Alive {
                relay: RelayId::new("r1"),
                lease: Duration::from_millis(1500),
                address: "h:1 x".into()
            })
        );
        assert_eq!(
            Notice::parse(&Notice::gone(&RelayId::new("r1"))),
            Some(Notice::Gone {
                relay: RelayId::new("r1")
            })
        );
        for noise in [
            "",
            "attach",
            "attach kiosk r1 box-1 x ab",
            "attach kiosk r1 box-1 7 ab extra",
            "alive r1 soon addr",
            "hello there",
        ] {
            assert_eq!(Notice::parse(noise), None, "{noise:?}");
        }
    }
}
