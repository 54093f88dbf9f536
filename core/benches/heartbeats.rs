//! Load test of the fleet store on MariaDB: `NODES` simulated nodes (default 1,000) each
//! write a heartbeat once a second for `DURATION` seconds (default 60), their starts spread evenly
//! over the second so the server sees a steady rate rather than bursts, while a reader lists
//! the whole fleet every 500 ms, as a balancer's refresh task would. Every node also appends
//! a history sample every `history_interval` (30 s by default) with the default retention,
//! as the node-agent does after a successful heartbeat.
//!
//! Goal (from the issue): p99 ≤ 5 ms for the heartbeat upsert and for the full-fleet read.
//!
//! This is not a criterion bench: what matters is latency under a steady load over time,
//! not the best time of a tight loop. Every operation's latency is kept and sorted at the
//! end, so the percentiles are exact (nearest rank), not estimated. Latency is measured
//! around the store call, so it includes waiting for one of the `CONNECTIONS` pooled
//! connections (default 16; real agents each hold their own). The "start lag" line says how
//! late the client started heartbeats against their schedule: when it grows, the client
//! (or the machine) could not keep up and the figures understate the server's load.
//!
//! Run it with `./scripts/bench-store`, which starts a private MariaDB; or set
//! `CALLFLEET_BENCH_MYSQL_URL` to a server whose user may create databases and run
//! `cargo bench -p callfleet-core --bench heartbeats`. Each run creates its own database
//! and drops it at the end.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use callfleet_core::config::{StoreConfig, redact_url};
use callfleet_core::{Heartbeat, NodeId, NodeRole, PoolName, ShedTierState, Store};
use sqlx::{Connection, Executor, Row};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until};
use tokio_util::sync::CancellationToken;

/// The latency every p99 is held to.
const GOAL: Duration = Duration::from_millis(5);
/// How often each simulated node writes its heartbeat.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How often the whole fleet is read while the nodes beat.
const READ_INTERVAL: Duration = Duration::from_millis(500);
/// Full-fleet reads made after the load stops, one after the other, as the quiet anchor.
const IDLE_READS: usize = 20;

/// What the bench was asked to do.
struct Settings {
    url: String,
    nodes: u32,
    seconds: u32,
    connections: u32,
}

fn settings() -> Result<Settings, String> {
    let url = std::env::var("CALLFLEET_BENCH_MYSQL_URL").map_err(|_| {
        "CALLFLEET_BENCH_MYSQL_URL is not set: this benchmark needs a MariaDB/MySQL server \
         whose user may create databases; run ./scripts/bench-store (it starts one) or export \
         CALLFLEET_BENCH_MYSQL_URL=mysql://USER:PASSWORD@HOST:PORT/DATABASE"
            .to_owned()
    })?;
    if !url.starts_with("mysql://") {
        return Err(format!(
            "CALLFLEET_BENCH_MYSQL_URL `{}` must be a mysql:// URL",
            redact_url(&url)
        ));
    }
    Ok(Settings {
        url,
        nodes: env_count("NODES", 1000)?,
        seconds: env_count("DURATION", 60)?,
        connections: env_count("CONNECTIONS", 16)?,
    })
}

fn env_count(name: &str, default: u32) -> Result<u32, String> {
    match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name} is not valid UTF-8")),
        Ok(value) => value
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{name}=`{value}` must be a whole number above 0")),
    }
}

/// A new, empty database on the server of `base`, and an admin connection to drop it with.
async fn fresh_database(base: &str) -> Result<(sqlx::MySqlConnection, String, String), String> {
    let shown = redact_url(base);
    let mut admin = sqlx::MySqlConnection::connect(base)
        .await
        .map_err(|err| format!("cannot connect to MariaDB at {shown}: {err}"))?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let name = format!("cf_bench_{}_{stamp}", std::process::id());
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .map_err(|err| format!("cannot create the database {name} at {shown}: {err}"))?;
    let mut url = url::Url::parse(base).map_err(|err| format!("{shown}: {err}"))?;
    url.set_path(&name);
    Ok((admin, name, url.to_string()))
}

async fn server_version(admin: &mut sqlx::MySqlConnection) -> String {
    match admin.fetch_one("SELECT VERSION()").await {
        Ok(row) => row
            .try_get::<String, _>(0)
            .unwrap_or_else(|err| format!("unreadable ({err})")),
        Err(err) => format!("unknown ({err})"),
    }
}

/// The heartbeat of simulated node `index` at its `tick`-th beat; figures vary per tick so
/// every upsert really changes the row.
fn heartbeat(index: u32, tick: u32, first_of_run: bool) -> Heartbeat {
    let [_, a, b, c] = index.to_be_bytes();
    Heartbeat {
        id: NodeId::new(format!("bench-{index:05}")).expect("bench node ids are valid"),
        pool: PoolName::new(format!("pool-{}", index % 8)).expect("bench pool names are valid"),
        role: if index.is_multiple_of(4) {
            NodeRole::Core
        } else {
            NodeRole::Extra
        },
        sip_uri: format!("sip:10.{a}.{b}.{c}:5060"),
        calls: (index + tick) % 120,
        pbx_up: true,
        max_calls: 120,
        load1: f64::from((index + tick) % 400) / 100.0,
        cpu_pct: f64::from((index * 7 + tick) % 1000) / 10.0,
        mem_pct: f64::from((index * 3 + tick) % 1000) / 10.0,
        cores: 8,
        shed: vec![ShedTierState {
            name: "reports".into(),
            shed: false,
            command_ok: true,
        }],
        refusing_calls: false,
        interval: HEARTBEAT_INTERVAL,
        first_of_run,
    }
}

/// Latencies of one kind of operation and its failures.
#[derive(Default)]
struct Figures {
    done: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

impl Figures {
    fn with_capacity(n: usize) -> Self {
        Self {
            done: Vec::with_capacity(n),
            ..Self::default()
        }
    }

    fn record<E: std::fmt::Display>(&mut self, started: Instant, result: Result<(), E>) -> bool {
        match result {
            Ok(()) => {
                self.done.push(started.elapsed());
                true
            }
            Err(err) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| err.to_string());
                false
            }
        }
    }

    fn merge(&mut self, other: Self) {
        self.done.extend(other.done);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// What one simulated node measured.
struct NodeFigures {
    upserts: Figures,
    samples: Figures,
    lag: Vec<Duration>,
}

/// One simulated node-agent: `beats` heartbeats, one per interval from `first_at`, each
/// followed by a history sample when `history_interval` has passed since the last one.
async fn run_node(
    store: Store,
    config: StoreConfig,
    index: u32,
    first_at: Instant,
    beats: u32,
) -> NodeFigures {
    let n = beats as usize;
    let mut figures = NodeFigures {
        upserts: Figures::with_capacity(n),
        samples: Figures::with_capacity(n),
        lag: Vec::with_capacity(n),
    };
    let mut last_history: Option<Instant> = None;
    let mut first_of_run = true;
    for tick in 0..beats {
        let scheduled = first_at + HEARTBEAT_INTERVAL * tick;
        sleep_until(scheduled).await;
        let beat = heartbeat(index, tick, first_of_run);
        let started = Instant::now();
        figures
            .lag
            .push(started.saturating_duration_since(scheduled));
        if !figures
            .upserts
            .record(started, store.heartbeat(&beat).await)
        {
            continue;
        }
        first_of_run = false;
        // Judged on the schedule, not the clock, so every node samples on the same ticks.
        if last_history.is_none_or(|at| scheduled - at >= config.history_interval) {
            last_history = Some(scheduled);
            let started = Instant::now();
            let result = store.record_sample(&beat, config.history_retention).await;
            figures.samples.record(started, result);
        }
    }
    figures
}

/// What the fleet reader measured.
struct ReadFigures {
    reads: Figures,
    fleet_sizes: Vec<usize>,
}

/// Lists the whole fleet every `READ_INTERVAL` from `start` until `stop`.
async fn run_reader(store: Store, start: Instant, stop: CancellationToken) -> ReadFigures {
    let mut figures = ReadFigures {
        reads: Figures::default(),
        fleet_sizes: Vec::new(),
    };
    let mut ticks = interval_at(start, READ_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let started = Instant::now();
        let result = store.list_nodes().await.map(|nodes| {
            figures.fleet_sizes.push(nodes.len());
        });
        figures.reads.record(started, result);
    }
    figures
}

/// The nearest-rank percentile `p` of `sorted`.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

const ROW_HEADER: &str =
    "figure                               ops   rate/s   p50 ms   p90 ms   p99 ms   max ms  errors";

fn row(name: &str, figures: &mut Figures, window: Duration) -> Duration {
    figures.done.sort_unstable();
    let d = &figures.done;
    let p99 = percentile(d, 99.0);
    let rate = d.len() as f64 / window.as_secs_f64();
    println!(
        "{name:<32} {:>7} {rate:>8.1} {:>8} {:>8} {:>8} {:>8} {:>7}",
        d.len(),
        ms(percentile(d, 50.0)),
        ms(percentile(d, 90.0)),
        ms(p99),
        ms(d.last().copied().unwrap_or_default()),
        figures.errors,
    );
    p99
}

fn verdict(name: &str, figures: &Figures, p99: Duration) {
    let pass = !figures.done.is_empty() && figures.errors == 0 && p99 <= GOAL;
    println!(
        "  {name:<28} p99 {:>8} ms  {}",
        ms(p99),
        if pass { "PASS" } else { "FAIL" }
    );
}

async fn bench(settings: Settings) -> Result<(), String> {
    let Settings {
        url: base,
        nodes,
        seconds,
        connections,
    } = settings;
    let (mut admin, database, url) = fresh_database(&base).await?;
    let version = server_version(&mut admin).await;
    let config = StoreConfig {
        url,
        max_connections: connections,
        ..StoreConfig::default()
    };
    let store = Store::connect(&config)
        .await
        .map_err(|err| err.to_string())?;

    // Opens the pool's connections before the clock starts, as long-running agents have.
    let mut warm = JoinSet::new();
    for _ in 0..connections {
        let store = store.clone();
        warm.spawn(async move { store.list_nodes().await.map(|_| ()) });
    }
    while let Some(done) = warm.join_next().await {
        done.map_err(|err| format!("warm-up task failed: {err}"))?
            .map_err(|err| format!("warm-up read failed: {err}"))?;
    }

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_before = load_average();
    println!(
        "store benchmark: {nodes} nodes x {:.0} Hz for {seconds} s, MariaDB {version}, database {database}",
        1.0 / HEARTBEAT_INTERVAL.as_secs_f64(),
    );
    println!(
        "writers' pool {connections} connections; reader on its own thread and connection, every {} ms, history every {} s ({} h retention), {cpus} CPUs",
        READ_INTERVAL.as_millis(),
        config.history_interval.as_secs(),
        config.history_retention.as_secs() / 3600,
    );

    // A little head room so every task is spawned before the first scheduled beat.
    let start = Instant::now() + Duration::from_millis(500);
    let stop = CancellationToken::new();
    // The fleet is read by other processes (balancers, the control plane) with their own
    // connection and their own runtime, never through the writers' pool or behind their
    // 1,000 tasks: that would measure this load generator, not the read. So the reader
    // gets a thread, a runtime and a one-connection store of its own.
    let reader_config = StoreConfig {
        max_connections: 1,
        ..config.clone()
    };
    let reader_stop = stop.clone();
    let reader = std::thread::spawn(move || -> Result<ReadFigures, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| format!("reader runtime: {err}"))?;
        runtime.block_on(async move {
            let store = Store::connect(&reader_config)
                .await
                .map_err(|err| err.to_string())?;
            store.list_nodes().await.map_err(|err| err.to_string())?;
            Ok(run_reader(store, start, reader_stop).await)
        })
    });
    let mut node_tasks = JoinSet::new();
    for index in 0..nodes {
        let offset = HEARTBEAT_INTERVAL * index / nodes;
        node_tasks.spawn(run_node(
            store.clone(),
            config.clone(),
            index,
            start + offset,
            seconds,
        ));
    }
    let mut upserts = Figures::default();
    let mut samples = Figures::default();
    let mut lag = Vec::new();
    while let Some(done) = node_tasks.join_next().await {
        let node = done.map_err(|err| format!("a node task failed: {err}"))?;
        upserts.merge(node.upserts);
        samples.merge(node.samples);
        lag.extend(node.lag);
    }
    let window = start.elapsed();
    stop.cancel();
    let ReadFigures {
        mut reads,
        fleet_sizes,
    } = reader
        .join()
        .map_err(|_| "the reader thread panicked".to_owned())??;
    let load_after = load_average();

    let mut idle = Figures::with_capacity(IDLE_READS);
    let idle_start = Instant::now();
    let mut idle_size = 0;
    for _ in 0..IDLE_READS {
        let started = Instant::now();
        let result = store.list_nodes().await.map(|n| idle_size = n.len());
        idle.record(started, result);
    }
    let idle_window = idle_start.elapsed();

    lag.sort_unstable();
    println!(
        "load window {:.1} s (first beat to last answer); 1-min load average {load_before} before, {load_after} after",
        window.as_secs_f64()
    );
    println!();
    println!("{ROW_HEADER}");
    let upsert_p99 = row("heartbeat upsert", &mut upserts, window);
    row("history sample (insert + prune)", &mut samples, window);
    let read_p99 = row(
        &format!(
            "full-fleet read ({} nodes)",
            fleet_sizes.last().copied().unwrap_or_default()
        ),
        &mut reads,
        window,
    );
    row(
        &format!("full-fleet read, idle ({idle_size})"),
        &mut idle,
        idle_window,
    );
    println!(
        "{:<32} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "heartbeat start lag (client)",
        lag.len(),
        "",
        ms(percentile(&lag, 50.0)),
        ms(percentile(&lag, 90.0)),
        ms(percentile(&lag, 99.0)),
        ms(lag.last().copied().unwrap_or_default()),
    );
    println!(
        "fleet size per read under load: min {}, max {} (of {nodes} nodes)",
        fleet_sizes.iter().min().copied().unwrap_or_default(),
        fleet_sizes.iter().max().copied().unwrap_or_default(),
    );
    for (name, figures) in [
        ("heartbeat upsert", &upserts),
        ("history sample", &samples),
        ("full-fleet read", &reads),
        ("idle read", &idle),
    ] {
        if let Some(err) = &figures.first_error {
            println!("first {name} error: {err}");
        }
    }
    println!();
    println!("goal: p99 <= {} ms for both (under load)", GOAL.as_millis());
    verdict("heartbeat upsert", &upserts, upsert_p99);
    verdict("full-fleet read", &reads, read_p99);

    store.close().await;
    if let Err(err) = admin
        .execute(sqlx::AssertSqlSafe(format!("DROP DATABASE {database}")))
        .await
    {
        eprintln!("could not drop the bench database {database}: {err}");
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    let result = match settings() {
        Ok(settings) => bench(settings).await,
        Err(err) => Err(err),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench-store: {err}");
            ExitCode::FAILURE
        }
    }
}
