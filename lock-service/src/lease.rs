//! Leases and what can go wrong with them, the same for every backend.

use std::time::Duration;

/// A granted lease on one resource (`agent:<id>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// What is leased.
    pub resource: String,
    /// Who holds it (`node/call-id`).
    pub holder: String,
    /// The client's id for this claim; the same id claims the same lease again.
    pub attempt: String,
    /// Fencing token: strictly increasing per resource, checked where the effect happens.
    pub token: u64,
    /// How long the holder may act on it, counted from when it sent the request.
    pub validity: Duration,
}

/// A claim: who wants a resource, under which attempt id, for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim<'a> {
    /// Who will hold the lease.
    pub holder: &'a str,
    /// The client's id for this claim, so a retried claim is not a second claim.
    pub attempt: &'a str,
    /// Validity requested.
    pub validity: Duration,
}

/// Why an operation did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// Someone else holds the resource.
    #[error("{resource} is held by {holder}")]
    Held {
        /// The resource.
        resource: String,
        /// Its current holder.
        holder: String,
    },
    /// Renew or release of a lease that no longer exists (expired or released).
    #[error("{resource} has no live lease")]
    Gone {
        /// The resource.
        resource: String,
    },
    /// Renew or release by a holder or with a token that is not the live lease's.
    #[error("{resource} is leased to another holder or token")]
    NotYours {
        /// The resource.
        resource: String,
    },
    /// The backend cannot be trusted right now (unreachable, or quarantined after it lost
    /// its data): no lease is granted.
    #[error("locks unavailable: {0}")]
    Unavailable(String),
    /// The waiter is not in the queue's order (never joined, left, or expired).
    #[error("not waiting: {waiter} is not in the order of queue {queue}")]
    NotWaiting {
        /// The queue.
        queue: String,
        /// The waiter.
        waiter: String,
    },
    /// The queue's order holds as many waiters as it may.
    #[error("queue {queue} is full: it holds the most waiters a queue may (100000)")]
    QueueFull {
        /// The queue.
        queue: String,
    },
    /// The request itself is wrong; the message says which field.
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// Checks the fields every operation shares.
pub(crate) fn validate(resource: &str, holder: &str) -> Result<(), LockError> {
    let ok = |s: &str| !s.is_empty() && s.len() <= 200 && !s.chars().any(char::is_whitespace);
    if !ok(resource) {
        return Err(LockError::Invalid(
            "`resource` must be 1–200 characters without spaces, e.g. agent:1001".into(),
        ));
    }
    if !ok(holder) {
        return Err(LockError::Invalid(
            "`holder` must be 1–200 characters without spaces, e.g. pbx-1/1700000000.42".into(),
        ));
    }
    Ok(())
}

/// Checks a claim's attempt id.
pub(crate) fn validate_attempt(attempt: &str) -> Result<(), LockError> {
    if attempt.is_empty() || attempt.len() > 200 || attempt.chars().any(char::is_whitespace) {
        return Err(LockError::Invalid(
            "`attempt` must be 1–200 characters without spaces (one id per claim, reused on retries)"
                .into(),
        ));
    }
    Ok(())
}

/// The one check of a validity asked for, by a claim or a renewal: a lease may never
/// outlast `longest`, because the quarantine after Redis lost data is sized from it.
pub(crate) fn validate_validity(validity: Duration, longest: Duration) -> Result<(), LockError> {
    if validity < Duration::from_millis(100) || validity > longest {
        return Err(LockError::Invalid(format!(
            "`validity` must be between 100 ms and {} ms (lock_service.max_validity)",
            longest.as_millis()
        )));
    }
    Ok(())
}
