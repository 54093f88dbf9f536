//! `GET /metrics` on `node.metrics_listen`, from `callfleet_node_agent::run` on a SQLite
//! store and loopback ports, after a known amount of traffic: one heartbeat (the interval
//! is a minute), a static call count, two shed tiers (one the load always calls for, one
//! it never does), and FastAGI sessions played from the test as Asterisk would open them.
//! A `metrics_listen` that is not ip:port, or a port taken, stops the agent with a line
//! that says what to set.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use callfleet_core::config::{CallSourceKind, Config, ShedTier, StoreConfig};
use callfleet_core::{NodeId, Store};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

/// The most any step waits before the test fails.
const WAIT: Duration = Duration::from_secs(10);

/// A loopback port nobody listens on now.
fn free_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
}

async fn store(dir: &tempfile::TempDir) -> Store {
    Store::connect(&StoreConfig {
        url: format!("sqlite://{}/fleet.db", dir.path().display()),
        ..StoreConfig::default()
    })
    .await
    .expect("sqlite store")
}

fn tier(name: &str, above: f64) -> ShedTier {
    ShedTier {
        name: name.into(),
        above,
        below: above - 0.1,
        stop: String::new(),
        start: String::new(),
        refuse_calls: false,
    }
}

/// The node `pbx-m1` with 7 calls, a heartbeat a minute and FastAGI on `agi`; the control
/// plane it would ask is a loopback port nobody listens on.
fn node_config(metrics: &str, agi: SocketAddr) -> Config {
    let mut config = Config::default();
    let node = &mut config.node;
    node.id = Some(NodeId::new("pbx-m1").expect("node id"));
    node.heartbeat_interval = Duration::from_secs(60);
    node.calls.source = CallSourceKind::Static;
    node.calls.count = 7;
    // The load fraction is never below 0 and never 1,000.
    node.shed = vec![tier("always", 0.0), tier("never", 1000.0)];
    node.agi.listen = agi.to_string();
    node.metrics_listen = metrics.to_owned();
    config.provisioning.control_plane = format!("http://{}", free_address());
    config
}

/// GET /metrics: the body of a 200.
async fn scrape(address: SocketAddr) -> String {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_owned())
}

/// The node-agent's series (`callfleet_node_agent_…` lines), sorted.
fn series(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text
        .lines()
        .filter(|line| line.starts_with("callfleet_node_agent_"))
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

/// Plays Asterisk for one FastAGI session of `script` (with its query): sends the
/// environment, answers every command `200 result=1`, and returns the commands once the
/// agent closes the connection.
async fn agi_session(agi: SocketAddr, script: &str) -> Vec<String> {
    let stream = TcpStream::connect(agi).await.expect("connect to FastAGI");
    let (read, mut write) = stream.into_split();
    let environment = format!(
        "agi_network: yes\nagi_network_script: {script}\nagi_request: agi://{agi}/{script}\nagi_channel: PJSIP/trunk-00000001\nagi_uniqueid: 1700000000.{}\n\n",
        script.len()
    );
    write
        .write_all(environment.as_bytes())
        .await
        .expect("environment");
    let mut lines = BufReader::new(read).lines();
    let mut commands = Vec::new();
    while let Some(line) = timeout(WAIT, lines.next_line())
        .await
        .expect("the agent answers")
        .expect("read")
    {
        commands.push(line);
        write.write_all(b"200 result=1\n").await.expect("reply");
    }
    commands
}

#[tokio::test]
async fn heartbeats_the_pbx_shed_tiers_and_fastagi_sessions_are_exported() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store(&dir).await;
    let (metrics, agi) = (free_address(), free_address());
    let config = node_config(&metrics.to_string(), agi);
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { callfleet_node_agent::run(&config, store, shutdown).await }
    });

    // Wait for the FastAGI port, then: 2 pings, a script nobody serves, a connection that
    // closes before its environment, and a queued call that arrived longer than max_wait
    // ago (it overflows at once, without the control plane or the lock service).
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(agi).await.is_err() {
        assert!(Instant::now() < deadline, "no FastAGI server on {agi}");
        sleep(Duration::from_millis(20)).await;
    }
    // That probe was a connection without an environment: it counts as one.
    for _ in 0..2 {
        let commands = agi_session(agi, "ping").await;
        assert_eq!(commands, ["SET VARIABLE CALLFLEET_RESULT pong"]);
    }
    let commands = agi_session(agi, "nope").await;
    assert_eq!(commands.len(), 1, "{commands:?}");
    assert!(commands[0].starts_with("VERBOSE "), "{commands:?}");
    let commands = agi_session(agi, "queue?queue=sales&arrived=1").await;
    assert_eq!(commands, ["SET VARIABLE CALLFLEET_RESULT overflow"]);

    let expected = {
        let mut lines: Vec<String> = [
            "callfleet_node_agent_heartbeats_total{result=\"ok\"} 1",
            "callfleet_node_agent_heartbeats_total{result=\"failed\"} 0",
            "callfleet_node_agent_store_up 1",
            "callfleet_node_agent_pbx_up 1",
            "callfleet_node_agent_pbx_calls 7",
            "callfleet_node_agent_shed{tier=\"always\"} 1",
            "callfleet_node_agent_shed{tier=\"never\"} 0",
            "callfleet_node_agent_agi_sessions_open 0",
            "callfleet_node_agent_queue_calls_total{outcome=\"answered\"} 0",
            "callfleet_node_agent_queue_calls_total{outcome=\"abandoned\"} 0",
            "callfleet_node_agent_queue_calls_total{outcome=\"overflowed\"} 1",
            "callfleet_node_agent_queue_rings_total 0",
            "callfleet_node_agent_queue_rings_failed_total{reason=\"missed\"} 0",
            "callfleet_node_agent_queue_rings_failed_total{reason=\"fenced\"} 0",
            "callfleet_node_agent_queue_rings_failed_total{reason=\"cancelled\"} 0",
            "callfleet_node_agent_queue_rings_failed_total{reason=\"pbx_lost\"} 0",
            "callfleet_node_agent_queue_unfenced_total 0",
            "callfleet_node_agent_cache_lookups_total{cache=\"candidates\",result=\"hit\"} 0",
            "callfleet_node_agent_cache_lookups_total{cache=\"candidates\",result=\"miss\"} 0",
            "callfleet_node_agent_cache_lookups_total{cache=\"candidates\",result=\"stale\"} 0",
            "callfleet_node_agent_cache_upstream_failures_total{cache=\"candidates\"} 0",
            "callfleet_node_agent_cache_entries{cache=\"candidates\"} 0",
            "callfleet_node_agent_cache_lookups_total{cache=\"callers\",result=\"hit\"} 0",
            "callfleet_node_agent_cache_lookups_total{cache=\"callers\",result=\"miss\"} 0",
            "callfleet_node_agent_cache_lookups_total{cache=\"callers\",result=\"stale\"} 0",
            "callfleet_node_agent_cache_lookups_total{cache=\"callers\",result=\"none\"} 0",
            "callfleet_node_agent_cache_upstream_failures_total{cache=\"callers\"} 0",
            "callfleet_node_agent_cache_entries{cache=\"callers\"} 0",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        // Every script served and both pseudo-scripts, with the outcomes each can have.
        let mut sessions = BTreeMap::new();
        for script in ["fence", "ping", "queue", "ringing"] {
            for outcome in ["ok", "hangup", "error", "shutdown"] {
                sessions.insert((script, outcome), 0);
            }
        }
        for outcome in ["no_environment", "refused", "shutdown"] {
            sessions.insert(("none", outcome), 0);
        }
        for outcome in ["unknown_script", "shutdown"] {
            sessions.insert(("unknown", outcome), 0);
        }
        sessions.insert(("none", "no_environment"), 1);
        sessions.insert(("unknown", "unknown_script"), 1);
        sessions.insert(("ping", "ok"), 2);
        sessions.insert(("queue", "ok"), 1);
        lines.extend(sessions.into_iter().map(|((script, outcome), n)| {
            format!(
                "callfleet_node_agent_agi_sessions_total{{script=\"{script}\",outcome=\"{outcome}\"}} {n}"
            )
        }));
        lines.sort();
        lines
    };
    // The queue's counts are copied every second, and a session is counted a moment after
    // its connection closes: the last scrape within the wait must show all of it.
    let deadline = Instant::now() + WAIT;
    let mut last;
    loop {
        last = series(&scrape(metrics).await);
        if last == expected || Instant::now() >= deadline {
            break;
        }
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last, expected);

    shutdown.cancel();
    timeout(WAIT, agent)
        .await
        .expect("the agent stops")
        .expect("agent task")
        .expect("the agent ran");
}

#[tokio::test]
async fn a_metrics_listen_that_cannot_be_listened_on_stops_the_agent_with_what_to_set() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store(&dir).await;
    let shutdown = CancellationToken::new();

    let config = node_config("localhost:9464", free_address());
    let err = callfleet_node_agent::run(&config, store.clone(), shutdown.clone())
        .await
        .expect_err("not ip:port");
    assert_eq!(
        err.to_string(),
        "invalid configuration: `node.metrics_listen` `localhost:9464` must be ip:port, e.g. 127.0.0.1:9464, or empty for no /metrics"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("address");
    let config = node_config(&address.to_string(), free_address());
    let err = callfleet_node_agent::run(&config, store, shutdown)
        .await
        .expect_err("port taken");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("cannot listen for /metrics on {address}: "))
            && text
                .ends_with("; set metrics_listen to a free ip:port, or empty to serve no metrics"),
        "{text}"
    );
}
