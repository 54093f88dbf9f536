//! The balancer's TCP transport under abuse: a real `callfleet balancer` (SQLite store, one
//! node-agent, so OPTIONS is answered 200) attacked over loopback with plain std
//! `TcpStream`s. Each test prints the figures it measured (run with `--nocapture`).
//!
//! The limits these tests lean on are the transport's built-in ones
//! (`balancer/src/transport/tcp.rs`, [`Limits`]): a connection must complete a message
//! within 5 s of opening it and each message within 5 s of its first byte, 64 connections
//! per address, writes that make no progress for 10 s close the connection, shutdown
//! flushes for at most 2 s.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::carrier::balancer_stopped;
use support::*;

/// A connection that has not completed a message by then is closed (and so is one whose
/// message takes longer than this from its first byte).
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections one address may hold.
const PER_ADDRESS: usize = 64;

// ---------------------------------------------------------------------------------------
// The fleet and the balancer
// ---------------------------------------------------------------------------------------

/// A SQLite store in a temp dir with one node-agent heartbeating into it.
struct Fleet {
    /// Declared first: the agent is killed before the directory goes.
    _agent: Running,
    dir: tempfile::TempDir,
    url: String,
}

impl Fleet {
    fn new() -> Self {
        let keep = std::env::var_os("CALLFLEET_TEST_KEEP").is_some();
        let dir = tempfile::Builder::new()
            .prefix("callfleet-balancer-tcp-")
            .disable_cleanup(keep)
            .tempdir()
            .expect("temp dir");
        if keep {
            eprintln!("test files kept in {}", dir.path().display());
        }
        let url = format!("sqlite://{}/fleet.db", dir.path().display());
        let agent = start_agent_with(
            &url,
            "node-a",
            "300ms",
            &dir.path().join("agent.log"),
            &[
                ("CALLFLEET_NODE__SIP_URI", "sip:127.0.0.1:5071"),
                ("CALLFLEET_NODE__MAX_CALLS", "100"),
            ],
        );
        wait_until("node-a heartbeating", Duration::from_secs(20), || {
            node(&status(&url), "node-a").is_some_and(|n| n["stale"] == false)
        });
        Self {
            _agent: agent,
            dir,
            url,
        }
    }
}

/// A running `callfleet balancer`.
struct Balancer {
    process: Running,
    addr: SocketAddr,
    log: PathBuf,
    /// OPTIONS sent over UDP until the balancer could route (each counted in `options`).
    probes: u64,
}

impl Balancer {
    /// Starts a balancer on a free loopback port with extra `env` and optionally a TOML
    /// `config`, and waits until OPTIONS over UDP from 127.0.0.1 is answered 200 (the
    /// fleet view holds node-a).
    fn start(fleet: &Fleet, name: &str, env: &[(&str, &str)], config: Option<&str>) -> Self {
        Self::start_probing_from(fleet, name, env, config, "127.0.0.1")
    }

    /// [`Balancer::start`], probing from `probe_ip` (an allowed address).
    fn start_probing_from(
        fleet: &Fleet,
        name: &str,
        env: &[(&str, &str)],
        config: Option<&str>,
        probe_ip: &str,
    ) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let log = fleet.dir.path().join(format!("{name}.log"));
        let mut command = callfleet();
        if let Some(text) = config {
            let file = fleet.dir.path().join(format!("{name}.toml"));
            std::fs::write(&file, text).expect("write config");
            command.arg("--config").arg(file);
        }
        let child = command
            .args(["--log-format", "json", "balancer"])
            .env("CALLFLEET_STORE__URL", &fleet.url)
            .env("CALLFLEET_NODE__ID", "core-1")
            .env("CALLFLEET_BALANCER__LISTEN", addr.to_string())
            .env("CALLFLEET_BALANCER__REFRESH", "100ms")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create log"))
            .spawn()
            .expect("start callfleet balancer");
        let mut balancer = Self {
            process: Running { child },
            addr,
            log,
            probes: 0,
        };
        balancer.wait_routable(probe_ip);
        balancer
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `balancer ready`, then sends OPTIONS over UDP from `ip` until one is
    /// answered 200 (each one sent is counted: the socket is bound by then).
    fn wait_routable(&mut self, ip: &str) {
        let start = Instant::now();
        while !self.log_text().contains("balancer ready") {
            assert!(
                self.process.alive(),
                "`callfleet balancer` exited before `balancer ready`:\n{}",
                self.log_text()
            );
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no `balancer ready` within 20 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let socket = UdpSocket::bind((ip, 0)).expect("bind UDP");
        let local = socket.local_addr().expect("local");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut buf = vec![0u8; 65_536];
        while start.elapsed() < Duration::from_secs(20) {
            assert!(
                self.process.alive(),
                "`callfleet balancer` exited:\n{}",
                self.log_text()
            );
            let id = unique("ready-");
            socket
                .send_to(&options(&id, local, self.addr, "UDP", ""), self.addr)
                .expect("send");
            self.probes += 1;
            while let Ok((n, _)) = socket.recv_from(&mut buf) {
                if let Some(answer) = Response::parse(&buf[..n])
                    && answer.call_id == id
                {
                    if answer.code == 200 {
                        return;
                    }
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no OPTIONS 200 within 20 s; log:\n{}", self.log_text());
    }

    /// CPU time the balancer process has used so far, all threads (ns resolution, from
    /// `/proc/PID/task/*/schedstat`).
    fn cpu(&self) -> Duration {
        let tasks = format!("/proc/{}/task", self.process.pid());
        let mut total = 0u64;
        for task in std::fs::read_dir(&tasks).expect("read /proc/PID/task") {
            let path = task.expect("task").path().join("schedstat");
            // A thread may end between the listing and the read.
            if let Ok(text) = std::fs::read_to_string(path) {
                total += text
                    .split_whitespace()
                    .next()
                    .and_then(|ns| ns.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        Duration::from_nanos(total)
    }

    /// SIGTERM; returns how long the process took to exit (it is killed, and the test
    /// fails, past `limit`) and the fields of its `balancer stopped` line.
    fn stop_within(mut self, limit: Duration) -> (Duration, Value) {
        let start = Instant::now();
        self.process.signal("TERM");
        let status = wait_exit("balancer after SIGTERM", &mut self.process, limit);
        let took = start.elapsed();
        let text = self.log_text();
        assert!(status.success(), "balancer exit {status:?}; log:\n{text}");
        let fields = balancer_stopped(&text)
            .unwrap_or_else(|| panic!("no `balancer stopped` JSON line in the log:\n{text}"));
        (took, fields)
    }
}

// ---------------------------------------------------------------------------------------
// SIP over a plain TcpStream
// ---------------------------------------------------------------------------------------

fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// An OPTIONS from `from` with Call-ID `id`, `extra` header lines (each ending in CRLF)
/// before Content-Length, and no body.
fn options(id: &str, from: SocketAddr, to: SocketAddr, transport: &str, extra: &str) -> Vec<u8> {
    request("OPTIONS", id, from, to, transport, extra, "")
}

fn request(
    method: &str,
    id: &str,
    from: SocketAddr,
    to: SocketAddr,
    transport: &str,
    extra: &str,
    body: &str,
) -> Vec<u8> {
    format!(
        "{method} sip:5551234@{to} SIP/2.0\r\nVia: SIP/2.0/{transport} {from};branch=z9hG4bK-{id};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:carrier@{from}>;tag=f-{id}\r\nTo: <sip:5551234@{to}>\r\n\
         Call-ID: {id}\r\nCSeq: 1 {method}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// An INVITE whose body (SDP padded with attribute lines) makes it `size` bytes or a few
/// more.
fn invite_of_size(id: &str, from: SocketAddr, to: SocketAddr, size: usize) -> Vec<u8> {
    let mut body = String::from(
        "v=0\r\no=carrier 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio 40000 RTP/AVP 0\r\n",
    );
    let head = request(
        "INVITE",
        id,
        from,
        to,
        "TCP",
        "Content-Type: application/sdp\r\n",
        "",
    );
    while head.len() + body.len() < size {
        body += "a=x-padding:0123456789abcdef0123456789abcdef0123456789abcdef\r\n";
    }
    request(
        "INVITE",
        id,
        from,
        to,
        "TCP",
        "Content-Type: application/sdp\r\n",
        &body,
    )
}

/// The parts of a response these tests look at.
#[derive(Debug)]
struct Response {
    code: u16,
    call_id: String,
    raw: String,
}

impl Response {
    fn parse(raw: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(raw).ok()?;
        let code = text.strip_prefix("SIP/2.0 ")?.get(..3)?.parse().ok()?;
        let call_id = text
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                let name = name.trim();
                (name.eq_ignore_ascii_case("call-id") || name.eq_ignore_ascii_case("i"))
                    .then(|| value.trim().to_owned())
            })
            .unwrap_or_default();
        Some(Self {
            code,
            call_id,
            raw: text.to_owned(),
        })
    }
}

/// How a wait on a connection ended, when no message came.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The balancer closed the connection (EOF or reset).
    Closed,
    /// Nothing within the wait, the connection still open.
    TimedOut,
}

/// A client connection with what it has read and not yet consumed.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    local: SocketAddr,
}

impl Conn {
    fn connect(to: SocketAddr) -> Self {
        Self::new(TcpStream::connect(to).expect("connect"))
    }

    /// Connects from `ip` (any loopback address works on Linux).
    fn connect_from(ip: &str, to: SocketAddr) -> Self {
        Self::connect_with(ip, None, to)
    }

    /// Connects from `ip`, with a receive buffer of `receive_buffer` bytes if given.
    fn connect_with(ip: &str, receive_buffer: Option<u32>, to: SocketAddr) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let stream = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            if let Some(size) = receive_buffer {
                socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
            }
            let ip: IpAddr = ip.parse().expect("ip");
            socket.bind(SocketAddr::new(ip, 0)).expect("bind");
            socket.connect(to).await.expect("connect")
        });
        let stream = stream.into_std().expect("std stream");
        stream.set_nonblocking(false).expect("blocking");
        Self::new(stream)
    }

    fn new(stream: TcpStream) -> Self {
        stream.set_nodelay(true).expect("nodelay");
        let local = stream.local_addr().expect("local");
        Self {
            stream,
            buf: Vec::new(),
            local,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Reads more bytes within `wait`: `Ok(n)` bytes, or how it ended.
    fn fill(&mut self, wait: Duration) -> Result<usize, Ended> {
        self.stream
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .expect("timeout");
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(Ended::Closed),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(Ended::TimedOut)
            }
            Err(_) => Err(Ended::Closed),
        }
    }

    /// The next response within `wait`, framed by Content-Length.
    fn response(&mut self, wait: Duration) -> Result<Response, Ended> {
        let deadline = Instant::now() + wait;
        loop {
            while self.buf.starts_with(b"\r\n") {
                self.buf.drain(..2);
            }
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let length: usize = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        let name = name.trim();
                        (name.eq_ignore_ascii_case("content-length")
                            || name.eq_ignore_ascii_case("l"))
                        .then(|| value.trim().parse().expect("numeric Content-Length"))
                    })
                    .unwrap_or(0);
                let total = end + 4 + length;
                if self.buf.len() >= total {
                    let raw: Vec<u8> = self.buf.drain(..total).collect();
                    return Ok(Response::parse(&raw).expect("a SIP response"));
                }
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Err(Ended::TimedOut);
            };
            self.fill(left)?;
        }
    }

    /// The response to `id`, skipping others; panics naming `what` if none comes in 3 s.
    fn answer(&mut self, id: &str, what: &str, log: &dyn Fn() -> String) -> Response {
        loop {
            match self.response(Duration::from_secs(3)) {
                Ok(answer) if answer.call_id == id => return answer,
                Ok(_) => {}
                Err(ended) => panic!("{what}: no answer ({ended:?}); balancer log:\n{}", log()),
            }
        }
    }

    /// Waits up to `wait` for the balancer to close the connection; returns how long that
    /// took and any bytes that came first.
    fn closed_within(&mut self, wait: Duration) -> Result<(Duration, Vec<u8>), Ended> {
        let start = Instant::now();
        loop {
            let Some(left) = wait.checked_sub(start.elapsed()) else {
                return Err(Ended::TimedOut);
            };
            match self.fill(left) {
                Ok(_) => {}
                Err(Ended::Closed) => return Ok((start.elapsed(), std::mem::take(&mut self.buf))),
                Err(Ended::TimedOut) => return Err(Ended::TimedOut),
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------

#[test]
fn an_oversized_message_gets_513_and_the_connection_keeps_serving() {
    let fleet = Fleet::new();
    let balancer = Balancer::start(&fleet, "balancer", &[], None);
    let log = || balancer.log_text();
    let mut conn = Conn::connect(balancer.addr);

    // 20 kB (max_message is 8192), and an OPTIONS right behind it in the same write: the
    // body must be skipped by exactly its Content-Length for the OPTIONS to be read.
    let big = invite_of_size("big-1", conn.local, balancer.addr, 20_000);
    assert!(big.len() >= 20_000);
    let after = options("after-1", conn.local, balancer.addr, "TCP", "");
    conn.send(&[big.as_slice(), after.as_slice()].concat());
    let too_large = conn.answer("big-1", "20 kB INVITE", &log);
    assert_eq!(too_large.code, 513, "{}", too_large.raw);
    let answer = conn.answer("after-1", "OPTIONS after the 20 kB INVITE", &log);
    assert_eq!(answer.code, 200, "{}", answer.raw);

    // 200 kB, larger than anything the old transport buffered, written in pieces; then
    // another OPTIONS on the same connection.
    let huge = invite_of_size("big-2", conn.local, balancer.addr, 200_000);
    for piece in huge.chunks(7_000) {
        conn.send(piece);
    }
    let too_large = conn.answer("big-2", "200 kB INVITE", &log);
    assert_eq!(too_large.code, 513, "{}", too_large.raw);
    conn.send(&options("after-2", conn.local, balancer.addr, "TCP", ""));
    let answer = conn.answer("after-2", "OPTIONS after the 200 kB INVITE", &log);
    assert_eq!(answer.code, 200, "{}", answer.raw);

    // A header section longer than max_message cannot be framed without reading an
    // unbounded head: no answer, the connection is closed.
    let mut fat = Conn::connect(balancer.addr);
    let padding = "X-Padding: 0123456789abcdef0123456789abcdef0123456789abcdef\r\n".repeat(150);
    let head = options("fat-head", fat.local, balancer.addr, "TCP", &padding);
    assert!(head.len() > 9_000);
    fat.send(&head);
    let (took, got) = fat
        .closed_within(Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("9 kB of headers: connection not closed ({e:?})"));
    assert!(
        got.is_empty(),
        "no answer to a 9 kB head, got:\n{}",
        String::from_utf8_lossy(&got)
    );
    eprintln!("9 kB head: closed after {took:?}");

    // The first connection still serves.
    conn.send(&options("after-3", conn.local, balancer.addr, "TCP", ""));
    let answer = conn.answer("after-3", "OPTIONS on the first connection", &log);
    assert_eq!(answer.code, 200, "{}", answer.raw);

    let probes = balancer.probes;
    let (_, counters) = balancer.stop_within(Duration::from_secs(5));
    assert_eq!(counters["options"], probes + 3, "{counters}");
    // Two oversized INVITEs and the fat head.
    assert_eq!(counters["malformed"], 3, "{counters}");
    assert_eq!(counters["invites"], 0, "{counters}");
}

#[test]
fn a_denied_address_is_closed_at_accept() {
    let fleet = Fleet::new();
    let balancer = Balancer::start_probing_from(
        &fleet,
        "balancer",
        &[],
        // The PBX on 127.0.0.3, named as the only address it sends from (by default every
        // address of this host would be, 127.0.0.1 included): its address passes the allow
        // list whatever it says.
        Some(
            "[balancer]\nallow = [\"127.0.0.2\"]\nlocal_pbx = \"127.0.0.3:5080\"\n\
             pbx_addresses = [\"127.0.0.3\"]\n",
        ),
        "127.0.0.2",
    );
    let log = || balancer.log_text();

    // 127.0.0.1 is not listed: closed before it sends anything.
    let mut stranger = Conn::connect(balancer.addr);
    let (took, got) = stranger
        .closed_within(Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("a denied address is not closed at accept ({e:?})"));
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    eprintln!("denied connection closed {took:?} after connect");

    // 127.0.0.2 is: served.
    let mut carrier = Conn::connect_from("127.0.0.2", balancer.addr);
    carrier.send(&options("listed", carrier.local, balancer.addr, "TCP", ""));
    let answer = carrier.answer("listed", "OPTIONS from 127.0.0.2", &log);
    assert_eq!(answer.code, 200, "{}", answer.raw);

    // A PBX address is served whatever the allow list says, from any port: the engine
    // takes its requests, so the transport must not close them at accept.
    let mut pbx = Conn::connect_from("127.0.0.3", balancer.addr);
    pbx.send(&options("pbx", pbx.local, balancer.addr, "TCP", ""));
    let answer = pbx.answer("pbx", "OPTIONS from the PBX's address 127.0.0.3", &log);
    assert_eq!(answer.code, 200, "{}", answer.raw);

    let probes = balancer.probes;
    let (_, counters) = balancer.stop_within(Duration::from_secs(5));
    assert_eq!(counters["denied"], 1, "{counters}");
    assert_eq!(counters["options"], probes + 2, "{counters}");
}

#[test]
fn idle_and_slow_connections_are_closed_after_the_message_timeout() {
    let fleet = Fleet::new();
    let balancer = Balancer::start(&fleet, "balancer", &[], None);

    // Connected, silent.
    let mut idle = Conn::connect(balancer.addr);
    // A message begun, then one byte a second: the bytes keep coming, the message never
    // ends in time.
    let mut slow = Conn::connect(balancer.addr);
    let message = options("slow", slow.local, balancer.addr, "TCP", "");
    slow.send(&message[..40]);
    let begun = Instant::now();
    let dripper = std::thread::spawn({
        let mut stream = slow.stream.try_clone().expect("clone");
        let message = message.clone();
        move || {
            for byte in &message[40..60] {
                std::thread::sleep(Duration::from_secs(1));
                if stream.write_all(&[*byte]).is_err() {
                    return;
                }
            }
        }
    });
    let limit = MESSAGE_TIMEOUT + Duration::from_secs(3);
    let (idle_after, got) = idle
        .closed_within(limit)
        .unwrap_or_else(|e| panic!("idle connection not closed within {limit:?} ({e:?})"));
    assert!(got.is_empty());
    let (_, got) = slow
        .closed_within(limit.saturating_sub(begun.elapsed()))
        .unwrap_or_else(|e| panic!("dripping connection not closed within {limit:?} ({e:?})"));
    let slow_after = begun.elapsed();
    assert!(got.is_empty());
    let _ = dripper.join();
    eprintln!("idle connection closed after {idle_after:?}, dripping one after {slow_after:?}");
    let early = MESSAGE_TIMEOUT - Duration::from_millis(500);
    assert!(idle_after >= early, "idle closed too early: {idle_after:?}");
    assert!(slow_after >= early, "slow closed too early: {slow_after:?}");

    // A connection that sends a message in time is served and kept.
    let mut prompt = Conn::connect(balancer.addr);
    prompt.send(&options("prompt", prompt.local, balancer.addr, "TCP", ""));
    let answer = prompt.answer("prompt", "OPTIONS", &|| balancer.log_text());
    assert_eq!(answer.code, 200, "{}", answer.raw);
    assert_eq!(
        prompt.closed_within(MESSAGE_TIMEOUT + Duration::from_secs(1)),
        Err(Ended::TimedOut),
        "a connection that completed a message is kept past the first-message timeout"
    );
    balancer.stop_within(Duration::from_secs(5));
}

#[test]
fn one_address_holds_at_most_64_connections() {
    let fleet = Fleet::new();
    let balancer = Balancer::start(&fleet, "balancer", &[], None);
    let log = || balancer.log_text();
    let mut held = Vec::with_capacity(PER_ADDRESS);
    for n in 0..PER_ADDRESS {
        let mut conn = Conn::connect(balancer.addr);
        let id = format!("held-{n}");
        conn.send(&options(&id, conn.local, balancer.addr, "TCP", ""));
        let answer = conn.answer(&id, "OPTIONS on a connection below the cap", &log);
        assert_eq!(answer.code, 200, "connection {n}: {}", answer.raw);
        held.push(conn);
    }
    let mut over = Conn::connect(balancer.addr);
    let (took, got) = over
        .closed_within(Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connection {} not closed ({e:?})", PER_ADDRESS + 1));
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    eprintln!(
        "{} connections held from 127.0.0.1, number {} closed {took:?} after connect",
        held.len(),
        PER_ADDRESS + 1
    );

    // Another address is not affected, and a freed slot is taken again.
    let mut other = Conn::connect_from("127.0.0.3", balancer.addr);
    other.send(&options("other", other.local, balancer.addr, "TCP", ""));
    assert_eq!(
        other.answer("other", "OPTIONS from 127.0.0.3", &log).code,
        200
    );
    drop(held.pop());
    let start = Instant::now();
    let mut again = loop {
        // The balancer sees the close a moment later.
        let mut conn = Conn::connect(balancer.addr);
        conn.send(&options("again", conn.local, balancer.addr, "TCP", ""));
        match conn.response(Duration::from_millis(500)) {
            Ok(answer) => {
                assert_eq!(answer.code, 200, "{}", answer.raw);
                break conn;
            }
            Err(_) if start.elapsed() < Duration::from_secs(3) => {}
            Err(ended) => panic!("no slot after closing one ({ended:?}):\n{}", log()),
        }
    };
    again.send(&options("again-2", again.local, balancer.addr, "TCP", ""));
    assert_eq!(again.answer("again-2", "second OPTIONS", &log).code, 200);
    balancer.stop_within(Duration::from_secs(5));
}

#[test]
fn a_peer_that_never_reads_does_not_hold_up_shutdown() {
    let fleet = Fleet::new();
    let balancer = Balancer::start(&fleet, "balancer", &[], None);
    // A small receive window (the kernel doubles it): the answers fill it sooner.
    let mut conn = Conn::connect_with("127.0.0.1", Some(4096), balancer.addr);
    // OPTIONS without reading a single answer, until the answers fill every buffer on
    // the way and the balancer can write no more.
    conn.stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .expect("write timeout");
    let one = options("deaf", conn.local, balancer.addr, "TCP", "");
    let batch = one.repeat(10);
    // Paced, so the answers leave as fast as they are made until the buffers are full: the
    // balancer stops reading because it cannot write, not because of a burst.
    let (mut sent, start) = (0usize, Instant::now());
    let stalled = loop {
        if start.elapsed() > Duration::from_secs(30) {
            break false;
        }
        match conn.stream.write(&batch) {
            Ok(n) => sent += n,
            Err(_) => break true,
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    eprintln!(
        "never-reading peer: {sent} bytes ({} OPTIONS) written in {:?} before the balancer stopped reading",
        sent / one.len(),
        start.elapsed()
    );
    assert!(
        stalled,
        "the balancer kept reading for 30 s; log:\n{}",
        balancer.log_text()
    );
    let (took, counters) = balancer.stop_within(Duration::from_secs(5));
    eprintln!("shutdown took {took:?} with the never-reading peer connected");
    assert!(
        counters["options"].as_u64().is_some_and(|n| n > 0),
        "{counters}"
    );
    drop(conn);
}

/// CPU time of the balancer while `bytes` arrive `chunk` bytes per write, a write every
/// `pace`; the answer to `id` must come.
fn drip(balancer: &Balancer, id: &str, bytes: &[u8], chunk: usize, pace: Duration) -> Duration {
    let mut conn = Conn::connect(balancer.addr);
    let before = balancer.cpu();
    for piece in bytes.chunks(chunk) {
        conn.send(piece);
        if !pace.is_zero() {
            std::thread::sleep(pace);
        }
    }
    let answer = conn.answer(id, "dripped message", &|| balancer.log_text());
    assert_eq!(answer.code, 200, "{}", answer.raw);
    balancer.cpu().saturating_sub(before)
}

#[test]
fn a_one_byte_drip_costs_linear_work() {
    let fleet = Fleet::new();
    let balancer = Balancer::start(&fleet, "balancer", &[], None);
    let from: SocketAddr = "127.0.0.1:5099".parse().expect("addr");
    // Slow enough that a linear transport idles between bytes, so what it costs is what
    // the bytes cost, not how fast the client can write; fast enough that 4 kB arrive
    // well within the 5 s a message may take.
    let pace = Duration::from_micros(500);

    // 4 kB of short header lines: the most lines per byte, each of which a re-parse
    // walks again.
    let lines = "a:1\r\n".repeat(760);
    let head = |id: &str| options(id, from, balancer.addr, "TCP", &lines);
    let size = head("head-drip").len();
    assert!((4000..=4096).contains(&size), "{size}");
    // The same size, nearly all of it body: counted, never searched.
    let mut filler = size - options("body-drip", from, balancer.addr, "TCP", "").len();
    let body = loop {
        let body = request(
            "OPTIONS",
            "body-drip",
            from,
            balancer.addr,
            "TCP",
            "",
            &"x".repeat(filler),
        );
        match body.len().cmp(&size) {
            std::cmp::Ordering::Equal => break body,
            std::cmp::Ordering::Greater => filler -= body.len() - size,
            std::cmp::Ordering::Less => filler += size - body.len(),
        }
    };

    let once = drip(
        &balancer,
        "head-once",
        &head("head-once"),
        size,
        Duration::ZERO,
    );
    let as_head = drip(&balancer, "head-drip", &head("head-drip"), 1, pace);
    let as_body = drip(&balancer, "body-drip", &body, 1, pace);
    let ratio = as_head.as_secs_f64() / as_body.as_secs_f64();
    eprintln!(
        "{size} B message ({} header lines): {once:?} CPU at once; dripped one byte per write every {pace:?}: {as_head:?} CPU as headers, {as_body:?} as body; ratio {ratio:.2}",
        760 + 7
    );
    // Linear framing costs the same per read whichever part of the message the byte is
    // in; re-parsing the whole buffer on every read makes the header drip cost grow with
    // the square of its length.
    assert!(
        ratio < 1.6,
        "a header drip costs {ratio:.2}× a body drip of the same size ({as_head:?} vs {as_body:?})"
    );
    balancer.stop_within(Duration::from_secs(5));
}

#[test]
fn a_burst_of_pipelined_requests_is_answered_in_full() {
    let fleet = Fleet::new();
    let balancer = Balancer::start(&fleet, "balancer", &[], None);
    let mut conn = Conn::connect(balancer.addr);
    // More than the 256 answers a connection may have queued, in one write.
    let count = 2000;
    let burst: Vec<u8> = (0..count)
        .flat_map(|n| options(&format!("burst-{n}"), conn.local, balancer.addr, "TCP", ""))
        .collect();
    let writer = std::thread::spawn({
        let mut stream = conn.stream.try_clone().expect("clone");
        move || stream.write_all(&burst).expect("write the burst")
    });
    for n in 0..count {
        match conn.response(Duration::from_secs(10)) {
            Ok(answer) => {
                assert_eq!(answer.call_id, format!("burst-{n}"), "{}", answer.raw);
                assert_eq!(answer.code, 200, "{}", answer.raw);
            }
            Err(ended) => panic!(
                "{n} of {count} pipelined OPTIONS answered, then {ended:?}; log:\n{}",
                balancer.log_text()
            ),
        }
    }
    writer.join().expect("writer");
    let probes = balancer.probes;
    let (_, counters) = balancer.stop_within(Duration::from_secs(5));
    assert_eq!(counters["options"], probes + count, "{counters}");
}

#[test]
fn a_crlf_ping_gets_a_crlf_pong() {
    let fleet = Fleet::new();
    let balancer = Balancer::start(&fleet, "balancer", &[], None);
    let log = || balancer.log_text();
    let mut conn = Conn::connect(balancer.addr);
    conn.send(&options("first", conn.local, balancer.addr, "TCP", ""));
    assert_eq!(conn.answer("first", "OPTIONS", &log).code, 200);

    // RFC 5626 §4.4.1: a double CRLF is a ping, a single CRLF its pong.
    conn.send(b"\r\n\r\n");
    let start = Instant::now();
    while conn.buf.len() < 2 && start.elapsed() < Duration::from_secs(2) {
        if let Err(ended) = conn.fill(Duration::from_secs(2)) {
            panic!("no pong ({ended:?}); log:\n{}", log());
        }
    }
    assert_eq!(conn.buf, b"\r\n", "exactly one CRLF");
    conn.buf.clear();
    // Nothing more: the ping is answered once.
    assert_eq!(conn.fill(Duration::from_millis(500)), Err(Ended::TimedOut));

    // A ping split over two writes is one ping, and the stream stays framed.
    conn.send(b"\r\n");
    std::thread::sleep(Duration::from_millis(100));
    conn.send(b"\r\n");
    assert_eq!(conn.fill(Duration::from_secs(2)), Ok(2));
    assert_eq!(conn.buf, b"\r\n");
    conn.buf.clear();
    conn.send(&options("after-ping", conn.local, balancer.addr, "TCP", ""));
    assert_eq!(
        conn.answer("after-ping", "OPTIONS after pings", &log).code,
        200
    );
    let probes = balancer.probes;
    let (_, counters) = balancer.stop_within(Duration::from_secs(5));
    assert_eq!(counters["options"], probes + 2, "{counters}");
    assert_eq!(counters["malformed"], 0, "{counters}");
}

#[test]
fn the_tcp_limits_follow_the_configuration() {
    let fleet = Fleet::new();
    let balancer = Balancer::start(
        &fleet,
        "balancer",
        &[],
        Some(
            "[balancer]\ntcp_max_connections_per_address = 2\ntcp_message_timeout = \"1s\"\n\
             tcp_idle_timeout = \"2s\"\n",
        ),
    );
    let log = || balancer.log_text();

    // Two served from 127.0.0.1, the third closed at accept.
    let mut served = Vec::new();
    let mut first_answered = None;
    for n in 0..2 {
        let mut conn = Conn::connect(balancer.addr);
        let id = format!("cap-{n}");
        conn.send(&options(&id, conn.local, balancer.addr, "TCP", ""));
        assert_eq!(conn.answer(&id, "OPTIONS below the cap", &log).code, 200);
        first_answered.get_or_insert_with(Instant::now);
        served.push(conn);
    }
    let first_answered = first_answered.expect("answered");
    let mut third = Conn::connect(balancer.addr);
    let (_, got) = third
        .closed_within(Duration::from_millis(900))
        .unwrap_or_else(|e| panic!("the third connection from one address is open ({e:?})"));
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));

    // A silent new connection waits for its first message 1 s, not 5.
    let mut silent = Conn::connect_from("127.0.0.2", balancer.addr);
    let (silent_after, _) = silent
        .closed_within(Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("a silent connection outlived tcp_message_timeout ({e:?})"));
    assert!(
        (Duration::from_millis(800)..Duration::from_millis(2500)).contains(&silent_after),
        "closed after {silent_after:?}"
    );

    // A connection that was served and then carries nothing is closed 2 s after its
    // answer, not 180 s.
    let got = served[0]
        .closed_within(Duration::from_secs(5))
        .map(|(_, got)| got)
        .unwrap_or_else(|e| panic!("an idle connection outlived tcp_idle_timeout ({e:?})"));
    let idle_total = first_answered.elapsed();
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert!(
        (Duration::from_millis(1800)..Duration::from_millis(3500)).contains(&idle_total),
        "idle connection closed {idle_total:?} after its answer"
    );
    eprintln!("silent connection closed after {silent_after:?}, idle one after {idle_total:?}");
    balancer.stop_within(Duration::from_secs(5));
}
