//! `GET /metrics` of the control plane, served by `run` on loopback: requests are counted
//! by their route's pattern (never the agent id in the path), method and status; the queue
//! and agent figures come from the directory as last read. One test in this binary: the
//! recorder is the process's.

mod support;

use serde_json::json;
use support::{
    Server, connect_from, crm_token, exchange, expect, json_request, put_agent, send_api,
};

const CRM: &str = "crm-metrics-secret-0123456789abcdef";

/// The value of the series `series` (name and labels, as rendered) in `text`.
fn value_of(text: &str, series: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(str::to_owned)
}

#[tokio::test]
async fn requests_queues_and_agents_are_scraped() {
    let config = callfleet_core::config::ControlPlaneConfig {
        tokens: vec![crm_token(CRM)],
        ..Default::default()
    };
    let server = Server::start(config, CRM, "127.0.0.1").await;
    for (agent, paused) in [("1001", false), ("1002", true), ("1003", false)] {
        put_agent(&server, CRM, agent).await;
        if agent != "1003" {
            let member = json!({ "priority": 1 });
            let path = format!("/queues/sales/members/{agent}");
            expect(
                send_api(&server, "PUT", &path, CRM, &[], Some(member)).await,
                200,
            );
        }
        if paused {
            let path = format!("/api/v1/agents/{agent}/pause");
            let request = json_request("POST", &path, CRM, &[], r#"{"reason":"lunch"}"#);
            let mut stream = connect_from("127.0.0.1", server.address).await;
            assert_eq!(exchange(&mut stream, &request).await.status, 204);
        }
    }
    let missing = send_api(&server, "GET", "/agents/9999", CRM, &[], None).await;
    assert_eq!(missing.status, 404);

    let mut stream = connect_from("127.0.0.1", server.address).await;
    let answer = exchange(
        &mut stream,
        "GET /metrics HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("content-type"),
        Some(callfleet_core::metrics::CONTENT_TYPE)
    );
    let text = answer.body;
    let requests = |route: &str, method: &str, status: &str| {
        value_of(
            &text,
            &format!(
                "callfleet_control_plane_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}}"
            ),
        )
    };
    // Server::start created the queue: one PUT of the queue.
    assert_eq!(
        requests("/api/v1/queues/{queue}", "PUT", "200").as_deref(),
        Some("1")
    );
    assert_eq!(
        requests("/api/v1/agents/{agent}", "PUT", "200").as_deref(),
        Some("3")
    );
    assert_eq!(
        requests("/api/v1/queues/{queue}/members/{agent}", "PUT", "200").as_deref(),
        Some("2")
    );
    assert_eq!(
        requests("/api/v1/agents/{agent}/pause", "POST", "204").as_deref(),
        Some("1")
    );
    assert_eq!(
        requests("/api/v1/agents/{agent}", "GET", "404").as_deref(),
        Some("1")
    );
    assert!(
        !text.contains("1001"),
        "an agent id became a label:\n{text}"
    );
    assert_eq!(
        value_of(
            &text,
            "callfleet_control_plane_request_duration_seconds_count{route=\"/api/v1/agents/{agent}\"}"
        )
        .as_deref(),
        Some("4")
    );

    let agents = |state: &str| value_of(&text, &format!("callfleet_agents{{state=\"{state}\"}}"));
    assert_eq!(agents("available").as_deref(), Some("2"));
    assert_eq!(agents("paused").as_deref(), Some("1"));
    assert_eq!(agents("on_call").as_deref(), Some("0"));
    let members = |state: &str| {
        value_of(
            &text,
            &format!("callfleet_queue_agents{{queue=\"sales\",state=\"{state}\"}}"),
        )
    };
    assert_eq!(members("available").as_deref(), Some("1"));
    assert_eq!(members("paused").as_deref(), Some("1"));
    assert_eq!(members("ringing").as_deref(), Some("0"));
    // No lock service configured: how many wait is unknown, not 0.
    assert_eq!(
        value_of(&text, "callfleet_queue_waiting{queue=\"sales\"}").as_deref(),
        Some("NaN")
    );
    assert_eq!(
        value_of(&text, "callfleet_queue_answered_today{queue=\"sales\"}").as_deref(),
        Some("0")
    );
    server.stop().await;
}
