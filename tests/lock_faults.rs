//! Fault harness for the lock service: holders claim agents and ring them while Redis,
//! the lock service or a holder fails, and a checker reads the history.
//!
//! Each scenario runs a dedicated `redis-server` (AOF, `appendfsync always`, noeviction)
//! on a free loopback port, one to three `callfleet lock-service` processes in front of it
//! (or one on the memory backend), six holders competing for four agents, and a ring
//! "endpoint" standing for the phones. Holders come in two kinds: the node-agent's, which
//! renews through [`LeaseKeeper`], and the README dialplan's, which claims once with a
//! `ttl` and rings at most until that runs out, never renewing. The endpoint checks what a
//! PBX can check where the ring happens: a ring whose token is below one it has already
//! seen for that agent, or whose lease deadline has passed, is refused. Every claim, ring
//! and refusal goes to a JSONL history that `callfleet_lock_service::checker` judges:
//! grants of one agent live at once, one call holding two agents, rings overlapping,
//! tokens not increasing, rings past their deadline.
//!
//! Every scenario of a data loss runs twice: with the protection that keeps it safe, and
//! with that one protection switched off (`CALLFLEET_TEST_UNSAFE_LOCKS`, a switch only
//! tests use) — which must be reported as violating, so the harness is shown to catch
//! what the protection prevents. A naive lock (plain `SET NX` + `INCR` tokens, no
//! quarantine, no deadlines, client retries) is the control of the scenarios that need no
//! switch.
//!
//! Timings are shortened so that a scenario takes about 35 s: the node-agent's validity
//! 2 s renewed every 500 ms, the dialplan's `ttl` 6 s (the services' `max_validity`),
//! guard 1 s, quarantine 7.5 s (longer than max_validity + guard, as the configuration
//! demands); the holders start once the services' first quarantine is over. Run one with
//! its report:
//! `cargo nextest run --test lock_faults --no-capture flush`.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use callfleet_lock_service::checker::{self, Event, Violation};
use callfleet_lock_service::client::LeaseKeeper;
use callfleet_lock_service::lease::Lease;
use callfleet_proto::lock::v1 as pb;
use callfleet_proto::lock::v1::locks_client::LocksClient;
use support::redis_server::Redis;
use support::*;
use tokio_util::sync::CancellationToken;

const HOLDERS: usize = 6;
const AGENTS: usize = 4;
/// The validity of the node-agent's leases, which it renews.
const VALIDITY: Duration = Duration::from_secs(2);
/// The dialplan's `ttl`, which it never renews: the services' `max_validity`.
const DIALPLAN_TTL: Duration = Duration::from_secs(6);
const GUARD: Duration = Duration::from_secs(1);
const RENEW_EVERY: Duration = Duration::from_millis(500);
const RPC_DEADLINE: Duration = Duration::from_millis(400);
/// Longer than [`DIALPLAN_TTL`] + [`GUARD`], as the configuration demands.
const QUARANTINE: Duration = Duration::from_millis(7500);
/// The lock service's deadline on each Redis call.
const REDIS_DEADLINE: Duration = Duration::from_millis(300);
/// Rings last 1 s up to this long (a real ring lasts up to 20–30 s), renewed meanwhile.
const RING_MAX_MS: u64 = 8000;
/// When the fault strikes, and how long the holders keep going in all.
const FAULT_AT: Duration = Duration::from_secs(6);
const RUN_FOR: Duration = Duration::from_secs(26);
/// Longer than validity + guard: every lease of the moment runs out during it.
const OUTAGE: Duration = Duration::from_secs(4);
/// What the lock service logs when it finds Redis has lost leases.
const LOSS_NOTICED: &str = "redis may have lost leases";
/// How much of Redis's last writes a host reboot loses (`appendfsync everysec`, a disk
/// cache that lies).
const LOST_TAIL: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Nothing fails (the holders' own trouble is the scenario).
    None,
    /// SIGSTOP Redis for [`OUTAGE`], then SIGCONT.
    RedisPause,
    /// `FLUSHALL`: every lease and the boot marker are gone at once.
    RedisFlush,
    /// kill -9 Redis; restart it 200 ms later with its data gone. The last lock-service
    /// instance is killed with it and started again 600 ms after Redis is back, after the
    /// others have seen the loss (a node that reboots).
    RedisEmptyWithOneInstanceRestarting,
    /// kill -9 Redis; restart it 200 ms later with its data gone; 300 ms after the lock
    /// service has noticed (its log says so) kill -9 it and start it again at once.
    ServiceRestartDuringQuarantine,
    /// The host reboots: kill -9 Redis and the lock service; Redis comes back on its files
    /// as they were [`LOST_TAIL`] earlier (the boot marker survives, the last claims and
    /// renewals do not); the lock service starts again.
    HostRebootLosingTail,
    /// kill -9 the lock service (memory backend: every lease is gone) and start it again
    /// at once, as a supervisor would.
    ServiceKill,
    /// One holder freezes for [`OUTAGE`] between its last look at the lease and its ring
    /// (a GC pause, a SIGSTOP), twice.
    HolderPause,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    /// Holders use `callfleet lock-service` over gRPC.
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

/// Which holders run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Holders {
    /// All renew through [`LeaseKeeper`].
    Keepers,
    /// Even holders renew; odd ones claim like the dialplan, with the services'
    /// `max_validity`.
    Mixed,
    /// All claim like the dialplan with `validity`, ringing up to `ring_max_ms` (never
    /// past the deadline); with `lose_replies`, every other claim's reply is lost and the
    /// claim retried after up to validity + guard with the same attempt and a new
    /// candidate order, as a node that timed out asks again.
    Dialplan {
        validity: Duration,
        ring_max_ms: u64,
        lose_replies: bool,
    },
}

/// One run of the harness.
#[derive(Debug, Clone)]
struct Setup {
    name: &'static str,
    variant: Variant,
    endpoint: Endpoint,
    fault: Fault,
    holders: Holders,
    /// `redis` or `memory`.
    backend: &'static str,
    instances: usize,
    max_validity: Duration,
    quarantine: Duration,
    /// `CALLFLEET_TEST_UNSAFE_LOCKS`: the protections switched off.
    switches: &'static str,
    run_for: Duration,
    /// Liveness: at least this many rings in all.
    min_rings: usize,
}

impl Setup {
    fn new(name: &'static str, fault: Fault) -> Self {
        Self {
            name,
            variant: Variant::Callfleet,
            endpoint: Endpoint::Fenced,
            fault,
            holders: Holders::Mixed,
            backend: "redis",
            instances: 1,
            max_validity: DIALPLAN_TTL,
            quarantine: QUARANTINE,
            switches: "",
            run_for: RUN_FOR,
            min_rings: 10,
        }
    }

    /// The same run with `switch` off, under a name of its own.
    fn without(&self, name: &'static str, switch: &'static str) -> Self {
        Self {
            name,
            switches: switch,
            ..self.clone()
        }
    }
}

// ---------------------------------------------------------------------------------------
// Processes

fn ms(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

/// `callfleet lock-service` with the harness's timings.
struct Service {
    port: u16,
    setup: Setup,
    redis_url: String,
    log: PathBuf,
    process: Option<Running>,
    starts: u32,
}

impl Service {
    fn start(setup: &Setup, redis_url: String, dir: &Path, index: usize) -> Self {
        let mut service = Self {
            port: free_port(),
            setup: setup.clone(),
            redis_url,
            log: dir.join(format!("lock-service-{index}.log")),
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
        let setup = &self.setup;
        let child = callfleet()
            .arg("lock-service")
            .env(
                "CALLFLEET_LOCK_SERVICE__LISTEN",
                format!("127.0.0.1:{}", self.port),
            )
            .env("CALLFLEET_LOCK_SERVICE__BACKEND", setup.backend)
            .env("CALLFLEET_LOCK_SERVICE__REDIS_URL", &self.redis_url)
            .env("CALLFLEET_LOCK_SERVICE__VALIDITY", ms(VALIDITY))
            .env(
                "CALLFLEET_LOCK_SERVICE__MAX_VALIDITY",
                ms(setup.max_validity),
            )
            .env("CALLFLEET_LOCK_SERVICE__GUARD", ms(GUARD))
            .env("CALLFLEET_LOCK_SERVICE__DEADLINE", ms(REDIS_DEADLINE))
            .env("CALLFLEET_LOCK_SERVICE__QUARANTINE", ms(setup.quarantine))
            .env("CALLFLEET_LOCK_SERVICE__STRICT", "true")
            .env("CALLFLEET_TEST_UNSAFE_LOCKS", setup.switches)
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

    /// How many times this process has logged that Redis lost its data.
    fn losses_noticed(&self) -> usize {
        read(&self.log).matches(LOSS_NOTICED).count()
    }

    /// Waits until this process has logged that Redis lost its data more than `before`
    /// times: the fault's next step must meet a service that knows, not race a reconnect
    /// that has not happened yet.
    fn wait_for_loss_noticed(&self, before: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.losses_noticed() == before {
            assert!(
                Instant::now() < deadline,
                "the lock service did not notice the loss within 10 s:\n{}",
                tail(&read(&self.log), 30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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

type Client = LocksClient<tonic::transport::Channel>;

fn client_for(port: u16) -> Client {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("endpoint")
        .connect_timeout(RPC_DEADLINE)
        .connect_lazy();
    LocksClient::new(channel)
}

/// The lock-service instances a holder may ask, its own first: a node lists every core
/// node's instance and moves on when one refuses or does not answer.
struct Instances {
    ports: Vec<u16>,
    clients: Vec<Client>,
    home: usize,
}

/// An answer to a claim: the lease (if any agent was free), the instance that gave it, and
/// when the request that got it was sent.
type Answer = (Option<pb::Lease>, Client, Instant);

impl Instances {
    fn new(ports: &[u16], home: usize) -> Self {
        Self {
            ports: ports.to_vec(),
            clients: ports.iter().map(|port| client_for(*port)).collect(),
            home,
        }
    }

    /// Asks each instance in turn, own first, until one answers; records every refusal.
    async fn claim_first(
        &mut self,
        shared: &Shared,
        node: &str,
        request: pb::ClaimFirstRequest,
    ) -> Option<Answer> {
        for step in 0..self.ports.len() {
            let at = (self.home + step) % self.ports.len();
            let sent = Instant::now();
            let mut client = self.clients[at].clone();
            let reply = client.claim_first(request.clone());
            let outcome = match tokio::time::timeout(RPC_DEADLINE, reply).await {
                Ok(Ok(reply)) => {
                    return Some((reply.into_inner().lease, self.clients[at].clone(), sent));
                }
                Ok(Err(status)) => format!("error: {:?}", status.code()),
                Err(_) => "error: timeout".to_owned(),
            };
            shared.history.record(node, "claim", &outcome, None);
            // A node reconnects at once rather than after the channel's backoff.
            self.clients[at] = client_for(self.ports[at]);
        }
        None
    }
}

/// Claims, rings and releases through the lock service until the harness stops.
async fn keeper_holder(index: usize, ports: Vec<u16>, shared: Arc<Shared>) {
    let node = format!("node-{index}");
    let mut rng = Rng::for_holder(index);
    let mut instances = Instances::new(&ports, index % ports.len());
    let mut call = 0u64;
    while !shared.stop.is_cancelled() {
        call += 1;
        let attempt = format!("{node}-{call}");
        shared.requests.fetch_add(1, Ordering::Relaxed);
        let request = pb::ClaimFirstRequest {
            candidates: rng.shuffled_agents(),
            holder: format!("{node}/{attempt}"),
            attempt: attempt.clone(),
            validity_ms: VALIDITY.as_millis() as u64,
        };
        let Some((granted, client, sent)) = instances.claim_first(&shared, &node, request).await
        else {
            pause(&shared, 100).await;
            continue;
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
            shared
                .history
                .record(&node, "release", "sent", Some((&held, 0.0)));
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
        // Recorded when sent: the holder has stopped acting on the lease by then.
        shared
            .history
            .record(&node, "release", "sent", Some((&held, 0.0)));
        let _ = keeper.release().await;
    }
}

/// Claims like the README's dialplan: once, with a `ttl`, no renewals; rings at most
/// until that runs out, then releases.
async fn dialplan_holder(
    index: usize,
    ports: Vec<u16>,
    shared: Arc<Shared>,
    validity: Duration,
    ring_max_ms: u64,
    lose_replies: bool,
) {
    let node = format!("node-{index}");
    let mut rng = Rng::for_holder(index);
    let mut instances = Instances::new(&ports, index % ports.len());
    let request = |attempt: &str, candidates: Vec<String>| pb::ClaimFirstRequest {
        candidates,
        holder: format!("{node}/{attempt}"),
        attempt: attempt.to_owned(),
        validity_ms: validity.as_millis() as u64,
    };
    let held_of = |lease: &pb::Lease| Held {
        resource: lease.resource.clone(),
        attempt: lease.attempt.clone(),
        token: lease.token,
    };
    // Calls arrive at random: holders that started together must not keep ringing in step.
    let stagger = validity.min(Duration::from_secs(3)).as_millis() as u64;
    pause(&shared, rng.between(0, stagger)).await;
    let mut call = 0u64;
    while !shared.stop.is_cancelled() {
        call += 1;
        let attempt = format!("{node}-{call}");
        shared.requests.fetch_add(1, Ordering::Relaxed);
        let first = request(&attempt, rng.shuffled_agents());
        let Some((granted, mut client, mut sent)) =
            instances.claim_first(&shared, &node, first).await
        else {
            pause(&shared, 100).await;
            continue;
        };
        let Some(mut granted) = granted else {
            pause(&shared, 20).await;
            continue;
        };
        if lose_replies && rng.next().is_multiple_of(2) {
            // The store granted this lease, so it counts as a grant; the holder never
            // hears of it and asks again, with the same attempt, once it gave up waiting.
            let deadline = shared
                .history
                .ms(sent + Duration::from_millis(granted.validity_ms));
            shared
                .history
                .record(&node, "claim", "ok", Some((&held_of(&granted), deadline)));
            shared.history.record(
                &node,
                "reply_lost",
                "ok",
                Some((&held_of(&granted), deadline)),
            );
            let wait = (validity + GUARD).as_millis() as u64 - 100;
            pause(&shared, rng.between(0, wait)).await;
            // The routing answer may have changed meanwhile: one agent fewer, perhaps the
            // one the lost reply named.
            let mut candidates = rng.shuffled_agents();
            candidates.pop();
            let retry = request(&attempt, candidates);
            let Some((Some(again), by, at)) = instances.claim_first(&shared, &node, retry).await
            else {
                continue;
            };
            (granted, client, sent) = (again, by, at);
        }
        shared.claims.fetch_add(1, Ordering::Relaxed);
        let held = held_of(&granted);
        // The reply says how long the lease is valid, counted from when it was asked for.
        let until = sent + Duration::from_millis(granted.validity_ms);
        let deadline = shared.history.ms(until);
        shared
            .history
            .record(&node, "claim", "ok", Some((&held, deadline)));
        if Instant::now() < until && shared.phones.ring(&shared.history, &node, &held, deadline) {
            let ring_until =
                (Instant::now() + Duration::from_millis(rng.between(1000, ring_max_ms))).min(until);
            tokio::select! {
                _ = tokio::time::sleep_until(ring_until.into()) => {}
                _ = shared.stop.cancelled() => {}
            }
            shared
                .phones
                .hang_up(&shared.history, &node, &held, deadline);
        }
        shared
            .history
            .record(&node, "release", "sent", Some((&held, 0.0)));
        let mut releaser = client.clone();
        let release = pb::ReleaseRequest {
            resource: held.resource.clone(),
            holder: granted.holder.clone(),
            token: held.token,
        };
        let _ = tokio::time::timeout(RPC_DEADLINE, releaser.release(release)).await;
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
            shared
                .history
                .record(&node, "release", "sent", Some((&held, 0.0)));
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
        shared
            .history
            .record(&node, "release", "sent", Some((&held, 0.0)));
        lock.release(&resource).await;
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

fn run_scenario(setup: &Setup) -> Report {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut redis = Redis::start(dir.path());
    let mut services: Vec<Service> = if setup.variant == Variant::Callfleet {
        (0..setup.instances)
            .map(|index| Service::start(setup, redis.url(), dir.path(), index))
            .collect()
    } else {
        Vec::new()
    };
    // A fresh service of the memory backend or on a fresh Redis starts in quarantine:
    // the holders begin once it is over, so that the fault meets leases in use.
    let ready = Instant::now() + setup.quarantine + Duration::from_millis(200);
    let shared = Arc::new(Shared {
        history: History {
            epoch: Instant::now(),
            events: Mutex::new(Vec::new()),
        },
        phones: Phones {
            check: setup.endpoint,
            highest_token: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
        },
        stop: CancellationToken::new(),
        freeze_next: AtomicBool::new(false),
        requests: AtomicU64::new(0),
        claims: AtomicU64::new(0),
    });
    if setup.variant == Variant::Callfleet {
        std::thread::sleep(ready.saturating_duration_since(Instant::now()));
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let holders: Vec<_> = (0..HOLDERS)
        .map(|index| {
            let shared = shared.clone();
            if setup.variant == Variant::Naive {
                return runtime.spawn(naive_holder(index, redis.url(), shared));
            }
            let ports: Vec<u16> = services.iter().map(|service| service.port).collect();
            match setup.holders {
                Holders::Keepers => runtime.spawn(keeper_holder(index, ports, shared)),
                Holders::Mixed if index % 2 == 0 => {
                    runtime.spawn(keeper_holder(index, ports, shared))
                }
                Holders::Mixed => runtime.spawn(dialplan_holder(
                    index,
                    ports,
                    shared,
                    setup.max_validity,
                    RING_MAX_MS,
                    false,
                )),
                Holders::Dialplan {
                    validity,
                    ring_max_ms,
                    lose_replies,
                } => runtime.spawn(dialplan_holder(
                    index,
                    ports,
                    shared,
                    validity,
                    ring_max_ms,
                    lose_replies,
                )),
            }
        })
        .collect();

    let started = Instant::now();
    let sleep_until = |at: Duration| std::thread::sleep(at.saturating_sub(started.elapsed()));
    let snapshot = dir.path().join("redis-snapshot");
    if setup.fault == Fault::HostRebootLosingTail {
        sleep_until(FAULT_AT - LOST_TAIL);
        redis.snapshot(&snapshot);
    }
    sleep_until(FAULT_AT);
    let fault = setup.fault;
    let fault_ms = shared.history.now_ms();
    shared
        .history
        .record("harness", "fault", &format!("{fault:?}"), None);
    match fault {
        Fault::None => {}
        Fault::RedisPause => {
            redis.signal("STOP");
            std::thread::sleep(OUTAGE);
            redis.signal("CONT");
        }
        Fault::RedisFlush => redis.flush(),
        Fault::RedisEmptyWithOneInstanceRestarting => {
            let last = services.last_mut().expect("an instance");
            redis.kill();
            last.kill();
            redis.lose_data();
            std::thread::sleep(Duration::from_millis(200));
            redis.spawn();
            std::thread::sleep(Duration::from_millis(600));
            services.last_mut().expect("an instance").spawn();
        }
        Fault::ServiceRestartDuringQuarantine => {
            let noticed: Vec<usize> = services.iter().map(Service::losses_noticed).collect();
            redis.kill();
            redis.lose_data();
            std::thread::sleep(Duration::from_millis(200));
            redis.spawn();
            for (service, before) in services.iter().zip(noticed) {
                service.wait_for_loss_noticed(before);
            }
            std::thread::sleep(Duration::from_millis(300));
            for service in &mut services {
                service.kill();
                service.spawn();
            }
        }
        Fault::HostRebootLosingTail => {
            redis.kill();
            for service in &mut services {
                service.kill();
            }
            redis.restore(&snapshot);
            redis.spawn();
            for service in &mut services {
                service.spawn();
            }
        }
        Fault::ServiceKill => {
            for service in &mut services {
                service.kill();
                service.spawn();
            }
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
    sleep_until(setup.run_for);
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
    drop(services);

    let events = shared.history.events.lock().expect("history").clone();
    let path = write_history(setup.name, &events);
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
    let mut kinds: Vec<&str> = report.violations.iter().map(kind).collect();
    kinds.sort_unstable();
    kinds.dedup();
    println!(
        "{}: {} claim requests, {} granted, {} rings ({} after the fault), {} rings refused by the endpoint, {} violations {kinds:?}; history {}",
        setup.name,
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

fn kind(violation: &Violation) -> &'static str {
    match violation {
        Violation::Overlap(..) => "rings overlap",
        Violation::TokenNotIncreasing(..) => "ring token not increasing",
        Violation::PastDeadline(..) => "ring past deadline",
        Violation::RingAfterDeadline(..) => "ring started after deadline",
        Violation::GrantOverlap(..) => "grants overlap",
        Violation::TwoAgentsForOneCall(..) => "two agents for one call",
        Violation::GrantTokenNotIncreasing(..) => "grant token not increasing",
    }
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

fn assert_safe_and_live(setup: &Setup, report: &Report) {
    assert!(
        report.violations.is_empty(),
        "{}: violations: {:#?}",
        setup.name,
        report.violations
    );
    assert!(
        report.rings >= setup.min_rings,
        "only {} rings: the harness did not exercise the locks",
        report.rings
    );
    assert!(
        report.rings_after_fault >= 4,
        "only {} rings after the fault: the service did not recover",
        report.rings_after_fault
    );
}

/// The control: with the protection off, the same scenario must be caught double-granting.
fn assert_caught(setup: &Setup, report: &Report) {
    assert!(
        report.violations.iter().any(|v| matches!(
            v,
            Violation::GrantOverlap(..)
                | Violation::Overlap(..)
                | Violation::TwoAgentsForOneCall(..)
        )),
        "{} (with {} off) must be reported as leasing or ringing one agent twice: {:?}",
        setup.name,
        setup.switches,
        report.violations
    );
}

// ---------------------------------------------------------------------------------------
// Data loss: each scenario with its protection, and with that protection off

/// One lock service per core node, one Redis, flushed: the instance that notices the loss
/// must not erase the evidence for the other.
fn flush_two_instances() -> Setup {
    Setup {
        instances: 2,
        ..Setup::new("flush-two-instances", Fault::RedisFlush)
    }
}

#[test]
fn redis_flushed_under_two_instances() {
    let setup = flush_two_instances();
    assert_safe_and_live(&setup, &run_scenario(&setup));
}

#[test]
fn redis_flushed_under_two_instances_without_the_shared_quarantine() {
    let setup = flush_two_instances().without("flush-two-instances-local", "local_quarantine");
    assert_caught(&setup, &run_scenario(&setup));
}

fn flush_three_instances() -> Setup {
    Setup {
        instances: 3,
        ..Setup::new("flush-three-instances", Fault::RedisFlush)
    }
}

#[test]
fn redis_flushed_under_three_instances() {
    let setup = flush_three_instances();
    assert_safe_and_live(&setup, &run_scenario(&setup));
}

#[test]
fn redis_flushed_under_three_instances_without_the_shared_quarantine() {
    let setup = flush_three_instances().without("flush-three-instances-local", "local_quarantine");
    assert_caught(&setup, &run_scenario(&setup));
}

/// Redis restarts empty while one of three instances reboots with its node: the instance
/// that comes back never saw the old Redis.
fn empty_restart_three_instances() -> Setup {
    Setup {
        instances: 3,
        ..Setup::new(
            "empty-restart-three-instances",
            Fault::RedisEmptyWithOneInstanceRestarting,
        )
    }
}

#[test]
fn redis_restarted_empty_under_three_instances_one_rebooting() {
    let setup = empty_restart_three_instances();
    assert_safe_and_live(&setup, &run_scenario(&setup));
}

#[test]
fn redis_restarted_empty_under_three_instances_one_rebooting_without_the_shared_quarantine() {
    let setup = empty_restart_three_instances()
        .without("empty-restart-three-instances-local", "local_quarantine");
    assert_caught(&setup, &run_scenario(&setup));
}

fn service_restart_in_quarantine() -> Setup {
    Setup::new(
        "service-restart-during-quarantine",
        Fault::ServiceRestartDuringQuarantine,
    )
}

#[test]
fn lock_service_restarted_during_a_quarantine() {
    let setup = service_restart_in_quarantine();
    assert_safe_and_live(&setup, &run_scenario(&setup));
}

#[test]
fn lock_service_restarted_during_a_quarantine_without_the_shared_quarantine() {
    let setup = service_restart_in_quarantine().without(
        "service-restart-during-quarantine-local",
        "local_quarantine",
    );
    assert_caught(&setup, &run_scenario(&setup));
}

/// Redis keeps its marker but loses its last writes, and the lock service that comes back
/// with it is a new process: only what Redis itself says (a new run id) can tell.
fn host_reboot() -> Setup {
    Setup::new("host-reboot-losing-tail", Fault::HostRebootLosingTail)
}

#[test]
fn host_rebooted_and_redis_lost_its_last_writes() {
    let setup = host_reboot();
    assert_safe_and_live(&setup, &run_scenario(&setup));
}

#[test]
fn host_rebooted_and_redis_lost_its_last_writes_without_the_shared_quarantine() {
    let setup = host_reboot().without("host-reboot-losing-tail-local", "local_quarantine");
    assert_caught(&setup, &run_scenario(&setup));
}

/// The README's dialplan claims with `ttl=30` and never renews: a flush must keep claims
/// away until such a lease is over, which the configuration enforces (quarantine longer
/// than max_validity + guard).
fn long_lease_flush() -> Setup {
    let validity = Duration::from_secs(30);
    Setup {
        holders: Holders::Dialplan {
            validity,
            ring_max_ms: 25_000,
            lose_replies: false,
        },
        max_validity: validity,
        quarantine: validity + GUARD + Duration::from_millis(500),
        run_for: FAULT_AT + validity + GUARD + Duration::from_secs(9),
        min_rings: 6,
        ..Setup::new("thirty-second-leases-across-a-flush", Fault::RedisFlush)
    }
}

#[test]
fn thirty_second_leases_across_a_flush() {
    let setup = long_lease_flush();
    assert_safe_and_live(&setup, &run_scenario(&setup));
}

/// The bug as it was: a quarantine sized for short leases (7.5 s here) while claims could
/// ask for far longer.
#[test]
fn thirty_second_leases_across_a_flush_with_a_quarantine_shorter_than_the_lease() {
    let setup = Setup {
        quarantine: QUARANTINE,
        run_for: RUN_FOR,
        ..long_lease_flush().without(
            "thirty-second-leases-across-a-flush-short-quarantine",
            "unbounded_validity",
        )
    };
    assert_caught(&setup, &run_scenario(&setup));
}

/// Replies lost on the way back: the retry (same attempt, new candidate order) must get
/// the lease the store already granted, valid for as long as the holder now believes.
fn lost_replies() -> Setup {
    Setup {
        holders: Holders::Dialplan {
            validity: VALIDITY,
            ring_max_ms: RING_MAX_MS,
            lose_replies: true,
        },
        ..Setup::new("claims-retried-after-lost-replies", Fault::None)
    }
}

#[test]
fn claims_retried_after_lost_replies() {
    let setup = lost_replies();
    assert_safe_and_live(&setup, &run_scenario(&setup));
}

#[test]
fn claims_retried_after_lost_replies_without_the_attempt_index() {
    let setup = lost_replies().without("claims-retried-after-lost-replies-naive", "naive_retry");
    assert_caught(&setup, &run_scenario(&setup));
}

/// `callfleet up` on the memory backend restarts while the PBX still rings agents.
fn memory_service_kill() -> Setup {
    Setup {
        backend: "memory",
        ..Setup::new("memory-service-kill", Fault::ServiceKill)
    }
}

#[test]
fn memory_lock_service_killed_and_restarted() {
    let setup = memory_service_kill();
    assert_safe_and_live(&setup, &run_scenario(&setup));
}

#[test]
fn memory_lock_service_killed_and_restarted_without_the_startup_quarantine() {
    let setup =
        memory_service_kill().without("memory-service-kill-no-quarantine", "no_startup_quarantine");
    assert_caught(&setup, &run_scenario(&setup));
}

// ---------------------------------------------------------------------------------------
// Outages and frozen holders; the naive lock is their control

#[test]
fn redis_paused_past_every_lease() {
    let setup = Setup {
        holders: Holders::Keepers,
        ..Setup::new("callfleet-redis-pause", Fault::RedisPause)
    };
    assert_safe_and_live(&setup, &run_scenario(&setup));
}

fn frozen_holder(name: &'static str, endpoint: Endpoint) -> Setup {
    Setup {
        holders: Holders::Keepers,
        endpoint,
        ..Setup::new(name, Fault::HolderPause)
    }
}

#[test]
fn a_frozen_holder_is_stopped_by_the_fenced_endpoint() {
    let setup = frozen_holder("callfleet-holder-pause", Endpoint::Fenced);
    let report = run_scenario(&setup);
    assert_safe_and_live(&setup, &report);
    assert_eq!(report.refused, 2, "both frozen rings must be refused");
}

/// Why the token and deadline must be checked where the ring happens: the lock service
/// cannot stop a holder that froze after its last look at the lease.
#[test]
fn a_frozen_holder_double_rings_when_the_endpoint_checks_nothing() {
    let setup = frozen_holder("callfleet-holder-pause-unchecked", Endpoint::Unchecked);
    let report = run_scenario(&setup);
    assert!(
        report
            .violations
            .iter()
            .any(|v| matches!(v, Violation::RingAfterDeadline(_))),
        "a frozen holder rang after its deadline, and the checker must say so: {:?}",
        report.violations
    );
}

fn naive(name: &'static str, endpoint: Endpoint, fault: Fault) -> Setup {
    Setup {
        variant: Variant::Naive,
        endpoint,
        ..Setup::new(name, fault)
    }
}

/// The checker catches the naive lock: a Redis pause lets every lease expire while the
/// holders, waiting without a deadline, keep ringing and then take any reply as a renewal.
#[test]
fn the_naive_lock_double_rings_when_redis_pauses() {
    let setup = naive("naive-redis-pause", Endpoint::Fenced, Fault::RedisPause);
    let report = run_scenario(&setup);
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
fn the_naive_lock_reissues_old_tokens_after_redis_is_flushed() {
    let setup = naive("naive-redis-flush", Endpoint::Fenced, Fault::RedisFlush);
    let report = run_scenario(&setup);
    assert!(
        report.refused > 0,
        "tokens below those already seen must reach the endpoint"
    );
}

/// The same loss with an endpoint that checks nothing: the lost keys are claimed again
/// while their holders, whose renewals "succeed" on missing keys, still ring.
#[test]
fn the_naive_lock_double_rings_when_redis_is_flushed() {
    let setup = naive(
        "naive-redis-flush-unchecked",
        Endpoint::Unchecked,
        Fault::RedisFlush,
    );
    let report = run_scenario(&setup);
    assert!(
        report
            .violations
            .iter()
            .any(|v| matches!(v, Violation::Overlap(..))),
        "the naive lock must be reported as double-ringing: {:?}",
        report.violations
    );
}
