//! The directory's behaviour on both backends: every test runs on SQLite and on MariaDB,
//! and fails (never passes) when MariaDB is not configured.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::*;
use crate::config::StoreConfig;
use crate::store::directory::{DEFAULT_SERVICE_LEVEL_MS, MAX_SERVICE_LEVEL_MS};
use crate::testing;

const CRM: &str = "crm-main";
const DAY: &str = "2025-03-14";

/// Runs `scenario` on a fresh SQLite file and on a fresh MariaDB database.
async fn on_both<F, Fut>(scenario: F)
where
    F: Fn(Store) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    on_both_with_pool(StoreConfig::default().max_connections, scenario).await;
}

/// [`on_both`] with pools of `connections` connections.
async fn on_both_with_pool<F, Fut>(connections: u32, scenario: F)
where
    F: Fn(Store) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("temp dir");
    let configs: [StoreConfig; 2] = [
        testing::sqlite_config(dir.path()),
        testing::fresh_mysql_config().await,
    ];
    for config in configs {
        let config = StoreConfig {
            max_connections: connections,
            ..config
        };
        let store = Store::connect(&config).await.expect("connect");
        scenario(store.clone()).await;
        store.close().await;
    }
}

fn agent(id: &str, tags: &[&str], daily_cap: Option<u32>) -> Agent {
    Agent {
        id: id.into(),
        name: format!("Agent {id}"),
        tags: tags.iter().map(|tag| (*tag).to_owned()).collect(),
        daily_cap,
        enabled: true,
    }
}

fn device(id: &str) -> Device {
    Device {
        id: id.into(),
        endpoint: format!("PJSIP/{id}"),
        name: None,
        contact: None,
        registers: false,
    }
}

fn queue(id: &str) -> Queue {
    Queue {
        id: id.into(),
        name: format!("Queue {id}"),
        service_level_ms: DEFAULT_SERVICE_LEVEL_MS,
    }
}

/// Agents 1001–1003, devices 2001–2002, queues `sales` and `support`.
async fn seed(store: &Store) {
    for id in ["1001", "1002", "1003"] {
        store
            .upsert_agent(&agent(id, &[], None), CRM)
            .await
            .expect("agent");
    }
    for id in ["2001", "2002"] {
        store.upsert_device(&device(id), CRM).await.expect("device");
    }
    for id in ["sales", "support"] {
        store.upsert_queue(&queue(id), CRM).await.expect("queue");
    }
}

async fn audit(store: &Store) -> Vec<AuditEntry> {
    store.list_audit(1000, None).await.expect("audit")
}

async fn state(store: &Store, agent: &str) -> Availability {
    store.availability(agent).await.expect("availability")
}

#[tokio::test]
async fn agents_devices_queues_and_members_round_trip() {
    on_both(|store| async move {
        let db = store.dialect();
        let mut vip = agent("1001", &["vip", "fr"], Some(3));
        store.upsert_agent(&vip, CRM).await.expect("create");
        store
            .upsert_agent(&agent("0999", &[], None), CRM)
            .await
            .expect("create");
        assert_eq!(store.get_agent("1001").await.expect("get"), vip, "{db}");
        let ids: Vec<String> = store
            .list_agents()
            .await
            .expect("list")
            .into_iter()
            .map(|a| a.id)
            .collect();
        assert_eq!(ids, ["0999", "1001"]);

        // An update replaces the settings and keeps the availability.
        store.pause("1001", "training", CRM).await.expect("pause");
        vip.name = "Alice Martin".into();
        vip.tags = BTreeSet::from(["gold".to_owned()]);
        vip.daily_cap = None;
        vip.enabled = false;
        store.upsert_agent(&vip, CRM).await.expect("update");
        assert_eq!(store.get_agent("1001").await.expect("get"), vip);
        assert_eq!(
            state(&store, "1001").await.state,
            AgentState::Paused {
                reason: "training".into()
            }
        );

        let mut desk = device("2001");
        store.upsert_device(&desk, CRM).await.expect("device");
        assert_eq!(store.get_device("2001").await.expect("get"), desk);
        desk.endpoint = "PJSIP/desk-12".into();
        desk.name = Some("desk 12, 2nd floor".into());
        store.upsert_device(&desk, CRM).await.expect("update");
        store
            .upsert_device(&device("2000"), CRM)
            .await
            .expect("device");
        assert_eq!(
            store.list_devices().await.expect("list"),
            [device("2000"), desk]
        );

        store
            .upsert_queue(&queue("sales"), CRM)
            .await
            .expect("queue");
        let renamed = Queue {
            id: "sales".into(),
            name: "Sales FR".into(),
            service_level_ms: 15_000,
        };
        store.upsert_queue(&renamed, CRM).await.expect("rename");
        store
            .upsert_queue(&queue("Sales"), CRM)
            .await
            .expect("queue");
        assert_eq!(store.get_queue("sales").await.expect("get"), renamed);
        assert_eq!(
            store.list_queues().await.expect("list"),
            [queue("Sales"), renamed.clone()],
            "ids are case-sensitive and ordered byte-wise on {db}"
        );

        store
            .set_priority("sales", "1001", 5, CRM)
            .await
            .expect("add");
        store
            .set_priority("sales", "0999", 5, CRM)
            .await
            .expect("add");
        store
            .set_priority("sales", "1001", -1, CRM)
            .await
            .expect("change");
        let member = |agent: &str, priority| QueueMember {
            agent: agent.into(),
            priority,
        };
        assert_eq!(
            store.list_members("sales").await.expect("members"),
            [member("1001", -1), member("0999", 5)]
        );
        store
            .remove_member("sales", "1001", CRM)
            .await
            .expect("remove");
        assert_eq!(
            store.list_members("sales").await.expect("members"),
            [member("0999", 5)]
        );
        let err = store
            .remove_member("sales", "1001", CRM)
            .await
            .expect_err("no longer a member");
        assert!(matches!(err, StoreError::NotMember { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("agent `1001` is not a member of queue `sales`"),
            "{err}"
        );

        store.delete_queue("sales", CRM).await.expect("delete");
        store.delete_device("2000", CRM).await.expect("delete");
        store.delete_agent("0999", CRM).await.expect("delete");
        assert!(matches!(
            store.get_queue("sales").await,
            Err(StoreError::NotFound { kind: "queue", .. })
        ));
        assert!(matches!(
            store.get_device("2000").await,
            Err(StoreError::NotFound { kind: "device", .. })
        ));
        assert!(matches!(
            store.get_agent("0999").await,
            Err(StoreError::NotFound { kind: "agent", .. })
        ));
        assert_eq!(store.list_agents().await.expect("list").len(), 1);
    })
    .await;
}

#[tokio::test]
async fn invalid_input_is_refused_naming_the_field_and_changes_nothing() {
    on_both(|store| async move {
        seed(&store).await;
        let before = audit(&store).await.len();
        let long = "x".repeat(201);
        let checks: Vec<(Result<(), StoreError>, &str)> = vec![
            (
                store.upsert_agent(&agent("10 01", &[], None), CRM).await,
                "agent id",
            ),
            (
                store.upsert_agent(&agent("", &[], None), CRM).await,
                "agent id",
            ),
            (
                store
                    .upsert_agent(&agent(&"1".repeat(33), &[], None), CRM)
                    .await,
                "agent id",
            ),
            (
                store
                    .upsert_agent(
                        &Agent {
                            name: " ".into(),
                            ..agent("1004", &[], None)
                        },
                        CRM,
                    )
                    .await,
                "name",
            ),
            (
                store
                    .upsert_agent(
                        &Agent {
                            name: long.clone(),
                            ..agent("1004", &[], None)
                        },
                        CRM,
                    )
                    .await,
                "name",
            ),
            (
                store
                    .upsert_agent(&agent("1004", &["VIP"], None), CRM)
                    .await,
                "tags",
            ),
            (
                store
                    .upsert_agent(&agent("1004", &["-vip"], None), CRM)
                    .await,
                "tags",
            ),
            (
                store.upsert_agent(&agent("1004", &[], None), "").await,
                "actor",
            ),
            (
                store
                    .upsert_device(
                        &Device {
                            endpoint: "2001".into(),
                            ..device("2003")
                        },
                        CRM,
                    )
                    .await,
                "endpoint",
            ),
            (
                store
                    .upsert_device(
                        &Device {
                            endpoint: "PJSIP/1&PJSIP/2".into(),
                            ..device("2003")
                        },
                        CRM,
                    )
                    .await,
                "endpoint",
            ),
            (
                store
                    .upsert_device(
                        &Device {
                            endpoint: "PJSIP/20 01".into(),
                            ..device("2003")
                        },
                        CRM,
                    )
                    .await,
                "endpoint",
            ),
            (
                store.upsert_device(&device("2003/x"), CRM).await,
                "device id",
            ),
            (
                store.upsert_queue(&queue("sales fr"), CRM).await,
                "queue id",
            ),
            (store.pause("1001", "", CRM).await, "reason"),
            (store.pause("1001", &long, CRM).await, "reason"),
            (
                store
                    .wrap_up("1001", Duration::from_secs(2 * 86_400), CRM)
                    .await,
                "wrap-up duration",
            ),
            (
                store.record_sale("1001", "2025-13-01", CRM).await.map(drop),
                "day",
            ),
            (
                store.record_sale("1001", "2025-02-29", CRM).await.map(drop),
                "day",
            ),
            (
                store.record_call("1001", "20250314", CRM).await.map(drop),
                "day",
            ),
            (store.list_audit(0, None).await.map(drop), "limit"),
            (
                store.login("1001", "20 01", CRM).await.map(drop),
                "device id",
            ),
        ];
        for (index, (result, field)) in checks.into_iter().enumerate() {
            let err = result.expect_err("must be refused");
            assert!(
                matches!(&err, StoreError::Invalid { field: f, .. } if *f == field),
                "check {index}: expected field {field}, got {err}"
            );
            assert!(
                err.to_string().starts_with(&format!("invalid {field}: ")),
                "{err}"
            );
        }
        assert!(
            store.record_sale("1001", "2024-02-29", CRM).await.is_ok(),
            "a leap day is a day"
        );
        assert_eq!(
            audit(&store).await.len(),
            before + 1,
            "refused input writes no audit row"
        );
    })
    .await;
}

#[tokio::test]
async fn unknown_ids_are_not_found_naming_kind_and_id() {
    on_both(|store| async move {
        seed(&store).await;
        let before = audit(&store).await.len();
        let err = store.get_agent("1009").await.expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "no agent `1009`; list agents with GET /api/v1/agents"
        );
        let checks: Vec<(Result<(), StoreError>, &str, &str)> = vec![
            (store.delete_agent("1009", CRM).await, "agent", "1009"),
            (
                store.login("1009", "2001", CRM).await.map(drop),
                "agent",
                "1009",
            ),
            (
                store.login("1001", "2009", CRM).await.map(drop),
                "device",
                "2009",
            ),
            (store.logout("1009", CRM).await.map(drop), "agent", "1009"),
            (store.pause("1009", "lunch", CRM).await, "agent", "1009"),
            (store.unpause("1009", CRM).await, "agent", "1009"),
            (store.set_on_call("1009", CRM).await, "agent", "1009"),
            (
                store.wrap_up("1009", Duration::from_secs(5), CRM).await,
                "agent",
                "1009",
            ),
            (store.availability("1009").await.map(drop), "agent", "1009"),
            (
                store.record_sale("1009", DAY, CRM).await.map(drop),
                "agent",
                "1009",
            ),
            (
                store.record_call("1009", DAY, CRM).await.map(drop),
                "agent",
                "1009",
            ),
            (
                store.daily_counts("1009", DAY).await.map(drop),
                "agent",
                "1009",
            ),
            (store.session("1009").await.map(drop), "agent", "1009"),
            (
                store.set_priority("nope", "1001", 1, CRM).await,
                "queue",
                "nope",
            ),
            (
                store.set_priority("sales", "1009", 1, CRM).await,
                "agent",
                "1009",
            ),
            (
                store.remove_member("nope", "1001", CRM).await,
                "queue",
                "nope",
            ),
            (store.list_members("nope").await.map(drop), "queue", "nope"),
            (store.get_queue("nope").await.map(drop), "queue", "nope"),
            (store.delete_queue("nope", CRM).await, "queue", "nope"),
            (
                store
                    .record_call_outcome(
                        "nope",
                        CallOutcome::Answered,
                        Duration::ZERO,
                        DAY,
                        NODE,
                        None,
                    )
                    .await
                    .map(drop),
                "queue",
                "nope",
            ),
            (
                store.queue_daily_counts("nope", DAY).await.map(drop),
                "queue",
                "nope",
            ),
            (store.get_device("2009").await.map(drop), "device", "2009"),
            (store.delete_device("2009", CRM).await, "device", "2009"),
        ];
        for (index, (result, kind, id)) in checks.into_iter().enumerate() {
            let err = result.expect_err("must be not found");
            assert!(
                matches!(&err, StoreError::NotFound { kind: k, id: i } if *k == kind && i == id),
                "check {index}: expected {kind} {id}, got {err}"
            );
            assert!(
                err.to_string().starts_with(&format!("no {kind} `{id}`; ")),
                "{err}"
            );
        }
        assert_eq!(
            audit(&store).await.len(),
            before,
            "a failed change writes no audit row"
        );
    })
    .await;
}

#[tokio::test]
async fn login_on_a_held_device_is_a_conflict_naming_the_holder_and_changes_nothing() {
    on_both(|store| async move {
        seed(&store).await;
        assert_eq!(
            store.login("1001", "2001", CRM).await.expect("login"),
            Login::New
        );
        assert_eq!(
            store.login("1002", "2002", CRM).await.expect("login"),
            Login::New
        );
        let before = audit(&store).await.len();
        let sessions = store.list_sessions().await.expect("sessions");

        let err = store
            .login("1002", "2001", "crm-other")
            .await
            .expect_err("2001 is held by 1001");
        assert!(
            matches!(&err, StoreError::Conflict { device, holder } if device == "2001" && holder == "1001"),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("device `2001` is in use by agent `1001`"),
            "{err}"
        );
        assert_eq!(
            store.list_sessions().await.expect("sessions"),
            sessions,
            "1002 keeps its device: no half-applied move on {}",
            store.dialect()
        );
        assert_eq!(audit(&store).await.len(), before, "no audit row");
        let session = store.session("1002").await.expect("session").expect("on");
        assert_eq!((session.device.as_str(), session.endpoint.as_str()), ("2002", "PJSIP/2002"));
    })
    .await;
}

#[tokio::test]
async fn an_agent_has_one_device_and_moves_when_logging_in_elsewhere() {
    on_both(|store| async move {
        seed(&store).await;
        assert_eq!(
            store.login("1001", "2001", CRM).await.expect("login"),
            Login::New
        );
        assert_eq!(
            store.login("1001", "2001", CRM).await.expect("again"),
            Login::Unchanged
        );
        assert_eq!(
            store.login("1001", "2002", CRM).await.expect("move"),
            Login::Moved {
                from: "2001".into()
            }
        );
        let sessions = store.list_sessions().await.expect("sessions");
        assert_eq!(sessions.len(), 1, "one device per agent");
        assert_eq!(
            (sessions[0].agent.as_str(), sessions[0].device.as_str()),
            ("1001", "2002")
        );
        assert_eq!(
            store
                .login("1002", "2001", CRM)
                .await
                .expect("the old desk is free"),
            Login::New
        );
        let last = &audit(&store).await[1];
        assert_eq!(
            (last.action.as_str(), last.subject.as_str()),
            ("agent.login", "agent:1001")
        );
        assert_eq!(last.detail["moved_from"], "2001");
        assert_eq!(last.detail["device"], "2002");
    })
    .await;
}

#[tokio::test]
async fn concurrent_logins_on_one_device_leave_exactly_one_session() {
    on_both(|store| async move {
        seed(&store).await;
        let agents: Vec<String> = (0..10).map(|n| format!("31{n:02}")).collect();
        for id in &agents {
            store
                .upsert_agent(&agent(id, &[], None), CRM)
                .await
                .expect("agent");
        }
        let before = audit(&store).await.len();
        let mut logins = tokio::task::JoinSet::new();
        for id in agents.clone() {
            let store = store.clone();
            logins.spawn(async move { (id.clone(), store.login(&id, "2001", CRM).await) });
        }
        let mut winners = Vec::new();
        let mut holders = Vec::new();
        while let Some(joined) = logins.join_next().await {
            match joined.expect("task") {
                (id, Ok(login)) => {
                    assert_eq!(login, Login::New);
                    winners.push(id);
                }
                (_, Err(StoreError::Conflict { holder, .. })) => holders.push(holder),
                (id, Err(err)) => panic!("{id} on {}: {err}", store.dialect()),
            }
        }
        assert_eq!(winners.len(), 1, "{winners:?} on {}", store.dialect());
        assert_eq!(holders.len(), 9);
        assert!(
            holders.iter().all(|holder| *holder == winners[0]),
            "{holders:?}"
        );
        let sessions = store.list_sessions().await.expect("sessions");
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].agent, winners[0]);
        assert_eq!(
            audit(&store).await.len(),
            before + 1,
            "one audit row, the winner's"
        );
    })
    .await;
}

#[tokio::test]
async fn logout_ends_the_session_and_frees_the_device() {
    on_both(|store| async move {
        seed(&store).await;
        store.login("1001", "2001", CRM).await.expect("login");
        store.pause("1001", "lunch", CRM).await.expect("pause");
        assert_eq!(
            store.logout("1001", CRM).await.expect("logout").as_deref(),
            Some("2001")
        );
        assert_eq!(store.session("1001").await.expect("session"), None);
        assert_eq!(
            store.logout("1001", CRM).await.expect("logout again"),
            None,
            "a logout of an agent who is not logged in is not an error"
        );
        assert!(
            matches!(state(&store, "1001").await.state, AgentState::Paused { .. }),
            "logout leaves availability alone"
        );
        assert_eq!(
            store.login("1002", "2001", CRM).await.expect("free"),
            Login::New
        );
        let rows = audit(&store).await;
        assert_eq!(rows[1].action, "agent.logout");
        assert_eq!(rows[1].detail["device"], serde_json::Value::Null);
        assert_eq!(rows[2].detail["device"], "2001");
    })
    .await;
}

#[tokio::test]
async fn time_in_state_restarts_only_when_the_state_changes() {
    on_both(|store| async move {
        seed(&store).await;
        let fresh = state(&store, "1001").await;
        assert_eq!(
            fresh.state_since_ms, fresh.idle_since_ms,
            "available since created"
        );

        let step = || tokio::time::sleep(Duration::from_millis(20));
        step().await;
        store.pause("1001", "lunch", CRM).await.expect("pause");
        let paused = state(&store, "1001").await;
        assert!(
            paused.state_since_ms >= fresh.now_ms + 20 && paused.state_since_ms <= paused.now_ms,
            "paused since the pause: {fresh:?} {paused:?}"
        );
        step().await;
        store
            .pause("1001", "coaching", CRM)
            .await
            .expect("new reason");
        assert_eq!(
            state(&store, "1001").await.state_since_ms,
            paused.state_since_ms,
            "a new reason is the same state"
        );

        step().await;
        store.set_on_call("1001", CRM).await.expect("on call");
        let on_call = state(&store, "1001").await;
        assert!(on_call.state_since_ms >= paused.now_ms + 20);
        step().await;
        store.set_on_call("1001", CRM).await.expect("on call again");
        assert_eq!(
            state(&store, "1001").await.state_since_ms,
            on_call.state_since_ms
        );

        step().await;
        store
            .wrap_up("1001", Duration::from_secs(30), CRM)
            .await
            .expect("wrap-up");
        let wrapping = state(&store, "1001").await;
        assert!(wrapping.state_since_ms >= on_call.now_ms + 20);

        step().await;
        store.unpause("1001", CRM).await.expect("end wrap-up early");
        let back = state(&store, "1001").await;
        assert_eq!(back.state, AgentState::Available);
        assert!(back.state_since_ms >= wrapping.now_ms + 20 && back.state_since_ms <= back.now_ms);
        step().await;
        store.unpause("1001", CRM).await.expect("unpause again");
        assert_eq!(
            state(&store, "1001").await.state_since_ms,
            back.state_since_ms
        );
    })
    .await;
}

#[tokio::test]
async fn pause_needs_a_reason_and_unpause_moves_idle_since_forward() {
    on_both(|store| async move {
        seed(&store).await;
        let fresh = state(&store, "1001").await;
        assert_eq!(
            fresh.state,
            AgentState::Available,
            "a new agent is available"
        );
        assert!(fresh.idle_since_ms <= fresh.now_ms);

        tokio::time::sleep(Duration::from_millis(20)).await;
        store.login("1001", "2001", CRM).await.expect("login");
        let logged_in = state(&store, "1001").await;
        assert!(
            logged_in.idle_since_ms >= fresh.idle_since_ms + 20,
            "a login restarts the idle time: {fresh:?} {logged_in:?}"
        );

        store.pause("1001", "lunch", CRM).await.expect("pause");
        let paused = state(&store, "1001").await;
        assert_eq!(
            paused.state,
            AgentState::Paused {
                reason: "lunch".into()
            }
        );
        assert!(!paused.state.is_available_at(paused.now_ms));
        assert_eq!(paused.idle_since_ms, logged_in.idle_since_ms);

        tokio::time::sleep(Duration::from_millis(20)).await;
        store.unpause("1001", CRM).await.expect("unpause");
        let back = state(&store, "1001").await;
        assert_eq!(back.state, AgentState::Available);
        assert!(
            back.idle_since_ms >= paused.now_ms + 20 && back.idle_since_ms <= back.now_ms,
            "idle since the unpause, by the database clock: {paused:?} {back:?}"
        );

        tokio::time::sleep(Duration::from_millis(10)).await;
        store.unpause("1001", CRM).await.expect("unpause again");
        assert_eq!(
            state(&store, "1001").await.idle_since_ms,
            back.idle_since_ms,
            "unpausing an available agent keeps their place"
        );
        let err = store.pause("1001", "  ", CRM).await.expect_err("no reason");
        assert!(
            matches!(
                err,
                StoreError::Invalid {
                    field: "reason",
                    ..
                }
            ),
            "{err}"
        );
    })
    .await;
}

#[tokio::test]
async fn wrap_up_ends_at_until_by_the_database_clock() {
    on_both(|store| async move {
        seed(&store).await;
        store
            .set_on_call("1001", "node:pbx-1")
            .await
            .expect("on call");
        let on_call = state(&store, "1001").await;
        assert_eq!(on_call.state, AgentState::OnCall);
        assert!(!on_call.state.is_available_at(on_call.now_ms));

        store
            .wrap_up("1001", Duration::from_millis(300), "node:pbx-1")
            .await
            .expect("wrap up");
        let wrapping = state(&store, "1001").await;
        let AgentState::WrapUp { until_ms } = wrapping.state else {
            panic!("in wrap-up: {wrapping:?}");
        };
        let left = until_ms - wrapping.now_ms;
        assert!(
            (200..=300).contains(&left),
            "{left} ms left on {}",
            store.dialect()
        );
        assert_eq!(
            wrapping.idle_since_ms, until_ms,
            "idle from the end of wrap-up"
        );
        assert!(!wrapping.state.is_available_at(wrapping.now_ms));

        tokio::time::sleep(Duration::from_millis(350)).await;
        let snapshot = store.directory_snapshot(DAY).await.expect("snapshot");
        let seen = snapshot.agent("1001").expect("agent");
        assert!(snapshot.now_ms >= until_ms);
        assert!(
            seen.state.is_available_at(snapshot.now_ms),
            "wrap-up is over"
        );

        store.unpause("1001", "node:pbx-1").await.expect("unpause");
        let after = state(&store, "1001").await;
        assert_eq!(after.state, AgentState::Available);
        assert_eq!(
            after.idle_since_ms, until_ms,
            "idle since the wrap-up ended"
        );

        // Ending a wrap-up early makes the agent idle from now.
        store
            .wrap_up("1001", Duration::from_secs(60), "node:pbx-1")
            .await
            .expect("wrap up");
        store.unpause("1001", CRM).await.expect("unpause early");
        let early = state(&store, "1001").await;
        assert!(early.idle_since_ms <= early.now_ms && early.idle_since_ms > until_ms);
    })
    .await;
}

#[tokio::test]
async fn counters_increment_per_agent_and_per_day() {
    on_both(|store| async move {
        seed(&store).await;
        assert_eq!(
            store
                .record_call("1001", DAY, "node:pbx-1")
                .await
                .expect("call"),
            1
        );
        assert_eq!(
            store
                .record_call("1001", DAY, "node:pbx-1")
                .await
                .expect("call"),
            2
        );
        assert_eq!(store.record_sale("1001", DAY, CRM).await.expect("sale"), 1);
        assert_eq!(
            store
                .record_sale("1001", "2025-03-15", CRM)
                .await
                .expect("sale"),
            1
        );
        assert_eq!(store.record_sale("1002", DAY, CRM).await.expect("sale"), 1);
        assert_eq!(
            store.daily_counts("1001", DAY).await.expect("counts"),
            DailyCounts {
                calls: 2,
                sales: 1,
                missed: 0
            }
        );
        assert_eq!(
            store
                .daily_counts("1001", "2025-03-15")
                .await
                .expect("counts"),
            DailyCounts {
                calls: 0,
                sales: 1,
                missed: 0
            }
        );
        assert_eq!(
            store.daily_counts("1003", DAY).await.expect("counts"),
            DailyCounts::default()
        );
        let last = &audit(&store).await[0];
        assert_eq!(
            (last.action.as_str(), last.subject.as_str()),
            ("agent.record_sale", "agent:1002")
        );
        assert_eq!(last.detail, serde_json::json!({ "day": DAY, "sales": 1 }));
    })
    .await;
}

#[tokio::test]
async fn concurrent_sales_are_all_counted() {
    on_both(|store| async move {
        seed(&store).await;
        let mut sales = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let store = store.clone();
            sales.spawn(async move { store.record_sale("1001", DAY, CRM).await });
        }
        let mut counts = Vec::new();
        while let Some(joined) = sales.join_next().await {
            counts.push(joined.expect("task").expect("sale"));
        }
        counts.sort_unstable();
        assert_eq!(
            counts,
            (1..=20).collect::<Vec<u32>>(),
            "{}",
            store.dialect()
        );
        assert_eq!(
            store.daily_counts("1001", DAY).await.expect("counts").sales,
            20
        );
        let rows = audit(&store).await;
        assert_eq!(
            rows.iter()
                .filter(|row| row.action == "agent.record_sale")
                .count(),
            20
        );
    })
    .await;
}

#[tokio::test]
async fn every_change_writes_one_audit_row_and_pages_newest_first() {
    on_both(|store| async move {
        store
            .upsert_agent(&agent("1001", &["vip"], Some(2)), "crm-main")
            .await
            .expect("agent");
        store.upsert_queue(&queue("sales"), "crm-main").await.expect("queue");
        store
            .set_priority("sales", "1001", 3, "supervisor-ui")
            .await
            .expect("priority");
        store
            .set_priority("sales", "1001", 1, "supervisor-ui")
            .await
            .expect("priority");
        let _ = store.login("1001", "2001", CRM).await.expect_err("no device");
        let _ = store.pause("1001", "", CRM).await.expect_err("no reason");
        store.pause("1001", "coffee", "softphone").await.expect("pause");

        let rows = audit(&store).await;
        let summary: Vec<(&str, &str, &str)> = rows
            .iter()
            .map(|row| (row.actor.as_str(), row.action.as_str(), row.subject.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                ("softphone", "agent.pause", "agent:1001"),
                ("supervisor-ui", "agent.set_priority", "agent:1001"),
                ("supervisor-ui", "agent.set_priority", "agent:1001"),
                ("crm-main", "queue.upsert", "queue:sales"),
                ("crm-main", "agent.upsert", "agent:1001"),
            ],
            "{}",
            store.dialect()
        );
        assert_eq!(
            rows[1].detail,
            serde_json::json!({ "queue": "sales", "priority": 1, "previous": 3 })
        );
        assert_eq!(
            rows[2].detail,
            serde_json::json!({ "queue": "sales", "priority": 3, "previous": null })
        );
        assert_eq!(
            rows[4].detail,
            serde_json::json!({ "name": "Agent 1001", "tags": ["vip"], "daily_cap": 2, "enabled": true })
        );
        assert_eq!(rows[0].detail["reason"], "coffee");
        assert_eq!(rows[0].detail["previous"], "available");
        assert!(rows.windows(2).all(|pair| pair[0].id > pair[1].id));
        assert!(rows.windows(2).all(|pair| pair[0].at_ms >= pair[1].at_ms));
        let now = store.directory_snapshot(DAY).await.expect("snapshot").now_ms;
        assert!(
            rows.iter().all(|row| row.at_ms <= now && row.at_ms > now - 60_000),
            "stamped by the database clock: {now} {rows:?}"
        );

        let first = store.list_audit(2, None).await.expect("page 1");
        let second = store
            .list_audit(2, Some(first[1].id))
            .await
            .expect("page 2");
        let third = store
            .list_audit(2, Some(second[1].id))
            .await
            .expect("page 3");
        let paged: Vec<i64> = first.iter().chain(&second).chain(&third).map(|row| row.id).collect();
        let all: Vec<i64> = rows.iter().map(|row| row.id).collect();
        assert_eq!(paged, all);
        assert_eq!(third.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn the_snapshot_holds_agents_sessions_queues_and_the_day_s_sales() {
    on_both(|store| async move {
        seed(&store).await;
        store
            .upsert_agent(&agent("1001", &["vip", "fr"], Some(2)), CRM)
            .await
            .expect("agent");
        store
            .upsert_agent(
                &Agent {
                    enabled: false,
                    ..agent("1003", &[], None)
                },
                CRM,
            )
            .await
            .expect("agent");
        store.login("1001", "2001", CRM).await.expect("login");
        store.pause("1002", "meeting", CRM).await.expect("pause");
        store
            .set_priority("sales", "1002", 2, CRM)
            .await
            .expect("member");
        store
            .set_priority("sales", "1001", 1, CRM)
            .await
            .expect("member");
        store
            .set_priority("sales", "1003", 1, CRM)
            .await
            .expect("member");
        store
            .set_priority("support", "1002", 0, CRM)
            .await
            .expect("member");
        store.record_sale("1001", DAY, CRM).await.expect("sale");
        store.record_sale("1001", DAY, CRM).await.expect("sale");
        store.record_call("1001", DAY, CRM).await.expect("call");
        store
            .record_sale("1001", "2025-03-13", CRM)
            .await
            .expect("sale");
        store
            .upsert_queue(&queue("empty"), CRM)
            .await
            .expect("queue");

        let snapshot = store.directory_snapshot(DAY).await.expect("snapshot");
        assert_eq!(snapshot.day, DAY);
        let ids: Vec<&str> = snapshot.agents.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["1001", "1002", "1003"]);

        let alice = snapshot.agent("1001").expect("1001");
        assert_eq!(
            alice.tags,
            BTreeSet::from(["fr".to_owned(), "vip".to_owned()])
        );
        assert_eq!(
            (alice.daily_cap, alice.sales_today, alice.calls_today),
            (Some(2), 2, 1)
        );
        assert!(alice.capped(), "two sales reach a cap of two");
        assert!(alice.enabled);
        assert_eq!(alice.state, AgentState::Available);
        assert!(alice.idle_since_ms <= snapshot.now_ms);
        let session = alice.session.as_ref().expect("logged in");
        assert_eq!(
            (
                session.agent.as_str(),
                session.device.as_str(),
                session.endpoint.as_str()
            ),
            ("1001", "2001", "PJSIP/2001")
        );
        assert!(session.since_ms <= snapshot.now_ms);

        let bob = snapshot.agent("1002").expect("1002");
        assert_eq!(
            bob.state,
            AgentState::Paused {
                reason: "meeting".into()
            }
        );
        assert_eq!(
            (bob.session.as_ref(), bob.sales_today, bob.capped()),
            (None, 0, false)
        );
        assert!(!snapshot.agent("1003").expect("1003").enabled);
        assert!(snapshot.agent("1004").is_none());

        let ids: Vec<&str> = snapshot.queues.iter().map(|q| q.id.as_str()).collect();
        assert_eq!(ids, ["empty", "sales", "support"]);
        let member = |agent: &str, priority| QueueMember {
            agent: agent.into(),
            priority,
        };
        assert_eq!(
            snapshot.queue("sales").expect("sales").members,
            [member("1001", 1), member("1003", 1), member("1002", 2)]
        );
        assert_eq!(
            snapshot.queue("support").expect("support").members,
            [member("1002", 0)]
        );
        assert!(snapshot.queue("empty").expect("empty").members.is_empty());
        assert_eq!(snapshot.queue("sales").expect("sales").name, "Queue sales");

        // An endpoint changed while the agent is logged in is what the next snapshot dials.
        store
            .upsert_device(
                &Device {
                    endpoint: "PJSIP/desk-7".into(),
                    ..device("2001")
                },
                CRM,
            )
            .await
            .expect("device");
        let later = store
            .directory_snapshot("2025-03-13")
            .await
            .expect("snapshot");
        let alice = later.agent("1001").expect("1001");
        assert_eq!(alice.session.as_ref().expect("on").endpoint, "PJSIP/desk-7");
        assert_eq!(
            (alice.sales_today, alice.calls_today),
            (1, 0),
            "the other day's counters"
        );
        assert!(later.now_ms >= snapshot.now_ms);
    })
    .await;
}

#[tokio::test]
async fn deleting_an_agent_removes_memberships_session_and_counters() {
    on_both(|store| async move {
        seed(&store).await;
        store.login("1001", "2001", CRM).await.expect("login");
        store
            .set_priority("sales", "1001", 1, CRM)
            .await
            .expect("member");
        store
            .set_priority("support", "1001", 1, CRM)
            .await
            .expect("member");
        store
            .set_priority("sales", "1002", 2, CRM)
            .await
            .expect("member");
        store.record_sale("1001", DAY, CRM).await.expect("sale");

        store.delete_agent("1001", "admin").await.expect("delete");
        assert!(matches!(
            store.get_agent("1001").await,
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(
            store.list_members("sales").await.expect("members"),
            [QueueMember {
                agent: "1002".into(),
                priority: 2
            }]
        );
        assert!(
            store
                .list_members("support")
                .await
                .expect("members")
                .is_empty()
        );
        assert!(store.list_sessions().await.expect("sessions").is_empty());
        assert!(store.get_device("2001").await.is_ok(), "the device stays");
        let row = &audit(&store).await[0];
        assert_eq!(
            (row.actor.as_str(), row.action.as_str()),
            ("admin", "agent.delete")
        );
        assert_eq!(
            row.detail,
            serde_json::json!({
                "logged_out_of": "2001",
                "memberships_removed": 2,
                "counter_days_removed": 1,
            })
        );

        // A new agent with the same extension starts from nothing.
        store
            .upsert_agent(&agent("1001", &[], None), CRM)
            .await
            .expect("again");
        assert_eq!(
            store.daily_counts("1001", DAY).await.expect("counts"),
            DailyCounts::default()
        );
        assert_eq!(
            store.login("1001", "2001", CRM).await.expect("login"),
            Login::New
        );

        // Deleting a device logs its agent out; deleting a queue removes its members.
        store
            .delete_device("2001", "admin")
            .await
            .expect("delete device");
        assert_eq!(store.session("1001").await.expect("session"), None);
        assert_eq!(audit(&store).await[0].detail["logged_out"], "1001");
        store
            .delete_queue("sales", "admin")
            .await
            .expect("delete queue");
        assert_eq!(audit(&store).await[0].detail["members_removed"], 1);
        assert!(store.get_agent("1002").await.is_ok(), "members stay agents");
        let snapshot = store.directory_snapshot(DAY).await.expect("snapshot");
        assert_eq!(snapshot.queues.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn concurrent_hot_desking_gives_every_call_its_exact_outcome() {
    // Agents hop between desks while others pause, sell and change priorities, one
    // connection per agent (and one for an observer) so they all contend at once. Only an
    // agent changes their own session here, so every outcome is exact whatever the
    // interleaving: a login moves the agent from the desk they hold (or is new after a
    // logout), or is a conflict that names the desk and another agent and leaves their
    // session as it was; a logout returns the desk they held; a sale returns the day's
    // count; every success writes one audit row and a conflict none. Everyone logs out
    // last, so the one-agent-per-device check runs while they work, not on the end state.
    const AGENTS: usize = 12;
    const ROUNDS: usize = 8;
    on_both_with_pool(AGENTS as u32 + 1, |store| async move {
        let db = store.dialect();
        seed(&store).await;
        let agents: Vec<String> = (0..AGENTS).map(|n| format!("40{n:02}")).collect();
        for id in &agents {
            store
                .upsert_agent(&agent(id, &[], None), CRM)
                .await
                .expect("agent");
        }
        for n in 0..4 {
            store
                .upsert_device(&device(&format!("50{n:02}")), CRM)
                .await
                .expect("device");
        }
        let audited_before = audit(&store).await.len();
        let mut work = tokio::task::JoinSet::new();
        for (index, id) in agents.iter().cloned().enumerate() {
            let store = store.clone();
            let agents = agents.clone();
            work.spawn(async move {
                let (mut logins, mut conflicts) = (0, 0);
                // The desk this agent holds, as only this agent's own calls change it.
                let mut held: Option<String> = None;
                for round in 0..ROUNDS {
                    let desk = format!("50{:02}", (index + round) % 4);
                    let asked = format!("{db}: {id} round {round} on {desk}");
                    match store.login(&id, &desk, CRM).await {
                        Ok(login) => {
                            let expected = match held.take() {
                                Some(from) if from == desk => Login::Unchanged,
                                Some(from) => Login::Moved { from },
                                None => Login::New,
                            };
                            assert_eq!(login, expected, "{asked}");
                            held = Some(desk.clone());
                            logins += 1;
                        }
                        Err(StoreError::Conflict { device, holder }) => {
                            assert_eq!(device, desk, "{asked}");
                            assert_ne!(holder, id, "{asked}: a conflict with oneself");
                            assert!(agents.contains(&holder), "{asked}: holder {holder}");
                            conflicts += 1;
                        }
                        Err(err) => panic!("{asked}: {err}"),
                    }
                    let session = store.session(&id).await.expect("session");
                    assert_eq!(session.map(|s| s.device), held, "{asked}: the session");
                    match round % 4 {
                        0 => assert_eq!(
                            store.record_sale(&id, DAY, CRM).await.expect("sale"),
                            round as u32 / 4 + 1,
                            "{asked}: sales of the day"
                        ),
                        1 => store
                            .set_priority("sales", &id, round as i32, CRM)
                            .await
                            .expect("priority"),
                        2 => store.pause(&id, "break", CRM).await.expect("pause"),
                        _ => assert_eq!(
                            store.logout(&id, CRM).await.expect("logout"),
                            held.take(),
                            "{asked}: logout returns the desk held"
                        ),
                    }
                }
                (logins, conflicts)
            });
        }
        // Meanwhile: every read of the sessions has one agent per device.
        let observer = {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..50 {
                    let sessions = store.list_sessions().await.expect("sessions");
                    let devices: BTreeSet<&str> =
                        sessions.iter().map(|s| s.device.as_str()).collect();
                    assert_eq!(devices.len(), sessions.len(), "{db}: {sessions:?}");
                    tokio::task::yield_now().await;
                }
            })
        };
        let mut logins = 0;
        while let Some(joined) = work.join_next().await {
            let (ok, conflicts) = joined.expect("every task ends cleanly");
            assert_eq!(
                ok + conflicts,
                ROUNDS,
                "{db}: every login is one or the other"
            );
            logins += ok;
        }
        observer.await.expect("the observer ends cleanly");

        assert_eq!(store.list_sessions().await.expect("sessions"), []);
        let mut members = store.list_members("sales").await.expect("members");
        members.sort_by(|a, b| a.agent.cmp(&b.agent));
        let expected: Vec<QueueMember> = agents
            .iter()
            .map(|id| QueueMember {
                agent: id.clone(),
                // The last priority set: round 5.
                priority: 5,
            })
            .collect();
        assert_eq!(members, expected, "{db}");
        for id in &agents {
            let counts = store.daily_counts(id, DAY).await.expect("counts");
            assert_eq!(counts.sales, 2, "{db}: {id}");
            assert_eq!(
                state(&store, id).await.state,
                AgentState::Paused {
                    reason: "break".into()
                },
                "{db}: {id}"
            );
        }
        // One audit row per successful call, none for a conflict.
        let log = audit(&store).await;
        let mut actions = std::collections::BTreeMap::new();
        for row in &log[..log.len() - audited_before] {
            *actions.entry(row.action.as_str()).or_insert(0) += 1;
        }
        let per_agent = AGENTS * ROUNDS / 4;
        assert_eq!(
            actions,
            std::collections::BTreeMap::from([
                ("agent.login", logins),
                ("agent.logout", per_agent),
                ("agent.pause", per_agent),
                ("agent.record_sale", per_agent),
                ("agent.set_priority", per_agent),
            ]),
            "{db}"
        );
    })
    .await;
}

#[tokio::test]
async fn agents_claiming_one_device_at_once_get_one_login_and_conflicts_naming_the_winner() {
    // CLAIMS agents log in on one free device at the same instant (one connection each,
    // released together): exactly one gets the device, every other call is a conflict
    // naming that winner, the session and the audit log name only the winner. Then the
    // control: the same agents on a device each all log in, so the conflicts above come
    // from sharing the device and not from the contention itself.
    const CLAIMS: usize = 8;
    on_both_with_pool(CLAIMS as u32, |store| async move {
        let db = store.dialect();
        let agents: Vec<String> = (0..CLAIMS).map(|n| format!("41{n:02}")).collect();
        let desks: Vec<String> = (0..CLAIMS).map(|n| format!("51{n:02}")).collect();
        for id in &agents {
            store
                .upsert_agent(&agent(id, &[], None), CRM)
                .await
                .expect("agent");
        }
        for id in &desks {
            store.upsert_device(&device(id), CRM).await.expect("device");
        }
        let claim_together = |claims: Vec<(String, String)>| {
            let store = store.clone();
            async move {
                let start = std::sync::Arc::new(tokio::sync::Barrier::new(claims.len()));
                let mut work = tokio::task::JoinSet::new();
                for (id, desk) in claims {
                    let (store, start) = (store.clone(), start.clone());
                    work.spawn(async move {
                        start.wait().await;
                        let outcome = store.login(&id, &desk, CRM).await;
                        (id, outcome)
                    });
                }
                let mut outcomes = Vec::new();
                while let Some(joined) = work.join_next().await {
                    outcomes.push(joined.expect("every claim ends cleanly"));
                }
                outcomes.sort_by(|a, b| a.0.cmp(&b.0));
                outcomes
            }
        };
        let pairs = |sessions: Vec<Session>| -> Vec<(String, String)> {
            sessions.into_iter().map(|s| (s.agent, s.device)).collect()
        };

        // Four rounds, each on a fresh desk, so more than one agent gets to win.
        for desk in &desks[..4] {
            let audited_before = audit(&store).await.len();
            let outcomes =
                claim_together(agents.iter().map(|id| (id.clone(), desk.clone())).collect()).await;
            let winners: Vec<&str> = outcomes
                .iter()
                .filter(|(_, outcome)| matches!(outcome, Ok(Login::New)))
                .map(|(id, _)| id.as_str())
                .collect();
            assert_eq!(winners.len(), 1, "{db} {desk}: {outcomes:?}");
            let winner = winners[0].to_owned();
            for (id, outcome) in &outcomes {
                if *id == winner {
                    continue;
                }
                match outcome {
                    Err(StoreError::Conflict { device, holder }) => {
                        assert_eq!((device, holder), (desk, &winner), "{db}: {id}");
                    }
                    other => panic!("{db}: {id} on {desk} got {other:?}, not a conflict"),
                }
            }
            assert_eq!(
                pairs(store.list_sessions().await.expect("sessions")),
                [(winner.clone(), desk.clone())],
                "{db}"
            );
            let log = audit(&store).await;
            assert_eq!(log.len(), audited_before + 1, "{db}: one audit row");
            assert_eq!(
                (log[0].action.as_str(), log[0].subject.clone()),
                ("agent.login", format!("agent:{winner}")),
                "{db}"
            );
            assert_eq!(
                log[0].detail,
                serde_json::json!({ "device": desk, "moved_from": null })
            );
            assert_eq!(
                store.logout(&winner, CRM).await.expect("logout"),
                Some(desk.clone())
            );
        }

        // The control: a device each, the same contention, no conflict.
        let audited_before = audit(&store).await.len();
        let outcomes = claim_together(agents.iter().cloned().zip(desks.clone()).collect()).await;
        for (id, outcome) in &outcomes {
            assert!(matches!(outcome, Ok(Login::New)), "{db} {id}: {outcome:?}");
        }
        assert_eq!(
            pairs(store.list_sessions().await.expect("sessions")),
            agents
                .iter()
                .cloned()
                .zip(desks.clone())
                .collect::<Vec<_>>(),
            "{db}"
        );
        assert_eq!(audit(&store).await.len(), audited_before + CLAIMS, "{db}");
    })
    .await;
}

#[tokio::test]
async fn an_agent_moving_off_a_device_being_deleted_ends_up_on_the_new_one() {
    on_both_with_pool(4, |store| async move {
        seed(&store).await;
        for round in 0..15 {
            let old = format!("60{round:02}");
            store
                .upsert_device(&device(&old), CRM)
                .await
                .expect("device");
            store.login("1001", &old, CRM).await.expect("login");
            let target = if round % 2 == 0 { "2001" } else { "2002" };
            let (moved, deleted) = tokio::join!(
                store.login("1001", target, CRM),
                store.delete_device(&old, "admin"),
            );
            let moved = moved.expect("login");
            deleted.expect("delete");
            assert!(
                matches!(&moved, Login::New) || moved == Login::Moved { from: old.clone() },
                "{moved:?}"
            );
            let session = store
                .session("1001")
                .await
                .expect("session")
                .expect("logged in");
            assert_eq!(
                session.device,
                target,
                "round {round} on {}",
                store.dialect()
            );
            let deletion = audit(&store)
                .await
                .into_iter()
                .find(|row| row.action == "device.delete")
                .expect("audit row");
            // The deletion logged the agent out only if it ran first, and then the login
            // was a new session.
            let logged_out = !deletion.detail["logged_out"].is_null();
            assert_eq!(logged_out, moved == Login::New, "{deletion:?} {moved:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn credentials_are_set_kept_and_removed_and_never_audited() {
    on_both(|store| async move {
        let desk = Device {
            contact: Some("sip:2001@127.0.0.1:5071".into()),
            ..device("2001")
        };
        let set = DigestCredentials::from_password("2001", "callfleet", "s3cret").expect("valid");
        store
            .put_device(&desk, &CredentialsChange::Set(set.clone()), CRM)
            .await
            .expect("put with credentials");
        let read = store.get_device("2001").await.expect("device");
        assert_eq!(read.contact.as_deref(), Some("sip:2001@127.0.0.1:5071"));
        assert!(read.registers);
        // A rename keeps them.
        store
            .upsert_device(
                &Device {
                    name: Some("desk 12".into()),
                    ..desk.clone()
                },
                CRM,
            )
            .await
            .expect("rename");
        let sip = store.sip_devices(Some("2001")).await.expect("sip device");
        assert_eq!(sip.len(), 1);
        assert_eq!(sip[0].credentials.as_ref(), Some(&set));
        assert_eq!(sip[0].name.as_deref(), Some("desk 12"));
        store
            .put_device(&desk, &CredentialsChange::Remove, CRM)
            .await
            .expect("remove");
        assert!(!store.get_device("2001").await.expect("device").registers);
        assert_eq!(
            store.sip_devices(Some("2001")).await.expect("read")[0].credentials,
            None
        );
        assert_eq!(
            store.sip_devices(Some("no such;id")).await.expect("read"),
            []
        );
        let audit = store.list_audit(100, None).await.expect("audit");
        let credentials: Vec<&str> = audit
            .iter()
            .rev()
            .filter(|entry| entry.action == "device.upsert")
            .map(|entry| entry.detail["credentials"].as_str().expect("said"))
            .collect();
        assert_eq!(credentials, ["set", "kept", "removed"]);
        let everything = format!("{audit:?}");
        assert!(!everything.contains(set.ha1()), "{everything}");
        assert!(!everything.contains("s3cret"), "{everything}");

        for (field, result) in [
            (
                "contact",
                store
                    .upsert_device(
                        &Device {
                            contact: Some("2001@10.0.0.1".into()),
                            ..device("2002")
                        },
                        CRM,
                    )
                    .await,
            ),
            (
                "md5_cred",
                DigestCredentials::from_ha1("callfleet", "xyz").map(|_| ()),
            ),
            (
                "realm",
                DigestCredentials::from_password("2002", "a realm", "pw").map(|_| ()),
            ),
        ] {
            assert!(
                matches!(&result, Err(StoreError::Invalid { field: f, .. }) if *f == field),
                "{field}: {result:?}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn registrations_are_stored_updated_found_by_aor_and_deleted() {
    on_both(|store| async move {
        let row = |id: &str, uri: &str| -> crate::realtime::Row {
            [("id", id), ("uri", uri), ("expiration_time", "1764000000")]
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert_eq!(
            store
                .store_sip_contact(&row("2001;@aaa", "sip:2001@127.0.0.1:5071"), "node-a")
                .await
                .expect("store"),
            1
        );
        store
            .store_sip_contact(&row("2002;@bbb", "sip:2002@127.0.0.1:5072"), "node-b")
            .await
            .expect("store");
        let changed = store
            .update_sip_contact(
                "2001;@aaa",
                &[("expiration_time".to_owned(), "1764000060".to_owned())],
                "node-b",
            )
            .await
            .expect("update");
        assert_eq!(changed, 1);
        assert_eq!(
            store
                .update_sip_contact("2009;@zzz", &[], "node-b")
                .await
                .expect("update of nothing"),
            0
        );
        let of_2001 = store.sip_contacts(Some("2001")).await.expect("read");
        assert_eq!(
            of_2001,
            [{
                let mut updated = row("2001;@aaa", "sip:2001@127.0.0.1:5071");
                updated[2].1 = "1764000060".into();
                updated
            }]
        );
        assert_eq!(store.sip_contacts(None).await.expect("all").len(), 2);
        assert_eq!(
            store
                .delete_sip_contacts(&["2001;@aaa".into(), "2001;@aaa".into()])
                .await
                .expect("delete"),
            1
        );
        assert_eq!(
            store.sip_contacts(Some("2001")).await.expect("read").len(),
            0
        );
        assert!(matches!(
            store.store_sip_contact(&row("", "sip:x"), "node-a").await,
            Err(StoreError::Invalid { field: "id", .. })
        ));
    })
    .await;
}

#[tokio::test]
async fn a_sale_retried_with_its_request_id_counts_once() {
    on_both(|store| async move {
        store
            .upsert_agent(&agent("1001", &[], Some(5)), CRM)
            .await
            .expect("agent");
        store
            .upsert_agent(&agent("1002", &[], None), CRM)
            .await
            .expect("agent");
        let sale = |id: &'static str, actor: &'static str, request: &'static str| {
            let store = store.clone();
            async move { store.record_sale_once(id, DAY, actor, request).await }
        };
        assert_eq!(sale("1001", CRM, "r-1").await.expect("sale"), 1);
        // The CRM lost the answer and sends the same request again: answered, not counted.
        assert_eq!(sale("1001", CRM, "r-1").await.expect("retry"), 1);
        assert_eq!(sale("1001", CRM, "r-2").await.expect("sale"), 2);
        // Request ids are the CRM's own: another token's `r-1` is another request.
        assert_eq!(sale("1001", "crm-other", "r-1").await.expect("sale"), 3);
        assert!(matches!(
            sale("1002", CRM, "r-1").await,
            Err(StoreError::Invalid {
                field: "request id",
                ..
            })
        ));
        assert_eq!(
            store.daily_counts("1001", DAY).await.expect("counts").sales,
            3
        );
        assert_eq!(
            store.daily_counts("1002", DAY).await.expect("counts").sales,
            0
        );
        let sales_audited = store
            .list_audit(100, None)
            .await
            .expect("audit")
            .iter()
            .filter(|entry| entry.action == "agent.record_sale")
            .count();
        assert_eq!(sales_audited, 3, "a retry writes nothing");
        assert!(matches!(
            store.record_sale_once("1001", DAY, CRM, "").await,
            Err(StoreError::Invalid {
                field: "request id",
                ..
            })
        ));
    })
    .await;
}

// ---- call events a node reports (issue 16) ----------------------------------------------

const NODE: &str = "node:pbx-1";

fn answered(queue: &str) -> CallEvent {
    CallEvent::Answered {
        queue: queue.into(),
    }
}

fn ended(wrap_up_ms: u64) -> CallEvent {
    CallEvent::Ended {
        wrap_up: Duration::from_millis(wrap_up_ms),
    }
}

fn missed(queue: &str, max_misses: u32) -> CallEvent {
    CallEvent::Missed {
        queue: queue.into(),
        max_misses,
    }
}

/// `event` of `agent` reported by the node `node:pbx-1` on [`DAY`], without a request id.
async fn report(store: &Store, agent: &str, event: &CallEvent) -> CallEventOutcome {
    store
        .record_call_event(agent, event, DAY, NODE, None)
        .await
        .unwrap_or_else(|err| panic!("{event:?} of {agent} on {}: {err}", store.dialect()))
}

fn missed_outcome(missed_today: u32, misses_in_row: u32, paused: bool) -> CallEventOutcome {
    CallEventOutcome::Missed {
        missed_today,
        misses_in_row,
        paused,
    }
}

#[tokio::test]
async fn answered_puts_the_agent_on_a_call_and_counts_the_call_of_the_day() {
    on_both(|store| async move {
        seed(&store).await;
        store.login("1001", "2001", CRM).await.expect("login");
        let version = store.directory_version().await.expect("version");
        assert_eq!(
            report(&store, "1001", &answered("sales")).await,
            CallEventOutcome::Answered { calls_today: 1 }
        );
        assert_eq!(state(&store, "1001").await.state, AgentState::OnCall);
        assert_eq!(
            store.directory_version().await.expect("version"),
            version + 1,
            "routing refreshes: the version moved once"
        );
        let last = &audit(&store).await[0];
        assert_eq!(
            (
                last.actor.as_str(),
                last.action.as_str(),
                last.subject.as_str()
            ),
            (NODE, "agent.call_answered", "agent:1001")
        );
        assert_eq!(
            last.detail,
            serde_json::json!({ "queue": "sales", "day": DAY, "calls": 1, "previous": "available" })
        );
        // A call of another queue, and one on another day, count on their own days.
        report(&store, "1001", &ended(0)).await;
        assert_eq!(
            report(&store, "1001", &answered("support")).await,
            CallEventOutcome::Answered { calls_today: 2 }
        );
        assert_eq!(
            store
                .record_call_event("1001", &answered("sales"), "2025-03-15", NODE, None)
                .await
                .expect("next day"),
            CallEventOutcome::Answered { calls_today: 1 }
        );
        assert_eq!(
            store.daily_counts("1001", DAY).await.expect("counts"),
            DailyCounts {
                calls: 2,
                sales: 0,
                missed: 0
            }
        );
        // The queue is recorded, not looked up: a call of a queue deleted while it rang
        // still put the agent on a call.
        assert_eq!(
            report(&store, "1002", &answered("gone")).await,
            CallEventOutcome::Answered { calls_today: 1 }
        );
        let snapshot = store.directory_snapshot(DAY).await.expect("snapshot");
        let alice = snapshot.agent("1001").expect("1001");
        assert_eq!(
            (&alice.state, alice.calls_today, alice.missed_today),
            (&AgentState::OnCall, 2, 0)
        );
        assert_eq!(
            snapshot.agent("1002").expect("1002").state,
            AgentState::OnCall
        );
    })
    .await;
}

#[tokio::test]
async fn ended_wraps_up_an_agent_on_the_call_and_keeps_a_supervisor_s_pause() {
    on_both(|store| async move {
        seed(&store).await;
        report(&store, "1001", &answered("sales")).await;
        let CallEventOutcome::Ended { state: wrapping } = report(&store, "1001", &ended(300)).await
        else {
            panic!("an ended outcome");
        };
        let now = state(&store, "1001").await;
        let AgentState::WrapUp { until_ms } = wrapping else {
            panic!("in wrap-up: {wrapping:?}");
        };
        assert_eq!(now.state, AgentState::WrapUp { until_ms });
        assert!(
            (200..=300).contains(&(until_ms - now.now_ms)),
            "{} ms left on {}",
            until_ms - now.now_ms,
            store.dialect()
        );
        assert_eq!(now.idle_since_ms, until_ms, "idle from the end of wrap-up");
        let last = &audit(&store).await[0];
        assert_eq!(
            (last.actor.as_str(), last.action.as_str()),
            (NODE, "agent.call_ended")
        );
        assert_eq!(
            last.detail,
            serde_json::json!({ "wrap_up_ms": 300, "previous": "on_call", "state": "wrap_up" })
        );

        // Without wrap-up the agent is available at once, idle from now.
        report(&store, "1002", &answered("sales")).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let before = state(&store, "1002").await;
        assert_eq!(
            report(&store, "1002", &ended(0)).await,
            CallEventOutcome::Ended {
                state: AgentState::Available
            }
        );
        let after = state(&store, "1002").await;
        assert_eq!(after.state, AgentState::Available);
        assert!(
            after.idle_since_ms >= before.now_ms && after.idle_since_ms <= after.now_ms,
            "idle since the end of the call: {before:?} {after:?}"
        );

        // A supervisor paused the agent during the call: the end of the call keeps it.
        report(&store, "1003", &answered("sales")).await;
        store.pause("1003", "coaching", CRM).await.expect("pause");
        let coaching = AgentState::Paused {
            reason: "coaching".into(),
        };
        assert_eq!(
            report(&store, "1003", &ended(5000)).await,
            CallEventOutcome::Ended {
                state: coaching.clone()
            }
        );
        assert_eq!(state(&store, "1003").await.state, coaching);
        assert_eq!(
            audit(&store).await[0].detail,
            serde_json::json!({ "wrap_up_ms": 5000, "previous": "paused", "state": "paused" })
        );

        // The end of a call reported twice (without a key) leaves the agent where the first
        // report put them, idle time included.
        report(&store, "1002", &ended(60_000)).await;
        assert_eq!(state(&store, "1002").await.state, AgentState::Available);
        assert_eq!(
            state(&store, "1002").await.idle_since_ms,
            after.idle_since_ms
        );
    })
    .await;
}

#[tokio::test]
async fn missed_max_misses_times_in_a_row_pauses_exactly_at_the_last_one() {
    on_both(|store| async move {
        seed(&store).await;
        assert_eq!(
            report(&store, "1001", &missed("sales", 3)).await,
            missed_outcome(1, 1, false)
        );
        assert_eq!(
            report(&store, "1001", &missed("sales", 3)).await,
            missed_outcome(2, 2, false)
        );
        assert_eq!(state(&store, "1001").await.state, AgentState::Available);
        assert_eq!(
            report(&store, "1001", &missed("sales", 3)).await,
            missed_outcome(3, 0, true)
        );
        assert_eq!(
            state(&store, "1001").await.state,
            AgentState::Paused {
                reason: "missed".into()
            }
        );
        let last = &audit(&store).await[0];
        assert_eq!(
            (last.actor.as_str(), last.action.as_str()),
            (NODE, "agent.call_missed")
        );
        assert_eq!(
            last.detail,
            serde_json::json!({
                "queue": "sales", "day": DAY, "missed": 3, "misses_in_row": 0,
                "max_misses": 3, "paused": true, "previous": "available",
            })
        );
        assert_eq!(
            store.daily_counts("1001", DAY).await.expect("counts"),
            DailyCounts {
                calls: 0,
                sales: 0,
                missed: 3
            }
        );
        let snapshot = store.directory_snapshot(DAY).await.expect("snapshot");
        assert_eq!(snapshot.agent("1001").expect("1001").missed_today, 3);

        // Back from the pause, the row starts from zero; a limit of 1 pauses at once.
        store.unpause("1001", CRM).await.expect("unpause");
        assert_eq!(
            report(&store, "1001", &missed("support", 1)).await,
            missed_outcome(4, 0, true)
        );
    })
    .await;
}

#[tokio::test]
async fn an_answered_call_between_misses_starts_the_row_again() {
    on_both(|store| async move {
        seed(&store).await;
        report(&store, "1001", &missed("sales", 3)).await;
        report(&store, "1001", &missed("sales", 3)).await;
        report(&store, "1001", &answered("sales")).await;
        report(&store, "1001", &ended(0)).await;
        assert_eq!(
            report(&store, "1001", &missed("sales", 3)).await,
            missed_outcome(3, 1, false)
        );
        assert_eq!(
            report(&store, "1001", &missed("sales", 3)).await,
            missed_outcome(4, 2, false)
        );
        assert_eq!(state(&store, "1001").await.state, AgentState::Available);
        assert_eq!(
            report(&store, "1001", &missed("sales", 3)).await,
            missed_outcome(5, 0, true)
        );
        assert_eq!(
            store.daily_counts("1001", DAY).await.expect("counts"),
            DailyCounts {
                calls: 1,
                sales: 0,
                missed: 5
            }
        );
    })
    .await;
}

#[tokio::test]
async fn the_last_miss_keeps_a_state_other_than_available() {
    on_both(|store| async move {
        seed(&store).await;
        // Paused by a supervisor: their reason stays, and the row starts again.
        report(&store, "1001", &missed("sales", 2)).await;
        store.pause("1001", "lunch", CRM).await.expect("pause");
        assert_eq!(
            report(&store, "1001", &missed("sales", 2)).await,
            missed_outcome(2, 0, false)
        );
        assert_eq!(
            state(&store, "1001").await.state,
            AgentState::Paused {
                reason: "lunch".into()
            }
        );
        // On a call (a ring that crossed the answer of another): the call stays.
        report(&store, "1002", &answered("sales")).await;
        report(&store, "1002", &missed("sales", 1)).await;
        assert_eq!(state(&store, "1002").await.state, AgentState::OnCall);
        // In a wrap-up that has ended the agent can be rung, so is paused like one available;
        // in one still running they cannot, and keep it.
        report(&store, "1003", &answered("sales")).await;
        report(&store, "1003", &ended(1)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            report(&store, "1003", &missed("sales", 1)).await,
            missed_outcome(1, 0, true)
        );
        store.unpause("1003", CRM).await.expect("unpause");
        report(&store, "1003", &answered("sales")).await;
        report(&store, "1003", &ended(60_000)).await;
        assert_eq!(
            report(&store, "1003", &missed("sales", 1)).await,
            missed_outcome(2, 0, false)
        );
        assert!(matches!(
            state(&store, "1003").await.state,
            AgentState::WrapUp { .. }
        ));
    })
    .await;
}

#[tokio::test]
async fn a_call_event_retried_with_its_request_id_counts_once() {
    on_both(|store| async move {
        seed(&store).await;
        let once =
            |agent: &'static str, event: CallEvent, actor: &'static str, key: &'static str| {
                let store = store.clone();
                async move {
                    store
                        .record_call_event(agent, &event, DAY, actor, Some(key))
                        .await
                }
            };
        let first = once("1001", answered("sales"), NODE, "a-1")
            .await
            .expect("answered");
        assert_eq!(first, CallEventOutcome::Answered { calls_today: 1 });
        // The node lost the answer and sends the same report again: answered, not counted.
        assert_eq!(
            once("1001", answered("sales"), NODE, "a-1")
                .await
                .expect("retry"),
            first
        );
        let wrap = once("1001", ended(60_000), NODE, "e-1")
            .await
            .expect("ended");
        // The retry does not start the wrap-up again: the same end is answered.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            once("1001", ended(60_000), NODE, "e-1")
                .await
                .expect("retry"),
            wrap
        );
        let CallEventOutcome::Ended { state: wrapping } = &wrap else {
            panic!("ended: {wrap:?}");
        };
        assert_eq!(&state(&store, "1001").await.state, wrapping);
        store.unpause("1001", CRM).await.expect("back");
        assert_eq!(
            once("1001", missed("sales", 2), NODE, "m-1")
                .await
                .expect("missed"),
            missed_outcome(1, 1, false)
        );
        for _ in 0..2 {
            assert_eq!(
                once("1001", missed("sales", 2), NODE, "m-1")
                    .await
                    .expect("retry"),
                missed_outcome(1, 1, false),
                "a retry is not a second miss in a row"
            );
        }
        assert_eq!(state(&store, "1001").await.state, AgentState::Available);
        // Request ids are each node's own: another node's `m-1` is another report.
        assert_eq!(
            once("1001", missed("sales", 2), "node:pbx-2", "m-1")
                .await
                .expect("missed"),
            missed_outcome(2, 0, true)
        );
        // An id sent again with another event or agent is refused, naming its first use.
        for (agent, event) in [("1001", ended(0)), ("1002", answered("sales"))] {
            let err = once(agent, event, NODE, "a-1").await.expect_err("reused");
            assert!(
                matches!(
                    &err,
                    StoreError::Invalid {
                        field: "request id",
                        reason,
                    } if reason.contains("agent.call_answered of agent:1001")
                ),
                "{err}"
            );
        }
        assert_eq!(
            store.daily_counts("1001", DAY).await.expect("counts"),
            DailyCounts {
                calls: 1,
                sales: 0,
                missed: 2
            }
        );
        let events: Vec<String> = audit(&store)
            .await
            .into_iter()
            .filter(|row| row.action.starts_with("agent.call_"))
            .map(|row| row.action)
            .collect();
        assert_eq!(
            events,
            [
                "agent.call_missed",
                "agent.call_missed",
                "agent.call_ended",
                "agent.call_answered"
            ],
            "a retry writes nothing"
        );
    })
    .await;
}

#[tokio::test]
async fn invalid_call_events_are_refused_naming_the_field_and_change_nothing() {
    on_both(|store| async move {
        seed(&store).await;
        let rows = audit(&store).await.len();
        let version = store.directory_version().await.expect("version");
        let refused = |agent: &'static str, event: CallEvent, key: Option<&'static str>| {
            let store = store.clone();
            async move {
                store
                    .record_call_event(agent, &event, DAY, NODE, key)
                    .await
                    .expect_err("refused")
            }
        };
        let field_of = |err: &StoreError| match err {
            StoreError::Invalid { field, .. } => *field,
            other => panic!("not an invalid field: {other}"),
        };
        let err = refused("1001", missed("sales", 0), None).await;
        assert_eq!(field_of(&err), "max_misses");
        assert_eq!(
            err.to_string(),
            "invalid max_misses: must be at least 1 (1 pauses the agent at their first miss)"
        );
        let err = refused("1001", ended(86_400_001), None).await;
        assert_eq!(
            err.to_string(),
            "invalid wrap_up_ms: 86400001 ms is longer than a day; send at most 86400000 (0: available at once)"
        );
        assert_eq!(
            field_of(&refused("1001", answered("sa les"), None).await),
            "queue id"
        );
        assert_eq!(
            field_of(&refused("1001", answered("sales"), Some("")).await),
            "request id"
        );
        let err = refused("1009", answered("sales"), None).await;
        assert!(
            matches!(&err, StoreError::NotFound { kind: "agent", id } if id == "1009"),
            "{err}"
        );
        // A day's wrap-up is the longest accepted.
        report(&store, "1001", &answered("sales")).await;
        report(&store, "1001", &ended(86_400_000)).await;
        assert_eq!(audit(&store).await.len(), rows + 2);
        assert_eq!(
            store.directory_version().await.expect("version"),
            version + 2
        );
        assert_eq!(
            store.daily_counts("1001", DAY).await.expect("counts"),
            DailyCounts {
                calls: 1,
                sales: 0,
                missed: 0
            }
        );
    })
    .await;
}

fn ringing(queue: &str) -> CallEvent {
    CallEvent::Ringing {
        queue: queue.into(),
    }
}

/// The ring of `agent` as the agent's read, the ringing agents' read and a snapshot show
/// it; panics unless all three agree.
async fn ring_of(store: &Store, agent: &str) -> Option<Ringing> {
    let read = state(store, agent).await.ringing;
    let listed = store.ringing_agents().await.expect("ringing agents");
    assert_eq!(listed.get(agent), read.as_ref(), "{}", store.dialect());
    let snapshot = store.directory_snapshot(DAY).await.expect("snapshot");
    assert_eq!(
        snapshot.agent(agent).expect("agent").ringing,
        read,
        "{}",
        store.dialect()
    );
    read
}

/// Reports a ring of `agent` from `queue`: the ring the store answered; panics unless it
/// answered one.
async fn ring(store: &Store, agent: &str, queue: &str) -> Ringing {
    let CallEventOutcome::Ringing { since_ms } = report(store, agent, &ringing(queue)).await else {
        panic!("a ringing outcome on {}", store.dialect());
    };
    Ringing {
        since_ms,
        queue: queue.into(),
    }
}

/// The action and detail of the newest audit row.
async fn last_audit(store: &Store) -> (String, serde_json::Value) {
    let last = audit(store).await.remove(0);
    assert_eq!(last.actor, NODE);
    (last.action, last.detail)
}

#[tokio::test]
async fn a_ring_is_recorded_for_supervisors_and_cleared_by_what_ends_it() {
    on_both(|store| async move {
        seed(&store).await;
        store.login("1001", "2001", CRM).await.expect("login");
        let db = store.dialect();
        let version = store.directory_version().await.expect("version");
        let rows = audit(&store).await.len();
        let before = store.now_ms().await.expect("now");
        let sales_ring = ring(&store, "1001", "sales").await;
        let since_ms = sales_ring.since_ms;
        let after = store.now_ms().await.expect("now");
        assert!(
            (before..=after).contains(&since_ms),
            "{before} <= {since_ms} <= {after} on {db}"
        );
        assert_eq!(ring_of(&store, "1001").await, Some(sales_ring.clone()));
        // Routing's state, the counters and the version are left alone.
        assert_eq!(state(&store, "1001").await.state, AgentState::Available);
        assert_eq!(
            store.daily_counts("1001", DAY).await.expect("counts"),
            DailyCounts::default()
        );
        assert_eq!(
            store.directory_version().await.expect("version"),
            version,
            "{db}: a ring does not re-read the directory"
        );
        assert_eq!(
            last_audit(&store).await,
            (
                "agent.call_ringing".to_owned(),
                serde_json::json!({ "queue": "sales", "since_ms": since_ms, "previous": "available" })
            )
        );
        assert_eq!(ring_of(&store, "1002").await, None);

        // Answered ends the ring, with the version move it makes anyway.
        report(&store, "1001", &answered("sales")).await;
        assert_eq!(ring_of(&store, "1001").await, None);
        assert_eq!(state(&store, "1001").await.state, AgentState::OnCall);
        assert_eq!(
            store.directory_version().await.expect("version"),
            version + 1
        );

        // Missed ends it, and counts the miss.
        let support = ring(&store, "1002", "support").await;
        assert_eq!(ring_of(&store, "1002").await, Some(support));
        assert_eq!(
            report(&store, "1002", &missed("support", 3)).await,
            missed_outcome(1, 1, false)
        );
        assert_eq!(ring_of(&store, "1002").await, None);

        // A ring that ended otherwise (the caller hung up): cleared, nothing counted, the
        // version left alone.
        let version = store.directory_version().await.expect("version");
        let third = ring(&store, "1003", "sales").await.since_ms;
        assert_eq!(
            report(&store, "1003", &CallEvent::RingEnded).await,
            CallEventOutcome::RingEnded
        );
        assert_eq!(ring_of(&store, "1003").await, None);
        assert_eq!(state(&store, "1003").await.state, AgentState::Available);
        assert_eq!(
            store.daily_counts("1003", DAY).await.expect("counts"),
            DailyCounts::default()
        );
        assert_eq!(
            last_audit(&store).await,
            (
                "agent.ring_ended".to_owned(),
                serde_json::json!({ "ringing_since_ms": third, "queue": "sales", "previous": "available" })
            )
        );
        // The end of a ring the store never saw start is recorded as such.
        report(&store, "1003", &CallEvent::RingEnded).await;
        assert_eq!(
            last_audit(&store).await.1,
            serde_json::json!({ "ringing_since_ms": null, "queue": null, "previous": "available" })
        );
        assert_eq!(
            store.directory_version().await.expect("version"),
            version,
            "{db}: neither a ring nor its end moves the version"
        );

        // The end of a call clears a ring too; a new ring replaces an old one.
        report(&store, "1001", &ringing("sales")).await;
        report(&store, "1001", &ended(0)).await;
        assert_eq!(ring_of(&store, "1001").await, None);
        report(&store, "1002", &ringing("sales")).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        let again = ring(&store, "1002", "support").await;
        assert_eq!(ring_of(&store, "1002").await, Some(again));
        let listed: Vec<String> = store
            .ringing_agents()
            .await
            .expect("ringing agents")
            .into_keys()
            .collect();
        assert_eq!(listed, ["1002"]);
        // One audit row per report: a ring and an answer, a ring and a miss, a ring and two
        // ends, a ring and an end of call, two rings.
        assert_eq!(audit(&store).await.len(), rows + 11, "{db}");
    })
    .await;
}

#[tokio::test]
async fn a_ring_retried_with_its_request_id_is_recorded_once() {
    on_both(|store| async move {
        seed(&store).await;
        let once = |event: CallEvent, key: &'static str| {
            let store = store.clone();
            async move {
                store
                    .record_call_event("1001", &event, DAY, NODE, Some(key))
                    .await
            }
        };
        let first = once(ringing("sales"), "r-1").await.expect("ringing");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            once(ringing("sales"), "r-1").await.expect("retry"),
            first,
            "a retry answers the first ring's start"
        );
        let CallEventOutcome::Ringing { since_ms } = first else {
            panic!("ringing: {first:?}");
        };
        assert_eq!(
            state(&store, "1001").await.ringing,
            Some(Ringing {
                since_ms,
                queue: "sales".into()
            })
        );
        for _ in 0..2 {
            assert_eq!(
                once(CallEvent::RingEnded, "r-1-end").await.expect("ended"),
                CallEventOutcome::RingEnded
            );
        }
        assert_eq!(state(&store, "1001").await.ringing, None);
        let err = once(CallEvent::RingEnded, "r-1")
            .await
            .expect_err("reused");
        assert_eq!(
            err.to_string(),
            "invalid request id: `r-1` was used for agent.call_ringing of agent:1001; send a new id for every new request"
        );
        let events: Vec<String> = audit(&store)
            .await
            .into_iter()
            .filter(|row| row.subject == "agent:1001")
            .map(|row| row.action)
            .collect();
        assert_eq!(
            events,
            ["agent.ring_ended", "agent.call_ringing", "agent.upsert"],
            "a retry writes nothing"
        );
    })
    .await;
}

#[tokio::test]
async fn an_invalid_ring_is_refused_naming_the_field_and_changes_nothing() {
    on_both(|store| async move {
        seed(&store).await;
        let rows = audit(&store).await.len();
        let err = store
            .record_call_event("1001", &ringing("sa les"), DAY, NODE, None)
            .await
            .expect_err("refused");
        assert_eq!(
            err.to_string(),
            "invalid queue id: `sa les` may only contain ASCII letters, digits, '-', '_' and '.'"
        );
        for event in [ringing("sales"), CallEvent::RingEnded] {
            let err = store
                .record_call_event("1009", &event, DAY, NODE, None)
                .await
                .expect_err("refused");
            assert!(
                matches!(&err, StoreError::NotFound { kind: "agent", id } if id == "1009"),
                "{err}"
            );
        }
        assert_eq!(audit(&store).await.len(), rows);
        assert_eq!(
            store.ringing_agents().await.expect("ringing"),
            BTreeMap::new()
        );
    })
    .await;
}

/// Writes the schema of migrations 1 to `version` where `config` points, and `statements`
/// into it: a store as an older callfleet left it.
async fn store_of_version(config: &StoreConfig, version: i64, statements: &[&'static str]) {
    let mut old = migrator(if config.sqlite_path().is_some() {
        &dialect::SQLITE
    } else {
        &dialect::MYSQL
    });
    let kept: Vec<_> = old
        .iter()
        .filter(|m| m.version <= version)
        .cloned()
        .collect();
    old = sqlx::migrate::Migrator::with_migrations(kept);
    old.set_locking(false);
    if let Some(path) = config.sqlite_path() {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(options)
            .await
            .expect("sqlite");
        old.run(&pool).await.expect("migrate");
        for &statement in statements {
            sqlx::query(statement).execute(&pool).await.expect("row");
        }
        pool.close().await;
    } else {
        let pool = sqlx::MySqlPool::connect(&config.url)
            .await
            .expect("mariadb");
        old.run(&pool).await.expect("migrate");
        for &statement in statements {
            sqlx::query(statement).execute(&pool).await.expect("row");
        }
        pool.close().await;
    }
}

/// Runs `scenario` on a store of each backend (SQLite, then a fresh MariaDB database) that
/// an older callfleet left at migration `version` with `statements`, once opening it has
/// migrated it.
async fn on_both_migrated_from<F, Fut>(version: i64, statements: &[&'static str], scenario: F)
where
    F: Fn(Store) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("temp dir");
    for config in [
        testing::sqlite_config(dir.path()),
        testing::fresh_mysql_config().await,
    ] {
        store_of_version(&config, version, statements).await;
        let store = Store::connect(&config).await.expect("migrates");
        scenario(store.clone()).await;
        store.close().await;
    }
}

#[tokio::test]
async fn a_store_of_the_previous_version_migrates_keeping_counters_and_request_ids() {
    // The schema and rows of the version before call events (migrations 1–5).
    let statements = [
        "INSERT INTO agents (id, name, tags, enabled, state, idle_since_ms) \
         VALUES ('1001', 'Alice', '[]', 1, 'available', 0)",
        "INSERT INTO daily_counters (agent_id, day, calls, sales) \
         VALUES ('1001', '2025-03-14', 4, 2)",
        "INSERT INTO request_ids (actor, request_id, action, subject, result, at_ms) \
         VALUES ('crm-main', 'r-1', 'agent.record_sale', 'agent:1001', 2, 0)",
    ];
    on_both_migrated_from(5, &statements, |store| async move {
        let db = store.dialect();
        assert_eq!(
            store.daily_counts("1001", DAY).await.expect("counts"),
            DailyCounts {
                calls: 4,
                sales: 2,
                missed: 0
            },
            "{db}"
        );
        // A sale remembered before the migration is still answered, not counted again.
        assert_eq!(
            store
                .record_sale_once("1001", DAY, CRM, "r-1")
                .await
                .expect("retry"),
            2,
            "{db}"
        );
        assert_eq!(
            report(&store, "1001", &missed("sales", 2)).await,
            missed_outcome(1, 1, false),
            "{db}"
        );
    })
    .await;
}

#[tokio::test]
async fn concurrent_misses_are_all_counted_and_pause_once() {
    on_both(|store| async move {
        seed(&store).await;
        let mut misses = tokio::task::JoinSet::new();
        for node in 0..20 {
            let store = store.clone();
            misses.spawn(async move {
                store
                    .record_call_event(
                        "1001",
                        &missed("sales", 5),
                        DAY,
                        &format!("node:pbx-{node}"),
                        None,
                    )
                    .await
            });
        }
        let mut counts = Vec::new();
        let mut pauses = 0;
        while let Some(joined) = misses.join_next().await {
            match joined.expect("task").expect("missed") {
                CallEventOutcome::Missed {
                    missed_today,
                    paused,
                    ..
                } => {
                    counts.push(missed_today);
                    pauses += usize::from(paused);
                }
                other => panic!("not a miss: {other:?}"),
            }
        }
        counts.sort_unstable();
        assert_eq!(
            counts,
            (1..=20).collect::<Vec<u32>>(),
            "{}",
            store.dialect()
        );
        // The 5th paused the agent; the 10th, 15th and 20th found them paused already.
        assert_eq!(pauses, 1, "{}", store.dialect());
        assert_eq!(
            state(&store, "1001").await.state,
            AgentState::Paused {
                reason: "missed".into()
            }
        );
    })
    .await;
}

/// Reports what became of a call of `queue` that waited `waited_ms`, as node pbx-1.
async fn outcome(
    store: &Store,
    queue: &str,
    outcome: CallOutcome,
    waited_ms: u64,
    day: &str,
    key: Option<&str>,
) -> Result<QueueCounts, StoreError> {
    store
        .record_call_outcome(
            queue,
            outcome,
            Duration::from_millis(waited_ms),
            day,
            NODE,
            key,
        )
        .await
}

fn counts(answered: u32, abandoned: u32, overflowed: u32, within: u32) -> QueueCounts {
    QueueCounts {
        answered,
        abandoned,
        overflowed,
        answered_within_sl: within,
    }
}

#[tokio::test]
async fn call_outcomes_count_per_queue_and_day_and_the_threshold_itself_is_within() {
    on_both(|store| async move {
        seed(&store).await;
        let db = store.dialect();
        let support = Queue {
            service_level_ms: 30_000,
            ..queue("support")
        };
        store.upsert_queue(&support, CRM).await.expect("threshold");
        assert_eq!(
            store
                .get_queue("support")
                .await
                .expect("get")
                .service_level_ms,
            30_000
        );
        assert_eq!(
            store
                .get_queue("sales")
                .await
                .expect("get")
                .service_level_ms,
            20_000,
            "{db}: the default"
        );
        let rows = audit(&store).await.len();
        let version = store.directory_version().await.expect("version");
        let steps = [
            // (queue, outcome, waited ms, day, counts of that queue and day after it)
            (
                "sales",
                CallOutcome::Answered,
                20_000,
                DAY,
                counts(1, 0, 0, 1),
            ),
            (
                "sales",
                CallOutcome::Answered,
                20_001,
                DAY,
                counts(2, 0, 0, 1),
            ),
            ("sales", CallOutcome::Answered, 0, DAY, counts(3, 0, 0, 2)),
            (
                "sales",
                CallOutcome::Abandoned,
                5_000,
                DAY,
                counts(3, 1, 0, 2),
            ),
            (
                "sales",
                CallOutcome::Overflowed,
                600_000,
                DAY,
                counts(3, 1, 1, 2),
            ),
            // Abandoned within the threshold is still not answered within it.
            ("sales", CallOutcome::Abandoned, 1, DAY, counts(3, 2, 1, 2)),
            (
                "support",
                CallOutcome::Answered,
                25_000,
                DAY,
                counts(1, 0, 0, 1),
            ),
            (
                "sales",
                CallOutcome::Answered,
                1_000,
                "2025-03-15",
                counts(1, 0, 0, 1),
            ),
        ];
        for (step, (queue, what, waited, day, expected)) in steps.into_iter().enumerate() {
            assert_eq!(
                outcome(&store, queue, what, waited, day, None)
                    .await
                    .expect("counted"),
                expected,
                "{db} step {step}"
            );
        }
        assert_eq!(
            store.queue_daily_counts("sales", DAY).await.expect("read"),
            counts(3, 2, 1, 2)
        );
        assert_eq!(
            store
                .queue_daily_counts("support", "2025-03-15")
                .await
                .expect("read"),
            QueueCounts::default(),
            "{db}: a day without calls is zero"
        );
        assert_eq!(
            store.queue_counts_of_day(DAY).await.expect("read"),
            BTreeMap::from([
                ("sales".to_owned(), counts(3, 2, 1, 2)),
                ("support".to_owned(), counts(1, 0, 0, 1)),
            ])
        );
        assert_eq!(
            store.queue_counts_of_day("2025-03-16").await.expect("read"),
            BTreeMap::new()
        );
        // 2 within the service level of 3 answered + 2 abandoned: 40 %.
        assert_eq!(counts(3, 2, 1, 2).service_level_pct(), Some(40.0));
        assert_eq!(counts(2, 1, 0, 2).service_level_pct(), Some(66.7));
        assert_eq!(counts(0, 0, 4, 0).service_level_pct(), None);
        assert_eq!(
            (
                audit(&store).await.len(),
                store.directory_version().await.expect("version")
            ),
            (rows, version),
            "{db}: outcomes write no audit row and leave the directory version alone"
        );
        // A lower threshold applies to the calls counted from then on.
        let strict = Queue {
            service_level_ms: 1,
            ..queue("sales")
        };
        store.upsert_queue(&strict, CRM).await.expect("threshold");
        assert_eq!(
            outcome(&store, "sales", CallOutcome::Answered, 2, DAY, None)
                .await
                .expect("counted"),
            counts(4, 2, 1, 2)
        );
        assert_eq!(
            outcome(&store, "sales", CallOutcome::Answered, 1, DAY, None)
                .await
                .expect("counted"),
            counts(5, 2, 1, 3)
        );
        // Deleting the queue deletes its counters: a queue made again starts from zero.
        store.delete_queue("sales", CRM).await.expect("delete");
        let deleted = audit(&store).await.into_iter().next().expect("a row");
        assert_eq!(
            deleted.detail,
            serde_json::json!({ "members_removed": 0, "counter_days_removed": 2 })
        );
        store
            .upsert_queue(&queue("sales"), CRM)
            .await
            .expect("again");
        assert_eq!(
            store.queue_daily_counts("sales", DAY).await.expect("read"),
            QueueCounts::default()
        );
    })
    .await;
}

#[tokio::test]
async fn a_call_outcome_retried_with_its_request_id_counts_once() {
    on_both(|store| async move {
        seed(&store).await;
        let first = outcome(
            &store,
            "sales",
            CallOutcome::Answered,
            3_000,
            DAY,
            Some("o-1"),
        )
        .await
        .expect("answered");
        assert_eq!(first, counts(1, 0, 0, 1));
        outcome(
            &store,
            "sales",
            CallOutcome::Abandoned,
            3_000,
            DAY,
            Some("o-2"),
        )
        .await
        .expect("abandoned");
        // The node lost the first answer and sends it again: answered as the first time.
        for _ in 0..2 {
            assert_eq!(
                outcome(
                    &store,
                    "sales",
                    CallOutcome::Answered,
                    3_000,
                    DAY,
                    Some("o-1")
                )
                .await
                .expect("retry"),
                first
            );
        }
        // An id sent again for another outcome, queue or agent event is refused.
        for (queue, what) in [
            ("sales", CallOutcome::Overflowed),
            ("support", CallOutcome::Answered),
        ] {
            let err = outcome(&store, queue, what, 0, DAY, Some("o-1"))
                .await
                .expect_err("reused");
            assert!(
                matches!(
                    &err,
                    StoreError::Invalid {
                        field: "request id",
                        reason,
                    } if reason.contains("queue.call_answered of queue:sales")
                ),
                "{err}"
            );
        }
        let err = store
            .record_call_event("1001", &answered("sales"), DAY, NODE, Some("o-1"))
            .await
            .expect_err("reused");
        assert!(
            err.to_string()
                .contains("queue.call_answered of queue:sales"),
            "{err}"
        );
        // Another node's `o-1` is another call.
        assert_eq!(
            store
                .record_call_outcome(
                    "sales",
                    CallOutcome::Answered,
                    Duration::from_secs(60),
                    DAY,
                    "node:pbx-2",
                    Some("o-1"),
                )
                .await
                .expect("answered"),
            counts(2, 1, 0, 1)
        );
        assert_eq!(
            store.queue_daily_counts("sales", DAY).await.expect("read"),
            counts(2, 1, 0, 1)
        );
    })
    .await;
}

#[tokio::test]
async fn invalid_queue_figures_are_refused_naming_the_field_and_change_nothing() {
    on_both(|store| async move {
        seed(&store).await;
        let rows = audit(&store).await.len();
        for ms in [0, MAX_SERVICE_LEVEL_MS + 1] {
            let err = store
                .upsert_queue(
                    &Queue {
                        service_level_ms: ms,
                        ..queue("sales")
                    },
                    CRM,
                )
                .await
                .expect_err("out of range");
            assert_eq!(
                err.to_string(),
                format!(
                    "invalid service_level_ms: {ms} is not between 1 and 3600000 (an hour); send the longest wait in ms that still counts as answered in time, e.g. 20000"
                )
            );
        }
        store
            .upsert_queue(
                &Queue {
                    service_level_ms: MAX_SERVICE_LEVEL_MS,
                    ..queue("sales")
                },
                CRM,
            )
            .await
            .expect("an hour is the longest");
        for (result, field) in [
            (
                outcome(&store, "sales", CallOutcome::Answered, 0, "14/03/2025", None).await,
                "day",
            ),
            (
                outcome(&store, "sales", CallOutcome::Answered, 0, DAY, Some("a b")).await,
                "request id",
            ),
            (
                outcome(&store, "sa les", CallOutcome::Answered, 0, DAY, None).await,
                "queue id",
            ),
        ] {
            assert!(
                matches!(&result, Err(StoreError::Invalid { field: f, .. }) if *f == field),
                "{field}: {result:?}"
            );
        }
        assert_eq!(
            store.queue_daily_counts("sales", DAY).await.expect("read"),
            QueueCounts::default()
        );
        assert_eq!(audit(&store).await.len(), rows + 1, "the one queue change");
    })
    .await;
}

#[tokio::test]
async fn concurrent_call_outcomes_are_all_counted() {
    on_both(|store| async move {
        seed(&store).await;
        let mut reports = tokio::task::JoinSet::new();
        for call in 0..30u64 {
            let store = store.clone();
            reports.spawn(async move {
                let what = if call % 3 == 0 {
                    CallOutcome::Abandoned
                } else {
                    CallOutcome::Answered
                };
                store
                    .record_call_outcome(
                        "sales",
                        what,
                        Duration::from_secs(call),
                        DAY,
                        &format!("node:pbx-{}", call % 4),
                        Some(&format!("c-{call}")),
                    )
                    .await
            });
        }
        while let Some(joined) = reports.join_next().await {
            joined.expect("task").expect("counted");
        }
        // 20 answered, of which those that waited 0–20 s (1, 2, 4, … 20: 14) are within.
        assert_eq!(
            store.queue_daily_counts("sales", DAY).await.expect("read"),
            counts(20, 10, 0, 14),
            "{}",
            store.dialect()
        );
    })
    .await;
}

#[tokio::test]
async fn a_store_of_the_previous_version_migrates_giving_queues_the_default_service_level() {
    // The schema and rows of the version before queue figures (migrations 1–6).
    let statements = [
        "INSERT INTO queues (id, name) VALUES ('sales', 'Sales')",
        "INSERT INTO agents (id, name, tags, enabled, state, idle_since_ms) \
         VALUES ('1001', 'Alice', '[]', 1, 'available', 0)",
        "INSERT INTO daily_counters (agent_id, day, calls, sales, missed) \
         VALUES ('1001', '2025-03-14', 4, 2, 1)",
    ];
    on_both_migrated_from(6, &statements, |store| async move {
        let db = store.dialect();
        assert_eq!(
            store.get_queue("sales").await.expect("queue"),
            Queue {
                id: "sales".into(),
                name: "Sales".into(),
                service_level_ms: 20_000,
            },
            "{db}"
        );
        assert_eq!(
            store.daily_counts("1001", DAY).await.expect("counts"),
            DailyCounts {
                calls: 4,
                sales: 2,
                missed: 1
            },
            "{db}"
        );
        assert_eq!(
            outcome(
                &store,
                "sales",
                CallOutcome::Answered,
                20_000,
                DAY,
                Some("m-1")
            )
            .await
            .expect("counted"),
            counts(1, 0, 0, 1),
            "{db}"
        );
    })
    .await;
}

fn words(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|item| (*item).to_owned()).collect()
}

fn entry(number: &str, attributes: &[&str]) -> CallerEntry {
    CallerEntry {
        number: number.into(),
        attributes: words(attributes),
    }
}

#[tokio::test]
async fn caller_attributes_are_set_replaced_read_listed_and_removed_with_their_audit_rows() {
    on_both(|store| async move {
        let db = store.dialect();
        let version = store.directory_version().await.expect("version");
        assert_eq!(
            store
                .set_caller_attributes("+49 (30) 1234-567", &words(&["vip"]), CRM)
                .await
                .expect("set"),
            entry("+49301234567", &["vip"]),
            "{db}: stored under the normalised number"
        );
        store
            .set_caller_attributes("+4930999", &words(&["vip", "fr"]), CRM)
            .await
            .expect("set");
        store
            .set_caller_attributes("004930111", &words(&["gold"]), CRM)
            .await
            .expect("set");
        // Any spelling of a number reads the same entry; a number not listed reads empty.
        assert_eq!(
            store
                .caller_attributes("+49.30.1234.567")
                .await
                .expect("read"),
            entry("+49301234567", &["vip"]),
            "{db}"
        );
        assert_eq!(
            store.caller_attributes("+4930555").await.expect("read"),
            entry("+4930555", &[]),
            "{db}"
        );
        // Replaced, not merged.
        store
            .set_caller_attributes("+4930999", &words(&["es"]), "supervisor-ui")
            .await
            .expect("replace");
        assert_eq!(
            store.caller_attributes("+4930999").await.expect("read"),
            entry("+4930999", &["es"]),
            "{db}"
        );

        // Listed by number as bytes (`+` before digits), in pages.
        let all = store.list_callers(None, 1000).await.expect("list");
        assert_eq!(
            all,
            [
                entry("+49301234567", &["vip"]),
                entry("+4930999", &["es"]),
                entry("004930111", &["gold"]),
            ],
            "{db}"
        );
        let first = store.list_callers(None, 2).await.expect("page 1");
        let second = store
            .list_callers(Some(&first[1].number), 2)
            .await
            .expect("page 2");
        assert_eq!(first, all[..2], "{db}");
        assert_eq!(second, all[2..], "{db}");
        assert_eq!(
            store
                .list_callers(Some("004930111"), 2)
                .await
                .expect("past the end"),
            []
        );

        // An empty set removes the number, as does a removal, which answers what it had.
        store
            .set_caller_attributes("+4930999", &BTreeSet::new(), CRM)
            .await
            .expect("emptied");
        assert_eq!(
            store
                .remove_caller("0049 30 111", CRM)
                .await
                .expect("remove"),
            Some(words(&["gold"])),
            "{db}"
        );
        assert_eq!(
            store.remove_caller("004930111", CRM).await.expect("again"),
            None,
            "{db}: removing a number that is not listed succeeds"
        );
        assert_eq!(
            store.list_callers(None, 10).await.expect("list"),
            [entry("+49301234567", &["vip"])],
            "{db}"
        );

        let rows = audit(&store).await;
        let summary: Vec<(&str, &str, &str, serde_json::Value)> = rows
            .iter()
            .map(|row| {
                (
                    row.actor.as_str(),
                    row.action.as_str(),
                    row.subject.as_str(),
                    row.detail.clone(),
                )
            })
            .collect();
        use serde_json::json;
        assert_eq!(
            summary,
            [
                (
                    CRM,
                    "caller.remove",
                    "caller:004930111",
                    json!({ "removed": null })
                ),
                (
                    CRM,
                    "caller.remove",
                    "caller:004930111",
                    json!({ "removed": ["gold"] })
                ),
                (
                    CRM,
                    "caller.set_attributes",
                    "caller:+4930999",
                    json!({ "attributes": [], "previous": ["es"] })
                ),
                (
                    "supervisor-ui",
                    "caller.set_attributes",
                    "caller:+4930999",
                    json!({ "attributes": ["es"], "previous": ["fr", "vip"] })
                ),
                (
                    CRM,
                    "caller.set_attributes",
                    "caller:004930111",
                    json!({ "attributes": ["gold"], "previous": [] })
                ),
                (
                    CRM,
                    "caller.set_attributes",
                    "caller:+4930999",
                    json!({ "attributes": ["fr", "vip"], "previous": [] })
                ),
                (
                    CRM,
                    "caller.set_attributes",
                    "caller:+49301234567",
                    json!({ "attributes": ["vip"], "previous": [] })
                ),
            ],
            "{db}"
        );
        // Routing's snapshot does not hold the lists: no re-read for them.
        assert_eq!(
            store.directory_version().await.expect("version"),
            version,
            "{db}"
        );
    })
    .await;
}

#[tokio::test]
async fn invalid_caller_numbers_and_attributes_are_refused_naming_the_field_and_change_nothing() {
    on_both(|store| async move {
        let db = store.dialect();
        store
            .set_caller_attributes("+4930111", &words(&["vip"]), CRM)
            .await
            .expect("set");
        let before = audit(&store).await.len();
        let number_rule = "must be 1–20 digits with an optional leading '+' (spaces, '-', '.', '(' and ')' are dropped), such as +4930123456";
        for bad in ["anonymous", "", "+", "49+30", "+123456789012345678901"] {
            for err in [
                store
                    .set_caller_attributes(bad, &words(&["vip"]), CRM)
                    .await
                    .expect_err("set"),
                store.remove_caller(bad, CRM).await.expect_err("remove"),
                store.caller_attributes(bad).await.expect_err("read"),
                store
                    .list_callers(Some(bad), 10)
                    .await
                    .expect_err("list after"),
            ] {
                assert!(
                    matches!(err, StoreError::Invalid { field: "number", .. }),
                    "{db} {bad:?}: {err}"
                );
                assert_eq!(
                    err.to_string(),
                    format!("invalid number: `{bad}` {number_rule}"),
                    "{db}"
                );
            }
        }
        let err = store
            .set_caller_attributes("+4930111", &words(&["VIP"]), CRM)
            .await
            .expect_err("uppercase");
        assert_eq!(
            err.to_string(),
            "invalid attributes: attribute `VIP` must be 1–32 of a-z, 0-9, '-' and '_', starting with a letter or digit, as the agents' tags it is matched with (e.g. vip)",
            "{db}"
        );
        let many: BTreeSet<String> = (0..33).map(|n| format!("a{n}")).collect();
        let err = store
            .set_caller_attributes("+4930111", &many, CRM)
            .await
            .expect_err("too many");
        assert_eq!(
            err.to_string(),
            "invalid attributes: 33 different attributes, at most 32 are allowed (an agent carries at most 32 tags)",
            "{db}"
        );
        let err = store
            .set_caller_attributes("+4930111", &words(&["vip"]), "")
            .await
            .expect_err("no actor");
        assert!(
            matches!(err, StoreError::Invalid { field: "actor", .. }),
            "{db}: {err}"
        );
        let err = store.list_callers(None, 0).await.expect_err("limit 0");
        assert_eq!(err.to_string(), "invalid limit: must be at least 1", "{db}");

        assert_eq!(audit(&store).await.len(), before, "{db}: no audit row");
        assert_eq!(
            store.caller_attributes("+4930111").await.expect("read"),
            entry("+4930111", &["vip"]),
            "{db}: nothing changed"
        );
    })
    .await;
}

#[tokio::test]
async fn concurrent_writers_of_one_new_number_all_succeed_with_one_audit_row_each() {
    on_both_with_pool(16, |store| async move {
        let db = store.dialect();
        let mut writers = tokio::task::JoinSet::new();
        for n in 0..12 {
            let store = store.clone();
            writers.spawn(async move {
                if n % 3 == 2 {
                    store.remove_caller("+4930777", CRM).await.map(drop)
                } else {
                    let attributes = words(&[&format!("tier{n}")]);
                    store
                        .set_caller_attributes("+4930777", &attributes, CRM)
                        .await
                        .map(drop)
                }
            });
        }
        while let Some(done) = writers.join_next().await {
            done.expect("task")
                .unwrap_or_else(|err| panic!("{db}: every writer succeeds: {err}"));
        }
        let rows: Vec<AuditEntry> = audit(&store)
            .await
            .into_iter()
            .filter(|row| row.subject == "caller:+4930777")
            .collect();
        assert_eq!(rows.len(), 12, "{db}: one audit row per write");
        // The audit rows chain: each write saw what the one before it left (newest first).
        let none = serde_json::json!([]);
        let before = |detail: &serde_json::Value| match detail.get("removed") {
            Some(removed) if removed.is_null() => none.clone(),
            Some(removed) => removed.clone(),
            None => detail["previous"].clone(),
        };
        let after = |detail: &serde_json::Value| {
            detail
                .get("attributes")
                .cloned()
                .unwrap_or_else(|| none.clone())
        };
        for pair in rows.windows(2) {
            assert_eq!(
                before(&pair[0].detail),
                after(&pair[1].detail),
                "{db}: {rows:?}"
            );
        }
        assert_eq!(
            before(&rows[11].detail),
            none,
            "{db}: the first write found nothing"
        );
        let listed = store.caller_attributes("+4930777").await.expect("read");
        assert_eq!(
            serde_json::json!(listed.attributes),
            after(&rows[0].detail),
            "{db}: the last write holds"
        );
    })
    .await;
}

#[tokio::test]
async fn a_store_of_the_previous_version_migrates_and_lists_no_callers() {
    // The schema and rows of the version before caller attributes (migrations 1–7).
    let statements = [
        "INSERT INTO queues (id, name, service_level_ms) VALUES ('sales', 'Sales', 15000)",
        "INSERT INTO agents (id, name, tags, enabled, state, idle_since_ms) \
         VALUES ('1001', 'Alice', '[\"vip\"]', 1, 'available', 0)",
    ];
    on_both_migrated_from(7, &statements, |store| async move {
        let db = store.dialect();
        assert_eq!(
            store
                .get_queue("sales")
                .await
                .expect("queue")
                .service_level_ms,
            15_000,
            "{db}"
        );
        assert_eq!(
            store.get_agent("1001").await.expect("agent").tags,
            words(&["vip"]),
            "{db}"
        );
        assert_eq!(
            store.list_callers(None, 10).await.expect("list"),
            [],
            "{db}"
        );
        store
            .set_caller_attributes("+4930111", &words(&["vip"]), CRM)
            .await
            .expect("set");
        assert_eq!(
            store.caller_attributes("+4930111").await.expect("read"),
            entry("+4930111", &["vip"]),
            "{db}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_store_of_the_previous_version_migrates_with_nobody_ringing() {
    // The schema and rows of the version before rings were written (migrations 1–8).
    let statements = [
        "INSERT INTO agents (id, name, tags, enabled, state, idle_since_ms, misses_in_row) \
         VALUES ('1001', 'Alice', '[]', 1, 'on_call', 0, 2)",
        "INSERT INTO caller_attributes (number, attributes) VALUES ('+4930111', '[\"vip\"]')",
    ];
    on_both_migrated_from(8, &statements, |store| async move {
        let db = store.dialect();
        let alice = state(&store, "1001").await;
        assert_eq!(
            (alice.state, alice.ringing),
            (AgentState::OnCall, None),
            "{db}"
        );
        assert_eq!(
            store.ringing_agents().await.expect("ringing"),
            BTreeMap::new(),
            "{db}"
        );
        assert_eq!(
            store.caller_attributes("+4930111").await.expect("read"),
            entry("+4930111", &["vip"]),
            "{db}"
        );
        report(&store, "1001", &ended(0)).await;
        let rung = ring(&store, "1001", "sales").await;
        assert_eq!(state(&store, "1001").await.ringing, Some(rung), "{db}");
        // The misses in a row of before the migration still count.
        assert_eq!(
            report(&store, "1001", &missed("sales", 3)).await,
            missed_outcome(1, 0, true),
            "{db}"
        );
    })
    .await;
}

#[tokio::test]
async fn autoscaler_steering_is_audited_and_checked() {
    on_both(|store| async move {
        assert_eq!(
            store.scaler_steering().await.expect("read"),
            ScalerSteering::default()
        );
        let steering = ScalerSteering {
            paused: true,
            min_extra: 2,
            max_extra: Some(4),
        };
        let before = store
            .set_scaler_steering(&steering, "ops")
            .await
            .expect("set");
        assert_eq!(before, ScalerSteering::default());
        assert_eq!(store.scaler_steering().await.expect("read"), steering);
        let rows = audit(&store).await;
        assert_eq!(
            (
                rows[0].actor.as_str(),
                rows[0].action.as_str(),
                rows[0].subject.as_str()
            ),
            ("ops", "autoscaler.set", "autoscaler")
        );
        assert_eq!(rows[0].detail["now"]["max_extra"], 4);
        assert_eq!(rows[0].detail["before"]["paused"], false);

        for (bad, field) in [
            (
                ScalerSteering {
                    paused: false,
                    min_extra: 3,
                    max_extra: Some(2),
                },
                "max_extra",
            ),
            (
                ScalerSteering {
                    paused: false,
                    min_extra: 1001,
                    max_extra: None,
                },
                "min_extra",
            ),
        ] {
            let err = store
                .set_scaler_steering(&bad, "ops")
                .await
                .expect_err("refused");
            assert!(
                matches!(err, StoreError::Invalid { field: f, .. } if f == field),
                "{err}"
            );
        }
        assert_eq!(
            store.scaler_steering().await.expect("read"),
            steering,
            "unchanged"
        );
    })
    .await;
}

#[tokio::test]
async fn an_autoscaler_action_under_a_superseded_token_is_refused_and_not_recorded() {
    on_both(|store| async move {
        let detail = serde_json::json!({ "count": 1 });
        store
            .record_scale_action(5, "scale.launch", "autoscaler", &detail)
            .await
            .expect("first leader");
        store
            .record_scale_action(5, "scale.launch", "autoscaler", &detail)
            .await
            .expect("the same leader again");
        store
            .record_scale_action(7, "scale.drain", "node:x-1", &detail)
            .await
            .expect("the next leader");
        let err = store
            .record_scale_action(5, "scale.terminate", "node:x-1", &detail)
            .await
            .expect_err("the first leader, late");
        assert!(
            matches!(err, StoreError::Superseded { token: 5, fence: 7 }),
            "{err}"
        );
        let rows = audit(&store).await;
        let recorded: Vec<(&str, &str, u64)> = rows
            .iter()
            .map(|r| {
                (
                    r.action.as_str(),
                    r.subject.as_str(),
                    r.detail["token"].as_u64().expect("token"),
                )
            })
            .collect();
        assert_eq!(
            recorded,
            [
                ("scale.drain", "node:x-1", 7),
                ("scale.launch", "autoscaler", 5),
                ("scale.launch", "autoscaler", 5)
            ]
        );
        assert!(rows.iter().all(|r| r.actor == "autoscaler"));

        // The autoscaler's list holds its rows and supervisors' steering, nothing else.
        seed(&store).await;
        store
            .set_scaler_steering(&ScalerSteering::default(), "ops")
            .await
            .expect("steer");
        let listed: Vec<String> = store
            .list_scale_actions(10)
            .await
            .expect("list")
            .into_iter()
            .map(|r| r.action)
            .collect();
        assert_eq!(
            listed,
            [
                "autoscaler.set",
                "scale.drain",
                "scale.launch",
                "scale.launch"
            ]
        );
    })
    .await;
}
