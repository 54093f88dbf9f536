//! INVITE server transactions (RFC 3261 §17.2.1), kept as small as they can be.
//!
//! A transaction is the final response we sent and where it went, keyed by a hash of the
//! request's transaction identity ([`Id`]). Over UDP the response is resent on Timer G
//! (500 ms doubling to 4 s) until the ACK arrives or Timer H (32 s) ends it; a
//! retransmitted INVITE gets the same bytes again. Once ACKed, the transaction is
//! *confirmed* for Timer I (T4 = 5 s over UDP): only its key is kept, so a late
//! retransmission of the INVITE or the ACK is absorbed instead of becoming a second call.
//!
//! Timers live in one FIFO per interval: every entry of a FIFO was pushed with the same
//! delay, so deadlines come out in order without a heap, and an entry whose transaction is
//! gone or has moved on is skipped when it comes up.
//!
//! The table is bounded (`balancer.max_transactions`): a flood of INVITEs that are never
//! ACKed (spoofed sources) would otherwise grow it by the whole flood rate times 32 s and
//! turn it into retransmissions towards whoever the sources claim to be. At the bound
//! [`Transactions::invite`] creates nothing and says so ([`Room::Full`]); the engine answers
//! 503 without state. Confirmed keys do not count: they cost a few bytes and leave after
//! Timer I whatever the rate. Retransmissions are collected under a shard's lock and sent
//! after it is released, so a slow `sendto` never holds up the workers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// RFC 3261 T1.
pub const T1: Duration = Duration::from_millis(500);
/// RFC 3261 Timer H: how long we wait for an ACK.
pub const TIMER_H: Duration = Duration::from_secs(32);
/// RFC 3261 Timer I over UDP (T4): how long an ACKed transaction absorbs retransmissions.
pub const TIMER_I: Duration = Duration::from_secs(5);
/// Retransmission intervals: T1, 2·T1, 4·T1, then T2 = 4 s.
const INTERVALS: [Duration; 4] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];
const SHARDS: usize = 64;
/// RFC 3261 §8.1.1.7: a branch that starts with this was made by an RFC 3261 client and
/// is unique on its own.
const MAGIC_COOKIE: &[u8] = b"z9hG4bK";

/// What identifies a request's transaction (RFC 3261 §17.2.3), borrowed from it.
///
/// A branch with the magic cookie is unique with the sent-by. Without it (RFC 2543 clients
/// may send the same branch, or none, for every request of a call) Call-ID, From-tag and
/// the CSeq number are part of the identity too, so the next INVITE of a call is not taken
/// for a retransmission of the previous one. CANCEL and the ACK of a non-2xx response carry
/// the INVITE's branch and CSeq number, so they find its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Id<'a> {
    /// The top Via's branch, if any.
    pub branch: Option<&'a [u8]>,
    /// The top Via's sent-by as written.
    pub sent_by: &'a [u8],
    /// Call-ID.
    pub call_id: &'a [u8],
    /// The From-tag.
    pub from_tag: Option<&'a [u8]>,
    /// The CSeq number.
    pub cseq: u32,
}

impl Id<'_> {
    fn feed(&self, hasher: &mut impl Hasher) {
        match self.branch {
            Some(branch) if branch.starts_with(MAGIC_COOKIE) => {
                (branch, self.sent_by).hash(hasher);
            }
            branch => {
                (branch, self.sent_by, self.call_id, self.from_tag, self.cseq).hash(hasher);
            }
        }
    }

    /// A hash of the identity that is the same in every run of this build: what a
    /// stateless proxy derives its own branch from (RFC 3261 §16.11), so a retransmission,
    /// the CANCEL and the ACK of an INVITE get the INVITE's branch even across a restart.
    pub fn stable_hash(&self) -> u64 {
        let mut hasher = std::hash::DefaultHasher::new();
        self.feed(&mut hasher);
        hasher.finish()
    }
}

/// What a transaction did with its INVITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// We answered with a final response (302, 503, …); `retransmit` over UDP.
    Answered {
        /// Resend the response on Timer G (unreliable transport).
        retransmit: bool,
    },
    /// We forwarded the INVITE to the local PBX; retransmissions are forwarded again.
    Proxied,
}

/// One live transaction.
#[derive(Debug)]
pub struct Transaction {
    /// The response bytes (for `Answered`) or nothing (for `Proxied`); shared so Timer G
    /// can send them outside the shard's lock.
    pub response: Arc<[u8]>,
    /// Where responses go.
    pub destination: SocketAddr,
    /// Answered or proxied.
    pub kind: Kind,
    /// Index into the retransmission intervals of the pending timer.
    level: u8,
    /// Timer H.
    expires: Instant,
}

impl Transaction {
    /// A transaction for `response` sent to `destination` at `now`.
    pub fn new(response: Arc<[u8]>, destination: SocketAddr, kind: Kind, now: Instant) -> Self {
        Self {
            response,
            destination,
            kind,
            level: 0,
            expires: now + TIMER_H,
        }
    }
}

/// What a request found in the table.
#[derive(Debug)]
pub enum Existing<'t> {
    /// A live transaction (completed or proxied).
    Live(&'t Transaction),
    /// An ACKed transaction within Timer I: absorb the request.
    Confirmed,
}

/// Whether a new transaction may be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Below the bound.
    Available,
    /// The table holds `max_transactions`: create nothing.
    Full,
}

/// What an ACK (for a non-2xx final response) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// It ended (or had ended) one of our answered transactions: absorb it.
    Ours,
    /// It belongs to an INVITE we proxied: forward it.
    Proxied,
    /// No transaction of ours.
    Unknown,
}

#[derive(Debug, Default)]
struct Shard {
    live: HashMap<u64, Transaction, BuildHasherDefault<PreHashed>>,
    retransmit: [VecDeque<(Instant, u64)>; 4],
    expiry: VecDeque<(Instant, u64)>,
    /// ACKed transactions within Timer I (each has one entry in `confirmed_expiry`).
    confirmed: HashSet<u64, BuildHasherDefault<PreHashed>>,
    confirmed_expiry: VecDeque<(Instant, u64)>,
}

/// All live transactions, sharded so workers rarely contend.
#[derive(Debug)]
pub struct Transactions {
    shards: Box<[Mutex<Shard>]>,
    keys: std::hash::RandomState,
    /// Live transactions in all shards (confirmed keys not counted).
    live: AtomicUsize,
    max: usize,
}

impl Default for Transactions {
    fn default() -> Self {
        Self::new(usize::MAX)
    }
}

impl Transactions {
    /// An empty table that holds at most `max` live transactions.
    pub fn new(max: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            keys: std::hash::RandomState::new(),
            live: AtomicUsize::new(0),
            max,
        }
    }

    /// The table key of a transaction: a hash of its [`Id`] keyed at random per process,
    /// so nobody can choose identities that pile into one slot of the table.
    pub fn key(&self, id: &Id<'_>) -> u64 {
        let mut hasher = self.keys.build_hasher();
        id.feed(&mut hasher);
        hasher.finish()
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[(key as usize) % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `existing` on what the table holds for `key`, or `create` when it holds
    /// nothing (and keeps what `create` returns; at the bound `create` is told so and
    /// nothing is kept), under the shard's lock so a retransmission racing its original on
    /// another worker is still seen as one.
    pub fn invite<R>(
        &self,
        key: u64,
        now: Instant,
        existing: impl FnOnce(Existing<'_>) -> R,
        create: impl FnOnce(Room) -> (Option<Transaction>, R),
    ) -> R {
        let mut shard = self.shard(key);
        if let Some(transaction) = shard.live.get(&key) {
            return existing(Existing::Live(transaction));
        }
        if shard.confirmed.contains(&key) {
            return existing(Existing::Confirmed);
        }
        // Reserve a place first, so concurrent workers never take the table past `max`.
        if self.live.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.live.fetch_sub(1, Ordering::Relaxed);
            return create(Room::Full).1;
        }
        let (transaction, result) = create(Room::Available);
        match transaction {
            Some(transaction) => {
                if transaction.kind == (Kind::Answered { retransmit: true }) {
                    shard.retransmit[0].push_back((now + INTERVALS[0], key));
                }
                shard.expiry.push_back((transaction.expires, key));
                shard.live.insert(key, transaction);
            }
            None => {
                self.live.fetch_sub(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// An ACK for a non-2xx final response at `now`. Ends an answered transaction; over
    /// an unreliable transport (`timer_i`) its key stays confirmed for Timer I, absorbing
    /// retransmissions of the INVITE and the ACK.
    pub fn ack(&self, key: u64, now: Instant, timer_i: bool) -> Acked {
        let mut shard = self.shard(key);
        let shard = &mut *shard;
        match shard.live.get(&key).map(|t| t.kind) {
            Some(Kind::Answered { .. }) => {
                shard.live.remove(&key);
                self.live.fetch_sub(1, Ordering::Relaxed);
                if timer_i {
                    shard.confirmed.insert(key);
                    shard.confirmed_expiry.push_back((now + TIMER_I, key));
                }
                Acked::Ours
            }
            Some(Kind::Proxied) => Acked::Proxied,
            None if shard.confirmed.contains(&key) => Acked::Ours,
            None => Acked::Unknown,
        }
    }

    /// The kind of the live transaction `key` (for CANCEL).
    pub fn kind(&self, key: u64) -> Option<Kind> {
        self.shard(key).live.get(&key).map(|t| t.kind)
    }

    /// Live transactions (confirmed keys not counted).
    pub fn len(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys confirmed by an ACK and still within Timer I.
    pub fn confirmed(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .confirmed
                    .len()
            })
            .sum()
    }

    /// Fires due timers: resends responses through `send` (after each shard's lock is
    /// released) and forgets transactions past Timer H and keys past Timer I. Returns the
    /// number of responses resent.
    pub fn tick(&self, now: Instant, mut send: impl FnMut(&[u8], SocketAddr)) -> usize {
        let mut resent = 0;
        let mut due_now: Vec<(Arc<[u8]>, SocketAddr)> = Vec::new();
        for shard in self.shards.iter() {
            {
                let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
                self.fire(&mut shard, now, &mut due_now);
            }
            resent += due_now.len();
            for (bytes, to) in due_now.drain(..) {
                send(&bytes, to);
            }
        }
        resent
    }

    fn fire(&self, shard: &mut Shard, now: Instant, out: &mut Vec<(Arc<[u8]>, SocketAddr)>) {
        for level in 0..INTERVALS.len() {
            while let Some(&(due, key)) = shard.retransmit[level].front() {
                if due > now {
                    break;
                }
                shard.retransmit[level].pop_front();
                let Some(transaction) = shard.live.get_mut(&key) else {
                    continue;
                };
                if usize::from(transaction.level) != level || transaction.expires <= now {
                    continue;
                }
                out.push((transaction.response.clone(), transaction.destination));
                let next = (level + 1).min(INTERVALS.len() - 1);
                transaction.level = next as u8;
                shard.retransmit[next].push_back((now + INTERVALS[next], key));
            }
        }
        while let Some(&(due, key)) = shard.expiry.front() {
            if due > now {
                break;
            }
            shard.expiry.pop_front();
            if shard.live.get(&key).is_some_and(|t| t.expires <= now) {
                shard.live.remove(&key);
                self.live.fetch_sub(1, Ordering::Relaxed);
            }
        }
        while let Some(&(due, key)) = shard.confirmed_expiry.front() {
            if due > now {
                break;
            }
            shard.confirmed_expiry.pop_front();
            shard.confirmed.remove(&key);
        }
    }
}

/// Keys are already uniform hashes: use them as they are.
#[derive(Debug, Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "192.0.2.1:5060".parse().expect("addr")
    }

    fn id(branch: Option<&'static [u8]>, cseq: u32) -> Id<'static> {
        Id {
            branch,
            sent_by: b"192.0.2.1:5060",
            call_id: b"call-1@192.0.2.1",
            from_tag: Some(b"f1"),
            cseq,
        }
    }

    fn key(transactions: &Transactions, branch: &'static [u8]) -> u64 {
        transactions.key(&id(Some(branch), 1))
    }

    /// Creates an answered (302) transaction for `key`; returns whether there was room.
    fn answered(transactions: &Transactions, key: u64, now: Instant) -> Room {
        transactions.invite(
            key,
            now,
            |_| panic!("new transaction expected"),
            |room| {
                let t = Transaction::new(
                    Arc::from(&b"SIP/2.0 302"[..]),
                    addr(),
                    Kind::Answered { retransmit: true },
                    now,
                );
                ((room == Room::Available).then_some(t), room)
            },
        )
    }

    /// What `key` finds: `Some(true)` live, `Some(false)` confirmed, `None` nothing.
    fn seen(transactions: &Transactions, key: u64, now: Instant) -> Option<bool> {
        transactions.invite(
            key,
            now,
            |existing| Some(matches!(existing, Existing::Live(_))),
            |_| (None, None),
        )
    }

    #[test]
    fn retransmissions_follow_timer_g_until_timer_h() {
        let transactions = Transactions::default();
        let start = Instant::now();
        let key = key(&transactions, b"z9hG4bK1");
        answered(&transactions, key, start);
        let mut sent_at = Vec::new();
        let mut t = start;
        while t < start + Duration::from_secs(40) {
            t += Duration::from_millis(10);
            let n = transactions.tick(t, |bytes, to| {
                assert_eq!(bytes, b"SIP/2.0 302");
                assert_eq!(to, addr());
            });
            for _ in 0..n {
                sent_at.push((t - start).as_millis());
            }
        }
        // 0.5, 1.5, 3.5, 7.5, then every 4 s until 32 s.
        assert_eq!(
            sent_at,
            [
                500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
            ]
        );
        assert!(transactions.is_empty(), "Timer H removed it");
    }

    #[test]
    fn ack_ends_retransmissions_and_a_retransmitted_invite_sees_the_original() {
        let transactions = Transactions::default();
        let start = Instant::now();
        let key = key(&transactions, b"z9hG4bK2");
        answered(&transactions, key, start);
        let seen = transactions.invite(
            key,
            start,
            |existing| match existing {
                Existing::Live(t) => t.response.to_vec(),
                Existing::Confirmed => panic!("not ACKed yet"),
            },
            |_| panic!("must match the live transaction"),
        );
        assert_eq!(seen, b"SIP/2.0 302");
        assert_eq!(transactions.ack(key, start, true), Acked::Ours);
        assert_eq!(
            transactions.ack(key, start, true),
            Acked::Ours,
            "a retransmitted ACK is absorbed within Timer I"
        );
        assert_eq!(
            transactions.tick(start + Duration::from_secs(4), |_, _| {}),
            0
        );
        assert!(transactions.is_empty());
    }

    #[test]
    fn an_invite_retransmitted_after_its_ack_is_absorbed_until_timer_i() {
        let transactions = Transactions::default();
        let start = Instant::now();
        let key = key(&transactions, b"z9hG4bK3");
        answered(&transactions, key, start);
        let acked = start + Duration::from_millis(20);
        assert_eq!(transactions.ack(key, acked, true), Acked::Ours);
        assert_eq!(transactions.confirmed(), 1);
        let just_before = acked + TIMER_I - Duration::from_millis(10);
        transactions.tick(just_before, |_, _| {});
        assert_eq!(
            seen(&transactions, key, just_before),
            Some(false),
            "confirmed: the INVITE is absorbed, not a second call"
        );
        let after = acked + TIMER_I;
        transactions.tick(after, |_, _| {});
        assert_eq!(transactions.confirmed(), 0);
        assert_eq!(seen(&transactions, key, after), None, "Timer I is over");
        assert_eq!(transactions.ack(key, after, true), Acked::Unknown);

        // Over TCP (no Timer I) nothing is kept after the ACK.
        let tcp = transactions.key(&id(Some(b"z9hG4bK4"), 1));
        answered(&transactions, tcp, start);
        assert_eq!(transactions.ack(tcp, start, false), Acked::Ours);
        assert_eq!(seen(&transactions, tcp, start), None);
    }

    #[test]
    fn without_the_magic_cookie_the_cseq_is_part_of_the_identity() {
        let transactions = Transactions::default();
        for branch in [None, Some(&b"1"[..])] {
            let first = transactions.key(&id(branch, 1));
            let next = transactions.key(&id(branch, 2));
            assert_ne!(first, next, "branch {branch:?}");
            assert_ne!(id(branch, 1).stable_hash(), id(branch, 2).stable_hash());
            let other_call = Id {
                call_id: b"call-2@192.0.2.1",
                ..id(branch, 1)
            };
            assert_ne!(transactions.key(&other_call), first);
        }
        // With it, the branch alone (and the sent-by) identifies the transaction, as
        // RFC 3261 §17.2.3 says: a CANCEL or ACK finds its INVITE whatever else differs.
        let cookie = Some(&b"z9hG4bKabc"[..]);
        let other_call = Id {
            call_id: b"call-2@192.0.2.1",
            ..id(cookie, 2)
        };
        assert_eq!(
            transactions.key(&id(cookie, 1)),
            transactions.key(&other_call)
        );
        assert_eq!(id(cookie, 1).stable_hash(), other_call.stable_hash());
        let elsewhere = Id {
            sent_by: b"192.0.2.2:5060",
            ..id(cookie, 1)
        };
        assert_ne!(
            transactions.key(&id(cookie, 1)),
            transactions.key(&elsewhere)
        );
    }

    #[test]
    fn the_table_stops_at_its_bound_and_makes_room_as_transactions_end() {
        let transactions = Transactions::new(3);
        let start = Instant::now();
        let calls: Vec<String> = (0..4).map(|i| format!("bound-{i}")).collect();
        let keys: Vec<u64> = calls
            .iter()
            .map(|call| {
                transactions.key(&Id {
                    call_id: call.as_bytes(),
                    ..id(None, 1)
                })
            })
            .collect();
        for key in &keys[..3] {
            assert_eq!(answered(&transactions, *key, start), Room::Available);
        }
        assert_eq!(answered(&transactions, keys[3], start), Room::Full);
        assert_eq!(transactions.len(), 3);
        assert_eq!(
            seen(&transactions, keys[3], start),
            None,
            "nothing was kept"
        );
        // An ACK frees a place (its confirmed key does not count).
        assert_eq!(transactions.ack(keys[0], start, true), Acked::Ours);
        assert_eq!(transactions.len(), 2);
        assert_eq!(answered(&transactions, keys[3], start), Room::Available);
        assert_eq!(answered(&transactions, 42, start), Room::Full);
        // Timer H frees the rest.
        transactions.tick(start + TIMER_H, |_, _| {});
        assert_eq!(transactions.len(), 0);
        assert_eq!(
            answered(&transactions, 42, start + TIMER_H),
            Room::Available
        );
    }

    #[test]
    fn responses_are_resent_outside_the_shard_locks() {
        let transactions = Transactions::default();
        let start = Instant::now();
        for i in 0..200u32 {
            let key = transactions.key(&id(None, i));
            answered(&transactions, key, start);
        }
        let mut sent = 0;
        let resent = transactions.tick(start + INTERVALS[0], |_, _| {
            sent += 1;
            for shard in transactions.shards.iter() {
                assert!(
                    shard.try_lock().is_ok(),
                    "a shard is locked while a response is sent"
                );
            }
        });
        assert_eq!((resent, sent), (200, 200));
    }

    #[test]
    fn a_live_transaction_is_small() {
        // The map entry plus both timer entries, without the response bytes themselves.
        let entry = std::mem::size_of::<(u64, Transaction)>() + 1;
        let timers = 2 * std::mem::size_of::<(Instant, u64)>();
        assert!(entry + timers <= 160, "{entry} + {timers} bytes");
        // A confirmed key: its set entry and its Timer I entry.
        let confirmed = std::mem::size_of::<u64>() + 1 + size_of::<(Instant, u64)>();
        assert!(confirmed <= 40, "{confirmed} bytes");
    }
}
