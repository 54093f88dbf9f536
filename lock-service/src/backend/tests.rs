//! Every scenario runs on both backends: the memory backend must behave like Redis.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use callfleet_core::config::UnsafeLockSwitches;
use callfleet_core::testing::redis_url;

use super::*;

const GUARD: Duration = Duration::from_millis(100);

fn backends() -> Vec<(&'static str, Locks)> {
    backends_guarding(GUARD)
}

fn backends_guarding(guard: Duration) -> Vec<(&'static str, Locks)> {
    vec![
        ("memory", Locks::Memory(MemoryLocks::new(guard))),
        (
            "redis",
            Locks::Redis(Box::new(
                RedisLocks::new(&redis_url(), guard, Duration::from_secs(1))
                    .expect("redis url")
                    .with_quarantine(Duration::ZERO),
            )),
        ),
    ]
}

/// Resource names no other test (or earlier run against the same Redis) uses.
fn fresh(name: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "agent:{name}-{}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        memory::wall_micros()
    )
}

/// Deletes `keys` behind the backend's back, as lost data would.
async fn forget(keys: &[String]) {
    let client = ::redis::Client::open(redis_url()).expect("url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let _: () = ::redis::cmd("DEL")
        .arg(keys)
        .query_async(&mut connection)
        .await
        .expect("del");
}

/// A claim whose attempt id is unique to the calling test: attempt ids name one call, and
/// the Redis backend indexes them, so tests running at once against one Redis must not
/// share them (the same test asking twice gets the same id, as a retry does).
fn claim<'a>(holder: &'a str, attempt: &'a str, validity_ms: u64) -> Claim<'a> {
    let attempt = if attempt.is_empty() {
        attempt
    } else {
        let unique = format!(
            "{attempt}@{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        );
        &*Box::leak(unique.into_boxed_str())
    };
    Claim {
        holder,
        attempt,
        validity: Duration::from_millis(validity_ms),
    }
}

#[tokio::test]
async fn one_holder_at_a_time_and_tokens_only_grow() {
    for (name, locks) in backends() {
        let agent = fresh("a");
        let first = locks
            .acquire(&agent, &claim("pbx-1/c1", "t1", 10_000))
            .await
            .expect("free");
        let busy = locks
            .acquire(&agent, &claim("pbx-2/c9", "t2", 10_000))
            .await
            .expect_err("held");
        assert_eq!(
            busy,
            LockError::Held {
                resource: agent.clone(),
                holder: "pbx-1/c1".into()
            },
            "{name}"
        );
        let again = locks
            .acquire(&agent, &claim("pbx-1/c1", "t1", 10_000))
            .await
            .expect("the same attempt gets the same lease");
        assert_eq!(again.token, first.token, "{name}");
        locks
            .release(&agent, "pbx-1/c1", first.token)
            .await
            .expect("release");
        let second = locks
            .acquire(&agent, &claim("pbx-2/c9", "t2", 10_000))
            .await
            .expect("free again");
        assert!(second.token > first.token, "{name}: tokens grow");
    }
}

#[tokio::test]
async fn only_the_holder_with_its_token_renews_or_releases() {
    for (name, locks) in backends() {
        let agent = fresh("r");
        let lease = locks
            .acquire(&agent, &claim("pbx-1/c1", "t1", 10_000))
            .await
            .expect("free");
        let renew = |holder: &'static str, token: u64| {
            let locks = &locks;
            let agent = agent.clone();
            async move {
                locks
                    .renew(&agent, holder, token, Some(Duration::from_secs(5)))
                    .await
            }
        };
        assert!(
            matches!(
                renew("pbx-2/c2", lease.token).await,
                Err(LockError::NotYours { .. })
            ),
            "{name}: another holder"
        );
        assert!(
            matches!(
                renew("pbx-1/c1", lease.token - 1).await,
                Err(LockError::NotYours { .. })
            ),
            "{name}: an old token"
        );
        let renewed = renew("pbx-1/c1", lease.token).await.expect("renew");
        assert_eq!(renewed.token, lease.token, "{name}");
        assert_eq!(
            renewed.attempt.split('@').next(),
            Some("t1"),
            "{name}: the renewed lease names its claim"
        );
        assert_eq!(renewed.validity, Duration::from_secs(5), "{name}");
        let seen = locks.get(&agent).await.expect("get").expect("live");
        assert!(seen.validity <= Duration::from_secs(5), "{name}: {seen:?}");
        assert_eq!(seen.holder, "pbx-1/c1", "{name}");
        locks
            .release(&agent, "pbx-1/c1", lease.token)
            .await
            .expect("release");
        assert!(
            matches!(
                locks.release(&agent, "pbx-1/c1", lease.token).await,
                Err(LockError::Gone { .. })
            ),
            "{name}: released twice"
        );
        assert!(
            matches!(
                renew("pbx-1/c1", lease.token).await,
                Err(LockError::Gone { .. })
            ),
            "{name}: renew after release"
        );
        assert_eq!(locks.get(&agent).await.expect("get"), None, "{name}");
    }
}

#[tokio::test]
async fn claim_first_takes_the_first_free_in_priority_order() {
    for (name, locks) in backends() {
        let agents = [fresh("p1"), fresh("p2"), fresh("p3")];
        let candidates: Vec<&str> = agents.iter().map(String::as_str).collect();
        locks
            .acquire(candidates[0], &claim("pbx-9/x", "busy", 10_000))
            .await
            .expect("free");
        let got = locks
            .claim_first(&candidates, &claim("pbx-1/c1", "q1", 10_000))
            .await
            .expect("ok")
            .expect("one free");
        assert_eq!(got.resource, candidates[1], "{name}");
        let retried = locks
            .claim_first(&candidates, &claim("pbx-1/c1", "q1", 10_000))
            .await
            .expect("ok")
            .expect("the same lease");
        assert_eq!(
            (retried.resource.as_str(), retried.token),
            (candidates[1], got.token),
            "{name}: a retried claim is not a second claim"
        );
        let third = locks
            .claim_first(&candidates, &claim("pbx-2/c2", "q2", 10_000))
            .await
            .expect("ok")
            .expect("the last one");
        assert_eq!(third.resource, candidates[2], "{name}");
        let none = locks
            .claim_first(&candidates, &claim("pbx-3/c3", "q3", 10_000))
            .await
            .expect("ok");
        assert_eq!(none, None, "{name}: all held");
    }
}

#[tokio::test]
async fn an_expired_lease_frees_the_resource_after_the_guard() {
    // Wide margins around each check, timed from the claim: a loaded test machine may
    // oversleep by tens of milliseconds, and the guard must be judged, not the scheduler.
    const VALIDITY_MS: u64 = 200;
    let guard = Duration::from_millis(1_500);
    for (name, locks) in backends_guarding(guard) {
        let agent = fresh("e");
        let claimed_at = tokio::time::Instant::now();
        let first = locks
            .acquire(&agent, &claim("pbx-1/c1", "t1", VALIDITY_MS))
            .await
            .expect("free");
        let validity = Duration::from_millis(VALIDITY_MS);
        tokio::time::sleep_until(claimed_at + validity + Duration::from_millis(300)).await;
        assert!(
            locks
                .acquire(&agent, &claim("pbx-2/c2", "t2", VALIDITY_MS))
                .await
                .is_err(),
            "{name}: validity over, guard not yet"
        );
        tokio::time::sleep_until(claimed_at + validity + guard + Duration::from_millis(100)).await;
        let second = locks
            .acquire(&agent, &claim("pbx-2/c2", "t2", VALIDITY_MS))
            .await
            .expect("free after validity + guard");
        assert!(second.token > first.token, "{name}");
        assert!(
            matches!(
                locks
                    .renew(
                        &agent,
                        "pbx-1/c1",
                        first.token,
                        Some(Duration::from_secs(1))
                    )
                    .await,
                Err(LockError::NotYours { .. })
            ),
            "{name}: the old holder cannot renew the new lease"
        );
    }
}

#[tokio::test]
async fn redis_tokens_grow_even_when_redis_forgets_everything() {
    let locks = RedisLocks::new(&redis_url(), GUARD, Duration::from_secs(1))
        .expect("url")
        .with_quarantine(Duration::ZERO);
    let locks = Locks::Redis(Box::new(locks));
    let agent = fresh("lost");
    let first = locks
        .acquire(&agent, &claim("pbx-1/c1", "t1", 10_000))
        .await
        .expect("free");
    // What a restart without persistence does to these keys.
    forget(&[format!("lk:{{{agent}}}"), format!("fence:{{{agent}}}")]).await;
    let second = locks
        .acquire(&agent, &claim("pbx-2/c2", "t2", 10_000))
        .await
        .expect("free");
    assert!(
        second.token > first.token,
        "{} then {}: the clock carries the order",
        first.token,
        second.token
    );
}

#[tokio::test]
async fn bad_requests_and_an_unreachable_redis_say_what_is_wrong() {
    let locks = Locks::Memory(MemoryLocks::new(GUARD));
    for (resource, holder, attempt, validity_ms, field) in [
        ("", "h", "a", 1000, "resource"),
        ("agent:1", "with space", "a", 1000, "holder"),
        ("agent:1", "h", "", 1000, "attempt"),
        ("agent:1", "h", "a", 5, "validity"),
    ] {
        let err = locks
            .acquire(resource, &claim(holder, attempt, validity_ms))
            .await
            .expect_err("invalid");
        assert!(
            matches!(&err, LockError::Invalid(text) if text.contains(field)),
            "{err}"
        );
    }
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let gone = Locks::Redis(Box::new(
        RedisLocks::new(
            &format!("redis://127.0.0.1:{closed}"),
            GUARD,
            Duration::from_millis(300),
        )
        .expect("url"),
    ));
    let started = std::time::Instant::now();
    let err = gone
        .acquire("agent:1", &claim("h", "a", 1000))
        .await
        .expect_err("no redis");
    assert!(matches!(err, LockError::Unavailable(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "bounded by the deadline"
    );
}

#[tokio::test]
async fn claims_wait_out_a_quarantine_when_redis_lost_its_data() {
    let marker = fresh("boot-marker");
    let locks = Locks::Redis(Box::new(
        RedisLocks::new(&redis_url(), GUARD, Duration::from_secs(1))
            .expect("url")
            .with_marker(marker.clone())
            .with_quarantine(Duration::from_millis(400)),
    ));
    let agent = fresh("q");
    let refused = locks
        .acquire(&agent, &claim("pbx-1/c1", "t1", 10_000))
        .await
        .expect_err("a marker never seen: the Redis may have lost leases");
    assert!(
        matches!(refused, LockError::Unavailable(ref why) if why.contains("quarantine")),
        "{refused}"
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    let first = locks
        .acquire(&agent, &claim("pbx-1/c1", "t1", 10_000))
        .await
        .expect("after the quarantine");

    // The data goes (FLUSHALL, or a restart without persistence): the marker goes with it.
    forget(&[marker.clone(), format!("lk:{{{agent}}}")]).await;
    let refused = locks
        .acquire(&agent, &claim("pbx-2/c2", "t2", 10_000))
        .await
        .expect_err("quarantined");
    assert!(matches!(refused, LockError::Unavailable(_)), "{refused}");
    tokio::time::sleep(Duration::from_millis(450)).await;
    let second = locks
        .acquire(&agent, &claim("pbx-2/c2", "t2", 10_000))
        .await
        .expect("after the quarantine");
    assert!(second.token > first.token);
}

#[tokio::test]
async fn the_test_redis_is_configured_safely_for_leases() {
    // ./scripts/test starts Redis with appendonly yes and maxmemory-policy noeviction.
    let locks = RedisLocks::new(&redis_url(), GUARD, Duration::from_secs(1))
        .expect("url")
        .with_quarantine(Duration::ZERO);
    let problems = locks.configuration_problems().await.expect("reachable");
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn a_malformed_sentinel_url_says_what_is_wrong() {
    for (url, says) in [
        ("redis+sentinel:///m", "names no sentinel"),
        ("redis+sentinel://127.0.0.1:26379", "names no master"),
        ("redis+sentinel://127.0.0.1:26379/", "names no master"),
        ("redis+sentinel://127.0.0.1:port/m", "`port`"),
        ("redis+sentinel://127.0.0.1:26379,,h2/m", "no host"),
        ("redis+sentinel://::1:26379/m", "brackets"),
        ("redis+sentinel://[::1/m", "without closing"),
        ("redis+sentinel://h1/m/zero", "database `zero`"),
        ("redis+sentinel://h1/m/0/x", "`x`"),
        (
            "redis+sentinel://h1/m?sentinel_pass=x",
            "unknown parameter `sentinel_pass`",
        ),
        ("redis+sentinel://h1/m#x", "fragment"),
    ] {
        let err = RedisLocks::new(url, GUARD, Duration::from_secs(1)).expect_err(url);
        assert!(
            matches!(&err, LockError::Invalid(text)
                if text.contains("sentinel url") && text.contains(says) && text.contains("expected redis+sentinel://")),
            "{url}: {err}"
        );
    }
    let secret = RedisLocks::new(
        "redis+sentinel://u:hunter2@h1:port/m",
        GUARD,
        Duration::from_secs(1),
    )
    .expect_err("bad port");
    assert!(!secret.to_string().contains("hunter2"), "{secret}");
    for url in [
        "redis+sentinel://h1/m",
        "redis+sentinel://u:p%40ss@h1:26380,[::1]:26381,h3/mymaster/2?sentinel_password=s%26t",
    ] {
        RedisLocks::new(url, GUARD, Duration::from_secs(1))
            .unwrap_or_else(|err| panic!("{url}: {err}"));
    }
}

/// A connection of the test's own, behind the backend's back.
async fn raw() -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(redis_url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// Claims `resource` until a claim passes: a marker never seen starts a quarantine, and
/// the first answer must be that refusal. Bounded, so a quarantine that never ends fails.
async fn first_grant_after_the_quarantine(
    locks: &Locks,
    resource: &str,
    claim: &Claim<'_>,
) -> Lease {
    let refused = locks
        .acquire(resource, claim)
        .await
        .expect_err("a marker never seen quarantines");
    assert!(
        matches!(&refused, LockError::Unavailable(why) if why.contains("quarantine")),
        "{refused}"
    );
    let started = std::time::Instant::now();
    loop {
        match locks.acquire(resource, claim).await {
            Ok(lease) => return lease,
            Err(LockError::Unavailable(why)) if why.contains("quarantine") => {}
            Err(other) => panic!("only the quarantine may refuse: {other}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the quarantine never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Redis backend sharing the boot marker `marker` (as lock-service instances on one
/// Redis do).
fn redis_sharing(marker: &str, quarantine: Duration, switches: UnsafeLockSwitches) -> Locks {
    Locks::Redis(Box::new(
        RedisLocks::new(&redis_url(), GUARD, Duration::from_secs(1))
            .expect("url")
            .with_marker(marker)
            .with_quarantine(quarantine)
            .with_unsafe_switches(switches),
    ))
}

const LOCAL_QUARANTINE: UnsafeLockSwitches = UnsafeLockSwitches {
    local_quarantine: true,
    unbounded_validity: false,
    no_startup_quarantine: false,
    naive_retry: false,
};

/// Two instances on one marker, both serving; then Redis loses the marker and agent X's
/// lease (as FLUSHALL does) and instance 1 notices with a refused claim. Returns what
/// instance 2 answers right after, for agent X and another holder, and the first lease.
async fn second_instance_after_a_flush(
    switches: UnsafeLockSwitches,
) -> (Locks, Locks, String, Lease, Result<Lease, LockError>) {
    let marker = fresh("shared-marker");
    let quarantine = Duration::from_millis(600);
    let one = redis_sharing(&marker, quarantine, switches);
    let two = redis_sharing(&marker, quarantine, switches);
    let x = fresh("x");
    let first = first_grant_after_the_quarantine(&one, &x, &claim("pbx-1/c1", "t1", 10_000)).await;
    // Instance 2 serves too (and has its connection) before the loss.
    let y = fresh("y");
    let other = two
        .acquire(&y, &claim("pbx-2/c1", "t1", 10_000))
        .await
        .expect("instance 2 serves once the quarantine is over");
    assert_eq!(other.resource, y);

    forget(&[marker.clone(), format!("lk:{{{x}}}")]).await;
    let refused = one
        .acquire(&x, &claim("pbx-1/c2", "t2", 10_000))
        .await
        .expect_err("instance 1 sees the marker gone");
    assert!(
        matches!(&refused, LockError::Unavailable(why) if why.contains("quarantine")),
        "{refused}"
    );
    let answer = two.acquire(&x, &claim("pbx-2/c2", "t2", 10_000)).await;
    (one, two, x, first, answer)
}

#[tokio::test]
async fn a_quarantine_one_redis_instance_started_stops_every_instance_on_the_marker() {
    let (one, two, x, first, answer) =
        second_instance_after_a_flush(UnsafeLockSwitches::default()).await;
    let refused = answer.expect_err("instance 2 obeys the quarantine instance 1 started");
    assert!(
        matches!(&refused, LockError::Unavailable(why) if why.contains("quarantine")),
        "{refused}"
    );
    tokio::time::sleep(Duration::from_millis(650)).await;
    let second = two
        .acquire(&x, &claim("pbx-2/c2", "t2", 10_000))
        .await
        .expect("instance 2 grants after the quarantine");
    assert_eq!(
        (second.resource.as_str(), second.holder.as_str()),
        (x.as_str(), "pbx-2/c2")
    );
    assert!(
        second.token > first.token,
        "{} then {}",
        first.token,
        second.token
    );
    let z = fresh("z");
    let third = one
        .acquire(&z, &claim("pbx-1/c3", "t3", 10_000))
        .await
        .expect("instance 1 grants after the quarantine");
    assert_eq!(third.resource, z);
    assert_eq!(
        one.acquire(&x, &claim("pbx-1/c4", "t4", 10_000)).await,
        Err(LockError::Held {
            resource: x.clone(),
            holder: "pbx-2/c2".into()
        }),
        "both instances see the one lease on X"
    );
}

#[tokio::test]
async fn with_a_local_quarantine_another_instance_grants_an_agent_whose_lease_was_lost() {
    // The negative control: what the shared quarantine prevents.
    let (_one, _two, x, first, answer) = second_instance_after_a_flush(LOCAL_QUARANTINE).await;
    let second = answer.expect("instance 2 knows nothing of instance 1's quarantine");
    assert_eq!(
        (second.resource.as_str(), second.holder.as_str()),
        (x.as_str(), "pbx-2/c2"),
        "X leased again while pbx-1/c1's lost lease may still ring it"
    );
    assert_ne!(second.token, first.token);
}

/// An instance with a live connection serving; then the marker names another run id
/// (another Redis wrote it: a restart on an old file, a failover). Returns the instance,
/// what the next health check says and what the next claim gets.
async fn a_marker_of_another_run(
    switches: UnsafeLockSwitches,
    quarantine: Duration,
) -> (Locks, String, bool, Result<Lease, LockError>) {
    let marker = fresh("run-marker");
    let locks = redis_sharing(&marker, quarantine, switches);
    let agent = fresh("run");
    first_grant_after_the_quarantine(&locks, &agent, &claim("pbx-1/c1", "t1", 10_000)).await;
    assert!(locks.serving().await, "serving before the marker changes");
    let _: () = ::redis::cmd("HSET")
        .arg(&marker)
        .arg("run_id")
        .arg("other")
        .arg("until")
        .arg(0)
        .query_async(&mut raw().await)
        .await
        .expect("hset");
    let serving = locks.serving().await;
    let answer = locks
        .acquire(&fresh("run2"), &claim("pbx-1/c2", "t2", 10_000))
        .await;
    (locks, marker, serving, answer)
}

#[tokio::test]
async fn a_marker_of_another_redis_run_quarantines_on_the_next_health_check() {
    let quarantine = Duration::from_millis(300);
    let (locks, marker, serving, answer) =
        a_marker_of_another_run(UnsafeLockSwitches::default(), quarantine).await;
    assert!(!serving, "the health check on the live connection saw it");
    let refused = answer.expect_err("quarantined");
    assert!(
        matches!(&refused, LockError::Unavailable(why) if why.contains("quarantine")),
        "{refused}"
    );
    let mut connection = raw().await;
    let info: String = ::redis::cmd("INFO")
        .arg("server")
        .query_async(&mut connection)
        .await
        .expect("info");
    let run_id = info
        .lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .expect("run_id")
        .trim()
        .to_owned();
    let written: Option<String> = ::redis::cmd("HGET")
        .arg(&marker)
        .arg("run_id")
        .query_async(&mut connection)
        .await
        .expect("hget");
    assert_eq!(
        written.as_deref(),
        Some(run_id.as_str()),
        "the marker names this Redis again"
    );
    tokio::time::sleep(quarantine + Duration::from_millis(50)).await;
    assert!(locks.serving().await, "serving after the quarantine");
    locks
        .acquire(&fresh("run3"), &claim("pbx-1/c3", "t3", 10_000))
        .await
        .expect("claims pass after the quarantine");
}

#[tokio::test]
async fn with_a_local_quarantine_a_marker_of_another_redis_run_goes_unnoticed() {
    // The negative control: the process compared only the run ids it saw itself.
    let (_locks, _marker, serving, answer) =
        a_marker_of_another_run(LOCAL_QUARANTINE, Duration::from_millis(300)).await;
    assert!(serving);
    answer.expect("granted");
}

/// claim [A, B] for 300 ms; 350 ms later (validity over, guard not) the same attempt is
/// retried with [B] only. Returns A, B, the first lease and the retry's answer.
async fn retry_with_other_candidates(
    locks: &Locks,
    holder: &str,
) -> (String, String, Lease, Lease) {
    let (a, b) = (fresh("ra"), fresh("rb"));
    let first = locks
        .claim_first(&[&a, &b], &claim(holder, "retried", 300))
        .await
        .expect("ok")
        .expect("free");
    assert_eq!(first.resource, a);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let retried = locks
        .claim_first(&[&b], &claim(holder, "retried", 300))
        .await
        .expect("ok")
        .expect("a lease");
    (a, b, first, retried)
}

#[tokio::test]
async fn a_retried_claim_gets_and_extends_its_lease_whatever_its_candidates() {
    for (name, locks) in backends() {
        let (a, b, first, retried) = retry_with_other_candidates(&locks, "pbx-1/retry").await;
        assert_eq!(
            (retried.resource.as_str(), retried.token, retried.validity),
            (a.as_str(), first.token, Duration::from_millis(300)),
            "{name}: the lease the attempt holds, not a second agent"
        );
        let seen = locks.get(&a).await.expect("get").expect("live");
        assert_eq!(
            (seen.holder.as_str(), seen.token),
            ("pbx-1/retry", first.token),
            "{name}"
        );
        assert!(
            seen.validity > Duration::from_millis(200)
                && seen.validity <= Duration::from_millis(300),
            "{name}: extended to 300 ms from the retry: {seen:?}"
        );
        let other = locks
            .claim_first(&[&b], &claim("pbx-2/other", "o1", 10_000))
            .await
            .expect("ok")
            .expect("B is still free");
        assert_eq!(
            (other.resource.as_str(), other.holder.as_str()),
            (b.as_str(), "pbx-2/other"),
            "{name}"
        );
    }
}

#[tokio::test]
async fn with_naive_retries_a_retry_with_other_candidates_leases_a_second_agent() {
    // The negative control: what the indexed, extending retry prevents.
    let naive = UnsafeLockSwitches {
        naive_retry: true,
        ..UnsafeLockSwitches::default()
    };
    let locks = [
        (
            "memory",
            Locks::Memory(MemoryLocks::new(GUARD).with_unsafe_switches(naive)),
        ),
        (
            "redis",
            Locks::Redis(Box::new(
                RedisLocks::new(&redis_url(), GUARD, Duration::from_secs(1))
                    .expect("url")
                    .with_quarantine(Duration::ZERO)
                    .with_unsafe_switches(naive),
            )),
        ),
    ];
    for (name, locks) in locks {
        let (a, b, first, retried) = retry_with_other_candidates(&locks, "pbx-1/naive").await;
        assert_eq!(
            (retried.resource.as_str(), retried.holder.as_str()),
            (b.as_str(), "pbx-1/naive"),
            "{name}: one call now holds two agents"
        );
        assert_ne!(retried.token, first.token, "{name}");
        let seen = locks.get(&a).await.expect("get").expect("A in its guard");
        assert_eq!(
            (seen.token, seen.validity),
            (first.token, Duration::ZERO),
            "{name}: A was not extended"
        );
    }
}

fn backends_bounded_to_5s() -> Vec<(&'static str, Locks)> {
    let most = Duration::from_secs(5);
    vec![
        (
            "memory",
            Locks::Memory(MemoryLocks::new(GUARD).with_max_validity(most)),
        ),
        (
            "redis",
            Locks::Redis(Box::new(
                RedisLocks::new(&redis_url(), GUARD, Duration::from_secs(1))
                    .expect("url")
                    .with_quarantine(Duration::ZERO)
                    .with_max_validity(most),
            )),
        ),
    ]
}

#[tokio::test]
async fn a_renewal_without_validity_keeps_the_leases_own_and_max_validity_bounds_all() {
    let too_long = LockError::Invalid(
        "`validity` must be between 100 ms and 5000 ms (lock_service.max_validity)".into(),
    );
    for (name, locks) in backends_bounded_to_5s() {
        assert_eq!(locks.max_validity(), Duration::from_secs(5), "{name}");
        let agent = fresh("own");
        let lease = locks
            .acquire(&agent, &claim("pbx-1/own", "t1", 2000))
            .await
            .expect("free");
        assert_eq!(lease.validity, Duration::from_millis(2000), "{name}");
        let renewed = locks
            .renew(&agent, "pbx-1/own", lease.token, None)
            .await
            .expect("renew");
        assert_eq!(
            (renewed.token, renewed.validity),
            (lease.token, Duration::from_millis(2000)),
            "{name}: the lease's own validity, not a default"
        );
        let seen = locks.get(&agent).await.expect("get").expect("live");
        assert!(
            seen.validity >= Duration::from_millis(1800)
                && seen.validity <= Duration::from_millis(2000),
            "{name}: {seen:?}"
        );
        // A renewal with a validity makes it the lease's own.
        let longer = locks
            .renew(
                &agent,
                "pbx-1/own",
                lease.token,
                Some(Duration::from_millis(3000)),
            )
            .await
            .expect("renew");
        assert_eq!(longer.validity, Duration::from_millis(3000), "{name}");
        let kept = locks
            .renew(&agent, "pbx-1/own", lease.token, None)
            .await
            .expect("renew");
        assert_eq!(kept.validity, Duration::from_millis(3000), "{name}");
        let seen = locks.get(&agent).await.expect("get").expect("live");
        assert!(
            seen.validity >= Duration::from_millis(2800)
                && seen.validity <= Duration::from_millis(3000),
            "{name}: {seen:?}"
        );

        assert_eq!(
            locks
                .renew(
                    &agent,
                    "pbx-1/own",
                    lease.token,
                    Some(Duration::from_millis(5001))
                )
                .await,
            Err(too_long.clone()),
            "{name}: a renewal beyond max_validity"
        );
        let most = locks
            .renew(
                &agent,
                "pbx-1/own",
                lease.token,
                Some(Duration::from_millis(5000)),
            )
            .await
            .expect("max_validity itself is allowed");
        assert_eq!(most.validity, Duration::from_millis(5000), "{name}");

        let other = fresh("own2");
        assert_eq!(
            locks.acquire(&other, &claim("pbx-2/own", "t2", 5001)).await,
            Err(too_long.clone()),
            "{name}: a claim beyond max_validity"
        );
        assert_eq!(
            locks
                .claim_first(&[&other], &claim("pbx-2/own", "t2", 5001))
                .await,
            Err(too_long.clone()),
            "{name}: a claim_first beyond max_validity"
        );
        assert_eq!(locks.get(&other).await.expect("get"), None, "{name}");
        let granted = locks
            .acquire(&other, &claim("pbx-2/own", "t2", 5000))
            .await
            .expect("max_validity itself is allowed");
        assert_eq!(granted.validity, Duration::from_millis(5000), "{name}");
    }
}

#[tokio::test]
async fn a_new_memory_backend_refuses_claims_for_its_startup_quarantine() {
    let locks =
        Locks::Memory(MemoryLocks::new(GUARD).with_startup_quarantine(Duration::from_millis(300)));
    let agent = fresh("start");
    let refused = locks
        .acquire(&agent, &claim("pbx-1/s", "t1", 1000))
        .await
        .expect_err("quarantined");
    assert!(
        matches!(&refused, LockError::Unavailable(why) if why.contains("quarantined")),
        "{refused}"
    );
    let refused = locks
        .claim_first(&[&agent], &claim("pbx-1/s", "t1", 1000))
        .await
        .expect_err("quarantined");
    assert!(
        matches!(&refused, LockError::Unavailable(why) if why.contains("quarantined")),
        "{refused}"
    );
    assert!(!locks.serving().await);
    tokio::time::sleep(Duration::from_millis(320)).await;
    assert!(locks.serving().await);
    let lease = locks
        .acquire(&agent, &claim("pbx-1/s", "t1", 1000))
        .await
        .expect("after the quarantine");
    assert_eq!(lease.resource, agent);
}

#[tokio::test]
async fn without_the_startup_quarantine_a_new_memory_backend_grants_at_once() {
    // The negative control.
    let locks = Locks::Memory(
        MemoryLocks::new(GUARD)
            .with_startup_quarantine(Duration::from_millis(300))
            .with_unsafe_switches(UnsafeLockSwitches {
                no_startup_quarantine: true,
                ..UnsafeLockSwitches::default()
            }),
    );
    assert!(locks.serving().await);
    let agent = fresh("start");
    let lease = locks
        .acquire(&agent, &claim("pbx-1/s", "t1", 1000))
        .await
        .expect("granted at once");
    assert_eq!(lease.resource, agent);
}

#[tokio::test]
async fn one_attempt_acquires_one_resource() {
    for (name, locks) in backends() {
        let (a, b) = (fresh("one-a"), fresh("one-b"));
        let first = locks
            .acquire(&a, &claim("pbx-1/one", "t1", 10_000))
            .await
            .expect("free");
        let refused = locks
            .acquire(&b, &claim("pbx-1/one", "t1", 10_000))
            .await
            .expect_err("the attempt holds A");
        assert!(
            matches!(&refused, LockError::Invalid(why) if why.contains("one attempt") && why.contains(&a)),
            "{name}: {refused}"
        );
        assert_eq!(
            locks.get(&b).await.expect("get"),
            None,
            "{name}: B untouched"
        );
        let seen = locks.get(&a).await.expect("get").expect("A still held");
        assert_eq!(seen.token, first.token, "{name}");
        // The control: a new attempt of the same holder gets B.
        let second = locks
            .acquire(&b, &claim("pbx-1/one", "t2", 10_000))
            .await
            .expect("a new attempt");
        assert_eq!(second.resource, b, "{name}");
    }
}

mod sentinel {
    //! A real master, replica and sentinel of this test's own: claims go to whichever server
    //! the sentinel names master, and a failover (a new run id) starts a quarantine.

    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    use super::*;

    /// A `redis-server` process, killed when dropped.
    struct Server {
        child: Child,
        port: u16,
    }

    impl Server {
        fn start(args: &[String]) -> Self {
            let port = free_port();
            let child = Command::new("redis-server")
                .args(args)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .stdout(Stdio::null())
                .spawn()
                .unwrap_or_else(|err| {
                    panic!("cannot start redis-server ({err}): run ./scripts/test once (it installs it) or apt-get install redis-server")
                });
            Self { child, port }
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/", self.port)
        }

        /// Waits until it answers `PING`.
        async fn connection(&self) -> ::redis::aio::MultiplexedConnection {
            let client = ::redis::Client::open(self.url()).expect("url");
            let started = Instant::now();
            loop {
                if let Ok(mut connection) = client.get_multiplexed_async_connection().await
                    && ::redis::cmd("PING")
                        .query_async::<String>(&mut connection)
                        .await
                        .is_ok()
                {
                    return connection;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "redis-server on port {} never answered",
                    self.port
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port()
    }

    fn data_node(dir: &tempfile::TempDir, name: &str, extra: &[String]) -> Server {
        let mut args = vec![
            "--save".to_owned(),
            String::new(),
            "--appendonly".to_owned(),
            "no".to_owned(),
            "--dir".to_owned(),
            dir.path().display().to_string(),
            "--dbfilename".to_owned(),
            format!("{name}.rdb"),
        ];
        args.extend_from_slice(extra);
        Server::start(&args)
    }

    #[tokio::test]
    async fn claims_follow_the_master_the_sentinel_names_and_a_failover_starts_a_quarantine() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Without the delay the replica's first full sync waits 5 s for more replicas.
        let master = data_node(
            &dir,
            "master",
            &["--repl-diskless-sync-delay".into(), "0".into()],
        );
        let mut on_master = master.connection().await;
        let replica = data_node(
            &dir,
            "replica",
            &[
                "--replicaof".into(),
                "127.0.0.1".into(),
                master.port.to_string(),
            ],
        );
        replica.connection().await;
        // Sentinel rewrites its configuration file, so it gets one of its own.
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor m 127.0.0.1 {} 1\nsentinel down-after-milliseconds m 300\nsentinel failover-timeout m 3000\n",
                master.port
            ),
        )
        .expect("sentinel.conf");
        let sentinel = Server::start(&[
            conf.display().to_string(),
            "--sentinel".into(),
            "--dir".into(),
            dir.path().display().to_string(),
        ]);
        sentinel.connection().await;

        let quarantine = Duration::from_millis(500);
        let locks = Locks::Redis(Box::new(
            RedisLocks::new(
                &format!("redis+sentinel://127.0.0.1:{}/m", sentinel.port),
                GUARD,
                Duration::from_secs(1),
            )
            .expect("sentinel url")
            .with_quarantine(quarantine),
        ));
        // A Redis that never served leases has no marker: the first claim starts the
        // quarantine, then claims go through.
        let refused = locks
            .acquire("agent:1", &claim("pbx-1/c1", "a1", 30_000))
            .await
            .expect_err("no marker yet");
        assert!(
            matches!(&refused, LockError::Unavailable(why) if why.contains("quarantine")),
            "{refused}"
        );
        tokio::time::sleep(quarantine + Duration::from_millis(50)).await;
        let first = locks
            .acquire("agent:1", &claim("pbx-1/c1", "a1", 30_000))
            .await
            .expect("claimed on the master the sentinel names");
        let holder: Option<String> = ::redis::cmd("HGET")
            .arg("lk:{agent:1}")
            .arg("holder")
            .query_async(&mut on_master)
            .await
            .expect("hget");
        assert_eq!(holder.as_deref(), Some("pbx-1/c1"), "written to the master");

        // Behind sentinels a master that accepts writes with no replica in reach loses them
        // at the failover: the start-up check names the setting until it is made.
        let Locks::Redis(redis) = &locks else {
            panic!("a redis backend")
        };
        let min_replicas = |problems: &[String]| {
            problems
                .iter()
                .filter(|p| p.starts_with("min-replicas-to-write is 0"))
                .count()
        };
        let problems = redis.configuration_problems().await.expect("reachable");
        assert_eq!(min_replicas(&problems), 1, "{problems:?}");
        for value in ["1", "0"] {
            let _: () = ::redis::cmd("CONFIG")
                .arg("SET")
                .arg("min-replicas-to-write")
                .arg(value)
                .query_async(&mut on_master)
                .await
                .expect("config set");
            if value == "1" {
                let problems = redis.configuration_problems().await.expect("reachable");
                assert_eq!(min_replicas(&problems), 0, "{problems:?}");
            }
        }

        // The replica has everything, then the master dies and the sentinel promotes it.
        let mut on_replica = replica.connection().await;
        let started = Instant::now();
        loop {
            let copied: Option<String> = ::redis::cmd("HGET")
                .arg("lk:{agent:1}")
                .arg("holder")
                .query_async(&mut on_replica)
                .await
                .expect("hget");
            if copied.is_some() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the replica never caught up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop((on_master, on_replica));
        drop(master);
        let started = Instant::now();
        let refusal = loop {
            match locks
                .acquire("agent:2", &claim("pbx-2/c2", "a2", 30_000))
                .await
            {
                Err(LockError::Unavailable(why)) if why.contains("quarantine") => break why,
                Err(LockError::Unavailable(_)) => {}
                other => panic!("no claim may pass before the quarantine: {other:?}"),
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the sentinel never promoted the replica"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            refusal.contains("restarted") || refusal.contains("lost"),
            "{refusal}"
        );
        tokio::time::sleep(quarantine).await;
        let second = locks
            .acquire("agent:2", &claim("pbx-2/c2", "a2", 30_000))
            .await
            .expect("claims resume on the new master");
        // Sentinel closed the clients of the replica when it promoted it.
        let holder: Option<String> = ::redis::cmd("HGET")
            .arg("lk:{agent:2}")
            .arg("holder")
            .query_async(&mut replica.connection().await)
            .await
            .expect("hget");
        assert_eq!(
            holder.as_deref(),
            Some("pbx-2/c2"),
            "written to the new master"
        );
        let held = locks
            .acquire("agent:1", &claim("pbx-3/c3", "a3", 30_000))
            .await
            .expect_err("the replicated lease survived the failover");
        assert!(matches!(held, LockError::Held { .. }), "{held}");
        assert!(second.token > first.token);
    }
}

mod model_agreement {
    //! Random operation sequences run against the memory backend (the model) and the Redis
    //! scripts: both must give the same answers, and every new token must be larger than
    //! the last one issued for its resource.

    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Acquire {
            resource: usize,
            holder: usize,
            attempt: usize,
        },
        ClaimFirst {
            order: Vec<usize>,
            holder: usize,
            attempt: usize,
        },
        Renew {
            resource: usize,
            holder: usize,
            stale: bool,
        },
        Release {
            resource: usize,
            holder: usize,
            stale: bool,
        },
        Get {
            resource: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..3usize, 0..3usize, 0..3usize).prop_map(|(resource, holder, attempt)| Op::Acquire {
                resource,
                holder,
                attempt
            }),
            (
                proptest::sample::subsequence(vec![0usize, 1, 2], 1..=3),
                0..3usize,
                0..3usize
            )
                .prop_map(|(order, holder, attempt)| Op::ClaimFirst {
                    order,
                    holder,
                    attempt
                }),
            (0..3usize, 0..3usize, any::<bool>()).prop_map(|(resource, holder, stale)| Op::Renew {
                resource,
                holder,
                stale
            }),
            (0..3usize, 0..3usize, any::<bool>()).prop_map(|(resource, holder, stale)| {
                Op::Release {
                    resource,
                    holder,
                    stale,
                }
            }),
            (0..3usize).prop_map(|resource| Op::Get { resource }),
        ]
    }

    /// One backend and what the test has seen of it.
    struct Side {
        locks: Locks,
        names: Vec<String>,
        prefix: String,
        tokens: HashMap<usize, u64>,
    }

    /// What an answer means, without the token's value (each backend has its own clock).
    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        Lease {
            resource: usize,
            holder: String,
            new_token: bool,
        },
        None,
        Done,
        Err(&'static str),
    }

    impl Side {
        fn new(locks: Locks, prefix: &str) -> Self {
            Self {
                locks,
                names: (0..3).map(|i| fresh(&format!("m{i}"))).collect(),
                prefix: prefix.to_owned(),
                tokens: HashMap::new(),
            }
        }

        fn index(&self, resource: &str) -> usize {
            self.names
                .iter()
                .position(|n| n == resource)
                .expect("one of ours")
        }

        fn lease(&mut self, lease: Lease) -> Outcome {
            let resource = self.index(&lease.resource);
            let previous = self.tokens.insert(resource, lease.token);
            let new_token = previous != Some(lease.token);
            if let Some(previous) = previous {
                assert!(
                    lease.token >= previous,
                    "token went back: {previous} then {}",
                    lease.token
                );
            }
            Outcome::Lease {
                resource,
                holder: lease.holder,
                new_token,
            }
        }

        fn error(err: LockError) -> Outcome {
            Outcome::Err(match err {
                LockError::Held { .. } => "held",
                LockError::Gone { .. } => "gone",
                LockError::NotYours { .. } => "not yours",
                LockError::Unavailable(_) => "unavailable",
                LockError::Invalid(_) => "invalid",
                LockError::NotWaiting { .. } => "not waiting",
                LockError::QueueFull { .. } => "queue full",
            })
        }

        async fn apply(&mut self, op: &Op) -> Outcome {
            // Unique per case: attempt indexes outlive a case in the shared Redis.
            let prefix = self.prefix.clone();
            let holder = |h: usize| format!("pbx-{h}/{prefix}");
            let attempt = |a: usize| format!("attempt-{a}");
            match op {
                Op::Acquire {
                    resource,
                    holder: h,
                    attempt: a,
                } => {
                    let (h, a) = (holder(*h), attempt(*a));
                    let claim = super::claim(&h, &a, 30_000);
                    let name = self.names[*resource].clone();
                    match self.locks.acquire(&name, &claim).await {
                        Ok(lease) => self.lease(lease),
                        Err(err) => Self::error(err),
                    }
                }
                Op::ClaimFirst {
                    order,
                    holder: h,
                    attempt: a,
                } => {
                    let (h, a) = (holder(*h), attempt(*a));
                    let claim = super::claim(&h, &a, 30_000);
                    let names: Vec<String> = order.iter().map(|i| self.names[*i].clone()).collect();
                    let candidates: Vec<&str> = names.iter().map(String::as_str).collect();
                    match self.locks.claim_first(&candidates, &claim).await {
                        Ok(Some(lease)) => self.lease(lease),
                        Ok(None) => Outcome::None,
                        Err(err) => Self::error(err),
                    }
                }
                Op::Renew {
                    resource,
                    holder: h,
                    stale,
                }
                | Op::Release {
                    resource,
                    holder: h,
                    stale,
                } => {
                    let token = self.tokens.get(resource).copied().unwrap_or(1) - u64::from(*stale);
                    let name = self.names[*resource].clone();
                    let result = if matches!(op, Op::Renew { .. }) {
                        self.locks
                            .renew(&name, &holder(*h), token, Some(Duration::from_secs(30)))
                            .await
                            .map(|_| ())
                    } else {
                        self.locks.release(&name, &holder(*h), token).await
                    };
                    match result {
                        Ok(()) => Outcome::Done,
                        Err(err) => Self::error(err),
                    }
                }
                Op::Get { resource } => {
                    let name = self.names[*resource].clone();
                    match self.locks.get(&name).await {
                        Ok(Some(lease)) => Outcome::Lease {
                            resource: *resource,
                            holder: lease.holder,
                            new_token: false,
                        },
                        Ok(None) => Outcome::None,
                        Err(err) => Self::error(err),
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn redis_scripts_agree_with_the_memory_model(ops in proptest::collection::vec(op(), 1..25)) {
            super::proptest_runtime().block_on(async {
                let prefix = fresh("case");
                let mut model = Side::new(Locks::Memory(MemoryLocks::new(GUARD)), &prefix);
                let mut redis = Side::new(Locks::Redis(Box::new(
                    RedisLocks::new(&redis_url(), GUARD, Duration::from_secs(1))
                        .expect("url")
                        .with_quarantine(Duration::ZERO),
                )), &prefix);
                for (step, op) in ops.iter().enumerate() {
                    let expected = model.apply(op).await;
                    let got = redis.apply(op).await;
                    assert_eq!(got, expected, "step {step}: {op:?}\nops: {ops:?}");
                }
            });
        }
    }
}

/// The runtime the proptests of the backends share (a proptest case cannot be async).
pub(super) fn proptest_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}
