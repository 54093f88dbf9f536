//! The queue status's figures (issue 16), end to end: the whole control plane
//! (`callfleet_control_plane::run` on SQLite) beside a real lock service
//! (`callfleet_lock_service::run` on its memory backend), both on loopback ports.
//!
//! - callers that join the lock service's waiting order show as `waiting` with their
//!   `longest_wait_ms` on every face of the status (REST, XML-RPC, gRPC); one being rung is
//!   no longer waiting;
//! - with the lock service stopped, silent, or none configured, the status still answers at
//!   once, with `waiting_unknown: true` and null (or, over XML-RPC, absent) waiting fields;
//! - a node's `POST /queues/{queue}/call-outcomes` counts answered, abandoned, overflowed
//!   and answered within the queue's `service_level_ms` (the threshold itself included),
//!   once per `Idempotency-Key`, and the status shows the day's counts and service level;
//! - a CRM's `write` and a wallboard's `read` token get 403 there, an unknown queue 404
//!   naming it, a wrong body 400 naming the field.

mod support;

use std::time::{Duration, Instant};

use callfleet_control_plane::figures::LOCK_DEADLINE;
use callfleet_core::config::ControlPlaneConfig;
use callfleet_proto::control::v1 as control_pb;
use callfleet_proto::control::v1::control_client::ControlClient;
use callfleet_proto::lock::v1 as lock_pb;
use serde_json::{Value, json};
use support::{
    Locks, REST_STATUS, Reply, Server, channel, connect_from, crm_wallboard_node_tokens, exchange,
    expect, json_request, send_json,
};

/// Write token of a CRM, named `crm`.
const CRM: &str = "crm-queue-figures-secret-0123456789";
/// Read token of a wallboard, named `wallboard`.
const WALLBOARD: &str = "wallboard-queue-figures-secret-0123";
/// Node token of a node-agent, named `node:pbx-1`.
const NODE: &str = "node-pbx-1-queue-figures-secret-0123";

/// The control plane's config: the three tokens, the lock service at `lock_service`, and a
/// status limit the tests' polling stays well below.
fn config(lock_service: &str) -> ControlPlaneConfig {
    ControlPlaneConfig {
        tokens: crm_wallboard_node_tokens(CRM, WALLBOARD, NODE),
        lock_service: lock_service.to_owned(),
        status_rate: 1000.0,
        status_burst: 1000,
        ..ControlPlaneConfig::default()
    }
}

/// The public status of `sales` over REST, and how long it took to answer.
async fn status(server: &Server) -> (Value, Duration) {
    status_on(&mut connect_from("127.0.0.1", server.address).await).await
}

/// [`status`] on a connection already open: one connection is served on one thread, which
/// reuses the answer it rendered last while it is current.
async fn status_on(stream: &mut tokio::net::TcpStream) -> (Value, Duration) {
    let asked = Instant::now();
    let answer = exchange(stream, REST_STATUS).await;
    let took = asked.elapsed();
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.header("cache-control"), Some("public, max-age=1"));
    (serde_json::from_str(&answer.body).expect("JSON"), took)
}

/// Polls the REST status until `wanted` holds (every 50 ms, for at most 5 s).
async fn status_until(server: &Server, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = status(server).await;
        if wanted(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{what}: still {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The status of `sales` over XML-RPC, as a PHP website sends it: the result struct.
async fn xmlrpc_status(server: &Server) -> dxr::Value {
    let body = "<?xml version=\"1.0\"?><methodCall><methodName>queue.status</methodName>\
                <params><param><value><string>sales</string></value></param></params></methodCall>";
    let request = format!(
        "POST /RPC2 HTTP/1.1\r\nHost: cp\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = connect_from("127.0.0.1", server.address).await;
    let answer = exchange(&mut stream, &request).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    dxr::MethodResponse::from_xml(&answer.body)
        .unwrap_or_else(|err| panic!("not a method response ({err}): {}", answer.body))
        .value
}

/// The status of `sales` over gRPC.
async fn grpc_status(server: &Server) -> control_pb::QueueStatusResponse {
    ControlClient::new(channel(&format!("http://{}", server.address)).await)
        .queue_status(control_pb::QueueRef {
            queue: "sales".into(),
        })
        .await
        .expect("the public status")
        .into_inner()
}

fn join(waiter: &str) -> lock_pb::JoinRequest {
    lock_pb::JoinRequest {
        queue: "sales".into(),
        waiter: waiter.into(),
        band: 1,
        ttl_ms: 60_000,
    }
}

#[tokio::test]
async fn waiting_and_the_longest_wait_follow_the_lock_service_s_order() {
    let locks = Locks::start().await;
    let server = Server::start(config(&locks.url()), CRM, "127.0.0.1").await;
    let empty = status_until(&server, "the lock service answers", |s| {
        s["waiting_unknown"] == false
    })
    .await;
    assert_eq!(
        (&empty["waiting"], &empty["longest_wait_ms"]),
        (&json!(0), &json!(0)),
        "nobody waits: {empty}"
    );

    // Two callers join on two nodes; the first waits longest.
    let mut client = locks.client().await;
    let sent = Instant::now();
    client.join(join("pbx-1/c1")).await.expect("join");
    let answered = Instant::now();
    client.join(join("pbx-2/c2")).await.expect("join");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let two = status_until(&server, "two callers wait", |s| s["waiting"] == 2).await;
    let longest = two["longest_wait_ms"].as_u64().expect("a wait");
    let (low, high) = (answered.elapsed().as_millis(), sent.elapsed().as_millis());
    // The wait read (at most a second ago) plus the time since: the caller's age, give or
    // take the read's own round trip.
    assert!(
        u128::from(longest) + 50 >= low && u128::from(longest) <= high + 50,
        "longest wait {longest} ms, the first caller joined {low}–{high} ms ago: {two}"
    );
    assert_eq!(two["waiting_unknown"], false);

    // The same figures on the other faces.
    let xml = xmlrpc_status(&server).await;
    let dxr::Value::Struct(members) = &xml else {
        panic!("a struct: {xml:?}");
    };
    assert!(
        matches!(
            members.get("waiting"),
            Some(dxr::Value::Integer(2) | dxr::Value::Long(2))
        ),
        "{xml:?}"
    );
    assert_eq!(
        members.get("waiting_unknown"),
        Some(&dxr::Value::Boolean(false))
    );
    let grpc = grpc_status(&server).await;
    assert_eq!(
        (grpc.waiting, grpc.waiting_unknown),
        (Some(2), false),
        "{grpc:?}"
    );
    assert!(grpc.longest_wait_ms.is_some_and(|ms| ms >= 300), "{grpc:?}");

    // The first caller's agent rings: one caller still waits, the second.
    let granted = client
        .claim_next(lock_pb::ClaimNextRequest {
            queue: "sales".into(),
            waiter: "pbx-1/c1".into(),
            candidates: vec!["agent:1001".into()],
            holder: "pbx-1/c1".into(),
            attempt: "a1".into(),
            validity_ms: 5_000,
        })
        .await
        .expect("claim")
        .into_inner();
    assert!(
        matches!(
            granted.outcome,
            Some(lock_pb::claim_next_response::Outcome::Lease(_))
        ),
        "{granted:?}"
    );
    let one = status_until(&server, "the rung caller no longer waits", |s| {
        s["waiting"] == 1
    })
    .await;
    assert!(
        one["longest_wait_ms"].as_u64().expect("a wait") < longest + 2_000,
        "{one}"
    );

    // Both leave: nobody waits.
    for waiter in ["pbx-1/c1", "pbx-2/c2"] {
        client
            .leave(lock_pb::LeaveRequest {
                queue: "sales".into(),
                waiter: waiter.into(),
            })
            .await
            .expect("leave");
    }
    let none = status_until(&server, "nobody waits", |s| s["waiting"] == 0).await;
    assert_eq!(none["longest_wait_ms"], 0, "{none}");

    server.stop().await;
    locks.stop().await;
}

#[tokio::test]
async fn the_status_answers_with_waiting_unknown_when_the_lock_service_is_down() {
    let locks = Locks::start().await;
    let server = Server::start(config(&locks.url()), CRM, "127.0.0.1").await;
    locks
        .client()
        .await
        .join(join("pbx-1/c1"))
        .await
        .expect("join");
    status_until(&server, "the caller shows", |s| s["waiting"] == 1).await;

    // The lock service goes away: within a second the status stops showing its last
    // figures, and it keeps answering at once all along.
    locks.stop().await;
    let down = status_until(&server, "waiting turns unknown", |s| {
        s["waiting_unknown"] == true
    })
    .await;
    assert_eq!(
        down,
        status_unknown_waiting(&counts(0, 0, 0, 0, Value::Null))
    );
    // XML-RPC cannot send null to every client: the unknown fields are left out.
    let dxr::Value::Struct(members) = xmlrpc_status(&server).await else {
        panic!("a struct");
    };
    assert_eq!(
        members.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "abandoned_today",
            "answered_today",
            "answered_within_sl_today",
            "available_agents",
            "logged_in_agents",
            "overflowed_today",
            "queue",
            "served",
            "waiting_unknown",
        ]
    );
    let grpc = grpc_status(&server).await;
    assert_eq!(
        (grpc.waiting, grpc.longest_wait_ms, grpc.waiting_unknown),
        (None, None, true)
    );
    server.stop().await;

    // A lock service that accepts connections and never answers: every round of the
    // figures waits out its deadline, the status never does.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent = format!("http://{}", black_hole.local_addr().expect("address"));
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = black_hole.accept().await {
            held.push(stream);
        }
    });
    let server = Server::start(config(&silent), CRM, "127.0.0.1").await;
    for _ in 0..10 {
        let (status, took) = status(&server).await;
        assert_eq!(status["waiting_unknown"], true, "{status}");
        assert!(
            took < LOCK_DEADLINE,
            "the status took {took:?}, as long as the lock service's deadline"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await;
    holder.abort();

    // Without a lock service configured, waiting is unknown from the start.
    let server = Server::start(config(""), CRM, "127.0.0.1").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (none, _) = status(&server).await;
    assert_eq!(
        (&none["waiting"], &none["waiting_unknown"]),
        (&Value::Null, &json!(true))
    );
    server.stop().await;
}

/// Posts an outcome of a call of `queue` with `token` (and an Idempotency-Key, if any).
async fn report(server: &Server, queue: &str, token: &str, key: Option<&str>, body: &str) -> Reply {
    let headers: Vec<(&str, &str)> = key.map(|k| ("Idempotency-Key", k)).into_iter().collect();
    let path = format!("/api/v1/queues/{queue}/call-outcomes");
    send_json(server, &json_request("POST", &path, token, &headers, body)).await
}

/// The answer to an outcome: the queue's counts of the day.
fn counts(answered: u32, abandoned: u32, overflowed: u32, within: u32, pct: Value) -> Value {
    json!({
        "queue": "sales",
        "answered_today": answered,
        "abandoned_today": abandoned,
        "overflowed_today": overflowed,
        "answered_within_sl_today": within,
        "service_level_pct_today": pct,
    })
}

/// The whole REST status of `sales` with no agents and waiting unknown, and the day's
/// `counts` (as [`counts`] gives them).
fn status_unknown_waiting(counts: &Value) -> Value {
    let mut status = json!({
        "queue": "sales",
        "served": false,
        "available_agents": 0,
        "logged_in_agents": 0,
        "waiting": null,
        "longest_wait_ms": null,
        "waiting_unknown": true,
    });
    let fields = status.as_object_mut().expect("an object");
    for (name, value) in counts.as_object().expect("counts") {
        fields.insert(name.clone(), value.clone());
    }
    status
}

#[tokio::test]
async fn call_outcomes_count_once_and_show_in_the_status() {
    let server = Server::start(config(""), CRM, "127.0.0.1").await;
    // A threshold of 10 s for `sales`.
    let body = r#"{"name":"Sales","service_level_ms":10000}"#;
    let put = json_request("PUT", "/api/v1/queues/sales", CRM, &[], body);
    let answer = exchange(&mut connect_from("127.0.0.1", server.address).await, &put).await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (
            200,
            r#"{"id":"sales","name":"Sales","service_level_ms":10000}"#
        )
    );

    // A CRM and a wallboard may not report outcomes; nothing is counted.
    let answered = |ms: u64| format!(r#"{{"outcome":"answered","waited_ms":{ms}}}"#);
    assert_eq!(
        expect(report(&server, "sales", CRM, None, &answered(1)).await, 403),
        json!({ "error": "token `crm` has role Write; this operation needs Node or above" })
    );
    assert_eq!(
        expect(
            report(&server, "sales", WALLBOARD, None, &answered(1)).await,
            403
        ),
        json!({ "error": "token `wallboard` has role Read; this operation needs Node or above" })
    );

    // At the threshold is within it; a millisecond more is not.
    assert_eq!(
        expect(
            report(&server, "sales", NODE, Some("c-1"), &answered(10_000)).await,
            200
        ),
        counts(1, 0, 0, 1, json!(100.0))
    );
    assert_eq!(
        expect(
            report(&server, "sales", NODE, Some("c-2"), &answered(10_001)).await,
            200
        ),
        counts(2, 0, 0, 1, json!(50.0))
    );
    // The node lost the answer and sends c-2 again: answered as the first time.
    assert_eq!(
        expect(
            report(&server, "sales", NODE, Some("c-2"), &answered(10_001)).await,
            200
        ),
        counts(2, 0, 0, 1, json!(50.0))
    );
    let abandoned = r#"{"outcome":"abandoned","waited_ms":4000}"#;
    assert_eq!(
        expect(
            report(&server, "sales", NODE, Some("c-3"), abandoned).await,
            200
        ),
        counts(2, 1, 0, 1, json!(33.3))
    );
    // Asked just before the next outcome, the status is rendered (and kept for reuse)...
    let mut website = connect_from("127.0.0.1", server.address).await;
    let (before, _) = status_on(&mut website).await;
    assert_eq!(
        before,
        status_unknown_waiting(&counts(2, 1, 0, 1, json!(33.3)))
    );
    let overflowed = r#"{"outcome":"overflowed","waited_ms":600000}"#;
    assert_eq!(
        expect(report(&server, "sales", NODE, None, overflowed).await, 200),
        counts(2, 1, 1, 1, json!(33.3)),
        "an overflow is not in the service level"
    );
    // The same key for another outcome is refused, naming its first use.
    assert_eq!(
        expect(
            report(&server, "sales", NODE, Some("c-3"), &answered(1)).await,
            400
        ),
        json!({ "error": "invalid request id: `c-3` was used for queue.call_abandoned of queue:sales; send a new id for every new request" })
    );

    // ...and the status shows the day's counts at once, not the answer rendered before
    // them (no lock service here: waiting unknown).
    let (shown, _) = status_on(&mut website).await;
    assert_eq!(
        shown,
        status_unknown_waiting(&counts(2, 1, 1, 1, json!(33.3)))
    );

    // Unknown queues and bodies a node-agent got wrong: what is wrong and what to do.
    assert_eq!(
        expect(
            report(&server, "support", NODE, None, &answered(1)).await,
            404
        ),
        json!({ "error": "no queue `support`; list queues with GET /api/v1/queues" })
    );
    for (body, field, words) in [
        (
            r#"{"outcome":"hung_up","waited_ms":1}"#,
            "outcome",
            "unknown variant `hung_up`, expected one of `answered`, `abandoned`, `overflowed`",
        ),
        (
            r#"{"outcome":"answered","waited_ms":-1}"#,
            "waited_ms",
            "invalid value: integer `-1`",
        ),
        (
            r#"{"outcome":"answered"}"#,
            "body",
            "missing field `waited_ms`",
        ),
        (
            r#"{"outcome":"answered","waited_ms":1,"queue":"sales"}"#,
            "queue",
            "unknown field `queue`, expected `outcome` or `waited_ms`",
        ),
    ] {
        let error = expect(report(&server, "sales", NODE, None, body).await, 400);
        let error = error["error"].as_str().expect("an error");
        assert!(
            error.starts_with(&format!("invalid {field}: {words}")),
            "{body}: {error}"
        );
        assert!(error.contains("/api/v1/openapi.json"), "{error}");
    }
    let (after, _) = status(&server).await;
    assert_eq!(after, shown, "nothing refused was counted");
    server.stop().await;
}
