//! Runs one stop/start command of a shedding tier on the host.
//!
//! A command is `sh -c <command>` in a process group of its own, and it is done when that
//! `sh` exits: the agent waits for the exit status and nothing else. Three things follow
//! from how real start commands behave.
//!
//! - A start command may leave a daemon behind (`mydaemon &`, `nohup x &`). The daemon
//!   inherits the command's stdout and stderr, so those must not be a pipe the agent reads:
//!   the agent would wait for an end of file that comes only when the daemon exits, and once
//!   the agent closed its end the daemon would die of SIGPIPE at its next write. Output goes
//!   to an already deleted temp file instead; the agent logs its tail when `sh` exits. A
//!   daemon keeps writing into that file for as long as it runs, so the README asks that a
//!   backgrounded daemon get its own log (`mydaemon >>/var/log/mydaemon.log 2>&1 &`) or be
//!   started by `systemctl`.
//! - A command that runs too long, or is still running at shutdown, is killed with its whole
//!   process group: killing only `sh` would leave its children running. The group is
//!   signalled while `sh` is not yet reaped, so its id cannot belong to anyone else.
//! - Its own group also keeps a terminal's Ctrl-C, meant for the agent, away from it: the
//!   agent decides when a command ends.

use std::fmt;
use std::fs::File;
use std::io;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

use super::Limits;

/// How long killing a command's group and reaping its `sh` may take; part of the shutdown
/// bound.
pub(super) const KILL_BOUND: Duration = Duration::from_secs(2);

/// How much of a command's output ends up in the log.
const TAIL_BYTES: u64 = 2048;

/// Which of a tier's two commands runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// The tier is shed: its service stops.
    Stop,
    /// The tier is restored: its service starts.
    Start,
}

impl Action {
    pub(super) fn for_shed(shed: bool) -> Self {
        if shed { Self::Stop } else { Self::Start }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Stop => "stop",
            Self::Start => "start",
        })
    }
}

/// How a command's `sh` ended.
enum Ended {
    Exited(io::Result<std::process::ExitStatus>),
    TimedOut,
    Shutdown,
}

/// Runs `command` for `tier` and says whether it succeeded. Once `shutdown` is cancelled
/// the command gets `limits.shutdown_grace` more, then its group is killed.
pub(super) async fn run(
    tier: &str,
    action: Action,
    command: &str,
    limits: Limits,
    shutdown: &CancellationToken,
) -> bool {
    let action = action.to_string();
    let output = match tokio::task::spawn_blocking(Output::create).await {
        Ok(Ok(output)) => Some(output),
        Ok(Err(err)) => {
            tracing::warn!(tier, action, error = %err, "no temp file for the shed command's output; it is discarded");
            None
        }
        Err(err) => {
            tracing::warn!(tier, action, error = %err, "no temp file for the shed command's output; it is discarded");
            None
        }
    };
    let (stdout, stderr) = match output.as_ref().map(Output::stdio) {
        Some(Ok(stdio)) => stdio,
        _ => (Stdio::null(), Stdio::null()),
    };
    let spawned = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            tracing::error!(tier, action, command, error = %err, "cannot run shed command");
            return false;
        }
    };
    // The group's id is the id of its leader, `sh`, known until it is reaped.
    let mut group = child.id().map(Group::new);
    let started = Instant::now();
    let grace_after_shutdown = async {
        shutdown.cancelled().await;
        sleep(limits.shutdown_grace).await;
    };
    let ended = tokio::select! {
        status = child.wait() => Ended::Exited(status),
        () = sleep(limits.command_timeout) => Ended::TimedOut,
        () = grace_after_shutdown => Ended::Shutdown,
    };
    if matches!(ended, Ended::Exited(_)) {
        // `sh` is done (and reaped); what it left running is meant to run.
        if let Some(group) = group.as_mut() {
            group.disarm();
        }
    } else {
        let killed = timeout(KILL_BOUND, async {
            let result = match group.as_mut() {
                Some(group) => group.kill().await,
                None => Err(io::Error::other("the command's process id is unknown")),
            };
            if let Err(err) = result {
                tracing::error!(tier, action, error = %err, "cannot kill the shed command's process group; killing its shell only");
                let _ = child.start_kill();
            }
            let _ = child.wait().await;
        })
        .await;
        if killed.is_err() {
            tracing::error!(tier, action, bound = ?KILL_BOUND, "shed command's shell not reaped after kill");
        }
    }
    let output = match output {
        Some(output) => tokio::task::spawn_blocking(move || output.tail())
            .await
            .unwrap_or_default(),
        None => String::new(),
    };
    let elapsed = started.elapsed();
    match ended {
        Ended::Exited(Ok(status)) if status.success() => {
            tracing::debug!(tier, action, ?elapsed, output, "shed command succeeded");
            true
        }
        Ended::Exited(Ok(status)) => {
            tracing::error!(tier, action, command, %status, output, "shed command failed");
            false
        }
        Ended::Exited(Err(err)) => {
            tracing::error!(tier, action, command, error = %err, output, "cannot wait for shed command");
            false
        }
        Ended::TimedOut => {
            tracing::error!(tier, action, command, timeout = ?limits.command_timeout, output, "shed command timed out; its process group was killed");
            false
        }
        Ended::Shutdown => {
            tracing::warn!(tier, action, command, grace = ?limits.shutdown_grace, output, "shed command still running at shutdown; its process group was killed and the next start reconciles the tier");
            false
        }
    }
}

/// A command's process group, killed if its task is dropped while the command runs (a
/// runtime torn down without [`super::Shedder::finish`]).
struct Group {
    id: u32,
    armed: bool,
}

impl Group {
    fn new(id: u32) -> Self {
        Self { id, armed: true }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }

    /// SIGKILL to every process of the group.
    async fn kill(&mut self) -> io::Result<()> {
        self.armed = false;
        // The shell's `kill` builtin: std has no killpg, the workspace forbids `unsafe`, and
        // `sh` is on every host that runs these commands at all.
        let status = kill_group_command(self.id).status().await?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!("kill exited with {status}")))
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if self.armed {
            let _ = kill_group_command(self.id).into_std().status();
        }
    }
}

fn kill_group_command(id: u32) -> tokio::process::Command {
    let mut kill = tokio::process::Command::new("sh");
    kill.arg("-c")
        .arg(r#"kill -s KILL -- "-$1""#)
        .arg("sh")
        .arg(id.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    kill
}

/// Where a command writes its stdout and stderr: a temp file deleted as soon as it is
/// created, so nothing is left behind whatever happens to the agent.
struct Output {
    file: File,
}

impl Output {
    fn create() -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir();
        let mut last_error = None;
        for _ in 0..8 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("callfleet-shed-{}-{n}.out", std::process::id()));
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => {
                    std::fs::remove_file(&path)?;
                    return Ok(Self { file });
                }
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => last_error = Some(err),
                Err(err) => return Err(err),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("no free temp file name")))
    }

    fn stdio(&self) -> io::Result<(Stdio, Stdio)> {
        Ok((self.file.try_clone()?.into(), self.file.try_clone()?.into()))
    }

    /// The last [`TAIL_BYTES`] the command wrote, trimmed.
    fn tail(&self) -> String {
        use std::os::unix::fs::FileExt;
        let Ok(len) = self.file.metadata().map(|m| m.len()) else {
            return String::new();
        };
        let start = len.saturating_sub(TAIL_BYTES);
        let mut bytes = vec![0; usize::try_from(len - start).unwrap_or(0)];
        let Ok(read) = self.file.read_at(&mut bytes, start) else {
            return String::new();
        };
        bytes.truncate(read);
        tail_text(&bytes, start > 0)
    }
}

/// The text of a tail; a tail that starts mid-output loses its partial first line.
fn tail_text(bytes: &[u8], cut: bool) -> String {
    let text = String::from_utf8_lossy(bytes);
    if !cut {
        return text.trim().to_owned();
    }
    let rest = text.split_once('\n').map_or(&*text, |(_, rest)| rest);
    format!("…{}", rest.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_is_trimmed_and_a_cut_one_starts_at_a_line() {
        assert_eq!(tail_text(b"  done\n", false), "done");
        assert_eq!(tail_text(b"", false), "");
        assert_eq!(tail_text(b"rt of a line\nlast line\n", true), "…last line");
        assert_eq!(tail_text(b"one long line", true), "…one long line");
        assert_eq!(tail_text(b"bad \xff byte", false), "bad \u{fffd} byte");
    }

    #[tokio::test]
    async fn the_output_of_a_command_is_read_back_from_its_deleted_file() {
        let output = Output::create().expect("temp file");
        let (stdout, stderr) = output.stdio().expect("stdio");
        let status = tokio::process::Command::new("sh")
            .arg("-c")
            .arg("echo out; echo err >&2")
            .stdout(stdout)
            .stderr(stderr)
            .status()
            .await
            .expect("sh runs");
        assert!(status.success());
        assert_eq!(output.tail(), "out\nerr");
    }

    #[tokio::test]
    async fn only_the_last_bytes_of_a_long_output_are_kept() {
        let output = Output::create().expect("temp file");
        let (stdout, stderr) = output.stdio().expect("stdio");
        let status = tokio::process::Command::new("sh")
            .arg("-c")
            .arg("i=0; while [ $i -lt 1000 ]; do echo line-$i; i=$((i+1)); done")
            .stdout(stdout)
            .stderr(stderr)
            .status()
            .await
            .expect("sh runs");
        assert!(status.success());
        let tail = output.tail();
        assert!(tail.starts_with("…line-"), "{tail}");
        assert!(tail.ends_with("\nline-999"), "{tail}");
        assert!(
            tail.len() <= TAIL_BYTES as usize + "…".len(),
            "{}",
            tail.len()
        );
    }
}
