//! ClaimFirst + Release pairs through the real gRPC service, closed loop at 1 and 50
//! concurrent clients, and open loop at a fixed rate for latency; on Redis (URL from
//! `BENCH_REDIS_URL`) and on the memory backend. Run it with `./scripts/bench-locks`, which
//! starts a dedicated Redis and prints raw Redis figures next to these.
//!
//! The service runs in this process on a runtime like the binary's; the load comes from a
//! second process (this binary again, `locks client …`), so client and server do not share
//! one tokio runtime: on a small box a shared runtime makes each side wait behind the
//! other's tasks, and the figure is then neither the server's nor the client's.
//!
//! Knobs (environment):
//! - `SECONDS_PER_RUN` (10): length of each run;
//! - `BENCH_CLIENTS` (`1,50`): closed-loop client counts;
//! - `BENCH_RATE` (5000): open-loop pairs per second (0: no open loop);
//! - `BENCH_PER_CONNECTION` (50): closed-loop clients sharing one HTTP/2 connection (tonic
//!   `Channel`). One connection per load process, as a node's clients share one channel,
//!   costs the service, the load and Redis least per call: more streams per connection
//!   means more frames per write and per read, and more commands per Redis round trip;
//! - `BENCH_OPEN_CONNECTIONS` (1): HTTP/2 connections of the open loop;
//! - `BENCH_CLIENT_THREADS` (1): worker threads of the load process (1: current-thread);
//! - `BENCH_SERVER_THREADS` (all CPUs): worker threads of the runtime that calls `run`
//!   (the accept loop, the health watch, the Redis connection made at start); the service
//!   serves connections on threads of its own, one per CPU;
//! - `BENCH_BACKENDS` (`redis,memory`): which backends to run;
//! - `BENCH_HELD` (1000): leases held (on other resources) through every run, as a call
//!   center's agents on calls hold theirs: what a claim costs must not grow with them;
//! - `BENCH_IN_PROCESS=1`: generate the load inside the service's process and runtime (how
//!   this bench measured before), to compare.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use callfleet_core::config::{LockBackendKind, LockServiceConfig, UnsafeLockSwitches};
use callfleet_proto::lock::v1 as pb;
use callfleet_proto::lock::v1::locks_client::LocksClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const AGENTS: u64 = 10_000;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// A runtime with `threads` workers; with `current_thread`, one that runs only inside
/// `block_on` (the load process's main thread), which saves the hand-offs between threads.
fn runtime(threads: usize, current_thread: bool) -> tokio::runtime::Runtime {
    if current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads.max(1));
        builder
    }
    .enable_all()
    .build()
    .expect("runtime")
}

async fn start(config: LockServiceConfig) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        callfleet_lock_service::run(&config, listener, token)
            .await
            .expect("lock service runs");
    });
    (url, shutdown)
}

/// `n` HTTP/2 connections (a tonic `Channel` each).
async fn channels(url: &str, n: u64) -> Vec<Channel> {
    let mut channels = Vec::new();
    for _ in 0..n.max(1) {
        channels.push(
            tonic::transport::Endpoint::from_shared(url.to_owned())
                .expect("endpoint")
                .connect()
                .await
                .expect("connect"),
        );
    }
    channels
}

/// What one pair did.
struct Pair {
    latency: Duration,
    /// 1 when every candidate was held or the claim failed, else 2.
    calls: u64,
    /// A call failed (e.g. `UNAVAILABLE` past the deadline when the box is overloaded).
    failed: bool,
}

/// One ClaimFirst + Release pair.
async fn pair(client: &mut LocksClient<Channel>, worker: u64, n: u64) -> Pair {
    let started = Instant::now();
    let base = (worker * 7919 + n * 104_729) % AGENTS;
    let candidates = (0..3)
        .map(|i| format!("agent:{}", (base + i * 3331) % AGENTS))
        .collect();
    let holder = format!("bench-{worker}/{n}");
    let done = |calls, failed| Pair {
        latency: started.elapsed(),
        calls,
        failed,
    };
    let claimed = client
        .claim_first(pb::ClaimFirstRequest {
            candidates,
            holder: holder.clone(),
            attempt: holder.clone(),
            validity_ms: 10_000,
        })
        .await;
    let lease = match claimed {
        Ok(response) => response.into_inner().lease,
        Err(_) => return done(1, true),
    };
    let Some(lease) = lease else {
        return done(1, false);
    };
    let released = client
        .release(pb::ReleaseRequest {
            resource: lease.resource,
            holder,
            token: lease.token,
        })
        .await;
    done(2, released.is_err())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1e3
}

/// How long the held leases last: the whole bench. The services allow it as their
/// `max_validity` (default 10 s), which `unbounded_validity` lets outlast the quarantine.
const HELD_FOR: Duration = Duration::from_secs(3600);

/// Leases `n` resources the loads never touch, for [`HELD_FOR`].
async fn hold(url: &str, n: u64) {
    let mut client = LocksClient::new(channels(url, 1).await.remove(0));
    // Unique per run, so a Redis kept between runs does not find them held already.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    for i in 0..n {
        let holder = format!("held-{run}/{i}");
        client
            .acquire(pb::AcquireRequest {
                resource: format!("held:{run}:{i}"),
                holder: holder.clone(),
                attempt: holder,
                validity_ms: u64::try_from(HELD_FOR.as_millis()).expect("fits"),
            })
            .await
            .expect("hold");
    }
}

/// What one load measured.
#[derive(Debug, Clone, Copy)]
struct Figures {
    pairs: f64,
    /// gRPC calls per second (a pair whose claim found every candidate held is one call).
    calls: f64,
    /// gRPC calls made in all.
    made: f64,
    /// Pairs with a failed call.
    failed: f64,
    /// Latency of a pair in ms.
    p50: f64,
    p99: f64,
    /// CPU seconds the load process used during the run (NaN when it is the service's).
    load_cpu: f64,
}

/// CPU seconds (user + system) this process has used, all threads: `/proc/self/stat`
/// counts in USER_HZ, which is 100 on Linux.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces) start at state.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    // utime and stime are fields 14 and 15 of the file, 12 and 13 after the name.
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => (user + system) / 100.0,
        _ => f64::NAN,
    }
}

/// CPU seconds the Redis server has used (`INFO cpu`), or NaN.
async fn redis_cpu(url: Option<&str>) -> f64 {
    let Some(url) = url else {
        return f64::NAN;
    };
    let query = async {
        let client = redis::Client::open(url).ok()?;
        let mut connection = client.get_multiplexed_async_connection().await.ok()?;
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .query_async(&mut connection)
            .await
            .ok()?;
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| value.trim().parse::<f64>().ok())
        };
        Some(field("used_cpu_sys:")? + field("used_cpu_user:")?)
    };
    query.await.unwrap_or(f64::NAN)
}

/// Closed loop: `clients` workers as fast as they can for `seconds`.
async fn closed_loop(url: &str, clients: u64, seconds: u64, per_connection: u64) -> Figures {
    let channels = channels(url, clients.div_ceil(per_connection)).await;
    let stop = Instant::now() + Duration::from_secs(seconds);
    let done = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for worker in 0..clients {
        let mut client = LocksClient::new(channels[(worker as usize) % channels.len()].clone());
        let (done, calls, failed) = (done.clone(), calls.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let (mut n, mut made, mut failures) = (0, 0, 0);
            while Instant::now() < stop {
                let pair = pair(&mut client, worker, n).await;
                latencies.push(pair.latency);
                made += pair.calls;
                failures += u64::from(pair.failed);
                n += 1;
            }
            done.fetch_add(n, Ordering::Relaxed);
            calls.fetch_add(made, Ordering::Relaxed);
            failed.fetch_add(failures, Ordering::Relaxed);
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("worker"));
    }
    all.sort();
    Figures {
        pairs: done.load(Ordering::Relaxed) as f64 / seconds as f64,
        calls: calls.load(Ordering::Relaxed) as f64 / seconds as f64,
        made: calls.load(Ordering::Relaxed) as f64,
        failed: failed.load(Ordering::Relaxed) as f64,
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        load_cpu: f64::NAN,
    }
}

/// Open loop: `rate` pairs per second for `seconds`, latency measured from the schedule.
/// A thread of its own paces the pairs: tokio's timer fires on whole milliseconds, which
/// would make every pair up to 1 ms late before it is even sent, and that lateness would be
/// counted as the service's; a thread's sleep wakes within tens of microseconds.
async fn open_loop(url: &str, rate: u64, seconds: u64, connections: u64) -> Figures {
    let channels = channels(url, connections).await;
    let total = rate * seconds;
    let start = Instant::now();
    let runtime = tokio::runtime::Handle::current();
    let (spawned, mut tasks_rx) = tokio::sync::mpsc::unbounded_channel();
    let pacer = std::thread::spawn(move || {
        for n in 0..total {
            let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let mut client = LocksClient::new(channels[(n as usize) % channels.len()].clone());
            let task = runtime.spawn(async move {
                let pair = pair(&mut client, 1_000 + n % 97, n).await;
                (due.elapsed(), pair)
            });
            if spawned.send(task).is_err() {
                return;
            }
        }
    });
    let mut tasks = Vec::with_capacity(total as usize);
    while let Some(task) = tasks_rx.recv().await {
        tasks.push(task);
    }
    pacer.join().expect("pacer");
    let mut all = Vec::with_capacity(tasks.len());
    let (mut calls, mut failed) = (0, 0);
    for task in tasks {
        let (latency, pair) = task.await.expect("request");
        all.push(latency);
        calls += pair.calls;
        failed += u64::from(pair.failed);
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort();
    Figures {
        pairs: total as f64 / elapsed,
        calls: calls as f64 / elapsed,
        made: calls as f64,
        failed: failed as f64,
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        load_cpu: f64::NAN,
    }
}

/// One load, described as the `client` command line takes it: `closed CLIENTS` or
/// `open RATE`.
#[derive(Debug, Clone, Copy)]
enum Load {
    Closed(u64),
    Open(u64),
}

impl Load {
    fn describe(self) -> String {
        match self {
            Self::Closed(clients) => format!("{clients} client(s), closed loop"),
            Self::Open(rate) => format!("{rate} pairs/s, open loop"),
        }
    }

    fn args(self) -> [String; 2] {
        match self {
            Self::Closed(clients) => ["closed".into(), clients.to_string()],
            Self::Open(rate) => ["open".into(), rate.to_string()],
        }
    }

    fn parse(kind: &str, n: &str) -> Self {
        let n = n.parse().expect("a number");
        match kind {
            "closed" => Self::Closed(n),
            "open" => Self::Open(n),
            other => panic!("unknown load {other:?}"),
        }
    }

    async fn run(self, url: &str, seconds: u64, per_connection: u64) -> Figures {
        match self {
            Self::Closed(clients) => closed_loop(url, clients, seconds, per_connection).await,
            Self::Open(rate) => {
                open_loop(url, rate, seconds, env("BENCH_OPEN_CONNECTIONS", 1)).await
            }
        }
    }
}

/// `locks client URL closed|open N SECONDS PER_CONNECTION`: prints the figures.
fn client(args: &[String]) {
    let [url, kind, n, seconds, per_connection] = args else {
        panic!("usage: locks client URL closed|open N SECONDS PER_CONNECTION");
    };
    let load = Load::parse(kind, n);
    let seconds = seconds.parse().expect("seconds");
    let per_connection = per_connection.parse().expect("clients per connection");
    let cpu = cpu_seconds();
    let threads = env("BENCH_CLIENT_THREADS", 1);
    let figures = runtime(threads, threads <= 1).block_on(load.run(url, seconds, per_connection));
    let Figures {
        pairs,
        calls,
        made,
        failed,
        p50,
        p99,
        ..
    } = figures;
    println!(
        "{pairs} {calls} {made} {failed} {p50} {p99} {}",
        cpu_seconds() - cpu
    );
}

/// Runs `load` in a child process against `url`.
fn load_from_another_process(url: &str, load: Load, seconds: u64, per_connection: u64) -> Figures {
    let output = Command::new(std::env::current_exe().expect("own path"))
        .arg("client")
        .arg(url)
        .args(load.args())
        .arg(seconds.to_string())
        .arg(per_connection.to_string())
        .output()
        .expect("the load process starts");
    assert!(
        output.status.success(),
        "the load process failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("utf-8");
    let figures: Vec<f64> = text
        .split_whitespace()
        .map(|f| f.parse().expect("a figure"))
        .collect();
    let [pairs, calls, made, failed, p50, p99, load_cpu] = figures[..] else {
        panic!("the load process printed {text:?}");
    };
    Figures {
        pairs,
        calls,
        made,
        failed,
        p50,
        p99,
        load_cpu,
    }
}

fn main() {
    // Logging as the binary sets it up (`RUST_LOG`, default info, to stderr): without a
    // subscriber, every disabled span of h2 and hyper still formats its fields for `log`.
    callfleet_core::telemetry::init(callfleet_core::config::LogFormat::Human);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("client") {
        return client(&args[1..]);
    }
    let seconds: u64 = env("SECONDS_PER_RUN", 10);
    let per_connection: u64 = env("BENCH_PER_CONNECTION", 50);
    let in_process = env("BENCH_IN_PROCESS", 0) == 1;
    let clients: String = env("BENCH_CLIENTS", "1,50".to_owned());
    let mut loads: Vec<Load> = clients
        .split(',')
        .map(|n| Load::Closed(n.trim().parse().expect("BENCH_CLIENTS: numbers")))
        .collect();
    let rate: u64 = env("BENCH_RATE", 5_000);
    if rate > 0 {
        loads.push(Load::Open(rate));
    }
    let server_threads = env(
        "BENCH_SERVER_THREADS",
        std::thread::available_parallelism().map_or(2, usize::from),
    );
    let held: u64 = env("BENCH_HELD", 1_000);
    let wanted: String = env("BENCH_BACKENDS", "redis,memory".to_owned());
    // The bench's servers are fresh: no lease predates them, so no quarantine is needed.
    let no_quarantine = UnsafeLockSwitches {
        unbounded_validity: true,
        no_startup_quarantine: true,
        ..UnsafeLockSwitches::default()
    };
    let mut backends = Vec::new();
    for name in wanted.split(',') {
        match name.trim() {
            "memory" => backends.push((
                "memory",
                LockServiceConfig {
                    max_validity: HELD_FOR,
                    unsafe_for_tests: no_quarantine,
                    ..LockServiceConfig::default()
                },
            )),
            "redis" => match std::env::var("BENCH_REDIS_URL") {
                Ok(url) => backends.push((
                    "redis",
                    LockServiceConfig {
                        backend: LockBackendKind::Redis,
                        redis_url: url,
                        quarantine: Duration::ZERO,
                        max_validity: HELD_FOR,
                        unsafe_for_tests: no_quarantine,
                        ..LockServiceConfig::default()
                    },
                )),
                Err(_) => println!("BENCH_REDIS_URL not set: no redis figures"),
            },
            other => panic!("BENCH_BACKENDS: unknown backend {other:?}"),
        }
    }
    // The service runs while this thread waits for the load process: never current-thread.
    let server = runtime(server_threads, false);
    println!(
        "load generator: {}; runtime calling `run`: {server_threads} worker threads; {per_connection} closed-loop clients per HTTP/2 connection; {held} leases held throughout",
        if in_process {
            "in the service's process and runtime".to_owned()
        } else {
            format!(
                "a separate process, {} worker thread(s)",
                env("BENCH_CLIENT_THREADS", 1)
            )
        }
    );
    println!();
    println!(
        "| backend | load | ClaimFirst+Release pairs/s | gRPC calls/s | failed pairs | p50 ms | p99 ms | CPU µs per call: service | load generator | redis |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, config) in backends {
        let redis_url =
            (config.backend == LockBackendKind::Redis).then(|| config.redis_url.clone());
        let (url, shutdown) = server.block_on(async {
            let started = start(config).await;
            // Let the health watcher and the first Redis connection settle.
            tokio::time::sleep(Duration::from_millis(500)).await;
            hold(&started.0, held).await;
            started
        });
        for &load in &loads {
            let redis_before = server.block_on(redis_cpu(redis_url.as_deref()));
            let service_before = cpu_seconds();
            let figures = if in_process {
                server.block_on(load.run(&url, seconds, per_connection))
            } else {
                load_from_another_process(&url, load, seconds, per_connection)
            };
            let service_cpu = cpu_seconds() - service_before;
            let redis_cpu = server.block_on(redis_cpu(redis_url.as_deref())) - redis_before;
            let per_call = |cpu: f64| {
                if cpu.is_nan() {
                    "-".to_owned()
                } else {
                    format!("{:.1}", cpu / figures.made * 1e6)
                }
            };
            println!(
                "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.3} | {:.3} | {}{} | {} | {} |",
                load.describe(),
                figures.pairs,
                figures.calls,
                figures.failed,
                figures.p50,
                figures.p99,
                per_call(service_cpu),
                if in_process { " (with the load)" } else { "" },
                per_call(figures.load_cpu),
                per_call(redis_cpu),
            );
        }
        shutdown.cancel();
    }
}
