//! ClaimFirst + Release pairs through the real gRPC service, closed loop at 1 and 50
//! concurrent clients, and open loop at a fixed rate for latency; on Redis (URL from
//! `BENCH_REDIS_URL`) and on the memory backend. Run it with `./scripts/bench-locks`, which
//! starts a dedicated Redis and prints raw Redis figures next to these.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use callfleet_core::config::{LockBackendKind, LockServiceConfig};
use callfleet_proto::lock::v1 as pb;
use callfleet_proto::lock::v1::locks_client::LocksClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const AGENTS: u64 = 10_000;

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

async fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

/// One ClaimFirst + Release pair; returns its latency.
async fn pair(client: &mut LocksClient<Channel>, worker: u64, n: u64) -> Duration {
    let started = Instant::now();
    let base = (worker * 7919 + n * 104_729) % AGENTS;
    let candidates = (0..3)
        .map(|i| format!("agent:{}", (base + i * 3331) % AGENTS))
        .collect();
    let holder = format!("bench-{worker}/{n}");
    let lease = client
        .claim_first(pb::ClaimFirstRequest {
            candidates,
            holder: holder.clone(),
            attempt: holder.clone(),
            validity_ms: 10_000,
        })
        .await
        .expect("claim")
        .into_inner()
        .lease;
    if let Some(lease) = lease {
        client
            .release(pb::ReleaseRequest {
                resource: lease.resource,
                holder,
                token: lease.token,
            })
            .await
            .expect("release");
    }
    started.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1e3
}

/// Closed loop: `clients` workers as fast as they can for `seconds`.
async fn closed_loop(url: &str, clients: u64, seconds: u64) -> (f64, f64, f64) {
    let channels: Vec<Channel> = futures_join(url, clients.min(8)).await;
    let stop = Instant::now() + Duration::from_secs(seconds);
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for worker in 0..clients {
        let mut client = LocksClient::new(channels[(worker as usize) % channels.len()].clone());
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0;
            while Instant::now() < stop {
                latencies.push(pair(&mut client, worker, n).await);
                n += 1;
            }
            done.fetch_add(n, Ordering::Relaxed);
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("worker"));
    }
    all.sort();
    let pairs = done.load(Ordering::Relaxed) as f64 / seconds as f64;
    (pairs, percentile(&all, 0.5), percentile(&all, 0.99))
}

/// Open loop: `rate` pairs per second for `seconds`, latency measured from the schedule.
async fn open_loop(url: &str, rate: u64, seconds: u64) -> (f64, f64, f64) {
    let channels = futures_join(url, 4).await;
    let total = rate * seconds;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for n in 0..total {
        let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let mut client = LocksClient::new(channels[(n % 4) as usize].clone());
        tasks.push(tokio::spawn(async move {
            pair(&mut client, 1_000 + n % 97, n).await;
            due.elapsed()
        }));
    }
    let mut all = Vec::with_capacity(tasks.len());
    for task in tasks {
        all.push(task.await.expect("request"));
    }
    all.sort();
    (
        total as f64 / start.elapsed().as_secs_f64(),
        percentile(&all, 0.5),
        percentile(&all, 0.99),
    )
}

async fn futures_join(url: &str, n: u64) -> Vec<Channel> {
    let mut channels = Vec::new();
    for _ in 0..n {
        channels.push(channel(url).await);
    }
    channels
}

fn main() {
    let seconds: u64 = std::env::var("SECONDS_PER_RUN")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut backends = vec![("memory", LockServiceConfig::default())];
        if let Ok(url) = std::env::var("BENCH_REDIS_URL") {
            backends.insert(
                0,
                (
                    "redis",
                    LockServiceConfig {
                        backend: LockBackendKind::Redis,
                        redis_url: url,
                        quarantine: Duration::ZERO,
                        ..LockServiceConfig::default()
                    },
                ),
            );
        } else {
            println!("BENCH_REDIS_URL not set: memory backend only");
        }
        println!("| backend | load | ClaimFirst+Release pairs/s | p50 ms | p99 ms |");
        println!("|---|---|---|---|---|");
        for (name, config) in backends {
            let (url, shutdown) = start(config).await;
            // Let the health watcher and the first Redis connection settle.
            tokio::time::sleep(Duration::from_millis(500)).await;
            for clients in [1, 50] {
                let (rate, p50, p99) = closed_loop(&url, clients, seconds).await;
                println!("| {name} | {clients} client(s), closed loop | {rate:.0} | {p50:.3} | {p99:.3} |");
            }
            let (rate, p50, p99) = open_loop(&url, 5_000, seconds).await;
            println!("| {name} | 5,000 pairs/s, open loop | {rate:.0} | {p50:.3} | {p99:.3} |");
            shutdown.cancel();
        }
    });
}
