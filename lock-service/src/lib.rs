//! Fenced leases so that one agent is rung for one queued call across all nodes.
//!
//! Before a node's PBX rings an agent it claims the agent's lease; the lease carries a
//! fencing token that only ever grows per agent, so whatever acts on the lease can refuse a
//! holder whose lease was superseded. [`backend`] holds the rules, for Redis and for a
//! single box's memory; [`grpc`] and [`http`] serve them on one listener.

pub mod backend;
pub mod checker;
pub mod client;
pub mod grpc;
pub mod http;
pub mod lease;
mod metrics;
mod serve;
pub mod waiter;

use std::sync::Arc;

use callfleet_core::config::{LockBackendKind, LockServiceConfig, UnsafeLockSwitches};
use callfleet_proto::lock::v1::locks_server::LocksServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use backend::{Locks, MemoryLocks, RedisLocks};
pub use lease::{Claim, Lease, LockError};

/// Why the lock service cannot run.
#[derive(Debug, thiserror::Error)]
pub enum LockServiceError {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(callfleet_core::config::ConfigError),
    /// The backend cannot be set up from the configuration.
    #[error("lock_service: {0}")]
    Backend(LockError),
    /// `strict = true` and Redis is configured so that leases can be lost.
    #[error("redis is not safe for leases (lock_service.strict = true): {0}")]
    Unsafe(String),
    /// Serving failed.
    #[error("lock service stopped: {0}")]
    Io(#[from] std::io::Error),
}

/// The backend the configuration asks for.
pub fn backend(config: &LockServiceConfig) -> Result<Locks, LockServiceError> {
    config.validate().map_err(LockServiceError::Config)?;
    let switches = config.unsafe_for_tests;
    for name in switches.names() {
        tracing::error!(
            switch = name,
            "a lock-service protection is switched off for a test ({}); never run like this in production",
            UnsafeLockSwitches::VARIABLE
        );
    }
    Ok(match config.backend {
        LockBackendKind::Memory => Locks::Memory(
            MemoryLocks::new(config.guard)
                .with_max_validity(config.max_validity)
                .with_startup_quarantine(config.quarantine)
                .with_unsafe_switches(switches),
        ),
        LockBackendKind::Redis => Locks::Redis(Box::new(
            RedisLocks::new(&config.redis_url, config.guard, config.deadline)
                .map_err(LockServiceError::Backend)?
                .with_quarantine(config.quarantine)
                .with_max_validity(config.max_validity)
                .with_unsafe_switches(switches),
        )),
    })
}

/// gRPC (`callfleet.lock.v1.Locks`, health, reflection), the HTTP twin (`/lock/…`) and
/// `GET /metrics` in one router.
pub fn router(
    locks: Arc<Locks>,
    config: &LockServiceConfig,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> axum::Router {
    let grpc = grpc::LocksService::new(locks.clone(), config.validity);
    // Advertises exactly what this router serves: the descriptor set also holds other
    // components' services (`callfleet.fleet.v1`), and health brings its own descriptors.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(callfleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("callfleet.lock.v1.Locks")
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .build_v1()
        .expect("the embedded descriptor set is valid");
    tonic::service::Routes::new(LocksServer::new(grpc))
        .add_service(health)
        .add_service(reflection)
        .prepare()
        .into_axum_router()
        .merge(http::router(http::HttpState {
            locks,
            default_validity: config.validity,
        }))
        .merge(callfleet_core::metrics::router())
}

/// Reports SERVING only while leases can be granted (Redis reachable, no quarantine), so
/// load balancers and clients move to another lock-service instance.
async fn watch_health(
    locks: Arc<Locks>,
    reporter: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    let mut last = None;
    loop {
        let serving = locks.serving().await;
        metrics::quarantined(locks.quarantined());
        if last != Some(serving) {
            let status = if serving {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            reporter
                .set_service_status("callfleet.lock.v1.Locks", status)
                .await;
            reporter.set_service_status("", status).await;
            if last.is_some() {
                info!(serving, "lock service health changed");
            }
            last = Some(serving);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
}

/// Serves the lock service on `listener` until `shutdown`.
pub async fn run(
    config: &LockServiceConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), LockServiceError> {
    let locks = Arc::new(backend(config)?);
    metrics::register(locks.name());
    if let Locks::Redis(redis) = locks.as_ref() {
        match redis.configuration_problems().await {
            Ok(problems) => {
                for problem in &problems {
                    tracing::error!(problem = %problem, "redis is not safe for leases");
                }
                if config.strict && !problems.is_empty() {
                    return Err(LockServiceError::Unsafe(problems.join("; ")));
                }
            }
            // Unreachable at start: serve anyway (claims fail closed until it is back).
            Err(err) => tracing::warn!(error = %err, "cannot check redis at start"),
        }
    }
    if let Locks::Memory(memory) = locks.as_ref()
        && memory.quarantined()
    {
        info!(
            quarantine = ?config.quarantine,
            "claims wait out the quarantine after a start: leases granted before it may still be in use"
        );
    }
    let address = listener.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    let watcher = tokio::spawn(watch_health(locks.clone(), reporter, shutdown.clone()));
    info!(%address, backend = ?config.backend, "lock service ready");
    let served = serve::serve(listener, router(locks, config, health), shutdown.clone()).await;
    shutdown.cancel();
    let _ = watcher.await;
    served?;
    info!("lock service stopped");
    Ok(())
}
