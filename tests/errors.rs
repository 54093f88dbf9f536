//! Mistakes an operator can make: each is one line on stderr that says what to fix, and a
//! non-zero exit where it is fatal.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Output;

use support::*;

fn one_line_error(output: &Output) -> String {
    assert!(!output.status.success(), "must fail: {output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    assert_eq!(stderr.lines().count(), 1, "one line, got:\n{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[test]
fn unknown_config_key_names_the_key_and_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("callfleet.toml");
    std::fs::write(&file, "[node]\nheartbeat_intervall = \"1s\"\n").expect("write");
    let output = callfleet()
        .arg("--config")
        .arg(&file)
        .arg("status")
        .output()
        .expect("run");
    let err = one_line_error(&output);
    assert_eq!(output.status.code(), Some(64), "EX_USAGE");
    assert!(err.contains("heartbeat_intervall"), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
}

/// Figment would show `../<dir>/callfleet.toml` from a sibling working folder; the user
/// wrote an absolute path and must see it.
#[test]
fn a_config_error_names_the_file_as_given_from_any_working_folder() {
    let dir = tempfile::tempdir().expect("temp dir");
    let elsewhere = tempfile::tempdir().expect("another temp dir");
    let file = dir.path().join("callfleet.toml");
    std::fs::write(&file, "[node]\nheartbeat_intervall = \"1s\"\n").expect("write");
    for (working, given) in [
        (elsewhere.path(), file.clone()),
        (dir.path(), std::path::PathBuf::from("callfleet.toml")),
        (
            dir.path().parent().expect("a parent"),
            std::path::Path::new(dir.path().file_name().expect("a name")).join("callfleet.toml"),
        ),
    ] {
        let output = callfleet()
            .current_dir(working)
            .arg("--config")
            .arg(&given)
            .arg("status")
            .output()
            .expect("run");
        let err = one_line_error(&output);
        assert_eq!(output.status.code(), Some(64), "EX_USAGE");
        assert!(
            err.contains(&format!(" in {} TOML file", given.display())),
            "{}: {err}",
            given.display()
        );
    }
}

#[test]
fn malformed_store_url_says_what_a_good_one_looks_like() {
    let output = callfleet()
        .arg("status")
        .env("CALLFLEET_STORE__URL", "mysql://fleet:hunter2@/")
        .output()
        .expect("run");
    let err = one_line_error(&output);
    assert!(
        err.contains("is not valid") && err.contains("mysql://USER:PASSWORD@HOST"),
        "{err}"
    );
    assert!(
        !err.contains("hunter2"),
        "the password is never printed: {err}"
    );

    let output = callfleet()
        .arg("status")
        .env("CALLFLEET_STORE__URL", "postgres://db/fleet")
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(64));
    assert!(one_line_error(&output).contains("store.url"));
}

#[test]
fn unreachable_store_at_start_is_fatal_and_clear() {
    let url = format!(
        "mysql://fleet:hunter2@127.0.0.1:{}/callfleet",
        closed_port()
    );
    let output = callfleet()
        .arg("node-agent")
        .env("CALLFLEET_STORE__URL", &url)
        .env("CALLFLEET_STORE__CONNECT_TIMEOUT", "1s")
        .output()
        .expect("run");
    let err = one_line_error(&output);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        err.contains("cannot reach the store at mysql://fleet:***@127.0.0.1"),
        "{err}"
    );
    assert!(
        err.contains("Connection refused"),
        "the real cause is shown: {err}"
    );
    assert!(err.contains("check that the server runs"), "{err}");
}

/// A manager interface that greets like Asterisk 22 and refuses every login with the
/// captured reply, echoing the client's ActionID.
fn refusing_ami() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.write_all(b"Asterisk Call Manager/11.0.0\r\n");
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut action_id = String::new();
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if let Some(id) = line.strip_prefix("ActionID: ") {
                    action_id = id.trim().to_owned();
                }
                if line == "\r\n" {
                    let reply = format!(
                        "Response: Error\r\nActionID: {action_id}\r\nMessage: Authentication failed\r\n\r\n"
                    );
                    let _ = stream.write_all(reply.as_bytes());
                    break;
                }
                line.clear();
            }
        }
    });
    port
}

#[test]
fn wrong_ami_secret_stops_the_agent_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = refusing_ami();
    let output = callfleet()
        .arg("node-agent")
        .env("RUST_LOG", "warn")
        .env(
            "CALLFLEET_STORE__URL",
            format!("sqlite://{}/fleet.db", dir.path().display()),
        )
        .env("CALLFLEET_NODE__CALLS__SOURCE", "ami")
        .env(
            "CALLFLEET_NODE__CALLS__ADDRESS",
            format!("127.0.0.1:{port}"),
        )
        .env("CALLFLEET_NODE__CALLS__USERNAME", "callfleet")
        .env("CALLFLEET_NODE__CALLS__SECRET", "wrong-secret")
        .output()
        .expect("run");
    let err = one_line_error(&output);
    assert!(err.contains("Authentication failed"), "{err}");
    assert!(err.contains("node.calls.secret"), "{err}");
    assert!(!err.contains("wrong-secret"), "{err}");
}

#[test]
fn balancer_port_in_use_or_bad_balancer_config_say_what_to_change() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = format!("sqlite://{}/fleet.db", dir.path().display());
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let output = callfleet()
        .arg("balancer")
        .env("RUST_LOG", "error")
        .env("CALLFLEET_STORE__URL", &store)
        .env("CALLFLEET_BALANCER__LISTEN", format!("127.0.0.1:{port}"))
        .output()
        .expect("run");
    let err = one_line_error(&output);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        err.contains(&format!("cannot listen for SIP on UDP 127.0.0.1:{port}"))
            && err.contains("balancer.listen"),
        "{err}"
    );

    let output = callfleet()
        .arg("balancer")
        .env("CALLFLEET_STORE__URL", &store)
        .env("CALLFLEET_BALANCER__ALLOW", "[\"10.0.0.0/33\"]")
        .output()
        .expect("run");
    let err = one_line_error(&output);
    assert_eq!(output.status.code(), Some(64), "EX_USAGE");
    assert!(
        err.contains("balancer.allow[0]") && err.contains("prefix"),
        "{err}"
    );
}

#[test]
fn asterisk_config_without_an_install_says_what_to_set() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = callfleet()
        .args(["asterisk-config", "--out"])
        .arg(dir.path().join("pbx"))
        .output()
        .expect("run");
    let err = one_line_error(&output);
    assert_eq!(output.status.code(), Some(64), "EX_USAGE");
    assert_eq!(
        err,
        "error: cannot write the Asterisk configuration: `asterisk.install` is empty: set it to the Asterisk install (the folder holding sbin/asterisk, as ./scripts/build-asterisk prints it)"
    );
    assert!(!dir.path().join("pbx").exists(), "nothing written");

    let output = callfleet()
        .args(["asterisk-config", "--out"])
        .arg(dir.path().join("pbx"))
        .env("CALLFLEET_ASTERISK__INSTALL", "/opt/asterisk")
        .env("CALLFLEET_NODE__CALLS__SOURCE", "ami")
        .env("CALLFLEET_NODE__CALLS__USERNAME", "callfleet")
        .env("CALLFLEET_NODE__CALLS__ADDRESS", "10.1.2.3:5038")
        .env("CALLFLEET_NODE__CALLS__SECRET", "x")
        .output()
        .expect("run");
    let err = one_line_error(&output);
    assert_eq!(output.status.code(), Some(64), "EX_USAGE");
    assert!(
        err.contains("`node.calls.address` `10.1.2.3:5038` is not a loopback address"),
        "{err}"
    );
}
