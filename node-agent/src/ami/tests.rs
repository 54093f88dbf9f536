//! Tests of [`AmiClient`] against a loopback server that replays bytes captured from a real
//! Asterisk, and the capture loader that the parser's tests share.

use std::future::Future;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use self::fixture::Capture;
use super::proto::{self, Message};
use super::{AmiClient, AmiError};

/// Captures from the repository's `fixtures/asterisk/`: one JSON object per line,
/// `{"t", "conn", "dir", "data"}`, where `dir` is `<<<` from Asterisk, `>>>` to Asterisk and
/// `---` a note by whoever captured it.
pub(super) mod fixture {
    use serde_json::Value;

    /// `dir` of bytes Asterisk sent.
    pub(crate) const FROM_ASTERISK: &str = "<<<";
    /// `dir` of bytes sent to Asterisk.
    pub(crate) const TO_ASTERISK: &str = ">>>";

    /// One capture file.
    #[derive(Debug)]
    pub(crate) struct Capture {
        rows: Vec<Row>,
    }

    #[derive(Debug)]
    struct Row {
        conn: String,
        dir: String,
        data: String,
    }

    impl Capture {
        /// Login (good and bad), originates, queue actions and three
        /// `core show channels count` replies (6, 11 and 0 active calls).
        pub(crate) fn login_and_core_show_channels() -> Self {
            Self::parse(include_str!(
                "../../../fixtures/asterisk/ami-login-and-coreshowchannels.jsonl"
            ))
        }

        /// Failing originates (with an `OriginateResponse` event) and queue member changes.
        pub(crate) fn originate_failures_and_queue_members() -> Self {
            Self::parse(include_str!(
                "../../../fixtures/asterisk/ami-originate-failures-and-queue-members.jsonl"
            ))
        }

        fn parse(jsonl: &str) -> Self {
            let text = |row: &Value, key: &str| {
                row[key]
                    .as_str()
                    .unwrap_or_else(|| panic!("capture row without string `{key}`: {row}"))
                    .to_owned()
            };
            let rows = jsonl
                .lines()
                .filter(|line| !line.trim().is_empty())
                .map(|line| {
                    let row: Value = serde_json::from_str(line).expect("capture line is JSON");
                    Row {
                        conn: text(&row, "conn"),
                        dir: text(&row, "dir"),
                        data: text(&row, "data"),
                    }
                })
                .collect();
            Self { rows }
        }

        /// The connection names, in order of first appearance.
        pub(crate) fn connections(&self) -> Vec<String> {
            let mut names: Vec<String> = Vec::new();
            for row in &self.rows {
                if !names.contains(&row.conn) {
                    names.push(row.conn.clone());
                }
            }
            names
        }

        /// The data of one connection's rows in one direction, in order.
        pub(crate) fn rows<'a>(
            &'a self,
            conn: &'a str,
            dir: &'a str,
        ) -> impl Iterator<Item = &'a str> {
            self.rows
                .iter()
                .filter(move |row| row.conn == conn && row.dir == dir)
                .map(|row| row.data.as_str())
        }

        /// Everything Asterisk sent on one connection, as one byte stream.
        pub(crate) fn sent_by_asterisk(&self, conn: &str) -> Vec<u8> {
            self.rows(conn, FROM_ASTERISK)
                .collect::<String>()
                .into_bytes()
        }

        /// The greeting line Asterisk sent on one connection.
        pub(crate) fn greeting(&self, conn: &str) -> String {
            let first = self.rows(conn, FROM_ASTERISK).next().expect("a greeting");
            assert!(first.starts_with("Asterisk Call Manager/"), "{first:?}");
            first.to_owned()
        }

        /// The bytes of Asterisk's reply to the action with `action_id`.
        pub(crate) fn reply(&self, conn: &str, action_id: &str) -> String {
            let marker = format!("\r\nActionID: {action_id}\r\n");
            self.rows(conn, FROM_ASTERISK)
                .find(|data| data.starts_with("Response:") && data.contains(&marker))
                .unwrap_or_else(|| panic!("no reply to {action_id} on {conn}"))
                .to_owned()
        }

        /// The bytes of the first event named `name`.
        pub(crate) fn event(&self, conn: &str, name: &str) -> String {
            let start = format!("Event: {name}\r\n");
            self.rows(conn, FROM_ASTERISK)
                .find(|data| data.starts_with(&start))
                .unwrap_or_else(|| panic!("no {name} event on {conn}"))
                .to_owned()
        }
    }
}

/// Deadline for tests that expect an answer; generous so a loaded machine does not fail them.
const PATIENT: Duration = Duration::from_secs(10);

/// The server side of one loopback connection.
struct Peer {
    stream: TcpStream,
    buffer: BytesMut,
}

impl Peer {
    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream
            .write_all(bytes.as_ref())
            .await
            .expect("write to the client");
    }

    /// Reads the client's next action with the same parser, which the captures vouch for.
    async fn read_action(&mut self) -> Message {
        loop {
            if let Some((msg, used)) =
                proto::parse_message(&self.buffer).expect("client sends valid AMI")
            {
                self.buffer.advance(used);
                return msg;
            }
            let read = self
                .stream
                .read_buf(&mut self.buffer)
                .await
                .expect("read from the client");
            assert!(read > 0, "client closed before finishing an action");
        }
    }

    /// Reads the client's next action and answers it with the `captured` reply, whose
    /// ActionID `captured_id` is replaced by the client's. Returns the action.
    async fn answer(&mut self, captured: &str, captured_id: &str) -> Message {
        let action = self.read_action().await;
        let id = action.action_id().expect("the client sends an ActionID");
        self.send(with_action_id(captured, captured_id, id)).await;
        action
    }
}

/// Starts a server on `127.0.0.1:0` that runs `script` on the first connection and returns
/// its address and the task (await it to surface the script's assertion failures).
async fn serve_once<F, Fut>(script: F) -> (String, JoinHandle<()>)
where
    F: FnOnce(Peer) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let address = listener.local_addr().expect("local address").to_string();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        script(Peer {
            stream,
            buffer: BytesMut::new(),
        })
        .await;
    });
    (address, task)
}

/// A captured reply with the client's ActionID in place of the captured one.
fn with_action_id(captured: &str, captured_id: &str, id: &str) -> String {
    let from = format!("\r\nActionID: {captured_id}\r\n");
    assert!(
        captured.contains(&from),
        "{captured:?} has no ActionID {captured_id}"
    );
    captured.replace(&from, &format!("\r\nActionID: {id}\r\n"))
}

#[tokio::test]
async fn login_then_active_calls_from_the_captured_replies() {
    let capture = Capture::login_and_core_show_channels();
    let greeting = capture.greeting("conn-main");
    let accepted = capture.reply("conn-main", "1");
    let booted = capture.event("conn-main", "FullyBooted");
    let newchannel = capture.event("conn-main", "Newchannel");
    let dial_end = capture.event("conn-main", "DialEnd");
    let six = capture.reply("conn-main", "cmd-1");
    let eleven = capture.reply("conn-main", "cmd-3");
    let zero = capture.reply("conn-main", "cmd-4");

    let (address, server) = serve_once(move |mut peer| async move {
        peer.send(&greeting).await;
        let login = peer.read_action().await;
        assert_eq!(login.get("Action"), Some("Login"));
        assert_eq!(login.get("Username"), Some("refadmin"));
        assert_eq!(login.get("Secret"), Some("refsecret"));
        assert_eq!(
            login.get("Events"),
            Some("off"),
            "the agent wants no events"
        );
        let login_id = login.action_id().expect("login ActionID").to_owned();
        peer.send(with_action_id(&accepted, "1", &login_id)).await;
        peer.send(&booted).await;

        let command = peer.read_action().await;
        assert_eq!(command.get("Action"), Some("Command"));
        assert_eq!(command.get("Command"), Some("core show channels count"));
        let id = command.action_id().expect("command ActionID").to_owned();
        assert_ne!(id, login_id, "every action gets a fresh ActionID");
        // An event and a reply to some other action come first; neither is the answer.
        peer.send(&newchannel).await;
        peer.send(&six).await;
        peer.send(with_action_id(&eleven, "cmd-3", &id)).await;

        let command = peer.read_action().await;
        let id = command.action_id().expect("command ActionID").to_owned();
        let reply = format!("{dial_end}{}", with_action_id(&zero, "cmd-4", &id));
        // Split mid-line so the client has to wait for the rest of the message.
        let (head, tail) = reply.as_bytes().split_at(dial_end.len() + 30);
        peer.send(head).await;
        tokio::task::yield_now().await;
        peer.send(tail).await;
    })
    .await;

    let mut client = AmiClient::connect(&address, "refadmin", "refsecret", PATIENT)
        .await
        .expect("login accepted");
    assert_eq!(client.version(), "11.0.0");
    assert_eq!(client.address(), address);
    assert_eq!(client.active_calls().await.expect("first count"), 11);
    assert_eq!(client.active_calls().await.expect("second count"), 0);
    server.await.expect("server script");
}

#[tokio::test]
async fn wrong_secret_is_auth_failed_naming_the_config_keys() {
    let capture = Capture::login_and_core_show_channels();
    let greeting = capture.greeting("conn-badlogin");
    let refused = capture.reply("conn-badlogin", "bad-1");
    let (address, server) = serve_once(move |mut peer| async move {
        peer.send(&greeting).await;
        let login = peer.answer(&refused, "bad-1").await;
        assert_eq!(login.get("Secret"), Some("wrong"));
    })
    .await;

    let err = AmiClient::connect(&address, "refadmin", "wrong", PATIENT)
        .await
        .expect_err("login refused");
    let AmiError::AuthFailed {
        address: ref at,
        ref username,
        ref message,
    } = err
    else {
        panic!("expected AuthFailed, got {err:?}");
    };
    assert_eq!(
        (at.as_str(), username.as_str()),
        (address.as_str(), "refadmin")
    );
    assert_eq!(message, "Authentication failed");
    let shown = err.to_string();
    assert_eq!(
        shown,
        format!(
            "asterisk manager at {address} refused the login for user refadmin: \
             Authentication failed; check node.calls.username and node.calls.secret \
             against manager.conf"
        )
    );
    assert!(
        !format!("{err:?}").contains("wrong"),
        "the secret never shows"
    );
    server.await.expect("server script");
}

#[tokio::test]
async fn non_ami_greeting_is_a_protocol_error() {
    let (address, server) = serve_once(|mut peer| async move {
        peer.send("SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n")
            .await;
        // Stay open: the client must decide from the greeting, not from a closed socket.
        tokio::time::sleep(PATIENT).await;
    })
    .await;
    let err = AmiClient::connect(&address, "refadmin", "refsecret", PATIENT)
        .await
        .expect_err("not AMI");
    assert!(matches!(err, AmiError::Protocol { .. }), "{err:?}");
    let shown = err.to_string();
    assert!(shown.contains("SSH-2.0-OpenSSH_9.6p1"), "{shown}");
    assert!(shown.contains("manager port"), "{shown}");
    server.abort();
}

#[tokio::test]
async fn silent_server_times_out_the_login() {
    let (address, server) = serve_once(|peer| async move {
        // Hold the connection open without a word.
        let _peer = peer;
        std::future::pending::<()>().await;
    })
    .await;
    let timeout = Duration::from_millis(300);
    let err = AmiClient::connect(&address, "refadmin", "refsecret", timeout)
        .await
        .expect_err("no greeting");
    assert!(
        matches!(err, AmiError::Timeout { timeout: t, .. } if t == timeout),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("asterisk manager at {address} did not answer the connect and login within 300ms")
    );
    server.abort();
}

#[tokio::test]
async fn unanswered_command_times_out() {
    let capture = Capture::login_and_core_show_channels();
    let greeting = capture.greeting("conn-main");
    let accepted = capture.reply("conn-main", "1");
    let (address, server) = serve_once(move |mut peer| async move {
        peer.send(&greeting).await;
        peer.answer(&accepted, "1").await;
        let _command = peer.read_action().await;
        std::future::pending::<()>().await;
    })
    .await;
    let mut client = AmiClient::connect(
        &address,
        "refadmin",
        "refsecret",
        Duration::from_millis(300),
    )
    .await
    .expect("login accepted");
    let err = client.active_calls().await.expect_err("no answer");
    assert!(matches!(err, AmiError::Timeout { .. }), "{err:?}");
    assert!(
        err.to_string().contains("core show channels count"),
        "{err}"
    );
    server.abort();
}

#[tokio::test]
async fn cli_error_is_a_protocol_error_quoting_the_reply() {
    let capture = Capture::login_and_core_show_channels();
    let greeting = capture.greeting("conn-main");
    let accepted = capture.reply("conn-main", "1");
    let cli_error = capture.reply("conn-main", "cmd-2");
    let (address, server) = serve_once(move |mut peer| async move {
        peer.send(&greeting).await;
        peer.answer(&accepted, "1").await;
        peer.answer(&cli_error, "cmd-2").await;
    })
    .await;
    let mut client = AmiClient::connect(&address, "refadmin", "refsecret", PATIENT)
        .await
        .expect("login accepted");
    let err = client.active_calls().await.expect_err("cli error");
    assert!(matches!(err, AmiError::Protocol { .. }), "{err:?}");
    let shown = err.to_string();
    assert!(
        shown.contains("refused `core show channels count`"),
        "{shown}"
    );
    assert!(shown.contains("No such command"), "{shown}");
    server.await.expect("server script");
}

/// A manager that accepts the captured login, then refuses the command as Asterisk's
/// manager.c does (`astman_send_error(s, m, "Permission denied")`) when the user lacks the
/// class an action needs.
async fn serve_login_then_permission_denied() -> (String, JoinHandle<()>) {
    let capture = Capture::login_and_core_show_channels();
    let greeting = capture.greeting("conn-main");
    let accepted = capture.reply("conn-main", "1");
    serve_once(move |mut peer| async move {
        peer.send(&greeting).await;
        peer.answer(&accepted, "1").await;
        let denied = "Response: Error\r\nActionID: cmd\r\nMessage: Permission denied\r\n\r\n";
        peer.answer(denied, "cmd").await;
    })
    .await
}

#[tokio::test]
async fn a_refused_command_is_a_permission_error_naming_the_fix() {
    let (address, server) = serve_login_then_permission_denied().await;
    let mut client = AmiClient::connect(&address, "refadmin", "refsecret", PATIENT)
        .await
        .expect("login accepted");
    let err = client.active_calls().await.expect_err("denied");
    assert!(matches!(err, AmiError::PermissionDenied { .. }), "{err:?}");
    let shown = err.to_string();
    assert!(
        shown.contains("user refadmin") && shown.contains("write = command"),
        "{shown}"
    );
    server.await.expect("server script");
}

/// The agent refuses to start on such a user, as on a wrong secret: no retry fixes it.
#[tokio::test]
async fn a_user_without_the_command_right_stops_the_agent_at_start() {
    let (address, server) = serve_login_then_permission_denied().await;
    let config = callfleet_core::config::CallsConfig {
        source: callfleet_core::config::CallSourceKind::Ami,
        address,
        username: "refadmin".into(),
        secret: callfleet_core::config::Secret::new("refsecret"),
        timeout: PATIENT,
        ..callfleet_core::config::CallsConfig::default()
    };
    let started = crate::calls::CallCounter::start(&config, Duration::from_millis(100)).await;
    assert!(
        matches!(started, Err(AmiError::PermissionDenied { .. })),
        "{started:?}"
    );
    server.await.expect("server script");
}

#[tokio::test]
async fn reply_without_a_count_is_a_protocol_error() {
    let capture = Capture::login_and_core_show_channels();
    let greeting = capture.greeting("conn-main");
    let accepted = capture.reply("conn-main", "1");
    let pong = capture.reply("conn-main", "ping-1");
    let (address, server) = serve_once(move |mut peer| async move {
        peer.send(&greeting).await;
        peer.answer(&accepted, "1").await;
        peer.answer(&pong, "ping-1").await;
    })
    .await;
    let mut client = AmiClient::connect(&address, "refadmin", "refsecret", PATIENT)
        .await
        .expect("login accepted");
    let err = client.active_calls().await.expect_err("no count");
    let shown = err.to_string();
    assert!(
        shown.contains("without an `N active calls` line"),
        "{shown}"
    );
    assert!(shown.contains("Ping: Pong"), "{shown}");
    server.await.expect("server script");
}

#[tokio::test]
async fn closed_connection_is_an_io_error() {
    let capture = Capture::login_and_core_show_channels();
    let greeting = capture.greeting("conn-main");
    let accepted = capture.reply("conn-main", "1");
    let (address, server) = serve_once(move |mut peer| async move {
        peer.send(&greeting).await;
        peer.answer(&accepted, "1").await;
        let _command = peer.read_action().await;
        // Half a reply, then the PBX goes away.
        peer.send("Response: Success\r\nActionID: ").await;
    })
    .await;
    let mut client = AmiClient::connect(&address, "refadmin", "refsecret", PATIENT)
        .await
        .expect("login accepted");
    let err = client.active_calls().await.expect_err("closed");
    server.await.expect("server script");
    let AmiError::Io { ref source, .. } = err else {
        panic!("expected Io, got {err:?}");
    };
    assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof);
    assert!(
        err.to_string().contains("in the middle of a message"),
        "{err}"
    );
}

#[tokio::test]
async fn refused_connection_is_an_io_error() {
    // A port that was just free: nothing listens there any more.
    let address = {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        listener.local_addr().expect("local address").to_string()
    };
    let err = AmiClient::connect(&address, "refadmin", "refsecret", PATIENT)
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, AmiError::Io { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with(&format!("asterisk manager at {address}: ")),
        "{err}"
    );
}
