//! Leases in Redis: every operation is one Lua script, so one round trip and atomic.
//!
//! Layout: `lk:{resource}` is a hash (holder, attempt, token) that expires validity + guard
//! after the claim or renewal; `fence:{resource}` holds the last token issued and never
//! expires. A new token is `max(last + 1, Redis TIME in µs)`, so tokens keep increasing
//! even when Redis restarts empty and the fence is lost. Numbers are printed with
//! `%.0f` because Lua's numbers are doubles (µs since the epoch fit in their 53 bits).

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{Client, Script};
use tokio::sync::Mutex;

use crate::lease::{Claim, Lease, LockError};

/// Claims the first free candidate, or returns the lease this attempt already holds.
/// KEYS: lk, fence pairs in priority order. ARGV: holder, attempt, expire-ms.
/// Returns {index (1-based), token, holder-if-busy} or {0, "", first holder}.
const CLAIM: &str = r#"
local n = #KEYS / 2
for i = 1, n do
  local cur = redis.call('HMGET', KEYS[2 * i - 1], 'holder', 'attempt', 'token')
  if cur[1] == ARGV[1] and cur[2] == ARGV[2] then
    return {i, cur[3], ''}
  end
end
local busy = ''
for i = 1, n do
  local key = KEYS[2 * i - 1]
  local holder = redis.call('HGET', key, 'holder')
  if not holder then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
    local last = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
    local token = string.format('%.0f', math.max(last + 1, now))
    redis.call('HSET', key, 'holder', ARGV[1], 'attempt', ARGV[2], 'token', token)
    redis.call('PEXPIRE', key, ARGV[3])
    redis.call('SET', KEYS[2 * i], token)
    return {i, token, ''}
  end
  if busy == '' then busy = holder end
end
return {0, '', busy}
"#;

/// KEYS: lk. ARGV: holder, token, expire-ms (renew) or '' (release).
/// Returns 1 done, 0 gone, -1 someone else's.
const RENEW_OR_RELEASE: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'holder', 'token')
if not cur[1] then return 0 end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return -1 end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
"#;

/// The Redis backend.
#[derive(Debug)]
pub struct RedisLocks {
    client: Client,
    connection: Mutex<Option<MultiplexedConnection>>,
    guard: Duration,
    deadline: Duration,
    claim: Script,
    renew_or_release: Script,
}

impl RedisLocks {
    /// A backend for `url` (`redis://host:port/db`); connects on first use. Every call
    /// fails with `Unavailable` after `deadline`; nothing is retried behind the caller.
    pub fn new(url: &str, guard: Duration, deadline: Duration) -> Result<Self, LockError> {
        let client = Client::open(url)
            .map_err(|err| LockError::Invalid(format!("redis url is not valid: {err}")))?;
        Ok(Self {
            client,
            connection: Mutex::new(None),
            guard,
            deadline,
            claim: Script::new(CLAIM),
            renew_or_release: Script::new(RENEW_OR_RELEASE),
        })
    }

    async fn connection(&self) -> Result<MultiplexedConnection, LockError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let connection = tokio::time::timeout(
            self.deadline,
            self.client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| LockError::Unavailable("redis did not accept a connection in time".into()))?
        .map_err(unavailable)?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Runs `script` with a deadline; a failed connection is dropped so the next call
    /// connects afresh.
    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, LockError> {
        let mut connection = self.connection().await?;
        match tokio::time::timeout(self.deadline, invocation.invoke_async(&mut connection)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                *self.connection.lock().await = None;
                Err(unavailable(err))
            }
            Err(_) => {
                *self.connection.lock().await = None;
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
        let mut invocation = self.claim.prepare_invoke();
        for resource in candidates {
            invocation.key(format!("lk:{{{resource}}}"));
            invocation.key(format!("fence:{{{resource}}}"));
        }
        invocation
            .arg(claim.holder)
            .arg(claim.attempt)
            .arg(expire_ms(claim.validity, self.guard));
        let (index, token, busy): (usize, String, String) = self.run(invocation).await?;
        if index == 0 {
            return Ok((None, busy));
        }
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
    ) -> Result<(), LockError> {
        let mut invocation = self.renew_or_release.prepare_invoke();
        invocation
            .key(format!("lk:{{{resource}}}"))
            .arg(holder)
            .arg(token.to_string())
            .arg(validity.map_or(String::new(), |v| expire_ms(v, self.guard).to_string()));
        match self.run::<i64>(invocation).await? {
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

/// holder, attempt, token of an `lk:` hash.
type LeaseFields = (Option<String>, Option<String>, Option<String>);

fn expire_ms(validity: Duration, guard: Duration) -> u64 {
    (validity + guard).as_millis() as u64
}

fn unavailable(err: redis::RedisError) -> LockError {
    LockError::Unavailable(format!("redis: {err}"))
}
