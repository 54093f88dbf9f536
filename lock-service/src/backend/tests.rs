//! Every scenario runs on both backends: the memory backend must behave like Redis.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use callfleet_core::testing::redis_url;

use super::*;

const GUARD: Duration = Duration::from_millis(100);

fn backends() -> Vec<(&'static str, Locks)> {
    vec![
        ("memory", Locks::Memory(MemoryLocks::new(GUARD))),
        (
            "redis",
            Locks::Redis(Box::new(
                RedisLocks::new(&redis_url(), GUARD, Duration::from_secs(1))
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
    for (name, locks) in backends() {
        let agent = fresh("e");
        let first = locks
            .acquire(&agent, &claim("pbx-1/c1", "t1", 150))
            .await
            .expect("free");
        tokio::time::sleep(Duration::from_millis(180)).await;
        assert!(
            locks
                .acquire(&agent, &claim("pbx-2/c2", "t2", 150))
                .await
                .is_err(),
            "{name}: validity over, guard not yet"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        let second = locks
            .acquire(&agent, &claim("pbx-2/c2", "t2", 150))
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
    use std::sync::OnceLock;

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

    fn runtime() -> &'static tokio::runtime::Runtime {
        static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
        RUNTIME.get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn redis_scripts_agree_with_the_memory_model(ops in proptest::collection::vec(op(), 1..25)) {
            runtime().block_on(async {
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
