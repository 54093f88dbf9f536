//! Choosing a node for a new call from an in-memory fleet view.
//!
//! The view is rebuilt from the store in the background ([`FleetView::from_nodes`]); the
//! request path only reads it. `pending` counts calls this balancer sent to a node since
//! that node's last heartbeat: heartbeats come every few seconds, INVITEs thousands of
//! times a second, and without it a burst would all land on the node that looked emptiest
//! at the last heartbeat.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use callfleet_core::config::PoolRule;
use callfleet_core::{NodeId, NodeState, NodeStatus, PoolName};

use crate::sip::Uri;

/// One node as the balancer sees it.
#[derive(Debug)]
pub struct NodeEntry {
    /// The node.
    pub id: NodeId,
    /// Its pool.
    pub pool: PoolName,
    /// `host:port` put in Contacts (from the node's `sip_uri`).
    pub target: String,
    /// Calls at its last heartbeat.
    pub calls: u32,
    /// Capacity.
    pub max_calls: u32,
    /// Busier of CPU use and load average per core, 0–1 (more when overloaded).
    pub load: f64,
    /// Takes calls: state `active`, not asked to drain, PBX answering.
    pub accepting: bool,
    /// Heartbeat age when the view was read, by the store's clock.
    pub age_at_read: Duration,
    /// Heartbeat sequence number, to tell a new heartbeat from the same one re-read.
    pub seq: u64,
    /// Calls sent there since that heartbeat.
    pub pending: AtomicU32,
    /// Calls sent there since this balancer started.
    pub routed: AtomicU64,
    /// This balancer's own node.
    pub local: bool,
    /// Breaks ties between equally loaded nodes: a hash of this balancer's and the node's
    /// ids, so each balancer prefers a different node where they all look alike (idle
    /// nodes after a heartbeat) instead of every balancer sending its next call to the
    /// first one in the store's order.
    pub tie: u64,
}

impl NodeEntry {
    /// Whether it has room for one more call.
    fn has_room(&self) -> bool {
        u64::from(self.calls) + u64::from(self.pending.load(Ordering::Relaxed))
            < u64::from(self.max_calls)
    }

    /// Heartbeat age as far as this balancer can tell, `elapsed` after the read.
    fn age(&self, trust: Trust, elapsed: Duration) -> Duration {
        match trust {
            Trust::Full => self.age_at_read + elapsed,
            Trust::LastKnown | Trust::LocalOnly { .. } => self.age_at_read,
        }
    }
}

/// The fleet at one read of the store.
#[derive(Debug)]
pub struct FleetView {
    /// Nodes, in the store's order.
    pub nodes: Vec<NodeEntry>,
    /// When the store was read (monotonic).
    pub read_at: Instant,
}

/// How a view may be used, given the store's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// The store answers: use every node in the view, its heartbeats ageing by the
    /// monotonic clock since the read.
    Full,
    /// The store has been unreachable for less than `stale_grace`: use the view as it was
    /// last read. Heartbeat ages stop at their values then, because an unreachable store
    /// says nothing about the nodes; otherwise every node would look dead after
    /// `heartbeat_ttl` and the grace would never apply.
    LastKnown,
    /// The store has been unreachable past `stale_grace`: only the local node, and only if
    /// its PBX answers our probes.
    LocalOnly {
        /// The local PBX answered a recent OPTIONS probe.
        pbx_alive: bool,
    },
}

/// Scoring parameters.
#[derive(Debug, Clone, Copy)]
pub struct Scoring {
    /// A node whose heartbeat is older than this is skipped.
    pub heartbeat_ttl: Duration,
    /// Weight of CPU load added to utilisation.
    pub cpu_weight: f64,
}

/// A chosen node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// Index into [`FleetView::nodes`].
    pub index: usize,
}

impl FleetView {
    /// Builds a view from the store's rows; `previous` carries over `pending` for nodes
    /// whose heartbeat has not changed since.
    pub fn from_nodes(
        nodes: Vec<NodeStatus>,
        local: &NodeId,
        previous: Option<&FleetView>,
        read_at: Instant,
    ) -> Self {
        let nodes = nodes
            .into_iter()
            .map(|node| {
                let old = previous.and_then(|view| view.nodes.iter().find(|old| old.id == node.id));
                let pending = old
                    .filter(|old| old.seq == node.seq)
                    .map_or(0, |old| old.pending.load(Ordering::Relaxed));
                let routed = old.map_or(0, |old| old.routed.load(Ordering::Relaxed));
                let per_core = if node.cores > 0 {
                    node.load1 / f64::from(node.cores)
                } else {
                    0.0
                };
                let target = target_of(&node.sip_uri);
                NodeEntry {
                    accepting: node.state == NodeState::Active
                        && !node.drain_requested
                        && node.pbx_up
                        && target.is_some(),
                    local: &node.id == local,
                    target: target.unwrap_or_default(),
                    pool: node.pool,
                    calls: node.calls,
                    max_calls: node.max_calls,
                    load: (node.cpu_pct / 100.0).max(per_core).max(0.0),
                    age_at_read: Duration::from_millis(node.age_ms),
                    seq: node.seq,
                    pending: AtomicU32::new(pending),
                    routed: AtomicU64::new(routed),
                    tie: tie_break(local, &node.id),
                    id: node.id,
                }
            })
            .collect();
        Self { nodes, read_at }
    }

    /// The best nodes for a call in `pool`, best first, at most `out.len()` of them; the
    /// first one's `pending` is incremented (the call goes there). Returns how many.
    pub fn choose(
        &self,
        pool: &PoolName,
        scoring: Scoring,
        trust: Trust,
        now: Instant,
        out: &mut [Choice],
    ) -> usize {
        let elapsed = now.saturating_duration_since(self.read_at);
        let mut best: [Candidate; 9] = [Candidate::NONE; 9];
        let limit = out.len().min(best.len());
        let mut found = 0;
        for (index, node) in self.nodes.iter().enumerate() {
            if !self.usable(node, pool, scoring, trust, elapsed) || !node.has_room() {
                continue;
            }
            let load = u64::from(node.calls) + u64::from(node.pending.load(Ordering::Relaxed));
            let score =
                load as f64 / f64::from(node.max_calls) + scoring.cpu_weight * node.load.min(2.0);
            let candidate = Candidate {
                score,
                local: node.local,
                tie: node.tie,
                index,
            };
            // Insertion into the short sorted list.
            let mut slot = found.min(limit);
            while slot > 0 && candidate.better(&best[slot - 1]) {
                slot -= 1;
            }
            if slot < limit {
                best.copy_within(slot..limit - 1, slot + 1);
                best[slot] = candidate;
                found = (found + 1).min(limit);
            }
        }
        for (choice, candidate) in out.iter_mut().zip(best.iter()).take(found) {
            *choice = Choice {
                index: candidate.index,
            };
        }
        if found > 0 {
            let chosen = &self.nodes[best[0].index];
            chosen.pending.fetch_add(1, Ordering::Relaxed);
            chosen.routed.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Whether `pool` has nodes that could take calls but all are at capacity: the callee
    /// is busy, not the balancer unable to route.
    pub fn pool_full(&self, pool: &PoolName, scoring: Scoring, trust: Trust, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.read_at);
        let mut usable = self
            .nodes
            .iter()
            .filter(|node| self.usable(node, pool, scoring, trust, elapsed))
            .peekable();
        usable.peek().is_some() && usable.all(|node| !node.has_room())
    }

    /// Whether `node` may take calls of `pool` (capacity aside).
    fn usable(
        &self,
        node: &NodeEntry,
        pool: &PoolName,
        scoring: Scoring,
        trust: Trust,
        elapsed: Duration,
    ) -> bool {
        match trust {
            Trust::Full | Trust::LastKnown => {
                node.accepting
                    && &node.pool == pool
                    && node.age(trust, elapsed) <= scoring.heartbeat_ttl
            }
            Trust::LocalOnly { pbx_alive } => node.local && pbx_alive && node.accepting,
        }
    }

    /// Whether any node could take a call in any pool (for OPTIONS).
    pub fn can_route(&self, scoring: Scoring, trust: Trust, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.read_at);
        self.nodes.iter().any(|node| {
            let fresh = match trust {
                Trust::Full | Trust::LastKnown => node.age(trust, elapsed) <= scoring.heartbeat_ttl,
                Trust::LocalOnly { pbx_alive } => node.local && pbx_alive,
            };
            fresh && node.accepting && node.has_room()
        })
    }
}

/// A node in the running for a call.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    score: f64,
    local: bool,
    tie: u64,
    index: usize,
}

impl Candidate {
    const NONE: Self = Self {
        score: f64::INFINITY,
        local: false,
        tie: u64::MAX,
        index: usize::MAX,
    };

    /// Lower score first; on a tie the local node, then the lower tie-break hash.
    fn better(&self, other: &Self) -> bool {
        if self.score != other.score {
            return self.score < other.score;
        }
        if self.local != other.local {
            return self.local;
        }
        self.tie < other.tie
    }
}

/// A hash of the balancer's and the node's ids that is the same in every run and on every
/// machine (FNV-1a, then a SplitMix64 finish so short ids spread over all bits).
fn tie_break(balancer: &NodeId, node: &NodeId) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in balancer
        .as_str()
        .bytes()
        .chain([0xff])
        .chain(node.as_str().bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// `host:port` of a node's `sip:` URI (port 5060 when absent).
fn target_of(sip_uri: &str) -> Option<String> {
    let uri = Uri::parse(sip_uri.as_bytes()).ok()?;
    let host = std::str::from_utf8(uri.host).ok()?;
    let port = uri.port.unwrap_or(5060);
    Some(if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// Maps a Request-URI to a node pool by domain, then by number prefix.
#[derive(Debug, Clone)]
pub struct PoolMap {
    rules: Vec<PoolRule>,
    default: PoolName,
}

impl PoolMap {
    /// Rules in configuration order; the first match wins.
    pub fn new(rules: Vec<PoolRule>) -> Self {
        Self {
            rules,
            default: PoolName::new("default").expect("\"default\" is a valid pool name"),
        }
    }

    /// The pool for a call to `uri` (the Request-URI's host and user part).
    pub fn pool_for(&self, host: &[u8], user: Option<&[u8]>) -> &PoolName {
        let digits = user.map(|user| user.strip_prefix(b"+").unwrap_or(user));
        for rule in &self.rules {
            if rule
                .domains
                .iter()
                .any(|domain| domain.as_bytes().eq_ignore_ascii_case(host))
            {
                return &rule.name;
            }
            if let Some(digits) = digits
                && rule
                    .prefixes
                    .iter()
                    .any(|prefix| digits.starts_with(prefix.as_bytes()))
            {
                return &rule.name;
            }
        }
        &self.default
    }
}

#[cfg(test)]
mod tests;
