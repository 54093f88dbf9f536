//! Configuration: defaults < TOML file < `CALLFLEET_<SECTION>__<KEY>` environment < flags.
//!
//! Loading is a pure function of the file, the environment and the flags, and ends in a
//! validated [`Config`]: an unknown key, a wrong type or an impossible value is an error that
//! names the key and where it came from, so a typo never silently falls back to a default.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, NodeRole, PoolName};

mod autoscaler;
pub use autoscaler::{
    AutoscalerConfig, AwsConfig, CommandConfig, ExecutorConfig, UnsafeScalerSwitches,
};

/// Prefix of environment overrides: `CALLFLEET_STORE__URL=mysql://…` sets `store.url`.
pub const ENV_PREFIX: &str = "CALLFLEET_";

/// Where `callfleet up` and `callfleet status` keep the single-box store by default.
pub const DEFAULT_DATA_DIR: &str = "callfleet-data";

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named on the command line does not exist.
    #[error(
        "config file {0} does not exist; pass an existing file with --config or leave it out to use the defaults"
    )]
    FileMissing(PathBuf),
    /// A key is unknown, has the wrong type, or the TOML does not parse.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A value parses but cannot work (e.g. a shed tier whose `below` is above its `above`).
    #[error("invalid configuration: `{key}` {reason}")]
    Value {
        /// Dotted key of the offending option.
        key: String,
        /// What is wrong with it and what would be right.
        reason: String,
    },
}

/// A string that must not appear in logs or `Debug` output (passwords, secrets).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The whole configuration of a callfleet process.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The fleet store.
    pub store: StoreConfig,
    /// This node, as its node-agent reports it.
    pub node: NodeConfig,
    /// Logging.
    pub log: LogConfig,
    /// The carrier-facing SIP balancer.
    pub balancer: BalancerConfig,
    /// The lease service for agents.
    pub lock_service: LockServiceConfig,
    /// The API for CRMs, supervisors and the website.
    pub control_plane: ControlPlaneConfig,
    /// This node's Asterisk, as `callfleet asterisk-config` writes its configuration.
    pub asterisk: AsteriskConfig,
    /// The node-agent's local realtime endpoint for Asterisk's res_config_curl.
    pub provisioning: ProvisioningConfig,
}

/// The node-agent's provisioning endpoint: Asterisk's `res_config_curl` asks it for
/// devices (`ps_endpoints`, `ps_aors`, `ps_auths`) and registrations (`ps_contacts`); it asks
/// the control plane within `deadline` and answers from its cache while the control plane
/// cannot answer, so Asterisk never forgets a device because a server is down.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvisioningConfig {
    /// `ip:port` the endpoint listens on (loopback: only the local Asterisk asks); empty:
    /// no endpoint, and `callfleet asterisk-config` writes no realtime devices.
    pub listen: String,
    /// The control plane's base URL, e.g. `http://10.0.0.2:8080`; empty: the local one
    /// (`control_plane.listen`).
    pub control_plane: String,
    /// A control-plane token with role `node` (reads provisioning, writes registrations,
    /// reads queues' candidates, reports its queued calls' agent events and outcomes,
    /// nothing else). `callfleet up` uses its own.
    pub token: Secret,
    /// How long one request to the control plane may take before the cache answers.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// How old a cached answer may be and still be served while the control plane is
    /// unreachable; older answers are dropped and the request reads as "not found".
    #[serde(with = "humantime_serde")]
    pub stale_max: Duration,
    /// After a failed request, how long the cache answers alone before the control plane is
    /// asked again (so Asterisk does not wait `deadline` on every request of an outage).
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    /// File keeping registrations written while the control plane was unreachable until
    /// they are delivered, so a node-agent restart loses none; empty: kept in memory only.
    pub pending_file: String,
    /// How often every family is read whole, so that through an outage this node knows
    /// every device and registration, not only those it asked for before; `0s`: never.
    #[serde(with = "humantime_serde")]
    pub prefetch: Duration,
}

impl Default for ProvisioningConfig {
    fn default() -> Self {
        Self {
            listen: String::new(),
            control_plane: String::new(),
            token: Secret::default(),
            deadline: Duration::from_millis(500),
            stale_max: Duration::from_secs(24 * 3600),
            retry_after: Duration::from_secs(2),
            pending_file: String::new(),
            prefetch: Duration::from_secs(30),
        }
    }
}

impl ProvisioningConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| {
            Err(ConfigError::Value {
                key: format!("provisioning.{key}"),
                reason,
            })
        };
        if self.listen.is_empty() {
            return Ok(());
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "listen",
                format!("`{}` must be ip:port, e.g. 127.0.0.1:8090", self.listen),
            );
        }
        // Plain HTTP, as the API itself serves (TLS belongs to the network in front of it).
        if !self.control_plane.is_empty() && !self.control_plane.starts_with("http://") {
            return bad(
                "control_plane",
                format!(
                    "`{}` must be an http:// URL, e.g. http://10.0.0.2:8080",
                    self.control_plane
                ),
            );
        }
        // An empty token is the node-agent's start error, not the file's: `callfleet up` and
        // `callfleet asterisk-config` need none from the file.
        if self.deadline < Duration::from_millis(10) || self.deadline > Duration::from_secs(10) {
            return bad("deadline", "must be between 10ms and 10s".into());
        }
        if self.stale_max.is_zero() {
            return bad("stale_max", "must be longer than 0s (e.g. 24h)".into());
        }
        if self.retry_after.is_zero() {
            return bad("retry_after", "must be longer than 0s (e.g. 2s)".into());
        }
        Ok(())
    }

    /// The control plane's base URL without a trailing slash.
    pub fn control_plane_url(&self, control_plane: &ControlPlaneConfig) -> String {
        if self.control_plane.is_empty() {
            format!("http://{}", control_plane.listen)
        } else {
            self.control_plane.trim_end_matches('/').to_owned()
        }
    }
}

/// This node's Asterisk. The SIP transport listens on `balancer.local_pbx`, the manager
/// interface on `node.calls.address` for the `node.calls.username` user; what is here is
/// the rest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AsteriskConfig {
    /// The Asterisk install (the folder holding `sbin/asterisk`, as
    /// `./scripts/build-asterisk` prints it); empty: callfleet manages no PBX here.
    pub install: String,
    /// Addresses (IPs or CIDRs) of the balancers that proxy carrier calls to this PBX; with
    /// the carriers' networks in `balancer.allow` they are what identifies the carrier.
    /// Empty: this node's own balancer (the host of `balancer.advertise` or `listen`).
    pub balancers: Vec<String>,
    /// How long a device rings before the call gives up on it.
    #[serde(with = "humantime_serde")]
    pub ring_timeout: Duration,
    /// `callfleet up` runs Asterisk when `install` is set, restarting it when it dies, at
    /// most this many times within `restart_window`; then it gives up and the node reports
    /// its PBX down.
    pub restart_limit: u32,
    /// See `restart_limit`.
    #[serde(with = "humantime_serde")]
    pub restart_window: Duration,
    /// Dialled numbers that are queues: number → queue id (`"5000" = "sales"`). A carrier's
    /// call to one of them waits in that queue for one free agent of the cluster.
    pub queues: std::collections::BTreeMap<String, String>,
    /// Where a queued call goes after `node.queue.max_wait`: a number dialled as the
    /// carrier would (another queue's, or a device's); empty: the caller hears congestion.
    pub queue_overflow: String,
}

impl Default for AsteriskConfig {
    fn default() -> Self {
        Self {
            install: String::new(),
            balancers: Vec::new(),
            ring_timeout: Duration::from_secs(30),
            restart_limit: 5,
            restart_window: Duration::from_secs(600),
            queues: std::collections::BTreeMap::new(),
            queue_overflow: String::new(),
        }
    }
}

/// Where the fleet store lives and how history is kept.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://path/fleet.db` (single box) or `mysql://user:password@host:3306/db`.
    pub url: String,
    /// Connections kept by each process.
    pub max_connections: u32,
    /// How long to wait for a connection before a store operation fails.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How often a node's sample is appended to its history (for charts).
    #[serde(with = "humantime_serde")]
    pub history_interval: Duration,
    /// How long history is kept; older samples are deleted.
    #[serde(with = "humantime_serde")]
    pub history_retention: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: format!("sqlite://{DEFAULT_DATA_DIR}/fleet.db"),
            max_connections: 4,
            connect_timeout: Duration::from_secs(5),
            history_interval: Duration::from_secs(30),
            history_retention: Duration::from_secs(24 * 3600),
        }
    }
}

impl StoreConfig {
    /// The database file of a `sqlite://` URL (without its `?options`); `None` for MySQL.
    pub fn sqlite_path(&self) -> Option<&str> {
        let rest = self.url.strip_prefix("sqlite://")?;
        Some(rest.split_once('?').map_or(rest, |(path, _)| path))
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("history_interval", &self.history_interval)
            .field("history_retention", &self.history_retention)
            .finish()
    }
}

/// Returns `url` with its password (if any) replaced, fit for logs and error messages.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Setting a password only fails for URLs that cannot have one.
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(_) => url.to_owned(),
        // An unparsable URL may still hold a password: show only its scheme.
        Err(_) => match url.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://…"),
            None => "<unparsable url>".to_owned(),
        },
    }
}

/// The local node as its node-agent reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Unique node id; defaults to the host name.
    pub id: Option<NodeId>,
    /// The pool of nodes this one serves.
    pub pool: PoolName,
    /// `core` (permanent) or `extra` (autoscaled).
    pub role: NodeRole,
    /// Where balancers send calls for this node.
    pub sip_uri: String,
    /// Concurrent calls this node can carry.
    pub max_calls: u32,
    /// How often the node heartbeats into the store.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Where the PBX's active call count comes from.
    pub calls: CallsConfig,
    /// Load-shedding tiers, each a service stopped above a load and restarted below another.
    pub shed: Vec<ShedTier>,
    /// The FastAGI server through which this node's dialplan hands calls to the node-agent.
    pub agi: AgiConfig,
    /// Queued calls: how the node-agent asks the control plane for a queue's candidates.
    pub queue: QueueConfig,
    /// `ip:port` of the node-agent's Prometheus listener (`GET /metrics`); empty: none.
    pub metrics_listen: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: None,
            pool: PoolName::new("default").expect("\"default\" is a valid pool name"),
            role: NodeRole::Core,
            sip_uri: "sip:127.0.0.1:5080".to_owned(),
            max_calls: 100,
            heartbeat_interval: Duration::from_secs(2),
            calls: CallsConfig::default(),
            shed: Vec::new(),
            agi: AgiConfig::default(),
            queue: QueueConfig::default(),
            metrics_listen: String::new(),
        }
    }
}

/// Queued calls on this node. The candidates (the agents to ring, best first) come from the
/// control plane (`provisioning.control_plane`, with the `node` token `provisioning.token`)
/// and are cached per queue and caller attributes: a CRM's change must reach the next ring,
/// so an answer is reused only for `candidates_fresh`; while the control plane cannot answer,
/// the last answer keeps calls flowing for `candidates_stale_max`. A caller's attributes
/// from the control plane's caller-number lists are looked up the same way (`callers_*`),
/// each lookup bounded by `callers_deadline` so that no outage holds a caller up longer.
/// One flat table, so every key can be overridden on its own
/// (`CALLFLEET_NODE__QUEUE__CANDIDATES_FRESH`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// How long an answer is used without asking again; `0s`: every ring asks.
    #[serde(with = "humantime_serde")]
    pub candidates_fresh: Duration,
    /// How long one request may take before the cached answer is used instead.
    #[serde(with = "humantime_serde")]
    pub candidates_deadline: Duration,
    /// How old a cached answer may be and still be used while the control plane cannot
    /// answer; older, the call has no candidates (it waits, nobody is rung).
    #[serde(with = "humantime_serde")]
    pub candidates_stale_max: Duration,
    /// After a failed request, how long cached answers are used without asking, so an
    /// outage costs no ring a `candidates_deadline`.
    #[serde(with = "humantime_serde")]
    pub candidates_retry_after: Duration,
    /// Answers kept at most (queue × attribute sets); the least recently used goes first.
    pub candidates_cached: usize,
    /// How long a caller number's looked-up attributes are used without asking again; a
    /// change to a list reaches that number's next call after at most this.
    #[serde(with = "humantime_serde")]
    pub callers_fresh: Duration,
    /// How long one lookup may take: the most it delays a queued call, which then goes on
    /// with the cached or no list attributes.
    #[serde(with = "humantime_serde")]
    pub callers_deadline: Duration,
    /// How old a looked-up answer may be and still be used while the control plane cannot
    /// answer; older, the caller has no list attributes (only the carrier header's).
    #[serde(with = "humantime_serde")]
    pub callers_stale_max: Duration,
    /// After a failed lookup, how long nobody asks (cached answers or none are used), so an
    /// outage costs no call a `callers_deadline`.
    #[serde(with = "humantime_serde")]
    pub callers_retry_after: Duration,
    /// Caller numbers kept at most; the least recently looked up goes first.
    pub callers_cached: usize,
    /// The lock service (`http://host:port`) that holds the waiting order and the agents'
    /// leases: no lease, no ring.
    pub lock_service: String,
    /// How often a waiting caller asks for its turn when it got none.
    #[serde(with = "humantime_serde")]
    pub poll: Duration,
    /// How long an agent's phone rings before the next candidate is tried.
    #[serde(with = "humantime_serde")]
    pub ring_timeout: Duration,
    /// After a call, how long the agent is out of every queue for its paperwork.
    #[serde(with = "humantime_serde")]
    pub wrap_up: Duration,
    /// Rings in a row an agent may miss before being paused with the reason `missed`.
    pub max_misses: u32,
    /// How long a caller waits before the dialplan sends the call to its overflow target.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// When this node's Asterisk goes away in the middle of a ring or a call, how long the
    /// agent is kept from every other ring: their phone still holds the dead call until
    /// they hang up or it gives up on it (a SIP phone's BYE or 200 OK times out after 32 s).
    #[serde(with = "humantime_serde")]
    pub pbx_lost_hold: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            candidates_fresh: Duration::from_secs(1),
            candidates_deadline: Duration::from_millis(500),
            candidates_stale_max: Duration::from_secs(600),
            candidates_retry_after: Duration::from_secs(2),
            candidates_cached: 1024,
            callers_fresh: Duration::from_secs(5),
            callers_deadline: Duration::from_millis(200),
            callers_stale_max: Duration::from_secs(600),
            callers_retry_after: Duration::from_secs(2),
            callers_cached: 10_000,
            lock_service: "http://127.0.0.1:7070".to_owned(),
            poll: Duration::from_millis(100),
            ring_timeout: Duration::from_secs(20),
            wrap_up: Duration::from_secs(5),
            max_misses: 3,
            max_wait: Duration::from_secs(600),
            pbx_lost_hold: Duration::from_secs(60),
        }
    }
}

impl QueueConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: &str| {
            Err(ConfigError::Value {
                key: format!("node.queue.{key}"),
                reason: reason.to_owned(),
            })
        };
        // A CRM's change takes effect on the next ring: a minute is already long for that.
        if self.candidates_fresh > Duration::from_secs(60) {
            return bad("candidates_fresh", "must be at most 60s (e.g. 1s)");
        }
        if self.candidates_deadline < Duration::from_millis(10)
            || self.candidates_deadline > Duration::from_secs(10)
        {
            return bad("candidates_deadline", "must be between 10ms and 10s");
        }
        if self.candidates_stale_max < self.candidates_fresh || self.candidates_stale_max.is_zero()
        {
            return bad(
                "candidates_stale_max",
                "must be above 0s and at least candidates_fresh (e.g. 10m)",
            );
        }
        if self.candidates_retry_after.is_zero() {
            return bad("candidates_retry_after", "must be longer than 0s (e.g. 2s)");
        }
        if self.candidates_cached == 0 || self.candidates_cached > 1_000_000 {
            return bad("candidates_cached", "must be 1 to 1000000 (e.g. 1024)");
        }
        if self.callers_fresh > Duration::from_secs(3600) {
            return bad("callers_fresh", "must be at most 1h (e.g. 5s)");
        }
        // Every queued call waits for its lookup: a second is already long for a caller.
        if self.callers_deadline < Duration::from_millis(10)
            || self.callers_deadline > Duration::from_secs(2)
        {
            return bad(
                "callers_deadline",
                "must be between 10ms and 2s (e.g. 200ms)",
            );
        }
        if self.callers_stale_max < self.callers_fresh || self.callers_stale_max.is_zero() {
            return bad(
                "callers_stale_max",
                "must be above 0s and at least callers_fresh (e.g. 10m)",
            );
        }
        if self.callers_retry_after.is_zero() {
            return bad("callers_retry_after", "must be longer than 0s (e.g. 2s)");
        }
        if self.callers_cached == 0 || self.callers_cached > 10_000_000 {
            return bad("callers_cached", "must be 1 to 10000000 (e.g. 10000)");
        }
        if !self.lock_service.starts_with("http://") {
            return bad(
                "lock_service",
                "must be the lock service's http://host:port (e.g. http://127.0.0.1:7070)",
            );
        }
        if self.poll < Duration::from_millis(10) || self.poll > Duration::from_secs(5) {
            return bad("poll", "must be between 10ms and 5s (e.g. 100ms)");
        }
        if self.ring_timeout < Duration::from_secs(1)
            || self.ring_timeout > Duration::from_secs(300)
        {
            return bad("ring_timeout", "must be between 1s and 5m (e.g. 20s)");
        }
        if self.wrap_up > Duration::from_secs(3600) {
            return bad("wrap_up", "must be at most 1h (e.g. 5s; 0s for none)");
        }
        if self.max_misses == 0 {
            return bad("max_misses", "must be at least 1 (e.g. 3)");
        }
        if self.max_wait < Duration::from_secs(1) || self.max_wait > Duration::from_secs(86_400) {
            return bad("max_wait", "must be between 1s and 24h (e.g. 10m)");
        }
        if self.pbx_lost_hold > Duration::from_secs(3600) {
            return bad("pbx_lost_hold", "must be at most 1h (e.g. 60s)");
        }
        Ok(())
    }
}

impl NodeConfig {
    /// Where to serve `/metrics`, or `None` when `metrics_listen` is empty.
    pub fn metrics_address(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        metrics_address("node.metrics_listen", &self.metrics_listen)
    }

    /// The configured id, or the host name when none is configured.
    pub fn resolved_id(&self) -> Result<NodeId, ConfigError> {
        if let Some(id) = &self.id {
            return Ok(id.clone());
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .unwrap_or_default();
        let host = host.trim();
        NodeId::new(host).map_err(|err| ConfigError::Value {
            key: "node.id".into(),
            reason: format!(
                "is not set and the host name cannot serve as one ({err}); set node.id in the config"
            ),
        })
    }
}

/// The node-agent's FastAGI server: the dialplan's `AGI(agi://127.0.0.1:4573/<script>?…)`
/// opens one connection per call, and the node-agent drives that call until it closes the
/// connection (Asterisk then goes on with the dialplan).
///
/// FastAGI has no authentication: whoever can connect can pose as Asterisk and feed the
/// node-agent made-up calls. The listener is therefore loopback by default, and another
/// address is refused unless `allow_remote` says so.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgiConfig {
    /// `ip:port` of the FastAGI listener; empty: no FastAGI server.
    pub listen: String,
    /// Allows a `listen` address other than loopback (e.g. Asterisk on another host, with
    /// the port firewalled to it): anyone who reaches the port can drive calls.
    pub allow_remote: bool,
    /// Sessions served at once; beyond it a new connection is closed as it is accepted
    /// (the dialplan then takes its fallback). Keep it below the file limit (`ulimit -n`).
    pub max_sessions: usize,
    /// How long Asterisk may take to send a session's environment after connecting; a
    /// connection that has not sent it by then is closed.
    #[serde(with = "humantime_serde")]
    pub environment_timeout: Duration,
    /// How long a command that Asterisk answers at once (`GET VARIABLE`, `SET VARIABLE`,
    /// `VERBOSE`…) may wait for its reply before the session is closed. Commands that block
    /// on the caller (`EXEC`, `STREAM FILE`, `GET DATA`…) have no such bound unless the
    /// script gives one.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// When the node-agent stops, sessions in progress get this long to end; then their
    /// connections are closed and Asterisk goes on with the dialplan.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for AgiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:4573".to_owned(),
            allow_remote: false,
            max_sessions: 4096,
            environment_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl AgiConfig {
    /// The longest `environment_timeout`: Asterisk writes the environment as soon as it is
    /// connected, so anything near this is a peer that is not Asterisk.
    pub const MAX_ENVIRONMENT_TIMEOUT: Duration = Duration::from_secs(60);

    /// The listener's address, or `None` when `listen` is empty (no FastAGI server).
    /// Valid after [`Config::validate`].
    pub fn address(&self) -> Option<std::net::SocketAddr> {
        self.listen.parse().ok()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| {
            Err(ConfigError::Value {
                key: format!("node.agi.{key}"),
                reason,
            })
        };
        if !self.listen.is_empty() {
            let Ok(address) = self.listen.parse::<std::net::SocketAddr>() else {
                return bad(
                    "listen",
                    format!(
                        "`{}` must be ip:port (e.g. 127.0.0.1:4573), or empty for no FastAGI server",
                        self.listen
                    ),
                );
            };
            if !address.ip().is_loopback() && !self.allow_remote {
                return bad(
                    "listen",
                    format!(
                        "`{}` is not a loopback address; FastAGI has no authentication, so anyone who reaches the port could drive calls. Use 127.0.0.1, or set node.agi.allow_remote = true with the port firewalled to Asterisk",
                        self.listen
                    ),
                );
            }
        }
        if self.max_sessions == 0 || self.max_sessions > 1_000_000 {
            return bad(
                "max_sessions",
                "must be 1 to 1000000, and below the file limit (ulimit -n); e.g. 4096".into(),
            );
        }
        if self.environment_timeout.is_zero()
            || self.environment_timeout > Self::MAX_ENVIRONMENT_TIMEOUT
        {
            return bad(
                "environment_timeout",
                "must be above zero and at most 60s (e.g. 2s)".into(),
            );
        }
        if self.command_timeout.is_zero() {
            return bad("command_timeout", "must be above zero (e.g. 10s)".into());
        }
        Ok(())
    }
}

/// Where the node-agent gets the PBX's active call count. One flat table, so every key can
/// be overridden on its own by a later layer (e.g. `CALLFLEET_NODE__CALLS__SECRET`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CallsConfig {
    /// `static` (a fixed number) or `ami` (Asterisk Manager Interface).
    pub source: CallSourceKind,
    /// For `static`: the call count to report.
    pub count: u32,
    /// For `ami`: `host:port` of the manager interface.
    pub address: String,
    /// For `ami`: manager user (a `manager.conf` section).
    pub username: String,
    /// For `ami`: the user's secret.
    pub secret: Secret,
    /// For `ami`: deadline for connecting, logging in and each query.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for CallsConfig {
    fn default() -> Self {
        Self {
            source: CallSourceKind::Static,
            count: 0,
            address: "127.0.0.1:5038".to_owned(),
            username: String::new(),
            secret: Secret::default(),
            timeout: Duration::from_secs(2),
        }
    }
}

/// Kinds of call-count source.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum CallSourceKind {
    /// A fixed number: nodes without a PBX, and tests.
    #[default]
    Static,
    /// Asterisk Manager Interface: `core show channels count`.
    Ami,
}

/// One load-shedding tier.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShedTier {
    /// Name shown in the heartbeat (e.g. `reports`).
    pub name: String,
    /// Load fraction (0–1) at or above which the tier is shed.
    pub above: f64,
    /// Load fraction below which the tier is restored; lower than `above` (hysteresis).
    pub below: f64,
    /// Shell command run when the tier is shed.
    #[serde(default)]
    pub stop: String,
    /// Shell command run when the tier is restored.
    #[serde(default)]
    pub start: String,
    /// While shed, the node takes no new calls (state `draining`).
    #[serde(default)]
    pub refuse_calls: bool,
}

/// The SIP balancer on a core node: where it listens and how it chooses a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalancerConfig {
    /// `ip:port` for both UDP and TCP.
    pub listen: String,
    /// `host:port` this balancer puts in Via and Record-Route when it proxies; defaults to
    /// `listen` (set it when `listen` is a wildcard address).
    pub advertise: String,
    /// What happens to a call the local node should take: `proxy` (forward statelessly to
    /// `local_pbx`) or `redirect` (answer 302 pointing at `local_pbx`).
    pub local_mode: LocalMode,
    /// `ip:port` of this node's PBX.
    pub local_pbx: String,
    /// Contacts in a 302: the chosen node, then next-best nodes with decreasing q-values.
    pub contacts: u32,
    /// Seconds put in `Retry-After` of a 503, so the carrier moves on and comes back.
    pub retry_after: u32,
    /// A node whose last heartbeat is older than this (by the store's clock) gets no calls.
    #[serde(with = "humantime_serde")]
    pub heartbeat_ttl: Duration,
    /// How often the fleet view is re-read from the store, in the background.
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    /// How long the last fleet view is trusted while the store is unreachable.
    #[serde(with = "humantime_serde")]
    pub stale_grace: Duration,
    /// Weight of a node's CPU load (0–1) added to its utilisation when scoring it.
    pub cpu_weight: f64,
    /// Carrier addresses (`CIDR` or single IPs) that may send requests; empty = anyone.
    pub allow: Vec<String>,
    /// What requests from outside `allow` get: `drop` (nothing) or `reject` (403).
    pub deny_mode: DenyMode,
    /// Largest SIP message accepted, in bytes; larger ones get 513.
    pub max_message: usize,
    /// UDP worker threads; 0 = half the cores (at least one).
    pub workers: usize,
    /// Requested UDP receive buffer in bytes (the kernel may cap it at `net.core.rmem_max`).
    pub recv_buffer: usize,
    /// A request that waited longer than this before a worker saw it is answered 503: the
    /// balancer is behind, and a quick 503 beats a kernel drop and a carrier retransmission.
    #[serde(with = "humantime_serde")]
    pub overload_delay: Duration,
    /// Request-URI domains or number prefixes that select a node pool; unmatched calls go
    /// to the `default` pool.
    pub pools: Vec<PoolRule>,
    /// Addresses (IPs or CIDRs) the local PBX sends from, on any port: its messages pass
    /// `allow`, its in-dialog requests are forwarded to carriers, its answers to our probes
    /// count. Empty: the address of `local_pbx` and, when that is a loopback or wildcard
    /// address (a PBX on this host), every address of this host.
    pub pbx_addresses: Vec<String>,
    /// INVITE transactions held at once (each keeps its response for retransmission until
    /// the ACK, at most 32 s; a proxied one its decision). A new INVITE beyond it gets 503
    /// with `Retry-After` and no state, so a flood of INVITEs that are never ACKed costs
    /// bounded memory and bounded retransmissions.
    pub max_transactions: usize,
    /// TCP connections served at once; beyond it a new one is closed at accept. Each holds
    /// at most about `max_message` + 16 KiB of buffer.
    pub tcp_max_connections: usize,
    /// TCP connections served at once from one IP address: a carrier's SBC opens one or a
    /// few, and the default leaves room for many SBCs behind one NAT address while one
    /// address cannot take the whole table.
    pub tcp_max_connections_per_address: usize,
    /// How long a TCP message may take from its first byte, and a new connection to its
    /// first message (OpenSIPS allows 4 s by default).
    #[serde(with = "humantime_serde")]
    pub tcp_message_timeout: Duration,
    /// How long a TCP connection may carry nothing either way before it is closed: above
    /// the 120 s at most between RFC 5626 keep-alives and the 30–60 s OPTIONS pings
    /// carriers send on trunks.
    #[serde(with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
    /// How long one answer may take to be written to a TCP peer that does not read.
    #[serde(with = "humantime_serde")]
    pub tcp_write_timeout: Duration,
    /// `ip:port` of the balancer's Prometheus listener (`GET /metrics`); empty: none.
    pub metrics_listen: String,
}

impl BalancerConfig {
    /// Where to serve `/metrics`, or `None` when `metrics_listen` is empty.
    pub fn metrics_address(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        metrics_address("balancer.metrics_listen", &self.metrics_listen)
    }
}

/// A `metrics_listen` setting: empty for none, else `ip:port`.
fn metrics_address(key: &str, value: &str) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    if value.is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| ConfigError::Value {
        key: key.into(),
        reason: format!("`{value}` must be ip:port, e.g. 127.0.0.1:9464, or empty for no /metrics"),
    })
}

impl Default for BalancerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:5060".to_owned(),
            advertise: String::new(),
            local_mode: LocalMode::Proxy,
            local_pbx: "127.0.0.1:5080".to_owned(),
            contacts: 1,
            retry_after: 5,
            heartbeat_ttl: Duration::from_secs(6),
            refresh: Duration::from_millis(500),
            stale_grace: Duration::from_secs(60),
            cpu_weight: 0.5,
            allow: Vec::new(),
            deny_mode: DenyMode::Drop,
            max_message: 8192,
            workers: 0,
            recv_buffer: 4 * 1024 * 1024,
            overload_delay: Duration::from_millis(200),
            pools: Vec::new(),
            pbx_addresses: Vec::new(),
            // 1,500 calls/s proxied for 32 s; about 35 MB when all are unACKed 302s.
            max_transactions: 50_000,
            tcp_max_connections: 4096,
            tcp_max_connections_per_address: 64,
            tcp_message_timeout: Duration::from_secs(5),
            tcp_idle_timeout: Duration::from_secs(180),
            tcp_write_timeout: Duration::from_secs(10),
            metrics_listen: String::new(),
        }
    }
}

/// Where the local node's calls go.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LocalMode {
    /// Forward the INVITE statelessly to the local PBX (RFC 3261 §16.11).
    #[default]
    Proxy,
    /// Answer 302 pointing at the local PBX.
    Redirect,
}

/// What requests from outside the allow-list get.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DenyMode {
    /// No answer at all: scanners learn nothing.
    #[default]
    Drop,
    /// `403 Forbidden`.
    Reject,
}

/// Calls whose Request-URI matches go to the nodes of pool `name`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolRule {
    /// The node pool.
    pub name: PoolName,
    /// Request-URI host names (exact, case-insensitive).
    #[serde(default)]
    pub domains: Vec<String>,
    /// Leading digits of the Request-URI user part (the dialled number; a leading `+` is
    /// ignored).
    #[serde(default)]
    pub prefixes: Vec<String>,
}

/// The lock service: where it listens, where leases live, how long they last.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LockServiceConfig {
    /// `ip:port` for gRPC and the HTTP twin (dialplan `CURL()`), on one listener.
    pub listen: String,
    /// `memory` (single box) or `redis`.
    pub backend: LockBackendKind,
    /// For `redis`: `redis://[user:password@]host:port/db` for one server, or, to follow
    /// Sentinel failovers,
    /// `redis+sentinel://[user:password@]host[:port][,host[:port]…]/master[/db][?sentinel_username=…&sentinel_password=…]`:
    /// the sentinels (port 26379 when none is given; IPv6 in brackets) are asked for the
    /// current master named `master` on every (re)connect. `user:password` and `db` are the
    /// master's, as in a plain URL; the sentinels get credentials only from
    /// `sentinel_username`/`sentinel_password` (percent-encode special characters). A new
    /// master has a new run id, so a failover starts the quarantine like a restart does.
    pub redis_url: String,
    /// Validity of a lease when the caller asks for none.
    #[serde(with = "humantime_serde")]
    pub validity: Duration,
    /// The longest validity a claim or a renewal may ask for. The quarantine after Redis
    /// lost data must outlast it, so it bounds how long claims stop after a loss.
    #[serde(with = "humantime_serde")]
    pub max_validity: Duration,
    /// How long a lease's resource stays claimed after its validity, so a holder whose
    /// clock runs late never overlaps the next holder.
    #[serde(with = "humantime_serde")]
    pub guard: Duration,
    /// Deadline of every backend call; nothing is retried behind the caller.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// How long claims are refused after Redis lost data (restart, flush, failover) and
    /// after the memory backend starts; must be longer than `max_validity + guard`, so
    /// every lease that may have been lost has ended before an agent is leased again.
    #[serde(with = "humantime_serde")]
    pub quarantine: Duration,
    /// Refuse to start unless Redis runs with `maxmemory-policy noeviction` and
    /// persistence; otherwise only warn.
    pub strict: bool,
    /// Protections switched off; never read from a file (see [`UnsafeLockSwitches`]).
    #[serde(skip)]
    pub unsafe_for_tests: UnsafeLockSwitches,
}

/// The lock service's protections that only tests switch off, so that the fault harness
/// can show each one is what keeps its scenario safe. Never set from a configuration file:
/// `CALLFLEET_TEST_UNSAFE_LOCKS` (comma-separated names) sets them, and the service logs
/// an error for every one that is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnsafeLockSwitches {
    /// `local_quarantine`: each process keeps its own quarantine in memory and writes the
    /// boot marker back, as before the quarantine lived in Redis.
    pub local_quarantine: bool,
    /// `unbounded_validity`: `quarantine` need not outlast `max_validity` + `guard`, so a
    /// test may grant leases longer than the quarantine that follows a lost Redis.
    pub unbounded_validity: bool,
    /// `no_startup_quarantine`: the memory backend grants leases as soon as it starts.
    pub no_startup_quarantine: bool,
    /// `naive_retry`: a retried claim reports the full validity without extending the
    /// lease, and leases another agent when its candidate list differs.
    pub naive_retry: bool,
}

impl UnsafeLockSwitches {
    /// The environment variable the tests set.
    pub const VARIABLE: &'static str = "CALLFLEET_TEST_UNSAFE_LOCKS";

    /// Reads a comma-separated list of switch names.
    pub fn parse(names: &str) -> Result<Self, String> {
        let mut switches = Self::default();
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "local_quarantine" => switches.local_quarantine = true,
                "unbounded_validity" => switches.unbounded_validity = true,
                "no_startup_quarantine" => switches.no_startup_quarantine = true,
                "naive_retry" => switches.naive_retry = true,
                other => {
                    return Err(format!(
                        "unknown switch `{other}` (known: local_quarantine, unbounded_validity, no_startup_quarantine, naive_retry)"
                    ));
                }
            }
        }
        Ok(switches)
    }

    /// The names of the switches that are on, for the log.
    pub fn names(&self) -> Vec<&'static str> {
        [
            (self.local_quarantine, "local_quarantine"),
            (self.unbounded_validity, "unbounded_validity"),
            (self.no_startup_quarantine, "no_startup_quarantine"),
            (self.naive_retry, "naive_retry"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

impl Default for LockServiceConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7070".to_owned(),
            backend: LockBackendKind::Memory,
            redis_url: "redis://127.0.0.1:6379/0".to_owned(),
            validity: Duration::from_secs(10),
            max_validity: Duration::from_secs(30),
            guard: Duration::from_secs(5),
            deadline: Duration::from_secs(1),
            quarantine: Duration::from_secs(40),
            strict: false,
            unsafe_for_tests: UnsafeLockSwitches::default(),
        }
    }
}

/// The longest lease validity the lock service can be configured for.
pub const LONGEST_LEASE: Duration = Duration::from_secs(3600);

impl LockServiceConfig {
    /// Checks what types alone cannot express; the lock service runs it again at start, so
    /// a configuration built in code is held to the same rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| {
            Err(ConfigError::Value {
                key: format!("lock_service.{key}"),
                reason,
            })
        };
        let shown = |d: Duration| humantime::format_duration(d).to_string();
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "listen",
                format!("`{}` must be ip:port, e.g. 127.0.0.1:7070", self.listen),
            );
        }
        if self.deadline.is_zero() {
            return bad("deadline", "must be longer than 0s".into());
        }
        let shortest = Duration::from_millis(100);
        if self.max_validity < shortest || self.max_validity > LONGEST_LEASE {
            return bad(
                "max_validity",
                format!(
                    "`{}` must be between 100ms and 1h",
                    shown(self.max_validity)
                ),
            );
        }
        if self.validity < shortest || self.validity > self.max_validity {
            return bad(
                "validity",
                format!(
                    "`{}` must be between 100ms and max_validity ({})",
                    shown(self.validity),
                    shown(self.max_validity)
                ),
            );
        }
        if self.guard > LONGEST_LEASE {
            return bad(
                "guard",
                format!("`{}` must be at most 1h", shown(self.guard)),
            );
        }
        if self.quarantine > Duration::from_secs(86_400) {
            return bad(
                "quarantine",
                format!("`{}` must be at most 1 day", shown(self.quarantine)),
            );
        }
        let longest_lost = self.max_validity + self.guard;
        if self.quarantine <= longest_lost && !self.unsafe_for_tests.unbounded_validity {
            return bad(
                "quarantine",
                format!(
                    "`{}` must be longer than max_validity + guard ({}): a lease lost with Redis's data could still be live when claims resume; raise quarantine above {} or lower max_validity",
                    shown(self.quarantine),
                    shown(longest_lost),
                    shown(longest_lost)
                ),
            );
        }
        if self.backend == LockBackendKind::Redis {
            let url = &self.redis_url;
            // Only the outline here (sentinels, then `/master`): the lock service reads the
            // details at start and names what is wrong with them.
            let outline = match url.strip_prefix("redis+sentinel://") {
                Some(rest) => rest.split_once('/').is_some_and(|(hosts, master)| {
                    !hosts.is_empty() && !master.is_empty() && !master.starts_with(['/', '?', '#'])
                }),
                None => url.starts_with("redis"),
            };
            if !outline {
                return bad(
                    "redis_url",
                    format!(
                        "`{}` must be redis://HOST:PORT/DB or redis+sentinel://HOST:PORT[,HOST:PORT…]/MASTER[/DB]",
                        redact_url(url)
                    ),
                );
            }
        }
        Ok(())
    }
}

impl fmt::Debug for LockServiceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockServiceConfig")
            .field("listen", &self.listen)
            .field("backend", &self.backend)
            .field("redis_url", &redact_url(&self.redis_url))
            .field("validity", &self.validity)
            .field("max_validity", &self.max_validity)
            .field("guard", &self.guard)
            .field("deadline", &self.deadline)
            .field("quarantine", &self.quarantine)
            .field("strict", &self.strict)
            .field("unsafe_for_tests", &self.unsafe_for_tests)
            .finish()
    }
}

/// Where leases live.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LockBackendKind {
    /// In the lock-service process: one box only.
    #[default]
    Memory,
    /// In Redis: any number of lock-service processes.
    Redis,
}

/// The control plane's API: REST, XML-RPC and gRPC on one listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    /// `ip:port` for REST (`/api/v1`), XML-RPC (`/RPC2`) and gRPC, on one listener.
    pub listen: String,
    /// Bearer tokens accepted by the API, each with a name (what the audit log shows) and
    /// a role. `callfleet up` adds an admin token of its own, kept in the data folder.
    pub tokens: Vec<ApiToken>,
    /// IANA time zone in which a day starts for daily counters and caps, e.g.
    /// `Europe/Berlin`.
    pub time_zone: String,
    /// How often the in-memory directory (queue status, routing) is re-read from the store.
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    /// The digest realm of devices' credentials when a write names none. The stored HA1 is
    /// bound to its realm, so changing this affects only credentials set afterwards.
    pub sip_realm: String,
    /// Connections served at once; beyond it a new connection is closed as it is accepted.
    /// Keep it well below the process's file limit (`ulimit -n`).
    pub max_connections: usize,
    /// Connections served at once from one client address (an IPv6 client's /64); beyond
    /// it that address's new connections are closed as they are accepted. Behind a reverse
    /// proxy every client shares the proxy's address.
    pub max_connections_per_address: usize,
    /// The longest an HTTP/1 client may take to send a request's header, counted from
    /// the connection's start or the end of its previous answer; it also closes a
    /// connection that sends nothing (an HTTP/2 client's opens with its preface).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A connection without a request in progress for this long is closed (HTTP/2 with a
    /// GOAWAY). An HTTP/1 connection waiting for its next request is also bounded by
    /// `header_timeout`.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// When the control plane stops (or closes an idle connection), requests in progress
    /// get this long to finish; then their connections are dropped.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Public queue status: requests per second allowed per client address (an IPv6
    /// client's /64), refilled continuously; beyond it the answer is 429 with
    /// `Retry-After`. Behind a reverse proxy every client shares the proxy's address.
    pub status_rate: f64,
    /// Public queue status: requests one client address may send at once before
    /// `status_rate` applies.
    pub status_burst: u32,
    /// The lock service (`http://host:port`) whose waiting orders give the queue status its
    /// waiting callers and longest wait; empty: none (the status says they are unknown).
    pub lock_service: String,
    /// When a queue turns amber (warning) or red (critical) on the supervisors' page,
    /// unless `queue_alerts` names the queue.
    pub queue_alert: QueueAlert,
    /// Per queue id: its own thresholds instead of `queue_alert`'s.
    pub queue_alerts: std::collections::BTreeMap<String, QueueAlert>,
    /// Extra nodes added and removed with the load.
    pub autoscaler: AutoscalerConfig,
}

/// A queue's warning and critical thresholds; a queue reaching either figure of a level is
/// at that level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueAlert {
    /// Callers waiting at which the queue is a warning.
    pub waiting_warning: u32,
    /// Callers waiting at which the queue is critical.
    pub waiting_critical: u32,
    /// Longest wait at which the queue is a warning.
    #[serde(with = "humantime_serde")]
    pub wait_warning: Duration,
    /// Longest wait at which the queue is critical.
    #[serde(with = "humantime_serde")]
    pub wait_critical: Duration,
}

impl Default for QueueAlert {
    /// A queue is worth a look when a few callers wait or one has waited well past the
    /// usual 20 s service level; critical at twice those.
    fn default() -> Self {
        Self {
            waiting_warning: 5,
            waiting_critical: 10,
            wait_warning: Duration::from_secs(30),
            wait_critical: Duration::from_secs(60),
        }
    }
}

impl QueueAlert {
    fn check(&self) -> Result<(), String> {
        if self.waiting_warning == 0 || self.waiting_critical < self.waiting_warning {
            return Err(format!(
                "waiting_warning ({}) must be at least 1 and at most waiting_critical ({}), e.g. 5 and 10",
                self.waiting_warning, self.waiting_critical
            ));
        }
        if self.wait_warning.is_zero() || self.wait_critical < self.wait_warning {
            return Err(format!(
                "wait_warning ({:?}) must be above zero and at most wait_critical ({:?}), e.g. \"30s\" and \"60s\"",
                self.wait_warning, self.wait_critical
            ));
        }
        Ok(())
    }
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".to_owned(),
            tokens: Vec::new(),
            time_zone: "UTC".to_owned(),
            refresh: Duration::from_secs(1),
            sip_realm: "callfleet".to_owned(),
            max_connections: 4096,
            max_connections_per_address: 256,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
            status_rate: 20.0,
            status_burst: 40,
            lock_service: "http://127.0.0.1:7070".to_owned(),
            queue_alert: QueueAlert::default(),
            queue_alerts: std::collections::BTreeMap::new(),
            autoscaler: AutoscalerConfig::default(),
        }
    }
}

/// A bearer token of the API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    /// Who uses it (`crm`, `website-admin`): written to the audit log, never the token.
    pub name: String,
    /// The token itself, at least 16 characters.
    pub token: Secret,
    /// What it may do.
    pub role: Role,
}

/// What a token may do: `read` < `write` < `admin`, each including the ones before it;
/// `node` stands apart.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A node's Asterisk (through its node-agent): read provisioning (devices), write
    /// registrations, read queues' candidates and one caller number's attributes at a
    /// time, and report what became of its queued calls (agent call events, queue
    /// outcomes), nothing else, so a token taken from a node cannot steer the center.
    Node,
    /// Read agents, queues, routing, nodes and the audit log.
    Read,
    /// Change agents, devices, queues, priorities and sessions.
    Write,
    /// Also drain and undrain nodes, and everything `node` may do.
    Admin,
}

impl Role {
    /// Whether a token of this role may do what `needed` allows.
    pub fn allows(self, needed: Role) -> bool {
        let rank = |role: Role| match role {
            Role::Node => None,
            Role::Read => Some(1),
            Role::Write => Some(2),
            Role::Admin => Some(3),
        };
        match (rank(self), rank(needed)) {
            (Some(have), Some(need)) => have >= need,
            (None, None) => true,
            (Some(_), None) => self == Role::Admin,
            (None, Some(_)) => false,
        }
    }
}

impl ControlPlaneConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| {
            Err(ConfigError::Value {
                key: format!("control_plane.{key}"),
                reason,
            })
        };
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "listen",
                format!("`{}` must be ip:port, e.g. 127.0.0.1:8080", self.listen),
            );
        }
        if jiff::tz::TimeZone::get(&self.time_zone).is_err() {
            return bad(
                "time_zone",
                format!(
                    "`{}` is not a known IANA time zone (e.g. UTC, Europe/Berlin)",
                    self.time_zone
                ),
            );
        }
        if self.refresh.is_zero() {
            return bad("refresh", "must be above zero (e.g. 1s)".into());
        }
        if self.sip_realm.is_empty()
            || self.sip_realm.len() > 128
            || !self
                .sip_realm
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\' | b':'))
        {
            return bad(
                "sip_realm",
                format!(
                    "`{}` must be 1–128 printable ASCII characters without spaces, '\"', '\\' or ':' (e.g. callfleet)",
                    self.sip_realm
                ),
            );
        }
        if self.max_connections == 0 || self.max_connections > 1_000_000 {
            return bad(
                "max_connections",
                "must be 1 to 1000000, and below the file limit (ulimit -n); e.g. 4096".into(),
            );
        }
        if self.max_connections_per_address == 0
            || self.max_connections_per_address > self.max_connections
        {
            return bad(
                "max_connections_per_address",
                format!(
                    "must be 1 to max_connections ({}), e.g. 256",
                    self.max_connections
                ),
            );
        }
        if self.header_timeout.is_zero() {
            return bad("header_timeout", "must be above zero (e.g. 10s)".into());
        }
        if self.idle_timeout.is_zero() {
            return bad("idle_timeout", "must be above zero (e.g. 60s)".into());
        }
        if !(self.status_rate.is_finite() && self.status_rate > 0.0) {
            return bad(
                "status_rate",
                format!(
                    "`{}` must be a number of requests per second above zero (e.g. 20)",
                    self.status_rate
                ),
            );
        }
        if self.status_burst == 0 {
            return bad("status_burst", "must be at least 1 (e.g. 40)".into());
        }
        if let Err(reason) = self.queue_alert.check() {
            return bad("queue_alert", reason);
        }
        for (queue, alert) in &self.queue_alerts {
            if let Err(reason) = alert.check() {
                return bad(&format!("queue_alerts.{queue}"), reason);
            }
        }
        if let Err((key, reason)) = self.autoscaler.check(&self.lock_service) {
            return bad(&format!("autoscaler.{key}"), reason);
        }
        if !self.lock_service.is_empty() {
            let usable = url::Url::parse(&self.lock_service).is_ok_and(|url| {
                url.scheme() == "http"
                    && url.host_str().is_some_and(|host| !host.is_empty())
                    && url.path() == "/"
                    && url.query().is_none()
                    && url.username().is_empty()
            });
            if !usable {
                return bad(
                    "lock_service",
                    format!(
                        "`{}` must be the lock service's http://host:port (e.g. http://127.0.0.1:7070), or empty for none",
                        self.lock_service
                    ),
                );
            }
        }
        let mut names = HashSet::new();
        let mut values = HashSet::new();
        for (i, token) in self.tokens.iter().enumerate() {
            if token.name.trim().is_empty() || !names.insert(token.name.as_str()) {
                return bad(
                    &format!("tokens[{i}].name"),
                    "must be non-empty and unique".into(),
                );
            }
            // The audit log records the name; a longer one would fail every write.
            if token.name.chars().count() > crate::store::directory::MAX_ACTOR_CHARS {
                return bad(
                    &format!("tokens[{i}].name"),
                    format!(
                        "is longer than {} characters (the audit log keeps the name of who changed what)",
                        crate::store::directory::MAX_ACTOR_CHARS
                    ),
                );
            }
            // Two roles for one secret: whichever came last would win, silently.
            if !values.insert(token.token.expose()) {
                return bad(
                    &format!("tokens[{i}].token"),
                    "is the same secret as an earlier token's; give every token its own".into(),
                );
            }
            if token.token.expose().len() < 16 || token.token.expose().contains(char::is_whitespace)
            {
                return bad(
                    &format!("tokens[{i}].token"),
                    "must be at least 16 characters without spaces (e.g. from `openssl rand -hex 24`)".into(),
                );
            }
        }
        Ok(())
    }
}

/// How logs are written.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `human` (default) or `json`.
    pub format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines for a terminal.
    #[default]
    Human,
    /// One JSON object per line, for collectors.
    Json,
}

impl Config {
    /// Loads the configuration from the optional file, the process environment and the
    /// flag overrides (`(dotted key, value)` pairs), then validates it.
    pub fn load(file: Option<&Path>, flags: &[(&str, String)]) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::FileMissing(path.to_owned()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // Only sectioned names (`CALLFLEET_STORE__URL`) are configuration, so variables such
        // as `CALLFLEET_TEST_MYSQL_URL` used by tooling are not mistaken for unknown keys.
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
        for (key, value) in flags {
            figment = figment.merge(Serialized::default(key, value));
        }
        let mut config: Config = figment
            .extract()
            .map_err(|err| ConfigError::Invalid(describe(err, file)))?;
        if let Ok(names) = std::env::var(UnsafeLockSwitches::VARIABLE) {
            config.lock_service.unsafe_for_tests =
                UnsafeLockSwitches::parse(&names).map_err(|why| ConfigError::Value {
                    key: UnsafeLockSwitches::VARIABLE.to_owned(),
                    reason: why,
                })?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| {
            Err(ConfigError::Value {
                key: key.to_owned(),
                reason,
            })
        };
        let store = &self.store;
        if !store.url.starts_with("sqlite:") && !store.url.starts_with("mysql:") {
            return bad(
                "store.url",
                format!(
                    "`{}` is neither sqlite://PATH nor mysql://USER:PASSWORD@HOST:PORT/DATABASE",
                    redact_url(&store.url)
                ),
            );
        }
        if store.max_connections == 0 {
            return bad("store.max_connections", "must be at least 1".into());
        }
        if store.connect_timeout.is_zero() {
            return bad("store.connect_timeout", "must be longer than 0s".into());
        }
        if store.history_interval.is_zero() {
            return bad("store.history_interval", "must be longer than 0s".into());
        }
        let node = &self.node;
        if node.max_calls == 0 {
            return bad("node.max_calls", "must be at least 1".into());
        }
        if node.heartbeat_interval < Duration::from_millis(100) {
            return bad("node.heartbeat_interval", "must be at least 100ms".into());
        }
        if !node.sip_uri.starts_with("sip:") {
            return bad(
                "node.sip_uri",
                format!(
                    "`{}` must be a sip: URI such as sip:10.0.0.5:5060",
                    node.sip_uri
                ),
            );
        }
        let calls = &node.calls;
        if calls.source == CallSourceKind::Ami {
            if !calls.address.contains(':') {
                return bad(
                    "node.calls.address",
                    format!("`{}` must be host:port", calls.address),
                );
            }
            if calls.username.is_empty() {
                return bad(
                    "node.calls.username",
                    "must name a manager.conf user when source = \"ami\"".into(),
                );
            }
            if calls.timeout.is_zero() {
                return bad("node.calls.timeout", "must be longer than 0s".into());
            }
        }
        node.agi.validate()?;
        node.queue.validate()?;
        self.balancer.validate()?;
        self.control_plane.validate()?;
        self.lock_service.validate()?;
        self.provisioning.validate()?;
        let mut names = HashSet::new();
        for (i, tier) in node.shed.iter().enumerate() {
            let key = format!("node.shed[{i}]");
            if tier.name.is_empty() || !names.insert(tier.name.as_str()) {
                return bad(
                    &format!("{key}.name"),
                    "must be non-empty and unique".into(),
                );
            }
            if !(tier.above > 0.0 && tier.above.is_finite()) {
                return bad(
                    &format!("{key}.above"),
                    "must be a load fraction above 0 (e.g. 0.85)".into(),
                );
            }
            if !(tier.below >= 0.0 && tier.below < tier.above) {
                return bad(
                    &format!("{key}.below"),
                    format!(
                        "must be at least 0 and below `above` ({}) so the tier cannot flap",
                        tier.above
                    ),
                );
            }
        }
        Ok(())
    }
}

impl BalancerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| {
            Err(ConfigError::Value {
                key: format!("balancer.{key}"),
                reason,
            })
        };
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "listen",
                format!("`{}` must be ip:port, e.g. 0.0.0.0:5060", self.listen),
            );
        }
        if self.local_pbx.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "local_pbx",
                format!("`{}` must be ip:port, e.g. 127.0.0.1:5080", self.local_pbx),
            );
        }
        if !self.advertise.is_empty() && !self.advertise.contains(':') {
            return bad(
                "advertise",
                format!("`{}` must be host:port", self.advertise),
            );
        }
        if self.contacts == 0 || self.contacts > 9 {
            return bad("contacts", "must be between 1 and 9".into());
        }
        if self.refresh.is_zero() || self.heartbeat_ttl.is_zero() {
            return bad(
                "refresh",
                "refresh and heartbeat_ttl must be longer than 0s".into(),
            );
        }
        if !(0.0..=10.0).contains(&self.cpu_weight) {
            return bad("cpu_weight", "must be between 0 and 10".into());
        }
        if !(512..=65_535).contains(&self.max_message) {
            return bad("max_message", "must be between 512 and 65535 bytes".into());
        }
        for (i, entry) in self.allow.iter().enumerate() {
            if let Err(reason) = crate::net::Cidr::parse(entry) {
                return bad(&format!("allow[{i}]"), reason);
            }
        }
        for (i, entry) in self.pbx_addresses.iter().enumerate() {
            if let Err(reason) = crate::net::Cidr::parse(entry) {
                return bad(&format!("pbx_addresses[{i}]"), reason);
            }
        }
        if self.max_transactions == 0 {
            return bad(
                "max_transactions",
                "must be at least 1 (the default is 50000)".into(),
            );
        }
        if !(1..=1_000_000).contains(&self.tcp_max_connections) {
            return bad(
                "tcp_max_connections",
                "must be between 1 and 1000000 (the default is 4096)".into(),
            );
        }
        if !(1..=self.tcp_max_connections).contains(&self.tcp_max_connections_per_address) {
            return bad(
                "tcp_max_connections_per_address",
                format!(
                    "must be between 1 and tcp_max_connections ({}); the default is 64",
                    self.tcp_max_connections
                ),
            );
        }
        for (key, timeout) in [
            ("tcp_message_timeout", self.tcp_message_timeout),
            ("tcp_idle_timeout", self.tcp_idle_timeout),
            ("tcp_write_timeout", self.tcp_write_timeout),
        ] {
            if timeout.is_zero() {
                return bad(key, "must be above 0 (e.g. \"5s\")".into());
            }
        }
        for (i, pool) in self.pools.iter().enumerate() {
            if pool.domains.is_empty() && pool.prefixes.is_empty() {
                return bad(
                    &format!("pools[{i}]"),
                    "needs at least one of `domains` or `prefixes`".into(),
                );
            }
            if let Some(prefix) = pool
                .prefixes
                .iter()
                .find(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
            {
                return bad(
                    &format!("pools[{i}].prefixes"),
                    format!("`{prefix}` must be digits only (a leading + is ignored on calls)"),
                );
            }
        }
        Ok(())
    }

    /// What must hold for the balancer to serve (checked when it starts, not when the file
    /// is read: every command reads the same file, and only the balancer sends these
    /// addresses to anyone): carriers and the PBX must be able to reach what we put in Via
    /// and Record-Route, and, in redirect mode, the PBX address we give carriers in a 302.
    pub fn validate_for_serving(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| {
            Err(ConfigError::Value {
                key: format!("balancer.{key}"),
                reason,
            })
        };
        let advertised_ip = self
            .advertised()
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|address| address.ip());
        if advertised_ip.is_some_and(|ip| ip.is_unspecified()) {
            let what = if self.advertise.is_empty() {
                format!("is not set and listen `{}` is a wildcard", self.listen)
            } else {
                format!("`{}` is a wildcard", self.advertise)
            };
            return bad(
                "advertise",
                format!(
                    "{what}: our Via and Record-Route would name an address no carrier or PBX can reach; \
                     set balancer.advertise (CALLFLEET_BALANCER__ADVERTISE) to this node's address as carriers reach it, e.g. 192.0.2.10:5060"
                ),
            );
        }
        if self.local_mode == LocalMode::Redirect {
            let pbx = self
                .local_pbx
                .parse::<std::net::SocketAddr>()
                .map(|address| address.ip());
            let unreachable = match pbx {
                Ok(ip) if ip.is_unspecified() => Some("a wildcard address"),
                Ok(ip) if ip.is_loopback() && !self.carriers_are_local() => {
                    Some("a loopback address, while carriers call from other hosts")
                }
                _ => None,
            };
            if let Some(why) = unreachable {
                return bad(
                    "local_pbx",
                    format!(
                        "`{}` is {why}, and local_mode = \"redirect\" sends carriers there in a 302; \
                         set balancer.local_pbx (CALLFLEET_BALANCER__LOCAL_PBX) to the PBX's address as carriers reach it, \
                         or use local_mode = \"proxy\"",
                        self.local_pbx
                    ),
                );
            }
        }
        Ok(())
    }

    /// Whether every carrier that can reach the balancer is on this host: it listens on a
    /// loopback address, or `allow` lists loopback networks only.
    fn carriers_are_local(&self) -> bool {
        let loopback = |entry: &str| {
            let (ip, prefix) = entry.split_once('/').unwrap_or((entry, "128"));
            match (
                ip.trim().parse::<std::net::IpAddr>(),
                prefix.trim().parse::<u8>(),
            ) {
                (Ok(std::net::IpAddr::V4(ip)), Ok(prefix)) => ip.is_loopback() && prefix >= 8,
                (Ok(std::net::IpAddr::V6(ip)), Ok(prefix)) => ip.is_loopback() && prefix == 128,
                _ => false,
            }
        };
        let listen_loopback = self
            .listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|address| address.ip().is_loopback());
        listen_loopback
            || (!self.allow.is_empty() && self.allow.iter().all(|entry| loopback(entry)))
    }

    /// The address written into Via and Record-Route headers.
    pub fn advertised(&self) -> &str {
        if self.advertise.is_empty() {
            &self.listen
        } else {
            &self.advertise
        }
    }
}

/// Figment's message on one line, naming the file the way the user wrote it: figment shows
/// a file relative to the working folder whenever that is shorter (`../.tmpX/callfleet.toml`
/// for `/tmp/.tmpX/callfleet.toml`), which is not a path the user ever typed.
fn describe(err: figment::Error, file: Option<&Path>) -> String {
    let mut message = err.to_string().replace('\n', "; ");
    let Some(file) = file else {
        return message;
    };
    let as_given = file.display().to_string();
    let mut shown: Vec<String> = err
        .into_iter()
        .filter_map(|error| match error.metadata?.source? {
            figment::Source::File(read) => Some(figment::Source::File(read).to_string()),
            _ => None,
        })
        .filter(|shown| *shown != as_given)
        .collect();
    shown.sort_unstable();
    shown.dedup();
    for shown in shown {
        message = message.replace(&shown, &as_given);
    }
    message
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment's own error
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in(jail: &Jail, toml: &str) -> Result<Config, ConfigError> {
        jail.create_file("callfleet.toml", toml)
            .expect("write config");
        Config::load(Some(Path::new("callfleet.toml")), &[])
    }

    #[test]
    fn defaults_work_on_one_box() {
        Jail::expect_with(|_| {
            let config = Config::load(None, &[]).expect("defaults load");
            assert_eq!(config.store.url, "sqlite://callfleet-data/fleet.db");
            assert_eq!(config.node.heartbeat_interval, Duration::from_secs(2));
            assert_eq!(config.node.calls.source, CallSourceKind::Static);
            Ok(())
        });
    }

    #[test]
    fn layers_apply_in_order() {
        Jail::expect_with(|jail| {
            jail.set_env("CALLFLEET_NODE__MAX_CALLS", "250");
            jail.set_env("CALLFLEET_TEST_MYSQL_URL", "mysql://ignored");
            let config = load_in(
                jail,
                r#"
                [node]
                id = "pbx-1"
                max_calls = 50
                heartbeat_interval = "500ms"
                [node.calls]
                source = "ami"
                username = "callfleet"
                secret = "s3cret"
                [[node.shed]]
                name = "reports"
                above = 0.7
                below = 0.6
                stop = "true"
                start = "true"
                "#,
            )
            .expect("valid config");
            assert_eq!(config.node.max_calls, 250, "env overrides the file");
            assert_eq!(config.node.heartbeat_interval, Duration::from_millis(500));
            assert_eq!(config.node.shed.len(), 1);
            let calls = &config.node.calls;
            assert_eq!(calls.source, CallSourceKind::Ami);
            assert_eq!(calls.address, "127.0.0.1:5038");
            assert_eq!(calls.secret.expose(), "s3cret");
            assert!(
                !format!("{config:?}").contains("s3cret"),
                "secrets are redacted"
            );

            let flagged = Config::load(
                Some(Path::new("callfleet.toml")),
                &[("log.format", "json".to_owned())],
            )
            .expect("flags apply");
            assert_eq!(flagged.log.format, LogFormat::Json);
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_name_the_key_and_the_file() {
        Jail::expect_with(|jail| {
            let err = load_in(jail, "[node]\nmax_cals = 5\n")
                .expect_err("must fail")
                .to_string();
            assert!(err.contains("max_cals"), "{err}");
            assert!(err.contains("callfleet.toml"), "{err}");

            jail.set_env("CALLFLEET_STORE__URLL", "x");
            let err = Config::load(None, &[]).expect_err("must fail").to_string();
            assert!(err.contains("urll"), "{err}");
            assert!(err.contains("CALLFLEET_"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn impossible_values_are_rejected() {
        Jail::expect_with(|jail| {
            let err = load_in(
                jail,
                "[[node.shed]]\nname = \"x\"\nabove = 0.5\nbelow = 0.7\n",
            )
            .expect_err("must fail")
            .to_string();
            assert!(err.contains("node.shed[0].below"), "{err}");
            let err = load_in(jail, "[store]\nurl = \"postgres://u:pw@h/db\"\n")
                .expect_err("must fail")
                .to_string();
            assert!(err.contains("store.url") && !err.contains("pw"), "{err}");
            let err = Config::load(Some(Path::new("missing.toml")), &[])
                .expect_err("must fail")
                .to_string();
            assert!(err.contains("missing.toml does not exist"), "{err}");
            for (text, key) in [
                ("tcp_max_connections = 0", "balancer.tcp_max_connections"),
                (
                    "tcp_max_connections = 10\ntcp_max_connections_per_address = 11",
                    "balancer.tcp_max_connections_per_address",
                ),
                ("tcp_idle_timeout = \"0s\"", "balancer.tcp_idle_timeout"),
                (
                    "tcp_message_timeout = \"0s\"",
                    "balancer.tcp_message_timeout",
                ),
                ("tcp_write_timeout = \"0s\"", "balancer.tcp_write_timeout"),
            ] {
                let err = load_in(jail, &format!("[balancer]\n{text}\n"))
                    .expect_err(text)
                    .to_string();
                assert!(err.contains(key), "{text}: {err}");
            }
            Ok(())
        });
    }

    #[test]
    fn the_lock_quarantine_must_outlast_the_longest_lease() {
        Jail::expect_with(|jail| {
            let defaults = Config::load(None, &[]).expect("defaults load");
            let locks = &defaults.lock_service;
            assert!(locks.quarantine > locks.max_validity + locks.guard);
            for (toml, says) in [
                (
                    "[lock_service]\nquarantine = \"15s\"\n",
                    "invalid configuration: `lock_service.quarantine` `15s` must be longer than max_validity + guard (35s): a lease lost with Redis's data could still be live when claims resume; raise quarantine above 35s or lower max_validity",
                ),
                (
                    "[lock_service]\nmax_validity = \"1h\"\n",
                    "`lock_service.quarantine` `40s` must be longer than max_validity + guard (1h 5s)",
                ),
                (
                    "[lock_service]\nmax_validity = \"1h 1s\"\nquarantine = \"2h\"\n",
                    "`lock_service.max_validity` `1h 1s` must be between 100ms and 1h",
                ),
                (
                    "[lock_service]\nvalidity = \"31s\"\n",
                    "`lock_service.validity` `31s` must be between 100ms and max_validity (30s)",
                ),
                (
                    "[lock_service]\ndeadline = \"0s\"\n",
                    "`lock_service.deadline` must be longer than 0s",
                ),
                (
                    "[lock_service]\nquarantine = \"2days\"\n",
                    "`lock_service.quarantine` `2days` must be at most 1 day",
                ),
            ] {
                let err = load_in(jail, toml).expect_err(toml).to_string();
                assert!(err.contains(says), "{toml}: {err}");
            }
            // Exactly max_validity + guard is not enough: a lease may end at that instant.
            let err = load_in(jail, "[lock_service]\nquarantine = \"35s\"\n")
                .expect_err("equal is not longer")
                .to_string();
            assert!(err.contains("lock_service.quarantine"), "{err}");
            load_in(jail, "[lock_service]\nquarantine = \"35001ms\"\n").expect("longer");

            // The tests' switch: never from the file, and its names are checked.
            jail.set_env(
                UnsafeLockSwitches::VARIABLE,
                "unbounded_validity,naive_retry",
            );
            let config = load_in(jail, "[lock_service]\nquarantine = \"1s\"\n").expect("loads");
            assert_eq!(
                config.lock_service.unsafe_for_tests.names(),
                ["unbounded_validity", "naive_retry"]
            );
            jail.set_env(UnsafeLockSwitches::VARIABLE, "no_quarantine");
            let err = load_in(jail, "").expect_err("unknown switch").to_string();
            assert!(err.contains("unknown switch `no_quarantine`"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn control_plane_tokens_and_time_zone_are_checked_and_tokens_never_shown() {
        Jail::expect_with(|jail| {
            let token = "[[control_plane.tokens]]\nname = \"crm\"\ntoken = \"0123456789abcdef-secret\"\nrole = \"write\"\n";
            let config = load_in(jail, token).expect("a valid token");
            assert_eq!(config.control_plane.tokens[0].role, Role::Write);
            let shown = format!("{config:?}");
            assert!(!shown.contains("0123456789abcdef-secret"), "{shown}");

            let short = token.replace("0123456789abcdef-secret", "short");
            let err = load_in(jail, &short).expect_err("too short").to_string();
            assert!(err.contains("control_plane.tokens[0].token"), "{err}");
            let twice = format!("{token}{token}");
            let err = load_in(jail, &twice).expect_err("same name").to_string();
            assert!(err.contains("control_plane.tokens[1].name"), "{err}");
            let same_secret = format!("{token}{}", token.replace("\"crm\"", "\"wallboard\""));
            let err = load_in(jail, &same_secret)
                .expect_err("same secret")
                .to_string();
            assert!(
                err.contains("control_plane.tokens[1].token") && err.contains("same secret"),
                "{err}"
            );
            assert!(!err.contains("0123456789abcdef-secret"), "{err}");
            let long_name = token.replace("\"crm\"", &format!("\"{}\"", "n".repeat(65)));
            let err = load_in(jail, &long_name)
                .expect_err("long name")
                .to_string();
            assert!(
                err.contains("control_plane.tokens[0].name") && err.contains("64"),
                "{err}"
            );
            load_in(
                jail,
                &token.replace("\"crm\"", &format!("\"{}\"", "n".repeat(64))),
            )
            .expect("64 characters fit");
            let err = load_in(jail, "[control_plane]\ntime_zone = \"Mars/Olympus\"\n")
                .expect_err("unknown zone")
                .to_string();
            assert!(
                err.contains("control_plane.time_zone") && err.contains("Mars/Olympus"),
                "{err}"
            );
            let berlin = load_in(jail, "[control_plane]\ntime_zone = \"Europe/Berlin\"\n")
                .expect("a real zone");
            assert_eq!(berlin.control_plane.time_zone, "Europe/Berlin");
            Ok(())
        });
    }

    #[test]
    fn control_plane_listener_limits_have_defaults_and_are_checked() {
        Jail::expect_with(|jail| {
            let defaults = load_in(jail, "").expect("defaults load");
            let cp = &defaults.control_plane;
            assert_eq!(
                (cp.max_connections, cp.max_connections_per_address),
                (4096, 256)
            );
            assert_eq!(
                (cp.header_timeout, cp.idle_timeout, cp.shutdown_grace),
                (
                    Duration::from_secs(10),
                    Duration::from_secs(60),
                    Duration::from_secs(10)
                )
            );
            assert_eq!((cp.status_rate, cp.status_burst), (20.0, 40));

            // A whole number of requests per second is written without a fraction.
            let tuned = load_in(
                jail,
                "[control_plane]\nstatus_rate = 5\nstatus_burst = 10\nshutdown_grace = \"0s\"\n",
            )
            .expect("tuned limits load");
            assert_eq!(tuned.control_plane.status_rate, 5.0);
            assert_eq!(tuned.control_plane.shutdown_grace, Duration::ZERO);

            for (toml, key) in [
                ("max_connections = 0", "control_plane.max_connections"),
                ("max_connections = 1000001", "control_plane.max_connections"),
                (
                    "max_connections = 10\nmax_connections_per_address = 11",
                    "control_plane.max_connections_per_address",
                ),
                (
                    "max_connections_per_address = 0",
                    "control_plane.max_connections_per_address",
                ),
                ("header_timeout = \"0s\"", "control_plane.header_timeout"),
                ("idle_timeout = \"0s\"", "control_plane.idle_timeout"),
                ("status_rate = 0", "control_plane.status_rate"),
                ("status_rate = -1.5", "control_plane.status_rate"),
                ("status_rate = nan", "control_plane.status_rate"),
                ("status_burst = 0", "control_plane.status_burst"),
            ] {
                let err = load_in(jail, &format!("[control_plane]\n{toml}\n"))
                    .expect_err(toml)
                    .to_string();
                assert!(err.contains(key), "{toml}: {err}");
            }
            Ok(())
        });
    }

    #[test]
    fn queue_alerts_have_defaults_per_queue_overrides_and_are_checked() {
        Jail::expect_with(|jail| {
            let defaults = load_in(jail, "").expect("defaults load");
            assert_eq!(defaults.control_plane.queue_alert, QueueAlert::default());
            assert!(defaults.control_plane.queue_alerts.is_empty());

            let tuned = load_in(
                jail,
                "[control_plane.queue_alert]\nwaiting_warning = 3\n\
                 [control_plane.queue_alerts.vip]\nwaiting_warning = 1\nwaiting_critical = 1\n\
                 wait_warning = \"5s\"\nwait_critical = \"15s\"\n",
            )
            .expect("tuned alerts load");
            let cp = &tuned.control_plane;
            assert_eq!(
                cp.queue_alert,
                QueueAlert {
                    waiting_warning: 3,
                    ..QueueAlert::default()
                }
            );
            assert_eq!(
                cp.queue_alerts["vip"],
                QueueAlert {
                    waiting_warning: 1,
                    waiting_critical: 1,
                    wait_warning: Duration::from_secs(5),
                    wait_critical: Duration::from_secs(15),
                }
            );

            for (toml, key) in [
                (
                    "[control_plane.queue_alert]\nwaiting_warning = 0",
                    "control_plane.queue_alert",
                ),
                (
                    "[control_plane.queue_alerts.sales]\nwaiting_warning = 11",
                    "control_plane.queue_alerts.sales",
                ),
                (
                    "[control_plane.queue_alerts.sales]\nwait_critical = \"10s\"",
                    "control_plane.queue_alerts.sales",
                ),
                (
                    "[control_plane.queue_alert]\nwait_warning = \"0s\"",
                    "control_plane.queue_alert",
                ),
            ] {
                let err = load_in(jail, &format!("{toml}\n"))
                    .expect_err(toml)
                    .to_string();
                assert!(err.contains(key), "{toml}: {err}");
            }
            Ok(())
        });
    }

    #[test]
    fn control_plane_lock_service_has_a_default_and_is_checked() {
        Jail::expect_with(|jail| {
            let defaults = load_in(jail, "").expect("defaults load");
            assert_eq!(defaults.control_plane.lock_service, "http://127.0.0.1:7070");
            for (toml, expected) in [
                ("lock_service = \"\"", ""),
                (
                    "lock_service = \"http://locks.internal:7070\"",
                    "http://locks.internal:7070",
                ),
                (
                    "lock_service = \"http://[::1]:7070/\"",
                    "http://[::1]:7070/",
                ),
            ] {
                let config = load_in(jail, &format!("[control_plane]\n{toml}\n")).expect(toml);
                assert_eq!(config.control_plane.lock_service, expected);
            }
            for bad in [
                "127.0.0.1:7070",
                "https://locks:7070",
                "http://",
                "http://locks:7070/lock",
            ] {
                let err = load_in(
                    jail,
                    &format!("[control_plane]\nlock_service = \"{bad}\"\n"),
                )
                .expect_err(bad)
                .to_string();
                assert_eq!(
                    err,
                    format!(
                        "invalid configuration: `control_plane.lock_service` `{bad}` must be the lock service's http://host:port (e.g. http://127.0.0.1:7070), or empty for none"
                    )
                );
            }
            Ok(())
        });
    }

    #[test]
    fn node_queue_candidates_keys_have_defaults_and_are_checked() {
        Jail::expect_with(|jail| {
            let defaults = load_in(jail, "").expect("defaults load");
            assert_eq!(
                defaults.node.queue,
                QueueConfig {
                    candidates_fresh: Duration::from_secs(1),
                    candidates_deadline: Duration::from_millis(500),
                    candidates_stale_max: Duration::from_secs(600),
                    candidates_retry_after: Duration::from_secs(2),
                    candidates_cached: 1024,
                    callers_fresh: Duration::from_secs(5),
                    callers_deadline: Duration::from_millis(200),
                    callers_stale_max: Duration::from_secs(600),
                    callers_retry_after: Duration::from_secs(2),
                    callers_cached: 10_000,
                    lock_service: "http://127.0.0.1:7070".to_owned(),
                    poll: Duration::from_millis(100),
                    ring_timeout: Duration::from_secs(20),
                    wrap_up: Duration::from_secs(5),
                    max_misses: 3,
                    max_wait: Duration::from_secs(600),
                    pbx_lost_hold: Duration::from_secs(60),
                }
            );
            let set = load_in(
                jail,
                "[node.queue]\ncandidates_fresh = \"0s\"\ncandidates_stale_max = \"1h\"\n",
            )
            .expect("0s fresh: every ring asks");
            assert_eq!(set.node.queue.candidates_fresh, Duration::ZERO);
            assert_eq!(
                set.node.queue.candidates_stale_max,
                Duration::from_secs(3600)
            );
            let set = load_in(
                jail,
                "[node.queue]\ncallers_fresh = \"0s\"\ncallers_deadline = \"1s\"\ncallers_cached = 5\n",
            )
            .expect("0s fresh: every queued call looks its number up");
            assert_eq!(
                (
                    set.node.queue.callers_fresh,
                    set.node.queue.callers_deadline,
                    set.node.queue.callers_cached
                ),
                (Duration::ZERO, Duration::from_secs(1), 5)
            );
            for (toml, key) in [
                ("candidates_fresh = \"2m\"", "node.queue.candidates_fresh"),
                (
                    "candidates_deadline = \"1ms\"",
                    "node.queue.candidates_deadline",
                ),
                (
                    "candidates_deadline = \"11s\"",
                    "node.queue.candidates_deadline",
                ),
                (
                    "candidates_stale_max = \"0s\"",
                    "node.queue.candidates_stale_max",
                ),
                (
                    "candidates_fresh = \"30s\"\ncandidates_stale_max = \"10s\"",
                    "node.queue.candidates_stale_max",
                ),
                (
                    "candidates_retry_after = \"0s\"",
                    "node.queue.candidates_retry_after",
                ),
                ("candidates_cached = 0", "node.queue.candidates_cached"),
                ("callers_fresh = \"2h\"", "node.queue.callers_fresh"),
                ("callers_deadline = \"5ms\"", "node.queue.callers_deadline"),
                ("callers_deadline = \"3s\"", "node.queue.callers_deadline"),
                ("callers_stale_max = \"0s\"", "node.queue.callers_stale_max"),
                (
                    "callers_fresh = \"1m\"\ncallers_stale_max = \"30s\"",
                    "node.queue.callers_stale_max",
                ),
                (
                    "callers_retry_after = \"0s\"",
                    "node.queue.callers_retry_after",
                ),
                ("callers_cached = 0", "node.queue.callers_cached"),
                (
                    "lock_service = \"127.0.0.1:7070\"",
                    "node.queue.lock_service",
                ),
                ("poll = \"1ms\"", "node.queue.poll"),
                ("ring_timeout = \"0s\"", "node.queue.ring_timeout"),
                ("wrap_up = \"2h\"", "node.queue.wrap_up"),
                ("max_misses = 0", "node.queue.max_misses"),
                ("max_wait = \"0s\"", "node.queue.max_wait"),
                ("pbx_lost_hold = \"2h\"", "node.queue.pbx_lost_hold"),
                ("candidates_fresh_ms = 5", "candidates_fresh_ms"),
            ] {
                let err = load_in(jail, &format!("[node.queue]\n{toml}\n"))
                    .expect_err(toml)
                    .to_string();
                assert!(err.contains(key), "{toml}: {err}");
            }
            jail.set_env("CALLFLEET_NODE__QUEUE__CANDIDATES_CACHED", "10");
            assert_eq!(
                load_in(jail, "")
                    .expect("env layer")
                    .node
                    .queue
                    .candidates_cached,
                10
            );
            Ok(())
        });
    }

    #[test]
    fn node_agi_listens_on_loopback_by_default_and_is_checked() {
        Jail::expect_with(|jail| {
            let defaults = load_in(jail, "").expect("defaults load");
            let agi = &defaults.node.agi;
            assert_eq!(agi.listen, "127.0.0.1:4573");
            assert_eq!(agi.address(), Some("127.0.0.1:4573".parse().expect("addr")));
            assert!(!agi.allow_remote);
            assert_eq!(agi.max_sessions, 4096);
            assert_eq!(
                (
                    agi.environment_timeout,
                    agi.command_timeout,
                    agi.shutdown_grace
                ),
                (
                    Duration::from_secs(2),
                    Duration::from_secs(10),
                    Duration::from_secs(5)
                )
            );

            let off = load_in(jail, "[node.agi]\nlisten = \"\"\n").expect("empty: no server");
            assert_eq!(off.node.agi.address(), None);
            let v6 =
                load_in(jail, "[node.agi]\nlisten = \"[::1]:4573\"\n").expect("::1 is loopback");
            assert_eq!(
                v6.node.agi.address(),
                Some("[::1]:4573".parse().expect("addr"))
            );

            // Not loopback: refused, unless allowed explicitly (the control).
            let err = load_in(jail, "[node.agi]\nlisten = \"0.0.0.0:4573\"\n")
                .expect_err("wildcard without allow_remote")
                .to_string();
            assert!(
                err.contains("node.agi.listen") && err.contains("no authentication"),
                "{err}"
            );
            let remote = load_in(
                jail,
                "[node.agi]\nlisten = \"0.0.0.0:4573\"\nallow_remote = true\n",
            )
            .expect("allowed explicitly");
            assert_eq!(remote.node.agi.listen, "0.0.0.0:4573");
            jail.set_env("CALLFLEET_NODE__AGI__SHUTDOWN_GRACE", "0s");
            let env = load_in(jail, "").expect("env layer");
            assert_eq!(env.node.agi.shutdown_grace, Duration::ZERO);

            for (toml, key) in [
                ("listen = \"localhost:4573\"", "node.agi.listen"),
                ("max_sessions = 0", "node.agi.max_sessions"),
                ("max_sessions = 1000001", "node.agi.max_sessions"),
                (
                    "environment_timeout = \"0s\"",
                    "node.agi.environment_timeout",
                ),
                (
                    "environment_timeout = \"61s\"",
                    "node.agi.environment_timeout",
                ),
                ("command_timeout = \"0s\"", "node.agi.command_timeout"),
                ("max_session = 5", "max_session"),
            ] {
                let err = load_in(jail, &format!("[node.agi]\n{toml}\n"))
                    .expect_err(toml)
                    .to_string();
                assert!(err.contains(key), "{toml}: {err}");
            }
            Ok(())
        });
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("mysql://fleet:hunter2@db:3306/callfleet"),
            "mysql://fleet:***@db:3306/callfleet"
        );
        assert_eq!(
            redact_url("sqlite://data/fleet.db"),
            "sqlite://data/fleet.db"
        );
    }
}
