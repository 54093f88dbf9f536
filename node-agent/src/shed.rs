//! Load shedding: each configured tier stops a less important service when the node's load
//! fraction reaches `above` and starts it again once the load falls below `below`.
//!
//! The gap between the two thresholds (hysteresis) keeps a tier from flapping when the load
//! hovers around one value. Commands run in the background so a slow `systemctl` never
//! delays a heartbeat; a tier's state flips at once and its `command_ok` follows when the
//! command ends. Commands of one tier run one after another, never concurrently.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use callfleet_core::ShedTierState;
use callfleet_core::config::ShedTier;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

/// How long a stop/start command may run before it is killed and counted as failed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

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
    tasks: TaskTracker,
}

impl Shedder {
    /// Tiers start restored (services running), as they are when a node boots.
    pub fn new(tiers: &[ShedTier]) -> Self {
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
            tasks: TaskTracker::new(),
        }
    }

    /// Applies a new load fraction: flips the tiers that cross a threshold and starts their
    /// commands. Returns the names of the tiers that changed, with their new `shed` state.
    pub fn update(&mut self, load_fraction: f64) -> Vec<(String, bool)> {
        let mut changed = Vec::new();
        for tier in &mut self.tiers {
            let next = next_state(tier.shed, load_fraction, &tier.config);
            if next == tier.shed {
                continue;
            }
            tier.shed = next;
            let command = if next {
                &tier.config.stop
            } else {
                &tier.config.start
            };
            tracing::warn!(
                tier = %tier.config.name,
                load_fraction,
                action = if next { "stop" } else { "start" },
                "load shedding tier changed"
            );
            changed.push((tier.config.name.clone(), next));
            if command.is_empty() {
                continue;
            }
            let command = command.clone();
            let ok = Arc::clone(&tier.command_ok);
            let previous = tier.last_command.take();
            let name = tier.config.name.clone();
            tier.last_command = Some(self.tasks.spawn(async move {
                if let Some(previous) = previous {
                    let _ = previous.await;
                }
                let succeeded = run_command(&name, &command).await;
                ok.store(succeeded, Ordering::Relaxed);
            }));
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

    /// Waits for the commands still running (bounded by [`COMMAND_TIMEOUT`] each).
    pub async fn finish(&self) {
        self.tasks.close();
        self.tasks.wait().await;
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

async fn run_command(tier: &str, command: &str) -> bool {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .output();
    match tokio::time::timeout(COMMAND_TIMEOUT, child).await {
        Ok(Ok(output)) if output.status.success() => true,
        Ok(Ok(output)) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            tracing::error!(tier, command, status = %output.status, stderr = %stderr.trim(), "shed command failed");
            false
        }
        Ok(Err(err)) => {
            tracing::error!(tier, command, error = %err, "cannot run shed command");
            false
        }
        Err(_) => {
            tracing::error!(tier, command, timeout = ?COMMAND_TIMEOUT, "shed command timed out and was killed");
            false
        }
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
        shedder.finish().await;

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
        let position = |line: &str| lines.iter().position(|l| *l == line).expect(line);
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(
            position("stop-reports") < position("start-reports"),
            "{lines:?}"
        );
        assert!(
            position("stop-calls") < position("start-calls"),
            "{lines:?}"
        );
    }
}
