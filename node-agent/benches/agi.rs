//! FastAGI first command after connect (issue 16's goal: p99 ≤ 1 ms; the seed's PBX took
//! 50 ms). Run it with `./scripts/bench-agi`.
//!
//! This process runs two servers on one multi-threaded runtime like the binary's: the
//! node-agent's [`AgiServer`] with its `ping` script, and an **anchor**, the least a
//! FastAGI server can do on this box and runtime (read up to the environment's empty line,
//! write the same `SET VARIABLE` line, read the reply, close). A second process (this
//! binary again, `agi client …`) plays Asterisk's side against each in turn, with
//! `CONNECTIONS` connections at once, each a loop of sessions: connect, send the captured
//! environment of `fixtures/asterisk/fastagi-session.jsonl` (script `ping`), time until
//! the first byte of the command arrives (the clock starts before `connect`), read the
//! line, reply `200 result=1`, wait for the close. The load runs in its own process so
//! that its scheduling is not the server's.
//!
//! Two loads: a **closed loop** (every connection starts its next session when the last
//! ended: the most sessions the box carries, and the latency when load and server saturate
//! its CPUs) and an **open loop** at `RATE` sessions/s shared by the connections (the
//! latency a new call sees, which is what the goal is about; a real node opens a few
//! sessions per call, tens per second).
//!
//! Printed per run and target: sessions/s, p50/p90/p99/max of the first-command latency,
//! CPU seconds per second of the server process, of the load process, of interrupts
//! (loopback TCP is mostly softirq work, charged to no process) and of every other
//! process on the box (from `/proc/stat`), so a noisy neighbour shows; then the median of
//! the runs, with the spread (lowest–highest).
//!
//! Knobs (environment): `SECONDS_PER_RUN` (10), `CONNECTIONS` (50), `REPEAT` (3),
//! `RATE` (2000 sessions/s; 0: no open loop), `CLOSED` (1; 0: no closed loop),
//! `WARMUP_SECONDS` (1, not counted), `SERVER_THREADS` (all CPUs), `LOAD_CPUS` (unset: any;
//! e.g. `1`: the load process is pinned there with `taskset`).

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use callfleet_node_agent::agi::{AgiServer, Scripts, Settings};
use common::{cpu_seconds, env, load_average, median};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What the `ping` script (and the anchor) writes first.
const COMMAND: &[u8] = b"SET VARIABLE CALLFLEET_RESULT pong\n";
/// Asterisk's captured reply to a `SET VARIABLE`.
const REPLY: &[u8] = b"200 result=1\n";

/// The captured `route-clean` environment with its script replaced by `ping`.
fn environment() -> Vec<u8> {
    let jsonl = include_str!("../../fixtures/asterisk/fastagi-session.jsonl");
    let block = jsonl
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|row| row["dir"] == "<<<")
        .filter_map(|row| row["data"].as_str().map(str::to_owned))
        .find(|data| data.contains("agi_network_script: route-clean?queue=sales\n"))
        .expect("the captured route-clean environment");
    block
        .replace("route-clean?queue=sales\n", "ping\n")
        .into_bytes()
}

/// CPU seconds the whole box has spent so far (`/proc/stat`, all CPUs): in processes
/// (user, nice, system) and in interrupts (irq, softirq: loopback TCP is mostly softirq
/// work, charged to no process).
fn box_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0.0) / 100.0;
    (at(0) + at(1) + at(2), at(5) + at(6))
}

// ----- the load (Asterisk's side) -----

/// One session; returns the time from before `connect` to the command's first byte.
async fn session(address: SocketAddr, environment: &[u8]) -> std::io::Result<Duration> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    stream.write_all(environment).await?;
    let mut buffer = [0u8; 256];
    let mut got = stream.read(&mut buffer).await?;
    let first = started.elapsed();
    while !buffer[..got].contains(&b'\n') {
        let read = stream.read(&mut buffer[got..]).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += read;
    }
    if &buffer[..got] != COMMAND {
        return Err(std::io::Error::other(format!(
            "unexpected command {:?}",
            String::from_utf8_lossy(&buffer[..got])
        )));
    }
    stream.write_all(REPLY).await?;
    // The server ends the session: wait for its close.
    while stream.read(&mut buffer).await? > 0 {}
    Ok(first)
}

/// `agi client ADDRESS CONNECTIONS RATE WARMUP SECONDS`: prints `sessions errors late p50
/// p90 p99 max cpu` (microseconds; CPU seconds of this process during the measured part).
///
/// `RATE` 0 is a closed loop: every connection starts its next session as soon as the last
/// one ended. Otherwise the connections share `RATE` sessions per second, each on a fixed
/// schedule (staggered); a session that cannot start on time starts at once and counts as
/// `late`, which says the load, not the server, set the pace.
fn client(args: &[String]) {
    let [address, connections, rate, warmup, seconds] = args else {
        panic!("usage: agi client ADDRESS CONNECTIONS RATE WARMUP SECONDS");
    };
    let address: SocketAddr = address.parse().expect("address");
    let connections: usize = connections.parse().expect("connections");
    let rate: f64 = rate.parse().expect("rate");
    let warmup = Duration::from_secs_f64(warmup.parse().expect("warmup"));
    let seconds = Duration::from_secs_f64(seconds.parse().expect("seconds"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let environment = environment();
    let (latencies, errors, late, cpu) = runtime.block_on(async move {
        let begin = Instant::now();
        let start = begin + warmup;
        let end = start + seconds;
        let period = (rate > 0.0).then(|| Duration::from_secs_f64(connections as f64 / rate));
        let mut workers = Vec::new();
        for worker in 0..connections {
            let environment = environment.clone();
            workers.push(tokio::spawn(async move {
                let (mut latencies, mut errors, mut late) = (Vec::new(), 0u64, 0u64);
                let mut due = period.map(|p| begin + p.mul_f64(worker as f64 / connections as f64));
                loop {
                    if let Some(at) = due {
                        if Instant::now() > at + Duration::from_millis(1) {
                            late += 1;
                        } else {
                            tokio::time::sleep_until(at.into()).await;
                        }
                    }
                    let began = Instant::now();
                    if began >= end {
                        return (latencies, errors, late);
                    }
                    match session(address, &environment).await {
                        Ok(first) if began >= start => latencies.push(first),
                        Ok(_) => {}
                        Err(_) => errors += 1,
                    }
                    due = due.zip(period).map(|(at, p)| at + p);
                }
            }));
        }
        tokio::time::sleep_until(start.into()).await;
        let cpu = cpu_seconds("self");
        let (mut all, mut errors, mut late) = (Vec::new(), 0, 0);
        for worker in workers {
            let (latencies, failed, behind) = worker.await.expect("worker");
            all.extend(latencies);
            errors += failed;
            late += behind;
        }
        (all, errors, late, cpu_seconds("self") - cpu)
    });
    let mut micros: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| {
        micros
            .get(((micros.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "{} {errors} {late} {} {} {} {} {cpu}",
        micros.len(),
        at(0.50),
        at(0.90),
        at(0.99),
        micros.last().copied().unwrap_or(f64::NAN)
    );
}

// ----- the servers -----

/// The anchor: the least a FastAGI server does for one session.
async fn anchor(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            stream.set_nodelay(true)?;
            let mut buffer = Vec::with_capacity(1024);
            while !buffer.windows(2).any(|w| w == b"\n\n") {
                if stream.read_buf(&mut buffer).await? == 0 {
                    return Ok(());
                }
            }
            stream.write_all(COMMAND).await?;
            buffer.clear();
            while !buffer.contains(&b'\n') {
                if stream.read_buf(&mut buffer).await? == 0 {
                    return Ok(());
                }
            }
            Ok::<_, std::io::Error>(())
        });
    }
}

/// One run's figures.
#[derive(Debug, Clone, Copy)]
struct Figures {
    rate: f64,
    errors: f64,
    late: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    server_cpu: f64,
    load_cpu: f64,
    irq_cpu: f64,
    other_cpu: f64,
}

/// Runs the load against `address` in a child process.
fn measure(
    address: SocketAddr,
    connections: usize,
    rate: f64,
    warmup: f64,
    seconds: f64,
) -> Figures {
    let own = std::env::current_exe().expect("own path");
    // `LOAD_CPUS` (e.g. `1`): the load process runs on those CPUs only (`taskset`).
    let mut child = match std::env::var("LOAD_CPUS") {
        Ok(cpus) if !cpus.is_empty() => {
            let mut taskset = Command::new("taskset");
            taskset.arg("-c").arg(cpus).arg(own);
            taskset
        }
        _ => Command::new(own),
    };
    child
        .arg("client")
        .arg(address.to_string())
        .arg(connections.to_string())
        .arg(rate.to_string())
        .arg(warmup.to_string())
        .arg(seconds.to_string());
    let child = child
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the load process starts");
    std::thread::sleep(Duration::from_secs_f64(warmup));
    let (server_cpu, (busy, irq)) = (cpu_seconds("self"), box_seconds());
    let output = child.wait_with_output().expect("the load process ends");
    let (server_cpu, busy, irq) = {
        let (busy_now, irq_now) = box_seconds();
        (
            cpu_seconds("self") - server_cpu,
            busy_now - busy,
            irq_now - irq,
        )
    };
    assert!(output.status.success(), "the load process failed");
    let text = String::from_utf8(output.stdout).expect("utf-8");
    let figures: Vec<f64> = text
        .split_whitespace()
        .map(|f| f.parse().expect("a figure"))
        .collect();
    let [sessions, errors, late, p50, p90, p99, max, load_cpu] = figures[..] else {
        panic!("the load process printed {text:?}");
    };
    Figures {
        rate: sessions / seconds,
        errors,
        late,
        p50,
        p90,
        p99,
        max,
        server_cpu: server_cpu / seconds,
        load_cpu: load_cpu / seconds,
        irq_cpu: irq / seconds,
        // The load process's last moments (after its measured part) count here too.
        other_cpu: ((busy - server_cpu - load_cpu) / seconds).max(0.0),
    }
}

fn row(target: &str, load: &str, run: &str, f: &Figures) {
    println!(
        "| {target} | {load} | {run} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
        f.rate,
        f.errors,
        f.late,
        f.p50,
        f.p90,
        f.p99,
        f.max,
        f.server_cpu,
        f.load_cpu,
        f.irq_cpu,
        f.other_cpu
    );
}

fn main() {
    // Logging as the binary sets it up (`RUST_LOG`, default info, to stderr), so the
    // server's disabled debug lines cost what they cost in production.
    callfleet_core::telemetry::init(callfleet_core::config::LogFormat::Human);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("client") {
        return client(&args[1..]);
    }
    let seconds: f64 = env("SECONDS_PER_RUN", 10.0);
    let connections: usize = env("CONNECTIONS", 50);
    let repeat: usize = env("REPEAT", 3).max(1);
    let rate: f64 = env("RATE", 2000.0);
    let closed = env("CLOSED", 1) == 1;
    let warmup: f64 = env("WARMUP_SECONDS", 1.0);
    let threads: usize = env(
        "SERVER_THREADS",
        std::thread::available_parallelism().map_or(1, usize::from),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime");
    let shutdown = CancellationToken::new();
    let (agi, anchor_address) = runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let agi = AgiServer::start(
            listener,
            Settings::default(),
            Scripts::builtin(),
            shutdown.clone(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let anchor_address = listener.local_addr().expect("address");
        tokio::spawn(anchor(listener));
        (agi, anchor_address)
    });
    let targets = [("anchor", anchor_address), ("callfleet", agi.local_addr())];
    // Closed loop: how many sessions the box can carry, and the latency when it is
    // saturated (the load and the server then share two busy CPUs, and a session waits its
    // turn). Open loop at `RATE`: the latency a new call sees, judged against the goal.
    let mut loads = Vec::new();
    if closed {
        loads.push(("closed".to_owned(), 0.0));
    }
    if rate > 0.0 {
        loads.push((format!("{rate:.0}/s"), rate));
    }
    println!(
        "FastAGI first command after connect: {connections} connections, {seconds} s per run (+{warmup} s warm-up), {repeat} runs, {} CPUs, server runtime {threads} threads",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!("load average before: {}", load_average());
    println!();
    println!(
        "| target | load | run | sessions/s | errors | late | p50 µs | p90 µs | p99 µs | max µs | server CPU/s | load CPU/s | irq CPU/s | others CPU/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut results: Vec<Vec<Figures>> = vec![Vec::new(); loads.len() * targets.len()];
    for run in 1..=repeat {
        for (l, (load, rate)) in loads.iter().enumerate() {
            for (t, (target, address)) in targets.iter().enumerate() {
                let figures = measure(*address, connections, *rate, warmup, seconds);
                row(target, load, &run.to_string(), &figures);
                results[l * targets.len() + t].push(figures);
            }
        }
    }
    println!();
    println!("median of {repeat} runs (lowest–highest):");
    println!();
    println!("| target | load | sessions/s | p50 µs | p90 µs | p99 µs | max µs | others CPU/s |");
    println!("|---|---|---|---|---|---|---|---|");
    for (l, (load, _)) in loads.iter().enumerate() {
        for (t, (target, _)) in targets.iter().enumerate() {
            let runs = &results[l * targets.len() + t];
            let cell = |pick: fn(&Figures) -> f64, digits: usize| {
                let mut values: Vec<f64> = runs.iter().map(pick).collect();
                let (middle, low, high) = median(&mut values);
                format!("{middle:.digits$} ({low:.digits$}–{high:.digits$})")
            };
            println!(
                "| {target} | {load} | {} | {} | {} | {} | {} | {} |",
                cell(|f| f.rate, 0),
                cell(|f| f.p50, 0),
                cell(|f| f.p90, 0),
                cell(|f| f.p99, 0),
                cell(|f| f.max, 0),
                cell(|f| f.other_cpu, 2),
            );
        }
    }
    let stats = agi.stats();
    println!();
    println!(
        "callfleet server counters: accepted {}, refused {}, commands {}, protocol errors {}, script errors {}",
        stats.accepted, stats.refused, stats.commands, stats.protocol_errors, stats.script_errors
    );
    println!(
        "goal: p99 <= 1,000 µs at the open-loop rate (issue 16); the seed's PBX: 50,000 µs; the anchor is the floor on this box"
    );
    shutdown.cancel();
    runtime.block_on(agi.stopped());
}
