//! Identifiers and enumerations of the fleet's domain.
//!
//! Identifiers are validated once, when they enter the system (config, CLI, API), so the
//! store and the wire never see an empty or oversized id.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest identifier accepted; matches the `VARCHAR(64)` columns of the store.
pub const MAX_ID_LEN: usize = 64;

/// An identifier that was rejected, with the reason in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} `{value}`: {reason}")]
pub struct InvalidId {
    kind: &'static str,
    value: String,
    reason: &'static str,
}

fn validate(kind: &'static str, value: &str) -> Result<(), InvalidId> {
    let reject = |reason| {
        Err(InvalidId {
            kind,
            value: value.to_owned(),
            reason,
        })
    };
    if value.is_empty() {
        return reject("must not be empty");
    }
    if value.len() > MAX_ID_LEN {
        return reject("must be at most 64 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return reject("may only contain ASCII letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `value` and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, InvalidId> {
                let value = value.into();
                validate($kind, &value)?;
                Ok(Self(value))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(value: String) -> Result<Self, InvalidId> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A PBX node of the fleet, unique across the cluster (default: the host name).
    NodeId,
    "node id"
);
id_type!(
    /// A group of nodes that serves one set of numbers or domains (per tenant or country).
    PoolName,
    "pool name"
);

/// Whether a node is one of the permanent core nodes or an extra node started for load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Permanent; named in the carrier's failover list; runs a balancer.
    Core,
    /// Started by the autoscaler when calls climb; removed after a drain.
    Extra,
}

/// Whether a node takes new calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Takes new calls.
    Active,
    /// Takes no new calls; existing calls go on.
    Draining,
    /// Was asked to drain and has no calls left: safe to remove.
    Drained,
}

macro_rules! text_enum {
    ($name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $name {
            /// The name stored in the database and printed by the CLI.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(format!(
                        concat!("unknown ", stringify!($name), " `{}`, expected one of: ", $($text, " "),+),
                        other
                    )),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(NodeRole { Core => "core", Extra => "extra" });
text_enum!(NodeState { Active => "active", Draining => "draining", Drained => "drained" });

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_validated() {
        assert!(NodeId::new("pbx-01.dc1").is_ok());
        assert!(NodeId::new("").is_err());
        assert!(NodeId::new("a b").is_err());
        assert!(NodeId::new("x".repeat(65)).is_err());
        let err = NodeId::new("no/slash").expect_err("must fail").to_string();
        assert!(err.contains("node id `no/slash`"), "{err}");
    }

    #[test]
    fn enums_round_trip_through_text() {
        for state in [NodeState::Active, NodeState::Draining, NodeState::Drained] {
            assert_eq!(state.as_str().parse::<NodeState>(), Ok(state));
        }
        assert!("paused".parse::<NodeState>().is_err());
        assert_eq!("extra".parse::<NodeRole>(), Ok(NodeRole::Extra));
    }
}
