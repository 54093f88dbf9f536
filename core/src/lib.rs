//! Everything the callfleet components share and nothing they do on their own: the domain
//! types, configuration loading, the fleet store, telemetry and shutdown.
//!
//! Component crates (node-agent, balancer, lock-service, control-plane) depend on this crate
//! and never on each other, so a type defined here is the one definition of that concept.

pub mod asterisk;
pub mod config;
pub mod connection_threads;
pub mod fleet;
pub mod ids;
pub mod metrics;
pub mod net;
pub mod realtime;
pub mod routing;
pub mod shutdown;
pub mod store;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use config::{Config, ConfigError};
pub use fleet::{Heartbeat, NodeStatus, ShedTierState};
pub use ids::{NodeId, NodeRole, NodeState, PoolName};
pub use store::{Store, StoreError};
