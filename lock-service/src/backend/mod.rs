//! Where leases live: Redis in production, this process's memory on a single box. Both
//! follow the same rules and pass the same tests (`tests.rs` runs every scenario on each).

mod memory;
pub mod order;
#[cfg(test)]
mod order_tests;
mod redis;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::time::{Duration, Instant};

pub use memory::MemoryLocks;
pub use order::{Next, OrderStatus, Place};
pub use redis::RedisLocks;

use crate::lease::{Claim, Lease, LockError, validate, validate_attempt, validate_validity};
use crate::metrics::{self, Kind, Outcome};

/// The most candidates one `ClaimFirst` or `ClaimNext` may list: each costs a check in the
/// claim's one atomic step (one Redis script), which must stay short.
pub const MAX_CANDIDATES: usize = 500;
use order::{validate_entry, validate_join, validate_queue, validate_ttl};

/// A lease store.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "one per process, built once: its size does not matter"
)]
pub enum Locks {
    /// In this process (single box).
    Memory(MemoryLocks),
    /// In Redis (any number of lock-service processes).
    Redis(Box<RedisLocks>),
}

impl Locks {
    /// Leases `resource` to `claim.holder`, or returns the lease this attempt already got.
    pub async fn acquire(&self, resource: &str, claim: &Claim<'_>) -> Result<Lease, LockError> {
        let acquire = async {
            validate(resource, claim.holder)?;
            self.validate_claim(claim)?;
            let (lease, holder) = self.claim(&[resource], claim).await?;
            let Some(lease) = lease else {
                return Err(LockError::Held {
                    resource: resource.to_owned(),
                    holder,
                });
            };
            if lease.resource != resource {
                return Err(LockError::Invalid(format!(
                    "attempt `{}` already holds {}: one attempt (one call) leases one resource; use a new attempt id",
                    claim.attempt, lease.resource
                )));
            }
            Ok(lease)
        };
        self.observed(Kind::Acquire, acquire, |_| Outcome::Ok).await
    }

    /// Runs `operation`, then counts it by `kind` and result (`result` tells an answer's)
    /// and observes its latency.
    async fn observed<T>(
        &self,
        kind: Kind,
        operation: impl Future<Output = Result<T, LockError>>,
        result: impl FnOnce(&T) -> Outcome,
    ) -> Result<T, LockError> {
        let started = Instant::now();
        let answer = operation.await;
        let outcome = match &answer {
            Ok(value) => result(value),
            Err(err) => Outcome::of_error(err),
        };
        // A quarantine is the backend keeping its promise, not failing it.
        if outcome == Outcome::Unavailable && !self.quarantined() {
            metrics::backend_error(self.name());
        }
        metrics::observe(kind, started, outcome);
        answer
    }

    /// Leases the first free resource of `candidates` (priority order) in one atomic step,
    /// or returns the lease this attempt already got; `None` when all are held.
    pub async fn claim_first(
        &self,
        candidates: &[&str],
        claim: &Claim<'_>,
    ) -> Result<Option<Lease>, LockError> {
        let claim_first = async {
            self.validate_candidates(candidates, claim)?;
            Ok(self.claim(candidates, claim).await?.0)
        };
        self.observed(Kind::ClaimFirst, claim_first, |lease| {
            if lease.is_some() {
                Outcome::Ok
            } else {
                Outcome::Busy
            }
        })
        .await
    }

    fn validate_candidates(&self, candidates: &[&str], claim: &Claim<'_>) -> Result<(), LockError> {
        if candidates.is_empty() || candidates.len() > MAX_CANDIDATES {
            return Err(LockError::Invalid(format!(
                "`candidates` must list 1–{MAX_CANDIDATES} resources in priority order"
            )));
        }
        for resource in candidates {
            validate(resource, claim.holder)?;
        }
        self.validate_claim(claim)
    }

    /// Puts `waiter` in the waiting order of `queue` (band 0 = VIP before 1 = normal), or
    /// refreshes its entry to `ttl`, keeping its original enqueue time and band.
    pub async fn join(
        &self,
        queue: &str,
        waiter: &str,
        band: u32,
        ttl: Duration,
    ) -> Result<Place, LockError> {
        let join = async {
            validate_entry(queue, waiter)?;
            validate_join(band, ttl)?;
            match self {
                Self::Memory(memory) => memory.join(queue, waiter, band, ttl),
                Self::Redis(redis) => redis.join(queue, waiter, band, ttl).await,
            }
        };
        self.observed(Kind::Join, join, |_| Outcome::Ok).await
    }

    /// Keeps `waiter`'s entry alive for `ttl` from now (its own TTL when `None`).
    pub async fn touch(
        &self,
        queue: &str,
        waiter: &str,
        ttl: Option<Duration>,
    ) -> Result<Place, LockError> {
        let touch = async {
            validate_entry(queue, waiter)?;
            if let Some(ttl) = ttl {
                validate_ttl(ttl)?;
            }
            match self {
                Self::Memory(memory) => memory.touch(queue, waiter, ttl),
                Self::Redis(redis) => redis.touch(queue, waiter, ttl).await,
            }
        };
        self.observed(Kind::Touch, touch, |_| Outcome::Ok).await
    }

    /// Takes `waiter` out of the order at once; whether it was in it.
    pub async fn leave(&self, queue: &str, waiter: &str) -> Result<bool, LockError> {
        let leave = async {
            validate_entry(queue, waiter)?;
            match self {
                Self::Memory(memory) => Ok(memory.leave(queue, waiter)),
                Self::Redis(redis) => redis.leave(queue, waiter).await,
            }
        };
        self.observed(Kind::Leave, leave, |was_in| {
            if *was_in {
                Outcome::Ok
            } else {
                Outcome::NotWaiting
            }
        })
        .await
    }

    /// Clears `ringing` after a failed ring: the waiter blocks later ones again from its
    /// original place.
    pub async fn requeue(&self, queue: &str, waiter: &str) -> Result<Place, LockError> {
        let requeue = async {
            validate_entry(queue, waiter)?;
            match self {
                Self::Memory(memory) => memory.requeue(queue, waiter),
                Self::Redis(redis) => redis.requeue(queue, waiter).await,
            }
        };
        self.observed(Kind::Requeue, requeue, |_| Outcome::Ok).await
    }

    /// How many wait in `queue` and for how long (see [`OrderStatus`]); a queue nobody
    /// joined is empty. Writes nothing but the purge of expired entries every call does.
    pub async fn order_status(&self, queue: &str) -> Result<OrderStatus, LockError> {
        let order_status = async {
            validate_queue(queue)?;
            match self {
                Self::Memory(memory) => Ok(memory.order_status(queue)),
                Self::Redis(redis) => redis.order_status(queue).await,
            }
        };
        self.observed(Kind::OrderStatus, order_status, |_| Outcome::Ok)
            .await
    }

    /// ClaimFirst for the head of the order only, atomically: `NotFirst` while a live entry
    /// that is not ringing precedes `waiter`; otherwise ClaimFirst, and a granted lease marks
    /// the entry ringing. Refreshes the entry's TTL.
    pub async fn claim_next(
        &self,
        queue: &str,
        waiter: &str,
        candidates: &[&str],
        claim: &Claim<'_>,
    ) -> Result<Next, LockError> {
        let claim_next = async {
            validate_entry(queue, waiter)?;
            self.validate_candidates(candidates, claim)?;
            match self {
                Self::Memory(memory) => memory.claim_next(queue, waiter, candidates, claim),
                Self::Redis(redis) => redis.claim_next(queue, waiter, candidates, claim).await,
            }
        };
        self.observed(Kind::ClaimNext, claim_next, |next| match next {
            Next::Granted(_) => Outcome::Ok,
            Next::NotFirst { .. } => Outcome::NotFirst,
            Next::Busy => Outcome::Busy,
        })
        .await
    }

    /// The backend's claim: the lease, or `None` and the first candidate's holder.
    async fn claim(
        &self,
        candidates: &[&str],
        claim: &Claim<'_>,
    ) -> Result<(Option<Lease>, String), LockError> {
        match self {
            Self::Memory(memory) => memory.claim_first(candidates, claim),
            Self::Redis(redis) => redis.claim_first(candidates, claim).await,
        }
    }

    /// Extends a live lease held by `holder` with `token` to `validity` from now, or to
    /// the lease's own validity when `validity` is `None`.
    pub async fn renew(
        &self,
        resource: &str,
        holder: &str,
        token: u64,
        validity: Option<Duration>,
    ) -> Result<Lease, LockError> {
        let renew = async {
            validate(resource, holder)?;
            if let Some(validity) = validity {
                validate_validity(validity, self.max_validity())?;
            }
            match self {
                Self::Memory(memory) => memory.renew(resource, holder, token, validity),
                Self::Redis(redis) => redis.renew(resource, holder, token, validity).await,
            }
        };
        self.observed(Kind::Renew, renew, |_| Outcome::Ok).await
    }

    /// Ends a live lease held by `holder` with `token`.
    pub async fn release(&self, resource: &str, holder: &str, token: u64) -> Result<(), LockError> {
        let release = async {
            validate(resource, holder)?;
            match self {
                Self::Memory(memory) => memory.release(resource, holder, token),
                Self::Redis(redis) => redis.release(resource, holder, token).await,
            }
        };
        self.observed(Kind::Release, release, |()| Outcome::Ok)
            .await
    }

    /// Whether claims are refused for a quarantine now, as far as this process knows.
    pub fn quarantined(&self) -> bool {
        match self {
            Self::Memory(memory) => memory.quarantined(),
            Self::Redis(redis) => redis.quarantined(),
        }
    }

    /// The backend's name, as `lock_service.backend` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
        }
    }

    /// Whether leases can be granted now (for the health service).
    pub async fn serving(&self) -> bool {
        match self {
            Self::Memory(memory) => !memory.quarantined(),
            Self::Redis(redis) => redis.serving().await,
        }
    }

    /// The longest validity a claim or renewal may ask for.
    pub fn max_validity(&self) -> Duration {
        match self {
            Self::Memory(memory) => memory.max_validity(),
            Self::Redis(redis) => redis.max_validity(),
        }
    }

    fn validate_claim(&self, claim: &Claim<'_>) -> Result<(), LockError> {
        validate_attempt(claim.attempt)?;
        validate_validity(claim.validity, self.max_validity())
    }

    /// The live lease on `resource`, with what is left of its validity.
    pub async fn get(&self, resource: &str) -> Result<Option<Lease>, LockError> {
        let get = async {
            validate(resource, "-")?;
            match self {
                Self::Memory(memory) => Ok(memory.get(resource)),
                Self::Redis(redis) => redis.get(resource).await,
            }
        };
        self.observed(Kind::Get, get, |_| Outcome::Ok).await
    }
}
