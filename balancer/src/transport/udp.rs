//! UDP: one blocking worker thread per core on clones of one socket, plus a timer thread
//! for retransmissions.

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg, setsockopt,
    sockopt,
};
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

/// Datagrams taken from the kernel per system call.
const BATCH: usize = 32;

/// Receives up to [`BATCH`] datagrams per `recvmmsg` and sends the answers to a batch with
/// one `sendmmsg`: under load the system calls, not the SIP work, are the cost per call.
fn worker(engine: &Engine, socket: &UdpSocket, tcp: &TcpRoutes, stop: &AtomicBool) {
    let fd = socket.as_raw_fd();
    let mut buffers = vec![vec![0u8; 65_536]; BATCH];
    // The kernel stamps each datagram on arrival: how long it queued tells whether we are
    // behind, which nothing in user space can see.
    let stamped = setsockopt(socket, sockopt::ReceiveTimestampns, &true).is_ok();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(
        BATCH,
        stamped.then(|| nix::cmsg_space!(nix::sys::time::TimeSpec)),
    );
    let mut send_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut received: Vec<(usize, SocketAddr, Option<Duration>)> = Vec::with_capacity(BATCH);
    let mut actions = Vec::with_capacity(4);
    let mut outgoing: Vec<(SocketAddr, Vec<u8>)> = Vec::with_capacity(BATCH);
    while !stop.load(Ordering::Relaxed) {
        received.clear();
        {
            let mut slices: Vec<[IoSliceMut<'_>; 1]> = buffers
                .iter_mut()
                .map(|buffer| [IoSliceMut::new(buffer)])
                .collect();
            match recvmmsg(
                fd,
                &mut headers,
                slices.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            ) {
                Ok(results) => {
                    for message in results {
                        let arrived = message.cmsgs().ok().and_then(|mut cmsgs| {
                            cmsgs.find_map(|cmsg| match cmsg {
                                ControlMessageOwned::ScmTimestampns(at) => Some(Duration::from(at)),
                                _ => None,
                            })
                        });
                        if let Some(source) = message.address.and_then(socket_addr) {
                            received.push((message.bytes, source, arrived));
                        }
                    }
                }
                Err(Errno::EAGAIN | Errno::EINTR | Errno::ECONNREFUSED) => continue,
                Err(err) => {
                    warn!(error = %err, "udp receive failed");
                    std::thread::sleep(POLL);
                    continue;
                }
            }
        }
        let now = Instant::now();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        for (&(len, source, arrived), buffer) in received.iter().zip(&buffers) {
            let queued = arrived.map_or(Duration::ZERO, |at| wall.saturating_sub(at));
            engine.handle(
                &buffer[..len],
                source,
                Transport::Udp,
                now,
                queued,
                &mut actions,
            );
            for action in actions.drain(..) {
                match action {
                    Action::Reply { to, bytes }
                    | Action::Forward {
                        to,
                        tcp: false,
                        bytes,
                        ..
                    } => {
                        outgoing.push((to, bytes));
                    }
                    other => perform(socket, tcp, other),
                }
            }
        }
        send_batch(fd, socket, &mut send_headers, &mut outgoing);
    }
}

/// Sends `outgoing` with `sendmmsg`, in chunks of [`BATCH`]; what the kernel refuses is
/// lost like any UDP datagram (SIP retransmits).
fn send_batch(
    fd: RawFd,
    socket: &UdpSocket,
    headers: &mut MultiHeaders<SockaddrStorage>,
    outgoing: &mut Vec<(SocketAddr, Vec<u8>)>,
) {
    for chunk in outgoing.chunks(BATCH) {
        if chunk.len() == 1 {
            send(socket, &chunk[0].1, chunk[0].0);
            continue;
        }
        let slices: Vec<[IoSlice<'_>; 1]> = chunk
            .iter()
            .map(|(_, bytes)| [IoSlice::new(bytes)])
            .collect();
        let addresses: Vec<Option<SockaddrStorage>> = chunk
            .iter()
            .map(|(to, _)| Some(SockaddrStorage::from(*to)))
            .collect();
        let _ = sendmmsg(fd, headers, &slices, &addresses, [], MsgFlags::empty());
    }
    outgoing.clear();
}

fn socket_addr(storage: SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = storage.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    storage
        .as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}

/// Carries out one action from a UDP worker (or forwards to a TCP connection).
pub fn perform(socket: &UdpSocket, tcp: &TcpRoutes, action: Action) {
    let (to, bytes) = match action {
        Action::Reply { to, bytes } => (to, bytes),
        Action::Forward {
            to,
            tcp: true,
            reconnect,
            bytes,
        } => match tcp.deliver(to, reconnect, bytes) {
            Ok(()) => return,
            // No connection could take it (no TCP listener, or too many queued): the
            // peer's own address over UDP is the last chance a dual-transport trunk has.
            Err(bytes) => (reconnect.unwrap_or(to), bytes),
        },
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
