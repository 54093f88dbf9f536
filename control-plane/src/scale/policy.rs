//! When to add and remove extra nodes: pure decisions over the fleet's heartbeats, with no
//! I/O, so the same code runs in the leader and in the day-long simulation.
//!
//! - **Scale out** when the fleet's calls stay above `scale_out_above` of its capacity for
//!   `scale_out_for`. Nodes started and not yet heartbeating count with
//!   `extra_node_calls` each, so a booting node is not started twice; a drain in progress
//!   is undone first (cheaper than a new node).
//! - **Scale in** when the calls would stay below `scale_in_below` of the capacity *left
//!   without the least-busy extra node* for `scale_in_for`, one node at a time, never while
//!   a node boots or drains. The gap between the two thresholds and the windows are what
//!   keep a wave of load from flapping the fleet.
//! - **Never drop a call**: a removed node is drained first and terminated only once it
//!   reports `drained`, or after `max_drain` (an error in the log names its calls).
//! - The core nodes are never touched: only `role = extra` nodes are drained or ended.
//! - Supervisors' minimum and maximum apply at once, without windows; paused, nothing is
//!   decided at all.
//! - An extra node that is drain-requested is being removed, whoever asked: extra nodes
//!   are disposable, so one a supervisor drains is terminated once drained. To keep a
//!   drained node around, pause the autoscaler.
//! - An extra node silent for longer than `boot_timeout` (its agent or host died) is ended
//!   too, so a broken host is not kept; the load then brings a new one.
//! - A node once ended is never decided about again by this leader (the leader also
//!   removes it from the store, so its successor does not see it).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use callfleet_core::config::AutoscalerConfig;
use callfleet_core::store::ScalerSteering;
use callfleet_core::{NodeId, NodeRole, NodeState, NodeStatus};
use serde::Serialize;

/// The fleet as the autoscaler sees it, with the numbers behind every decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    /// Calls on all live nodes.
    pub calls: u32,
    /// Calls the active nodes (live, not draining) can carry.
    pub capacity: u32,
    /// `calls / capacity`; above 1 when nodes carry more than their capacity, and
    /// `None` without any capacity.
    pub utilisation: Option<f64>,
    /// Extra nodes live and taking calls.
    pub extra_active: u32,
    /// Extra nodes started and not yet heartbeating.
    pub extra_booting: u32,
    /// Extra nodes being drained for removal.
    pub extra_draining: u32,
    /// The fewest extra nodes kept (supervisors' minimum).
    pub min_extra: u32,
    /// The most extra nodes allowed (the lower of the configured and supervisors' maximum).
    pub max_extra: u32,
    /// Whether supervisors paused the autoscaler.
    pub paused: bool,
}

/// What the leader is to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Start `count` more extra nodes.
    Launch {
        /// How many.
        count: u32,
        /// Why, in words.
        why: String,
    },
    /// Stop sending calls to the node, to remove it once drained.
    Drain {
        /// The extra node.
        node: NodeId,
        /// Why, in words.
        why: String,
    },
    /// Take calls on the node again: load came back while it drained.
    Undrain {
        /// The extra node.
        node: NodeId,
        /// Why, in words.
        why: String,
    },
    /// End the node: drained, past `max_drain` (`calls` are then cut), or silent.
    Terminate {
        /// The extra node.
        node: NodeId,
        /// Calls it carried by its last heartbeat.
        calls: u32,
        /// Why it ends.
        end: End,
        /// Why, in words.
        why: String,
    },
    /// Nodes started but not heartbeating within `boot_timeout` are no longer counted on
    /// (a later scale-out replaces them).
    GiveUpBooting {
        /// How many.
        count: u32,
        /// Why, in words.
        why: String,
    },
}

/// Why an extra node is terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// It drained: no call is cut.
    Drained,
    /// It still had calls at `max_drain`: they are cut.
    DrainTimeout,
    /// It has not heartbeated for longer than `boot_timeout`.
    Silent,
}

impl Decision {
    /// The audit log's action.
    pub fn action(&self) -> &'static str {
        match self {
            Self::Launch { .. } => "scale.launch",
            Self::Drain { .. } => "scale.drain",
            Self::Undrain { .. } => "scale.undrain",
            Self::Terminate {
                end: End::Drained, ..
            } => "scale.terminate",
            Self::Terminate {
                end: End::DrainTimeout,
                ..
            } => "scale.terminate_forced",
            Self::Terminate {
                end: End::Silent, ..
            } => "scale.terminate_silent",
            Self::GiveUpBooting { .. } => "scale.boot_timeout",
        }
    }

    /// The audit log's subject.
    pub fn subject(&self) -> String {
        match self {
            Self::Drain { node, .. }
            | Self::Undrain { node, .. }
            | Self::Terminate { node, .. } => {
                format!("node:{node}")
            }
            Self::Launch { .. } | Self::GiveUpBooting { .. } => "autoscaler".to_owned(),
        }
    }

    /// Why, in words.
    pub fn why(&self) -> &str {
        match self {
            Self::Launch { why, .. }
            | Self::Drain { why, .. }
            | Self::Undrain { why, .. }
            | Self::Terminate { why, .. }
            | Self::GiveUpBooting { why, .. } => why,
        }
    }
}

/// The decisions' memory: windows, cooldowns, nodes booting and draining.
#[derive(Debug)]
pub struct Policy {
    config: AutoscalerConfig,
    above_since: Option<Instant>,
    below_since: Option<Instant>,
    last_out: Option<Instant>,
    last_in: Option<Instant>,
    /// When each launch not yet matched by a new node's heartbeat was decided.
    booting: Vec<Instant>,
    /// Extra nodes seen so far: a new one matches a launch.
    known_extra: Option<BTreeSet<NodeId>>,
    /// Nodes being drained for removal, with when the drain was seen first.
    draining: BTreeMap<NodeId, Instant>,
    /// Nodes this policy ended; the store may still list them for a while.
    ended: BTreeSet<NodeId>,
}

impl Policy {
    /// A policy that knows nothing yet: the first look adopts the extra nodes and drains
    /// it finds (a new leader takes over where the last one was).
    pub fn new(config: AutoscalerConfig) -> Self {
        Self {
            config,
            above_since: None,
            below_since: None,
            last_out: None,
            last_in: None,
            booting: Vec::new(),
            known_extra: None,
            draining: BTreeMap::new(),
            ended: BTreeSet::new(),
        }
    }

    /// The figures of `nodes` under `steering`, without deciding anything (for status
    /// pages of control planes that do not lead).
    pub fn figures(
        config: &AutoscalerConfig,
        nodes: &[NodeStatus],
        steering: &ScalerSteering,
    ) -> Figures {
        let max_extra = steering
            .max_extra
            .map_or(config.max_extra, |max| max.min(config.max_extra));
        let live = || nodes.iter().filter(|n| !n.stale);
        let active = || live().filter(|n| is_active(n));
        Figures {
            calls: live().map(|n| n.calls).sum(),
            capacity: active().map(|n| n.max_calls).sum(),
            utilisation: None,
            extra_active: count(active().filter(|n| n.role == NodeRole::Extra)),
            extra_booting: 0,
            extra_draining: count(
                nodes
                    .iter()
                    .filter(|n| n.role == NodeRole::Extra && n.drain_requested),
            ),
            min_extra: steering.min_extra.min(max_extra),
            max_extra,
            paused: steering.paused,
        }
        .with_utilisation()
    }

    /// Looks at the fleet at `now` and says what to do, assuming it will be done; a
    /// decision that could not be carried out is handed back with [`Policy::undo`].
    pub fn decide(
        &mut self,
        now: Instant,
        nodes: &[NodeStatus],
        steering: &ScalerSteering,
    ) -> (Figures, Vec<Decision>) {
        let mut decisions = Vec::new();
        let nodes: Vec<NodeStatus> = nodes
            .iter()
            .filter(|n| !self.ended.contains(&n.id))
            .cloned()
            .collect();
        let nodes = nodes.as_slice();
        self.follow_nodes(now, nodes, &mut decisions);
        let mut figures = Self::figures(&self.config, nodes, steering);
        figures.extra_booting = count(self.booting.iter());
        figures.extra_draining = count(self.draining.keys());
        if steering.paused {
            self.above_since = None;
            self.below_since = None;
            return (figures, Vec::new());
        }
        self.finish_drains(now, nodes, &figures, &mut decisions);
        self.end_silent(nodes, &mut decisions);
        if !self.steer(now, nodes, &figures, &mut decisions) {
            self.scale_out(now, &figures, nodes, &mut decisions);
            self.scale_in(now, nodes, &figures, &mut decisions);
        }
        (figures, decisions)
    }

    /// Forgets what `decision` assumed: it was not carried out.
    pub fn undo(&mut self, decision: &Decision) {
        match decision {
            Decision::Launch { count, .. } => {
                let keep = self.booting.len().saturating_sub(*count as usize);
                self.booting.truncate(keep);
            }
            Decision::Drain { node, .. } => {
                self.draining.remove(node);
            }
            Decision::Terminate { node, .. } => {
                self.ended.remove(node);
            }
            // Still drain-requested and still extra: the next look finds it again.
            Decision::Undrain { .. } => {}
            Decision::GiveUpBooting { .. } => {}
        }
    }

    /// Matches new extra nodes to launches, gives up on launches past `boot_timeout`, and
    /// adopts drains (the first look, or a supervisor's).
    fn follow_nodes(&mut self, now: Instant, nodes: &[NodeStatus], decisions: &mut Vec<Decision>) {
        let extra: BTreeSet<NodeId> = nodes
            .iter()
            .filter(|n| n.role == NodeRole::Extra && !n.stale)
            .map(|n| n.id.clone())
            .collect();
        let known = self.known_extra.get_or_insert_with(|| extra.clone());
        for node in &extra {
            if known.insert(node.clone()) && !self.booting.is_empty() {
                self.booting.remove(0);
            }
        }
        let before = self.booting.len();
        let boot_timeout = self.config.boot_timeout;
        self.booting
            .retain(|since| now.duration_since(*since) < boot_timeout);
        let given_up = before - self.booting.len();
        if given_up > 0 {
            decisions.push(Decision::GiveUpBooting {
                count: u32::try_from(given_up).unwrap_or(u32::MAX),
                why: format!(
                    "{given_up} started node(s) sent no heartbeat within boot_timeout ({}); no longer counted on, replaced if the load still needs them",
                    humantime::format_duration(boot_timeout)
                ),
            });
        }
        for node in nodes {
            if node.role == NodeRole::Extra && node.drain_requested {
                self.draining.entry(node.id.clone()).or_insert(now);
            }
        }
        // Undrained by someone, or gone from the store.
        self.draining.retain(|id, _| {
            nodes
                .iter()
                .any(|n| &n.id == id && n.role == NodeRole::Extra && n.drain_requested)
        });
    }

    fn finish_drains(
        &mut self,
        now: Instant,
        nodes: &[NodeStatus],
        figures: &Figures,
        decisions: &mut Vec<Decision>,
    ) {
        let mut ended = Vec::new();
        for (id, since) in &self.draining {
            let Some(node) = nodes.iter().find(|n| &n.id == id) else {
                continue;
            };
            let draining_for = now.duration_since(*since);
            if node.state == NodeState::Drained && !node.stale {
                ended.push(Decision::Terminate {
                    node: id.clone(),
                    calls: node.calls,
                    end: End::Drained,
                    why: format!(
                        "drained: no calls left after {} of draining ({} calls on {} capacity in the fleet)",
                        humantime::format_duration(round(draining_for)),
                        figures.calls,
                        figures.capacity
                    ),
                });
            } else if draining_for >= self.config.max_drain {
                ended.push(Decision::Terminate {
                    node: id.clone(),
                    calls: node.calls,
                    end: End::DrainTimeout,
                    why: format!(
                        "still {} with {} call(s) after max_drain ({}): terminated anyway, those calls are cut",
                        if node.stale { "silent" } else { "draining" },
                        node.calls,
                        humantime::format_duration(self.config.max_drain)
                    ),
                });
            }
        }
        for decision in ended {
            self.ending(&decision);
            decisions.push(decision);
        }
    }

    /// Ends extra nodes silent for longer than `boot_timeout` (not those being drained:
    /// `max_drain` bounds them).
    fn end_silent(&mut self, nodes: &[NodeStatus], decisions: &mut Vec<Decision>) {
        let limit = self.config.boot_timeout;
        let silent: Vec<Decision> = nodes
            .iter()
            .filter(|n| n.role == NodeRole::Extra && n.stale && !self.draining.contains_key(&n.id))
            .filter(|n| Duration::from_millis(n.age_ms) > limit)
            .map(|n| Decision::Terminate {
                node: n.id.clone(),
                calls: n.calls,
                end: End::Silent,
                why: format!(
                    "no heartbeat for {}, longer than boot_timeout ({}): its host is ended ({} call(s) at its last heartbeat)",
                    humantime::format_duration(round(Duration::from_millis(n.age_ms))),
                    humantime::format_duration(limit),
                    n.calls
                ),
            })
            .collect();
        for decision in silent {
            self.ending(&decision);
            decisions.push(decision);
        }
    }

    fn ending(&mut self, decision: &Decision) {
        if let Decision::Terminate { node, .. } = decision {
            self.draining.remove(node);
            self.ended.insert(node.clone());
            if let Some(known) = self.known_extra.as_mut() {
                known.remove(node);
            }
        }
    }

    /// Supervisors' minimum and maximum; true when it decided something.
    fn steer(
        &mut self,
        now: Instant,
        nodes: &[NodeStatus],
        figures: &Figures,
        decisions: &mut Vec<Decision>,
    ) -> bool {
        let present = figures.extra_active + figures.extra_booting;
        if present < figures.min_extra {
            let count = figures.min_extra - present;
            self.launched(now, count);
            decisions.push(Decision::Launch {
                count,
                why: format!(
                    "{present} extra node(s) running or booting, below the minimum of {}",
                    figures.min_extra
                ),
            });
            return true;
        }
        if figures.extra_active > figures.max_extra && self.draining.is_empty() {
            if let Some(victim) = least_busy_extra(nodes) {
                self.draining.insert(victim.id.clone(), now);
                decisions.push(Decision::Drain {
                    node: victim.id.clone(),
                    why: format!(
                        "{} extra nodes, above the maximum of {}; {} has the fewest calls ({})",
                        figures.extra_active, figures.max_extra, victim.id, victim.calls
                    ),
                });
            }
            return true;
        }
        false
    }

    fn scale_out(
        &mut self,
        now: Instant,
        figures: &Figures,
        nodes: &[NodeStatus],
        decisions: &mut Vec<Decision>,
    ) {
        let per_node = self.extra_node_calls(nodes);
        let capacity = figures.capacity + figures.extra_booting * per_node;
        let high = f64::from(figures.calls) > self.config.scale_out_above * f64::from(capacity);
        if !high {
            self.above_since = None;
            return;
        }
        let since = *self.above_since.get_or_insert(now);
        let held = now.duration_since(since);
        if held < self.config.scale_out_for
            || self.cooling_down(now, self.last_out, self.config.cooldown_out)
        {
            return;
        }
        let above = self.config.scale_out_above;
        let why = |action: &str| {
            format!(
                "{} calls on {capacity} capacity (booting nodes included) = {:.0} %, above {:.0} % for {}: {action}",
                figures.calls,
                share(figures.calls, capacity) * 100.0,
                above * 100.0,
                humantime::format_duration(round(held))
            )
        };
        if let Some(node) = self.draining.keys().next_back().cloned() {
            self.draining.remove(&node);
            decisions.push(Decision::Undrain {
                why: why(&format!("{node} takes calls again instead of a new node")),
                node,
            });
        } else {
            let room = figures
                .max_extra
                .saturating_sub(figures.extra_active + figures.extra_booting);
            if room == 0 {
                return;
            }
            let wanted = (f64::from(figures.calls) / above).ceil() as u64;
            let missing = wanted.saturating_sub(u64::from(capacity));
            let count = u32::try_from(missing.div_ceil(u64::from(per_node)))
                .unwrap_or(u32::MAX)
                .clamp(1, room);
            self.launched(now, count);
            decisions.push(Decision::Launch {
                count,
                why: why(&format!("start {count} extra node(s) of {per_node} calls")),
            });
        }
        self.last_out = Some(now);
        self.above_since = None;
        self.below_since = None;
    }

    fn scale_in(
        &mut self,
        now: Instant,
        nodes: &[NodeStatus],
        figures: &Figures,
        decisions: &mut Vec<Decision>,
    ) {
        let busy = figures.extra_booting > 0 || !self.draining.is_empty();
        let victim = least_busy_extra(nodes);
        let low = match victim {
            Some(victim) if !busy && figures.extra_active > figures.min_extra => {
                let left = figures.capacity - victim.max_calls;
                left > 0 && f64::from(figures.calls) < self.config.scale_in_below * f64::from(left)
            }
            _ => false,
        };
        let Some(victim) = victim.filter(|_| low) else {
            self.below_since = None;
            return;
        };
        let since = *self.below_since.get_or_insert(now);
        let held = now.duration_since(since);
        if held < self.config.scale_in_for
            || self.cooling_down(now, self.last_in, self.config.cooldown_in)
            || self.cooling_down(now, self.last_out, self.config.cooldown_out)
        {
            return;
        }
        let left = figures.capacity - victim.max_calls;
        self.draining.insert(victim.id.clone(), now);
        self.last_in = Some(now);
        self.below_since = None;
        decisions.push(Decision::Drain {
            node: victim.id.clone(),
            why: format!(
                "{} calls would be {:.0} % of the {left} capacity left without {} (its {} calls included), below {:.0} % for {}: drain it to remove it",
                figures.calls,
                share(figures.calls, left) * 100.0,
                victim.id,
                victim.calls,
                self.config.scale_in_below * 100.0,
                humantime::format_duration(round(held))
            ),
        });
    }

    fn launched(&mut self, now: Instant, count: u32) {
        self.booting
            .extend(std::iter::repeat_n(now, count as usize));
    }

    fn cooling_down(&self, now: Instant, last: Option<Instant>, cooldown: Duration) -> bool {
        last.is_some_and(|last| now.duration_since(last) < cooldown)
    }

    /// What a new extra node carries: as the extra nodes report, else as configured.
    fn extra_node_calls(&self, nodes: &[NodeStatus]) -> u32 {
        nodes
            .iter()
            .filter(|n| n.role == NodeRole::Extra && n.max_calls > 0)
            .map(|n| n.max_calls)
            .max()
            .unwrap_or(self.config.extra_node_calls)
    }
}

impl Figures {
    fn with_utilisation(mut self) -> Self {
        self.utilisation = (self.capacity > 0).then(|| share(self.calls, self.capacity));
        self
    }
}

fn is_active(node: &NodeStatus) -> bool {
    node.state == NodeState::Active && !node.drain_requested
}

/// The active extra node with the fewest calls (then the lowest id).
fn least_busy_extra(nodes: &[NodeStatus]) -> Option<&NodeStatus> {
    nodes
        .iter()
        .filter(|n| n.role == NodeRole::Extra && !n.stale && is_active(n))
        .min_by(|a, b| a.calls.cmp(&b.calls).then_with(|| a.id.cmp(&b.id)))
}

fn share(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        f64::INFINITY
    } else {
        f64::from(part) / f64::from(whole)
    }
}

fn count<T>(items: impl Iterator<Item = T>) -> u32 {
    u32::try_from(items.count()).unwrap_or(u32::MAX)
}

fn round(duration: Duration) -> Duration {
    Duration::from_secs(duration.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extra(id: &str) -> NodeStatus {
        NodeStatus {
            role: NodeRole::Extra,
            ..callfleet_core::testing::node_status(id, "sip:127.0.0.1:5060")
        }
    }

    #[test]
    fn a_silent_extra_node_is_ended_once_and_a_silent_core_node_never() {
        let config = AutoscalerConfig::default();
        let mut policy = Policy::new(config.clone());
        let silent_for = config.boot_timeout + Duration::from_secs(1);
        let silent = |mut node: NodeStatus| {
            node.stale = true;
            node.age_ms = silent_for.as_millis() as u64;
            node
        };
        let nodes = [
            silent(callfleet_core::testing::node_status(
                "core-1",
                "sip:127.0.0.1:5060",
            )),
            callfleet_core::testing::node_status("core-2", "sip:127.0.0.1:5060"),
            extra("extra-1"),
            silent(extra("extra-2")),
        ];
        let steering = ScalerSteering {
            min_extra: 1,
            ..ScalerSteering::default()
        };
        let now = Instant::now();
        let (_, decisions) = policy.decide(now, &nodes, &steering);
        let ended: Vec<(&str, String)> = decisions
            .iter()
            .map(|d| (d.action(), d.subject()))
            .collect();
        assert_eq!(
            ended,
            [("scale.terminate_silent", "node:extra-2".to_owned())]
        );
        // The store still lists it until the leader removes it: it is not ended twice.
        let (figures, again) = policy.decide(now + config.tick, &nodes, &steering);
        assert_eq!(again, []);
        assert_eq!(figures.extra_active, 1);
    }

    #[test]
    fn a_terminate_that_failed_is_decided_again() {
        let config = AutoscalerConfig::default();
        let mut policy = Policy::new(config.clone());
        let mut dead = extra("extra-1");
        dead.stale = true;
        dead.age_ms = (config.boot_timeout + Duration::from_secs(1)).as_millis() as u64;
        let nodes = [
            callfleet_core::testing::node_status("core-1", "sip:127.0.0.1:5060"),
            dead,
        ];
        let now = Instant::now();
        let (_, first) = policy.decide(now, &nodes, &ScalerSteering::default());
        assert_eq!(first.len(), 1);
        policy.undo(&first[0]);
        let (_, second) = policy.decide(now + config.tick, &nodes, &ScalerSteering::default());
        assert_eq!(second, first);
    }
}
