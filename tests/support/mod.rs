//! Helpers for the integration tests: run the real `callfleet` binary against real servers.

#![allow(dead_code)] // each test file uses a different subset

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub fn callfleet() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_callfleet"));
    command.env("RUST_LOG", "info");
    command
}

/// A child process killed when the test ends, whatever happens.
pub struct Running {
    pub child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits")
    }

    /// Sends a signal by name (`KILL`, `TERM`, `STOP`) with the system's `kill`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

/// Starts `callfleet node-agent` for node `id` on `store_url`, logging to `log`.
pub fn start_agent(store_url: &str, id: &str, interval: &str, log: &Path) -> Running {
    let log = std::fs::File::create(log).expect("create log file");
    let child = callfleet()
        .arg("node-agent")
        .env("CALLFLEET_STORE__URL", store_url)
        .env("CALLFLEET_NODE__ID", id)
        .env("CALLFLEET_NODE__HEARTBEAT_INTERVAL", interval)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start node-agent");
    Running { child }
}

/// `callfleet status --json` against `store_url`, parsed.
pub fn status(store_url: &str) -> Vec<Value> {
    let output = callfleet()
        .args(["status", "--json"])
        .env("CALLFLEET_STORE__URL", store_url)
        .output()
        .expect("run status");
    assert_success(&output);
    serde_json::from_slice::<Vec<Value>>(&output.stdout).expect("status --json prints an array")
}

/// The node's entry in `status --json`, if it has reported.
pub fn node<'a>(nodes: &'a [Value], id: &str) -> Option<&'a Value> {
    nodes.iter().find(|n| n["id"] == id)
}

pub fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Polls `check` every 50 ms until it returns true or `limit` passes; returns the time taken.
pub fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not reached within {limit:?}");
}

/// A fresh MariaDB database from the server `./scripts/test` started.
pub fn fresh_mysql_url() -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime
        .block_on(callfleet_core::testing::fresh_mysql_config())
        .url
}
