//! callfleet against a real Asterisk 22 (PJSIP), built from source by
//! `./scripts/build-asterisk`. These tests are ignored in `./scripts/test` (a fresh clone has
//! no Asterisk); `./scripts/test-asterisk` builds or reuses the install, names it in
//! `CALLFLEET_ASTERISK_PREFIX` and runs them.
//!
//! Each test runs its own Asterisk instance from a private folder on free loopback ports, so
//! several can run side by side.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::carrier::*;
use support::*;

/// The Asterisk install `./scripts/test-asterisk` built.
fn prefix() -> PathBuf {
    let prefix = std::env::var_os("CALLFLEET_ASTERISK_PREFIX").map(PathBuf::from).expect(
        "CALLFLEET_ASTERISK_PREFIX is not set: run ./scripts/test-asterisk, which builds Asterisk and sets it",
    );
    assert!(
        prefix.join("sbin/asterisk").is_file(),
        "no sbin/asterisk under {}",
        prefix.display()
    );
    prefix
}

/// A private Asterisk: its own configuration, run, log and spool folders, its own ports.
struct Asterisk {
    conf: PathBuf,
    binary: PathBuf,
    sip_port: u16,
    ami_port: u16,
    process: Running,
}

/// What an instance needs besides its ports: the AMI user callfleet logs in as.
const AMI_USER: &str = "callfleet";
/// The AMI secret of the instance whose manager listens on `ami_port`: another test's
/// node-agent that reached this instance by a port collision is refused, not fooled.
fn ami_secret(ami_port: u16) -> String {
    format!("callfleet-ami-secret-{ami_port}")
}

impl Asterisk {
    /// Writes the node's configuration with `callfleet asterisk-config` into `dir` (SIP on
    /// a free loopback port, the carrier arriving from loopback, the node-agent's AMI
    /// user), adds device `1001` on a static contact at `phone_port` in
    /// `pjsip.local.conf`, starts Asterisk and waits until it is fully booted.
    fn start(dir: &Path, phone_port: u16) -> Self {
        Self::start_with(dir, &[], Some(phone_port))
    }

    /// [`Asterisk::start`] with more of callfleet's configuration (`extra`, as environment
    /// variables), and a `pjsip.local.conf` device only when `local_phone` names its port.
    fn start_with(dir: &Path, extra: &[(&str, String)], local_phone: Option<u16>) -> Self {
        let prefix = prefix();
        let (sip_port, ami_port) = (free_port(), free_port());
        let output = callfleet()
            .args(["asterisk-config", "--out"])
            .arg(dir)
            .envs(Self::node_env(&prefix, sip_port, ami_port))
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .expect("run callfleet asterisk-config");
        assert_success(&output);
        if let Some(port) = local_phone {
            add_device(dir, port);
        }
        let conf = dir.join("asterisk.conf");
        let binary = prefix.join("sbin/asterisk");
        let log = std::fs::File::create(dir.join("asterisk.out")).expect("Asterisk's output file");
        let child = Command::new(&binary)
            .arg("-C")
            .arg(&conf)
            .args(["-f", "-n"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the output file"))
            .stderr(log)
            .spawn()
            .expect("start asterisk");
        let asterisk = Self {
            conf,
            binary,
            sip_port,
            ami_port,
            process: Running { child },
        };
        wait_until("Asterisk fully booted", Duration::from_secs(60), || {
            asterisk
                .try_cli("core waitfullybooted")
                .is_some_and(|out| out.contains("fully booted"))
        });
        // Asterisk boots even when a port of its own is taken; the test would then talk to
        // whoever holds it.
        let log = std::fs::read_to_string(dir.join("log/messages.log")).unwrap_or_default();
        assert!(
            !log.contains("Unable to bind"),
            "a port of this instance was taken (rerun): {log}"
        );
        asterisk
    }

    /// The callfleet configuration of this node, as environment variables.
    fn node_env(prefix: &Path, sip_port: u16, ami_port: u16) -> Vec<(&'static str, String)> {
        vec![
            ("CALLFLEET_ASTERISK__INSTALL", prefix.display().to_string()),
            (
                "CALLFLEET_BALANCER__LOCAL_PBX",
                format!("127.0.0.1:{sip_port}"),
            ),
            ("CALLFLEET_NODE__CALLS__SOURCE", "ami".to_owned()),
            (
                "CALLFLEET_NODE__CALLS__ADDRESS",
                format!("127.0.0.1:{ami_port}"),
            ),
            ("CALLFLEET_NODE__CALLS__USERNAME", AMI_USER.to_owned()),
            ("CALLFLEET_NODE__CALLS__SECRET", ami_secret(ami_port)),
        ]
    }

    /// Runs a CLI command on this instance (through its control socket).
    fn try_cli(&self, command: &str) -> Option<String> {
        let output = Command::new(&self.binary)
            .arg("-C")
            .arg(&self.conf)
            .args(["-rx", command])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// Device `1001` on a static contact at the phone's `port`, in the PBX folder's
/// `pjsip.local.conf` (devices come from realtime provisioning once that exists).
fn add_device(folder: &Path, port: u16) {
    std::fs::write(
        folder.join("pjsip.local.conf"),
        format!(
            "[1001]\ntype = endpoint\ncontext = callfleet-from-device\ndisallow = all\nallow = ulaw\n\
direct_media = no\naors = 1001\n\n[1001]\ntype = aor\ncontact = sip:1001@127.0.0.1:{port}\n"
        ),
    )
    .expect("write the device");
}

/// A SIPp phone answering every call (SIPp's built-in `uas`), on `port`.
fn answering_phone(dir: &Path, port: u16) -> Running {
    let child = sipp()
        .current_dir(dir)
        .args(["-sn", "uas", "-i", "127.0.0.1", "-p", &port.to_string()])
        .arg("-nostdin")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("phone.out")).expect("phone output file"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start the SIPp phone");
    Running { child }
}

/// The first real calls through Asterisk, configured by `callfleet asterisk-config`: a
/// carrier's calls to extension 1001 land on the node, ring device 1001, are answered and
/// bridged, and the node-agent reads the live count over Asterisk's own AMI (not a
/// replayed transcript) into the store, where `callfleet status` shows it.
#[test]
#[ignore = "needs Asterisk: run ./scripts/test-asterisk"]
fn calls_bridged_by_asterisk_are_counted_over_its_live_ami() {
    const CALLS: usize = 3;
    let dir = tempfile::tempdir().expect("temp dir");
    let phone_port = free_port();
    let _phone = answering_phone(dir.path(), phone_port);
    let asterisk = Asterisk::start(&dir.path().join("pbx"), phone_port);
    // The generated configuration is complete: nothing Asterisk reads at start is missing.
    let booted =
        std::fs::read_to_string(dir.path().join("pbx/log/messages.log")).expect("Asterisk's log");
    let errors: Vec<&str> = booted.lines().filter(|l| l.contains("ERROR[")).collect();
    assert_eq!(errors, Vec::<&str>::new(), "errors at start");
    let modules = asterisk.try_cli("module show").expect("the CLI answers");
    assert!(
        modules.contains("chan_pjsip.so") && !modules.contains("chan_iax2.so"),
        "only the modules a node uses: {modules}"
    );
    // Every application and function the generated dialplan uses is loaded: a missing one
    // only shows when a call reaches it.
    let dialplan =
        std::fs::read_to_string(dir.path().join("pbx/extensions.conf")).expect("the dialplan");
    let (applications, functions) = dialplan_names(&dialplan);
    assert!(
        applications.contains("Dial") && functions.contains("PJSIP_HEADER"),
        "{dialplan}"
    );
    let known = applications
        .iter()
        .map(|name| ("application", "Application", name))
        .chain(functions.iter().map(|name| ("function", "Function", name)));
    for (kind, title, name) in known {
        let shown = asterisk
            .try_cli(&format!("core show {kind} {name}"))
            .expect("the CLI answers");
        assert!(
            shown.contains(&format!("-= Info about {title} '{name}' =-")),
            "{kind} {name}: {shown}"
        );
    }

    let url = format!("sqlite://{}/fleet.db", dir.path().display());
    let agent = callfleet()
        .arg("node-agent")
        .envs(Asterisk::node_env(
            &prefix(),
            asterisk.sip_port,
            asterisk.ami_port,
        ))
        .env("CALLFLEET_STORE__URL", &url)
        .env("CALLFLEET_NODE__ID", "pbx-1")
        .env("CALLFLEET_NODE__HEARTBEAT_INTERVAL", "300ms")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("agent.log")).expect("agent log"))
        .spawn()
        .expect("start node-agent");
    let _agent = Running { child: agent };
    let calls_now = || {
        node(&status(&url), "pbx-1")
            .filter(|n| n["pbx_up"] == true && n["stale"] == false)
            .and_then(|n| n["calls"].as_u64())
    };
    wait_until(
        "the idle node reports 0 calls",
        Duration::from_secs(20),
        || calls_now() == Some(0),
    );

    // The carrier: SIPp's built-in `uac`, holding each answered call 8 s before its BYE.
    let carrier_dir = dir.path().join("carrier");
    std::fs::create_dir_all(&carrier_dir).expect("carrier folder");
    let mut carrier = Running {
        child: sipp()
            .current_dir(&carrier_dir)
            .args(["-sn", "uac", "-s", "1001"])
            .arg(format!("127.0.0.1:{}", asterisk.sip_port))
            .args(["-i", "127.0.0.1", "-p", &free_port().to_string()])
            .args(["-m", &CALLS.to_string(), "-l", &CALLS.to_string()])
            .args(["-r", "10", "-d", "8000", "-timeout", "40s", "-nostdin"])
            .args(["-trace_stat", "-stf", "stats.csv"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(carrier_dir.join("out")).expect("carrier output"))
            .stderr(Stdio::null())
            .spawn()
            .expect("start the SIPp carrier"),
    };
    wait_until(
        "all three calls up and counted",
        Duration::from_secs(8),
        || calls_now() == Some(CALLS as u64),
    );
    let channels = asterisk
        .try_cli("core show channels count")
        .expect("the CLI answers");
    assert!(
        channels.contains(&format!("{CALLS} active calls")),
        "Asterisk's own count: {channels}"
    );

    let finished = wait_exit("the carrier's calls", &mut carrier, Duration::from_secs(40));
    let stats = std::fs::read_to_string(carrier_dir.join("stats.csv")).unwrap_or_default();
    assert!(
        finished.success(),
        "every call answered and hung up cleanly; SIPp stats:\n{stats}"
    );
    wait_until("the calls are gone", Duration::from_secs(10), || {
        calls_now() == Some(0)
    });
}

/// The applications a dialplan runs (`exten => x,1,App(…)`, `same => n,App(…)`, and the
/// one in `ExecIf(…?App(…))`) and the functions it calls (`${NAME(…)}`).
fn dialplan_names(
    dialplan: &str,
) -> (
    std::collections::BTreeSet<String>,
    std::collections::BTreeSet<String>,
) {
    let name_before_paren = |text: &str| -> Option<String> {
        let name: String = text
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        (!name.is_empty() && text[name.len()..].starts_with('(')).then_some(name)
    };
    let mut applications = std::collections::BTreeSet::new();
    let mut functions = std::collections::BTreeSet::new();
    for line in dialplan.lines().map(str::trim) {
        if line.starts_with(';') {
            continue;
        }
        if let Some(rest) = line
            .strip_prefix("exten =>")
            .or_else(|| line.strip_prefix("same =>"))
        {
            // `x,1,App(` or `n(label),App(`: the application follows the second comma
            // outside parentheses.
            let mut depth = 0;
            let mut commas = 0;
            for (at, c) in rest.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    ',' if depth == 0 => {
                        commas += 1;
                        if commas == 2 {
                            applications.extend(name_before_paren(&rest[at + 1..]));
                            break;
                        }
                    }
                    _ => {}
                }
            }
            if let Some((_, then)) = rest
                .split_once("ExecIf(")
                .and_then(|(_, r)| r.split_once('?'))
            {
                applications.extend(name_before_paren(then));
            }
        }
        for (at, _) in line.match_indices("${") {
            functions.extend(name_before_paren(&line[at + 2..]));
        }
    }
    (applications, functions)
}

/// Asterisk's own res_agi against the node-agent's FastAGI server: the check context that
/// `callfleet asterisk-config` writes runs the agent's `ping` script and logs the variable
/// it set. With the agent stopped, the same check ends at once with `AGISTATUS=FAILURE`
/// and the dialplan goes on: the fallback the queue dialplan relies on.
#[test]
#[ignore = "needs Asterisk: run ./scripts/test-asterisk"]
fn asterisk_runs_the_node_agent_s_fastagi_script_and_goes_on_without_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let agi = format!("127.0.0.1:{}", free_port());
    let extra = [("CALLFLEET_NODE__AGI__LISTEN", agi.clone())];
    let pbx = dir.path().join("pbx");
    let asterisk = Asterisk::start_with(&pbx, &extra, None);
    let url = format!("sqlite://{}/fleet.db", dir.path().display());
    let mut agent = Running {
        child: callfleet()
            .arg("node-agent")
            .envs(Asterisk::node_env(
                &prefix(),
                asterisk.sip_port,
                asterisk.ami_port,
            ))
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .env("CALLFLEET_STORE__URL", &url)
            .env("CALLFLEET_NODE__ID", "pbx-1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("agent.log")).expect("agent log"))
            .spawn()
            .expect("start node-agent"),
    };
    let agent_log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    wait_until("the node-agent is up", Duration::from_secs(20), || {
        agent_log().contains("node-agent started")
    });
    let checks = || {
        std::fs::read_to_string(pbx.join("log/messages.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                line.split_once("callfleet FastAGI check: ")
                    .map(|(_, rest)| rest.to_owned())
            })
            .collect::<Vec<_>>()
    };
    let originate = "channel originate Local/ping@callfleet-agi-check application Wait 1";

    let pbx_log = || std::fs::read_to_string(pbx.join("log/messages.log")).unwrap_or_default();
    // Originates the check and waits for its log line; how long that took.
    let check = |count: usize| {
        let start = std::time::Instant::now();
        let answer = asterisk.try_cli(originate).expect("the CLI answers");
        while checks().len() < count {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no check logged within 10 s; CLI: {answer}\nAsterisk:\n{}\nagent:\n{}",
                pbx_log(),
                agent_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        start.elapsed()
    };

    let took = check(1);
    assert_eq!(checks(), ["AGISTATUS=SUCCESS CALLFLEET_RESULT=pong"]);
    eprintln!("with the agent: pong logged {took:?} after the originate");

    // Negative control: nobody on the port.
    agent.signal("TERM");
    wait_exit("the node-agent", &mut agent, Duration::from_secs(15));
    let took = check(2);
    assert_eq!(
        checks(),
        [
            "AGISTATUS=SUCCESS CALLFLEET_RESULT=pong",
            "AGISTATUS=FAILURE CALLFLEET_RESULT="
        ]
    );
    eprintln!("without the agent: the dialplan went on {took:?} after the originate");
}

/// The pid Asterisk wrote into its run folder, once it is there.
fn asterisk_pid(folder: &Path) -> Option<i32> {
    std::fs::read_to_string(folder.join("run/asterisk.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `callfleet up` with `asterisk.install` runs the node's PBX: carrier calls reach a device
/// through the balancer and the supervised Asterisk; a killed Asterisk is started again;
/// one that keeps dying is given up on after `restart_limit` restarts, the node then
/// reports its PBX down and the balancer stops routing calls to it.
#[test]
#[ignore = "needs Asterisk: run ./scripts/test-asterisk"]
fn up_runs_the_pbx_restarts_it_and_gives_up_on_one_that_keeps_dying() {
    let dir = tempfile::tempdir().expect("temp dir");
    let phone_port = free_port();
    let _phone = answering_phone(dir.path(), phone_port);
    let (sip_port, ami_port, balancer_port) = (free_port(), free_port(), free_port());
    let folder = dir.path().join("callfleet-data/asterisk");
    let control_port = free_port();
    // `up` keeps the PBX's folder beside its store.
    let url = format!("sqlite://{}/callfleet-data/fleet.db", dir.path().display());
    let log = dir.path().join("up.log");
    let up = callfleet()
        .arg("up")
        .current_dir(dir.path())
        .envs(Asterisk::node_env(&prefix(), sip_port, ami_port))
        .env("CALLFLEET_STORE__URL", &url)
        .env(
            "CALLFLEET_PROVISIONING__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("CALLFLEET_ASTERISK__RESTART_LIMIT", "2")
        .env("CALLFLEET_ASTERISK__RESTART_WINDOW", "10min")
        .env(
            "CALLFLEET_BALANCER__LISTEN",
            format!("127.0.0.1:{balancer_port}"),
        )
        .env(
            "CALLFLEET_CONTROL_PLANE__LISTEN",
            format!("127.0.0.1:{control_port}"),
        )
        .env(
            "CALLFLEET_LOCK_SERVICE__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("CALLFLEET_NODE__ID", "box")
        .env("CALLFLEET_NODE__HEARTBEAT_INTERVAL", "300ms")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("up's log"))
        .spawn()
        .expect("start callfleet up");
    let _up = Running { child: up };
    let pbx_up = || node(&status(&url), "box").map(|n| n["pbx_up"] == true && n["stale"] == false);
    wait_until("the PBX is up", Duration::from_secs(60), || {
        pbx_up() == Some(true)
    });

    // Device 1001 exists only in the box's control plane: its PBX learns it through the
    // node-agent (`up` wires both with a token of its own).
    let admin = std::fs::read_to_string(dir.path().join("callfleet-data/admin-token"))
        .expect("up's admin token");
    let body =
        format!(r#"{{"endpoint":"PJSIP/1001","contact":"sip:1001@127.0.0.1:{phone_port}"}}"#);
    let answer = http(
        control_port,
        "PUT",
        "/api/v1/devices/1001",
        admin.trim(),
        &body,
    );
    assert!(matches!(&answer, Some((200, _))), "{answer:?}");
    assert!(
        !folder.join(LOCAL_PJSIP_FILE).exists(),
        "no device from a file"
    );

    // The carrier's calls go through the balancer (proxy to the local PBX) to device 1001,
    // once the balancer has seen the node and its PBX answer the probes.
    wait_until("the balancer routes calls", Duration::from_secs(30), || {
        sip_options_status(balancer_port) == Some(200)
    });
    let carrier_dir = dir.path().join("carrier");
    std::fs::create_dir_all(&carrier_dir).expect("carrier folder");
    let scenario = support::checkout().join("tests/sipp/uac_call.xml");
    let mut carrier = Running {
        child: sipp()
            .current_dir(&carrier_dir)
            .arg("-sf")
            .arg(&scenario)
            .args(["-s", "1001"])
            .arg(format!("127.0.0.1:{balancer_port}"))
            .args(["-i", "127.0.0.1", "-p", &free_port().to_string()])
            .args([
                "-m", "3", "-l", "1", "-r", "5", "-timeout", "30s", "-nostdin",
            ])
            .args(["-trace_err", "-error_file", "errors.log"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(carrier_dir.join("out")).expect("carrier output"))
            .stderr(Stdio::null())
            .spawn()
            .expect("start the SIPp carrier"),
    };
    let finished = wait_exit("the carrier's calls", &mut carrier, Duration::from_secs(30));
    let errors = std::fs::read_to_string(carrier_dir.join("errors.log")).unwrap_or_default();
    let pbx_log = std::fs::read_to_string(folder.join("log/messages.log")).unwrap_or_default();
    assert!(
        finished.success(),
        "3 calls answered and hung up: {errors}\nAsterisk's log:\n{pbx_log}"
    );

    // Killed twice: started again each time (restart_limit = 2).
    let mut pid = asterisk_pid(&folder).expect("Asterisk wrote its pid");
    for restart in 1..=2 {
        let status = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill Asterisk");
        wait_until(
            &format!("Asterisk started again (restart {restart})"),
            Duration::from_secs(60),
            || asterisk_pid(&folder).is_some_and(|new| new != pid) && pbx_up() == Some(true),
        );
        pid = asterisk_pid(&folder).expect("the new pid");
    }
    // A third death within the window: given up, and the node says its PBX is down.
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill Asterisk");
    wait_until("the PBX reported down", Duration::from_secs(20), || {
        pbx_up() == Some(false)
    });
    // The node is out of routing: the balancer has no node to send a call to.
    wait_until(
        "the balancer stops routing",
        Duration::from_secs(20),
        || sip_options_status(balancer_port) == Some(503),
    );
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        pbx_up(),
        Some(false),
        "given up: no restart after the limit"
    );
    assert_eq!(
        sip_options_status(balancer_port),
        Some(503),
        "still out of routing"
    );
    let text = std::fs::read_to_string(&log).expect("up's log");
    assert_eq!(text.matches("Asterisk started").count(), 3, "{text}");
    assert_eq!(text.matches("giving up").count(), 1, "{text}");
}

/// SIPp's built-in `uac` calling `extension` on the PBX at `pbx_port` `calls` times, one
/// after the other, each held 1 s; returns how many were answered and how many failed.
fn call(dir: &Path, extension: &str, pbx_port: u16, calls: u32) -> (u64, u64) {
    std::fs::create_dir_all(dir).expect("carrier folder");
    let mut carrier = Running {
        child: sipp()
            .current_dir(dir)
            .args(["-sn", "uac", "-s", extension])
            .arg(format!("127.0.0.1:{pbx_port}"))
            .args(["-i", "127.0.0.1", "-p", &free_port().to_string()])
            .args(["-m", &calls.to_string(), "-l", "1", "-r", "5"])
            .args([
                "-d",
                "1000",
                "-timeout",
                "30s",
                "-recv_timeout",
                "10000",
                "-nostdin",
            ])
            .args(["-trace_stat", "-stf", "stats.csv"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the SIPp carrier"),
    };
    wait_exit("the carrier's calls", &mut carrier, Duration::from_secs(40));
    let stats = std::fs::read_to_string(dir.join("stats.csv")).expect("SIPp's statistics");
    let header: Vec<&str> = stats
        .lines()
        .next()
        .unwrap_or_default()
        .split(';')
        .collect();
    let last: Vec<&str> = stats
        .lines()
        .last()
        .unwrap_or_default()
        .split(';')
        .collect();
    let column = |name: &str| -> u64 {
        let index = header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no {name} in {stats}"));
        last[index].parse().expect("a count")
    };
    (column("SuccessfulCall(C)"), column("FailedCall(C)"))
}

/// The file of devices outside realtime, which the box must not need.
const LOCAL_PJSIP_FILE: &str = "pjsip.local.conf";

/// Devices provisioned in the control plane reach Asterisk through the node-agent's
/// realtime endpoint: a desk phone at a fixed contact and a phone that registers with
/// digest credentials are rung. Then the control plane is stopped for 60 s: calls to both
/// still ring from the node-agent's cache, and the phone registers again from a new address
/// (the rings follow it); when the control plane is back, that registration is in it.
#[test]
#[ignore = "needs Asterisk: run ./scripts/test-asterisk"]
fn devices_come_from_the_control_plane_and_outlive_its_outage() {
    const OUTAGE: Duration = Duration::from_secs(60);
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/fleet.db", dir.path().display());
    let control_port = free_port();
    let control_log = dir.path().join("control.log");
    let mut control = control_plane(&url, control_port, &control_log);
    let desk_port = free_port();
    let _desk = answering_phone(dir.path(), desk_port);
    for (device, body) in [
        (
            "2001",
            format!(r#"{{"endpoint":"PJSIP/2001","contact":"sip:2001@127.0.0.1:{desk_port}"}}"#),
        ),
        (
            "2002",
            r#"{"endpoint":"PJSIP/2002","password":"s3cret-2002"}"#.to_owned(),
        ),
    ] {
        let answer = http(
            control_port,
            "PUT",
            &format!("/api/v1/devices/{device}"),
            CRM_TOKEN,
            &body,
        );
        assert!(matches!(&answer, Some((200, _))), "{device}: {answer:?}");
    }

    let node = RealtimeNode::start_with(
        dir.path(),
        "pbx-1",
        &url,
        control_port,
        &[
            ("CALLFLEET_PROVISIONING__DEADLINE", "300ms".to_owned()),
            (
                "CALLFLEET_PROVISIONING__PENDING_FILE",
                dir.path().join("pending.jsonl").display().to_string(),
            ),
        ],
    );
    let (asterisk, provisioning_port) = (&node.asterisk, node.provisioning_port);
    let agent_log = dir.path().join("agent.log");

    let first_port = free_port();
    let mut first = registering_phone(
        &dir.path().join("phone-a"),
        "2002",
        "s3cret-2002",
        asterisk.sip_port,
        first_port,
        Duration::from_secs(200),
    );
    wait_until(
        "2002's registration reaches the control plane",
        Duration::from_secs(20),
        || {
            registrations(control_port, "2002")
                .is_some_and(|rows| rows.contains(&format!("{PHONES}%3A{first_port}")))
        },
    );
    assert!(first.alive(), "the phone registered and waits for calls");
    assert_eq!(
        call(&dir.path().join("call-1"), "2001", asterisk.sip_port, 2),
        (2, 0),
        "the desk phone answers"
    );
    assert_eq!(
        call(&dir.path().join("call-2"), "2002", asterisk.sip_port, 2),
        (2, 0),
        "the registered phone answers"
    );

    // The control plane goes away.
    control.signal("KILL");
    let _ = control.child.wait();
    let outage = std::time::Instant::now();
    assert_eq!(
        call(&dir.path().join("call-3"), "2001", asterisk.sip_port, 2),
        (2, 0),
        "desk phone during the outage"
    );
    assert_eq!(
        call(&dir.path().join("call-4"), "2002", asterisk.sip_port, 2),
        (2, 0),
        "registered phone during the outage"
    );
    // The phone moves to another address (a new registration) while the source is down.
    drop(first);
    let second_port = free_port();
    let mut second = registering_phone(
        &dir.path().join("phone-b"),
        "2002",
        "s3cret-2002",
        asterisk.sip_port,
        second_port,
        Duration::from_secs(200),
    );
    wait_until(
        "the new registration is answered",
        Duration::from_secs(10),
        || std::fs::read_to_string(dir.path().join("phone-b/out")).is_ok() && second.alive(),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(second.alive(), "registered during the outage");
    let rung = call(&dir.path().join("call-5"), "2002", asterisk.sip_port, 2);
    assert_eq!(rung, (2, 0), "the new address rings during the outage");
    let stats = provisioning_stats(provisioning_port);
    // The move is two writes Asterisk made meanwhile: the old contact removed, the new one
    // stored; both kept for the control plane. Every read of the outage was answered.
    assert_eq!(stats["pending"], 2, "{stats}");
    assert_eq!(stats["delivered"], 0, "{stats}");
    assert_eq!(stats["misses"], 0, "{stats}");
    assert!(stats["stale"].as_u64().is_some_and(|n| n > 0), "{stats}");
    if let Some(left) = OUTAGE.checked_sub(outage.elapsed()) {
        std::thread::sleep(left);
    }
    assert_eq!(
        call(&dir.path().join("call-6"), "2001", asterisk.sip_port, 1),
        (1, 0),
        "after 60 s without the control plane"
    );

    let _control = control_plane(&url, control_port, &control_log);
    wait_until(
        "the registration made during the outage is delivered",
        Duration::from_secs(20),
        || {
            registrations(control_port, "2002").is_some_and(|rows| {
                rows.contains(&format!("{PHONES}%3A{second_port}"))
                    && !rows.contains(&format!("{PHONES}%3A{first_port}"))
            })
        },
    );
    let after = provisioning_stats(provisioning_port);
    assert_eq!(
        (after["pending"].as_u64(), after["delivered"].as_u64()),
        (Some(0), Some(2)),
        "{after}"
    );
    let agent = std::fs::read_to_string(&agent_log).expect("agent log");
    println!("provisioning stats during the outage: {stats}\nafter: {after}");
    assert_eq!(
        agent.matches("control plane unreachable").count(),
        1,
        "{agent}"
    );
    assert_eq!(agent.matches("control plane back").count(), 1, "{agent}");
}

/// The negative control of the test above: the same devices and the same outage with a
/// node-agent whose cache keeps nothing usable (`stale_max` of 1 ms). Asterisk then forgets
/// the desk phone as soon as the control plane is gone, and the carrier's calls fail.
#[test]
#[ignore = "needs Asterisk: run ./scripts/test-asterisk"]
fn without_the_cache_an_outage_of_the_control_plane_loses_the_devices() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/fleet.db", dir.path().display());
    let control_port = free_port();
    let mut control = control_plane(&url, control_port, &dir.path().join("control.log"));
    let desk_port = free_port();
    let _desk = answering_phone(dir.path(), desk_port);
    let body = format!(r#"{{"endpoint":"PJSIP/2001","contact":"sip:2001@127.0.0.1:{desk_port}"}}"#);
    let answer = http(
        control_port,
        "PUT",
        "/api/v1/devices/2001",
        CRM_TOKEN,
        &body,
    );
    assert!(matches!(&answer, Some((200, _))), "{answer:?}");
    let node = RealtimeNode::start_with(
        dir.path(),
        "pbx-1",
        &url,
        control_port,
        &[("CALLFLEET_PROVISIONING__STALE_MAX", "1ms".to_owned())],
    );
    let (asterisk, provisioning_port) = (&node.asterisk, node.provisioning_port);
    assert_eq!(
        call(&dir.path().join("call-1"), "2001", asterisk.sip_port, 2),
        (2, 0),
        "with the control plane"
    );
    control.signal("KILL");
    let _ = control.child.wait();
    assert_eq!(
        call(&dir.path().join("call-2"), "2001", asterisk.sip_port, 2),
        (0, 2),
        "the device is forgotten"
    );
    let stats = provisioning_stats(provisioning_port);
    assert_eq!(stats["stale"], 0, "{stats}");
}

/// A node: an Asterisk with its node-agent asking `control_port` for devices.
struct RealtimeNode {
    asterisk: Asterisk,
    provisioning_port: u16,
    _agent: Running,
}

impl RealtimeNode {
    fn start(dir: &Path, id: &str, url: &str, control_port: u16) -> Self {
        Self::start_with(dir, id, url, control_port, &[])
    }

    /// [`RealtimeNode::start`] with more of callfleet's configuration of the node
    /// (`CALLFLEET_…` variables, for `callfleet asterisk-config` and the node-agent alike),
    /// and the node-agent's log in `dir/agent.log`.
    fn start_with(
        dir: &Path,
        id: &str,
        url: &str,
        control_port: u16,
        more: &[(&str, String)],
    ) -> Self {
        let provisioning_port = free_port();
        let mut env: Vec<(&str, String)> = vec![
            (
                "CALLFLEET_PROVISIONING__LISTEN",
                format!("127.0.0.1:{provisioning_port}"),
            ),
            (
                "CALLFLEET_PROVISIONING__CONTROL_PLANE",
                format!("http://127.0.0.1:{control_port}"),
            ),
            ("CALLFLEET_PROVISIONING__TOKEN", NODE_TOKEN.to_owned()),
        ];
        env.extend(more.iter().cloned());
        let asterisk = Asterisk::start_with(&dir.join("pbx"), &env, None);
        let agent = Running {
            child: callfleet()
                .arg("node-agent")
                .envs(Asterisk::node_env(
                    &prefix(),
                    asterisk.sip_port,
                    asterisk.ami_port,
                ))
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .env("CALLFLEET_STORE__URL", url)
                .env("CALLFLEET_NODE__ID", id)
                // Where a balancer's 302 sends the carrier's calls for this node: its PBX.
                .env(
                    "CALLFLEET_NODE__SIP_URI",
                    format!("sip:127.0.0.1:{}", asterisk.sip_port),
                )
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("agent.log")).expect("agent log"))
                .spawn()
                .expect("start node-agent"),
        };
        wait_until(
            "the provisioning endpoint answers",
            Duration::from_secs(20),
            || http(provisioning_port, "GET", "/stats", "", "").is_some_and(|(s, _)| s == 200),
        );
        Self {
            asterisk,
            provisioning_port,
            _agent: agent,
        }
    }
}

/// Registrations are the cluster's, not a node's: a phone registered on node A is rung for
/// calls that land on node B, and when it registers again on node B instead, node A rings it
/// at its new address. New credentials hold on both nodes at once: the old password is
/// refused everywhere, the new one accepted.
#[test]
#[ignore = "needs Asterisk: run ./scripts/test-asterisk"]
fn a_phone_registered_on_one_node_is_rung_from_the_other() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/fleet.db", dir.path().display());
    let control_port = free_port();
    let _control = control_plane(&url, control_port, &dir.path().join("control.log"));
    let answer = http(
        control_port,
        "PUT",
        "/api/v1/devices/2002",
        CRM_TOKEN,
        r#"{"endpoint":"PJSIP/2002","password":"s3cret-2002"}"#,
    );
    assert!(matches!(&answer, Some((200, _))), "{answer:?}");
    let a = RealtimeNode::start(&dir.path().join("a"), "pbx-a", &url, control_port);
    let b = RealtimeNode::start(&dir.path().join("b"), "pbx-b", &url, control_port);

    let on_a = free_port();
    let phone = registering_phone(
        &dir.path().join("phone-a"),
        "2002",
        "s3cret-2002",
        a.asterisk.sip_port,
        on_a,
        Duration::from_secs(120),
    );
    wait_until(
        "the registration on A reaches the control plane",
        Duration::from_secs(20),
        || {
            registrations(control_port, "2002")
                .is_some_and(|rows| rows.contains(&format!("{PHONES}%3A{on_a}")))
        },
    );
    assert_eq!(
        call(&dir.path().join("call-b"), "2002", b.asterisk.sip_port, 3),
        (3, 0),
        "rung from B"
    );
    // Switched off: only the new registration can answer from here on.
    drop(phone);

    let on_b = free_port();
    let _moved = registering_phone(
        &dir.path().join("phone-b"),
        "2002",
        "s3cret-2002",
        b.asterisk.sip_port,
        on_b,
        Duration::from_secs(120),
    );
    wait_until(
        "the registration on B replaces the one on A",
        Duration::from_secs(20),
        || {
            registrations(control_port, "2002").is_some_and(|rows| {
                rows.lines().count() == 1 && rows.contains(&format!("{PHONES}%3A{on_b}"))
            })
        },
    );
    assert_eq!(
        call(&dir.path().join("call-a"), "2002", a.asterisk.sip_port, 3),
        (3, 0),
        "rung from A at its new address"
    );

    // New credentials: no node keeps the old ones.
    let answer = http(
        control_port,
        "PUT",
        "/api/v1/devices/2002",
        CRM_TOKEN,
        r#"{"endpoint":"PJSIP/2002","password":"n3w-s3cret"}"#,
    );
    assert!(matches!(&answer, Some((200, _))), "{answer:?}");
    for (node, password, accepted) in [
        (&a, "s3cret-2002", false),
        (&b, "s3cret-2002", false),
        (&a, "n3w-s3cret", true),
        (&b, "n3w-s3cret", true),
    ] {
        let folder = dir
            .path()
            .join(format!("phone-{password}-{}", node.asterisk.sip_port));
        let mut phone = registering_phone(
            &folder,
            "2002",
            password,
            node.asterisk.sip_port,
            free_port(),
            Duration::from_millis(200),
        );
        let exit = wait_exit("the registration", &mut phone, Duration::from_secs(20));
        assert_eq!(
            exit.success(),
            accepted,
            "{password} on port {}",
            node.asterisk.sip_port
        );
    }
    for node in [&a, &b] {
        let stats = provisioning_stats(node.provisioning_port);
        assert_eq!(
            (stats["stale"].as_u64(), stats["pending"].as_u64()),
            (Some(0), Some(0)),
            "{stats}"
        );
    }
}

// ---- queued calls ----------------------------------------------------------------------

/// The dialled number of queue `sales` on every node.
const SALES_NUMBER: &str = "5000";

/// `callfleet lock-service` at `port` on Redis at `redis`, or on the memory backend, with
/// leases of 10 s at most (the node-agent asks for 10 s) and the shortest quarantine that
/// allows.
fn lock_service(port: u16, redis: Option<&str>, log: &Path) -> Running {
    let child = callfleet()
        .arg("lock-service")
        .env(
            "CALLFLEET_LOCK_SERVICE__LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .envs(match redis {
            Some(url) => vec![
                ("CALLFLEET_LOCK_SERVICE__BACKEND", "redis".to_owned()),
                ("CALLFLEET_LOCK_SERVICE__REDIS_URL", url.to_owned()),
            ],
            None => vec![("CALLFLEET_LOCK_SERVICE__BACKEND", "memory".to_owned())],
        })
        .env("CALLFLEET_LOCK_SERVICE__MAX_VALIDITY", "10s")
        .env("CALLFLEET_LOCK_SERVICE__GUARD", "500ms")
        .env("CALLFLEET_LOCK_SERVICE__QUARANTINE", "11s")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("lock service log"))
        .spawn()
        .expect("start the lock service");
    Running { child }
}

/// A node taking queued calls: a [`RealtimeNode`] whose dialplan has queue `sales` on
/// [`SALES_NUMBER`], whose node-agent serves FastAGI and takes leases and the waiting order
/// from the lock service at `lock_port` (log in JSON), with `more` settings on top.
fn queue_node(
    dir: &Path,
    id: &str,
    url: &str,
    control_port: u16,
    lock_port: u16,
    more: &[(&str, String)],
) -> RealtimeNode {
    let mut env: Vec<(&str, String)> = vec![
        (
            "CALLFLEET_NODE__AGI__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        ),
        ("CALLFLEET_ASTERISK__QUEUES__5000", "sales".to_owned()),
        (
            "CALLFLEET_NODE__QUEUE__LOCK_SERVICE",
            format!("http://127.0.0.1:{lock_port}"),
        ),
        ("CALLFLEET_NODE__QUEUE__RING_TIMEOUT", "6s".to_owned()),
        ("CALLFLEET_NODE__QUEUE__WRAP_UP", "1s".to_owned()),
        ("CALLFLEET_NODE__QUEUE__MAX_MISSES", "2".to_owned()),
        ("CALLFLEET_NODE__QUEUE__MAX_WAIT", "600s".to_owned()),
        ("CALLFLEET_LOG__FORMAT", "json".to_owned()),
    ];
    env.extend(more.iter().cloned());
    std::fs::create_dir_all(dir).expect("node folder");
    RealtimeNode::start_with(dir, id, url, control_port, &env)
}

/// An agent's desk phone (SIPp UAS on [`PHONES`]`:port`) that answers (`agent_phone.xml`)
/// or never does (`agent_phone_silent.xml`), logging each call's arrival and end.
fn agent_phone(dir: &Path, port: u16, scenario: &str) -> Running {
    let scenarios = support::checkout().join("tests/sipp");
    std::fs::create_dir_all(dir).expect("phone folder");
    let child = sipp()
        .current_dir(dir)
        .arg("-sf")
        .arg(scenarios.join(scenario))
        .args(["-i", PHONES, "-p", &port.to_string()])
        .args(["-trace_logs", "-log_file", "calls.log", "-nostdin"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("out")).expect("phone output"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start the SIPp agent phone");
    Running { child }
}

/// One call at a phone: when its INVITE arrived, when it was answered (if it was) and
/// when it ended, in ms of the phone's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PhoneCall {
    invite: u64,
    answered: Option<u64>,
    ended: Option<u64>,
}

/// The calls a phone logged, in order of arrival.
fn phone_calls(dir: &Path) -> Vec<PhoneCall> {
    let log = std::fs::read_to_string(dir.join("calls.log")).unwrap_or_default();
    let mut calls: Vec<(String, PhoneCall)> = Vec::new();
    for line in log.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [what, call_id, tick] = words[..] else {
            continue;
        };
        let tick: u64 = tick.parse().expect("a clock tick");
        match what {
            "invite" => calls.push((
                call_id.to_owned(),
                PhoneCall {
                    invite: tick,
                    answered: None,
                    ended: None,
                },
            )),
            "answered" | "ended" => {
                let (_, call) = calls
                    .iter_mut()
                    .find(|(id, _)| id == call_id)
                    .unwrap_or_else(|| panic!("{what} of a call that never arrived: {line}"));
                if what == "answered" {
                    call.answered = Some(tick);
                } else {
                    call.ended = Some(tick);
                }
            }
            _ => {}
        }
    }
    calls.into_iter().map(|(_, call)| call).collect()
}

/// What a run of [`queue_scenario`] saw.
#[derive(Debug)]
struct QueueRun {
    /// Per carrier: calls placed, completed, failed.
    carriers: Vec<(u64, u64, u64)>,
    /// Per phone (agent id): the calls it logged.
    phones: Vec<(&'static str, Vec<PhoneCall>)>,
    /// The agents' views in the control plane after the run.
    views: Vec<serde_json::Value>,
}

impl QueueRun {
    /// Pairs of calls one phone had at the same time (a ring counts).
    fn double_rings(&self) -> Vec<(&'static str, PhoneCall, PhoneCall)> {
        let mut doubles = Vec::new();
        for (agent, calls) in &self.phones {
            for (i, first) in calls.iter().enumerate() {
                let end = first.ended.unwrap_or(u64::MAX);
                for second in &calls[i + 1..] {
                    if second.invite < end {
                        doubles.push((*agent, first.clone(), second.clone()));
                    }
                }
            }
        }
        doubles
    }
}

/// A call center for queued calls: a control plane, a lock service, queue `sales` with
/// agents on desk phones, and nodes taking its calls.
struct QueueSite {
    dir: tempfile::TempDir,
    url: String,
    control: Option<Running>,
    redis: Option<support::redis_server::Redis>,
    control_port: u16,
    locks: Running,
    nodes: Vec<RealtimeNode>,
    /// Agent id, the phone's folder, the phone.
    phones: Vec<(&'static str, PathBuf, Running)>,
    /// The carrier's SBC and the nodes' balancers, once [`QueueSite::put_carrier_in_front`].
    front: Option<CarrierFront>,
}

/// What stands between a carrier and a [`QueueSite`]'s nodes: Kamailio as the carrier's SBC
/// (`tests/kamailio/carrier.cfg`) with every node's `callfleet balancer` on its failover
/// list, node 0's first.
struct CarrierFront {
    carrier: Carrier,
    /// Per node (in the site's order): the balancer's port and process.
    balancers: Vec<(u16, Option<Running>)>,
}

impl QueueSite {
    /// `agents` as (id, priority in `sales`, phone scenario), each logged in on a device
    /// of its own; `nodes` nodes with `node_env` added to their configuration. Returns
    /// once the lock service's startup quarantine is over.
    fn start(
        agents: &[(&'static str, i32, &str)],
        nodes: usize,
        node_env: &[(&str, String)],
    ) -> Self {
        Self::start_with(agents, nodes, node_env, false)
    }

    /// [`QueueSite::start`] with the lock service on a Redis of the site's own when
    /// `on_redis`.
    fn start_with(
        agents: &[(&'static str, i32, &str)],
        nodes: usize,
        node_env: &[(&str, String)],
        on_redis: bool,
    ) -> Self {
        // CALLFLEET_TEST_KEEP=1 keeps the site's folder (logs, captures) for a post-mortem.
        let dir = tempfile::Builder::new()
            .disable_cleanup(std::env::var_os("CALLFLEET_TEST_KEEP").is_some())
            .tempdir()
            .expect("temp dir");
        eprintln!("queue site in {}", dir.path().display());
        let url = format!("sqlite://{}/fleet.db", dir.path().display());
        let control_port = free_port();
        let control = control_plane(&url, control_port, &dir.path().join("control.log"));
        let redis = on_redis.then(|| support::redis_server::Redis::start(dir.path()));
        let lock_port = free_port();
        let locks = lock_service(
            lock_port,
            redis.as_ref().map(|r| r.url()).as_deref(),
            &dir.path().join("locks.log"),
        );
        let quarantine_ends = std::time::Instant::now() + Duration::from_secs(12);
        let put = |path: &str, body: &str| {
            let answer = http(control_port, "PUT", path, CRM_TOKEN, body);
            assert!(matches!(&answer, Some((200, _))), "PUT {path}: {answer:?}");
        };
        put("/api/v1/queues/sales", r#"{"name":"Sales"}"#);
        let mut phones = Vec::new();
        for &(agent, priority, scenario) in agents {
            let port = free_port();
            let phone_dir = dir.path().join(format!("phone-{agent}"));
            phones.push((
                agent,
                phone_dir.clone(),
                agent_phone(&phone_dir, port, scenario),
            ));
            put(
                &format!("/api/v1/devices/{agent}"),
                &format!(
                    r#"{{"endpoint":"PJSIP/{agent}","contact":"sip:{agent}@{PHONES}:{port}"}}"#
                ),
            );
            put(
                &format!("/api/v1/agents/{agent}"),
                &format!(r#"{{"name":"Agent {agent}"}}"#),
            );
            put(
                &format!("/api/v1/queues/sales/members/{agent}"),
                &format!(r#"{{"priority":{priority}}}"#),
            );
            let answer = http(
                control_port,
                "POST",
                &format!("/api/v1/agents/{agent}/login"),
                CRM_TOKEN,
                &format!(r#"{{"device":"{agent}"}}"#),
            );
            assert!(
                matches!(&answer, Some((200, _))),
                "login {agent}: {answer:?}"
            );
        }
        let nodes = (0..nodes)
            .map(|n| {
                let name = format!("pbx-{n}");
                queue_node(
                    &dir.path().join(&name),
                    &name,
                    &url,
                    control_port,
                    lock_port,
                    node_env,
                )
            })
            .collect();
        std::thread::sleep(quarantine_ends.saturating_duration_since(std::time::Instant::now()));
        Self {
            dir,
            url,
            control: Some(control),
            redis,
            control_port,
            locks,
            nodes,
            phones,
            front: None,
        }
    }

    /// Puts a carrier in front of the nodes: a `callfleet balancer` on each node (proxying
    /// its own calls to its Asterisk, answering 302 with the other node's PBX, choosing by
    /// the live call counts the node-agents heartbeat), and Kamailio as the carrier's SBC
    /// with the balancers as its failover list, whose calls may ring for 120 s. Returns
    /// once every node is fresh with its PBX up and every balancer routes calls.
    fn put_carrier_in_front(&mut self) {
        let mut balancers = Vec::new();
        for (n, pbx) in self.nodes.iter().enumerate() {
            let id = format!("pbx-{n}");
            let log = self.dir.path().join(format!("{id}/balancer.log"));
            let mut taken = Vec::new();
            let started = (0..3).find_map(|_| {
                let port = free_port();
                let mut command = callfleet();
                command
                    .arg("balancer")
                    .envs(Asterisk::node_env(
                        &prefix(),
                        pbx.asterisk.sip_port,
                        pbx.asterisk.ami_port,
                    ))
                    .env("CALLFLEET_STORE__URL", &self.url)
                    .env("CALLFLEET_NODE__ID", &id)
                    .env("CALLFLEET_LOG__FORMAT", "json")
                    .env("CALLFLEET_BALANCER__LISTEN", format!("127.0.0.1:{port}"))
                    // The carrier (Kamailio on loopback) may call.
                    .env("CALLFLEET_BALANCER__ALLOW", r#"["127.0.0.1"]"#)
                    .env("CALLFLEET_BALANCER__REFRESH", "100ms")
                    .env("CALLFLEET_BALANCER__HEARTBEAT_TTL", "3s")
                    // Both nodes share this host's CPU: choice by live calls alone.
                    .env("CALLFLEET_BALANCER__CPU_WEIGHT", "0.0");
                match start_balancer(command, &log, &id) {
                    Ok(balancer) => Some((port, Some(balancer))),
                    Err(why) => {
                        taken.push(why);
                        None
                    }
                }
            });
            balancers.push(started.unwrap_or_else(|| {
                panic!("the balancer of {id} found no free port 3 times: {taken:?}")
            }));
        }
        let ids: Vec<String> = (0..self.nodes.len()).map(|n| format!("pbx-{n}")).collect();
        wait_until(
            "every node fresh, its PBX up, no calls",
            Duration::from_secs(30),
            || {
                let seen = status(&self.url);
                ids.iter().all(|id| {
                    node(&seen, id).is_some_and(|n| {
                        n["stale"] == false && n["pbx_up"] == true && n["calls"] == 0
                    })
                })
            },
        );
        for (port, _) in &balancers {
            wait_until(
                &format!("the balancer on {port} routes calls"),
                Duration::from_secs(15),
                || sip_options_status(*port) == Some(200),
            );
        }
        let ports: Vec<u16> = balancers.iter().map(|(port, _)| *port).collect();
        let carrier = Carrier::start_with(
            &self.dir.path().join("carrier"),
            &ports,
            Duration::from_secs(120),
        );
        // The balancers re-read the store every 100 ms: let both see both nodes.
        std::thread::sleep(Duration::from_millis(500));
        self.front = Some(CarrierFront { carrier, balancers });
    }

    /// The carrier's SBC, once [`QueueSite::put_carrier_in_front`].
    fn front(&self) -> &CarrierFront {
        self.front.as_ref().expect("a carrier in front of the site")
    }

    /// Stops the balancer of node `node` (SIGTERM) and returns its counters.
    fn stop_balancer(&mut self, node: usize) -> BalancerCounters {
        let front = self.front.as_mut().expect("a carrier in front of the site");
        let balancer = front.balancers[node].1.take().expect("the balancer runs");
        let log = self.dir.path().join(format!("pbx-{node}/balancer.log"));
        stop_balancer(balancer, &log, &format!("pbx-{node}"))
    }

    /// A SIPp carrier placing `calls` queued callers (`uac_queue_call.xml`: they talk until
    /// the agent hangs up) on node `node`, one every `every`, with `attributes` in their
    /// X-Callfleet-Attributes header, calling from `caller-1`, `caller-2`….
    fn queued_callers(
        &self,
        name: &str,
        node: usize,
        calls: u32,
        every: Duration,
        attributes: &str,
    ) -> (PathBuf, Running) {
        let port = self.nodes[node].asterisk.sip_port;
        self.queued_callers_from(name, port, calls, every, attributes, "caller-")
    }

    /// The carrier's queued callers as [`QueueSite::queued_callers`] places them, sent to
    /// the carrier's SBC instead of a node ([`QueueSite::put_carrier_in_front`]).
    fn queued_callers_through_carrier(
        &self,
        name: &str,
        calls: u32,
        every: Duration,
    ) -> (PathBuf, Running) {
        let port = self.front().carrier.port;
        self.queued_callers_from(name, port, calls, every, "", "caller-")
    }

    /// [`QueueSite::queued_callers`] at loopback `port` (a node's PBX, or the carrier's
    /// SBC), calling from `caller` followed by the call's number (1, 2…).
    fn queued_callers_from(
        &self,
        name: &str,
        port: u16,
        calls: u32,
        every: Duration,
        attributes: &str,
        caller: &str,
    ) -> (PathBuf, Running) {
        let scenario = support::checkout().join("tests/sipp/uac_queue_call.xml");
        self.spawn_carrier(
            name,
            port,
            &[
                "-sf",
                &scenario.display().to_string(),
                "-key",
                "attributes",
                attributes,
                "-key",
                "caller",
                caller,
                "-m",
                &calls.to_string(),
                "-r",
                "1",
                "-rp",
                &every.as_millis().to_string(),
                "-l",
                "1000",
                "-recv_timeout",
                "600000",
                "-timeout",
                "900s",
                // Statistics every second: a carrier killed mid-run leaves what it placed.
                "-fd",
                "1",
            ],
        )
    }

    /// [`QueueSite::queued_callers`] on each node (folders `carrier-0`, `carrier-1`…),
    /// without attributes.
    fn queued_callers_on_each_node(&self, calls: u32, every: Duration) -> Vec<(PathBuf, Running)> {
        (0..self.nodes.len())
            .map(|node| self.queued_callers(&format!("carrier-{node}"), node, calls, every, ""))
            .collect()
    }

    /// A lease lost while ringing must have been cut, and no bridge went without the fence:
    /// the node-agents logged neither.
    fn assert_no_ring_without_a_lease(&self) {
        for n in 0..self.nodes.len() {
            let log = std::fs::read_to_string(self.dir.path().join(format!("pbx-{n}/agent.log")))
                .expect("the node-agent's log");
            for unsafe_line in ["could not be hung up", "bridged without the fence"] {
                assert!(!log.contains(unsafe_line), "pbx-{n}: {unsafe_line}");
            }
        }
    }

    /// A SIPp carrier placing `calls` calls to [`SALES_NUMBER`] on node `node`, one every
    /// `every`, each caller talking `talk` once answered; `name` is its folder.
    fn carrier(
        &self,
        name: &str,
        node: usize,
        calls: u32,
        every: Duration,
        talk: Duration,
    ) -> (PathBuf, Running) {
        self.spawn_carrier(
            name,
            self.nodes[node].asterisk.sip_port,
            &[
                "-sn",
                "uac",
                "-m",
                &calls.to_string(),
                "-r",
                "1",
                "-rp",
                &every.as_millis().to_string(),
                "-d",
                &talk.as_millis().to_string(),
                "-recv_timeout",
                "90000",
                "-timeout",
                "150s",
            ],
        )
    }

    /// SIPp calling [`SALES_NUMBER`] at loopback `port` (a node's PBX, or the carrier's
    /// SBC) with `scenario` (its arguments), from the folder `name`, keeping its statistics
    /// and errors there.
    fn spawn_carrier(&self, name: &str, port: u16, scenario: &[&str]) -> (PathBuf, Running) {
        let carrier_dir = self.dir.path().join(name);
        std::fs::create_dir_all(&carrier_dir).expect("carrier folder");
        let child = sipp()
            .current_dir(&carrier_dir)
            .args(scenario)
            .args(["-s", SALES_NUMBER])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-i", "127.0.0.1", "-p", &free_port().to_string()])
            .args(["-nostdin", "-trace_stat", "-stf", "stats.csv"])
            .args(["-trace_err", "-error_file", "errors.log"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the SIPp carrier");
        (carrier_dir, Running { child })
    }

    /// The calls the phone of `agent` logged.
    fn phone_calls(&self, agent: &str) -> Vec<PhoneCall> {
        let (_, dir, _) = self
            .phones
            .iter()
            .find(|(id, _, _)| *id == agent)
            .unwrap_or_else(|| panic!("no phone of {agent}"));
        phone_calls(dir)
    }

    /// Waits for `carriers` (folder, process, calls placed) and asserts that each call was
    /// answered by an agent, that every phone took exactly the answered calls, and that no
    /// phone ever had two calls at once (a ring counts). Returns the phones' calls.
    fn every_call_answered_once(
        &self,
        carriers: Vec<(PathBuf, Running, u64)>,
    ) -> Vec<(&'static str, Vec<PhoneCall>)> {
        let mut placed = 0;
        for (carrier_dir, mut carrier, calls) in carriers {
            wait_exit(
                "the carrier's calls",
                &mut carrier,
                Duration::from_secs(900),
            );
            let stats = SippStats::read(&carrier_dir.join("stats.csv")).expect("carrier stats");
            assert_eq!(
                (stats.outgoing, stats.successful, stats.failed),
                (calls, calls, 0),
                "{}: every call answered by an agent",
                carrier_dir.display()
            );
            placed += calls;
        }
        let phones: Vec<(&'static str, Vec<PhoneCall>)> = self
            .phones
            .iter()
            .map(|(agent, dir, _)| (*agent, phone_calls(dir)))
            .collect();
        let run = QueueRun {
            carriers: Vec::new(),
            phones: phones.clone(),
            views: Vec::new(),
        };
        assert_eq!(
            run.double_rings(),
            Vec::new(),
            "no phone had two calls at once"
        );
        let answered: usize = phones
            .iter()
            .map(|(_, calls)| calls.iter().filter(|c| c.answered.is_some()).count())
            .sum();
        assert_eq!(answered as u64, placed, "calls answered at the phones");
        phones
    }

    /// Stops the control plane (kill -9).
    fn stop_control(&mut self) {
        if let Some(mut control) = self.control.take() {
            control.signal("KILL");
            let _ = control.child.wait();
        }
    }

    /// Starts the control plane again on its port and store.
    fn start_control(&mut self) {
        self.control = Some(control_plane(
            &self.url,
            self.control_port,
            &self.dir.path().join("control.log"),
        ));
    }

    /// PUT of `body` to the control plane's `path`, which must answer 200.
    fn put(&self, path: &str, body: &str) {
        let answer = http(self.control_port, "PUT", path, CRM_TOKEN, body);
        assert!(matches!(&answer, Some((200, _))), "PUT {path}: {answer:?}");
    }

    /// The queued-call lines of every node-agent's JSON log: `ringing` and `answered`.
    fn queue_log(&self) -> Vec<serde_json::Value> {
        let mut lines = Vec::new();
        for n in 0..self.nodes.len() {
            let log = std::fs::read_to_string(self.dir.path().join(format!("pbx-{n}/agent.log")))
                .expect("the node-agent's log");
            lines.extend(
                log.lines()
                    .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                    .filter(|line| line["message"] == "ringing" || line["message"] == "answered"),
            );
        }
        // RFC 3339 UTC with the same precision sorts as text.
        lines.sort_by(|a, b| a["timestamp"].as_str().cmp(&b["timestamp"].as_str()));
        lines
    }

    /// Today's (answered, abandoned, overflowed) of queue `sales` in its public status.
    fn queue_figures(&self) -> (u64, u64, u64) {
        let Some((200, body)) = http(
            self.control_port,
            "GET",
            "/api/v1/queues/sales/status",
            CRM_TOKEN,
            "",
        ) else {
            return (u64::MAX, u64::MAX, u64::MAX);
        };
        let status: serde_json::Value = serde_json::from_str(&body).expect("a status is JSON");
        let count = |field: &str| status[field].as_u64().unwrap_or(u64::MAX);
        (
            count("answered_today"),
            count("abandoned_today"),
            count("overflowed_today"),
        )
    }

    /// Asserts that `agent`, whose phone never answers, was rung `max_misses` (2) times
    /// (`rings`, its phone's calls), none answered, and is paused as `missed` in the
    /// control plane.
    fn assert_paused_as_missed(&self, agent: &str, rings: &[PhoneCall]) {
        assert_eq!(rings.len(), 2, "{agent} rang max_misses times: {rings:?}");
        assert_eq!(
            rings.iter().filter(|ring| ring.answered.is_some()).count(),
            0,
            "{agent} never answers: {rings:?}"
        );
        let view = self.agent(agent);
        assert_eq!(
            (&view["state"], &view["pause_reason"], &view["missed_today"]),
            (
                &serde_json::json!("paused"),
                &serde_json::json!("missed"),
                &serde_json::json!(2)
            ),
            "{view}"
        );
    }

    /// The agent as the control plane shows it.
    fn agent(&self, agent: &str) -> serde_json::Value {
        let (status, body) = http(
            self.control_port,
            "GET",
            &format!("/api/v1/agents/{agent}"),
            CRM_TOKEN,
            "",
        )
        .expect("the control plane answers");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("an agent is JSON")
    }
}

/// Carrier calls to queue `sales` on two nodes, `calls_per_node` each (a call a second
/// per node, each caller talking 3 s once answered), with four agents on desk phones:
/// 701–703 answer after 1–2 s, 704 never answers and has the best priority. `unsafe_queue`
/// goes to the node-agents' `CALLFLEET_TEST_UNSAFE_QUEUE`.
fn queue_scenario(calls_per_node: u32, unsafe_queue: Option<&str>) -> QueueRun {
    let agents = [
        ("701", 1, "agent_phone.xml"),
        ("702", 2, "agent_phone.xml"),
        ("703", 3, "agent_phone.xml"),
        ("704", 0, "agent_phone_silent.xml"),
    ];
    let unsafe_env: Vec<(&str, String)> = unsafe_queue
        .map(|name| ("CALLFLEET_TEST_UNSAFE_QUEUE", name.to_owned()))
        .into_iter()
        .collect();
    let site = QueueSite::start(&agents, 2, &unsafe_env);
    let carriers: Vec<(PathBuf, Running)> = (0..2)
        .map(|node| {
            site.carrier(
                &format!("carrier-{node}"),
                node,
                calls_per_node,
                Duration::from_secs(1),
                Duration::from_secs(3),
            )
        })
        .collect();
    let carriers = carriers
        .into_iter()
        .map(|(carrier_dir, mut carrier)| {
            wait_exit(
                "the carrier's calls",
                &mut carrier,
                Duration::from_secs(160),
            );
            let stats = SippStats::read(&carrier_dir.join("stats.csv")).expect("carrier stats");
            (stats.outgoing, stats.successful, stats.failed)
        })
        .collect();
    QueueRun {
        carriers,
        phones: agents
            .iter()
            .map(|(agent, _, _)| (*agent, site.phone_calls(agent)))
            .collect(),
        views: agents
            .iter()
            .map(|(agent, _, _)| site.agent(agent))
            .collect(),
    }
}

/// Carrier calls to queue `sales` on two nodes with four agents on desk phones: every
/// call is answered, no phone ever has two calls at once (a ring counts), the agent with
/// the best priority rings first, the agent who never answers is paused as `missed` after
/// two rings, and every answered call is counted once in the control plane.
#[test]
#[ignore = "needs Asterisk: run ./scripts/test-asterisk"]
fn queued_calls_on_two_nodes_ring_one_free_agent_at_a_time() {
    const CALLS_PER_NODE: u64 = 5;
    let run = queue_scenario(CALLS_PER_NODE as u32, None);
    assert_eq!(
        run.carriers,
        vec![(CALLS_PER_NODE, CALLS_PER_NODE, 0); 2],
        "every call answered by an agent"
    );
    assert_eq!(
        run.double_rings(),
        Vec::new(),
        "no phone had two calls at once"
    );
    let answered: usize = run
        .phones
        .iter()
        .map(|(_, calls)| calls.iter().filter(|c| c.answered.is_some()).count())
        .sum();
    assert_eq!(
        answered as u64,
        2 * CALLS_PER_NODE,
        "calls answered at the phones"
    );
    let first = run
        .phones
        .iter()
        .filter_map(|(agent, calls)| calls.first().map(|c| (c.invite, *agent)))
        .min();
    assert_eq!(
        first.map(|(_, agent)| agent),
        Some("704"),
        "the best priority rings first"
    );
    let silent = &run
        .phones
        .iter()
        .find(|(agent, _)| *agent == "704")
        .expect("704")
        .1;
    assert_eq!(
        silent.len(),
        2,
        "the silent agent rang max_misses times: {silent:?}"
    );
    let view = |agent: &str| {
        run.views
            .iter()
            .find(|v| v["id"] == agent)
            .unwrap_or_else(|| panic!("no view of {agent}: {:?}", run.views))
    };
    let silent = view("704");
    assert_eq!(
        (
            &silent["state"],
            &silent["pause_reason"],
            &silent["missed_today"]
        ),
        (
            &serde_json::json!("paused"),
            &serde_json::json!("missed"),
            &serde_json::json!(2)
        ),
        "{silent}"
    );
    let counted: u64 = ["701", "702", "703"]
        .iter()
        .map(|agent| view(agent)["calls_today"].as_u64().expect("calls_today"))
        .sum();
    assert_eq!(
        counted,
        2 * CALLS_PER_NODE,
        "calls counted in the control plane"
    );
}

/// The negative control of [`queued_calls_on_two_nodes_ring_one_free_agent_at_a_time`]:
/// with every caller leasing its own copy of each agent, the two nodes ring the same
/// agent for two callers at once.
#[test]
#[ignore = "needs Asterisk: run ./scripts/test-asterisk"]
fn without_shared_leases_two_nodes_ring_one_agent_twice() {
    let run = queue_scenario(3, Some("private_leases"));
    assert_ne!(run.double_rings(), Vec::new(), "{run:?}");
}

/// Queued calls the way the carrier sends them: SIPp as the carrier's callers places 24
/// calls to queue `sales`, one a second, into Kamailio (the carrier's SBC), which hands each
/// to the first balancer of its list (node 0's); that balancer proxies the call to its own
/// Asterisk or answers 302 with node 1's PBX, whichever carries fewer live calls, and the
/// SBC follows. Each Asterisk hands the call to its node-agent's FastAGI `queue` script,
/// which rings agents one at a time through the lock service: 721–723 answer after 1–3 s,
/// talk 2–6 s and hang up (their BYE goes back to the caller through the SBC, and through
/// balancer 0 for node 0's calls); 724 never answers and has the best priority. Callers
/// come faster than three agents serve them, so a queue builds and the last callers wait
/// past the SBC's default 30 s of ringing (this SBC allows 120 s). Asserted exactly: every
/// call answered by an agent; the calls each node took, told alike by the node-agents'
/// `answered` lines, the SBC's redirects and answers and balancer 0's counters (and both
/// nodes took some); no phone ever with two calls at once; 724 rung twice and paused as
/// `missed`; each agent's calls in the control plane equal to the calls its phone answered.
#[test]
#[ignore = "needs Asterisk: run ./scripts/test-asterisk"]
fn queued_calls_through_the_carrier_and_the_balancers_ring_one_free_agent_at_a_time() {
    const CALLS: u64 = 24;
    let begun = std::time::Instant::now();
    let agents = [
        ("721", 1, "agent_phone_hangs_up.xml"),
        ("722", 2, "agent_phone_hangs_up.xml"),
        ("723", 3, "agent_phone_hangs_up.xml"),
        ("724", 0, "agent_phone_silent.xml"),
    ];
    // Heartbeats every 300 ms: the balancers see each node's live calls within a second.
    let heartbeat = [("CALLFLEET_NODE__HEARTBEAT_INTERVAL", "300ms".to_owned())];
    let mut site = QueueSite::start(&agents, 2, &heartbeat);
    site.put_carrier_in_front();
    eprintln!("site up after {:?}", begun.elapsed());
    let (callers_dir, callers) =
        site.queued_callers_through_carrier("callers", CALLS as u32, Duration::from_secs(1));
    let phones = site.every_call_answered_once(vec![(callers_dir, callers, CALLS)]);
    eprintln!("calls over after {:?}", begun.elapsed());
    site.assert_no_ring_without_a_lease();

    // Where the calls landed, three ways: the node-agents that answered them (a waiter is
    // `node/uniqueid`), the SBC's log, and balancer 0's counters.
    let answered_on = |id: &str| {
        site.queue_log()
            .iter()
            .filter(|line| line["message"] == "answered")
            .filter(|line| {
                line["waiter"]
                    .as_str()
                    .is_some_and(|waiter| waiter.starts_with(&format!("{id}/")))
            })
            .count() as u64
    };
    let (on_0, on_1) = (answered_on("pbx-0"), answered_on("pbx-1"));
    eprintln!("answered on pbx-0: {on_0}, on pbx-1: {on_1}");
    assert_eq!(
        on_0 + on_1,
        CALLS,
        "answered calls in the node-agents' logs"
    );
    assert!(
        on_0 != 0 && on_1 != 0,
        "calls landed on both nodes: {on_0} on pbx-0, {on_1} on pbx-1"
    );
    let front = site.front();
    let balancer_0 = front.balancers[0].0;
    let pbx_1 = format!("127.0.0.1:{}", site.nodes[1].asterisk.sip_port);
    let carrier = &front.carrier;
    assert_eq!(
        tally(&carrier.events("INVITE"), "to"),
        [(format!("127.0.0.1:{balancer_0}"), CALLS as usize)],
        "every call to the first balancer of the carrier's list"
    );
    assert_eq!(
        tally(&carrier.events("REDIRECT"), "to"),
        [(format!("sip:{SALES_NUMBER}@{pbx_1}"), on_1 as usize)],
        "node 1's calls redirected to its PBX"
    );
    let mut answers = vec![
        (format!("127.0.0.1:{balancer_0}"), on_0 as usize),
        (pbx_1, on_1 as usize),
    ];
    answers.sort();
    assert_eq!(
        tally(&carrier.events("ANSWER"), "from"),
        answers,
        "node 0's calls answered through its balancer, node 1's by its PBX"
    );
    for kind in ["FAILOVER", "FAILED"] {
        assert_eq!(carrier.events(kind).len(), 0, "{kind}");
    }
    let counters_0 = site.stop_balancer(0);
    counters_0.assert(&[
        ("invites", CALLS),
        ("local", on_0),
        ("redirected", on_1),
        ("unavailable", 0),
    ]);
    assert_eq!(counters_0.routed(), format!("pbx-0={on_0},pbx-1={on_1}"));
    site.stop_balancer(1).assert(&[("invites", 0)]);

    // The agents: no phone with two calls at once (checked above), the silent one rung
    // max_misses times and paused, every answer counted for its agent.
    let calls_of = |agent: &str| {
        &phones
            .iter()
            .find(|(id, _)| *id == agent)
            .unwrap_or_else(|| panic!("no phone of {agent}"))
            .1
    };
    site.assert_paused_as_missed("724", calls_of("724"));
    for agent in ["721", "722", "723"] {
        let answered = calls_of(agent)
            .iter()
            .filter(|call| call.answered.is_some())
            .count() as u64;
        let view = site.agent(agent);
        assert_eq!(
            view["calls_today"].as_u64(),
            Some(answered),
            "{agent}: calls in the control plane against its phone's answers: {view}"
        );
        eprintln!("{agent} answered {answered}");
    }
    wait_until(
        "every outcome counted in the queue's figures",
        Duration::from_secs(30),
        || site.queue_figures() == (CALLS, 0, 0),
    );
    eprintln!("done after {:?}", begun.elapsed());
}

/// How long after the lock service froze a ring of `site`'s only agent ended, when it did
/// within `limit`. The phone never answers; its ring is long enough to outlast the lease.
fn ring_after_the_lock_service_froze(
    unsafe_queue: Option<&str>,
    limit: Duration,
) -> Option<Duration> {
    let mut env = vec![("CALLFLEET_NODE__QUEUE__RING_TIMEOUT", "60s".to_owned())];
    env.extend(unsafe_queue.map(|name| ("CALLFLEET_TEST_UNSAFE_QUEUE", name.to_owned())));
    let site = QueueSite::start(&[("801", 0, "agent_phone_silent.xml")], 1, &env);
    let _carrier = site.carrier(
        "carrier",
        0,
        1,
        Duration::from_secs(1),
        Duration::from_secs(1),
    );
    wait_until("the agent's phone rings", Duration::from_secs(20), || {
        !site.phone_calls("801").is_empty()
    });
    site.locks.freeze();
    let frozen = std::time::Instant::now();
    let mut ended = None;
    while frozen.elapsed() < limit {
        if site
            .phone_calls("801")
            .first()
            .is_some_and(|call| call.ended.is_some())
        {
            ended = Some(frozen.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    site.locks.signal("CONT");
    let rings = site.phone_calls("801");
    assert_eq!(
        rings.len(),
        1,
        "no second ring while the lock service is away: {rings:?}"
    );
    ended
}

/// A lease lost while the agent's phone rings (the lock service frozen: renewals get no
/// answer) ends the ring over AMI once the lease's validity (10 s) has run out, long before
/// the ring timeout (60 s): no ring goes on without a live lease.
#[test]
#[ignore = "needs Asterisk: run ./scripts/test-asterisk"]
fn a_ring_whose_lease_is_lost_is_hung_up() {
    let ended = ring_after_the_lock_service_froze(None, Duration::from_secs(20))
        .expect("the ring ended within 20 s of the freeze");
    // The last renewal got through at most 3 s (renew_every) before the freeze.
    assert!(
        ended >= Duration::from_secs(6) && ended <= Duration::from_secs(12),
        "the ring ended {ended:?} after the freeze; the lease ends 7–10 s after it"
    );
}

/// The negative control of [`a_ring_whose_lease_is_lost_is_hung_up`]: without the AMI
/// hang-up the ring goes on past the lease.
#[test]
#[ignore = "needs Asterisk: run ./scripts/test-asterisk"]
fn without_the_ring_cancel_a_ring_outlives_its_lease() {
    assert_eq!(
        ring_after_the_lock_service_froze(Some("no_ring_cancel"), Duration::from_secs(20)),
        None
    );
}

/// A CRM's priority change through XML-RPC (Python's `xmlrpc.client`, as the CRMs call
/// it) decides the next ring, on both nodes: calls one at a time (every agent free when a
/// call arrives), two through each node, all to 711 (priority 1 against 712's 2); then
/// 711 is set to 3 and the next four, again two through each node, all go to 712.
#[test]
#[ignore = "needs Asterisk: run ./scripts/test-asterisk"]
fn a_priority_changed_over_xml_rpc_decides_the_next_rings_on_every_node() {
    let agents = [("711", 1, "agent_phone.xml"), ("712", 2, "agent_phone.xml")];
    let site = QueueSite::start(
        &agents,
        2,
        &[("CALLFLEET_NODE__QUEUE__WRAP_UP", "0s".to_owned())],
    );
    let calls_at_the_phones = || {
        agents
            .iter()
            .map(|(agent, _, _)| site.phone_calls(agent).len())
            .collect::<Vec<_>>()
    };
    // Two calls 7 s apart through each node in turn: a call (ring 1–2 s, talk 2 s) and
    // the lease's hold after it (1 s) end before the next call arrives.
    let two_calls_through_each_node = |phase: &str| {
        for node in 0..2 {
            let (dir, mut carrier) = site.carrier(
                &format!("{phase}-{node}"),
                node,
                2,
                Duration::from_secs(7),
                Duration::from_secs(2),
            );
            wait_exit("the carrier's calls", &mut carrier, Duration::from_secs(60));
            let stats = SippStats::read(&dir.join("stats.csv")).expect("carrier stats");
            assert_eq!(
                (stats.outgoing, stats.successful, stats.failed),
                (2, 2, 0),
                "{phase}, node {node}: every call answered"
            );
        }
    };
    two_calls_through_each_node("before");
    assert_eq!(calls_at_the_phones(), [4, 0], "calls at 711 and 712");

    let set_priority = Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, xmlrpc.client\n\
             proxy = xmlrpc.client.ServerProxy(sys.argv[1], headers=[('Authorization', 'Bearer ' + sys.argv[2])])\n\
             print(proxy.agent.setPriority('711', 'sales', 3))",
        )
        .arg(format!("http://127.0.0.1:{}/RPC2", site.control_port))
        .arg(CRM_TOKEN)
        .output()
        .expect("run python3");
    assert!(
        set_priority.status.success(),
        "agent.setPriority: {}",
        String::from_utf8_lossy(&set_priority.stderr)
    );
    let members = http(
        site.control_port,
        "GET",
        "/api/v1/queues/sales/members",
        CRM_TOKEN,
        "",
    );
    let members: serde_json::Value =
        serde_json::from_str(&members.expect("the control plane answers").1).expect("JSON");
    assert_eq!(
        members,
        serde_json::json!([{"agent": "712", "priority": 2}, {"agent": "711", "priority": 3}]),
        "the members after agent.setPriority"
    );
    // The node-agents' candidates are cached for 1 s.
    std::thread::sleep(Duration::from_millis(1500));
    two_calls_through_each_node("after");
    assert_eq!(calls_at_the_phones(), [4, 4], "calls at 711 and 712");
}

/// The issue's load run: 200 calls at about 2 a second over two nodes (a queue builds: six
/// agents answer after 1–3 s and talk 2–6 s, two never answer), ten of them VIP (five by
/// the carrier's header, five by their number on the control plane's list). Asserted:
/// every call answered, no phone ever with two calls at once, the agents' first rings in
/// the routing order (best priority first, the capped agent last whatever its priority),
/// the two silent agents paused as `missed` after exactly two rings each, every answered
/// call counted once, and no caller rung before one who joined the order earlier in the
/// same band, across both nodes.
#[test]
#[ignore = "needs Asterisk: run ./scripts/test-asterisk"]
fn two_hundred_queued_calls_on_two_nodes_ring_in_order_and_never_twice() {
    const NORMAL_PER_NODE: u64 = 95;
    const VIP: u64 = 10;
    let agents = [
        ("807", 0, "agent_phone_silent.xml"),
        ("808", 0, "agent_phone_silent.xml"),
        ("801", 1, "agent_phone_hangs_up.xml"),
        ("802", 2, "agent_phone_hangs_up.xml"),
        ("803", 3, "agent_phone_hangs_up.xml"),
        ("804", 4, "agent_phone_hangs_up.xml"),
        ("805", 5, "agent_phone_hangs_up.xml"),
        // The best priority, but capped at 0 sales a day: the last resort.
        ("806", -5, "agent_phone_hangs_up.xml"),
    ];
    let site = QueueSite::start(&agents, 2, &[]);
    site.put("/api/v1/agents/806/daily-cap", r#"{"daily_cap":0}"#);
    for vip in ["801", "802"] {
        site.put(&format!("/api/v1/agents/{vip}/tags"), r#"{"tags":["vip"]}"#);
    }
    // Candidates are cached for 1 s: let the cap and tags reach both nodes.
    std::thread::sleep(Duration::from_millis(1500));

    let mut carriers: Vec<(PathBuf, Running, u64)> = (0..2)
        .map(|node| {
            let (dir, running) = site.queued_callers(
                &format!("carrier-{node}"),
                node,
                NORMAL_PER_NODE as u32,
                Duration::from_secs(1),
                "",
            );
            (dir, running, NORMAL_PER_NODE)
        })
        .collect();
    // VIP callers join once the first rings are over, one every 8 s: half of them VIP by
    // the carrier's header on node 1, half by their number on the control plane's list,
    // without a header, on node 0.
    for n in 1..=VIP / 2 {
        site.put(
            &format!("/api/v1/callers/+4930555000{n}/attributes"),
            r#"{"attributes":["vip"]}"#,
        );
    }
    std::thread::sleep(Duration::from_secs(15));
    let every = Duration::from_secs(16);
    let (vip_dir, vip_carrier) =
        site.queued_callers("carrier-vip", 1, (VIP / 2) as u32, every, "vip");
    carriers.push((vip_dir, vip_carrier, VIP / 2));
    std::thread::sleep(every / 2);
    let (listed_dir, listed_carrier) = site.queued_callers_from(
        "carrier-vip-listed",
        site.nodes[0].asterisk.sip_port,
        (VIP / 2) as u32,
        every,
        "",
        "+4930555000",
    );
    carriers.push((listed_dir, listed_carrier, VIP / 2));
    let total = 2 * NORMAL_PER_NODE + VIP;
    let phones = site.every_call_answered_once(carriers);
    // The agents' first rings in the order the lock service granted them: a first lease's
    // token is the lock service's clock in µs at the grant (phones and node-agents may see
    // two grants a few ms apart in either order).
    let log = site.queue_log();
    let mut first_rings: Vec<(u64, String)> = Vec::new();
    for line in log.iter().filter(|line| line["message"] == "ringing") {
        let agent = line["agent"].as_str().expect("agent").to_owned();
        let token = line["token"].as_u64().expect("token");
        match first_rings.iter_mut().find(|(_, a)| *a == agent) {
            Some(first) => first.0 = first.0.min(token),
            None => first_rings.push((token, agent)),
        }
    }
    first_rings.sort();
    let order: Vec<&str> = first_rings
        .iter()
        .map(|(_, agent)| agent.as_str())
        .collect();
    assert_eq!(
        order,
        ["807", "808", "801", "802", "803", "804", "805", "806"],
        "first rings"
    );
    for silent in ["807", "808"] {
        let rings = &phones
            .iter()
            .find(|(agent, _)| *agent == silent)
            .expect("silent")
            .1;
        site.assert_paused_as_missed(silent, rings);
    }
    let counted: u64 = ["801", "802", "803", "804", "805", "806"]
        .iter()
        .map(|agent| {
            site.agent(agent)["calls_today"]
                .as_u64()
                .expect("calls_today")
        })
        .sum();
    assert_eq!(counted, total, "calls counted in the control plane");

    // Order across nodes: first rings of normal callers, in the order they were granted,
    // against the order they joined (both on the lock service's clock).
    let mut by_grant: Vec<&serde_json::Value> = log.iter().collect();
    by_grant.sort_by_key(|line| line["token"].as_u64());
    let mut first_ring_of: Vec<(String, u64, String)> = Vec::new();
    let mut vip_agents = Vec::new();
    for line in by_grant {
        let waiter = line["waiter"].as_str().expect("waiter").to_owned();
        if line["message"] == "answered" {
            if let Some((_, _, attributes)) = first_ring_of.iter().find(|(w, _, _)| *w == waiter)
                && attributes == "vip"
            {
                vip_agents.push(line["agent"].as_str().expect("agent").to_owned());
            }
            continue;
        }
        if first_ring_of.iter().all(|(w, _, _)| *w != waiter) {
            let enqueued = line["enqueued_us"].as_u64().expect("enqueued_us");
            let attributes = line["attributes"].as_str().unwrap_or("").to_owned();
            first_ring_of.push((waiter, enqueued, attributes));
        }
    }
    assert_eq!(first_ring_of.len() as u64, total, "callers rung");
    let normal: Vec<u64> = first_ring_of
        .iter()
        .filter(|(_, _, attributes)| attributes.is_empty())
        .map(|(_, enqueued, _)| *enqueued)
        .collect();
    let inversions = normal
        .iter()
        .enumerate()
        .map(|(i, earlier_ring)| {
            normal[i + 1..]
                .iter()
                .filter(|later| *later < earlier_ring)
                .count()
        })
        .sum::<usize>();
    eprintln!("VIP callers answered by: {vip_agents:?}");
    assert_eq!(vip_agents.len() as u64, VIP, "VIP callers answered");
    assert_eq!(inversions, 0, "callers rung out of the order they joined");
    // The queue's figures as the nodes reported each call's outcome to the control plane.
    wait_until(
        "every outcome counted in the queue's figures",
        Duration::from_secs(30),
        || site.queue_figures() == (total, 0, 0),
    );
}

/// Agents on phones that answer after 1–3 s, talk 2–6 s and hang up
/// (`agent_phone_hangs_up.xml`), with priorities 1, 2… in the order given.
fn answering_agents(ids: [&'static str; 8]) -> Vec<(&'static str, i32, &'static str)> {
    ids.into_iter()
        .zip(1..)
        .map(|(agent, priority)| (agent, priority, "agent_phone_hangs_up.xml"))
        .collect()
}

/// Now, as the node-agents' JSON logs write time (RFC 3339, µs, UTC): such strings sort by
/// time.
fn log_time_now() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

/// The issue's faults under load, one after another, on two nodes whose lock service runs
/// on Redis: Redis killed (-9) and started again on its AOF; the lock service frozen 10 s;
/// the control plane killed and started again 30 s later. Asserted: every call answered,
/// no phone ever with two calls at once, rings resume after each fault, no ring went on
/// without a live lease (none had to be cut, or each was), and every answered call is
/// counted once.
#[test]
#[ignore = "needs Asterisk: run ./scripts/test-asterisk"]
fn queued_calls_survive_redis_lock_service_and_control_plane_faults() {
    const PER_NODE: u64 = 45;
    let agents = answering_agents(["901", "902", "903", "904", "905", "906", "907", "908"]);
    let mut site = QueueSite::start_with(&agents, 2, &[], true);
    let carriers = site.queued_callers_on_each_node(PER_NODE as u32, Duration::from_secs(2));
    let mut resumed_after = Vec::new();
    let rung_since = |site: &QueueSite, since: &str| {
        site.queue_log()
            .iter()
            .any(|line| line["message"] == "ringing" && line["timestamp"].as_str() > Some(since))
    };

    std::thread::sleep(Duration::from_secs(12));
    let redis = site.redis.as_mut().expect("the site's Redis");
    redis.kill();
    redis.spawn();
    resumed_after.push(("Redis killed and restarted", log_time_now()));

    std::thread::sleep(Duration::from_secs(20));
    site.locks.freeze();
    std::thread::sleep(Duration::from_secs(10));
    site.locks.signal("CONT");
    resumed_after.push(("lock service frozen 10 s", log_time_now()));

    std::thread::sleep(Duration::from_secs(15));
    site.stop_control();
    std::thread::sleep(Duration::from_secs(30));
    site.start_control();
    resumed_after.push(("control plane stopped 30 s", log_time_now()));

    for (what, since) in &resumed_after {
        wait_until(
            &format!("a ring after: {what}"),
            Duration::from_secs(60),
            || rung_since(&site, since),
        );
    }
    site.every_call_answered_once(
        carriers
            .into_iter()
            .map(|(dir, running)| (dir, running, PER_NODE))
            .collect(),
    );
    site.assert_no_ring_without_a_lease();
    wait_until(
        "every call counted in the control plane",
        Duration::from_secs(30),
        || {
            agents
                .iter()
                .map(|(agent, _, _)| site.agent(agent)["calls_today"].as_u64().unwrap_or(0))
                .sum::<u64>()
                == 2 * PER_NODE
        },
    );
    wait_until(
        "every outcome counted in the queue's figures",
        Duration::from_secs(30),
        || site.queue_figures() == (2 * PER_NODE, 0, 0),
    );
}

/// What [`asterisk_killed_under_load`] saw.
struct KilledRun {
    /// Pairs of calls one phone had at the same time (a ring counts).
    double_rings: Vec<(&'static str, PhoneCall, PhoneCall)>,
    /// The surviving node's carrier: calls placed, completed, failed.
    survivor: (u64, u64, u64),
    /// Calls answered through each node, as its node-agent logged them.
    answered: [usize; 2],
    /// Rings and calls the dead node's node-agent saw cut by its Asterisk going away.
    cut: usize,
    /// Calls the dead node's carrier had placed when it was killed with the node (its
    /// statistics of the last second).
    placed_on_the_dead_node: u64,
}

/// Queued calls on two nodes (40 callers each, one a second; eight agents who answer after
/// 1–3 s and talk 2–6 s, so a queue builds), and 20 s in, node 0's Asterisk is killed
/// (-9) with its carrier. The phones give up on a dead call 10 s after their BYE or 200
/// OK went unanswered. `pbx_lost_hold` goes to the node-agents' `node.queue.pbx_lost_hold`.
fn asterisk_killed_under_load(pbx_lost_hold: &str) -> KilledRun {
    const PER_NODE: u64 = 40;
    let agents = answering_agents(["921", "922", "923", "924", "925", "926", "927", "928"]);
    let mut site = QueueSite::start(
        &agents,
        2,
        &[(
            "CALLFLEET_NODE__QUEUE__PBX_LOST_HOLD",
            pbx_lost_hold.to_owned(),
        )],
    );
    let mut carriers = site.queued_callers_on_each_node(PER_NODE as u32, Duration::from_secs(1));
    std::thread::sleep(Duration::from_secs(20));
    site.nodes[0].asterisk.process.signal("KILL");
    let _ = site.nodes[0].asterisk.process.child.wait();
    let killed_at = log_time_now();
    let (dead_dir, mut dead_carrier) = carriers.remove(0);
    dead_carrier.signal("KILL");
    let _ = dead_carrier.child.wait();
    let placed_on_the_dead_node = SippStats::read(&dead_dir.join("stats.csv"))
        .expect("the killed carrier's statistics")
        .outgoing;

    let (survivor_dir, mut survivor) = carriers.remove(0);
    wait_exit(
        "the surviving node's calls",
        &mut survivor,
        Duration::from_secs(600),
    );
    let stats = SippStats::read(&survivor_dir.join("stats.csv")).expect("carrier stats");
    // The phones give up on the dead node's calls within 16 s of the kill.
    std::thread::sleep(Duration::from_secs(5));
    let log = site.queue_log();
    assert!(
        log.iter().any(|line| line["message"] == "ringing"
            && line["timestamp"].as_str() > Some(killed_at.as_str())),
        "no ring after the kill"
    );
    let answered_on = |node: usize| {
        let prefix = format!("pbx-{node}/");
        log.iter()
            .filter(|line| {
                line["message"] == "answered"
                    && line["waiter"]
                        .as_str()
                        .is_some_and(|w| w.starts_with(&prefix))
            })
            .count()
    };
    let dead_log = std::fs::read_to_string(site.dir.path().join("pbx-0/agent.log"))
        .expect("the node-agent's log");
    site.assert_no_ring_without_a_lease();
    let run = QueueRun {
        carriers: Vec::new(),
        phones: agents
            .iter()
            .map(|(agent, _, _)| (*agent, site.phone_calls(agent)))
            .collect(),
        views: Vec::new(),
    };
    KilledRun {
        double_rings: run.double_rings(),
        survivor: (stats.outgoing, stats.successful, stats.failed),
        answered: [answered_on(0), answered_on(1)],
        cut: dead_log
            .matches("Asterisk went away during the ring or call")
            .count(),
        placed_on_the_dead_node,
    }
}

/// The issue's last fault: one node's Asterisk killed under load. The agents it was ringing
/// or bridging are held from other rings for `pbx_lost_hold` (30 s here; their phones give
/// up on the dead call within 16 s), so no phone ever has two calls at once; the surviving
/// node answers every one of its callers; rings go on after the kill.
#[test]
#[ignore = "needs Asterisk: run ./scripts/test-asterisk"]
fn a_node_s_asterisk_killed_under_load_leaves_no_agent_with_two_calls() {
    let run = asterisk_killed_under_load("30s");
    eprintln!(
        "pbx-0: {} calls placed, {} answered before its Asterisk was killed, {} rings and calls cut; pbx-1: {} answered",
        run.placed_on_the_dead_node, run.answered[0], run.cut, run.answered[1]
    );
    assert_eq!(
        run.double_rings,
        Vec::new(),
        "no phone had two calls at once"
    );
    assert_eq!(run.survivor, (40, 40, 0), "the surviving node's callers");
    assert_eq!(run.answered[1], 40, "answered through pbx-1");
    assert!(
        run.cut > 0,
        "the kill cut no ring or call: nothing was tested"
    );
}

/// The negative control: without the hold, the agents whose calls the dead Asterisk cut are
/// rung by the other node while their phones still hold the dead call.
#[test]
#[ignore = "needs Asterisk: run ./scripts/test-asterisk"]
fn without_the_hold_an_agent_cut_off_by_a_dead_asterisk_is_rung_twice() {
    let run = asterisk_killed_under_load("0s");
    eprintln!("double rings: {:?}", run.double_rings);
    assert!(
        run.cut > 0,
        "the kill cut no ring or call: nothing was tested"
    );
    assert!(
        !run.double_rings.is_empty(),
        "the agents cut off were not rung again while their phones held the dead call"
    );
}
