//! The node-agent's agent events against the real control plane
//! (`callfleet_control_plane::run` on SQLite on a loopback port), written as `ring()`
//! writes them, on one [`EventLine`] per ring with a `node` token:
//!
//! - `ringing` shows in the agent's view with the ring's queue, without changing its state;
//! - `ring_ended` sent right behind it, without waiting, is written after it (the line
//!   keeps the order), so the agent ends not ringing;
//! - `answered` behind a `ringing` clears the ring too;
//! - each event is written once, with its audit row;
//! - an `ended` held up on its line (here by a control plane that is down) ends the
//!   wrap-up when the node's does, counted from when it was queued, not from its write.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::Method;
use callfleet_core::store::CallEvent;
use callfleet_node_agent::queue::events::{AgentEvents, EventAnswer};
use serde_json::{Value, json};
use support::{NODE, Plane, crm};

/// (state, ringing_since_ms is a number, ringing_queue) of `agent`.
async fn ring_of(plane: SocketAddr, agent: &str) -> (Value, bool, Value) {
    let view = crm(plane, Method::GET, &format!("/agents/{agent}"), None).await;
    (
        view["state"].clone(),
        view["ringing_since_ms"].is_i64(),
        view["ringing_queue"].clone(),
    )
}

#[tokio::test]
async fn a_ring_line_writes_ringing_then_what_ended_it_in_order() {
    let control = Plane::run().await;
    let plane = control.address;
    for agent in ["1001", "1002"] {
        let body = json!({ "name": format!("agent {agent}") });
        crm(plane, Method::PUT, &format!("/agents/{agent}"), Some(body)).await;
    }
    let events = AgentEvents::new(
        &format!("http://{plane}"),
        NODE,
        "pbx-1",
        Duration::from_secs(2),
    )
    .expect("events");
    let ringing = || CallEvent::Ringing {
        queue: "sales".into(),
    };

    // A ring the caller left: ringing, then ring_ended queued at once behind it.
    let line = events.line("1001", "1-7");
    let rung = line.send(ringing());
    let ended = line.send(CallEvent::RingEnded);
    assert_eq!(ended.await.expect("line"), Ok(EventAnswer::default()));
    assert_eq!(rung.await.expect("line"), Ok(EventAnswer::default()));
    assert_eq!(
        ring_of(plane, "1001").await,
        (json!("available"), false, Value::Null)
    );

    // A ring that is answered: shown while it rings, cleared by the answer.
    let line = events.line("1002", "2-7");
    line.send(ringing()).await.expect("line").expect("written");
    assert_eq!(
        ring_of(plane, "1002").await,
        (json!("available"), true, json!("sales"))
    );
    let answered = line.send(CallEvent::Answered {
        queue: "sales".into(),
    });
    answered.await.expect("line").expect("written");
    assert_eq!(
        ring_of(plane, "1002").await,
        (json!("on_call"), false, Value::Null)
    );

    let audit = crm(plane, Method::GET, "/audit?limit=4", None).await;
    let rows: Vec<(&str, &str, &str)> = audit
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
        .collect();
    assert_eq!(
        rows,
        [
            ("node:pbx-1", "agent.call_answered", "agent:1002"),
            ("node:pbx-1", "agent.call_ringing", "agent:1002"),
            ("node:pbx-1", "agent.ring_ended", "agent:1001"),
            ("node:pbx-1", "agent.call_ringing", "agent:1001"),
        ]
    );
    control.stop().await;
}

fn epoch_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970");
    i64::try_from(since.as_millis()).expect("ms fit")
}

#[tokio::test]
async fn an_ended_held_up_on_its_line_ends_the_wrap_up_counted_from_the_hangup() {
    const WRAP_UP_MS: i64 = 3_000;
    const DOWN: Duration = Duration::from_millis(1_500);
    let control = Plane::run().await;
    let plane = control.address;
    let body = json!({ "name": "agent 1001" });
    crm(plane, Method::PUT, "/agents/1001", Some(body)).await;
    let (dir, address) = control.stop().await;

    let events = AgentEvents::new(
        &format!("http://{address}"),
        NODE,
        "pbx-1",
        Duration::from_secs(2),
    )
    .expect("events");
    let line = events.line("1001", "1-8");
    drop(line.send(CallEvent::Answered {
        queue: "sales".into(),
    }));
    let hung_up_ms = epoch_ms();
    let ended = line.send(CallEvent::Ended {
        wrap_up: Duration::from_millis(WRAP_UP_MS as u64),
    });
    // Both wait for the control plane; it comes back on the same address and store.
    tokio::time::sleep(DOWN).await;
    let control = Plane::run_in(dir, &address.to_string()).await;
    let answer = ended.await.expect("line").expect("written");
    let written_ms = epoch_ms();
    let until_ms = answer.until_ms.expect("ended answers until_ms");
    // Counted from the write it would end at least DOWN late; counted from the hangup it
    // ends no earlier than the hangup's wrap-up (the time left was sent after it) and
    // later only by the write's own way to the store (a few ms of rounding either way:
    // the time left is measured on the monotonic clock, the end on the store's).
    assert!(
        written_ms - hung_up_ms >= DOWN.as_millis() as i64,
        "the control plane was down"
    );
    let late_ms = until_ms - (hung_up_ms + WRAP_UP_MS);
    assert!(
        (-5..500).contains(&late_ms),
        "the wrap-up ends {late_ms} ms after the node's (until_ms {until_ms}, hangup {hung_up_ms})"
    );
    control.stop().await;
}
