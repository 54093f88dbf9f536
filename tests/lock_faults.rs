//! Fault harness for the lock service: holders claim agents and ring them while Redis,
//! the lock service or a holder fails, and a checker reads the ring history.
//!
//! Each scenario runs a dedicated `redis-server` (AOF, `appendfsync always`, noeviction)
//! on a free loopback port, `callfleet lock-service` as a process in front of it, six
//! holder tasks competing for four agents, and a ring "endpoint" standing for the phones.
//! The endpoint checks what a PBX can check where the ring happens: a ring whose token is
//! below one it has already seen for that agent, or whose lease deadline has passed, is
//! refused. Every claim, ring and refusal goes to a JSONL history that
//! `callfleet_lock_service::checker` judges: two rings of one agent with different tokens
//! overlapping, tokens not increasing, a ring past its deadline plus the guard.
//!
//! The harness must be able to fail: the same scenarios run against a naive lock (plain
//! `SET NX` + `INCR` tokens, no quarantine, no deadlines, client retries, renewals that
//! trust any reply), the design the old system used, and those runs must be
//! reported as violating.
//!
//! Timings are shortened so that a scenario takes about 25 s: validity 2 s, guard 1 s,
//! renew every 500 ms, quarantine 3.5 s (longer than validity + guard, as in production).
//! Run one with its report: `cargo nextest run --test lock_faults --no-capture`.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use callfleet_lock_service::checker::{self, Event, Violation};
use callfleet_lock_service::client::LeaseKeeper;
use callfleet_lock_service::lease::Lease;
use callfleet_proto::lock::v1 as pb;
use callfleet_proto::lock::v1::locks_client::LocksClient;
use support::*;
use tokio_util::sync::CancellationToken;

const HOLDERS: usize = 6;
const AGENTS: usize = 4;
const VALIDITY: Duration = Duration::from_secs(2);
const GUARD: Duration = Duration::from_secs(1);
const RENEW_EVERY: Duration = Duration::from_millis(500);
const RPC_DEADLINE: Duration = Duration::from_millis(400);
const QUARANTINE: Duration = Duration::from_millis(3500);
/// The lock service's deadline on each Redis call.
const REDIS_DEADLINE: Duration = Duration::from_millis(300);
/// Rings last 1 s up to this long (a real ring lasts up to 20–30 s), renewed meanwhile.
const RING_MAX_MS: u64 = 8000;
/// When the fault strikes, and how long the holders keep going in all.
const FAULT_AT: Duration = Duration::from_secs(4);
const RUN_FOR: Duration = Duration::from_secs(22);
/// Longer than validity + guard: every lease of the moment runs out during it.
const OUTAGE: Duration = Duration::from_secs(4);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// SIGSTOP Redis for [`OUTAGE`], then SIGCONT.
    RedisPause,
    /// kill -9 Redis; restart it a second later on its AOF.
    RedisKill,
    /// kill -9 Redis; restart it a second later with its data gone.
    RedisEmpty,
    /// kill -9 the lock service; restart it two seconds later.
    ServiceKill,
    /// One holder freezes for [`OUTAGE`] between its last look at the lease and its ring
    /// (a GC pause, a SIGSTOP), twice.
    HolderPause,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    /// Holders use `callfleet lock-service` over gRPC with [`LeaseKeeper`].
    Callfleet,
    /// Holders talk to Redis directly, the naive way.
    Naive,
}

/// What the endpoint checks before it lets a ring start.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Endpoint {
    Fenced,
    Unchecked,
}

// ---------------------------------------------------------------------------------------
// Processes

/// A `redis-server` of this scenario's own, on a fixed port and folder so it can restart.
struct Redis {
    port: u16,
    dir: PathBuf,
    process: Option<Running>,
}

impl Redis {
    fn start(dir: &Path) -> Self {
        let mut redis = Self {
            port: free_port(),
            dir: dir.join("redis"),
            process: None,
        };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.dir).expect("create the redis folder");
        let server = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|path| Path::new(path).is_file())
            .expect("redis-server is missing (Debian package redis-server): run ./scripts/test, which installs it");
        let child = Command::new(server)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
            ])
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.process = Some(Running { child });
        let port = self.port;
        wait_until("redis answers PING", Duration::from_secs(20), || {
            redis_ping(port)
        });
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn signal(&self, name: &str) {
        self.process.as_ref().expect("redis runs").signal(name);
    }

    fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.signal("KILL");
            let _ = process.child.wait();
        }
    }

    /// Deletes the AOF and everything else Redis kept: a restart on a new, empty disk.
    fn lose_data(&self) {
        std::fs::remove_dir_all(&self.dir).expect("remove the redis folder");
    }
}

fn ms(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

fn redis_ping(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// `callfleet lock-service` on Redis with the harness's timings.
struct Service {
    port: u16,
    redis_url: String,
    log: PathBuf,
    process: Option<Running>,
    starts: u32,
}

impl Service {
    fn start(redis_url: String, dir: &Path) -> Self {
        let mut service = Self {
            port: free_port(),
            redis_url,
            log: dir.join("lock-service.log"),
            process: None,
            starts: 0,
        };
        service.spawn();
        service
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the service log");
        let child = callfleet()
            .arg("lock-service")
            .env(
                "CALLFLEET_LOCK_SERVICE__LISTEN",
                format!("127.0.0.1:{}", self.port),
            )
            .env("CALLFLEET_LOCK_SERVICE__BACKEND", "redis")
            .env("CALLFLEET_LOCK_SERVICE__REDIS_URL", &self.redis_url)
            .env("CALLFLEET_LOCK_SERVICE__VALIDITY", ms(VALIDITY))
            .env("CALLFLEET_LOCK_SERVICE__GUARD", ms(GUARD))
            .env("CALLFLEET_LOCK_SERVICE__DEADLINE", ms(REDIS_DEADLINE))
            .env("CALLFLEET_LOCK_SERVICE__QUARANTINE", ms(QUARANTINE))
            .env("CALLFLEET_LOCK_SERVICE__STRICT", "true")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start lock-service");
        self.process = Some(Running { child });
        self.starts += 1;
        let (log, starts) = (self.log.clone(), self.starts as usize);
        wait_until("lock service ready", Duration::from_secs(20), || {
            std::fs::read_to_string(&log)
                .is_ok_and(|text| text.matches("lock service ready").count() >= starts)
        });
    }

    fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.signal("KILL");
            let _ = process.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// History and endpoint

/// The shared clock and the JSONL history every participant writes to.
struct History {
    epoch: Instant,
    events: Mutex<Vec<Event>>,
}

impl History {
    fn ms(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.epoch).as_secs_f64() * 1000.0
    }

    fn now_ms(&self) -> f64 {
        self.ms(Instant::now())
    }

    fn record(&self, node: &str, op: &str, outcome: &str, lease: Option<(&Held, f64)>) {
        let (resource, attempt, token, deadline_ms) = match lease {
            Some((held, deadline_ms)) => (
                held.resource.clone(),
                held.attempt.clone(),
                held.token,
                deadline_ms,
            ),
            None => (String::new(), String::new(), 0, 0.0),
        };
        let event = Event {
            t_ms: self.now_ms(),
            node: node.to_owned(),
            op: op.to_owned(),
            outcome: outcome.to_owned(),
            resource,
            attempt,
            token,
            deadline_ms,
        };
        self.events.lock().expect("history lock").push(event);
    }
}

/// What a holder knows of its lease.
#[derive(Debug, Clone)]
struct Held {
    resource: String,
    attempt: String,
    token: u64,
}

/// The phones: the last place a double ring can be stopped.
struct Phones {
    check: Endpoint,
    highest_token: Mutex<HashMap<String, u64>>,
    refused: AtomicU64,
}

impl Phones {
    /// Starts ringing `held.resource` unless the token or the deadline says the lease is
    /// no longer the holder's; records the ring start or the refusal.
    fn ring(&self, history: &History, node: &str, held: &Held, deadline_ms: f64) -> bool {
        let mut highest = self.highest_token.lock().expect("phones lock");
        let seen = highest.entry(held.resource.clone()).or_insert(0);
        let refusal = if self.check == Endpoint::Unchecked {
            None
        } else if held.token < *seen {
            Some("refused: token below one already seen")
        } else if history.now_ms() > deadline_ms {
            Some("refused: lease deadline passed")
        } else {
            None
        };
        match refusal {
            Some(reason) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                history.record(node, "ring_refused", reason, Some((held, deadline_ms)));
                false
            }
            None => {
                *seen = (*seen).max(held.token);
                history.record(node, "ring_start", "ok", Some((held, deadline_ms)));
                true
            }
        }
    }

    fn hang_up(&self, history: &History, node: &str, held: &Held, deadline_ms: f64) {
        history.record(node, "ring_end", "ok", Some((held, deadline_ms)));
    }
}

// ---------------------------------------------------------------------------------------
// Holders

/// A small deterministic generator per holder (no global randomness in a test).
struct Rng(u64);

impl Rng {
    fn for_holder(index: usize) -> Self {
        Self(0x9e37_79b9_7f4a_7c15 ^ ((index as u64 + 1) * 0x2545_f491))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low)
    }

    fn shuffled_agents(&mut self) -> Vec<String> {
        let mut agents: Vec<String> = (0..AGENTS).map(|i| format!("agent:{i}")).collect();
        for i in (1..agents.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            agents.swap(i, j);
        }
        agents
    }
}

struct Shared {
    history: History,
    phones: Phones,
    stop: CancellationToken,
    /// Set by the harness: the holder that sees it freezes before its next ring.
    freeze_next: AtomicBool,
    requests: AtomicU64,
    claims: AtomicU64,
}

/// Claims, rings and releases through the lock service until the harness stops.
async fn callfleet_holder(index: usize, port: u16, shared: Arc<Shared>) {
    let node = format!("node-{index}");
    let mut rng = Rng::for_holder(index);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("endpoint")
        .connect_timeout(RPC_DEADLINE)
        .connect_lazy();
    let client = LocksClient::new(channel);
    let mut call = 0u64;
    while !shared.stop.is_cancelled() {
        call += 1;
        let attempt = format!("{node}-{call}");
        shared.requests.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let request = pb::ClaimFirstRequest {
            candidates: rng.shuffled_agents(),
            holder: format!("{node}/{attempt}"),
            attempt: attempt.clone(),
            validity_ms: VALIDITY.as_millis() as u64,
        };
        let reply = tokio::time::timeout(RPC_DEADLINE, client.clone().claim_first(request)).await;
        let granted = match reply {
            Ok(Ok(reply)) => reply.into_inner().lease,
            Ok(Err(status)) => {
                let outcome = format!("error: {:?}", status.code());
                shared.history.record(&node, "claim", &outcome, None);
                pause(&shared, 100).await;
                continue;
            }
            Err(_) => {
                shared
                    .history
                    .record(&node, "claim", "error: timeout", None);
                pause(&shared, 100).await;
                continue;
            }
        };
        let Some(granted) = granted else {
            pause(&shared, 20).await;
            continue;
        };
        shared.claims.fetch_add(1, Ordering::Relaxed);
        let lease = Lease {
            resource: granted.resource,
            holder: granted.holder,
            attempt: granted.attempt,
            token: granted.token,
            validity: Duration::from_millis(granted.validity_ms),
        };
        let held = Held {
            resource: lease.resource.clone(),
            attempt: lease.attempt.clone(),
            token: lease.token,
        };
        let keeper = LeaseKeeper::start(client.clone(), lease, sent, RENEW_EVERY, RPC_DEADLINE);
        let deadline_ms = |keeper: &LeaseKeeper| shared.history.ms(keeper.valid_until());
        shared
            .history
            .record(&node, "claim", "ok", Some((&held, deadline_ms(&keeper))));
        if Instant::now() >= keeper.valid_until() {
            continue; // the claim's reply came too late to act on
        }
        if shared.freeze_next.swap(false, Ordering::AcqRel) {
            // Frozen: no renewals, no second look at the clock. Whatever the holder does
            // next, it does on what it knew before.
            let deadline = deadline_ms(&keeper);
            drop(keeper);
            shared
                .history
                .record(&node, "frozen", "ok", Some((&held, deadline)));
            tokio::time::sleep(OUTAGE).await;
            if shared.phones.ring(&shared.history, &node, &held, deadline) {
                let ring_for = rng.between(1000, 3000);
                pause(&shared, ring_for).await;
                shared
                    .phones
                    .hang_up(&shared.history, &node, &held, deadline);
            }
            continue;
        }
        if !shared
            .phones
            .ring(&shared.history, &node, &held, deadline_ms(&keeper))
        {
            let _ = keeper.release().await;
            continue;
        }
        let lost = keeper.lost();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(rng.between(1000, RING_MAX_MS))) => {}
            _ = lost.cancelled() => {}
            _ = shared.stop.cancelled() => {}
        }
        shared
            .phones
            .hang_up(&shared.history, &node, &held, deadline_ms(&keeper));
        let outcome = match keeper.release().await {
            Ok(()) => "ok".to_owned(),
            Err(status) => format!("error: {:?}", status.code()),
        };
        shared
            .history
            .record(&node, "release", &outcome, Some((&held, 0.0)));
    }
}

async fn pause(shared: &Shared, ms: u64) {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
        _ = shared.stop.cancelled() => {}
    }
}

/// The naive lock: what a first implementation on Redis tends to look like.
struct NaiveLock {
    redis: redis::aio::ConnectionManager,
}

impl NaiveLock {
    async fn connect(url: &str) -> Self {
        let client = redis::Client::open(url).expect("redis url");
        // "Redis is fast": no response deadline, and the library reconnects and retries.
        let config = redis::aio::ConnectionManagerConfig::new().set_response_timeout(None);
        let redis = redis::aio::ConnectionManager::new_with_config(client, config)
            .await
            .expect("connect to redis");
        Self { redis }
    }

    /// Runs `command`, retrying failures a few times as a careful-looking client does.
    async fn with_retries<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Option<T> {
        for _ in 0..5 {
            let mut redis = self.redis.clone();
            if let Ok(value) = command.query_async::<T>(&mut redis).await {
                return Some(value);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }

    /// `SET NX PX` then `INCR` for the token; the lease runs from the reply.
    async fn claim_first(&self, holder: &str, candidates: &[String]) -> Option<(String, u64)> {
        for resource in candidates {
            let set = redis::cmd("SET")
                .arg(format!("naive:lk:{resource}"))
                .arg(holder)
                .arg("NX")
                .arg("PX")
                .arg(VALIDITY.as_millis() as u64)
                .clone();
            let granted: Option<Option<String>> = self.with_retries(&set).await;
            if let Some(Some(_)) = granted {
                let token: u64 = self
                    .with_retries(redis::cmd("INCR").arg(format!("naive:fence:{resource}")))
                    .await?;
                return Some((resource.clone(), token));
            }
        }
        None
    }

    /// Extends the key; any answer counts as renewed.
    async fn renew(&self, resource: &str) -> bool {
        self.with_retries::<i64>(
            redis::cmd("PEXPIRE")
                .arg(format!("naive:lk:{resource}"))
                .arg(VALIDITY.as_millis() as u64),
        )
        .await
        .is_some()
    }

    async fn release(&self, resource: &str) {
        let _: Option<i64> = self
            .with_retries(redis::cmd("DEL").arg(format!("naive:lk:{resource}")))
            .await;
    }
}

/// The same holder loop on the naive lock.
async fn naive_holder(index: usize, redis_url: String, shared: Arc<Shared>) {
    let node = format!("node-{index}");
    let mut rng = Rng::for_holder(index);
    let lock = NaiveLock::connect(&redis_url).await;
    let mut call = 0u64;
    while !shared.stop.is_cancelled() {
        call += 1;
        let attempt = format!("{node}-{call}");
        let (holder, candidates) = (format!("{node}/{attempt}"), rng.shuffled_agents());
        shared.requests.fetch_add(1, Ordering::Relaxed);
        let claimed = tokio::select! {
            claimed = lock.claim_first(&holder, &candidates) => claimed,
            _ = shared.stop.cancelled() => break,
        };
        let Some((resource, token)) = claimed else {
            pause(&shared, 20).await;
            continue;
        };
        shared.claims.fetch_add(1, Ordering::Relaxed);
        let held = Held {
            resource: resource.clone(),
            attempt,
            token,
        };
        let mut deadline = shared.history.ms(Instant::now() + VALIDITY);
        shared
            .history
            .record(&node, "claim", "ok", Some((&held, deadline)));
        if !shared.phones.ring(&shared.history, &node, &held, deadline) {
            lock.release(&resource).await;
            continue;
        }
        let ring_until = Instant::now() + Duration::from_millis(rng.between(1000, RING_MAX_MS));
        while Instant::now() < ring_until && !shared.stop.is_cancelled() {
            tokio::time::sleep(RENEW_EVERY.min(ring_until - Instant::now())).await;
            if !lock.renew(&resource).await {
                break;
            }
            deadline = shared.history.ms(Instant::now() + VALIDITY);
        }
        shared
            .phones
            .hang_up(&shared.history, &node, &held, deadline);
        lock.release(&resource).await;
        shared
            .history
            .record(&node, "release", "ok", Some((&held, 0.0)));
    }
}

// ---------------------------------------------------------------------------------------
// Scenario

struct Report {
    requests: u64,
    claims: u64,
    rings: usize,
    rings_after_fault: usize,
    refused: u64,
    violations: Vec<Violation>,
}

fn run_scenario(name: &str, variant: Variant, endpoint: Endpoint, fault: Fault) -> Report {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut redis = Redis::start(dir.path());
    let mut service =
        (variant == Variant::Callfleet).then(|| Service::start(redis.url(), dir.path()));
    let shared = Arc::new(Shared {
        history: History {
            epoch: Instant::now(),
            events: Mutex::new(Vec::new()),
        },
        phones: Phones {
            check: endpoint,
            highest_token: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
        },
        stop: CancellationToken::new(),
        freeze_next: AtomicBool::new(false),
        requests: AtomicU64::new(0),
        claims: AtomicU64::new(0),
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let holders: Vec<_> = (0..HOLDERS)
        .map(|index| match variant {
            Variant::Callfleet => runtime.spawn(callfleet_holder(
                index,
                service.as_ref().expect("service runs").port,
                shared.clone(),
            )),
            Variant::Naive => runtime.spawn(naive_holder(index, redis.url(), shared.clone())),
        })
        .collect();

    let started = Instant::now();
    let sleep_until = |at: Duration| std::thread::sleep(at.saturating_sub(started.elapsed()));
    sleep_until(FAULT_AT);
    let fault_ms = shared.history.now_ms();
    shared
        .history
        .record("harness", "fault", &format!("{fault:?}"), None);
    match fault {
        Fault::RedisPause => {
            redis.signal("STOP");
            std::thread::sleep(OUTAGE);
            redis.signal("CONT");
        }
        Fault::RedisKill | Fault::RedisEmpty => {
            redis.kill();
            if fault == Fault::RedisEmpty {
                redis.lose_data();
            }
            std::thread::sleep(Duration::from_secs(1));
            redis.spawn();
        }
        Fault::ServiceKill => {
            let service = service.as_mut().expect("the service runs in this variant");
            service.kill();
            std::thread::sleep(Duration::from_secs(2));
            service.spawn();
        }
        Fault::HolderPause => {
            shared.freeze_next.store(true, Ordering::Release);
            sleep_until(FAULT_AT + Duration::from_secs(8));
            shared.freeze_next.store(true, Ordering::Release);
        }
    }
    shared
        .history
        .record("harness", "fault_over", &format!("{fault:?}"), None);
    sleep_until(RUN_FOR);
    shared.stop.cancel();
    runtime.block_on(async {
        for holder in holders {
            tokio::time::timeout(Duration::from_secs(10), holder)
                .await
                .expect("holders stop within 10 s")
                .expect("holder task");
        }
    });
    drop(runtime);
    drop(service);

    let events = shared.history.events.lock().expect("history").clone();
    let path = write_history(name, &events);
    let violations = checker::check(&events, GUARD.as_secs_f64() * 1000.0);
    let rings = checker::rings(&events);
    let report = Report {
        requests: shared.requests.load(Ordering::Relaxed),
        claims: shared.claims.load(Ordering::Relaxed),
        rings: rings.len(),
        rings_after_fault: rings
            .iter()
            .filter(|r| r.start_ms > fault_ms + 1000.0)
            .count(),
        refused: shared.phones.refused.load(Ordering::Relaxed),
        violations,
    };
    println!(
        "{name}: {} claim requests, {} granted, {} rings ({} after the fault), {} rings refused by the endpoint, {} violations; history {}",
        report.requests,
        report.claims,
        report.rings,
        report.rings_after_fault,
        report.refused,
        report.violations.len(),
        path.display()
    );
    for violation in report.violations.iter().take(5) {
        println!("  {violation:?}");
    }
    report
}

/// Keeps the history where a person can read it after the run.
fn write_history(name: &str, events: &[Event]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lock-faults");
    std::fs::create_dir_all(&dir).expect("create the history folder");
    let path = dir.join(format!("{name}.jsonl"));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).expect("history file"));
    for event in events {
        serde_json::to_writer(&mut file, event).expect("write event");
        file.write_all(b"\n").expect("write event");
    }
    path
}

fn assert_safe_and_live(report: &Report) {
    assert!(
        report.violations.is_empty(),
        "violations: {:#?}",
        report.violations
    );
    assert!(
        report.rings >= 10,
        "only {} rings: the harness did not exercise the locks",
        report.rings
    );
    assert!(
        report.rings_after_fault >= 4,
        "only {} rings after the fault: the service did not recover",
        report.rings_after_fault
    );
}

// ---------------------------------------------------------------------------------------
// The scenarios

#[test]
fn redis_paused_past_every_lease() {
    let report = run_scenario(
        "callfleet-redis-pause",
        Variant::Callfleet,
        Endpoint::Fenced,
        Fault::RedisPause,
    );
    assert_safe_and_live(&report);
}

#[test]
fn redis_killed_and_restarted_on_its_aof() {
    let report = run_scenario(
        "callfleet-redis-kill-aof",
        Variant::Callfleet,
        Endpoint::Fenced,
        Fault::RedisKill,
    );
    assert_safe_and_live(&report);
}

#[test]
fn redis_restarted_empty() {
    let report = run_scenario(
        "callfleet-redis-empty",
        Variant::Callfleet,
        Endpoint::Fenced,
        Fault::RedisEmpty,
    );
    assert_safe_and_live(&report);
    // The quarantine keeps the tokens ahead of everything the phones saw: no refusals.
    assert_eq!(report.refused, 0, "tokens went back after the data loss");
}

#[test]
fn lock_service_killed_and_restarted() {
    let report = run_scenario(
        "callfleet-service-kill",
        Variant::Callfleet,
        Endpoint::Fenced,
        Fault::ServiceKill,
    );
    assert_safe_and_live(&report);
}

#[test]
fn a_frozen_holder_is_stopped_by_the_fenced_endpoint() {
    let report = run_scenario(
        "callfleet-holder-pause",
        Variant::Callfleet,
        Endpoint::Fenced,
        Fault::HolderPause,
    );
    assert_safe_and_live(&report);
    assert!(
        report.refused >= 2,
        "both frozen rings must be refused, refused {}",
        report.refused
    );
}

/// Why the token and deadline must be checked where the ring happens: the lock service
/// cannot stop a holder that froze after its last look at the lease.
#[test]
fn a_frozen_holder_double_rings_when_the_endpoint_checks_nothing() {
    let report = run_scenario(
        "callfleet-holder-pause-unchecked",
        Variant::Callfleet,
        Endpoint::Unchecked,
        Fault::HolderPause,
    );
    assert!(
        report
            .violations
            .iter()
            .any(|v| matches!(v, Violation::PastDeadline(_))),
        "a frozen holder rang past its deadline, and the checker must say so: {:?}",
        report.violations
    );
}

/// The checker catches the naive lock: a Redis pause lets every lease expire while the
/// holders, waiting without a deadline, keep ringing and then take any reply as a renewal.
#[test]
fn the_naive_lock_double_rings_when_redis_pauses() {
    let report = run_scenario(
        "naive-redis-pause",
        Variant::Naive,
        Endpoint::Fenced,
        Fault::RedisPause,
    );
    assert!(
        report
            .violations
            .iter()
            .any(|v| matches!(v, Violation::Overlap(..))),
        "the naive lock must be reported as double-ringing: {:?}",
        report.violations
    );
}

/// With its data gone, the naive lock's `INCR` starts again at 1: tokens go back, and
/// only the endpoint's check can refuse them.
#[test]
fn the_naive_lock_reissues_old_tokens_after_redis_restarts_empty() {
    let report = run_scenario(
        "naive-redis-empty",
        Variant::Naive,
        Endpoint::Fenced,
        Fault::RedisEmpty,
    );
    assert!(
        report.refused > 0,
        "tokens below those already seen must reach the endpoint"
    );
}

/// The same loss with an endpoint that checks nothing: the lost keys are claimed again
/// while their holders, whose renewals "succeed" on missing keys, still ring.
#[test]
fn the_naive_lock_double_rings_when_redis_restarts_empty() {
    let report = run_scenario(
        "naive-redis-empty-unchecked",
        Variant::Naive,
        Endpoint::Unchecked,
        Fault::RedisEmpty,
    );
    assert!(
        report
            .violations
            .iter()
            .any(|v| matches!(v, Violation::Overlap(..))),
        "the naive lock must be reported as double-ringing: {:?}",
        report.violations
    );
}
