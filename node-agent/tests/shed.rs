//! Shed commands on a real host: real `sh` processes, daemons, process groups and shutdown.
//!
//! Every process a command leaves behind writes its pid to a file; the test checks it through
//! `/proc` (a zombie counts as gone: the reaper of orphans may be a PID 1 that never reaps)
//! and kills whatever is still alive when it ends.

use std::path::{Path, PathBuf};
use std::time::Duration;

use callfleet_core::ShedTierState;
use callfleet_core::config::ShedTier;
use callfleet_node_agent::shed::{Limits, Shedder};
use tokio::time::{Instant, sleep, timeout};

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

fn limits(command_timeout: Duration, shutdown_grace: Duration) -> Limits {
    Limits {
        command_timeout,
        shutdown_grace,
    }
}

fn state(name: &str, shed: bool, command_ok: bool) -> ShedTierState {
    ShedTierState {
        name: name.into(),
        shed,
        command_ok,
    }
}

/// True while `pid` runs (a zombie has ended).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The pids a test's commands wrote; whatever still runs is killed when the test ends.
#[derive(Default)]
struct Pids(Vec<u32>);

impl Pids {
    /// Waits (up to 5 s) for a command to write its pid to `path`.
    async fn read(&mut self, path: &Path) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(text) = std::fs::read_to_string(path)
                && let Ok(pid) = text.trim().parse::<u32>()
            {
                self.0.push(pid);
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "no pid written to {}",
                path.display()
            );
            sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Pids {
    fn drop(&mut self) {
        for pid in self.0.iter().copied().filter(|pid| alive(*pid)) {
            let _ = std::process::Command::new("kill")
                .args(["-s", "KILL", &pid.to_string()])
                .status();
        }
    }
}

/// Waits (up to 2 s: a killed process needs a moment to exit) until none of `pids` runs.
async fn assert_all_gone(pids: &[u32], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|pid| alive(*pid)) && Instant::now() < deadline {
        sleep(Duration::from_millis(10)).await;
    }
    let running: Vec<u32> = pids.iter().copied().filter(|pid| alive(*pid)).collect();
    assert_eq!(running, Vec::<u32>::new(), "{what}: still running");
}

fn path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Defect: the agent waited for the output pipe, which the daemon holds, so a backgrounding
/// start command was reported failed at the timeout, and the daemon could die of SIGPIPE.
#[tokio::test]
async fn a_start_command_that_backgrounds_a_daemon_succeeds_at_once_and_the_daemon_lives_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon_pid = path(&dir, "daemon.pid");
    // The daemon writes to its inherited stdout after the command has ended, as a daemon's
    // log lines do.
    let start = format!(
        "(sleep 0.3; echo daemon still logging; exec sleep 300) & echo $! > {}; echo started",
        daemon_pid.display()
    );
    let mut shedder = Shedder::with_limits(
        &[tier("reports", 0.7, 0.6, String::new(), start)],
        limits(Duration::from_secs(5), Duration::from_secs(1)),
    );
    let mut pids = Pids::default();

    assert_eq!(shedder.update(0.9), vec![("reports".to_owned(), true)]);
    let began = Instant::now();
    assert_eq!(shedder.update(0.1), vec![("reports".to_owned(), false)]);
    timeout(Duration::from_secs(10), shedder.settled())
        .await
        .expect("the start command settles");
    let took = began.elapsed();
    let daemon = pids.read(&daemon_pid).await;
    eprintln!("backgrounding start command settled in {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "a start command that backgrounds a daemon took {took:?}"
    );
    assert_eq!(shedder.states(), vec![state("reports", false, true)]);

    sleep(Duration::from_millis(700)).await;
    assert!(
        alive(daemon),
        "the daemon {daemon} died after writing to its output"
    );
    timeout(Duration::from_secs(5), shedder.finish())
        .await
        .expect("finish");
    assert!(
        alive(daemon),
        "the daemon {daemon} must outlive the agent's shutdown"
    );
}

/// Defect: on timeout only `sh` was killed; its children ran on.
#[tokio::test]
async fn a_command_past_its_timeout_has_its_whole_process_group_killed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (inner, background, foreground) = (
        path(&dir, "inner.pid"),
        path(&dir, "background.pid"),
        path(&dir, "foreground.pid"),
    );
    // A grandchild shell with two children: two levels below the agent's `sh`.
    let stop = format!(
        "sh -c 'echo $$ > {}; sleep 300 & echo $! > {}; sleep 300 & echo $! > {}; wait'",
        inner.display(),
        background.display(),
        foreground.display()
    );
    let mut shedder = Shedder::with_limits(
        &[tier("reports", 0.7, 0.6, stop, String::new())],
        limits(Duration::from_millis(500), Duration::from_secs(1)),
    );
    let mut pids = Pids::default();

    let began = Instant::now();
    assert_eq!(shedder.update(0.9), vec![("reports".to_owned(), true)]);
    let group = [
        pids.read(&inner).await,
        pids.read(&background).await,
        pids.read(&foreground).await,
    ];
    timeout(Duration::from_secs(5), shedder.settled())
        .await
        .expect("the command is killed at its timeout");
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "timeout 500ms, settled after {took:?}"
    );
    assert_eq!(shedder.states(), vec![state("reports", true, false)]);
    assert_all_gone(&group, "the timed-out command's group").await;
    shedder.finish().await;
}

/// Defect: the agent kept no shed state across a restart, so a tier shed before the restart
/// kept its service stopped for good.
#[tokio::test]
async fn an_agent_restarted_while_a_tier_is_shed_reconciles_every_tier_at_its_first_reading() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = |name: &str| path(&dir, name);
    let tiers = [
        tier(
            "reports",
            0.7,
            0.6,
            format!("echo stop >> {}", log("reports").display()),
            format!("echo start >> {}", log("reports").display()),
        ),
        tier(
            "recording",
            0.5,
            0.4,
            format!("echo stop >> {}", log("recording").display()),
            format!("echo start >> {}", log("recording").display()),
        ),
    ];
    let ran = |name: &str| std::fs::read_to_string(log(name)).unwrap_or_default();
    let limits = limits(Duration::from_secs(5), Duration::from_secs(1));

    // The first run sheds both tiers, then the agent goes away without restoring them (a
    // restart, an upgrade, a crash).
    let mut first = Shedder::with_limits(&tiers, limits);
    first.update(0.9);
    first.settled().await;
    drop(first);
    assert_eq!(ran("reports"), "stop\n");
    assert_eq!(ran("recording"), "stop\n");

    // The load is now between the reports thresholds and above the recording ones.
    let mut second = Shedder::with_limits(&tiers, limits);
    assert_eq!(
        second.states(),
        vec![
            state("reports", false, true),
            state("recording", false, true)
        ]
    );
    let changed = second.update(0.65);
    timeout(Duration::from_secs(5), second.settled())
        .await
        .expect("settled");
    assert_eq!(
        ran("reports"),
        "stop\nstart\n",
        "a tier the load does not call for is started again"
    );
    assert_eq!(
        ran("recording"),
        "stop\nstop\n",
        "a tier the load calls for is stopped (again)"
    );
    assert_eq!(
        changed,
        vec![
            ("reports".to_owned(), false),
            ("recording".to_owned(), true)
        ]
    );
    assert_eq!(
        second.states(),
        vec![
            state("reports", false, true),
            state("recording", true, true)
        ]
    );
    // From then on the usual hysteresis applies.
    assert_eq!(second.update(0.65), vec![]);
    second.finish().await;
}

/// Defect: shutdown waited 10 s for commands allowed 60 s, and then left them running.
#[tokio::test]
async fn shutdown_while_a_command_runs_kills_its_group_after_the_grace_and_skips_queued_ones() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (shell, background, foreground) = (
        path(&dir, "sh.pid"),
        path(&dir, "background.pid"),
        path(&dir, "foreground.pid"),
    );
    let started = path(&dir, "started");
    let stop = format!(
        "echo $$ > {}; sleep 300 & echo $! > {}; sleep 300 & echo $! > {}; wait",
        shell.display(),
        background.display(),
        foreground.display()
    );
    let start = format!("touch {}", started.display());
    let grace = Duration::from_millis(300);
    let mut shedder = Shedder::with_limits(
        &[tier("reports", 0.7, 0.6, stop, start)],
        limits(Duration::from_secs(60), grace),
    );
    let mut pids = Pids::default();

    assert_eq!(shedder.update(0.9), vec![("reports".to_owned(), true)]);
    let group = [
        pids.read(&shell).await,
        pids.read(&background).await,
        pids.read(&foreground).await,
    ];
    // Queued behind the running stop command.
    assert_eq!(shedder.update(0.1), vec![("reports".to_owned(), false)]);

    let began = Instant::now();
    timeout(Duration::from_secs(5), shedder.finish())
        .await
        .expect("finish returns within the grace and the kill bound");
    let took = began.elapsed();
    assert!(
        took >= grace && took < grace + Duration::from_secs(2),
        "grace {grace:?}, finish took {took:?}"
    );
    assert_all_gone(&group, "the running command's group").await;
    assert!(
        !started.exists(),
        "a command queued at shutdown is not run (the next start reconciles its tier)"
    );
    assert_eq!(shedder.states(), vec![state("reports", false, false)]);
}
