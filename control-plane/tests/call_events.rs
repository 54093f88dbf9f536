//! What a node-agent writes when it rings agents for queued calls (issue 16), sent as it
//! sends it: `POST /api/v1/agents/{agent}/call-events` over HTTP/1.1 to the whole service
//! (`callfleet_control_plane::run` on SQLite) on a loopback port.
//!
//! - a `node` token reports answered, ended and missed, and the queue's candidates (what
//!   every node rings by) follow at once: an agent on a call or in wrap-up is not rung, one
//!   whose call ended without wrap-up is rung again, one paused for misses is not;
//! - a CRM's `write` token and a wallboard's `read` token are refused with 403 and change
//!   nothing: a CRM that could report calls could skew the ring order;
//! - a report sent again with its `Idempotency-Key` (its answer lost) counts once;
//! - a ring (`ringing`) shows in the agent's view and the list, without changing its state
//!   or the candidates, until `answered` or `ring_ended` (or `missed`, `ended`) clears it;
//! - a wrong body is a 400 that names the field and what to send.

mod support;

use callfleet_core::config::ControlPlaneConfig;
use serde_json::{Value, json};
use support::{
    REST_STATUS, Reply, Server, audit_rows, connect_from, crm_wallboard_node_config, exchange,
    expect, send_api,
};

/// Write token of a CRM, named `crm`.
const CRM: &str = "crm-call-events-secret-0123456789";
/// Read token of a wallboard, named `wallboard`.
const WALLBOARD: &str = "wallboard-call-events-secret-0123";
/// Node token of a node-agent, named `node:pbx-1`.
const NODE: &str = "node-pbx-1-call-events-secret-0123";

fn config() -> ControlPlaneConfig {
    crm_wallboard_node_config(CRM, WALLBOARD, NODE)
}

/// Posts a call event of `agent` with `token` (and an Idempotency-Key, if any).
async fn report(
    server: &Server,
    agent: &str,
    token: &str,
    key: Option<&str>,
    event: Value,
) -> Reply {
    let headers: Vec<(&str, &str)> = key.map(|k| ("Idempotency-Key", k)).into_iter().collect();
    send_api(
        server,
        "POST",
        &format!("/agents/{agent}/call-events"),
        token,
        &headers,
        Some(event),
    )
    .await
}

/// Posts a call event of `agent` with the node's token (and an Idempotency-Key, if any);
/// panics unless the answer is `status`, and returns its JSON.
async fn node_report(
    server: &Server,
    agent: &str,
    key: Option<&str>,
    event: Value,
    status: u16,
) -> Value {
    expect(report(server, agent, NODE, key, event).await, status)
}

/// The `ended` event of a call with `wrap_up_ms` of wrap-up.
fn ended(wrap_up_ms: u64) -> Value {
    json!({ "event": "ended", "wrap_up_ms": wrap_up_ms })
}

/// The agents `sales` rings now, best first, as the node-agent reads them.
async fn candidates(server: &Server) -> Vec<String> {
    let reply = expect(
        send_api(server, "GET", "/queues/sales/candidates", NODE, &[], None).await,
        200,
    );
    reply["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .map(|c| c["agent"].as_str().expect("agent").to_owned())
        .collect()
}

/// The public status of `sales`: (served, available agents, logged-in agents).
async fn status(server: &Server) -> (bool, u64, u64) {
    let mut stream = connect_from("127.0.0.1", server.address).await;
    let answer = exchange(&mut stream, REST_STATUS).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let json: Value = serde_json::from_str(&answer.body).expect("JSON");
    (
        json["served"].as_bool().expect("served"),
        json["available_agents"].as_u64().expect("available"),
        json["logged_in_agents"].as_u64().expect("logged in"),
    )
}

/// The server with agents 1001 (priority 1) and 1002 (priority 2) of `sales`, logged in on
/// 2001 and 2002.
async fn start() -> Server {
    let server = Server::start(config(), CRM, "127.0.0.1").await;
    for (agent, name, device, priority) in
        [("1001", "Alice", "2001", 1), ("1002", "Bob", "2002", 2)]
    {
        let put = |path: String, body: Value| {
            let server = &server;
            async move {
                expect(
                    send_api(server, "PUT", &path, CRM, &[], Some(body)).await,
                    200,
                )
            }
        };
        put(
            format!("/devices/{device}"),
            json!({ "endpoint": format!("PJSIP/{device}") }),
        )
        .await;
        put(format!("/agents/{agent}"), json!({ "name": name })).await;
        put(
            format!("/queues/sales/members/{agent}"),
            json!({ "priority": priority }),
        )
        .await;
        let login = send_api(
            &server,
            "POST",
            &format!("/agents/{agent}/login"),
            CRM,
            &[],
            Some(json!({ "device": device })),
        )
        .await;
        expect(login, 200);
    }
    server
}

#[tokio::test]
async fn a_node_reports_its_calls_and_the_candidates_follow() {
    let server = start().await;
    assert_eq!(candidates(&server).await, ["1001", "1002"]);
    assert_eq!(status(&server).await, (true, 2, 2));

    // A CRM and a wallboard may not report calls; nothing changes.
    let answered = json!({ "event": "answered", "queue": "sales" });
    for (token, error) in [
        (
            CRM,
            "token `crm` has role Write; this operation needs Node or above",
        ),
        (
            WALLBOARD,
            "token `wallboard` has role Read; this operation needs Node or above",
        ),
    ] {
        let refused = expect(
            report(&server, "1001", token, None, answered.clone()).await,
            403,
        );
        assert_eq!(refused, json!({ "error": error }));
    }
    assert_eq!(candidates(&server).await, ["1001", "1002"]);

    // Alice answers: on a call, no longer rung.
    let reply = node_report(&server, "1001", None, answered.clone(), 200).await;
    assert_eq!(reply, json!({ "agent": "1001", "calls_today": 1 }));
    assert_eq!(candidates(&server).await, ["1002"]);
    let alice = expect(
        send_api(&server, "GET", "/agents/1001", CRM, &[], None).await,
        200,
    );
    assert_eq!(
        (
            &alice["state"],
            &alice["calls_today"],
            &alice["missed_today"]
        ),
        (&json!("on_call"), &json!(1), &json!(0))
    );

    // Her call ends without wrap-up: rung again at once.
    let reply = node_report(&server, "1001", None, ended(0), 200).await;
    assert_eq!(reply, json!({ "agent": "1001", "state": "available" }));
    assert_eq!(candidates(&server).await, ["1001", "1002"]);

    // Bob misses twice against a limit of 2; the first report is sent twice (its answer
    // lost) and counts once.
    let miss = json!({ "event": "missed", "queue": "sales", "max_misses": 2 });
    for _ in 0..2 {
        let reply = node_report(
            &server,
            "1002",
            Some("pbx-1-call-7-miss"),
            miss.clone(),
            200,
        )
        .await;
        assert_eq!(
            reply,
            json!({ "agent": "1002", "missed_today": 1, "misses_in_row": 1, "paused": false })
        );
    }
    assert_eq!(candidates(&server).await, ["1001", "1002"]);
    let reply = node_report(
        &server,
        "1002",
        Some("pbx-1-call-8-miss"),
        miss.clone(),
        200,
    )
    .await;
    assert_eq!(
        reply,
        json!({ "agent": "1002", "missed_today": 2, "misses_in_row": 0, "paused": true })
    );
    assert_eq!(candidates(&server).await, ["1001"]);
    let bob = expect(
        send_api(&server, "GET", "/agents/1002", CRM, &[], None).await,
        200,
    );
    assert_eq!(
        (&bob["state"], &bob["pause_reason"], &bob["missed_today"]),
        (&json!("paused"), &json!("missed"), &json!(2))
    );

    // Alice's next call ends with a minute of wrap-up: nobody is rung.
    node_report(&server, "1001", None, answered, 200).await;
    let reply = node_report(&server, "1001", None, ended(60_000), 200).await;
    assert_eq!(reply["state"], "wrap_up");
    assert!(reply["until_ms"].is_i64(), "{reply}");
    assert_eq!(candidates(&server).await, Vec::<String>::new());
    // And the website is told so.
    assert_eq!(status(&server).await, (false, 0, 2));
    // A node looking a minute ahead sees her, with the end of her wrap-up; a second ahead,
    // not yet; further than a minute is refused.
    let until_ms = reply["until_ms"].as_u64().expect("until_ms");
    let ahead = |within_ms: u64| {
        let server = &server;
        async move {
            send_api(
                server,
                "GET",
                &format!("/queues/sales/candidates?within_ms={within_ms}"),
                NODE,
                &[],
                None,
            )
            .await
        }
    };
    assert_eq!(
        expect(ahead(60_000).await, 200)["candidates"],
        json!([{ "agent": "1001", "endpoint": "PJSIP/2001", "priority": 1, "demoted": false, "free_at_ms": until_ms }])
    );
    assert_eq!(expect(ahead(1_000).await, 200)["candidates"], json!([]));
    assert_eq!(
        expect(ahead(60_001).await, 400),
        json!({ "error": "invalid within_ms: 60001 ms; at most 60000 ms (a node caches its candidates for about a second)" })
    );

    // The audit log names the node for every report, and a retry wrote nothing.
    let audit = expect(
        send_api(&server, "GET", "/audit?limit=7", CRM, &[], None).await,
        200,
    );
    let rows = audit_rows(&audit);
    assert_eq!(
        rows,
        [
            ("node:pbx-1", "agent.call_ended", "agent:1001"),
            ("node:pbx-1", "agent.call_answered", "agent:1001"),
            ("node:pbx-1", "agent.call_missed", "agent:1002"),
            ("node:pbx-1", "agent.call_missed", "agent:1002"),
            ("node:pbx-1", "agent.call_ended", "agent:1001"),
            ("node:pbx-1", "agent.call_answered", "agent:1001"),
            ("crm", "agent.login", "agent:1002"),
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn a_wrong_call_event_names_the_field_and_what_to_send() {
    let server = start().await;
    let cases = [
        (
            json!({ "event": "answered" }),
            "invalid queue: the `answered` event needs queue, e.g. \"queue\": \"sales\"",
        ),
        (
            json!({ "event": "ended", "wrap_up_ms": 0, "queue": "sales" }),
            "invalid queue: the `ended` event takes no queue; send wrap_up_ms only",
        ),
        (
            json!({ "event": "missed", "queue": "sales" }),
            "invalid max_misses: the `missed` event needs max_misses, e.g. \"max_misses\": 3",
        ),
        (
            json!({ "event": "missed", "queue": "sales", "max_misses": 0 }),
            "invalid max_misses: must be at least 1 (1 pauses the agent at their first miss)",
        ),
        (
            json!({ "event": "ended", "wrap_up_ms": 86_400_001 }),
            "invalid wrap_up_ms: 86400001 ms is longer than a day; send at most 86400000 (0: available at once)",
        ),
        (
            json!({ "event": "ringing" }),
            "invalid queue: the `ringing` event needs queue, e.g. \"queue\": \"sales\"",
        ),
        (
            json!({ "event": "ringing", "queue": "sales", "wrap_up_ms": 0 }),
            "invalid wrap_up_ms: the `ringing` event takes no wrap_up_ms; send queue only",
        ),
        (
            json!({ "event": "ringing", "queue": "sa les" }),
            "invalid queue id: `sa les` may only contain ASCII letters, digits, '-', '_' and '.'",
        ),
        (
            json!({ "event": "ring_ended", "queue": "sales" }),
            "invalid queue: the `ring_ended` event takes no queue; send the event alone",
        ),
        (
            json!({ "event": "ring_ended", "max_misses": 3 }),
            "invalid max_misses: the `ring_ended` event takes no max_misses; send the event alone",
        ),
    ];
    for (body, error) in cases {
        let reply = node_report(&server, "1001", None, body.clone(), 400).await;
        assert_eq!(reply, json!({ "error": error }), "{body}");
    }
    // What serde refuses names the field too, and says where the body is described.
    let hint = "send a JSON object as the OpenAPI document at /api/v1/openapi.json describes";
    for (body, error) in [
        (
            json!({ "event": "hung_up", "queue": "sales" }),
            "invalid event: unknown variant `hung_up`, expected one of `ringing`, `answered`, `ended`, `missed`, `ring_ended` at line 1 column 18",
        ),
        (
            json!({ "event": "ended", "wrap_up_ms": -1 }),
            "invalid wrap_up_ms: invalid value: integer `-1`, expected u64 at line 1 column 32",
        ),
        (
            json!({ "event": "ended", "wrap_up_ms": 0, "wrap_up": 5 }),
            "invalid wrap_up: unknown field `wrap_up`, expected one of `event`, `queue`, `wrap_up_ms`, `max_misses` at line 1 column 26",
        ),
    ] {
        let reply = node_report(&server, "1001", None, body.clone(), 400).await;
        assert_eq!(
            reply,
            json!({ "error": format!("{error}; {hint}") }),
            "{body}"
        );
    }
    let reply = node_report(
        &server,
        "1009",
        None,
        json!({ "event": "answered", "queue": "sales" }),
        404,
    )
    .await;
    assert_eq!(
        reply,
        json!({ "error": "no agent `1009`; list agents with GET /api/v1/agents" })
    );
    // A key sent again with another report is refused, naming its first use.
    let key = Some("pbx-1-call-9");
    let answered = json!({ "event": "answered", "queue": "sales" });
    node_report(&server, "1001", key, answered, 200).await;
    let reply = node_report(&server, "1001", key, ended(0), 400).await;
    assert_eq!(
        reply,
        json!({ "error": "invalid request id: `pbx-1-call-9` was used for agent.call_answered of agent:1001; send a new id for every new request" })
    );
    // None of it changed the agents.
    assert_eq!(candidates(&server).await, ["1002"]);
    server.stop().await;
}

/// `agent`'s view as `GET /agents/{agent}` (read from the store) and the list (from
/// memory) show it: (state, ringing_since_ms, ringing_queue); panics unless they agree.
async fn ring_view(server: &Server, agent: &str) -> (Value, Value, Value) {
    let one = expect(
        send_api(
            server,
            "GET",
            &format!("/agents/{agent}"),
            WALLBOARD,
            &[],
            None,
        )
        .await,
        200,
    );
    let list = expect(
        send_api(server, "GET", "/agents", WALLBOARD, &[], None).await,
        200,
    );
    let listed = list
        .as_array()
        .expect("agents")
        .iter()
        .find(|a| a["id"] == agent)
        .expect("listed")
        .clone();
    let fields = |view: &Value| {
        (
            view["state"].clone(),
            view["ringing_since_ms"].clone(),
            view["ringing_queue"].clone(),
        )
    };
    assert_eq!(fields(&one), fields(&listed), "{one} / {listed}");
    fields(&one)
}

#[tokio::test]
async fn a_ring_shows_in_the_agent_s_view_until_what_ends_it() {
    let server = start().await;
    let not_ringing = |state: &str| (json!(state), Value::Null, Value::Null);
    assert_eq!(ring_view(&server, "1001").await, not_ringing("available"));

    // A CRM and a wallboard may not report rings either.
    let ringing = json!({ "event": "ringing", "queue": "sales" });
    for token in [CRM, WALLBOARD] {
        for event in [ringing.clone(), json!({ "event": "ring_ended" })] {
            expect(report(&server, "1001", token, None, event).await, 403);
        }
    }
    assert_eq!(ring_view(&server, "1001").await, not_ringing("available"));

    // Alice is rung: shown with the ring's start, still available to routing (her lease
    // keeps other nodes off), the candidates unchanged. A retry answers the same ring.
    let key = Some("pbx-1-ring-1-ringing");
    let reply = node_report(&server, "1001", key, ringing.clone(), 200).await;
    let since = reply["ringing_since_ms"]
        .as_i64()
        .expect("ringing_since_ms");
    assert_eq!(reply, json!({ "agent": "1001", "ringing_since_ms": since }));
    assert_eq!(
        node_report(&server, "1001", key, ringing.clone(), 200).await,
        reply
    );
    assert_eq!(
        ring_view(&server, "1001").await,
        (json!("available"), json!(since), json!("sales"))
    );
    assert_eq!(ring_view(&server, "1002").await, not_ringing("available"));
    assert_eq!(candidates(&server).await, ["1001", "1002"]);

    // She answers: on a call, the ring cleared.
    let answered = json!({ "event": "answered", "queue": "sales" });
    node_report(&server, "1001", None, answered, 200).await;
    assert_eq!(ring_view(&server, "1001").await, not_ringing("on_call"));

    // Bob is rung and the caller hangs up: the ring ends, nothing is counted.
    let reply = node_report(&server, "1002", None, ringing.clone(), 200).await;
    assert_eq!(
        ring_view(&server, "1002").await,
        (
            json!("available"),
            reply["ringing_since_ms"].clone(),
            json!("sales")
        )
    );
    let reply = node_report(&server, "1002", None, json!({ "event": "ring_ended" }), 200).await;
    assert_eq!(reply, json!({ "agent": "1002", "ringing_since_ms": null }));
    assert_eq!(ring_view(&server, "1002").await, not_ringing("available"));
    let bob = expect(
        send_api(&server, "GET", "/agents/1002", CRM, &[], None).await,
        200,
    );
    assert_eq!(
        (&bob["calls_today"], &bob["missed_today"]),
        (&json!(0), &json!(0))
    );
    assert_eq!(candidates(&server).await, ["1002"]);

    // Bob is rung again and misses: the miss clears the ring.
    node_report(&server, "1002", None, ringing, 200).await;
    let miss = json!({ "event": "missed", "queue": "sales", "max_misses": 3 });
    node_report(&server, "1002", None, miss, 200).await;
    assert_eq!(ring_view(&server, "1002").await, not_ringing("available"));

    // Each report has its audit row, the retry none.
    let audit = expect(
        send_api(&server, "GET", "/audit?limit=6", CRM, &[], None).await,
        200,
    );
    let rows: Vec<(&str, &str)> = audit_rows(&audit)
        .into_iter()
        .map(|(_, action, subject)| (action, subject))
        .collect();
    assert_eq!(
        rows,
        [
            ("agent.call_missed", "agent:1002"),
            ("agent.call_ringing", "agent:1002"),
            ("agent.ring_ended", "agent:1002"),
            ("agent.call_ringing", "agent:1002"),
            ("agent.call_answered", "agent:1001"),
            ("agent.call_ringing", "agent:1001"),
        ]
    );
    server.stop().await;
}
