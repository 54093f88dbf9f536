//! The waiting order on both backends: the memory backend must behave like Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use callfleet_core::testing::redis_url;

use super::*;

const GUARD: Duration = Duration::from_millis(100);
const TTL: Duration = Duration::from_secs(30);

fn backends() -> Vec<(&'static str, Arc<Locks>)> {
    vec![
        ("memory", Arc::new(Locks::Memory(MemoryLocks::new(GUARD)))),
        (
            "redis",
            Arc::new(Locks::Redis(Box::new(
                RedisLocks::new(&redis_url(), GUARD, Duration::from_secs(2))
                    .expect("redis url")
                    .with_quarantine(Duration::ZERO),
            ))),
        ),
    ]
}

/// A name no other test (or earlier run against the same Redis) uses.
fn fresh(name: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{name}-{}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        memory::wall_micros()
    )
}

/// A claim by `holder` under an attempt id unique to this run (the Redis backend indexes
/// attempt ids across tests).
fn claim(holder: &str, attempt: &str) -> Claim<'static> {
    let leak = |s: String| &*Box::leak(s.into_boxed_str());
    Claim {
        holder: leak(holder.to_owned()),
        attempt: leak(format!("{attempt}@{}", fresh("t"))),
        validity: Duration::from_secs(30),
    }
}

fn agents(n: usize) -> Vec<String> {
    (0..n).map(|i| fresh(&format!("agent:o{i}"))).collect()
}

fn refs(names: &[String]) -> Vec<&str> {
    names.iter().map(String::as_str).collect()
}

#[tokio::test]
async fn the_order_is_band_then_time_and_a_rejoin_keeps_its_place() {
    for (name, locks) in backends() {
        let queue = fresh("sales");
        let a = locks.join(&queue, "pbx-1/a", 1, TTL).await.expect("join");
        let b = locks.join(&queue, "pbx-2/b", 1, TTL).await.expect("join");
        let vip = locks.join(&queue, "pbx-2/v", 0, TTL).await.expect("join");
        assert_eq!((a.position, b.position, vip.position), (1, 2, 1), "{name}");
        assert!(a.enqueued_at_us < b.enqueued_at_us, "{name}: {a:?} {b:?}");
        assert!(
            b.enqueued_at_us < vip.enqueued_at_us,
            "{name}: {b:?} {vip:?}"
        );
        let place = |w: &'static str| {
            let (locks, queue) = (locks.clone(), queue.clone());
            async move { locks.touch(&queue, w, None).await.expect("touch") }
        };
        assert_eq!(place("pbx-1/a").await.position, 2, "{name}: behind the VIP");
        assert_eq!(place("pbx-2/b").await.position, 3, "{name}");
        // A retried Join (its reply lost) keeps the first enqueue time and place, even
        // asking for another band.
        let again = locks
            .join(&queue, "pbx-1/a", 0, Duration::from_secs(60))
            .await
            .expect("rejoin");
        assert_eq!(again, Place { position: 2, ..a }, "{name}");
        assert!(
            locks.leave(&queue, "pbx-2/v").await.expect("leave"),
            "{name}"
        );
        assert!(
            !locks.leave(&queue, "pbx-2/v").await.expect("leave twice"),
            "{name}"
        );
        assert_eq!(place("pbx-1/a").await.position, 1, "{name}");
        assert_eq!(place("pbx-2/b").await.position, 2, "{name}");
        assert_eq!(
            locks.touch(&queue, "pbx-9/nobody", None).await,
            Err(LockError::NotWaiting {
                queue: queue.clone(),
                waiter: "pbx-9/nobody".into()
            }),
            "{name}"
        );
    }
}

#[tokio::test]
async fn only_the_head_claims_a_ringing_head_does_not_block_and_requeue_restores_its_place() {
    for (name, locks) in backends() {
        let queue = fresh("sales");
        let agents = agents(2);
        let candidates = refs(&agents);
        for w in ["pbx-1/w1", "pbx-2/w2", "pbx-1/w3"] {
            locks.join(&queue, w, 1, TTL).await.expect("join");
        }
        let next = |waiter: &'static str, c: Claim<'static>| {
            let (locks, queue, candidates) = (locks.clone(), queue.clone(), agents.clone());
            async move {
                locks
                    .claim_next(&queue, waiter, &refs(&candidates), &c)
                    .await
            }
        };
        assert_eq!(
            next("pbx-2/w2", claim("pbx-2/w2", "a")).await,
            Ok(Next::NotFirst { position: 2 }),
            "{name}: only the head claims"
        );
        let w1 = claim("pbx-1/w1", "a");
        let Ok(Next::Granted(first)) = next("pbx-1/w1", w1.clone()).await else {
            panic!("{name}: the head gets the first free agent");
        };
        assert_eq!(first.resource, candidates[0], "{name}");
        assert_eq!(
            next("pbx-1/w1", w1).await,
            Ok(Next::Granted(first.clone())),
            "{name}: a retried ClaimNext gets the same lease"
        );
        let Ok(Next::Granted(second)) = next("pbx-2/w2", claim("pbx-2/w2", "b")).await else {
            panic!("{name}: a ringing head does not block the next waiter");
        };
        assert_eq!(second.resource, candidates[1], "{name}");
        assert_eq!(
            next("pbx-1/w3", claim("pbx-1/w3", "a")).await,
            Ok(Next::Busy),
            "{name}: first behind two ringing entries, but no agent is free"
        );
        // w1's ring failed: it is back in force at its original place.
        let back = locks.requeue(&queue, "pbx-1/w1").await.expect("requeue");
        assert_eq!(back.position, 1, "{name}");
        locks
            .release(&first.resource, "pbx-1/w1", first.token)
            .await
            .expect("release");
        assert_eq!(
            next("pbx-1/w3", claim("pbx-1/w3", "b")).await,
            Ok(Next::NotFirst { position: 2 }),
            "{name}: the requeued w1 blocks w3 again (w2 rings)"
        );
        // w1 hangs up: w3 is first and takes the free agent.
        assert!(
            locks.leave(&queue, "pbx-1/w1").await.expect("leave"),
            "{name}"
        );
        let Ok(Next::Granted(third)) = next("pbx-1/w3", claim("pbx-1/w3", "c")).await else {
            panic!("{name}: Leave unblocks");
        };
        assert_eq!(third.resource, candidates[0], "{name}");
        assert!(third.token > first.token, "{name}: the same fencing tokens");
        assert!(
            matches!(
                next("pbx-1/w1", claim("pbx-1/w1", "d")).await,
                Err(LockError::NotWaiting { .. })
            ),
            "{name}: a waiter that left is not waiting"
        );
    }
}

#[tokio::test]
async fn an_expired_entry_stops_blocking_and_touch_keeps_it() {
    for (name, locks) in backends() {
        let queue = fresh("sales");
        let agents = agents(1);
        let candidates = refs(&agents);
        locks
            .join(&queue, "pbx-1/dead", 1, Duration::from_millis(300))
            .await
            .expect("join");
        locks
            .join(&queue, "pbx-2/live", 1, TTL)
            .await
            .expect("join");
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            locks
                .touch(&queue, "pbx-1/dead", None)
                .await
                .expect("touched in time");
        }
        assert_eq!(
            locks
                .claim_next(&queue, "pbx-2/live", &candidates, &claim("pbx-2/live", "a"))
                .await,
            Ok(Next::NotFirst { position: 2 }),
            "{name}: kept alive by Touch"
        );
        // Its node died: nothing refreshes it any more.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let got = locks
            .claim_next(&queue, "pbx-2/live", &candidates, &claim("pbx-2/live", "b"))
            .await;
        assert!(matches!(got, Ok(Next::Granted(_))), "{name}: {got:?}");
        assert!(
            matches!(
                locks.touch(&queue, "pbx-1/dead", None).await,
                Err(LockError::NotWaiting { .. })
            ),
            "{name}"
        );
    }
}

#[tokio::test]
async fn bad_order_requests_say_which_field() {
    for (name, locks) in backends() {
        let queue = fresh("sales");
        for (result, field) in [
            (locks.join("", "w", 1, TTL).await, "`queue`"),
            (locks.join(&queue, "a b", 1, TTL).await, "`waiter`"),
            (locks.join(&queue, "w", 10, TTL).await, "`band`"),
            (locks.join(&queue, "w", 1, Duration::ZERO).await, "`ttl_ms`"),
        ] {
            match result {
                Err(LockError::Invalid(why)) => assert!(why.contains(field), "{name}: {why}"),
                other => panic!("{name}: {field}: {other:?}"),
            }
        }
        locks.join(&queue, "w", 1, TTL).await.expect("join");
        assert!(
            matches!(
                locks.claim_next(&queue, "w", &[], &claim("w", "a")).await,
                Err(LockError::Invalid(_))
            ),
            "{name}: no candidates"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_waiters_racing_for_one_agent_the_head_gets_it() {
    for (name, locks) in backends() {
        for round in 0..20 {
            let queue = fresh("race");
            let agents = agents(1);
            locks
                .join(&queue, "pbx-1/head", 1, TTL)
                .await
                .expect("join");
            locks
                .join(&queue, "pbx-2/tail", 1, TTL)
                .await
                .expect("join");
            let race = |waiter: &'static str| {
                let (locks, queue, agents) = (locks.clone(), queue.clone(), agents.clone());
                tokio::spawn(async move {
                    locks
                        .claim_next(&queue, waiter, &refs(&agents), &claim(waiter, "r"))
                        .await
                })
            };
            // The tail starts first, so it would win a race without the order.
            let tail = race("pbx-2/tail");
            let head = race("pbx-1/head");
            let (tail, head) = (tail.await.expect("task"), head.await.expect("task"));
            assert!(
                matches!(head, Ok(Next::Granted(_))),
                "{name} round {round}: {head:?}"
            );
            assert!(
                matches!(tail, Ok(Next::NotFirst { position: 2 } | Next::Busy)),
                "{name} round {round}: {tail:?}"
            );
        }
    }
}

/// How the nodes' attempts are run in a round.
#[derive(Debug, Clone, Copy)]
enum Schedule {
    /// Every node a task of its own, all at once.
    Concurrent,
    /// One attempt after another, the nodes interleaved by a seeded generator.
    Seeded(u64),
}

/// A small deterministic generator (xorshift64*): the schedule must be the same on every
/// run and every backend.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

const NODES: usize = 4;
const WAITERS: usize = 50;
const AGENTS: usize = 5;

/// Waiter `i` (joined i-th) is on node `node_of[i]`; every 10th is VIP. Returns the
/// waiters in grant order and the number of order inversions: pairs granted in the
/// opposite order to (band, join order).
async fn fairness(locks: Arc<Locks>, ordered: bool, schedule: Schedule) -> (Vec<usize>, usize) {
    let queue = fresh("fair");
    let mut rng = Rng(0x05ee_d0fc_a11f_1ee7);
    let node_of: Vec<usize> = (0..WAITERS).map(|_| rng.below(NODES)).collect();
    let band = |i: usize| u32::from(i % 10 != 3);
    let waiter = |i: usize| format!("pbx-{}/w{i:02}", node_of[i]);
    // The nodes join their callers concurrently, in turns that fix the arrival order.
    let turn = Arc::new(AtomicUsize::new(0));
    let mut joins = Vec::new();
    for node in 0..NODES {
        let (locks, queue, turn) = (locks.clone(), queue.clone(), turn.clone());
        let mine: Vec<(usize, String)> = (0..WAITERS)
            .filter(|i| node_of[*i] == node)
            .map(|i| (i, waiter(i)))
            .collect();
        joins.push(tokio::spawn(async move {
            let mut places = Vec::new();
            for (i, w) in mine {
                while turn.load(Ordering::Acquire) != i {
                    tokio::task::yield_now().await;
                }
                let place = locks.join(&queue, &w, band(i), TTL).await.expect("join");
                places.push((i, place.enqueued_at_us));
                turn.store(i + 1, Ordering::Release);
            }
            places
        }));
    }
    let mut enqueued = vec![0; WAITERS];
    for join in joins {
        for (i, at) in join.await.expect("task") {
            enqueued[i] = at;
        }
    }
    assert!(
        enqueued.windows(2).all(|w| w[0] <= w[1]),
        "enqueue times follow the arrivals: {enqueued:?}"
    );
    // Every agent starts busy with someone outside the queue.
    let agents = agents(AGENTS);
    let mut held = Vec::new();
    for (k, agent) in agents.iter().enumerate() {
        let lease = locks
            .acquire(agent, &claim("pbx-9/other", &format!("busy{k}")))
            .await
            .expect("free at start");
        held.push(lease);
    }
    let mut sched = Rng(match schedule {
        Schedule::Seeded(seed) => seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        Schedule::Concurrent => 1,
    });
    let mut waiting: Vec<usize> = (0..WAITERS).collect();
    let mut granted = Vec::new();
    for round in 0..WAITERS {
        // One agent ends its call: exactly one is free.
        let done = held[round % AGENTS].clone();
        locks
            .release(&done.resource, &done.holder, done.token)
            .await
            .expect("release");
        // Each node tries its callers in its own arrival order (it knows no other node's).
        let per_node: Vec<Vec<usize>> = (0..NODES)
            .map(|n| {
                waiting
                    .iter()
                    .copied()
                    .filter(|i| node_of[*i] == n)
                    .collect()
            })
            .collect();
        let try_one = |i: usize| {
            try_one(
                locks.clone(),
                queue.clone(),
                agents.clone(),
                waiter(i),
                i,
                round,
                ordered,
            )
        };
        let mut wins = Vec::new();
        match schedule {
            Schedule::Concurrent => {
                let tasks: Vec<_> = per_node
                    .into_iter()
                    .map(|mine| {
                        let attempts: Vec<_> = mine.into_iter().map(try_one).collect();
                        tokio::spawn(async move {
                            let mut wins = Vec::new();
                            for attempt in attempts {
                                wins.extend(attempt.await);
                            }
                            wins
                        })
                    })
                    .collect();
                for task in tasks {
                    wins.extend(task.await.expect("task"));
                }
            }
            Schedule::Seeded(_) => {
                let mut queues: Vec<std::collections::VecDeque<usize>> =
                    per_node.into_iter().map(Into::into).collect();
                while queues.iter().any(|q| !q.is_empty()) {
                    let live: Vec<usize> = (0..NODES).filter(|n| !queues[*n].is_empty()).collect();
                    let node = live[sched.below(live.len())];
                    let i = queues[node].pop_front().expect("not empty");
                    wins.extend(try_one(i).await);
                }
            }
        }
        assert_eq!(
            wins.len(),
            1,
            "round {round}: one free agent, one grant: {wins:?}"
        );
        let (i, lease) = wins.pop().expect("one");
        assert_eq!(lease.resource, done.resource, "round {round}");
        held[round % AGENTS] = lease;
        granted.push(i);
        waiting.retain(|w| *w != i);
        // Answered: the caller leaves the order.
        if ordered {
            assert!(locks.leave(&queue, &waiter(i)).await.expect("leave"));
        }
    }
    for lease in held {
        let _ = locks
            .release(&lease.resource, &lease.holder, lease.token)
            .await;
    }
    let rank = |i: usize| (band(i), i);
    let inversions = (0..granted.len())
        .flat_map(|a| (a + 1..granted.len()).map(move |b| (a, b)))
        .filter(|&(a, b)| rank(granted[a]) > rank(granted[b]))
        .count();
    (granted, inversions)
}

/// One node's attempt for caller `i`: ClaimNext in the order, or plain ClaimFirst.
async fn try_one(
    locks: Arc<Locks>,
    queue: String,
    agents: Vec<String>,
    w: String,
    i: usize,
    round: usize,
    ordered: bool,
) -> Option<(usize, Lease)> {
    let c = claim(&w, &format!("r{round}"));
    let lease = if ordered {
        match locks.claim_next(&queue, &w, &refs(&agents), &c).await {
            Ok(Next::Granted(lease)) => Some(lease),
            Ok(_) => None,
            Err(err) => panic!("claim_next {w}: {err}"),
        }
    } else {
        locks
            .claim_first(&refs(&agents), &c)
            .await
            .expect("claim_first")
    };
    lease.map(|lease| (i, lease))
}

/// The VIPs (band 0) first, then everyone else, each in arrival order.
fn fair_order() -> Vec<usize> {
    let (mut vip, mut rest): (Vec<usize>, Vec<usize>) = (0..WAITERS).partition(|i| i % 10 == 3);
    vip.append(&mut rest);
    vip
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn across_four_nodes_every_grant_goes_to_the_earliest_waiter() {
    for (name, locks) in backends() {
        for schedule in [Schedule::Concurrent, Schedule::Seeded(7)] {
            let (granted, inversions) = fairness(locks.clone(), true, schedule).await;
            assert_eq!(inversions, 0, "{name} {schedule:?}: {granted:?}");
            assert_eq!(granted, fair_order(), "{name} {schedule:?}");
        }
    }
}

/// The negative control: the same callers, nodes and schedule with plain ClaimFirst (no
/// order) answer callers out of order, so the test above can tell. The schedule is fixed,
/// so the count is exact, and the same on both backends (ClaimFirst grants the first
/// attempt of the schedule, whoever waited longest).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_order_claim_first_answers_callers_out_of_order() {
    let mut orders = Vec::new();
    for (name, locks) in backends() {
        let (granted, inversions) = fairness(locks, false, Schedule::Seeded(7)).await;
        assert_eq!(inversions, 333, "{name}: {granted:?}");
        assert_ne!(granted, fair_order(), "{name}");
        orders.push(granted);
    }
    assert_eq!(orders[0], orders[1], "memory and redis grant alike");
}

#[tokio::test]
async fn a_full_queue_refuses_newcomers_but_keeps_its_waiters() {
    let bounded = [
        (
            "memory",
            Locks::Memory(MemoryLocks::new(GUARD).with_max_waiters(3)),
        ),
        (
            "redis",
            Locks::Redis(Box::new(
                RedisLocks::new(&redis_url(), GUARD, Duration::from_secs(2))
                    .expect("redis url")
                    .with_quarantine(Duration::ZERO)
                    .with_max_waiters(3),
            )),
        ),
    ];
    for (name, locks) in bounded {
        let queue = fresh("full");
        for w in ["w1", "w2", "w3"] {
            locks.join(&queue, w, 1, TTL).await.expect("room");
        }
        assert_eq!(
            locks.join(&queue, "w4", 1, TTL).await,
            Err(LockError::QueueFull {
                queue: queue.clone()
            }),
            "{name}"
        );
        assert_eq!(
            locks
                .join(&queue, "w3", 1, TTL)
                .await
                .expect("a retry")
                .position,
            3,
            "{name}: a waiter already in the order joins again"
        );
        assert!(locks.leave(&queue, "w1").await.expect("leave"), "{name}");
        assert_eq!(
            locks
                .join(&queue, "w4", 1, TTL)
                .await
                .expect("room again")
                .position,
            3,
            "{name}"
        );
    }
}

#[tokio::test]
async fn claim_next_takes_500_candidates_and_no_more() {
    for (name, locks) in backends() {
        let queue = fresh("wide");
        let agents = agents(501);
        locks.join(&queue, "w1", 1, TTL).await.expect("join");
        for agent in &agents[..499] {
            locks
                .acquire(agent, &claim("pbx-9/other", agent))
                .await
                .expect("free");
        }
        assert!(
            matches!(
                locks
                    .claim_next(&queue, "w1", &refs(&agents), &claim("w1", "a"))
                    .await,
                Err(LockError::Invalid(_))
            ),
            "{name}: 501 candidates"
        );
        let Ok(Next::Granted(lease)) = locks
            .claim_next(&queue, "w1", &refs(&agents[..500]), &claim("w1", "b"))
            .await
        else {
            panic!("{name}: the 500th candidate is free");
        };
        assert_eq!(lease.resource, agents[499], "{name}");
    }
}

#[tokio::test]
async fn claim_next_fails_closed_in_a_quarantine_and_without_redis() {
    let quarantined = [
        (
            "memory",
            Locks::Memory(MemoryLocks::new(GUARD).with_startup_quarantine(Duration::from_secs(60))),
        ),
        (
            "redis",
            // A marker of its own that does not exist yet: Redis "lost its data".
            Locks::Redis(Box::new(
                RedisLocks::new(&redis_url(), GUARD, Duration::from_secs(2))
                    .expect("redis url")
                    .with_quarantine(Duration::from_secs(60))
                    .with_marker(fresh("callfleet:locks:marker-test")),
            )),
        ),
    ];
    for (name, locks) in quarantined {
        let queue = fresh("q");
        let agents = agents(1);
        locks.join(&queue, "w1", 1, TTL).await.expect("join");
        locks.join(&queue, "w2", 1, TTL).await.expect("join");
        for attempt in ["a", "b"] {
            let got = locks
                .claim_next(&queue, "w1", &refs(&agents), &claim("w1", attempt))
                .await;
            assert!(
                matches!(&got, Err(LockError::Unavailable(why)) if why.contains("quarantined")),
                "{name}: {got:?}"
            );
        }
        assert_eq!(locks.get(&agents[0]).await.expect("get"), None, "{name}");
        assert_eq!(
            locks
                .claim_next(&queue, "w2", &refs(&agents), &claim("w2", "a"))
                .await,
            Ok(Next::NotFirst { position: 2 }),
            "{name}: the head is not ringing, it still blocks"
        );
    }
    let down = Locks::Redis(Box::new(
        RedisLocks::new("redis://127.0.0.1:1", GUARD, Duration::from_millis(500))
            .expect("a valid url"),
    ));
    let agents = agents(1);
    for got in [
        down.join("q", "w1", 1, TTL).await.map(|_| ()),
        down.claim_next("q", "w1", &refs(&agents), &claim("w1", "a"))
            .await
            .map(|_| ()),
    ] {
        assert!(matches!(got, Err(LockError::Unavailable(_))), "{got:?}");
    }
}

/// Random sequences of order operations give the same answers on Redis as in memory.
mod model {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Join {
            waiter: usize,
            band: u32,
        },
        Touch {
            waiter: usize,
        },
        Leave {
            waiter: usize,
        },
        Requeue {
            waiter: usize,
        },
        ClaimNext {
            waiter: usize,
            agents: Vec<usize>,
            attempt: usize,
        },
        Release {
            agent: usize,
        },
        Status,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..4usize, 0..2u32).prop_map(|(waiter, band)| Op::Join { waiter, band }),
            1 => (0..4usize).prop_map(|waiter| Op::Touch { waiter }),
            1 => (0..4usize).prop_map(|waiter| Op::Leave { waiter }),
            1 => (0..4usize).prop_map(|waiter| Op::Requeue { waiter }),
            3 => (
                0..4usize,
                proptest::sample::subsequence(vec![0usize, 1], 1..=2),
                0..2usize
            )
                .prop_map(|(waiter, agents, attempt)| Op::ClaimNext { waiter, agents, attempt }),
            1 => (0..2usize).prop_map(|agent| Op::Release { agent }),
            1 => Just(Op::Status),
        ]
    }

    /// An answer without the backend's clock and tokens.
    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        Place(u64),
        Left(bool),
        Granted {
            agent: usize,
            waiter: String,
        },
        NotFirst(u64),
        Busy,
        Done,
        /// Waiting and ringing (the oldest wait is the backend's clock).
        Status(u64, u64),
        Err(&'static str),
    }

    fn error(err: &LockError) -> Outcome {
        Outcome::Err(match err {
            LockError::NotWaiting { .. } => "not waiting",
            LockError::QueueFull { .. } => "queue full",
            LockError::Held { .. } => "held",
            LockError::Gone { .. } => "gone",
            LockError::NotYours { .. } => "not yours",
            LockError::Unavailable(_) => "unavailable",
            LockError::Invalid(_) => "invalid",
        })
    }

    struct Side {
        locks: Locks,
        queue: String,
        agents: Vec<String>,
        /// Attempt ids unique to the case (Redis indexes them across cases).
        case: String,
        /// The live lease per agent, as granted.
        leases: HashMap<usize, Lease>,
    }

    impl Side {
        fn new(locks: Locks, case: &str) -> Self {
            Self {
                locks,
                queue: fresh("model"),
                agents: agents(2),
                case: case.to_owned(),
                leases: HashMap::new(),
            }
        }

        async fn apply(&mut self, op: &Op) -> Outcome {
            let waiter = |w: usize| format!("pbx-{}/w{w}", w % 2);
            let place = |r: Result<Place, LockError>| match r {
                Ok(place) => Outcome::Place(place.position),
                Err(err) => error(&err),
            };
            match op {
                Op::Join { waiter: w, band } => {
                    place(self.locks.join(&self.queue, &waiter(*w), *band, TTL).await)
                }
                Op::Touch { waiter: w } => {
                    place(self.locks.touch(&self.queue, &waiter(*w), None).await)
                }
                Op::Requeue { waiter: w } => {
                    place(self.locks.requeue(&self.queue, &waiter(*w)).await)
                }
                Op::Leave { waiter: w } => match self.locks.leave(&self.queue, &waiter(*w)).await {
                    Ok(left) => Outcome::Left(left),
                    Err(err) => error(&err),
                },
                Op::ClaimNext {
                    waiter: w,
                    agents,
                    attempt,
                } => {
                    let w = waiter(*w);
                    let names: Vec<&str> =
                        agents.iter().map(|a| self.agents[*a].as_str()).collect();
                    let attempt = format!("{}-{attempt}", self.case);
                    let c = Claim {
                        holder: &w,
                        attempt: &attempt,
                        validity: Duration::from_secs(30),
                    };
                    match self.locks.claim_next(&self.queue, &w, &names, &c).await {
                        Ok(Next::Granted(lease)) => {
                            let agent = self
                                .agents
                                .iter()
                                .position(|a| *a == lease.resource)
                                .expect("one of ours");
                            let waiter = lease.holder.clone();
                            self.leases.insert(agent, lease);
                            Outcome::Granted { agent, waiter }
                        }
                        Ok(Next::NotFirst { position }) => Outcome::NotFirst(position),
                        Ok(Next::Busy) => Outcome::Busy,
                        Err(err) => error(&err),
                    }
                }
                Op::Release { agent } => match self.leases.remove(agent) {
                    Some(lease) => match self
                        .locks
                        .release(&lease.resource, &lease.holder, lease.token)
                        .await
                    {
                        Ok(()) => Outcome::Done,
                        Err(err) => error(&err),
                    },
                    None => Outcome::Done,
                },
                Op::Status => match self.locks.order_status(&self.queue).await {
                    Ok(s) => Outcome::Status(s.waiting, s.ringing),
                    Err(err) => error(&err),
                },
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn redis_order_scripts_agree_with_the_memory_model(ops in proptest::collection::vec(op(), 1..30)) {
            crate::backend::tests::proptest_runtime().block_on(async {
                let case = fresh("case");
                let mut model = Side::new(Locks::Memory(MemoryLocks::new(GUARD)), &case);
                let mut redis = Side::new(Locks::Redis(Box::new(
                    RedisLocks::new(&redis_url(), GUARD, Duration::from_secs(2))
                        .expect("url")
                        .with_quarantine(Duration::ZERO),
                )), &case);
                for (step, op) in ops.iter().enumerate() {
                    let expected = model.apply(op).await;
                    let got = redis.apply(op).await;
                    assert_eq!(got, expected, "step {step}: {op:?}\nops: {ops:?}");
                }
            });
        }
    }
}

#[tokio::test]
async fn redis_keys_of_a_queue_expire_with_its_last_entry() {
    let locks = RedisLocks::new(&redis_url(), GUARD, Duration::from_secs(2))
        .expect("redis url")
        .with_quarantine(Duration::ZERO);
    let locks = Locks::Redis(Box::new(locks));
    let client = ::redis::Client::open(redis_url()).expect("url");
    let mut raw = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let queue = fresh("keys");
    let keys = order::keys(&queue);
    let agents = agents(1);
    locks
        .join(&queue, "w1", 1, Duration::from_millis(300))
        .await
        .expect("join");
    locks
        .claim_next(&queue, "w1", &refs(&agents), &claim("w1", "a"))
        .await
        .expect("granted");
    for key in &keys {
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut raw)
            .await
            .expect("pttl");
        // The entry's TTL plus a second, never without expiry.
        assert!((1..=1_300).contains(&ttl), "{key}: {ttl} ms");
    }
    assert!(locks.leave(&queue, "w1").await.expect("leave"));
    let left: i64 = ::redis::cmd("EXISTS")
        .arg(&keys[..])
        .query_async(&mut raw)
        .await
        .expect("exists");
    assert_eq!(left, 0, "the last Leave removes every key");
}

/// The status of `queue`, with its oldest wait checked against what the test measured
/// around the Join of the oldest waiter: at least the time from the Join's answer to the
/// status request, at most the time from the Join's request to the status answer (5 ms
/// either way: Redis measures with its wall clock, the test with its monotonic one, and
/// on a busy shared host the two were seen 2 ms apart over 300 ms).
async fn status_waited(
    name: &str,
    locks: &Locks,
    queue: &str,
    sent: Instant,
    answered: Instant,
) -> OrderStatus {
    let low = answered.elapsed().as_millis();
    let status = locks.order_status(queue).await.expect("status");
    let high = sent.elapsed().as_millis();
    let waited = u128::from(status.oldest_wait_us / 1000);
    assert!(
        waited + 5 >= low && waited <= high + 5,
        "{name}: waited {waited} ms, measured {low}–{high} ms ({status:?})"
    );
    status
}

#[tokio::test]
async fn order_status_counts_waiting_and_ringing_and_the_oldest_wait_of_any_band() {
    for (name, locks) in backends() {
        let queue = fresh("status");
        assert_eq!(
            locks.order_status(&queue).await,
            Ok(OrderStatus::default()),
            "{name}: a queue nobody joined is empty"
        );
        // The oldest caller's node dies: its entry expires and stops counting.
        locks
            .join(&queue, "pbx-1/dead", 1, Duration::from_millis(200))
            .await
            .expect("join");
        let sent = Instant::now();
        locks.join(&queue, "pbx-1/a", 1, TTL).await.expect("join");
        let a_joined = Instant::now();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let b_sent = Instant::now();
        locks.join(&queue, "pbx-2/b", 1, TTL).await.expect("join");
        let b_joined = Instant::now();
        tokio::time::sleep(Duration::from_millis(250)).await;
        // A VIP arrives last: first in the order, but not the longest wait.
        locks.join(&queue, "pbx-2/vip", 0, TTL).await.expect("join");
        let status = status_waited(name, &locks, &queue, sent, a_joined).await;
        assert_eq!(
            (status.waiting, status.ringing),
            (3, 0),
            "{name}: the expired entry does not count"
        );

        // The VIP and then `a` are rung: they count as ringing, `b` waits longest now.
        let agents = agents(2);
        for (waiter, attempt) in [("pbx-2/vip", "v"), ("pbx-1/a", "a")] {
            let got = locks
                .claim_next(&queue, waiter, &refs(&agents), &claim(waiter, attempt))
                .await;
            assert!(matches!(got, Ok(Next::Granted(_))), "{name}: {got:?}");
        }
        let status = status_waited(name, &locks, &queue, b_sent, b_joined).await;
        assert_eq!((status.waiting, status.ringing), (1, 2), "{name}");

        // `a`'s ring failed: waiting again, from its first Join.
        locks.requeue(&queue, "pbx-1/a").await.expect("requeue");
        let status = status_waited(name, &locks, &queue, sent, a_joined).await;
        assert_eq!((status.waiting, status.ringing), (2, 1), "{name}");

        // Everyone left but the ringing VIP: nobody waits, so no wait.
        for waiter in ["pbx-1/a", "pbx-2/b"] {
            assert!(locks.leave(&queue, waiter).await.expect("leave"), "{name}");
        }
        assert_eq!(
            locks.order_status(&queue).await,
            Ok(OrderStatus {
                waiting: 0,
                ringing: 1,
                oldest_wait_us: 0
            }),
            "{name}"
        );
        assert!(
            matches!(locks.order_status("a b").await, Err(LockError::Invalid(why)) if why.contains("`queue`")),
            "{name}"
        );
    }
}

#[tokio::test]
async fn order_status_finds_the_oldest_waiter_behind_many_ringing_ones() {
    for (name, locks) in backends() {
        let queue = fresh("status");
        let agents = agents(5);
        // Five callers ring, a sixth waits: the oldest waiting one is behind all five.
        let sent = Instant::now();
        for i in 0..6 {
            locks
                .join(&queue, &format!("pbx-1/w{i}"), 1, TTL)
                .await
                .expect("join");
        }
        let joined = Instant::now();
        for i in 0..5 {
            let waiter = format!("pbx-1/w{i}");
            let got = locks
                .claim_next(&queue, &waiter, &refs(&agents), &claim(&waiter, "a"))
                .await;
            assert!(matches!(got, Ok(Next::Granted(_))), "{name} w{i}: {got:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let status = status_waited(name, &locks, &queue, sent, joined).await;
        assert_eq!((status.waiting, status.ringing), (1, 5), "{name}");
        assert!(status.oldest_wait_us >= 100_000, "{name}: {status:?}");
    }
}
