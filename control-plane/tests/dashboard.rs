//! The supervisors' page over real HTTP/1.1 against `run` on loopback: a token is
//! exchanged for a session cookie, the live feed is a server-sent event stream of
//! snapshots, and actions need the session's CSRF token and the API's role, writing their
//! audit rows under the token's name. (The page's own script runs in a real browser in
//! the root `tests/dashboard_browser.rs`.)

mod support;

use std::time::Duration;

use callfleet_core::config::Role;
use serde_json::{Value, json};
use support::{
    Answer, Server, audit_rows, connect_from, exchange, expect, feed_snapshot_where, put_agent,
    send_api, token,
};

const ADMIN: &str = "admin-dashboard-secret-0123456789ab";
const CRM: &str = "crm-dashboard-secret-0123456789abcd";
const WALLBOARD: &str = "wallboard-dashboard-secret-0123456";
const NODE: &str = "node-dashboard-secret-0123456789abc";

fn config() -> callfleet_core::config::ControlPlaneConfig {
    callfleet_core::config::ControlPlaneConfig {
        tokens: vec![
            token("ops", ADMIN, Role::Admin),
            token("crm", CRM, Role::Write),
            token("wallboard", WALLBOARD, Role::Read),
            token("node:pbx-1", NODE, Role::Node),
        ],
        ..Default::default()
    }
}

async fn request(server: &Server, request: String) -> Answer {
    let mut stream = connect_from("127.0.0.1", server.address).await;
    exchange(&mut stream, &request).await
}

fn post(path: &str, cookie: Option<&str>, csrf: Option<&str>, body: &str) -> String {
    let mut head =
        format!("POST {path} HTTP/1.1\r\nHost: cp\r\nContent-Type: application/json\r\n");
    if let Some(cookie) = cookie {
        head.push_str(&format!("Cookie: {cookie}\r\n"));
    }
    if let Some(csrf) = csrf {
        head.push_str(&format!("X-CSRF-Token: {csrf}\r\n"));
    }
    format!("{head}Content-Length: {}\r\n\r\n{body}", body.len())
}

/// Logs in with `secret`: the session cookie (`name=value`) and the answer.
async fn login(server: &Server, secret: &str) -> (String, Value) {
    let body = json!({ "token": secret }).to_string();
    let answer = request(server, post("/ui/login", None, None, &body)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let set_cookie = answer
        .header("set-cookie")
        .expect("a session cookie")
        .to_owned();
    let attributes: Vec<&str> = set_cookie.split("; ").collect();
    assert_eq!(
        attributes[1..],
        ["Path=/", "HttpOnly", "SameSite=Strict", "Max-Age=43200"],
        "{set_cookie}"
    );
    let cookie = attributes[0].to_owned();
    assert!(cookie.starts_with("callfleet_session="), "{cookie}");
    assert_eq!(cookie.len(), "callfleet_session=".len() + 48);
    (cookie, serde_json::from_str(&answer.body).expect("json"))
}

/// The first event of the live feed, as JSON.
async fn first_event(server: &Server, cookie: &str) -> Value {
    feed_snapshot_where(server, cookie, |_| true).await
}

#[tokio::test]
async fn a_token_becomes_a_session_whose_actions_need_its_role_and_csrf_token() {
    let server = Server::start(config(), CRM, "127.0.0.1").await;
    for agent in ["1001", "1002"] {
        put_agent(&server, CRM, agent).await;
    }

    let page = request(&server, "GET / HTTP/1.1\r\nHost: cp\r\n\r\n".to_owned()).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(page.header("cache-control"), Some("no-store"));
    assert!(page.body.contains("<title>callfleet</title>"));

    // A wrong token, and a node's token, get no session.
    let wrong = request(
        &server,
        post("/ui/login", None, None, r#"{"token":"nope"}"#),
    )
    .await;
    assert_eq!((wrong.status, wrong.header("set-cookie")), (401, None));
    let node = json!({ "token": NODE }).to_string();
    let node = request(&server, post("/ui/login", None, None, &node)).await;
    assert_eq!(
        (node.status, node.header("set-cookie")),
        (403, None),
        "{}",
        node.body
    );
    // Without a session: nothing.
    let anonymous = request(
        &server,
        "GET /ui/events HTTP/1.1\r\nHost: cp\r\n\r\n".to_owned(),
    )
    .await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);

    // A read session sees the board but may not pause anyone.
    let (reader, read_session) = login(&server, WALLBOARD).await;
    assert_eq!(
        (&read_session["name"], &read_session["role"]),
        (&json!("wallboard"), &json!("read"))
    );
    let csrf = read_session["csrf"].as_str().expect("csrf");
    let refused = request(
        &server,
        post("/ui/agents/1001/pause", Some(&reader), Some(csrf), "{}"),
    )
    .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    let snapshot = first_event(&server, &reader).await;
    let states: Vec<(&str, &str)> = snapshot["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .map(|a| {
            (
                a["id"].as_str().expect("id"),
                a["state"].as_str().expect("state"),
            )
        })
        .collect();
    assert_eq!(states, [("1001", "available"), ("1002", "available")]);
    assert_eq!(snapshot["queues"][0]["id"], "sales");

    // A write session: without its CSRF token (a cross-site form) nothing happens; with it
    // the pause is made, audited under the token's name, and on the next snapshot.
    let (writer, write_session) = login(&server, CRM).await;
    let csrf = write_session["csrf"].as_str().expect("csrf");
    let body = r#"{"reason":"coaching"}"#;
    let forged = request(
        &server,
        post("/ui/agents/1001/pause", Some(&writer), None, body),
    )
    .await;
    assert_eq!(forged.status, 403, "{}", forged.body);
    let other_csrf = read_session["csrf"].as_str().expect("csrf");
    let crossed = request(
        &server,
        post(
            "/ui/agents/1001/pause",
            Some(&writer),
            Some(other_csrf),
            body,
        ),
    )
    .await;
    assert_eq!(crossed.status, 403, "{}", crossed.body);
    let paused = request(
        &server,
        post("/ui/agents/1001/pause", Some(&writer), Some(csrf), body),
    )
    .await;
    assert_eq!(paused.status, 204, "{}", paused.body);
    let drain = request(
        &server,
        post("/ui/nodes/pbx-1/drain", Some(&writer), Some(csrf), ""),
    )
    .await;
    assert_eq!(
        drain.status, 403,
        "a write token may not drain: {}",
        drain.body
    );
    let audit = expect(
        send_api(&server, "GET", "/audit?limit=1", CRM, &[], None).await,
        200,
    );
    assert_eq!(audit_rows(&audit), [("crm", "agent.pause", "agent:1001")]);
    let snapshot = first_event(&server, &writer).await;
    let paused = snapshot["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .find(|a| a["id"] == "1001")
        .expect("1001");
    assert_eq!(
        (&paused["state"], &paused["pause_reason"]),
        (&json!("paused"), &json!("coaching"))
    );

    // An admin may drain (an unknown node is named in the error, as by the API).
    let (admin, admin_session) = login(&server, ADMIN).await;
    let csrf_admin = admin_session["csrf"].as_str().expect("csrf");
    let unknown = request(
        &server,
        post("/ui/nodes/pbx-9/drain", Some(&admin), Some(csrf_admin), ""),
    )
    .await;
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    assert!(unknown.body.contains("pbx-9"), "{}", unknown.body);

    // Logging out ends the session: its cookie no longer opens anything.
    let out = request(&server, post("/ui/logout", Some(&writer), Some(csrf), "")).await;
    assert_eq!(out.status, 204);
    assert_eq!(
        out.header("set-cookie"),
        Some("callfleet_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
    );
    let after = request(
        &server,
        format!("GET /ui/session HTTP/1.1\r\nHost: cp\r\nCookie: {writer}\r\n\r\n"),
    )
    .await;
    assert_eq!(after.status, 401, "{}", after.body);
    server.stop().await;
}

#[tokio::test]
async fn the_page_gets_nodes_history_queue_thresholds_and_time_in_state() {
    let mut config = config();
    config.queue_alerts.insert(
        "sales".to_owned(),
        callfleet_core::config::QueueAlert {
            waiting_warning: 2,
            waiting_critical: 4,
            wait_warning: Duration::from_secs(10),
            wait_critical: Duration::from_secs(25),
        },
    );
    let server = Server::start(config, CRM, "127.0.0.1").await;
    put_agent(&server, CRM, "1001").await;
    let store = server.store().await;
    for calls in [3, 4] {
        let beat = callfleet_core::testing::heartbeat("pbx-1", calls);
        store.heartbeat(&beat).await.expect("beat");
        store
            .record_sample(&beat, Duration::from_secs(3600))
            .await
            .expect("sample");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let history = |cookie: Option<&str>| {
        let cookie = cookie.map_or(String::new(), |c| format!("Cookie: {c}\r\n"));
        format!("GET /ui/history HTTP/1.1\r\nHost: cp\r\n{cookie}\r\n")
    };
    assert_eq!(request(&server, history(None)).await.status, 401);
    let (reader, _) = login(&server, WALLBOARD).await;
    let answer = request(&server, history(Some(&reader))).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.header("cache-control"), Some("no-store"));
    let history: Value = serde_json::from_str(&answer.body).expect("json");
    assert_eq!(history["window_ms"], 3 * 3600 * 1000);
    let nodes = history["nodes"].as_object().expect("nodes");
    assert_eq!(nodes.keys().collect::<Vec<_>>(), ["pbx-1"]);
    assert_eq!(nodes["pbx-1"]["calls"], json!([3, 4]));
    assert_eq!(nodes["pbx-1"]["load1"], json!([0.5, 0.5]));
    let ago: Vec<u64> = nodes["pbx-1"]["ago_ms"]
        .as_array()
        .expect("ages")
        .iter()
        .map(|a| a.as_u64().expect("ms"))
        .collect();
    assert!(
        ago.len() == 2 && ago[0] >= ago[1] + 5 && ago[0] < 5_000,
        "oldest first: {ago:?}"
    );

    let snapshot = first_event(&server, &reader).await;
    assert_eq!(
        snapshot["queues"][0]["alert"],
        json!({
            "waiting_warning": 2,
            "waiting_critical": 4,
            "wait_warning_ms": 10_000,
            "wait_critical_ms": 25_000,
        })
    );
    let agent = &snapshot["agents"][0];
    let since = agent["state_since_ms"].as_i64().expect("state_since_ms");
    let at = snapshot["at_ms"].as_i64().expect("at_ms");
    assert!(
        since > 0 && since <= at && at - since < 10_000,
        "available since it was made: {since} at {at}"
    );
    store.close().await;
    server.stop().await;
}
