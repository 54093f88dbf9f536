//! What the endpoint remembers, behind one short-held lock: the cache of answers, the
//! ordered write log, the pending queue and the circuit breaker. Nothing here awaits or
//! touches the disk, so the lock is never held across I/O.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use callfleet_core::realtime::{Operation, Request};
use tokio::time::Instant;

use super::journal::JournalWrite;
use super::{FAMILIES, Family, operation_name};

/// Most delivered writes kept per family for the overlay; beyond it the oldest go, and the
/// cached answers they were still needed for with them.
pub(super) const MAX_DELIVERED_KEPT: usize = 20_000;

/// Most writes waiting for the control plane; beyond it a write is refused (`-1`) rather
/// than memory grown without end (a registration refused is retried by the phone).
pub(super) const MAX_PENDING: usize = 200_000;

/// One answer of the control plane.
#[derive(Debug)]
pub(super) struct Entry {
    pub family: Family,
    /// The control plane's body, byte for byte.
    pub body: Bytes,
    /// When the answer came.
    pub fetched: Instant,
    /// Every write up to this one was delivered before the request was sent, so the
    /// answer has it; later writes are applied over it.
    pub base_seq: u64,
    /// The overlaid answer, for the family log generation it was computed at.
    pub memo: Option<(u64, Bytes)>,
}

/// One write Asterisk made, in the order it made them.
#[derive(Debug)]
pub(super) struct LoggedWrite {
    pub seq: u64,
    pub family: Family,
    /// The query as Asterisk sent it.
    pub query: String,
    /// The body as Asterisk sent it.
    pub body: Bytes,
    /// Both parsed, for the overlay.
    pub request: Request,
    /// The control plane answered `-1`: it is not part of the truth, and not replayed.
    pub rejected: AtomicBool,
}

impl LoggedWrite {
    pub(super) fn journal(&self) -> JournalWrite {
        JournalWrite {
            seq: self.seq,
            family: self.family.name().to_owned(),
            operation: operation_name(self.request.operation).to_owned(),
            query: self.query.clone(),
            body: String::from_utf8_lossy(&self.body).into_owned(),
        }
    }
}

/// The writes of one family, oldest first.
#[derive(Debug, Default)]
pub(super) struct FamilyLog {
    writes: VecDeque<Arc<LoggedWrite>>,
    /// Changes whenever the overlay of some entry of the family would (a write logged or
    /// rejected), so a memoised overlay knows it is still right.
    generation: u64,
}

impl FamilyLog {
    fn after(&self, seq: u64) -> Vec<Arc<LoggedWrite>> {
        let from = self.writes.partition_point(|write| write.seq <= seq);
        self.writes.range(from..).cloned().collect()
    }
}

/// After a failure the control plane is left alone for `retry_after`; then one request
/// (the probe) may try again while every other answers from the cache.
#[derive(Debug, Default)]
pub(super) struct Breaker {
    open_until: Option<Instant>,
}

impl Breaker {
    /// Whether requests must not go to the control plane now.
    pub(super) fn is_open(&self, now: Instant) -> bool {
        self.open_until.is_some_and(|until| now < until)
    }

    /// Whether this request may ask the control plane; the first one after an open window
    /// is the probe, and the window restarts with it.
    pub(super) fn pass(&mut self, now: Instant, retry_after: Duration) -> bool {
        match self.open_until {
            None => true,
            Some(until) if now >= until => {
                self.open_until = Some(now + retry_after);
                true
            }
            Some(_) => false,
        }
    }

    /// A request failed: leave the control plane alone for `retry_after`.
    pub(super) fn fail(&mut self, now: Instant, retry_after: Duration) {
        self.open_until = Some(now + retry_after);
    }

    /// A request succeeded: ask the control plane again for every request.
    pub(super) fn close(&mut self) {
        self.open_until = None;
    }

    /// When the control plane may be asked again, if it may not now.
    pub(super) fn reopens_at(&self) -> Option<Instant> {
        self.open_until
    }
}

/// An outage being lived through.
#[derive(Debug, Clone, Copy)]
pub(super) struct Outage {
    pub since: Instant,
    /// The delivered-writes counter when it began.
    pub delivered_before: u64,
}

/// What to answer, computed under the lock or after it.
#[derive(Debug)]
pub(super) enum Plan {
    /// This, as it is.
    Ready(Bytes),
    /// `base` with `writes` applied; `memo` says where to keep the result.
    Overlay {
        base: Bytes,
        writes: Vec<Arc<LoggedWrite>>,
        memo: Option<Memo>,
    },
}

/// Which entry an overlay belongs to, so a result is only kept for the entry it was
/// computed from.
#[derive(Debug, Clone, Copy)]
pub(super) struct Memo {
    fetched: Instant,
    generation: u64,
}

/// Everything behind the lock.
#[derive(Debug)]
pub(super) struct State {
    pub cache: HashMap<String, Entry>,
    families: [FamilyLog; FAMILIES.len()],
    /// Writes not delivered yet, by sequence number.
    pub pending: BTreeMap<u64, Arc<LoggedWrite>>,
    next_seq: u64,
    /// Every write up to this one was delivered (or rejected).
    pub delivered_seq: u64,
    /// `base_seq` of the reads waiting for the control plane (how many each), so the log
    /// keeps what their answers will need.
    in_flight: BTreeMap<u64, usize>,
    pub breaker: Breaker,
    pub outage: Option<Outage>,
    /// A 401/403 was logged and nothing succeeded since.
    pub refusal_logged: bool,
    /// The pending queue was found full and nothing was queued since.
    pub full_logged: bool,
}

impl State {
    /// An empty state whose writes are numbered after `delivered_through`.
    pub(super) fn new(delivered_through: u64) -> Self {
        Self {
            cache: HashMap::new(),
            families: Default::default(),
            pending: BTreeMap::new(),
            next_seq: delivered_through + 1,
            delivered_seq: delivered_through,
            in_flight: BTreeMap::new(),
            breaker: Breaker::default(),
            outage: None,
            refusal_logged: false,
            full_logged: false,
        }
    }

    /// Logs a write Asterisk made (numbering it) and returns it; `seq` is kept for a write a
    /// previous run left pending.
    pub(super) fn log(
        &mut self,
        family: Family,
        request: Request,
        query: String,
        body: Bytes,
        seq: Option<u64>,
    ) -> Arc<LoggedWrite> {
        let seq = seq.unwrap_or(self.next_seq);
        self.next_seq = self.next_seq.max(seq + 1);
        let write = Arc::new(LoggedWrite {
            seq,
            family,
            query,
            body,
            request,
            rejected: AtomicBool::new(false),
        });
        let log = &mut self.families[family.index()];
        log.writes.push_back(write.clone());
        log.generation += 1;
        write
    }

    /// Marks `write` delivered, and rejected if the control plane answered `-1`.
    pub(super) fn delivered(&mut self, write: &LoggedWrite, rejected: bool) {
        self.pending.remove(&write.seq);
        self.delivered_seq = self.delivered_seq.max(write.seq);
        if rejected {
            write.rejected.store(true, Ordering::Relaxed);
            self.families[write.family.index()].generation += 1;
        }
    }

    /// A read is about to be sent: what its answer will already contain.
    pub(super) fn read_sent(&mut self) -> u64 {
        let base = self.delivered_seq;
        *self.in_flight.entry(base).or_default() += 1;
        base
    }

    /// The read sent at `base` has its answer or failed.
    pub(super) fn read_done(&mut self, base: u64) {
        if let Some(count) = self.in_flight.get_mut(&base) {
            *count -= 1;
            if *count == 0 {
                self.in_flight.remove(&base);
            }
        }
    }

    /// Caches a fresh answer and plans the reply to the read it answers.
    pub(super) fn fresh(
        &mut self,
        key: String,
        family: Family,
        body: Bytes,
        base_seq: u64,
        overlay: bool,
    ) -> Plan {
        let entry = Entry {
            family,
            body,
            fetched: Instant::now(),
            base_seq,
            memo: None,
        };
        let plan = self.plan_entry(&entry, overlay);
        self.cache.insert(key, entry);
        plan
    }

    /// Plans the reply from the cached entry under `key` if it is at most `stale_max` old.
    pub(super) fn cached(
        &self,
        key: &str,
        now: Instant,
        stale_max: Duration,
        overlay: bool,
    ) -> Option<Plan> {
        let entry = self.cache.get(key)?;
        if now.saturating_duration_since(entry.fetched) > stale_max {
            return None;
        }
        Some(self.plan_entry(entry, overlay))
    }

    fn plan_entry(&self, entry: &Entry, overlay: bool) -> Plan {
        if !overlay {
            return Plan::Ready(entry.body.clone());
        }
        let log = &self.families[entry.family.index()];
        if let Some((generation, body)) = &entry.memo
            && *generation == log.generation
        {
            return Plan::Ready(body.clone());
        }
        let writes = log.after(entry.base_seq);
        if writes.is_empty() {
            return Plan::Ready(entry.body.clone());
        }
        Plan::Overlay {
            base: entry.body.clone(),
            writes,
            memo: Some(Memo {
                fetched: entry.fetched,
                generation: log.generation,
            }),
        }
    }

    /// Plans the reply when nothing usable is cached: `empty`, with the family's logged
    /// writes over it when the read is one the overlay answers.
    pub(super) fn missed(&self, family: Family, empty: Bytes, overlay: bool) -> Plan {
        let log = &self.families[family.index()];
        if !overlay || log.writes.is_empty() {
            return Plan::Ready(empty);
        }
        Plan::Overlay {
            base: empty,
            writes: log.writes.iter().cloned().collect(),
            memo: None,
        }
    }

    /// Keeps an overlaid answer for the entry it was computed from.
    pub(super) fn remember(&mut self, key: &str, memo: Memo, body: Bytes) {
        if let Some(entry) = self.cache.get_mut(key)
            && entry.fetched == memo.fetched
        {
            entry.memo = Some((memo.generation, body));
        }
    }

    /// Drops answers older than `stale_max` and the delivered writes no answer needs any
    /// more; returns how many writes went over [`MAX_DELIVERED_KEPT`] (their entries too).
    pub(super) fn prune(&mut self, now: Instant, stale_max: Duration) -> usize {
        self.cache
            .retain(|_, entry| now.saturating_duration_since(entry.fetched) <= stale_max);
        let in_flight = self.in_flight.keys().next().copied().unwrap_or(u64::MAX);
        let mut needed = [in_flight; FAMILIES.len()];
        for entry in self.cache.values() {
            let family = entry.family.index();
            needed[family] = needed[family].min(entry.base_seq);
        }
        let mut over = 0;
        for (index, log) in self.families.iter_mut().enumerate() {
            let delivered = self.delivered_seq;
            while log
                .writes
                .front()
                .is_some_and(|write| write.seq <= delivered && write.seq <= needed[index])
            {
                log.writes.pop_front();
            }
            // Delivered writes come first: the rest are pending or being sent.
            let kept = log.writes.partition_point(|write| write.seq <= delivered);
            let excess = kept.saturating_sub(MAX_DELIVERED_KEPT);
            let dropped_through = excess
                .checked_sub(1)
                .and_then(|last| log.writes.get(last))
                .map(|write| write.seq);
            log.writes.drain(..excess);
            over += excess;
            if let Some(seq) = dropped_through {
                // Their overlay would miss the dropped writes: better asked afresh.
                self.cache
                    .retain(|_, entry| entry.family.index() != index || entry.base_seq >= seq);
            }
        }
        over
    }

    /// Writes logged and not delivered yet, as the pending file keeps them.
    pub(super) fn pending_journal(&self) -> Vec<JournalWrite> {
        self.pending.values().map(|write| write.journal()).collect()
    }

    /// Writes of `family` logged (delivered or not), for tests.
    #[cfg(test)]
    pub(super) fn logged(&self, family: Family) -> usize {
        self.families[family.index()].writes.len()
    }
}

/// The request is a read the overlay answers.
pub(super) fn overlaid(operation: Operation) -> bool {
    matches!(operation, Operation::Single | Operation::Multi)
}
