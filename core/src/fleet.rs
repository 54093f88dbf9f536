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
    /// Time since the current agent process first reported, by the database clock.
    pub uptime_ms: u64,
    /// Milliseconds since the last heartbeat, by the database clock.
    pub age_ms: u64,
    /// True when `age_ms` exceeds three of the node's intervals.
    pub stale: bool,
}

/// Whether a heartbeat `age_ms` old is stale for a node beating every `interval_ms`.
pub fn is_stale(age_ms: u64, interval_ms: u64) -> bool {
    age_ms > interval_ms.saturating_mul(u64::from(STALE_AFTER_INTERVALS))
}

/// Renders nodes as the table `callfleet status` prints.
pub fn render_table(nodes: &[NodeStatus]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<10} {:<5} {:<9} {:>11} {:>6} {:>5} {:>9}  HEALTH",
        "NODE", "POOL", "ROLE", "STATE", "CALLS/MAX", "LOAD", "CPU%", "AGE"
    );
    for n in nodes {
        let mut health = Vec::new();
        if n.stale {
            health.push("STALE".to_owned());
        }
        if !n.pbx_up {
            health.push("pbx-down".to_owned());
        }
        health.extend(
            n.shed
                .iter()
                .filter(|t| t.shed)
                .map(|t| format!("shed:{}", t.name)),
        );
        if health.is_empty() {
            health.push("ok".to_owned());
        }
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:<5} {:<9} {:>11} {:>6.2} {:>5.1} {:>9}  {}",
            n.id.as_str(),
            n.pool.as_str(),
            n.role.as_str(),
            n.state.as_str(),
            format!("{}/{}", n.calls, n.max_calls),
            n.load1,
            n.cpu_pct,
            format_age(n.age_ms),
            health.join(",")
        );
    }
    out
}

fn format_age(age_ms: u64) -> String {
    match age_ms {
        0..10_000 => format!("{:.1}s", age_ms as f64 / 1000.0),
        10_000..3_600_000 => format!("{}s", age_ms / 1000),
        _ => format!("{}h", age_ms / 3_600_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_marks_stale_nodes() {
        let node = NodeStatus {
            id: NodeId::new("pbx-1").expect("id"),
            pool: PoolName::new("default").expect("pool"),
            role: NodeRole::Core,
            sip_uri: "sip:10.0.0.1".into(),
            state: NodeState::Active,
            drain_requested: false,
            pbx_up: true,
            calls: 3,
            max_calls: 100,
            load1: 0.25,
            cpu_pct: 5.0,
            mem_pct: 10.0,
            cores: 2,
            shed: vec![ShedTierState {
                name: "reports".into(),
                shed: true,
                command_ok: true,
            }],
            seq: 1,
            interval_ms: 2000,
            uptime_ms: 60_000,
            age_ms: 7_000,
            stale: true,
        };
        let table = render_table(&[node]);
        let row = table.lines().nth(1).expect("a row");
        assert!(row.starts_with("pbx-1"), "{table}");
        assert!(row.contains("3/100") && row.contains("7.0s"), "{table}");
        assert!(row.ends_with("STALE,shed:reports"), "{table}");
    }

    #[test]
    fn staleness_is_three_intervals() {
        assert!(!is_stale(6_000, 2_000));
        assert!(is_stale(6_001, 2_000));
        assert!(!is_stale(0, 0));
    }
}
