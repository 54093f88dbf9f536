//! The control plane: where CRMs tune agents, queues and priorities all day, supervisors
//! drain nodes, and a website asks whether a queue is served.
//!
//! One listener serves three faces of the same operations ([`service::Control`]): REST
//! under `/api/v1` ([`rest`]), XML-RPC at `/RPC2` ([`xmlrpc`], what the CRMs of the old
//! system speak) and gRPC `callfleet.control.v1` ([`grpc`]), with gRPC health and
//! reflection. Errors map to each face in one place ([`error`]). The listener
//! ([`listener`]) caps connections, times out slow and silent clients and bounds the
//! shutdown; the public queue status is rate-limited per client address ([`ratelimit`]) and
//! carries each queue's figures ([`figures`]): waiting callers from the lock service, the
//! day's outcomes the nodes report.

pub mod auth;
pub mod dashboard;
pub mod error;
pub mod figures;
pub mod grpc;
pub mod listener;
pub mod metrics;
pub mod openapi;
pub mod ratelimit;
pub mod realtime;
pub mod rest;
pub mod ringing;
pub mod rpc2;
pub mod scale;
pub mod service;
pub mod status_cache;
pub mod xmlrpc;

use std::sync::Arc;

use callfleet_core::Store;
use callfleet_core::config::ControlPlaneConfig;
use callfleet_proto::control::v1::control_server::ControlServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use auth::random_hex;
pub use auth::{ADMIN_TOKEN_FILE, admin_token, node_token};
pub use error::ControlError;
pub use service::Control;

/// Why the control plane cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// The directory could not be read at start.
    #[error("control plane: {0}")]
    Start(#[from] ControlError),
    /// The autoscaler is enabled with a configuration it cannot use.
    #[error("control plane: {0}")]
    Autoscaler(#[from] scale::ScaleError),
    /// Serving failed.
    #[error("control plane stopped: {0}")]
    Io(#[from] std::io::Error),
}

/// REST, XML-RPC, gRPC (with health and reflection) in one router, with the default
/// rate limit of the public status.
pub fn router(control: Arc<Control>) -> axum::Router {
    router_with(control, &ControlPlaneConfig::default())
}

/// [`router`] with the public status's rate limit of `config`.
pub fn router_with(control: Arc<Control>, config: &ControlPlaneConfig) -> axum::Router {
    let status_limit = Arc::new(ratelimit::RateLimit::public_status(config));
    let (reporter, health) = tonic_health::server::health_reporter();
    // The service answers from memory once started; health follows the process.
    drop(tokio::spawn(async move {
        reporter
            .set_serving::<ControlServer<grpc::ControlService>>()
            .await;
    }));
    // Advertises exactly what this router serves: the descriptor set also holds the other
    // components' services, and health brings its own descriptors.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(callfleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("callfleet.control.v1.Control")
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .build_v1()
        .expect("the embedded descriptor set is valid");
    tonic::service::Routes::new(ControlServer::new(grpc::ControlService::new(
        control.clone(),
        status_limit.clone(),
    )))
    .add_service(health)
    .add_service(reflection)
    .prepare()
    .into_axum_router()
    // Instead of tonic's, which answers any unknown path `200 OK` with `grpc-status: 12`:
    // a CRM with a typo in a path would read that as success.
    .fallback(no_route)
    // One limit for the status's three faces: switching API does not multiply the rate.
    .merge(rest::router(control.clone(), status_limit.clone()))
    .merge(rpc2::router(control.clone(), status_limit))
    .merge(realtime::router(control.clone()))
    .merge(metrics::router(control.clone()))
    .merge(dashboard::router(control, config))
    .layer(metrics::TrackLayer)
}

/// Unknown paths: a gRPC client gets `UNIMPLEMENTED`, anyone else a JSON 404, so a CRM
/// that leaves out `/api/v1` is told so instead of reading the gRPC fallback's 200 as a
/// success.
async fn no_route(request: axum::extract::Request) -> axum::response::Response {
    use axum::http::{HeaderValue, StatusCode, header};
    use axum::response::IntoResponse;
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        let mut response = StatusCode::OK.into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from_static("12"));
        return response;
    }
    if request.uri().path().starts_with("/api/v1/") {
        return rest::no_route(request.method(), request.uri().path());
    }
    let message = format!(
        "no route `{} {}`; the REST API is under /api/v1 (see /api/v1/openapi.json), XML-RPC at /RPC2",
        request.method(),
        request.uri().path()
    );
    (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

/// Serves the control plane on `listener` until `shutdown`, then lets requests in
/// progress finish for at most `config.shutdown_grace`.
pub async fn run(
    config: &ControlPlaneConfig,
    store: Store,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ControlPlaneError> {
    let control = Arc::new(Control::start(store, config).await?);
    let autoscaler = if config.autoscaler.enabled {
        let store = control.store().clone();
        let holder = autoscaler_holder();
        let scale = config.autoscaler.clone();
        Some(scale::prepare(scale, store, &config.lock_service, holder).await?)
    } else {
        None
    };
    let refresher = {
        let (control, shutdown, every) = (control.clone(), shutdown.clone(), config.refresh);
        tokio::spawn(async move { control.refresh_loop(every, shutdown).await })
    };
    let figures = {
        let (control, shutdown) = (control.clone(), shutdown.clone());
        tokio::spawn(async move { control.figures_loop(shutdown).await })
    };
    let autoscaler = autoscaler.map(|autoscaler| tokio::spawn(autoscaler.run(shutdown.clone())));
    let address = listener.local_addr()?;
    info!(
        %address,
        tokens = config.tokens.len(),
        lock_service = %config.lock_service,
        "control plane ready"
    );
    let limits = listener::Limits::from_config(config);
    listener::serve(
        listener,
        router_with(control, config),
        limits,
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    let _ = refresher.await;
    let _ = figures.await;
    if let Some(autoscaler) = autoscaler {
        let _ = autoscaler.await;
    }
    info!("control plane stopped");
    Ok(())
}

/// This process as the autoscaler's lease holder: host, process and a random part, so two
/// control planes on one host (or a restarted one) never share it.
fn autoscaler_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "control-plane".to_owned());
    let random = random_hex(4).unwrap_or_default();
    format!("{host}/{}/{random}", std::process::id())
}
