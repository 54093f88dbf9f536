//! The SIP balancer end to end: a real `callfleet balancer` process choosing among real
//! node-agents heartbeating into SQLite, driven by raw UDP/TCP sockets and by SIPp
//! (scenarios in `tests/sipp/`). Counters come from the balancer's last JSON log line.

mod support;

use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::carrier::balancer_stopped;
use support::*;

/// Heartbeats of the test nodes; the balancer trusts a heartbeat for `TTL`.
const HEARTBEAT: &str = "300ms";
const TTL: &str = "1s";
const REFRESH: &str = "100ms";
/// The dialled number of every test call.
const USER: &str = "5551234";

// ---------------------------------------------------------------------------------------
// The fleet and the balancer
// ---------------------------------------------------------------------------------------

/// A SQLite fleet store in a temp dir and the node-agents heartbeating into it.
struct Fleet {
    /// Declared first: the agents are killed before the directory goes.
    agents: Vec<(String, Running)>,
    dir: tempfile::TempDir,
    url: String,
}

impl Fleet {
    /// A fresh temp dir, kept after the test (logs, SIPp traces) when
    /// `CALLFLEET_TEST_KEEP` is set.
    fn new() -> Self {
        let keep = std::env::var_os("CALLFLEET_TEST_KEEP").is_some();
        let dir = tempfile::Builder::new()
            .prefix("callfleet-balancer-")
            .disable_cleanup(keep)
            .tempdir()
            .expect("temp dir");
        if keep {
            eprintln!("test files kept in {}", dir.path().display());
        }
        let url = format!("sqlite://{}/fleet.db", dir.path().display());
        Self {
            agents: Vec::new(),
            dir,
            url,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts a node-agent for `id`, reachable at `sip_uri`, reporting `calls` of `max_calls`.
    fn node(&mut self, id: &str, sip_uri: &str, calls: u32, max_calls: u32) {
        let (calls, max_calls) = (calls.to_string(), max_calls.to_string());
        let agent = start_agent_with(
            &self.url,
            id,
            HEARTBEAT,
            &self.path(&format!("agent-{id}.log")),
            &[
                ("CALLFLEET_NODE__SIP_URI", sip_uri),
                ("CALLFLEET_NODE__MAX_CALLS", &max_calls),
                ("CALLFLEET_NODE__CALLS__COUNT", &calls),
            ],
        );
        self.agents.push((id.to_owned(), agent));
    }

    /// Waits until `status` lists every one of `ids` with a fresh heartbeat.
    fn wait_fresh(&self, ids: &[&str]) {
        wait_until(
            &format!("nodes {ids:?} heartbeating"),
            Duration::from_secs(20),
            || {
                let nodes = status(&self.url);
                ids.iter()
                    .all(|id| node(&nodes, id).is_some_and(|n| n["stale"] == false))
            },
        );
    }

    fn agent(&mut self, id: &str) -> &mut Running {
        &mut self
            .agents
            .iter_mut()
            .find(|(name, _)| name == id)
            .unwrap_or_else(|| panic!("no agent {id}"))
            .1
    }

    /// `callfleet node drain|undrain ID` against this store.
    fn cli(&self, args: &[&str]) -> Output {
        let output = callfleet()
            .args(args)
            .env("CALLFLEET_STORE__URL", &self.url)
            .output()
            .expect("run callfleet");
        assert_success(&output);
        output
    }
}

/// A running `callfleet balancer`.
struct Balancer {
    process: Running,
    addr: SocketAddr,
    log: PathBuf,
}

impl Balancer {
    /// Starts a balancer for `fleet` as node `node_id`, with the test's short refresh and
    /// heartbeat TTL, extra `env` and optionally a TOML `config` file; waits for
    /// `balancer ready`.
    fn start(
        fleet: &Fleet,
        name: &str,
        node_id: &str,
        env: &[(&str, String)],
        config: Option<&str>,
    ) -> Self {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let log = fleet.path(&format!("{name}.log"));
        let mut command = callfleet();
        if let Some(text) = config {
            let file = fleet.path(&format!("{name}.toml"));
            std::fs::write(&file, text).expect("write config");
            command.arg("--config").arg(file);
        }
        let child = command
            .args(["--log-format", "json", "balancer"])
            .env("CALLFLEET_STORE__URL", &fleet.url)
            .env("CALLFLEET_NODE__ID", node_id)
            .env("CALLFLEET_BALANCER__LISTEN", addr.to_string())
            .env("CALLFLEET_BALANCER__REFRESH", REFRESH)
            .env("CALLFLEET_BALANCER__HEARTBEAT_TTL", TTL)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create log"))
            .spawn()
            .expect("start callfleet balancer");
        let mut balancer = Self {
            process: Running { child },
            addr,
            log,
        };
        let start = Instant::now();
        loop {
            if balancer.log_text().contains("balancer ready") {
                break;
            }
            if !balancer.process.alive() {
                panic!(
                    "`callfleet balancer` exited before `balancer ready`:\n{}",
                    balancer.log_text()
                );
            }
            if start.elapsed() > Duration::from_secs(20) {
                panic!("no `balancer ready` within 20 s:\n{}", balancer.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        balancer
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `request` from `udp` and returns the response to it (same Call-ID and CSeq
    /// method), skipping anything else; panics with the balancer's log if none comes.
    fn ask(&self, udp: &Udp, request: &Req) -> Sip {
        udp.send(&request.render());
        self.response(udp, request)
    }

    fn response(&self, udp: &Udp, request: &Req) -> Sip {
        udp.response_to(request, Duration::from_secs(3))
            .unwrap_or_else(|| {
                panic!(
                    "no response within 3 s to:\n{}\nbalancer log:\n{}",
                    String::from_utf8_lossy(&request.render()),
                    self.log_text()
                )
            })
    }

    /// Sends OPTIONS from `udp` until one is answered `code` (e.g. 200 once the balancer
    /// has loaded a fleet with an eligible node). Returns how many OPTIONS were sent and
    /// how many of them got 503.
    fn options_until(&self, udp: &Udp, code: u16, limit: Duration) -> (u64, u64) {
        let start = Instant::now();
        let (mut sent, mut unavailable) = (0, 0);
        let mut last = String::from("no answer");
        while start.elapsed() < limit {
            let options = Req::new("OPTIONS", &self.uri(""), udp.local, "UDP");
            udp.send(&options.render());
            sent += 1;
            if let Some(answer) = udp.response_to(&options, Duration::from_millis(500)) {
                if answer.code() == 503 {
                    unavailable += 1;
                }
                if answer.code() == code {
                    return (sent, unavailable);
                }
                last = answer.to_string();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "OPTIONS not answered {code} within {limit:?}; last answer:\n{last}\nbalancer log:\n{}",
            self.log_text()
        );
    }

    /// `sip:USER@balancer` (or `sip:balancer` for an empty user).
    fn uri(&self, user: &str) -> String {
        if user.is_empty() {
            format!("sip:{}", self.addr)
        } else {
            format!("sip:{user}@{}", self.addr)
        }
    }

    /// SIGTERM, a clean exit, and the counters of the final `balancer stopped` line.
    fn stop(mut self) -> Counters {
        self.process.signal("TERM");
        let status = wait_exit(
            "balancer after SIGTERM",
            &mut self.process,
            Duration::from_secs(10),
        );
        let text = self.log_text();
        assert!(status.success(), "balancer exit {status:?}; log:\n{text}");
        let fields = balancer_stopped(&text)
            .unwrap_or_else(|| panic!("no `balancer stopped` JSON line in the log:\n{text}"));
        Counters { fields }
    }
}

/// The fields of the final `balancer stopped` log line.
struct Counters {
    fields: Value,
}

impl Counters {
    fn get(&self, name: &str) -> u64 {
        self.fields[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no integer field `{name}` in {}", self.fields))
    }

    /// Asserts each `(name, value)` exactly.
    fn assert(&self, expected: &[(&str, u64)]) {
        for (name, value) in expected {
            assert_eq!(
                self.get(name),
                *value,
                "counter `{name}` in {}",
                self.fields
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// SIP on the wire
// ---------------------------------------------------------------------------------------

fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}{}x{}x{nanos:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A request as a carrier would send it.
#[derive(Clone, Debug)]
struct Req {
    method: String,
    uri: String,
    /// `UDP` or `TCP`.
    transport: String,
    local: SocketAddr,
    branch: String,
    /// Vias of upstream hops, below ours.
    lower_vias: Vec<String>,
    from_tag: String,
    to_uri: String,
    to_tag: Option<String>,
    call_id: String,
    cseq: u32,
    cseq_method: String,
    max_forwards: Option<u32>,
    /// Complete header lines without CRLF.
    extra: Vec<String>,
    body: String,
    /// Replaces the computed Content-Length value.
    content_length: Option<String>,
}

const SDP: &str = "v=0\r\no=carrier 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

impl Req {
    fn new(method: &str, uri: &str, local: SocketAddr, transport: &str) -> Self {
        Self {
            method: method.to_owned(),
            uri: uri.to_owned(),
            transport: transport.to_owned(),
            local,
            branch: unique("z9hG4bK-t"),
            lower_vias: Vec::new(),
            from_tag: unique("f"),
            to_uri: uri.to_owned(),
            to_tag: None,
            call_id: unique("call-"),
            cseq: 1,
            cseq_method: method.to_owned(),
            max_forwards: Some(70),
            extra: Vec::new(),
            body: if method == "INVITE" {
                SDP.to_owned()
            } else {
                String::new()
            },
            content_length: None,
        }
    }

    fn invite(balancer: &Balancer, local: SocketAddr, transport: &str) -> Self {
        Self::new("INVITE", &balancer.uri(USER), local, transport)
    }

    fn via(&self) -> String {
        format!(
            "SIP/2.0/{} {};branch={};rport",
            self.transport, self.local, self.branch
        )
    }

    fn render(&self) -> Vec<u8> {
        let mut text = format!(
            "{} {} SIP/2.0\r\nVia: {}\r\n",
            self.method,
            self.uri,
            self.via()
        );
        for via in &self.lower_vias {
            text += &format!("Via: {via}\r\n");
        }
        if let Some(hops) = self.max_forwards {
            text += &format!("Max-Forwards: {hops}\r\n");
        }
        text += &format!(
            "From: \"Carrier\" <sip:carrier@{}>;tag={}\r\n",
            self.local, self.from_tag
        );
        text += &format!("To: <{}>", self.to_uri);
        if let Some(tag) = &self.to_tag {
            text += &format!(";tag={tag}");
        }
        text += "\r\n";
        text += &format!("Call-ID: {}\r\n", self.call_id);
        text += &format!("CSeq: {} {}\r\n", self.cseq, self.cseq_method);
        if self.method == "INVITE" {
            text += &format!(
                "Contact: <sip:carrier@{};transport={}>\r\n",
                self.local,
                self.transport.to_lowercase()
            );
        }
        for line in &self.extra {
            text += line;
            text += "\r\n";
        }
        if !self.body.is_empty() {
            text += "Content-Type: application/sdp\r\n";
        }
        let length = self
            .content_length
            .clone()
            .unwrap_or_else(|| self.body.len().to_string());
        text += &format!("Content-Length: {length}\r\n\r\n{}", self.body);
        text.into_bytes()
    }

    /// The ACK for a non-2xx final `response` to this INVITE (RFC 3261 §17.1.1.3).
    fn ack(&self, response: &Sip) -> Self {
        Self {
            method: "ACK".into(),
            cseq_method: "ACK".into(),
            lower_vias: Vec::new(),
            to_tag: response.to_tag(),
            extra: Vec::new(),
            body: String::new(),
            content_length: None,
            ..self.clone()
        }
    }

    /// The CANCEL of this INVITE (RFC 3261 §9.1).
    fn cancel(&self) -> Self {
        Self {
            method: "CANCEL".into(),
            cseq_method: "CANCEL".into(),
            lower_vias: Vec::new(),
            extra: Vec::new(),
            body: String::new(),
            content_length: None,
            ..self.clone()
        }
    }
}

/// A parsed SIP message, with the bytes it came from.
#[derive(Clone)]
struct Sip {
    raw: Vec<u8>,
    start: String,
    /// (lower-case full name, value), in order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl fmt::Display for Sip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", String::from_utf8_lossy(&self.raw))
    }
}

impl fmt::Debug for Sip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn full_name(name: &str) -> String {
    let name = name.trim().to_ascii_lowercase();
    match name.as_str() {
        "v" => "via",
        "f" => "from",
        "t" => "to",
        "i" => "call-id",
        "m" => "contact",
        "l" => "content-length",
        "c" => "content-type",
        "k" => "supported",
        "s" => "subject",
        other => other,
    }
    .to_owned()
}

impl Sip {
    /// Parses one message; lines may end in CRLF or LF (SIPp's logs).
    fn parse(raw: &[u8]) -> Option<Self> {
        let (head, body) = match find(raw, b"\r\n\r\n") {
            Some(at) => (&raw[..at], raw[at + 4..].to_vec()),
            None => match find(raw, b"\n\n") {
                Some(at) => (&raw[..at], raw[at + 2..].to_vec()),
                None => (raw, Vec::new()),
            },
        };
        let head = std::str::from_utf8(head).ok()?;
        let mut lines = head.lines().map(|l| l.trim_end_matches('\r'));
        let start = lines.next()?.to_owned();
        if !start.starts_with("SIP/2.0 ") && !start.ends_with(" SIP/2.0") {
            return None;
        }
        let mut headers: Vec<(String, String)> = Vec::new();
        for line in lines {
            if line.starts_with([' ', '\t']) {
                let (_, value) = headers.last_mut()?;
                value.push(' ');
                value.push_str(line.trim());
                continue;
            }
            let (name, value) = line.split_once(':')?;
            headers.push((full_name(name), value.trim().to_owned()));
        }
        Some(Self {
            raw: raw.to_vec(),
            start,
            headers,
            body,
        })
    }

    fn is_response(&self) -> bool {
        self.start.starts_with("SIP/2.0 ")
    }

    fn code(&self) -> u16 {
        assert!(self.is_response(), "not a response:\n{self}");
        self.start[8..11]
            .parse()
            .unwrap_or_else(|_| panic!("bad status line:\n{self}"))
    }

    fn reason(&self) -> &str {
        self.start.get(12..).unwrap_or("")
    }

    fn header(&self, name: &str) -> Option<&str> {
        let name = full_name(name);
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every header line called `name`, in order.
    fn lines_named(&self, name: &str) -> Vec<&str> {
        let name = full_name(name);
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Every value of `name`: all its lines, split at commas outside `<>` and quotes.
    fn values(&self, name: &str) -> Vec<String> {
        self.lines_named(name)
            .into_iter()
            .flat_map(split_values)
            .collect()
    }

    fn call_id(&self) -> &str {
        self.header("Call-ID").unwrap_or("")
    }

    fn cseq_method(&self) -> &str {
        self.header("CSeq")
            .and_then(|c| c.split_whitespace().nth(1))
            .unwrap_or("")
    }

    fn to_tag(&self) -> Option<String> {
        param(self.header("To")?, "tag")
    }

    /// The Contact URIs with their q-values (1.0 when absent), in order.
    fn contacts(&self) -> Vec<(String, f64)> {
        self.values("Contact")
            .iter()
            .map(|value| {
                let (uri, params) = match (value.find('<'), value.find('>')) {
                    (Some(open), Some(close)) => (&value[open + 1..close], &value[close + 1..]),
                    _ => value.split_once(';').unwrap_or((value.as_str(), "")),
                };
                let q = param(params, "q")
                    .map(|q| {
                        q.parse::<f64>()
                            .unwrap_or_else(|_| panic!("bad q in {value}"))
                    })
                    .unwrap_or(1.0);
                (uri.trim().to_owned(), q)
            })
            .collect()
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn split_values(line: &str) -> Vec<String> {
    let (mut values, mut current) = (Vec::new(), String::new());
    let (mut angle, mut quoted) = (false, false);
    for ch in line.chars() {
        match ch {
            '"' if !angle => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !angle && !quoted => {
                values.push(current.trim().to_owned());
                current.clear();
                continue;
            }
            _ => {}
        }
        current.push(ch);
    }
    if !current.trim().is_empty() {
        values.push(current.trim().to_owned());
    }
    values
}

/// The value of `;name=value` among header parameters (outside `<>`), if present;
/// `Some("")` for a parameter without a value.
fn param(value: &str, name: &str) -> Option<String> {
    let params = match value.rfind('>') {
        Some(close) => &value[close + 1..],
        None => value,
    };
    params.split(';').skip(1).find_map(|p| {
        let (n, v) = p.split_once('=').unwrap_or((p, ""));
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// A carrier's UDP socket on loopback.
struct Udp {
    socket: UdpSocket,
    local: SocketAddr,
    to: SocketAddr,
}

impl Udp {
    fn new(to: SocketAddr) -> Self {
        Self::from_ip("127.0.0.1", to)
    }

    fn from_ip(ip: &str, to: SocketAddr) -> Self {
        let socket = UdpSocket::bind((ip, 0)).expect("bind UDP");
        let local = socket.local_addr().expect("local address");
        Self { socket, local, to }
    }

    fn send(&self, bytes: &[u8]) {
        self.socket.send_to(bytes, self.to).expect("send_to");
    }

    /// The next datagram within `wait`.
    fn recv(&self, wait: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65_536];
        self.socket
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .expect("timeout");
        match self.socket.recv_from(&mut buf) {
            Ok((n, _)) => Some(buf[..n].to_vec()),
            Err(_) => None,
        }
    }

    /// The next response with `request`'s Call-ID and CSeq method within `wait`.
    fn response_to(&self, request: &Req, wait: Duration) -> Option<Sip> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let Some(raw) = self.recv(left) else {
                continue;
            };
            if let Some(sip) = Sip::parse(&raw)
                && sip.is_response()
                && sip.call_id() == request.call_id
                && sip.cseq_method() == request.cseq_method
            {
                return Some(sip);
            }
        }
    }

    /// Every datagram received within `wait` (for "nothing comes back" checks).
    fn all_within(&self, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Some(raw) = self.recv(left) {
                got.push(String::from_utf8_lossy(&raw).into_owned());
            }
        }
        got
    }

    /// Datagrams about `call_id` received within `wait`.
    fn about_within(&self, call_id: &str, wait: Duration) -> Vec<String> {
        self.all_within(wait)
            .into_iter()
            .filter(|text| text.contains(call_id))
            .collect()
    }
}

/// Reads one SIP message from a TCP stream, framed by Content-Length; `buf` keeps what
/// was read beyond it.
fn read_tcp_message(stream: &mut TcpStream, buf: &mut Vec<u8>, wait: Duration) -> Option<Sip> {
    let deadline = Instant::now() + wait;
    loop {
        while buf.starts_with(b"\r\n") {
            buf.drain(..2);
        }
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = Sip::parse(&buf[..end + 4])?;
            let length: usize = head
                .header("Content-Length")
                .map(|l| l.parse().expect("numeric Content-Length"))
                .unwrap_or(0);
            let total = end + 4 + length;
            if buf.len() >= total {
                let raw: Vec<u8> = buf.drain(..total).collect();
                return Sip::parse(&raw);
            }
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        let mut chunk = [0u8; 16 * 1024];
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// `SIP/2.0/UDP host:port;p=v;...` → (sent-by, parameters by lower-case name).
fn via_parts(via: &str) -> (String, HashMap<String, String>) {
    let mut parts = via.split(';');
    let sent = parts.next().unwrap_or("").trim();
    let sent_by = sent.split_whitespace().nth(1).unwrap_or("").to_owned();
    let params = parts
        .map(|p| {
            let (n, v) = p.split_once('=').unwrap_or((p, ""));
            (n.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    (sent_by, params)
}

// ---------------------------------------------------------------------------------------
// SIPp
// ---------------------------------------------------------------------------------------

fn scenario(name: &str) -> PathBuf {
    support::checkout().join("tests/sipp").join(name)
}

/// A SIPp run whose traces go to `dir/name.*`.
struct SippRun {
    dir: PathBuf,
    name: String,
}

impl SippRun {
    /// SIPp with `scenario` on `transport` (`u1`, `t1`), bound to 127.0.0.1:`port`,
    /// running at most `limit`, tracing messages and errors.
    fn command(
        dir: &Path,
        name: &str,
        scenario_file: &str,
        transport: &str,
        port: u16,
        limit: Duration,
    ) -> (Self, std::process::Command) {
        let run = Self {
            dir: dir.to_owned(),
            name: name.to_owned(),
        };
        let mut command = sipp();
        command
            .current_dir(dir)
            .arg("-sf")
            .arg(scenario(scenario_file))
            .args(["-t", transport, "-i", "127.0.0.1", "-p", &port.to_string()])
            .args(["-timeout", &format!("{}s", limit.as_secs())])
            .args(["-timeout_error", "-nostdin"])
            .args(["-recv_timeout", "8000"])
            .arg("-trace_msg")
            .arg("-message_file")
            .arg(run.file("msg"))
            .arg("-trace_err")
            .arg("-error_file")
            .arg(run.file("err"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(run.file("out")).expect("sipp stdout file"))
            .stderr(std::fs::File::create(run.file("stderr")).expect("sipp stderr file"));
        (run, command)
    }

    fn file(&self, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", self.name))
    }

    /// Everything SIPp wrote, for assertion messages.
    fn report(&self) -> String {
        let read = |ext: &str| std::fs::read_to_string(self.file(ext)).unwrap_or_default();
        let out = read("out");
        let tail: Vec<&str> = out.lines().rev().take(25).collect();
        format!(
            "--- {name} messages:\n{}\n--- {name} errors:\n{}\n--- {name} stderr:\n{}\n--- {name} screen (end):\n{}",
            read("msg"),
            read("err"),
            read("stderr"),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            name = self.name,
        )
    }

    /// The messages in SIPp's message trace: (received?, message).
    fn messages(&self) -> Vec<(bool, Sip)> {
        let text = std::fs::read_to_string(self.file("msg")).unwrap_or_default();
        let mut found = Vec::new();
        for block in text.split("\n----------------------------------------------- ") {
            let mut lines = block.splitn(3, '\n');
            let _stamp = lines.next();
            let kind = lines.next().unwrap_or("");
            let rest = lines.next().unwrap_or("").trim_start_matches(['\r', '\n']);
            let received = kind.contains("received");
            if !(received || kind.contains("sent")) {
                continue;
            }
            if let Some(sip) = Sip::parse(rest.trim_end().as_bytes()) {
                found.push((received, sip));
            }
        }
        found
    }

    /// The first received message whose start line begins with `start`.
    fn received(&self, start: &str) -> Sip {
        self.messages()
            .into_iter()
            .find(|(received, sip)| *received && sip.start.starts_with(start))
            .map(|(_, sip)| sip)
            .unwrap_or_else(|| panic!("{} received no `{start}`:\n{}", self.name, self.report()))
    }
}

/// Runs a SIPp UAC against the balancer in the foreground; it must place its one call
/// successfully (exit 0).
fn sipp_uac(
    dir: &Path,
    name: &str,
    scenario_file: &str,
    transport: &str,
    balancer: &Balancer,
) -> SippRun {
    sipp_uac_for(
        dir,
        name,
        scenario_file,
        transport,
        balancer,
        Duration::from_secs(20),
    )
}

/// [`sipp_uac`] for a call that may take up to `limit`.
fn sipp_uac_for(
    dir: &Path,
    name: &str,
    scenario_file: &str,
    transport: &str,
    balancer: &Balancer,
    limit: Duration,
) -> SippRun {
    let (run, mut command) =
        SippRun::command(dir, name, scenario_file, transport, free_port(), limit);
    command
        .arg(balancer.addr.to_string())
        .args(["-s", USER, "-m", "1"]);
    let mut uac = Running {
        child: command.spawn().expect("start sipp"),
    };
    let status = wait_exit(name, &mut uac, limit);
    assert_eq!(
        status.code(),
        Some(0),
        "SIPp {name} must complete its call (exit 0)\n{}\n--- balancer log:\n{}",
        run.report(),
        balancer.log_text()
    );
    run
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn redirects_to_the_least_loaded_node_and_copies_the_transaction_headers() {
    let mut fleet = Fleet::new();
    fleet.node("node-a", "sip:127.0.0.1:5071", 90, 100);
    fleet.node("node-b", "sip:127.0.0.1:5072", 10, 100);
    fleet.wait_fresh(&["node-a", "node-b"]);
    let balancer = Balancer::start(
        &fleet,
        "balancer",
        "core-1",
        &[("CALLFLEET_BALANCER__CONTACTS", "2".into())],
        None,
    );
    let udp = Udp::new(balancer.addr);
    let (mut options, _) = balancer.options_until(&udp, 200, Duration::from_secs(10));

    // OPTIONS is answered by the balancer itself, even when it may not be forwarded.
    let mut ping = Req::new("OPTIONS", &balancer.uri(""), udp.local, "UDP");
    ping.max_forwards = Some(0);
    let pong = balancer.ask(&udp, &ping);
    options += 1;
    assert_eq!(pong.code(), 200, "OPTIONS with Max-Forwards: 0:\n{pong}");

    let mut invite = Req::invite(&balancer, udp.local, "UDP");
    invite.lower_vias = vec!["SIP/2.0/UDP 127.0.0.10:5060;branch=z9hG4bK-upstream-1".into()];
    let sent = String::from_utf8(invite.render()).expect("utf8");
    let request = Sip::parse(sent.as_bytes()).expect("our INVITE parses");
    let moved = balancer.ask(&udp, &invite);
    assert_eq!(moved.code(), 302, "{moved}");
    assert_eq!(moved.reason(), "Moved Temporarily", "{moved}");

    // The least utilised node first, the next-best after it with a lower q.
    let contacts = moved.contacts();
    assert_eq!(
        contacts.len(),
        2,
        "two contacts with contacts = 2:\n{moved}"
    );
    assert_eq!(
        contacts[0].0,
        format!("sip:{USER}@127.0.0.1:5072"),
        "node-b (10/100) first:\n{moved}"
    );
    assert_eq!(
        contacts[1].0,
        format!("sip:{USER}@127.0.0.1:5071"),
        "node-a (90/100) second:\n{moved}"
    );
    assert!(
        contacts[0].1 > contacts[1].1,
        "q-values decrease: {contacts:?}\n{moved}"
    );

    // Via, From, Call-ID and CSeq are copied; the top Via gets received and rport.
    let vias = moved.values("Via");
    assert_eq!(vias.len(), 2, "both Vias come back:\n{moved}");
    let (sent_by, params) = via_parts(&vias[0]);
    assert_eq!(sent_by, udp.local.to_string(), "{moved}");
    assert_eq!(params.get("branch"), Some(&invite.branch), "{moved}");
    assert_eq!(
        params.get("received").map(String::as_str),
        Some("127.0.0.1"),
        "{moved}"
    );
    assert_eq!(
        params.get("rport"),
        Some(&udp.local.port().to_string()),
        "{moved}"
    );
    assert_eq!(
        vias[1], invite.lower_vias[0],
        "lower Via untouched:\n{moved}"
    );
    for name in ["From", "Call-ID", "CSeq"] {
        assert_eq!(
            moved.header(name),
            request.header(name),
            "{name} copied:\n{moved}"
        );
    }
    let to = moved.header("To").expect("To");
    assert!(
        to.starts_with(request.header("To").expect("To")),
        "the To is kept: {to}"
    );
    assert!(moved.body.is_empty(), "a redirect has no body:\n{moved}");
    let tag = moved.to_tag().filter(|t| !t.is_empty());
    assert!(tag.is_some(), "a To-tag is added:\n{moved}");

    // The same INVITE again is a retransmission: the very same response.
    udp.send(&invite.render());
    let again = balancer.response(&udp, &invite);
    assert_eq!(
        again.to_string(),
        moved.to_string(),
        "byte-identical answer to a retransmission"
    );

    // The ACK is absorbed: no answer, and it stops the 302's retransmissions (first due
    // 500 ms after it was sent).
    udp.send(&invite.ack(&moved).render());
    let after = udp.about_within(&invite.call_id, Duration::from_millis(1200));
    assert!(
        after.is_empty(),
        "nothing after the ACK, got:\n{}",
        after.join("\n----\n")
    );

    let counters = balancer.stop();
    counters.assert(&[
        ("invites", 1),
        ("retransmissions", 1),
        ("redirected", 1),
        ("local", 0),
        ("acks", 1),
        ("cancels", 0),
        ("options", options),
        ("malformed", 0),
        ("denied", 0),
    ]);
    // OPTIONS answered 503 before the fleet loaded are not calls.
    counters.assert(&[("unavailable", 0), ("busy", 0)]);
}

#[test]
fn a_redirect_is_retransmitted_on_timer_g_until_acked() {
    let mut fleet = Fleet::new();
    fleet.node("node-a", "sip:127.0.0.1:5071", 0, 100);
    fleet.wait_fresh(&["node-a"]);
    let balancer = Balancer::start(&fleet, "balancer", "core-1", &[], None);
    balancer.options_until(&Udp::new(balancer.addr), 200, Duration::from_secs(10));

    // Two calls at once: `acked` ACKs after the third 302 (the 2nd retransmission, ~1.5 s),
    // `ignored` never ACKs. Both listen for 4.6 s: past the 3rd retransmission (~3.5 s).
    let listen = Duration::from_millis(4600);
    let watch = |ack_after: Option<usize>| {
        let udp = Udp::new(balancer.addr);
        let invite = Req::invite(&balancer, udp.local, "UDP");
        let start = Instant::now();
        udp.send(&invite.render());
        let mut seen: Vec<(Duration, Sip)> = Vec::new();
        while let Some(left) = listen.checked_sub(start.elapsed()) {
            let Some(sip) = udp.response_to(&invite, left) else {
                break;
            };
            seen.push((start.elapsed(), sip));
            if Some(seen.len()) == ack_after {
                udp.send(&invite.ack(&seen[0].1).render());
            }
        }
        seen
    };
    let (acked, ignored) = std::thread::scope(|s| {
        let acked = s.spawn(|| watch(Some(3)));
        let ignored = s.spawn(|| watch(None));
        (
            acked.join().expect("acked call"),
            ignored.join().expect("ignored call"),
        )
    });

    let times = |seen: &[(Duration, Sip)]| -> Vec<u128> {
        seen.iter().map(|(t, _)| t.as_millis()).collect()
    };
    let describe = |seen: &[(Duration, Sip)]| {
        format!(
            "arrivals (ms) {:?}; first:\n{}\nbalancer log:\n{}",
            times(seen),
            seen.first().map(|(_, s)| s.to_string()).unwrap_or_default(),
            balancer.log_text()
        )
    };
    // Timer G: 500 ms, doubling (RFC 3261 §17.2.1); allow ±250 ms.
    let expected = [0u128, 500, 1500, 3500];
    assert_eq!(
        ignored.len(),
        4,
        "302 at ~0, 0.5, 1.5, 3.5 s without ACK: {}",
        describe(&ignored)
    );
    assert_eq!(
        acked.len(),
        3,
        "302 at ~0, 0.5, 1.5 s, none after the ACK: {}",
        describe(&acked)
    );
    for seen in [&acked, &ignored] {
        for ((at, sip), want) in seen.iter().zip(expected) {
            let at = at.as_millis();
            let low = want.saturating_sub(if want == 0 { 0 } else { 250 });
            assert!(
                (low..=want + 250).contains(&at),
                "a 302 at {at} ms, expected ~{want} ms: {}",
                describe(seen)
            );
            assert_eq!(sip.code(), 302, "{sip}");
            assert_eq!(sip.raw, seen[0].1.raw, "retransmissions are byte-identical");
        }
    }

    balancer.stop().assert(&[
        ("invites", 2),
        ("redirected", 2),
        ("acks", 1),
        ("retransmissions", 0),
    ]);
}

#[test]
fn calls_get_503_with_retry_after_while_no_node_is_eligible() {
    let mut fleet = Fleet::new();
    let balancer = Balancer::start(&fleet, "balancer", "core-1", &[], None);
    let udp = Udp::new(balancer.addr);
    let mut invites = 0;
    // `retry_after`: the balancer can route no call at all, so the carrier should leave it
    // alone for that long (RFC 3261 §21.5.4).
    let mut refused = |why: &str, code: u16, retry_after: Option<&str>| {
        let invite = Req::invite(&balancer, udp.local, "UDP");
        let answer = balancer.ask(&udp, &invite);
        invites += 1;
        assert_eq!(answer.code(), code, "{why}:\n{answer}");
        assert_eq!(
            answer.header("Retry-After").map(str::trim),
            retry_after,
            "{why}:\n{answer}"
        );
        udp.send(&invite.ack(&answer).render());
        answer
    };

    // No nodes at all (once the first, empty, fleet view has had time to load).
    std::thread::sleep(Duration::from_millis(600));
    let answer = refused("no nodes", 503, Some("5"));
    assert_eq!(answer.reason(), "Service Unavailable", "{answer}");
    let options = Req::new("OPTIONS", &balancer.uri(""), udp.local, "UDP");
    let answer = balancer.ask(&udp, &options);
    assert_eq!(answer.code(), 503, "OPTIONS without nodes:\n{answer}");

    // A node with room takes the call.
    fleet.node("spare", "sip:127.0.0.1:5073", 0, 10);
    balancer.options_until(&udp, 200, Duration::from_secs(15));
    let invite = Req::invite(&balancer, udp.local, "UDP");
    let moved = balancer.ask(&udp, &invite);
    assert_eq!(moved.code(), 302, "{moved}");
    assert_eq!(
        moved.contacts().first().map(|c| c.0.clone()),
        Some(format!("sip:{USER}@127.0.0.1:5073")),
        "{moved}"
    );
    udp.send(&invite.ack(&moved).render());

    // Drained by the operator.
    fleet.cli(&["node", "drain", "spare"]);
    balancer.options_until(&udp, 503, Duration::from_secs(5));
    refused("the node with room is drained", 503, Some("5"));

    // Back, then its agent dies: stale after the heartbeat TTL.
    fleet.cli(&["node", "undrain", "spare"]);
    balancer.options_until(&udp, 200, Duration::from_secs(5));
    fleet.agent("spare").signal("KILL");
    let killed = Instant::now();
    balancer.options_until(&udp, 503, Duration::from_secs(5));
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "stale after {took:?} with a 1 s TTL"
    );
    refused("the node with room stopped heartbeating", 503, Some("5"));

    // A live node at capacity: the callee is busy; no verdict on the balancer.
    fleet.node("full", "sip:127.0.0.1:5071", 50, 50);
    fleet.wait_fresh(&["full"]);
    std::thread::sleep(Duration::from_millis(500));
    let answer = refused("the only node is full (50/50)", 486, None);
    assert_eq!(answer.reason(), "Busy Here", "{answer}");

    balancer.stop().assert(&[
        ("invites", invites + 1),
        ("redirected", 1),
        ("local", 0),
        ("unavailable", 3),
        ("busy", 1),
    ]);
}

#[test]
fn cancel_unknown_methods_and_broken_requests_get_the_right_answers() {
    let mut fleet = Fleet::new();
    fleet.node("node-a", "sip:127.0.0.1:5071", 0, 100);
    fleet.wait_fresh(&["node-a"]);
    // Redirect mode: nothing is proxied, so an unknown CANCEL is ours to answer (in proxy
    // mode it goes to the PBX, see `a_cancel_after_32_s_of_ringing_reaches_the_pbx`).
    let balancer = Balancer::start(
        &fleet,
        "balancer",
        "core-1",
        &[
            ("CALLFLEET_BALANCER__MAX_MESSAGE", "1024".into()),
            ("CALLFLEET_BALANCER__LOCAL_MODE", "redirect".into()),
        ],
        None,
    );
    let udp = Udp::new(balancer.addr);
    let (options, _) = balancer.options_until(&udp, 200, Duration::from_secs(10));

    // CANCEL of a known INVITE transaction, then of an unknown one.
    let invite = Req::invite(&balancer, udp.local, "UDP");
    let moved = balancer.ask(&udp, &invite);
    assert_eq!(moved.code(), 302, "{moved}");
    let cancelled = balancer.ask(&udp, &invite.cancel());
    assert_eq!(
        cancelled.code(),
        200,
        "CANCEL of a known INVITE:\n{cancelled}"
    );
    udp.send(&invite.ack(&moved).render());
    let mut stranger = Req::invite(&balancer, udp.local, "UDP").cancel();
    stranger.branch = unique("z9hG4bK-nobody");
    let unknown = balancer.ask(&udp, &stranger);
    assert_eq!(unknown.code(), 481, "CANCEL of no transaction:\n{unknown}");

    // An in-dialog request for a dialog that is not ours.
    let mut bye = Req::new(
        "BYE",
        &format!("sip:{USER}@127.0.0.1:5071"),
        udp.local,
        "UDP",
    );
    bye.to_tag = Some("theirs".into());
    let answer = balancer.ask(&udp, &bye);
    assert_eq!(
        answer.code(),
        481,
        "BYE in a dialog without our Route:\n{answer}"
    );

    // Methods the balancer does not handle.
    for method in ["PUBLISH", "FOO"] {
        let request = Req::new(method, &balancer.uri(USER), udp.local, "UDP");
        let answer = balancer.ask(&udp, &request);
        assert_eq!(answer.code(), 405, "{method}:\n{answer}");
        let allow = answer
            .header("Allow")
            .unwrap_or_else(|| panic!("405 without Allow:\n{answer}"));
        assert!(allow.contains("INVITE"), "{allow}");
    }

    // Loops end at Max-Forwards: 0.
    let mut looped = Req::invite(&balancer, udp.local, "UDP");
    looped.max_forwards = Some(0);
    let answer = balancer.ask(&udp, &looped);
    assert_eq!(answer.code(), 483, "{answer}");
    udp.send(&looped.ack(&answer).render());

    // Not SIP at all: silence.
    udp.send(b"hello, is this the balancer?\r\n\r\n");
    udp.send(&[0xde, 0xad, 0xbe, 0xef, 0x00, 0x01, 0x02]);
    let noise = udp.all_within(Duration::from_millis(600));
    assert!(
        noise.is_empty(),
        "garbage is dropped, got:\n{}",
        noise.join("\n----\n")
    );

    // A broken header in an otherwise addressable request.
    let mut broken = Req::invite(&balancer, udp.local, "UDP");
    broken.content_length = Some("abc".into());
    let answer = balancer.ask(&udp, &broken);
    assert_eq!(answer.code(), 400, "{answer}");
    udp.send(&broken.ack(&answer).render());

    // Larger than max_message (1024 here): over UDP...
    let mut big = Req::invite(&balancer, udp.local, "UDP");
    big.body = SDP.to_owned() + &"a=x-padding:0123456789abcdef0123456789abcdef\r\n".repeat(30);
    assert!(big.render().len() > 1400);
    let answer = balancer.ask(&udp, &big);
    assert_eq!(answer.code(), 513, "{answer}");
    udp.send(&big.ack(&answer).render());

    // ... and over TCP.
    let mut tcp = TcpStream::connect(balancer.addr).expect("connect TCP");
    let local = tcp.local_addr().expect("local");
    let mut huge = Req::invite(&balancer, local, "TCP");
    huge.body = SDP.to_owned() + &"a=x-padding:0123456789abcdef0123456789abcdef\r\n".repeat(200);
    assert!(huge.render().len() > 9000);
    tcp.write_all(&huge.render()).expect("write");
    let mut buf = Vec::new();
    let answer =
        read_tcp_message(&mut tcp, &mut buf, Duration::from_secs(3)).unwrap_or_else(|| {
            panic!(
                "no answer over TCP to a 9 kB INVITE\nbalancer log:\n{}",
                balancer.log_text()
            )
        });
    assert_eq!(answer.code(), 513, "{answer}");

    balancer.stop().assert(&[
        // Two garbage datagrams, the bad Content-Length, the large INVITE over UDP and
        // over TCP.
        ("malformed", 5),
        ("cancels", 2),
        // The one INVITE that was routed; the looped, broken and large ones were answered
        // before a transaction was made.
        ("invites", 1),
        ("redirected", 1),
        // The 302's, the 483's, the 400's and the 513's (UDP).
        ("acks", 4),
        ("options", options),
        ("retransmissions", 0),
        ("forwarded", 0),
    ]);
}

#[test]
fn the_allow_list_drops_or_rejects_strangers() {
    let mut fleet = Fleet::new();
    fleet.node("node-a", "sip:127.0.0.1:5071", 0, 100);
    fleet.wait_fresh(&["node-a"]);
    let rejecting = Balancer::start(
        &fleet,
        "rejecting",
        "core-1",
        &[],
        Some("[balancer]\nallow = [\"127.0.0.2\"]\ndeny_mode = \"reject\"\n"),
    );
    let dropping = Balancer::start(
        &fleet,
        "dropping",
        "core-1",
        &[],
        Some("[balancer]\nallow = [\"10.0.0.0/8\"]\n"),
    );

    // The listed carrier (127.0.0.2) is served.
    let listed = Udp::from_ip("127.0.0.2", rejecting.addr);
    rejecting.options_until(&listed, 200, Duration::from_secs(10));
    let invite = Req::invite(&rejecting, listed.local, "UDP");
    let moved = rejecting.ask(&listed, &invite);
    assert_eq!(moved.code(), 302, "{moved}");
    listed.send(&invite.ack(&moved).render());

    // Anyone else gets 403 in reject mode (127.0.0.3: 127.0.0.1 is the default local
    // PBX's address, which passes the list)...
    let stranger = Udp::from_ip("127.0.0.3", rejecting.addr);
    let options = Req::new("OPTIONS", &rejecting.uri(""), stranger.local, "UDP");
    let answer = rejecting.ask(&stranger, &options);
    assert_eq!(answer.code(), 403, "{answer}");
    let invite = Req::invite(&rejecting, stranger.local, "UDP");
    let answer = rejecting.ask(&stranger, &invite);
    assert_eq!(answer.code(), 403, "{answer}");

    // ... and nothing at all in drop mode (the default).
    std::thread::sleep(Duration::from_millis(500)); // the fleet view is loaded by now
    let stranger = Udp::from_ip("127.0.0.3", dropping.addr);
    stranger.send(&Req::new("OPTIONS", &dropping.uri(""), stranger.local, "UDP").render());
    stranger.send(&Req::invite(&dropping, stranger.local, "UDP").render());
    let got = stranger.all_within(Duration::from_secs(1));
    assert!(
        got.is_empty(),
        "dropped silently, got:\n{}",
        got.join("\n----\n")
    );

    rejecting
        .stop()
        .assert(&[("denied", 2), ("redirected", 1), ("invites", 1)]);
    dropping
        .stop()
        .assert(&[("denied", 2), ("invites", 0), ("options", 0)]);
}

#[test]
fn sipp_calls_are_redirected_over_udp_and_tcp_and_tcp_is_framed_by_content_length() {
    let mut fleet = Fleet::new();
    fleet.node("node-a", "sip:127.0.0.1:5071", 0, 100);
    fleet.wait_fresh(&["node-a"]);
    let balancer = Balancer::start(&fleet, "balancer", "core-1", &[], None);
    let (options, _) =
        balancer.options_until(&Udp::new(balancer.addr), 200, Duration::from_secs(10));

    // The node's address with the dialled number; over TCP the URI may ask for TCP.
    let points_at_node_a = |moved: &Sip, tcp: bool| {
        let contact = moved.header("Contact").unwrap_or("");
        let udp = format!("<sip:{USER}@127.0.0.1:5071>");
        let tcp_uri = format!("<sip:{USER}@127.0.0.1:5071;transport=tcp>");
        contact == udp || (tcp && contact.eq_ignore_ascii_case(&tcp_uri))
    };
    for transport in ["u1", "t1"] {
        let run = sipp_uac(
            fleet.dir.path(),
            &format!("uac-{transport}"),
            "uac_redirect.xml",
            transport,
            &balancer,
        );
        let moved = run.received("SIP/2.0 302");
        assert!(
            points_at_node_a(&moved, transport == "t1"),
            "{}",
            run.report()
        );
    }

    // Two requests in one TCP write: each is framed by its Content-Length.
    let mut tcp = TcpStream::connect(balancer.addr).expect("connect TCP");
    let local = tcp.local_addr().expect("local");
    let ping = Req::new("OPTIONS", &balancer.uri(""), local, "TCP");
    let invite = Req::invite(&balancer, local, "TCP");
    let mut both = ping.render();
    both.extend_from_slice(&invite.render());
    tcp.write_all(&both).expect("write");
    let mut buf = Vec::new();
    let mut answers = HashMap::new();
    for _ in 0..2 {
        let sip =
            read_tcp_message(&mut tcp, &mut buf, Duration::from_secs(3)).unwrap_or_else(|| {
                panic!(
                    "two answers expected over TCP, got {answers:?}\nbalancer log:\n{}",
                    balancer.log_text()
                )
            });
        answers.insert(sip.cseq_method().to_owned(), sip);
    }
    assert_eq!(answers["OPTIONS"].code(), 200, "{}", answers["OPTIONS"]);
    let moved = &answers["INVITE"];
    assert_eq!(moved.code(), 302, "{moved}");
    assert!(points_at_node_a(moved, true), "{moved}");
    assert_eq!(moved.call_id(), invite.call_id);
    tcp.write_all(&invite.ack(moved).render())
        .expect("write ACK");
    std::thread::sleep(Duration::from_millis(300));

    balancer.stop().assert(&[
        ("invites", 3),
        ("redirected", 3),
        ("acks", 3),
        ("options", options + 1),
        ("unavailable", 0),
        ("malformed", 0),
    ]);
}

/// Starts SIPp playing the local PBX on `port`, in the background. It answers the
/// balancer's OPTIONS probes too, so it runs until SIGUSR1 rather than for one call.
fn sipp_pbx(dir: &Path, port: u16) -> (SippRun, Running) {
    sipp_pbx_with(dir, port, "uas_pbx.xml", Duration::from_secs(20))
}

/// [`sipp_pbx`] with another scenario, for at most `limit`.
fn sipp_pbx_with(
    dir: &Path,
    port: u16,
    scenario_file: &str,
    limit: Duration,
) -> (SippRun, Running) {
    let (run, mut command) = SippRun::command(dir, "pbx", scenario_file, "u1", port, limit);
    let pbx = Running {
        child: command.spawn().expect("start sipp"),
    };
    (run, pbx)
}

/// A fleet whose only node is the balancer's own (`local`), and its balancer proxying to
/// a SIPp PBX on loopback playing `pbx_scenario` for at most `limit`.
fn proxying_to_sipp(pbx_scenario: &str, limit: Duration) -> (Fleet, SippRun, Running, Balancer) {
    let pbx_port = free_port();
    let mut fleet = Fleet::new();
    fleet.node("local", &format!("sip:127.0.0.1:{pbx_port}"), 0, 100);
    fleet.wait_fresh(&["local"]);
    let (pbx_run, mut pbx) = sipp_pbx_with(fleet.dir.path(), pbx_port, pbx_scenario, limit);
    let balancer = Balancer::start(
        &fleet,
        "balancer",
        "local",
        &[
            ("CALLFLEET_BALANCER__LOCAL_MODE", "proxy".into()),
            (
                "CALLFLEET_BALANCER__LOCAL_PBX",
                format!("127.0.0.1:{pbx_port}"),
            ),
        ],
        None,
    );
    balancer.options_until(&Udp::new(balancer.addr), 200, Duration::from_secs(10));
    assert!(pbx.alive(), "SIPp PBX died:\n{}", pbx_run.report());
    (fleet, pbx_run, pbx, balancer)
}

/// Stops the SIPp PBX with SIGUSR1 (it finishes the calls under way): it must have seen
/// every call through as scripted (exit 0).
fn finish_pbx(pbx_run: &SippRun, pbx: &mut Running, carrier: &SippRun, balancer: &Balancer) {
    pbx.signal("USR1");
    let status = wait_exit("SIPp PBX", pbx, Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(0),
        "the PBX side must see the whole call (exit 0)\n{}\n{}\n--- balancer log:\n{}",
        pbx_run.report(),
        carrier.report(),
        balancer.log_text()
    );
}

/// The `branch` of the top Via.
fn top_branch(sip: &Sip) -> String {
    let vias = sip.values("Via");
    let (_, params) = via_parts(vias.first().map_or("", String::as_str));
    params.get("branch").cloned().unwrap_or_default()
}

#[test]
fn a_cancel_after_32_s_of_ringing_reaches_the_pbx() {
    // The PBX rings; the carrier hangs up after 40 s, past the balancer's Timer H (32 s).
    let limit = Duration::from_secs(70);
    let (fleet, pbx_run, mut pbx, balancer) = proxying_to_sipp("balancer_uas_ring.xml", limit);
    let carrier = sipp_uac_for(
        fleet.dir.path(),
        "carrier",
        "balancer_uac_cancel.xml",
        "u1",
        &balancer,
        limit,
    );
    finish_pbx(&pbx_run, &mut pbx, &carrier, &balancer);

    // One INVITE, one CANCEL, one ACK reached the PBX, all with the branch the balancer
    // gave the INVITE (the scenarios check that none has our Route).
    let received: Vec<Sip> = pbx_run
        .messages()
        .into_iter()
        .filter(|(received, sip)| *received && !sip.start.starts_with("OPTIONS "))
        .map(|(_, sip)| sip)
        .collect();
    let methods: Vec<&str> = received
        .iter()
        .map(|sip| sip.start.split(' ').next().unwrap_or(""))
        .collect();
    assert_eq!(methods, ["INVITE", "CANCEL", "ACK"], "{}", pbx_run.report());
    let branch = top_branch(&received[0]);
    assert!(branch.starts_with("z9hG4bK"), "{}", received[0]);
    for sip in &received {
        assert_eq!(top_branch(sip), branch, "{sip}");
        assert_eq!(sip.header("Route"), None, "our Route removed:\n{sip}");
    }
    // The carrier got the PBX's 200 for its CANCEL, not a 481 from the balancer.
    let ok = carrier.received("SIP/2.0 200");
    assert_eq!(ok.cseq_method(), "CANCEL", "{ok}");
    carrier.received("SIP/2.0 487");

    balancer.stop().assert(&[
        ("invites", 1),
        ("local", 1),
        ("cancels", 1),
        ("retransmissions", 0),
        // INVITE, 100, 180, CANCEL, its 200, 487, ACK.
        ("forwarded", 7),
    ]);
}

#[test]
fn the_local_node_s_calls_are_proxied_to_its_pbx_and_back() {
    proxied_call("u1");
}

#[test]
fn a_carrier_on_tcp_gets_the_pbx_s_answers_on_its_connection() {
    // The PBX side stays UDP; our Via names the carrier's connection so its answers find it.
    proxied_call("t1");
}

fn proxied_call(carrier_transport: &str) {
    let pbx_port = free_port();
    let mut fleet = Fleet::new();
    fleet.node("local", &format!("sip:127.0.0.1:{pbx_port}"), 0, 100);
    fleet.wait_fresh(&["local"]);
    let (pbx_run, mut pbx) = sipp_pbx(fleet.dir.path(), pbx_port);
    let balancer = Balancer::start(
        &fleet,
        "balancer",
        "local",
        &[
            ("CALLFLEET_BALANCER__LOCAL_MODE", "proxy".into()),
            (
                "CALLFLEET_BALANCER__LOCAL_PBX",
                format!("127.0.0.1:{pbx_port}"),
            ),
        ],
        None,
    );
    balancer.options_until(&Udp::new(balancer.addr), 200, Duration::from_secs(10));
    assert!(pbx.alive(), "SIPp PBX died:\n{}", pbx_run.report());

    let uac = sipp_uac(
        fleet.dir.path(),
        "carrier",
        "uac_call.xml",
        carrier_transport,
        &balancer,
    );
    pbx.signal("USR1"); // finish the calls under way, then exit
    let status = wait_exit("SIPp PBX", &mut pbx, Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(0),
        "the PBX side must see a whole call (exit 0)\n{}\n{}\n--- balancer log:\n{}",
        pbx_run.report(),
        uac.report(),
        balancer.log_text()
    );

    // What the PBX saw: one INVITE, the balancer's Via on top, then the carrier's; its
    // Record-Route.
    let ours = balancer.addr.to_string();
    let invites = pbx_run
        .messages()
        .into_iter()
        .filter(|(received, sip)| *received && sip.start.starts_with("INVITE "))
        .count();
    assert_eq!(
        invites,
        1,
        "one INVITE reaches the PBX:\n{}",
        pbx_run.report()
    );
    let invite = pbx_run.received("INVITE ");
    let vias = invite.values("Via");
    assert_eq!(vias.len(), 2, "{invite}");
    let (sent_by, params) = via_parts(&vias[0]);
    assert_eq!(sent_by, ours, "the balancer's Via on top:\n{invite}");
    assert!(vias[0].starts_with("SIP/2.0/UDP "), "{invite}");
    assert!(
        params
            .get("branch")
            .is_some_and(|b| b.starts_with("z9hG4bK")),
        "an RFC 3261 branch:\n{invite}"
    );
    assert!(
        vias[1].contains(";branch=z9hG4bK-"),
        "the carrier's Via below:\n{invite}"
    );
    // Over TCP, RFC 5658's double Record-Route: the PBX reaches us over UDP (first in its
    // route set), the carrier over TCP on the connection named (first in its reversed set).
    let record_route = |sip: &Sip| -> Vec<String> {
        let mut values = sip.values("Record-Route");
        if carrier_transport == "t1" {
            let carrier_side = values.pop().unwrap_or_default();
            let prefix = format!("<sip:{ours};transport=tcp;lr;cfconn=127.0.0.1:");
            assert!(carrier_side.starts_with(&prefix), "{sip}");
        }
        values
    };
    assert_eq!(
        record_route(&invite),
        [format!("<sip:{ours};lr>")],
        "{invite}"
    );
    assert_eq!(invite.header("Max-Forwards"), Some("69"), "{invite}");
    for method in ["ACK ", "BYE "] {
        let request = pbx_run.received(method);
        assert!(
            request.header("Route").is_none(),
            "our Route removed:\n{request}"
        );
        let (sent_by, _) = via_parts(&request.values("Via")[0]);
        assert_eq!(sent_by, ours, "forwarded by the balancer:\n{request}");
    }

    // What the carrier saw: its own Via only, and the Record-Route.
    let ok = uac.received("SIP/2.0 200");
    assert_eq!(
        ok.values("Via").len(),
        1,
        "the balancer's Via is popped:\n{ok}"
    );
    assert_eq!(record_route(&ok), [format!("<sip:{ours};lr>")], "{ok}");

    balancer.stop().assert(&[
        ("invites", 1),
        ("local", 1),
        ("redirected", 0),
        ("unavailable", 0),
    ]);
}

#[test]
fn the_local_node_s_calls_are_redirected_to_its_pbx_in_redirect_mode() {
    let pbx_port = free_port();
    let mut fleet = Fleet::new();
    fleet.node("local", &format!("sip:127.0.0.1:{pbx_port}"), 0, 100);
    fleet.wait_fresh(&["local"]);
    let balancer = Balancer::start(
        &fleet,
        "balancer",
        "local",
        &[
            ("CALLFLEET_BALANCER__LOCAL_MODE", "redirect".into()),
            (
                "CALLFLEET_BALANCER__LOCAL_PBX",
                format!("127.0.0.1:{pbx_port}"),
            ),
        ],
        None,
    );
    let udp = Udp::new(balancer.addr);
    balancer.options_until(&udp, 200, Duration::from_secs(10));
    let invite = Req::invite(&balancer, udp.local, "UDP");
    let moved = balancer.ask(&udp, &invite);
    assert_eq!(moved.code(), 302, "{moved}");
    assert_eq!(
        moved.header("Contact"),
        Some(format!("<sip:{USER}@127.0.0.1:{pbx_port}>").as_str()),
        "{moved}"
    );
    udp.send(&invite.ack(&moved).render());
    std::thread::sleep(Duration::from_millis(200));

    balancer
        .stop()
        .assert(&[("invites", 1), ("local", 1), ("redirected", 0), ("acks", 1)]);
}

#[test]
fn invites_that_waited_in_the_kernel_too_long_get_503_not_a_late_302() {
    let mut fleet = Fleet::new();
    fleet.node("node-a", "sip:127.0.0.1:5071", 0, 100);
    fleet.wait_fresh(&["node-a"]);
    let balancer = Balancer::start(
        &fleet,
        "balancer",
        "core-1",
        &[("CALLFLEET_BALANCER__OVERLOAD_DELAY", "200ms".to_owned())],
        None,
    );
    let udp = Udp::new(balancer.addr);
    balancer.options_until(&udp, 200, Duration::from_secs(15));

    // A stopped process stands in for one that cannot keep up: the INVITE sits in the
    // socket buffer for 600 ms, and the kernel's arrival stamp says so.
    balancer.process.freeze();
    let late = Req::invite(&balancer, udp.local, "UDP");
    udp.send(&late.render());
    std::thread::sleep(Duration::from_millis(600));
    balancer.process.signal("CONT");
    let answer = balancer.response(&udp, &late);
    assert_eq!(answer.code(), 503, "{answer}");
    assert_eq!(answer.header("Retry-After").map(str::trim), Some("5"));
    udp.send(&late.ack(&answer).render());

    let prompt = Req::invite(&balancer, udp.local, "UDP");
    let answer = balancer.ask(&udp, &prompt);
    assert_eq!(
        answer.code(),
        302,
        "a prompt INVITE is routed again:\n{answer}"
    );
    udp.send(&prompt.ack(&answer).render());
    balancer
        .stop()
        .assert(&[("overload", 1), ("redirected", 1), ("unavailable", 0)]);
}

#[test]
fn without_its_store_the_balancer_routes_on_the_last_view_for_the_grace_then_refuses() {
    let mut fleet = Fleet::new();
    fleet.url = fresh_mysql_url();
    fleet.node("node-a", "sip:127.0.0.1:5071", 0, 100);
    fleet.wait_fresh(&["node-a"]);
    // The balancer reads the store through a relay the test can cut; the agent does not.
    let (credentials, rest) = fleet
        .url
        .strip_prefix("mysql://")
        .and_then(|r| r.split_once('@'))
        .expect("mysql url");
    let (upstream, database) = rest.split_once('/').expect("url has a database");
    let relay = Relay::start(upstream.to_owned());
    let relayed = format!("mysql://{credentials}@127.0.0.1:{}/{database}", relay.port);
    let balancer = Balancer::start(
        &fleet,
        "balancer",
        "core-1",
        &[
            ("CALLFLEET_STORE__URL", relayed),
            ("CALLFLEET_BALANCER__STALE_GRACE", "4s".to_owned()),
        ],
        None,
    );
    let udp = Udp::new(balancer.addr);
    balancer.options_until(&udp, 200, Duration::from_secs(15));
    let call = |expected: u16, why: &str| {
        let invite = Req::invite(&balancer, udp.local, "UDP");
        let answer = balancer.ask(&udp, &invite);
        assert_eq!(answer.code(), expected, "{why}:\n{answer}");
        udp.send(&invite.ack(&answer).render());
        answer
    };

    relay.set_down(true);
    // Longer than heartbeat_ttl (1 s), shorter than stale_grace (4 s).
    std::thread::sleep(Duration::from_secs(2));
    let moved = call(302, "within the grace the last view stands");
    assert_eq!(moved.contacts()[0].0, format!("sip:{USER}@127.0.0.1:5071"));

    // Past the grace only the local node may take calls, and core-1 is not in this fleet.
    std::thread::sleep(Duration::from_millis(2500));
    call(503, "past the grace, without a local node");

    relay.set_down(false);
    balancer.options_until(&udp, 200, Duration::from_secs(10));
    call(302, "the store is back");
    let log = balancer.log_text();
    assert_eq!(log.matches("store unreachable").count(), 1, "{log}");
    assert_eq!(log.matches("store back").count(), 1, "{log}");
    balancer
        .stop()
        .assert(&[("redirected", 2), ("unavailable", 1)]);
}

#[test]
fn an_invite_retransmitted_after_its_ack_is_not_a_second_call() {
    let mut fleet = Fleet::new();
    fleet.node("node-a", "sip:127.0.0.1:5071", 0, 100);
    fleet.wait_fresh(&["node-a"]);
    let balancer = Balancer::start(&fleet, "balancer", "core-1", &[], None);
    let udp = Udp::new(balancer.addr);
    let (options, _) = balancer.options_until(&udp, 200, Duration::from_secs(10));

    // INVITE, 302, ACK; then a copy of the INVITE that the network delayed past the ACK
    // (RFC 3261 Timer I: the transaction absorbs it for 5 s).
    let invite = Req::invite(&balancer, udp.local, "UDP");
    let moved = balancer.ask(&udp, &invite);
    assert_eq!(moved.code(), 302, "{moved}");
    udp.send(&invite.ack(&moved).render());
    std::thread::sleep(Duration::from_millis(100));
    udp.send(&invite.render());
    let after = udp.about_within(&invite.call_id, Duration::from_millis(1200));
    assert!(
        after.is_empty(),
        "no second answer, got:\n{}",
        after.join("\n----\n")
    );

    // An RFC 2543 client (no magic cookie) sends the next INVITE of a call with the same
    // branch: its CSeq tells it apart, so it is a new call with its own answer.
    let mut first = Req::invite(&balancer, udp.local, "UDP");
    first.branch = "1".into();
    let first_answer = balancer.ask(&udp, &first);
    assert_eq!(first_answer.code(), 302, "{first_answer}");
    udp.send(&first.ack(&first_answer).render());
    let next = Req {
        cseq: 2,
        ..first.clone()
    };
    let next_answer = balancer.ask(&udp, &next);
    assert_eq!(next_answer.code(), 302, "{next_answer}");
    assert_eq!(
        next_answer.header("CSeq"),
        Some("2 INVITE"),
        "{next_answer}"
    );
    udp.send(&next.ack(&next_answer).render());
    std::thread::sleep(Duration::from_millis(200));

    balancer.stop().assert(&[
        ("invites", 3),
        ("redirected", 3),
        ("retransmissions", 1),
        ("acks", 3),
        ("options", options),
        ("malformed", 0),
    ]);
}

/// Sends `count` INVITEs (never ACKed) and returns the status code of each answer.
fn unacked_invites(balancer: &Balancer, udp: &Udp, count: usize) -> Vec<(Req, u16)> {
    let invites: Vec<Req> = (0..count)
        .map(|_| Req::invite(balancer, udp.local, "UDP"))
        .collect();
    for invite in &invites {
        udp.send(&invite.render());
    }
    let mut answers: HashMap<String, Sip> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while answers.len() < count {
        let left = deadline
            .checked_duration_since(Instant::now())
            .unwrap_or_else(|| panic!("{} of {count} answered", answers.len()));
        if let Some(sip) = udp.recv(left).and_then(|raw| Sip::parse(&raw)) {
            answers.entry(sip.call_id().to_owned()).or_insert(sip);
        }
    }
    invites
        .into_iter()
        .map(|invite| {
            let code = answers[&invite.call_id].code();
            if code == 503 {
                let answer = &answers[&invite.call_id];
                assert_eq!(answer.header("Retry-After"), Some("5"), "{answer}");
            }
            (invite, code)
        })
        .collect()
}

#[test]
fn a_flood_of_unacked_invites_stops_at_the_table_bound() {
    let mut fleet = Fleet::new();
    fleet.node("node-a", "sip:127.0.0.1:5071", 0, 100_000);
    fleet.wait_fresh(&["node-a"]);
    let bounded = Balancer::start(
        &fleet,
        "bounded",
        "core-1",
        &[("CALLFLEET_BALANCER__MAX_TRANSACTIONS", "40".into())],
        None,
    );
    let udp = Udp::new(bounded.addr);
    bounded.options_until(&udp, 200, Duration::from_secs(10));
    let answered = unacked_invites(&bounded, &udp, 50);
    let codes =
        |answered: &[(Req, u16)], code: u16| answered.iter().filter(|(_, c)| *c == code).count();
    assert_eq!((codes(&answered, 302), codes(&answered, 503)), (40, 10));
    // Only what the table holds is resent on Timer G (first at 500 ms, next at 1.5 s).
    let refused: Vec<&str> = answered
        .iter()
        .filter(|(_, code)| *code == 503)
        .map(|(invite, _)| invite.call_id.as_str())
        .collect();
    let resent = udp.all_within(Duration::from_millis(1100));
    let resent_302 = resent
        .iter()
        .filter(|text| text.starts_with("SIP/2.0 302 "))
        .count();
    let resent_503 = resent
        .iter()
        .filter(|text| refused.iter().any(|call| text.contains(call)))
        .count();
    assert_eq!((resent_302, resent_503, resent.len()), (40, 0, 40));
    bounded.stop().assert(&[
        ("invites", 40),
        ("redirected", 40),
        ("table_full", 10),
        ("transactions", 40),
    ]);

    // Negative control: without the bound the same flood is all taken, and all kept.
    let unbounded = Balancer::start(&fleet, "unbounded", "core-1", &[], None);
    let udp = Udp::new(unbounded.addr);
    unbounded.options_until(&udp, 200, Duration::from_secs(10));
    let answered = unacked_invites(&unbounded, &udp, 50);
    assert_eq!(codes(&answered, 302), 50);
    unbounded
        .stop()
        .assert(&[("invites", 50), ("table_full", 0), ("transactions", 50)]);
}

/// A SIP message read from `socket` within 3 s, or a panic naming `what`.
fn next_sip(socket: &UdpSocket, what: &str) -> Sip {
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut buf = vec![0u8; 65_536];
    let n = socket
        .recv(&mut buf)
        .unwrap_or_else(|err| panic!("{what}: nothing within 3 s ({err})"));
    Sip::parse(&buf[..n]).unwrap_or_else(|| panic!("{what}: not SIP"))
}

/// One proxied call where the PBX answers and hangs up from `pbx_sends_from`, not from
/// `local_pbx`: the carrier (127.0.0.2, the only allowed network) must get the 180 and
/// the BYE. Returns whether it got each.
fn pbx_elsewhere(
    fleet: &Fleet,
    name: &str,
    pbx: &UdpSocket,
    pbx_sends_from: &UdpSocket,
    extra: &[(&str, String)],
) -> (Balancer, bool, bool) {
    let pbx_addr = pbx.local_addr().expect("addr");
    let mut env = vec![
        ("CALLFLEET_BALANCER__LOCAL_MODE", "proxy".to_owned()),
        ("CALLFLEET_BALANCER__LOCAL_PBX", pbx_addr.to_string()),
        ("CALLFLEET_BALANCER__ALLOW", "[\"127.0.0.2\"]".to_owned()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
    let balancer = Balancer::start(fleet, name, "local", &env, None);
    let carrier = Udp::from_ip("127.0.0.2", balancer.addr);
    balancer.options_until(&carrier, 200, Duration::from_secs(10));
    let invite = Req::invite(&balancer, carrier.local, "UDP");
    carrier.send(&invite.render());
    // The balancer's OPTIONS probes arrive here too; nobody answers them.
    let forwarded = loop {
        let sip = next_sip(pbx, "the INVITE at the PBX");
        if !sip.start.starts_with("OPTIONS ") {
            break sip;
        }
    };
    assert!(forwarded.start.starts_with("INVITE "), "{forwarded}");
    let vias: String = forwarded
        .values("Via")
        .iter()
        .map(|via| format!("Via: {via}\r\n"))
        .collect();
    let ringing = format!(
        "SIP/2.0 180 Ringing\r\n{vias}From: {}\r\nTo: {};tag=pbx1\r\nCall-ID: {}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
        forwarded.header("From").expect("From"),
        forwarded.header("To").expect("To"),
        invite.call_id,
    );
    pbx_sends_from
        .send_to(ringing.as_bytes(), balancer.addr)
        .expect("send");
    let rang = carrier
        .response_to(&invite, Duration::from_secs(2))
        .is_some_and(|sip| sip.code() == 180);
    let sender = pbx_sends_from.local_addr().expect("addr");
    let bye = format!(
        "BYE sip:carrier@{} SIP/2.0\r\nVia: SIP/2.0/UDP {sender};branch=z9hG4bK-pbx-bye-{name}\r\n\
Route: <sip:{};lr>\r\nFrom: {};tag=pbx1\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: 1 BYE\r\nMax-Forwards: 70\r\n\
Content-Length: 0\r\n\r\n",
        carrier.local,
        balancer.addr,
        forwarded.header("To").expect("To"),
        forwarded.header("From").expect("From"),
        invite.call_id,
    );
    pbx_sends_from
        .send_to(bye.as_bytes(), balancer.addr)
        .expect("send");
    let hung_up = carrier
        .about_within(&invite.call_id, Duration::from_secs(1))
        .iter()
        .any(|text| text.starts_with("BYE "));
    (balancer, rang, hung_up)
}

#[test]
fn the_pbx_is_recognised_by_its_address_not_only_its_port() {
    let pbx = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut fleet = Fleet::new();
    let pbx_addr = pbx.local_addr().expect("addr");
    fleet.node("local", &format!("sip:{pbx_addr}"), 0, 100);
    fleet.wait_fresh(&["local"]);

    // Asterisk answers from another port of the PBX's address (another transport, a
    // wildcard bind): by default, the PBX's address and this host's count.
    let other_port = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let (balancer, rang, hung_up) = pbx_elsewhere(&fleet, "default", &pbx, &other_port, &[]);
    assert!(
        rang && hung_up,
        "180 {rang}, BYE {hung_up}:\n{}",
        balancer.log_text()
    );
    balancer.stop().assert(&[
        ("invites", 1),
        ("local", 1),
        ("forwarded", 3),
        ("denied", 0),
    ]);

    // From another address altogether (NAT, an advertised address): listed in
    // balancer.pbx_addresses.
    let other_address = UdpSocket::bind("127.0.0.4:0").expect("bind");
    let listed = [(
        "CALLFLEET_BALANCER__PBX_ADDRESSES",
        "[\"127.0.0.4\"]".to_owned(),
    )];
    let (balancer, rang, hung_up) = pbx_elsewhere(&fleet, "listed", &pbx, &other_address, &listed);
    assert!(
        rang && hung_up,
        "180 {rang}, BYE {hung_up}:\n{}",
        balancer.log_text()
    );
    balancer.stop().assert(&[
        ("invites", 1),
        ("local", 1),
        ("forwarded", 3),
        ("denied", 0),
    ]);

    // Negative control: the same from an address that is neither listed nor allowed is
    // dropped, 180 and BYE alike.
    let stranger = UdpSocket::bind("127.0.0.5:0").expect("bind");
    let (balancer, rang, hung_up) = pbx_elsewhere(&fleet, "stranger", &pbx, &stranger, &listed);
    assert!(!rang && !hung_up, "180 {rang}, BYE {hung_up}");
    balancer.stop().assert(&[
        ("invites", 1),
        ("local", 1),
        ("forwarded", 1),
        ("denied", 2),
    ]);
}

#[test]
fn a_tcp_trunk_gets_the_pbx_s_bye_on_its_connection() {
    let (fleet, pbx_run, mut pbx, balancer) =
        proxying_to_sipp("balancer_uas_hangup.xml", Duration::from_secs(20));
    let carrier = sipp_uac(
        fleet.dir.path(),
        "carrier",
        "balancer_uac_tcp_trunk.xml",
        "t1",
        &balancer,
    );
    finish_pbx(&pbx_run, &mut pbx, &carrier, &balancer);
    let ours = balancer.addr.to_string();
    let bye = carrier.received("BYE ");
    assert_eq!(bye.values("Via").len(), 2, "{bye}");
    assert_relayed_over_tcp(&bye, &balancer);
    let ok = carrier.received("SIP/2.0 200");
    let record_route = ok.values("Record-Route");
    assert_eq!(record_route.len(), 2, "{ok}");
    assert_eq!(record_route[0], format!("<sip:{ours};lr>"), "{ok}");
    assert!(
        record_route[1].starts_with(&format!("<sip:{ours};transport=tcp;lr;cfconn=")),
        "{ok}"
    );
    let pbx_ok = pbx_run.received("SIP/2.0 200");
    assert_eq!(
        pbx_ok.cseq_method(),
        "BYE",
        "the carrier's 200 came back:\n{pbx_ok}"
    );
    balancer.stop().assert(&[
        ("invites", 1),
        ("local", 1),
        // INVITE, 180, 200, ACK, BYE, its 200.
        ("forwarded", 6),
        ("malformed", 0),
    ]);
}

/// A request the balancer relayed to a TCP carrier: its Via on top names TCP, and both of
/// its Routes (RFC 5658's double Record-Route) are gone.
fn assert_relayed_over_tcp(request: &Sip, balancer: &Balancer) {
    let ours = balancer.addr.to_string();
    assert!(
        request.values("Via")[0].starts_with(&format!("SIP/2.0/TCP {ours};branch=z9hG4bK")),
        "our Via names the transport we sent it on:\n{request}"
    );
    assert_eq!(
        request.header("Route"),
        None,
        "both of our Routes removed:\n{request}"
    );
}

/// A TCP trunk's connection is gone by the time the PBX hangs up (its SBC restarted, or an
/// idle timeout on either side closed it during a long call): the BYE goes to the
/// trunk's Contact on a connection the balancer opens, as RFC 3261 §18.1.1 has it, and
/// the trunk's 200 comes back on that connection to the PBX. Before, the BYE went out
/// over UDP to the closed connection's ephemeral port, and a TCP-only trunk never got it.
#[test]
fn a_tcp_trunk_whose_connection_closed_gets_the_bye_on_a_new_one() {
    let (_fleet, pbx_run, mut pbx, balancer) =
        proxying_to_sipp("balancer_uas_hangup.xml", Duration::from_secs(20));
    // The trunk listens where its Via and Contact say, and calls from an ephemeral port.
    let trunk = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the trunk");
    let listening = trunk.local_addr().expect("addr");
    let udp_twin = UdpSocket::bind(listening).expect("bind the trunk's UDP port");
    udp_twin
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut calling = TcpStream::connect(balancer.addr).expect("connect");
    let ephemeral = calling.local_addr().expect("addr");
    let invite = Req::invite(&balancer, listening, "TCP");
    calling.write_all(&invite.render()).expect("send INVITE");
    let mut buf = Vec::new();
    let ok = loop {
        let response = read_tcp_message(&mut calling, &mut buf, Duration::from_secs(5))
            .expect("the call is answered");
        if response.code() == 200 {
            break response;
        }
    };
    let mut route: Vec<String> = ok.values("Record-Route");
    route.reverse();
    let pbx_contact = ok.values("Contact")[0].clone();
    let target = pbx_contact
        .trim_start_matches('<')
        .split('>')
        .next()
        .unwrap_or_default()
        .to_owned();
    let ack = Req {
        method: "ACK".into(),
        uri: target,
        cseq_method: "ACK".into(),
        branch: unique("z9hG4bK-ack"),
        to_tag: ok.to_tag(),
        extra: vec![format!("Route: {}", route.join(", "))],
        body: String::new(),
        ..invite.clone()
    };
    calling.write_all(&ack.render()).expect("send ACK");
    // The trunk's side of the connection goes away with the call up.
    drop(calling);

    trunk.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut stream, accepted_from) = loop {
        match trunk.accept() {
            Ok(accepted) => break accepted,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => panic!("accept: {err}"),
        }
        if Instant::now() > deadline {
            let mut udp = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(n) = udp_twin.recv(&mut chunk) {
                udp.push(String::from_utf8_lossy(&chunk[..n]).into_owned());
            }
            panic!(
                "no connection to the trunk's address {listening} within 10 s; over UDP it got \
                 {udp:?}\n--- balancer log:\n{}",
                balancer.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    stream.set_nonblocking(false).expect("blocking");
    stream.set_nodelay(true).expect("nodelay");
    let mut buf = Vec::new();
    let bye = read_tcp_message(&mut stream, &mut buf, Duration::from_secs(5))
        .expect("the BYE on the new connection");
    assert!(bye.start.starts_with("BYE "), "{bye}");
    assert_eq!(bye.call_id(), invite.call_id, "{bye}");
    assert_relayed_over_tcp(&bye, &balancer);
    assert_ne!(accepted_from.port(), ephemeral.port());
    let mut answer = String::from("SIP/2.0 200 OK\r\n");
    for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
        for value in bye.lines_named(name) {
            answer += &format!("{name}: {value}\r\n");
        }
    }
    answer += "Content-Length: 0\r\n\r\n";
    stream.write_all(answer.as_bytes()).expect("answer the BYE");

    wait_until(
        "the PBX gets the trunk's 200",
        Duration::from_secs(5),
        || {
            pbx_run.messages().iter().any(|(received, sip)| {
                *received && sip.is_response() && sip.code() == 200 && sip.cseq_method() == "BYE"
            })
        },
    );
    pbx.signal("USR1");
    let status = wait_exit("SIPp PBX", &mut pbx, Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(0),
        "the PBX saw the whole call\n{}",
        pbx_run.report()
    );
    drop(stream);
    balancer.stop().assert(&[
        ("invites", 1),
        ("local", 1),
        // INVITE, 180, 200, ACK, BYE, its 200.
        ("forwarded", 6),
        ("malformed", 0),
    ]);
}

/// Runs `callfleet balancer` with `env`; returns its exit code and stderr when it exits
/// within 10 s, or `None` once it says `balancer ready` (then it is stopped).
fn start_or_refuse(env: &[(&str, String)]) -> Option<(Option<i32>, String)> {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("balancer.log");
    let child = callfleet()
        .arg("balancer")
        .env(
            "CALLFLEET_STORE__URL",
            format!("sqlite://{}/fleet.db", dir.path().display()),
        )
        .env("CALLFLEET_NODE__ID", "core-1")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start callfleet balancer");
    let mut process = Running { child };
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("balancer ready") {
            process.signal("TERM");
            wait_exit("balancer", &mut process, Duration::from_secs(10));
            return None;
        }
        if !process.alive() {
            let status = wait_exit("balancer", &mut process, Duration::from_secs(1));
            return Some((
                status.code(),
                std::fs::read_to_string(&log).unwrap_or_default(),
            ));
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "neither ready nor refused:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn addresses_no_carrier_can_reach_are_refused_at_start() {
    let port = free_port();
    let wildcard = ("CALLFLEET_BALANCER__LISTEN", format!("0.0.0.0:{port}"));
    let (code, err) = start_or_refuse(std::slice::from_ref(&wildcard)).expect("refused");
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("balancer.advertise") && err.contains(&format!("0.0.0.0:{port}")),
        "{err}"
    );
    let advertised = (
        "CALLFLEET_BALANCER__ADVERTISE",
        format!("127.0.0.10:{port}"),
    );
    assert_eq!(
        start_or_refuse(&[wildcard.clone(), advertised.clone()]),
        None,
        "with an advertised address it starts"
    );

    // Redirect mode gives carriers local_pbx (127.0.0.1:5080 by default) in a 302.
    let redirect = ("CALLFLEET_BALANCER__LOCAL_MODE", "redirect".to_owned());
    let (code, err) = start_or_refuse(&[wildcard.clone(), advertised.clone(), redirect.clone()])
        .expect("refused");
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("balancer.local_pbx") && err.contains("127.0.0.1:5080"),
        "{err}"
    );
    // Carriers on this host reach a loopback PBX. (A PBX address on another host is the
    // engine test addresses_nobody_can_reach_are_refused_at_start: started here, the
    // balancer would probe it, and tests send nothing beyond loopback.)
    let local_carriers = ("CALLFLEET_BALANCER__ALLOW", "[\"127.0.0.0/8\"]".to_owned());
    assert_eq!(
        start_or_refuse(&[wildcard, advertised, redirect, local_carriers]),
        None,
        "with carriers that can reach the PBX it starts"
    );
}
