//! The fleet store: one schema on MySQL (production) or SQLite (single box).
//!
//! Writers never send timestamps: the database stamps every heartbeat with its own clock
//! and computes ages with that same clock, so a node whose clock is wrong can neither look
//! fresh when it is dead nor stale when it is alive.
//!
//! The control plane's directory (agents, devices, sessions, queues, counters and the audit
//! log) lives in [`directory`], on the same pools.

mod dialect;

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{MigrateError, Migration, MigrationType, Migrator};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{ColumnIndex, ConnectOptions, Connection, Decode, Row, SqlStr, Type};

use crate::config::{StoreConfig, redact_url};
use crate::fleet::{Heartbeat, NodeStatus, ShedTierState, is_stale};
use crate::ids::{NodeId, NodeRole, NodeState, PoolName};
use dialect::Dialect;

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL cannot be used.
    #[error(
        "store url `{url}` is not valid: {reason}; use sqlite://PATH/fleet.db or mysql://USER:PASSWORD@HOST:3306/DATABASE"
    )]
    InvalidUrl {
        /// The URL with its password redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The database did not accept a connection.
    #[error(
        "cannot reach the store at {url}: {source}; check that the server runs and that host, port, user, password and database are right"
    )]
    Unreachable {
        /// The URL with its password redacted.
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The schema could not be brought up to date.
    #[error("cannot apply the store's migrations at {url}: {source}")]
    Migrate {
        /// The URL with its password redacted.
        url: String,
        /// The migrator's error.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// A query failed (connection lost, timeout, constraint).
    #[error("store query failed: {0}")]
    Query(#[from] sqlx::Error),
    /// The commit of a change was sent but not confirmed (the connection was lost): the
    /// change may or may not have been made.
    #[error(
        "the store did not confirm the change ({0}): it may or may not have been made; retry with the same request id to make it count once"
    )]
    OutcomeUnknown(#[source] sqlx::Error),
    /// A row holds a value this version cannot read.
    #[error("store row for node `{node}` is unreadable: {reason}")]
    CorruptRow {
        /// The node whose row is bad.
        node: String,
        /// What could not be read.
        reason: String,
    },
    /// No node with this id has ever reported.
    #[error("no node `{0}` in the store; `callfleet status` lists the known nodes")]
    UnknownNode(NodeId),
    /// A value given to the store is not acceptable; `field` names it.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field at fault (`agent id`, `name`, `tags`, `endpoint`, `reason`, `day`…).
        field: &'static str,
        /// What is wrong with it, quoting the value.
        reason: String,
    },
    /// No agent, device or queue with this id.
    #[error("no {kind} `{id}`; list {kind}s with GET /api/v1/{kind}s")]
    NotFound {
        /// `agent`, `device` or `queue`.
        kind: &'static str,
        /// The id asked for.
        id: String,
    },
    /// The agent is not a member of the queue.
    #[error(
        "agent `{agent}` is not a member of queue `{queue}`; list its members with GET /api/v1/queues/{queue}/members"
    )]
    NotMember {
        /// The queue.
        queue: String,
        /// The agent.
        agent: String,
    },
    /// An autoscaler's action under a lease token older than one another leader has
    /// acted under: that leader was superseded, and nothing was done.
    #[error(
        "autoscaler lease token {token} is superseded by {fence}: another control plane leads the autoscaler now; this one stops acting"
    )]
    Superseded {
        /// The token the action was tried under.
        token: u64,
        /// The highest token acted under so far.
        fence: u64,
    },
    /// The device is in use by another agent's session; nothing was changed.
    #[error(
        "device `{device}` is in use by agent `{holder}`; log agent `{holder}` out first or choose another device"
    )]
    Conflict {
        /// The device asked for.
        device: String,
        /// The agent logged in on it.
        holder: String,
    },
}

/// One point of a node's history.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// When it was recorded (database clock, UTC).
    pub at: String,
    /// Active calls.
    pub calls: u32,
    /// One-minute load average.
    pub load1: f64,
    /// CPU use, 0–100.
    pub cpu_pct: f64,
    /// Memory in use, 0–100.
    pub mem_pct: f64,
    /// How long ago it was recorded, ms by the database clock: free of the server's and
    /// the session's time zones, which `at` is not on MySQL.
    pub age_ms: u64,
}

/// A connection pool to the fleet store with its dialect.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    sql: &'static Dialect,
}

/// The native driver of each dialect: the fleet read runs on every balancer refresh, and the
/// generic `Any` driver cost a fifth of its time in conversions.
#[derive(Debug, Clone)]
enum Pool {
    MySql(MySqlPool),
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$pool` bound to the native pool; the SQL and binds are the same text
/// for both dialects, only the driver types differ.
macro_rules! with_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.pool {
            Pool::MySql($pool) => $body,
            Pool::Sqlite($pool) => $body,
        }
    };
}

impl Store {
    /// Connects to the store named by `config.url`, creating the SQLite file and its
    /// folder when needed, and applies the embedded migrations.
    pub async fn connect(config: &StoreConfig) -> Result<Self, StoreError> {
        let shown = ShownUrl(redact_url(&config.url));
        if let Some(path) = config.sqlite_path() {
            if path.is_empty() {
                return Err(shown.invalid("it names no database file"));
            }
            if let Some(dir) = Path::new(path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir).map_err(|err| {
                    shown.invalid(format!("cannot create the folder {}: {err}", dir.display()))
                })?;
            }
            let options = SqliteConnectOptions::from_str(&config.url)
                .map_err(|err| shown.invalid(err.to_string()))?
                .create_if_missing(true)
                .busy_timeout(Duration::from_secs(5));
            // SQLite has no server-side lock, so processes sharing a file (`callfleet up` and
            // `callfleet status` started together) take turns with a file lock for what needs
            // the database to themselves: switching it to WAL and migrating it.
            let _file_lock = lock_file(format!("{path}.migrate-lock"))
                .await
                .map_err(|err| shown.invalid(format!("cannot lock {path}.migrate-lock: {err}")))?;
            // WAL lets `callfleet status` read while the agent writes; the mode is stored in
            // the file, so only this first connection sets it.
            let first = connect_once(
                options.clone().journal_mode(SqliteJournalMode::Wal),
                config.connect_timeout,
            )
            .await
            .map_err(|err| shown.unreachable(err))?;
            let _ = first.close().await;
            let pool = SqlitePoolOptions::new()
                .max_connections(config.max_connections)
                .acquire_timeout(config.connect_timeout)
                .connect_with(options)
                .await
                .map_err(|err| shown.unreachable(err))?;
            migrator(&dialect::SQLITE)
                .run(&pool)
                .await
                .map_err(|err| shown.migrate(err))?;
            Ok(Self {
                pool: Pool::Sqlite(pool),
                sql: &dialect::SQLITE,
            })
        } else if config.url.starts_with("mysql://") {
            let parsed =
                url::Url::parse(&config.url).map_err(|err| shown.invalid(err.to_string()))?;
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err(shown.invalid("it names no host"));
            }
            if parsed.path().trim_start_matches('/').is_empty() {
                return Err(shown.invalid("it names no database (…/DATABASE at the end)"));
            }
            let options = MySqlConnectOptions::from_str(&config.url)
                .map_err(|err| shown.invalid(err.to_string()))?;
            // Agents and CLI commands start at the same moment against a new database, so
            // migrations are serialised with a named lock held by a connection of its own
            // (outside the pool, which may have a single connection). sqlx's own lock uses
            // `GET_LOCK(name, -1)`, which MariaDB does not treat as "wait".
            let mut lock = connect_once(options.clone(), config.connect_timeout)
                .await
                .map_err(|err| shown.unreachable(err))?;
            let pool = MySqlPoolOptions::new()
                .max_connections(config.max_connections)
                .acquire_timeout(config.connect_timeout)
                .connect_with(options)
                .await
                .map_err(|err| shown.unreachable(err))?;
            let locked: Option<i64> =
                sqlx::query_scalar("SELECT GET_LOCK('callfleet.migrate', 60)")
                    .fetch_one(&mut lock)
                    .await?;
            if locked != Some(1) {
                return Err(shown.migrate(MigrateError::Execute(sqlx::Error::Protocol(
                    "another process held the migration lock for 60 s".into(),
                ))));
            }
            let migrated = migrator(&dialect::MYSQL).run(&pool).await;
            // Ending the session releases the lock.
            let _ = lock.close().await;
            migrated.map_err(|err| shown.migrate(err))?;
            Ok(Self {
                pool: Pool::MySql(pool),
                sql: &dialect::MYSQL,
            })
        } else {
            Err(shown.invalid("the scheme must be sqlite:// or mysql://"))
        }
    }

    /// `mysql` or `sqlite`.
    pub fn dialect(&self) -> &'static str {
        self.sql.name
    }

    /// Writes a node's heartbeat, stamped with the database clock.
    pub async fn heartbeat(&self, beat: &Heartbeat) -> Result<(), StoreError> {
        let services = serde_json::to_string(&beat.shed).expect("shed states serialize");
        let interval_ms = i64::try_from(beat.interval.as_millis()).unwrap_or(i64::MAX);
        with_pool!(self, pool => sqlx::query(SqlStr::from_static(self.sql.upsert_heartbeat))
            .bind(beat.id.as_str())
            .bind(beat.pool.as_str())
            .bind(beat.role.as_str())
            .bind(beat.sip_uri.as_str())
            .bind(i32::from(beat.refusing_calls))
            .bind(i32::from(beat.pbx_up))
            .bind(i64::from(beat.calls))
            .bind(i64::from(beat.max_calls))
            .bind(beat.load1)
            .bind(beat.cpu_pct)
            .bind(beat.mem_pct)
            .bind(i64::from(beat.cores))
            .bind(services)
            .bind(interval_ms)
            .bind(i32::from(beat.refusing_calls))
            .bind(i32::from(beat.first_of_run))
            .execute(pool)
            .await
            .map(drop))?;
        Ok(())
    }

    /// Appends a sample to the node's history and deletes samples older than `retention`.
    pub async fn record_sample(
        &self,
        beat: &Heartbeat,
        retention: Duration,
    ) -> Result<(), StoreError> {
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query(SqlStr::from_static(self.sql.insert_sample))
                .bind(beat.id.as_str())
                .bind(i64::from(beat.calls))
                .bind(beat.load1)
                .bind(beat.cpu_pct)
                .bind(beat.mem_pct)
                .execute(&mut *tx)
                .await?;
            sqlx::query(SqlStr::from_static(self.sql.prune_samples))
                .bind(beat.id.as_str())
                .bind(i64::try_from(retention.as_secs()).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// A node's samples of the last `window`, oldest first.
    pub async fn samples(
        &self,
        node: &NodeId,
        window: Duration,
    ) -> Result<Vec<Sample>, StoreError> {
        let window = i64::try_from(window.as_secs()).unwrap_or(i64::MAX);
        with_pool!(self, pool => {
            let rows = sqlx::query(SqlStr::from_static(self.sql.samples_since))
                .bind(node.as_str())
                .bind(window)
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|row| {
                    Ok(Sample {
                        at: row.try_get(0)?,
                        calls: u32_column(row, 1)?,
                        load1: row.try_get(2)?,
                        cpu_pct: row.try_get(3)?,
                        mem_pct: row.try_get(4)?,
                        age_ms: u64::try_from(row.try_get::<i64, _>(5)?).unwrap_or(0),
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }

    /// Every node with its heartbeat age by the database clock, ordered by id.
    pub async fn list_nodes(&self) -> Result<Vec<NodeStatus>, StoreError> {
        let mut nodes = with_pool!(self, pool => {
            let rows = sqlx::query(SqlStr::from_static(self.sql.list_nodes))
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(node_from_row)
                .collect::<Result<Vec<_>, _>>()?
        });
        nodes.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    /// Asks a node to drain (no new calls; `drained` once it has none) or to take calls
    /// again.
    pub async fn set_drain(&self, node: &NodeId, drain: bool) -> Result<NodeState, StoreError> {
        let flag = i32::from(drain);
        with_pool!(self, pool => sqlx::query(SqlStr::from_static(dialect::SET_DRAIN))
            .bind(flag)
            .bind(flag)
            .bind(flag)
            .bind(node.as_str())
            .execute(pool)
            .await
            .map(drop))?;
        // MySQL reports 0 affected rows when nothing changed, so the row is read back.
        let state: Option<String> = with_pool!(self, pool => {
            sqlx::query_scalar(SqlStr::from_static(dialect::NODE_STATE))
                .bind(node.as_str())
                .fetch_optional(pool)
                .await?
        });
        let state = state.ok_or_else(|| StoreError::UnknownNode(node.clone()))?;
        state.parse().map_err(|reason| StoreError::CorruptRow {
            node: node.to_string(),
            reason,
        })
    }

    /// Forgets an extra node that has been terminated, so nobody counts, drains or ends
    /// it again; its history stays. Core nodes are never forgotten. Returns whether a row
    /// went.
    pub async fn remove_extra_node(&self, node: &NodeId) -> Result<bool, StoreError> {
        let removed = with_pool!(self, pool => sqlx::query(SqlStr::from_static(
            "DELETE FROM nodes WHERE id = ? AND role = 'extra'",
        ))
        .bind(node.as_str())
        .execute(pool)
        .await?
        .rows_affected());
        Ok(removed > 0)
    }

    /// Closes the pool, waiting for connections in use.
    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await);
    }
}

fn u32_column<'r, R>(row: &'r R, index: usize) -> Result<u32, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let value: i64 = row.try_get(index)?;
    u32::try_from(value).map_err(|err| sqlx::Error::ColumnDecode {
        index: index.to_string(),
        source: Box::new(err),
    })
}

fn node_from_row<'r, R>(row: &'r R) -> Result<NodeStatus, StoreError>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    f64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    let id: String = row.try_get(0)?;
    let corrupt = |reason: String| StoreError::CorruptRow {
        node: id.clone(),
        reason,
    };
    let text = |index: usize| -> Result<String, StoreError> { Ok(row.try_get(index)?) };
    let services: String = text(13)?;
    let shed: Vec<ShedTierState> = serde_json::from_str(&services)
        .map_err(|err| corrupt(format!("services column: {err}")))?;
    let uptime_ms = u64::try_from(row.try_get::<i64, _>(16)?).unwrap_or(0);
    let age_ms = u64::try_from(row.try_get::<i64, _>(17)?).unwrap_or(0);
    let interval_ms = u64::try_from(row.try_get::<i64, _>(15)?).unwrap_or(0);
    Ok(NodeStatus {
        id: NodeId::new(id.clone()).map_err(|err| corrupt(err.to_string()))?,
        pool: PoolName::new(text(1)?).map_err(|err| corrupt(err.to_string()))?,
        role: text(2)?.parse::<NodeRole>().map_err(corrupt)?,
        sip_uri: text(3)?,
        state: text(4)?.parse::<NodeState>().map_err(corrupt)?,
        drain_requested: row.try_get::<i64, _>(5)? != 0,
        pbx_up: row.try_get::<i64, _>(6)? != 0,
        calls: u32_column(row, 7)?,
        max_calls: u32_column(row, 8)?,
        load1: row.try_get(9)?,
        cpu_pct: row.try_get(10)?,
        mem_pct: row.try_get(11)?,
        cores: u32_column(row, 12)?,
        shed,
        seq: u64::try_from(row.try_get::<i64, _>(14)?).unwrap_or(0),
        interval_ms,
        uptime_ms,
        age_ms,
        stale: is_stale(age_ms, interval_ms),
    })
}

/// A store URL with its password redacted, for error messages.
struct ShownUrl(String);

impl ShownUrl {
    fn invalid(&self, reason: impl Into<String>) -> StoreError {
        StoreError::InvalidUrl {
            url: self.0.clone(),
            reason: reason.into(),
        }
    }

    fn migrate(&self, source: MigrateError) -> StoreError {
        StoreError::Migrate {
            url: self.0.clone(),
            source,
        }
    }

    fn unreachable(&self, source: sqlx::Error) -> StoreError {
        StoreError::Unreachable {
            url: self.0.clone(),
            source,
        }
    }
}

/// One connection outside the pool, made first so that a server that cannot be reached is
/// reported with its real cause (refused, access denied, unknown database) rather than the
/// pool's bare timeout.
async fn connect_once<O>(options: O, limit: Duration) -> Result<O::Connection, sqlx::Error>
where
    O: ConnectOptions,
    O::Connection: Sized,
{
    tokio::time::timeout(limit, options.connect())
        .await
        .unwrap_or(Err(sqlx::Error::PoolTimedOut))
}

/// Takes an exclusive lock on `path` (created if missing), held until the file is dropped.
async fn lock_file(path: String) -> std::io::Result<std::fs::File> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        file.lock()?;
        Ok(file)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// The embedded migrations of a dialect. Its own lock is off: see `Store::connect`.
fn migrator(sql: &Dialect) -> Migrator {
    let files: &[(i64, &str, &'static str)] = if sql.name == "mysql" {
        &[
            (1, "nodes", include_str!("migrations/mysql/0001_nodes.sql")),
            (
                2,
                "directory",
                include_str!("migrations/mysql/0002_directory.sql"),
            ),
            (
                3,
                "provisioning",
                include_str!("migrations/mysql/0003_provisioning.sql"),
            ),
            (
                4,
                "directory version",
                include_str!("migrations/mysql/0004_directory_version.sql"),
            ),
            (
                5,
                "request ids",
                include_str!("migrations/mysql/0005_request_ids.sql"),
            ),
            (
                6,
                "call events",
                include_str!("migrations/mysql/0006_call_events.sql"),
            ),
            (
                7,
                "queue figures",
                include_str!("migrations/mysql/0007_queue_figures.sql"),
            ),
            (
                8,
                "caller attributes",
                include_str!("migrations/mysql/0008_caller_attributes.sql"),
            ),
            (
                9,
                "ringing",
                include_str!("migrations/mysql/0009_ringing.sql"),
            ),
            (
                10,
                "state since",
                include_str!("migrations/mysql/0010_state_since.sql"),
            ),
            (
                11,
                "autoscaler",
                include_str!("migrations/mysql/0011_autoscaler.sql"),
            ),
        ]
    } else {
        &[
            (1, "nodes", include_str!("migrations/sqlite/0001_nodes.sql")),
            (
                2,
                "directory",
                include_str!("migrations/sqlite/0002_directory.sql"),
            ),
            (
                3,
                "provisioning",
                include_str!("migrations/sqlite/0003_provisioning.sql"),
            ),
            (
                4,
                "directory version",
                include_str!("migrations/sqlite/0004_directory_version.sql"),
            ),
            (
                5,
                "request ids",
                include_str!("migrations/sqlite/0005_request_ids.sql"),
            ),
            (
                6,
                "call events",
                include_str!("migrations/sqlite/0006_call_events.sql"),
            ),
            (
                7,
                "queue figures",
                include_str!("migrations/sqlite/0007_queue_figures.sql"),
            ),
            (
                8,
                "caller attributes",
                include_str!("migrations/sqlite/0008_caller_attributes.sql"),
            ),
            (
                9,
                "ringing",
                include_str!("migrations/sqlite/0009_ringing.sql"),
            ),
            (
                10,
                "state since",
                include_str!("migrations/sqlite/0010_state_since.sql"),
            ),
            (
                11,
                "autoscaler",
                include_str!("migrations/sqlite/0011_autoscaler.sql"),
            ),
        ]
    };
    let mut migrator = Migrator::with_migrations(
        files
            .iter()
            .map(|(version, description, text)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    SqlStr::from_static(text),
                    false,
                )
            })
            .collect(),
    );
    migrator.set_locking(false);
    migrator
}

// Declared after `with_pool!`, which it uses.
pub mod directory;

pub use directory::{
    Agent, AgentSnapshot, AgentState, AuditEntry, Availability, CallEvent, CallEventOutcome,
    CallOutcome, CallerEntry, CredentialsChange, DailyCounts, Device, DigestCredentials,
    DirectorySnapshot, Login, MAX_EXTRA_NODES, Queue, QueueCounts, QueueMember, QueueSnapshot,
    Ringing, ScalerSteering, Session, SipDevice, aor_of,
};

#[cfg(test)]
mod directory_tests;
#[cfg(test)]
mod tests;
