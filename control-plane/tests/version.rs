//! Every committed change reaches routing, on MariaDB, where two CRMs' transactions
//! interleave: the one that started writing first may commit last.

use std::sync::Arc;
use std::time::Duration;

use callfleet_control_plane::Control;
use callfleet_control_plane::auth::Caller;
use callfleet_core::config::{ControlPlaneConfig, Role};
use callfleet_core::store::{Agent, Device, Queue};
use callfleet_core::{Store, testing};

/// T1 pauses agent 1001: it inserts its audit row, then (held here by a trigger that sleeps
/// after that insert) commits last. T2 changes 1002's priority meanwhile and commits first;
/// T2's refresh reads the directory without T1. When T1 commits, its own refresh must see
/// that the directory moved. With the version taken as the newest audit id (handed out at
/// insert, not at commit), T1's commit leaves the version where T2's refresh saw it, and
/// routing keeps ringing the paused agent.
#[tokio::test]
async fn a_change_that_commits_last_but_wrote_first_reaches_routing() {
    let config = testing::fresh_mysql_config().await;
    let store = Store::connect(&config).await.expect("mariadb store");
    let setup = "setup";
    store
        .upsert_queue(
            &Queue {
                id: "sales".into(),
                name: "Sales".into(),
                service_level_ms: 20_000,
            },
            setup,
        )
        .await
        .expect("queue");
    for (agent, device) in [("1001", "2001"), ("1002", "2002")] {
        store
            .upsert_agent(
                &Agent {
                    id: agent.into(),
                    name: format!("Agent {agent}"),
                    tags: Default::default(),
                    daily_cap: None,
                    enabled: true,
                },
                setup,
            )
            .await
            .expect("agent");
        store
            .upsert_device(
                &Device {
                    id: device.into(),
                    endpoint: format!("PJSIP/{device}"),
                    name: None,
                    contact: None,
                    registers: false,
                },
                setup,
            )
            .await
            .expect("device");
        store.login(agent, device, setup).await.expect("login");
        store
            .set_priority("sales", agent, 1, setup)
            .await
            .expect("member");
    }
    let control = Arc::new(
        Control::start(store.clone(), &ControlPlaneConfig::default())
            .await
            .expect("control plane"),
    );
    // No refresh loop runs: only the writes' own refreshes may bring the change.
    let raw = sqlx::MySqlPool::connect(&config.url)
        .await
        .expect("a connection of the test's own");
    sqlx::raw_sql(
        "CREATE TRIGGER hold_the_pause AFTER INSERT ON audit_log FOR EACH ROW \
         BEGIN IF NEW.action = 'agent.pause' THEN SET @slept = SLEEP(1.5); END IF; END",
    )
    .execute(&raw)
    .await
    .expect("create the trigger");
    let crm = |name: &str| Caller {
        name: name.to_owned(),
        role: Role::Write,
    };

    let first = {
        let control = control.clone();
        tokio::spawn(async move { control.pause(&crm("crm-a"), "1001", "break").await })
    };
    // T1 has inserted its audit row and sleeps in the trigger, uncommitted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    control
        .set_priority(&crm("crm-b"), "1002", "sales", 2)
        .await
        .expect("T2 commits first");
    first.await.expect("joins").expect("T1 commits last");

    let agents = control.list_agents();
    let state = |id: &str| {
        agents
            .iter()
            .find(|a| a.agent.id == id)
            .map(|a| a.state)
            .expect("listed")
    };
    assert_eq!(
        state("1001"),
        "paused",
        "routing must not ring a paused agent"
    );
    assert_eq!(state("1002"), "available");
    let candidates: Vec<String> = control
        .candidates("sales", &[])
        .expect("candidates")
        .into_iter()
        .map(|c| c.agent)
        .collect();
    assert_eq!(candidates, ["1002"]);
}
