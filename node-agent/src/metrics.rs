//! The node-agent's Prometheus figures, served on `node.metrics_listen` by
//! `callfleet_core::metrics::serve` (the agent has no HTTP listener of its own).
//!
//! What changes once per heartbeat (the store's and the PBX's state, the shed tiers) is
//! set by the heartbeat loop through handles made once; the FastAGI server counts its
//! sessions through handles of its own ([`AgiSessions`]). What the queue scripts and the
//! caches already count in their own atomics is copied into the recorder every
//! [`COPY_EVERY`] by [`copy_figures`], so no call pays for a registry lookup.
//!
//! Label values are bounded: a result or outcome from a fixed list, a shed tier's or a
//! FastAGI script's name from the configuration, a cache from the three this agent has.

use std::time::Duration;

use ::metrics::{Counter, Gauge, counter, gauge};
use callfleet_core::ShedTierState;
use callfleet_core::config::ShedTier;
use tokio_util::sync::CancellationToken;

use crate::provisioning;
use crate::queue::{QueueCalls, callers, candidates};

/// How often the counts kept elsewhere are copied into the recorder.
pub(crate) const COPY_EVERY: Duration = Duration::from_secs(1);

/// What the heartbeat loop reports: one handle per series, made at start.
pub(crate) struct Heartbeats {
    ok: Counter,
    failed: Counter,
    store_up: Gauge,
    pbx_up: Gauge,
    pbx_calls: Gauge,
    /// One per configured tier, in the configuration's order (as `Shedder::states`).
    shed: Vec<Gauge>,
}

impl Heartbeats {
    /// The series of this node, registered at 0: the store and the PBX count as down
    /// until the first heartbeat and the first reading say otherwise.
    pub(crate) fn new(tiers: &[ShedTier]) -> Self {
        callfleet_core::metrics::install();
        let heartbeats = |result: &'static str| counter!("callfleet_node_agent_heartbeats_total", "result" => result);
        let this = Self {
            ok: heartbeats("ok"),
            failed: heartbeats("failed"),
            store_up: gauge!("callfleet_node_agent_store_up"),
            pbx_up: gauge!("callfleet_node_agent_pbx_up"),
            pbx_calls: gauge!("callfleet_node_agent_pbx_calls"),
            shed: tiers
                .iter()
                .map(|tier| gauge!("callfleet_node_agent_shed", "tier" => tier.name.clone()))
                .collect(),
        };
        for counter in [&this.ok, &this.failed] {
            counter.increment(0);
        }
        for gauge in [&this.store_up, &this.pbx_up, &this.pbx_calls]
            .into_iter()
            .chain(&this.shed)
        {
            gauge.set(0.0);
        }
        this
    }

    /// The PBX's call count and whether it answered, as the heartbeat carries them.
    pub(crate) fn pbx(&self, calls: u32, up: bool) {
        self.pbx_calls.set(f64::from(calls));
        self.pbx_up.set(flag(up));
    }

    /// Every tier's state, as `Shedder::states` returns them.
    pub(crate) fn shed(&self, states: &[ShedTierState]) {
        for (gauge, state) in self.shed.iter().zip(states) {
            gauge.set(flag(state.shed));
        }
    }

    /// A heartbeat was written (`true`) or not: the store is up or down until the next.
    pub(crate) fn written(&self, ok: bool) {
        if ok { &self.ok } else { &self.failed }.increment(1);
        self.store_up.set(flag(ok));
    }
}

fn flag(on: bool) -> f64 {
    if on { 1.0 } else { 0.0 }
}

/// How a FastAGI session ended, for `callfleet_node_agent_agi_sessions_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionOutcome {
    /// The script returned.
    Ok,
    /// Asterisk closed the connection under the script (the caller hung up).
    Hangup,
    /// The script failed otherwise.
    Error,
    /// The URL named a script nobody serves.
    UnknownScript,
    /// The connection closed, timed out or spoke no FastAGI before its environment.
    NoEnvironment,
    /// Closed at accept: `node.agi.max_sessions` were in progress.
    Refused,
    /// Dropped at the end of the shutdown grace.
    Shutdown,
}

impl SessionOutcome {
    const ALL: [Self; 7] = [
        Self::Ok,
        Self::Hangup,
        Self::Error,
        Self::UnknownScript,
        Self::NoEnvironment,
        Self::Refused,
        Self::Shutdown,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Hangup => "hangup",
            Self::Error => "error",
            Self::UnknownScript => "unknown_script",
            Self::NoEnvironment => "no_environment",
            Self::Refused => "refused",
            Self::Shutdown => "shutdown",
        }
    }
}

/// Which script a session ran, as an index into [`AgiSessions`]'s rows: [`NO_SCRIPT`]
/// before the environment named one, [`UNKNOWN_SCRIPT`] for a path nobody serves, then
/// the served scripts in order.
pub(crate) type ScriptRow = usize;
/// The row of a session whose environment has not named a script (yet).
pub(crate) const NO_SCRIPT: ScriptRow = 0;
/// The row of a session for a script nobody serves.
pub(crate) const UNKNOWN_SCRIPT: ScriptRow = 1;

/// The FastAGI server's sessions by script and outcome, and the sessions open now.
#[derive(Debug)]
pub(crate) struct AgiSessions {
    /// The served scripts, in the order of their rows (after the first two).
    scripts: Vec<String>,
    /// `[row][outcome]`; `None` for a pair that cannot happen, which is counted through
    /// the registry should it happen after all.
    ended: Vec<[Option<Counter>; SessionOutcome::ALL.len()]>,
    open: Gauge,
}

impl AgiSessions {
    /// The series of a server that serves `scripts`, registered at 0.
    pub(crate) fn new<'a>(scripts: impl Iterator<Item = &'a str>) -> Self {
        use SessionOutcome as O;
        callfleet_core::metrics::install();
        let scripts: Vec<String> = scripts.map(str::to_owned).collect();
        let row = |label: &str, outcomes: &[SessionOutcome]| {
            SessionOutcome::ALL.map(|outcome| {
                outcomes.contains(&outcome).then(|| {
                    let counter = counter!(
                        "callfleet_node_agent_agi_sessions_total",
                        "script" => label.to_owned(),
                        "outcome" => outcome.as_str()
                    );
                    counter.increment(0);
                    counter
                })
            })
        };
        let mut ended = vec![
            row("none", &[O::NoEnvironment, O::Refused, O::Shutdown]),
            row("unknown", &[O::UnknownScript, O::Shutdown]),
        ];
        for script in &scripts {
            ended.push(row(script, &[O::Ok, O::Hangup, O::Error, O::Shutdown]));
        }
        let open = gauge!("callfleet_node_agent_agi_sessions_open");
        open.set(0.0);
        Self {
            scripts,
            ended,
            open,
        }
    }

    /// The row of the served script at `path`, or [`UNKNOWN_SCRIPT`].
    pub(crate) fn row(&self, path: &str) -> ScriptRow {
        self.scripts
            .iter()
            .position(|script| script == path)
            .map_or(UNKNOWN_SCRIPT, |i| i + 2)
    }

    /// A session of `row` ended with `outcome`.
    pub(crate) fn ended(&self, row: ScriptRow, outcome: SessionOutcome) {
        // ALL lists the outcomes in the order they are declared.
        match self
            .ended
            .get(row)
            .and_then(|row| row[outcome as usize].as_ref())
        {
            Some(counter) => counter.increment(1),
            None => {
                let script = match row {
                    NO_SCRIPT => "none".to_owned(),
                    UNKNOWN_SCRIPT => "unknown".to_owned(),
                    _ => self
                        .scripts
                        .get(row - 2)
                        .cloned()
                        .unwrap_or_else(|| "unknown".to_owned()),
                };
                counter!(
                    "callfleet_node_agent_agi_sessions_total",
                    "script" => script,
                    "outcome" => outcome.as_str()
                )
                .increment(1);
            }
        }
    }

    /// A session opened (`true`) or closed.
    pub(crate) fn open(&self, opened: bool) {
        if opened {
            self.open.increment(1.0);
        } else {
            self.open.decrement(1.0);
        }
    }
}

/// Where the counts kept elsewhere come from; each part only where this agent has it.
pub(crate) struct Figures {
    pub(crate) queue: Option<QueueCalls>,
    pub(crate) provisioning: Option<Box<dyn Fn() -> provisioning::Stats + Send + Sync>>,
}

/// Copies [`Figures`] into the recorder now and every [`COPY_EVERY`] until `shutdown`.
pub(crate) async fn copy_figures(figures: Figures, shutdown: CancellationToken) {
    loop {
        if let Some(queue) = &figures.queue {
            copy_queue(queue);
        }
        if let Some(stats) = &figures.provisioning {
            copy_provisioning(&stats());
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(COPY_EVERY) => {}
        }
    }
}

fn copy_queue(queue: &QueueCalls) {
    let stats = queue.stats();
    for (outcome, value) in [
        ("answered", stats.answered),
        ("abandoned", stats.abandoned),
        ("overflowed", stats.overflowed),
    ] {
        counter!("callfleet_node_agent_queue_calls_total", "outcome" => outcome).absolute(value);
    }
    counter!("callfleet_node_agent_queue_rings_total").absolute(stats.rings);
    for (outcome, value) in [
        ("missed", stats.missed),
        ("fenced", stats.fenced),
        ("cancelled", stats.cancelled),
        ("pbx_lost", stats.pbx_lost),
    ] {
        counter!("callfleet_node_agent_queue_rings_failed_total", "reason" => outcome)
            .absolute(value);
    }
    counter!("callfleet_node_agent_queue_unfenced_total").absolute(stats.unfenced);

    let candidates::Stats {
        requests,
        fresh,
        stale,
        failures,
        cached,
    } = queue.candidates_stats();
    copy_cache(
        "candidates",
        &[("hit", fresh), ("miss", requests), ("stale", stale)],
    );
    copy_upstream("candidates", failures, cached);

    let callers::Stats {
        requests,
        fresh,
        stale,
        unavailable,
        failures,
        cached,
    } = queue.callers_stats();
    copy_cache(
        "callers",
        &[
            ("hit", fresh),
            ("miss", requests),
            ("stale", stale),
            ("none", unavailable),
        ],
    );
    copy_upstream("callers", failures, cached);
}

fn copy_provisioning(stats: &provisioning::Stats) {
    copy_cache(
        "provisioning",
        &[
            ("miss", stats.upstream),
            ("stale", stats.stale),
            ("none", stats.misses),
        ],
    );
    copy_upstream("provisioning", stats.failures, stats.cached);
    gauge!("callfleet_node_agent_provisioning_writes_pending").set(stats.pending as f64);
    for (result, value) in [("delivered", stats.delivered), ("rejected", stats.rejected)] {
        counter!("callfleet_node_agent_provisioning_writes_total", "result" => result)
            .absolute(value);
    }
}

fn copy_cache(cache: &'static str, answers: &[(&'static str, u64)]) {
    for (result, value) in answers {
        counter!("callfleet_node_agent_cache_lookups_total", "cache" => cache, "result" => *result)
            .absolute(*value);
    }
}

fn copy_upstream(cache: &'static str, failures: u64, cached: u64) {
    counter!("callfleet_node_agent_cache_upstream_failures_total", "cache" => cache)
        .absolute(failures);
    gauge!("callfleet_node_agent_cache_entries", "cache" => cache).set(cached as f64);
}
