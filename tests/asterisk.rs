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
    /// Starts Asterisk in `dir` with a carrier trunk identified by its loopback address
    /// (context `from-carrier`: any number rings `phone1`) and `phone1` on a static contact
    /// at `phone_port`; returns once it is fully booted.
    fn start(dir: &Path, phone_port: u16) -> Self {
        let prefix = prefix();
        let (sip_port, ami_port) = (free_port(), free_port());
        for sub in ["run", "log", "lib", "spool", "agi"] {
            std::fs::create_dir_all(dir.join(sub)).expect("create an Asterisk folder");
        }
        let path = |sub: &str| dir.join(sub).display().to_string();
        let files = [
            (
                "asterisk.conf",
                format!(
                    "[directories]\nastetcdir => {etc}\nastmoddir => {prefix}/lib/asterisk/modules\n\
astvarlibdir => {lib}\nastdbdir => {lib}\nastkeydir => {lib}\nastdatadir => {prefix}/var/lib/asterisk\n\
astagidir => {agi}\nastspooldir => {spool}\nastrundir => {run}\nastlogdir => {log}\n\
astsbindir => {prefix}/sbin\n\n[options]\ncache_media_frames = yes\n",
                    etc = dir.display(),
                    prefix = prefix.display(),
                    lib = path("lib"),
                    agi = path("agi"),
                    spool = path("spool"),
                    run = path("run"),
                    log = path("log"),
                ),
            ),
            // Everything that binds a port of its own stays off, so instances can share
            // the loopback.
            (
                "modules.conf",
                "[modules]\nautoload = yes\nnoload => chan_iax2.so\nnoload => chan_skinny.so\n\
noload => chan_mgcp.so\nnoload => chan_unistim.so\nnoload => pbx_dundi.so\nnoload => res_phoneprov.so\n\
noload => res_hep.so\nnoload => res_statsd.so\nnoload => res_xmpp.so\nnoload => chan_motif.so\n\
noload => res_pjsip_phoneprov_provider.so\nnoload => cdr_custom.so\nnoload => cdr_csv.so\n"
                    .to_owned(),
            ),
            (
                "logger.conf",
                "[general]\n[logfiles]\nmessages.log => notice,warning,error\n".to_owned(),
            ),
            (
                "pjsip.conf",
                format!(
                    "[transport-udp]\ntype = transport\nprotocol = udp\nbind = 127.0.0.1:{sip_port}\n\n\
[carrier]\ntype = endpoint\ncontext = from-carrier\ndisallow = all\nallow = ulaw\ndirect_media = no\n\n\
[carrier]\ntype = identify\nendpoint = carrier\nmatch = 127.0.0.1\n\n\
[phone1]\ntype = endpoint\ncontext = from-phone\ndisallow = all\nallow = ulaw\ndirect_media = no\naors = phone1\n\n\
[phone1]\ntype = aor\ncontact = sip:phone1@127.0.0.1:{phone_port}\n"
                ),
            ),
            (
                "extensions.conf",
                "[from-carrier]\nexten => _X.,1,Dial(PJSIP/phone1,30)\n same => n,Hangup()\n\n\
[from-phone]\n"
                    .to_owned(),
            ),
            (
                "manager.conf",
                format!(
                    "[general]\nenabled = yes\nport = {ami_port}\nbindaddr = 127.0.0.1\n\n\
[{AMI_USER}]\nsecret = {AMI_SECRET}\ndeny = 0.0.0.0/0.0.0.0\npermit = 127.0.0.1/255.255.255.255\n\
read = system,call\nwrite = command\n"
                ),
            ),
        ];
        for (name, text) in files {
            std::fs::write(dir.join(name), text).expect("write an Asterisk configuration file");
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
            _process: Running { child },
        };
        wait_until("Asterisk fully booted", Duration::from_secs(60), || {
            asterisk
                .try_cli("core waitfullybooted")
                .is_some_and(|out| out.contains("fully booted"))
        });
        asterisk
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

/// The first real call through Asterisk: a carrier's calls land on the node, ring the phone,
/// are answered and bridged, and the node-agent reads the live count over Asterisk's own AMI
/// (not a replayed transcript) into the store, where `callfleet status` shows it.
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
        .env("CALLFLEET_STORE__URL", &url)
        .env("CALLFLEET_NODE__ID", "pbx-1")
        .env("CALLFLEET_NODE__HEARTBEAT_INTERVAL", "300ms")
        .env("CALLFLEET_NODE__CALLS__SOURCE", "ami")
        .env(
            "CALLFLEET_NODE__CALLS__ADDRESS",
            format!("127.0.0.1:{}", asterisk.ami_port),
        )
        .env("CALLFLEET_NODE__CALLS__USERNAME", AMI_USER)
        .env("CALLFLEET_NODE__CALLS__SECRET", AMI_SECRET)
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
            .args(["-sn", "uac", "-s", "1000"])
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
