//! The FastAGI server over real TCP on loopback, with the test playing Asterisk's side from
//! the bytes captured between Asterisk 22.10.1 and a FastAGI server
//! (`fixtures/asterisk/fastagi-session.jsonl`): every command the server writes is
//! compared with the captured line byte for byte, and every reply is the captured one.
//!
//! Limits are tested with a control on the other side of them: the session cap refuses the
//! next connection and, raised by one, serves it; the environment timeout closes a silent
//! connection and spares one that speaks in time; the shutdown grace cuts a blocked
//! session and spares one that ends within it.

use std::net::SocketAddr;
use std::time::Duration;

use callfleet_node_agent::agi::proto::{
    Command, Event, MAX_ENVIRONMENT, MAX_REPLY, Reply, parse_event,
};
use callfleet_node_agent::agi::{AgiServer, Scripts, Session, Settings, Stats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

use self::capture::{Capture, FROM_ASTERISK, TO_ASTERISK};

/// The most any step of a test waits for the other side before failing.
const WAIT: Duration = Duration::from_secs(5);

#[path = "../src/agi/capture.rs"]
mod capture;

/// What only the server's tests read from a capture.
impl Capture {
    /// The environment with its script (`agi_network_script` and the end of
    /// `agi_request`) replaced by `script`; `None` drops the script line and leaves the
    /// URL without a path, as Asterisk sends it for `agi://host:port`.
    pub(crate) fn environment_for(&self, script: Option<&str>) -> String {
        let block = self.environment();
        let old = block
            .lines()
            .find_map(|line| line.strip_prefix("agi_network_script: "))
            .expect("a captured script");
        let script_line = format!("agi_network_script: {old}\n");
        let url_end = format!("/{old}\n");
        assert!(block.contains(&script_line) && block.contains(&url_end));
        match script {
            Some(new) => block
                .replace(&script_line, &format!("agi_network_script: {new}\n"))
                .replace(&url_end, &format!("/{new}\n")),
            None => block.replace(&script_line, "").replace(&url_end, "\n"),
        }
    }

    /// The rows after the environment, notes left out: what the server must write
    /// (`>>>`) and what Asterisk answered (`<<<`), in order.
    pub(crate) fn exchange(&self) -> Vec<(String, String)> {
        self.rows
            .iter()
            .filter(|(dir, _)| dir == FROM_ASTERISK || dir == TO_ASTERISK)
            .skip(1)
            .cloned()
            .collect()
    }
}

// ----- harness -----

/// A server on a free loopback port.
struct Server {
    server: AgiServer,
    shutdown: CancellationToken,
}

impl Server {
    async fn start(settings: Settings, scripts: Scripts) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let shutdown = CancellationToken::new();
        let server = AgiServer::start(listener, settings, scripts, shutdown.clone());
        Self { server, shutdown }
    }

    fn address(&self) -> SocketAddr {
        self.server.local_addr()
    }

    fn stats(&self) -> Stats {
        self.server.stats()
    }

    /// Waits until `check` holds for the counters (sessions end a moment after their
    /// connection closes), failing with the last counters after [`WAIT`].
    async fn stats_until(&self, what: &str, check: impl Fn(&Stats) -> bool) -> Stats {
        let deadline = Instant::now() + WAIT;
        loop {
            let stats = self.stats();
            if check(&stats) {
                return stats;
            }
            assert!(Instant::now() < deadline, "{what}: {stats:?}");
            sleep(Duration::from_millis(5)).await;
        }
    }

    async fn stop(self) -> Stats {
        self.shutdown.cancel();
        timeout(WAIT, self.server.stopped())
            .await
            .expect("the server stops")
    }
}

fn settings() -> Settings {
    Settings {
        max_sessions: 16,
        environment_timeout: Duration::from_secs(2),
        command_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(1),
    }
}

/// How the server ended a connection.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// An orderly close (FIN): everything it had read was consumed.
    Closed,
    /// A reset: it closed with bytes of ours unread.
    Reset,
}

/// Asterisk's side of one connection.
struct Asterisk {
    stream: TcpStream,
    /// Bytes from the server not yet taken as a line.
    pending: Vec<u8>,
}

impl Asterisk {
    async fn connect(address: SocketAddr) -> Self {
        let stream = TcpStream::connect(address).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Self {
            stream,
            pending: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Sends `bytes` one at a time, each in its own segment.
    async fn send_bytewise(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.send(&[*byte]).await;
            sleep(Duration::from_millis(1)).await;
        }
    }

    /// The next command line the server writes, line feed included.
    async fn command(&mut self) -> String {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return String::from_utf8(line).expect("commands are UTF-8");
            }
            let mut chunk = [0; 4096];
            let read = timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("a command within 5 s")
                .expect("read");
            assert!(
                read > 0,
                "the server closed where a command was due; it had sent {:?}",
                String::from_utf8_lossy(&self.pending)
            );
            self.pending.extend_from_slice(&chunk[..read]);
        }
    }

    /// Waits for the server to close the connection, failing if it writes anything first.
    async fn end(&mut self) -> End {
        assert!(
            self.pending.is_empty(),
            "unread: {:?}",
            String::from_utf8_lossy(&self.pending)
        );
        let mut chunk = [0; 4096];
        let read = timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("the server closes within 5 s");
        match read {
            Ok(0) => End::Closed,
            Ok(n) => panic!(
                "expected the close, got {:?}",
                String::from_utf8_lossy(&chunk[..n])
            ),
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => End::Reset,
            Err(err) => panic!("read: {err}"),
        }
    }
}

/// The `route-clean` session: the cleanest captured environment (`AGISTATUS=SUCCESS`).
fn clean_capture() -> Capture {
    Capture::all().remove(4)
}

/// The captured reply to a `SET VARIABLE`.
fn captured_set_reply() -> String {
    let exchange = clean_capture().exchange();
    let at = exchange
        .iter()
        .position(|(dir, data)| dir == ">>>" && data.starts_with("SET VARIABLE "))
        .expect("a captured SET VARIABLE");
    exchange[at + 1].1.clone()
}

// ----- ping -----

#[tokio::test]
async fn ping_sets_callfleet_result_as_res_agi_reads_it() {
    let capture = clean_capture();
    let exchange = capture.exchange();
    // The captured SET VARIABLE, which res_agi answered `200 result=1` and read back with
    // GET VARIABLE: ping's line is that one with another name and value.
    let captured_set = &exchange
        .iter()
        .find(|(dir, data)| dir == ">>>" && data.starts_with("SET VARIABLE "))
        .expect("a captured SET VARIABLE")
        .1;
    assert_eq!(
        captured_set,
        "SET VARIABLE AGENT_DEVICE Local/200@default\n"
    );
    let expected = captured_set
        .replace("AGENT_DEVICE", "CALLFLEET_RESULT")
        .replace("Local/200@default", "pong");
    assert_eq!(expected, "SET VARIABLE CALLFLEET_RESULT pong\n");

    let server = Server::start(settings(), Scripts::builtin()).await;
    for (round, bytewise) in [false, true].into_iter().enumerate() {
        let mut asterisk = Asterisk::connect(server.address()).await;
        let environment = capture.environment_for(Some("ping"));
        assert!(environment.contains("agi_request: agi://127.0.0.1:4573/ping\n"));
        if bytewise {
            // Re-parsed at line ends only, the environment still reads whole.
            asterisk.send_bytewise(environment.as_bytes()).await;
        } else {
            asterisk.send(environment.as_bytes()).await;
        }
        assert_eq!(asterisk.command().await, expected, "round {round}");
        asterisk.send(captured_set_reply().as_bytes()).await;
        assert_eq!(asterisk.end().await, End::Closed, "round {round}");
    }
    let stats = server.stats_until("both ended", |s| s.active == 0).await;
    assert_eq!(
        stats,
        Stats {
            listening: true,
            accepted: 2,
            commands: 2,
            ..Stats::default()
        }
    );
    let stopped = server.stop().await;
    assert!(!stopped.listening);
}

// ----- replaying whole captured sessions -----

/// Where an unsolicited `HANGUP` goes in a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hangup {
    /// Where it was captured, 100 ms after the reply before it, while the script waits for
    /// it ([`Session::wait_for_hangup`]).
    Idle,
    /// Ahead of the reply to the next command, in the same write.
    AheadOfReply,
    /// Ahead of the reply to the next command, 50 ms before it.
    AheadOfReplyApart,
}

/// What the replay script saw: each reply with `hung_up()` after it.
type Seen = Result<Vec<(Reply, bool)>, String>;

/// A script that sends `commands` in order, waiting for the caller's hangup after the
/// first when `wait_after_first`, and reports what it saw.
fn replay_script(
    commands: Vec<Command>,
    wait_after_first: bool,
    report: mpsc::UnboundedSender<Seen>,
) -> Scripts {
    Scripts::new().with("replay", move |mut session: Session| {
        let (commands, report) = (commands.clone(), report.clone());
        async move {
            let mut seen = Vec::new();
            for (i, command) in commands.iter().enumerate() {
                match session.send(command).await {
                    Ok(reply) => seen.push((reply, session.hung_up())),
                    Err(err) => {
                        let _ = report.send(Err(format!("command {i}: {err}")));
                        return Err(err);
                    }
                }
                if i == 0 && wait_after_first {
                    if let Err(err) = session.wait_for_hangup().await {
                        let _ = report.send(Err(format!("waiting for the hangup: {err}")));
                        return Err(err);
                    }
                    assert!(session.hung_up());
                }
            }
            let _ = report.send(Ok(seen));
            Ok(())
        }
    })
}

/// Replays captured session `index` against the replay script sending `commands`: the
/// server's lines must be the captured ones, byte for byte.
async fn replay(index: usize, commands: Vec<Command>, hangup: Hangup, bytewise: bool) {
    let capture = Capture::all().remove(index);
    let label = format!("{} ({hangup:?}, bytewise {bytewise})", capture.header);
    let exchange = capture.exchange();
    let is_hangup = |(dir, data): &(String, String)| dir == "<<<" && data == "HANGUP\n";
    let unsolicited = exchange.iter().any(is_hangup);
    let (report, mut seen) = mpsc::unbounded_channel();
    let server = Server::start(
        settings(),
        replay_script(commands, unsolicited && hangup == Hangup::Idle, report),
    )
    .await;
    let mut asterisk = Asterisk::connect(server.address()).await;
    asterisk
        .send(capture.environment_for(Some("replay")).as_bytes())
        .await;
    let mut held_hangup = false;
    let mut expected_replies = Vec::new();
    for row in &exchange {
        let (dir, data) = row;
        if dir == ">>>" {
            assert_eq!(&asterisk.command().await, data, "{label}");
            continue;
        }
        if is_hangup(row) {
            match hangup {
                Hangup::Idle => {
                    sleep(Duration::from_millis(100)).await;
                    asterisk.send(data.as_bytes()).await;
                }
                Hangup::AheadOfReply | Hangup::AheadOfReplyApart => held_hangup = true,
            }
            continue;
        }
        let (event, used) = parse_event(data.as_bytes())
            .expect("captured reply")
            .expect("whole");
        assert_eq!(used, data.len());
        let Event::Reply(reply) = event else {
            panic!("only HANGUP rows are not replies")
        };
        expected_replies.push(reply);
        let mut bytes = Vec::new();
        if std::mem::take(&mut held_hangup) {
            bytes.extend_from_slice(b"HANGUP\n");
            if hangup == Hangup::AheadOfReplyApart {
                asterisk.send(&bytes).await;
                bytes.clear();
                sleep(Duration::from_millis(50)).await;
            }
        }
        bytes.extend_from_slice(data.as_bytes());
        if bytewise {
            asterisk.send_bytewise(&bytes).await;
        } else {
            asterisk.send(&bytes).await;
        }
    }
    let seen = timeout(WAIT, seen.recv())
        .await
        .expect("the script reports")
        .expect("a report")
        .unwrap_or_else(|err| panic!("{label}: {err}"));
    // The capture's own HANGUP came after the first command's reply, so the script has
    // heard of it from the second command on, wherever the HANGUP was put.
    let expected: Vec<(Reply, bool)> = expected_replies
        .into_iter()
        .enumerate()
        .map(|(i, reply)| (reply, unsolicited && i > 0))
        .collect();
    assert_eq!(seen, expected, "{label}");
    assert_eq!(asterisk.end().await, End::Closed, "{label}");
    let stats = server.stats_until("ended", |s| s.active == 0).await;
    assert_eq!(
        (stats.commands, stats.protocol_errors, stats.script_errors),
        (seen.len() as u64, 0, 0),
        "{label}"
    );
    server.stop().await;
}

fn stream_file(name: &str) -> Command {
    Command::new("STREAM FILE").arg(name).arg("")
}

/// Session 2: the caller hangs up while the script is idle; `HANGUP` is recorded, commands
/// on the dead channel get `511` as a reply, and those that need no channel still work.
#[tokio::test]
async fn hangup_while_idle_or_ahead_of_a_reply_is_recorded_and_the_reply_kept() {
    let commands = vec![
        Command::verbose("waiting for the caller to hang up", 1),
        Command::get_variable("CALLERID(num)"),
        Command::channel_status(),
        stream_file("ref-tone"),
        Command::answer(),
        Command::verbose("still here", 1),
    ];
    for hangup in [
        Hangup::Idle,
        Hangup::AheadOfReply,
        Hangup::AheadOfReplyApart,
    ] {
        replay(1, commands.clone(), hangup, false).await;
    }
    // Every reply (and the HANGUP ahead of one) arriving a byte at a time.
    replay(1, commands.clone(), Hangup::AheadOfReply, true).await;
}

/// Session 3: the script hangs the channel up itself (`HANGUP` → `200 result=1`), then
/// Asterisk's `HANGUP` line follows.
#[tokio::test]
async fn a_script_that_hangs_up_itself_hears_the_hangup_after_the_reply() {
    let commands = vec![
        Command::hangup(),
        Command::answer(),
        Command::get_variable("CALLERID(num)"),
        Command::channel_status(),
    ];
    replay(2, commands.clone(), Hangup::Idle, false).await;
    replay(2, commands, Hangup::AheadOfReply, false).await;
}

/// Session 4: with `AGISIGHUP=no` no `HANGUP` line ever comes: `hung_up()` stays false and
/// the `511` replies are the only sign.
#[tokio::test]
async fn without_agisighup_only_511_replies_tell_the_channel_is_dead() {
    let commands = vec![
        Command::verbose("waiting for the caller to hang up", 1),
        Command::get_variable("CALLERID(num)"),
        Command::channel_status(),
        stream_file("ref-tone"),
        Command::answer(),
        Command::verbose("still here", 1),
    ];
    replay(3, commands, Hangup::Idle, false).await;
}

#[tokio::test]
async fn waiting_for_the_hangup_ends_when_asterisk_closes_instead() {
    let (report, mut results) = mpsc::unbounded_channel();
    let scripts = Scripts::new().with("wait", move |mut session: Session| {
        let report = report.clone();
        async move {
            let waited = session.wait_for_hangup().await;
            let _ = report.send(format!("{waited:?}"));
            Ok(())
        }
    });
    let server = Server::start(settings(), scripts).await;
    let mut asterisk = Asterisk::connect(server.address()).await;
    asterisk
        .send(clean_capture().environment_for(Some("wait")).as_bytes())
        .await;
    sleep(Duration::from_millis(50)).await;
    asterisk.stream.shutdown().await.expect("half-close");
    let waited = timeout(WAIT, results.recv()).await.expect("reported");
    assert_eq!(waited.as_deref(), Some("Err(Closed)"));
    server.stop().await;
}

// ----- limits -----

#[tokio::test]
async fn a_client_that_never_sends_the_environment_is_closed_at_the_timeout() {
    let limit = Duration::from_millis(400);
    let server = Server::start(
        Settings {
            environment_timeout: limit,
            ..settings()
        },
        Scripts::builtin(),
    )
    .await;
    let environment = clean_capture().environment_for(Some("ping"));
    let first_lines: String = environment
        .lines()
        .take(3)
        .map(|l| format!("{l}\n"))
        .collect();
    for partial in ["", first_lines.as_str()] {
        let started = Instant::now();
        let mut asterisk = Asterisk::connect(server.address()).await;
        asterisk.send(partial.as_bytes()).await;
        assert_eq!(asterisk.end().await, End::Closed, "{partial:?}");
        let took = started.elapsed();
        assert!(
            took >= limit && took < limit + Duration::from_secs(1),
            "closed after {took:?} for {partial:?}"
        );
    }
    // Control: an environment that comes well within the limit, in two parts, is served.
    let mut asterisk = Asterisk::connect(server.address()).await;
    asterisk.send(first_lines.as_bytes()).await;
    sleep(limit / 4).await;
    asterisk
        .send(&environment.as_bytes()[first_lines.len()..])
        .await;
    assert_eq!(
        asterisk.command().await,
        "SET VARIABLE CALLFLEET_RESULT pong\n"
    );
    asterisk.send(captured_set_reply().as_bytes()).await;
    assert_eq!(asterisk.end().await, End::Closed);
    let stats = server.stats_until("all ended", |s| s.active == 0).await;
    assert_eq!(
        (stats.accepted, stats.environment_timeouts, stats.commands),
        (3, 2, 1)
    );
    server.stop().await;
}

#[tokio::test]
async fn a_peer_that_is_not_asterisk_is_closed_at_once() {
    let server = Server::start(settings(), Scripts::builtin()).await;
    let started = Instant::now();
    let mut peer = Asterisk::connect(server.address()).await;
    peer.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:4573\r\n\r\n")
        .await;
    peer.end().await;
    // Long before the 2 s environment timeout.
    assert!(started.elapsed() < Duration::from_secs(1));
    let stats = server.stats_until("ended", |s| s.active == 0).await;
    assert_eq!(
        (
            stats.protocol_errors,
            stats.environment_timeouts,
            stats.commands
        ),
        (1, 0, 0)
    );
    server.stop().await;
}

#[tokio::test]
async fn a_peer_that_never_ends_a_line_is_cut_at_the_codecs_bound() {
    let server = Server::start(settings(), Scripts::builtin()).await;
    // An environment line longer than any environment (16 KiB), then silence: closed at
    // the bound, long before the 2 s environment timeout.
    let started = Instant::now();
    let mut peer = Asterisk::connect(server.address()).await;
    let mut line = b"agi_network: ".to_vec();
    line.resize(MAX_ENVIRONMENT + 1, b'x');
    peer.send(&line).await;
    peer.end().await;
    assert!(started.elapsed() < Duration::from_secs(1));
    // A reply longer than any reply (64 KiB), without its line feed.
    let mut asterisk = held_ping(server.address()).await;
    let mut reply = b"200 result=1 (".to_vec();
    reply.resize(MAX_REPLY + 1, b'x');
    asterisk.send(&reply).await;
    asterisk.end().await;
    let stats = server.stats_until("both ended", |s| s.active == 0).await;
    assert_eq!(
        (
            stats.protocol_errors,
            stats.environment_timeouts,
            stats.script_errors
        ),
        (2, 0, 1)
    );
    server.stop().await;
}

/// Opens a ping session and leaves it waiting for the reply to its `SET VARIABLE`.
async fn held_ping(address: SocketAddr) -> Asterisk {
    let mut asterisk = Asterisk::connect(address).await;
    asterisk
        .send(clean_capture().environment_for(Some("ping")).as_bytes())
        .await;
    assert_eq!(
        asterisk.command().await,
        "SET VARIABLE CALLFLEET_RESULT pong\n"
    );
    asterisk
}

#[tokio::test]
async fn the_session_cap_refuses_the_next_connection_at_accept() {
    let cap = 3;
    let server = Server::start(
        Settings {
            max_sessions: cap,
            ..settings()
        },
        Scripts::builtin(),
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..cap {
        held.push(held_ping(server.address()).await);
    }
    // The N+1th: accepted by the kernel, closed by the server before it reads a byte.
    let mut refused = Asterisk::connect(server.address()).await;
    assert_eq!(refused.end().await, End::Closed);
    let stats = server.stats();
    assert_eq!(
        (stats.accepted, stats.refused, stats.active),
        (cap as u64, 1, cap as u64)
    );
    // One session ends: its place is free for the next connection.
    let mut first = held.remove(0);
    first.send(captured_set_reply().as_bytes()).await;
    assert_eq!(first.end().await, End::Closed);
    server
        .stats_until("one place free", |s| s.active == cap as u64 - 1)
        .await;
    held.push(held_ping(server.address()).await);
    assert_eq!(server.stats().refused, 1);
    server.stop().await;

    // Control: with the cap raised by one, the same N+1th connection is served.
    let server = Server::start(
        Settings {
            max_sessions: cap + 1,
            ..settings()
        },
        Scripts::builtin(),
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..=cap {
        held.push(held_ping(server.address()).await);
    }
    let stats = server.stats();
    assert_eq!(
        (stats.accepted, stats.refused, stats.active),
        (cap as u64 + 1, 0, cap as u64 + 1)
    );
    server.stop().await;
}

#[tokio::test]
async fn commands_that_answer_at_once_have_a_deadline_and_exec_has_none() {
    let command_timeout = Duration::from_millis(300);
    let (report, mut results) = mpsc::unbounded_channel();
    let scripts = Scripts::new().with("slow", move |mut session: Session| {
        let report = report.clone();
        async move {
            // EXEC blocks on the caller: no deadline, however long past command_timeout.
            let exec = session.send(&Command::exec("Wait", "1")).await;
            let _ = report.send(format!("{exec:?}"));
            let started = Instant::now();
            let get = session.send(&Command::get_variable("X")).await;
            let _ = report.send(format!(
                "{get:?} after {}",
                started.elapsed() >= Duration::from_millis(300)
            ));
            // The late reply could be taken for the next command's: nothing more is sent.
            let next = session.send(&Command::verbose("late", 1)).await;
            let _ = report.send(format!("{next:?}"));
            // A deadline of the script's own choosing, shorter than the default.
            let chosen = session
                .send_within(&Command::get_variable("X"), Some(Duration::from_millis(10)))
                .await;
            let _ = report.send(format!("{chosen:?}"));
            next.map(drop)
        }
    });
    let server = Server::start(
        Settings {
            command_timeout,
            ..settings()
        },
        scripts,
    )
    .await;
    let mut asterisk = Asterisk::connect(server.address()).await;
    asterisk
        .send(clean_capture().environment_for(Some("slow")).as_bytes())
        .await;
    assert_eq!(asterisk.command().await, "EXEC Wait \"1\"\n");
    sleep(command_timeout * 2).await;
    asterisk.send(b"200 result=0\n").await;
    assert_eq!(asterisk.command().await, "GET VARIABLE X\n");
    let mut reports = Vec::new();
    for _ in 0..4 {
        reports.push(
            timeout(WAIT, results.recv())
                .await
                .expect("reported")
                .expect("a report"),
        );
    }
    assert_eq!(
        reports,
        [
            "Ok(Success(Success { result: \"0\", data: None, extras: [] }))".to_owned(),
            "Err(Timeout { command: \"GET VARIABLE\", after: 300ms }) after true".to_owned(),
            "Err(Unusable(\"no reply to `GET VARIABLE` within 300ms\"))".to_owned(),
            "Err(Unusable(\"no reply to `GET VARIABLE` within 300ms\"))".to_owned(),
        ]
    );
    // The script ends with the error and the server closes; the late reply is sent into
    // a closed session.
    assert_eq!(asterisk.end().await, End::Closed);
    let stats = server.stats_until("ended", |s| s.active == 0).await;
    assert_eq!(
        (stats.commands, stats.command_timeouts, stats.script_errors),
        (2, 1, 1)
    );
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_a_session_blocked_in_a_long_command_within_the_grace() {
    let grace = Duration::from_millis(600);
    let (report, mut results) = mpsc::unbounded_channel();
    let scripts = Scripts::new().with("dial", move |mut session: Session| {
        let report = report.clone();
        async move {
            let dial = session.send(&Command::exec("Dial", "PJSIP/1001,60")).await;
            let _ = report.send(format!(
                "{} stopping={} {dial:?}",
                session.environment().uniqueid().unwrap_or(""),
                session.is_stopping()
            ));
            dial.map(drop)
        }
    });
    let server = Server::start(
        Settings {
            shutdown_grace: grace,
            ..settings()
        },
        scripts,
    )
    .await;
    let address = server.address();
    let environment = clean_capture().environment_for(Some("dial"));
    let mut blocked = Asterisk::connect(address).await;
    blocked.send(environment.as_bytes()).await;
    let mut answered = Asterisk::connect(address).await;
    answered
        .send(
            environment
                .replace("1795429687.34", "1795429687.99")
                .as_bytes(),
        )
        .await;
    for asterisk in [&mut blocked, &mut answered] {
        assert_eq!(asterisk.command().await, "EXEC Dial \"PJSIP/1001,60\"\n");
    }

    let started = Instant::now();
    server.shutdown.cancel();
    // The port closes at once: a new AGI() is refused and takes its fallback.
    loop {
        match TcpStream::connect(address).await {
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => break,
            // Accepted by the kernel before the port closed (reset once it has).
            Ok(_) | Err(_) => {
                assert!(
                    started.elapsed() < Duration::from_millis(200),
                    "still accepting"
                );
                sleep(Duration::from_millis(5)).await;
            }
        }
    }
    // Control: a session whose command returns within the grace ends as usual.
    sleep(grace / 3).await;
    answered.send(b"200 result=0\n").await;
    assert_eq!(
        timeout(WAIT, results.recv()).await.expect("reported"),
        Some(
            "1795429687.99 stopping=true Ok(Success(Success { result: \"0\", data: None, extras: [] }))"
                .to_owned()
        )
    );
    assert_eq!(answered.end().await, End::Closed);
    // The blocked one is closed at the end of the grace, not before, and not much after.
    assert_eq!(blocked.end().await, End::Closed);
    let took = started.elapsed();
    assert!(
        took >= grace && took < grace + Duration::from_millis(500),
        "closed after {took:?}"
    );
    let stats = timeout(WAIT, server.server.stopped())
        .await
        .expect("stopped");
    assert!(started.elapsed() < grace + Duration::from_secs(1));
    assert_eq!(
        (
            stats.listening,
            stats.accepted,
            stats.active,
            stats.closed_at_shutdown,
            stats.script_errors
        ),
        (false, 2, 0, 1, 0)
    );
    // The dropped script never reported.
    assert!(results.try_recv().is_err());
}

// ----- unknown scripts -----

#[tokio::test]
async fn an_unknown_script_gets_a_verbose_line_and_the_session_closes() {
    let server = Server::start(settings(), Scripts::builtin()).await;
    let capture = clean_capture();
    for (script, line) in [
        (
            Some("nosuch?queue=sales"),
            "VERBOSE \"callfleet: no FastAGI script nosuch\" 1\n",
        ),
        // Decoded from the URL: the quote travels escaped; the line feed cannot travel, so
        // it is shown as `\n`, whose backslash travels escaped too.
        (
            Some("a%22b%0Ac"),
            "VERBOSE \"callfleet: no FastAGI script a\\\"b\\\\nc\" 1\n",
        ),
        (
            None,
            "VERBOSE \"callfleet: no FastAGI script (none in the AGI URL)\" 1\n",
        ),
    ] {
        let mut asterisk = Asterisk::connect(server.address()).await;
        asterisk
            .send(capture.environment_for(script).as_bytes())
            .await;
        assert_eq!(asterisk.command().await, line, "{script:?}");
        // The captured reply to a VERBOSE.
        asterisk.send(b"200 result=1\n").await;
        assert_eq!(asterisk.end().await, End::Closed, "{script:?}");
    }
    let stats = server.stats_until("ended", |s| s.active == 0).await;
    assert_eq!(
        (stats.unknown_scripts, stats.commands, stats.script_errors),
        (3, 3, 0)
    );
    // Control: a known script on the same server is served.
    let mut asterisk = held_ping(server.address()).await;
    asterisk.send(captured_set_reply().as_bytes()).await;
    assert_eq!(asterisk.end().await, End::Closed);
    assert_eq!(server.stats().unknown_scripts, 3);
    server.stop().await;
}

// ----- binding -----

#[tokio::test]
async fn a_taken_port_is_tried_again_until_it_is_free() {
    let holder = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = holder.local_addr().expect("address");
    let shutdown = CancellationToken::new();
    let server = AgiServer::bind(address, settings(), Scripts::builtin(), shutdown.clone())
        .await
        .expect("a taken port does not stop the agent");
    sleep(Duration::from_millis(200)).await;
    assert!(!server.stats().listening);
    drop(holder);
    let deadline = Instant::now() + WAIT;
    while !server.stats().listening {
        assert!(Instant::now() < deadline, "never listened");
        sleep(Duration::from_millis(20)).await;
    }
    let mut asterisk = held_ping(address).await;
    asterisk.send(captured_set_reply().as_bytes()).await;
    assert_eq!(asterisk.end().await, End::Closed);
    shutdown.cancel();
    let stats = timeout(WAIT, server.stopped()).await.expect("stops");
    assert_eq!((stats.accepted, stats.commands), (1, 1));

    // Any other failure to bind is an error naming the key.
    let err = AgiServer::bind(
        "192.0.2.1:4573".parse().expect("address"),
        settings(),
        Scripts::builtin(),
        CancellationToken::new(),
    )
    .await
    .expect_err("not this host's address");
    assert!(err.to_string().contains("node.agi.listen"), "{err}");
}
