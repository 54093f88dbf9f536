//! Leases in this process's memory: the single-box backend, with the same rules as Redis.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    /// When expired leases are next dropped. Sweeping on every claim made each claim walk
    /// every lease (thousands of agents on a call-center box); once a second it is noise.
    next_sweep: Option<Instant>,
}

/// How often expired leases are dropped from memory.
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
            self.next_sweep = Some(now + SWEEP_EVERY);
        }
    }
}

/// The in-memory backend.
#[derive(Debug)]
pub struct MemoryLocks {
    state: Mutex<State>,
    guard: Duration,
}

impl MemoryLocks {
    /// Leases stay claimed `guard` past their validity.
    pub fn new(guard: Duration) -> Self {
        Self {
            state: Mutex::default(),
            guard,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn acquire(&self, resource: &str, claim: &Claim<'_>) -> Result<Lease, LockError> {
        let mut state = self.state();
        let now = Instant::now();
        state.sweep(now);
        Self::claim_in(&mut state, resource, claim, now, self.guard)
    }

    pub(super) fn claim_first(
        &self,
        candidates: &[&str],
        claim: &Claim<'_>,
    ) -> Result<Option<Lease>, LockError> {
        let mut state = self.state();
        let now = Instant::now();
        state.sweep(now);
        // A retried claim finds the lease it already got, wherever it is in the list.
        for resource in candidates {
            if let Some(entry) = state.live(resource, now)
                && entry.holder == claim.holder
                && entry.attempt == claim.attempt
            {
                return Ok(Some(lease_of(resource, entry)));
            }
        }
        for resource in candidates {
            if state.live(resource, now).is_none() {
                return Self::claim_in(&mut state, resource, claim, now, self.guard).map(Some);
            }
        }
        Ok(None)
    }

    fn claim_in(
        state: &mut State,
        resource: &str,
        claim: &Claim<'_>,
        now: Instant,
        guard: Duration,
    ) -> Result<Lease, LockError> {
        if let Some(entry) = state.live(resource, now) {
            if entry.holder == claim.holder && entry.attempt == claim.attempt {
                return Ok(lease_of(resource, entry));
            }
            return Err(LockError::Held {
                resource: resource.to_owned(),
                holder: entry.holder.clone(),
            });
        }
        let last = state.fences.get(resource).copied().unwrap_or(0);
        let token = (last + 1).max(wall_micros());
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
        Ok(lease)
    }

    pub(super) fn renew(
        &self,
        resource: &str,
        holder: &str,
        token: u64,
        validity: Duration,
    ) -> Result<Lease, LockError> {
        let mut state = self.state();
        let now = Instant::now();
        let entry = live_entry(&mut state, resource, holder, token, now)?;
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
        live_entry(&mut state, resource, holder, token, Instant::now())?;
        state.leases.remove(resource);
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
