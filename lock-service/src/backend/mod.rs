//! Where leases live: Redis in production, this process's memory on a single box. Both
//! follow the same rules and pass the same tests (`tests.rs` runs every scenario on each).

mod memory;
mod redis;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use memory::MemoryLocks;
pub use redis::RedisLocks;

use crate::lease::{Claim, Lease, LockError, validate, validate_attempt, validate_validity};

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
    }

    /// Leases the first free resource of `candidates` (priority order) in one atomic step,
    /// or returns the lease this attempt already got; `None` when all are held.
    pub async fn claim_first(
        &self,
        candidates: &[&str],
        claim: &Claim<'_>,
    ) -> Result<Option<Lease>, LockError> {
        if candidates.is_empty() || candidates.len() > 500 {
            return Err(LockError::Invalid(
                "`candidates` must list 1–500 resources in priority order".into(),
            ));
        }
        for resource in candidates {
            validate(resource, claim.holder)?;
        }
        self.validate_claim(claim)?;
        Ok(self.claim(candidates, claim).await?.0)
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
        validate(resource, holder)?;
        if let Some(validity) = validity {
            validate_validity(validity, self.max_validity())?;
        }
        match self {
            Self::Memory(memory) => memory.renew(resource, holder, token, validity),
            Self::Redis(redis) => redis.renew(resource, holder, token, validity).await,
        }
    }

    /// Ends a live lease held by `holder` with `token`.
    pub async fn release(&self, resource: &str, holder: &str, token: u64) -> Result<(), LockError> {
        validate(resource, holder)?;
        match self {
            Self::Memory(memory) => memory.release(resource, holder, token),
            Self::Redis(redis) => redis.release(resource, holder, token).await,
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
        validate(resource, "-")?;
        match self {
            Self::Memory(memory) => Ok(memory.get(resource)),
            Self::Redis(redis) => redis.get(resource).await,
        }
    }
}
