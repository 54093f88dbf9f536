//! `callfleet lock-service` as a process: a dialplan-style HTTP claim against it.

mod support;

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;

use support::*;

/// POSTs `form` to `path` the way a dialplan's `CURL()` does; returns the whole response.
fn post(port: u16, path: &str, form: &str) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
Content-Length: {}\r\nConnection: close\r\n\r\n{form}",
        form.len()
    )
    .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

/// The memory backend forgets every lease when the process restarts while the PBX may
/// still ring those agents: a fresh process refuses claims for the quarantine first.
#[test]
fn the_lock_service_binary_waits_out_its_startup_quarantine_then_grants_a_lease_over_http() {
    let port = free_port();
    let log = tempfile::NamedTempFile::new().expect("log file");
    let child = callfleet()
        .arg("lock-service")
        .env(
            "CALLFLEET_LOCK_SERVICE__LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .env("CALLFLEET_LOCK_SERVICE__VALIDITY", "1s")
        .env("CALLFLEET_LOCK_SERVICE__MAX_VALIDITY", "1s")
        .env("CALLFLEET_LOCK_SERVICE__GUARD", "200ms")
        .env("CALLFLEET_LOCK_SERVICE__QUARANTINE", "1500ms")
        .stdout(Stdio::null())
        .stderr(log.reopen().expect("reopen"))
        .spawn()
        .expect("start lock-service");
    let mut service = Running { child };
    wait_until("lock service ready", Duration::from_secs(20), || {
        std::fs::read_to_string(log.path()).is_ok_and(|text| text.contains("lock service ready"))
    });
    let started = std::time::Instant::now();
    let form = "resource=agent:7&holder=pbx-1/c1&attempt=c1&ttl=1";
    let refused = post(port, "/lock/acquire", form);
    assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
    assert!(
        refused.contains("\r\n\r\nERR quarantined: the lock service restarted"),
        "{refused}"
    );
    std::thread::sleep(Duration::from_millis(1600).saturating_sub(started.elapsed()));
    let response = post(port, "/lock/acquire", form);
    assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    assert!(response.contains("\r\n\r\nOK "), "{response}");
    let too_long = post(
        port,
        "/lock/acquire",
        "resource=agent:8&holder=pbx-1/c2&attempt=c2&ttl=30",
    );
    assert!(
        too_long.contains("\r\n\r\nERR `validity` must be between 100 ms and 1000 ms (lock_service.max_validity)\n"),
        "{too_long}"
    );
    service.signal("TERM");
    wait_until("exit on SIGTERM", Duration::from_secs(10), || {
        !service.alive()
    });
}
