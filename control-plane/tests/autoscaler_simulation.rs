//! The autoscaler's policy over a simulated day (issue 12): the leader's own decision code
//! ([`Policy`]) driven every 5 s by a fleet whose calls follow a call center's day: a quiet
//! night, a ramp to 600 agents' worth of calls (600 at once), a plateau with a 10-minute
//! wave on it, a ramp down. What the simulation stands in for:
//!
//! - **nodes**: each launched node heartbeats `BOOT` after its launch as an active extra
//!   node of 100 calls; a drain-requested node takes no new calls and reports `drained`
//!   when its last call ends, as the store computes it from the node-agent's heartbeats;
//! - **calls**: each lasts 1–5 minutes (a fixed pseudo-random sequence) and goes to the
//!   active node with the lowest share of its capacity, as the balancer sends it;
//! - **the executor**: launch and terminate are immediate; terminating a node with calls
//!   would cut them, so every termination's calls are counted.
//!
//! The negative control runs the same day with the protection against flapping switched
//! off (thresholds 1 % apart, no windows, no cooldowns): it must flap on the wave.

use std::time::{Duration, Instant};

use callfleet_control_plane::scale::policy::{Decision, Policy};
use callfleet_core::config::AutoscalerConfig;
use callfleet_core::store::ScalerSteering;
use callfleet_core::{NodeId, NodeRole, NodeState, NodeStatus, testing};

const TICK: Duration = Duration::from_secs(5);
const BOOT: Duration = Duration::from_secs(90);
const CORE_CALLS: u32 = 150;
const EXTRA_CALLS: u32 = 100;
const HOUR: u64 = 3600;

/// Calls wanted at `t` seconds into the day.
fn load(t: u64) -> u32 {
    let hours = t as f64 / HOUR as f64;
    let base = match hours {
        h if h < 7.0 => 20.0,
        h if h < 9.0 => 20.0 + (h - 7.0) / 2.0 * 580.0,
        h if h < 17.0 => 600.0,
        h if h < 20.0 => 600.0 - (h - 17.0) / 3.0 * 580.0,
        _ => 20.0,
    };
    // The wave: ±40 calls every 10 minutes, all day.
    let wave = 40.0 * (t as f64 * std::f64::consts::TAU / 600.0).sin();
    (base + wave).max(0.0).round() as u32
}

struct Node {
    status: NodeStatus,
    /// When each of its calls ends, in seconds of the day.
    calls: Vec<u64>,
}

struct Day {
    nodes: Vec<Node>,
    booting: Vec<(u64, u32)>,
    next_extra: u32,
    random: u64,
    /// Per tick: (t, calls, capacity, active extra nodes).
    timeline: Vec<(u64, u32, u32, u32)>,
    decisions: Vec<(u64, Decision)>,
    cut_calls: u32,
}

impl Day {
    fn new() -> Self {
        let nodes = ["core-1", "core-2"]
            .into_iter()
            .map(|id| Node {
                status: NodeStatus {
                    max_calls: CORE_CALLS,
                    ..testing::node_status(id, "sip:127.0.0.1:5060")
                },
                calls: Vec::new(),
            })
            .collect();
        Self {
            nodes,
            booting: Vec::new(),
            next_extra: 1,
            random: 0x2545_f491_4f6c_dd1d,
            timeline: Vec::new(),
            decisions: Vec::new(),
            cut_calls: 0,
        }
    }

    fn duration(&mut self) -> u64 {
        // xorshift: a fixed sequence, so every run is the same day.
        self.random ^= self.random << 13;
        self.random ^= self.random >> 7;
        self.random ^= self.random << 17;
        60 + self.random % 241
    }

    fn step(&mut self, t: u64) {
        for (at, count) in std::mem::take(&mut self.booting) {
            if t < at {
                self.booting.push((at, count));
                continue;
            }
            for _ in 0..count {
                let id = format!("extra-{}", self.next_extra);
                self.next_extra += 1;
                self.nodes.push(Node {
                    status: NodeStatus {
                        role: NodeRole::Extra,
                        max_calls: EXTRA_CALLS,
                        ..testing::node_status(&id, "sip:127.0.0.1:5060")
                    },
                    calls: Vec::new(),
                });
            }
        }
        for node in &mut self.nodes {
            node.calls.retain(|end| *end > t);
        }
        let have: usize = self.nodes.iter().map(|n| n.calls.len()).sum();
        for _ in have..load(t) as usize {
            let end = t + self.duration();
            let best = self
                .nodes
                .iter_mut()
                .filter(|n| !n.status.drain_requested)
                .min_by(|a, b| {
                    let share = |n: &Node| n.calls.len() as f64 / f64::from(n.status.max_calls);
                    share(a).total_cmp(&share(b))
                })
                .expect("the core nodes always take calls");
            best.calls.push(end);
        }
        for node in &mut self.nodes {
            node.status.calls = node.calls.len() as u32;
            node.status.state = match (node.status.drain_requested, node.calls.is_empty()) {
                (false, _) => NodeState::Active,
                (true, false) => NodeState::Draining,
                (true, true) => NodeState::Drained,
            };
        }
    }

    fn carry_out(&mut self, t: u64, decision: &Decision) {
        let node_mut = |nodes: &mut Vec<Node>, id: &NodeId| -> usize {
            nodes
                .iter()
                .position(|n| &n.status.id == id)
                .expect("decided about a node the fleet has")
        };
        match decision {
            Decision::Launch { count, .. } => self.booting.push((t + BOOT.as_secs(), *count)),
            Decision::Drain { node, .. } => {
                let index = node_mut(&mut self.nodes, node);
                assert_eq!(
                    self.nodes[index].status.role,
                    NodeRole::Extra,
                    "a core node drained"
                );
                self.nodes[index].status.drain_requested = true;
            }
            Decision::Undrain { node, .. } => {
                let index = node_mut(&mut self.nodes, node);
                self.nodes[index].status.drain_requested = false;
            }
            Decision::Terminate { node, .. } => {
                let index = node_mut(&mut self.nodes, node);
                let gone = self.nodes.remove(index);
                assert_eq!(gone.status.role, NodeRole::Extra, "a core node terminated");
                self.cut_calls += gone.calls.len() as u32;
            }
            Decision::GiveUpBooting { .. } => {}
        }
    }

    fn run(mut self, config: AutoscalerConfig) -> Self {
        let mut policy = Policy::new(config);
        let start = Instant::now();
        let steering = ScalerSteering::default();
        for tick in 0..(24 * HOUR / TICK.as_secs()) {
            let t = tick * TICK.as_secs();
            self.step(t);
            let nodes: Vec<NodeStatus> = self.nodes.iter().map(|n| n.status.clone()).collect();
            let (figures, decisions) =
                policy.decide(start + Duration::from_secs(t), &nodes, &steering);
            self.timeline
                .push((t, figures.calls, figures.capacity, figures.extra_active));
            for decision in decisions {
                self.carry_out(t, &decision);
                self.decisions.push((t, decision));
            }
        }
        self
    }

    fn actions(&self, action: &str) -> Vec<u64> {
        self.decisions
            .iter()
            .filter(|(_, d)| d.action() == action)
            .map(|(t, _)| *t)
            .collect()
    }

    fn print(&self, title: &str) {
        eprintln!("{title}\n time   calls capacity extra util");
        for (t, calls, capacity, extra) in self.timeline.iter().step_by(360) {
            eprintln!(
                "{:02}:{:02} {calls:>7} {capacity:>8} {extra:>5} {:>4.0}%",
                t / HOUR,
                t % HOUR / 60,
                f64::from(*calls) / f64::from(*capacity) * 100.0
            );
        }
        for (t, decision) in &self.decisions {
            eprintln!(
                "{:02}:{:02}:{:02} {} {}",
                t / HOUR,
                t % HOUR / 60,
                t % 60,
                decision.action(),
                decision.why()
            );
        }
    }
}

fn hours(t: u64) -> f64 {
    t as f64 / HOUR as f64
}

#[test]
fn capacity_follows_a_days_load_without_flapping_or_dropping_a_call() {
    let config = AutoscalerConfig::default();
    let day = Day::new().run(config.clone());
    day.print("a day with the default policy");

    assert_eq!(day.cut_calls, 0, "calls cut by terminations");
    assert!(day.actions("scale.terminate_forced").is_empty());
    assert!(day.actions("scale.terminate_silent").is_empty());
    assert!(day.actions("scale.boot_timeout").is_empty());
    assert!(day.actions("scale.undrain").is_empty());

    // Every launch during the morning's ramp, every removal after the evening's began:
    // the wave never turns the fleet around.
    let launches = day.actions("scale.launch");
    let drains = day.actions("scale.drain");
    assert!(!launches.is_empty() && !drains.is_empty());
    assert!(
        launches.iter().all(|t| (7.0..9.5).contains(&hours(*t))),
        "launches at {:?} h",
        launches.iter().map(|t| hours(*t)).collect::<Vec<_>>()
    );
    assert!(
        drains.iter().all(|t| hours(*t) >= 17.0),
        "drains at {:?} h",
        drains.iter().map(|t| hours(*t)).collect::<Vec<_>>()
    );
    let launched: u32 = day
        .decisions
        .iter()
        .map(|(_, d)| match d {
            Decision::Launch { count, .. } => *count,
            _ => 0,
        })
        .sum();
    assert_eq!(
        day.actions("scale.terminate").len() as u32,
        launched,
        "every node started is ended by night, each after its drain"
    );
    assert_eq!(drains.len() as u32, launched);

    // Through the plateau the fleet holds still, with room above the load's crests.
    let plateau: Vec<_> = day
        .timeline
        .iter()
        .filter(|(t, ..)| (10.0..17.0).contains(&hours(*t)))
        .collect();
    let extra = plateau[0].3;
    assert!(
        plateau.iter().all(|(.., e)| *e == extra),
        "extra nodes changed on the plateau"
    );
    let peak = plateau
        .iter()
        .map(|(_, calls, ..)| *calls)
        .max()
        .expect("plateau");
    assert_eq!(2 * CORE_CALLS + extra * EXTRA_CALLS, plateau[0].2);
    assert!(
        f64::from(peak) <= config.scale_out_above * f64::from(plateau[0].2),
        "{peak} calls at the crest on {} capacity",
        plateau[0].2
    );

    // Capacity follows within the configured delays: no stretch above the threshold lasts
    // longer than the window, a cooldown, a boot and a tick.
    let bound = config.scale_out_for + config.cooldown_out + BOOT + TICK;
    let mut above_since = None;
    for (t, calls, capacity, _) in &day.timeline {
        if f64::from(*calls) > config.scale_out_above * f64::from(*capacity) {
            let since = *above_since.get_or_insert(*t);
            assert!(
                Duration::from_secs(t - since) <= bound,
                "above {} of the capacity from {:.2} h to {:.2} h",
                config.scale_out_above,
                hours(since),
                hours(*t)
            );
        } else {
            above_since = None;
        }
    }
    // And the night is back to the core nodes.
    assert_eq!(day.timeline.last().expect("timeline").3, 0);
}

#[test]
fn without_its_windows_and_gap_the_policy_flaps_on_the_wave() {
    let config = AutoscalerConfig {
        scale_out_above: 0.7,
        scale_in_below: 0.69,
        scale_out_for: Duration::ZERO,
        scale_in_for: Duration::ZERO,
        cooldown_out: Duration::ZERO,
        cooldown_in: Duration::ZERO,
        ..AutoscalerConfig::default()
    };
    let day = Day::new().run(config);
    let on_plateau = |action: &str| {
        day.actions(action)
            .into_iter()
            .filter(|t| (10.0..17.0).contains(&hours(*t)))
            .count()
    };
    eprintln!(
        "unprotected plateau: {} launches, {} drains, {} undrains",
        on_plateau("scale.launch"),
        on_plateau("scale.drain"),
        on_plateau("scale.undrain")
    );
    assert!(
        on_plateau("scale.drain") > 0
            && on_plateau("scale.launch") + on_plateau("scale.undrain") > 0,
        "the unprotected policy held still on the wave, so the protected run shows nothing"
    );
}
