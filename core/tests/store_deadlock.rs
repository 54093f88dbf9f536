//! The directory's deadlock retry on MariaDB, with real InnoDB deadlocks (error 1213).
//!
//! A directory write locks the agent's row first and bumps the directory version last
//! (`directory.rs`). A *blocker* (a raw connection of this test) holds the version row,
//! waits until the store's write holds the agent's row and waits for the version, then
//! asks for the agent's row: a cycle, which InnoDB breaks by rolling back the transaction
//! that changed fewest rows. Each blocker first inserts [`BALLAST`] rows, so the victim is
//! always the store's write. To deadlock the retry too, the next blocker queues for the
//! version row behind the current one before it closes the cycle: when it commits, the
//! next blocker gets the version row and the store's retry gets the agent's row.
//!
//! The retries are counted from the store's own log line (`directory write deadlocked,
//! retrying`), captured with a subscriber scoped to the write; nothing in the store is
//! changed for the test. Needs `CALLFLEET_TEST_MYSQL_URL` (`./scripts/test` sets it) and
//! fails with instructions without it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use callfleet_core::config::StoreConfig;
use callfleet_core::store::Agent;
use callfleet_core::{Store, StoreError};
use sqlx::{AssertSqlSafe, Connection, Executor, MySqlConnection};
use tokio::time::{Instant, sleep, timeout};
use tracing::instrument::WithSubscriber;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

const AGENT: &str = "1001";
const DAY: &str = "2025-03-14";
const CRM: &str = "crm-main";
/// How many times the store runs a write that deadlocks (`MAX_ATTEMPTS` in `directory.rs`).
const ATTEMPTS: usize = 3;
/// Rows each blocker inserts before it locks anything, so that InnoDB, which rolls back
/// the lighter transaction of a deadlock, always picks the store's write (a few rows).
const BALLAST: usize = 200;
/// The store's log line for a retried write.
const RETRYING: &str = "directory write deadlocked, retrying";
/// A one-row statement running this long waits for a lock.
const WAITING_MS: u32 = 100;

/// The `attempt` and `error` of every [`RETRYING`] line logged inside the write.
#[derive(Clone, Default)]
struct Retries(Arc<Mutex<Vec<(u64, String)>>>);

impl Retries {
    fn seen(&self) -> Vec<(u64, String)> {
        self.0.lock().expect("retries lock").clone()
    }
}

impl<S: tracing::Subscriber> Layer<S> for Retries {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        if fields.message == RETRYING {
            self.0
                .lock()
                .expect("retries lock")
                .push((fields.attempt, fields.error));
        }
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    attempt: u64,
    error: String,
}

impl tracing::field::Visit for Fields {
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name() == "attempt" {
            self.attempt = value;
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "error" => self.error = format!("{value:?}"),
            _ => {}
        }
    }
}

/// The URL of a new, empty database private to the calling test.
async fn fresh_database() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let base = std::env::var("CALLFLEET_TEST_MYSQL_URL").unwrap_or_else(|_| {
        panic!(
            "CALLFLEET_TEST_MYSQL_URL is not set: this test needs the MariaDB server that \
             ./scripts/test installs and starts; run ./scripts/test (or export the URL of a \
             MariaDB/MySQL server whose user may create databases)"
        )
    });
    let name = format!(
        "cf_deadlock_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let mut admin = MySqlConnection::connect(&base)
        .await
        .unwrap_or_else(|err| panic!("cannot connect to the test MariaDB at {base}: {err}"));
    admin
        .execute(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name}"
        )))
        .await
        .expect("create the test database");
    match base.rsplit_once('/') {
        Some((server, _db)) => format!("{server}/{name}"),
        None => panic!("CALLFLEET_TEST_MYSQL_URL `{base}` has no /DATABASE part"),
    }
}

/// A raw connection and its server-side id.
async fn connect(url: &str) -> (MySqlConnection, u64) {
    let mut connection = MySqlConnection::connect(url).await.expect("connect");
    let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
        .fetch_one(&mut connection)
        .await
        .expect("connection id");
    (connection, id)
}

/// Starts blocker `n`'s transaction: the ballast, then the version row's lock (which
/// waits while another blocker holds it). Returns the connection, transaction open.
async fn hold_version(mut connection: MySqlConnection, n: usize) -> MySqlConnection {
    connection.execute("BEGIN").await.expect("begin");
    let rows: Vec<String> = (1..=BALLAST)
        .map(|i| format!("({})", n * 1000 + i))
        .collect();
    connection
        .execute(AssertSqlSafe(format!(
            "INSERT INTO deadlock_ballast (n) VALUES {}",
            rows.join(", ")
        )))
        .await
        .expect("ballast");
    sqlx::query("SELECT version FROM directory_version WHERE id = 1 FOR UPDATE")
        .fetch_one(&mut connection)
        .await
        .expect("the version row's lock");
    connection
}

/// Waits until a connection of this database that is none of `ours` (the store's) has
/// run a statement on `directory_version` for [`WAITING_MS`]: it waits for that row.
async fn until_store_waits_for_version(monitor: &mut MySqlConnection, ours: &[u64]) {
    let ours: Vec<String> = ours.iter().map(u64::to_string).collect();
    let sql = format!(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE() \
         AND ID NOT IN ({}) AND INFO LIKE 'UPDATE directory_version%' AND TIME_MS > {WAITING_MS}",
        ours.join(", ")
    );
    until(monitor, &sql, "the store's write waits for the version row").await;
}

/// Waits until connection `id` has run its statement on `directory_version` for
/// [`WAITING_MS`]: it is queued for that row.
async fn until_blocker_waits_for_version(monitor: &mut MySqlConnection, id: u64) {
    let sql = format!(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = {id} \
         AND INFO LIKE '%directory_version%' AND TIME_MS > {WAITING_MS}"
    );
    until(monitor, &sql, "the next blocker queues for the version row").await;
}

async fn until(monitor: &mut MySqlConnection, sql: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found: i64 = sqlx::query_scalar(AssertSqlSafe(sql.to_owned()))
            .fetch_one(&mut *monitor)
            .await
            .expect("processlist");
        match found {
            0 => {}
            1 => return,
            more => panic!("{more} connections match `{sql}`"),
        }
        assert!(Instant::now() < deadline, "never saw: {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the store logged `count` retries of the `sale`.
async fn until_retries<T>(retries: &Retries, count: usize, sale: &tokio::task::JoinHandle<T>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while retries.seen().len() != count {
        assert!(
            !sale.is_finished(),
            "the sale ended after the retries {:?} instead of running its write again",
            retries.seen()
        );
        assert!(
            Instant::now() < deadline,
            "the store logged {:?}, not {count} retries",
            retries.seen()
        );
        sleep(Duration::from_millis(5)).await;
    }
}

/// What a sale did when it met `deadlocks` deadlocks.
#[derive(Debug)]
struct Outcome {
    result: Result<u32, StoreError>,
    retries: Vec<(u64, String)>,
    /// The agent's sales of the day.
    sales: u32,
    /// Audit rows of sales.
    sale_audits: usize,
    /// How far the directory version moved.
    version_moved: i64,
    /// Ballast rows committed: the blockers were never the victims.
    ballast: i64,
}

/// Records one sale while `deadlocks` blockers, one after the other, make each attempt of
/// its write the victim of a deadlock.
async fn sale_through(deadlocks: usize) -> Outcome {
    let url = fresh_database().await;
    let config = StoreConfig {
        url: url.clone(),
        // One connection: the store's write is the one connection that is none of ours.
        max_connections: 1,
        ..StoreConfig::default()
    };
    let store = Store::connect(&config).await.expect("store");
    let agent = Agent {
        id: AGENT.into(),
        name: "Alice".into(),
        tags: Default::default(),
        daily_cap: None,
        enabled: true,
    };
    store.upsert_agent(&agent, "setup").await.expect("agent");

    let (mut monitor, monitor_id) = connect(&url).await;
    monitor
        .execute("CREATE TABLE deadlock_ballast (n INT PRIMARY KEY) ENGINE = InnoDB")
        .await
        .expect("ballast table");
    let version = "SELECT version FROM directory_version WHERE id = 1";
    let version_before: i64 = sqlx::query_scalar(version)
        .fetch_one(&mut monitor)
        .await
        .expect("version");
    let mut ours = vec![monitor_id];
    let mut blockers = Vec::new();
    for _ in 0..deadlocks {
        let (connection, id) = connect(&url).await;
        ours.push(id);
        blockers.push((connection, id));
    }
    let mut blockers = blockers.into_iter().enumerate();

    // The first blocker holds the version row before the sale starts.
    let (_, (first, _)) = blockers.next().expect("one blocker at least");
    let mut holder = hold_version(first, 0).await;
    let retries = Retries::default();
    let sale = {
        let store = store.clone();
        let subscriber = tracing_subscriber::registry().with(retries.clone());
        tokio::spawn(
            async move { store.record_sale(AGENT, DAY, CRM).await }.with_subscriber(subscriber),
        )
    };
    for round in 1..=deadlocks {
        until_store_waits_for_version(&mut monitor, &ours).await;
        // The next blocker queues for the version row behind this one.
        let next = match blockers.next() {
            Some((n, (connection, id))) => {
                let queued = tokio::spawn(hold_version(connection, n));
                until_blocker_waits_for_version(&mut monitor, id).await;
                Some(queued)
            }
            None => None,
        };
        // The cycle: this blocker asks for the agent's row that the store's write holds.
        sqlx::query("SELECT state FROM agents WHERE id = ? FOR UPDATE")
            .bind(AGENT)
            .fetch_one(&mut holder)
            .await
            .expect("the blocker gets the agent's row: the store's write was the victim");
        if round < ATTEMPTS {
            // The store saw the deadlock and runs the write again, which waits for the
            // agent's row until this blocker commits.
            until_retries(&retries, round, &sale).await;
        }
        holder.execute("COMMIT").await.expect("the blocker commits");
        if let Some(queued) = next {
            holder = queued
                .await
                .expect("the next blocker holds the version row");
        }
    }
    let result = timeout(Duration::from_secs(30), sale)
        .await
        .expect("the sale ends")
        .expect("the sale's task ends cleanly");

    let sales = store.daily_counts(AGENT, DAY).await.expect("counts").sales;
    let sale_audits = store
        .list_audit(1000, None)
        .await
        .expect("audit")
        .iter()
        .filter(|row| row.action == "agent.record_sale")
        .count();
    let version_after: i64 = sqlx::query_scalar(version)
        .fetch_one(&mut monitor)
        .await
        .expect("version");
    let ballast: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM deadlock_ballast")
        .fetch_one(&mut monitor)
        .await
        .expect("ballast rows");
    store.close().await;
    Outcome {
        result,
        retries: retries.seen(),
        sales,
        sale_audits,
        version_moved: version_after - version_before,
        ballast,
    }
}

/// Checks that the retries logged are attempts `1..=count`, each for error 1213.
#[track_caller]
fn assert_retried(outcome: &Outcome, count: usize) {
    let attempts: Vec<u64> = outcome
        .retries
        .iter()
        .map(|(attempt, _)| *attempt)
        .collect();
    let expected: Vec<u64> = (1..=count as u64).collect();
    assert_eq!(attempts, expected, "{outcome:?}");
    for (_, error) in &outcome.retries {
        assert!(
            error.contains("1213") && error.contains("Deadlock found"),
            "not a deadlock: {error}"
        );
    }
}

#[tokio::test]
async fn a_sale_whose_write_is_a_deadlock_victim_once_is_retried_and_counted_once() {
    let outcome = sale_through(1).await;
    assert_eq!(outcome.result.as_ref().ok(), Some(&1), "{outcome:?}");
    assert_retried(&outcome, 1);
    assert_eq!(outcome.sales, 1, "{outcome:?}");
    assert_eq!(outcome.sale_audits, 1, "{outcome:?}");
    assert_eq!(outcome.version_moved, 1, "{outcome:?}");
    assert_eq!(outcome.ballast, BALLAST as i64, "{outcome:?}");
}

#[tokio::test]
async fn a_sale_whose_write_is_a_deadlock_victim_twice_is_still_counted_once() {
    let outcome = sale_through(ATTEMPTS - 1).await;
    assert_eq!(outcome.result.as_ref().ok(), Some(&1), "{outcome:?}");
    assert_retried(&outcome, ATTEMPTS - 1);
    assert_eq!(outcome.sales, 1, "{outcome:?}");
    assert_eq!(outcome.sale_audits, 1, "{outcome:?}");
    assert_eq!(outcome.version_moved, 1, "{outcome:?}");
    assert_eq!(outcome.ballast, 2 * BALLAST as i64, "{outcome:?}");
}

/// The negative control: the retries are bounded, and the same interleaving on every
/// attempt ends in the deadlock error itself, with nothing counted.
#[tokio::test]
async fn a_sale_whose_write_is_a_deadlock_victim_on_every_attempt_fails_with_the_deadlock() {
    let outcome = sale_through(ATTEMPTS).await;
    match &outcome.result {
        Err(StoreError::Query(sqlx::Error::Database(db))) => {
            assert_eq!(db.code().as_deref(), Some("40001"), "{outcome:?}");
            assert!(db.message().contains("Deadlock found"), "{outcome:?}");
        }
        other => panic!("expected the deadlock error, got {other:?}"),
    }
    assert_retried(&outcome, ATTEMPTS - 1);
    assert_eq!(outcome.sales, 0, "{outcome:?}");
    assert_eq!(outcome.sale_audits, 0, "{outcome:?}");
    assert_eq!(outcome.version_moved, 0, "{outcome:?}");
    assert_eq!(outcome.ballast, 3 * BALLAST as i64, "{outcome:?}");
}
