//! The control plane's listener as clients on the network meet it: the whole service
//! (`callfleet_control_plane::run` on SQLite) on a loopback port, spoken to with raw bytes
//! over real TCP connections.
//!
//! - a client that sends half a header, or trickles it, is closed after `header_timeout`;
//! - beyond `max_connections`, and beyond `max_connections_per_address` from one address,
//!   a new connection is closed at accept while the others are held and served;
//! - a connection with no request in progress (silent from the start, HTTP/1 kept alive,
//!   HTTP/2 after its preface) is closed after `idle_timeout`, a slow request is not;
//! - shutdown with a request that never completes and a client that never reads finishes
//!   within `shutdown_grace`, while a request that completes meanwhile is answered;
//! - the public status answers exactly `status_burst` requests from one address, then 429
//!   with `Retry-After`, while another address (127.0.0.2) is still answered;
//! - gRPC (HTTP/2) and REST (HTTP/1) share the listener.
//!
//! Every limit is set small here so that the tests take a second or two.

mod support;

use std::time::Duration;

use callfleet_core::config::ControlPlaneConfig;
use callfleet_proto::control::v1 as pb;
use callfleet_proto::control::v1::control_client::ControlClient;
use support::{REST_STATUS, Server, connect_from, crm_token, exchange, read_answer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// Write token of a CRM.
const CRM: &str = "crm-listener-secret-0123456789";

/// Limits no test reaches unless it sets them lower.
fn config() -> ControlPlaneConfig {
    ControlPlaneConfig {
        tokens: vec![crm_token(CRM)],
        max_connections: 64,
        max_connections_per_address: 64,
        header_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        shutdown_grace: Duration::from_secs(5),
        status_rate: 1000.0,
        status_burst: 1000,
        ..ControlPlaneConfig::default()
    }
}

/// The server with `config` and the queue the status tests ask about, created from
/// 127.0.0.1 like every connection here that names no other address.
async fn start(config: ControlPlaneConfig) -> Server {
    Server::start(config, CRM, "127.0.0.1").await
}

impl Server {
    /// A connection from 127.0.0.1, the address these tests use unless they say otherwise.
    async fn connect(&self) -> TcpStream {
        connect_from("127.0.0.1", self.address).await
    }
}

/// Reads until the server closes (or resets) the connection; the bytes received and how
/// long that took, or a panic naming `what` when it is still open after `within`.
async fn closed_within(
    stream: &mut TcpStream,
    within: Duration,
    what: &str,
) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut received = Vec::new();
    let result = tokio::time::timeout(within, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "{what}: the connection is still open after {within:?}, having received {:?}",
        String::from_utf8_lossy(&received)
    );
    (received, start.elapsed())
}

#[tokio::test]
async fn a_client_that_sends_half_a_header_is_closed_after_the_header_timeout() {
    let header_timeout = Duration::from_millis(400);
    let server = start(ControlPlaneConfig {
        header_timeout,
        ..config()
    })
    .await;

    // Half a header, then nothing.
    let mut half = server.connect().await;
    half.write_all(b"GET /api/v1/queues/sales/status HTTP/1.1\r\nHost: cp\r\nX-Half: ")
        .await
        .expect("send half a header");
    let (received, after) = closed_within(&mut half, Duration::from_secs(3), "half a header").await;
    assert!(received.is_empty(), "no answer: {received:?}");
    assert!(
        after >= header_timeout - Duration::from_millis(50),
        "{after:?}"
    );

    // A header trickled a byte at a time: the timer is not reset by each byte.
    let mut trickle = server.connect().await;
    trickle
        .write_all(b"GET /api/v1/queues/sales/status HTTP/1.1\r\nHost: cp\r\n")
        .await
        .expect("send the start");
    let start = Instant::now();
    let (mut read, mut write) = trickle.split();
    let writer = async {
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if write.write_all(b"x").await.is_err() {
                return;
            }
        }
    };
    let reader = async {
        let mut chunk = [0u8; 256];
        match read.read(&mut chunk).await {
            Ok(0) | Err(_) => start.elapsed(),
            Ok(n) => panic!("an answer to a header never finished: {:?}", &chunk[..n]),
        }
    };
    let closed = tokio::select! {
        after = reader => Some(after),
        () = writer => None,
    };
    let after = closed.expect("the trickling client is closed while it still sends (within 3 s)");
    assert!(
        after >= header_timeout - Duration::from_millis(50),
        "{after:?}"
    );

    // A whole request on a fresh connection is answered.
    let mut whole = server.connect().await;
    assert_eq!(exchange(&mut whole, REST_STATUS).await.status, 200);
}

/// Holds `n` connections from `from`, each after one answered request.
async fn hold(server: &Server, from: &str, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut stream = connect_from(from, server.address).await;
        assert_eq!(exchange(&mut stream, REST_STATUS).await.status, 200);
        held.push(stream);
    }
    held
}

/// Asserts that a new connection from `from` is closed without an answer.
async fn assert_refused(server: &Server, from: &str, what: &str) {
    let mut stream = connect_from(from, server.address).await;
    // The request may or may not reach the server before it closes: either is a refusal.
    let _ = stream.write_all(REST_STATUS.as_bytes()).await;
    let (received, _) = closed_within(&mut stream, Duration::from_secs(3), what).await;
    assert!(
        received.is_empty(),
        "{what}: answered {:?}",
        String::from_utf8_lossy(&received)
    );
}

/// Tries a request on new connections from `from` until one is answered (a closed
/// connection's place is given back when the server has seen it close).
async fn served_again(server: &Server, from: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut stream = connect_from(from, server.address).await;
        let _ = stream.write_all(REST_STATUS.as_bytes()).await;
        if let Some(answer) = read_answer(&mut stream).await {
            assert_eq!(answer.status, 200);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no connection from {from} served within 3 s of a place freeing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn beyond_max_connections_a_new_connection_is_closed_at_accept() {
    let server = start(ControlPlaneConfig {
        max_connections: 4,
        max_connections_per_address: 4,
        ..config()
    })
    .await;
    let mut held = hold(&server, "127.0.0.1", 4).await;
    assert_refused(&server, "127.0.0.1", "the 5th connection").await;
    // From another address too: the cap is the listener's.
    assert_refused(&server, "127.0.0.2", "the 5th connection, from 127.0.0.2").await;
    // The held connections are still served.
    for stream in &mut held {
        assert_eq!(exchange(stream, REST_STATUS).await.status, 200);
    }
    drop(held.pop());
    served_again(&server, "127.0.0.2").await;
}

#[tokio::test]
async fn beyond_max_connections_per_address_only_that_address_is_refused() {
    let server = start(ControlPlaneConfig {
        max_connections: 16,
        max_connections_per_address: 2,
        ..config()
    })
    .await;
    let mut held = hold(&server, "127.0.0.1", 2).await;
    assert_refused(&server, "127.0.0.1", "the 3rd connection from 127.0.0.1").await;
    let others = hold(&server, "127.0.0.2", 2).await;
    assert_refused(&server, "127.0.0.2", "the 3rd connection from 127.0.0.2").await;
    drop(held.pop());
    served_again(&server, "127.0.0.1").await;
    drop(others);
}

#[tokio::test]
async fn a_connection_without_a_request_in_progress_is_closed_after_the_idle_timeout() {
    let idle_timeout = Duration::from_millis(400);
    let server = start(ControlPlaneConfig {
        idle_timeout,
        shutdown_grace: Duration::from_millis(500),
        ..config()
    })
    .await;
    let early = idle_timeout - Duration::from_millis(50);

    // Silent from the start: not even the protocol is known.
    let mut silent = server.connect().await;
    let (received, after) =
        closed_within(&mut silent, Duration::from_secs(3), "a silent connection").await;
    assert!(received.is_empty(), "{received:?}");
    assert!(after >= early, "{after:?}");

    // HTTP/1 kept alive after an answer (the header timeout is 30 s here).
    let mut kept = server.connect().await;
    assert_eq!(exchange(&mut kept, REST_STATUS).await.status, 200);
    let (received, after) = closed_within(
        &mut kept,
        Duration::from_secs(3),
        "an idle HTTP/1 connection",
    )
    .await;
    assert!(received.is_empty(), "{received:?}");
    assert!(after >= early, "{after:?}");

    // HTTP/2: the preface and an empty SETTINGS, then silence (no SETTINGS ack, no ping
    // answer). The server says goodbye with a GOAWAY and closes.
    let mut h2 = server.connect().await;
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("send the preface");
    let (received, after) =
        closed_within(&mut h2, Duration::from_secs(3), "an idle HTTP/2 connection").await;
    assert!(after >= early, "{after:?}");
    let types = frame_types(&received);
    assert_eq!(
        types.first(),
        Some(&4),
        "the server's SETTINGS first: {types:?}"
    );
    assert!(types.contains(&7), "a GOAWAY: {types:?}");

    // A request in progress is not idle: a body sent slowly, over several idle timeouts.
    let mut slow = server.connect().await;
    let body = b"<?xml version=\"1.0\"?><methodCall><methodName>system.listMethods</methodName><params></params></methodCall>";
    slow.write_all(
        format!(
            "POST /RPC2 HTTP/1.1\r\nHost: cp\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .expect("send the head");
    for piece in body.chunks(body.len() / 4 + 1) {
        tokio::time::sleep(idle_timeout / 2).await;
        slow.write_all(piece)
            .await
            .expect("the connection is still open");
    }
    let answer = tokio::time::timeout(Duration::from_secs(5), read_answer(&mut slow))
        .await
        .expect("an answer within 5 s")
        .expect("the slow request is answered");
    assert_eq!(answer.status, 200);
    assert!(answer.body.contains("queue.status"), "{}", answer.body);
}

#[tokio::test]
async fn the_header_timeout_bounds_http1_between_requests_and_not_an_idle_http2_connection() {
    let header_timeout = Duration::from_millis(300);
    let idle_timeout = Duration::from_millis(1500);
    let server = start(ControlPlaneConfig {
        header_timeout,
        idle_timeout,
        shutdown_grace: Duration::from_millis(500),
        ..config()
    })
    .await;

    // HTTP/1 kept alive after an answer: its next header is due within the header timeout.
    let mut kept = server.connect().await;
    assert_eq!(exchange(&mut kept, REST_STATUS).await.status, 200);
    let (received, after) = closed_within(
        &mut kept,
        Duration::from_secs(3),
        "a kept-alive HTTP/1 connection",
    )
    .await;
    assert!(received.is_empty(), "{received:?}");
    assert!(
        after >= header_timeout - Duration::from_millis(50) && after < idle_timeout,
        "{after:?}"
    );

    // Silent from the start: the header timeout too, the protocol being unknown.
    let mut silent = server.connect().await;
    let (_, after) =
        closed_within(&mut silent, Duration::from_secs(3), "a silent connection").await;
    assert!(
        after >= header_timeout - Duration::from_millis(50) && after < idle_timeout,
        "{after:?}"
    );

    // HTTP/2's preface, then no request: the idle timeout only, closed with a GOAWAY.
    let mut h2 = server.connect().await;
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("send the preface");
    let (received, after) =
        closed_within(&mut h2, Duration::from_secs(4), "an idle HTTP/2 connection").await;
    assert!(
        after >= idle_timeout - Duration::from_millis(50),
        "closed after {after:?}, before the idle timeout"
    );
    assert!(frame_types(&received).contains(&7), "a GOAWAY");
}

/// The types of the HTTP/2 frames in `bytes` (whole frames only).
fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let length =
            usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        types.push(bytes[3]);
        bytes = &bytes[(9 + length).min(bytes.len())..];
    }
    types
}

#[tokio::test]
async fn shutdown_with_a_stuck_request_and_a_client_that_never_reads_ends_within_the_grace() {
    let grace = Duration::from_secs(1);
    let server = start(ControlPlaneConfig {
        shutdown_grace: grace,
        ..config()
    })
    .await;
    let call = b"<?xml version=\"1.0\"?><methodCall><methodName>system.listMethods</methodName><params></params></methodCall>";
    let head = |length: usize| {
        format!(
            "POST /RPC2 HTTP/1.1\r\nHost: cp\r\nContent-Type: text/xml\r\nContent-Length: {length}\r\n\r\n"
        )
    };

    // A request whose body never comes: in progress for ever.
    let mut stuck = server.connect().await;
    stuck
        .write_all(format!("{}<?xml", head(call.len())).as_bytes())
        .await
        .expect("send the stuck request");

    // A client that asks for ~16 MB of answers and reads none: the server is left
    // writing into a full socket.
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("a small receive buffer");
    let mut deaf = socket.connect(server.address).await.expect("connect");
    let requests = "GET /api/v1/openapi.json HTTP/1.1\r\nHost: cp\r\n\r\n".repeat(1000);
    tokio::time::timeout(Duration::from_secs(5), deaf.write_all(requests.as_bytes()))
        .await
        .expect("the pipelined requests fit in the socket buffers")
        .expect("send the pipelined requests");

    // A request that is still coming when the shutdown starts, and completes during it.
    let mut late = server.connect().await;
    late.write_all(format!("{}{}", head(call.len()), "<?xml").as_bytes())
        .await
        .expect("send the start of the late request");

    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    server.shutdown.cancel();

    // The port closes at once: new clients are refused by the kernel.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = TcpStream::connect(server.address).await;
    assert!(
        refused.is_err(),
        "a connection during the drain was accepted by the kernel"
    );

    // The late request completes within the grace and is answered.
    late.write_all(&call[5..])
        .await
        .expect("finish the late request");
    let answer = tokio::time::timeout(Duration::from_secs(3), read_answer(&mut late))
        .await
        .expect("an answer within 3 s")
        .expect("the late request is answered during the drain");
    assert_eq!(answer.status, 200);
    assert!(answer.body.contains("queue.status"), "{}", answer.body);

    let result = tokio::time::timeout(grace + Duration::from_secs(3), server.task)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "run did not return within the grace ({grace:?}) and 3 s (it has waited {:?})",
                started.elapsed()
            )
        });
    result.expect("the server task").expect("run ends cleanly");
    let took = started.elapsed();
    assert!(
        took >= grace,
        "run returned after {took:?}, before the grace ran out: the stuck request was cut short"
    );
    // The stuck and the deaf clients' connections were dropped.
    let (received, _) =
        closed_within(&mut stuck, Duration::from_secs(1), "the stuck request").await;
    assert!(received.is_empty(), "{received:?}");
    let mut sink = vec![0u8; 1 << 20];
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match deaf.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the deaf client's connection ends");
}

#[tokio::test]
async fn the_public_status_answers_the_burst_then_429_per_address() {
    let burst = 8;
    let server = start(ControlPlaneConfig {
        // One request every 10 s after the burst: none comes back during the test.
        status_rate: 0.1,
        status_burst: burst,
        ..config()
    })
    .await;
    let mut first = server.connect().await;
    let started = Instant::now();
    for i in 1..=burst {
        let answer = exchange(&mut first, REST_STATUS).await;
        assert_eq!(
            answer.status, 200,
            "request {i} from 127.0.0.1: {}",
            answer.body
        );
        assert_eq!(answer.header("cache-control"), Some("public, max-age=1"));
    }
    let limited = exchange(&mut first, REST_STATUS).await;
    assert_eq!(
        limited.status,
        429,
        "request {} from 127.0.0.1: {}",
        burst + 1,
        limited.body
    );
    // The wait for the next token, rounded up: 10 s while the test has taken under 1 s.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the burst took {:?}",
        started.elapsed()
    );
    assert_eq!(limited.header("retry-after"), Some("10"));
    assert!(
        limited.body.contains("too many queue status requests"),
        "{}",
        limited.body
    );

    // The limit is the address's, not the connection's.
    let mut again = server.connect().await;
    assert_eq!(exchange(&mut again, REST_STATUS).await.status, 429);

    // Another address has its own bucket.
    let mut other = connect_from("127.0.0.2", server.address).await;
    let answer = exchange(&mut other, REST_STATUS).await;
    assert_eq!(answer.status, 200, "127.0.0.2: {}", answer.body);

    // Only the public status is limited: an authenticated read from the limited address
    // is answered.
    let queues = exchange(
        &mut first,
        &format!("GET /api/v1/queues HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {CRM}\r\n\r\n"),
    )
    .await;
    assert_eq!(queues.status, 200, "{}", queues.body);
}

#[tokio::test]
async fn grpc_and_rest_share_the_listener() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let server = start(config()).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.address))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect over HTTP/2");
    let mut health = HealthClient::new(channel.clone());
    let serving = health
        .check(HealthCheckRequest {
            service: "callfleet.control.v1.Control".into(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(serving.status, ServingStatus::Serving as i32);

    let mut client = ControlClient::new(channel);
    let mut put = tonic::Request::new(pb::Queue {
        id: "support".into(),
        name: "Support".into(),
        service_level_ms: None,
    });
    put.metadata_mut().insert(
        "authorization",
        format!("Bearer {CRM}").parse().expect("ascii metadata"),
    );
    client.put_queue(put).await.expect("PutQueue over gRPC");
    let status = client
        .queue_status(pb::QueueRef {
            queue: "support".into(),
        })
        .await
        .expect("QueueStatus over gRPC")
        .into_inner();
    assert_eq!((status.queue.as_str(), status.served), ("support", false));

    // The queue written over gRPC, read over REST on the same port.
    let mut rest = server.connect().await;
    let answer = exchange(
        &mut rest,
        "GET /api/v1/queues/support/status HTTP/1.1\r\nHost: cp\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let json: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON");
    assert_eq!(json["queue"], "support");
    assert_eq!(json["served"], false);

    drop(client);
    drop(health);
    server.stop().await;
}
