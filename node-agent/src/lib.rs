//! The node-agent runs on every PBX node: it samples the host and the PBX's call count,
//! sheds less important services under load, and heartbeats all of it into the fleet store
//! so balancers and the autoscaler see the node. It also serves its Asterisk: realtime
//! provisioning, and the FastAGI server ([`agi`]) through which the dialplan hands it calls.
//!
//! The agent never stops because the store is away: it keeps sampling, retries with
//! backoff, logs the outage once each way, and resumes heartbeats by itself.

pub mod agi;
pub mod ami;
pub mod asterisk_config;
mod calls;
mod metrics;
pub mod pbx;
pub mod provisioning;
pub mod queue;
pub mod sampler;
pub mod shed;

use std::time::Duration;

use callfleet_core::config::Config;
use callfleet_core::{ConfigError, Heartbeat, Store};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use crate::calls::CallCounter;
use crate::sampler::Sampler;
use crate::shed::Shedder;

/// First retry delay after a failed heartbeat; doubles up to the heartbeat interval.
const FIRST_RETRY: Duration = Duration::from_millis(250);

/// Why the node-agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeAgentError {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The PBX refused the agent's login.
    #[error(transparent)]
    Ami(#[from] ami::AmiError),
    /// The host cannot be sampled.
    #[error(transparent)]
    Sampler(#[from] sampler::SamplerError),
    /// The realtime provisioning endpoint cannot run.
    #[error(transparent)]
    Provisioning(#[from] provisioning::ProvisioningError),
    /// The FastAGI server cannot listen.
    #[error(transparent)]
    Agi(#[from] agi::AgiError),
    /// The queued calls cannot be set up (control plane or lock service address).
    #[error(transparent)]
    Queue(#[from] queue::QueueError),
    /// `node.metrics_listen` cannot be listened on.
    #[error(transparent)]
    Metrics(#[from] callfleet_core::metrics::ListenError),
}

/// Runs the node-agent for the local node until `shutdown` is cancelled.
pub async fn run(
    config: &Config,
    store: Store,
    shutdown: CancellationToken,
) -> Result<(), NodeAgentError> {
    let node = &config.node;
    let id = node.resolved_id()?;
    // Stops with the agent, and also when it fails to start after this.
    let metrics_stop = shutdown.child_token();
    let _metrics_stop = metrics_stop.clone().drop_guard();
    if let Some(address) = node.metrics_address()? {
        let bound = callfleet_core::metrics::serve(address, metrics_stop.clone()).await?;
        tracing::info!(address = %bound, "serving /metrics");
    }
    let figures = metrics::Heartbeats::new(&node.shed);
    let interval = node.heartbeat_interval;
    let sampler = Sampler::new()?;
    let calls = CallCounter::start(&node.calls, interval).await?;
    // The PBX is asked on its own schedule: a reconnecting AMI (seconds per attempt) must
    // never hold a heartbeat back, or a healthy node blinks out of routing.
    let pbx = spawn_call_sampling(calls, interval, node.calls.timeout, shutdown.clone()).await;
    let mut history: Option<tokio::task::JoinHandle<()>> = None;
    let mut shedder = Shedder::new(&node.shed);
    let provisioning = if config.provisioning.listen.is_empty() {
        None
    } else {
        let control_plane = config.provisioning.control_plane_url(&config.control_plane);
        Some(
            provisioning::Provisioning::start(
                &config.provisioning,
                &control_plane,
                shutdown.clone(),
            )
            .await?,
        )
    };
    let mut queue_calls = None;
    let agi = match node.agi.address() {
        None => None,
        Some(address) => {
            let calls = queue::QueueCalls::from_config(config, id.as_str())?;
            queue_calls = Some(calls.clone());
            Some(
                agi::AgiServer::bind(
                    address,
                    agi::Settings::from_config(&node.agi),
                    calls.scripts(agi::Scripts::builtin()),
                    shutdown.clone(),
                )
                .await?,
            )
        }
    };
    tokio::spawn(metrics::copy_figures(
        metrics::Figures {
            queue: queue_calls,
            provisioning: provisioning
                .as_ref()
                .map(|p| Box::new(p.stats_reader()) as Box<_>),
        },
        metrics_stop,
    ));
    tracing::info!(node = %id, store = store.dialect(), ?interval, "node-agent started");

    let mut store_up = true;
    let mut first_of_run = true;
    let mut retry = FIRST_RETRY;
    let mut last_history: Option<Instant> = None;
    let mut next = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = sleep_until(next) => {}
        }
        let tick = Instant::now();
        let host = sampler.sample().await;
        let (call_count, pbx_up) = pbx.current();
        figures.pbx(call_count, pbx_up);
        shedder.update(host.load_fraction());
        let shed = shedder.states();
        figures.shed(&shed);
        let beat = Heartbeat {
            id: id.clone(),
            pool: node.pool.clone(),
            role: node.role,
            sip_uri: node.sip_uri.clone(),
            calls: call_count,
            pbx_up,
            max_calls: node.max_calls,
            load1: host.load1,
            cpu_pct: host.cpu_pct,
            mem_pct: host.mem_pct,
            cores: host.cores,
            shed,
            refusing_calls: shedder.refusing_calls(),
            interval,
            first_of_run,
        };
        // Bounded by the interval so a hung server cannot stall sampling.
        let written = match timeout(interval, store.heartbeat(&beat)).await {
            Ok(result) => result.map_err(|err| err.to_string()),
            Err(_) => Err(format!("no answer within {interval:?}")),
        };
        figures.written(written.is_ok());
        match written {
            Ok(()) => {
                if !store_up {
                    tracing::info!(node = %id, "store back; heartbeats resumed");
                    store_up = true;
                } else if first_of_run {
                    tracing::info!(node = %id, calls = call_count, "first heartbeat written");
                }
                first_of_run = false;
                retry = FIRST_RETRY;
                next = tick + interval;
                // Written beside the heartbeats, one at a time, never in their way.
                let idle = history
                    .as_ref()
                    .is_none_or(tokio::task::JoinHandle::is_finished);
                if idle
                    && last_history.is_none_or(|at| at.elapsed() >= config.store.history_interval)
                {
                    last_history = Some(tick);
                    let (store, retention, id) =
                        (store.clone(), config.store.history_retention, id.clone());
                    history = Some(tokio::spawn(async move {
                        let sample = store.record_sample(&beat, retention);
                        match timeout(interval, sample).await {
                            Ok(Ok(())) => {}
                            Ok(Err(err)) => {
                                tracing::debug!(node = %id, error = %err, "history sample not written")
                            }
                            Err(_) => tracing::debug!(node = %id, "history sample timed out"),
                        }
                    }));
                }
            }
            Err(error) => {
                if store_up {
                    tracing::warn!(node = %id, %error, "store unreachable; sampling goes on, retrying with backoff");
                    store_up = false;
                }
                next = Instant::now() + retry;
                retry = (retry * 2).min(interval);
            }
        }
    }
    if let Some(history) = history {
        history.abort();
    }
    callfleet_core::shutdown::bounded("shed commands", shedder.finish()).await;
    if let Some(provisioning) = provisioning
        && let Err(err) = provisioning.stopped().await
    {
        tracing::warn!(error = %err, "provisioning endpoint stopped with an error");
    }
    // Bounded by node.agi.shutdown_grace, which started with the shutdown.
    if let Some(agi) = agi {
        agi.stopped().await;
    }
    tracing::info!(node = %id, "node-agent stopped");
    Ok(())
}

/// The latest call count read from the PBX, by a task of its own.
struct PbxReading {
    latest: tokio::sync::watch::Receiver<(u32, bool, Instant)>,
    /// A reading older than this says nothing about the PBX now.
    fresh_for: Duration,
}

impl PbxReading {
    /// The count and whether the PBX answered; a sampler stuck longer than `fresh_for`
    /// (a PBX that accepts connections and then says nothing) reports the PBX down with the
    /// last count.
    fn current(&self) -> (u32, bool) {
        let (calls, up, at) = *self.latest.borrow();
        (calls, up && at.elapsed() <= self.fresh_for)
    }
}

/// Reads the PBX once (the first heartbeat then carries a real count), then every
/// `interval` in a task of its own.
async fn spawn_call_sampling(
    mut calls: CallCounter,
    interval: Duration,
    ami_timeout: Duration,
    shutdown: CancellationToken,
) -> PbxReading {
    let first = Instant::now();
    let (count, up) = calls.sample().await;
    let (publish, latest) = tokio::sync::watch::channel((count, up, Instant::now()));
    tokio::spawn(async move {
        let mut started = first;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = sleep_until(started + interval) => {}
            }
            started = Instant::now();
            let (count, up) = tokio::select! {
                () = shutdown.cancelled() => return,
                reading = calls.sample() => reading,
            };
            if publish.send((count, up, Instant::now())).is_err() {
                return;
            }
        }
    });
    PbxReading {
        latest,
        // One exchange may take the AMI timeout; two missed intervals beyond it is a PBX
        // that does not answer.
        fresh_for: ami_timeout + interval * 2,
    }
}
