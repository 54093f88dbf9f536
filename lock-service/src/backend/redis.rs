//! Leases in Redis: every operation is one Lua script, so one round trip and atomic.
//!
//! Layout: `lk:{resource}` is a hash (holder, attempt, token) that expires validity + guard
//! after the claim or renewal; `fence:{resource}` holds the last token issued and never
//! expires. A new token is `max(last + 1, Redis TIME in µs)`, so tokens keep increasing
//! even when Redis restarts empty and the fence is lost. Numbers are printed with
//! `%.0f` because Lua's numbers are doubles (µs since the epoch fit in their 53 bits).
//!
//! Connections go to one address (`redis://…`) or to whichever server the sentinels name
//! master at the time (`redis+sentinel://…`, see [`RedisLocks::new`]). Either way every new
//! connection passes the same boot check before a claim goes through it, so a failover,
//! which brings a new run id, starts a quarantine like a restart does.

use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, Script,
};
use tokio::sync::Mutex;

use crate::lease::{Claim, Lease, LockError};

/// Claims the first free candidate, or returns the lease this attempt already holds.
/// KEYS: the boot marker, then lk, fence pairs in priority order. ARGV: holder, attempt,
/// expire-ms. Returns {index (1-based), token, ''}, {0, '', first holder} when all are
/// held, or {-1, '', ''} when the boot marker is gone (Redis lost its data).
const CLAIM: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, '', ''} end
local n = (#KEYS - 1) / 2
for i = 1, n do
  local cur = redis.call('HMGET', KEYS[2 * i], 'holder', 'attempt', 'token')
  if cur[1] == ARGV[1] and cur[2] == ARGV[2] then
    return {i, cur[3], ''}
  end
end
local busy = ''
for i = 1, n do
  local key = KEYS[2 * i]
  local holder = redis.call('HGET', key, 'holder')
  if not holder then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
    local last = tonumber(redis.call('GET', KEYS[2 * i + 1]) or '0')
    local token = string.format('%.0f', math.max(last + 1, now))
    redis.call('HSET', key, 'holder', ARGV[1], 'attempt', ARGV[2], 'token', token)
    redis.call('PEXPIRE', key, ARGV[3])
    redis.call('SET', KEYS[2 * i + 1], token)
    return {i, token, ''}
  end
  if busy == '' then busy = holder end
end
return {0, '', busy}
"#;

/// KEYS: lk. ARGV: holder, token, expire-ms (renew) or '' (release).
/// Returns {1, attempt} done, {0, ''} gone, {-1, ''} someone else's.
const RENEW_OR_RELEASE: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'holder', 'token', 'attempt')
if not cur[1] then return {0, ''} end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return {-1, ''} end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return {1, cur[3]}
"#;

/// The Redis backend.
#[derive(Debug)]
pub struct RedisLocks {
    /// The shared connection (multiplexed: one for all callers). Read on every call, so a
    /// plain read lock; `connector` serialises only the rare reconnects.
    connection: std::sync::RwLock<Option<MultiplexedConnection>>,
    connector: Mutex<Connector>,
    /// Key whose absence means Redis lost its data (restarted empty, flushed).
    marker: String,
    /// The Redis `run_id` seen on our last connection: a new one means Redis restarted.
    run_id: std::sync::Mutex<Option<String>>,
    /// No claims are granted before this.
    quarantined_until: std::sync::Mutex<Option<Instant>>,
    quarantine: Duration,
    guard: Duration,
    deadline: Duration,
    claim: Script,
    renew_or_release: Script,
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
        Ok(Self {
            connection: std::sync::RwLock::new(None),
            connector: Mutex::new(connector),
            marker: "callfleet:locks:boot".to_owned(),
            run_id: std::sync::Mutex::new(None),
            quarantined_until: std::sync::Mutex::new(None),
            quarantine: Duration::from_secs(15),
            guard,
            deadline,
            claim: Script::new(CLAIM),
            renew_or_release: Script::new(RENEW_OR_RELEASE),
        })
    }

    /// How long claims are refused after Redis lost data; longer than any lease that may
    /// have been lost with it (validity + guard).
    pub fn with_quarantine(mut self, quarantine: Duration) -> Self {
        self.quarantine = quarantine;
        self
    }

    /// Uses `key` as the boot marker (tests give each backend its own).
    pub fn with_marker(mut self, key: impl Into<String>) -> Self {
        self.marker = key.into();
        self
    }

    /// What is wrong with the Redis configuration for locks (empty when all is well):
    /// an evicting `maxmemory-policy` silently drops live leases (their keys carry TTLs),
    /// and without persistence a restart loses every lease at once.
    pub async fn configuration_problems(&self) -> Result<Vec<String>, LockError> {
        let mut connection = self.connection().await?;
        let mut problems = Vec::new();
        let query = async {
            let policy: Vec<String> = redis::cmd("CONFIG")
                .arg("GET")
                .arg("maxmemory-policy")
                .query_async(&mut connection)
                .await?;
            let aof: Vec<String> = redis::cmd("CONFIG")
                .arg("GET")
                .arg("appendonly")
                .query_async(&mut connection)
                .await?;
            Ok::<_, redis::RedisError>((policy, aof))
        };
        match tokio::time::timeout(self.deadline, query).await {
            Ok(Ok((policy, aof))) => {
                if policy.get(1).is_none_or(|p| p != "noeviction") {
                    problems.push(format!(
                        "maxmemory-policy is {:?}, not noeviction: Redis may evict live leases; set `maxmemory-policy noeviction`",
                        policy.get(1).map_or("unknown", String::as_str)
                    ));
                }
                if aof.get(1).is_none_or(|a| a != "yes") {
                    problems.push(
                        "appendonly is off: a Redis restart loses every lease; set `appendonly yes`".to_owned(),
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

    /// Whether leases can be granted now: Redis answers and no quarantine runs.
    pub async fn serving(&self) -> bool {
        let Ok(mut connection) = self.connection().await else {
            return false;
        };
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut connection);
        match tokio::time::timeout(self.deadline, ping).await {
            Ok(Ok(_)) => !self.quarantined(),
            _ => {
                self.forget_connection();
                false
            }
        }
    }

    /// Whether claims are refused right now because Redis lost its data.
    pub fn quarantined(&self) -> bool {
        self.quarantined_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|until| Instant::now() < until)
    }

    fn start_quarantine(&self, why: &str) {
        let until = Instant::now() + self.quarantine;
        *self
            .quarantined_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(until);
        tracing::warn!(
            quarantine = ?self.quarantine,
            why,
            "redis may have lost leases; refusing claims until every lost lease has run out"
        );
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
        *self
            .connection
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(connection.clone());
        Ok(connection)
    }

    fn current_connection(&self) -> Option<MultiplexedConnection> {
        self.connection
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn forget_connection(&self) {
        *self
            .connection
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    async fn check_boot(&self, connection: &mut MultiplexedConnection) -> Result<(), LockError> {
        let check = async {
            let info: String = redis::cmd("INFO")
                .arg("server")
                .query_async(connection)
                .await?;
            let created: bool = redis::cmd("SET")
                .arg(&self.marker)
                .arg("1")
                .arg("NX")
                .query_async::<Option<String>>(connection)
                .await?
                .is_some();
            Ok::<_, redis::RedisError>((info, created))
        };
        let (info, marker_was_missing) = tokio::time::timeout(self.deadline, check)
            .await
            .map_err(|_| LockError::Unavailable("redis did not answer the boot check".into()))?
            .map_err(unavailable)?;
        let run_id = info
            .lines()
            .find_map(|line| line.strip_prefix("run_id:"))
            .map(|id| id.trim().to_owned());
        let previous = std::mem::replace(
            &mut *self
                .run_id
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            run_id.clone(),
        );
        if marker_was_missing {
            self.start_quarantine("boot marker missing: redis started empty or was flushed");
        } else if previous.is_some() && previous != run_id {
            self.start_quarantine("redis run_id changed: it restarted and may miss recent writes");
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
        if self.quarantined() {
            return Err(LockError::Unavailable(
                "quarantined: redis lost data recently; claims resume once every lease it may have lost has expired".into(),
            ));
        }
        let mut invocation = self.claim.prepare_invoke();
        invocation.key(&self.marker);
        for resource in candidates {
            invocation.key(format!("lk:{{{resource}}}"));
            invocation.key(format!("fence:{{{resource}}}"));
        }
        invocation
            .arg(claim.holder)
            .arg(claim.attempt)
            .arg(expire_ms(claim.validity, self.guard));
        let (index, token, busy): (i64, String, String) = self.run(connection, invocation).await?;
        if index < 0 {
            self.start_quarantine("boot marker missing: redis lost its data");
            let mut connection = self.connection().await?;
            let mut restore = redis::cmd("SET");
            restore.arg(&self.marker).arg("1").arg("NX");
            let restore = restore.query_async::<Option<String>>(&mut connection);
            tokio::time::timeout(self.deadline, restore)
                .await
                .map_err(|_| {
                    LockError::Unavailable("redis did not answer the boot marker write".into())
                })?
                .map_err(unavailable)?;
            return Err(LockError::Unavailable(
                "quarantined: redis lost its data; claims resume once every lease it may have lost has expired".into(),
            ));
        }
        if index == 0 {
            return Ok((None, busy));
        }
        let index = index as usize;
        let token = token
            .parse()
            .map_err(|_| LockError::Unavailable(format!("redis returned token {token:?}")))?;
        Ok((
            Some(Lease {
                resource: candidates[index - 1].to_owned(),
                holder: claim.holder.to_owned(),
                attempt: claim.attempt.to_owned(),
                token,
                validity: claim.validity,
            }),
            String::new(),
        ))
    }

    pub(super) async fn renew_or_release(
        &self,
        resource: &str,
        holder: &str,
        token: u64,
        validity: Option<Duration>,
    ) -> Result<String, LockError> {
        let mut invocation = self.renew_or_release.prepare_invoke();
        invocation
            .key(format!("lk:{{{resource}}}"))
            .arg(holder)
            .arg(token.to_string())
            .arg(validity.map_or(String::new(), |v| expire_ms(v, self.guard).to_string()));
        let connection = self.connection().await?;
        match self.run::<(i64, String)>(connection, invocation).await? {
            (1, attempt) => Ok(attempt),
            (0, _) => Err(LockError::Gone {
                resource: resource.to_owned(),
            }),
            (_, _) => Err(LockError::NotYours {
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

fn expire_ms(validity: Duration, guard: Duration) -> u64 {
    (validity + guard).as_millis() as u64
}

fn unavailable(err: redis::RedisError) -> LockError {
    LockError::Unavailable(format!("redis: {err}"))
}
