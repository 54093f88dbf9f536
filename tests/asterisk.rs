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
    _process: Running,
}

/// What an instance needs besides its ports: the AMI user callfleet logs in as.
const AMI_USER: &str = "callfleet";
const AMI_SECRET: &str = "callfleet-ami-secret";

impl Asterisk {
    /// Writes the node's configuration with `callfleet asterisk-config` into `dir` (SIP on
    /// a free loopback port, the carrier arriving from loopback, the node-agent's AMI
    /// user), adds device `1001` on a static contact at `phone_port` (devices come from
    /// realtime provisioning once that exists), starts Asterisk and waits until it is
    /// fully booted.
    fn start(dir: &Path, phone_port: u16) -> Self {
        let prefix = prefix();
        let (sip_port, ami_port) = (free_port(), free_port());
        let output = callfleet()
            .args(["asterisk-config", "--out"])
            .arg(dir)
            .envs(Self::node_env(&prefix, sip_port, ami_port))
            .output()
            .expect("run callfleet asterisk-config");
        assert_success(&output);
        std::fs::write(
            dir.join("pjsip.local.conf"),
            format!(
                "[1001]\ntype = endpoint\ncontext = callfleet-from-device\ndisallow = all\nallow = ulaw\n\
direct_media = no\naors = 1001\n\n[1001]\ntype = aor\ncontact = sip:1001@127.0.0.1:{phone_port}\n"
            ),
        )
        .expect("write the device");
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
            _process: Running { child },
        };
        wait_until("Asterisk fully booted", Duration::from_secs(60), || {
            asterisk
                .try_cli("core waitfullybooted")
                .is_some_and(|out| out.contains("fully booted"))
        });
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
            ("CALLFLEET_NODE__CALLS__SECRET", AMI_SECRET.to_owned()),
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

/// A SIPp phone answering every call (SIPp's built-in `uas`), on `port`.
fn answering_phone(dir: &Path, port: u16) -> Running {
    let child = sipp()
        .current_dir(dir)
        .args(["-sn", "uas", "-i", "127.0.0.1", "-p", &port.to_string()])
        .args(["-mp", &free_port().to_string(), "-nostdin"])
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
            .args(["-mp", &free_port().to_string()])
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
