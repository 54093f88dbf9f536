//! The node's realtime provisioning endpoint: Asterisk's `res_config_curl` asks it for
//! PJSIP objects (`ps_endpoints`, `ps_aors`, `ps_auths`, `ps_contacts`), it asks the
//! control plane, and it answers from its cache when the control plane cannot.
//!
//! To `res_config_curl` a failed request (refused connection, timeout, another status than
//! 200) reads exactly like "no such object", so an Asterisk pointed straight at the control
//! plane forgets every phone while the control plane is away. This endpoint is
//! *stale-if-error*: each request goes on to the control plane with a short `deadline`, and
//! every 200 answer is cached; when the control plane fails, the cached answer (at most
//! `stale_max` old) is served, and for `retry_after` after a failure the control plane is
//! not asked at all (a circuit breaker), so during an outage Asterisk never waits.
//!
//! Writes are registrations (`ps_contacts`) and must not be lost: they go to the control
//! plane in the order Asterisk made them; one it cannot take now is queued (and kept in
//! `pending_file`), Asterisk hears `1`, and a background task delivers the queue in order
//! when the control plane answers again. Reads see writes: an answer from the cache has the
//! writes logged after it was fetched replayed over its rows (`overlay.rs`), so a phone that
//! registers during an outage can be called on this node, and one that unregistered cannot.
//!
//! Request and answer bodies are never logged: `ps_auths` answers carry digest credentials.
//!
//! ```text
//! Asterisk ─POST /realtime/<family>/<operation>─▶ node-agent ─POST /asterisk/realtime/<family>/<operation>─▶ control plane
//!                                                  (cache, write log, pending queue)   Authorization: Bearer <provisioning.token>
//! ```

mod journal;
mod overlay;
mod service;
mod state;
#[cfg(test)]
mod tests;
pub(crate) mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::serve::ListenerExt as _;
use bytes::Bytes;
use callfleet_core::config::ProvisioningConfig;
use callfleet_core::realtime::{self, Operation, RealtimeError};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::journal::Journal;
use self::service::{Settings, Shared};
use self::state::State as Memory;
use self::upstream::Upstream;

/// Why the provisioning endpoint cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ProvisioningError {
    /// `provisioning.listen` is not an address.
    #[error("provisioning.listen `{0}` is not ip:port; set it to e.g. 127.0.0.1:8090")]
    Listen(String),
    /// The address cannot be listened on (taken, or not this host's).
    #[error(
        "cannot listen for Asterisk's realtime requests on {address}: {source}; stop what holds the port or set provisioning.listen to another ip:port"
    )]
    Bind {
        /// The address asked for.
        address: SocketAddr,
        /// Why the system refused.
        source: std::io::Error,
    },
    /// The control plane's URL cannot be asked.
    #[error(
        "the control plane URL `{url}` cannot be used: {reason}; set provisioning.control_plane to e.g. http://10.0.0.2:8080"
    )]
    ControlPlaneUrl {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The token cannot go into a header.
    #[error(
        "provisioning.token is not a valid HTTP header value; give it a control-plane token with role \"node\""
    )]
    Token,
    /// The pending-writes file cannot be read or written.
    #[error(
        "cannot use the pending-writes file {path}: {source}; fix its folder's permissions or set provisioning.pending_file to another path"
    )]
    PendingFile {
        /// The file as configured.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The listener failed while serving.
    #[error("the provisioning endpoint stopped serving: {0}")]
    Serve(#[source] std::io::Error),
}

/// What the endpoint has done since it started, as `GET /stats` serves it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Requests answered by the control plane (reads and writes).
    pub upstream: u64,
    /// Reads answered from the cache because the control plane could not be asked.
    pub stale: u64,
    /// Reads with nothing usable in the cache, answered "no row" (`0` for `require`).
    pub misses: u64,
    /// Writes waiting for the control plane now.
    pub pending: u64,
    /// Queued writes delivered later.
    pub delivered: u64,
    /// Queued writes the control plane answered `-1` to, dropped.
    pub rejected: u64,
    /// Requests to the control plane that failed (status, transport, deadline).
    pub failures: u64,
    /// Answers in the cache now.
    pub cached: u64,
}

/// A family of PJSIP objects Asterisk's extconfig points at this endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Family {
    Endpoints,
    Aors,
    Auths,
    Contacts,
}

/// Every family, in index order.
const FAMILIES: [Family; 4] = [
    Family::Endpoints,
    Family::Aors,
    Family::Auths,
    Family::Contacts,
];

impl Family {
    fn parse(name: &str) -> Option<Self> {
        FAMILIES.into_iter().find(|family| family.name() == name)
    }

    /// The name in the URL and in Asterisk's extconfig.
    fn name(self) -> &'static str {
        match self {
            Self::Endpoints => "ps_endpoints",
            Self::Aors => "ps_aors",
            Self::Auths => "ps_auths",
            Self::Contacts => "ps_contacts",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The operation as the URL names it.
fn operation_name(operation: Operation) -> &'static str {
    match operation {
        Operation::Single => "single",
        Operation::Multi => "multi",
        Operation::Store => "store",
        Operation::Update => "update",
        Operation::Update2 => "update2",
        Operation::Destroy => "destroy",
        Operation::Require => "require",
        Operation::Static => "static",
    }
}

/// A running provisioning endpoint.
#[derive(Debug)]
pub struct Provisioning {
    address: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<std::io::Result<()>>,
    shutdown: CancellationToken,
}

impl Provisioning {
    /// Loads the pending-writes file, binds `config.listen` and serves until `shutdown`;
    /// `control_plane` is the control plane's base URL
    /// ([`ProvisioningConfig::control_plane_url`]).
    pub async fn start(
        config: &ProvisioningConfig,
        control_plane: &str,
        shutdown: CancellationToken,
    ) -> Result<Self, ProvisioningError> {
        Self::launch(config, control_plane, shutdown, true).await
    }

    async fn launch(
        config: &ProvisioningConfig,
        control_plane: &str,
        shutdown: CancellationToken,
        overlay: bool,
    ) -> Result<Self, ProvisioningError> {
        let address: SocketAddr = config
            .listen
            .parse()
            .map_err(|_| ProvisioningError::Listen(config.listen.clone()))?;
        let upstream = Upstream::new(control_plane, config.token.expose(), config.deadline)?;
        let (journal, loaded) = if config.pending_file.is_empty() {
            (None, journal::Loaded::default())
        } else {
            let path = PathBuf::from(&config.pending_file);
            let opened = tokio::task::spawn_blocking(move || Journal::open(&path))
                .await
                .map_err(std::io::Error::other)
                .and_then(|opened| opened);
            let (journal, loaded) = opened.map_err(|source| ProvisioningError::PendingFile {
                path: config.pending_file.clone(),
                source,
            })?;
            (Some(Arc::new(Mutex::new(journal))), loaded)
        };
        let memory = restore(&config.pending_file, loaded);

        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| ProvisioningError::Bind { address, source })?;
        let address = listener
            .local_addr()
            .map_err(|source| ProvisioningError::Bind { address, source })?;
        let tasks = TaskTracker::new();
        let shared = Arc::new(Shared {
            settings: Settings {
                deadline: config.deadline,
                stale_max: config.stale_max,
                retry_after: config.retry_after,
                prefetch: config.prefetch,
            },
            state: Mutex::new(memory),
            counters: service::Counters::default(),
            lane: tokio::sync::Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            upstream,
            journal,
            journal_path: config.pending_file.clone(),
            overlay,
            tasks: tasks.clone(),
        });
        tasks.spawn(shared.clone().deliver(shutdown.clone()));
        tasks.spawn(shared.clone().maintain(shutdown.clone()));
        tasks.spawn(shared.clone().warm(shutdown.clone()));
        // Small request/answer exchanges: Nagle would hold an answer for a delayed ACK.
        let listener = listener.tap_io(|stream| {
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(error = %err, "cannot set TCP_NODELAY");
            }
        });
        let server = tokio::spawn(
            axum::serve(listener, router(shared.clone()))
                .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                .into_future(),
        );
        tracing::info!(
            %address,
            control_plane,
            deadline = ?config.deadline,
            stale_max = ?config.stale_max,
            retry_after = ?config.retry_after,
            "provisioning endpoint ready"
        );
        Ok(Self {
            address,
            shared,
            server,
            shutdown,
        })
    }

    /// The address Asterisk's extconfig points at (`http://ADDRESS/realtime/<family>`).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// What the endpoint has done so far.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Reads [`Provisioning::stats`] from another task, which the endpoint may outlive.
    pub fn stats_reader(&self) -> impl Fn() -> Stats + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || shared.stats()
    }

    /// Waits for `shutdown`, then for the requests being answered (each bounded by
    /// `deadline`) and the background tasks, at most
    /// [`DRAIN_TIMEOUT`](callfleet_core::shutdown::DRAIN_TIMEOUT).
    pub async fn stopped(self) -> Result<(), ProvisioningError> {
        self.shutdown.cancelled().await;
        let mut server = self.server;
        let served = match tokio::time::timeout(
            callfleet_core::shutdown::DRAIN_TIMEOUT,
            &mut server,
        )
        .await
        {
            Ok(Ok(served)) => served.map_err(ProvisioningError::Serve),
            Ok(Err(panicked)) => Err(ProvisioningError::Serve(std::io::Error::other(panicked))),
            Err(_) => {
                server.abort();
                tracing::warn!("provisioning requests still open at the drain timeout; dropped");
                Ok(())
            }
        };
        let tasks = self.shared.tasks.clone();
        tasks.close();
        callfleet_core::shutdown::bounded("provisioning", tasks.wait()).await;
        let pending = self.shared.stats().pending;
        if pending > 0 {
            if self.shared.journal.is_some() {
                tracing::info!(
                    pending,
                    file = %self.shared.journal_path,
                    "pending writes kept for the next start"
                );
            } else {
                tracing::warn!(
                    pending,
                    "pending writes lost; set provisioning.pending_file to keep them across restarts"
                );
            }
        }
        tracing::info!("provisioning endpoint stopped");
        served
    }
}

/// Serves the provisioning endpoint until `shutdown` (see [`Provisioning::start`]).
pub async fn run(
    config: &ProvisioningConfig,
    control_plane: &str,
    shutdown: CancellationToken,
) -> Result<(), ProvisioningError> {
    Provisioning::start(config, control_plane, shutdown)
        .await?
        .stopped()
        .await
}

/// The state with the writes a previous run left pending, in their order.
fn restore(file: &str, loaded: journal::Loaded) -> Memory {
    let mut memory = Memory::new(loaded.delivered_through);
    if loaded.skipped > 0 {
        tracing::warn!(
            file,
            lines = loaded.skipped,
            "unreadable lines in the pending-writes file skipped (a crash while writing)"
        );
    }
    let count = loaded.pending.len();
    for write in loaded.pending {
        let parsed = Family::parse(&write.family).and_then(|family| {
            let target = format!("/{}/{}?{}", write.family, write.operation, write.query);
            realtime::parse_request(&target, write.body.as_bytes())
                .ok()
                .filter(|request| request.operation.writes())
                .map(|request| (family, request))
        });
        let Some((family, request)) = parsed else {
            tracing::warn!(
                file,
                seq = write.seq,
                family = write.family,
                operation = write.operation,
                "pending write not understood; dropped"
            );
            continue;
        };
        let seq = write.seq;
        let logged = memory.log(
            family,
            request,
            write.query,
            Bytes::from(write.body),
            Some(seq),
        );
        memory.pending.insert(seq, logged);
    }
    if count > 0 {
        tracing::info!(
            file,
            pending = memory.pending.len(),
            "pending writes of the last run loaded; delivering them in order"
        );
    }
    memory
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/realtime/{family}/{operation}", any(realtime_request))
        .route("/stats", get(stats))
        .fallback(|| async {
            not_found(
                "no such path; Asterisk's extconfig points each family at http://LISTEN/realtime/<family>",
            )
        })
        .with_state(shared)
}

fn not_found(reason: impl Into<String>) -> Response {
    let mut line = reason.into();
    line.push('\n');
    (StatusCode::NOT_FOUND, line).into_response()
}

async fn realtime_request(
    State(shared): State<Arc<Shared>>,
    method: Method,
    Path((family, operation)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let Some(known) = Family::parse(&family) else {
        return not_found(format!(
            "unknown realtime family `{family}`; this endpoint serves ps_endpoints, ps_aors, ps_auths and ps_contacts"
        ));
    };
    let query = query.unwrap_or_default();
    let target = format!("/{family}/{operation}?{query}");
    let request = match realtime::parse_request(&target, &body) {
        Ok(request) => request,
        Err(RealtimeError::Operation(_)) => {
            return not_found(format!(
                "unknown realtime operation `{operation}`; res_config_curl sends single, multi, store, update, update2, destroy, require or static"
            ));
        }
        Err(RealtimeError::Encoding(_)) => {
            // Not the error itself: it quotes the body, and ps_auths bodies are credentials.
            tracing::debug!(family, operation, "request with bad percent-encoding");
            return (
                StatusCode::BAD_REQUEST,
                "the request is not valid percent-encoding\n",
            )
                .into_response();
        }
    };
    let answer = if request.operation.writes() {
        let work = shared.clone().write(known, request, query, body);
        match shared.tasks.spawn(work).await {
            Ok(answer) => answer,
            Err(err) => {
                tracing::error!(error = %err, "write handler failed");
                Bytes::from(realtime::print_count(None))
            }
        }
    } else {
        shared.read(known, method, request, query, body).await
    };
    ([(CONTENT_TYPE, "text/plain")], answer).into_response()
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    match serde_json::to_vec(&shared.stats()) {
        Ok(json) => ([(CONTENT_TYPE, "application/json")], json).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
    }
}
