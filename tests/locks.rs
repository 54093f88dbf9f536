//! `callfleet lock-service` as a process: a dialplan-style HTTP claim against it.

mod support;

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;

use support::*;

#[test]
fn the_lock_service_binary_grants_a_lease_over_http() {
    let port = free_port();
    let log = tempfile::NamedTempFile::new().expect("log file");
    let child = callfleet()
        .arg("lock-service")
        .env(
            "CALLFLEET_LOCK_SERVICE__LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .stdout(Stdio::null())
        .stderr(log.reopen().expect("reopen"))
        .spawn()
        .expect("start lock-service");
    let mut service = Running { child };
    wait_until("lock service ready", Duration::from_secs(20), || {
        std::fs::read_to_string(log.path()).is_ok_and(|text| text.contains("lock service ready"))
    });
    let form = "resource=agent:7&holder=pbx-1/c1&attempt=c1&ttl=5";
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        stream,
        "POST /lock/acquire HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
Content-Length: {}\r\nConnection: close\r\n\r\n{form}",
        form.len()
    )
    .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    assert!(response.contains("\r\n\r\nOK "), "{response}");
    service.signal("TERM");
    wait_until("exit on SIGTERM", Duration::from_secs(10), || {
        !service.alive()
    });
}
