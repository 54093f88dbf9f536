//! The carrier's side of a cluster: Kamailio 5.6 as the carrier's SBC
//! (`tests/kamailio/carrier.cfg`), with the core nodes' balancers as its failover list, and
//! `callfleet balancer` itself, started and stopped for its counters. Used by
//! `tests/carrier.rs` (plain calls) and `tests/asterisk.rs` (queued calls behind a carrier).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{
    Running, free_port, kamailio, log_file, read, sip_options_status, stop_process_group, wait_exit,
};

/// Kamailio running `tests/kamailio/carrier.cfg` on a free loopback port, the balancers
/// as its failover list.
pub struct Carrier {
    pub port: u16,
    log: PathBuf,
    child: Child,
}

impl Carrier {
    /// Starts the SBC in `dir` with `balancers` (their ports) as its failover list, first
    /// tried first, and waits until it answers. Its port can be taken between the check and
    /// Kamailio's bind by a test in another process: then it starts on another (3 tries).
    /// A call that rings may ring 30 s before the SBC gives up on it (408).
    pub fn start(dir: &Path, balancers: &[u16]) -> Self {
        Self::start_with(dir, balancers, Duration::from_secs(30))
    }

    /// [`Carrier::start`] with calls that may ring for `ring_limit` (`fr_inv_timer`): a
    /// queued caller hears ringing until an agent answers.
    pub fn start_with(dir: &Path, balancers: &[u16], ring_limit: Duration) -> Self {
        std::fs::create_dir_all(dir.join("run")).expect("Kamailio's folders");
        let list = dir.join("dispatcher.list");
        // setid destination flags priority: the higher priority is tried first.
        let mut text = String::from("# setid destination flags priority\n");
        for (i, port) in balancers.iter().enumerate() {
            text.push_str(&format!(
                "1 sip:127.0.0.1:{port} 0 {}\n",
                10 * (balancers.len() - i)
            ));
        }
        std::fs::write(&list, text).expect("write the dispatcher list");
        let log = dir.join("kamailio.log");
        for _ in 0..3 {
            let port = free_port();
            let config = super::checkout().join("tests/kamailio/carrier.cfg");
            let child = kamailio()
                .arg("-f")
                .arg(config)
                .args(["-l", &format!("udp:127.0.0.1:{port}")])
                .arg("-A")
                .arg(format!("DISPATCHER_LIST=\"{}\"", list.display()))
                .arg("-A")
                .arg(format!("RING_LIMIT_MS={}", ring_limit.as_millis()))
                .arg("-Y")
                .arg(dir.join("run"))
                .arg("-P")
                .arg(dir.join("kamailio.pid"))
                .arg("-w")
                .arg(dir)
                .args(["-DD", "-E", "-m", "32", "-M", "8"])
                // Its own process group: Kamailio forks workers, and the group is what is
                // stopped if the main process does not take them down.
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file(&log))
                .spawn()
                .expect("start kamailio");
            let mut carrier = Self {
                port,
                log: log.clone(),
                child,
            };
            let start = Instant::now();
            // Anything but an INVITE gets 405: an answer means it listens.
            while sip_options_status(port) != Some(405) {
                if carrier.child.try_wait().expect("try_wait").is_some() {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(15),
                    "Kamailio does not answer within 15 s:\n{}",
                    carrier.log_text()
                );
            }
            if carrier.child.try_wait().expect("try_wait").is_none() {
                return carrier;
            }
            let text = carrier.log_text();
            assert!(
                text.contains("Address already in use"),
                "Kamailio exited at start:\n{text}"
            );
            eprintln!("the carrier's port {port} is taken; starting it on another");
        }
        panic!("Kamailio could not get a free port 3 times");
    }

    /// Kamailio's log (stderr).
    pub fn log_text(&self) -> String {
        read(&self.log)
    }

    /// The `CARRIER-<kind>` lines the configuration logs, as their `key=value` fields.
    pub fn events(&self, kind: &str) -> Vec<Event> {
        let marker = format!("CARRIER-{kind} ");
        self.log_text()
            .lines()
            .filter_map(|line| line.split_once(&marker).map(|(_, rest)| Event::parse(rest)))
            .collect()
    }
}

impl Drop for Carrier {
    fn drop(&mut self) {
        stop_process_group(&mut self.child);
    }
}

/// One `CARRIER-…` log line's fields.
#[derive(Debug, Clone)]
pub struct Event {
    fields: Vec<(String, String)>,
}

impl Event {
    /// The `key=value` fields of `text`.
    pub fn parse(text: &str) -> Self {
        let fields = text
            .split_whitespace()
            .filter_map(|pair| pair.split_once('='))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect();
        Self { fields }
    }

    /// The value of `key`, empty when the line has none.
    pub fn get(&self, key: &str) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// How many events have each value of `key`, sorted by value.
pub fn tally(events: &[Event], key: &str) -> Vec<(String, usize)> {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for event in events {
        *counts.entry(event.get(key).to_owned()).or_default() += 1;
    }
    counts.into_iter().collect()
}

// ---------------------------------------------------------------------------------------
// The balancer
// ---------------------------------------------------------------------------------------

/// Runs `command` (a `callfleet balancer` logging to `log`) and waits for `balancer ready`;
/// `Err` when its port is taken (the caller starts it again on another). Any other exit
/// before it is ready fails the test.
pub fn start_balancer(mut command: Command, log: &Path, node: &str) -> Result<Running, String> {
    let mut balancer = Running {
        child: command
            .stdout(Stdio::null())
            .stderr(log_file(log))
            .spawn()
            .expect("start callfleet balancer"),
    };
    let start = Instant::now();
    while !read(log).contains("balancer ready") {
        if !balancer.alive() {
            let text = read(log);
            if text.contains("cannot listen for SIP") {
                return Err(format!("the balancer's port of {node} is taken"));
            }
            panic!("the balancer of {node} exited before `balancer ready`:\n{text}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no `balancer ready` from {node} within 20 s:\n{}",
            read(log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(balancer)
}

/// Stops `balancer` (logging JSON to `log`) with SIGTERM and returns the counters of its
/// `balancer stopped` line.
pub fn stop_balancer(mut balancer: Running, log: &Path, node: &str) -> BalancerCounters {
    balancer.signal("TERM");
    let exit = wait_exit(
        "the balancer after SIGTERM",
        &mut balancer,
        Duration::from_secs(10),
    );
    let text = read(log);
    assert!(exit.success(), "balancer of {node} exit {exit:?}:\n{text}");
    BalancerCounters::from_log(node, &text)
}

/// The fields of the `balancer stopped` line of `text`, a balancer's JSON log, with its
/// counters; `None` while it has none.
pub fn balancer_stopped(text: &str) -> Option<Value> {
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        // tracing-subscriber's JSON puts fields under `fields`, or at the top level when
        // events are flattened.
        .map(|line| match line.get("fields") {
            Some(fields) if fields.is_object() => fields.clone(),
            _ => line,
        })
        .find(|fields| fields["message"] == "balancer stopped")
}

/// The fields of a balancer's final `balancer stopped` JSON line.
pub struct BalancerCounters {
    node: String,
    fields: Value,
}

impl BalancerCounters {
    /// The counters of the `balancer stopped` line of `text`, a balancer's JSON log.
    pub fn from_log(node: &str, text: &str) -> Self {
        let fields = balancer_stopped(text)
            .unwrap_or_else(|| panic!("no `balancer stopped` line from {node}:\n{text}"));
        Self {
            node: node.to_owned(),
            fields,
        }
    }

    /// Asserts each `(counter, value)` exactly.
    pub fn assert(&self, expected: &[(&str, u64)]) {
        for (name, value) in expected {
            assert_eq!(
                self.fields[name].as_u64(),
                Some(*value),
                "balancer of {}: counter `{name}` in {}",
                self.node,
                self.fields
            );
        }
    }

    /// Calls this balancer sent to each node (`node-a=3,node-b=0`).
    pub fn routed(&self) -> &str {
        self.fields["routed"].as_str().unwrap_or_default()
    }
}
