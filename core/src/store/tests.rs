//! The store's behaviour on both backends: every test runs on SQLite and on MariaDB.

use std::time::Duration;

use super::*;
use crate::config::StoreConfig;
use crate::testing;

fn beat(id: &str, calls: u32) -> Heartbeat {
    testing::heartbeat(id, calls)
}

/// Runs `scenario` on a fresh SQLite file and on a fresh MariaDB database.
async fn on_both<F, Fut>(scenario: F)
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
        let store = Store::connect(&config).await.expect("connect");
        scenario(store.clone()).await;
        store.close().await;
    }
}

async fn node(store: &Store, id: &str) -> NodeStatus {
    store
        .list_nodes()
        .await
        .expect("list")
        .into_iter()
        .find(|n| n.id.as_str() == id)
        .unwrap_or_else(|| panic!("node {id} listed"))
}

#[tokio::test]
async fn heartbeats_upsert_and_are_fresh_by_the_database_clock() {
    on_both(|store| async move {
        let mut first = beat("pbx-1", 3);
        first.first_of_run = true;
        store.heartbeat(&first).await.expect("first beat");
        store
            .heartbeat(&beat("pbx-2", 0))
            .await
            .expect("other node");
        let n = node(&store, "pbx-1").await;
        assert_eq!(
            (n.calls, n.max_calls, n.seq),
            (3, 100, 1),
            "{}",
            store.dialect()
        );
        assert_eq!(n.state, NodeState::Active);
        assert_eq!(n.shed, first.shed);
        assert!(
            n.age_ms < 1_000,
            "fresh: {} ms on {}",
            n.age_ms,
            store.dialect()
        );
        assert!(!n.stale);
        assert_eq!(n.uptime_ms, n.age_ms, "the first beat starts the run");

        tokio::time::sleep(Duration::from_millis(20)).await;
        store
            .heartbeat(&beat("pbx-1", 7))
            .await
            .expect("second beat");
        let n = node(&store, "pbx-1").await;
        assert_eq!((n.calls, n.seq), (7, 2));
        // Both ages come from one statement on the database clock, so they compare exactly
        // (less a millisecond of SQLite's rounding).
        assert!(
            n.uptime_ms + 1 >= n.age_ms + 20,
            "started_at stays at the first beat of the run: {n:?}"
        );
        assert_eq!(store.list_nodes().await.expect("list").len(), 2);
        tokio::time::sleep(Duration::from_millis(50)).await;
        store.heartbeat(&first).await.expect("a restarted agent");
        let restarted = node(&store, "pbx-1").await;
        assert_eq!(
            restarted.uptime_ms, restarted.age_ms,
            "a new run starts at its first beat: {restarted:?}"
        );
        assert_eq!(restarted.seq, 3, "seq never goes back");

        // Three intervals (3 × 200 ms) without a beat make the node stale.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let n = node(&store, "pbx-1").await;
        assert!(
            n.age_ms >= 600 && n.stale,
            "age {} on {}",
            n.age_ms,
            store.dialect()
        );
    })
    .await;
}

#[tokio::test]
async fn drain_then_drained_at_zero_calls_then_undrain() {
    on_both(|store| async move {
        store.heartbeat(&beat("pbx-1", 4)).await.expect("beat");
        let id = NodeId::new("pbx-1").expect("id");
        assert_eq!(
            store.set_drain(&id, true).await.expect("drain"),
            NodeState::Draining
        );
        store.heartbeat(&beat("pbx-1", 2)).await.expect("beat");
        assert_eq!(
            node(&store, "pbx-1").await.state,
            NodeState::Draining,
            "calls remain"
        );
        store.heartbeat(&beat("pbx-1", 0)).await.expect("beat");
        let n = node(&store, "pbx-1").await;
        assert_eq!((n.state, n.drain_requested), (NodeState::Drained, true));
        assert_eq!(
            store.set_drain(&id, false).await.expect("undrain"),
            NodeState::Active
        );

        let mut refusing = beat("pbx-1", 1);
        refusing.refusing_calls = true;
        store.heartbeat(&refusing).await.expect("beat");
        assert_eq!(
            node(&store, "pbx-1").await.state,
            NodeState::Draining,
            "shed tier refuses calls"
        );
        refusing.calls = 0;
        store.heartbeat(&refusing).await.expect("beat");
        assert_eq!(
            node(&store, "pbx-1").await.state,
            NodeState::Draining,
            "only an operator's drain ends in drained"
        );

        let unknown = NodeId::new("ghost").expect("id");
        let err = store
            .set_drain(&unknown, true)
            .await
            .expect_err("must fail");
        assert!(matches!(err, StoreError::UnknownNode(_)), "{err}");
        assert!(err.to_string().contains("no node `ghost`"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn history_is_recorded_and_pruned_by_retention() {
    on_both(|store| async move {
        let b = beat("pbx-1", 5);
        store.heartbeat(&b).await.expect("beat");
        for _ in 0..3 {
            store
                .record_sample(&b, Duration::from_secs(3600))
                .await
                .expect("sample");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let samples = store
            .samples(&b.id, Duration::from_secs(60))
            .await
            .expect("read");
        assert_eq!(samples.len(), 3, "{}", store.dialect());
        assert!(samples.iter().all(|s| s.calls == 5));
        let ages: Vec<u64> = samples.iter().map(|s| s.age_ms).collect();
        assert!(
            ages.windows(2).all(|w| w[0] >= w[1] + 5) && ages[0] < 1_000,
            "oldest first, 5 ms apart, ages by the database clock: {ages:?}"
        );
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        // A retention of 1 s drops the three older samples and keeps the new one.
        store
            .record_sample(&b, Duration::from_secs(1))
            .await
            .expect("sample");
        let samples = store
            .samples(&b.id, Duration::from_secs(60))
            .await
            .expect("read");
        assert_eq!(samples.len(), 1, "{}", store.dialect());
    })
    .await;
}

#[tokio::test]
async fn migrations_are_applied_once_and_reconnects_reuse_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = testing::sqlite_config(dir.path());
    let store = Store::connect(&config).await.expect("first start");
    store.heartbeat(&beat("pbx-1", 1)).await.expect("beat");
    store.close().await;
    let again = Store::connect(&config).await.expect("second start");
    assert_eq!(
        again.list_nodes().await.expect("list").len(),
        1,
        "data survives a restart"
    );
}

#[tokio::test]
async fn bad_urls_and_unreachable_servers_are_clear_errors() {
    let malformed = StoreConfig {
        url: "mysql://fleet:hunter2@/".into(),
        ..StoreConfig::default()
    };
    let err = Store::connect(&malformed)
        .await
        .expect_err("must fail")
        .to_string();
    assert!(
        err.contains("not valid") && !err.contains("hunter2"),
        "{err}"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let unreachable = StoreConfig {
        url: format!("mysql://fleet:hunter2@127.0.0.1:{port}/callfleet"),
        connect_timeout: Duration::from_millis(500),
        ..StoreConfig::default()
    };
    let err = Store::connect(&unreachable)
        .await
        .expect_err("must fail")
        .to_string();
    assert!(
        err.starts_with("cannot reach the store at mysql://fleet:***@127.0.0.1"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

#[tokio::test]
async fn processes_opening_a_new_sqlite_file_together_all_succeed() {
    // `callfleet up` and `callfleet status` started at once both create, switch to WAL and
    // migrate the same new file; none may fail with "database is locked".
    let dir = tempfile::tempdir().expect("temp dir");
    let config = testing::sqlite_config(dir.path());
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let config = config.clone();
        opening.spawn(async move { Store::connect(&config).await.map(|store| store.dialect()) });
    }
    while let Some(opened) = opening.join_next().await {
        assert_eq!(
            opened.expect("task").expect("every opener succeeds"),
            "sqlite"
        );
    }
}

#[tokio::test]
async fn a_store_with_a_single_connection_starts() {
    // Migrations must not need a second pooled connection (a reader may run with one).
    let dir = tempfile::tempdir().expect("temp dir");
    for config in [
        testing::sqlite_config(dir.path()),
        testing::fresh_mysql_config().await,
    ] {
        let config = StoreConfig {
            max_connections: 1,
            connect_timeout: Duration::from_secs(3),
            ..config
        };
        let store = Store::connect(&config)
            .await
            .expect("starts with one connection");
        store.heartbeat(&beat("pbx-1", 1)).await.expect("beat");
        assert_eq!(store.list_nodes().await.expect("list").len(), 1);
    }
}
