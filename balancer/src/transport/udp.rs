//! UDP: one blocking worker thread per core on clones of one socket, plus a timer thread
//! for retransmissions.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::warn;

use super::TcpRoutes;
use crate::engine::{Action, Engine};
use crate::sip::Transport;

/// How often a blocked worker wakes to check for shutdown.
const POLL: Duration = Duration::from_millis(100);
/// Resolution of Timer G.
const TICK: Duration = Duration::from_millis(10);

/// Starts `workers` receive threads and the timer thread.
pub fn spawn(
    engine: &Arc<Engine>,
    socket: &UdpSocket,
    tcp: &Arc<TcpRoutes>,
    workers: usize,
    stop: &Arc<AtomicBool>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    socket.set_read_timeout(Some(POLL))?;
    let mut threads = Vec::with_capacity(workers + 1);
    for n in 0..workers {
        let socket = socket.try_clone()?;
        let (engine, tcp, stop) = (engine.clone(), tcp.clone(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("sip-udp-{n}"))
                .spawn(move || worker(&engine, &socket, &tcp, &stop))?,
        );
    }
    let socket = socket.try_clone()?;
    let (engine, stop) = (engine.clone(), stop.clone());
    threads.push(
        std::thread::Builder::new()
            .name("sip-timers".into())
            .spawn(move || timers(&engine, &socket, &stop))?,
    );
    Ok(threads)
}

fn worker(engine: &Engine, socket: &UdpSocket, tcp: &TcpRoutes, stop: &AtomicBool) {
    let mut buffer = vec![0u8; 65_536];
    let mut actions = Vec::with_capacity(4);
    while !stop.load(Ordering::Relaxed) {
        let (len, source) = match socket.recv_from(&mut buffer) {
            Ok(received) => received,
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                continue;
            }
            Err(err) => {
                warn!(error = %err, "udp receive failed");
                std::thread::sleep(POLL);
                continue;
            }
        };
        engine.handle(
            &buffer[..len],
            source,
            Transport::Udp,
            Instant::now(),
            &mut actions,
        );
        for action in actions.drain(..) {
            perform(socket, tcp, action);
        }
    }
}

/// Carries out one action from a UDP worker (or forwards to a TCP connection).
pub fn perform(socket: &UdpSocket, tcp: &TcpRoutes, action: Action) {
    let (to, bytes) = match action {
        Action::Reply { to, bytes } => (to, bytes),
        Action::Forward {
            to,
            tcp: true,
            bytes,
        } => {
            if !tcp.send(to, bytes.clone()) {
                send(socket, &bytes, to);
            }
            return;
        }
        Action::Forward { to, bytes, .. } => (to, bytes),
        Action::Close => return,
    };
    send(socket, &bytes, to);
}

fn send(socket: &UdpSocket, bytes: &[u8], to: SocketAddr) {
    // A full socket buffer or an unreachable peer loses this datagram; SIP retransmits.
    let _ = socket.send_to(bytes, to);
}

fn timers(engine: &Engine, socket: &UdpSocket, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(TICK);
        let resent = engine
            .transactions
            .tick(Instant::now(), |bytes, to| send(socket, bytes, to));
        engine
            .counters
            .resent
            .fetch_add(resent as u64, Ordering::Relaxed);
    }
}
