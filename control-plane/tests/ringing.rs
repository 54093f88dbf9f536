//! A ring written through one control-plane instance shows in another's agent list, on
//! SQLite and on MariaDB: rings move no directory version, so the other instance learns
//! of them from its figures loop's read of the ringing agents (within a tick or two),
//! and of their end from that read or from the directory re-read an answer brings.

use std::sync::Arc;
use std::time::Duration;

use callfleet_control_plane::Control;
use callfleet_control_plane::auth::Caller;
use callfleet_core::config::{ControlPlaneConfig, Role};
use callfleet_core::store::{Agent, CallEvent, CallEventOutcome};
use callfleet_core::{Store, testing};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// `agent`'s (ringing_since_ms, ringing_queue) in `control`'s list.
fn listed(control: &Control, agent: &str) -> (Option<i64>, Option<String>) {
    let view = control
        .list_agents()
        .into_iter()
        .find(|view| view.agent.id == agent)
        .expect("listed");
    (view.ringing_since_ms, view.ringing_queue)
}

/// Waits up to 3 s for `agent`'s ring in `control`'s list to be `wanted`; how long it took.
async fn until_listed(
    control: &Control,
    agent: &str,
    wanted: &(Option<i64>, Option<String>),
) -> Duration {
    let started = Instant::now();
    while listed(control, agent) != *wanted {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{agent}: {:?}, not {wanted:?}",
            listed(control, agent)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn a_ring_written_on_one_instance_shows_in_the_other_s_list() {
    let dir = tempfile::tempdir().expect("temp dir");
    for config in [
        testing::sqlite_config(dir.path()),
        testing::fresh_mysql_config().await,
    ] {
        let store = Store::connect(&config).await.expect("store");
        let db = store.dialect();
        store
            .upsert_agent(
                &Agent {
                    id: "1001".into(),
                    name: "Alice".into(),
                    tags: Default::default(),
                    daily_cap: None,
                    enabled: true,
                },
                "setup",
            )
            .await
            .expect("agent");
        let start = || async {
            Arc::new(
                Control::start(store.clone(), &ControlPlaneConfig::default())
                    .await
                    .expect("control plane"),
            )
        };
        let (writer, reader) = (start().await, start().await);
        let shutdown = CancellationToken::new();
        let loops = [
            tokio::spawn({
                let (reader, token) = (reader.clone(), shutdown.clone());
                async move { reader.figures_loop(token).await }
            }),
            tokio::spawn({
                let (reader, token) = (reader.clone(), shutdown.clone());
                async move {
                    reader.refresh_loop(Duration::from_millis(100), token).await;
                }
            }),
        ];
        let node = Caller {
            name: "node:pbx-1".into(),
            role: Role::Node,
        };
        let report = |event: CallEvent| {
            let (writer, node) = (writer.clone(), node.clone());
            async move {
                writer
                    .call_event(&node, "1001", &event, None)
                    .await
                    .expect("written")
            }
        };

        let CallEventOutcome::Ringing { since_ms } = report(CallEvent::Ringing {
            queue: "sales".into(),
        })
        .await
        else {
            panic!("a ringing outcome on {db}");
        };
        let ringing = (Some(since_ms), Some("sales".to_owned()));
        // The writer shows it at once; the reader within its figures loop's ticks.
        assert_eq!(listed(&writer, "1001"), ringing, "{db}");
        let took = until_listed(&reader, "1001", &ringing).await;
        assert!(took < Duration::from_millis(1500), "{db}: {took:?}");
        // An answer clears it everywhere (the reader's re-read, or its next ring read).
        report(CallEvent::Answered {
            queue: "sales".into(),
        })
        .await;
        assert_eq!(listed(&writer, "1001"), (None, None), "{db}");
        until_listed(&reader, "1001", &(None, None)).await;
        // A ring and its end, which the reader learns of from its figures loop alone.
        let CallEventOutcome::Ringing { since_ms } = report(CallEvent::Ringing {
            queue: "support".into(),
        })
        .await
        else {
            panic!("a ringing outcome on {db}");
        };
        until_listed(
            &reader,
            "1001",
            &(Some(since_ms), Some("support".to_owned())),
        )
        .await;
        let CallEventOutcome::RingEnded = report(CallEvent::RingEnded).await else {
            panic!("a ring_ended outcome on {db}");
        };
        assert_eq!(listed(&writer, "1001"), (None, None), "{db}");
        until_listed(&reader, "1001", &(None, None)).await;

        shutdown.cancel();
        for task in loops {
            task.await.expect("loop ends");
        }
        store.close().await;
    }
}
