//! INVITE server transactions (RFC 3261 §17.2.1), kept as small as they can be.
//!
//! A transaction is the final response we sent and where it went, keyed by a hash of the
//! top Via's branch and sent-by. Over UDP the response is resent on Timer G (500 ms
//! doubling to 4 s) until the ACK arrives or Timer H (32 s) ends it; a retransmitted INVITE
//! gets the same bytes again. Timers live in one FIFO per interval: every entry of a FIFO
//! was pushed with the same delay, so deadlines come out in order without a heap, and an
//! entry whose transaction is gone or has moved on is skipped when it comes up.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// RFC 3261 T1.
pub const T1: Duration = Duration::from_millis(500);
/// RFC 3261 Timer H: how long we wait for an ACK.
pub const TIMER_H: Duration = Duration::from_secs(32);
/// Retransmission intervals: T1, 2·T1, 4·T1, then T2 = 4 s.
const INTERVALS: [Duration; 4] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];
const SHARDS: usize = 64;

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
    /// The response bytes (for `Answered`) or nothing (for `Proxied`).
    pub response: Box<[u8]>,
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
    pub fn new(response: Box<[u8]>, destination: SocketAddr, kind: Kind, now: Instant) -> Self {
        Self {
            response,
            destination,
            kind,
            level: 0,
            expires: now + TIMER_H,
        }
    }
}

#[derive(Debug, Default)]
struct Shard {
    live: HashMap<u64, Transaction, BuildHasherDefault<PreHashed>>,
    retransmit: [VecDeque<(Instant, u64)>; 4],
    expiry: VecDeque<(Instant, u64)>,
}

/// All live transactions, sharded so workers rarely contend.
#[derive(Debug)]
pub struct Transactions {
    shards: Box<[Mutex<Shard>]>,
    keys: std::hash::RandomState,
}

impl Default for Transactions {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            keys: std::hash::RandomState::new(),
        }
    }
}

impl Transactions {
    /// The key of a transaction: branch and sent-by of the top Via (RFC 3261 §17.2.3).
    pub fn key(&self, branch: &[u8], sent_by: &[u8]) -> u64 {
        self.keys.hash_one((branch, sent_by))
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[(key as usize) % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `existing` on the live transaction `key`, or `create` when there is none (and
    /// keeps what `create` returns), under the shard's lock so a retransmission racing its
    /// original on another worker is still seen as one.
    pub fn invite<R>(
        &self,
        key: u64,
        now: Instant,
        existing: impl FnOnce(&Transaction) -> R,
        create: impl FnOnce() -> (Option<Transaction>, R),
    ) -> R {
        let mut shard = self.shard(key);
        if let Some(transaction) = shard.live.get(&key) {
            return existing(transaction);
        }
        let (transaction, result) = create();
        if let Some(transaction) = transaction {
            if transaction.kind == (Kind::Answered { retransmit: true }) {
                shard.retransmit[0].push_back((now + INTERVALS[0], key));
            }
            shard.expiry.push_back((transaction.expires, key));
            shard.live.insert(key, transaction);
        }
        result
    }

    /// An ACK for a non-2xx final response: ends the transaction. Returns whether it was
    /// ours.
    pub fn ack(&self, key: u64) -> bool {
        let mut shard = self.shard(key);
        match shard.live.get(&key).map(|t| t.kind) {
            Some(Kind::Answered { .. }) => {
                shard.live.remove(&key);
                true
            }
            Some(Kind::Proxied) | None => false,
        }
    }

    /// The kind of the live transaction `key` (for CANCEL).
    pub fn kind(&self, key: u64) -> Option<Kind> {
        self.shard(key).live.get(&key).map(|t| t.kind)
    }

    /// Live transactions.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).live.len())
            .sum()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fires due timers: resends responses through `send` and forgets transactions past
    /// Timer H. Returns the number of responses resent.
    pub fn tick(&self, now: Instant, mut send: impl FnMut(&[u8], SocketAddr)) -> usize {
        let mut resent = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            let shard = &mut *shard;
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
                    send(&transaction.response, transaction.destination);
                    resent += 1;
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
                }
            }
        }
        resent
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

    fn answered(transactions: &Transactions, key: u64, now: Instant) {
        transactions.invite(
            key,
            now,
            |_| panic!("new transaction expected"),
            || {
                let t = Transaction::new(
                    b"SIP/2.0 302".to_vec().into_boxed_slice(),
                    addr(),
                    Kind::Answered { retransmit: true },
                    now,
                );
                (Some(t), ())
            },
        );
    }

    #[test]
    fn retransmissions_follow_timer_g_until_timer_h() {
        let transactions = Transactions::default();
        let start = Instant::now();
        let key = transactions.key(b"z9hG4bK1", b"192.0.2.1:5060");
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
        let key = transactions.key(b"z9hG4bK2", b"192.0.2.1:5060");
        answered(&transactions, key, start);
        let seen = transactions.invite(
            key,
            start,
            |t| t.response.to_vec(),
            || panic!("must match the live transaction"),
        );
        assert_eq!(seen, b"SIP/2.0 302");
        assert!(transactions.ack(key));
        assert!(!transactions.ack(key), "a second ACK is not ours");
        assert_eq!(
            transactions.tick(start + Duration::from_secs(5), |_, _| {}),
            0
        );
        assert!(transactions.is_empty());
    }

    #[test]
    fn a_live_transaction_is_small() {
        // The map entry plus both timer entries, without the response bytes themselves.
        let entry = std::mem::size_of::<(u64, Transaction)>() + 1;
        let timers = 2 * std::mem::size_of::<(Instant, u64)>();
        assert!(entry + timers <= 160, "{entry} + {timers} bytes");
    }
}
