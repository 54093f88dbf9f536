//! Per-queue figures for the queue status (issue 16): callers waiting and the longest
//! wait, from the lock service's waiting orders, and what became of the day's calls, from
//! the store's queue counters.
//!
//! The queue status is public and polled by websites and wallboards, so it never waits on
//! either: a background task ([`crate::Control::figures_loop`]) asks both every
//! [`FIGURES_EVERY`] and the status reads what it last got. The lock service is asked with
//! a [`LOCK_DEADLINE`] per queue; an answer older than [`WAITING_FRESH`] (the lock service
//! stopped answering) is not shown, and the status says the waiting callers are unknown
//! instead of showing a number that may be long wrong. The store is read once per tick
//! for every queue's counters of the day (one indexed query, whatever the number of
//! queues); a failed read keeps the last counts, which only ever grow within a day.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use callfleet_core::store::QueueCounts;
use callfleet_proto::lock::v1 as pb;
use callfleet_proto::lock::v1::locks_client::LocksClient;
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};

use crate::error::ControlError;

/// How often the figures are read.
pub const FIGURES_EVERY: Duration = Duration::from_millis(500);
/// How long one queue's OrderStatus may take.
pub const LOCK_DEADLINE: Duration = Duration::from_millis(200);
/// The oldest answer of the lock service still shown: two ticks and a deadline fit.
pub const WAITING_FRESH: Duration = Duration::from_secs(1);
/// How long the read of the day's counters may take.
pub const STORE_DEADLINE: Duration = Duration::from_secs(1);
/// OrderStatus calls in flight at once.
const LOCK_CALLS_AT_ONCE: usize = 32;

/// What the lock service last said of a queue.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    waiting: u64,
    oldest_wait_ms: u64,
    read_at: Instant,
}

/// Every queue's counters of one day.
#[derive(Debug, Default)]
struct DayCounts {
    day: String,
    queues: HashMap<String, Counted>,
}

/// A queue's counters, and when a write on this instance last left them so.
#[derive(Debug, Clone, Copy, Default)]
struct Counted {
    counts: QueueCounts,
    written_at: Option<Instant>,
}

/// The figures as last read, and the lock service's client.
#[derive(Debug)]
pub struct Figures {
    /// `None` when `control_plane.lock_service` is empty.
    locks: Option<LocksClient<Channel>>,
    waiting: RwLock<HashMap<String, Waiting>>,
    counts: RwLock<DayCounts>,
    /// Moves after every change of the figures, so an answer rendered from them can tell
    /// whether it is still theirs.
    generation: AtomicU64,
}

impl Figures {
    /// Figures asked of the lock service at `lock_service` (`http://host:port`; empty:
    /// none). Connects on first use, and again after every failure.
    pub fn new(lock_service: &str) -> Result<Self, ControlError> {
        let locks = if lock_service.is_empty() {
            None
        } else {
            let endpoint = Endpoint::from_shared(lock_service.to_owned())
                .map_err(|err| {
                    ControlError::invalid(
                        "control_plane.lock_service",
                        format!("`{lock_service}` is not a URL tonic can connect to: {err}"),
                    )
                })?
                .connect_timeout(LOCK_DEADLINE)
                .timeout(LOCK_DEADLINE);
            Some(LocksClient::new(endpoint.connect_lazy()))
        };
        Ok(Self {
            locks,
            waiting: RwLock::default(),
            counts: RwLock::default(),
            generation: AtomicU64::new(0),
        })
    }

    /// The live lease on `resource` as (holder, token), or `None` when there is none or
    /// the lock service did not answer.
    pub async fn lease(&self, resource: &str) -> Option<(String, u64)> {
        let mut locks = self.locks.clone()?;
        let answer = locks
            .get(callfleet_proto::lock::v1::GetRequest {
                resource: resource.to_owned(),
            })
            .await
            .ok()?
            .into_inner();
        answer.lease.map(|lease| (lease.holder, lease.token))
    }

    /// Moves after every change of the figures: read it before the figures, and an answer
    /// rendered from them is still theirs while it has not moved.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// `queue`'s callers waiting now and how long the oldest has waited, in ms, or `None`
    /// when the lock service did not answer lately (or none is configured). The wait is
    /// the one read, plus the time since: it keeps growing between two reads.
    pub fn waiting(&self, queue: &str) -> Option<(u64, u64)> {
        let read = *self.waiting.read().expect("figures lock").get(queue)?;
        let age = read.read_at.elapsed();
        if age > WAITING_FRESH {
            return None;
        }
        let longest = if read.waiting == 0 {
            0
        } else {
            read.oldest_wait_ms
                .saturating_add(u64::try_from(age.as_millis()).unwrap_or(u64::MAX))
        };
        Some((read.waiting, longest))
    }

    /// `queue`'s counters of `day` as last read; zero for another day than the one read.
    pub fn counts(&self, queue: &str, day: &str) -> QueueCounts {
        let counts = self.counts.read().expect("figures lock");
        if counts.day != day {
            return QueueCounts::default();
        }
        counts
            .queues
            .get(queue)
            .map(|counted| counted.counts)
            .unwrap_or_default()
    }

    /// Every queue's counters of `day`, as a read of the store that began at `started`
    /// found them. What a write on this instance noted since `started` may be newer than
    /// the read: it is kept where larger (counters only grow within a day). Anything else
    /// goes, a deleted queue's counters included.
    pub fn set_counts(
        &self,
        day: &str,
        started: Instant,
        queues: impl IntoIterator<Item = (String, QueueCounts)>,
    ) {
        let mut counts = self.counts.write().expect("figures lock");
        let mut read: HashMap<String, Counted> = queues
            .into_iter()
            .map(|(queue, counts)| {
                let counted = Counted {
                    counts,
                    written_at: None,
                };
                (queue, counted)
            })
            .collect();
        if counts.day == day {
            for (queue, noted) in &counts.queues {
                if noted.written_at.is_some_and(|at| at >= started) {
                    let merged = read.entry(queue.clone()).or_default();
                    *merged = Counted {
                        counts: larger(merged.counts, noted.counts),
                        written_at: noted.written_at,
                    };
                }
            }
        }
        *counts = DayCounts {
            day: day.to_owned(),
            queues: read,
        };
        self.changed();
    }

    /// `queue`'s counters of `day` as a write on this instance just left them, so that a
    /// status asked next shows them (a concurrent write may have counted more already: each
    /// counter is kept at the larger).
    pub fn note_counts(&self, queue: &str, day: &str, written: QueueCounts) {
        let mut counts = self.counts.write().expect("figures lock");
        if counts.day.as_str() > day {
            return; // a write of yesterday that lands after midnight
        }
        if counts.day != day {
            *counts = DayCounts {
                day: day.to_owned(),
                queues: HashMap::new(),
            };
        }
        let known = counts.queues.entry(queue.to_owned()).or_default();
        *known = Counted {
            counts: larger(known.counts, written),
            written_at: Some(Instant::now()),
        };
        self.changed();
    }

    /// Asks the lock service for the waiting order of every queue in `queues`, at most
    /// [`LOCK_CALLS_AT_ONCE`] at a time and each within [`LOCK_DEADLINE`], and keeps the
    /// answers (a queue that got none is unknown until it does). Forgets the queues not in
    /// `queues`. The error is the first failure, for the caller's log.
    pub async fn read_waiting(&self, queues: &[String]) -> Result<(), String> {
        let Some(client) = &self.locks else {
            return Ok(());
        };
        let permits = Arc::new(Semaphore::new(LOCK_CALLS_AT_ONCE));
        let mut calls = tokio::task::JoinSet::new();
        for queue in queues {
            let (mut client, permits, queue) = (client.clone(), permits.clone(), queue.clone());
            calls.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let request = pb::OrderStatusRequest {
                    queue: queue.clone(),
                };
                let answer = tokio::time::timeout(LOCK_DEADLINE, client.order_status(request))
                    .await
                    .map_err(|_| format!("no answer within {LOCK_DEADLINE:?}"))
                    .and_then(|answer| answer.map_err(|status| status.message().to_owned()));
                (
                    queue,
                    answer.map(tonic::Response::into_inner),
                    Instant::now(),
                )
            });
        }
        let mut read = HashMap::with_capacity(queues.len());
        let mut failure = None;
        while let Some(joined) = calls.join_next().await {
            match joined {
                Ok((queue, Ok(answer), read_at)) => {
                    read.insert(
                        queue,
                        Waiting {
                            waiting: answer.waiting,
                            oldest_wait_ms: answer.oldest_wait_ms,
                            read_at,
                        },
                    );
                }
                Ok((queue, Err(why), _)) => {
                    failure.get_or_insert_with(|| format!("queue `{queue}`: {why}"));
                }
                Err(err) => {
                    failure.get_or_insert_with(|| format!("order status task failed: {err}"));
                }
            }
        }
        // A queue whose call failed is dropped at once rather than shown until it is stale.
        *self.waiting.write().expect("figures lock") = read;
        self.changed();
        failure.map_or(Ok(()), Err)
    }
}

/// Each counter at the larger of `a` and `b`.
fn larger(a: QueueCounts, b: QueueCounts) -> QueueCounts {
    QueueCounts {
        answered: a.answered.max(b.answered),
        abandoned: a.abandoned.max(b.abandoned),
        overflowed: a.overflowed.max(b.overflowed),
        answered_within_sl: a.answered_within_sl.max(b.answered_within_sl),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(answered: u32, abandoned: u32, overflowed: u32, within: u32) -> QueueCounts {
        QueueCounts {
            answered,
            abandoned,
            overflowed,
            answered_within_sl: within,
        }
    }

    #[test]
    fn a_write_s_counts_survive_an_older_read_and_a_new_day_starts_from_zero() {
        let figures = Figures::new("").expect("no lock service");
        let sales = |c: QueueCounts| [("sales".to_owned(), c)];
        figures.set_counts("2025-03-14", Instant::now(), sales(counts(3, 1, 0, 2)));
        let started = Instant::now();
        figures.note_counts("sales", "2025-03-14", counts(4, 1, 0, 3));
        // A read that began before the write ends after it: the write stays.
        figures.set_counts("2025-03-14", started, sales(counts(3, 1, 0, 2)));
        assert_eq!(figures.counts("sales", "2025-03-14"), counts(4, 1, 0, 3));
        // A read that began after it is the truth, a queue gone from it included.
        figures.set_counts("2025-03-14", Instant::now(), sales(counts(4, 2, 0, 3)));
        assert_eq!(figures.counts("sales", "2025-03-14"), counts(4, 2, 0, 3));
        figures.set_counts("2025-03-14", Instant::now(), []);
        assert_eq!(
            figures.counts("sales", "2025-03-14"),
            QueueCounts::default()
        );
        figures.note_counts("sales", "2025-03-14", counts(4, 1, 0, 3));
        assert_eq!(
            figures.counts("support", "2025-03-14"),
            QueueCounts::default()
        );
        assert_eq!(
            figures.counts("sales", "2025-03-15"),
            QueueCounts::default(),
            "another day than the one read"
        );
        figures.note_counts("sales", "2025-03-15", counts(0, 1, 0, 0));
        assert_eq!(figures.counts("sales", "2025-03-15"), counts(0, 1, 0, 0));
        figures.note_counts("sales", "2025-03-14", counts(9, 9, 9, 9));
        assert_eq!(
            figures.counts("sales", "2025-03-15"),
            counts(0, 1, 0, 0),
            "yesterday's late write changes nothing today"
        );
    }

    #[tokio::test]
    async fn without_a_lock_service_waiting_is_unknown() {
        let figures = Figures::new("").expect("no lock service");
        assert_eq!(figures.read_waiting(&["sales".to_owned()]).await, Ok(()));
        assert_eq!(figures.waiting("sales"), None);
    }
}
