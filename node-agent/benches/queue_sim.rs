//! The seed-scale queue simulation of issue 16 ("Measure"), without Asterisk. Run it with
//! `./scripts/bench-queue`.
//!
//! Each run starts a cluster of real processes from the release binary (`CALLFLEET_BIN`)
//! in a temp dir: one `lock-service` (memory, or `LOCKS=redis` on a `redis-server` of its
//! own), one `control-plane` on an embedded SQLite store, and `NODES` `node-agent`s, each
//! with its own FastAGI listener, its queue settings pointing at the lock service, and
//! candidates and agent events at the control plane with a `node` token; no Asterisk, no
//! AMI (`node.calls.source = "static"`). Queue `sales` gets `AGENTS` agents through the
//! control plane's REST API, each with a device and a logged-in session, with priorities
//! 0–4.
//!
//! This process then plays every node's Asterisk over FastAGI, with the bytes of
//! `fixtures/asterisk/fastagi-session.jsonl` (its captured environment block, with the
//! script, channel and unique id of each session changed). `CALLERS` callers wait at once,
//! spread round robin over the nodes: each opens `queue?queue=sales&arrived=<epoch>` as
//! the dialplan of `callfleet asterisk-config` does, answers `SET VARIABLE` with
//! `200 result=1`, and when its node-agent sends
//! `EXEC Dial "<endpoint>,<secs>,b(callfleet-fence^ring^1(<id>))U(callfleet-fence^<id>)"`
//! it plays the ring as Asterisk would: a second session `ringing?ring=<id>` on the
//! agent's leg (Dial's `b()`), `RING_MS` later the answer, a third session
//! `fence?ring=<id>` (Dial's `U()`; `CALLFLEET_RESULT=ok` lets the bridge happen), then the
//! call for a talk time drawn from `TALK_MS`, then Dial's `200 result=0` and
//! `200 result=1 (ANSWER)` for `GET VARIABLE DIALSTATUS`. A refused fence is played as
//! the generated dialplan's `GOSUB_RESULT=ABORT` is documented to act: both legs hang up.
//! Every caller that is rung is replaced by a new one, so `CALLERS` keep waiting.
//!
//! Measured over `SECONDS_PER_RUN` after `WARMUP_SECONDS`, from this process's view:
//! rings started per second (routing decisions), answered calls per second, double rings
//! (a ring for an agent whose previous ring or call has not ended: must be 0; counted
//! over the whole run), order inversions (a caller rung while a caller who arrived earlier,
//! at any node, still waits), the latency from an agent becoming free to its next ring
//! (free = when this process ended the agent's previous call, i.e. sent Dial's reply, plus
//! `node.queue.wrap_up`), and CPU seconds per answered call of the node-agents (sum), the
//! lock service (and its Redis), the control plane and this load process
//! (`/proc/<pid>/stat`). Then the median of the runs with the spread (lowest–highest).
//!
//! Knobs (environment): `CALLERS` (2000), `AGENTS` (600), `NODES` (3), `SECONDS_PER_RUN`
//! (60), `WARMUP_SECONDS` (15), `REPEAT` (3), `TALK_MS` (`2000-6000`), `RING_MS`
//! (`100-300`), `WRAP_UP` (`1s`), `POLL` (`100ms`: `node.queue.poll`), `LOGIN_FIRST` (0:
//! every agent logs in before the callers arrive; N: only N, the others once as many are
//! talking or in wrap-up, for binaries before 1b6fb62, whose node-agent sent every free
//! candidate to a lock service that refuses a `ClaimNext` of more than 500, so nobody was
//! rung while more than 500 agents were free), `LOCKS` (`memory` or `redis`),
//! `CALLFLEET_BIN` (`target/release/callfleet`), `KEEP` (1: keep each run's folder, logs
//! included).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use common::{cpu_seconds, env, load_average, median};

const CRM_TOKEN: &str = "bench-crm-token-0123456789";
const NODE_TOKEN: &str = "bench-node-token-0123456789";
const QUEUE: &str = "sales";
/// The lock service refuses claims this long after it starts (memory backend) or after
/// its Redis is new: longer than the leases' 10 s validity plus their 500 ms guard.
const QUARANTINE: Duration = Duration::from_secs(11);

/// `LOW-HIGH` or `N` milliseconds.
fn range_ms(name: &str, default: (u64, u64)) -> (u64, u64) {
    let Ok(raw) = std::env::var(name) else {
        return default;
    };
    let parse = |s: &str| {
        s.trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("{name}={raw}: give N or LOW-HIGH milliseconds"))
    };
    let (low, high) = match raw.split_once('-') {
        Some((low, high)) => (parse(low), parse(high)),
        None => (parse(&raw), parse(&raw)),
    };
    assert!(low <= high, "{name}={raw}: LOW must not exceed HIGH");
    (low, high)
}

/// `500ms`, `1s` or `0s`, as humantime reads them in the node-agent's config.
fn duration(name: &str, default: &str) -> (String, Duration) {
    let raw = std::env::var(name).unwrap_or_else(|_| default.to_owned());
    let parsed = if let Some(ms) = raw.strip_suffix("ms") {
        ms.parse().ok().map(Duration::from_millis)
    } else {
        raw.strip_suffix('s')
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
    };
    let parsed = parsed.unwrap_or_else(|| panic!("{name}={raw}: give e.g. 1s or 500ms"));
    (raw, parsed)
}

// ----- processes -----

/// CPU seconds the whole box has spent outside idle and iowait so far (`/proc/stat`).
fn box_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0.0) / 100.0;
    at(0) + at(1) + at(2) + at(5) + at(6) + at(7)
}

/// A loopback port for a server to bind, above the ephemeral range so that none of the
/// thousands of connections this load opens can take it before the server binds it.
fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let high: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(60_999);
    let (low, span) = if high < 64_000 {
        (high + 1, 65_535 - high)
    } else {
        (10_000, 10_000)
    };
    let seed = u64::from(std::process::id()).wrapping_mul(2_654_435_761);
    for _ in 0..span {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(low + seed.wrapping_add(step.wrapping_mul(7919)) % span)
            .expect("below 65536");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no loopback port free above the ephemeral range");
}

/// A server this run started; stopped (TERM, then KILL after 5 s) when dropped.
struct Process {
    name: String,
    child: Child,
}

impl Process {
    fn spawn(name: &str, mut command: Command, log: &Path) -> Self {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("a log file"))
            .spawn()
            .unwrap_or_else(|err| panic!("start {name}: {err}"));
        Self {
            name: name.to_owned(),
            child,
        }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn cpu(&self) -> f64 {
        cpu_seconds(&self.pid())
    }

    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early: {status}", self.name);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid()])
            .stderr(Stdio::null())
            .status();
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not reached within {limit:?}");
}

/// One HTTP/1.1 exchange with the control plane (`Connection: close`): status and body.
/// (The same small client as `tests/support::http`; the bench cannot reach that module.)
fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {CRM_TOKEN}\r\n\
Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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

fn expect_ok(port: u16, method: &str, path: &str, body: &str) {
    let answer = http(port, method, path, body);
    assert!(
        matches!(&answer, Some((200, _))),
        "{method} {path}: {answer:?}"
    );
}

/// The processes of one run, in a temp dir.
struct Cluster {
    dir: tempfile::TempDir,
    control_port: u16,
    locks: Process,
    redis: Option<Process>,
    control: Process,
    nodes: Vec<Process>,
    agi: Vec<SocketAddr>,
    /// Claims are refused before this (the lock service's quarantine).
    claims_from: Instant,
}

/// What a run is set up with.
#[derive(Debug, Clone)]
struct Setup {
    binary: PathBuf,
    callers: usize,
    agents: usize,
    nodes: usize,
    seconds: f64,
    warmup: f64,
    talk_ms: (u64, u64),
    ring_ms: (u64, u64),
    wrap_up: (String, Duration),
    /// Agents logged in before the callers arrive; the rest log in once enough are busy.
    login_first: usize,
    /// `node.queue.poll`: how often a waiting caller asks for its turn.
    poll: (String, Duration),
    redis: bool,
    keep: bool,
}

impl Cluster {
    fn start(setup: &Setup) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bench-queue.")
            .disable_cleanup(setup.keep)
            .tempdir()
            .expect("temp dir");
        let path = dir.path();
        let callfleet = |role: &str, config: &Path| {
            let mut command = Command::new(&setup.binary);
            command
                .arg(role)
                .arg("--config")
                .arg(config)
                .args(["--log-format", "json"])
                .env("RUST_LOG", "info");
            command
        };

        let redis = setup.redis.then(|| {
            let port = free_port();
            let folder = path.join("redis");
            std::fs::create_dir_all(&folder).expect("redis folder");
            let mut command = Command::new("redis-server");
            command
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .arg("--dir")
                .arg(&folder)
                .args(["--appendonly", "yes", "--appendfsync", "everysec"])
                .args(["--save", "", "--maxmemory-policy", "noeviction"]);
            let process = Process::spawn("redis-server", command, &path.join("redis.log"));
            wait_until("redis-server listens", Duration::from_secs(10), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            (process, port)
        });
        let lock_port = free_port();
        let backend = match &redis {
            Some((_, port)) => {
                format!("backend = \"redis\"\nredis_url = \"redis://127.0.0.1:{port}/0\"\n")
            }
            None => "backend = \"memory\"\n".to_owned(),
        };
        let config = path.join("locks.toml");
        std::fs::write(
            &config,
            format!(
                "[lock_service]\nlisten = \"127.0.0.1:{lock_port}\"\n{backend}\
max_validity = \"10s\"\nguard = \"500ms\"\nquarantine = \"{}s\"\n",
                QUARANTINE.as_secs()
            ),
        )
        .expect("write the lock service's config");
        let locks = Process::spawn(
            "lock-service",
            callfleet("lock-service", &config),
            &path.join("locks.log"),
        );
        let claims_from = Instant::now() + QUARANTINE + Duration::from_millis(500);

        let store = format!("sqlite://{}/fleet.db", path.display());
        let control_port = free_port();
        let config = path.join("control.toml");
        std::fs::write(
            &config,
            format!(
                "[store]\nurl = \"{store}\"\n\n[control_plane]\nlisten = \"127.0.0.1:{control_port}\"\n\
lock_service = \"http://127.0.0.1:{lock_port}\"\ntokens = [\n  \
{{ name = \"crm\", token = \"{CRM_TOKEN}\", role = \"write\" }},\n  \
{{ name = \"nodes\", token = \"{NODE_TOKEN}\", role = \"node\" }},\n]\n"
            ),
        )
        .expect("write the control plane's config");
        let control = Process::spawn(
            "control-plane",
            callfleet("control-plane", &config),
            &path.join("control.log"),
        );
        wait_until("the control plane answers", Duration::from_secs(30), || {
            http(control_port, "GET", "/api/v1/devices", "").is_some_and(|(s, _)| s == 200)
        });
        provision(
            control_port,
            setup.agents,
            setup.agents.min(setup.login_first),
        );

        let mut nodes = Vec::new();
        let mut agi = Vec::new();
        for n in 0..setup.nodes {
            let agi_port = free_port();
            let config = path.join(format!("pbx-{n}.toml"));
            std::fs::write(
                &config,
                format!(
                    "[store]\nurl = \"{store}\"\n\n[node]\nid = \"pbx-{n}\"\n\n[node.calls]\nsource = \"static\"\n\n\
[node.agi]\nlisten = \"127.0.0.1:{agi_port}\"\n\n[node.queue]\nlock_service = \"http://127.0.0.1:{lock_port}\"\n\
wrap_up = \"{}\"\npoll = \"{}\"\nring_timeout = \"20s\"\nmax_wait = \"24h\"\n\n\
[provisioning]\ncontrol_plane = \"http://127.0.0.1:{control_port}\"\ntoken = \"{NODE_TOKEN}\"\n",
                    setup.wrap_up.0, setup.poll.0
                ),
            )
            .expect("write a node-agent's config");
            nodes.push(Process::spawn(
                &format!("node-agent pbx-{n}"),
                callfleet("node-agent", &config),
                &path.join(format!("pbx-{n}.log")),
            ));
            agi.push(SocketAddr::from(([127, 0, 0, 1], agi_port)));
        }
        let captured = captured_environment();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        for (n, address) in agi.iter().enumerate() {
            wait_until(
                &format!("pbx-{n}'s FastAGI ping answers"),
                Duration::from_secs(30),
                || {
                    let env = environment(&captured, *address, "ping", "Local/ping-1;2", "0.1");
                    runtime
                        .block_on(side_session(*address, env))
                        .is_ok_and(|r| r.as_deref() == Some("pong"))
                },
            );
        }
        let mut cluster = Self {
            dir,
            control_port,
            locks,
            redis: redis.map(|(process, _)| process),
            control,
            nodes,
            agi,
            claims_from,
        };
        cluster.check_alive();
        cluster
    }

    fn check_alive(&mut self) {
        self.locks.check_alive();
        self.control.check_alive();
        if let Some(redis) = &mut self.redis {
            redis.check_alive();
        }
        for node in &mut self.nodes {
            node.check_alive();
        }
    }

    /// CPU seconds so far: node-agents (sum), lock service (+ Redis), control plane.
    fn cpu(&self) -> (f64, f64, f64) {
        let nodes = self.nodes.iter().map(Process::cpu).sum();
        let locks = self.locks.cpu() + self.redis.as_ref().map_or(0.0, Process::cpu);
        (nodes, locks, self.control.cpu())
    }

    /// Order inversions as the lock service saw them, from the node-agents' `ringing` log
    /// lines (fencing token: the grant's time in µs of the lock service's clock;
    /// `enqueued_us`: when the caller joined the order, same clock): rings granted within
    /// `window` (µs since the epoch) to a caller who joined after a caller rung later.
    /// Callers never rung are not seen. Returns (inversions, rings in the window).
    fn lock_order_inversions(&self, window: (u64, u64)) -> (u64, u64) {
        let mut rings: Vec<(u64, u64)> = Vec::new();
        for n in 0..self.nodes.len() {
            let text = std::fs::read_to_string(self.dir.path().join(format!("pbx-{n}.log")))
                .unwrap_or_default();
            for line in text.lines().filter(|l| l.contains("\"ringing\"")) {
                let Ok(row) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                if let (Some(token), Some(enqueued)) =
                    (row["token"].as_u64(), row["enqueued_us"].as_u64())
                {
                    rings.push((token, enqueued));
                }
            }
        }
        rings.sort_unstable();
        let (mut inversions, mut counted) = (0, 0);
        let mut later_min = u64::MAX;
        for &(token, enqueued) in rings.iter().rev() {
            if token >= window.0 && token < window.1 {
                counted += 1;
                if later_min < enqueued {
                    inversions += 1;
                }
            }
            later_min = later_min.min(enqueued);
        }
        (inversions, counted)
    }

    /// Warning and error lines of the node-agents' and lock service's JSON logs, by message.
    fn log_complaints(&self) -> Vec<(String, usize)> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut files: Vec<PathBuf> = (0..self.nodes.len())
            .map(|n| self.dir.path().join(format!("pbx-{n}.log")))
            .collect();
        files.push(self.dir.path().join("locks.log"));
        files.push(self.dir.path().join("control.log"));
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let name = file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            for line in text.lines() {
                let Ok(row) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                let level = row["level"].as_str().unwrap_or("");
                if level == "WARN" || level == "ERROR" {
                    let message = row["fields"]["message"]
                        .as_str()
                        .or_else(|| row["message"].as_str())
                        .unwrap_or("?");
                    let role = name.split('-').next().unwrap_or("");
                    *counts
                        .entry(format!("{role} {level}: {message}"))
                        .or_default() += 1;
                }
            }
        }
        let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        counts
    }
}

/// Queue `sales` with `agents` agents (`a0001`…), each with a device of the same name
/// (endpoint `PJSIP/a0001`) and a membership of priority 0–4; the first `logged_in` of
/// them with a logged-in session.
fn provision(port: u16, agents: usize, logged_in: usize) {
    expect_ok(
        port,
        "PUT",
        &format!("/api/v1/queues/{QUEUE}"),
        r#"{"name":"Sales"}"#,
    );
    // A few writers at once: the store takes one write at a time, but the HTTP round trips
    // overlap.
    let next = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= agents {
                        return;
                    }
                    let agent = agent_name(i);
                    expect_ok(
                        port,
                        "PUT",
                        &format!("/api/v1/devices/{agent}"),
                        &format!(r#"{{"endpoint":"PJSIP/{agent}"}}"#),
                    );
                    expect_ok(
                        port,
                        "PUT",
                        &format!("/api/v1/agents/{agent}"),
                        &format!(r#"{{"name":"Agent {agent}"}}"#),
                    );
                    expect_ok(
                        port,
                        "PUT",
                        &format!("/api/v1/queues/{QUEUE}/members/{agent}"),
                        &format!(r#"{{"priority":{}}}"#, i % 5),
                    );
                    if i < logged_in {
                        login(port, i);
                    }
                }
            });
        }
    });
}

fn login(port: u16, i: usize) {
    let agent = agent_name(i);
    expect_ok(
        port,
        "POST",
        &format!("/api/v1/agents/{agent}/login"),
        &format!(r#"{{"device":"{agent}"}}"#),
    );
}

fn agent_name(i: usize) -> String {
    format!("a{:04}", i + 1)
}

// ----- Asterisk's side of FastAGI -----

/// The captured `route-clean` environment block of `fixtures/asterisk/fastagi-session.jsonl`,
/// as (name, value) lines.
fn captured_environment() -> Vec<(String, String)> {
    let jsonl = include_str!("../../fixtures/asterisk/fastagi-session.jsonl");
    let block = jsonl
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|row| row["dir"] == "<<<")
        .filter_map(|row| row["data"].as_str().map(str::to_owned))
        .find(|data| data.contains("agi_network_script: route-clean?queue=sales\n"))
        .expect("the captured route-clean environment");
    block
        .lines()
        .filter_map(|line| line.split_once(": ").or_else(|| line.split_once(':')))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

/// The captured environment for `script` (`queue?…`, `fence?ring=…`) on `channel`, as
/// Asterisk sends it to the node-agent at `address`: the script, request, channel and
/// unique id replaced, the `AGI()` arguments left out, the empty line at the end.
fn environment(
    captured: &[(String, String)],
    address: SocketAddr,
    script: &str,
    channel: &str,
    uniqueid: &str,
) -> Vec<u8> {
    let (context, extension, priority) = match script.split('?').next() {
        Some("queue") => ("callfleet-queue", QUEUE, "5"),
        Some("fence") => ("callfleet-fence", "s", "2"),
        Some("ringing") => ("callfleet-fence", "ring", "1"),
        _ => ("default", "305", "2"),
    };
    let mut block = String::with_capacity(600);
    for (name, value) in captured {
        let value = match name.as_str() {
            "agi_network_script" => script.to_owned(),
            "agi_request" => format!("agi://{address}/{script}"),
            "agi_channel" => channel.to_owned(),
            "agi_type" => "PJSIP".to_owned(),
            "agi_uniqueid" => uniqueid.to_owned(),
            "agi_context" => context.to_owned(),
            "agi_extension" => extension.to_owned(),
            "agi_priority" => priority.to_owned(),
            name if name.starts_with("agi_arg_") => continue,
            _ => value.clone(),
        };
        block.push_str(name);
        block.push_str(": ");
        block.push_str(&value);
        block.push('\n');
    }
    block.push('\n');
    block.into_bytes()
}

/// One short session on the agent's leg (Dial's `b()` or `U()`), or a `ping`: sends the
/// environment, answers every command `200 result=1`, and returns the last value the
/// node-agent set `CALLFLEET_RESULT` to, once it closed the session.
async fn side_session(
    address: SocketAddr,
    environment: Vec<u8>,
) -> std::io::Result<Option<String>> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    write.write_all(&environment).await?;
    let mut lines = BufReader::new(read);
    let mut line = String::new();
    let mut result = None;
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(result);
        }
        if let Some(value) = line
            .trim_end()
            .strip_prefix("SET VARIABLE CALLFLEET_RESULT ")
        {
            result = Some(value.trim_matches('"').to_owned());
        }
        write.write_all(b"200 result=1\n").await?;
    }
}

// ----- the simulation -----

/// Per-run settings and state shared by the callers.
struct Sim {
    setup: Setup,
    agi: Vec<SocketAddr>,
    captured: Vec<(String, String)>,
    /// The measured window.
    start: Instant,
    end: Instant,
    /// Unique ids of this run start with it (`<epoch>.<n>`, as Asterisk's do).
    epoch: u64,
    next_caller: AtomicU64,
    next_leg: AtomicU64,
    state: Mutex<State>,
    /// When the agents beyond `login_first` were logged in.
    late_logins: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct State {
    /// Callers waiting (not being rung): arrival number → arrival time.
    waiting: BTreeMap<u64, Instant>,
    /// By endpoint.
    agents: HashMap<String, AgentState>,
    rng: u64,
    tally: Tally,
}

#[derive(Default)]
struct AgentState {
    /// A ring or call in progress since then.
    busy_since: Option<Instant>,
    /// When the agent is free again: their last call's end plus the wrap-up.
    free_at: Option<Instant>,
    /// The node of their last ring.
    node: usize,
    /// Talking (the fence let the answer through) and not yet hung up.
    talking: bool,
}

/// What the callers saw; `rings`, `answered`, `latencies`, `inversions` and `waits` count
/// in the measured window only, the faults over the whole run.
#[derive(Default, Debug, Clone)]
struct Tally {
    rings: u64,
    answered: u64,
    double_rings: u64,
    inversions: u64,
    inversions_warmup: u64,
    /// The most by which a skipped caller had arrived before the caller rung.
    inversion_gap_max: Duration,
    /// Agents rung before their wrap-up was over (free→ring below 0; not in `latencies`).
    rung_in_wrap_up: u64,
    /// Free → next ring of the same agent.
    latencies: Vec<Duration>,
    /// Those of `latencies` whose ring came from another node than the previous call.
    latencies_other_node: Vec<Duration>,
    /// Arrival → ring.
    waits: Vec<Duration>,
    /// Answers the fence refused (the caller is hung up with the agent's leg).
    fenced: u64,
    /// Callers whose session ended without a ring (`CALLFLEET_RESULT` = `error`/`overflow`,
    /// or the node-agent closed it).
    ended_unrung: u64,
    /// Calls whose queue session did not end with `CALLFLEET_RESULT=answered`.
    not_answered_result: u64,
    /// Connections or sessions that failed on I/O.
    io_errors: u64,
    /// Commands this Asterisk does not play.
    unexpected: u64,
    ended: u64,
}

impl Sim {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("state lock")
    }

    fn in_window(&self, at: Instant) -> bool {
        at >= self.start && at < self.end
    }

    fn draw(&self, (low, high): (u64, u64)) -> Duration {
        let mut state = self.state();
        // xorshift64: enough for talk times.
        let mut x = state.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.rng = x;
        Duration::from_millis(low + x % (high - low + 1))
    }

    /// Caller `seq` (arrived at `arrived`) is rung by node `node` on `endpoint` at `at`.
    fn rung(&self, seq: u64, node: usize, arrived: Instant, endpoint: &str, at: Instant) {
        let window = self.in_window(at);
        let mut state = self.state();
        state.waiting.remove(&seq);
        if let Some((&first, &first_arrived)) = state.waiting.first_key_value()
            && first < seq
        {
            if window {
                state.tally.inversions += 1;
                let gap = arrived.saturating_duration_since(first_arrived);
                state.tally.inversion_gap_max = state.tally.inversion_gap_max.max(gap);
            } else if at < self.start {
                state.tally.inversions_warmup += 1;
            }
        }
        let agent = state.agents.entry(endpoint.to_owned()).or_default();
        let double = agent.busy_since.is_some();
        let other_node = agent.node != node;
        agent.busy_since = Some(at);
        agent.node = node;
        let latency = agent.free_at.map(|free| {
            at.checked_duration_since(free)
                .ok_or(free.saturating_duration_since(at))
        });
        if double {
            state.tally.double_rings += 1;
        }
        if window {
            state.tally.rings += 1;
            state
                .tally
                .waits
                .push(at.saturating_duration_since(arrived));
            match latency {
                Some(Ok(latency)) => {
                    state.tally.latencies.push(latency);
                    if other_node {
                        state.tally.latencies_other_node.push(latency);
                    }
                }
                Some(Err(_early)) => state.tally.rung_in_wrap_up += 1,
                None => {}
            }
        }
    }

    fn answered(&self, endpoint: &str, at: Instant) {
        let mut state = self.state();
        state.agents.entry(endpoint.to_owned()).or_default().talking = true;
        if self.in_window(at) {
            state.tally.answered += 1;
        }
    }

    /// Agents talking or in their wrap-up: those the control plane leaves out of the
    /// candidates.
    fn occupied(&self) -> usize {
        let now = Instant::now();
        self.state()
            .agents
            .values()
            .filter(|a| a.talking || a.free_at.is_some_and(|free| free > now))
            .count()
    }

    /// The agent on `endpoint` hung up at `at` (or the fence refused their answer).
    fn ended(&self, endpoint: &str, at: Instant, talked: bool) {
        let mut state = self.state();
        let agent = state.agents.entry(endpoint.to_owned()).or_default();
        agent.busy_since = None;
        agent.talking = false;
        agent.free_at = talked.then(|| at + self.setup.wrap_up.1);
        if talked {
            state.tally.ended += 1;
        } else {
            state.tally.fenced += 1;
        }
    }

    /// Starts a new caller (round robin over the nodes).
    fn spawn_caller(self: &Arc<Self>) {
        let sim = self.clone();
        tokio::spawn(async move { sim.caller().await });
    }

    async fn caller(self: Arc<Self>) {
        let seq = self.next_caller.fetch_add(1, Ordering::Relaxed);
        let address = self.agi[seq as usize % self.agi.len()];
        let arrived = Instant::now();
        self.state().waiting.insert(seq, arrived);
        let mut replaced = false;
        let outcome = self.play_caller(seq, address, arrived, &mut replaced).await;
        {
            let mut state = self.state();
            state.waiting.remove(&seq);
            match &outcome {
                Ok((rung, result)) => {
                    if !rung {
                        state.tally.ended_unrung += 1;
                    } else if result.as_deref() != Some("answered") {
                        state.tally.not_answered_result += 1;
                    }
                }
                Err(_) => state.tally.io_errors += 1,
            }
        }
        if !replaced {
            // Not rung: a node-agent refusing callers must not turn this into a busy loop.
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.spawn_caller();
        }
    }

    /// Plays one caller's `queue` session; returns whether they were rung and the last
    /// `CALLFLEET_RESULT`.
    async fn play_caller(
        self: &Arc<Self>,
        seq: u64,
        address: SocketAddr,
        arrived: Instant,
        replaced: &mut bool,
    ) -> std::io::Result<(bool, Option<String>)> {
        let arrived_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let environment = environment(
            &self.captured,
            address,
            &format!("queue?queue={QUEUE}&arrived={arrived_epoch}"),
            &format!("PJSIP/carrier-{seq:08x}"),
            &format!("{}.{seq}", self.epoch),
        );
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        let (read, mut write) = stream.into_split();
        write.write_all(&environment).await?;
        let mut lines = BufReader::new(read);
        let mut line = String::new();
        let (mut rung, mut result, mut status, mut dead) = (false, None, "", false);
        loop {
            line.clear();
            if lines.read_line(&mut line).await? == 0 {
                return Ok((rung, result));
            }
            let command = line.trim_end();
            let reply: std::borrow::Cow<'static, str> = if dead {
                "511 Command Not Permitted on a dead channel or intercept routine\n".into()
            } else if let Some(value) = command.strip_prefix("SET VARIABLE CALLFLEET_RESULT ") {
                result = Some(value.trim_matches('"').to_owned());
                "200 result=1\n".into()
            } else if command.starts_with("SET VARIABLE ") {
                "200 result=1\n".into()
            } else if let Some(data) = command.strip_prefix("EXEC Dial ") {
                rung = true;
                let outcome = self
                    .ring(seq, arrived, address, data.trim_matches('"'), replaced)
                    .await;
                match outcome {
                    Some(answered) => {
                        status = answered;
                        "200 result=0\n".into()
                    }
                    None => {
                        // GOSUB_RESULT=ABORT hangs up both legs: the caller is gone.
                        dead = true;
                        write.write_all(b"HANGUP\n").await?;
                        "200 result=-1\n".into()
                    }
                }
            } else if command == "GET VARIABLE DIALSTATUS" {
                format!("200 result=1 ({status})\n").into()
            } else if command.starts_with("GET VARIABLE ") {
                "200 result=0\n".into()
            } else {
                self.state().tally.unexpected += 1;
                "510 Invalid or unknown command\n".into()
            };
            write.write_all(reply.as_bytes()).await?;
        }
    }

    /// Plays `EXEC Dial "<data>"`: the agent's leg rings (`b()`), answers after `RING_MS`
    /// (`U()` runs the fence), talks for `TALK_MS` and hangs up. Returns the DIALSTATUS, or
    /// `None` when the fence refused the answer (both legs hung up).
    async fn ring(
        self: &Arc<Self>,
        seq: u64,
        arrived: Instant,
        address: SocketAddr,
        data: &str,
        replaced: &mut bool,
    ) -> Option<&'static str> {
        let at = Instant::now();
        let endpoint = data.split(',').next().unwrap_or("").to_owned();
        let ring = data
            .rsplit_once("U(callfleet-fence^")
            .and_then(|(_, rest)| rest.strip_suffix(')'))
            .unwrap_or("")
            .to_owned();
        let node = self.agi.iter().position(|a| *a == address).unwrap_or(0);
        self.rung(seq, node, arrived, &endpoint, at);
        if !*replaced {
            *replaced = true;
            self.spawn_caller();
        }
        let leg = format!(
            "{endpoint}-{:08x}",
            self.next_leg.fetch_add(1, Ordering::Relaxed)
        );
        let leg_id = format!("{}.{}", self.epoch + 1, seq);
        let ringing = environment(
            &self.captured,
            address,
            &format!("ringing?ring={ring}"),
            &leg,
            &leg_id,
        );
        if side_session(address, ringing).await.is_err() {
            self.state().tally.io_errors += 1;
        }
        tokio::time::sleep(self.draw(self.setup.ring_ms)).await;
        let fence = environment(
            &self.captured,
            address,
            &format!("fence?ring={ring}"),
            &leg,
            &leg_id,
        );
        let verdict = side_session(address, fence).await;
        if verdict.as_ref().is_ok_and(|v| v.as_deref() == Some("ok")) {
            self.answered(&endpoint, Instant::now());
            tokio::time::sleep(self.draw(self.setup.talk_ms)).await;
            self.ended(&endpoint, Instant::now(), true);
            Some("ANSWER")
        } else {
            if verdict.is_err() {
                self.state().tally.io_errors += 1;
            }
            self.ended(&endpoint, Instant::now(), false);
            None
        }
    }
}

// ----- a run -----

/// One run's figures.
#[derive(Debug, Clone)]
struct Figures {
    rings_per_s: f64,
    answered_per_s: f64,
    tally: Tally,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    wait_p50: f64,
    /// Free → ring when the ring came from another node than the agent's last call.
    other_node_p50: f64,
    other_node_p99: f64,
    /// CPU seconds per answered call.
    nodes_cpu: f64,
    locks_cpu: f64,
    control_cpu: f64,
    load_cpu: f64,
    /// CPU seconds per second of the whole box.
    box_cpu: f64,
    /// CPU seconds per second: node-agents (sum), lock service, control plane.
    cpu_per_s: (f64, f64, f64),
    complaints: Vec<(String, usize)>,
    /// By the lock service's order: (inversions, rings seen in the window).
    lock_inversions: (u64, u64),
    /// When the agents beyond `LOGIN_FIRST` were logged in, in s from the window's start
    /// (`Some(None)`: never).
    late_logins: Option<Option<f64>>,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or(f64::NAN)
}

fn run(setup: &Setup) -> Figures {
    let began = Instant::now();
    let mut cluster = Cluster::start(setup);
    eprintln!(
        "  cluster up in {:.1} s ({})",
        began.elapsed().as_secs_f64(),
        cluster.dir.path().display()
    );
    std::thread::sleep(
        cluster
            .claims_from
            .saturating_duration_since(Instant::now()),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let now = Instant::now();
    let start = now + Duration::from_secs_f64(setup.warmup);
    let end = start + Duration::from_secs_f64(setup.seconds);
    let sim = Arc::new(Sim {
        setup: setup.clone(),
        agi: cluster.agi.clone(),
        captured: captured_environment(),
        start,
        end,
        epoch: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        next_caller: AtomicU64::new(0),
        next_leg: AtomicU64::new(0),
        late_logins: Mutex::new(None),
        state: Mutex::new(State {
            rng: 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id()),
            ..State::default()
        }),
    });
    let micros = |at: Instant| {
        let wall = SystemTime::now() + at.saturating_duration_since(Instant::now())
            - Instant::now().saturating_duration_since(at);
        wall.duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    };
    let window_us = (micros(start), micros(end));
    let (cpu_before, cpu_after, load_cpu, box_cpu) = runtime.block_on(async {
        // The callers arrive over a second, in arrival order.
        for n in 0..setup.callers {
            sim.spawn_caller();
            if n % (setup.callers / 1000).max(1) == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        // The agents beyond `login_first` log in once that many are talking or in wrap-up
        // (plus a margin for the control plane's view to catch up), so the free ones never
        // outnumber `login_first`.
        let (first, all) = (setup.agents.min(setup.login_first), setup.agents);
        if first < all {
            let (sim, port) = (sim.clone(), cluster.control_port);
            tokio::spawn(async move {
                while sim.occupied() < all - first + 50.min(first / 2) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let at = sim.start.saturating_duration_since(Instant::now());
                let _ = tokio::task::spawn_blocking(move || {
                    for i in first..all {
                        login(port, i);
                    }
                })
                .await;
                eprintln!(
                    "  agents {}–{all} logged in {:.1} s before the measured window",
                    first + 1,
                    at.as_secs_f64()
                );
                *sim.late_logins.lock().expect("late logins") = Some(Instant::now());
            });
        }
        tokio::time::sleep_until(start.into()).await;
        let before = (cluster.cpu(), cpu_seconds("self"), box_busy_seconds());
        tokio::time::sleep_until(end.into()).await;
        let after = (cluster.cpu(), cpu_seconds("self"), box_busy_seconds());
        (before.0, after.0, after.1 - before.1, after.2 - before.2)
    });
    let tally = sim.state().tally.clone();
    let late_logins = (setup.agents > setup.login_first).then(|| {
        sim.late_logins.lock().expect("late logins").map(|at| {
            at.duration_since(start.min(at)).as_secs_f64()
                - start.saturating_duration_since(at).as_secs_f64()
        })
    });
    // The callers' connections close with the runtime: every node-agent sees its callers
    // hang up.
    runtime.shutdown_timeout(Duration::from_millis(200));
    cluster.check_alive();
    std::thread::sleep(Duration::from_millis(500));
    let complaints = cluster.log_complaints();
    let lock_inversions = cluster.lock_order_inversions(window_us);
    drop(cluster);

    let mut latencies: Vec<f64> = tally
        .latencies
        .iter()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let mut other_node: Vec<f64> = tally
        .latencies_other_node
        .iter()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    other_node.sort_by(f64::total_cmp);
    let mut waits: Vec<f64> = tally.waits.iter().map(Duration::as_secs_f64).collect();
    waits.sort_by(f64::total_cmp);
    // No call answered: CPU per call is undefined (NaN), CPU per second still says a lot.
    let answered = if tally.answered == 0 {
        f64::NAN
    } else {
        tally.answered as f64
    };
    Figures {
        rings_per_s: tally.rings as f64 / setup.seconds,
        answered_per_s: tally.answered as f64 / setup.seconds,
        p50: quantile(&latencies, 0.50),
        p90: quantile(&latencies, 0.90),
        p99: quantile(&latencies, 0.99),
        max: latencies.last().copied().unwrap_or(f64::NAN),
        wait_p50: quantile(&waits, 0.50),
        other_node_p50: quantile(&other_node, 0.50),
        other_node_p99: quantile(&other_node, 0.99),
        nodes_cpu: (cpu_after.0 - cpu_before.0) / answered,
        locks_cpu: (cpu_after.1 - cpu_before.1) / answered,
        control_cpu: (cpu_after.2 - cpu_before.2) / answered,
        load_cpu: load_cpu / answered,
        box_cpu: box_cpu / setup.seconds,
        cpu_per_s: (
            (cpu_after.0 - cpu_before.0) / setup.seconds,
            (cpu_after.1 - cpu_before.1) / setup.seconds,
            (cpu_after.2 - cpu_before.2) / setup.seconds,
        ),
        tally,
        complaints,
        lock_inversions,
        late_logins,
    }
}

fn row(run: &str, f: &Figures) {
    let t = &f.tally;
    println!(
        "| {run} | {:.1} | {:.1} | {} | {} ({} warm-up) | {:.1} | {} of {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.4} | {:.4} | {:.4} | {:.4} | {:.2} | {} |",
        f.rings_per_s,
        f.answered_per_s,
        t.double_rings,
        t.inversions,
        t.inversions_warmup,
        t.inversion_gap_max.as_secs_f64() * 1e3,
        f.lock_inversions.0,
        f.lock_inversions.1,
        t.rung_in_wrap_up,
        f.p50,
        f.p90,
        f.p99,
        f.max,
        f.wait_p50,
        f.nodes_cpu,
        f.locks_cpu,
        f.control_cpu,
        f.load_cpu,
        f.box_cpu,
        t.fenced + t.ended_unrung + t.not_answered_result + t.io_errors + t.unexpected,
    );
}

fn main() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let setup = Setup {
        binary: std::env::var_os("CALLFLEET_BIN")
            .map_or_else(|| workspace.join("target/release/callfleet"), PathBuf::from),
        callers: env("CALLERS", 2000).max(1),
        agents: env("AGENTS", 600).max(1),
        nodes: env("NODES", 3).max(1),
        seconds: env("SECONDS_PER_RUN", 60.0),
        warmup: env("WARMUP_SECONDS", 15.0),
        talk_ms: range_ms("TALK_MS", (2000, 6000)),
        ring_ms: range_ms("RING_MS", (100, 300)),
        wrap_up: duration("WRAP_UP", "1s"),
        poll: duration("POLL", "100ms"),
        login_first: match env("LOGIN_FIRST", 0) {
            0 => usize::MAX,
            n => n,
        },
        redis: std::env::var("LOCKS").is_ok_and(|l| l == "redis"),
        keep: env("KEEP", 0) == 1,
    };
    let repeat: usize = env("REPEAT", 3).max(1);
    assert!(
        setup.binary.is_file(),
        "{} is missing: cargo build --release",
        setup.binary.display()
    );
    println!(
        "Queue simulation (issue 16): {} callers waiting at once, {} agents in queue {QUEUE}, {} node-agents, lock service on {}; talk {}–{} ms, ring {}–{} ms, wrap_up {}; {} s per run after {} s of warm-up, {repeat} runs, {} CPUs",
        setup.callers,
        setup.agents,
        setup.nodes,
        if setup.redis { "redis" } else { "memory" },
        setup.talk_ms.0,
        setup.talk_ms.1,
        setup.ring_ms.0,
        setup.ring_ms.1,
        setup.wrap_up.0,
        setup.seconds,
        setup.warmup,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!(
        "node.queue.poll {}; defaults otherwise (candidates_fresh 1s; ring_timeout 20s here); control_plane.refresh 1s; lock service max_validity 10s, guard 500ms",
        setup.poll.0
    );
    if setup.agents > setup.login_first {
        println!(
            "agents {}–{} log in only once {} others are talking or in wrap-up (LOGIN_FIRST): before 1b6fb62 the node-agent sent every free candidate to a lock service that refuses a ClaimNext of more than 500, so with more than 500 free agents nobody was rung",
            setup.login_first + 1,
            setup.agents,
            setup.agents - setup.login_first
        );
    }
    println!("load average before: {}", load_average());
    println!();
    let mut results = Vec::new();
    let header = "| run | rings/s | answered/s | double rings | order inversions (load's arrival order) | max skip ms | inversions in the lock service's order | rung in wrap-up | free→ring p50 ms | p90 ms | p99 ms | max ms | wait at ring p50 s | node-agents CPU s/call | lock service CPU s/call | control plane CPU s/call | load CPU s/call | box CPU/s | other faults |";
    let rule = "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";
    for run_number in 1..=repeat {
        eprintln!("run {run_number}/{repeat}…");
        let figures = run(&setup);
        if run_number == 1 {
            println!("{header}");
            println!("{rule}");
        }
        row(&run_number.to_string(), &figures);
        results.push(figures);
    }
    println!();
    println!("median of {repeat} runs (lowest–highest):");
    println!();
    println!(
        "| rings/s | answered/s | double rings | order inversions (load / lock service) | free→ring p50 ms | p90 ms | p99 ms | max ms | node-agents CPU s/call | lock service CPU s/call | control plane CPU s/call | box CPU/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let cell = |pick: fn(&Figures) -> f64, digits: usize| {
        // A run without a figure (no sample) is left out, and said.
        let mut values: Vec<f64> = results.iter().map(pick).filter(|v| !v.is_nan()).collect();
        let missing = results.len() - values.len();
        if values.is_empty() {
            return "NaN".to_owned();
        }
        let (middle, low, high) = median(&mut values);
        let of = if missing > 0 {
            format!(" of {}", values.len())
        } else {
            String::new()
        };
        format!("{middle:.digits$} ({low:.digits$}–{high:.digits$}{of})")
    };
    println!(
        "| {} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        cell(|f| f.rings_per_s, 1),
        cell(|f| f.answered_per_s, 1),
        cell(|f| f.tally.double_rings as f64, 0),
        cell(|f| f.tally.inversions as f64, 0),
        cell(|f| f.lock_inversions.0 as f64, 0),
        cell(|f| f.p50, 0),
        cell(|f| f.p90, 0),
        cell(|f| f.p99, 0),
        cell(|f| f.max, 0),
        cell(|f| f.nodes_cpu, 4),
        cell(|f| f.locks_cpu, 4),
        cell(|f| f.control_cpu, 4),
        cell(|f| f.box_cpu, 2),
    );
    println!();
    println!(
        "free→ring: free = when the load ended the agent's previous call (sent Dial's reply) + node.queue.wrap_up ({}); ring = when the load received that agent's next EXEC Dial. Only agents with an earlier call in the same run count; rings inside the measured window. `rung in wrap-up` counts rings before free (not in the latencies).",
        setup.wrap_up.0
    );
    println!(
        "order inversion: a caller rung while a caller who arrived earlier (at the load, at any node) still waited; `max skip` is how much earlier that caller had arrived. The load's arrival order is not the lock service's enqueue order: a caller joins the order after its node-agent has read its environment and asked the lock service, so callers arriving a few ms apart at different nodes may be enqueued the other way round: the first callers all arrive in a 1 s burst, and until they are served (about CALLERS / rings per second) the load's order among them is only that skew. The lock service's order: a ring granted (fencing token, its clock) to a caller who joined the order (enqueued_us, its clock) after a caller rung later, from the node-agents' `ringing` lines; callers never rung are not seen. Steady state: a new caller joins behind {} others.",
        setup.callers
    );
    println!(
        "double ring: a ring for an agent whose previous ring or call had not ended, over the whole run (must be 0). other faults: fence refusals + callers ended unrung + queue sessions not ending `answered` + I/O errors + unexpected commands."
    );
    println!("goal: free→ring p99 <= 300 ms across nodes, double rings 0 (issue 16)");
    println!("load average after: {}", load_average());
    for (n, figures) in results.iter().enumerate() {
        let t = &figures.tally;
        println!();
        println!(
            "run {}: rings {} answered {} ended {} fenced {} ended-unrung {} not-answered-result {} io-errors {} unexpected {}; free→ring samples {}, of which {} rung from another node than the agent's last call (p50 {:.0} ms, p99 {:.0} ms); CPU s/s node-agents {:.2} lock service {:.2} control plane {:.2}",
            n + 1,
            t.rings,
            t.answered,
            t.ended,
            t.fenced,
            t.ended_unrung,
            t.not_answered_result,
            t.io_errors,
            t.unexpected,
            t.latencies.len(),
            t.latencies_other_node.len(),
            figures.other_node_p50,
            figures.other_node_p99,
            figures.cpu_per_s.0,
            figures.cpu_per_s.1,
            figures.cpu_per_s.2,
        );
        match figures.late_logins {
            Some(Some(at)) if at <= 0.0 => println!(
                "  agents {}–{} logged in {:.1} s before the measured window",
                setup.login_first + 1,
                setup.agents,
                -at
            ),
            Some(Some(at)) => println!(
                "  agents {}–{} logged in only {at:.1} s INTO the measured window: its figures are of fewer agents",
                setup.login_first + 1,
                setup.agents
            ),
            Some(None) => println!(
                "  agents {}–{} NEVER logged in (too few agents got busy): the run had {} agents",
                setup.login_first + 1,
                setup.agents,
                setup.login_first
            ),
            None => {}
        }
        for (message, count) in figures.complaints.iter().take(8) {
            println!("  log {count}× {message}");
        }
    }
}
