//! Load shedding: each configured tier stops a less important service when the node's load
//! fraction reaches `above` and starts it again once the load falls below `below`.
//!
//! The gap between the two thresholds (hysteresis) keeps a tier from flapping when the load
//! hovers around one value. Commands run in the background so a slow `systemctl` never
//! delays a heartbeat; a tier's state flips at once and its `command_ok` follows when the
//! command ends. Commands of one tier run one after another, never concurrently; how one
//! command runs on the host is in the `command` module.
//!
//! The agent keeps no record of what it shed: a restart (or crash) while a tier is shed must
//! not leave its service stopped for good, and a record on disk can be lost or stale in the
//! same ways. So the first load reading after start *reconciles* every tier: a tier the load
//! calls for (at or above `above`) runs its stop command, every other tier runs its start
//! command, whatever state a previous run left. Start and stop commands must therefore be
//! safe to repeat, as `systemctl start`/`stop` are. Between `below` and `above` a tier
//! starts restored, as on a freshly booted node.
//!
//! At shutdown, commands not yet begun are dropped (the next start reconciles their tier)
//! and a running one gets [`Limits::shutdown_grace`] before its process group is killed, so
//! [`Shedder::finish`] ends well within the agent's drain bound.

mod command;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use callfleet_core::ShedTierState;
use callfleet_core::config::ShedTier;
use callfleet_core::shutdown::DRAIN_TIMEOUT;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::command::{Action, KILL_BOUND};

/// How long a stop/start command may run before its process group is killed and the command
/// counted as failed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a command still running at shutdown may go on before its process group is
/// killed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

// The agent's shutdown waits at most DRAIN_TIMEOUT for `finish`: the grace and the kill
// must fit in it, or a slow command would outlive the agent.
const _: () = assert!(
    SHUTDOWN_GRACE.as_millis() + KILL_BOUND.as_millis() < DRAIN_TIMEOUT.as_millis(),
    "shed commands must end within the agent's drain timeout"
);

/// Time limits of the shed commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A command running longer has its process group killed and counts as failed.
    pub command_timeout: Duration,
    /// After [`Shedder::finish`] is called, a running command gets this long before its
    /// process group is killed. Keep it well below the drain timeout of the agent.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            command_timeout: COMMAND_TIMEOUT,
            shutdown_grace: SHUTDOWN_GRACE,
        }
    }
}

#[derive(Debug)]
struct Tier {
    config: ShedTier,
    shed: bool,
    command_ok: Arc<AtomicBool>,
    /// The tier's last command, which the next one waits for so they run in order.
    last_command: Option<JoinHandle<()>>,
}

/// The shedding tiers of a node and their current state.
#[derive(Debug)]
pub struct Shedder {
    tiers: Vec<Tier>,
    /// False until the first load reading has reconciled every tier.
    reconciled: bool,
    runner: Runner,
}

impl Shedder {
    /// Tiers with the default [`Limits`]. They report restored until the first
    /// [`Shedder::update`] reconciles them.
    pub fn new(tiers: &[ShedTier]) -> Self {
        Self::with_limits(tiers, Limits::default())
    }

    /// Tiers whose commands run within `limits`.
    pub fn with_limits(tiers: &[ShedTier], limits: Limits) -> Self {
        Self {
            tiers: tiers
                .iter()
                .map(|config| Tier {
                    config: config.clone(),
                    shed: false,
                    command_ok: Arc::new(AtomicBool::new(true)),
                    last_command: None,
                })
                .collect(),
            reconciled: false,
            runner: Runner {
                tasks: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                pending: Arc::new(watch::Sender::new(0)),
                limits,
            },
        }
    }

    /// Applies a new load fraction: flips the tiers that cross a threshold and starts their
    /// commands. Returns the names of the tiers that changed, with their new `shed` state.
    ///
    /// The first call reconciles: every tier runs the command of the state the load calls
    /// for, and all of them are returned.
    pub fn update(&mut self, load_fraction: f64) -> Vec<(String, bool)> {
        let reconcile = !self.reconciled;
        self.reconciled = true;
        let mut changed = Vec::new();
        for tier in &mut self.tiers {
            let next = if reconcile {
                load_fraction >= tier.config.above
            } else {
                next_state(tier.shed, load_fraction, &tier.config)
            };
            if next == tier.shed && !reconcile {
                continue;
            }
            tier.shed = next;
            let action = Action::for_shed(next);
            if reconcile {
                tracing::info!(tier = %tier.config.name, load_fraction, %action, "load shedding tier reconciled at start");
            } else {
                tracing::warn!(tier = %tier.config.name, load_fraction, %action, "load shedding tier changed");
            }
            changed.push((tier.config.name.clone(), next));
            self.runner.queue(tier, action);
        }
        changed
    }

    /// The state of every tier, for the heartbeat.
    pub fn states(&self) -> Vec<ShedTierState> {
        self.tiers
            .iter()
            .map(|tier| ShedTierState {
                name: tier.config.name.clone(),
                shed: tier.shed,
                command_ok: tier.command_ok.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// True while a shed tier flagged `refuse_calls` asks the node to take no new calls.
    pub fn refusing_calls(&self) -> bool {
        self.tiers.iter().any(|t| t.shed && t.config.refuse_calls)
    }

    /// Waits until every command started so far has ended; `command_ok` then tells how.
    pub async fn settled(&self) {
        let mut pending = self.runner.pending.subscribe();
        // The sender lives in `self`, so the wait cannot fail.
        let _ = pending.wait_for(|n| *n == 0).await;
    }

    /// Stops shedding for shutdown: commands not yet begun are dropped, a running one gets
    /// [`Limits::shutdown_grace`] and then its process group is killed. Returns within the
    /// grace plus a few seconds at most.
    pub async fn finish(&self) {
        self.runner.shutdown.cancel();
        self.runner.tasks.close();
        self.runner.tasks.wait().await;
    }
}

/// Starts the commands of the tiers in the background, one tier's after another's.
#[derive(Debug)]
struct Runner {
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// How many commands are queued or running.
    pending: Arc<watch::Sender<usize>>,
    limits: Limits,
}

impl Runner {
    fn queue(&self, tier: &mut Tier, action: Action) {
        let command = match action {
            Action::Stop => &tier.config.stop,
            Action::Start => &tier.config.start,
        };
        if command.is_empty() {
            return;
        }
        let command = command.clone();
        let name = tier.config.name.clone();
        let ok = Arc::clone(&tier.command_ok);
        let previous = tier.last_command.take();
        let pending = Pending::count(Arc::clone(&self.pending));
        let shutdown = self.shutdown.clone();
        let limits = self.limits;
        tier.last_command = Some(self.tasks.spawn(async move {
            let _pending = pending;
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            if shutdown.is_cancelled() {
                tracing::info!(tier = %name, %action, "shed command not run: shutting down (the next start reconciles the tier)");
                return;
            }
            let succeeded = command::run(&name, action, &command, limits, &shutdown).await;
            ok.store(succeeded, Ordering::Relaxed);
        }));
    }
}

/// One queued or running command, counted in [`Runner::pending`] until dropped.
struct Pending(Arc<watch::Sender<usize>>);

impl Pending {
    fn count(pending: Arc<watch::Sender<usize>>) -> Self {
        pending.send_modify(|n| *n += 1);
        Self(pending)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// The hysteresis rule: shed at or above `above`, restore below `below`, else keep.
fn next_state(shed: bool, load_fraction: f64, tier: &ShedTier) -> bool {
    if shed {
        load_fraction >= tier.below
    } else {
        load_fraction >= tier.above
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(name: &str, above: f64, below: f64, stop: String, start: String) -> ShedTier {
        ShedTier {
            name: name.into(),
            above,
            below,
            stop,
            start,
            refuse_calls: false,
        }
    }

    #[test]
    fn hysteresis_keeps_a_tier_from_flapping() {
        let t = tier("reports", 0.7, 0.6, String::new(), String::new());
        assert!(!next_state(false, 0.69, &t));
        assert!(next_state(false, 0.70, &t));
        assert!(
            next_state(true, 0.65, &t),
            "between the thresholds: stays shed"
        );
        assert!(!next_state(true, 0.59, &t));
        assert!(
            !next_state(false, 0.65, &t),
            "between the thresholds: stays restored"
        );
    }

    #[tokio::test]
    async fn tiers_run_their_commands_and_report_state() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("log");
        let log = log.display();
        let mut calls_tier = tier(
            "calls",
            0.95,
            0.9,
            format!("echo stop-calls >> {log}"),
            format!("echo start-calls >> {log}"),
        );
        calls_tier.refuse_calls = true;
        let mut shedder = Shedder::new(&[
            tier(
                "reports",
                0.7,
                0.6,
                format!("echo stop-reports >> {log}"),
                format!("echo start-reports >> {log}"),
            ),
            tier("recording", 0.85, 0.75, "exit 3".into(), String::new()),
            calls_tier,
        ]);

        assert_eq!(
            shedder.update(0.5),
            vec![
                ("reports".to_owned(), false),
                ("recording".to_owned(), false),
                ("calls".to_owned(), false)
            ],
            "the first reading reconciles every tier"
        );
        assert_eq!(shedder.update(0.5), vec![]);
        assert_eq!(
            shedder.update(0.9),
            vec![("reports".to_owned(), true), ("recording".to_owned(), true)]
        );
        assert!(!shedder.refusing_calls());
        assert_eq!(shedder.update(0.97), vec![("calls".to_owned(), true)]);
        assert!(shedder.refusing_calls());
        assert_eq!(
            shedder.update(0.5),
            vec![
                ("reports".to_owned(), false),
                ("recording".to_owned(), false),
                ("calls".to_owned(), false)
            ]
        );
        shedder.settled().await;

        let states = shedder.states();
        assert!(states.iter().all(|s| !s.shed));
        let recording = states.iter().find(|s| s.name == "recording").expect("tier");
        assert!(!recording.command_ok, "a failing stop command is reported");
        assert!(
            states
                .iter()
                .find(|s| s.name == "reports")
                .expect("tier")
                .command_ok
        );
        let ran = std::fs::read_to_string(dir.path().join("log")).expect("commands ran");
        let lines: Vec<&str> = ran.lines().collect();
        let of = |name: &str| -> Vec<&str> {
            lines
                .iter()
                .copied()
                .filter(|l| l.ends_with(name))
                .collect()
        };
        assert_eq!(lines.len(), 6, "{lines:?}");
        assert_eq!(
            of("-reports"),
            ["start-reports", "stop-reports", "start-reports"],
            "one tier's commands run in order"
        );
        assert_eq!(
            of("-calls"),
            ["start-calls", "stop-calls", "start-calls"],
            "one tier's commands run in order"
        );
        shedder.finish().await;
    }
}
