//! Leases in Redis: every operation is one Lua script, so one round trip and atomic.
//!
//! Layout: `lk:{resource}` is a hash (holder, attempt, token, validity) that expires
//! validity + guard after the claim or renewal; `fence:{resource}` holds the last token
//! issued and never expires; `lka:{holder} {attempt}` names the resource a claim got, so a
//! retry finds it whatever its candidate list, and lives as long as the lease. A new token
//! is `max(last + 1, Redis TIME in µs)`, so tokens keep increasing even when Redis restarts
//! empty and the fence is lost. Numbers are printed with `%.0f` because Lua's numbers are
//! doubles (µs since the epoch fit in their 53 bits).
//!
//! The quarantine lives in Redis, in the boot marker (a hash: the run id of the Redis that
//! wrote it, and `until`, no claims before that Redis `TIME`), and the claim script
//! enforces it, so every lock-service instance, restarted or new, obeys it. It starts when
//! the marker is missing (Redis lost its data), when it names another run id (Redis
//! restarted, possibly on a file missing its last writes, or a replica took over), when
//! Redis is younger than the quarantine, and when this process sees the server turn from
//! replica to master. Every new connection and every health tick (500 ms) checks.
//!
//! Connections go to one address (`redis://…`) or to whichever server the sentinels name
//! master at the time (`redis+sentinel://…`, see [`RedisLocks::new`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use callfleet_core::config::{LockServiceConfig, UnsafeLockSwitches};
use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, Script,
};
use tokio::sync::Mutex;

use super::order::{self, Next, OrderStatus, Place};
use crate::lease::{Claim, Lease, LockError};

/// Claims the first free candidate, or returns the lease this attempt already holds.
/// KEYS: the boot marker, the attempt index, then lk, fence pairs in priority order.
/// ARGV: holder, attempt, validity-ms, guard-ms, quarantine-µs, run id, shared quarantine
/// ('1'/'0'), indexed retry ('1'/'0').
/// Returns {1, resource, token}; {0, '', first holder} when all are held; {-1, '', µs left}
/// when the marker was missing (Redis lost its data; the quarantine starts now); {-2, '',
/// µs left} while quarantined.
const CLAIM: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if ARGV[7] == '1' then
  local untl = redis.call('HGET', KEYS[1], 'until')
  if not untl then
    local fresh = now + tonumber(ARGV[5])
    redis.call('HSET', KEYS[1], 'run_id', ARGV[6], 'until', string.format('%.0f', fresh))
    return {-1, '', string.format('%.0f', fresh - now)}
  end
  if tonumber(untl) > now then
    return {-2, '', string.format('%.0f', tonumber(untl) - now)}
  end
elseif redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'run_id', ARGV[6])
  return {-1, '', '0'}
end
local n = (#KEYS - 2) / 2
local expire = tonumber(ARGV[3]) + tonumber(ARGV[4])
if ARGV[8] == '1' then
  local prior = redis.call('GET', KEYS[2])
  if prior then
    local key = 'lk:{' .. prior .. '}'
    local cur = redis.call('HMGET', key, 'holder', 'attempt', 'token')
    if cur[1] == ARGV[1] and cur[2] == ARGV[2] then
      redis.call('HSET', key, 'validity', ARGV[3])
      redis.call('PEXPIRE', key, expire)
      redis.call('PEXPIRE', KEYS[2], expire)
      return {1, prior, cur[3]}
    end
  end
else
  for i = 1, n do
    local key = KEYS[2 * i + 1]
    local cur = redis.call('HMGET', key, 'holder', 'attempt', 'token')
    if cur[1] == ARGV[1] and cur[2] == ARGV[2] then
      return {1, string.sub(key, 5, -2), cur[3]}
    end
  end
end
local busy = ''
for i = 1, n do
  local key = KEYS[2 * i + 1]
  local holder = redis.call('HGET', key, 'holder')
  if not holder then
    local last = tonumber(redis.call('GET', KEYS[2 * i + 2]) or '0')
    local token = string.format('%.0f', math.max(last + 1, now))
    local resource = string.sub(key, 5, -2)
    redis.call('HSET', key, 'holder', ARGV[1], 'attempt', ARGV[2], 'token', token,
      'validity', ARGV[3])
    redis.call('PEXPIRE', key, expire)
    redis.call('SET', KEYS[2 * i + 2], token)
    if ARGV[8] == '1' then
      redis.call('SET', KEYS[2], resource, 'PX', expire)
    end
    return {1, resource, token}
  end
  if busy == '' then busy = holder end
end
return {0, '', busy}
"#;

/// KEYS: lk. ARGV: holder, token, validity-ms ('' keeps the lease's own), guard-ms,
/// max-validity-ms, resource. Returns {1, attempt, validity-ms} renewed, {0, '', ''} gone,
/// {-1, '', ''} someone else's.
const RENEW: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'holder', 'token', 'attempt', 'validity')
if not cur[1] then return {0, '', ''} end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return {-1, '', ''} end
local validity = tonumber(ARGV[3])
if not validity then
  validity = math.min(tonumber(cur[4] or ARGV[5]), tonumber(ARGV[5]))
end
local expire = validity + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'validity', string.format('%.0f', validity))
redis.call('PEXPIRE', KEYS[1], expire)
local index = 'lka:' .. cur[1] .. ' ' .. cur[3]
if redis.call('GET', index) == ARGV[6] then redis.call('PEXPIRE', index, expire) end
return {1, cur[3], string.format('%.0f', validity)}
"#;

/// KEYS: lk. ARGV: holder, token, resource. Returns {1} released, {0} gone, {-1} someone
/// else's.
const RELEASE: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'holder', 'token', 'attempt')
if not cur[1] then return 0 end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return -1 end
redis.call('DEL', KEYS[1])
local index = 'lka:' .. cur[1] .. ' ' .. cur[3]
if redis.call('GET', index) == ARGV[3] then redis.call('DEL', index) end
return 1
"#;

/// The boot check, on every new connection and health tick. KEYS: the boot marker.
/// ARGV: run id, uptime-s, quarantine-µs, '1' when this process saw the server turn from
/// replica to master. Returns {why the quarantine was started or moved ('' if not),
/// µs of quarantine left}.
const BOOT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local q = tonumber(ARGV[3])
local cur = redis.call('HMGET', KEYS[1], 'run_id', 'until')
local untl = tonumber(cur[2] or '0') or 0
local why = ''
if not cur[2] then
  why = 'the boot marker is missing: redis started empty or was flushed'
elseif cur[1] ~= ARGV[1] then
  why = 'redis run_id changed: it restarted (perhaps missing its last writes) or a replica took over'
elseif ARGV[4] == '1' then
  why = 'redis turned from replica to master'
end
if why ~= '' then untl = math.max(untl, now + q) end
local young = now - tonumber(ARGV[2]) * 1000000 + q
if young > untl then
  untl = young
  if why == '' then why = 'redis started less than a quarantine ago' end
end
if why ~= '' then
  redis.call('HSET', KEYS[1], 'run_id', ARGV[1], 'until', string.format('%.0f', untl))
end
return {why, string.format('%.0f', math.max(untl - now, 0))}
"#;

/// What this process last saw of the server.
#[derive(Debug, Default)]
struct Seen {
    run_id: Option<String>,
    replica: bool,
}

/// The Redis backend.
#[derive(Debug)]
pub struct RedisLocks {
    /// A connection per thread that calls (each multiplexed: one for all of that thread's
    /// callers). A connection's reader and writer run as a task of the runtime that made
    /// it, so a call on a connection thread (see `callfleet_core::connection_threads`)
    /// that went through another thread's connection crossed threads twice, a wake each
    /// way: the Redis backend then spent 25.5 µs of CPU per gRPC call against 22.6 µs on
    /// the work-stealing runtime. Read on every call, so a plain read lock; `connector`
    /// serialises only the rare connects.
    connections: std::sync::RwLock<HashMap<std::thread::ThreadId, MultiplexedConnection>>,
    connector: Mutex<Connector>,
    /// Key of the boot marker (see the module's documentation).
    marker: String,
    seen: std::sync::Mutex<Seen>,
    /// The end of the quarantine as this process last learnt it from Redis (health only:
    /// the claim script decides), or, with `local_quarantine` switched on for a test, the
    /// only quarantine there is.
    quarantined_until: std::sync::Mutex<Option<Instant>>,
    quarantine: Duration,
    guard: Duration,
    deadline: Duration,
    max_validity: Duration,
    switches: UnsafeLockSwitches,
    claim: Script,
    renew: Script,
    release: Script,
    boot: Script,
    join: Script,
    touch: Script,
    leave: Script,
    requeue: Script,
    order_status: Script,
    /// ClaimNext: the order's check around [`CLAIM`] itself.
    claim_next: Script,
    /// [`order::MAX_WAITERS`], smaller in tests.
    max_waiters: usize,
}

impl RedisLocks {
    /// A backend for `url`; connects on first use. Every call fails with `Unavailable`
    /// after `deadline`; nothing is retried behind the caller.
    ///
    /// `url` is `redis://[user:password@]host:port/db`, or, to follow failovers,
    /// `redis+sentinel://[user:password@]host[:port][,host[:port]…]/master[/db][?sentinel_username=…&sentinel_password=…]`:
    /// the sentinels (port 26379 when none is given) are asked for the current master of
    /// `master` on every (re)connect. `user:password` authenticate to the master, as in a
    /// plain URL; the sentinels get credentials only from `sentinel_username` and
    /// `sentinel_password`.
    pub fn new(url: &str, guard: Duration, deadline: Duration) -> Result<Self, LockError> {
        let connector = Connector::parse(url).map_err(LockError::Invalid)?;
        let defaults = LockServiceConfig::default();
        Ok(Self {
            connections: std::sync::RwLock::default(),
            connector: Mutex::new(connector),
            // A hash since the quarantine moved into it; the string marker of earlier
            // versions (`callfleet:locks:boot`) is left alone, so an upgrade quarantines once.
            marker: "callfleet:locks:marker".to_owned(),
            seen: std::sync::Mutex::default(),
            quarantined_until: std::sync::Mutex::new(None),
            quarantine: defaults.quarantine,
            guard,
            deadline,
            max_validity: defaults.max_validity,
            switches: UnsafeLockSwitches::default(),
            claim: Script::new(CLAIM),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
            boot: Script::new(BOOT),
            join: Script::new(&order::script(order::JOIN)),
            touch: Script::new(&order::script(order::TOUCH)),
            leave: Script::new(&order::script(order::LEAVE)),
            requeue: Script::new(&order::script(order::REQUEUE)),
            order_status: Script::new(&order::script(order::STATUS)),
            claim_next: Script::new(&order::claim_next_script(CLAIM)),
            max_waiters: order::MAX_WAITERS,
        })
    }

    /// How long claims are refused after Redis lost data; longer than any lease that may
    /// have been lost with it (max validity + guard).
    pub fn with_quarantine(mut self, quarantine: Duration) -> Self {
        self.quarantine = quarantine;
        self
    }

    /// The longest validity a claim or renewal may ask for.
    pub fn with_max_validity(mut self, max_validity: Duration) -> Self {
        self.max_validity = max_validity;
        self
    }

    /// The protections a test switched off.
    pub fn with_unsafe_switches(mut self, switches: UnsafeLockSwitches) -> Self {
        self.switches = switches;
        self
    }

    /// Uses `key` as the boot marker (tests give each backend its own).
    pub fn with_marker(mut self, key: impl Into<String>) -> Self {
        self.marker = key.into();
        self
    }

    /// A smaller bound on waiters per queue, for tests.
    #[cfg(test)]
    pub(super) fn with_max_waiters(mut self, max: usize) -> Self {
        self.max_waiters = max;
        self
    }

    pub(super) fn max_validity(&self) -> Duration {
        self.max_validity
    }

    /// What is wrong with the Redis configuration for locks (empty when all is well):
    /// an evicting `maxmemory-policy` silently drops live leases (their keys carry TTLs),
    /// without persistence a restart loses every lease at once, and behind sentinels a
    /// master that accepts writes with no replica in reach loses them at the failover.
    pub async fn configuration_problems(&self) -> Result<Vec<String>, LockError> {
        let mut connection = self.connection().await?;
        let sentinel = matches!(*self.connector.lock().await, Connector::Sentinel { .. });
        let mut problems = Vec::new();
        let query = async {
            let mut values = Vec::new();
            for name in ["maxmemory-policy", "appendonly", "min-replicas-to-write"] {
                let pair: Vec<String> = redis::cmd("CONFIG")
                    .arg("GET")
                    .arg(name)
                    .query_async(&mut connection)
                    .await?;
                values.push(pair.get(1).cloned());
            }
            Ok::<_, redis::RedisError>(values)
        };
        match tokio::time::timeout(self.deadline, query).await {
            Ok(Ok(values)) => {
                let policy = values[0].as_deref();
                if policy != Some("noeviction") {
                    problems.push(format!(
                        "maxmemory-policy is {:?}, not noeviction: Redis may evict live leases; set `maxmemory-policy noeviction`",
                        policy.unwrap_or("unknown")
                    ));
                }
                if values[1].as_deref() != Some("yes") {
                    problems.push(
                        "appendonly is off: a Redis restart loses every lease; set `appendonly yes`".to_owned(),
                    );
                }
                if sentinel && values[2].as_deref().is_none_or(|n| n == "0") {
                    problems.push(
                        "min-replicas-to-write is 0: a master cut off from its replicas keeps granting leases that the failover then loses; set `min-replicas-to-write 1` and `min-replicas-max-lag 1` on every Redis behind the sentinels".to_owned(),
                    );
                }
            }
            Ok(Err(err)) => problems.push(format!(
                "cannot read the Redis configuration ({err}); check maxmemory-policy noeviction and appendonly yes by hand"
            )),
            Err(_) => return Err(LockError::Unavailable("redis did not answer CONFIG GET".into())),
        }
        Ok(problems)
    }

    /// Whether leases can be granted now: Redis answers as a master and no quarantine
    /// runs. Runs the boot check, so a restart or failover is seen within one health tick
    /// even by a process whose connection survived it.
    pub async fn serving(&self) -> bool {
        let Ok(mut connection) = self.connection().await else {
            return false;
        };
        match self.check_boot(&mut connection).await {
            Ok(()) => !self.quarantined(),
            Err(_) => {
                self.forget_connection();
                false
            }
        }
    }

    /// Whether claims are refused right now because Redis lost its data, as far as this
    /// process knows.
    pub fn quarantined(&self) -> bool {
        self.quarantined_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|until| Instant::now() < until)
    }

    /// Records that claims are refused for `left` from now.
    fn note_quarantine(&self, left: Duration, why: &str) {
        let until = Instant::now().checked_add(left);
        let previous = std::mem::replace(
            &mut *self
                .quarantined_until
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            until,
        );
        let was_running = previous.is_some_and(|p| Instant::now() < p);
        // A young Redis moves the end a little on every tick (its uptime counts whole
        // seconds); that is not news while the quarantine runs.
        let routine = was_running && why.starts_with("redis started less");
        if !why.is_empty() && !routine {
            tracing::warn!(
                left = ?left,
                why,
                "redis may have lost leases; refusing claims until every lost lease has run out"
            );
        }
    }

    async fn connection(&self) -> Result<MultiplexedConnection, LockError> {
        if let Some(connection) = self.current_connection() {
            return Ok(connection);
        }
        let mut connector = self.connector.lock().await;
        if let Some(connection) = self.current_connection() {
            return Ok(connection);
        }
        let mut connection = tokio::time::timeout(self.deadline, connector.connect())
            .await
            .map_err(|_| {
                LockError::Unavailable("redis did not accept a connection in time".into())
            })??;
        // A restart always drops our connection, so every new one checks, before any
        // claim goes through it, whether this is still the Redis that granted our leases.
        self.check_boot(&mut connection).await?;
        self.connections
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(std::thread::current().id(), connection.clone());
        Ok(connection)
    }

    /// This thread's connection.
    fn current_connection(&self) -> Option<MultiplexedConnection> {
        self.connections
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&std::thread::current().id())
            .cloned()
    }

    /// Drops every thread's connection, so each connects afresh, with the boot check: what
    /// failed on one (a restart, a failover, a Redis that stopped answering) is most often
    /// what the others will meet next.
    fn forget_connection(&self) {
        self.connections
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    async fn check_boot(&self, connection: &mut MultiplexedConnection) -> Result<(), LockError> {
        let mut command = redis::cmd("INFO");
        command.arg("server").arg("replication");
        let info = tokio::time::timeout(self.deadline, command.query_async::<String>(connection))
            .await
            .map_err(|_| LockError::Unavailable("redis did not answer the boot check".into()))?
            .map_err(unavailable)?;
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(|value| value.trim().to_owned())
        };
        let run_id = field("run_id").unwrap_or_default();
        let uptime: u64 = field("uptime_in_seconds")
            .and_then(|u| u.parse().ok())
            .unwrap_or(0);
        let replica = field("role").is_some_and(|role| role != "master");
        let (previous_run_id, promoted) = {
            let mut seen = self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let promoted = seen.replica && !replica;
            seen.replica = replica;
            (seen.run_id.replace(run_id.clone()), promoted)
        };
        if replica {
            return Err(LockError::Unavailable(
                "redis is a replica now: claims wait for the master".into(),
            ));
        }
        if self.switches.local_quarantine {
            return self
                .check_boot_locally(connection, previous_run_id, &run_id)
                .await;
        }
        let mut invocation = self.boot.prepare_invoke();
        invocation
            .key(&self.marker)
            .arg(&run_id)
            .arg(uptime)
            .arg(micros(self.quarantine))
            .arg(if promoted { "1" } else { "0" });
        let (why, left): (String, String) =
            tokio::time::timeout(self.deadline, invocation.invoke_async(connection))
                .await
                .map_err(|_| LockError::Unavailable("redis did not answer the boot check".into()))?
                .map_err(unavailable)?;
        self.note_quarantine(from_micros(&left), &why);
        Ok(())
    }

    /// The boot check as it was before the quarantine lived in Redis (a test switch): the
    /// process compares the run id with the one it saw itself and writes the marker back.
    async fn check_boot_locally(
        &self,
        connection: &mut MultiplexedConnection,
        previous_run_id: Option<String>,
        run_id: &str,
    ) -> Result<(), LockError> {
        let mut command = redis::cmd("HSETNX");
        command.arg(&self.marker).arg("run_id").arg(run_id);
        let created = tokio::time::timeout(self.deadline, command.query_async::<bool>(connection))
            .await
            .map_err(|_| LockError::Unavailable("redis did not answer the boot check".into()))?
            .map_err(unavailable)?;
        if created {
            self.note_quarantine(self.quarantine, "boot marker missing (local quarantine)");
        } else if previous_run_id.is_some_and(|previous| previous != run_id) {
            self.note_quarantine(self.quarantine, "redis run_id changed (local quarantine)");
        }
        Ok(())
    }

    /// Runs `script` on `connection` with a deadline; a failed connection is dropped so the
    /// next call connects afresh.
    async fn run<T: redis::FromRedisValue>(
        &self,
        mut connection: MultiplexedConnection,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, LockError> {
        match tokio::time::timeout(self.deadline, invocation.invoke_async(&mut connection)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                self.forget_connection();
                Err(unavailable(err))
            }
            Err(_) => {
                self.forget_connection();
                Err(LockError::Unavailable(format!(
                    "redis did not answer within {:?}",
                    self.deadline
                )))
            }
        }
    }

    pub(super) async fn claim_first(
        &self,
        candidates: &[&str],
        claim: &Claim<'_>,
    ) -> Result<(Option<Lease>, String), LockError> {
        // Connecting runs the boot check, which may start a quarantine: connect first.
        let connection = self.connection().await?;
        let mut invocation = self.claim.prepare_invoke();
        self.claim_invocation(&mut invocation, candidates, claim)?;
        let (status, resource, detail): (i64, String, String) =
            self.run(connection, invocation).await?;
        self.claimed(status, resource, detail, claim)
    }

    /// Adds ClaimFirst's keys and arguments to `invocation` (after any of the caller's own).
    fn claim_invocation(
        &self,
        invocation: &mut redis::ScriptInvocation<'_>,
        candidates: &[&str],
        claim: &Claim<'_>,
    ) -> Result<(), LockError> {
        if self.switches.local_quarantine && self.quarantined() {
            return Err(quarantined(None));
        }
        let run_id = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .run_id
            .clone()
            .unwrap_or_default();
        invocation
            .key(&self.marker)
            .key(format!("lka:{} {}", claim.holder, claim.attempt));
        for resource in candidates {
            invocation.key(format!("lk:{{{resource}}}"));
            invocation.key(format!("fence:{{{resource}}}"));
        }
        invocation
            .arg(claim.holder)
            .arg(claim.attempt)
            .arg(millis(claim.validity))
            .arg(millis(self.guard))
            .arg(micros(self.quarantine))
            .arg(run_id)
            .arg(if self.switches.local_quarantine {
                "0"
            } else {
                "1"
            })
            .arg(if self.switches.naive_retry { "0" } else { "1" });
        Ok(())
    }

    /// What ClaimFirst's script answered: the lease, or `None` and the first holder.
    fn claimed(
        &self,
        status: i64,
        resource: String,
        detail: String,
        claim: &Claim<'_>,
    ) -> Result<(Option<Lease>, String), LockError> {
        match status {
            1 => {
                let token = detail.parse().map_err(|_| {
                    LockError::Unavailable(format!("redis returned token {detail:?}"))
                })?;
                Ok((
                    Some(Lease {
                        resource,
                        holder: claim.holder.to_owned(),
                        attempt: claim.attempt.to_owned(),
                        token,
                        validity: claim.validity,
                    }),
                    String::new(),
                ))
            }
            0 => Ok((None, detail)),
            -1 => {
                let left = if self.switches.local_quarantine {
                    self.quarantine
                } else {
                    from_micros(&detail)
                };
                self.note_quarantine(left, "boot marker missing: redis lost its data");
                Err(quarantined(Some(left)))
            }
            _ => {
                let left = from_micros(&detail);
                self.note_quarantine(left, "");
                Err(quarantined(Some(left)))
            }
        }
    }

    /// An order script's invocation with the queue's keys and `waiter` first.
    fn order_invocation<'s>(
        script: &'s Script,
        queue: &str,
        waiter: &str,
    ) -> redis::ScriptInvocation<'s> {
        let mut invocation = script.prepare_invoke();
        for key in order::keys(queue) {
            invocation.key(key);
        }
        invocation.arg(waiter);
        invocation
    }

    /// A place the order's scripts answered ({position, µs}; -1: not waiting).
    fn place((position, at): (i64, String), queue: &str, waiter: &str) -> Result<Place, LockError> {
        let position = u64::try_from(position).map_err(|_| order::not_waiting(queue, waiter))?;
        let enqueued_at_us = at
            .parse()
            .map_err(|_| LockError::Unavailable(format!("redis returned enqueue time {at:?}")))?;
        Ok(Place {
            position,
            enqueued_at_us,
        })
    }

    pub(super) async fn join(
        &self,
        queue: &str,
        waiter: &str,
        band: u32,
        ttl: Duration,
    ) -> Result<Place, LockError> {
        let mut invocation = Self::order_invocation(&self.join, queue, waiter);
        invocation.arg(band).arg(millis(ttl)).arg(self.max_waiters);
        let connection = self.connection().await?;
        let answer: (i64, String) = self.run(connection, invocation).await?;
        if answer.0 < 0 {
            return Err(LockError::QueueFull {
                queue: queue.to_owned(),
            });
        }
        Self::place(answer, queue, waiter)
    }

    pub(super) async fn touch(
        &self,
        queue: &str,
        waiter: &str,
        ttl: Option<Duration>,
    ) -> Result<Place, LockError> {
        let mut invocation = Self::order_invocation(&self.touch, queue, waiter);
        invocation.arg(ttl.map_or(String::new(), |ttl| millis(ttl).to_string()));
        let connection = self.connection().await?;
        Self::place(self.run(connection, invocation).await?, queue, waiter)
    }

    pub(super) async fn leave(&self, queue: &str, waiter: &str) -> Result<bool, LockError> {
        let invocation = Self::order_invocation(&self.leave, queue, waiter);
        let connection = self.connection().await?;
        Ok(self.run::<i64>(connection, invocation).await? == 1)
    }

    pub(super) async fn requeue(&self, queue: &str, waiter: &str) -> Result<Place, LockError> {
        let invocation = Self::order_invocation(&self.requeue, queue, waiter);
        let connection = self.connection().await?;
        Self::place(self.run(connection, invocation).await?, queue, waiter)
    }

    pub(super) async fn order_status(&self, queue: &str) -> Result<OrderStatus, LockError> {
        let mut invocation = self.order_status.prepare_invoke();
        for key in order::keys(queue) {
            invocation.key(key);
        }
        let connection = self.connection().await?;
        let (waiting, ringing, age): (u64, u64, String) = self.run(connection, invocation).await?;
        Ok(OrderStatus {
            waiting,
            ringing,
            // '' when nobody waits.
            oldest_wait_us: age.parse().unwrap_or(0),
        })
    }

    pub(super) async fn claim_next(
        &self,
        queue: &str,
        waiter: &str,
        candidates: &[&str],
        claim: &Claim<'_>,
    ) -> Result<Next, LockError> {
        let connection = self.connection().await?;
        let mut invocation = self.claim_next.prepare_invoke();
        for key in order::keys(queue) {
            invocation.key(key);
        }
        self.claim_invocation(&mut invocation, candidates, claim)?;
        invocation.arg(waiter);
        let (status, resource, detail): (i64, String, String) =
            self.run(connection, invocation).await?;
        match status {
            -3 => Err(order::not_waiting(queue, waiter)),
            -4 => Ok(Next::NotFirst {
                position: detail.parse().map_err(|_| {
                    LockError::Unavailable(format!("redis returned position {detail:?}"))
                })?,
            }),
            _ => match self.claimed(status, resource, detail, claim)? {
                (Some(lease), _) => Ok(Next::Granted(lease)),
                (None, _) => Ok(Next::Busy),
            },
        }
    }

    pub(super) async fn renew(
        &self,
        resource: &str,
        holder: &str,
        token: u64,
        validity: Option<Duration>,
    ) -> Result<Lease, LockError> {
        let mut invocation = self.renew.prepare_invoke();
        invocation
            .key(format!("lk:{{{resource}}}"))
            .arg(holder)
            .arg(token.to_string())
            .arg(validity.map_or(String::new(), |v| millis(v).to_string()))
            .arg(millis(self.guard))
            .arg(millis(self.max_validity))
            .arg(resource);
        let connection = self.connection().await?;
        match self
            .run::<(i64, String, String)>(connection, invocation)
            .await?
        {
            (1, attempt, validity_ms) => Ok(Lease {
                resource: resource.to_owned(),
                holder: holder.to_owned(),
                attempt,
                token,
                validity: Duration::from_millis(validity_ms.parse().unwrap_or(0)),
            }),
            (0, _, _) => Err(LockError::Gone {
                resource: resource.to_owned(),
            }),
            _ => Err(LockError::NotYours {
                resource: resource.to_owned(),
            }),
        }
    }

    pub(super) async fn release(
        &self,
        resource: &str,
        holder: &str,
        token: u64,
    ) -> Result<(), LockError> {
        let mut invocation = self.release.prepare_invoke();
        invocation
            .key(format!("lk:{{{resource}}}"))
            .arg(holder)
            .arg(token.to_string())
            .arg(resource);
        let connection = self.connection().await?;
        match self.run::<i64>(connection, invocation).await? {
            1 => Ok(()),
            0 => Err(LockError::Gone {
                resource: resource.to_owned(),
            }),
            _ => Err(LockError::NotYours {
                resource: resource.to_owned(),
            }),
        }
    }

    pub(super) async fn get(&self, resource: &str) -> Result<Option<Lease>, LockError> {
        let mut connection = self.connection().await?;
        let key = format!("lk:{{{resource}}}");
        let query = redis::pipe()
            .cmd("HMGET")
            .arg(&key)
            .arg("holder")
            .arg("attempt")
            .arg("token")
            .cmd("PTTL")
            .arg(&key)
            .to_owned();
        let result: (LeaseFields, i64) =
            match tokio::time::timeout(self.deadline, query.query_async(&mut connection)).await {
                Ok(Ok(value)) => value,
                Ok(Err(err)) => return Err(unavailable(err)),
                Err(_) => return Err(LockError::Unavailable("redis did not answer".into())),
            };
        let ((holder, attempt, token), ttl_ms) = result;
        let (Some(holder), Some(attempt), Some(token)) = (holder, attempt, token) else {
            return Ok(None);
        };
        // What is left of the validity: the key lives `guard` longer than the lease.
        let left =
            Duration::from_millis(u64::try_from(ttl_ms).unwrap_or(0)).saturating_sub(self.guard);
        Ok(Some(Lease {
            resource: resource.to_owned(),
            holder,
            attempt,
            token: token.parse().unwrap_or(0),
            validity: left,
        }))
    }
}

/// The refusal while a quarantine runs, saying when it ends when known.
fn quarantined(left: Option<Duration>) -> LockError {
    let when = left.map_or_else(String::new, |left| {
        format!("; claims resume in {} ms", left.as_millis())
    });
    LockError::Unavailable(format!(
        "quarantined: redis lost data recently and leases it may have lost could still be in use{when}"
    ))
}

/// How a new connection is made: straight to one address, or to the master the sentinels
/// name at the time.
enum Connector {
    /// `redis://…`.
    Direct(Client),
    /// `redis+sentinel://…`.
    Sentinel {
        client: Box<SentinelClient>,
        /// The master's name and the sentinels' addresses (no secrets), for logs.
        master: String,
        sentinels: Vec<String>,
    },
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Direct(client) => f.debug_tuple("Direct").field(client).finish(),
            Self::Sentinel {
                master, sentinels, ..
            } => f
                .debug_struct("Sentinel")
                .field("master", master)
                .field("sentinels", sentinels)
                .finish_non_exhaustive(),
        }
    }
}

/// The scheme of a sentinel URL.
const SENTINEL_SCHEME: &str = "redis+sentinel://";
/// What a sentinel URL looks like, for error messages.
const SENTINEL_FORM: &str = "redis+sentinel://[user:password@]host[:port][,host[:port]…]/master[/db][?sentinel_username=…&sentinel_password=…]";

impl Connector {
    /// Reads `url`; the error says what is wrong with it (never the password).
    fn parse(url: &str) -> Result<Self, String> {
        if url.starts_with(SENTINEL_SCHEME) {
            return Self::parse_sentinel(url).map_err(|why| {
                format!("redis sentinel url is not valid: {why}; expected {SENTINEL_FORM}")
            });
        }
        Client::open(url)
            .map(Self::Direct)
            .map_err(|err| format!("redis url is not valid: {err}"))
    }

    fn parse_sentinel(url: &str) -> Result<Self, String> {
        let rest = &url[SENTINEL_SCHEME.len()..];
        if rest.contains('#') {
            return Err("it has a fragment (`#…`)".into());
        }
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        if hosts.is_empty() {
            return Err("it names no sentinel".into());
        }
        let mut addresses = Vec::new();
        for host in hosts.split(',') {
            addresses.push(sentinel_address(host)?);
        }
        let mut segments = path.split('/');
        let master = segments.next().unwrap_or_default();
        if master.is_empty() {
            return Err(
                "it names no master: add the name the sentinels monitor it under, e.g. `/mymaster`"
                    .into(),
            );
        }
        let db = match segments.next() {
            None | Some("") => 0,
            Some(db) => db
                .parse::<i64>()
                .ok()
                .filter(|db| *db >= 0)
                .ok_or_else(|| format!("database `{db}` after the master name is not a number"))?,
        };
        if let Some(extra) = segments.find(|segment| !segment.is_empty()) {
            return Err(format!("`{extra}` follows /master/db; nothing may"));
        }
        let mut sentinel_auth = RedisConnectionInfo::default();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            sentinel_auth = match key.as_ref() {
                "sentinel_username" => sentinel_auth.set_username(value),
                "sentinel_password" => sentinel_auth.set_password(value),
                other => {
                    return Err(format!(
                        "unknown parameter `{other}` (known: sentinel_username, sentinel_password)"
                    ));
                }
            };
        }
        // The master's credentials and database, decoded as a plain URL's would be.
        let master_auth = match userinfo {
            Some(userinfo) => format!("redis://{userinfo}@localhost/{db}")
                .into_connection_info()
                .map_err(|_| "the user:password before `@` is not valid".to_owned())?
                .redis_settings()
                .clone(),
            None => RedisConnectionInfo::default().set_db(db),
        };
        let sentinels: Vec<String> = addresses
            .iter()
            .map(|(host, port)| format!("{host}:{port}"))
            .collect();
        let infos = addresses
            .into_iter()
            .map(|(host, port)| {
                ConnectionAddr::Tcp(host, port)
                    .into_connection_info()
                    .map(|info| info.set_redis_settings(sentinel_auth.clone()))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| err.to_string())?;
        let client = SentinelClient::build(
            infos,
            master.to_owned(),
            Some(SentinelNodeConnectionInfo::default().set_redis_connection_info(master_auth)),
            SentinelServerType::Master,
        )
        .map_err(|err| err.to_string())?;
        Ok(Self::Sentinel {
            client: Box::new(client),
            master: master.to_owned(),
            sentinels,
        })
    }

    /// A new connection to the Redis that takes writes now.
    async fn connect(&mut self) -> Result<MultiplexedConnection, LockError> {
        // Every command is already bounded by the service's own deadline; the client's
        // default 500 ms response timeout would cut calls short of a longer configured
        // deadline, and costs a second timer per call.
        let config = AsyncConnectionConfig::new().set_response_timeout(None);
        match self {
            Self::Direct(client) => client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(unavailable),
            Self::Sentinel {
                client,
                master,
                sentinels,
            } => client
                .get_async_connection_with_config(&config)
                .await
                .map_err(|err| {
                    LockError::Unavailable(format!(
                        "redis: no connection to master {master:?} through sentinels {}: {err}",
                        sentinels.join(",")
                    ))
                }),
        }
    }
}

/// `host[:port]` or `[ipv6][:port]` of one sentinel; the port defaults to 26379.
fn sentinel_address(text: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(bracketed) = text.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("sentinel `{text}` opens `[` without closing it"))?;
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(format!("sentinel `{text}`: expected `:port` after `]`")),
            },
        }
    } else {
        match text.split_once(':') {
            Some((_, port)) if port.contains(':') => {
                return Err(format!(
                    "sentinel `{text}`: write an IPv6 address in brackets, e.g. [::1]:26379"
                ));
            }
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if host.is_empty() {
        return Err(format!(
            "sentinel `{text}` has no host (two commas in a row?)"
        ));
    }
    let port = match port {
        None => 26379,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| format!("sentinel `{text}` has port `{port}`, not a number 1–65535"))?,
    };
    Ok((host.to_owned(), port))
}

/// holder, attempt, token of an `lk:` hash.
type LeaseFields = (Option<String>, Option<String>, Option<String>);

/// Whole milliseconds; durations are bounded by validation (at most hours), so this never
/// saturates in practice, and if it did it would not wrap.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// A count of µs Redis printed; an unreadable one counts as none.
fn from_micros(text: &str) -> Duration {
    Duration::from_micros(text.parse().unwrap_or(0))
}

fn unavailable(err: redis::RedisError) -> LockError {
    LockError::Unavailable(format!("redis: {err}"))
}
