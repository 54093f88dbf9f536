//! The lock service's Prometheus figures, served at `GET /metrics` on its one listener
//! (see `callfleet_core::metrics`).
//!
//! Every operation goes through [`crate::Locks`], which times it and counts it by kind and
//! result. The hot path pays for two clock reads, one histogram sample and one counter
//! increment: the handles are made once (the first operation makes them all), never looked
//! up in the registry per operation.

use std::sync::OnceLock;
use std::time::Instant;

use ::metrics::{Counter, Histogram, counter, gauge, histogram};

use crate::lease::LockError;

/// What an operation was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Acquire,
    ClaimFirst,
    ClaimNext,
    Renew,
    Release,
    Get,
    Join,
    Touch,
    Leave,
    Requeue,
    OrderStatus,
}

impl Kind {
    /// In the order of the declaration, which indexes [`Operations`]'s tables.
    const ALL: [Self; 11] = [
        Self::Acquire,
        Self::ClaimFirst,
        Self::ClaimNext,
        Self::Renew,
        Self::Release,
        Self::Get,
        Self::Join,
        Self::Touch,
        Self::Leave,
        Self::Requeue,
        Self::OrderStatus,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Acquire => "acquire",
            Self::ClaimFirst => "claim_first",
            Self::ClaimNext => "claim_next",
            Self::Renew => "renew",
            Self::Release => "release",
            Self::Get => "get",
            Self::Join => "join",
            Self::Touch => "touch",
            Self::Leave => "leave",
            Self::Requeue => "requeue",
            Self::OrderStatus => "order_status",
        }
    }

    /// The results this kind can have, registered at 0 at start.
    fn results(self) -> &'static [Outcome] {
        use Outcome as O;
        match self {
            Self::Acquire | Self::ClaimFirst => &[O::Ok, O::Busy, O::Invalid, O::Unavailable],
            Self::ClaimNext => &[
                O::Ok,
                O::Busy,
                O::NotFirst,
                O::NotWaiting,
                O::Invalid,
                O::Unavailable,
            ],
            Self::Renew | Self::Release => {
                &[O::Ok, O::Gone, O::NotHeld, O::Invalid, O::Unavailable]
            }
            Self::Get | Self::OrderStatus => &[O::Ok, O::Invalid, O::Unavailable],
            Self::Join => &[O::Ok, O::QueueFull, O::Invalid, O::Unavailable],
            Self::Touch | Self::Leave | Self::Requeue => {
                &[O::Ok, O::NotWaiting, O::Invalid, O::Unavailable]
            }
        }
    }
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Done as asked.
    Ok,
    /// The resource, or every candidate, is leased to someone else.
    Busy,
    /// ClaimNext: an earlier caller waits.
    NotFirst,
    /// Renew or release of a lease that has run out or was released.
    Gone,
    /// Renew or release by another holder or with another token.
    NotHeld,
    /// The waiter is not in the order (never joined, left, or expired).
    NotWaiting,
    /// The order holds as many waiters as it may.
    QueueFull,
    /// The request itself is wrong.
    Invalid,
    /// The backend cannot be used (unreachable, or quarantined).
    Unavailable,
}

impl Outcome {
    const ALL: [Self; 9] = [
        Self::Ok,
        Self::Busy,
        Self::NotFirst,
        Self::Gone,
        Self::NotHeld,
        Self::NotWaiting,
        Self::QueueFull,
        Self::Invalid,
        Self::Unavailable,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Busy => "busy",
            Self::NotFirst => "not_first",
            Self::Gone => "gone",
            Self::NotHeld => "not_held",
            Self::NotWaiting => "not_waiting",
            Self::QueueFull => "queue_full",
            Self::Invalid => "invalid",
            Self::Unavailable => "unavailable",
        }
    }

    /// The result of an operation that failed with `err`.
    pub(crate) fn of_error(err: &LockError) -> Self {
        match err {
            LockError::Held { .. } => Self::Busy,
            LockError::Gone { .. } => Self::Gone,
            LockError::NotYours { .. } => Self::NotHeld,
            LockError::NotWaiting { .. } => Self::NotWaiting,
            LockError::QueueFull { .. } => Self::QueueFull,
            LockError::Invalid(_) => Self::Invalid,
            LockError::Unavailable(_) => Self::Unavailable,
        }
    }
}

const OPERATIONS: &str = "callfleet_lock_service_operations_total";
const DURATION: &str = "callfleet_lock_service_operation_duration_seconds";

/// The handles of every operation series.
struct Operations {
    /// `[kind][result]`; `None` for a pair [`Kind::results`] does not list, counted through
    /// the registry should it happen after all.
    counts: [[Option<Counter>; Outcome::ALL.len()]; Kind::ALL.len()],
    durations: [Histogram; Kind::ALL.len()],
}

fn operations() -> &'static Operations {
    static OPERATIONS_: OnceLock<Operations> = OnceLock::new();
    OPERATIONS_.get_or_init(|| {
        callfleet_core::metrics::install();
        Operations {
            counts: Kind::ALL.map(|kind| {
                Outcome::ALL.map(|outcome| {
                    kind.results().contains(&outcome).then(|| {
                        let counter = counter!(OPERATIONS, "kind" => kind.as_str(), "result" => outcome.as_str());
                        counter.increment(0);
                        counter
                    })
                })
            }),
            durations: Kind::ALL.map(|kind| histogram!(DURATION, "kind" => kind.as_str())),
        }
    })
}

/// Counts an operation of `kind` that started at `started` and ended with `outcome`.
pub(crate) fn observe(kind: Kind, started: Instant, outcome: Outcome) {
    let operations = operations();
    // Both ALLs list the variants in the order they are declared.
    operations.durations[kind as usize].record(started.elapsed().as_secs_f64());
    match &operations.counts[kind as usize][outcome as usize] {
        Some(counter) => counter.increment(1),
        None => {
            counter!(OPERATIONS, "kind" => kind.as_str(), "result" => outcome.as_str()).increment(1)
        }
    }
}

const QUARANTINED: &str = "callfleet_lock_service_quarantined";

/// Registers every series of a service on `backend` at 0, so a scrape before the first
/// operation lists them.
pub(crate) fn register(backend: &'static str) {
    operations();
    backend_errors(backend).increment(0);
    gauge!(QUARANTINED).set(0.0);
}

/// Whether claims are refused for a quarantine now (set on every health check).
pub(crate) fn quarantined(quarantined: bool) {
    gauge!(QUARANTINED).set(if quarantined { 1.0 } else { 0.0 });
}

/// An operation failed because `backend` could not be used (Redis unreachable, too slow,
/// a replica), not because of a quarantine.
pub(crate) fn backend_error(backend: &'static str) {
    backend_errors(backend).increment(1);
}

fn backend_errors(backend: &'static str) -> &'static Counter {
    static MEMORY: OnceLock<Counter> = OnceLock::new();
    static REDIS: OnceLock<Counter> = OnceLock::new();
    let cell = if backend == "redis" { &REDIS } else { &MEMORY };
    cell.get_or_init(|| {
        callfleet_core::metrics::install();
        counter!("callfleet_lock_service_backend_errors_total", "backend" => backend)
    })
}
