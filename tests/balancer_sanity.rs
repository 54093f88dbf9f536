//! Malformed and unusual requests side by side: what Kamailio 5.6's `sanity_check()`
//! answers (`tests/kamailio/sanity.cfg`: the module's default checks, 200 "Sane" for a
//! request that passes them) and what a real `callfleet balancer` answers, on one corpus
//! sent over UDP.
//!
//! [`callfleet_answers_the_malformed_corpus`] needs only the binary and a node-agent on
//! SQLite, and runs in `./scripts/test`. [`side_by_side_with_kamailio_sanity_check`] also
//! needs Kamailio: it is ignored there and run by `./scripts/test-asterisk`, which installs
//! it. It prints the table (request, Kamailio's answer, callfleet's answer, why they differ)
//! and asserts every cell: each row where the two part has its reason written in [`corpus`],
//! and a row where they agree has none.

mod support;

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::*;

// ---------------------------------------------------------------------------------------
// The corpus
// ---------------------------------------------------------------------------------------

/// A request as a carrier would send it, spoilt in one place. `{target}` in the
/// Request-URI is the server's `ip:port`.
#[derive(Clone, Debug)]
struct Msg {
    method: &'static str,
    uri: &'static str,
    version: &'static str,
    /// CSeq value; empty means `1 METHOD`.
    cseq: &'static str,
    max_forwards: Option<&'static str>,
    /// Appended to the top Via after its branch.
    via_params: &'static str,
    call_id: bool,
    /// Complete header lines without CRLF.
    extra: &'static [&'static str],
    body: &'static str,
    /// Replaces the computed Content-Length value.
    content_length: Option<&'static str>,
}

fn msg(method: &'static str) -> Msg {
    Msg {
        method,
        uri: "sip:5551234@{target}",
        version: "SIP/2.0",
        cseq: "",
        max_forwards: Some("70"),
        via_params: ";rport",
        call_id: true,
        extra: &[],
        body: "",
        content_length: None,
    }
}

fn invite() -> Msg {
    msg("INVITE")
}

impl Msg {
    fn render(&self, target: SocketAddr, local: SocketAddr) -> Vec<u8> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = format!(
            "{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut text = format!(
            "{} {} {}\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-sane{n}{}\r\n",
            self.method,
            self.uri.replace("{target}", &target.to_string()),
            self.version,
            self.via_params
        );
        if let Some(hops) = self.max_forwards {
            let _ = write!(text, "Max-Forwards: {hops}\r\n");
        }
        let _ = write!(
            text,
            "From: <sip:carrier@{local}>;tag=f{n}\r\nTo: <sip:5551234@{target}>\r\n"
        );
        if self.call_id {
            let _ = write!(text, "Call-ID: sane-{n}@carrier\r\n");
        }
        if self.cseq.is_empty() {
            let _ = write!(text, "CSeq: 1 {}\r\n", self.method);
        } else {
            let _ = write!(text, "CSeq: {}\r\n", self.cseq);
        }
        for line in self.extra {
            let _ = write!(text, "{line}\r\n");
        }
        let length = self
            .content_length
            .map_or_else(|| self.body.len().to_string(), str::to_owned);
        let _ = write!(text, "Content-Length: {length}\r\n\r\n{}", self.body);
        text.into_bytes()
    }
}

/// One row: what is sent, the status code each server answers (`None`: no answer), and
/// why the two differ when they do.
struct Case {
    what: &'static str,
    msg: Msg,
    kamailio: Option<u16>,
    callfleet: Option<u16>,
    why: &'static str,
}

/// Whether two answers say the same about a request: both silent, both let it through
/// (a code below 400: Kamailio's 200 "Sane", the balancer's 302 or 200), or both refuse it
/// with the same code.
fn agree(kamailio: Option<u16>, callfleet: Option<u16>) -> bool {
    match (kamailio, callfleet) {
        (None, None) => true,
        (Some(k), Some(c)) if k < 400 && c < 400 => true,
        (Some(k), Some(c)) => k == c,
        _ => false,
    }
}

fn corpus() -> Vec<Case> {
    let case = |what, msg, kamailio, callfleet, why| Case {
        what,
        msg,
        kamailio,
        callfleet,
        why,
    };
    vec![
        case("a valid INVITE", invite(), Some(200), Some(302), ""),
        case(
            "CSeq 2147483647 (2**31 - 1)",
            Msg {
                cseq: "2147483647 INVITE",
                ..invite()
            },
            Some(200),
            Some(302),
            "",
        ),
        case(
            "CSeq 2147483648 (2**31)",
            Msg {
                cseq: "2147483648 INVITE",
                ..invite()
            },
            Some(200),
            Some(400),
            "RFC 3261 §8.1.1.5: a CSeq number MUST be less than 2**31; sanity's CSeq check \
             only refuses numbers of more than 10 digits (it lets 4294967296 through too)",
        ),
        case(
            "CSeq of 11 digits",
            Msg {
                cseq: "99999999999 INVITE",
                ..invite()
            },
            Some(400),
            Some(400),
            "",
        ),
        case(
            "CSeq -1",
            Msg {
                cseq: "-1 INVITE",
                ..invite()
            },
            Some(400),
            Some(400),
            "",
        ),
        case(
            "CSeq method OPTIONS on an INVITE",
            Msg {
                cseq: "1 OPTIONS",
                ..invite()
            },
            Some(400),
            Some(400),
            "",
        ),
        case(
            "CSeq method INVITE on an OPTIONS",
            Msg {
                cseq: "1 INVITE",
                uri: "sip:{target}",
                ..msg("OPTIONS")
            },
            Some(400),
            Some(400),
            "",
        ),
        case(
            "CSeq method INVITE on a CANCEL",
            Msg {
                cseq: "1 INVITE",
                ..msg("CANCEL")
            },
            Some(400),
            Some(400),
            "",
        ),
        case(
            "Request-URI 5551234 (no scheme)",
            Msg {
                uri: "5551234",
                ..invite()
            },
            Some(400),
            Some(400),
            "",
        ),
        case(
            "Request-URI sip:5551234@ (no host)",
            Msg {
                uri: "sip:5551234@",
                ..invite()
            },
            Some(400),
            Some(400),
            "",
        ),
        case(
            "Request-URI sip:evil.example>@target",
            Msg {
                uri: "sip:evil.example>@{target}",
                ..invite()
            },
            Some(200),
            Some(400),
            "`>` is no user-part character (RFC 3261 §25.1) and would end the 302's Contact \
             early; sanity's default checks do not hold the user part to the grammar (its \
             URI parse check, 1024, is off by default)",
        ),
        case(
            "Request-URI sip:a\"b@target",
            Msg {
                uri: "sip:a\"b@{target}",
                ..invite()
            },
            Some(200),
            Some(400),
            "same as `>`: a quote is no user-part character",
        ),
        case(
            "Request-URI sip:*67#123@target",
            Msg {
                uri: "sip:*67#123@{target}",
                ..invite()
            },
            Some(200),
            Some(400),
            "`#` must be escaped (%23) in a SIP user part; the balancer refuses what it \
             cannot copy into a Contact as it is",
        ),
        case(
            "Request-URI with ;x=<y>",
            Msg {
                uri: "sip:5551234@{target};x=<y>",
                ..invite()
            },
            Some(200),
            Some(400),
            "`<` and `>` are no URI-parameter characters (RFC 3261 §25.1); the Request-URI \
             is forwarded as it is in proxy mode",
        ),
        case(
            "Request-URI tel:+4930123",
            Msg {
                uri: "tel:+4930123",
                ..invite()
            },
            Some(200),
            Some(302),
            "",
        ),
        case(
            "Request-URI sips:5551234@target",
            Msg {
                uri: "sips:5551234@{target}",
                ..invite()
            },
            Some(200),
            Some(302),
            "",
        ),
        case(
            "Request-URI http://target/5551234",
            Msg {
                uri: "http://{target}/5551234",
                ..invite()
            },
            Some(400),
            Some(416),
            "a well-formed URI of a scheme we do not route gets 416 (RFC 3261 §8.2.2.1), \
             which tells the sender to retry with a sip: URI; Kamailio's URI parser \
             refuses the scheme outright",
        ),
        case(
            "Request-URI urn:service:sos",
            Msg {
                uri: "urn:service:sos",
                ..invite()
            },
            Some(200),
            Some(416),
            "the balancer routes sip:, sips: and tel: only and says so (RFC 3261 §8.2.2.1); \
             sanity_check() does not look at the scheme",
        ),
        case(
            "SIP/3.0",
            Msg {
                version: "SIP/3.0",
                ..invite()
            },
            None,
            None,
            "",
        ),
        case(
            "no Call-ID",
            Msg {
                call_id: false,
                ..invite()
            },
            None,
            None,
            "",
        ),
        case(
            "Content-Length 100, no body",
            Msg {
                content_length: Some("100"),
                ..invite()
            },
            Some(400),
            Some(400),
            "",
        ),
        case(
            "Content-Length 2, 5 bytes of body",
            Msg {
                body: "v=0\r\n",
                content_length: Some("2"),
                ..invite()
            },
            Some(400),
            Some(302),
            "RFC 3261 §18.3: over UDP, bytes past Content-Length are discarded and the \
             message is valid; sanity's check wants them equal",
        ),
        case(
            "Content-Length abc",
            Msg {
                content_length: Some("abc"),
                ..invite()
            },
            None,
            Some(400),
            "Kamailio's core parser drops the message before the script runs; the balancer \
             can address the sender, so it says what is wrong",
        ),
        case(
            "Max-Forwards abc",
            Msg {
                max_forwards: Some("abc"),
                ..invite()
            },
            Some(200),
            Some(400),
            "sanity_check() does not read Max-Forwards (the maxfwd module does); the \
             balancer must decrement it when it proxies",
        ),
        case(
            "INVITE with Max-Forwards 0",
            Msg {
                max_forwards: Some("0"),
                ..invite()
            },
            Some(200),
            Some(483),
            "sanity_check() does not read Max-Forwards; RFC 3261 §16.3 step 2 wants 483",
        ),
        case(
            "CANCEL with Max-Forwards 0 (no such INVITE)",
            Msg {
                max_forwards: Some("0"),
                ..msg("CANCEL")
            },
            Some(200),
            Some(481),
            "nothing to cancel: the balancer is this CANCEL's final recipient and answers \
             481; it forwards nothing",
        ),
        case(
            "ACK with Max-Forwards 0",
            Msg {
                max_forwards: Some("0"),
                ..msg("ACK")
            },
            None,
            None,
            "",
        ),
        case(
            "Expires: soon",
            Msg {
                extra: &["Expires: soon"],
                ..invite()
            },
            Some(400),
            Some(302),
            "the balancer does not read Expires: an INVITE's Expires is for the node the \
             302 sends the call to",
        ),
        case(
            "Proxy-Require: foo",
            Msg {
                extra: &["Proxy-Require: foo"],
                ..invite()
            },
            Some(420),
            Some(302),
            "Proxy-Require binds proxies (RFC 3261 §16.3 step 5); a 302 is the answer of a \
             redirect server, a UAS. Proxied to the local PBX, it gets 420 (engine test \
             a_proxy_refuses_proxy_require_and_a_redirect_server_ignores_it)",
        ),
        case(
            "forged Via received=127.0.0.66;rport=9",
            Msg {
                via_params: ";rport=9;received=127.0.0.66",
                ..invite()
            },
            Some(200),
            Some(302),
            "",
        ),
    ]
}

// ---------------------------------------------------------------------------------------
// Sending
// ---------------------------------------------------------------------------------------

/// Sends `msg` to `target` from a fresh socket; the first datagram back within `wait`.
fn exchange(msg: &Msg, target: SocketAddr, wait: Duration) -> (Vec<u8>, Option<String>) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
    let local = socket.local_addr().expect("local address");
    let request = msg.render(target, local);
    socket.send_to(&request, target).expect("send");
    socket.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = vec![0u8; 65_536];
    let answer = socket
        .recv_from(&mut buf)
        .ok()
        .map(|(n, _)| String::from_utf8_lossy(&buf[..n]).into_owned());
    (request, answer)
}

fn code(answer: Option<&String>) -> Option<u16> {
    answer.map(|text| {
        text.strip_prefix("SIP/2.0 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not a SIP response:\n{text}"))
    })
}

fn status_line(answer: Option<&String>) -> String {
    answer.map_or_else(
        || "(no answer)".to_owned(),
        |text| text.lines().next().unwrap_or("").to_owned(),
    )
}

/// The top Via of an answer.
fn top_via(answer: &str) -> &str {
    answer
        .lines()
        .find_map(|line| line.strip_prefix("Via: "))
        .unwrap_or("")
}

/// How long a server gets to answer; what it has not answered by then it never will.
const WAIT: Duration = Duration::from_millis(700);

// ---------------------------------------------------------------------------------------
// The servers
// ---------------------------------------------------------------------------------------

/// A node-agent heartbeating `node-a` (`sip:127.0.0.1:5071`) into SQLite and a balancer
/// that redirects to it.
struct Callfleet {
    // Declared first: the processes end before their folder goes.
    _balancer: Running,
    _agent: Running,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Callfleet {
    fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("callfleet-sanity-")
            .tempdir()
            .expect("temp dir");
        let url = format!("sqlite://{}/fleet.db", dir.path().display());
        let agent = start_agent_with(
            &url,
            "node-a",
            "300ms",
            &dir.path().join("agent.log"),
            &[
                ("CALLFLEET_NODE__SIP_URI", "sip:127.0.0.1:5071"),
                ("CALLFLEET_NODE__MAX_CALLS", "1000"),
            ],
        );
        wait_until("node-a heartbeating", Duration::from_secs(20), || {
            node(&status(&url), "node-a").is_some_and(|n| n["stale"] == false)
        });
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let log = dir.path().join("balancer.log");
        let child = callfleet()
            .arg("balancer")
            .env("CALLFLEET_STORE__URL", &url)
            .env("CALLFLEET_NODE__ID", "core-1")
            .env("CALLFLEET_BALANCER__LISTEN", addr.to_string())
            .env("CALLFLEET_BALANCER__REFRESH", "100ms")
            .env("CALLFLEET_BALANCER__HEARTBEAT_TTL", "2s")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("balancer log"))
            .spawn()
            .expect("start callfleet balancer");
        let callfleet = Self {
            _balancer: Running { child },
            _agent: agent,
            addr,
            log,
            _dir: dir,
        };
        wait_until(
            "the balancer answers OPTIONS 200",
            Duration::from_secs(20),
            || sip_options_status(addr.port()) == Some(200),
        );
        callfleet
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Kamailio running `tests/kamailio/sanity.cfg` on a free loopback port.
struct Kamailio {
    addr: SocketAddr,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Kamailio {
    /// Starts it and waits until it answers; its port can be taken between the check and
    /// Kamailio's bind by a test in another process, then it starts on another (3 tries).
    fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("callfleet-sanity-kamailio-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(dir.path().join("run")).expect("Kamailio's folders");
        let config = support::checkout().join("tests/kamailio/sanity.cfg");
        let log = dir.path().join("kamailio.log");
        for _ in 0..3 {
            let port = free_port();
            let mut child = kamailio()
                .arg("-f")
                .arg(&config)
                .args(["-l", &format!("udp:127.0.0.1:{port}")])
                .arg("-Y")
                .arg(dir.path().join("run"))
                .arg("-P")
                .arg(dir.path().join("kamailio.pid"))
                .arg("-w")
                .arg(dir.path())
                .args(["-DD", "-E", "-m", "32", "-M", "8"])
                // Its own process group: Kamailio forks a worker, and the group is what is
                // stopped if the main process does not take it down.
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("Kamailio's log"))
                .spawn()
                .expect("start kamailio");
            let start = Instant::now();
            // A request that passes sanity_check() gets 200: an answer means it listens.
            let listening = loop {
                if sip_options_status(port) == Some(200) {
                    break true;
                }
                if child.try_wait().expect("try_wait").is_some() {
                    break false;
                }
                if start.elapsed() > Duration::from_secs(15) {
                    let _ = child.kill();
                    panic!(
                        "Kamailio does not answer within 15 s:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            };
            if listening {
                return Self {
                    addr: format!("127.0.0.1:{port}").parse().expect("addr"),
                    child,
                    log,
                    _dir: dir,
                };
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                text.contains("Address already in use"),
                "Kamailio exited at start:\n{text}"
            );
        }
        panic!("Kamailio could not get a free port 3 times");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        stop_process_group(&mut self.child);
    }
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

/// Checks what the balancer answers the forged-Via INVITE: its own view of the source in
/// `received` and `rport`, the forged values gone.
fn via_rewritten(request: &[u8], answer: &str) -> Result<(), String> {
    let request = String::from_utf8_lossy(request);
    let sent = top_via(&request);
    let (sent_by_and_branch, _) = sent
        .split_once(";rport=9")
        .unwrap_or_else(|| panic!("{sent}"));
    let port = sent_by_and_branch
        .split([' ', ';'])
        .nth(1)
        .and_then(|sent_by| sent_by.rsplit(':').next())
        .unwrap_or_else(|| panic!("{sent}"));
    let expected = format!("{sent_by_and_branch};rport={port};received=127.0.0.1");
    if top_via(answer) == expected {
        Ok(())
    } else {
        Err(format!(
            "forged Via: expected the top Via\n  {expected}\ngot\n  {}",
            top_via(answer)
        ))
    }
}

#[test]
fn callfleet_answers_the_malformed_corpus() {
    let callfleet = Callfleet::start();
    let mut failures = String::new();
    for case in corpus() {
        let (request, answer) = exchange(&case.msg, callfleet.addr, WAIT);
        if code(answer.as_ref()) != case.callfleet {
            let _ = write!(
                failures,
                "\n{}: expected {:?}, got {}\n{}",
                case.what,
                case.callfleet,
                status_line(answer.as_ref()),
                String::from_utf8_lossy(&request)
            );
        }
        if case.msg.via_params.contains("received=")
            && let Some(answer) = &answer
            && let Err(e) = via_rewritten(&request, answer)
        {
            let _ = writeln!(failures, "\n{e}");
        }
    }
    assert!(
        failures.is_empty(),
        "{failures}\nbalancer log:\n{}",
        callfleet.log_text()
    );
}

#[test]
#[ignore = "needs Kamailio: run ./scripts/test-asterisk"]
fn side_by_side_with_kamailio_sanity_check() {
    let kamailio = Kamailio::start();
    let callfleet = Callfleet::start();
    let mut table = format!(
        "{:<45} | {:<53} | {:<66} | why they differ\n",
        "request", "Kamailio 5.6 sanity_check()", "callfleet balancer"
    );
    let mut failures = String::new();
    let mut forged_vias = String::new();
    for case in corpus() {
        let (_, by_kamailio) = exchange(&case.msg, kamailio.addr, WAIT);
        let (request, by_callfleet) = exchange(&case.msg, callfleet.addr, WAIT);
        let (k, c) = (code(by_kamailio.as_ref()), code(by_callfleet.as_ref()));
        let _ = writeln!(
            table,
            "{:<45} | {:<53} | {:<66} | {}",
            case.what,
            status_line(by_kamailio.as_ref()),
            status_line(by_callfleet.as_ref()),
            match (agree(k, c), case.why) {
                (true, _) => "-",
                (false, "") => "(no reason written: a failure)",
                (false, why) => why,
            }
        );
        if (k, c) != (case.kamailio, case.callfleet) {
            let _ = writeln!(
                failures,
                "{}: expected Kamailio {:?} / callfleet {:?}, got {k:?} / {c:?}",
                case.what, case.kamailio, case.callfleet
            );
        }
        match (agree(case.kamailio, case.callfleet), case.why.is_empty()) {
            (false, true) => {
                let _ = writeln!(
                    failures,
                    "{}: they differ and no reason says why",
                    case.what
                );
            }
            (true, false) => {
                let _ = writeln!(failures, "{}: they agree, yet a reason is given", case.what);
            }
            _ => {}
        }
        if case.msg.via_params.contains("received=") {
            if let Some(answer) = &by_callfleet
                && let Err(e) = via_rewritten(&request, answer)
            {
                let _ = writeln!(failures, "{e}");
            }
            let _ = write!(
                forged_vias,
                "\nthe forged Via comes back as\n  Kamailio:  {}\n  callfleet: {}\n",
                by_kamailio.as_deref().map_or("(no answer)", top_via),
                by_callfleet.as_deref().map_or("(no answer)", top_via),
            );
        }
    }
    eprintln!("{table}{forged_vias}");
    assert!(
        failures.is_empty(),
        "{failures}\n{table}\nKamailio log:\n{}\nbalancer log:\n{}",
        kamailio.log_text(),
        callfleet.log_text()
    );
}
