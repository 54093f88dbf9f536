//! The fleet view: what a node-agent reports about its node, and what readers see.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, NodeRole, NodeState, PoolName};

/// A node is stale when its last heartbeat is older than this many of its own intervals.
pub const STALE_AFTER_INTERVALS: u32 = 3;

/// The state of one load-shedding tier, as carried in the heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShedTierState {
    /// The tier's configured name (e.g. `reports`).
    pub name: String,
    /// True while the tier's service is stopped because of load.
    pub shed: bool,
    /// False when the last stop/start command of the tier failed.
    pub command_ok: bool,
}

/// One heartbeat of a node, as its node-agent writes it. It carries no timestamp: the
/// store stamps it with the database clock so a node's clock can never make it look fresh.
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    /// The reporting node.
    pub id: NodeId,
    /// The pool the node serves.
    pub pool: PoolName,
    /// Core or extra.
    pub role: NodeRole,
    /// Where balancers send calls for this node (`sip:host:port`).
    pub sip_uri: String,
    /// Active calls on the node's PBX (last known value while the PBX is unreachable).
    pub calls: u32,
    /// Whether the PBX answered the last call-count query.
    pub pbx_up: bool,
    /// Capacity of the node in concurrent calls.
    pub max_calls: u32,
    /// One-minute load average.
    pub load1: f64,
    /// CPU use across all cores, 0–100.
    pub cpu_pct: f64,
    /// Memory in use, 0–100.
    pub mem_pct: f64,
    /// Logical cores.
    pub cores: u32,
    /// Load-shedding tiers and their state.
    pub shed: Vec<ShedTierState>,
    /// True while a shedding tier asks the node to take no new calls.
    pub refusing_calls: bool,
    /// The agent's heartbeat interval: readers judge staleness by it.
    pub interval: Duration,
    /// True on the first heartbeat of an agent process: resets `started_at`.
    pub first_of_run: bool,
}

/// A node as readers see it, with its age measured by the database clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node.
    pub id: NodeId,
    /// Its pool.
    pub pool: PoolName,
    /// Core or extra.
    pub role: NodeRole,
    /// Where calls for it go.
    pub sip_uri: String,
    /// Active, draining or drained.
    pub state: NodeState,
    /// True when an operator asked the node to drain.
    pub drain_requested: bool,
    /// Whether the PBX answered the agent's last query.
    pub pbx_up: bool,
    /// Active calls.
    pub calls: u32,
    /// Capacity.
    pub max_calls: u32,
    /// One-minute load average.
    pub load1: f64,
    /// CPU use, 0–100.
    pub cpu_pct: f64,
    /// Memory in use, 0–100.
    pub mem_pct: f64,
    /// Logical cores.
    pub cores: u32,
    /// Load-shedding tiers.
    pub shed: Vec<ShedTierState>,
    /// Heartbeats received since the node first appeared; strictly increasing.
    pub seq: u64,
    /// The node's heartbeat interval in milliseconds.
    pub interval_ms: u64,
    /// When the current agent process first reported (database clock, UTC).
    pub started_at: String,
    /// When the last heartbeat arrived (database clock, UTC).
    pub updated_at: String,
    /// Milliseconds since the last heartbeat, by the database clock.
    pub age_ms: u64,
    /// True when `age_ms` exceeds three of the node's intervals.
    pub stale: bool,
}

/// Whether a heartbeat `age_ms` old is stale for a node beating every `interval_ms`.
pub fn is_stale(age_ms: u64, interval_ms: u64) -> bool {
    age_ms > interval_ms.saturating_mul(u64::from(STALE_AFTER_INTERVALS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staleness_is_three_intervals() {
        assert!(!is_stale(6_000, 2_000));
        assert!(is_stale(6_001, 2_000));
        assert!(!is_stale(0, 0));
    }
}
