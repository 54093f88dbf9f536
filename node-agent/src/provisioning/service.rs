//! The endpoint's behaviour: reads forwarded and cached, answered from the cache while the
//! control plane cannot answer; writes forwarded in order or queued and delivered later.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::http::Method;
use bytes::Bytes;
use callfleet_core::realtime::{self, Operation, Request};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep, sleep_until, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::journal::Journal;
use super::state::{self, LoggedWrite, Outage, Plan, State};
use super::upstream::{Failure, Upstream};
use super::{Family, Stats, operation_name, overlay};

/// First pause after a failed delivery; doubles up to `retry_after`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// How often old answers and delivered writes no answer needs are dropped.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(1);

/// The form body of a read of a whole family, as sorcery itself asks for all objects.
const WHOLE_FAMILY: &[u8] = b"id%20LIKE=%25";

/// The timings of [`ProvisioningConfig`](callfleet_core::config::ProvisioningConfig).
#[derive(Debug, Clone, Copy)]
pub(super) struct Settings {
    pub deadline: Duration,
    pub stale_max: Duration,
    pub retry_after: Duration,
    /// How often every family is read whole (`provisioning.prefetch`). A node answers from
    /// its cache only what it asked before an outage; without the whole families a phone
    /// that never registered here, or a device never dialled here, would be unknown on this
    /// node for the whole outage.
    pub prefetch: Duration,
}

/// Monotonic counters, read without the lock.
#[derive(Debug, Default)]
pub(super) struct Counters {
    upstream: AtomicU64,
    stale: AtomicU64,
    misses: AtomicU64,
    delivered: AtomicU64,
    rejected: AtomicU64,
    failures: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Everything the handlers and the background tasks share.
#[derive(Debug)]
pub(super) struct Shared {
    pub settings: Settings,
    pub state: Mutex<State>,
    pub counters: Counters,
    /// Held by whoever sends a write to the control plane, so writes arrive in order.
    pub lane: tokio::sync::Mutex<()>,
    /// Wakes the delivery task: something was queued, or the control plane is back.
    pub wake: Notify,
    pub upstream: Upstream,
    pub journal: Option<Arc<Mutex<Journal>>>,
    /// Shown in logs about the pending file.
    pub journal_path: String,
    /// Reads see writes; off only in the test that shows why it is on.
    pub overlay: bool,
    /// Write handlers run as tasks of their own: a write Asterisk stops waiting for still
    /// ends up delivered or queued, never lost halfway.
    pub tasks: TaskTracker,
}

/// Locks a mutex whose holder may have panicked: the state stays usable (every change
/// under it is a few assignments that leave it consistent).
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The key of an answer in the cache: what was asked, exactly.
pub(super) fn cache_key(family: Family, operation: Operation, query: &str, body: &[u8]) -> String {
    format!(
        "{}/{}?{query}\n{}",
        family.name(),
        operation_name(operation),
        String::from_utf8_lossy(body)
    )
}

/// What Asterisk hears when nothing is known: no row, and `0` (every column there) for
/// `require`.
fn empty_answer(operation: Operation) -> Bytes {
    match operation {
        Operation::Require => Bytes::from(realtime::print_count(Some(0))),
        _ => Bytes::new(),
    }
}

/// A write the control plane could not make; sending it again cannot help.
fn is_rejection(answer: &[u8]) -> bool {
    answer.trim_ascii() == b"-1"
}

/// The read in flight at `base` keeps what its answer will need in the log until it is
/// done, even when Asterisk hangs up and the handler is dropped.
struct InFlight<'a> {
    shared: &'a Shared,
    base: Option<u64>,
}

impl InFlight<'_> {
    fn done(mut self, state: &mut State) {
        if let Some(base) = self.base.take() {
            state.read_done(base);
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(base) = self.base.take() {
            lock(&self.shared.state).read_done(base);
        }
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The counters and gauges now.
    pub(super) fn stats(&self) -> Stats {
        let (pending, cached) = {
            let state = self.state();
            (state.pending.len() as u64, state.cache.len() as u64)
        };
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Stats {
            upstream: read(&self.counters.upstream),
            stale: read(&self.counters.stale),
            misses: read(&self.counters.misses),
            pending,
            delivered: read(&self.counters.delivered),
            rejected: read(&self.counters.rejected),
            failures: read(&self.counters.failures),
            cached,
        }
    }

    /// Answers a read: from the control plane when it may be asked and answers in time,
    /// from the cache otherwise.
    pub(super) async fn read(
        &self,
        family: Family,
        method: Method,
        request: Request,
        query: String,
        body: Bytes,
    ) -> Bytes {
        let deadline_at = Instant::now() + self.settings.deadline;
        let key = cache_key(family, request.operation, &query, &body);
        let overlay = self.overlay && state::overlaid(request.operation);
        let in_flight = {
            let mut state = self.state();
            let pass = state
                .breaker
                .pass(Instant::now(), self.settings.retry_after);
            pass.then(|| InFlight {
                shared: self,
                base: Some(state.read_sent()),
            })
        };
        if let Some(in_flight) = in_flight {
            let result = self
                .upstream
                .send(method, family, request.operation, &query, body, deadline_at)
                .await;
            let plan = {
                let mut state = self.state();
                let base = in_flight.base.unwrap_or_default();
                in_flight.done(&mut state);
                match result {
                    Ok(answer) => {
                        bump(&self.counters.upstream);
                        self.succeeded(&mut state);
                        Some(state.fresh(key.clone(), family, answer, base, overlay))
                    }
                    Err(failure) => {
                        self.failed(&mut state, &failure);
                        None
                    }
                }
            };
            if let Some(plan) = plan {
                return self.render(&key, plan, &request);
            }
        }
        let plan = {
            let state = self.state();
            match state.cached(&key, Instant::now(), self.settings.stale_max, overlay) {
                Some(plan) => {
                    bump(&self.counters.stale);
                    plan
                }
                None => {
                    // Not asked before: answered from the family read whole, if it is.
                    let whole = cache_key(family, Operation::Multi, "", WHOLE_FAMILY);
                    let from_whole = realtime::parse_request("whole/multi", WHOLE_FAMILY)
                        .ok()
                        .zip(state.cached(
                            &whole,
                            Instant::now(),
                            self.settings.stale_max,
                            overlay,
                        ));
                    match from_whole {
                        Some((whole_request, plan)) => {
                            bump(&self.counters.stale);
                            drop(state);
                            let rows = self.render(&whole, plan, &whole_request);
                            return std::str::from_utf8(&rows)
                                .ok()
                                .and_then(|rows| overlay::narrowed(rows, &request))
                                .map_or_else(|| empty_answer(request.operation), Bytes::from);
                        }
                        None => {
                            bump(&self.counters.misses);
                            state.missed(family, empty_answer(request.operation), overlay)
                        }
                    }
                }
            }
        };
        self.render(&key, plan, &request)
    }

    /// Reads every family whole now and every `prefetch`, through [`Shared::read`] (so the
    /// breaker and the cache apply as to Asterisk's own reads).
    pub(super) async fn warm(self: Arc<Self>, shutdown: CancellationToken) {
        if self.settings.prefetch.is_zero() {
            return;
        }
        loop {
            for family in super::FAMILIES {
                let Ok(request) =
                    realtime::parse_request(&format!("{}/multi", family.name()), WHOLE_FAMILY)
                else {
                    continue;
                };
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = self.read(family, Method::POST, request, String::new(), Bytes::from_static(WHOLE_FAMILY)) => {}
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = sleep(self.settings.prefetch) => {}
            }
        }
    }

    /// The bytes of a plan; an overlay is computed here, outside the lock.
    fn render(&self, key: &str, plan: Plan, request: &Request) -> Bytes {
        match plan {
            Plan::Ready(body) => body,
            Plan::Overlay { base, writes, memo } => {
                let replayed = writes
                    .iter()
                    .filter(|write| !write.rejected.load(Ordering::Relaxed))
                    .map(|write| &write.request);
                let answer = std::str::from_utf8(&base)
                    .ok()
                    .and_then(|text| overlay::answer(text, replayed, request))
                    .map_or(base, Bytes::from);
                if let Some(memo) = memo {
                    self.state().remember(key, memo, answer.clone());
                }
                answer
            }
        }
    }

    /// Answers a write: the control plane's answer when it takes the write in time and no
    /// earlier write waits, `1` once it is queued otherwise.
    pub(super) async fn write(
        self: Arc<Self>,
        family: Family,
        request: Request,
        query: String,
        body: Bytes,
    ) -> Bytes {
        let deadline_at = Instant::now() + self.settings.deadline;
        let behind = {
            let state = self.state();
            !state.pending.is_empty() || state.breaker.is_open(Instant::now())
        };
        // Behind earlier writes or in an outage: queued at once. Otherwise wait for the
        // write in flight (if any), but never past the deadline.
        let lane = if behind {
            None
        } else {
            timeout_at(deadline_at, self.lane.lock()).await.ok()
        };
        let write = {
            let mut state = self.state();
            let forward = lane.is_some()
                && state.pending.is_empty()
                && state
                    .breaker
                    .pass(Instant::now(), self.settings.retry_after);
            if !forward && state.pending.len() >= state::MAX_PENDING {
                if !state.full_logged {
                    state.full_logged = true;
                    tracing::warn!(
                        pending = state.pending.len(),
                        "pending writes at their cap; refusing writes until the control plane takes some"
                    );
                }
                return Bytes::from(realtime::print_count(None));
            }
            state.full_logged = false;
            let write = state.log(family, request, query, body, None);
            if forward {
                Ok(write)
            } else {
                state.pending.insert(write.seq, write.clone());
                Err(write)
            }
        };
        let write = match write {
            Ok(write) => write,
            Err(queued) => {
                drop(lane);
                return self.queued(&queued, deadline_at).await;
            }
        };
        let result = self
            .upstream
            .send(
                Method::POST,
                family,
                write.request.operation,
                &write.query,
                write.body.clone(),
                deadline_at,
            )
            .await;
        let answer = {
            let mut state = self.state();
            match result {
                Ok(answer) => {
                    bump(&self.counters.upstream);
                    let rejected = is_rejection(&answer);
                    if rejected {
                        tracing::warn!(
                            family = family.name(),
                            operation = operation_name(write.request.operation),
                            "the control plane could not make a write (-1); asterisk is told so"
                        );
                    }
                    state.delivered(&write, rejected);
                    self.succeeded(&mut state);
                    Some(answer)
                }
                Err(failure) => {
                    self.failed(&mut state, &failure);
                    // Still holding the lane: nothing can be delivered before it.
                    state.pending.insert(write.seq, write.clone());
                    None
                }
            }
        };
        drop(lane);
        match answer {
            Some(answer) => answer,
            None => self.queued(&write, deadline_at).await,
        }
    }

    /// A write was queued: wake the delivery, keep it on disk, tell Asterisk it is done.
    async fn queued(&self, write: &LoggedWrite, deadline_at: Instant) -> Bytes {
        self.wake.notify_one();
        if let Some(journal) = &self.journal {
            let (journal, line) = (journal.clone(), write.journal());
            let append = tokio::task::spawn_blocking(move || lock(&journal).append(&line));
            // A write whose forward took the whole deadline is answered at once; its line
            // is then being written, milliseconds behind.
            match timeout_at(deadline_at, append).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(err))) => tracing::error!(
                    file = %self.journal_path,
                    error = %err,
                    "cannot keep a pending write on disk; it is kept in memory only"
                ),
                Ok(Err(err)) => tracing::error!(error = %err, "pending-file append failed"),
                Err(_) => tracing::debug!("pending write still being written at the deadline"),
            }
        }
        Bytes::from(realtime::print_count(Some(1)))
    }

    /// The control plane answered: ask it again for every request; the outage ends once
    /// nothing is pending any more.
    fn succeeded(&self, state: &mut State) {
        state.breaker.close();
        state.refusal_logged = false;
        if !state.pending.is_empty() {
            self.wake.notify_one();
            return;
        }
        if let Some(outage) = state.outage.take() {
            let delivered =
                self.counters.delivered.load(Ordering::Relaxed) - outage.delivered_before;
            let after = Duration::from_millis(
                u64::try_from(outage.since.elapsed().as_millis()).unwrap_or(u64::MAX),
            );
            tracing::info!(
                ?after,
                delivered,
                "control plane back after {after:?}; {delivered} pending writes delivered"
            );
        }
    }

    /// The control plane did not answer: leave it alone for `retry_after`; log the outage
    /// (and a refused token) once.
    fn failed(&self, state: &mut State, failure: &Failure) {
        bump(&self.counters.failures);
        let now = Instant::now();
        state.breaker.fail(now, self.settings.retry_after);
        if let Failure::Refused(status) = failure
            && !state.refusal_logged
        {
            state.refusal_logged = true;
            tracing::error!(
                %status,
                "the control plane refuses provisioning.token; give provisioning.token a control-plane token with role \"node\""
            );
        }
        if state.outage.is_none() {
            state.outage = Some(Outage {
                since: now,
                delivered_before: self.counters.delivered.load(Ordering::Relaxed),
            });
            let cached = state.cache.len();
            tracing::warn!(
                reason = %failure,
                cached,
                "control plane unreachable ({failure}); answering from cache ({cached} entries), writes kept"
            );
        } else {
            tracing::debug!(reason = %failure, "control plane still unreachable");
        }
    }

    /// Delivers queued writes in order, one at a time, whenever the control plane may be
    /// asked; runs until `shutdown`.
    pub(super) async fn deliver(self: Arc<Self>, shutdown: CancellationToken) {
        let first_backoff = FIRST_BACKOFF.min(self.settings.retry_after);
        let mut backoff = first_backoff;
        loop {
            let reopens = {
                let state = self.state();
                if state.pending.is_empty() {
                    None
                } else {
                    Some(state.breaker.reopens_at().filter(|at| *at > Instant::now()))
                }
            };
            match reopens {
                None => {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = self.wake.notified() => continue,
                    }
                }
                Some(Some(at)) => {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = sleep_until(at) => {}
                        () = self.wake.notified() => {}
                    }
                    continue;
                }
                Some(None) => {}
            }
            let lane = tokio::select! {
                () = shutdown.cancelled() => return,
                lane = self.lane.lock() => lane,
            };
            let head = {
                let mut state = self.state();
                let head = state
                    .pending
                    .first_key_value()
                    .map(|(_, head)| head.clone());
                match head {
                    Some(head)
                        if state
                            .breaker
                            .pass(Instant::now(), self.settings.retry_after) =>
                    {
                        head
                    }
                    _ => continue,
                }
            };
            let send = self.upstream.send(
                Method::POST,
                head.family,
                head.request.operation,
                &head.query,
                head.body.clone(),
                Instant::now() + self.settings.deadline,
            );
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                result = send => result,
            };
            let delivered = {
                let mut state = self.state();
                match result {
                    Ok(answer) => {
                        let rejected = is_rejection(&answer);
                        if rejected {
                            bump(&self.counters.rejected);
                            tracing::warn!(
                                family = head.family.name(),
                                operation = operation_name(head.request.operation),
                                seq = head.seq,
                                "the control plane could not make a pending write (-1); dropped, retrying cannot help"
                            );
                        } else {
                            bump(&self.counters.delivered);
                        }
                        state.delivered(&head, rejected);
                        let drained = state.pending.is_empty();
                        let quiet = state.outage.is_none();
                        self.succeeded(&mut state);
                        Some((drained, quiet))
                    }
                    Err(failure) => {
                        self.failed(&mut state, &failure);
                        None
                    }
                }
            };
            drop(lane);
            match delivered {
                Some((drained, quiet)) => {
                    backoff = first_backoff;
                    if drained && quiet {
                        tracing::info!(
                            delivered = self.counters.delivered.load(Ordering::Relaxed),
                            "pending writes delivered"
                        );
                    }
                    self.journal_delivered(head.seq, drained).await;
                }
                None => {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.settings.retry_after);
                }
            }
        }
    }

    /// Notes a delivery in the pending file; rewrites it once the queue is drained.
    async fn journal_delivered(self: &Arc<Self>, seq: u64, drained: bool) {
        let Some(journal) = self.journal.clone() else {
            return;
        };
        let shared = self.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut journal = lock(&journal);
            if !drained {
                return journal.delivered(seq);
            }
            // Taken under the file's lock: a write queued after this snapshot is appended
            // after the rewrite, never erased by it.
            let (through, pending) = {
                let state = shared.state();
                (state.delivered_seq, state.pending_journal())
            };
            journal.rewrite(through, &pending)
        })
        .await;
        if let Ok(Err(err)) = done {
            tracing::warn!(
                file = %self.journal_path,
                error = %err,
                "cannot note a delivery in the pending file; it may be delivered again after a restart"
            );
        }
    }

    /// Drops old answers and the writes no answer needs, every [`MAINTENANCE_EVERY`].
    pub(super) async fn maintain(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = sleep(MAINTENANCE_EVERY) => {}
            }
            let over = self.state().prune(Instant::now(), self.settings.stale_max);
            if over > 0 {
                tracing::warn!(
                    dropped = over,
                    kept = state::MAX_DELIVERED_KEPT,
                    "write log over its cap; the oldest delivered writes and the cached answers that needed them were dropped"
                );
            }
        }
    }
}
