//! The queue-call flow: the FastAGI scripts `queue` and `fence` that tie a caller waiting
//! on this node to exactly one free agent of the cluster (`docs/queued-calls.md`).
//!
//! `queue` (`AGI(agi://127.0.0.1:4573/queue?queue=sales&attributes=vip)`) holds the call:
//!
//! 1. joins the queue's waiting order in the lock service as `node/uniqueid` (VIP callers
//!    in the first band), and keeps the entry alive while the caller waits;
//! 2. every `poll`, asks the control plane for the candidates (cached) and the lock service
//!    for this caller's turn (`ClaimNext`): a lease on the first free candidate, granted
//!    only when no earlier caller waits. No lease, no ring;
//! 3. rings the agent's current device with `EXEC Dial` while a [`LeaseKeeper`] renews
//!    the lease; Dial's `U()` runs `fence` on the agent's leg when it answers, which
//!    checks the lease once more and aborts the bridge when it is lost or ends too soon;
//! 4. after an answered call: leaves the order, writes `ended` (wrap-up) and keeps the
//!    lease through the wrap-up, so no node rings the agent meanwhile even on a stale
//!    answer; after a miss: writes `missed` (the control plane pauses the agent after
//!    `max_misses` in a row), releases the lease and takes the caller's place back;
//! 5. ends with `CALLFLEET_RESULT` = `answered`, `overflow` (waited `max_wait`: the
//!    dialplan sends the call on) or `error`; a caller who hangs up leaves the order at
//!    once.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callfleet_core::config::{Config, QueueConfig};
use callfleet_lock_service::client::LeaseKeeper;
use callfleet_lock_service::waiter::{Turn, WaitSettings, Waiter};
use callfleet_proto::lock::v1::locks_client::LocksClient;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::candidates::{Candidate, CandidatesSource};
use super::events::{AgentEvent, AgentEvents, EventLine};
use crate::agi::proto::{Command, Reply};
use crate::agi::{Scripts, Session, SessionError};
use crate::provisioning::ProvisioningError;

/// The dialplan context Dial's `U()` runs on the agent's leg when it answers.
pub const FENCE_CONTEXT: &str = "callfleet-fence";

/// A ring starts only on a lease valid at least this much longer: the `fence` at answer
/// must not find it already ended.
const RING_MARGIN: Duration = Duration::from_secs(2);

/// At answer, the lease must stay valid at least this much longer for the bridge.
const FENCE_MARGIN: Duration = Duration::from_millis(200);

/// Switches a test sets to show that the leases are what keeps one agent to one ring:
/// `private_leases` makes every caller lease its own copy of each agent, so the lock
/// service never sees two callers want the same agent. Never set in production; logged
/// as an error when on.
pub const UNSAFE_VARIABLE: &str = "CALLFLEET_TEST_UNSAFE_QUEUE";

/// Why the queue scripts cannot start.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The control plane's address or token is unusable.
    #[error(transparent)]
    ControlPlane(#[from] ProvisioningError),
    /// `node.queue.lock_service` is not a URL tonic can use.
    #[error("node.queue.lock_service `{url}` is unusable: {reason}; give http://host:port")]
    LockService {
        /// The configured value.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// How the calls of this node are queued.
#[derive(Clone)]
pub struct QueueCalls {
    inner: Arc<Inner>,
}

impl fmt::Debug for QueueCalls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueCalls")
            .field("node", &self.inner.node)
            .finish_non_exhaustive()
    }
}

struct Inner {
    node: String,
    candidates: CandidatesSource,
    locks: LocksClient<Channel>,
    wait: WaitSettings,
    events: AgentEvents,
    settings: QueueConfig,
    rings: Mutex<HashMap<u64, Ring>>,
    next_ring: AtomicU64,
    counts: Counts,
    /// See [`UNSAFE_VARIABLE`].
    private_leases: bool,
}

/// A ring in progress, as the `fence` script finds it.
struct Ring {
    agent: String,
    queue: String,
    keeper: Arc<LeaseKeeper>,
    answered: Arc<AtomicBool>,
    events: EventLine,
}

#[derive(Default)]
struct Counts {
    answered: AtomicU64,
    abandoned: AtomicU64,
    overflowed: AtomicU64,
    rings: AtomicU64,
    missed: AtomicU64,
    fenced: AtomicU64,
    unfenced: AtomicU64,
}

/// What the queue scripts have done since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Calls answered by an agent.
    pub answered: u64,
    /// Callers who hung up while waiting or while an agent was rung.
    pub abandoned: u64,
    /// Calls sent to the overflow target after `max_wait`.
    pub overflowed: u64,
    /// Rings started.
    pub rings: u64,
    /// Rings nobody answered (no answer, busy, unreachable).
    pub missed: u64,
    /// Answers refused at the fence: the lease was lost or about to end.
    pub fenced: u64,
    /// Agents bridged without the fence having run (Asterisk misconfigured).
    pub unfenced: u64,
}

impl QueueCalls {
    /// The queue calls of this node: candidates and agent events from the control plane of
    /// `provisioning`, leases and the waiting order from `node.queue.lock_service`.
    pub fn from_config(config: &Config, node: &str) -> Result<Self, QueueError> {
        let settings = config.node.queue.clone();
        let control_plane = config.provisioning.control_plane_url(&config.control_plane);
        let token = config.provisioning.token.expose();
        let candidates = CandidatesSource::from_config(config)?;
        let events = AgentEvents::new(&control_plane, token, node, Duration::from_secs(2))?;
        let endpoint = Channel::from_shared(settings.lock_service.clone()).map_err(|err| {
            QueueError::LockService {
                url: settings.lock_service.clone(),
                reason: err.to_string(),
            }
        })?;
        let locks = LocksClient::new(
            endpoint
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .connect_lazy(),
        );
        let private_leases = std::env::var(UNSAFE_VARIABLE).is_ok_and(|v| v == "private_leases");
        if private_leases {
            tracing::error!(
                "{UNSAFE_VARIABLE}=private_leases: agents can be rung for two calls at once; for tests only"
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                node: node.to_owned(),
                private_leases,
                candidates,
                locks,
                wait: WaitSettings::default(),
                events,
                settings,
                rings: Mutex::new(HashMap::new()),
                next_ring: AtomicU64::new(1),
                counts: Counts::default(),
            }),
        })
    }

    /// Adds the `queue` and `fence` scripts to `scripts`.
    #[must_use]
    pub fn scripts(&self, scripts: Scripts) -> Scripts {
        let queue = self.clone();
        let fence = self.clone();
        scripts
            .with("queue", move |session| {
                let calls = queue.clone();
                async move { calls.queue(session).await }
            })
            .with("fence", move |session| {
                let calls = fence.clone();
                async move { calls.fence(session).await }
            })
    }

    /// What the scripts have done so far.
    pub fn stats(&self) -> QueueStats {
        let counts = &self.inner.counts;
        QueueStats {
            answered: counts.answered.load(Ordering::Relaxed),
            abandoned: counts.abandoned.load(Ordering::Relaxed),
            overflowed: counts.overflowed.load(Ordering::Relaxed),
            rings: counts.rings.load(Ordering::Relaxed),
            missed: counts.missed.load(Ordering::Relaxed),
            fenced: counts.fenced.load(Ordering::Relaxed),
            unfenced: counts.unfenced.load(Ordering::Relaxed),
        }
    }

    async fn queue(&self, mut session: Session) -> Result<(), SessionError> {
        let environment = session.environment();
        let script = environment.network_script();
        let queue = script
            .and_then(|s| s.param("queue"))
            .unwrap_or("")
            .to_owned();
        let attributes: Vec<String> = script
            .and_then(|s| s.param("attributes"))
            .unwrap_or("")
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect();
        let Some(uniqueid) = environment.uniqueid().map(str::to_owned) else {
            tracing::warn!("queue call without agi_uniqueid; the dialplan goes on");
            session.set_result("error").await?;
            return Ok(());
        };
        if queue.is_empty() {
            tracing::warn!(%uniqueid, "queue call without ?queue=; the dialplan goes on");
            session.set_result("error").await?;
            return Ok(());
        }
        let waiter_id = format!("{}/{uniqueid}", self.inner.node);
        let band = if attributes.iter().any(|a| a == "vip") {
            0
        } else {
            1
        };
        let max_wait = self.inner.settings.max_wait;
        // A call back after the node-agent was away (the dialplan retries) keeps its wait:
        // the dialplan passes when it first arrived (Unix seconds).
        let waited = script
            .and_then(|s| s.param("arrived"))
            .and_then(|a| a.parse::<u64>().ok())
            .map_or(Duration::ZERO, |arrived| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                Duration::from_secs(now.saturating_sub(arrived)).min(max_wait)
            });
        let arrived = Instant::now()
            .checked_sub(waited)
            .unwrap_or_else(Instant::now);
        let poll = self.inner.settings.poll;

        let mut waiter: Option<Waiter> = None;
        loop {
            if session.hung_up() {
                self.inner.counts.abandoned.fetch_add(1, Ordering::Relaxed);
                leave(waiter).await;
                return Ok(());
            }
            if session.is_stopping() {
                // The dialplan's fallback takes the call (another node, or a retry).
                leave(waiter).await;
                return Ok(());
            }
            if arrived.elapsed() >= max_wait {
                self.inner.counts.overflowed.fetch_add(1, Ordering::Relaxed);
                leave(waiter).await;
                session.set_result("overflow").await?;
                return Ok(());
            }
            let Some(current) = &waiter else {
                match Waiter::join(
                    self.inner.locks.clone(),
                    self.inner.wait.clone(),
                    &queue,
                    &waiter_id,
                    band,
                )
                .await
                {
                    Ok((joined, _place)) => waiter = Some(joined),
                    Err(status) => {
                        tracing::debug!(%queue, %waiter_id, %status, "cannot join the waiting order yet");
                        idle(&mut session, poll).await?;
                    }
                }
                continue;
            };
            let list = match self.inner.candidates.candidates(&queue, &attributes).await {
                Ok(found) => found.list,
                Err(err) => {
                    tracing::debug!(%queue, error = %err, "no candidates");
                    idle(&mut session, poll).await?;
                    continue;
                }
            };
            let resources: Vec<String> = list
                .iter()
                .map(|c| self.resource(&c.agent, &waiter_id))
                .collect();
            if resources.is_empty() {
                idle(&mut session, poll).await?;
                continue;
            }
            let keeper = match current.claim_next(&resources).await {
                Ok(Turn::Granted(keeper)) => keeper,
                Ok(Turn::NotFirst(_) | Turn::Busy) => {
                    idle(&mut session, poll).await?;
                    continue;
                }
                Err(status) => {
                    if status.code() == tonic::Code::FailedPrecondition {
                        // The entry expired (the lock service lost it): join again.
                        waiter = None;
                    }
                    tracing::debug!(%queue, %waiter_id, %status, "no turn");
                    idle(&mut session, poll).await?;
                    continue;
                }
            };
            let Some(candidate) = list
                .iter()
                .find(|c| self.resource(&c.agent, &waiter_id) == keeper.lease().resource)
                .cloned()
            else {
                let _ = keeper.release().await;
                continue;
            };
            match self.ring(&mut session, &queue, &candidate, *keeper).await? {
                RingOutcome::Answered => {
                    leave(waiter).await;
                    session.set_result("answered").await.ok();
                    return Ok(());
                }
                RingOutcome::CallerGone => {
                    self.inner.counts.abandoned.fetch_add(1, Ordering::Relaxed);
                    leave(waiter).await;
                    return Ok(());
                }
                RingOutcome::NotAnswered => {
                    if let Some(current) = &waiter
                        && let Err(status) = current.requeue().await
                    {
                        tracing::debug!(%queue, %waiter_id, %status, "requeue failed");
                        if status.code() == tonic::Code::FailedPrecondition {
                            waiter = None;
                        }
                    }
                }
            }
        }
    }

    /// The lock-service resource of an agent, as `waiter` claims it.
    fn resource(&self, agent: &str, waiter: &str) -> String {
        if self.inner.private_leases {
            format!("agent:{agent}#{waiter}")
        } else {
            format!("agent:{agent}")
        }
    }

    /// Rings `candidate` under `keeper`'s lease and settles the agent's state afterwards.
    async fn ring(
        &self,
        session: &mut Session,
        queue: &str,
        candidate: &Candidate,
        keeper: LeaseKeeper,
    ) -> Result<RingOutcome, SessionError> {
        let token = keeper.lease().token;
        if keeper.lost().is_cancelled()
            || keeper.valid_until() <= std::time::Instant::now() + RING_MARGIN
        {
            tracing::warn!(agent = %candidate.agent, token, "lease too close to its end to ring on");
            let _ = keeper.release().await;
            return Ok(RingOutcome::NotAnswered);
        }
        let id = self.inner.next_ring.fetch_add(1, Ordering::Relaxed);
        let keeper = Arc::new(keeper);
        let answered = Arc::new(AtomicBool::new(false));
        let events = self
            .inner
            .events
            .line(&candidate.agent, &format!("{id}-{token}"));
        self.inner.rings.lock().expect("rings lock").insert(
            id,
            Ring {
                agent: candidate.agent.clone(),
                queue: queue.to_owned(),
                keeper: keeper.clone(),
                answered: answered.clone(),
                events: events.clone(),
            },
        );
        self.inner.counts.rings.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%queue, agent = %candidate.agent, endpoint = %candidate.endpoint, token, "ringing");
        let ring_secs = self.inner.settings.ring_timeout.as_secs().max(1);
        let dial = Command::exec(
            "Dial",
            format!("{},{ring_secs},U({FENCE_CONTEXT}^{id})", candidate.endpoint),
        );
        let dialled = session.send(&dial).await;
        self.inner.rings.lock().expect("rings lock").remove(&id);
        let keeper = Arc::try_unwrap(keeper).ok();
        let caller_gone = session.hung_up() || matches!(dialled, Ok(Reply::DeadChannel));
        let status = match &dialled {
            Ok(_) if !caller_gone => dial_status(session).await,
            _ => String::new(),
        };
        let mut answered = answered.load(Ordering::Acquire);
        if !answered && status == "ANSWER" {
            // Dial bridged without running the fence: Asterisk lacks app_stack (Gosub) or
            // the fence context. The call happened, so it is counted as one.
            self.inner.counts.unfenced.fetch_add(1, Ordering::Relaxed);
            tracing::error!(agent = %candidate.agent, "an agent was bridged without the fence: load app_stack.so and the {FENCE_CONTEXT} context (callfleet asterisk-config writes both)");
            drop(events.send(AgentEvent::Answered {
                queue: queue.to_owned(),
            }));
            answered = true;
        }
        if answered {
            self.inner.counts.answered.fetch_add(1, Ordering::Relaxed);
            let wrap_up = self.inner.settings.wrap_up;
            let ended = events.send(AgentEvent::Ended { wrap_up });
            // Kept through the wrap-up (and one candidates refresh after it), so a node
            // whose cached answer still shows the agent free cannot ring them meanwhile.
            let hold = wrap_up + self.inner.settings.candidates_fresh;
            tokio::spawn(async move {
                let _ = ended.await;
                tokio::time::sleep(hold).await;
                if let Some(keeper) = keeper {
                    let _ = keeper.release().await;
                }
            });
            dialled?;
            return Ok(RingOutcome::Answered);
        }
        let missed = !caller_gone
            && matches!(
                status.as_str(),
                "NOANSWER" | "BUSY" | "CHANUNAVAIL" | "CONGESTION"
            );
        let mut hold = Duration::ZERO;
        if missed {
            self.inner.counts.missed.fetch_add(1, Ordering::Relaxed);
            let written = events.send(AgentEvent::Missed {
                queue: queue.to_owned(),
                max_misses: self.inner.settings.max_misses,
            });
            if let Ok(Ok(answer)) = written.await
                && answer.paused
            {
                tracing::info!(agent = %candidate.agent, "paused after missing {} rings in a row", self.inner.settings.max_misses);
                hold = self.inner.settings.candidates_fresh;
            }
        }
        if let Some(keeper) = keeper {
            tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                let _ = keeper.release().await;
            });
        }
        dialled?;
        if caller_gone {
            return Ok(RingOutcome::CallerGone);
        }
        Ok(RingOutcome::NotAnswered)
    }

    /// `fence?ring=<id>` on the agent's leg when it answers: `CALLFLEET_RESULT=ok` lets the
    /// bridge happen, anything else aborts it (the dialplan treats an unset result as no).
    async fn fence(&self, mut session: Session) -> Result<(), SessionError> {
        let ring = session
            .environment()
            .network_script()
            .and_then(|s| s.param("ring"))
            .and_then(|r| r.parse::<u64>().ok());
        let verdict = ring.and_then(|id| {
            let rings = self.inner.rings.lock().expect("rings lock");
            let ring = rings.get(&id)?;
            let valid = !ring.keeper.lost().is_cancelled()
                && ring.keeper.valid_until() > std::time::Instant::now() + FENCE_MARGIN;
            if valid {
                ring.answered.store(true, Ordering::Release);
                drop(ring.events.send(AgentEvent::Answered {
                    queue: ring.queue.clone(),
                }));
            } else {
                tracing::warn!(agent = %ring.agent, token = ring.keeper.lease().token, "answer refused: the lease is lost or about to end");
            }
            Some(valid)
        });
        if verdict != Some(true) {
            self.inner.counts.fenced.fetch_add(1, Ordering::Relaxed);
        }
        let result = if verdict == Some(true) { "ok" } else { "abort" };
        session.set_result(result).await?;
        Ok(())
    }
}

enum RingOutcome {
    Answered,
    NotAnswered,
    CallerGone,
}

/// Waits `poll`, or less when the caller hangs up or the node-agent stops.
async fn idle(session: &mut Session, poll: Duration) -> Result<(), SessionError> {
    tokio::select! {
        hangup = session.wait_for_hangup() => hangup,
        () = tokio::time::sleep(poll) => Ok(()),
    }
}

async fn leave(waiter: Option<Waiter>) {
    if let Some(waiter) = waiter
        && let Err(status) = waiter.leave().await
    {
        tracing::debug!(%status, "leaving the waiting order failed; the entry expires");
    }
}

async fn dial_status(session: &mut Session) -> String {
    match session.send(&Command::get_variable("DIALSTATUS")).await {
        Ok(Reply::Success(success)) => success.data.unwrap_or_default(),
        _ => String::new(),
    }
}
