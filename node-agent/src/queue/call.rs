//! The queue-call flow: the FastAGI scripts `queue` and `fence` that tie a caller waiting
//! on this node to exactly one free agent of the cluster (`docs/queued-calls.md`).
//!
//! `queue` (`AGI(agi://127.0.0.1:4573/queue?queue=sales&attributes=vip)`) holds the call:
//!
//! 1. joins the queue's waiting order in the lock service as `node/uniqueid` (VIP callers,
//!    by the carrier's header or by their number on the control plane's lists, in the
//!    first band), and keeps the entry alive while the caller waits;
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use callfleet_core::config::{CallSourceKind, Config, QueueConfig};
use callfleet_core::store::{CallEvent, CallOutcome};
use callfleet_lock_service::client::LeaseKeeper;
use callfleet_lock_service::waiter::{Turn, WaitSettings, Waiter};
use callfleet_proto::lock::v1::locks_client::LocksClient;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::callers::CallerDirectory;
use super::candidates::{Candidate, CandidatesError, CandidatesSource};
use super::events::{AgentEvents, EventLine};
use crate::agi::proto::{Command, Reply};
use crate::agi::{Scripts, Session, SessionError};
use crate::ami::AmiClient;
use crate::provisioning::ProvisioningError;

/// The dialplan context Dial's `U()` runs on the agent's leg when it answers.
pub const FENCE_CONTEXT: &str = "callfleet-fence";

/// A ring starts only on a lease valid at least this much longer: the `fence` at answer
/// must not find it already ended.
const RING_MARGIN: Duration = Duration::from_secs(2);

/// At answer, the lease must stay valid at least this much longer for the bridge.
const FENCE_MARGIN: Duration = Duration::from_millis(200);

/// The longest the lease of a ring that ended neither answered nor missed waits for the
/// control plane to acknowledge `ring_ended` before it is released (see
/// [`QueueCalls::ring`]).
const RING_ENDED_WAIT: Duration = Duration::from_secs(2);

/// Protections a test switches off (comma-separated names) to show each is what keeps its
/// scenario safe. `private_leases`: every caller leases its own copy of each agent, so the
/// lock service never sees two callers want the same agent. `no_ring_cancel`: a ring whose
/// lease is lost keeps ringing. Never set in production; logged as an error when on.
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
    callers: CallerDirectory,
    locks: LocksClient<Channel>,
    wait: WaitSettings,
    events: AgentEvents,
    settings: QueueConfig,
    rings: Mutex<HashMap<u64, Ring>>,
    next_ring: AtomicU64,
    counts: Counts,
    /// See [`UNSAFE_VARIABLE`].
    private_leases: bool,
    /// See [`UNSAFE_VARIABLE`].
    no_ring_cancel: bool,
    /// How to reach this node's Asterisk to hang up a ring whose lease was lost.
    ami: Option<AmiLogin>,
}

/// The manager login of `node.calls`.
#[derive(Clone)]
struct AmiLogin {
    address: String,
    username: String,
    secret: String,
    timeout: Duration,
}

/// A ring in progress, as the `fence` script finds it.
struct Ring {
    /// The agent's leg, once Dial's `b()` has told it (`ringing` script).
    leg: Arc<Mutex<Option<String>>>,
    agent: String,
    queue: String,
    keeper: Arc<LeaseKeeper>,
    /// When the fence let the agent's answer through.
    answered: Arc<OnceLock<Instant>>,
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
    cancelled: AtomicU64,
    pbx_lost: AtomicU64,
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
    /// Rings ended because their lease was lost while the phone rang.
    pub cancelled: u64,
    /// Rings and calls cut by Asterisk going away; their agents held `pbx_lost_hold`.
    pub pbx_lost: u64,
}

impl QueueCalls {
    /// The queue calls of this node: candidates and agent events from the control plane of
    /// `provisioning`, leases and the waiting order from `node.queue.lock_service`.
    pub fn from_config(config: &Config, node: &str) -> Result<Self, QueueError> {
        let settings = config.node.queue.clone();
        let control_plane = config.provisioning.control_plane_url(&config.control_plane);
        let token = config.provisioning.token.expose();
        let candidates = CandidatesSource::from_config(config)?;
        let callers = CallerDirectory::from_config(config)?;
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
        let switches = std::env::var(UNSAFE_VARIABLE).unwrap_or_default();
        let off = |name: &str| switches.split(',').any(|s| s.trim() == name);
        let (private_leases, no_ring_cancel) = (off("private_leases"), off("no_ring_cancel"));
        if private_leases || no_ring_cancel {
            tracing::error!(%switches, "{UNSAFE_VARIABLE}: protections of queued calls are off; for tests only");
        }
        let calls = &config.node.calls;
        let ami = (calls.source == CallSourceKind::Ami).then(|| AmiLogin {
            address: calls.address.clone(),
            username: calls.username.clone(),
            secret: calls.secret.expose().to_owned(),
            timeout: calls.timeout,
        });
        if ami.is_none() {
            tracing::warn!(
                "node.calls.source is not ami: a ring whose lease is lost cannot be hung up before the agent answers (the fence still refuses the bridge)"
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                node: node.to_owned(),
                private_leases,
                no_ring_cancel,
                ami,
                candidates,
                callers,
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
            .with("ringing", {
                let calls = self.clone();
                move |session| {
                    let calls = calls.clone();
                    async move { calls.ringing(session).await }
                }
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
            cancelled: counts.cancelled.load(Ordering::Relaxed),
            pbx_lost: counts.pbx_lost.load(Ordering::Relaxed),
        }
    }

    /// What the candidates cache has done so far.
    pub fn candidates_stats(&self) -> super::candidates::Stats {
        self.inner.candidates.stats()
    }

    /// What the caller directory's cache has done so far.
    pub fn callers_stats(&self) -> super::callers::Stats {
        self.inner.callers.stats()
    }

    async fn queue(&self, mut session: Session) -> Result<(), SessionError> {
        let environment = session.environment();
        let script = environment.network_script();
        let queue = script
            .and_then(|s| s.param("queue"))
            .unwrap_or("")
            .to_owned();
        let mut attributes = caller_attributes(script.and_then(|s| s.param("attributes")));
        // The caller's number on the control plane's lists (VIP by number) adds to what
        // the carrier's header said; a lookup takes at most its deadline, and an outage
        // leaves the header's attributes alone.
        if let Some(number) = environment.callerid() {
            attributes = self
                .inner
                .callers
                .lookup(number)
                .await
                .merged_with(&attributes);
            attributes.truncate(MAX_ATTRIBUTES);
        }
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
        let mut enqueued_us = 0;
        // Where the caller stood at the last answer: behind the head it only asks where
        // it stands now ([`Waiter::place`]), since ClaimNext would answer `not_first` to
        // the whole candidate list it carries.
        let mut position = 1;
        let outcome = |outcome: CallOutcome| {
            self.inner
                .events
                .queue_outcome(&queue, &waiter_id, outcome, arrived.elapsed());
        };
        loop {
            if session.hung_up() {
                self.inner.counts.abandoned.fetch_add(1, Ordering::Relaxed);
                outcome(CallOutcome::Abandoned);
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
                outcome(CallOutcome::Overflowed);
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
                    Ok((joined, place)) => {
                        enqueued_us = place.enqueued_at_us;
                        position = place.position;
                        waiter = Some(joined);
                    }
                    Err(status) => {
                        tracing::debug!(%queue, %waiter_id, %status, "cannot join the waiting order yet");
                        idle(&mut session, poll).await?;
                    }
                }
                continue;
            };
            if position > 1 {
                match current.place().await {
                    Ok(place) => position = place.position,
                    Err(status) => {
                        tracing::debug!(%queue, %waiter_id, %status, "no place");
                        forget_if_gone(&mut waiter, &status);
                        idle(&mut session, poll).await?;
                        continue;
                    }
                }
                if position > 1 {
                    idle(&mut session, poll_at(position, poll)).await?;
                    continue;
                }
            }
            let list = match self.inner.candidates.candidates(&queue, &attributes).await {
                Ok(found) => found.list,
                Err(CandidatesError::Invalid { message, .. }) if !attributes.is_empty() => {
                    // A carrier's header is not ours to trust: an attribute the control
                    // plane refuses must not keep the caller from every agent.
                    tracing::warn!(%queue, ?attributes, %message, "caller attributes refused; the call goes on without them");
                    attributes.clear();
                    continue;
                }
                Err(err) => {
                    tracing::debug!(%queue, error = %err, "no candidates");
                    idle(&mut session, poll).await?;
                    continue;
                }
            };
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let resources: Vec<String> = list
                .iter()
                .filter(|c| c.free_at(now_ms))
                .map(|c| self.resource(&c.agent, &waiter_id))
                .collect();
            if resources.is_empty() {
                idle(&mut session, poll).await?;
                continue;
            }
            let keeper = match current.claim_next(&resources).await {
                Ok(Turn::Granted(keeper)) => keeper,
                Ok(Turn::NotFirst(behind)) => {
                    position = behind;
                    idle(&mut session, poll_at(position, poll)).await?;
                    continue;
                }
                Ok(Turn::Busy) => {
                    idle(&mut session, poll_at(1, poll)).await?;
                    continue;
                }
                Err(status) => {
                    forget_if_gone(&mut waiter, &status);
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
            let caller = Caller {
                queue: &queue,
                waiter: &waiter_id,
                enqueued_us,
                attributes: &attributes,
            };
            match self
                .ring(&mut session, &caller, &candidate, *keeper)
                .await?
            {
                RingOutcome::Answered { waited_until } => {
                    self.inner.events.queue_outcome(
                        &queue,
                        &waiter_id,
                        CallOutcome::Answered,
                        waited_until.duration_since(arrived),
                    );
                    leave(waiter).await;
                    session.set_result("answered").await.ok();
                    return Ok(());
                }
                RingOutcome::CallerGone => {
                    self.inner.counts.abandoned.fetch_add(1, Ordering::Relaxed);
                    outcome(CallOutcome::Abandoned);
                    leave(waiter).await;
                    return Ok(());
                }
                RingOutcome::NotAnswered => {
                    if let Some(current) = &waiter {
                        match current.requeue().await {
                            Ok(place) => position = place.position,
                            Err(status) => {
                                tracing::debug!(%queue, %waiter_id, %status, "requeue failed");
                                forget_if_gone(&mut waiter, &status);
                            }
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
    ///
    /// The control plane is told of the ring (`ringing`, for supervisors) as the Dial goes
    /// out, without waiting for it, and of its end: `answered` (at the fence), `missed`, or
    /// `ring_ended` on every other way a ring ends (the caller hung up, the lease was lost,
    /// the fence refused the answer, Asterisk went away, Dial failed). A lease too close to
    /// its end is given back before any of it: that agent is never rung, so nothing is sent.
    async fn ring(
        &self,
        session: &mut Session,
        caller: &Caller<'_>,
        candidate: &Candidate,
        keeper: LeaseKeeper,
    ) -> Result<RingOutcome, SessionError> {
        let queue = caller.queue;
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
        let answered = Arc::new(OnceLock::new());
        let events = self
            .inner
            .events
            .line(&candidate.agent, &format!("{id}-{token}"));
        let leg = Arc::new(Mutex::new(None));
        self.inner.rings.lock().expect("rings lock").insert(
            id,
            Ring {
                leg: leg.clone(),
                agent: candidate.agent.clone(),
                queue: queue.to_owned(),
                keeper: keeper.clone(),
                answered: answered.clone(),
                events: events.clone(),
            },
        );
        self.inner.counts.rings.fetch_add(1, Ordering::Relaxed);
        // The enqueue time is the lock service's clock: what the order across nodes follows.
        tracing::info!(%queue, waiter = %caller.waiter, enqueued_us = caller.enqueued_us, attributes = %caller.attributes.join("+"), agent = %candidate.agent, endpoint = %candidate.endpoint, token, "ringing");
        let ring_secs = self.inner.settings.ring_timeout.as_secs().max(1);
        let dial = Command::exec(
            "Dial",
            format!(
                "{},{ring_secs},b({FENCE_CONTEXT}^ring^1({id}))U({FENCE_CONTEXT}^{id})",
                candidate.endpoint
            ),
        );
        // A lease lost while the phone rings: the agent may be leased to another caller
        // any moment, so this ring ends now, not at the fence.
        let watcher = tokio::spawn({
            let (calls, lost, answered, leg) =
                (self.clone(), keeper.lost(), answered.clone(), leg.clone());
            let agent = candidate.agent.clone();
            async move {
                lost.cancelled().await;
                if answered.get().is_none() {
                    calls.cancel_ring(&agent, &leg).await;
                }
            }
        });
        // Queued on the ring's line (so `answered`, `missed` or `ring_ended` follow it), not
        // awaited: the ring never waits for the control plane.
        drop(events.send(CallEvent::Ringing {
            queue: queue.to_owned(),
        }));
        let dialled = session.send(&dial).await;
        watcher.abort();
        self.inner.rings.lock().expect("rings lock").remove(&id);
        let keeper = Arc::try_unwrap(keeper).ok();
        let caller_gone = session.hung_up() || matches!(dialled, Ok(Reply::DeadChannel));
        // The connection closed with neither a reply to Dial nor a `HANGUP` first: Asterisk
        // itself went away. The agent's phone holds the dead ring or call until the agent
        // hangs up or the phone gives up on it, so no node may ring them meanwhile.
        let pbx_lost = !session.hung_up() && matches!(dialled, Err(SessionError::Closed));
        let pbx_lost_hold = self.inner.settings.pbx_lost_hold;
        if pbx_lost {
            self.inner.counts.pbx_lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%queue, agent = %candidate.agent, token, hold = ?pbx_lost_hold, "Asterisk went away during the ring or call; the agent is held from other rings");
        }
        let status = match &dialled {
            Ok(_) if !caller_gone => dial_status(session).await,
            _ => String::new(),
        };
        let mut answered = answered.get().copied();
        if answered.is_none() && status == "ANSWER" {
            // Dial bridged without running the fence: Asterisk lacks app_stack (Gosub) or
            // the fence context. The call happened, so it is counted as one.
            self.inner.counts.unfenced.fetch_add(1, Ordering::Relaxed);
            tracing::error!(agent = %candidate.agent, "an agent was bridged without the fence: load app_stack.so and the {FENCE_CONTEXT} context (callfleet asterisk-config writes both)");
            drop(events.send(CallEvent::Answered {
                queue: queue.to_owned(),
            }));
            answered = Some(Instant::now());
        }
        if let Some(answered_at) = answered {
            self.inner.counts.answered.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%queue, waiter = %caller.waiter, agent = %candidate.agent, token, "answered");
            let wrap_up = if pbx_lost {
                pbx_lost_hold.max(self.inner.settings.wrap_up)
            } else {
                self.inner.settings.wrap_up
            };
            let ended = events.send(CallEvent::Ended { wrap_up });
            // Kept through the wrap-up, so a node whose cached answer still shows the
            // agent free cannot ring them meanwhile, and until `ended` is written, so the
            // agent's next ring (from any node) cannot be written before it. The control
            // plane is sent what is left of the wrap-up, so both end at the same time.
            let release_at = Instant::now() + wrap_up;
            tokio::spawn(async move {
                let _ = ended.await;
                tokio::time::sleep_until(release_at).await;
                if let Some(keeper) = keeper {
                    let _ = keeper.release().await;
                }
            });
            dialled?;
            return Ok(RingOutcome::Answered {
                waited_until: answered_at,
            });
        }
        let missed = !caller_gone
            && matches!(
                status.as_str(),
                "NOANSWER" | "BUSY" | "CHANUNAVAIL" | "CONGESTION"
            );
        let mut hold = if pbx_lost {
            pbx_lost_hold
        } else {
            Duration::ZERO
        };
        if missed {
            self.inner.counts.missed.fetch_add(1, Ordering::Relaxed);
            let written = events.send(CallEvent::Missed {
                queue: queue.to_owned(),
                max_misses: self.inner.settings.max_misses,
            });
            if let Ok(Ok(answer)) = written.await
                && answer.paused
            {
                tracing::info!(agent = %candidate.agent, "paused after missing {} rings in a row", self.inner.settings.max_misses);
                hold = hold.max(self.inner.settings.candidates_fresh);
            }
        }
        // Neither answered nor missed: the ring still shows in the control plane until
        // `ring_ended`. Its lease is given back once that is acknowledged (or after
        // RING_ENDED_WAIT, through an outage), so the `ringing` of the agent's next ring,
        // from any node, lands after it instead of being cleared by it.
        let ring_ended = (!missed).then(|| events.send(CallEvent::RingEnded));
        if let Some(keeper) = keeper {
            let release_at = Instant::now() + hold;
            tokio::spawn(async move {
                if let Some(written) = ring_ended {
                    let _ = tokio::time::timeout(RING_ENDED_WAIT, written).await;
                }
                tokio::time::sleep_until(release_at).await;
                let _ = keeper.release().await;
            });
        }
        dialled?;
        if caller_gone {
            return Ok(RingOutcome::CallerGone);
        }
        Ok(RingOutcome::NotAnswered)
    }

    /// Hangs up the agent's leg of a ring whose lease was lost, over AMI.
    async fn cancel_ring(&self, agent: &str, leg: &Mutex<Option<String>>) {
        if self.inner.no_ring_cancel {
            tracing::error!(%agent, "lease lost while ringing; the ring goes on ({UNSAFE_VARIABLE}=no_ring_cancel)");
            return;
        }
        self.inner.counts.cancelled.fetch_add(1, Ordering::Relaxed);
        let Some(channel) = leg.lock().expect("leg lock").clone() else {
            tracing::warn!(%agent, "lease lost before the ring's leg was known; the fence refuses the bridge");
            return;
        };
        let Some(ami) = &self.inner.ami else {
            tracing::warn!(%agent, %channel, "lease lost while ringing; no AMI to hang up the ring (the fence refuses the bridge)");
            return;
        };
        let hung_up = async {
            let mut client =
                AmiClient::connect(&ami.address, &ami.username, &ami.secret, ami.timeout).await?;
            client.hangup(&channel).await
        };
        match hung_up.await {
            Ok(()) => tracing::warn!(%agent, %channel, "lease lost while ringing: ring hung up"),
            Err(err) => {
                tracing::error!(%agent, %channel, error = %err, "lease lost while ringing and the ring could not be hung up; the fence refuses the bridge")
            }
        }
    }

    /// `ringing?ring=<id>` from Dial's `b()` on the agent's leg before it rings: notes the
    /// leg's channel name for [`QueueCalls::cancel_ring`].
    async fn ringing(&self, session: Session) -> Result<(), SessionError> {
        let environment = session.environment();
        let ring = environment
            .network_script()
            .and_then(|s| s.param("ring"))
            .and_then(|r| r.parse::<u64>().ok());
        let (Some(id), Some(channel)) = (ring, environment.channel()) else {
            tracing::warn!(request = ?environment.request(), "ringing without ?ring= or agi_channel");
            return Ok(());
        };
        let found = {
            let rings = self.inner.rings.lock().expect("rings lock");
            rings.get(&id).map(|ring| {
                *ring.leg.lock().expect("leg lock") = Some(channel.to_owned());
                (ring.agent.clone(), ring.keeper.lost(), ring.leg.clone())
            })
        };
        tracing::debug!(ring = id, %channel, known = found.is_some(), "agent leg");
        // Lost before the leg was known: the watcher found no leg to hang up.
        if let Some((agent, lost, leg)) = found
            && lost.is_cancelled()
        {
            self.cancel_ring(&agent, &leg).await;
        }
        Ok(())
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
                let _ = ring.answered.set(Instant::now());
                drop(ring.events.send(CallEvent::Answered {
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

/// A caller being rung for, as [`QueueCalls::ring`] needs it.
struct Caller<'a> {
    queue: &'a str,
    waiter: &'a str,
    /// When the caller joined the order, in µs of the lock service's clock.
    enqueued_us: u64,
    attributes: &'a [String],
}

enum RingOutcome {
    /// The agent answered at `waited_until` (the end of the caller's wait).
    Answered {
        waited_until: Instant,
    },
    NotAnswered,
    CallerGone,
}

/// The most attributes taken from a caller; the rest are ignored.
const MAX_ATTRIBUTES: usize = 8;

/// The caller's attributes from the AGI URL: the dialplan passes what the carrier's
/// `X-Callfleet-Attributes` header (or a CRM) said, separated by spaces, `+` or commas.
/// Distinct, at most [`MAX_ATTRIBUTES`].
fn caller_attributes(raw: Option<&str>) -> Vec<String> {
    let mut attributes: Vec<String> = Vec::new();
    for attribute in raw.unwrap_or("").split([' ', '+', ',']) {
        if !attribute.is_empty()
            && !attributes.iter().any(|a| a == attribute)
            && attributes.len() < MAX_ATTRIBUTES
        {
            attributes.push(attribute.to_owned());
        }
    }
    attributes
}

/// How long a caller at `position` in the waiting order waits before asking for its turn
/// again, `poll` being the setting. The order grants an agent only to its head, so the
/// next caller must ask soon after the head got one: the first [`HEAD_POSITIONS`] ask ten
/// times as often (each grant waits for one such ask, which bounds the cluster's rings per
/// second), the next [`NEAR_POSITIONS`] every `poll`, and the rest back off with their
/// distance, up to ten times `poll`, so a long queue does not flood the lock service
/// (2,000 callers at 100 ms were 20,000 asks a second, most of them "not first").
fn poll_at(position: u64, poll: Duration) -> Duration {
    if position <= HEAD_POSITIONS {
        (poll / 10).max(Duration::from_millis(5)).min(poll)
    } else if position <= HEAD_POSITIONS + NEAR_POSITIONS {
        poll
    } else {
        let factor = u32::try_from(position / NEAR_POSITIONS).unwrap_or(u32::MAX);
        poll * factor.clamp(1, 10)
    }
}

/// Callers at the head of the order, who ask for their turn most often ([`poll_at`]).
const HEAD_POSITIONS: u64 = 3;
/// Callers after the head who still ask every `poll`.
const NEAR_POSITIONS: u64 = 30;

/// Waits `poll`, or less when the caller hangs up or the node-agent stops.
async fn idle(session: &mut Session, poll: Duration) -> Result<(), SessionError> {
    tokio::select! {
        hangup = session.wait_for_hangup() => hangup,
        () = tokio::time::sleep(poll) => Ok(()),
    }
}

/// The lock service no longer has the caller's entry (it expired, or the service lost
/// it): the next round joins again.
fn forget_if_gone(waiter: &mut Option<Waiter>, status: &tonic::Status) {
    if status.code() == tonic::Code::FailedPrecondition
        && let Some(gone) = waiter.take()
    {
        gone.forget();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_ask_more_often_the_nearer_they_are_to_the_head() {
        let poll = Duration::from_millis(100);
        let at = |position| poll_at(position, poll).as_millis();
        assert_eq!(
            [1, 3, 4, 33, 34, 60, 90, 299, 300, 2_000, u64::MAX].map(at),
            [10, 10, 100, 100, 100, 200, 300, 900, 1000, 1000, 1000]
        );
        // The head never asks more often than every 5 ms.
        assert_eq!(poll_at(1, Duration::from_millis(20)).as_millis(), 5);
        assert_eq!(poll_at(1, Duration::from_millis(10)).as_millis(), 5);
        assert_eq!(poll_at(1, Duration::from_secs(5)).as_millis(), 500);
    }

    #[test]
    fn caller_attributes_are_split_deduplicated_and_bounded() {
        assert_eq!(caller_attributes(None), Vec::<String>::new());
        assert_eq!(caller_attributes(Some("")), Vec::<String>::new());
        assert_eq!(
            caller_attributes(Some("vip+fr vip,,es")),
            ["vip", "fr", "es"]
        );
        let many: Vec<String> = (0..20).map(|n| format!("a{n}")).collect();
        assert_eq!(
            caller_attributes(Some(&many.join("+"))),
            many[..MAX_ATTRIBUTES].to_vec()
        );
    }
}
