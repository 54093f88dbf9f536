//! The fleet end to end: real node-agent processes heartbeating into real MariaDB and
//! SQLite, judged by `callfleet status`.

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Stdio;
use std::time::Duration;

use support::*;

#[test]
fn three_agents_are_fresh_and_a_killed_one_goes_stale() {
    let url = fresh_mysql_url();
    let logs = tempfile::tempdir().expect("temp dir");
    let mut agents: Vec<_> = ["pbx-a", "pbx-b", "pbx-c"]
        .iter()
        .map(|id| start_agent(&url, id, "300ms", &logs.path().join(id)))
        .collect();
    wait_until("three fresh nodes", Duration::from_secs(20), || {
        let nodes = status(&url);
        nodes.len() == 3 && nodes.iter().all(|n| n["stale"] == false)
    });

    agents[1].signal("KILL");
    // Stale means older than 3 intervals (900 ms); allow for the polling.
    let took = wait_until("killed node marked stale", Duration::from_secs(5), || {
        node(&status(&url), "pbx-b").is_some_and(|n| n["stale"] == true)
    });
    assert!(took < Duration::from_secs(3), "stale after {took:?}");
    let nodes = status(&url);
    for id in ["pbx-a", "pbx-c"] {
        let n = node(&nodes, id).expect("listed");
        assert_eq!(n["stale"], false, "{id} unaffected: {n}");
        assert!(n["age_ms"].as_u64().expect("age") < 900, "{n}");
    }
    assert!(agents[0].alive() && agents[2].alive());
}

#[test]
fn agents_survive_a_store_outage_and_log_it_once_each_way() {
    let url = fresh_mysql_url();
    let (server, rest) = url
        .strip_prefix("mysql://")
        .and_then(|r| r.split_once('@'))
        .map(|(creds, rest)| (creds.to_owned(), rest.to_owned()))
        .expect("mysql url");
    let (upstream, db) = rest.split_once('/').expect("url has a database");
    let relay = Relay::start(upstream.to_owned());
    let relayed = format!("mysql://{server}@127.0.0.1:{}/{db}", relay.port);

    let logs = tempfile::tempdir().expect("temp dir");
    let log = logs.path().join("agent.log");
    let mut agent = start_agent(&relayed, "pbx-out", "300ms", &log);
    wait_until("first heartbeat", Duration::from_secs(20), || {
        node(&status(&url), "pbx-out").is_some_and(|n| n["stale"] == false)
    });

    relay.set_down(true);
    wait_until(
        "node stale during the outage",
        Duration::from_secs(10),
        || node(&status(&url), "pbx-out").is_some_and(|n| n["stale"] == true),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        agent.alive(),
        "the agent must not exit while the store is away"
    );
    let seq_during = node(&status(&url), "pbx-out").expect("listed")["seq"].clone();

    relay.set_down(false);
    wait_until("heartbeats resume", Duration::from_secs(10), || {
        node(&status(&url), "pbx-out")
            .is_some_and(|n| n["stale"] == false && n["seq"] != seq_during)
    });
    std::thread::sleep(Duration::from_millis(700));
    assert!(agent.alive());
    let text = std::fs::read_to_string(&log).expect("read log");
    assert_eq!(text.matches("store unreachable").count(), 1, "{text}");
    assert_eq!(text.matches("store back").count(), 1, "{text}");
}

/// The libfaketime preload library, loaded straight into our own binary (the `faketime`
/// wrapper would leave its child running when the test kills the wrapper).
fn libfaketime() -> std::path::PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|dir| dir.path().join("faketime/libfaketime.so.1"))
        .find(|lib| lib.exists());
    found.unwrap_or_else(|| {
        panic!("libfaketime is needed for this test; ./scripts/test installs it (Debian package faketime)")
    })
}

/// Runs `callfleet` with its clock shifted by `offset` (libfaketime syntax, e.g. `-3d`).
fn skewed(offset: &str) -> std::process::Command {
    let mut command = callfleet();
    command
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME", offset)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    command
}

#[test]
fn a_skewed_node_clock_is_judged_by_the_database_clock() {
    // The preload really moves the clock of a process it is loaded into.
    let date = std::process::Command::new("date")
        .arg("+%s")
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME", "-3d")
        .output()
        .expect("date");
    assert_success(&date);
    let faked: i64 = String::from_utf8_lossy(&date.stdout)
        .trim()
        .parse()
        .expect("epoch");
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64;
    assert!(
        (real - faked - 3 * 86_400).abs() < 60,
        "the clock is shifted by 3 days"
    );

    let url = fresh_mysql_url();
    let child = skewed("-3d")
        .arg("node-agent")
        .env("CALLFLEET_STORE__URL", &url)
        .env("CALLFLEET_NODE__ID", "pbx-skewed")
        .env("CALLFLEET_NODE__HEARTBEAT_INTERVAL", "300ms")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the agent with a skewed clock");
    let _agent = Running { child };

    // The reader's clock is off the other way: neither clock may matter.
    let read_skewed = || {
        let output = skewed("+2d")
            .args(["status", "--json"])
            .env("CALLFLEET_STORE__URL", &url)
            .output()
            .expect("status with a skewed clock");
        assert_success(&output);
        serde_json::from_slice::<Vec<serde_json::Value>>(&output.stdout).expect("json")
    };
    wait_until("skewed node listed", Duration::from_secs(20), || {
        node(&read_skewed(), "pbx-skewed").is_some()
    });
    std::thread::sleep(Duration::from_millis(600));
    let nodes = read_skewed();
    let n = node(&nodes, "pbx-skewed").expect("listed");
    assert_eq!(n["stale"], false, "{n}");
    assert!(n["age_ms"].as_u64().expect("age") < 900, "{n}");
    assert!(n["seq"].as_u64().expect("seq") >= 2, "{n}");
}

#[test]
fn drain_and_undrain_from_the_cli() {
    let url = fresh_mysql_url();
    let logs = tempfile::tempdir().expect("temp dir");
    let _agent = start_agent(&url, "pbx-d", "300ms", &logs.path().join("log"));
    wait_until("node listed", Duration::from_secs(20), || {
        node(&status(&url), "pbx-d").is_some()
    });

    let run = |args: &[&str]| {
        callfleet()
            .args(args)
            .env("CALLFLEET_STORE__URL", &url)
            .output()
            .expect("run")
    };
    let drained = run(&["node", "drain", "pbx-d"]);
    assert_success(&drained);
    // The static source reports 0 calls, so the node is drained at once.
    assert_eq!(
        String::from_utf8_lossy(&drained.stdout).trim(),
        "node pbx-d: drained"
    );
    std::thread::sleep(Duration::from_millis(700));
    let n = node(&status(&url), "pbx-d").expect("listed").clone();
    assert_eq!(n["state"], "drained", "heartbeats keep the drain: {n}");

    let active = run(&["node", "undrain", "pbx-d"]);
    assert_success(&active);
    assert_eq!(
        String::from_utf8_lossy(&active.stdout).trim(),
        "node pbx-d: active"
    );

    let ghost = run(&["node", "drain", "ghost"]);
    assert!(!ghost.status.success());
    let err = String::from_utf8_lossy(&ghost.stderr);
    assert!(err.contains("no node `ghost`"), "{err}");
}

#[test]
fn up_runs_a_single_box_cluster_that_status_sees() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sip_port = free_port();
    let api_port = free_port();
    let child = callfleet()
        .arg("up")
        .current_dir(dir.path())
        .env(
            "CALLFLEET_CONTROL_PLANE__LISTEN",
            format!("127.0.0.1:{api_port}"),
        )
        .env(
            "CALLFLEET_LOCK_SERVICE__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env(
            "CALLFLEET_BALANCER__LISTEN",
            format!("127.0.0.1:{sip_port}"),
        )
        .env("CALLFLEET_NODE__ID", "local")
        .env("CALLFLEET_NODE__HEARTBEAT_INTERVAL", "300ms")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start up");
    let mut up = Running { child };
    let status_here = || {
        let output = callfleet()
            .args(["status", "--json"])
            .current_dir(dir.path())
            .output()
            .expect("status");
        assert_success(&output);
        serde_json::from_slice::<Vec<serde_json::Value>>(&output.stdout).expect("json")
    };
    wait_until("local node fresh", Duration::from_secs(20), || {
        node(&status_here(), "local").is_some_and(|n| n["stale"] == false)
    });
    assert!(dir.path().join("callfleet-data/fleet.db").exists());

    // The balancer runs too: once it has read the fresh local node it answers OPTIONS 200.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    udp.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let local = udp.local_addr().expect("addr");
    wait_until(
        "balancer answers OPTIONS 200",
        Duration::from_secs(10),
        || {
            let probe = format!(
                "OPTIONS sip:127.0.0.1:{sip_port} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bKup{}\r\n\
From: <sip:t@{local}>;tag=1\r\nTo: <sip:127.0.0.1:{sip_port}>\r\nCall-ID: up-test\r\nCSeq: 1 OPTIONS\r\n\
Content-Length: 0\r\n\r\n",
                std::process::id()
            );
            udp.send_to(probe.as_bytes(), ("127.0.0.1", sip_port))
                .expect("send");
            let mut buffer = [0u8; 2048];
            udp.recv(&mut buffer)
                .is_ok_and(|n| buffer[..n].starts_with(b"SIP/2.0 200 "))
        },
    );

    // The control plane runs too, with an admin token made on first start, kept for the
    // owner only.
    let token_file = dir.path().join("callfleet-data/admin-token");
    let token = std::fs::read_to_string(&token_file).expect("admin token file");
    let token = token.trim();
    assert!(token.len() >= 32, "{token}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "the token file is readable by others: {mode:o}"
    );
    let (code, body) = http(
        api_port,
        "PUT",
        "/api/v1/queues/sales",
        None,
        r#"{"name":"Sales"}"#,
    );
    assert_eq!(code, 401, "{body}");
    let (code, body) = http(
        api_port,
        "PUT",
        "/api/v1/queues/sales",
        Some(token),
        r#"{"name":"Sales"}"#,
    );
    assert_eq!(code, 200, "{body}");
    let (code, body) = http(api_port, "GET", "/api/v1/queues/sales/status", None, "");
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).expect("json status");
    assert_eq!(status["served"], false, "{body}");
    assert_eq!(status["queue"], "sales", "{body}");

    // Every component runs in this one process, so the control plane's /metrics shows
    // them all: each metric the Grafana dashboard queries must be among them.
    // The balancer copies its counters into the recorder every second, so a node's routed
    // calls show up to a second after the balancer first sees the node.
    let queried = dashboard_metrics();
    let missing = || {
        let (code, scraped) = http(api_port, "GET", "/metrics", None, "");
        assert_eq!(code, 200, "{scraped}");
        let exported: std::collections::BTreeSet<&str> = scraped
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.split(['{', ' ']).next())
            .filter(|name| !name.is_empty())
            .collect();
        queried
            .iter()
            .filter(|name| !exported.contains(name.as_str()))
            .cloned()
            .collect::<Vec<String>>()
    };
    // A gauge per configured shed tier, and `up` configures none (the node-agent's own
    // metrics test configures two).
    let only_with_tiers = vec!["callfleet_node_agent_shed".to_owned()];
    let waited = wait_until(
        "every metric the dashboard queries exported",
        Duration::from_secs(5),
        || missing() == only_with_tiers,
    );
    assert!(waited < Duration::from_secs(3), "{waited:?}");

    up.signal("TERM");
    wait_until("up exits on SIGTERM", Duration::from_secs(10), || {
        !up.alive()
    });
    let status = up.child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    let mut printed = String::new();
    up.child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut printed)
        .expect("read");
    assert!(printed.contains("node-agent  node local"), "{printed}");
    assert!(
        printed.contains(&format!("balancer    SIP on 127.0.0.1:{sip_port}")),
        "{printed}"
    );
    assert!(
        printed.contains("locks       gRPC and HTTP on 127.0.0.1:"),
        "{printed}"
    );
    assert!(
        printed.contains(&format!("REST http://127.0.0.1:{api_port}/api/v1")),
        "{printed}"
    );
    assert!(
        printed.contains(&format!(
            "admin token (created, kept in callfleet-data/admin-token): {token}"
        )),
        "{printed}"
    );
}

/// One HTTP/1.1 request on a fresh connection: (status, body).
/// The metric names the queries of `deploy/grafana/callfleet.json` use (every panel's
/// `targets[].expr`), histogram series (`_bucket`, `_sum`, `_count`) as queried.
fn dashboard_metrics() -> std::collections::BTreeSet<String> {
    let path = support::checkout().join("deploy/grafana/callfleet.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut names = std::collections::BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        for target in targets {
            let expr = target["expr"].as_str().expect("every target has an expr");
            let mut rest = expr;
            while let Some(at) = rest.find("callfleet_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                names.insert(name);
            }
        }
    }
    let charts: Vec<&serde_json::Value> = panels.iter().filter(|p| p["type"] != "row").collect();
    let empty: Vec<&serde_json::Value> = charts
        .iter()
        .filter(|p| p["targets"].as_array().is_none_or(Vec::is_empty))
        .map(|p| &p["title"])
        .collect();
    assert_eq!(
        empty,
        Vec::<&serde_json::Value>::new(),
        "panels that query nothing"
    );
    names
}

fn http(port: u16, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}\
Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let code = response
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    (code, body)
}

/// The `<<<` bytes of the capture that answer the action with `action_id`.
fn captured_reply(action_id: &str) -> String {
    let path = support::checkout().join("fixtures/asterisk/ami-login-and-coreshowchannels.jsonl");
    let capture = std::fs::read_to_string(path).expect("the AMI capture is in fixtures/asterisk");
    capture
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("jsonl"))
        .filter(|entry| entry["dir"] == "<<<")
        .map(|entry| entry["data"].as_str().expect("data").to_owned())
        .find(|data| data.contains(&format!("\r\nActionID: {action_id}\r\n")))
        .unwrap_or_else(|| panic!("no reply to {action_id} in the capture"))
}

/// A manager interface answering with Asterisk 22's captured bytes: the greeting, the
/// accepted login, and `core show channels count` reporting 6 active calls.
fn replaying_ami() -> u16 {
    use std::io::{BufRead, BufReader};
    let login = captured_reply("1");
    let count = captured_reply("cmd-1");
    assert!(count.contains("Output: 6 active calls"), "{count}");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (login, count) = (login.clone(), count.clone());
            std::thread::spawn(move || {
                let _ = stream.write_all(b"Asterisk Call Manager/11.0.0\r\n");
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let (mut action, mut id, mut line) = (String::new(), String::new(), String::new());
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if let Some(value) = line.strip_prefix("Action: ") {
                        action = value.trim().to_owned();
                    } else if let Some(value) = line.strip_prefix("ActionID: ") {
                        id = value.trim().to_owned();
                    } else if line == "\r\n" {
                        let (template, captured_id) = match action.as_str() {
                            "Login" => (&login, "1"),
                            _ => (&count, "cmd-1"),
                        };
                        let reply = template.replace(
                            &format!("ActionID: {captured_id}\r\n"),
                            &format!("ActionID: {id}\r\n"),
                        );
                        if stream.write_all(reply.as_bytes()).is_err() {
                            break;
                        }
                    }
                    line.clear();
                }
            });
        }
    });
    port
}

#[test]
fn the_call_count_comes_from_asterisk_over_ami() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/fleet.db", dir.path().display());
    let port = replaying_ami();
    let child = callfleet()
        .arg("node-agent")
        .env("CALLFLEET_STORE__URL", &url)
        .env("CALLFLEET_NODE__ID", "pbx-ami")
        .env("CALLFLEET_NODE__HEARTBEAT_INTERVAL", "300ms")
        .env("CALLFLEET_NODE__CALLS__SOURCE", "ami")
        .env(
            "CALLFLEET_NODE__CALLS__ADDRESS",
            format!("127.0.0.1:{port}"),
        )
        .env("CALLFLEET_NODE__CALLS__USERNAME", "refadmin")
        .env("CALLFLEET_NODE__CALLS__SECRET", "refsecret")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start node-agent");
    let _agent = Running { child };
    wait_until("six calls reported", Duration::from_secs(20), || {
        node(&status(&url), "pbx-ami")
            .is_some_and(|n| n["calls"] == 6 && n["pbx_up"] == true && n["stale"] == false)
    });
}

/// A PBX that accepts the manager connection and then says nothing (hung, or a firewall
/// that swallows packets): every AMI exchange waits out its 2 s timeout. Heartbeats must go
/// on at their interval regardless, saying the PBX is down, or the node blinks out of
/// routing (TTL 6 s) while its host is fine.
#[test]
fn heartbeats_keep_their_interval_while_the_pbx_says_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/fleet.db", dir.path().display());
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("address").port();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let held = held.clone();
        std::thread::spawn(move || {
            for connection in silent.incoming().flatten() {
                held.lock().expect("held").push(connection);
            }
        });
    }
    let child = callfleet()
        .arg("node-agent")
        .env("CALLFLEET_STORE__URL", &url)
        .env("CALLFLEET_NODE__ID", "pbx-silent")
        .env("CALLFLEET_NODE__HEARTBEAT_INTERVAL", "300ms")
        .env("CALLFLEET_NODE__CALLS__SOURCE", "ami")
        .env(
            "CALLFLEET_NODE__CALLS__ADDRESS",
            format!("127.0.0.1:{port}"),
        )
        .env("CALLFLEET_NODE__CALLS__USERNAME", "callfleet")
        .env("CALLFLEET_NODE__CALLS__SECRET", "secret")
        .env("CALLFLEET_NODE__CALLS__TIMEOUT", "2s")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start node-agent");
    let _agent = Running { child };
    wait_until("the node heartbeats", Duration::from_secs(20), || {
        node(&status(&url), "pbx-silent").is_some()
    });
    // Six seconds of heartbeats: their age never reaches the AMI timeout.
    let mut oldest = 0;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        let nodes = status(&url);
        let seen = node(&nodes, "pbx-silent").expect("listed");
        assert_eq!(seen["pbx_up"], false, "{seen}");
        oldest = oldest.max(seen["age_ms"].as_u64().expect("an age"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        oldest < 1_000,
        "a heartbeat waited for the PBX: {oldest} ms old"
    );
}

#[test]
fn status_beside_a_busy_single_box_agent_never_finds_the_store_locked() {
    // `callfleet up` creates, switches to WAL and migrates a new SQLite file and then writes
    // every interval; a `callfleet status` typed meanwhile must never fail with "database is
    // locked".
    for _ in 0..3 {
        let dir = tempfile::tempdir().expect("temp dir");
        let _agent = Running {
            child: callfleet()
                .arg("node-agent")
                .current_dir(dir.path())
                .env("CALLFLEET_NODE__ID", "busy")
                .env("CALLFLEET_NODE__HEARTBEAT_INTERVAL", "100ms")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start node-agent"),
        };
        for _ in 0..5 {
            statuses_at_once(dir.path(), 4);
        }
    }
}

/// Runs `count` `callfleet status` commands in `dir` at the same moment; all must succeed.
fn statuses_at_once(dir: &std::path::Path, count: usize) {
    let readers: Vec<_> = (0..count)
        .map(|_| {
            callfleet()
                .args(["status", "--json"])
                .current_dir(dir)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start status")
        })
        .collect();
    for reader in readers {
        assert_success(&reader.wait_with_output().expect("status ends"));
    }
}

#[test]
fn commands_started_together_on_a_new_single_box_store_all_succeed() {
    // Several commands opening a store that does not exist yet all create, switch to WAL
    // and migrate the same file at once; each must succeed.
    let dir = tempfile::tempdir().expect("temp dir");
    statuses_at_once(dir.path(), 6);
}
