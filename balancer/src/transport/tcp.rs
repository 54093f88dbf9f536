//! TCP: one task per connection, messages framed by Content-Length ([`super::frame`]).
//!
//! Carrier trunks are few and long-lived, so they live on the runtime. What a broken or
//! hostile peer could otherwise hold is bounded ([`Limits`]):
//! - addresses outside `balancer.allow` are closed at accept, before a byte is read;
//! - connections are capped in all and per address; past a cap a connection is closed at
//!   once (the carrier's next balancer gets the call), never left in the accept queue;
//! - a connection must complete a message within `message_timeout` of opening, each
//!   message within `message_timeout` of its first byte (slow drips), and an idle one is
//!   closed after `idle_timeout`;
//! - a peer that does not read its answers stops being read (the answer queue is bounded)
//!   and is closed once a write makes no progress for `write_timeout`;
//! - at shutdown, answers already queued get at most `drain` to leave.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use callfleet_core::ConfigError;
use callfleet_core::config::BalancerConfig;
use callfleet_core::net::Cidr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::frame::{Frame, Framer};
use super::{Dial, TcpRoutes};
use crate::engine::{Action, Engine};
use crate::sip::Transport;

/// What one connection, and all of them, may hold (`balancer.tcp_*`, `balancer.allow`,
/// `balancer.max_message`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest message, in bytes (`balancer.max_message`).
    pub max_message: usize,
    /// Networks that may connect (`balancer.allow`); empty = anyone.
    pub allow: Vec<Cidr>,
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections served at once from one IP address.
    pub per_address: usize,
    /// How long a message may take from its first byte, and a new connection to its first
    /// message.
    pub message_timeout: Duration,
    /// How long a connection may carry nothing either way.
    pub idle_timeout: Duration,
    /// How long one answer may take to be written.
    pub write_timeout: Duration,
    /// How long queued answers may take to leave once shutdown begins.
    pub drain: Duration,
    /// Answers queued per connection; when full, the connection is not read.
    pub queue: usize,
}

impl Limits {
    /// The default limits for messages of at most `max_message` bytes, open to anyone.
    pub fn new(max_message: usize) -> Self {
        let config = BalancerConfig {
            max_message,
            ..BalancerConfig::default()
        };
        Self::from_config(&config).expect("the default configuration is valid")
    }

    /// The limits `config` sets.
    pub fn from_config(config: &BalancerConfig) -> Result<Self, ConfigError> {
        let allow = config
            .allow
            .iter()
            .map(|entry| Cidr::parse(entry))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|reason| ConfigError::Value {
                key: "balancer.allow".into(),
                reason,
            })?;
        Ok(Self {
            max_message: config.max_message,
            allow,
            max_connections: config.tcp_max_connections,
            per_address: config.tcp_max_connections_per_address,
            message_timeout: config.tcp_message_timeout,
            idle_timeout: config.tcp_idle_timeout,
            write_timeout: config.tcp_write_timeout,
            // Well inside the 10 s drain `callfleet` gives every component.
            drain: Duration::from_secs(2),
            queue: 256,
        })
    }

    /// Whether `peer` may connect: the engine's rule for messages (the PBX's addresses,
    /// anyone when the list is empty, else the listed networks), so nothing the engine
    /// would serve is closed at accept.
    fn allows(&self, peer: SocketAddr, engine: &Engine) -> bool {
        self.allow.is_empty()
            || self.allow.iter().any(|net| net.contains(peer.ip()))
            || engine.is_pbx(peer.ip())
    }
}

/// Bytes asked of the kernel per read.
const READ_CHUNK: usize = 16 * 1024;
/// The answer to a keep-alive ping (RFC 5626 §4.4.1).
const PONG: &[u8] = b"\r\n";
/// A failing accept (out of file descriptors) is retried after this.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long opening a connection to a peer may take; its messages are lost after that,
/// as a UDP datagram would be (the PBX retransmits a request until Timer F).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Messages waiting for the dialer; beyond this they fall back to UDP.
const DIAL_QUEUE: usize = 1024;

/// Messages waiting for the connection being opened to each peer.
type Dialing = Mutex<HashMap<SocketAddr, Vec<Vec<u8>>>>;

/// Accepts connections until `shutdown`, within `limits`; returns once every connection
/// has closed, at most `limits.drain` (and a little) after `shutdown`.
pub async fn serve_with(
    listener: TcpListener,
    engine: Arc<Engine>,
    udp: Arc<std::net::UdpSocket>,
    routes: Arc<TcpRoutes>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let limits = Arc::new(limits);
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let peers = Arc::new(Peers::default());
    let (dialer, mut dials) = mpsc::channel::<Dial>(DIAL_QUEUE);
    routes.set_dialer(Some(dialer));
    let dialing = Arc::new(Dialing::default());
    let mut full = false;
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(dial) = dials.recv() => {
                let connection = Connection {
                    peer: dial.to,
                    engine: engine.clone(),
                    udp: udp.clone(),
                    routes: routes.clone(),
                    limits: limits.clone(),
                    shutdown: shutdown.clone(),
                    dialing: Some(dialing.clone()),
                };
                connection.dial(dial.bytes, &slots, &tracker);
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(error = %err, "tcp accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // Each refusal below drops the stream: closed before anything is read.
        if !limits.allows(peer, &engine) {
            engine.counters.denied.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "tcp connection from outside balancer.allow; closed");
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if !full {
                full = true;
                warn!(
                    limit = limits.max_connections,
                    "tcp connection table full; closing new connections"
                );
            }
            continue;
        };
        if full {
            full = false;
            info!("tcp connection table has room again");
        }
        let slot = match Peers::take(&peers, peer.ip(), limits.per_address) {
            Ok(slot) => slot,
            Err(first) => {
                if first {
                    warn!(address = %peer.ip(), limit = limits.per_address, "tcp connections per address at the limit; closing new ones from it");
                }
                continue;
            }
        };
        let connection = Connection {
            peer,
            engine: engine.clone(),
            udp: udp.clone(),
            routes: routes.clone(),
            limits: limits.clone(),
            shutdown: shutdown.clone(),
            dialing: None,
        };
        tracker.spawn(async move {
            let _held = (permit, slot);
            connection.serve(stream).await;
        });
    }
    routes.set_dialer(None);
    tracker.close();
    // Every connection stops reading at once and flushes for at most `drain`; the margin
    // only covers scheduling.
    let bound = limits.drain + Duration::from_secs(1);
    if tokio::time::timeout(bound, tracker.wait()).await.is_err() {
        warn!(timeout = ?bound, open = tracker.len(), "tcp connections did not close in time; leaving them");
    }
}

/// Open connections per IP address.
#[derive(Debug, Default)]
struct Peers {
    open: Mutex<HashMap<IpAddr, PeerCount>>,
}

#[derive(Debug, Default)]
struct PeerCount {
    open: usize,
    /// A connection was refused since the count was last below the limit (logged once).
    refused: bool,
}

/// One connection's share of its address's count; given back on drop.
#[derive(Debug)]
struct PeerSlot {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Peers {
    /// A slot for `ip`, or `Err(first)` when it holds `limit` already (`first`: the first
    /// refusal since it was below the limit).
    fn take(peers: &Arc<Self>, ip: IpAddr, limit: usize) -> Result<PeerSlot, bool> {
        let mut open = peers.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(ip).or_default();
        if count.open >= limit {
            let first = !count.refused;
            count.refused = true;
            return Err(first);
        }
        count.open += 1;
        count.refused = false;
        Ok(PeerSlot {
            peers: peers.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self
            .peers
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            count.open -= 1;
            if count.open == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// One connection and what it needs.
struct Connection {
    peer: SocketAddr,
    engine: Arc<Engine>,
    udp: Arc<std::net::UdpSocket>,
    routes: Arc<TcpRoutes>,
    limits: Arc<Limits>,
    shutdown: CancellationToken,
    /// Set on a connection we open: the messages waiting for it.
    dialing: Option<Arc<Dialing>>,
}

/// Why a connection's read loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    /// The peer closed, or the socket failed.
    Peer,
    /// Shutdown.
    Shutdown,
    /// The writer gave up (a write made no progress in time).
    Writer,
    /// No complete message within `message_timeout`.
    MessageTimeout,
    /// Nothing either way for `idle_timeout`.
    Idle,
    /// The stream cannot be framed any more, or the engine asked to close.
    Framing,
}

impl Connection {
    /// Opens a connection to this peer for `bytes`, unless one is being opened already
    /// (then they wait for it) or has opened since they were given up on.
    fn dial(self, bytes: Vec<u8>, slots: &Arc<Semaphore>, tracker: &TaskTracker) {
        let Some(dialing) = self.dialing.clone() else {
            return;
        };
        let to = self.peer;
        let mut waiting = dialing.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(queued) = waiting.get_mut(&to) {
            if queued.len() < self.limits.queue {
                queued.push(bytes);
            }
            return;
        }
        let Err(bytes) = self.routes.send(to, bytes) else {
            return;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!(%to, "tcp connection table full; a message for a peer without a connection is lost");
            return;
        };
        waiting.insert(to, vec![bytes]);
        drop(waiting);
        tracker.spawn(async move {
            let _held = permit;
            let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to));
            let stream = tokio::select! {
                _ = self.shutdown.cancelled() => None,
                connected = connect => connected.ok().and_then(Result::ok),
            };
            match stream {
                Some(stream) => {
                    debug!(%to, "tcp connection opened to a peer whose own had closed");
                    self.serve(stream).await;
                }
                None => {
                    let lost = dialing
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&to)
                        .map_or(0, |queued| queued.len());
                    warn!(%to, lost, timeout = ?CONNECT_TIMEOUT, "could not open a tcp connection to a peer; its messages are lost");
                }
            }
        });
    }

    async fn serve(self, stream: TcpStream) {
        let opened = Instant::now();
        let _ = stream.set_nodelay(true);
        let (mut reader, writer) = stream.into_split();
        let (sender, outgoing) = mpsc::channel::<Vec<u8>>(self.limits.queue);
        self.routes.insert(self.peer, sender.clone());
        if let Some(dialing) = &self.dialing {
            let waiting = dialing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&self.peer)
                .unwrap_or_default();
            for bytes in waiting {
                // The queue holds as many as may wait.
                let _ = sender.try_send(bytes);
            }
        }
        // Milliseconds after `opened` of the last completed write.
        let written = Arc::new(AtomicU64::new(0));
        let writer_done = CancellationToken::new();
        let write_task = tokio::spawn(write_loop(
            writer,
            outgoing,
            self.peer,
            opened,
            written.clone(),
            self.limits.clone(),
            self.shutdown.clone(),
            writer_done.clone(),
        ));
        let closed = self
            .read_loop(&mut reader, &sender, opened, &written, &writer_done)
            .await;
        debug!(peer = %self.peer, reason = ?closed, "tcp connection closing");
        self.routes.remove(self.peer);
        drop(sender);
        let _ = write_task.await;
    }

    async fn read_loop(
        &self,
        reader: &mut tokio::net::tcp::OwnedReadHalf,
        sender: &mpsc::Sender<Vec<u8>>,
        opened: Instant,
        written: &AtomicU64,
        writer_done: &CancellationToken,
    ) -> Closed {
        let limits = &*self.limits;
        let mut framer = Framer::new(limits.max_message);
        let mut buffer = Vec::with_capacity(READ_CHUNK);
        // A connection we opened carries our message first: it idles until the peer
        // answers.
        let outbound = self.dialing.is_some();
        // When the message being waited for began: an accepted connection's opening until
        // the first message is complete, then the first byte of each.
        let mut message_since = (!outbound).then_some(opened);
        // A message has been handed to the engine: from then on, waiting between messages
        // is idling.
        let mut served = outbound;
        let mut last_read = opened;
        let mut actions = Vec::new();
        loop {
            let deadline = match message_since {
                Some(since) => since + limits.message_timeout,
                None => {
                    let wrote = opened + Duration::from_millis(written.load(Ordering::Relaxed));
                    last_read.max(wrote) + limits.idle_timeout
                }
            };
            if buffer.capacity() - buffer.len() < READ_CHUNK / 4 {
                buffer.reserve(READ_CHUNK);
            }
            let read = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Closed::Shutdown,
                _ = writer_done.cancelled() => return Closed::Writer,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if message_since.is_some() {
                        return Closed::MessageTimeout;
                    }
                    // A write since the deadline was set moves it.
                    let wrote = opened + Duration::from_millis(written.load(Ordering::Relaxed));
                    if last_read.max(wrote) + limits.idle_timeout <= Instant::now() {
                        return Closed::Idle;
                    }
                    continue;
                }
                read = reader.read_buf(&mut buffer) => read,
            };
            match read {
                Ok(0) | Err(_) => return Closed::Peer,
                Ok(_) => {}
            }
            last_read = Instant::now();
            let mut used = 0;
            let mut done = None;
            while done.is_none() {
                let frame = framer.next(&buffer[used..]);
                let (len, honor_close) = match frame {
                    Frame::Incomplete => break,
                    Frame::Lost => {
                        self.engine
                            .counters
                            .malformed
                            .fetch_add(1, Ordering::Relaxed);
                        done = Some(Closed::Framing);
                        break;
                    }
                    Frame::Ping(len) => {
                        if let Some(closed) = self.queue(sender, PONG.to_vec(), writer_done).await {
                            return closed;
                        }
                        used += len;
                        continue;
                    }
                    Frame::Skip(len) => {
                        used += len;
                        continue;
                    }
                    Frame::Message(len) => {
                        message_since = None;
                        (len, true)
                    }
                    // We framed it and will skip its body: the stream is intact, whatever
                    // the engine thinks of a message this large. The skipping is timed as
                    // part of the message.
                    Frame::TooLarge(len) => (len, false),
                    Frame::BadLength(len) => {
                        done = Some(Closed::Framing);
                        (len, true)
                    }
                };
                self.engine.handle(
                    &buffer[used..used + len],
                    self.peer,
                    Transport::Tcp,
                    Instant::now(),
                    Duration::ZERO,
                    &mut actions,
                );
                used += len;
                for action in actions.drain(..) {
                    match action {
                        Action::Reply { bytes, .. } => {
                            if let Some(closed) = self.queue(sender, bytes, writer_done).await {
                                return closed;
                            }
                        }
                        Action::Close if honor_close => done = Some(Closed::Framing),
                        Action::Close => {}
                        forward => super::udp::perform(&self.udp, &self.routes, forward),
                    }
                }
                served = true;
            }
            if let Some(closed) = done {
                return closed;
            }
            buffer.drain(..used);
            if framer.mid_message() {
                message_since = message_since.or(Some(last_read));
            } else if served {
                message_since = None;
            }
        }
    }

    /// Queues an answer; waits while the queue is full (the peer is slow to read, so it
    /// is not read either). `Some` when the connection must close instead.
    async fn queue(
        &self,
        sender: &mpsc::Sender<Vec<u8>>,
        bytes: Vec<u8>,
        writer_done: &CancellationToken,
    ) -> Option<Closed> {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => Some(Closed::Shutdown),
            _ = writer_done.cancelled() => Some(Closed::Writer),
            sent = sender.send(bytes) => sent.err().map(|_| Closed::Writer),
        }
    }
}

/// Writes queued answers until the queue closes, a write makes no progress for
/// `write_timeout`, or `drain` has passed since shutdown; then cancels `done`.
#[allow(clippy::too_many_arguments)] // one call site, each argument distinct
async fn write_loop(
    mut writer: OwnedWriteHalf,
    mut outgoing: mpsc::Receiver<Vec<u8>>,
    peer: SocketAddr,
    opened: Instant,
    written: Arc<AtomicU64>,
    limits: Arc<Limits>,
    shutdown: CancellationToken,
    done: CancellationToken,
) {
    let write_timeout = limits.write_timeout;
    let work = async {
        while let Some(bytes) = outgoing.recv().await {
            match tokio::time::timeout(write_timeout, writer.write_all(&bytes)).await {
                Ok(Ok(())) => {
                    let ms = opened.elapsed().as_millis();
                    written.store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
                }
                Ok(Err(_)) => return,
                Err(_) => {
                    debug!(%peer, timeout = ?write_timeout, "tcp peer does not read; closing");
                    return;
                }
            }
        }
        let _ = tokio::time::timeout(write_timeout, writer.shutdown()).await;
    };
    let flushed = async {
        shutdown.cancelled().await;
        tokio::time::sleep(limits.drain).await;
    };
    tokio::select! {
        _ = work => {}
        _ = flushed => debug!(%peer, "tcp answers still unsent at shutdown; dropped"),
    }
    done.cancel();
}

#[cfg(test)]
#[path = "tcp_tests.rs"]
mod tests;
