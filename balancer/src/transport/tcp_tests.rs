//! The TCP adapter on loopback with real sockets and small limits: what a peer can hold,
//! and for how long. (`tests/balancer_tcp.rs` runs the same attacks on the real binary
//! with the built-in limits.)

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use callfleet_core::NodeId;
use callfleet_core::config::BalancerConfig;
use callfleet_core::testing::node_status;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Limits, serve_with};
use crate::engine::Engine;
use crate::route::FleetView;
use crate::transport::TcpRoutes;

/// A transport serving on a loopback port with an engine whose fleet view holds one
/// node, so OPTIONS is answered 200.
struct Server {
    addr: SocketAddr,
    engine: Arc<Engine>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

fn limits() -> Limits {
    Limits {
        message_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        ..Limits::new(1024)
    }
}

async fn start(limits: Limits) -> Server {
    let config = BalancerConfig {
        listen: "127.0.0.1:5060".into(),
        max_message: limits.max_message,
        // The PBX on another host: a loopback one would make every address of this host
        // (127.0.0.1, where the stranger below connects from) a PBX address, let in
        // whatever `allow` says.
        local_pbx: "192.0.2.1:5080".into(),
        ..BalancerConfig::default()
    };
    let local = NodeId::new("lb").expect("id");
    let engine = Arc::new(Engine::new(&config, local.clone()).expect("engine"));
    let node = node_status("node-a", "sip:192.0.2.20:5060");
    engine.set_view(FleetView::from_nodes(
        vec![node],
        &local,
        None,
        Instant::now(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let udp = Arc::new(std::net::UdpSocket::bind("127.0.0.1:0").expect("udp"));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve_with(
        listener,
        engine.clone(),
        udp,
        Arc::new(TcpRoutes::default()),
        limits,
        shutdown.clone(),
    ));
    Server {
        addr,
        engine,
        shutdown,
        task,
    }
}

fn options(id: &str) -> Vec<u8> {
    format!(
        "OPTIONS sip:lb@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5099;branch=z9hG4bK{id}\r\n\
         From: <sip:c@127.0.0.1>;tag=1\r\nTo: <sip:lb@127.0.0.1>\r\nCall-ID: {id}\r\n\
         CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

async fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    let ip: IpAddr = ip.parse().expect("ip");
    socket.bind(SocketAddr::new(ip, 0)).expect("bind");
    socket.connect(to).await.expect("connect")
}

/// Reads until `count` responses (by status line) have come; panics after 5 s.
async fn responses(stream: &mut TcpStream, count: usize) -> String {
    let mut text = String::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    while text.matches("SIP/2.0 ").count() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => text.push_str(&String::from_utf8_lossy(&chunk[..n])),
            other => panic!(
                "{} of {count} responses, then {other:?}:\n{text}",
                text.matches("SIP/2.0 ").count()
            ),
        }
    }
    text
}

/// How long until the server closes `stream` (EOF or reset), reading and discarding
/// what comes; `None` if it is still open after `wait`.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let left = wait.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn addresses_outside_the_allow_list_are_closed_at_accept() {
    let server = start(Limits {
        allow: vec![callfleet_core::net::Cidr::parse("127.0.0.2").expect("cidr")],
        ..limits()
    })
    .await;
    let mut stranger = TcpStream::connect(server.addr).await.expect("connect");
    let took = closed_within(&mut stranger, Duration::from_secs(1)).await;
    assert!(took.is_some(), "still open");
    let mut carrier = connect_from("127.0.0.2", server.addr).await;
    carrier.write_all(&options("ok")).await.expect("write");
    assert!(
        responses(&mut carrier, 1)
            .await
            .starts_with("SIP/2.0 200 OK")
    );
    let [(_, denied)] = server
        .engine
        .counters
        .snapshot()
        .into_iter()
        .filter(|(name, _)| *name == "denied")
        .collect::<Vec<_>>()[..]
    else {
        panic!("no denied counter");
    };
    assert_eq!(denied, 1);
}

#[tokio::test]
async fn an_address_past_its_cap_and_a_full_table_are_closed_at_once() {
    let server = start(Limits {
        per_address: 2,
        max_connections: 3,
        ..limits()
    })
    .await;
    let mut held = Vec::new();
    for n in 0..2 {
        let mut conn = TcpStream::connect(server.addr).await.expect("connect");
        conn.write_all(&options(&format!("held{n}")))
            .await
            .expect("write");
        responses(&mut conn, 1).await;
        held.push(conn);
    }
    let mut third = TcpStream::connect(server.addr).await.expect("connect");
    assert!(
        closed_within(&mut third, Duration::from_secs(1))
            .await
            .is_some(),
        "a third connection from 127.0.0.1 is closed"
    );
    // Another address gets the table's last slot, and then the table is full.
    let mut other = connect_from("127.0.0.3", server.addr).await;
    other.write_all(&options("other")).await.expect("write");
    responses(&mut other, 1).await;
    let mut fourth = connect_from("127.0.0.4", server.addr).await;
    assert!(
        closed_within(&mut fourth, Duration::from_secs(1))
            .await
            .is_some(),
        "a full table closes new connections"
    );
    // A closed connection gives its slots back.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = TcpStream::connect(server.addr).await.expect("connect");
    again.write_all(&options("again")).await.expect("write");
    responses(&mut again, 1).await;
}

#[tokio::test]
async fn a_silent_connection_and_a_slow_message_are_timed_out() {
    let server = start(Limits {
        message_timeout: Duration::from_millis(400),
        ..limits()
    })
    .await;
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    let took = closed_within(&mut silent, Duration::from_secs(2))
        .await
        .expect("silent connection closed");
    assert!(took >= Duration::from_millis(350), "{took:?}");

    // Served once, then a message dripped one byte every 100 ms.
    let mut slow = TcpStream::connect(server.addr).await.expect("connect");
    slow.write_all(&options("first")).await.expect("write");
    responses(&mut slow, 1).await;
    let started = Instant::now();
    let message = options("slow");
    for byte in &message[..10] {
        if slow.write_all(&[*byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = closed_within(&mut slow, Duration::from_secs(2))
        .await
        .map(|_| started.elapsed())
        .expect("slow message timed out");
    assert!(took >= Duration::from_millis(350), "{took:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_keep_alives_keep_it() {
    let server = start(Limits {
        idle_timeout: Duration::from_millis(500),
        ..limits()
    })
    .await;
    let mut idle = TcpStream::connect(server.addr).await.expect("connect");
    idle.write_all(&options("idle")).await.expect("write");
    responses(&mut idle, 1).await;
    let mut pinging = TcpStream::connect(server.addr).await.expect("connect");
    pinging.write_all(&options("pinging")).await.expect("write");
    responses(&mut pinging, 1).await;
    let start = Instant::now();
    // Pings every 200 ms keep the second one; each gets exactly one CRLF.
    let mut pongs = Vec::new();
    while start.elapsed() < Duration::from_millis(1200) {
        pinging.write_all(b"\r\n\r\n").await.expect("ping");
        let mut pong = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(1), pinging.read(&mut pong))
            .await
            .expect("pong in time")
            .expect("read");
        pongs.extend_from_slice(&pong[..n]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        pongs.len(),
        pongs.iter().filter(|b| **b == b'\r').count() * 2
    );
    assert!(pongs.chunks(2).all(|pair| pair == b"\r\n"), "{pongs:?}");
    let took = closed_within(&mut idle, Duration::from_millis(100))
        .await
        .map(|_| start.elapsed());
    assert!(took.is_some(), "the idle connection was closed meanwhile");
    pinging.write_all(&options("still")).await.expect("write");
    responses(&mut pinging, 1).await;
}

#[tokio::test]
async fn a_burst_of_pipelined_requests_is_answered_in_full() {
    let server = start(Limits {
        queue: 8,
        ..limits()
    })
    .await;
    let mut conn = TcpStream::connect(server.addr).await.expect("connect");
    let burst: Vec<u8> = (0..2000).flat_map(|n| options(&format!("b{n}"))).collect();
    let (mut reader, mut writer) = conn.split();
    let write = async {
        writer.write_all(&burst).await.expect("write");
    };
    let read = async {
        let mut text = String::new();
        let mut chunk = vec![0u8; 64 * 1024];
        while text.matches("SIP/2.0 200 OK").count() < 2000 {
            let n = tokio::time::timeout(Duration::from_secs(10), reader.read(&mut chunk))
                .await
                .expect("answers keep coming")
                .expect("read");
            assert!(
                n > 0,
                "closed after {} answers",
                text.matches("SIP/2.0 ").count()
            );
            text.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    };
    tokio::join!(write, read);
}

#[tokio::test]
async fn a_peer_that_never_reads_is_closed_and_does_not_hold_up_shutdown() {
    let server = start(Limits {
        per_address: 1,
        queue: 4,
        write_timeout: Duration::from_millis(500),
        drain: Duration::from_millis(300),
        ..limits()
    })
    .await;
    // A small receive window: the balancer's writes stall sooner.
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let deaf = socket.connect(server.addr).await.expect("connect");
    let (_deaf_reader, mut deaf_writer) = deaf.into_split();
    let flood: Vec<u8> = (0..50).flat_map(|n| options(&format!("d{n}"))).collect();
    let start = Instant::now();
    // Writes until the balancer stops reading (its answers cannot leave).
    while tokio::time::timeout(Duration::from_millis(300), deaf_writer.write_all(&flood))
        .await
        .is_ok_and(|written| written.is_ok())
    {
        assert!(start.elapsed() < Duration::from_secs(20), "never stalled");
    }
    // The stalled write times out, the connection goes, and its address's one slot is
    // free again.
    let freed = Instant::now();
    loop {
        let mut conn = TcpStream::connect(server.addr).await.expect("connect");
        conn.write_all(&options("next")).await.expect("write");
        let mut chunk = [0u8; 1024];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(300), conn.read(&mut chunk)).await
            && n > 0
        {
            break;
        }
        assert!(
            freed.elapsed() < Duration::from_secs(3),
            "the never-reading peer still holds its slot"
        );
    }

    // Another one, stalled when shutdown begins: the transport returns within the drain.
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let deaf = connect_deaf(socket, server.addr).await;
    let stop = Instant::now();
    server.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), server.task)
        .await
        .expect("serve returns after shutdown")
        .expect("no panic");
    assert!(
        stop.elapsed() < Duration::from_millis(1500),
        "{:?}",
        stop.elapsed()
    );
    drop(deaf);
}

/// Connects with `socket` and writes requests without reading until the balancer stops
/// reading them.
async fn connect_deaf(socket: TcpSocket, to: SocketAddr) -> TcpStream {
    let mut deaf = socket.connect(to).await.expect("connect");
    let flood: Vec<u8> = (0..50).flat_map(|n| options(&format!("e{n}"))).collect();
    while tokio::time::timeout(Duration::from_millis(300), deaf.write_all(&flood))
        .await
        .is_ok_and(|written| written.is_ok())
    {}
    deaf
}

#[tokio::test]
async fn an_oversized_message_is_answered_513_and_the_next_one_served() {
    let server = start(limits()).await;
    let mut conn = TcpStream::connect(server.addr).await.expect("connect");
    let body = "x".repeat(5000);
    let big = format!(
        "INVITE sip:1@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5099;branch=z9hG4bKbig\r\n\
         From: <sip:c@127.0.0.1>;tag=1\r\nTo: <sip:1@127.0.0.1>\r\nCall-ID: big\r\n\
         CSeq: 1 INVITE\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let stream = [big.as_bytes(), &options("next")].concat();
    conn.write_all(&stream).await.expect("write");
    let text = responses(&mut conn, 2).await;
    assert!(
        text.starts_with("SIP/2.0 513 Message Too Large\r\n"),
        "{text}"
    );
    let second = &text[text.rfind("SIP/2.0 ").expect("second")..];
    assert!(second.starts_with("SIP/2.0 200 OK\r\n"), "{text}");
    assert!(second.contains("Call-ID: next\r\n"), "{text}");
}
