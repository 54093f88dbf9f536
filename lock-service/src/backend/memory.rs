//! Leases in this process's memory: the single-box backend, with the same rules as Redis.
//!
//! A restart forgets every lease while the PBX may still ring the agents they were for, so
//! a new backend refuses claims for the quarantine first, as Redis does after a data loss.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use callfleet_core::config::{LockServiceConfig, UnsafeLockSwitches};

use super::order::{Next, OrderStatus, Orders, Place};
use crate::lease::{Claim, Lease, LockError};

#[derive(Debug, Clone)]
struct Entry {
    holder: String,
    attempt: String,
    token: u64,
    validity: Duration,
    /// Validity plus the guard: until then nobody else may claim the resource.
    expires: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// Live leases, and expired ones not yet swept: every lookup goes through [`State::live`],
    /// which sees only live ones, so sweeping is only about memory.
    leases: HashMap<String, Entry>,
    /// Last token per resource; kept after the lease goes, like Redis's `fence:` keys.
    fences: HashMap<String, u64>,
    /// Which resource a claim (holder, attempt) got, so a retry finds it whatever its
    /// candidate list; dropped with the lease.
    attempts: HashMap<(String, String), String>,
    /// When expired leases are next dropped. Sweeping on every claim made each claim walk
    /// every lease (thousands of agents on a call-center box); once a second it is noise.
    next_sweep: Option<Instant>,
    /// The queues' waiting orders: under the same lock as the leases, so ClaimNext checks
    /// the order and claims in one critical section.
    orders: Orders,
    /// The last enqueue time given: the next is later, so arrivals never tie here.
    last_enqueue_us: u64,
}

/// How often expired leases and waiting entries are dropped from memory.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl State {
    /// The lease on `resource` if it is still live at `now`.
    fn live(&self, resource: &str, now: Instant) -> Option<&Entry> {
        self.leases
            .get(resource)
            .filter(|entry| entry.expires > now)
    }

    fn sweep(&mut self, now: Instant) {
        if self.next_sweep.is_none_or(|at| at <= now) {
            self.leases.retain(|_, entry| entry.expires > now);
            let leases = &self.leases;
            self.attempts.retain(|(holder, attempt), resource| {
                leases
                    .get(resource)
                    .is_some_and(|e| &e.holder == holder && &e.attempt == attempt)
            });
            self.orders.sweep(now);
            self.next_sweep = Some(now + SWEEP_EVERY);
        }
    }

    /// The live lease a retried claim already got, extended to `validity` from now (so the
    /// holder, which counts from its retry, never believes in more than the store keeps).
    fn retry(&mut self, claim: &Claim<'_>, now: Instant, guard: Duration) -> Option<Lease> {
        let key = (claim.holder.to_owned(), claim.attempt.to_owned());
        let resource = self.attempts.get(&key)?.clone();
        let entry = self.leases.get_mut(&resource).filter(|e| {
            e.expires > now && e.holder == claim.holder && e.attempt == claim.attempt
        })?;
        entry.validity = claim.validity;
        entry.expires = now + claim.validity + guard;
        Some(lease_of(&resource, entry))
    }
}

/// The in-memory backend.
#[derive(Debug)]
pub struct MemoryLocks {
    state: Mutex<State>,
    guard: Duration,
    max_validity: Duration,
    /// No claims before this: leases granted before a restart may still be acted on.
    quarantined_until: Option<Instant>,
    naive_retry: bool,
    /// The order's clock: the wall clock at creation moved on by a monotonic one, so
    /// enqueue times never go back.
    origin: (u64, Instant),
}

impl MemoryLocks {
    /// Leases stay claimed `guard` past their validity; claims are granted at once (see
    /// [`MemoryLocks::with_startup_quarantine`]).
    pub fn new(guard: Duration) -> Self {
        Self {
            state: Mutex::default(),
            guard,
            max_validity: LockServiceConfig::default().max_validity,
            quarantined_until: None,
            naive_retry: false,
            origin: (wall_micros(), Instant::now()),
        }
    }

    /// Refuses claims for `quarantine` from now: a process that starts cannot know which
    /// leases its predecessor granted.
    pub fn with_startup_quarantine(mut self, quarantine: Duration) -> Self {
        self.quarantined_until = Instant::now().checked_add(quarantine);
        self
    }

    /// The longest validity a claim or renewal may ask for.
    pub fn with_max_validity(mut self, max_validity: Duration) -> Self {
        self.max_validity = max_validity;
        self
    }

    /// The protections a test switched off.
    pub fn with_unsafe_switches(mut self, switches: UnsafeLockSwitches) -> Self {
        self.naive_retry = switches.naive_retry;
        if switches.no_startup_quarantine {
            self.quarantined_until = None;
        }
        self
    }

    /// A smaller bound on waiters per queue, for tests.
    #[cfg(test)]
    pub(super) fn with_max_waiters(self, max: usize) -> Self {
        self.state().orders.set_max_waiters(max);
        self
    }

    pub(super) fn max_validity(&self) -> Duration {
        self.max_validity
    }

    /// Whether claims are refused right now.
    pub fn quarantined(&self) -> bool {
        self.quarantined_until
            .is_some_and(|until| Instant::now() < until)
    }

    fn check_quarantine(&self, now: Instant) -> Result<(), LockError> {
        match self.quarantined_until {
            Some(until) if now < until => Err(LockError::Unavailable(format!(
                "quarantined: the lock service restarted and leases granted before may still be in use; claims resume in {} ms",
                until.duration_since(now).as_millis()
            ))),
            _ => Ok(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lease, or `None` and the holder of the first candidate when all are held (as
    /// the Redis backend answers).
    pub(super) fn claim_first(
        &self,
        candidates: &[&str],
        claim: &Claim<'_>,
    ) -> Result<(Option<Lease>, String), LockError> {
        let now = Instant::now();
        let mut state = self.state();
        self.claim_locked(&mut state, candidates, claim, now)
    }

    /// ClaimFirst inside the caller's critical section.
    fn claim_locked(
        &self,
        state: &mut State,
        candidates: &[&str],
        claim: &Claim<'_>,
        now: Instant,
    ) -> Result<(Option<Lease>, String), LockError> {
        self.check_quarantine(now)?;
        state.sweep(now);
        if self.naive_retry {
            // Switched off for a test: only this list is searched, and nothing is extended.
            for resource in candidates {
                if let Some(entry) = state.live(resource, now)
                    && entry.holder == claim.holder
                    && entry.attempt == claim.attempt
                {
                    return Ok((Some(lease_of(resource, entry)), String::new()));
                }
            }
        } else if let Some(lease) = state.retry(claim, now, self.guard) {
            return Ok((Some(lease), String::new()));
        }
        let mut busy = None;
        for resource in candidates {
            match state.live(resource, now) {
                None => {
                    let lease = Self::claim_in(state, resource, claim, now, self.guard);
                    return Ok((Some(lease), String::new()));
                }
                Some(entry) => {
                    busy.get_or_insert_with(|| entry.holder.clone());
                }
            }
        }
        Ok((None, busy.unwrap_or_default()))
    }

    fn claim_in(
        state: &mut State,
        resource: &str,
        claim: &Claim<'_>,
        now: Instant,
        guard: Duration,
    ) -> Lease {
        let last = state.fences.get(resource).copied().unwrap_or(0);
        let token = last.saturating_add(1).max(wall_micros());
        state.fences.insert(resource.to_owned(), token);
        let entry = Entry {
            holder: claim.holder.to_owned(),
            attempt: claim.attempt.to_owned(),
            token,
            validity: claim.validity,
            expires: now + claim.validity + guard,
        };
        let lease = lease_of(resource, &entry);
        state.leases.insert(resource.to_owned(), entry);
        state.attempts.insert(
            (claim.holder.to_owned(), claim.attempt.to_owned()),
            resource.to_owned(),
        );
        lease
    }

    /// µs of the order's clock.
    fn clock_us(&self, now: Instant) -> u64 {
        let (wall, at) = self.origin;
        wall.saturating_add(u64::try_from(now.duration_since(at).as_micros()).unwrap_or(u64::MAX))
    }

    pub(super) fn join(
        &self,
        queue: &str,
        waiter: &str,
        band: u32,
        ttl: Duration,
    ) -> Result<Place, LockError> {
        let mut state = self.state();
        let now = Instant::now();
        state.sweep(now);
        let clock = self
            .clock_us(now)
            .max(state.last_enqueue_us.saturating_add(1));
        let place = state.orders.join(queue, waiter, band, ttl, now, clock)?;
        if place.enqueued_at_us == clock {
            state.last_enqueue_us = clock;
        }
        Ok(place)
    }

    pub(super) fn touch(
        &self,
        queue: &str,
        waiter: &str,
        ttl: Option<Duration>,
    ) -> Result<Place, LockError> {
        self.state()
            .orders
            .touch(queue, waiter, ttl, Instant::now())
    }

    pub(super) fn leave(&self, queue: &str, waiter: &str) -> bool {
        self.state().orders.leave(queue, waiter, Instant::now())
    }

    pub(super) fn requeue(&self, queue: &str, waiter: &str) -> Result<Place, LockError> {
        self.state()
            .orders
            .set_ringing(queue, waiter, false, Instant::now())
    }

    pub(super) fn order_status(&self, queue: &str) -> OrderStatus {
        let now = Instant::now();
        let clock = self.clock_us(now);
        self.state().orders.status(queue, now, clock)
    }

    /// The order's check and ClaimFirst in one critical section.
    pub(super) fn claim_next(
        &self,
        queue: &str,
        waiter: &str,
        candidates: &[&str],
        claim: &Claim<'_>,
    ) -> Result<Next, LockError> {
        let mut state = self.state();
        let now = Instant::now();
        let place = state.orders.check(queue, waiter, now)?;
        if place.position > 1 {
            return Ok(Next::NotFirst {
                position: place.position,
            });
        }
        match self.claim_locked(&mut state, candidates, claim, now)? {
            (Some(lease), _) => {
                state.orders.set_ringing(queue, waiter, true, now)?;
                Ok(Next::Granted(lease))
            }
            (None, _) => Ok(Next::Busy),
        }
    }

    pub(super) fn renew(
        &self,
        resource: &str,
        holder: &str,
        token: u64,
        validity: Option<Duration>,
    ) -> Result<Lease, LockError> {
        let mut state = self.state();
        let now = Instant::now();
        let entry = live_entry(&mut state, resource, holder, token, now)?;
        // Without a validity the lease keeps its own (never beyond today's bound).
        let validity = validity.unwrap_or(entry.validity.min(self.max_validity));
        entry.validity = validity;
        entry.expires = now + validity + self.guard;
        Ok(lease_of(resource, entry))
    }

    pub(super) fn release(
        &self,
        resource: &str,
        holder: &str,
        token: u64,
    ) -> Result<(), LockError> {
        let mut state = self.state();
        let entry = live_entry(&mut state, resource, holder, token, Instant::now())?;
        let key = (entry.holder.clone(), entry.attempt.clone());
        state.leases.remove(resource);
        state.attempts.remove(&key);
        Ok(())
    }

    pub(super) fn get(&self, resource: &str) -> Option<Lease> {
        let state = self.state();
        let now = Instant::now();
        state.live(resource, now).map(|entry| Lease {
            // What is left of the validity, as Redis reports it.
            validity: entry
                .expires
                .saturating_duration_since(now)
                .saturating_sub(self.guard),
            ..lease_of(resource, entry)
        })
    }
}

fn live_entry<'s>(
    state: &'s mut State,
    resource: &str,
    holder: &str,
    token: u64,
    now: Instant,
) -> Result<&'s mut Entry, LockError> {
    match state.leases.get_mut(resource) {
        Some(entry) if entry.expires > now => {
            if entry.holder == holder && entry.token == token {
                Ok(entry)
            } else {
                Err(LockError::NotYours {
                    resource: resource.to_owned(),
                })
            }
        }
        _ => Err(LockError::Gone {
            resource: resource.to_owned(),
        }),
    }
}

fn lease_of(resource: &str, entry: &Entry) -> Lease {
    Lease {
        resource: resource.to_owned(),
        holder: entry.holder.clone(),
        attempt: entry.attempt.clone(),
        token: entry.token,
        validity: entry.validity,
    }
}

/// Microseconds since the epoch: tokens start from the clock so they keep increasing even
/// when the last token was lost (a restart of the process or of Redis).
pub(crate) fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
