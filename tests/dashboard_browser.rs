//! The supervisors' page in a real browser: Debian's Chromium, headless, driven through
//! chromedriver by Selenium (Debian's `python3-selenium`, run as
//! `/usr/bin/python3 tests/browser/dashboard.py`), against `callfleet control-plane`,
//! `callfleet lock-service` and a `callfleet node-agent` on loopback over MariaDB.
//! `./scripts/test` installs the three packages.
//!
//! The script checks the screen; this test does what happens outside the browser when the
//! script asks (a caller joins the queue, a CRM pauses an agent, the node's agent is
//! killed) and answers whether the store shows the drain the script clicked. Screenshots
//! of every step land in `target/test-artifacts/dashboard/`.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const ADMIN: &str = "admin-browser-secret-0123456789abcd";
const READER: &str = "reader-browser-secret-0123456789abc";

/// Enters one caller into `queue`'s waiting order, as a node-agent would.
fn join_waiter(lock_port: u16, queue: &str, waiter: &str) {
    use callfleet_proto::lock::v1 as pb;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{lock_port}"))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect to the lock service");
        let mut client = pb::locks_client::LocksClient::new(channel);
        client
            .join(pb::JoinRequest {
                queue: queue.to_owned(),
                waiter: waiter.to_owned(),
                band: 1,
                ttl_ms: 120_000,
            })
            .await
            .expect("join");
    });
}

/// Samples of pbx-b in the store's history.
fn sample_count(url: &str) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let config = callfleet_core::config::StoreConfig {
            url: url.to_owned(),
            ..Default::default()
        };
        let store = callfleet_core::Store::connect(&config)
            .await
            .expect("store");
        let id: callfleet_core::NodeId = "pbx-b".parse().expect("node id");
        let samples = store
            .samples(&id, std::time::Duration::from_secs(3600))
            .await
            .expect("samples");
        store.close().await;
        u64::try_from(samples.len()).expect("count")
    })
}

#[test]
fn a_supervisor_watches_and_steers_the_fleet_in_a_browser() {
    let url = fresh_mysql_url();
    let dir = tempfile::tempdir().expect("temp dir");
    let shots = support::checkout().join("target/test-artifacts/dashboard");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).expect("screenshot folder");

    let lock_port = free_port();
    let _locks = lock_service(lock_port, &dir.path().join("locks.log"));
    let api_port = free_port();
    let control = callfleet()
        .arg("control-plane")
        .env("CALLFLEET_STORE__URL", &url)
        .env("CALLFLEET_CONTROL_PLANE__LISTEN", format!("127.0.0.1:{api_port}"))
        .env("CALLFLEET_CONTROL_PLANE__LOCK_SERVICE", format!("http://127.0.0.1:{lock_port}"))
        // Long waits stay out of it: the queue's colour follows the count the script makes.
        .env(
            "CALLFLEET_CONTROL_PLANE__QUEUE_ALERTS",
            r#"{sales={waiting_warning=1,waiting_critical=2,wait_warning="1h",wait_critical="2h"}}"#,
        )
        .env(
            "CALLFLEET_CONTROL_PLANE__TOKENS",
            format!(
                "[{{name=\"ops\",token=\"{ADMIN}\",role=\"admin\"}},{{name=\"wallboard\",token=\"{READER}\",role=\"read\"}},{{name=\"crm\",token=\"{CRM_TOKEN}\",role=\"write\"}}]"
            ),
        )
        .stdout(Stdio::null())
        .stderr(log_file(&dir.path().join("control.log")))
        .spawn()
        .expect("start the control plane");
    let _control = Running { child: control };
    wait_until("the control plane answers", Duration::from_secs(20), || {
        http(api_port, "GET", "/api/v1/queues", CRM_TOKEN, "").is_some_and(|(s, _)| s == 200)
    });
    // One sample per agent process (its first beat's), so the chart's points are known.
    let agent = start_agent_with(
        &url,
        "pbx-b",
        "300ms",
        &dir.path().join("pbx-b.log"),
        &[("CALLFLEET_STORE__HISTORY_INTERVAL", "1h")],
    );
    wait_until("pbx-b reports", Duration::from_secs(20), || {
        node(&status(&url), "pbx-b").is_some()
    });
    for (path, body) in [
        ("/api/v1/queues/sales", r#"{"name":"Sales"}"#),
        ("/api/v1/agents/1001", r#"{"name":"Alice"}"#),
        ("/api/v1/queues/sales/members/1001", r#"{"priority":1}"#),
    ] {
        let answer = http(api_port, "PUT", path, CRM_TOKEN, body);
        assert_eq!(
            answer.as_ref().map(|a| a.0),
            Some(200),
            "{path}: {answer:?}"
        );
    }

    let mut script = Command::new("/usr/bin/python3")
        .arg(support::checkout().join("tests/browser/dashboard.py"))
        .env("BASE_URL", format!("http://127.0.0.1:{api_port}"))
        .env("SHOTS", &shots)
        .env("ADMIN_TOKEN", ADMIN)
        .env("READ_TOKEN", READER)
        .env("HEARTBEAT_INTERVAL_S", "0.3")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log_file(&dir.path().join("browser.log")))
        .spawn()
        .expect("run /usr/bin/python3 with Debian's python3-selenium");
    let mut to_script = script.stdin.take().expect("stdin");
    let from_script = BufReader::new(script.stdout.take().expect("stdout"));
    let mut asked = Vec::new();
    let mut callers = 0;
    for line in from_script.lines() {
        let line = line.expect("read the script");
        let answer = match line.as_str() {
            "JOIN" => {
                callers += 1;
                join_waiter(lock_port, "sales", &format!("pbx-b/1700000000.{callers}"));
                "OK".to_owned()
            }
            "SAMPLES?" => sample_count(&url).to_string(),
            "PAUSE" => {
                let paused = http(
                    api_port,
                    "POST",
                    "/api/v1/agents/1001/pause",
                    CRM_TOKEN,
                    r#"{"reason":"lunch"}"#,
                );
                assert_eq!(paused.map(|a| a.0), Some(204));
                "OK".to_owned()
            }
            "DRAIN?" => {
                if node(&status(&url), "pbx-b").is_some_and(|n| n["drain_requested"] == true) {
                    "yes".to_owned()
                } else {
                    "no".to_owned()
                }
            }
            "KILL" => {
                agent.signal("KILL");
                "OK".to_owned()
            }
            "DONE" => break,
            other => panic!("the script said {other:?}"),
        };
        if line != "DRAIN?" || answer == "yes" {
            asked.push(line.clone());
        }
        writeln!(to_script, "{answer}").expect("answer the script");
    }
    let status = script.wait().expect("the script ends");
    let log = read(&dir.path().join("browser.log"));
    assert!(
        status.success(),
        "the browser script failed: {status:?}\n{log}"
    );
    eprintln!("{log}");
    assert_eq!(
        asked,
        ["SAMPLES?", "JOIN", "JOIN", "PAUSE", "DRAIN?", "KILL"]
    );
    let mut taken: Vec<String> = std::fs::read_dir(&shots)
        .expect("screenshots")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    taken.sort();
    assert_eq!(
        taken,
        [
            "1-wrong-token.png",
            "2-read-only.png",
            "3-caller-waiting.png",
            "4-agent-paused.png",
            "5-drained.png",
            "6-node-stale.png",
            "7-phone.png",
            "8-logged-out.png"
        ]
    );
    // The click wrote its audit row under the admin token's name.
    let (_, audit) = http(api_port, "GET", "/api/v1/audit?limit=5", ADMIN, "").expect("audit");
    assert!(
        audit.contains(r#""actor":"ops","action":"node.drain""#),
        "{audit}"
    );
}
