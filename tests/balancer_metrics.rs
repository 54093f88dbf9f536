//! The balancer's `GET /metrics`: a real `callfleet balancer` choosing among two
//! node-agents on SQLite, a known amount of SIP over UDP, and the exact counts scraped
//! over HTTP.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::*;

/// How long the balancer may take to copy its counts into the recorder (every second).
const PUBLISHED_WITHIN: Duration = Duration::from_secs(5);

/// The carrier's side: one UDP socket, and requests as a carrier sends them.
struct Carrier {
    socket: UdpSocket,
    balancer: SocketAddr,
}

impl Carrier {
    fn new(balancer: SocketAddr) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind carrier");
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        Self { socket, balancer }
    }

    /// A request of call `call` to `number`; `to_tag` for an ACK.
    fn request(&self, method: &str, call: &str, number: &str, to_tag: &str) -> String {
        let local = self.socket.local_addr().expect("local");
        let target = self.balancer;
        format!(
            "{method} sip:{number}@{target} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-{call};rport\r\n\
From: <sip:carrier@{local}>;tag=c-{call}\r\nTo: <sip:{number}@{target}>{to_tag}\r\nCall-ID: {call}@carrier\r\n\
CSeq: 1 {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
    }

    fn send(&self, text: &str) {
        self.socket
            .send_to(text.as_bytes(), self.balancer)
            .expect("send");
    }

    /// The next message for this carrier.
    fn receive(&self) -> String {
        let mut buffer = vec![0u8; 65_536];
        let (length, _) = self
            .socket
            .recv_from(&mut buffer)
            .expect("an answer within 3 s");
        String::from_utf8_lossy(&buffer[..length]).into_owned()
    }

    /// Sends an INVITE and returns the status line of its answer after ACKing it, so no
    /// response is resent on Timer G.
    fn call(&self, call: &str, number: &str) -> String {
        self.send(&self.request("INVITE", call, number, ""));
        let answer = self.receive();
        let to = answer
            .lines()
            .find_map(|l| l.strip_prefix("To: "))
            .expect("To");
        let tag = &to[to.find(";tag=").expect("to-tag")..];
        self.send(&self.request("ACK", call, number, tag));
        answer.lines().next().expect("status line").to_owned()
    }
}

/// The local PBX: receives what the balancer proxies to it.
struct Pbx {
    socket: UdpSocket,
}

impl Pbx {
    /// The next INVITE forwarded to it (the balancer's OPTIONS probes are skipped).
    fn invite(&self) -> String {
        let mut buffer = vec![0u8; 65_536];
        loop {
            let (length, _) = self
                .socket
                .recv_from(&mut buffer)
                .expect("a forwarded INVITE within 3 s");
            let text = String::from_utf8_lossy(&buffer[..length]).into_owned();
            if text.starts_with("INVITE ") {
                return text;
            }
        }
    }

    /// Answers a forwarded `invite` with 180 Ringing, back through the balancer.
    fn ring(&self, invite: &str, balancer: SocketAddr) {
        let mut ringing = String::from("SIP/2.0 180 Ringing\r\n");
        for line in invite.lines() {
            let copied = ["Via:", "From:", "Call-ID:", "CSeq:"];
            if copied.iter().any(|name| line.starts_with(name)) {
                ringing.push_str(line);
                ringing.push_str("\r\n");
            } else if line.starts_with("To:") {
                ringing.push_str(line);
                ringing.push_str(";tag=pbx\r\n");
            }
        }
        ringing.push_str("Content-Length: 0\r\n\r\n");
        self.socket
            .send_to(ringing.as_bytes(), balancer)
            .expect("send 180");
    }
}

fn scrape(port: u16) -> String {
    let (status, body) = http(port, "GET", "/metrics", "", "").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the series `series` (name and labels, as Prometheus prints them).
fn value(text: &str, series: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(str::to_owned)
}

#[test]
fn requests_by_outcome_calls_per_node_and_retransmissions_are_scraped_exactly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/fleet.db", dir.path().display());
    let pbx = Pbx {
        socket: UdpSocket::bind("127.0.0.1:0").expect("bind pbx"),
    };
    pbx.socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let pbx_address = pbx.socket.local_addr().expect("pbx address");
    let _agents: Vec<Running> = [("lb", "default"), ("other", "elsewhere")]
        .iter()
        .map(|(id, pool)| {
            start_agent_with(
                &url,
                id,
                "300ms",
                &dir.path().join(format!("agent-{id}.log")),
                &[
                    ("CALLFLEET_NODE__SIP_URI", &format!("sip:{pbx_address}")),
                    ("CALLFLEET_NODE__POOL", pool),
                    ("CALLFLEET_NODE__MAX_CALLS", "100"),
                    ("CALLFLEET_NODE__CALLS__COUNT", "0"),
                ],
            )
        })
        .collect();

    // Numbers starting with 7 go to the other node's pool, with 9 to a pool of no node.
    let config = dir.path().join("balancer.toml");
    std::fs::write(
        &config,
        "[[balancer.pools]]\nname = \"elsewhere\"\nprefixes = [\"7\"]\n\n\
         [[balancer.pools]]\nname = \"empty\"\nprefixes = [\"9\"]\n",
    )
    .expect("write config");
    let sip: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let metrics_port = free_port();
    let log = dir.path().join("balancer.log");
    let mut balancer = Running {
        child: callfleet()
            .arg("--config")
            .arg(&config)
            .args(["--log-format", "json", "balancer"])
            .env("CALLFLEET_STORE__URL", &url)
            .env("CALLFLEET_NODE__ID", "lb")
            .env("CALLFLEET_BALANCER__LISTEN", sip.to_string())
            .env("CALLFLEET_BALANCER__LOCAL_PBX", pbx_address.to_string())
            .env("CALLFLEET_BALANCER__REFRESH", "100ms")
            .env(
                "CALLFLEET_BALANCER__METRICS_LISTEN",
                format!("127.0.0.1:{metrics_port}"),
            )
            .stdout(Stdio::null())
            .stderr(log_file(&log))
            .spawn()
            .expect("start callfleet balancer"),
    };
    wait_until("balancer ready", Duration::from_secs(20), || {
        assert!(balancer.alive(), "the balancer exited:\n{}", read(&log));
        read(&log).contains("balancer ready")
    });
    let text = read(&log);
    let serving = text
        .lines()
        .find(|line| line.contains("serving /metrics"))
        .unwrap_or_else(|| panic!("no `serving /metrics` logged:\n{text}"));
    assert!(
        serving.contains(&format!("127.0.0.1:{metrics_port}")),
        "{serving}"
    );

    // Before any call every request series is there at 0, and both nodes once they
    // heartbeat into the balancer's view.
    let before = scrape(metrics_port);
    for (method, outcome) in [("INVITE", "302"), ("ACK", "absorbed"), ("other", "405")] {
        let series = format!(
            "callfleet_balancer_requests_total{{method=\"{method}\",outcome=\"{outcome}\"}}"
        );
        assert_eq!(
            value(&before, &series).as_deref(),
            Some("0"),
            "{series}\n{before}"
        );
    }
    assert_eq!(
        value(
            &before,
            "callfleet_balancer_decision_duration_seconds_count"
        )
        .as_deref(),
        Some("0"),
        "{before}"
    );
    wait_until("both nodes heartbeating", Duration::from_secs(20), || {
        let nodes = status(&url);
        ["lb", "other"]
            .iter()
            .all(|id| node(&nodes, id).is_some_and(|n| n["stale"] == false))
    });
    wait_until("both nodes in the view", Duration::from_secs(20), || {
        let text = scrape(metrics_port);
        ["lb", "other"].iter().all(|node| {
            value(
                &text,
                &format!("callfleet_balancer_calls_routed_total{{node=\"{node}\"}}"),
            )
            .is_some()
        })
    });

    let carrier = Carrier::new(sip);
    // Three calls for the local node, proxied to its PBX; the first is retransmitted
    // (forwarded again) and rung, the 180 coming back through the balancer.
    for n in 0..3 {
        carrier.send(&carrier.request("INVITE", &format!("local-{n}"), "5551234", ""));
        let forwarded = pbx.invite();
        if n == 0 {
            carrier.send(&carrier.request("INVITE", "local-0", "5551234", ""));
            let again = pbx.invite();
            assert_eq!(again, forwarded, "a retransmission is forwarded as it was");
            pbx.ring(&forwarded, sip);
            assert!(carrier.receive().starts_with("SIP/2.0 180 Ringing\r\n"));
        }
    }
    // Two calls redirected to the other node; the second INVITE is retransmitted before
    // its ACK and gets the same 302.
    assert_eq!(
        carrier.call("moved-0", "7001"),
        "SIP/2.0 302 Moved Temporarily"
    );
    carrier.send(&carrier.request("INVITE", "moved-1", "7002", ""));
    let first = carrier.receive();
    carrier.send(&carrier.request("INVITE", "moved-1", "7002", ""));
    assert_eq!(carrier.receive(), first, "the 302 is resent as it was");
    let to = first
        .lines()
        .find_map(|l| l.strip_prefix("To: "))
        .expect("To");
    carrier.send(&carrier.request(
        "ACK",
        "moved-1",
        "7002",
        &to[to.find(";tag=").expect("tag")..],
    ));
    // Two calls for a pool without nodes.
    for n in 0..2 {
        assert_eq!(
            carrier.call(&format!("none-{n}"), "9001"),
            "SIP/2.0 503 Service Unavailable"
        );
    }
    carrier.send(&carrier.request("OPTIONS", "ping", "5551234", ""));
    assert!(carrier.receive().starts_with("SIP/2.0 200 OK\r\n"));

    let expected = [
        (
            "callfleet_balancer_requests_total{method=\"INVITE\",outcome=\"local\"}",
            "3",
        ),
        (
            "callfleet_balancer_requests_total{method=\"INVITE\",outcome=\"302\"}",
            "2",
        ),
        (
            "callfleet_balancer_requests_total{method=\"INVITE\",outcome=\"503_no_node\"}",
            "2",
        ),
        (
            "callfleet_balancer_requests_total{method=\"INVITE\",outcome=\"retransmission\"}",
            "2",
        ),
        (
            "callfleet_balancer_requests_total{method=\"INVITE\",outcome=\"503_overload\"}",
            "0",
        ),
        (
            "callfleet_balancer_requests_total{method=\"ACK\",outcome=\"absorbed\"}",
            "4",
        ),
        (
            "callfleet_balancer_requests_total{method=\"OPTIONS\",outcome=\"200\"}",
            "1",
        ),
        (
            "callfleet_balancer_requests_total{method=\"unknown\",outcome=\"dropped\"}",
            "0",
        ),
        (
            "callfleet_balancer_responses_total{outcome=\"forwarded\"}",
            "1",
        ),
        ("callfleet_balancer_calls_routed_total{node=\"lb\"}", "3"),
        ("callfleet_balancer_calls_routed_total{node=\"other\"}", "2"),
        ("callfleet_balancer_retransmissions_absorbed_total", "2"),
        // The three proxied calls live until Timer H (32 s); the others ended at their ACK.
        ("callfleet_balancer_transactions", "3"),
        // INVITEs only: 3 + 1 + 1 + 2 + 2.
        ("callfleet_balancer_decision_duration_seconds_count", "9"),
    ];
    let started = Instant::now();
    let text = loop {
        let text = scrape(metrics_port);
        let published = expected
            .iter()
            .all(|(series, want)| value(&text, series).as_deref() == Some(*want));
        if published || started.elapsed() > PUBLISHED_WITHIN {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let got: Vec<_> = expected
        .iter()
        .map(|(series, _)| (*series, value(&text, series).unwrap_or_default()))
        .collect();
    let want: Vec<_> = expected
        .iter()
        .map(|(series, want)| (*series, (*want).to_owned()))
        .collect();
    assert_eq!(got, want, "\n{text}");
    assert!(
        text.contains("# TYPE callfleet_balancer_decision_duration_seconds histogram\n"),
        "{text}"
    );
    balancer.signal("TERM");
}

#[test]
fn a_metrics_listen_that_is_not_ip_port_stops_the_balancer_with_the_key_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = callfleet()
        .arg("balancer")
        .env(
            "CALLFLEET_STORE__URL",
            format!("sqlite://{}/fleet.db", dir.path().display()),
        )
        .env("CALLFLEET_NODE__ID", "lb")
        .env(
            "CALLFLEET_BALANCER__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("CALLFLEET_BALANCER__METRICS_LISTEN", "localhost:9464")
        .output()
        .expect("run callfleet balancer");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(
            "`balancer.metrics_listen` `localhost:9464` must be ip:port, e.g. 127.0.0.1:9464, or empty for no /metrics"
        ),
        "{stderr}"
    );
}
