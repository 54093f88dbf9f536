//! This node's Asterisk as a child of `callfleet up`: the single box runs its PBX too.
//!
//! A PBX that dies is started again after a backoff that doubles; one that keeps dying is
//! given up on after `restart_limit` restarts within `restart_window`, with an error in the
//! log, so a broken install never loops. The node-agent's AMI probe then reports the PBX
//! down and balancers stop sending calls to the node.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// The first wait before a restart; doubled after each restart in the window.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait before a restart.
const LONGEST_BACKOFF: Duration = Duration::from_secs(30);
/// How long Asterisk gets to stop by itself when callfleet stops.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// When to restart a PBX that exited, and when to give up.
#[derive(Debug)]
pub struct Restarts {
    limit: u32,
    window: Duration,
    recent: VecDeque<Instant>,
}

impl Restarts {
    /// At most `limit` restarts within any `window`.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            recent: VecDeque::new(),
        }
    }

    /// The PBX exited at `now`: how long to wait before starting it again, or `None` when
    /// it has been restarted `limit` times within the window already.
    pub fn after_exit(&mut self, now: Instant) -> Option<Duration> {
        while self
            .recent
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= self.window)
        {
            self.recent.pop_front();
        }
        let done = u32::try_from(self.recent.len()).unwrap_or(u32::MAX);
        if done >= self.limit {
            return None;
        }
        self.recent.push_back(now);
        let doubled = FIRST_BACKOFF.saturating_mul(1 << done.min(16));
        Some(doubled.min(LONGEST_BACKOFF))
    }
}

/// Runs `install/sbin/asterisk` on the configuration folder `folder` until `shutdown`,
/// restarting it as [`Restarts`] allows.
pub async fn supervise(
    install: &Path,
    folder: &Path,
    mut restarts: Restarts,
    shutdown: CancellationToken,
) {
    let binary = install.join("sbin/asterisk");
    let conf = folder.join("asterisk.conf");
    loop {
        let mut child = match start(&binary, &conf, folder) {
            Ok(child) => child,
            Err(err) => {
                error!(binary = %binary.display(), error = %err, "cannot start Asterisk; check asterisk.install");
                return;
            }
        };
        info!(pid = child.id(), conf = %conf.display(), "Asterisk started");
        let status = tokio::select! {
            status = child.wait() => status,
            () = shutdown.cancelled() => {
                stop(&binary, &conf, &mut child).await;
                return;
            }
        };
        let status = status.map_or_else(|err| err.to_string(), |status| status.to_string());
        match restarts.after_exit(Instant::now()) {
            Some(backoff) => {
                warn!(%status, ?backoff, "Asterisk exited; starting it again");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => return,
                }
            }
            None => {
                error!(
                    %status,
                    limit = restarts.limit,
                    window = ?restarts.window,
                    "Asterisk exited again: restarted too often, giving up; the node reports its PBX down until callfleet is restarted"
                );
                return;
            }
        }
    }
}

fn start(binary: &Path, conf: &Path, folder: &Path) -> std::io::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(folder.join("log").join("console.log"))?;
    Command::new(binary)
        .arg("-C")
        .arg(conf)
        // Foreground, no colour: the supervisor is its parent.
        .args(["-f", "-n"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
}

/// Asks Asterisk to stop through its own CLI, and kills it if it has not within the grace.
async fn stop(binary: &Path, conf: &Path, child: &mut Child) {
    let asked = Command::new(binary)
        .arg("-C")
        .arg(conf)
        .args(["-rx", "core stop now"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = tokio::time::timeout(STOP_GRACE, asked).await;
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        warn!("Asterisk did not stop within {STOP_GRACE:?}; killing it");
        let _ = child.kill().await;
    }
    info!("Asterisk stopped");
}

/// Where `callfleet up` keeps the PBX's configuration folder.
pub fn folder(data_dir: &Path) -> PathBuf {
    data_dir.join("asterisk")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_and_stop_after_the_limit_within_the_window() {
        let start = Instant::now();
        let mut restarts = Restarts::new(3, Duration::from_secs(60));
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(restarts.after_exit(at(0)), Some(Duration::from_secs(1)));
        assert_eq!(restarts.after_exit(at(2)), Some(Duration::from_secs(2)));
        assert_eq!(restarts.after_exit(at(5)), Some(Duration::from_secs(4)));
        // A fourth exit within the minute: given up.
        assert_eq!(restarts.after_exit(at(10)), None);
        // Once the window has passed the first restarts, it may restart again.
        assert_eq!(restarts.after_exit(at(61)), Some(Duration::from_secs(4)));
        assert_eq!(restarts.after_exit(at(61)), None);
    }

    #[test]
    fn the_backoff_never_exceeds_its_ceiling() {
        let start = Instant::now();
        let mut restarts = Restarts::new(40, Duration::from_secs(3600));
        let mut last = Duration::ZERO;
        for i in 0..40 {
            last = restarts
                .after_exit(start + Duration::from_secs(i))
                .expect("within the limit");
        }
        assert_eq!(last, LONGEST_BACKOFF);
        assert_eq!(restarts.after_exit(start + Duration::from_secs(41)), None);
    }
}
