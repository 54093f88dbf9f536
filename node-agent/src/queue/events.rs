//! What happened to an agent's ring, written to the control plane (step 9 of
//! `docs/queued-calls.md`), so every node's routing sees it on its next ring.
//!
//! The events of one ring go out in order on one [`EventLine`]: `ended` must never reach
//! the control plane before the `answered` it closes, or the agent would stay on a call
//! for ever, nor `ring_ended` before the `ringing` it ends, or supervisors would see the
//! agent rung long after. Each event is retried with the same `Idempotency-Key` until the control plane
//! answers, so a retry after a lost answer counts once; the call flow never waits for a
//! write unless it needs the answer (a miss that paused the agent).
//!
//! ```text
//! ring ─EventLine::send(ringing | answered | ended | missed | ring_ended)─▶ one task per ring ─POST /api/v1/agents/{agent}/call-events─▶ control plane
//! call ─queue_outcome(answered | abandoned | overflowed)─▶ a task ─POST /api/v1/queues/{queue}/call-outcomes─▶ control plane
//! ```

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use callfleet_core::store::{CallEvent, CallOutcome};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::provisioning::ProvisioningError;
use crate::provisioning::upstream::Upstream;

/// Pauses between the first attempts of an event; after them, [`RETRY_EVERY`].
const BACKOFF: [Duration; 4] = [
    Duration::from_millis(200),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// Pause between later attempts.
const RETRY_EVERY: Duration = Duration::from_secs(5);

/// How long an event is retried. An `ended` lost to a control-plane outage would leave
/// the agent "on a call" in every node's routing for good, so it is retried through any
/// outage an operator would sit out.
const RETRY_FOR: Duration = Duration::from_secs(600);

/// The name of `event` as the control plane reads it, also part of its idempotency key.
fn event_name(event: &CallEvent) -> &'static str {
    match event {
        CallEvent::Answered { .. } => "answered",
        CallEvent::Ended { .. } => "ended",
        CallEvent::Missed { .. } => "missed",
        CallEvent::Ringing { .. } => "ringing",
        CallEvent::RingEnded => "ring_ended",
    }
}

/// The body of `POST /api/v1/agents/{agent}/call-events` for `event`.
fn event_body(event: &CallEvent) -> serde_json::Value {
    match event {
        CallEvent::Answered { queue } => json!({ "event": "answered", "queue": queue }),
        CallEvent::Ended { wrap_up } => json!({
            "event": "ended",
            "wrap_up_ms": u64::try_from(wrap_up.as_millis()).unwrap_or(u64::MAX),
        }),
        CallEvent::Missed { queue, max_misses } => json!({
            "event": "missed",
            "queue": queue,
            "max_misses": max_misses,
        }),
        CallEvent::Ringing { queue } => json!({ "event": "ringing", "queue": queue }),
        CallEvent::RingEnded => json!({ "event": "ring_ended" }),
    }
}

/// What the control plane answered to an event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct EventAnswer {
    /// For a miss: whether it paused the agent.
    #[serde(default)]
    pub paused: bool,
    /// For `ended`: when the control plane ends the agent's wrap-up (Unix epoch ms, its
    /// store's clock).
    #[serde(default)]
    pub until_ms: Option<i64>,
}

/// Why an event was not written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The control plane refused it (4xx): retrying cannot help.
    #[error("the control plane refused the {event} event of {subject}: {status} {body}")]
    Refused {
        /// The event's name.
        event: &'static str,
        /// The agent or queue.
        subject: String,
        /// The status answered.
        status: StatusCode,
        /// The answer's text.
        body: String,
    },
    /// Every attempt failed; the agent's state in the control plane is behind.
    #[error("the {event} event of {subject} was not written after {attempts} attempts: {last}")]
    Unwritten {
        /// The event's name.
        event: &'static str,
        /// The agent or queue.
        subject: String,
        /// Attempts made.
        attempts: usize,
        /// The last failure.
        last: String,
    },
}

/// The writer of agents' events to one control plane.
#[derive(Debug, Clone)]
pub struct AgentEvents {
    upstream: Arc<Upstream>,
    deadline: Duration,
    /// Part of every idempotency key: two nodes' rings never share one.
    node: String,
}

impl AgentEvents {
    /// A writer to the control plane at `control_plane` (`http://host:port`) with `token`
    /// (role `node`); each attempt waits at most `deadline`.
    pub fn new(
        control_plane: &str,
        token: &str,
        node: &str,
        deadline: Duration,
    ) -> Result<Self, ProvisioningError> {
        Ok(Self {
            upstream: Arc::new(Upstream::new(control_plane, token, deadline)?),
            deadline,
            node: node.to_owned(),
        })
    }

    /// Opens the line of one ring of `agent`, identified by `ring` (unique on this node
    /// for as long as the control plane remembers requests).
    pub fn line(&self, agent: &str, ring: &str) -> EventLine {
        let (sender, mut receiver) = mpsc::unbounded_channel::<Queued>();
        let events = self.clone();
        let agent = agent.to_owned();
        let ring = ring.to_owned();
        tokio::spawn(async move {
            while let Some((mut event, queued_at, answer)) = receiver.recv().await {
                // The wrap-up runs from the call's end, not from when the control plane
                // hears of it: what is left of it when the write goes out. A retry sends
                // the same, so the control plane's end is never earlier than the node's.
                if let CallEvent::Ended { wrap_up } = &mut event {
                    *wrap_up = wrap_up.saturating_sub(queued_at.elapsed());
                }
                let written = events.write(&agent, &ring, &event).await;
                if let Err(err) = &written {
                    tracing::warn!(%agent, error = %err, "agent state not written to the control plane");
                }
                let _ = answer.send(written);
            }
        });
        EventLine { sender }
    }

    async fn write(
        &self,
        agent: &str,
        ring: &str,
        event: &CallEvent,
    ) -> Result<EventAnswer, EventError> {
        let path = format!("/api/v1/agents/{agent}/call-events");
        let name = event_name(event);
        let key = self.idempotency_key(agent, ring, name);
        self.post(&path, &key, event_body(event), name, agent).await
    }

    /// Counts how a queued call ended in `queue`'s figures, in the background (retried
    /// like an event; a retry counts once). `caller` is the waiter id, unique per call.
    pub fn queue_outcome(&self, queue: &str, caller: &str, outcome: CallOutcome, waited: Duration) {
        let events = self.clone();
        let path = format!("/api/v1/queues/{queue}/call-outcomes");
        let key = self.idempotency_key(queue, caller, outcome.as_str());
        let body = json!({
            "outcome": outcome.as_str(),
            "waited_ms": u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
        });
        let queue = queue.to_owned();
        tokio::spawn(async move {
            if let Err(err) = events
                .post(&path, &key, body, outcome.as_str(), &queue)
                .await
            {
                tracing::warn!(%queue, error = %err, "queue figure not written to the control plane");
            }
        });
    }

    /// POSTs `body` to `path` until the control plane answers, with `key` as the
    /// `Idempotency-Key` of every attempt. `event` and `subject` name it in errors.
    async fn post(
        &self,
        path: &str,
        key: &str,
        body: serde_json::Value,
        event: &'static str,
        subject: &str,
    ) -> Result<EventAnswer, EventError> {
        let body = Bytes::from(body.to_string());
        let mut last = String::new();
        let started = Instant::now();
        let mut attempts = 0;
        while attempts == 0 || started.elapsed() < RETRY_FOR {
            if attempts > 0 {
                tokio::time::sleep(BACKOFF.get(attempts - 1).copied().unwrap_or(RETRY_EVERY)).await;
            }
            attempts += 1;
            let deadline_at = Instant::now() + self.deadline;
            match self
                .upstream
                .post_json(path, body.clone(), key, deadline_at)
                .await
            {
                Ok((StatusCode::OK, answer)) => {
                    return Ok(serde_json::from_slice(&answer).unwrap_or_default());
                }
                Ok((status, answer)) if status.is_client_error() => {
                    return Err(EventError::Refused {
                        event,
                        subject: subject.to_owned(),
                        status,
                        body: String::from_utf8_lossy(&answer).into_owned(),
                    });
                }
                Ok((status, _)) => last = format!("status {status}"),
                Err(failure) => last = failure.to_string(),
            }
        }
        Err(EventError::Unwritten {
            event,
            subject: subject.to_owned(),
            attempts,
            last,
        })
    }

    /// At most 64 printable characters, as the control plane takes them, whatever the
    /// lengths of node, agent and ring ids.
    fn idempotency_key(&self, agent: &str, ring: &str, event: &str) -> String {
        let mut hasher = DefaultHasher::new();
        (&self.node, agent, ring).hash(&mut hasher);
        format!("ring-{:016x}-{event}", hasher.finish())
    }
}

type Queued = (
    CallEvent,
    Instant,
    oneshot::Sender<Result<EventAnswer, EventError>>,
);

/// The events of one ring, written in the order sent.
#[derive(Debug, Clone)]
pub struct EventLine {
    sender: mpsc::UnboundedSender<Queued>,
}

impl EventLine {
    /// Queues `event` after the ones sent before; await the receiver for its answer, or
    /// drop it.
    pub fn send(&self, event: CallEvent) -> oneshot::Receiver<Result<EventAnswer, EventError>> {
        let (answer, receiver) = oneshot::channel();
        // The line's task lives as long as a sender does.
        let _ = self.sender.send((event, Instant::now(), answer));
        receiver
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_fit_the_control_plane_and_differ_per_event_and_ring() {
        let events = AgentEvents::new(
            "http://127.0.0.1:1",
            "t",
            &"n".repeat(200),
            Duration::from_secs(1),
        )
        .expect("client");
        let long_agent = "a".repeat(300);
        let key = events.idempotency_key(&long_agent, "r1", "answered");
        assert_eq!(key.len(), "ring-".len() + 16 + "-answered".len());
        assert!(key.bytes().all(|b| b.is_ascii_graphic()));
        assert_eq!(key, events.idempotency_key(&long_agent, "r1", "answered"));
        assert_ne!(key, events.idempotency_key(&long_agent, "r2", "answered"));
        assert_ne!(key, events.idempotency_key(&long_agent, "r1", "ended"));
        assert_ne!(key, events.idempotency_key("b", "r1", "answered"));
        let ringing = event_name(&CallEvent::Ringing { queue: "q".into() });
        assert_ne!(
            events.idempotency_key("b", "r1", ringing),
            events.idempotency_key("b", "r1", event_name(&CallEvent::RingEnded))
        );
    }

    #[test]
    fn event_bodies_are_what_the_control_plane_reads() {
        assert_eq!(
            event_body(&CallEvent::Ended {
                wrap_up: Duration::from_millis(1500)
            }),
            json!({ "event": "ended", "wrap_up_ms": 1500 })
        );
        assert_eq!(
            event_body(&CallEvent::Missed {
                queue: "sales".into(),
                max_misses: 3
            }),
            json!({ "event": "missed", "queue": "sales", "max_misses": 3 })
        );
        assert_eq!(
            event_body(&CallEvent::Ringing {
                queue: "sales".into()
            }),
            json!({ "event": "ringing", "queue": "sales" })
        );
        assert_eq!(
            event_body(&CallEvent::RingEnded),
            json!({ "event": "ring_ended" })
        );
    }
}
