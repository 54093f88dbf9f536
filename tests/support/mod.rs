//! Helpers for the integration tests: run the real `callfleet` binary against real servers.

#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod carrier;
pub mod redis_server;

/// The checkout the tests run from, read when they run (cargo and nextest set it): a test
/// binary reused from a build of another checkout of the same code (`.ci/run` shares one
/// target directory) must read this checkout's scenarios and configuration, not those of the
/// checkout it was built in, which may be gone.
pub fn checkout() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

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

    /// Stops the process (`SIGSTOP`) and returns once every thread of it has stopped:
    /// `kill` returns before they have, and a thread that is still running may handle one
    /// more message the test meant to leave waiting.
    pub fn freeze(&self) {
        self.signal("STOP");
        let tasks = format!("/proc/{}/task", self.pid());
        let stopped = || {
            std::fs::read_dir(&tasks).is_ok_and(|entries| {
                entries.flatten().all(|task| {
                    std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                        // The state follows the parenthesised command name.
                        stat.rsplit_once(") ")
                            .is_some_and(|(_, rest)| rest.starts_with(['T', 't']))
                    })
                })
            })
        };
        wait_until("every thread stopped", Duration::from_secs(5), stopped);
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

/// A loopback port that is free for both UDP and TCP right now (SIP listens on both).
///
/// Taken outside the kernel's ephemeral range (above it, where Asterisk's RTP ports are
/// not either): a port the kernel handed out for `:0` is also what it hands to the next
/// outgoing connection of any process, so between this check and the server's bind a
/// test's own gRPC or Redis client could take it. Outside the range only another test's
/// choice can collide; the start is spread by process and time, and every port is checked
/// before it is returned.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral: Vec<u32> = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|bound| bound.parse().ok())
        .collect();
    let (ephemeral_low, ephemeral_high) = match ephemeral[..] {
        [low, high] => (low, high),
        _ => (32_768, 60_999),
    };
    let (low, high) = if ephemeral_high < 64_000 {
        (ephemeral_high + 1, 65_536)
    } else {
        (10_000, ephemeral_low.max(10_001))
    };
    let span = high - low;
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    // Servers of one test started side by side bind a while after their ports were chosen:
    // a port is handed out once per process, whatever is bound at the moment.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..span {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(low + (seed.wrapping_add(step.wrapping_mul(7919))) % span)
            .expect("below 65536");
        if given.contains(&port) {
            continue;
        }
        given.push(port);
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no loopback port free for both UDP and TCP in {low}–{high}");
}

/// Starts `callfleet node-agent` like [`start_agent`], with extra environment such as
/// `CALLFLEET_NODE__MAX_CALLS`.
pub fn start_agent_with(
    store_url: &str,
    id: &str,
    interval: &str,
    log: &Path,
    env: &[(&str, &str)],
) -> Running {
    let log = std::fs::File::create(log).expect("create log file");
    let child = callfleet()
        .arg("node-agent")
        .env("CALLFLEET_STORE__URL", store_url)
        .env("CALLFLEET_NODE__ID", id)
        .env("CALLFLEET_NODE__HEARTBEAT_INTERVAL", interval)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start node-agent");
    Running { child }
}

/// SIPp (Debian package sip-tester). Missing, it fails the test: `./scripts/test`
/// installs it.
pub fn sipp() -> Command {
    let installed = std::iter::once(std::path::PathBuf::from("/usr/bin/sipp"))
        .chain(
            std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .map(|dir| dir.join("sipp")),
        )
        .find(|path| path.is_file());
    match installed {
        Some(path) => Command::new(path),
        None => panic!(
            "SIPp is missing (/usr/bin/sipp, Debian package sip-tester): run ./scripts/test, which installs it"
        ),
    }
}

/// Waits up to `limit` for `running` to exit; kills it and panics if it does not.
pub fn wait_exit(what: &str, running: &mut Running, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = running.child.try_wait().expect("try_wait") {
            return status;
        }
        if start.elapsed() > limit {
            let _ = running.child.kill();
            let _ = running.child.wait();
            panic!("{what}: still running after {limit:?}, killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP relay whose upstream can be cut and restored, to take the store away from an agent.
pub struct Relay {
    pub port: u16,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    pub fn start(upstream: String) -> Self {
        use std::io::{Read, Write};
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().expect("addr").port();
        let down = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&down);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if flag.load(Ordering::SeqCst) {
                    continue; // dropped: the agent sees the connection close at once
                }
                let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                    ),
                    (server, client),
                ] {
                    let flag = Arc::clone(&flag);
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if flag.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Self { port, down }
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The Asterisk install `./scripts/test-asterisk` built and names in
/// `CALLFLEET_ASTERISK_PREFIX`; missing, it fails the test and says how to get one.
pub fn asterisk_prefix() -> std::path::PathBuf {
    let prefix = std::env::var_os("CALLFLEET_ASTERISK_PREFIX")
        .map(std::path::PathBuf::from)
        .expect(
            "CALLFLEET_ASTERISK_PREFIX is not set: run ./scripts/test-asterisk, which builds Asterisk and sets it",
        );
    assert!(
        prefix.join("sbin/asterisk").is_file(),
        "no sbin/asterisk under {}",
        prefix.display()
    );
    prefix
}

/// Ends `child`, the leader of a process group of its own (Kamailio, which forks workers):
/// SIGTERM, up to 5 s for it to exit, then SIGKILL to whatever is left of its group (the
/// workers of a main process that died).
pub fn stop_process_group(child: &mut Child) {
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if !matches!(child.try_wait(), Ok(None)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
}

/// Kamailio (Debian package kamailio, `/usr/sbin/kamailio`). Missing, it fails the test.
pub fn kamailio() -> Command {
    let installed = ["/usr/sbin/kamailio", "/usr/local/sbin/kamailio"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .chain(
            std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .map(|dir| dir.join("kamailio")),
        )
        .find(|path| path.is_file());
    match installed {
        Some(path) => Command::new(path),
        None => panic!(
            "Kamailio is missing (/usr/sbin/kamailio): install the Debian package kamailio (apt-get install kamailio)"
        ),
    }
}

/// The cumulative counters of a SIPp run, from the last row of its `-trace_stat` file
/// (SIPp writes a final row when it exits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SippStats {
    /// Calls this SIPp started (a UAC).
    pub outgoing: u64,
    /// Calls that reached this SIPp (a UAS).
    pub incoming: u64,
    /// Calls that went through the whole scenario.
    pub successful: u64,
    /// Calls that did not.
    pub failed: u64,
    /// Retransmissions SIPp sent.
    pub retransmissions: u64,
}

impl SippStats {
    /// Reads the last row of the `-trace_stat` CSV file `path`; `None` while it has none.
    pub fn read(path: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut rows = text.lines().filter(|line| !line.trim().is_empty());
        let header: Vec<&str> = rows.next()?.split(';').collect();
        let last: Vec<&str> = rows.next_back()?.split(';').collect();
        let field = |name: &str| -> Option<u64> {
            let index = header.iter().position(|column| *column == name)?;
            last.get(index)?.trim().parse().ok()
        };
        Some(Self {
            outgoing: field("OutgoingCall(C)")?,
            incoming: field("IncomingCall(C)")?,
            successful: field("SuccessfulCall(C)")?,
            failed: field("FailedCall(C)")?,
            retransmissions: field("Retransmissions(C)")?,
        })
    }
}

/// The status code a SIP server on UDP 127.0.0.1:`port` answers an OPTIONS with, if it
/// answers within 500 ms (a balancer says 200 while it can route calls, 503 while not).
pub fn sip_options_status(port: u16) -> Option<u16> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("read timeout");
    let local = socket.local_addr().expect("local address");
    let n = format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let request = format!(
        "OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-probe-{n}\r\n\
From: <sip:probe@{local}>;tag=probe\r\nTo: <sip:127.0.0.1:{port}>\r\nCall-ID: probe-{n}@test\r\n\
CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    );
    socket
        .send_to(request.as_bytes(), ("127.0.0.1", port))
        .expect("send OPTIONS");
    let mut buffer = [0u8; 4096];
    let (length, _) = socket.recv_from(&mut buffer).ok()?;
    std::str::from_utf8(&buffer[..length])
        .ok()?
        .strip_prefix("SIP/2.0 ")?
        .get(..3)?
        .parse()
        .ok()
}

// ---- the control plane and realtime devices -------------------------------------------

/// One HTTP/1.1 exchange on loopback (`Connection: close`): the status and the body.
pub fn http(port: u16, method: &str, path: &str, token: &str, body: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let content_type = if path.starts_with("/api/") {
        "application/json"
    } else {
        "application/x-www-form-urlencoded"
    };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let status = answer.split(' ').nth(1)?.parse().ok()?;
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Some((status, body))
}

/// Where registering phones live (see [`registering_phone`]).
pub const PHONES: &str = "127.0.0.2";

pub const CRM_TOKEN: &str = "crm-token-0123456789abcdef";
pub const NODE_TOKEN: &str = "node-token-0123456789abcdef";

/// `callfleet control-plane` on `port` over the SQLite store `url`, with a CRM token and a
/// node token.
pub fn control_plane(url: &str, port: u16, log: &Path) -> Running {
    let child = callfleet()
        .arg("control-plane")
        .env("CALLFLEET_STORE__URL", url)
        .env("CALLFLEET_CONTROL_PLANE__LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "CALLFLEET_CONTROL_PLANE__TOKENS",
            format!(
                "[{{name=\"crm\",token=\"{CRM_TOKEN}\",role=\"write\"}},{{name=\"node-a\",token=\"{NODE_TOKEN}\",role=\"node\"}}]"
            ),
        )
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .expect("control plane log"),
        )
        .spawn()
        .expect("start the control plane");
    let running = Running { child };
    wait_until("the control plane answers", Duration::from_secs(20), || {
        http(port, "GET", "/api/v1/devices", CRM_TOKEN, "").is_some_and(|(s, _)| s == 200)
    });
    running
}

/// A phone that registers as `device` with `password` on the PBX at `pbx_port`, from
/// `127.0.0.2:port`, answers the calls that reach it there, and stays registered for
/// `stay`. Not from 127.0.0.1: that is where the carrier's calls come from, and Asterisk
/// identifies the carrier by its address before it looks at user names.
pub fn registering_phone(
    dir: &Path,
    device: &str,
    password: &str,
    pbx_port: u16,
    port: u16,
    stay: Duration,
) -> Running {
    let scenarios = checkout().join("tests/sipp");
    std::fs::create_dir_all(dir).expect("phone folder");
    let child = sipp()
        .current_dir(dir)
        .arg("-sf")
        .arg(scenarios.join("phone_register.xml"))
        .arg("-oocsf")
        .arg(scenarios.join("phone_answer.xml"))
        .args(["-s", device, "-au", device, "-ap", password])
        .arg(format!("127.0.0.1:{pbx_port}"))
        .args(["-i", PHONES, "-p", &port.to_string()])
        .args(["-m", "1", "-d", &stay.as_millis().to_string(), "-nostdin"])
        .args([
            "-trace_err",
            "-error_file",
            "errors.log",
            "-trace_stat",
            "-stf",
            "stats.csv",
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("out")).expect("phone output"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start the SIPp phone");
    Running { child }
}

/// The node-agent's provisioning counters.
pub fn provisioning_stats(port: u16) -> serde_json::Value {
    let (status, body) = http(port, "GET", "/stats", "", "").expect("the node-agent answers");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("stats are JSON")
}

/// The registrations of `device` as the control plane holds them (asked with the node
/// token, as a node-agent asks).
pub fn registrations(control_port: u16, device: &str) -> Option<String> {
    let (status, body) = http(
        control_port,
        "POST",
        "/asterisk/realtime/ps_contacts/multi",
        NODE_TOKEN,
        &format!("id%20LIKE={device}%3B%40%25"),
    )?;
    (status == 200).then_some(body)
}

/// A file created at `path` for a process's output.
pub fn log_file(path: &Path) -> std::fs::File {
    std::fs::File::create(path).unwrap_or_else(|err| panic!("create {}: {err}", path.display()))
}

/// The text of `path`, or nothing while there is no such file.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `callfleet lock-service` on the memory backend on `port`, granting at once
/// (`no_startup_quarantine`: its quarantine after a start guards against leases a previous
/// process granted, and a test's lock service has no previous process), logging to `log`.
pub fn lock_service(port: u16, log: &Path) -> Running {
    let child = callfleet()
        .arg("lock-service")
        .env(
            "CALLFLEET_LOCK_SERVICE__LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .env("CALLFLEET_TEST_UNSAFE_LOCKS", "no_startup_quarantine")
        .stdout(Stdio::null())
        .stderr(log_file(log))
        .spawn()
        .expect("start the lock service");
    Running { child }
}
