//! The directory of the control plane in the fleet store: agents (personal extensions),
//! devices (phones with their own extension), hot-desk sessions (agent logged in on a
//! device), queues and their members with priorities, per-agent daily counters, agent
//! availability, and the audit log of every change.
//!
//! Why it is written this way:
//!
//! - **One transaction per change, its audit row included.** Every write takes the actor (the
//!   *name* of the API token or component, never a secret) and writes its audit row inside
//!   the transaction that makes the change. CRMs that change the same agent at the same
//!   moment therefore cannot leave a change without its audit row, an audit row for a change
//!   that did not happen, or half a change (a session moved but the old one kept): an
//!   operation that fails rolls everything back. Every successful write call adds exactly
//!   one audit row, also when it found nothing to change (a logout of an agent who was not
//!   logged in), so the log shows who asked for what.
//! - **Lock order.** On MySQL a write first locks the rows it depends on, always in the order
//!   agent, device, queue (`SELECT … FOR UPDATE`). Writers of one agent (two CRMs, the
//!   node that reports its calls) thus wait for each other instead of deadlocking, and the
//!   plain reads that follow inside the transaction see current rows, because sessions,
//!   memberships and counters are only changed under their agent's lock, or under the lock
//!   of the device or queue being deleted. The one crossing (a device deleted while its
//!   agent moves to another) is caught by the row counts of the writes. SQLite has one
//!   writer at a time (`BEGIN IMMEDIATE`). A MySQL deadlock that slips through anyway reruns
//!   the whole transaction. The keys of `sessions` (agent primary, device unique) enforce one
//!   device per agent and one agent per device even if a future write forgot a lock.
//! - **The database clock only.** `idle_since_ms`, wrap-up `until_ms`, session `since_ms` and
//!   audit `at_ms` are unix milliseconds computed by the database, like the heartbeats'
//!   freshness; the snapshot carries the database's `now_ms`, so readers compare times of one
//!   clock and never their own.
//! - **Days come from the caller.** Counters are keyed by a `YYYY-MM-DD` day that the caller
//!   computes in the configured time zone; the store knows no time zone.
//! - **A cheap snapshot.** The routing query's refresh reads the whole directory with four
//!   queries in one read transaction, whatever the number of agents and queues.
//!
//! Choices an operator sees:
//!
//! - Logging an agent in on a device while they are logged in on another *moves* them: the
//!   agent has walked to another desk, and the phone they left cannot take their calls. An
//!   error would leave them unreachable until someone logs the old desk out for them.
//!   Logging in on a device that another agent holds is a [`StoreError::Conflict`] naming
//!   that agent: taking a colleague's phone silently would cut them off.
//! - Deleting an agent deletes their queue memberships, their session and their counters;
//!   deleting a device ends the session on it; deleting a queue deletes its memberships.
//!   The audit row of the deletion records what went with it.
//! - A new agent is available; logging in restarts the idle time of an available agent,
//!   so an agent who logs in in the morning does not outrank colleagues who have been
//!   waiting since. Logging out leaves availability as it was (routing needs a session).
//! - The node that rang an agent for a queued call reports it ([`CallEvent`]): answered
//!   (on a call), ended (wrap-up, only if still on that call: a supervisor's pause during
//!   the call stays) or missed. Misses in a row pause an available agent with the reason
//!   `missed` at the queue's limit, so a phone left unattended stops taking the queue's
//!   callers' turns; an answered call starts the row again.
//! - The node also reports when it starts ringing an agent and when a ring ends neither
//!   answered nor missed (the caller hung up, the lease was lost, the fence refused the
//!   bridge): [`CallEvent::Ringing`] and [`CallEvent::RingEnded`]. This is for supervisors
//!   ([`Ringing`] in the agent's reads): routing keeps a ringing agent from a second ring by
//!   the lease in the lock service, so a ring leaves the agent's `state` alone, and these
//!   two writes (with their audit rows) leave the directory version alone, like the queue
//!   counters: a ring would otherwise make every control plane re-read the whole directory
//!   once more per call. Readers read the ringing agents on their own
//!   ([`Store::ringing_agents`]); an answer, a miss and the end of a call clear the ring
//!   with the versioned write they are anyway.
//! - The node that held a queued call reports what became of it ([`CallOutcome`]: answered,
//!   abandoned, overflowed, with how long the caller waited), counted per queue and day
//!   ([`QueueCounts`]), an answer within the queue's `service_level_ms` also as answered
//!   within the service level. These are the one write without an audit row and without a
//!   bump of the directory version: there is one per call, the audit log would be mostly
//!   them (and the log is for who changed what, not for traffic), and a bump would make
//!   every control plane re-read the whole directory after every call. Readers read the
//!   day's queue counters on their own ([`Store::queue_counts_of_day`]).
//! - Caller numbers can carry attributes (`vip`) that routing matches with agents' tags
//!   (`callers`: [`CallerEntry`], [`Store::set_caller_attributes`]); those writes have
//!   their audit rows but leave the directory version alone, as readers look a number up
//!   when a call comes in.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{ColumnIndex, Decode, Row, SqlStr, Type};

use super::dialect::{self, DirectorySql};
use super::{Pool, Store, StoreError};
use crate::ids::{NodeId, NodeState};

/// Longest identifier of an agent, device or queue.
pub const MAX_DIRECTORY_ID_LEN: usize = 32;
/// Longest name of an agent, device or queue, and longest pause reason, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Most tags an agent may carry.
pub const MAX_TAGS: usize = 32;
/// Longest tag.
pub const MAX_TAG_LEN: usize = 32;
/// Longest device endpoint (dial string).
pub const MAX_ENDPOINT_LEN: usize = 128;
/// Longest actor name.
pub const MAX_ACTOR_CHARS: usize = 64;
/// Longest wrap-up.
pub const MAX_WRAP_UP: Duration = Duration::from_secs(24 * 3600);
/// Most audit rows returned by one [`Store::list_audit`] call.
pub const MAX_AUDIT_PAGE: u32 = 1000;

/// How many times a transaction runs when MySQL resolves a deadlock by rolling it back.
const MAX_ATTEMPTS: u32 = 3;

/// An agent: a person, known by their personal extension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    /// The personal extension (`1001`): 1–32 ASCII letters, digits, `-`, `_` or `.`.
    pub id: String,
    /// The name shown to supervisors: 1–200 characters.
    pub name: String,
    /// Short lowercase words (`vip`, `fr`) that routing can match: at most 32, each 1–32
    /// of `a-z`, `0-9`, `-`, `_`, starting with a letter or digit.
    pub tags: BTreeSet<String>,
    /// After this many sales in a day the agent rings last; `None` means no cap.
    pub daily_cap: Option<u32>,
    /// A disabled agent keeps their settings and session but gets no calls.
    pub enabled: bool,
}

/// A phone with its own extension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// The device extension (`2001`), validated like an agent id.
    pub id: String,
    /// How Asterisk dials it: `TECH/resource`, such as `PJSIP/2001`; no spaces, `,`, `&`
    /// or `|`, at most 128 characters.
    pub endpoint: String,
    /// An optional label (`desk 12, 2nd floor`): at most 200 characters.
    pub name: Option<String>,
    /// A desk phone's fixed address (`sip:2001@10.0.3.12:5060`), rung without registering;
    /// `None`: the phone registers (with credentials) on any node.
    #[serde(default)]
    pub contact: Option<String>,
    /// Whether the phone has digest credentials to register with. Read-only here: they are
    /// set with a [`CredentialsChange`] and never shown.
    #[serde(default)]
    pub registers: bool,
}

/// Digest credentials of a device as Asterisk checks them: the realm and HA1 (MD5 of
/// `device:realm:password`). The password itself is never stored; HA1 is as good as a
/// password for this realm, so it is never logged, shown or audited either.
#[derive(Clone, PartialEq, Eq)]
pub struct DigestCredentials {
    realm: String,
    ha1: String,
}

impl std::fmt::Debug for DigestCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DigestCredentials")
            .field("realm", &self.realm)
            .field("ha1", &"<redacted>")
            .finish()
    }
}

/// Longest digest realm.
pub const MAX_REALM_LEN: usize = 128;
/// Longest password accepted (it is hashed at once, never kept).
pub const MAX_PASSWORD_LEN: usize = 128;

impl DigestCredentials {
    /// Credentials for `device` from its password, hashed here.
    pub fn from_password(device: &str, realm: &str, password: &str) -> Result<Self, StoreError> {
        check_realm(realm)?;
        if password.is_empty() || password.len() > MAX_PASSWORD_LEN {
            return Err(invalid(
                "password",
                format!("must be 1–{MAX_PASSWORD_LEN} bytes"),
            ));
        }
        use md5::Digest as _;
        let digest = md5::Md5::digest(format!("{device}:{realm}:{password}").as_bytes());
        let ha1 = digest
            .iter()
            .fold(String::with_capacity(32), |mut hex, byte| {
                use std::fmt::Write as _;
                let _ = write!(hex, "{byte:02x}");
                hex
            });
        Ok(Self {
            realm: realm.to_owned(),
            ha1,
        })
    }

    /// Credentials from an HA1 computed elsewhere (32 hex digits).
    pub fn from_ha1(realm: &str, ha1: &str) -> Result<Self, StoreError> {
        check_realm(realm)?;
        if ha1.len() != 32 || !ha1.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(
                "md5_cred",
                "must be 32 hex digits: MD5 of `device:realm:password`".to_owned(),
            ));
        }
        Ok(Self {
            realm: realm.to_owned(),
            ha1: ha1.to_ascii_lowercase(),
        })
    }

    /// The realm the HA1 was computed for.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The HA1, lowercase hex. Only Asterisk's realtime answer may carry it.
    pub fn ha1(&self) -> &str {
        &self.ha1
    }
}

/// What a device write does to its credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialsChange {
    /// Leave them as they are (a rename or a new contact does not need the password).
    Keep,
    /// Set new ones.
    Set(DigestCredentials),
    /// Remove them: the phone can no longer register.
    Remove,
}

impl CredentialsChange {
    fn audited(&self) -> &'static str {
        match self {
            Self::Keep => "kept",
            Self::Set(_) => "set",
            Self::Remove => "removed",
        }
    }
}

/// A call queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queue {
    /// The queue id (`sales`), validated like an agent id.
    pub id: String,
    /// The name shown to supervisors: 1–200 characters.
    pub name: String,
    /// A call answered after waiting at most this long (ms) is answered within the service
    /// level: 1 to [`MAX_SERVICE_LEVEL_MS`], [`DEFAULT_SERVICE_LEVEL_MS`] when not given.
    #[serde(default = "default_service_level_ms")]
    pub service_level_ms: u32,
}

/// The service-level threshold of a queue that names none: 20 s, the usual call-center
/// target ("80 % answered within 20 s").
pub const DEFAULT_SERVICE_LEVEL_MS: u32 = 20_000;
/// The longest service-level threshold: an hour.
pub const MAX_SERVICE_LEVEL_MS: u32 = 3_600_000;

fn default_service_level_ms() -> u32 {
    DEFAULT_SERVICE_LEVEL_MS
}

/// What became of a queued call, as the node that held it reports it with
/// [`Store::record_call_outcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallOutcome {
    /// An agent answered it.
    Answered,
    /// The caller hung up while waiting.
    Abandoned,
    /// It left the queue for the queue's overflow target (waited too long, say).
    Overflowed,
}

impl CallOutcome {
    /// `answered`, `abandoned` or `overflowed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Answered => "answered",
            Self::Abandoned => "abandoned",
            Self::Overflowed => "overflowed",
        }
    }

    /// Its action in the remembered request ids.
    fn action(self) -> &'static str {
        match self {
            Self::Answered => "queue.call_answered",
            Self::Abandoned => "queue.call_abandoned",
            Self::Overflowed => "queue.call_overflowed",
        }
    }
}

/// A queue's counters of one day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounts {
    /// Calls an agent answered.
    pub answered: u32,
    /// Calls whose caller hung up while waiting.
    pub abandoned: u32,
    /// Calls sent to the overflow target.
    pub overflowed: u32,
    /// Of `answered`, those whose caller waited at most the queue's `service_level_ms`
    /// (the threshold when the call was reported).
    pub answered_within_sl: u32,
}

impl QueueCounts {
    /// Answered within the service level per call that was answered or abandoned, in
    /// percent rounded to one decimal; `None` before the first such call. Overflowed calls
    /// are left out: the queue handed them on on purpose.
    pub fn service_level_pct(&self) -> Option<f64> {
        let calls = u64::from(self.answered) + u64::from(self.abandoned);
        (calls > 0).then(|| {
            let pct = u64::from(self.answered_within_sl) as f64 * 100.0 / calls as f64;
            (pct * 10.0).round() / 10.0
        })
    }
}

/// An agent's membership of a queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueMember {
    /// The member agent's id.
    pub agent: String,
    /// Lower rings first.
    pub priority: i32,
}

/// Whether an agent can take a call, as the database last recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum AgentState {
    /// Ready for a call.
    Available,
    /// Takes no calls until unpaused.
    Paused {
        /// Why, as the agent or supervisor gave it.
        reason: String,
    },
    /// On a call.
    OnCall,
    /// Finishing the last call's paperwork; available again from `until_ms`.
    WrapUp {
        /// End of the wrap-up, unix ms of the database clock.
        until_ms: i64,
    },
}

impl AgentState {
    /// The name stored in the database: `available`, `paused`, `on_call` or `wrap_up`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::Paused { .. } => "paused",
            Self::OnCall => "on_call",
            Self::WrapUp { .. } => "wrap_up",
        }
    }

    /// Whether the agent can take a call at `now_ms` (the database clock, e.g.
    /// [`DirectorySnapshot::now_ms`]): available, or in a wrap-up that has ended.
    pub fn is_available_at(&self, now_ms: i64) -> bool {
        match self {
            Self::Available => true,
            Self::WrapUp { until_ms } => *until_ms <= now_ms,
            Self::Paused { .. } | Self::OnCall => false,
        }
    }
}

/// An agent's availability with the database clock at the time of the read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Availability {
    /// The recorded state.
    pub state: AgentState,
    /// When the agent last became available (in a wrap-up: when it ends), unix ms; the
    /// longest-idle agent is the one with the smallest value.
    pub idle_since_ms: i64,
    /// The database clock when this was read, unix ms.
    pub now_ms: i64,
    /// The ring in progress, if a node reported one ([`CallEvent::Ringing`]).
    pub ringing: Option<Ringing>,
    /// Since when the agent is in `state`, unix ms (a wrap-up that has ended counts as
    /// available from `until_ms` on; see [`AgentState::is_available_at`]).
    pub state_since_ms: i64,
}

/// A ring of an agent for a queued call, as the node that rings them reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ringing {
    /// When the control plane got the report, unix ms of the database clock.
    pub since_ms: i64,
    /// The queue whose caller the agent is rung for.
    pub queue: String,
}

/// A hot-desk session: an agent logged in on a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The agent.
    pub agent: String,
    /// The device they are logged in on.
    pub device: String,
    /// The device's endpoint (dial string) as configured now.
    pub endpoint: String,
    /// When the agent logged in on this device, unix ms of the database clock.
    pub since_ms: i64,
}

/// What a login did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "login", rename_all = "snake_case")]
pub enum Login {
    /// The agent was not logged in; now they are, on the device.
    New,
    /// The agent was already logged in on this device; nothing changed.
    Unchanged,
    /// The agent was logged in on another device and has moved; that device is free.
    Moved {
        /// The device the agent left.
        from: String,
    },
}

/// An agent's counters of one day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DailyCounts {
    /// Calls recorded with [`Store::record_call`].
    pub calls: u32,
    /// Sales recorded with [`Store::record_sale`].
    pub sales: u32,
    /// Rings of queued calls the agent did not answer, reported with
    /// [`Store::record_call_event`].
    pub missed: u32,
}

/// What a node reports about an agent it rang for a queued call, with
/// [`Store::record_call_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEvent {
    /// The agent answered a call of `queue`: they are on a call, one more call is counted
    /// and their misses in a row start again from zero.
    Answered {
        /// The queue the call came from (kept in the audit row only).
        queue: String,
    },
    /// The agent's call ended: wrap-up for `wrap_up` (at most a day; zero: available at
    /// once), but only if they are still on the call. Whatever else they are in by then
    /// (a supervisor's pause during the call, say) is theirs and stays.
    Ended {
        /// How long the agent finishes the call's paperwork before the next call.
        wrap_up: Duration,
    },
    /// The agent was rung for a call of `queue` and did not answer (no answer, busy,
    /// rejected). At `max_misses` misses in a row an available agent is paused with the
    /// reason [`MISSED_REASON`].
    Missed {
        /// The queue the call came from (kept in the audit row only).
        queue: String,
        /// The queue's limit of misses in a row; at least 1.
        max_misses: u32,
    },
    /// The node starts ringing the agent for a call of `queue`: [`Ringing`] from now, for
    /// supervisors. The agent's state, counters and misses stay, and the directory version
    /// does not move (routing does not need it: the lease keeps other nodes off).
    Ringing {
        /// The queue the call came from.
        queue: String,
    },
    /// The ring ended neither answered nor missed (the caller hung up, the lease was lost,
    /// the fence refused the bridge, Asterisk went away): the ring is cleared, nothing is
    /// counted. [`CallEvent::Answered`], [`CallEvent::Missed`] and [`CallEvent::Ended`]
    /// clear it too.
    RingEnded,
}

impl CallEvent {
    /// Its action in the audit log and in the remembered request ids.
    fn action(&self) -> &'static str {
        match self {
            Self::Answered { .. } => "agent.call_answered",
            Self::Ended { .. } => "agent.call_ended",
            Self::Missed { .. } => "agent.call_missed",
            Self::Ringing { .. } => "agent.call_ringing",
            Self::RingEnded => "agent.ring_ended",
        }
    }

    /// Whether it changes what routing reads, and so moves the directory version.
    fn is_versioned(&self) -> bool {
        !matches!(self, Self::Ringing { .. } | Self::RingEnded)
    }
}

/// The pause reason of an agent paused by [`CallEvent::Missed`].
pub const MISSED_REASON: &str = "missed";

/// What a [`CallEvent`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum CallEventOutcome {
    /// After [`CallEvent::Answered`].
    Answered {
        /// Calls counted on the day, this one included.
        calls_today: u32,
    },
    /// After [`CallEvent::Ended`].
    Ended {
        /// The agent's state now: in wrap-up, available, or what they were in instead of
        /// the call.
        state: AgentState,
    },
    /// After [`CallEvent::Missed`].
    Missed {
        /// Misses counted on the day, this one included.
        missed_today: u32,
        /// Misses in a row now; back to 0 when this one reached `max_misses`.
        misses_in_row: u32,
        /// Whether this miss paused the agent.
        paused: bool,
    },
    /// After [`CallEvent::Ringing`].
    Ringing {
        /// When the ring was recorded, unix ms of the database clock.
        since_ms: i64,
    },
    /// After [`CallEvent::RingEnded`].
    RingEnded,
}

/// One row of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Increasing id; pass the smallest one seen as `before_id` for the next page.
    pub id: i64,
    /// When the change's transaction wrote the row, unix ms of the database clock.
    pub at_ms: i64,
    /// Who made the change: an API token's name or a component (`node:pbx-1`).
    pub actor: String,
    /// What was done, `kind.verb` (`agent.set_priority`).
    pub action: String,
    /// What it was done to, `kind:id` (`agent:1001`).
    pub subject: String,
    /// The change's parameters and what it replaced or removed.
    pub detail: serde_json::Value,
}

/// The whole directory at one instant, for the routing query's in-memory refresh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirectorySnapshot {
    /// The database clock when the snapshot was read, unix ms. Compare `until_ms` and
    /// `idle_since_ms` with this, never with the local clock.
    pub now_ms: i64,
    /// The day whose counters `calls_today`, `sales_today` and `missed_today` hold
    /// (`YYYY-MM-DD`).
    pub day: String,
    /// Every agent, ordered by id.
    pub agents: Vec<AgentSnapshot>,
    /// Every queue, ordered by id.
    pub queues: Vec<QueueSnapshot>,
}

impl DirectorySnapshot {
    /// The agent with this id, if any.
    pub fn agent(&self, id: &str) -> Option<&AgentSnapshot> {
        self.agents
            .binary_search_by(|agent| agent.id.as_str().cmp(id))
            .ok()
            .map(|index| &self.agents[index])
    }

    /// The queue with this id, if any.
    pub fn queue(&self, id: &str) -> Option<&QueueSnapshot> {
        self.queues
            .binary_search_by(|queue| queue.id.as_str().cmp(id))
            .ok()
            .map(|index| &self.queues[index])
    }
}

/// One agent in a [`DirectorySnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSnapshot {
    /// The personal extension.
    pub id: String,
    /// The name shown to supervisors.
    pub name: String,
    /// Tags routing can match.
    pub tags: BTreeSet<String>,
    /// After this many sales in a day the agent rings last; `None` means no cap.
    pub daily_cap: Option<u32>,
    /// A disabled agent gets no calls.
    pub enabled: bool,
    /// The recorded state; see [`AgentState::is_available_at`].
    pub state: AgentState,
    /// When the agent last became available (in a wrap-up: when it ends), unix ms.
    pub idle_since_ms: i64,
    /// Since when the agent is in `state`, unix ms.
    pub state_since_ms: i64,
    /// Calls recorded on the snapshot's day.
    pub calls_today: u32,
    /// Sales recorded on the snapshot's day.
    pub sales_today: u32,
    /// Rings of queued calls not answered on the snapshot's day.
    pub missed_today: u32,
    /// Where the agent is logged in; `None` when they are not (and cannot be rung).
    pub session: Option<Session>,
    /// The ring in progress as the snapshot read it; not kept current by the directory
    /// version (see [`Store::ringing_agents`]).
    pub ringing: Option<Ringing>,
}

impl AgentSnapshot {
    /// Whether the agent has reached their daily cap of sales (and so rings last).
    pub fn capped(&self) -> bool {
        self.daily_cap.is_some_and(|cap| self.sales_today >= cap)
    }
}

/// One queue in a [`DirectorySnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// The queue id.
    pub id: String,
    /// The name shown to supervisors.
    pub name: String,
    /// Members ordered by priority (lowest first), then agent id.
    pub members: Vec<QueueMember>,
}

// The statements that are the same text on both drivers.
const GET_AGENT: &str = "SELECT id, name, tags, daily_cap, enabled FROM agents WHERE id = ?";
const LIST_AGENTS: &str = "SELECT id, name, tags, daily_cap, enabled FROM agents ORDER BY id";
const DELETE_AGENT: &str = "DELETE FROM agents WHERE id = ?";
const DIRECTORY_VERSION: &str = "SELECT version FROM directory_version WHERE id = 1";
/// Binds: actor, request id. Columns: action, subject, result, answer.
const REQUEST_SEEN: &str = "SELECT action, subject, result, answer FROM request_ids \
     WHERE actor = ? AND request_id = ?";
/// How long a request id is remembered.
const REQUEST_ID_KEPT_MS: i64 = 7 * 24 * 3600 * 1000;
/// Longest request id.
pub const MAX_REQUEST_ID_LEN: usize = 64;
/// The last statement of every directory write (see the migration's comment).
const BUMP_VERSION: &str = "UPDATE directory_version SET version = version + 1 WHERE id = 1";
const SET_TAGS: &str = "UPDATE agents SET tags = ? WHERE id = ?";
const SET_DAILY_CAP: &str = "UPDATE agents SET daily_cap = ? WHERE id = ?";
const GET_DEVICE: &str = "SELECT id, endpoint, name, contact, digest_ha1 IS NOT NULL \
     FROM devices WHERE id = ?";
const LIST_DEVICES: &str = "SELECT id, endpoint, name, contact, digest_ha1 IS NOT NULL \
     FROM devices ORDER BY id";
const SET_DEVICE_CREDENTIALS: &str =
    "UPDATE devices SET digest_realm = ?, digest_ha1 = ? WHERE id = ?";
const DELETE_DEVICE: &str = "DELETE FROM devices WHERE id = ?";
const GET_QUEUE_ID: &str = "SELECT id FROM queues WHERE id = ?";
const GET_QUEUE: &str = "SELECT id, name, service_level_ms FROM queues WHERE id = ?";
const LIST_QUEUES: &str = "SELECT id, name, service_level_ms FROM queues ORDER BY id";
const DELETE_QUEUE: &str = "DELETE FROM queues WHERE id = ?";
const AGENT_EXISTS: &str = "SELECT id FROM agents WHERE id = ?";
const QUEUE_MEMBERS: &str =
    "SELECT agent_id, priority FROM queue_members WHERE queue_id = ? ORDER BY priority, agent_id";
const MEMBER_PRIORITY: &str =
    "SELECT priority FROM queue_members WHERE queue_id = ? AND agent_id = ?";
const DELETE_MEMBER: &str = "DELETE FROM queue_members WHERE queue_id = ? AND agent_id = ?";
const DELETE_AGENT_MEMBERSHIPS: &str = "DELETE FROM queue_members WHERE agent_id = ?";
const DELETE_QUEUE_MEMBERSHIPS: &str = "DELETE FROM queue_members WHERE queue_id = ?";
const DELETE_AGENT_COUNTERS: &str = "DELETE FROM daily_counters WHERE agent_id = ?";
const DELETE_QUEUE_COUNTERS: &str = "DELETE FROM queue_daily_counters WHERE queue_id = ?";
/// Binds: queue id, day.
const QUEUE_COUNTS: &str = "SELECT answered, abandoned, overflowed, answered_within_sl \
     FROM queue_daily_counters WHERE queue_id = ? AND day = ?";
/// Binds: day. One row per queue with a call that day.
const QUEUE_COUNTS_OF_DAY: &str = "SELECT queue_id, answered, abandoned, overflowed, \
     answered_within_sl FROM queue_daily_counters WHERE day = ?";
const SESSION_OF_AGENT: &str = "SELECT device_id FROM sessions WHERE agent_id = ?";
const SESSION_ON_DEVICE: &str = "SELECT agent_id FROM sessions WHERE device_id = ?";
const DELETE_SESSION_OF_AGENT: &str = "DELETE FROM sessions WHERE agent_id = ?";
const DELETE_SESSION_ON_DEVICE: &str = "DELETE FROM sessions WHERE device_id = ?";
const LIST_SESSIONS: &str = "SELECT s.agent_id, s.device_id, d.endpoint, s.since_ms \
     FROM sessions s JOIN devices d ON d.id = s.device_id ORDER BY s.agent_id";
const GET_SESSION: &str = "SELECT s.agent_id, s.device_id, d.endpoint, s.since_ms \
     FROM sessions s JOIN devices d ON d.id = s.device_id WHERE s.agent_id = ?";
const COUNTS: &str =
    "SELECT calls, sales, missed FROM daily_counters WHERE agent_id = ? AND day = ?";
/// Binds: agent id. Columns: ringing_since_ms, ringing_queue.
const RINGING_OF: &str = "SELECT ringing_since_ms, ringing_queue FROM agents WHERE id = ?";
/// Binds: agent id.
const END_RING: &str =
    "UPDATE agents SET ringing_since_ms = NULL, ringing_queue = NULL WHERE id = ?";
/// Columns: id, ringing_since_ms, ringing_queue; the agents being rung (by the index).
const RINGING_AGENTS: &str = "SELECT id, ringing_since_ms, ringing_queue FROM agents \
     WHERE ringing_since_ms IS NOT NULL";
const ADD_MISS_IN_ROW: &str = "UPDATE agents SET misses_in_row = misses_in_row + 1 WHERE id = ?";
const MISSES_IN_ROW: &str = "SELECT misses_in_row FROM agents WHERE id = ?";
const RESET_MISSES_IN_ROW: &str = "UPDATE agents SET misses_in_row = 0 WHERE id = ?";
const LIST_AUDIT: &str = "SELECT id, at_ms, actor, action, subject, detail FROM audit_log \
     WHERE id < ? ORDER BY id DESC LIMIT ?";
/// Binds: day. One row per agent, with their session, device and counters of the day.
const SNAPSHOT_AGENTS: &str = "SELECT a.id, a.name, a.tags, a.daily_cap, a.enabled, \
     a.state, a.reason, a.until_ms, a.idle_since_ms, \
     COALESCE(c.calls, 0), COALESCE(c.sales, 0), s.device_id, d.endpoint, s.since_ms, \
     COALESCE(c.missed, 0), a.ringing_since_ms, a.ringing_queue, a.state_since_ms \
     FROM agents a \
     LEFT JOIN sessions s ON s.agent_id = a.id \
     LEFT JOIN devices d ON d.id = s.device_id \
     LEFT JOIN daily_counters c ON c.agent_id = a.id AND c.day = ? \
     ORDER BY a.id";
const SNAPSHOT_MEMBERS: &str = "SELECT queue_id, agent_id, priority FROM queue_members \
     ORDER BY queue_id, priority, agent_id";

/// Runs `$body` in a write transaction bound to `$tx` on the native pool and commits it,
/// bumping the directory version last. `?` and `return Err(…)` inside `$body` roll the
/// transaction back. A MySQL deadlock, which InnoDB resolves by rolling one transaction
/// back, reruns the whole body. `write_tx!(store, tx, unversioned => …)` leaves the version
/// alone: for the queue counters and the caller attributes, which readers read on their
/// own.
macro_rules! write_tx {
    ($store:ident, $tx:ident => $body:block) => {
        write_tx!(@run $store, $tx, true, $body)
    };
    ($store:ident, $tx:ident, unversioned => $body:block) => {
        write_tx!(@run $store, $tx, false, $body)
    };
    (@run $store:ident, $tx:ident, $versioned:expr, $body:block) => {{
        let begin = $store.directory_sql().begin_write;
        let mut attempt = 1;
        loop {
            let outcome = with_pool!($store, pool => async {
                let mut $tx = pool.begin_with(SqlStr::from_static(begin)).await?;
                let value = $body;
                if $versioned {
                    // Last, so the row lock on the version is held only through the commit.
                    sqlx::query(q(BUMP_VERSION)).execute(&mut *$tx).await?;
                }
                $tx.commit().await.map_err(StoreError::OutcomeUnknown)?;
                Ok::<_, StoreError>(value)
            }
            .await);
            match outcome {
                Err(err) if attempt < MAX_ATTEMPTS && is_deadlock(&err) => {
                    tracing::debug!(attempt, error = %err, "directory write deadlocked, retrying");
                    attempt += 1;
                }
                outcome => break outcome,
            }
        }
    }};
}

/// Locks the agent's row and reads its state, or ends the transaction with not-found.
macro_rules! lock_agent_state {
    ($tx:ident, $sql:ident, $agent:ident) => {{
        let state: Option<String> = sqlx::query_scalar(q($sql.lock_agent))
            .bind($agent)
            .fetch_optional(&mut *$tx)
            .await?;
        state.ok_or_else(|| not_found("agent", $agent))?
    }};
}

/// What `$actor` was answered when it first sent `$request_id`: `Some((result, answer))`,
/// or `None` for a new id. Ends the transaction with an error when the id was sent for
/// another action or subject. Run it under the lock that serialises the write (the agent's
/// or the queue's row), so that two copies of one request cannot both count.
macro_rules! earlier_answer {
    ($tx:ident, $actor:expr, $request_id:expr, $action:expr, $subject:expr) => {{
        let earlier = sqlx::query(q(REQUEST_SEEN))
            .bind($actor)
            .bind($request_id)
            .fetch_optional(&mut *$tx)
            .await?;
        match earlier {
            None => None,
            Some(row) => {
                let action: String = row.try_get(0)?;
                let subject: String = row.try_get(1)?;
                if action != $action || subject != $subject {
                    return Err(request_reused($request_id, &action, &subject));
                }
                let result: i64 = row.try_get(2)?;
                let answer: Option<String> = row.try_get(3)?;
                Some((result, answer))
            }
        }
    }};
}

/// Remembers the answer to `$request_id` (see [`earlier_answer!`]): `$result` a count,
/// `$answer` the whole answer as JSON when it is more than a count. Forgets the actor's
/// ids older than a week on the way.
macro_rules! remember_answer {
    ($tx:ident, $sql:ident, $actor:expr, $request_id:expr, $action:expr, $subject:expr, $result:expr, $answer:expr) => {{
        let answer: Option<String> = $answer;
        sqlx::query(q($sql.remember_answer))
            .bind($actor)
            .bind($request_id)
            .bind($action)
            .bind($subject)
            .bind(i64::from($result))
            .bind(answer)
            .execute(&mut *$tx)
            .await?;
        sqlx::query(q($sql.forget_requests))
            .bind($actor)
            .bind(REQUEST_ID_KEPT_MS)
            .execute(&mut *$tx)
            .await?;
    }};
}

/// The JSON answer a request id remembers, read back; a row without a readable one is
/// corrupt.
fn remembered<T: serde::de::DeserializeOwned>(
    request_id: &str,
    answer: Option<String>,
) -> Result<T, sqlx::Error> {
    answer
        .as_deref()
        .map(serde_json::from_str::<T>)
        .and_then(Result::ok)
        .ok_or_else(|| bad_column(3, format!("request `{request_id}` has no readable answer")))
}

impl Store {
    fn directory_sql(&self) -> &'static DirectorySql {
        match self.pool {
            Pool::MySql(_) => &dialect::MYSQL_DIRECTORY,
            Pool::Sqlite(_) => &dialect::SQLITE_DIRECTORY,
        }
    }

    /// Creates the agent or replaces its name, tags, cap and enabled flag; availability,
    /// session, memberships and counters are kept. A new agent is available.
    pub async fn upsert_agent(&self, agent: &Agent, actor: &str) -> Result<(), StoreError> {
        check_id("agent id", &agent.id)?;
        check_text("name", &agent.name, MAX_NAME_CHARS)?;
        check_tags(&agent.tags)?;
        check_actor(actor)?;
        let tags = serde_json::to_string(&agent.tags).expect("tags serialize");
        let cap = agent.daily_cap.map(i64::from);
        let sql = self.directory_sql();
        let detail = json!({
            "name": agent.name,
            "tags": agent.tags,
            "daily_cap": agent.daily_cap,
            "enabled": agent.enabled,
        });
        write_tx!(self, tx => {
            sqlx::query(q(sql.upsert_agent))
                .bind(&agent.id)
                .bind(&agent.name)
                .bind(&tags)
                .bind(cap)
                .bind(i32::from(agent.enabled))
                .execute(&mut *tx)
                .await?;
            audit(sql, actor, "agent.upsert", &subject("agent", &agent.id), &detail)
                .execute(&mut *tx)
                .await?;
        })
    }

    /// Replaces the agent's tags, leaving everything else as it is (one statement, so a
    /// concurrent change of the cap or name is not undone).
    pub async fn set_tags(
        &self,
        agent: &str,
        tags: &BTreeSet<String>,
        actor: &str,
    ) -> Result<(), StoreError> {
        check_id("agent id", agent)?;
        check_tags(tags)?;
        check_actor(actor)?;
        let text = serde_json::to_string(tags).expect("tags serialize");
        let sql = self.directory_sql();
        write_tx!(self, tx => {
            lock_agent_state!(tx, sql, agent);
            sqlx::query(q(SET_TAGS)).bind(&text).bind(agent).execute(&mut *tx).await?;
            audit(sql, actor, "agent.set_tags", &subject("agent", agent), &json!({ "tags": tags }))
                .execute(&mut *tx)
                .await?;
        })
    }

    /// Sets (or with `None` removes) the agent's daily cap, leaving everything else.
    pub async fn set_daily_cap(
        &self,
        agent: &str,
        cap: Option<u32>,
        actor: &str,
    ) -> Result<(), StoreError> {
        check_id("agent id", agent)?;
        check_actor(actor)?;
        let sql = self.directory_sql();
        write_tx!(self, tx => {
            lock_agent_state!(tx, sql, agent);
            sqlx::query(q(SET_DAILY_CAP))
                .bind(cap.map(i64::from))
                .bind(agent)
                .execute(&mut *tx)
                .await?;
            let detail = json!({ "daily_cap": cap });
            audit(sql, actor, "agent.set_daily_cap", &subject("agent", agent), &detail)
                .execute(&mut *tx)
                .await?;
        })
    }

    /// The agent's settings.
    pub async fn get_agent(&self, id: &str) -> Result<Agent, StoreError> {
        check_id("agent id", id)?;
        let agent = with_pool!(self, pool => {
            let row = sqlx::query(q(GET_AGENT)).bind(id).fetch_optional(pool).await?;
            row.as_ref().map(agent_from_row).transpose()?
        });
        agent.ok_or_else(|| not_found("agent", id))
    }

    /// Every agent's settings, ordered by id.
    pub async fn list_agents(&self) -> Result<Vec<Agent>, StoreError> {
        with_pool!(self, pool => {
            let rows = sqlx::query(q(LIST_AGENTS)).fetch_all(pool).await?;
            Ok(rows.iter().map(agent_from_row).collect::<Result<_, _>>()?)
        })
    }

    /// Deletes the agent with their queue memberships, session and counters, all in one
    /// transaction; the audit row lists what went with them.
    pub async fn delete_agent(&self, id: &str, actor: &str) -> Result<(), StoreError> {
        check_id("agent id", id)?;
        check_actor(actor)?;
        let sql = self.directory_sql();
        write_tx!(self, tx => {
            lock_agent_state!(tx, sql, id);
            let device: Option<String> = sqlx::query_scalar(q(SESSION_OF_AGENT))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            let ended = sqlx::query(q(DELETE_SESSION_OF_AGENT))
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            // A deletion of the device may have ended the session since the read above.
            let device = device.filter(|_| ended == 1);
            let memberships = sqlx::query(q(DELETE_AGENT_MEMBERSHIPS))
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let counters = sqlx::query(q(DELETE_AGENT_COUNTERS))
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(q(DELETE_AGENT)).bind(id).execute(&mut *tx).await?;
            let detail = json!({
                "logged_out_of": device,
                "memberships_removed": memberships,
                "counter_days_removed": counters,
            });
            audit(sql, actor, "agent.delete", &subject("agent", id), &detail)
                .execute(&mut *tx)
                .await?;
        })
    }

    /// Creates the device or replaces its endpoint, name and contact, keeping its
    /// credentials. A session on it stays, and calls go to the new endpoint from the next
    /// snapshot on.
    pub async fn upsert_device(&self, device: &Device, actor: &str) -> Result<(), StoreError> {
        self.put_device(device, &CredentialsChange::Keep, actor)
            .await
    }

    /// [`Store::upsert_device`] that also sets or removes the device's credentials, in the
    /// same transaction and audit row (which says what happened to them, never what they
    /// are).
    pub async fn put_device(
        &self,
        device: &Device,
        credentials: &CredentialsChange,
        actor: &str,
    ) -> Result<(), StoreError> {
        check_id("device id", &device.id)?;
        check_endpoint(&device.endpoint)?;
        if let Some(name) = &device.name {
            check_text("name", name, MAX_NAME_CHARS)?;
        }
        if let Some(contact) = &device.contact {
            check_contact(contact)?;
        }
        check_actor(actor)?;
        let sql = self.directory_sql();
        let detail = json!({
            "endpoint": device.endpoint,
            "name": device.name,
            "contact": device.contact,
            "credentials": credentials.audited(),
        });
        write_tx!(self, tx => {
            sqlx::query(q(sql.upsert_device))
                .bind(&device.id)
                .bind(&device.endpoint)
                .bind(&device.name)
                .bind(&device.contact)
                .execute(&mut *tx)
                .await?;
            let (realm, ha1) = match credentials {
                CredentialsChange::Keep => (None, None),
                CredentialsChange::Set(set) => (Some(set.realm()), Some(set.ha1())),
                CredentialsChange::Remove => (None, None),
            };
            if *credentials != CredentialsChange::Keep {
                sqlx::query(q(SET_DEVICE_CREDENTIALS))
                    .bind(realm)
                    .bind(ha1)
                    .bind(&device.id)
                    .execute(&mut *tx)
                    .await?;
            }
            audit(sql, actor, "device.upsert", &subject("device", &device.id), &detail)
                .execute(&mut *tx)
                .await?;
        })
    }

    /// The device.
    pub async fn get_device(&self, id: &str) -> Result<Device, StoreError> {
        check_id("device id", id)?;
        let device = with_pool!(self, pool => {
            let row = sqlx::query(q(GET_DEVICE)).bind(id).fetch_optional(pool).await?;
            row.map(|row| -> Result<Device, sqlx::Error> {
                Ok(Device {
                    id: row.try_get(0)?,
                    endpoint: row.try_get(1)?,
                    name: row.try_get(2)?,
                    contact: row.try_get(3)?,
                    registers: row.try_get::<i64, _>(4)? != 0,
                })
            })
            .transpose()?
        });
        device.ok_or_else(|| not_found("device", id))
    }

    /// Every device, ordered by id.
    pub async fn list_devices(&self) -> Result<Vec<Device>, StoreError> {
        with_pool!(self, pool => {
            let rows = sqlx::query(q(LIST_DEVICES)).fetch_all(pool).await?;
            rows.iter()
                .map(|row| {
                    Ok(Device {
                        id: row.try_get(0)?,
                        endpoint: row.try_get(1)?,
                        name: row.try_get(2)?,
                        contact: row.try_get(3)?,
                        registers: row.try_get::<i64, _>(4)? != 0,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }

    /// Deletes the device, logging out the agent on it; the audit row names that agent.
    pub async fn delete_device(&self, id: &str, actor: &str) -> Result<(), StoreError> {
        check_id("device id", id)?;
        check_actor(actor)?;
        let sql = self.directory_sql();
        write_tx!(self, tx => {
            let locked: Option<String> = sqlx::query_scalar(q(sql.lock_device))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            locked.ok_or_else(|| not_found("device", id))?;
            let agent: Option<String> = sqlx::query_scalar(q(SESSION_ON_DEVICE))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            let ended = sqlx::query(q(DELETE_SESSION_ON_DEVICE))
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            // The agent's logout or move may have ended the session since the read above
            // (they hold the agent's lock, not the device's).
            let agent = agent.filter(|_| ended == 1);
            sqlx::query(q(DELETE_DEVICE)).bind(id).execute(&mut *tx).await?;
            let detail = json!({ "logged_out": agent });
            audit(sql, actor, "device.delete", &subject("device", id), &detail)
                .execute(&mut *tx)
                .await?;
        })
    }

    /// Creates the queue or replaces its name and service-level threshold; its members and
    /// counters stay (calls already counted keep the threshold they were counted with).
    pub async fn upsert_queue(&self, queue: &Queue, actor: &str) -> Result<(), StoreError> {
        check_id("queue id", &queue.id)?;
        check_text("name", &queue.name, MAX_NAME_CHARS)?;
        check_service_level(queue.service_level_ms)?;
        check_actor(actor)?;
        let sql = self.directory_sql();
        let detail = json!({ "name": queue.name, "service_level_ms": queue.service_level_ms });
        write_tx!(self, tx => {
            sqlx::query(q(sql.upsert_queue))
                .bind(&queue.id)
                .bind(&queue.name)
                .bind(i64::from(queue.service_level_ms))
                .execute(&mut *tx)
                .await?;
            audit(sql, actor, "queue.upsert", &subject("queue", &queue.id), &detail)
                .execute(&mut *tx)
                .await?;
        })
    }

    /// The queue.
    pub async fn get_queue(&self, id: &str) -> Result<Queue, StoreError> {
        check_id("queue id", id)?;
        let queue = with_pool!(self, pool => {
            let row = sqlx::query(q(GET_QUEUE)).bind(id).fetch_optional(pool).await?;
            row.map(|row| queue_from_row(&row)).transpose()?
        });
        queue.ok_or_else(|| not_found("queue", id))
    }

    /// Every queue, ordered by id.
    pub async fn list_queues(&self) -> Result<Vec<Queue>, StoreError> {
        with_pool!(self, pool => {
            let rows = sqlx::query(q(LIST_QUEUES)).fetch_all(pool).await?;
            rows.iter()
                .map(queue_from_row)
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }

    /// Deletes the queue with its memberships and counters; the audit row counts what went
    /// with it.
    pub async fn delete_queue(&self, id: &str, actor: &str) -> Result<(), StoreError> {
        check_id("queue id", id)?;
        check_actor(actor)?;
        let sql = self.directory_sql();
        write_tx!(self, tx => {
            let locked: Option<String> = sqlx::query_scalar(q(sql.lock_queue))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            locked.ok_or_else(|| not_found("queue", id))?;
            let members = sqlx::query(q(DELETE_QUEUE_MEMBERSHIPS))
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let counters = sqlx::query(q(DELETE_QUEUE_COUNTERS))
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(q(DELETE_QUEUE)).bind(id).execute(&mut *tx).await?;
            let detail = json!({ "members_removed": members, "counter_days_removed": counters });
            audit(sql, actor, "queue.delete", &subject("queue", id), &detail)
                .execute(&mut *tx)
                .await?;
        })
    }

    /// Makes the agent a member of the queue with this priority (lower rings first), or
    /// changes their priority; the audit row keeps the previous one.
    pub async fn set_priority(
        &self,
        queue: &str,
        agent: &str,
        priority: i32,
        actor: &str,
    ) -> Result<(), StoreError> {
        check_id("queue id", queue)?;
        check_id("agent id", agent)?;
        check_actor(actor)?;
        let sql = self.directory_sql();
        write_tx!(self, tx => {
            lock_agent_state!(tx, sql, agent);
            let kept: Option<String> = sqlx::query_scalar(q(sql.share_queue))
                .bind(queue)
                .fetch_optional(&mut *tx)
                .await?;
            kept.ok_or_else(|| not_found("queue", queue))?;
            let previous: Option<i64> = sqlx::query_scalar(q(MEMBER_PRIORITY))
                .bind(queue)
                .bind(agent)
                .fetch_optional(&mut *tx)
                .await?;
            sqlx::query(q(sql.upsert_member))
                .bind(queue)
                .bind(agent)
                .bind(priority)
                .execute(&mut *tx)
                .await?;
            let detail = json!({ "queue": queue, "priority": priority, "previous": previous });
            audit(sql, actor, "agent.set_priority", &subject("agent", agent), &detail)
                .execute(&mut *tx)
                .await?;
        })
    }

    /// Removes the agent from the queue; [`StoreError::NotMember`] when they were not in it.
    pub async fn remove_member(
        &self,
        queue: &str,
        agent: &str,
        actor: &str,
    ) -> Result<(), StoreError> {
        check_id("queue id", queue)?;
        check_id("agent id", agent)?;
        check_actor(actor)?;
        let sql = self.directory_sql();
        write_tx!(self, tx => {
            lock_agent_state!(tx, sql, agent);
            let kept: Option<String> = sqlx::query_scalar(q(sql.share_queue))
                .bind(queue)
                .fetch_optional(&mut *tx)
                .await?;
            kept.ok_or_else(|| not_found("queue", queue))?;
            let previous: Option<i64> = sqlx::query_scalar(q(MEMBER_PRIORITY))
                .bind(queue)
                .bind(agent)
                .fetch_optional(&mut *tx)
                .await?;
            let Some(previous) = previous else {
                return Err(StoreError::NotMember {
                    queue: queue.to_owned(),
                    agent: agent.to_owned(),
                });
            };
            sqlx::query(q(DELETE_MEMBER))
                .bind(queue)
                .bind(agent)
                .execute(&mut *tx)
                .await?;
            let detail = json!({ "queue": queue, "previous": previous });
            audit(sql, actor, "agent.remove_from_queue", &subject("agent", agent), &detail)
                .execute(&mut *tx)
                .await?;
        })
    }

    /// The queue's members, ordered by priority (lowest first), then agent id.
    pub async fn list_members(&self, queue: &str) -> Result<Vec<QueueMember>, StoreError> {
        check_id("queue id", queue)?;
        with_pool!(self, pool => {
            // One read transaction, so a queue deleted in between reads as not found rather
            // than as empty.
            let mut tx = pool.begin().await?;
            let found: Option<String> = sqlx::query_scalar(q(GET_QUEUE_ID))
                .bind(queue)
                .fetch_optional(&mut *tx)
                .await?;
            found.ok_or_else(|| not_found("queue", queue))?;
            let rows = sqlx::query(q(QUEUE_MEMBERS))
                .bind(queue)
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            rows.iter()
                .map(|row| {
                    Ok(QueueMember {
                        agent: row.try_get(0)?,
                        priority: i32_column(row, 1)?,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }

    /// Logs the agent in on the device. An agent logged in elsewhere moves here (see the
    /// module docs); a device held by another agent is a [`StoreError::Conflict`] naming
    /// them, and changes nothing. A new session of an available agent restarts their idle
    /// time.
    pub async fn login(&self, agent: &str, device: &str, actor: &str) -> Result<Login, StoreError> {
        check_id("agent id", agent)?;
        check_id("device id", device)?;
        check_actor(actor)?;
        let sql = self.directory_sql();
        write_tx!(self, tx => {
            lock_agent_state!(tx, sql, agent);
            let endpoint: Option<String> = sqlx::query_scalar(q(sql.lock_device))
                .bind(device)
                .fetch_optional(&mut *tx)
                .await?;
            endpoint.ok_or_else(|| not_found("device", device))?;
            let holder: Option<String> = sqlx::query_scalar(q(SESSION_ON_DEVICE))
                .bind(device)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(holder) = holder.filter(|holder| holder != agent) {
                return Err(StoreError::Conflict {
                    device: device.to_owned(),
                    holder,
                });
            }
            let current: Option<String> = sqlx::query_scalar(q(SESSION_OF_AGENT))
                .bind(agent)
                .fetch_optional(&mut *tx)
                .await?;
            let login = match current {
                Some(current) if current == device => Login::Unchanged,
                Some(from) => {
                    let moved = sqlx::query(q(sql.move_session))
                        .bind(device)
                        .bind(agent)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    // No row: the old device was deleted (and the session with it) after
                    // the read above, so this is a new session.
                    if moved == 1 { Login::Moved { from } } else { Login::New }
                }
                None => Login::New,
            };
            if login == Login::New {
                sqlx::query(q(sql.insert_session))
                    .bind(agent)
                    .bind(device)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(q(sql.idle_from_now))
                    .bind(agent)
                    .execute(&mut *tx)
                    .await?;
            }
            let from = match &login {
                Login::Moved { from } => Some(from.as_str()),
                Login::New | Login::Unchanged => None,
            };
            let detail = json!({ "device": device, "moved_from": from });
            audit(sql, actor, "agent.login", &subject("agent", agent), &detail)
                .execute(&mut *tx)
                .await?;
            login
        })
    }

    /// Ends the agent's session; returns the device they were logged in on, `None` if they
    /// were not logged in. Availability is left as it was.
    pub async fn logout(&self, agent: &str, actor: &str) -> Result<Option<String>, StoreError> {
        check_id("agent id", agent)?;
        check_actor(actor)?;
        let sql = self.directory_sql();
        write_tx!(self, tx => {
            lock_agent_state!(tx, sql, agent);
            let device: Option<String> = sqlx::query_scalar(q(SESSION_OF_AGENT))
                .bind(agent)
                .fetch_optional(&mut *tx)
                .await?;
            let ended = sqlx::query(q(DELETE_SESSION_OF_AGENT))
                .bind(agent)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            // A deletion of the device may have ended the session since the read above.
            let device = device.filter(|_| ended == 1);
            let detail = json!({ "device": device });
            audit(sql, actor, "agent.logout", &subject("agent", agent), &detail)
                .execute(&mut *tx)
                .await?;
            device
        })
    }

    /// The agent's session, `None` when they are not logged in.
    pub async fn session(&self, agent: &str) -> Result<Option<Session>, StoreError> {
        check_id("agent id", agent)?;
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let found: Option<String> = sqlx::query_scalar(q(AGENT_EXISTS))
                .bind(agent)
                .fetch_optional(&mut *tx)
                .await?;
            found.ok_or_else(|| not_found("agent", agent))?;
            let row = sqlx::query(q(GET_SESSION))
                .bind(agent)
                .fetch_optional(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(row.as_ref().map(session_from_row).transpose()?)
        })
    }

    /// Every session, ordered by agent id.
    pub async fn list_sessions(&self) -> Result<Vec<Session>, StoreError> {
        with_pool!(self, pool => {
            let rows = sqlx::query(q(LIST_SESSIONS)).fetch_all(pool).await?;
            Ok(rows.iter().map(session_from_row).collect::<Result<_, _>>()?)
        })
    }

    /// Pauses the agent: no calls until [`Store::unpause`]. `reason` is required (1–200
    /// characters), so supervisors see why.
    pub async fn pause(&self, agent: &str, reason: &str, actor: &str) -> Result<(), StoreError> {
        check_id("agent id", agent)?;
        check_text("reason", reason, MAX_NAME_CHARS)?;
        check_actor(actor)?;
        let sql = self.directory_sql();
        write_tx!(self, tx => {
            let previous = lock_agent_state!(tx, sql, agent);
            sqlx::query(q(sql.pause))
                .bind(reason)
                .bind(agent)
                .execute(&mut *tx)
                .await?;
            let detail = json!({ "reason": reason, "previous": previous });
            audit(sql, actor, "agent.pause", &subject("agent", agent), &detail)
                .execute(&mut *tx)
                .await?;
        })
    }

    /// Makes the agent available: from a pause, at the end of a call without wrap-up, or
    /// ending a wrap-up early. Their idle time starts now, except for an agent who was
    /// already available (kept, so a repeated call costs them no place) or whose wrap-up had
    /// already ended (idle since its end).
    pub async fn unpause(&self, agent: &str, actor: &str) -> Result<(), StoreError> {
        check_id("agent id", agent)?;
        check_actor(actor)?;
        let sql = self.directory_sql();
        write_tx!(self, tx => {
            let previous = lock_agent_state!(tx, sql, agent);
            sqlx::query(q(sql.unpause)).bind(agent).execute(&mut *tx).await?;
            let detail = json!({ "previous": previous });
            audit(sql, actor, "agent.unpause", &subject("agent", agent), &detail)
                .execute(&mut *tx)
                .await?;
        })
    }

    /// Records that the agent is on a call.
    pub async fn set_on_call(&self, agent: &str, actor: &str) -> Result<(), StoreError> {
        check_id("agent id", agent)?;
        check_actor(actor)?;
        let sql = self.directory_sql();
        write_tx!(self, tx => {
            let previous = lock_agent_state!(tx, sql, agent);
            sqlx::query(q(sql.on_call)).bind(agent).execute(&mut *tx).await?;
            let detail = json!({ "previous": previous });
            audit(sql, actor, "agent.on_call", &subject("agent", agent), &detail)
                .execute(&mut *tx)
                .await?;
        })
    }

    /// Puts the agent in wrap-up for `duration` (at most a day) from now by the database
    /// clock. They count as available from its end, and as idle since then.
    pub async fn wrap_up(
        &self,
        agent: &str,
        duration: Duration,
        actor: &str,
    ) -> Result<(), StoreError> {
        check_id("agent id", agent)?;
        check_actor(actor)?;
        if duration > MAX_WRAP_UP {
            return Err(invalid(
                "wrap-up duration",
                format!("{} s is longer than a day", duration.as_secs()),
            ));
        }
        let ms = i64::try_from(duration.as_millis()).expect("a day fits in i64 ms");
        let sql = self.directory_sql();
        write_tx!(self, tx => {
            let previous = lock_agent_state!(tx, sql, agent);
            sqlx::query(q(sql.wrap_up))
                .bind(ms)
                .bind(ms)
                .bind(agent)
                .execute(&mut *tx)
                .await?;
            let detail = json!({ "duration_ms": ms, "previous": previous });
            audit(sql, actor, "agent.wrap_up", &subject("agent", agent), &detail)
                .execute(&mut *tx)
                .await?;
        })
    }

    /// The agent's availability, with the database clock.
    pub async fn availability(&self, agent: &str) -> Result<Availability, StoreError> {
        check_id("agent id", agent)?;
        let sql = self.directory_sql();
        let availability = with_pool!(self, pool => {
            let row = sqlx::query(q(sql.availability))
                .bind(agent)
                .fetch_optional(pool)
                .await?;
            row.map(|row| -> Result<Availability, sqlx::Error> {
                Ok(Availability {
                    state: state_from_row(&row, 0)?,
                    idle_since_ms: row.try_get(3)?,
                    now_ms: row.try_get(4)?,
                    ringing: ringing_from_row(&row, 5)?,
                    state_since_ms: row.try_get(7)?,
                })
            })
            .transpose()?
        });
        availability.ok_or_else(|| not_found("agent", agent))
    }

    /// Adds one call to the agent's counters of `day` (`YYYY-MM-DD` in the configured time
    /// zone) and returns the day's new count.
    pub async fn record_call(
        &self,
        agent: &str,
        day: &str,
        actor: &str,
    ) -> Result<u32, StoreError> {
        let sql = self.directory_sql();
        self.count(agent, day, actor, sql.count_call, Counter::Calls)
            .await
    }

    /// Adds one sale to the agent's counters of `day` (`YYYY-MM-DD` in the configured time
    /// zone) and returns the day's new count; concurrent sales are all counted.
    pub async fn record_sale(
        &self,
        agent: &str,
        day: &str,
        actor: &str,
    ) -> Result<u32, StoreError> {
        let sql = self.directory_sql();
        self.count(agent, day, actor, sql.count_sale, Counter::Sales)
            .await
    }

    /// [`Store::record_sale`] that counts once per `request_id` of `actor`: a retry with
    /// the same id (after a lost answer, say) answers the count the first call answered and
    /// counts nothing. An id used for another agent is a conflict.
    pub async fn record_sale_once(
        &self,
        agent: &str,
        day: &str,
        actor: &str,
        request_id: &str,
    ) -> Result<u32, StoreError> {
        check_request_id(request_id)?;
        let sql = self.directory_sql();
        self.count_with(
            agent,
            day,
            actor,
            sql.count_sale,
            Counter::Sales,
            Some(request_id),
        )
        .await
    }

    async fn count(
        &self,
        agent: &str,
        day: &str,
        actor: &str,
        increment: &'static str,
        counter: Counter,
    ) -> Result<u32, StoreError> {
        self.count_with(agent, day, actor, increment, counter, None)
            .await
    }

    async fn count_with(
        &self,
        agent: &str,
        day: &str,
        actor: &str,
        increment: &'static str,
        counter: Counter,
        request_id: Option<&str>,
    ) -> Result<u32, StoreError> {
        check_id("agent id", agent)?;
        check_day(day)?;
        check_actor(actor)?;
        let sql = self.directory_sql();
        let agent_subject = subject("agent", agent);
        write_tx!(self, tx => {
            lock_agent_state!(tx, sql, agent);
            if let Some(request_id) = request_id
                && let Some((result, _)) =
                    earlier_answer!(tx, actor, request_id, counter.action(), agent_subject)
            {
                // Nothing to write: the transaction is dropped (rolled back).
                return Ok(u32::try_from(result).unwrap_or(u32::MAX));
            }
            // The agent's row lock (MySQL) or the write lock (SQLite) is held, so the
            // count read back is this increment's, not a concurrent one's.
            sqlx::query(q(increment))
                .bind(agent)
                .bind(day)
                .execute(&mut *tx)
                .await?;
            let row = sqlx::query(q(COUNTS))
                .bind(agent)
                .bind(day)
                .fetch_one(&mut *tx)
                .await?;
            let value = u32_column(&row, counter.column())?;
            let mut detail = json!({ "day": day });
            detail[counter.name()] = json!(value);
            audit(sql, actor, counter.action(), &agent_subject, &detail)
                .execute(&mut *tx)
                .await?;
            if let Some(request_id) = request_id {
                remember_answer!(
                    tx, sql, actor, request_id, counter.action(), &agent_subject, value, None
                );
            }
            value
        })
    }

    /// Records what a node saw when it rang `agent` for a queued call (see [`CallEvent`]):
    /// the agent's state, their counters of `day` (`YYYY-MM-DD` in the configured time
    /// zone) and their misses in a row, in one transaction with its audit row, so every
    /// node's routing sees it at its next refresh.
    ///
    /// With a `request_id` (a node retrying after a lost answer), a request `actor` already
    /// sent is answered as it was the first time and writes nothing; an id used for another
    /// event or agent is an error.
    pub async fn record_call_event(
        &self,
        agent: &str,
        event: &CallEvent,
        day: &str,
        actor: &str,
        request_id: Option<&str>,
    ) -> Result<CallEventOutcome, StoreError> {
        check_id("agent id", agent)?;
        check_day(day)?;
        check_actor(actor)?;
        if let Some(request_id) = request_id {
            check_request_id(request_id)?;
        }
        match event {
            // The queue is only recorded, not looked up: a call rung from a queue that was
            // deleted meanwhile still happened, and the agent's state must say so.
            CallEvent::Answered { queue } | CallEvent::Ringing { queue } => {
                check_id("queue id", queue)?;
            }
            CallEvent::RingEnded => {}
            CallEvent::Missed { queue, max_misses } => {
                check_id("queue id", queue)?;
                if *max_misses == 0 {
                    return Err(invalid(
                        "max_misses",
                        "must be at least 1 (1 pauses the agent at their first miss)".into(),
                    ));
                }
            }
            CallEvent::Ended { wrap_up } => {
                if *wrap_up > MAX_WRAP_UP {
                    return Err(invalid(
                        "wrap_up_ms",
                        format!(
                            "{} ms is longer than a day; send at most {} (0: available at once)",
                            wrap_up.as_millis(),
                            MAX_WRAP_UP.as_millis()
                        ),
                    ));
                }
            }
        }
        let sql = self.directory_sql();
        let action = event.action();
        let agent_subject = subject("agent", agent);
        // A ring and its end leave the version alone (see the module's documentation):
        // the control planes read the ringing agents on their own.
        let versioned = event.is_versioned();
        write_tx!(@run self, tx, versioned, {
            let previous = lock_agent_state!(tx, sql, agent);
            if let Some(request_id) = request_id
                && let Some((_, answer)) =
                    earlier_answer!(tx, actor, request_id, action, agent_subject)
            {
                // Nothing to write: the transaction is dropped (rolled back).
                return Ok(remembered::<CallEventOutcome>(request_id, answer)?);
            }
            let (outcome, detail) = match event {
                CallEvent::Answered { queue } => {
                    sqlx::query(q(sql.answered)).bind(agent).execute(&mut *tx).await?;
                    sqlx::query(q(sql.count_call))
                        .bind(agent)
                        .bind(day)
                        .execute(&mut *tx)
                        .await?;
                    let row = sqlx::query(q(COUNTS))
                        .bind(agent)
                        .bind(day)
                        .fetch_one(&mut *tx)
                        .await?;
                    let calls = u32_column(&row, 0)?;
                    let detail = json!({
                        "queue": queue, "day": day, "calls": calls, "previous": previous,
                    });
                    (CallEventOutcome::Answered { calls_today: calls }, detail)
                }
                CallEvent::Ended { wrap_up } => {
                    sqlx::query(q(END_RING)).bind(agent).execute(&mut *tx).await?;
                    let ms = i64::try_from(wrap_up.as_millis()).expect("a day fits in i64 ms");
                    // Only a call ends here: a pause a supervisor set during the call (or
                    // anything else written since) is newer than the call and stays.
                    let on_call = previous == AgentState::OnCall.as_str();
                    if on_call && ms == 0 {
                        sqlx::query(q(sql.end_call)).bind(agent).execute(&mut *tx).await?;
                    } else if on_call {
                        sqlx::query(q(sql.wrap_up))
                            .bind(ms)
                            .bind(ms)
                            .bind(agent)
                            .execute(&mut *tx)
                            .await?;
                    }
                    let row = sqlx::query(q(sql.availability))
                        .bind(agent)
                        .fetch_one(&mut *tx)
                        .await?;
                    let state = state_from_row(&row, 0)?;
                    let detail = json!({
                        "wrap_up_ms": ms, "previous": previous, "state": state.as_str(),
                    });
                    (CallEventOutcome::Ended { state }, detail)
                }
                CallEvent::Missed { queue, max_misses } => {
                    sqlx::query(q(END_RING)).bind(agent).execute(&mut *tx).await?;
                    sqlx::query(q(sql.count_missed))
                        .bind(agent)
                        .bind(day)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query(q(ADD_MISS_IN_ROW)).bind(agent).execute(&mut *tx).await?;
                    let row = sqlx::query(q(COUNTS))
                        .bind(agent)
                        .bind(day)
                        .fetch_one(&mut *tx)
                        .await?;
                    let missed = u32_column(&row, 2)?;
                    let row = sqlx::query(q(MISSES_IN_ROW))
                        .bind(agent)
                        .fetch_one(&mut *tx)
                        .await?;
                    let mut in_row = u32_column(&row, 0)?;
                    let mut paused = false;
                    // `>=`, not `==`: a queue whose limit was lowered since the last miss
                    // pauses at its new limit instead of never.
                    if in_row >= *max_misses {
                        // Only an agent who could be rung is paused; one already paused
                        // keeps their own reason, one on a call their call.
                        paused = sqlx::query(q(sql.pause_if_available))
                            .bind(MISSED_REASON)
                            .bind(agent)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected()
                            == 1;
                        sqlx::query(q(RESET_MISSES_IN_ROW)).bind(agent).execute(&mut *tx).await?;
                        in_row = 0;
                    }
                    let detail = json!({
                        "queue": queue, "day": day, "missed": missed, "misses_in_row": in_row,
                        "max_misses": max_misses, "paused": paused, "previous": previous,
                    });
                    let outcome = CallEventOutcome::Missed {
                        missed_today: missed,
                        misses_in_row: in_row,
                        paused,
                    };
                    (outcome, detail)
                }
                CallEvent::Ringing { queue } => {
                    sqlx::query(q(sql.ring))
                        .bind(queue)
                        .bind(agent)
                        .execute(&mut *tx)
                        .await?;
                    let row = sqlx::query(q(RINGING_OF)).bind(agent).fetch_one(&mut *tx).await?;
                    let since_ms: i64 = row.try_get(0)?;
                    let detail = json!({ "queue": queue, "since_ms": since_ms, "previous": previous });
                    (CallEventOutcome::Ringing { since_ms }, detail)
                }
                CallEvent::RingEnded => {
                    // What the ring was, for the audit row: a node that reports the end of a
                    // ring the store never saw start (its `ringing` refused, say) shows as
                    // one without.
                    let row = sqlx::query(q(RINGING_OF)).bind(agent).fetch_one(&mut *tx).await?;
                    let ring = ringing_from_row(&row, 0)?;
                    sqlx::query(q(END_RING)).bind(agent).execute(&mut *tx).await?;
                    let detail = json!({
                        "ringing_since_ms": ring.as_ref().map(|r| r.since_ms),
                        "queue": ring.map(|r| r.queue),
                        "previous": previous,
                    });
                    (CallEventOutcome::RingEnded, detail)
                }
            };
            audit(sql, actor, action, &agent_subject, &detail)
                .execute(&mut *tx)
                .await?;
            if let Some(request_id) = request_id {
                let result = match &outcome {
                    CallEventOutcome::Answered { calls_today } => *calls_today,
                    CallEventOutcome::Missed { missed_today, .. } => *missed_today,
                    CallEventOutcome::Ended { .. }
                    | CallEventOutcome::Ringing { .. }
                    | CallEventOutcome::RingEnded => 0,
                };
                let answer = serde_json::to_string(&outcome).expect("outcomes serialize");
                remember_answer!(
                    tx, sql, actor, request_id, action, &agent_subject, result, Some(answer)
                );
            }
            outcome
        })
    }

    /// Counts what became of a call of `queue` on `day` (`YYYY-MM-DD` in the configured
    /// time zone): one more `outcome`, and, for an answer after `waited` of at most the
    /// queue's `service_level_ms`, one more answered within the service level (the
    /// threshold itself included). Returns the queue's counters of the day after it.
    ///
    /// With a `request_id` (a node retrying after a lost answer), a request `actor` already
    /// sent is answered as it was the first time and counts nothing; an id used for another
    /// outcome or queue is an error. No audit row and no directory version bump: see the
    /// module's documentation.
    pub async fn record_call_outcome(
        &self,
        queue: &str,
        outcome: CallOutcome,
        waited: Duration,
        day: &str,
        actor: &str,
        request_id: Option<&str>,
    ) -> Result<QueueCounts, StoreError> {
        check_id("queue id", queue)?;
        check_day(day)?;
        check_actor(actor)?;
        if let Some(request_id) = request_id {
            check_request_id(request_id)?;
        }
        let sql = self.directory_sql();
        let action = outcome.action();
        let queue_subject = subject("queue", queue);
        write_tx!(self, tx, unversioned => {
            // The queue's row lock serialises its outcomes (MySQL), so a retry sees the
            // first copy's remembered answer and the counts read back are this call's.
            let threshold: Option<i64> = sqlx::query_scalar(q(sql.lock_queue_service_level))
                .bind(queue)
                .fetch_optional(&mut *tx)
                .await?;
            let threshold = threshold.ok_or_else(|| not_found("queue", queue))?;
            if let Some(request_id) = request_id
                && let Some((_, answer)) =
                    earlier_answer!(tx, actor, request_id, action, queue_subject)
            {
                // Nothing to write: the transaction is dropped (rolled back).
                return Ok(remembered::<QueueCounts>(request_id, answer)?);
            }
            let within = outcome == CallOutcome::Answered
                && u128::try_from(threshold).is_ok_and(|t| waited.as_millis() <= t);
            let one = |wanted: CallOutcome| i64::from(outcome == wanted);
            sqlx::query(q(sql.count_outcome))
                .bind(queue)
                .bind(day)
                .bind(one(CallOutcome::Answered))
                .bind(one(CallOutcome::Abandoned))
                .bind(one(CallOutcome::Overflowed))
                .bind(i64::from(within))
                .execute(&mut *tx)
                .await?;
            let row = sqlx::query(q(QUEUE_COUNTS))
                .bind(queue)
                .bind(day)
                .fetch_one(&mut *tx)
                .await?;
            let counts = queue_counts_from_row(&row, 0)?;
            if let Some(request_id) = request_id {
                let result = match outcome {
                    CallOutcome::Answered => counts.answered,
                    CallOutcome::Abandoned => counts.abandoned,
                    CallOutcome::Overflowed => counts.overflowed,
                };
                let answer = serde_json::to_string(&counts).expect("counts serialize");
                remember_answer!(
                    tx, sql, actor, request_id, action, &queue_subject, result, Some(answer)
                );
            }
            counts
        })
    }

    /// The queue's counters of `day`; zero for a day without calls.
    pub async fn queue_daily_counts(
        &self,
        queue: &str,
        day: &str,
    ) -> Result<QueueCounts, StoreError> {
        check_id("queue id", queue)?;
        check_day(day)?;
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let found: Option<String> = sqlx::query_scalar(q(GET_QUEUE_ID))
                .bind(queue)
                .fetch_optional(&mut *tx)
                .await?;
            found.ok_or_else(|| not_found("queue", queue))?;
            let row = sqlx::query(q(QUEUE_COUNTS))
                .bind(queue)
                .bind(day)
                .fetch_optional(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(row.map(|row| queue_counts_from_row(&row, 0)).transpose()?.unwrap_or_default())
        })
    }

    /// Every queue's counters of `day` in one query, by queue id; a queue without a call
    /// that day is left out (its counts are zero).
    pub async fn queue_counts_of_day(
        &self,
        day: &str,
    ) -> Result<BTreeMap<String, QueueCounts>, StoreError> {
        check_day(day)?;
        with_pool!(self, pool => {
            let rows = sqlx::query(q(QUEUE_COUNTS_OF_DAY)).bind(day).fetch_all(pool).await?;
            rows.iter()
                .map(|row| Ok((row.try_get(0)?, queue_counts_from_row(row, 1)?)))
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }

    /// The agent's counters of `day`; zero for a day without calls.
    pub async fn daily_counts(&self, agent: &str, day: &str) -> Result<DailyCounts, StoreError> {
        check_id("agent id", agent)?;
        check_day(day)?;
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let found: Option<String> = sqlx::query_scalar(q(AGENT_EXISTS))
                .bind(agent)
                .fetch_optional(&mut *tx)
                .await?;
            found.ok_or_else(|| not_found("agent", agent))?;
            let row = sqlx::query(q(COUNTS))
                .bind(agent)
                .bind(day)
                .fetch_optional(&mut *tx)
                .await?;
            tx.commit().await?;
            let Some(row) = row else {
                return Ok(DailyCounts::default());
            };
            Ok(DailyCounts {
                calls: u32_column(&row, 0)?,
                sales: u32_column(&row, 1)?,
                missed: u32_column(&row, 2)?,
            })
        })
    }

    /// Asks a node to drain or to take calls again, like [`Store::set_drain`], with the
    /// audit row in the same transaction (an operator's drain through the API is a change
    /// like any other).
    pub async fn set_drain_audited(
        &self,
        node: &NodeId,
        drain: bool,
        actor: &str,
    ) -> Result<NodeState, StoreError> {
        check_actor(actor)?;
        let sql = self.directory_sql();
        let flag = i32::from(drain);
        let state: String = write_tx!(self, tx => {
            sqlx::query(SqlStr::from_static(dialect::SET_DRAIN))
                .bind(flag)
                .bind(flag)
                .bind(flag)
                .bind(node.as_str())
                .execute(&mut *tx)
                .await?;
            let state: Option<String> =
                sqlx::query_scalar(SqlStr::from_static(dialect::NODE_STATE))
                    .bind(node.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
            let state = state.ok_or_else(|| StoreError::UnknownNode(node.clone()))?;
            let action = if drain { "node.drain" } else { "node.undrain" };
            audit(sql, actor, action, &subject("node", node.as_str()), &json!({ "state": state }))
                .execute(&mut *tx)
                .await?;
            state
        })?;
        state.parse().map_err(|reason| StoreError::CorruptRow {
            node: node.to_string(),
            reason,
        })
    }

    /// A number that moves whenever a directory write commits, only then, and in the order
    /// of commits (every write bumps it last in its transaction). Cheap, so readers can
    /// poll it and re-read the directory only when it moved: a read that saw version `v`
    /// and then read the directory has every change up to `v`.
    pub async fn directory_version(&self) -> Result<i64, StoreError> {
        let version: Option<i64> = with_pool!(self, pool => {
            sqlx::query_scalar(q(DIRECTORY_VERSION)).fetch_one(pool).await?
        });
        Ok(version.unwrap_or(0))
    }

    /// Every agent being rung now, by id (one indexed query). The rings move no directory
    /// version (see the module's documentation), so a reader that shows them reads this
    /// on its own, and takes what a later directory read says over an earlier one of these.
    pub async fn ringing_agents(&self) -> Result<BTreeMap<String, Ringing>, StoreError> {
        with_pool!(self, pool => {
            let rows = sqlx::query(q(RINGING_AGENTS)).fetch_all(pool).await?;
            let mut ringing = BTreeMap::new();
            for row in &rows {
                if let Some(ring) = ringing_from_row(row, 1)? {
                    ringing.insert(row.try_get(0)?, ring);
                }
            }
            Ok(ringing)
        })
    }

    /// The database clock, unix ms: what every freshness and day computation is based on.
    pub async fn now_ms(&self) -> Result<i64, StoreError> {
        let sql = self.directory_sql();
        Ok(with_pool!(self, pool => sqlx::query_scalar(q(sql.now_ms)).fetch_one(pool).await?))
    }

    /// Up to `limit` audit rows (capped at 1000), newest first, older than `before_id` when
    /// given: pass the last page's smallest id to get the next page.
    pub async fn list_audit(
        &self,
        limit: u32,
        before_id: Option<i64>,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        if limit == 0 {
            return Err(invalid("limit", "must be at least 1".into()));
        }
        let limit = i64::from(limit.min(MAX_AUDIT_PAGE));
        let before = before_id.unwrap_or(i64::MAX);
        with_pool!(self, pool => {
            let rows = sqlx::query(q(LIST_AUDIT))
                .bind(before)
                .bind(limit)
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(audit_from_row)
                .collect::<Result<_, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }

    /// The whole directory in one consistent read (four queries, whatever its size): every
    /// agent with their state, session and counters of `day` (`YYYY-MM-DD` in the
    /// configured time zone), every queue with its members, and the database clock.
    pub async fn directory_snapshot(&self, day: &str) -> Result<DirectorySnapshot, StoreError> {
        check_day(day)?;
        let sql = self.directory_sql();
        let (now_ms, agents, queues) = with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let now_ms: i64 = sqlx::query_scalar(q(sql.now_ms)).fetch_one(&mut *tx).await?;
            let agent_rows = sqlx::query(q(SNAPSHOT_AGENTS))
                .bind(day)
                .fetch_all(&mut *tx)
                .await?;
            let queue_rows = sqlx::query(q(LIST_QUEUES)).fetch_all(&mut *tx).await?;
            let member_rows = sqlx::query(q(SNAPSHOT_MEMBERS)).fetch_all(&mut *tx).await?;
            tx.commit().await?;
            let agents = agent_rows
                .iter()
                .map(agent_snapshot_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            let mut queues = queue_rows
                .iter()
                .map(|row| {
                    Ok(QueueSnapshot {
                        id: row.try_get(0)?,
                        name: row.try_get(1)?,
                        members: Vec::new(),
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
            // Both lists are ordered by queue id, so members are attached in one pass.
            let mut slot = 0;
            for row in &member_rows {
                let queue: String = row.try_get(0)?;
                while slot < queues.len() && queues[slot].id < queue {
                    slot += 1;
                }
                if let Some(target) = queues.get_mut(slot).filter(|found| found.id == queue) {
                    target.members.push(QueueMember {
                        agent: row.try_get(1)?,
                        priority: i32_column(row, 2)?,
                    });
                }
            }
            (now_ms, agents, queues)
        });
        Ok(DirectorySnapshot {
            now_ms,
            day: day.to_owned(),
            agents,
            queues,
        })
    }
}

/// The per-day counters.
#[derive(Clone, Copy)]
enum Counter {
    Calls,
    Sales,
}

impl Counter {
    /// Its column in `COUNTS`.
    fn column(self) -> usize {
        match self {
            Self::Calls => 0,
            Self::Sales => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Calls => "calls",
            Self::Sales => "sales",
        }
    }

    fn action(self) -> &'static str {
        match self {
            Self::Calls => "agent.record_call",
            Self::Sales => "agent.record_sale",
        }
    }
}

fn q(sql: &'static str) -> SqlStr {
    SqlStr::from_static(sql)
}

/// The audit row of a change, to execute on the change's transaction.
fn audit<DB>(
    sql: &DirectorySql,
    actor: &str,
    action: &'static str,
    subject: &str,
    detail: &serde_json::Value,
) -> sqlx::query::Query<'static, DB, DB::Arguments>
where
    DB: sqlx::Database,
    String: for<'a> sqlx::Encode<'a, DB> + Type<DB>,
{
    sqlx::query(q(sql.insert_audit))
        .bind(actor.to_owned())
        .bind(action.to_owned())
        .bind(subject.to_owned())
        .bind(detail.to_string())
}

/// An audit row from the columns `id, at_ms, actor, action, subject, detail`.
fn audit_from_row<'r, R>(row: &'r R) -> Result<AuditEntry, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    let detail: String = row.try_get(5)?;
    Ok(AuditEntry {
        id: row.try_get(0)?,
        at_ms: row.try_get(1)?,
        actor: row.try_get(2)?,
        action: row.try_get(3)?,
        subject: row.try_get(4)?,
        detail: serde_json::from_str(&detail)
            .map_err(|err| bad_column(5, format!("detail is not JSON: {err}")))?,
    })
}

fn subject(kind: &str, id: &str) -> String {
    format!("{kind}:{id}")
}

fn is_deadlock(err: &StoreError) -> bool {
    // SQLSTATE 40001: InnoDB rolled this transaction back to break a deadlock.
    matches!(err, StoreError::Query(sqlx::Error::Database(db)) if db.code().as_deref() == Some("40001"))
}

fn not_found(kind: &'static str, id: &str) -> StoreError {
    StoreError::NotFound {
        kind,
        id: id.to_owned(),
    }
}

fn invalid(field: &'static str, reason: String) -> StoreError {
    StoreError::Invalid { field, reason }
}

/// `value` as shown in an error: quoted, cut after 40 characters.
fn shown(value: &str) -> String {
    match value.char_indices().nth(40) {
        Some((cut, _)) => format!("`{}…`", &value[..cut]),
        None => format!("`{value}`"),
    }
}

/// An agent, device or queue id: 1–32 ASCII letters, digits, `-`, `_` or `.`.
fn check_id(field: &'static str, value: &str) -> Result<(), StoreError> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty".into()));
    }
    if value.len() > MAX_DIRECTORY_ID_LEN {
        return Err(invalid(
            field,
            format!("{} is longer than 32 characters", shown(value)),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(invalid(
            field,
            format!(
                "{} may only contain ASCII letters, digits, '-', '_' and '.'",
                shown(value)
            ),
        ));
    }
    Ok(())
}

/// A name or reason: not blank, at most `max` characters, no control characters.
fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), StoreError> {
    if value.trim().is_empty() {
        return Err(invalid(field, "must not be empty".into()));
    }
    let chars = value.chars().count();
    if chars > max {
        return Err(invalid(
            field,
            format!("has {chars} characters, at most {max} are allowed"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(
            field,
            format!("{} contains a control character", shown(value)),
        ));
    }
    Ok(())
}

fn check_actor(actor: &str) -> Result<(), StoreError> {
    check_text("actor", actor, MAX_ACTOR_CHARS)
}

fn check_tags(tags: &BTreeSet<String>) -> Result<(), StoreError> {
    if tags.len() > MAX_TAGS {
        return Err(invalid(
            "tags",
            format!("{} tags, at most {MAX_TAGS} are allowed", tags.len()),
        ));
    }
    for tag in tags {
        if !is_tag(tag) {
            return Err(invalid(
                "tags",
                format!(
                    "tag {} must be 1–32 of a-z, 0-9, '-' and '_', starting with a letter or digit",
                    shown(tag)
                ),
            ));
        }
    }
    Ok(())
}

/// 1–32 of `a-z`, `0-9`, `-`, `_`, starting with a letter or digit: an agent's tag, and a
/// caller attribute (which routing matches with tags).
fn is_tag(word: &str) -> bool {
    let bytes = word.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_TAG_LEN
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_'))
}

/// `TECH/resource` as Asterisk's `Dial()` takes it, without the characters that would make
/// it dial something else (`&` rings several devices, `,` starts the options).
fn check_endpoint(endpoint: &str) -> Result<(), StoreError> {
    let reject = |reason: &str| Err(invalid("endpoint", format!("{} {reason}", shown(endpoint))));
    if endpoint.len() > MAX_ENDPOINT_LEN {
        return reject("is longer than 128 characters");
    }
    let Some((tech, resource)) = endpoint.split_once('/') else {
        return reject("must be TECH/resource, such as PJSIP/2001");
    };
    let tech_ok = tech.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && tech.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !tech_ok || resource.is_empty() {
        return reject("must be TECH/resource, such as PJSIP/2001");
    }
    if !endpoint
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b',' | b'&' | b'|'))
    {
        return reject("may not contain spaces, control characters, ',', '&' or '|'");
    }
    Ok(())
}

/// A SIP URI a PBX can send an INVITE to, with nothing that would break the realtime row
/// or the header it ends up in.
fn check_contact(contact: &str) -> Result<(), StoreError> {
    let reject = |reason: &str| Err(invalid("contact", format!("{} {reason}", shown(contact))));
    if contact.len() > 512 {
        return reject("is longer than 512 characters");
    }
    let rest = contact
        .strip_prefix("sip:")
        .or_else(|| contact.strip_prefix("sips:"));
    if rest.is_none_or(|rest| rest.is_empty()) {
        return reject("must be a SIP URI such as sip:2001@10.0.3.12:5060");
    }
    if !contact
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b',' | b'<' | b'>' | b'"'))
    {
        return reject("may not contain spaces, control characters, ',', '<', '>' or '\"'");
    }
    Ok(())
}

/// A digest realm as it goes into a `WWW-Authenticate` header.
fn check_realm(realm: &str) -> Result<(), StoreError> {
    if realm.is_empty()
        || realm.len() > MAX_REALM_LEN
        || !realm
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\' | b':'))
    {
        return Err(invalid(
            "realm",
            format!(
                "{} must be 1–{MAX_REALM_LEN} printable ASCII characters without spaces, '\"', '\\' or ':'",
                shown(realm)
            ),
        ));
    }
    Ok(())
}

/// A request id a client chose to make a retry count once.
fn check_request_id(request_id: &str) -> Result<(), StoreError> {
    if request_id.is_empty()
        || request_id.len() > MAX_REQUEST_ID_LEN
        || !request_id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(invalid(
            "request id",
            format!("must be 1–{MAX_REQUEST_ID_LEN} printable ASCII characters (a UUID fits)"),
        ));
    }
    Ok(())
}

/// A queue's service-level threshold.
fn check_service_level(ms: u32) -> Result<(), StoreError> {
    if ms == 0 || ms > MAX_SERVICE_LEVEL_MS {
        return Err(invalid(
            "service_level_ms",
            format!(
                "{ms} is not between 1 and {MAX_SERVICE_LEVEL_MS} (an hour); send the longest wait in ms that still counts as answered in time, e.g. 20000"
            ),
        ));
    }
    Ok(())
}

/// A request id sent again with another request than the one it was first sent with.
fn request_reused(request_id: &str, action: &str, subject: &str) -> StoreError {
    invalid(
        "request id",
        format!(
            "`{request_id}` was used for {action} of {subject}; send a new id for every new request"
        ),
    )
}

/// A calendar day, `YYYY-MM-DD`.
fn check_day(day: &str) -> Result<(), StoreError> {
    let reject = || {
        Err(invalid(
            "day",
            format!("{} is not a date like 2025-01-31 (YYYY-MM-DD)", shown(day)),
        ))
    };
    let bytes = day.as_bytes();
    if bytes.len() != 10
        || bytes[4] != b'-'
        || bytes[7] != b'-'
        || !bytes
            .iter()
            .enumerate()
            .all(|(i, b)| i == 4 || i == 7 || b.is_ascii_digit())
    {
        return reject();
    }
    let number = |range: std::ops::Range<usize>| day[range].parse::<u32>().unwrap_or(0);
    let (year, month, date) = (number(0..4), number(5..7), number(8..10));
    let leap = year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400));
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return reject(),
    };
    if date == 0 || date > days {
        return reject();
    }
    Ok(())
}

fn bad_column(index: usize, reason: String) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: index.to_string(),
        source: reason.into(),
    }
}

fn queue_from_row<'r, R>(row: &'r R) -> Result<Queue, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(Queue {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        service_level_ms: u32_column(row, 2)?,
    })
}

/// The four counters of a queue from column `first` on.
fn queue_counts_from_row<'r, R>(row: &'r R, first: usize) -> Result<QueueCounts, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(QueueCounts {
        answered: u32_column(row, first)?,
        abandoned: u32_column(row, first + 1)?,
        overflowed: u32_column(row, first + 2)?,
        answered_within_sl: u32_column(row, first + 3)?,
    })
}

fn i32_column<'r, R>(row: &'r R, index: usize) -> Result<i32, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let value: i64 = row.try_get(index)?;
    i32::try_from(value).map_err(|err| bad_column(index, err.to_string()))
}

fn u32_column<'r, R>(row: &'r R, index: usize) -> Result<u32, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    super::u32_column(row, index)
}

fn cap_column<'r, R>(row: &'r R, index: usize) -> Result<Option<u32>, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let value: Option<i64> = row.try_get(index)?;
    value
        .map(|cap| u32::try_from(cap).map_err(|err| bad_column(index, err.to_string())))
        .transpose()
}

fn tags_column<'r, R>(row: &'r R, index: usize) -> Result<BTreeSet<String>, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    let text: String = row.try_get(index)?;
    serde_json::from_str(&text).map_err(|err| bad_column(index, format!("tags: {err}")))
}

/// The state from the columns `state, reason, until_ms` starting at `index`.
fn state_from_row<'r, R>(row: &'r R, index: usize) -> Result<AgentState, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    let state: String = row.try_get(index)?;
    let reason: Option<String> = row.try_get(index + 1)?;
    let until_ms: Option<i64> = row.try_get(index + 2)?;
    match (state.as_str(), reason, until_ms) {
        ("available", _, _) => Ok(AgentState::Available),
        ("paused", reason, _) => Ok(AgentState::Paused {
            reason: reason.unwrap_or_default(),
        }),
        ("on_call", _, _) => Ok(AgentState::OnCall),
        ("wrap_up", _, Some(until_ms)) => Ok(AgentState::WrapUp { until_ms }),
        (other, _, until) => Err(bad_column(
            index,
            format!("state `{other}` (until {until:?}) is not one this version knows"),
        )),
    }
}

/// The ring from the columns `ringing_since_ms, ringing_queue` starting at `index`.
fn ringing_from_row<'r, R>(row: &'r R, index: usize) -> Result<Option<Ringing>, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    let since_ms: Option<i64> = row.try_get(index)?;
    let queue: Option<String> = row.try_get(index + 1)?;
    Ok(since_ms.map(|since_ms| Ringing {
        since_ms,
        queue: queue.unwrap_or_default(),
    }))
}

fn agent_from_row<'r, R>(row: &'r R) -> Result<Agent, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(Agent {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        tags: tags_column(row, 2)?,
        daily_cap: cap_column(row, 3)?,
        enabled: row.try_get::<i64, _>(4)? != 0,
    })
}

fn session_from_row<'r, R>(row: &'r R) -> Result<Session, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(Session {
        agent: row.try_get(0)?,
        device: row.try_get(1)?,
        endpoint: row.try_get(2)?,
        since_ms: row.try_get(3)?,
    })
}

fn agent_snapshot_from_row<'r, R>(row: &'r R) -> Result<AgentSnapshot, sqlx::Error>
where
    R: Row,
    usize: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    let id: String = row.try_get(0)?;
    let device: Option<String> = row.try_get(11)?;
    let session = match device {
        Some(device) => Some(Session {
            agent: id.clone(),
            device,
            endpoint: row.try_get(12)?,
            since_ms: row.try_get(13)?,
        }),
        None => None,
    };
    Ok(AgentSnapshot {
        name: row.try_get(1)?,
        tags: tags_column(row, 2)?,
        daily_cap: cap_column(row, 3)?,
        enabled: row.try_get::<i64, _>(4)? != 0,
        state: state_from_row(row, 5)?,
        idle_since_ms: row.try_get(8)?,
        calls_today: u32_column(row, 9)?,
        sales_today: u32_column(row, 10)?,
        missed_today: u32_column(row, 14)?,
        session,
        ringing: ringing_from_row(row, 15)?,
        state_since_ms: row.try_get(17)?,
        id,
    })
}

mod callers;
mod provisioning;
mod scaler;
pub use callers::{
    CallerEntry, MAX_CALLER_NUMBER_DIGITS, MAX_CALLER_PAGE, check_caller_attributes,
    normalize_caller_number,
};
pub use provisioning::{MAX_CONTACT_BYTES, MAX_CONTACT_ID_LEN, SipDevice, aor_of};
pub use scaler::{MAX_EXTRA_NODES, ScalerSteering};
