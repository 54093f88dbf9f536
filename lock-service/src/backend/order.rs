//! The waiting order of a queue across all nodes, beside the leases it must agree with.
//!
//! A caller waits on whichever node its call landed; the order decides which caller gets
//! the next free agent, whichever node either is on. Entries are ordered by band (lower
//! first: 0 = VIP, 1 = normal), then by enqueue time from the backend's clock, then by
//! waiter id. `ClaimNext` grants a lease only to a waiter that no live, non-ringing entry
//! precedes, and checks that and claims in one atomic step (one Lua script on Redis, one
//! critical section in memory), so two nodes can never both decide they are first.
//!
//! An entry lives `ttl` after its last Join, Touch or ClaimNext: the waiter's node keeps
//! it alive, so the callers of a node that died leave the order within one TTL instead of
//! blocking everyone behind them. Expired entries are ignored and purged lazily. A granted
//! entry turns `ringing` and no longer blocks later waiters; `Requeue` (the ring failed)
//! puts it back in force at its original place; `Leave` removes it at once.
//!
//! A position is 1 + the live entries ahead that are not ringing: how many callers will be
//! offered an agent before this one.
//!
//! ClaimNext checks the order before ClaimFirst's retry rule, so a ClaimNext retried after
//! its reply was lost gets its lease again only while no live, non-ringing entry got ahead
//! of it meanwhile (a VIP who joined in between); otherwise it answers `not_first` and the
//! lease runs out unused after validity + guard: the agent waits, nobody is rung twice.
//!
//! # Redis layout
//! - `wq:{queue}`: a sorted set whose members all have score 0 and are ordered by their
//!   bytes (`ZRANK`, `ZRANGEBYLEX`): `"<band> <µs> <waiter>"` with the band one digit and
//!   the enqueue time 17 zero-padded digits (Redis `TIME`'s seconds padded to 11 digits,
//!   then its µs to 6). Byte order is then exactly (band, µs, waiter id). The member is
//!   built from `TIME`'s strings, so no float is involved: a score of `band * 2^52 + µs`
//!   would round once µs outgrow the 53-bit mantissa, and a score per band would still
//!   leave ties at the same µs to member order. Rank is O(log n).
//! - `wqh:{queue}`: hash waiter → `"<ttl-ms> <member>"`, so Join finds an entry (and keeps
//!   its time) and Leave removes it.
//! - `wqx:{queue}`: sorted set waiter → expiry in µs (a float score, exact to the µs until
//!   2255; it only decides expiry). Every script first purges the entries whose expiry has
//!   passed, so the order holds live entries only and purging costs O(expired).
//! - `wqr:{queue}`: set of the ringing waiters (as many as agents being rung at most).
//!
//! All four keys expire with the queue's last entry, so a queue whose nodes all died
//! leaves nothing behind.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::lease::{Lease, LockError};

/// The most waiters one queue holds (expired ones not counted).
pub const MAX_WAITERS: usize = 100_000;
/// The highest band (lowest priority).
pub const MAX_BAND: u32 = 9;
/// The longest TTL an entry may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// The shortest TTL an entry may ask for.
pub const MIN_TTL: Duration = Duration::from_millis(100);

/// Where a waiter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// 1 + the live entries ahead that are not ringing.
    pub position: u64,
    /// When it first joined, in µs of the backend's clock.
    pub enqueued_at_us: u64,
}

/// What `ClaimNext` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// The waiter was first and got this lease (or its attempt's lease again); its entry is
    /// ringing now.
    Granted(Lease),
    /// A live entry that is not ringing precedes it: no lease.
    NotFirst {
        /// The waiter's position.
        position: u64,
    },
    /// First, but every candidate is held: no lease, the entry unchanged.
    Busy,
}

/// How many wait in a queue now: what [`crate::backend::Locks::order_status`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OrderStatus {
    /// Live entries that are not ringing.
    pub waiting: u64,
    /// Live entries that are ringing (granted, not requeued).
    pub ringing: u64,
    /// How long the oldest waiting entry has waited, by the backend's clock, in µs; 0 when
    /// nobody waits. The oldest by enqueue time, whatever its band: a VIP who just arrived
    /// is first in the order but has not waited long.
    pub oldest_wait_us: u64,
}

/// 1–200 characters without whitespace: the bounds of resources and holders too.
fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 200 && !s.chars().any(char::is_whitespace)
}

/// Checks a queue id.
pub(crate) fn validate_queue(queue: &str) -> Result<(), LockError> {
    if !valid_id(queue) {
        return Err(LockError::Invalid(
            "`queue` must be 1–200 characters without spaces, e.g. sales".into(),
        ));
    }
    Ok(())
}

/// Checks a queue and waiter id (the same bounds as resources and holders).
pub(crate) fn validate_entry(queue: &str, waiter: &str) -> Result<(), LockError> {
    validate_queue(queue)?;
    if !valid_id(waiter) {
        return Err(LockError::Invalid(
            "`waiter` must be 1–200 characters without spaces, e.g. pbx-1/1700000000.42".into(),
        ));
    }
    Ok(())
}

/// Checks a band and a TTL.
pub(crate) fn validate_join(band: u32, ttl: Duration) -> Result<(), LockError> {
    if band > MAX_BAND {
        return Err(LockError::Invalid(format!(
            "`band` must be 0–{MAX_BAND} (0 = VIP, 1 = normal; lower first)"
        )));
    }
    validate_ttl(ttl)
}

/// Checks a TTL.
pub(crate) fn validate_ttl(ttl: Duration) -> Result<(), LockError> {
    if ttl < MIN_TTL || ttl > MAX_TTL {
        return Err(LockError::Invalid(format!(
            "`ttl_ms` must be between {} and {} ms",
            MIN_TTL.as_millis(),
            MAX_TTL.as_millis()
        )));
    }
    Ok(())
}

pub(crate) fn not_waiting(queue: &str, waiter: &str) -> LockError {
    LockError::NotWaiting {
        queue: queue.to_owned(),
        waiter: waiter.to_owned(),
    }
}

/// (band, enqueue µs, waiter): the order's key, compared field by field.
type Key = (u32, u64, String);

#[derive(Debug)]
struct Wait {
    band: u32,
    at: u64,
    ttl: Duration,
    expires: Instant,
}

impl Wait {
    fn key(&self, waiter: &str) -> Key {
        (self.band, self.at, waiter.to_owned())
    }
}

/// One queue in memory.
#[derive(Debug, Default)]
struct Queue {
    order: BTreeSet<Key>,
    /// The keys of the ringing entries (as many as agents being rung at most), apart from
    /// `order` so that a position counts the keys ahead in both sets instead of looking
    /// every entry ahead up.
    ringing: BTreeSet<Key>,
    entries: HashMap<String, Wait>,
    /// (expiry, waiter), so purging costs O(expired) as on Redis.
    expiries: BTreeSet<(Instant, String)>,
}

impl Queue {
    fn purge(&mut self, now: Instant) {
        while let Some((expires, _)) = self.expiries.first()
            && *expires <= now
        {
            let Some((_, waiter)) = self.expiries.pop_first() else {
                break;
            };
            if let Some(wait) = self.entries.remove(&waiter) {
                let key = wait.key(&waiter);
                self.order.remove(&key);
                self.ringing.remove(&key);
            }
        }
    }

    fn refresh(&mut self, waiter: &str, ttl: Option<Duration>, now: Instant) -> Option<&Wait> {
        let wait = self.entries.get_mut(waiter)?;
        self.expiries.remove(&(wait.expires, waiter.to_owned()));
        if let Some(ttl) = ttl {
            wait.ttl = ttl;
        }
        wait.expires = now + wait.ttl;
        self.expiries.insert((wait.expires, waiter.to_owned()));
        Some(wait)
    }

    fn place(&self, waiter: &str) -> Option<Place> {
        let wait = self.entries.get(waiter)?;
        let key = wait.key(waiter);
        let ahead = self.order.range(..&key).count() - self.ringing.range(..&key).count();
        Some(Place {
            position: ahead as u64 + 1,
            enqueued_at_us: wait.at,
        })
    }
}

/// Every queue's order, inside the memory backend's state (one lock with the leases).
#[derive(Debug)]
pub(super) struct Orders {
    queues: HashMap<String, Queue>,
    /// [`MAX_WAITERS`] (smaller in tests: a position costs O(rank) in memory).
    max_waiters: usize,
}

impl Default for Orders {
    fn default() -> Self {
        Self {
            queues: HashMap::new(),
            max_waiters: MAX_WAITERS,
        }
    }
}

impl Orders {
    /// A smaller bound, for tests.
    #[cfg(test)]
    pub(super) fn set_max_waiters(&mut self, max: usize) {
        self.max_waiters = max;
    }

    /// Drops every queue's expired entries, and the queues left empty: without it a queue
    /// nobody asks about again would keep its dead entries.
    pub(super) fn sweep(&mut self, now: Instant) {
        self.queues.retain(|_, q| {
            q.purge(now);
            !q.entries.is_empty()
        });
    }

    /// The live queue, purged; `None` when it has no entry.
    fn queue(&mut self, queue: &str, now: Instant) -> Option<&mut Queue> {
        let q = self.queues.get_mut(queue)?;
        q.purge(now);
        if q.entries.is_empty() {
            self.queues.remove(queue);
            return None;
        }
        self.queues.get_mut(queue)
    }

    pub(super) fn join(
        &mut self,
        queue: &str,
        waiter: &str,
        band: u32,
        ttl: Duration,
        now: Instant,
        clock_us: u64,
    ) -> Result<Place, LockError> {
        self.queue(queue, now);
        let q = self.queues.entry(queue.to_owned()).or_default();
        if q.refresh(waiter, Some(ttl), now).is_none() {
            if q.entries.len() >= self.max_waiters {
                return Err(LockError::QueueFull {
                    queue: queue.to_owned(),
                });
            }
            let wait = Wait {
                band,
                at: clock_us,
                ttl,
                expires: now + ttl,
            };
            q.order.insert(wait.key(waiter));
            q.expiries.insert((wait.expires, waiter.to_owned()));
            q.entries.insert(waiter.to_owned(), wait);
        }
        q.place(waiter).ok_or_else(|| not_waiting(queue, waiter))
    }

    pub(super) fn touch(
        &mut self,
        queue: &str,
        waiter: &str,
        ttl: Option<Duration>,
        now: Instant,
    ) -> Result<Place, LockError> {
        let q = self
            .queue(queue, now)
            .ok_or_else(|| not_waiting(queue, waiter))?;
        q.refresh(waiter, ttl, now)
            .ok_or_else(|| not_waiting(queue, waiter))?;
        q.place(waiter).ok_or_else(|| not_waiting(queue, waiter))
    }

    pub(super) fn leave(&mut self, queue: &str, waiter: &str, now: Instant) -> bool {
        let Some(q) = self.queue(queue, now) else {
            return false;
        };
        let Some(wait) = q.entries.remove(waiter) else {
            return false;
        };
        let key = wait.key(waiter);
        q.order.remove(&key);
        q.ringing.remove(&key);
        q.expiries.remove(&(wait.expires, waiter.to_owned()));
        if q.entries.is_empty() {
            self.queues.remove(queue);
        }
        true
    }

    /// Sets or clears `ringing`; the waiter's place after it.
    pub(super) fn set_ringing(
        &mut self,
        queue: &str,
        waiter: &str,
        ringing: bool,
        now: Instant,
    ) -> Result<Place, LockError> {
        let q = self
            .queue(queue, now)
            .ok_or_else(|| not_waiting(queue, waiter))?;
        let key = q
            .entries
            .get(waiter)
            .ok_or_else(|| not_waiting(queue, waiter))?
            .key(waiter);
        if ringing {
            q.ringing.insert(key);
        } else {
            q.ringing.remove(&key);
        }
        q.place(waiter).ok_or_else(|| not_waiting(queue, waiter))
    }

    /// Counts the live entries of `queue` at `now`; `clock_us` is the order's clock then.
    /// The oldest wait does not walk the order: within a band the first non-ringing entry
    /// is the oldest waiting one, and at most `ringing` entries come before it.
    pub(super) fn status(&mut self, queue: &str, now: Instant, clock_us: u64) -> OrderStatus {
        let Some(q) = self.queue(queue, now) else {
            return OrderStatus::default();
        };
        let ringing = q.ringing.len() as u64;
        let waiting = q.entries.len() as u64 - ringing;
        let mut oldest: Option<u64> = None;
        for band in 0..=MAX_BAND {
            let first = q
                .order
                .range((band, 0, String::new())..(band + 1, 0, String::new()))
                .find(|key| !q.ringing.contains(*key));
            if let Some((_, at, _)) = first {
                oldest = Some(oldest.map_or(*at, |o| o.min(*at)));
            }
        }
        OrderStatus {
            waiting,
            ringing,
            // An enqueue time may run a µs ahead of the clock (arrivals never tie).
            oldest_wait_us: oldest.map_or(0, |at| clock_us.saturating_sub(at)),
        }
    }

    /// The first half of ClaimNext: refreshes the entry and says where it stands.
    pub(super) fn check(
        &mut self,
        queue: &str,
        waiter: &str,
        now: Instant,
    ) -> Result<Place, LockError> {
        self.touch(queue, waiter, None, now)
    }
}

/// Helpers shared by the order's scripts. KEYS[1..4]: `wq`, `wqh`, `wqx`, `wqr` of the
/// queue (see the module's documentation).
const LIB: &str = r#"
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2]), t
end
local function member_of(v)
  return string.match(v, '^%d+ (.*)$')
end
local function purge(k, now)
  repeat
    local gone = redis.call('ZRANGEBYSCORE', k[3], '-inf', string.format('%.0f', now),
      'LIMIT', 0, 500)
    for _, w in ipairs(gone) do
      local v = redis.call('HGET', k[2], w)
      if v then redis.call('ZREM', k[1], member_of(v)) end
      redis.call('HDEL', k[2], w)
      redis.call('SREM', k[4], w)
    end
    if #gone > 0 then redis.call('ZREM', k[3], unpack(gone)) end
  until #gone < 500
end
local function refresh(k, waiter, ttl, now)
  redis.call('ZADD', k[3], string.format('%.0f', now + tonumber(ttl) * 1000), waiter)
end
local function keepalive(k)
  local last = redis.call('ZRANGE', k[3], -1, -1, 'WITHSCORES')
  if last[2] then
    local at = string.format('%.0f', math.floor(tonumber(last[2]) / 1000) + 1000)
    for i = 1, 4 do redis.call('PEXPIREAT', k[i], at) end
  end
end
local function place(k, member)
  local rank = redis.call('ZRANK', k[1], member)
  local ahead = rank
  for _, w in ipairs(redis.call('SMEMBERS', k[4])) do
    local v = redis.call('HGET', k[2], w)
    if v then
      local r = redis.call('ZRANK', k[1], member_of(v))
      if r and r < rank then ahead = ahead - 1 end
    end
  end
  return {ahead + 1, string.match(member, '^%d+ (%d+) ')}
end
"#;

/// KEYS: the queue's four keys. ARGV: waiter, band, ttl-ms, max waiters. Returns {position,
/// enqueue µs}, or {-1, ''} when the queue is full.
pub(super) const JOIN: &str = r#"
local now, t = clock()
purge(KEYS, now)
local v = redis.call('HGET', KEYS[2], ARGV[1])
local member
if v then
  member = member_of(v)
else
  if redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[4]) then return {-1, ''} end
  member = ARGV[2] .. ' ' .. string.rep('0', 11 - #t[1]) .. t[1] ..
    string.rep('0', 6 - #t[2]) .. t[2] .. ' ' .. ARGV[1]
  redis.call('ZADD', KEYS[1], 0, member)
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3] .. ' ' .. member)
refresh(KEYS, ARGV[1], ARGV[3], now)
keepalive(KEYS)
return place(KEYS, member)
"#;

/// KEYS: the queue's four keys. ARGV: waiter, ttl-ms ('' keeps the entry's own). Returns
/// {position, enqueue µs}, or {-1, ''} when the waiter is not waiting.
pub(super) const TOUCH: &str = r#"
local now = clock()
purge(KEYS, now)
local v = redis.call('HGET', KEYS[2], ARGV[1])
if not v then return {-1, ''} end
local ttl, member = string.match(v, '^(%d+) (.*)$')
if ARGV[2] ~= '' then
  ttl = ARGV[2]
  redis.call('HSET', KEYS[2], ARGV[1], ttl .. ' ' .. member)
end
refresh(KEYS, ARGV[1], ttl, now)
keepalive(KEYS)
return place(KEYS, member)
"#;

/// KEYS: the queue's four keys. ARGV: waiter. Returns 1 when it was waiting, else 0.
pub(super) const LEAVE: &str = r#"
local now = clock()
purge(KEYS, now)
local v = redis.call('HGET', KEYS[2], ARGV[1])
if not v then return 0 end
redis.call('ZREM', KEYS[1], member_of(v))
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
return 1
"#;

/// KEYS: the queue's four keys. ARGV: waiter. Returns {position, enqueue µs}, or {-1, ''}
/// when the waiter is not waiting.
pub(super) const REQUEUE: &str = r#"
local now = clock()
purge(KEYS, now)
local v = redis.call('HGET', KEYS[2], ARGV[1])
if not v then return {-1, ''} end
redis.call('SREM', KEYS[4], ARGV[1])
return place(KEYS, member_of(v))
"#;

/// KEYS: the queue's four keys. No ARGV. Returns {waiting, ringing, oldest wait in µs ('' when
/// nobody waits)}. Purges like every script, and writes nothing else. Within a band the
/// first entry that is not ringing is the band's oldest waiting one, and at most `ringing`
/// entries precede it, so each band costs one ZRANGEBYLEX of ringing + 1 members, not a
/// walk of the order. Members of band b lie between "b " and "b!" (`!` follows the space).
pub(super) const STATUS: &str = r#"
local now = clock()
purge(KEYS, now)
local total = redis.call('HLEN', KEYS[2])
local ring = {}
local ringing = 0
for _, w in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  if redis.call('HEXISTS', KEYS[2], w) == 1 then
    ring[w] = true
    ringing = ringing + 1
  end
end
local oldest = nil
if total > ringing then
  for b = 0, 9 do
    local first = redis.call('ZRANGEBYLEX', KEYS[1], '[' .. b .. ' ', '(' .. b .. '!',
      'LIMIT', 0, ringing + 1)
    for _, m in ipairs(first) do
      local at, w = string.match(m, '^%d+ (%d+) (.*)$')
      if not ring[w] then
        at = tonumber(at)
        if not oldest or at < oldest then oldest = at end
        break
      end
    end
  end
end
local age = ''
if oldest then age = string.format('%.0f', math.max(now - oldest, 0)) end
return {total - ringing, ringing, age}
"#;

/// ClaimNext around ClaimFirst's own script, which runs unchanged as a function of its
/// keys and arguments. KEYS: the queue's four keys, then ClaimFirst's. ARGV: ClaimFirst's
/// eight, then the waiter. Returns ClaimFirst's answers, {-3, '', ''} when the waiter is
/// not waiting, {-4, '', position} when a live entry that is not ringing precedes it.
const NEXT: &str = r#"
local now = clock()
purge(KEYS, now)
local waiter = ARGV[9]
local v = redis.call('HGET', KEYS[2], waiter)
if not v then return {-3, '', ''} end
local ttl, member = string.match(v, '^(%d+) (.*)$')
refresh(KEYS, waiter, ttl, now)
local pos = place(KEYS, member)[1]
if pos > 1 then
  keepalive(KEYS)
  return {-4, '', tostring(pos)}
end
local r = claim_first({unpack(KEYS, 5)}, ARGV)
if r[1] == 1 then redis.call('SADD', KEYS[4], waiter) end
keepalive(KEYS)
return r
"#;

/// The scripts' source: the helpers, then `body`.
pub(super) fn script(body: &str) -> String {
    format!("{LIB}{body}")
}

/// ClaimNext's source, with `claim` (ClaimFirst's script) as its function.
pub(super) fn claim_next_script(claim: &str) -> String {
    format!("{LIB}\nlocal function claim_first(KEYS, ARGV)\n{claim}\nend\n{NEXT}")
}

/// The four keys of `queue`, in the order the scripts take them.
pub(super) fn keys(queue: &str) -> [String; 4] {
    [
        format!("wq:{{{queue}}}"),
        format!("wqh:{{{queue}}}"),
        format!("wqx:{{{queue}}}"),
        format!("wqr:{{{queue}}}"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    #[test]
    fn the_same_enqueue_time_is_ordered_by_waiter_id() {
        let mut orders = Orders::default();
        let now = Instant::now();
        let b = orders.join("q", "pbx-1/b", 1, TTL, now, 42).expect("join");
        let a = orders.join("q", "pbx-1/a", 1, TTL, now, 42).expect("join");
        assert_eq!((b.position, a.position), (1, 1));
        assert_eq!(
            orders.touch("q", "pbx-1/b", None, now).expect("b").position,
            2
        );
    }

    #[test]
    fn a_queue_holds_at_most_max_waiters_and_a_rejoin_still_refreshes() {
        assert_eq!(Orders::default().max_waiters, MAX_WAITERS);
        let mut orders = Orders {
            max_waiters: 100,
            ..Orders::default()
        };
        let now = Instant::now();
        for i in 0..100 {
            orders
                .join("q", &format!("w{i}"), 1, TTL, now, i as u64)
                .expect("room");
        }
        assert_eq!(
            orders.join("q", "late", 1, TTL, now, 0),
            Err(LockError::QueueFull { queue: "q".into() })
        );
        assert_eq!(
            orders
                .join("q", "w7", 1, TTL, now, 999_999)
                .expect("already waiting"),
            Place {
                position: 8,
                enqueued_at_us: 7
            }
        );
        orders.sweep(now);
        assert_eq!(orders.queues["q"].entries.len(), 100, "all live");
        // Expired entries do not count.
        let later = now + TTL;
        orders
            .join("q", "late", 1, TTL, later, 1_000_000)
            .expect("the others expired");
        assert_eq!(orders.queues["q"].entries.len(), 1);
        orders.sweep(later + TTL);
        assert!(orders.queues.is_empty(), "a sweep drops empty queues");
    }
}
