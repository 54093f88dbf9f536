//! The autoscaler: extra nodes come and go with the load, without dropping a call.
//!
//! Every enabled control plane runs [`run`], and exactly one acts: the holder of the lease
//! [`LEASE`] in the lock service. The leader looks at the fleet every `tick`, lets the
//! [`policy`] decide, and for each decision first records it in the store under its lease
//! token (the fence: refused when a newer leader has acted, see
//! `Store::record_scale_action`), then carries it out: drains and undrains in the store,
//! launches and terminations through the [`executor`] — the operator's programs
//! ([`command`]) or an EC2 Auto Scaling group ([`aws`]). A leader that loses its lease
//! stops at once and starts over as a follower; its successor adopts the extra nodes and
//! drains it finds.
//!
//! What a successor does not know: launches its predecessor started that have not
//! heartbeated yet (it may start their like again, within `max_extra`).

pub mod aws;
pub mod command;
pub mod executor;
pub mod policy;
pub mod show;

use std::future::Future;
use std::time::{Duration, Instant};

use callfleet_core::Store;
use callfleet_core::config::{AutoscalerConfig, ControlPlaneConfig};
use callfleet_core::store::{ScalerSteering, StoreError};
use callfleet_lock_service::Lease;
use callfleet_lock_service::client::LeaseKeeper;
use callfleet_proto::lock::v1 as pb;
use callfleet_proto::lock::v1::locks_client::LocksClient;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{error, info, warn};

use crate::error::ControlError;
use crate::service::{AutoscalerLeader, AutoscalerView};
use executor::{Action, Executor, ExecutorError};
use policy::{Decision, Policy};

/// The lock service's resource the leader holds.
pub const LEASE: &str = "autoscaler";

/// Decisions and steering shown with the autoscaler's status, newest first.
pub const RECENT_DECISIONS: u32 = 20;

/// The autoscaler as supervisors see it: `store`'s steering, fleet and latest decisions,
/// measured by `config`'s policy, and the lease's holder as `leader` finds it (asked at
/// the same time as the store). The control plane's API and `callfleet scale status`
/// (which runs no control plane) both show this.
pub async fn status(
    config: &AutoscalerConfig,
    store: &Store,
    leader: impl Future<Output = Option<(String, u64)>>,
) -> Result<AutoscalerView, StoreError> {
    let (nodes, steering, recent, leader) = tokio::join!(
        store.list_nodes(),
        store.scaler_steering(),
        store.list_scale_actions(RECENT_DECISIONS),
        leader,
    );
    let steering = steering?;
    Ok(AutoscalerView {
        enabled: config.enabled,
        figures: Policy::figures(config, &nodes?, &steering),
        steering,
        scale_out_above: config.scale_out_above,
        scale_in_below: config.scale_in_below,
        leader: leader.map(|(holder, token)| AutoscalerLeader { holder, token }),
        recent: recent?,
    })
}

/// [`status`] as `callfleet scale status` shows it without a control plane: the store and
/// the lock service (`control_plane.lock_service`) of `config`, asked once.
pub async fn status_of(
    config: &ControlPlaneConfig,
    store: &Store,
) -> Result<AutoscalerView, ControlError> {
    let figures = crate::figures::Figures::new(&config.lock_service)?;
    Ok(status(&config.autoscaler, store, figures.lease(LEASE)).await?)
}

/// Refuses steering that asks for more extra nodes than the configured `max_extra` (the
/// budget's ceiling, which supervisors may lower but not raise), naming the field.
pub fn check_steering(
    config: &AutoscalerConfig,
    steering: &ScalerSteering,
) -> Result<(), ControlError> {
    let ceiling = config.max_extra;
    for (field, value) in [
        ("min_extra", Some(steering.min_extra)),
        ("max_extra", steering.max_extra),
    ] {
        if let Some(value) = value.filter(|v| *v > ceiling) {
            return Err(ControlError::invalid(
                field,
                format!(
                    "{value} is above the configured max_extra ({ceiling}); raise control_plane.autoscaler.max_extra first"
                ),
            ));
        }
    }
    Ok(())
}

/// Why the autoscaler cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    /// `control_plane.lock_service` is not a URL.
    #[error("autoscaler: control_plane.lock_service `{url}` is not usable: {reason}")]
    LockService {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The executor's configuration is wrong.
    #[error("autoscaler: {0}")]
    Executor(#[from] ExecutorError),
    /// Enabled without an executor (the configuration check forbids it).
    #[error("autoscaler: enabled without control_plane.autoscaler.executor")]
    NoExecutor,
}

/// Takes part in leading the autoscaler until `shutdown`: waits for the lease, acts while
/// holding it, releases it at the end. [`prepare`] then [`Autoscaler::run`].
pub async fn run(
    config: AutoscalerConfig,
    store: Store,
    lock_service: &str,
    holder: String,
    shutdown: CancellationToken,
) -> Result<(), ScaleError> {
    prepare(config, store, lock_service, holder)
        .await?
        .run(shutdown)
        .await;
    Ok(())
}

/// An autoscaler ready to take part: its executor made and its lock service known.
#[derive(Debug)]
pub struct Autoscaler {
    leader: Leader,
    locks: LocksClient<Channel>,
    deadline: Duration,
}

/// Makes the executor and the lock service's client, so that a configuration they cannot
/// use stops the control plane at start rather than leaving it running without autoscaling.
pub async fn prepare(
    config: AutoscalerConfig,
    store: Store,
    lock_service: &str,
    holder: String,
) -> Result<Autoscaler, ScaleError> {
    let executor = match &config.executor {
        Some(executor) => Executor::from_config(executor).await?,
        None => return Err(ScaleError::NoExecutor),
    };
    let endpoint =
        Endpoint::from_shared(lock_service.to_owned()).map_err(|err| ScaleError::LockService {
            url: lock_service.to_owned(),
            reason: err.to_string(),
        })?;
    let deadline = (config.lease / 3).min(Duration::from_secs(2));
    let locks = LocksClient::new(
        endpoint
            .connect_timeout(deadline)
            .timeout(deadline)
            .connect_lazy(),
    );
    if config.unsafe_for_tests != Default::default() {
        error!(switches = ?config.unsafe_for_tests, "autoscaler protections are OFF: for tests only");
    }
    Ok(Autoscaler {
        leader: Leader {
            config,
            store,
            executor,
            holder,
        },
        locks,
        deadline,
    })
}

impl Autoscaler {
    /// Waits for the lease, acts while holding it, releases it at the end; until
    /// `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        self.leader.run(self.locks, self.deadline, shutdown).await;
    }
}

#[derive(Debug)]
struct Leader {
    config: AutoscalerConfig,
    store: Store,
    executor: Executor,
    holder: String,
}

impl Leader {
    async fn run(
        &self,
        locks: LocksClient<Channel>,
        deadline: Duration,
        shutdown: CancellationToken,
    ) {
        let mut attempt = 0u64;
        while !shutdown.is_cancelled() {
            attempt += 1;
            let lease = if self.config.unsafe_for_tests.no_lease {
                Some((None, 0))
            } else {
                self.acquire(locks.clone(), deadline, attempt).await
            };
            let Some((keeper, token)) = lease else {
                metrics::gauge!("callfleet_autoscaler_leader").set(0.0);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(self.config.tick) => continue,
                }
            };
            info!(holder = %self.holder, token, "leading the autoscaler");
            metrics::gauge!("callfleet_autoscaler_leader").set(1.0);
            let lost = keeper
                .as_ref()
                .map_or_else(CancellationToken::new, LeaseKeeper::lost);
            self.lead(token, &lost, &shutdown).await;
            metrics::gauge!("callfleet_autoscaler_leader").set(0.0);
            if let Some(keeper) = keeper {
                if lost.is_cancelled() {
                    warn!(
                        token,
                        "autoscaler lease lost; following until it can be had again"
                    );
                } else if let Err(status) = keeper.release().await {
                    warn!(%status, "autoscaler lease not released; it ends with its validity");
                }
            }
        }
    }

    async fn acquire(
        &self,
        mut locks: LocksClient<Channel>,
        deadline: Duration,
        attempt: u64,
    ) -> Option<(Option<LeaseKeeper>, u64)> {
        let sent_at = Instant::now();
        let request = pb::AcquireRequest {
            resource: LEASE.to_owned(),
            holder: self.holder.clone(),
            attempt: format!("{}/{attempt}", self.holder),
            validity_ms: u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX),
        };
        match locks.acquire(request).await {
            Ok(answer) => {
                let granted = answer.into_inner();
                let lease = Lease {
                    resource: granted.resource,
                    holder: granted.holder,
                    attempt: granted.attempt,
                    token: granted.token,
                    validity: Duration::from_millis(granted.validity_ms),
                };
                let token = lease.token;
                let keeper =
                    LeaseKeeper::start(locks, lease, sent_at, self.config.lease / 3, deadline);
                Some((Some(keeper), token))
            }
            Err(status) if status.code() == tonic::Code::AlreadyExists => None,
            Err(status) => {
                warn!(%status, "autoscaler lease not granted; retrying");
                None
            }
        }
    }

    /// Looks and acts every tick until the lease is lost or the process stops.
    async fn lead(&self, token: u64, lost: &CancellationToken, shutdown: &CancellationToken) {
        let mut policy = Policy::new(self.config.clone());
        let mut ticker = tokio::time::interval(self.config.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = lost.cancelled() => return,
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let (nodes, steering) =
                match tokio::join!(self.store.list_nodes(), self.store.scaler_steering()) {
                    (Ok(nodes), Ok(steering)) => (nodes, steering),
                    (Err(err), _) | (_, Err(err)) => {
                        warn!(error = %err, "autoscaler cannot read the fleet; deciding nothing");
                        continue;
                    }
                };
            let (figures, decisions) = policy.decide(Instant::now(), &nodes, &steering);
            publish(&figures);
            for decision in decisions {
                if lost.is_cancelled() {
                    return;
                }
                match self.act(token, &figures, &decision).await {
                    Ok(()) => {}
                    Err(Failure::Superseded(err)) => {
                        error!(error = %err, "autoscaler superseded; stopping at once");
                        return;
                    }
                    Err(Failure::Other(reason)) => {
                        error!(action = decision.action(), %reason, "autoscaler action failed; it will be decided again");
                        metrics::counter!("callfleet_autoscaler_failures_total", "action" => decision.action()).increment(1);
                        policy.undo(&decision);
                    }
                }
            }
        }
    }

    /// Records `decision` under `token`, then carries it out.
    async fn act(
        &self,
        token: u64,
        figures: &policy::Figures,
        decision: &Decision,
    ) -> Result<(), Failure> {
        let detail =
            json!({ "why": decision.why(), "figures": figures, "decision": describe(decision) });
        self.store
            .record_scale_action(token, decision.action(), &decision.subject(), &detail)
            .await
            .map_err(|err| match err {
                StoreError::Superseded { .. } => Failure::Superseded(err),
                other => Failure::Other(other.to_string()),
            })?;
        match decision {
            Decision::Terminate {
                end: policy::End::DrainTimeout,
                node,
                calls,
                why,
            } => {
                error!(%node, calls, %why, "terminating an extra node that did not drain");
            }
            _ => info!(
                action = decision.action(),
                why = decision.why(),
                "autoscaler decision"
            ),
        }
        metrics::counter!("callfleet_autoscaler_decisions_total", "action" => decision.action())
            .increment(1);
        let action = Action {
            token,
            reason: decision.why().to_owned(),
        };
        let done = match decision {
            Decision::Launch { count, .. } => self
                .executor
                .launch(*count, &action)
                .await
                .map_err(|e| e.to_string()),
            Decision::Terminate { node, .. } => self.terminate(node, &action).await,
            Decision::Drain { node, .. } => self
                .store
                .set_drain(node, true)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Decision::Undrain { node, .. } => self
                .store
                .set_drain(node, false)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Decision::GiveUpBooting { .. } => Ok(()),
        };
        done.map_err(Failure::Other)?;
        if matches!(decision, Decision::Launch { .. })
            && let Err(err) = self.executor.protect_new().await
        {
            warn!(error = %err, "new extra nodes not protected from the cloud's own scale-in");
        }
        Ok(())
    }
}

impl Leader {
    /// Ends the node's host, then forgets the node in the store, so neither this leader
    /// nor its successor ends it again. A host the cloud no longer has is ended already.
    async fn terminate(
        &self,
        node: &callfleet_core::NodeId,
        action: &Action,
    ) -> Result<(), String> {
        match self.executor.terminate(node, action).await {
            Ok(()) => {}
            Err(ExecutorError::NotInGroup { group, .. }) => {
                warn!(%node, %group, "the node's instance is no longer in the group: ended already");
            }
            Err(err) => return Err(err.to_string()),
        }
        if let Err(err) = self.store.remove_extra_node(node).await {
            warn!(%node, error = %err, "ended node not removed from the store; a later leader may end it again, which the executor must take as done");
        }
        Ok(())
    }
}

enum Failure {
    Superseded(StoreError),
    Other(String),
}

fn describe(decision: &Decision) -> serde_json::Value {
    match decision {
        Decision::Launch { count, .. } => json!({ "count": count }),
        Decision::GiveUpBooting { count, .. } => json!({ "count": count }),
        Decision::Drain { node, .. } | Decision::Undrain { node, .. } => json!({ "node": node }),
        Decision::Terminate {
            node, calls, end, ..
        } => {
            json!({ "node": node, "calls": calls, "end": end })
        }
    }
}

fn publish(figures: &policy::Figures) {
    metrics::gauge!("callfleet_autoscaler_calls").set(f64::from(figures.calls));
    metrics::gauge!("callfleet_autoscaler_capacity").set(f64::from(figures.capacity));
    for (state, count) in [
        ("active", figures.extra_active),
        ("booting", figures.extra_booting),
        ("draining", figures.extra_draining),
    ] {
        metrics::gauge!("callfleet_autoscaler_extra_nodes", "state" => state).set(f64::from(count));
    }
    metrics::gauge!("callfleet_autoscaler_paused").set(if figures.paused { 1.0 } else { 0.0 });
}
