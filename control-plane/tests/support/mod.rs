//! What the network tests of the control plane share: the whole service
//! (`callfleet_control_plane::run` on SQLite) on a loopback port with the queue `sales`, and
//! a raw HTTP/1.1 client that connects from a chosen loopback address.
//!
//! The tests speak bytes rather than use an HTTP client so that they see what a client on
//! the network sees (a connection closed at accept, a 429 with its `Retry-After`), and
//! connect from chosen addresses in 127.0.0.0/8 because the service's limits are per
//! address.
//!
//! Each test crate compiles its own copy of this module (`mod support;`), so an item here
//! that one of them does not use warns there as dead code: what only one test file needs
//! stays in that file.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use callfleet_control_plane::ControlPlaneError;
use callfleet_core::config::{
    ApiToken, ControlPlaneConfig, LockServiceConfig, Role, Secret, UnsafeLockSwitches,
};
use callfleet_core::{Store, testing};
use callfleet_proto::lock::v1::locks_client::LocksClient;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// The public status of the queue `sales` over REST, which needs no token.
#[allow(dead_code)] // Not every test crate asks for the status.
pub const REST_STATUS: &str = "GET /api/v1/queues/sales/status HTTP/1.1\r\nHost: cp\r\n\r\n";

/// The token `secret`, named `name`, with `role`, for a config's `tokens`.
pub fn token(name: &str, secret: &str, role: Role) -> ApiToken {
    ApiToken {
        name: name.to_owned(),
        token: Secret::new(secret),
        role,
    }
}

/// A CRM's write token, named `crm`, for a config's `tokens`; the tests pass the same
/// `token` to [`Server::start`] so that it can create the queue `sales`.
pub fn crm_token(token: &str) -> ApiToken {
    self::token("crm", token, Role::Write)
}

/// The tokens of the tests of queued calls: a CRM's write token `crm`, a wallboard's read
/// token `wallboard` and a node-agent's node token `node:pbx-1`.
#[allow(dead_code)] // Not every test crate has a node.
pub fn crm_wallboard_node_tokens(crm: &str, wallboard: &str, node: &str) -> Vec<ApiToken> {
    vec![
        crm_token(crm),
        token("wallboard", wallboard, Role::Read),
        token("node:pbx-1", node, Role::Node),
    ]
}

/// The config of the tests of queued calls: the defaults with the tokens of
/// [`crm_wallboard_node_tokens`].
#[allow(dead_code)] // Not every test crate has a node.
pub fn crm_wallboard_node_config(crm: &str, wallboard: &str, node: &str) -> ControlPlaneConfig {
    ControlPlaneConfig {
        tokens: crm_wallboard_node_tokens(crm, wallboard, node),
        ..ControlPlaneConfig::default()
    }
}

/// Binds a loopback port and spawns `serve` on its listener with a shutdown token: the
/// address, the token that stops it, and its task.
pub async fn spawn_on_loopback<F, Fut>(
    serve: F,
) -> (SocketAddr, CancellationToken, JoinHandle<Fut::Output>)
where
    F: FnOnce(TcpListener, CancellationToken) -> Fut,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(listener, shutdown.clone()));
    (address, shutdown, task)
}

/// A request `method path` with the bearer `token`, the extra header lines `headers`
/// and the JSON `body`.
pub fn json_request(
    method: &str,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> String {
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {token}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    request
}

/// An answer of the JSON API: its status and JSON body (null if the body is not JSON).
#[derive(Debug)]
#[allow(dead_code)] // Not every test crate reads the JSON API.
pub struct Reply {
    pub status: u16,
    pub json: Value,
}

/// Sends `request` to `server` from 127.0.0.1 on a new connection and reads the answer,
/// which must be JSON, errors included: a node-agent reads every one as JSON.
#[allow(dead_code)] // Not every test crate reads the JSON API.
pub async fn send_json(server: &Server, request: &str) -> Reply {
    let mut stream = connect_from("127.0.0.1", server.address).await;
    let answer = exchange(&mut stream, request).await;
    assert_eq!(
        answer.header("content-type"),
        Some("application/json"),
        "{request:?}: {answer:?}"
    );
    Reply {
        status: answer.status,
        json: serde_json::from_str(&answer.body).unwrap_or(Value::Null),
    }
}

/// Sends `method path` under `/api/v1` with `token`, the extra header lines `headers` and
/// the JSON `body`, on a new connection, and reads the answer.
#[allow(dead_code)] // Not every test crate reads the JSON API.
pub async fn send_api(
    server: &Server,
    method: &str,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Reply {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    send_json(
        server,
        &json_request(method, &format!("/api/v1{path}"), token, headers, &body),
    )
    .await
}

/// Creates (or renames) the agent `agent` with the write token `token`.
#[allow(dead_code)] // Not every test crate creates agents this way.
pub async fn put_agent(server: &Server, token: &str, agent: &str) {
    let body = serde_json::json!({ "name": format!("agent {agent}") });
    let path = format!("/agents/{agent}");
    expect(
        send_api(server, "PUT", &path, token, &[], Some(body)).await,
        200,
    );
}

/// The rows of an audit answer as (actor, action, subject), newest first.
#[allow(dead_code)] // Not every test crate reads the audit.
pub fn audit_rows(audit: &Value) -> Vec<(&str, &str, &str)> {
    audit
        .as_array()
        .expect("rows")
        .iter()
        .map(|row| {
            (
                row["actor"].as_str().expect("actor"),
                row["action"].as_str().expect("action"),
                row["subject"].as_str().expect("subject"),
            )
        })
        .collect()
}

/// Panics unless `reply` is `status`; returns its JSON.
#[track_caller]
#[allow(dead_code)] // Not every test crate reads the JSON API.
pub fn expect(reply: Reply, status: u16) -> Value {
    assert_eq!(reply.status, status, "{}", reply.json);
    reply.json
}

/// The control plane, served by `run` on a loopback port, with the queue `sales`.
pub struct Server {
    pub address: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), ControlPlaneError>>,
    /// The SQLite store's directory, removed when the server is dropped.
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `run` with `config` on a fresh SQLite store, then creates the queue `sales`
    /// with the write token `crm` (which `config` must hold) over a connection from the
    /// loopback address `from`. The address matters to tests of per-address limits: the
    /// set-up request must not take from a bucket that a test counts on.
    pub async fn start(config: ControlPlaneConfig, crm: &str, from: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::connect(&testing::sqlite_config(dir.path()))
            .await
            .expect("sqlite store");
        let (address, shutdown, task) = spawn_on_loopback(|listener, token| async move {
            callfleet_control_plane::run(&config, store, listener, token).await
        })
        .await;
        let server = Self {
            address,
            shutdown,
            task,
            _dir: dir,
        };
        let mut setup = connect_from(from, server.address).await;
        let answer = exchange(
            &mut setup,
            &json_request(
                "PUT",
                "/api/v1/queues/sales",
                crm,
                &[],
                r#"{"name":"Sales"}"#,
            ),
        )
        .await;
        assert_eq!(answer.status, 200, "PUT queue: {}", answer.body);
        server
    }

    /// Another connection to the server's store, for what nodes write there.
    #[allow(dead_code)] // Not every test crate writes as a node.
    pub async fn store(&self) -> Store {
        Store::connect(&testing::sqlite_config(self._dir.path()))
            .await
            .expect("sqlite store")
    }

    /// Shuts the server down and checks that `run` returns cleanly within 10 s.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("run returns")
            .expect("the server task")
            .expect("run ends cleanly");
    }
}

/// A connection to `server` from the loopback address `from` (any of 127.0.0.0/8).
pub async fn connect_from(from: &str, server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{from}:0").parse().expect("loopback address"))
        .expect("bind the client's address");
    socket.connect(server).await.expect("connect")
}

/// An HTTP/1.1 answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Header names in lowercase.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    /// The value of the header `name` (in lowercase), if the answer has it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` and reads one answer with a `Content-Length` body.
pub async fn exchange(stream: &mut TcpStream, request: &str) -> Answer {
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    tokio::time::timeout(Duration::from_secs(5), read_answer(stream))
        .await
        .expect("an answer within 5 s")
        .unwrap_or_else(|| panic!("the connection closed without an answer to {request:?}"))
}

/// One answer, or `None` when the connection ends (closed or reset) before a whole one.
pub async fn read_answer(stream: &mut TcpStream) -> Option<Answer> {
    let mut buffer = Vec::new();
    let end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8(buffer[..end].to_vec()).expect("an ASCII head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("a status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').expect("name: value");
            (name.to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().expect("a length"));
    let mut body = buffer[end + 4..].to_vec();
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    Some(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A lock service on the memory backend that grants at once, on a loopback port.
#[allow(dead_code)] // Not every test crate has a lock service.
pub struct Locks {
    pub address: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

#[allow(dead_code)] // Not every test crate has a lock service.
impl Locks {
    pub async fn start() -> Self {
        let config = LockServiceConfig {
            unsafe_for_tests: UnsafeLockSwitches {
                no_startup_quarantine: true,
                ..UnsafeLockSwitches::default()
            },
            ..LockServiceConfig::default()
        };
        let (address, shutdown, task) = spawn_on_loopback(|listener, token| async move {
            callfleet_lock_service::run(&config, listener, token)
                .await
                .expect("the lock service runs");
        })
        .await;
        Self {
            address,
            shutdown,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// A client, as a node-agent has one.
    pub async fn client(&self) -> LocksClient<Channel> {
        LocksClient::new(channel(&self.url()).await)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the lock service stops in time")
            .expect("no panic");
    }
}

/// A gRPC channel to `url`.
#[allow(dead_code)] // Not every test crate speaks gRPC.
pub async fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .unwrap_or_else(|err| panic!("{url} accepts gRPC: {err}"))
}

/// The first snapshot of the supervisors' live feed (`GET /ui/events` with the session
/// `cookie`) that satisfies `wanted`, within 5 s; the stream must be an event stream.
#[allow(dead_code)] // Not every test crate reads the page's feed.
pub async fn feed_snapshot_where(
    server: &Server,
    cookie: &str,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    let mut stream = connect_from("127.0.0.1", server.address).await;
    let ask = format!("GET /ui/events HTTP/1.1\r\nHost: cp\r\nCookie: {cookie}\r\n\r\n");
    stream.write_all(ask.as_bytes()).await.expect("send");
    let mut seen = Vec::new();
    let mut buffer = [0u8; 65536];
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = stream.read(&mut buffer).await.expect("read");
            assert_ne!(n, 0, "the feed closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buffer[..n]);
            let text = String::from_utf8_lossy(&seen).into_owned();
            let found = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|snapshot| wanted(snapshot));
            if let Some(snapshot) = found {
                assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
                assert!(
                    text.contains("content-type: text/event-stream\r\n"),
                    "{text}"
                );
                return snapshot;
            }
        }
    })
    .await
    .expect("such a snapshot within 5 s")
}
