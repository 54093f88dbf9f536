//! The autoscaler end to end (issue 12): `callfleet control-plane` with the autoscaler on
//! and the `command` executor, beside `callfleet lock-service`, over MariaDB. The start
//! program launches a real `callfleet node-agent` as an extra node; the terminate program
//! stops it. A supervisor asks for an extra node over the REST API, then lets it go:
//! the node is drained, and terminated only once it reports `drained`. An extra node that
//! keeps calls is held for `max_drain`, then terminated with an error naming its calls.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const ADMIN: &str = "admin-autoscaler-secret-0123456789ab";

/// The executor's programs: `start` launches `extra-N` as a detached node-agent with
/// `CALLS` calls (a static count) and records `launch COUNT TOKEN`; `terminate` stops
/// the node's agent and records `terminate NODE TOKEN`.
fn programs(dir: &Path, store_url: &str) {
    let binary = env!("CARGO_BIN_EXE_callfleet");
    let dir_text = dir.display();
    let start = format!(
        r#"#!/bin/sh
set -e
n=$(cat '{dir_text}/next' 2>/dev/null || echo 1)
echo $((n + 1)) > '{dir_text}/next'
calls=$(cat '{dir_text}/calls')
CALLFLEET_STORE__URL='{store_url}' CALLFLEET_NODE__ID="extra-$n" CALLFLEET_NODE__ROLE=extra \
CALLFLEET_NODE__HEARTBEAT_INTERVAL=300ms CALLFLEET_NODE__CALLS__COUNT="$calls" \
setsid '{binary}' node-agent > '{dir_text}/extra-'"$n"'.log' 2>&1 < /dev/null &
echo $! > '{dir_text}/extra-'"$n"'.pid'
echo "launch $CALLFLEET_SCALE_COUNT $CALLFLEET_SCALE_TOKEN" >> '{dir_text}/record'
"#
    );
    let terminate = format!(
        r#"#!/bin/sh
set -e
kill "$(cat '{dir_text}/'"$CALLFLEET_NODE_ID"'.pid')"
echo "terminate $CALLFLEET_NODE_ID $CALLFLEET_SCALE_TOKEN" >> '{dir_text}/record'
"#
    );
    for (name, text) in [("start", start), ("terminate", terminate)] {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write program");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
}

fn record(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("record"))
        .unwrap_or_default()
        .lines()
        .map(|line| {
            // The token's value is the lock service's; its presence is what matters here.
            let mut words: Vec<&str> = line.split(' ').collect();
            assert!(
                words
                    .last()
                    .is_some_and(|t| t.parse::<u64>().is_ok_and(|t| t > 0)),
                "{line}"
            );
            words.pop();
            words.join(" ")
        })
        .collect()
}

fn pid_alive(dir: &Path, node: &str) -> bool {
    let pid = std::fs::read_to_string(dir.join(format!("{node}.pid"))).expect("pid file");
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()));
    // A zombie has ended; its parent (the start program's shell) is gone.
    stat.is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

fn steer(port: u16, body: &str) {
    let answer = http(port, "PUT", "/api/v1/autoscaler", ADMIN, body);
    assert_eq!(answer.as_ref().map(|a| a.0), Some(200), "{answer:?}");
}

fn autoscaler_actions(port: u16) -> Vec<(String, Value)> {
    let (_, body) = http(port, "GET", "/api/v1/autoscaler", ADMIN, "").expect("status");
    let view: Value = serde_json::from_str(&body).expect("json");
    let mut actions: Vec<(String, Value)> = view["recent"]
        .as_array()
        .expect("recent")
        .iter()
        .filter(|r| r["actor"] == "autoscaler")
        .map(|r| {
            (
                r["action"].as_str().expect("action").to_owned(),
                r["detail"]["decision"].clone(),
            )
        })
        .collect();
    actions.reverse();
    actions
}

fn stack(dir: &Path, url: &str, max_drain: &str) -> (Running, Running, Running, u16) {
    programs(dir, url);
    let lock_port = free_port();
    let locks = lock_service(lock_port, &dir.join("locks.log"));
    let port = free_port();
    let executor = format!(
        r#"{{kind="command",start=["{0}/start"],terminate=["{0}/terminate"],timeout="20s"}}"#,
        dir.display()
    );
    let control = callfleet()
        .arg("control-plane")
        .env("CALLFLEET_STORE__URL", url)
        .env(
            "CALLFLEET_CONTROL_PLANE__LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .env(
            "CALLFLEET_CONTROL_PLANE__LOCK_SERVICE",
            format!("http://127.0.0.1:{lock_port}"),
        )
        .env(
            "CALLFLEET_CONTROL_PLANE__TOKENS",
            format!("[{{name=\"ops\",token=\"{ADMIN}\",role=\"admin\"}}]"),
        )
        .env("CALLFLEET_CONTROL_PLANE__AUTOSCALER__ENABLED", "true")
        .env("CALLFLEET_CONTROL_PLANE__AUTOSCALER__EXECUTOR", executor)
        .env("CALLFLEET_CONTROL_PLANE__AUTOSCALER__TICK", "200ms")
        .env("CALLFLEET_CONTROL_PLANE__AUTOSCALER__LEASE", "3s")
        .env("CALLFLEET_CONTROL_PLANE__AUTOSCALER__SCALE_IN_FOR", "1s")
        .env("CALLFLEET_CONTROL_PLANE__AUTOSCALER__COOLDOWN_IN", "1s")
        .env("CALLFLEET_CONTROL_PLANE__AUTOSCALER__COOLDOWN_OUT", "1s")
        .env("CALLFLEET_CONTROL_PLANE__AUTOSCALER__MAX_DRAIN", max_drain)
        .stdout(Stdio::null())
        .stderr(log_file(&dir.join("control.log")))
        .spawn()
        .expect("start the control plane");
    let control = Running { child: control };
    wait_until("the control plane answers", Duration::from_secs(20), || {
        http(port, "GET", "/api/v1/autoscaler", ADMIN, "").is_some_and(|(s, _)| s == 200)
    });
    let core = start_agent(url, "core-1", "300ms", &dir.join("core-1.log"));
    wait_until("core-1 reports", Duration::from_secs(20), || {
        node(&status(url), "core-1").is_some()
    });
    (locks, control, core, port)
}

#[test]
fn an_extra_node_is_started_then_drained_and_ended_without_a_call_cut() {
    let url = fresh_mysql_url();
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("calls"), "0").expect("calls");
    let (_locks, _control, _core, port) = stack(dir.path(), &url, "15m");

    steer(port, r#"{"min_extra":1}"#);
    wait_until("extra-1 reports", Duration::from_secs(20), || {
        node(&status(&url), "extra-1")
            .is_some_and(|n| n["state"] == "active" && n["role"] == "extra")
    });
    assert_eq!(record(dir.path()), ["launch 1"]);

    // Let it go: with no calls the fleet needs no extra node; it is drained, then ended.
    steer(port, r#"{"min_extra":0}"#);
    let log = || read(&dir.path().join("control.log"));
    wait_until("extra-1 terminated", Duration::from_secs(30), || {
        record(dir.path()).len() == 2
    });
    assert_eq!(
        record(dir.path()),
        ["launch 1", "terminate extra-1"],
        "{}",
        log()
    );
    wait_until("extra-1's agent stopped", Duration::from_secs(10), || {
        !pid_alive(dir.path(), "extra-1")
    });
    // Ended, it is gone from the fleet (its history stays).
    assert!(node(&status(&url), "extra-1").is_none());
    let actions = autoscaler_actions(port);
    let names: Vec<&str> = actions.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(
        names,
        ["scale.launch", "scale.drain", "scale.terminate"],
        "{}",
        log()
    );
    assert_eq!(
        actions[2].1,
        serde_json::json!({ "node": "extra-1", "calls": 0, "end": "drained" })
    );
}

#[test]
fn an_extra_node_that_keeps_its_calls_is_held_for_max_drain_then_ended_loudly() {
    let url = fresh_mysql_url();
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("calls"), "3").expect("calls");
    let (_locks, _control, _core, port) = stack(dir.path(), &url, "4s");

    steer(port, r#"{"min_extra":1}"#);
    wait_until("extra-1 reports", Duration::from_secs(20), || {
        node(&status(&url), "extra-1").is_some_and(|n| n["state"] == "active")
    });
    steer(port, r#"{"min_extra":0}"#);
    wait_until("extra-1 draining", Duration::from_secs(20), || {
        node(&status(&url), "extra-1").is_some_and(|n| n["state"] == "draining")
    });
    let draining = Instant::now();
    // While it carries calls it stays, however long the fleet has been quiet.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(record(dir.path()), ["launch 1"]);
    assert!(pid_alive(dir.path(), "extra-1"));
    wait_until(
        "extra-1 terminated at max_drain",
        Duration::from_secs(10),
        || record(dir.path()).len() == 2,
    );
    let held = draining.elapsed();
    assert!(held >= Duration::from_secs(3), "ended after {held:?}");
    assert_eq!(record(dir.path()), ["launch 1", "terminate extra-1"]);
    let actions = autoscaler_actions(port);
    assert_eq!(
        actions.last().map(|(a, _)| a.as_str()),
        Some("scale.terminate_forced")
    );
    assert_eq!(
        actions.last().map(|(_, d)| d.clone()),
        Some(serde_json::json!({ "node": "extra-1", "calls": 3, "end": "drain_timeout" }))
    );
    let log = read(&dir.path().join("control.log"));
    assert!(
        log.contains("terminating an extra node that did not drain") && log.contains("ERROR"),
        "{}",
        tail(&log, 20)
    );
}

#[test]
fn an_autoscaler_it_cannot_use_stops_the_control_plane_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/fleet.db", dir.path().display());
    let output = callfleet()
        .arg("control-plane")
        .env("CALLFLEET_STORE__URL", &url)
        .env(
            "CALLFLEET_CONTROL_PLANE__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("CALLFLEET_CONTROL_PLANE__AUTOSCALER__ENABLED", "true")
        .env(
            "CALLFLEET_CONTROL_PLANE__AUTOSCALER__EXECUTOR",
            r#"{kind="aws",group="callfleet-extra"}"#,
        )
        // No region from anywhere, and no instance metadata service to ask (nothing may
        // leave loopback).
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env_remove("AWS_PROFILE")
        .env("AWS_CONFIG_FILE", dir.path().join("no-aws-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.path().join("no-aws-credentials"),
        )
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run the control plane");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("no region for Auto Scaling group `callfleet-extra`"),
        "{stderr}"
    );
}
