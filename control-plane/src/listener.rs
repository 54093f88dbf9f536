//! The control plane's listener: one TCP port for REST, XML-RPC and gRPC (HTTP/1 and
//! HTTP/2 told apart by the first bytes), with the limits a plain `axum::serve` lacks.
//!
//! - **Connections at once** are capped twice, with a [`Semaphore`] for the whole listener
//!   (`max_connections`) and a count per client address (`max_connections_per_address`, an
//!   IPv6 client's /64, as [`client_key`] counts it). Beyond a cap a new
//!   connection is closed as soon as it is accepted, rather than left unaccepted: a
//!   connection left in the kernel's backlog waits without a word, once the backlog is full
//!   new clients' SYNs are dropped and they retry after 1, 3, 7 s, and which of them gets in
//!   next is not ours to choose; a closed connection tells the client at once, so a CRM
//!   retries or fails over, and one address cannot crowd the others out of the queue.
//!   Refusals are counted and logged at most every [`LOG_EVERY`].
//! - **Slow or silent clients:** a connection with no request in progress is closed (HTTP/2
//!   with a GOAWAY) after `idle_timeout`, and sooner, after `header_timeout`, unless it
//!   opened with HTTP/2's preface: so an HTTP/1 request's header must arrive within
//!   `header_timeout` of the connection's start or of the end of the previous answer, and a
//!   client that connects and sends nothing, or trickles half a header, is closed then. One
//!   timer per connection does this, read from two atomics each request touches, instead
//!   of hyper's header timer, which it set and cleared for every request (hyper counts the
//!   same span, from when it starts reading a head). HTTP/2 connections are pinged every
//!   [`H2_PING_EVERY`] and dropped when a ping goes unanswered for [`H2_PING_TIMEOUT`], so a
//!   vanished peer does not hold its requests' slots.
//! - **Bounded shutdown:** on shutdown the listener stops accepting (the port is closed),
//!   every connection is asked to finish (HTTP/1 closes after the answer in progress,
//!   HTTP/2 sends a GOAWAY), and after `shutdown_grace` whatever is left is dropped, so the
//!   process exits however slow a request or a client is.
//! - **One thread per connection:** each accepted connection is served on one of a runtime
//!   per CPU ([`ConnectionThreads`]), never moved between threads. On the work-stealing
//!   runtime the public status answered 57 % of a bare axum handler's requests per second,
//!   and 70-73 % this way (`./scripts/bench-control`, 64 connections, one 10 s run each).
//!
//! Each request carries the peer's address as [`ConnectInfo<SocketAddr>`], which the public
//! status's rate limit ([`crate::ratelimit`]) reads.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use callfleet_core::config::ControlPlaneConfig;
use callfleet_core::connection_threads::{self, ConnectionThreads};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::ratelimit::client_key;

/// Refused connections and failed accepts are logged at most this often (with a count).
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// How often an HTTP/2 connection is pinged.
pub const H2_PING_EVERY: Duration = Duration::from_secs(30);
/// How long an HTTP/2 ping may go unanswered before the connection is dropped.
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// The pause after an accept that failed for want of resources (file descriptors), so a
/// full descriptor table does not spin the loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(250);

/// The listener's limits, from `control_plane.*`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections served at once from one client address.
    pub max_connections_per_address: usize,
    /// The longest an HTTP/1 request's header may take to arrive.
    pub header_timeout: Duration,
    /// A connection without a request in progress this long is closed.
    pub idle_timeout: Duration,
    /// What requests in progress get to finish when their connection is closed.
    pub shutdown_grace: Duration,
}

impl Limits {
    /// The limits `config` sets.
    pub fn from_config(config: &ControlPlaneConfig) -> Self {
        Self {
            max_connections: config.max_connections,
            max_connections_per_address: config.max_connections_per_address,
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
            shutdown_grace: config.shutdown_grace,
        }
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown`, then drains for at most
/// `limits.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let mut threads = match ConnectionThreads::per_cpu("control-conn") {
        Ok(threads) => threads,
        Err(err) => {
            warn!(error = %err, "cannot start the connection threads; not serving");
            return;
        }
    };
    let builder = Arc::new(builder());
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let per_address = Arc::new(PerAddress::new(limits.max_connections_per_address));
    let tracker = TaskTracker::new();
    let force = CancellationToken::new();
    let mut counts = Counts::default();
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // The peer gave up between its SYN and our accept: nothing to do.
            Err(err) if connection_threads::is_connection_error(&err) => continue,
            Err(err) => {
                counts.accept_failed(&err);
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            counts.refuse(Refusal::Full, peer, &limits);
            continue;
        };
        let Some(slot) = per_address.take(peer.ip()) else {
            counts.refuse(Refusal::PerAddress, peer, &limits);
            continue;
        };
        counts.accepted += 1;
        // Small request/response exchanges: Nagle would hold a reply for the peer's
        // delayed ACK.
        if let Err(err) = stream.set_nodelay(true) {
            debug!(error = %err, "cannot set TCP_NODELAY");
        }
        let held = Held {
            _permit: permit,
            _slot: slot,
        };
        let connection = Connection {
            app: app.clone(),
            builder: builder.clone(),
            limits,
            shutdown: shutdown.clone(),
            force: force.clone(),
        };
        let token = tracker.token();
        let spawned = threads.spawn(stream, move |stream| async move {
            connection.serve(stream, peer, held).await;
            drop(token);
        });
        if let Err(err) = spawned {
            warn!(error = %err, "cannot hand a connection to its thread");
        }
    }
    // Closes the port: from now on a client is refused by the kernel, not left waiting.
    drop(listener);
    tracker.close();
    let open = tracker.len();
    if open > 0 {
        info!(connections = open, grace = ?limits.shutdown_grace, "draining connections");
    }
    if tokio::time::timeout(limits.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            connections = tracker.len(),
            grace = ?limits.shutdown_grace,
            "requests still in progress after the shutdown grace; dropping their connections"
        );
        force.cancel();
        tracker.wait().await;
    }
    info!(
        accepted = counts.accepted,
        refused_full = counts.full,
        refused_per_address = counts.per_address,
        accept_errors = counts.accept_errors,
        "control plane listener stopped"
    );
}

fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No HTTP/1 timer: the connection's idle timer bounds the header (module doc).
    builder.http1().header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_EVERY)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    builder
}

/// What one connection task needs besides its socket.
struct Connection {
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: Limits,
    shutdown: CancellationToken,
    force: CancellationToken,
}

/// The connection's places under the caps, given back when its task ends.
struct Held {
    _permit: OwnedSemaphorePermit,
    _slot: Slot,
}

impl Connection {
    async fn serve(self, stream: TcpStream, peer: SocketAddr, held: Held) {
        let activity = Arc::new(Activity::new());
        let service = {
            let (app, activity) = (self.app, activity.clone());
            tower::service_fn(move |mut request: Request<_>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                let busy = activity.begin();
                let answer = app.clone().oneshot(request);
                async move {
                    let response = answer.await?;
                    // The request is in progress until its answer's body has been sent (or
                    // dropped): the guard lives as long as the body.
                    Ok::<_, Infallible>(response.map(|body| {
                        Body::new(body.map_frame(move |frame| {
                            let _in_progress = &busy;
                            frame
                        }))
                    }))
                }
            })
        };
        let connection = self.builder.serve_connection(
            TokioIo::new(Sniffed::new(stream, activity.clone())),
            TowerToHyperService::new(service),
        );
        tokio::pin!(connection);
        let reason = tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    debug!(%peer, error = %err, "connection ended with an error");
                }
                return;
            }
            () = activity.idle_for(self.limits.header_timeout, self.limits.idle_timeout) => Close::Idle,
            () = self.shutdown.cancelled() => Close::Shutdown,
        };
        debug!(%peer, ?reason, "closing connection");
        if matches!(reason, Close::Idle) && activity.is_http1_between_requests() {
            // Nothing to finish, and hyper would wait for the rest of a half-sent header
            // before it closes: dropping the connection closes it.
            return;
        }
        connection.as_mut().graceful_shutdown();
        // Bounded: an HTTP/2 peer may never answer the GOAWAY's ping, a client may never
        // read the answer it asked for. At shutdown the listener says when the grace is
        // over (and counts what it drops); an idle close keeps its own time.
        let grace = async {
            match reason {
                Close::Idle => tokio::time::sleep(self.limits.shutdown_grace).await,
                Close::Shutdown => std::future::pending().await,
            }
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    debug!(%peer, error = %err, "connection ended with an error while closing");
                }
            }
            () = self.force.cancelled() => {
                debug!(%peer, "connection dropped at the end of the shutdown grace");
            }
            () = grace => debug!(%peer, "idle connection dropped: it did not close within the grace"),
        }
        drop(held);
    }
}

/// Why a connection is being closed.
#[derive(Debug, Clone, Copy)]
enum Close {
    Idle,
    Shutdown,
}

/// Requests in progress on one connection, and since when there have been none. Requests
/// only touch these atomics; the idle timer reads them when it fires (once per
/// `header_timeout` at most), so a request wakes no task and moves no timer: on a
/// kept-alive connection that did both twice per request, they cost more than the status
/// route.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    in_progress: AtomicUsize,
    /// Milliseconds after `opened` when the last request ended.
    idle_since_ms: AtomicU64,
    /// The connection opened with HTTP/2's preface: no header timeout.
    http2: AtomicBool,
}

/// One request in progress; ends when dropped.
#[derive(Debug)]
struct Busy(Arc<Activity>);

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            in_progress: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            http2: AtomicBool::new(false),
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_progress.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    /// Not (yet) HTTP/2, and no request in progress.
    fn is_http1_between_requests(&self) -> bool {
        !self.http2.load(Ordering::Relaxed) && self.in_progress.load(Ordering::Acquire) == 0
    }

    /// Returns once no request has been in progress for `idle_timeout`, or for
    /// `header_timeout` while the connection has not shown itself HTTP/2.
    async fn idle_for(&self, header_timeout: Duration, idle_timeout: Duration) {
        loop {
            let timeout = if self.http2.load(Ordering::Relaxed) {
                idle_timeout
            } else {
                idle_timeout.min(header_timeout)
            };
            let now = Instant::now();
            let deadline = if self.in_progress.load(Ordering::Acquire) > 0 {
                // Busy: look again a whole timeout later, the earliest it could be over.
                now + timeout
            } else {
                let idle_since =
                    self.opened + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
                let deadline = idle_since + timeout;
                if deadline <= now {
                    return;
                }
                deadline
            };
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let activity = &self.0;
        let ms = u64::try_from(activity.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        // Before the count falls: a timer that sees no request in progress sees this end.
        activity.idle_since_ms.fetch_max(ms, Ordering::AcqRel);
        activity.in_progress.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connection's socket, which tells its [`Activity`] when the client's first bytes are
/// HTTP/2's preface: an HTTP/2 client may open a connection and send its first request much
/// later, and is then bound by `idle_timeout` alone; for anything else the header timeout
/// runs from the start.
struct Sniffed {
    stream: TcpStream,
    activity: Arc<Activity>,
    /// The client's first bytes, until there are enough to tell.
    first: [u8; 3],
    seen: usize,
}

impl Sniffed {
    fn new(stream: TcpStream, activity: Arc<Activity>) -> Self {
        Self {
            stream,
            activity,
            first: [0; 3],
            seen: 0,
        }
    }
}

impl tokio::io::AsyncRead for Sniffed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.stream).poll_read(cx, buf);
        let this = &mut *self;
        if this.seen < this.first.len() {
            let new = &buf.filled()[before..];
            let take = new.len().min(this.first.len() - this.seen);
            this.first[this.seen..this.seen + take].copy_from_slice(&new[..take]);
            this.seen += take;
            if this.seen == this.first.len() && this.first == *b"PRI" {
                this.activity.http2.store(true, Ordering::Relaxed);
            }
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Sniffed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Connections open per client address.
#[derive(Debug)]
struct PerAddress {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in its address's count.
#[derive(Debug)]
struct Slot {
    owner: Arc<PerAddress>,
    key: IpAddr,
}

impl PerAddress {
    fn new(max: usize) -> Self {
        Self {
            max,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn take(self: &Arc<Self>, address: IpAddr) -> Option<Slot> {
        let key = client_key(address);
        let mut open = self.open.lock().expect("per-address lock");
        let count = open.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Slot {
            owner: self.clone(),
            key,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().expect("per-address lock");
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Refusal {
    Full,
    PerAddress,
}

/// What the accept loop did, for its rate-limited warnings and its last line.
#[derive(Debug, Default)]
struct Counts {
    accepted: u64,
    full: u64,
    per_address: u64,
    accept_errors: u64,
    /// Refusals and failed accepts since the last warning.
    unlogged: u64,
    logged_at: Option<Instant>,
}

impl Counts {
    fn refuse(&mut self, why: Refusal, peer: SocketAddr, limits: &Limits) {
        let (cap, limit) = match why {
            Refusal::Full => {
                self.full += 1;
                ("max_connections", limits.max_connections)
            }
            Refusal::PerAddress => {
                self.per_address += 1;
                (
                    "max_connections_per_address",
                    limits.max_connections_per_address,
                )
            }
        };
        if let Some(refused) = self.due() {
            warn!(
                %peer,
                cap,
                limit,
                refused,
                "connection refused at accept: control_plane.{cap} reached"
            );
        }
    }

    fn accept_failed(&mut self, err: &std::io::Error) {
        self.accept_errors += 1;
        if let Some(failures) = self.due() {
            warn!(
                error = %err,
                failures,
                "cannot accept a connection; is the file limit (ulimit -n) well above control_plane.max_connections?"
            );
        }
    }

    /// Counts one event; when a warning is due, the number of events it covers (this one
    /// and those since the last warning).
    fn due(&mut self) -> Option<u64> {
        self.unlogged += 1;
        let now = Instant::now();
        if self
            .logged_at
            .is_some_and(|at| now.duration_since(at) < LOG_EVERY)
        {
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}
