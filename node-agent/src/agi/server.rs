//! The FastAGI server: accepts Asterisk's connections (`node.agi.listen`, loopback
//! `127.0.0.1:4573` by default), reads each one's environment and hands the [`Session`] to
//! the script its URL names.
//!
//! Every limit ends in the same place: the connection is closed, `AGI()` returns and the
//! dialplan goes on, which is the safe fallback for a call (see `docs/queued-calls.md`).
//! Because Asterisk then reports `AGISTATUS=SUCCESS` for most of them, the dialplan tests
//! the [`RESULT_VARIABLE`](super::session::RESULT_VARIABLE) a script sets instead.
//!
//! - **Sessions at once** are capped with a [`Semaphore`] (`max_sessions`). Beyond the
//!   cap a connection is closed as soon as it is accepted, not left in the kernel's
//!   backlog: Asterisk waits up to 2 s for its connect and would hold the call that long
//!   for nothing. Refusals are counted and logged at most every [`LOG_EVERY`].
//! - **A peer that says nothing:** the environment must arrive within
//!   `environment_timeout` of the accept; Asterisk sends it at once.
//! - **Unknown scripts** get `VERBOSE "callfleet: no FastAGI script <path>" 1`, a line in
//!   Asterisk's log naming the mistake, and the session is closed.
//! - **Bounded shutdown:** on shutdown the port is closed at once (a new `AGI()` fails and
//!   takes its fallback), scripts see [`Session::is_stopping`], and after `shutdown_grace`
//!   the sessions left are dropped. A session blocked in `EXEC Dial` is not cut short by
//!   it: Asterisk notices the closed connection only when Dial returns, so a call being
//!   rung or talked to goes on, and its dialplan continues afterwards.
//!
//! The counters ([`Stats`]) are plain atomics, read as a snapshot. The sessions are also
//! counted for Prometheus by script and outcome, through handles made when the server
//! starts.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callfleet_core::config::AgiConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::proto::Command;
use super::scripts::Scripts;
use super::session::{Session, SessionError};
use crate::metrics::{AgiSessions, NO_SCRIPT, SessionOutcome};

/// Refusals, unknown scripts and failed accepts are logged at most this often (with a
/// count).
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// The pause after an accept that failed for want of resources (file descriptors), so a
/// full descriptor table does not spin the loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(250);
/// How often a taken port is tried again.
const BIND_RETRY: Duration = Duration::from_secs(1);
/// The longest script path quoted back in the unknown-script line.
const MAX_SHOWN_PATH: usize = 100;

/// Why the FastAGI server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AgiError {
    /// The address cannot be listened on (not this host's, or not permitted).
    #[error(
        "cannot listen for FastAGI on {address}: {source}; set node.agi.listen to another ip:port (or empty for no FastAGI server)"
    )]
    Bind {
        /// The address asked for.
        address: SocketAddr,
        /// Why the system refused.
        source: std::io::Error,
    },
}

/// The server's limits, from `node.agi.*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Sessions served at once.
    pub max_sessions: usize,
    /// How long a new connection may take to send its environment.
    pub environment_timeout: Duration,
    /// The reply deadline of commands Asterisk answers at once.
    pub command_timeout: Duration,
    /// What sessions in progress get when the server stops.
    pub shutdown_grace: Duration,
}

impl Settings {
    /// The limits `config` sets.
    pub fn from_config(config: &AgiConfig) -> Self {
        Self {
            max_sessions: config.max_sessions,
            environment_timeout: config.environment_timeout,
            command_timeout: config.command_timeout,
            shutdown_grace: config.shutdown_grace,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self::from_config(&AgiConfig::default())
    }
}

/// What the server has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Whether the port is open (false before a taken port came free, and after shutdown).
    pub listening: bool,
    /// Connections accepted under the cap.
    pub accepted: u64,
    /// Connections closed at accept because `max_sessions` were in progress.
    pub refused: u64,
    /// Sessions in progress now (environment being read, or a script running).
    pub active: u64,
    /// Commands sent.
    pub commands: u64,
    /// Peers whose bytes were not FastAGI (environment or replies).
    pub protocol_errors: u64,
    /// Connections closed because no environment came within `environment_timeout`.
    pub environment_timeouts: u64,
    /// Commands that got no reply within their deadline.
    pub command_timeouts: u64,
    /// Sessions for a script nobody serves.
    pub unknown_scripts: u64,
    /// Scripts that ended with an error other than Asterisk closing the connection.
    pub script_errors: u64,
    /// Sessions dropped at the end of the shutdown grace.
    pub closed_at_shutdown: u64,
}

/// The live counters behind [`Stats`], shared by the accept loop and the sessions.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    listening: AtomicBool,
    accepted: AtomicU64,
    refused: AtomicU64,
    active: AtomicU64,
    commands: AtomicU64,
    protocol_errors: AtomicU64,
    environment_timeouts: AtomicU64,
    command_timeouts: AtomicU64,
    unknown_scripts: AtomicU64,
    script_errors: AtomicU64,
    closed_at_shutdown: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn command(&self) {
        bump(&self.commands);
    }

    pub(crate) fn protocol_error(&self) {
        bump(&self.protocol_errors);
    }

    pub(crate) fn timeout(&self) {
        bump(&self.command_timeouts);
    }

    fn snapshot(&self) -> Stats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Stats {
            listening: self.listening.load(Ordering::Relaxed),
            accepted: read(&self.accepted),
            refused: read(&self.refused),
            active: read(&self.active),
            commands: read(&self.commands),
            protocol_errors: read(&self.protocol_errors),
            environment_timeouts: read(&self.environment_timeouts),
            command_timeouts: read(&self.command_timeouts),
            unknown_scripts: read(&self.unknown_scripts),
            script_errors: read(&self.script_errors),
            closed_at_shutdown: read(&self.closed_at_shutdown),
        }
    }
}

/// A session counted in [`Stats::active`] and as open until dropped.
struct Active<'a>(&'a Shared);

impl<'a> Active<'a> {
    fn new(shared: &'a Shared) -> Self {
        bump(&shared.counters.active);
        shared.sessions.open(true);
        Self(shared)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.counters.active.fetch_sub(1, Ordering::Relaxed);
        self.0.sessions.open(false);
    }
}

/// What the accept loop and every session share.
#[derive(Debug)]
struct Shared {
    settings: Settings,
    scripts: Scripts,
    counters: Arc<Counters>,
    sessions: AgiSessions,
    /// Cancelled when the node-agent stops: sessions see it, the accept loop ends.
    shutdown: CancellationToken,
    /// Cancelled at the end of the grace: sessions left are dropped.
    force: CancellationToken,
    unknown_log: Throttle,
}

/// A running FastAGI server.
#[derive(Debug)]
pub struct AgiServer {
    address: SocketAddr,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl AgiServer {
    /// Serves `listener` until `shutdown` is cancelled, then drains within
    /// `settings.shutdown_grace`.
    pub fn start(
        listener: TcpListener,
        settings: Settings,
        scripts: Scripts,
        shutdown: CancellationToken,
    ) -> Self {
        let shared = shared(settings, scripts, shutdown);
        let address = listener
            .local_addr()
            .expect("a bound TCP listener has an address");
        let counters = shared.counters.clone();
        let task = tokio::spawn(serve(listener, shared));
        Self {
            address,
            counters,
            task,
        }
    }

    /// Binds `address` and serves it like [`AgiServer::start`].
    ///
    /// A port another process holds (an older node-agent still draining, a second agent
    /// on the same box) does not stop the node-agent: until it is free, `AGI()` fails
    /// after its connect and the dialplan takes its fallback; the port is tried again
    /// every second, and the change is logged each way.
    pub async fn bind(
        address: SocketAddr,
        settings: Settings,
        scripts: Scripts,
        shutdown: CancellationToken,
    ) -> Result<Self, AgiError> {
        if !address.ip().is_loopback() {
            warn!(
                %address,
                "FastAGI listens beyond loopback (node.agi.allow_remote): it has no authentication, so firewall the port to Asterisk"
            );
        }
        match TcpListener::bind(address).await {
            Ok(listener) => Ok(Self::start(listener, settings, scripts, shutdown)),
            Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
                warn!(
                    %address,
                    error = %err,
                    "FastAGI port taken; AGI() takes the dialplan's fallback until it is free, retrying every second"
                );
                let shared = shared(settings, scripts, shutdown);
                let counters = shared.counters.clone();
                let task = tokio::spawn(async move {
                    let listener = loop {
                        tokio::select! {
                            () = shared.shutdown.cancelled() => return,
                            () = tokio::time::sleep(BIND_RETRY) => {}
                        }
                        if let Ok(listener) = TcpListener::bind(address).await {
                            info!(%address, "FastAGI port free");
                            break listener;
                        }
                    };
                    serve(listener, shared).await;
                });
                Ok(Self {
                    address,
                    counters,
                    task,
                })
            }
            Err(source) => Err(AgiError::Bind { address, source }),
        }
    }

    /// Returns the address Asterisk connects to (`agi://ADDRESS/<script>`).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Returns what the server has done so far.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }

    /// Waits until the server has stopped: after `shutdown`, once its sessions ended or
    /// the grace dropped them. Returns the final counts.
    pub async fn stopped(self) -> Stats {
        if let Err(err) = self.task.await {
            warn!(error = %err, "FastAGI server task failed");
        }
        self.counters.snapshot()
    }
}

fn shared(settings: Settings, scripts: Scripts, shutdown: CancellationToken) -> Arc<Shared> {
    Arc::new(Shared {
        settings,
        sessions: AgiSessions::new(scripts.paths()),
        scripts,
        counters: Arc::new(Counters::default()),
        shutdown,
        force: CancellationToken::new(),
        unknown_log: Throttle::default(),
    })
}

/// The accept loop, then the bounded drain.
async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let settings = shared.settings;
    let sessions = Arc::new(Semaphore::new(settings.max_sessions));
    let tracker = TaskTracker::new();
    let counters = &shared.counters;
    let (refusals, accept_errors) = (Throttle::default(), Throttle::default());
    counters.listening.store(true, Ordering::Relaxed);
    info!(
        address = %listener.local_addr().map_or_else(|err| err.to_string(), |a| a.to_string()),
        scripts = ?shared.scripts,
        max_sessions = settings.max_sessions,
        "FastAGI server ready"
    );
    loop {
        let accepted = tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // The peer gave up between its SYN and our accept: nothing to do.
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                if let Some(failures) = accept_errors.due() {
                    warn!(
                        error = %err,
                        failures,
                        "cannot accept a FastAGI connection; is the file limit (ulimit -n) well above node.agi.max_sessions?"
                    );
                }
                tokio::select! {
                    () = shared.shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(permit) = sessions.clone().try_acquire_owned() else {
            bump(&counters.refused);
            shared.sessions.ended(NO_SCRIPT, SessionOutcome::Refused);
            if let Some(refused) = refusals.due() {
                warn!(
                    %peer,
                    limit = settings.max_sessions,
                    refused,
                    "FastAGI session refused at accept: node.agi.max_sessions reached; the dialplan takes its fallback"
                );
            }
            // Dropped: closed before a byte is read, and AGI() returns.
            continue;
        };
        bump(&counters.accepted);
        // One command line, one reply line: Nagle would hold each for the peer's delayed
        // ACK.
        if let Err(err) = stream.set_nodelay(true) {
            debug!(error = %err, "cannot set TCP_NODELAY");
        }
        tracker.spawn(session_task(stream, peer, permit, shared.clone()));
    }
    // Closes the port: a new AGI() is refused by the kernel and takes its fallback at once.
    drop(listener);
    counters.listening.store(false, Ordering::Relaxed);
    tracker.close();
    let open = tracker.len();
    if open > 0 {
        info!(sessions = open, grace = ?settings.shutdown_grace, "draining FastAGI sessions");
    }
    if tokio::time::timeout(settings.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            sessions = tracker.len(),
            grace = ?settings.shutdown_grace,
            "FastAGI sessions still running after the shutdown grace; closing them (their dialplans go on)"
        );
        shared.force.cancel();
        tracker.wait().await;
    }
    let stats = counters.snapshot();
    info!(
        accepted = stats.accepted,
        refused = stats.refused,
        commands = stats.commands,
        protocol_errors = stats.protocol_errors,
        closed_at_shutdown = stats.closed_at_shutdown,
        "FastAGI server stopped"
    );
}

/// Errors of one connection that was never ours (see hyper's and axum's accept loops).
fn is_connection_error(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// One session, from the accept to the close, unless the grace ends first.
async fn session_task(
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
) {
    let active = Active::new(&shared);
    // Which script the session runs, once its environment has said.
    let row = AtomicUsize::new(NO_SCRIPT);
    let outcome = tokio::select! {
        biased;
        () = shared.force.cancelled() => {
            bump(&shared.counters.closed_at_shutdown);
            debug!(%peer, "FastAGI session closed at the end of the shutdown grace");
            SessionOutcome::Shutdown
        }
        outcome = run_session(stream, peer, &shared, &row) => outcome,
    };
    shared.sessions.ended(row.load(Ordering::Relaxed), outcome);
    // The session's socket is closed by now (dropped with its future): only then may the
    // next one take the place.
    drop(active);
    drop(permit);
}

async fn run_session(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    row: &AtomicUsize,
) -> SessionOutcome {
    let settings = &shared.settings;
    let session = match Session::start(
        stream,
        peer,
        settings.environment_timeout,
        settings.command_timeout,
        shared.counters.clone(),
        shared.shutdown.clone(),
    )
    .await
    {
        Ok(session) => session,
        Err(err) => {
            if matches!(err, SessionError::NoEnvironment(_)) {
                bump(&shared.counters.environment_timeouts);
            }
            debug!(%peer, error = %err, "FastAGI connection closed before its environment");
            return SessionOutcome::NoEnvironment;
        }
    };
    row.store(shared.sessions.row(session.script()), Ordering::Relaxed);
    let Some(handler) = shared.scripts.get(session.script()) else {
        unknown_script(session, shared).await;
        return SessionOutcome::UnknownScript;
    };
    let script = session.script().to_owned();
    let channel = session.environment().channel().unwrap_or("").to_owned();
    match handler.run(session).await {
        Ok(()) => SessionOutcome::Ok,
        Err(SessionError::Closed) => SessionOutcome::Hangup,
        Err(err) => {
            bump(&shared.counters.script_errors);
            warn!(%peer, script, channel, error = %err, "FastAGI script failed; the dialplan goes on");
            SessionOutcome::Error
        }
    }
}

/// Says in Asterisk's log which script is missing, then ends the session.
async fn unknown_script(mut session: Session, shared: &Shared) {
    bump(&shared.counters.unknown_scripts);
    let path = shown(session.script());
    if let Some(sessions) = shared.unknown_log.due() {
        warn!(
            script = path,
            request = session.environment().request().unwrap_or(""),
            serves = ?shared.scripts,
            sessions,
            "FastAGI session for an unknown script; the dialplan goes on without CALLFLEET_RESULT"
        );
    }
    let line = Command::verbose(format!("callfleet: no FastAGI script {path}"), 1);
    if let Err(err) = session.send(&line).await {
        debug!(error = %err, "unknown-script line not delivered");
    }
}

/// The script path as the unknown-script line shows it. It was decoded from the URL, so it
/// may hold anything: control characters (a line feed could not even travel) are shown
/// escaped, the rest as it is.
fn shown(path: &str) -> String {
    if path.is_empty() {
        return "(none in the AGI URL)".to_owned();
    }
    let mut out = String::with_capacity(path.len());
    for c in path.chars().take(MAX_SHOWN_PATH) {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// Counts events and says when one is due to be logged: the first, then at most one per
/// [`LOG_EVERY`], each with the number of events it covers.
#[derive(Debug, Default)]
struct Throttle(Mutex<(u64, Option<Instant>)>);

impl Throttle {
    fn due(&self) -> Option<u64> {
        let mut state = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (unlogged, logged_at) = &mut *state;
        *unlogged += 1;
        let now = Instant::now();
        if logged_at.is_some_and(|at| now.duration_since(at) < LOG_EVERY) {
            return None;
        }
        *logged_at = Some(now);
        Some(std::mem::take(unlogged))
    }
}
