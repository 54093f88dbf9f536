//! The operations behind every API face, and the in-memory directory they read.
//!
//! Writes go to the store in one transaction each (with their audit row) and are then
//! followed by a refresh of the in-memory [`View`], so a CRM that changes a priority and
//! asks for candidates next sees its change. Reads of routing and queue status never touch
//! the store: a website polling a queue's status many times a second costs a map lookup.
//! The view is also re-read every `refresh`, to see what other control-plane instances and
//! the node-agents changed. The queue status's figures (waiting callers, the day's
//! outcomes) come from [`crate::figures`], which a background task keeps up to date.
//! Caller attributes (the VIP lists) are the exception among reads: each lookup reads its
//! one number from the store (by primary key), because the lists are not in the view (a
//! list can be long, and the view is re-read at every agent's state change); the node-agents
//! cache what they looked up.
//! Who is being rung is read beside the directory, with the figures: see
//! [`crate::ringing`].

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use callfleet_core::config::{ControlPlaneConfig, Role};
use callfleet_core::routing::{self, CallerAttributes, Day, Snapshot};
use callfleet_core::store::directory::MAX_TAGS;
use callfleet_core::store::{
    Agent, AgentState, AuditEntry, CallEvent, CallEventOutcome, CallOutcome, CallerEntry,
    CredentialsChange, Device, DigestCredentials, DirectorySnapshot, Login, Queue, QueueCounts,
    QueueMember, Ringing, Session,
};
use callfleet_core::{NodeId, NodeStatus, Store};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::auth::{Caller, Tokens};
use crate::error::ControlError;
use crate::figures::{FIGURES_EVERY, Figures, STORE_DEADLINE};
use crate::ringing::Rings;

tokio::task_local! {
    /// Set while a [`Control::batch`] runs: its writes leave the refresh to its end.
    static DEFER_REFRESH: std::cell::Cell<bool>;
}

/// The directory as last read from the store, ready for routing queries.
#[derive(Debug)]
pub struct View {
    /// The rows as read.
    pub directory: DirectorySnapshot,
    /// The routing index built from them.
    pub routing: Snapshot,
    /// The day the counters belong to.
    pub today: Day,
    /// The store's directory version before the read (see `Store::directory_version`).
    version: i64,
    /// When the read finished, to advance the database clock without asking it.
    read_at: Instant,
    /// When the read started: it shows every write committed before (see
    /// [`crate::ringing`]).
    started: Instant,
}

impl View {
    /// The database clock now, estimated from the read's clock and the time since.
    pub fn now_ms(&self) -> i64 {
        self.directory.now_ms + i64::try_from(self.read_at.elapsed().as_millis()).unwrap_or(0)
    }
}

/// An agent with what the directory knows of it now.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AgentView {
    /// The agent's settings.
    #[serde(flatten)]
    pub agent: Agent,
    /// `available`, `paused`, `on_call` or `wrap_up`.
    pub state: &'static str,
    /// Why the agent is paused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_reason: Option<String>,
    /// The device the agent is logged in on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Sales counted today (configured time zone).
    pub sales_today: u32,
    /// Calls counted today.
    pub calls_today: u32,
    /// Rings of queued calls the agent did not answer today.
    pub missed_today: u32,
    /// Since when a node rings the agent for a queued call (Unix epoch ms, the store's
    /// clock); `None` (null) when no ring is in progress.
    pub ringing_since_ms: Option<i64>,
    /// The queue whose caller the agent is rung for; `None` (null) when not ringing.
    pub ringing_queue: Option<String>,
    /// Since when the agent is in `state` (Unix epoch ms, the store's clock).
    pub state_since_ms: i64,
}

/// The public status of a queue: who can take its calls (from the directory) and its
/// figures (from [`crate::figures`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct QueueStatusView {
    /// Whether and by how many agents the queue is served.
    #[serde(flatten)]
    pub status: routing::QueueStatus,
    /// Callers waiting for an agent across all nodes, not counting those being rung;
    /// `None` when the lock service did not answer lately (`waiting_unknown`).
    pub waiting: Option<u64>,
    /// How long the longest-waiting of them has waited, ms (0: nobody waits); `None` with
    /// `waiting`.
    pub longest_wait_ms: Option<u64>,
    /// True when `waiting` and `longest_wait_ms` are unknown: no lock service configured,
    /// or it did not answer within its deadline lately.
    pub waiting_unknown: bool,
    /// Calls answered today (configured time zone), as the nodes reported them.
    pub answered_today: u32,
    /// Calls whose caller hung up while waiting, today.
    pub abandoned_today: u32,
    /// Calls sent to the queue's overflow target, today.
    pub overflowed_today: u32,
    /// Calls answered today within the queue's `service_level_ms`.
    pub answered_within_sl_today: u32,
    /// `answered_within_sl_today` per call answered or abandoned today, in percent with one
    /// decimal; `None` before the first such call.
    pub service_level_pct_today: Option<f64>,
}

/// A routing candidate, owned.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Candidate {
    /// The agent's personal extension.
    pub agent: String,
    /// The SIP endpoint to ring.
    pub endpoint: String,
    /// The membership's priority (lower rings first).
    pub priority: i32,
    /// Past the daily cap: rings after everyone else.
    pub demoted: bool,
    /// When the agent's wrap-up ends (Unix epoch, ms), for an agent listed ahead of being
    /// free ([`Control::candidates_ahead`]); absent for an agent free now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_at_ms: Option<u64>,
}

/// What a device write says about its credentials: each of `password` and `md5_cred` is
/// absent (keep), `null` (remove) or a value (set); `realm` goes with a value.
#[derive(Debug, Default, Clone)]
pub struct CredentialsInput {
    /// The password, hashed at once into the HA1.
    pub password: Option<Option<String>>,
    /// An HA1 computed by the caller (MD5 of `device:realm:password`).
    pub md5_cred: Option<Option<String>>,
    /// The realm; `control_plane.sip_realm` when absent.
    pub realm: Option<String>,
}

/// Which sources of the figures failed at their last read (each is logged once).
#[derive(Debug, Default)]
struct Failing {
    locks: bool,
    store: bool,
    rings: bool,
}

/// The longest a write waits for the directory re-read that shows it, before answering.
const REFRESH_WAIT: Duration = Duration::from_secs(2);

/// The least time between two directory re-reads that call events wait for: the nodes
/// report several events per call, each moving the version, and a re-read per event would
/// make the control plane re-read the whole directory back to back under load (at 26 calls
/// a second it spent half a core on it). Events that land within this gap share one re-read;
/// their answers wait for it (the nodes send them off the call's path).
const EVENT_REFRESH_GAP: Duration = Duration::from_millis(50);

/// How often the directory is read whole even when its version did not move.
const FULL_READ_EVERY: Duration = Duration::from_secs(60);

/// The longest look ahead a candidates query may ask for ([`Control::candidates_ahead`]).
pub const MAX_CANDIDATES_AHEAD: Duration = Duration::from_secs(60);

/// The control plane's operations.
#[derive(Debug)]
pub struct Control {
    store: Store,
    tokens: Tokens,
    time_zone: jiff::tz::TimeZone,
    sip_realm: String,
    view: RwLock<Arc<View>>,
    /// Serialises refreshes, so writes that land together share one re-read.
    refreshing: tokio::sync::Mutex<()>,
    /// Refreshes started so far, each counted before it reads the version: a write that
    /// committed before the count moved is covered by that refresh.
    refreshes: AtomicU64,
    /// When the last refresh that call events waited for ended ([`EVENT_REFRESH_GAP`]).
    event_refreshed: std::sync::Mutex<Option<Instant>>,
    /// The queue status's figures.
    figures: Figures,
    /// Who is being rung, for the agent lists.
    rings: Rings,
    /// The autoscaler's policy, for its figures on any control plane.
    autoscaler: callfleet_core::config::AutoscalerConfig,
}

/// The autoscaler as supervisors see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AutoscalerView {
    /// Whether this control plane takes part (`control_plane.autoscaler.enabled`).
    pub enabled: bool,
    /// What supervisors set.
    pub steering: callfleet_core::store::ScalerSteering,
    /// The fleet now, by the policy's measure.
    pub figures: crate::scale::policy::Figures,
    /// The policy's thresholds.
    pub scale_out_above: f64,
    /// See `scale_out_above`.
    pub scale_in_below: f64,
    /// Who leads the autoscaler now, from the lock service; `None` when nobody does or
    /// the lock service did not answer.
    pub leader: Option<AutoscalerLeader>,
    /// The latest decisions and steering, newest first.
    pub recent: Vec<AuditEntry>,
}

/// The control plane holding the autoscaler's lease.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AutoscalerLeader {
    /// Its holder id (`host/pid`).
    pub holder: String,
    /// The lease's fencing token, recorded with every action it takes.
    pub token: u64,
}

impl Control {
    /// Reads the directory once and returns the service.
    pub async fn start(store: Store, config: &ControlPlaneConfig) -> Result<Self, ControlError> {
        let time_zone = jiff::tz::TimeZone::get(&config.time_zone)
            .map_err(|err| ControlError::invalid("control_plane.time_zone", err.to_string()))?;
        let view = read_view(&store, &time_zone).await?;
        let figures = Figures::new(&config.lock_service)?;
        // The day's counts are there from the start, as the directory is; the waiting
        // callers come with the first round of `figures_loop`.
        let day = day_string(view.now_ms(), &time_zone);
        let started = Instant::now();
        figures.set_counts(&day, started, store.queue_counts_of_day(&day).await?);
        Ok(Self {
            store,
            tokens: Tokens::new(config.tokens.clone()),
            time_zone,
            sip_realm: config.sip_realm.clone(),
            view: RwLock::new(Arc::new(view)),
            refreshing: tokio::sync::Mutex::new(()),
            refreshes: AtomicU64::new(0),
            event_refreshed: std::sync::Mutex::new(None),
            figures,
            rings: Rings::default(),
            autoscaler: config.autoscaler.clone(),
        })
    }

    /// The autoscaler's steering, figures, leader and latest decisions.
    pub async fn autoscaler_status(&self) -> Result<AutoscalerView, ControlError> {
        let leader = self.figures.lease(crate::scale::LEASE);
        Ok(crate::scale::status(&self.autoscaler, &self.store, leader).await?)
    }

    /// Sets what supervisors steer (admin), audited under the caller's name. A maximum
    /// above the configured `max_extra` is refused: that one is the budget's.
    pub async fn set_autoscaler(
        &self,
        caller: &Caller,
        steering: &callfleet_core::store::ScalerSteering,
    ) -> Result<AutoscalerView, ControlError> {
        crate::scale::check_steering(&self.autoscaler, steering)?;
        self.store
            .set_scaler_steering(steering, &caller.name)
            .await?;
        self.autoscaler_status().await
    }

    /// The store, for what is served straight from it (realtime provisioning).
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Checks the `Authorization` header for an operation that needs `role`.
    pub fn authorize(&self, header: Option<&[u8]>, role: Role) -> Result<Caller, ControlError> {
        self.tokens.authorize(header, role)
    }

    /// The caller behind an `Authorization` header, if it may read a queue's candidates
    /// ([`crate::auth::CANDIDATE_READERS`]).
    pub fn authorize_candidates(&self, header: Option<&[u8]>) -> Result<Caller, ControlError> {
        self.tokens
            .authorize_any(header, &crate::auth::CANDIDATE_READERS)
    }

    /// The caller behind an `Authorization` header, if it may look up a caller number's
    /// attributes ([`crate::auth::CALLER_LOOKUP`]).
    pub fn authorize_caller_lookup(&self, header: Option<&[u8]>) -> Result<Caller, ControlError> {
        self.tokens
            .authorize_any(header, &crate::auth::CALLER_LOOKUP)
    }

    /// The directory as last read.
    pub fn view(&self) -> Arc<View> {
        self.view.read().expect("view lock").clone()
    }

    /// Re-reads the directory every `every` until `shutdown` when its version moved, and
    /// whole every `FULL_READ_EVERY` (60 s) whatever the version says (a safety net: a change
    /// written around the version, by hand in SQL say, still shows); logs a failing store
    /// once.
    pub async fn refresh_loop(&self, every: Duration, shutdown: CancellationToken) {
        let mut failing = false;
        let mut full_read = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let _turn = self.refreshing.lock().await;
            let refreshed = if full_read.elapsed() >= FULL_READ_EVERY {
                full_read = tokio::time::Instant::now();
                self.reread().await
            } else {
                self.refresh_if_changed().await
            };
            match refreshed {
                Ok(()) => {
                    if failing {
                        info!("store back: directory refreshed");
                        failing = false;
                    }
                }
                Err(err) => {
                    if !failing {
                        warn!(error = %err, "store unreachable: serving the last directory read");
                        failing = true;
                    }
                }
            }
        }
    }

    /// Reads the queues' figures every [`FIGURES_EVERY`] until `shutdown`: each queue's
    /// waiting order from the lock service and the day's counters from the store, at once
    /// and each within its deadline, so a status never waits on either (see
    /// [`crate::figures`]). Logs a source that stops answering once, and once when it is
    /// back.
    pub async fn figures_loop(&self, shutdown: CancellationToken) {
        let mut failing = Failing::default();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                () = self.read_figures(&mut failing) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(FIGURES_EVERY) => {}
            }
        }
    }

    /// One round of [`Control::figures_loop`].
    async fn read_figures(&self, failing: &mut Failing) {
        let view = self.view();
        let day = day_string(view.now_ms(), &self.time_zone);
        let queues: Vec<String> = view.directory.queues.iter().map(|q| q.id.clone()).collect();
        drop(view);
        let started = Instant::now();
        let (waiting, counts, rings) = tokio::join!(
            self.figures.read_waiting(&queues),
            tokio::time::timeout(STORE_DEADLINE, self.store.queue_counts_of_day(&day)),
            tokio::time::timeout(STORE_DEADLINE, self.store.ringing_agents()),
        );
        match rings {
            Ok(Ok(rings)) => {
                self.rings.set_read(started, rings);
                if failing.rings {
                    info!("store back: ringing agents read");
                    failing.rings = false;
                }
            }
            failed if !failing.rings => {
                let error = match failed {
                    Ok(Err(err)) => err.to_string(),
                    _ => format!("no answer within {STORE_DEADLINE:?}"),
                };
                warn!(%error, "cannot read the ringing agents: agent lists show the last ones read");
                failing.rings = true;
            }
            _ => {}
        }
        match waiting {
            Ok(()) if failing.locks => {
                info!("lock service answers again: queue status shows waiting callers");
                failing.locks = false;
            }
            Err(why) if !failing.locks => {
                warn!(error = %why, "lock service does not answer: queue status shows waiting callers as unknown");
                failing.locks = true;
            }
            _ => {}
        }
        match counts {
            Ok(Ok(counts)) => {
                self.figures.set_counts(&day, started, counts);
                if failing.store {
                    info!("store back: queue counters read");
                    failing.store = false;
                }
            }
            failed if !failing.store => {
                let error = match failed {
                    Ok(Err(err)) => err.to_string(),
                    _ => format!("no answer within {STORE_DEADLINE:?}"),
                };
                warn!(%error, "cannot read the queue counters: queue status shows the last ones read");
                failing.store = true;
            }
            _ => {}
        }
    }

    /// Re-reads the directory if a change was written (by any instance or node) or the
    /// day turned since the last read; otherwise costs one small query.
    async fn refresh_if_changed(&self) -> Result<(), ControlError> {
        self.refreshes.fetch_add(1, Ordering::SeqCst);
        let current = self.view();
        let version = self.store.directory_version().await?;
        let day = day_string(current.now_ms(), &self.time_zone);
        if version == current.version && parse_day(&day) == current.today {
            return Ok(());
        }
        self.reread().await
    }

    /// Reads the whole directory and serves it from now on.
    async fn reread(&self) -> Result<(), ControlError> {
        self.refreshes.fetch_add(1, Ordering::SeqCst);
        let started = Instant::now();
        let read = read_view(&self.store, &self.time_zone).await;
        let result = if read.is_ok() { "ok" } else { "error" };
        metrics::counter!("callfleet_control_plane_directory_reads_total", "result" => result)
            .increment(1);
        metrics::histogram!("callfleet_control_plane_directory_read_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        *self.view.write().expect("view lock") = Arc::new(read?);
        Ok(())
    }

    /// Runs `work` (several writes, such as a `system.multicall`) with one refresh of the
    /// view at the end instead of one per write.
    pub async fn batch<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        let (result, dirty) = DEFER_REFRESH
            .scope(std::cell::Cell::new(false), async {
                let result = work.await;
                (result, DEFER_REFRESH.with(std::cell::Cell::get))
            })
            .await;
        if dirty {
            self.refresh_after_write().await;
        }
        result
    }

    /// Inside a [`Control::batch`]: brings the view up to date with the batch's writes so
    /// far, so a read that follows a write in the same batch sees it.
    pub async fn settle(&self) {
        if DEFER_REFRESH.try_with(|dirty| dirty.replace(false)) == Ok(true) {
            self.refresh_after_write().await;
        }
    }

    /// Makes the next reads see a write that just committed.
    async fn after_write(&self) {
        if DEFER_REFRESH.try_with(|dirty| dirty.set(true)).is_ok() {
            return; // the batch refreshes when it reads or ends
        }
        self.refresh_after_write().await;
    }

    /// Waits for its turn and re-reads the directory unless a refresh that started after
    /// this write (so its version already covers it) got there first.
    async fn refresh_after_write(&self) {
        self.refresh_after(None).await;
    }

    /// [`Control::after_write`] for a node's call event: the re-read starts no sooner than
    /// [`EVENT_REFRESH_GAP`] after the last one events waited for.
    async fn after_event(&self) {
        if DEFER_REFRESH.try_with(|dirty| dirty.set(true)).is_ok() {
            return;
        }
        self.refresh_after(Some(EVENT_REFRESH_GAP)).await;
    }

    async fn refresh_after(&self, gap: Option<Duration>) {
        let committed = self.refreshes.load(Ordering::SeqCst);
        // The write is committed either way: a refresh that fails or takes longer than
        // REFRESH_WAIT is left to the periodic one, and the caller gets its answer.
        let refreshed = tokio::time::timeout(REFRESH_WAIT, async {
            let _turn = self.refreshing.lock().await;
            if self.refreshes.load(Ordering::SeqCst) != committed {
                // One started after the commit while this write waited its turn.
                return Ok(());
            }
            let Some(gap) = gap else {
                return self.refresh_if_changed().await;
            };
            let last = *self.event_refreshed.lock().expect("event refresh lock");
            if let Some(wait) = last.and_then(|at| gap.checked_sub(at.elapsed())) {
                tokio::time::sleep(wait).await;
            }
            let refreshed = self.refresh_if_changed().await;
            *self.event_refreshed.lock().expect("event refresh lock") = Some(Instant::now());
            refreshed
        })
        .await;
        match refreshed {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(error = %err, "cannot refresh the directory after a write"),
            Err(_) => warn!(
                wait = ?REFRESH_WAIT,
                "the directory refresh after a write is slow; answering, the next refresh shows the change"
            ),
        }
    }

    /// Today's date in the configured time zone, on the database clock.
    fn today(&self) -> String {
        day_string(self.view().now_ms(), &self.time_zone)
    }

    // ---- agents ------------------------------------------------------------------------

    /// Every agent with its state, and its ring from the newest read (see
    /// [`crate::ringing`]).
    pub fn list_agents(&self) -> Vec<AgentView> {
        let view = self.view();
        let rings = self.rings.state();
        view.directory
            .agents
            .iter()
            .map(|agent| {
                let ring = rings.ring_of(&agent.id, agent.ringing.as_ref(), view.started);
                agent_view(agent, ring)
            })
            .collect()
    }

    /// One agent with its state, read from the store so it is never stale.
    pub async fn get_agent(&self, id: &str) -> Result<AgentView, ControlError> {
        let agent = self.store.get_agent(id).await?;
        let availability = self.store.availability(id).await?;
        let session = self.store.session(id).await?;
        let counts = self.store.daily_counts(id, &self.today()).await?;
        let (state, pause_reason) = state_fields(&availability.state);
        let ring = availability.ringing;
        Ok(AgentView {
            agent,
            state,
            pause_reason,
            device: session.map(|s| s.device),
            sales_today: counts.sales,
            calls_today: counts.calls,
            missed_today: counts.missed,
            ringing_since_ms: ring.as_ref().map(|r| r.since_ms),
            ringing_queue: ring.map(|r| r.queue),
            state_since_ms: availability.state_since_ms,
        })
    }

    /// Creates or replaces an agent.
    pub async fn put_agent(
        &self,
        caller: &Caller,
        agent: &Agent,
    ) -> Result<AgentView, ControlError> {
        self.store.upsert_agent(agent, &caller.name).await?;
        self.after_write().await;
        self.get_agent(&agent.id).await
    }

    /// Deletes an agent, its memberships and its session.
    pub async fn delete_agent(&self, caller: &Caller, id: &str) -> Result<(), ControlError> {
        self.store.delete_agent(id, &caller.name).await?;
        self.after_write().await;
        Ok(())
    }

    /// Replaces an agent's tags.
    pub async fn set_tags(
        &self,
        caller: &Caller,
        id: &str,
        tags: Vec<String>,
    ) -> Result<AgentView, ControlError> {
        self.store
            .set_tags(id, &tags.into_iter().collect(), &caller.name)
            .await?;
        self.after_write().await;
        self.get_agent(id).await
    }

    /// Sets or removes an agent's daily cap.
    pub async fn set_daily_cap(
        &self,
        caller: &Caller,
        id: &str,
        cap: Option<u32>,
    ) -> Result<AgentView, ControlError> {
        self.store.set_daily_cap(id, cap, &caller.name).await?;
        self.after_write().await;
        self.get_agent(id).await
    }

    /// Counts a sale today; returns today's sales. With a `request_id`, a retry of the same
    /// request answers the same count and counts nothing.
    pub async fn record_sale(
        &self,
        caller: &Caller,
        id: &str,
        request_id: Option<&str>,
    ) -> Result<u32, ControlError> {
        let today = self.today();
        let sales = match request_id {
            Some(request) => {
                self.store
                    .record_sale_once(id, &today, &caller.name, request)
                    .await?
            }
            None => self.store.record_sale(id, &today, &caller.name).await?,
        };
        self.after_write().await;
        Ok(sales)
    }

    /// Logs the agent in on a device.
    pub async fn login(
        &self,
        caller: &Caller,
        agent: &str,
        device: &str,
    ) -> Result<(Login, Session), ControlError> {
        let login = self.store.login(agent, device, &caller.name).await?;
        self.after_write().await;
        let session = self.store.session(agent).await?.ok_or_else(|| {
            ControlError::Conflict(format!(
                "agent `{agent}` was logged out again while logging in; retry"
            ))
        })?;
        Ok((login, session))
    }

    /// Logs the agent out; returns the device they left.
    pub async fn logout(
        &self,
        caller: &Caller,
        agent: &str,
    ) -> Result<Option<String>, ControlError> {
        let left = self.store.logout(agent, &caller.name).await?;
        self.after_write().await;
        Ok(left)
    }

    /// Pauses the agent.
    pub async fn pause(
        &self,
        caller: &Caller,
        agent: &str,
        reason: &str,
    ) -> Result<(), ControlError> {
        self.store.pause(agent, reason, &caller.name).await?;
        self.after_write().await;
        Ok(())
    }

    /// Makes the agent available again.
    pub async fn unpause(&self, caller: &Caller, agent: &str) -> Result<(), ControlError> {
        self.store.unpause(agent, &caller.name).await?;
        self.after_write().await;
        Ok(())
    }

    /// Records what a node saw when it rang the agent for a queued call (ringing, answered,
    /// ended, missed, ring ended), counted on today's date in the configured time zone.
    /// With a `request_id`, a retry of the same request answers what the first one did and
    /// changes nothing.
    pub async fn call_event(
        &self,
        caller: &Caller,
        agent: &str,
        event: &CallEvent,
        request_id: Option<&str>,
    ) -> Result<CallEventOutcome, ControlError> {
        let outcome = self
            .store
            .record_call_event(agent, event, &self.today(), &caller.name, request_id)
            .await?;
        // This instance's lists show the ring (or its end) at once; the others' within a
        // tick of their figures loop. Every event ends a ring but `ringing`.
        let ring = match (&outcome, event) {
            (CallEventOutcome::Ringing { since_ms }, CallEvent::Ringing { queue }) => {
                Some(Ringing {
                    since_ms: *since_ms,
                    queue: queue.clone(),
                })
            }
            _ => None,
        };
        self.rings.note(agent, ring);
        // A ring and its end move no directory version: nothing routing reads changed.
        if matches!(event, CallEvent::Ringing { .. } | CallEvent::RingEnded) {
            return Ok(outcome);
        }
        // Also after a replay, which wrote nothing: the view then shows the first write,
        // which a refresh may not have shown yet.
        self.after_event().await;
        Ok(outcome)
    }

    /// Counts what became of a call of `queue` (see [`CallOutcome`]) after the caller
    /// waited `waited`, on today's date in the configured time zone; returns the queue's
    /// counts of the day. With a `request_id`, a retry of the same request answers what the
    /// first one did and counts nothing.
    pub async fn call_outcome(
        &self,
        caller: &Caller,
        queue: &str,
        outcome: CallOutcome,
        waited: Duration,
        request_id: Option<&str>,
    ) -> Result<QueueCounts, ControlError> {
        let today = self.today();
        let counts = self
            .store
            .record_call_outcome(queue, outcome, waited, &today, &caller.name, request_id)
            .await?;
        // No directory refresh: nothing routing reads changed (the store does not bump
        // the version for outcomes). This instance's status shows the counts at once; the
        // others' within a round of their figures loop.
        self.figures.note_counts(queue, &today, counts);
        Ok(counts)
    }

    // ---- devices and queues ------------------------------------------------------------

    /// Every device.
    pub async fn list_devices(&self) -> Result<Vec<Device>, ControlError> {
        Ok(self.store.list_devices().await?)
    }

    /// Creates or replaces a device, and sets, keeps or removes its credentials.
    pub async fn put_device(
        &self,
        caller: &Caller,
        device: &Device,
        credentials: CredentialsInput,
    ) -> Result<Device, ControlError> {
        let realm = credentials.realm.as_deref().unwrap_or(&self.sip_realm);
        let change = match (credentials.password, credentials.md5_cred) {
            (Some(_), Some(_)) => {
                return Err(ControlError::invalid(
                    "password",
                    "send either password or md5_cred, not both",
                ));
            }
            (Some(Some(password)), None) => CredentialsChange::Set(
                DigestCredentials::from_password(&device.id, realm, &password)?,
            ),
            (None, Some(Some(ha1))) => {
                CredentialsChange::Set(DigestCredentials::from_ha1(realm, &ha1)?)
            }
            (Some(None), None) | (None, Some(None)) => CredentialsChange::Remove,
            (None, None) if credentials.realm.is_some() => {
                return Err(ControlError::invalid(
                    "realm",
                    "a realm only goes with a password or md5_cred (the stored HA1 is bound to its realm)",
                ));
            }
            (None, None) => CredentialsChange::Keep,
        };
        self.store.put_device(device, &change, &caller.name).await?;
        self.after_write().await;
        Ok(self.store.get_device(&device.id).await?)
    }

    /// Deletes a device (logging out whoever is on it).
    pub async fn delete_device(&self, caller: &Caller, id: &str) -> Result<(), ControlError> {
        self.store.delete_device(id, &caller.name).await?;
        self.after_write().await;
        Ok(())
    }

    /// Every queue.
    pub async fn list_queues(&self) -> Result<Vec<Queue>, ControlError> {
        Ok(self.store.list_queues().await?)
    }

    /// Creates or replaces a queue.
    pub async fn put_queue(&self, caller: &Caller, queue: &Queue) -> Result<Queue, ControlError> {
        self.store.upsert_queue(queue, &caller.name).await?;
        self.after_write().await;
        Ok(self.store.get_queue(&queue.id).await?)
    }

    /// Deletes a queue and its memberships.
    pub async fn delete_queue(&self, caller: &Caller, id: &str) -> Result<(), ControlError> {
        self.store.delete_queue(id, &caller.name).await?;
        self.after_write().await;
        Ok(())
    }

    /// A queue's members, best priority first.
    pub async fn list_members(&self, queue: &str) -> Result<Vec<QueueMember>, ControlError> {
        Ok(self.store.list_members(queue).await?)
    }

    /// Adds the agent to the queue or changes its priority.
    pub async fn set_priority(
        &self,
        caller: &Caller,
        agent: &str,
        queue: &str,
        priority: i32,
    ) -> Result<(), ControlError> {
        self.store
            .set_priority(queue, agent, priority, &caller.name)
            .await?;
        self.after_write().await;
        Ok(())
    }

    /// Removes the agent from the queue.
    pub async fn remove_member(
        &self,
        caller: &Caller,
        agent: &str,
        queue: &str,
    ) -> Result<(), ControlError> {
        self.store.remove_member(queue, agent, &caller.name).await?;
        self.after_write().await;
        Ok(())
    }

    // ---- routing ----------------------------------------------------------------------

    /// The public status of a queue with its figures, from memory.
    pub fn queue_status(&self, queue: &str) -> Result<QueueStatusView, ControlError> {
        self.queue_status_in(&self.view(), queue)
    }

    /// [`Control::queue_status`] as its JSON, rendered again only when the directory or
    /// the figures changed or [`crate::status_cache::STATUS_REUSE`] has passed.
    pub fn queue_status_json(&self, queue: &str) -> Result<Bytes, ControlError> {
        // Both before the render, so a change during it leaves an answer that no longer
        // matches rather than one that looks current.
        let view = self.view();
        let figures = self.figures.generation();
        crate::status_cache::RENDERED.with_borrow_mut(|rendered| {
            rendered.answer(&view, figures, queue, Instant::now(), || {
                let status = self.queue_status_in(&view, queue)?;
                serde_json::to_vec(&status).map(Bytes::from).map_err(|err| {
                    ControlError::Unavailable(format!("cannot render the status: {err}"))
                })
            })
        })
    }

    fn queue_status_in(&self, view: &View, queue: &str) -> Result<QueueStatusView, ControlError> {
        let now_ms = view.now_ms();
        let now = u64::try_from(now_ms).unwrap_or(0);
        let status = view
            .routing
            .queue_status(queue, now)
            .map_err(routing_error)?;
        let counts = self
            .figures
            .counts(&status.queue, &day_string(now_ms, &self.time_zone));
        let waiting = self.figures.waiting(&status.queue);
        Ok(QueueStatusView {
            status,
            waiting: waiting.map(|(waiting, _)| waiting),
            longest_wait_ms: waiting.map(|(_, longest)| longest),
            waiting_unknown: waiting.is_none(),
            answered_today: counts.answered,
            abandoned_today: counts.abandoned,
            overflowed_today: counts.overflowed,
            answered_within_sl_today: counts.answered_within_sl,
            service_level_pct_today: counts.service_level_pct(),
        })
    }

    /// The agents to ring for a call in `queue` from a caller with `attributes`, best first.
    pub fn candidates(
        &self,
        queue: &str,
        attributes: &[String],
    ) -> Result<Vec<Candidate>, ControlError> {
        self.candidates_ahead(queue, attributes, Duration::ZERO)
    }

    /// [`Control::candidates`] with the agents whose wrap-up ends within `ahead` too, each
    /// with its [`Candidate::free_at_ms`], ranked as they will be then. A node that caches
    /// the answer for `ahead` rings such an agent as soon as its wrap-up ends, rather than
    /// up to `ahead` later when its next answer shows the agent free.
    pub fn candidates_ahead(
        &self,
        queue: &str,
        attributes: &[String],
        ahead: Duration,
    ) -> Result<Vec<Candidate>, ControlError> {
        if ahead > MAX_CANDIDATES_AHEAD {
            return Err(ControlError::invalid(
                "within_ms",
                format!(
                    "{} ms; at most {} ms (a node caches its candidates for about a second)",
                    ahead.as_millis(),
                    MAX_CANDIDATES_AHEAD.as_millis()
                ),
            ));
        }
        // Each distinct attribute costs a check per member: copies count once, and more
        // than an agent can carry as tags can match no one anyway.
        let mut distinct: Vec<&String> = attributes.iter().collect();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() > MAX_TAGS {
            return Err(ControlError::invalid(
                "attributes",
                format!(
                    "{} different attributes; at most {MAX_TAGS} (an agent carries at most {MAX_TAGS} tags)",
                    distinct.len()
                ),
            ));
        }
        let view = self.view();
        let now = u64::try_from(view.now_ms()).unwrap_or(0);
        let at = now.saturating_add(u64::try_from(ahead.as_millis()).unwrap_or(u64::MAX));
        let caller = CallerAttributes::new(distinct.into_iter().cloned());
        let found = view
            .routing
            .candidates(queue, &caller, at, view.today)
            .map_err(routing_error)?;
        Ok(found
            .into_iter()
            .map(|c| Candidate {
                agent: c.agent.to_owned(),
                endpoint: c.endpoint.to_owned(),
                priority: c.priority,
                demoted: c.demoted,
                // An agent idle only from after now is one whose wrap-up is still running.
                free_at_ms: (c.idle_since_ms > now).then_some(c.idle_since_ms),
            })
            .collect())
    }

    // ---- caller attributes ------------------------------------------------------------

    /// Replaces the attributes of a caller number (copies count once; an empty list removes
    /// the number); returns the entry as stored, its number normalised. Read from the store
    /// by each lookup, so no directory refresh is needed.
    pub async fn set_caller_attributes(
        &self,
        caller: &Caller,
        number: &str,
        attributes: Vec<String>,
    ) -> Result<CallerEntry, ControlError> {
        let attributes: BTreeSet<String> = attributes.into_iter().collect();
        Ok(self
            .store
            .set_caller_attributes(number, &attributes, &caller.name)
            .await?)
    }

    /// Removes a caller number from the lists; one that is not listed is no error.
    pub async fn remove_caller(&self, caller: &Caller, number: &str) -> Result<(), ControlError> {
        self.store.remove_caller(number, &caller.name).await?;
        Ok(())
    }

    /// The attributes of a caller number: empty when it is not listed, which is how a node
    /// routes a caller no list names.
    pub async fn caller_attributes(&self, number: &str) -> Result<CallerEntry, ControlError> {
        Ok(self.store.caller_attributes(number).await?)
    }

    /// Up to `limit` (at most 1000) listed callers by number, after `after` when given.
    pub async fn list_callers(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<CallerEntry>, ControlError> {
        Ok(self.store.list_callers(after, limit).await?)
    }

    // ---- nodes and audit --------------------------------------------------------------

    /// The fleet's nodes.
    pub async fn list_nodes(&self) -> Result<Vec<NodeStatus>, ControlError> {
        Ok(self.store.list_nodes().await?)
    }

    /// Every node's samples of the last `window`, oldest first, in node id order.
    pub async fn node_history(
        &self,
        window: std::time::Duration,
    ) -> Result<Vec<(NodeId, Vec<callfleet_core::store::Sample>)>, ControlError> {
        let nodes = self.store.list_nodes().await?;
        let mut history = Vec::with_capacity(nodes.len());
        for node in nodes {
            let samples = self.store.samples(&node.id, window).await?;
            history.push((node.id, samples));
        }
        Ok(history)
    }

    /// Asks a node to drain (or to take calls again).
    pub async fn set_drain(
        &self,
        caller: &Caller,
        node: &str,
        drain: bool,
    ) -> Result<String, ControlError> {
        let id: NodeId = node
            .parse()
            .map_err(|err: callfleet_core::ids::InvalidId| {
                ControlError::invalid("node", err.to_string())
            })?;
        let state = self
            .store
            .set_drain_audited(&id, drain, &caller.name)
            .await?;
        Ok(state.as_str().to_owned())
    }

    /// The audit log, newest first.
    pub async fn audit(
        &self,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<AuditEntry>, ControlError> {
        Ok(self.store.list_audit(limit, before).await?)
    }
}

fn routing_error(err: routing::RoutingError) -> ControlError {
    match err {
        routing::RoutingError::UnknownQueue { queue } => ControlError::NotFound(format!(
            "no queue `{queue}`; list queues with GET /api/v1/queues"
        )),
    }
}

fn state_fields(state: &AgentState) -> (&'static str, Option<String>) {
    let reason = match state {
        AgentState::Paused { reason } => Some(reason.clone()),
        _ => None,
    };
    (state.as_str(), reason)
}

fn agent_view(agent: &callfleet_core::store::AgentSnapshot, ring: Option<Ringing>) -> AgentView {
    let (state, pause_reason) = state_fields(&agent.state);
    AgentView {
        agent: Agent {
            id: agent.id.clone(),
            name: agent.name.clone(),
            tags: agent.tags.clone(),
            daily_cap: agent.daily_cap,
            enabled: agent.enabled,
        },
        state,
        pause_reason,
        device: agent.session.as_ref().map(|s| s.device.clone()),
        sales_today: agent.sales_today,
        calls_today: agent.calls_today,
        missed_today: agent.missed_today,
        ringing_since_ms: ring.as_ref().map(|r| r.since_ms),
        ringing_queue: ring.map(|r| r.queue),
        state_since_ms: agent.state_since_ms,
    }
}

/// `YYYY-MM-DD` of `unix_ms` in `time_zone`.
fn day_string(unix_ms: i64, time_zone: &jiff::tz::TimeZone) -> String {
    let timestamp =
        jiff::Timestamp::from_millisecond(unix_ms).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    timestamp.to_zoned(time_zone.clone()).date().to_string()
}

async fn read_view(store: &Store, time_zone: &jiff::tz::TimeZone) -> Result<View, ControlError> {
    let started = Instant::now();
    // The day comes from the database clock too; a read that straddles midnight reads the
    // new day's counters at the next refresh.
    // Read before the snapshot: a change that lands during the read moves the version
    // past this one, so the next check reads again.
    let version = store.directory_version().await?;
    let day = day_string(store.now_ms().await?, time_zone);
    let directory = store.directory_snapshot(&day).await?;
    let today = parse_day(&directory.day);
    // Building the index is CPU work (milliseconds for thousands of agents): off the
    // async workers that answer requests.
    let (directory, routing) = tokio::task::spawn_blocking(move || {
        let routing = build_routing(&directory, today);
        (directory, routing)
    })
    .await
    .map_err(|err| ControlError::Unavailable(format!("directory index build failed: {err}")))?;
    Ok(View {
        directory,
        routing,
        today,
        version,
        read_at: Instant::now(),
        started,
    })
}

fn parse_day(day: &str) -> Day {
    let mut parts = day.split('-').map(|p| p.parse::<u32>().unwrap_or(0));
    let (y, m, d) = (
        parts.next().unwrap_or(1970),
        parts.next().unwrap_or(1),
        parts.next().unwrap_or(1),
    );
    Day::from_ymd(y, m, d).unwrap_or_default()
}

/// The routing index of a directory read.
pub fn build_routing(directory: &DirectorySnapshot, today: Day) -> Snapshot {
    let mut builder = Snapshot::builder();
    for agent in &directory.agents {
        let state = match agent.state {
            AgentState::Available => routing::AgentState::Available,
            AgentState::Paused { .. } => routing::AgentState::Paused,
            AgentState::OnCall => routing::AgentState::OnCall,
            AgentState::WrapUp { until_ms } => routing::AgentState::WrapUp {
                until_ms: u64::try_from(until_ms).unwrap_or(0),
            },
        };
        builder.agent(routing::Agent {
            id: agent.id.clone(),
            enabled: agent.enabled,
            tags: agent.tags.iter().cloned().collect(),
            state,
            idle_since_ms: u64::try_from(agent.idle_since_ms).unwrap_or(0),
            daily_cap: agent.daily_cap,
            sales: routing::DailyCount {
                day: today,
                count: agent.sales_today,
            },
        });
        if let Some(session) = &agent.session {
            builder.device(session.device.clone(), session.endpoint.clone());
            builder.session(agent.id.clone(), session.device.clone());
        }
    }
    for queue in &directory.queues {
        builder.queue(queue.id.clone());
        for member in &queue.members {
            builder.member(queue.id.clone(), member.agent.clone(), member.priority);
        }
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_day_starts_at_midnight_in_the_configured_time_zone() {
        let berlin = jiff::tz::TimeZone::get("Europe/Berlin").expect("tzdb");
        let utc = jiff::tz::TimeZone::UTC;
        // 2026-11-23 23:30 UTC is already the 24th in Berlin (UTC+1 in winter).
        let late = 1_795_476_600_000;
        assert_eq!(day_string(late, &utc), "2026-11-23");
        assert_eq!(day_string(late, &berlin), "2026-11-24");
        // 2026-07-01 22:30 UTC is the 2nd in Berlin (UTC+2 in summer), the 1st in UTC.
        let summer = 1_782_945_000_000;
        assert_eq!(day_string(summer, &utc), "2026-07-01");
        assert_eq!(day_string(summer, &berlin), "2026-07-02");
        assert_eq!(
            parse_day("2026-11-24"),
            Day::from_ymd(2026, 11, 24).expect("date")
        );
    }
}
