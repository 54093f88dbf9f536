//! The `command` executor: the operator's programs start and end extra nodes.
//!
//! A program is an argv run without a shell (no quoting to get wrong, nothing of the reason
//! text is ever interpreted), with stdin closed and its facts in the environment:
//! `CALLFLEET_SCALE_COUNT` (start) or `CALLFLEET_NODE_ID` (terminate), plus
//! `CALLFLEET_SCALE_TOKEN` and `CALLFLEET_SCALE_REASON`. Exit status 0 is success; anything
//! else fails the action with the tail of its stderr.
//!
//! - It runs in a process group of its own, so that a timeout kills everything it started
//!   (killing only the program would leave its children running, perhaps still creating a
//!   node), and a terminal's Ctrl-C meant for the control plane does not reach it. The group
//!   is signalled while the program is not yet reaped, so its id cannot belong to anyone
//!   else; the same holds if the action's future is dropped mid-run.
//! - Its output is read through pipes into bounded tails. After the program exits, the pipes
//!   are read for at most [`PIPE_GRACE`] more: a daemon it left behind (`x &`) holds them
//!   open, and the action must not wait for that daemon. Such a daemon should write to its
//!   own log (`x >>/var/log/x.log 2>&1 &`): once the pipes are closed, its writes to them
//!   fail.
//!
//! The node-agent's shed commands (`node-agent/src/shed/command.rs`) work alike but run
//! `sh -c` strings and keep output in a deleted temp file; the two share no code because
//! that one lives in the node-agent crate.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use callfleet_core::NodeId;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::{Instant, sleep, timeout};

use super::executor::{Action, CommandConfig, ExecutorError};

/// How much of a program's stderr (and stdout, for the debug log) is kept.
const TAIL_BYTES: usize = 4096;

/// How long the pipes are still read after the program exited (or its group was killed).
pub const PIPE_GRACE: Duration = Duration::from_secs(1);

/// How long reaping a killed program may take.
const KILL_BOUND: Duration = Duration::from_secs(2);

/// Runs the configured programs.
#[derive(Debug, Clone)]
pub struct CommandExecutor {
    config: CommandConfig,
}

impl CommandExecutor {
    /// Checks `config`: both programs named, a timeout above zero.
    pub fn new(config: CommandConfig) -> Result<Self, ExecutorError> {
        for (key, argv) in [("start", &config.start), ("terminate", &config.terminate)] {
            if argv.first().is_none_or(|program| program.is_empty()) {
                return Err(ExecutorError::Config(format!(
                    "command executor: `{key}` names no program; give its argv, e.g. [\"/usr/local/bin/{key}-node\"]"
                )));
            }
        }
        if config.timeout.is_zero() {
            return Err(ExecutorError::Config(
                "command executor: `timeout` is 0s; give the longest a run may take, e.g. \"5m\""
                    .into(),
            ));
        }
        Ok(Self { config })
    }

    /// Runs the start program with `CALLFLEET_SCALE_COUNT=count`.
    pub async fn launch(&self, count: u32, action: &Action) -> Result<(), ExecutorError> {
        run(
            "start",
            &self.config.start,
            ("CALLFLEET_SCALE_COUNT", &count.to_string()),
            action,
            self.config.timeout,
        )
        .await
    }

    /// Runs the terminate program with `CALLFLEET_NODE_ID=node`.
    pub async fn terminate(&self, node: &NodeId, action: &Action) -> Result<(), ExecutorError> {
        run(
            "terminate",
            &self.config.terminate,
            ("CALLFLEET_NODE_ID", node.as_str()),
            action,
            self.config.timeout,
        )
        .await
    }
}

/// How the program ended.
enum Ended {
    Exited(std::io::Result<ExitStatus>),
    TimedOut,
}

async fn run(
    which: &'static str,
    argv: &[String],
    (key, value): (&str, &str),
    action: &Action,
    limit: Duration,
) -> Result<(), ExecutorError> {
    let command = argv.join(" ");
    let (program, args) = argv.split_first().ok_or_else(|| {
        ExecutorError::Config(format!("command executor: `{which}` names no program"))
    })?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        // Only this action's facts: neither variable leaks in from the control plane's own
        // environment.
        .env_remove("CALLFLEET_SCALE_COUNT")
        .env_remove("CALLFLEET_NODE_ID")
        .env(key, value)
        .env("CALLFLEET_SCALE_TOKEN", action.token.to_string())
        .env("CALLFLEET_SCALE_REASON", &action.reason)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ExecutorError::Spawn {
            which,
            command: command.clone(),
            source,
        })?;
    // The group's id is its leader's, the program's, known until it is reaped.
    let mut group = Group(
        child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw),
    );
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let started = Instant::now();
    let (exited_tx, exited_rx) = tokio::sync::oneshot::channel::<()>();
    let mut out = Tail::default();
    let mut err = Tail::default();

    let waiting = async {
        let ended = match timeout(limit, child.wait()).await {
            Ok(status) => {
                // Reaped: the id may be reused from now on, and what the program left
                // running is meant to run.
                group.disarm();
                Ended::Exited(status)
            }
            Err(_) => {
                group.kill(which, &command);
                if timeout(KILL_BOUND, child.wait()).await.is_err() {
                    tracing::error!(which, command, bound = ?KILL_BOUND, "scale command not reaped after its group was killed");
                }
                Ended::TimedOut
            }
        };
        let _ = exited_tx.send(());
        ended
    };
    let reading = async {
        let both = async { tokio::join!(out.read_from(stdout), err.read_from(stderr)) };
        let grace = async {
            let _ = exited_rx.await;
            sleep(PIPE_GRACE).await;
        };
        tokio::select! {
            _ = both => {}
            () = grace => {}
        }
    };
    let (ended, ()) = tokio::join!(waiting, reading);
    let (stdout, stderr) = (out.text(), err.text());
    let elapsed = started.elapsed();
    match ended {
        Ended::Exited(Ok(status)) if status.success() => {
            tracing::info!(
                which,
                command,
                token = action.token,
                ?elapsed,
                "scale command succeeded"
            );
            tracing::debug!(which, stdout, stderr, "scale command output");
            Ok(())
        }
        Ended::Exited(Ok(status)) => Err(ExecutorError::Failed {
            which,
            command,
            status,
            stderr,
        }),
        Ended::Exited(Err(source)) => Err(ExecutorError::Wait {
            which,
            command,
            source,
        }),
        Ended::TimedOut => Err(ExecutorError::TimedOut {
            which,
            command,
            timeout: limit,
            stderr,
        }),
    }
}

/// A running program's process group, killed when the action is dropped mid-run.
struct Group(Option<Pid>);

impl Group {
    fn disarm(&mut self) {
        self.0 = None;
    }

    /// SIGKILL to every process of the group.
    fn kill(&mut self, which: &str, command: &str) {
        if let Some(id) = self.0.take()
            && let Err(err) = killpg(id, Signal::SIGKILL)
        {
            tracing::error!(which, command, error = %err, "cannot kill the scale command's process group");
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(id) = self.0.take() {
            let _ = killpg(id, Signal::SIGKILL);
        }
    }
}

/// The last [`TAIL_BYTES`] of a stream.
#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
    cut: bool,
}

impl Tail {
    async fn read_from(&mut self, stream: Option<impl AsyncRead + Unpin>) {
        let Some(mut stream) = stream else {
            return;
        };
        let mut buf = [0; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => self.push(&buf[..n]),
            }
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > 2 * TAIL_BYTES {
            let excess = self.bytes.len() - TAIL_BYTES;
            self.bytes.drain(..excess);
            self.cut = true;
        }
    }

    /// The kept bytes as trimmed text; a cut tail loses its partial first line.
    fn text(&self) -> String {
        let start = self.bytes.len().saturating_sub(TAIL_BYTES);
        let cut = self.cut || start > 0;
        let text = String::from_utf8_lossy(&self.bytes[start..]);
        if !cut {
            return text.trim().to_owned();
        }
        let rest = text.split_once('\n').map_or(&*text, |(_, rest)| rest);
        format!("…{}", rest.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_keeps_the_last_bytes_from_a_line_start() {
        let mut tail = Tail::default();
        tail.push(b"  only line \n");
        assert_eq!(tail.text(), "only line");
        let mut tail = Tail::default();
        for i in 0..2000 {
            tail.push(format!("line-{i}\n").as_bytes());
        }
        let text = tail.text();
        assert!(text.starts_with("…line-"), "{text}");
        assert!(text.ends_with("\nline-1999"), "{text}");
        assert!(text.len() <= TAIL_BYTES + "…".len(), "{}", text.len());
        assert!(tail.bytes.len() <= 2 * TAIL_BYTES, "{}", tail.bytes.len());
    }

    #[test]
    fn a_config_without_a_program_or_timeout_is_refused() {
        let config = CommandConfig {
            start: vec![],
            terminate: vec!["/bin/true".into()],
            timeout: Duration::from_secs(1),
        };
        let err = CommandExecutor::new(config)
            .expect_err("no start")
            .to_string();
        assert!(err.contains("`start` names no program"), "{err}");
        let config = CommandConfig {
            start: vec!["/bin/true".into()],
            terminate: vec!["/bin/true".into()],
            timeout: Duration::ZERO,
        };
        let err = CommandExecutor::new(config)
            .expect_err("no timeout")
            .to_string();
        assert!(err.contains("`timeout` is 0s"), "{err}");
    }
}
