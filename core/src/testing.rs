//! Test support: stores on the real servers that `./scripts/test` starts.
//!
//! A test that needs a server and cannot find it fails with instructions; it never passes
//! silently.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::config::StoreConfig;

/// The MariaDB URL exported by `./scripts/test`, or a panic that says how to get one.
pub fn mysql_url() -> String {
    std::env::var("CALLFLEET_TEST_MYSQL_URL").unwrap_or_else(|_| {
        panic!(
            "CALLFLEET_TEST_MYSQL_URL is not set: this test needs the MariaDB server that \
             ./scripts/test installs and starts; run ./scripts/test (or export the URL of a \
             MariaDB/MySQL server whose user may create databases)"
        )
    })
}

/// A store config for a new, empty MariaDB database private to the calling test.
pub async fn fresh_mysql_config() -> StoreConfig {
    use sqlx::Executor;
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let base = mysql_url();
    let name = format!(
        "cf_test_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let mut admin = <sqlx::MySqlConnection as sqlx::Connection>::connect(&base)
        .await
        .unwrap_or_else(|err| panic!("cannot connect to the test MariaDB at {base}: {err}"));
    admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name}"
        )))
        .await
        .expect("create the test database");
    let url = match base.rsplit_once('/') {
        Some((server, _db)) => format!("{server}/{name}"),
        None => panic!("CALLFLEET_TEST_MYSQL_URL `{base}` has no /DATABASE part"),
    };
    StoreConfig {
        url,
        ..StoreConfig::default()
    }
}

/// A store config for a new SQLite file inside `dir`.
pub fn sqlite_config(dir: &std::path::Path) -> StoreConfig {
    StoreConfig {
        url: format!("sqlite://{}/fleet.db", dir.display()),
        ..StoreConfig::default()
    }
}

/// A fresh, active node in the `default` pool with room for 100 calls, as a store read
/// would return it; tests change the fields they care about.
pub fn node_status(id: &str, sip_uri: &str) -> crate::NodeStatus {
    crate::NodeStatus {
        id: crate::NodeId::new(id).expect("a valid test node id"),
        pool: crate::PoolName::new("default").expect("\"default\" is a valid pool name"),
        role: crate::NodeRole::Core,
        sip_uri: sip_uri.to_owned(),
        state: crate::NodeState::Active,
        drain_requested: false,
        pbx_up: true,
        calls: 0,
        max_calls: 100,
        load1: 0.0,
        cpu_pct: 0.0,
        mem_pct: 0.0,
        cores: 4,
        shed: Vec::new(),
        seq: 1,
        interval_ms: 2000,
        uptime_ms: 10_000,
        age_ms: 100,
        stale: false,
    }
}

/// A core node's heartbeat in the `default` pool with room for 100 calls and one shed
/// tier (`reports`, running), every 200 ms; tests change the fields they care about.
pub fn heartbeat(id: &str, calls: u32) -> crate::Heartbeat {
    crate::Heartbeat {
        id: crate::NodeId::new(id).expect("a valid test node id"),
        pool: crate::PoolName::new("default").expect("\"default\" is a valid pool name"),
        role: crate::NodeRole::Core,
        sip_uri: "sip:10.0.0.1:5060".into(),
        calls,
        pbx_up: true,
        max_calls: 100,
        load1: 0.5,
        cpu_pct: 12.5,
        mem_pct: 40.0,
        cores: 2,
        shed: vec![crate::ShedTierState {
            name: "reports".into(),
            shed: false,
            command_ok: true,
        }],
        refusing_calls: false,
        interval: std::time::Duration::from_millis(200),
        first_of_run: false,
    }
}

/// The Redis URL exported by `./scripts/test`, or a panic that says how to get one.
pub fn redis_url() -> String {
    std::env::var("CALLFLEET_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!(
            "CALLFLEET_TEST_REDIS_URL is not set: this test needs the Redis server that \
             ./scripts/test installs and starts; run ./scripts/test (or export the URL of a \
             Redis you may write to)"
        )
    })
}
