//! A token bucket per client address, for the one operation anyone may call: the public
//! queue status a website polls.
//!
//! Each address (an IPv6 client's /64, since one host commonly holds a whole /64) gets
//! `burst` requests at once and `rate` more per second after that; beyond it the caller is
//! refused ([`Limited`]) with the wait until its next request. Memory is bounded: at most
//! [`MAX_TRACKED`] addresses are kept. When a new address finds the table full, the buckets
//! that have refilled (which say nothing a fresh bucket would not) are dropped first, then
//! the older half by last use; an evicted address starts again with a full burst, which
//! only ever errs on the side of answering.
//!
//! The status has three faces (REST `GET /api/v1/queues/{queue}/status`, XML-RPC
//! `queue.status`, gRPC `QueueStatus`) and one [`RateLimit`] serves them all, so a poller
//! does not get three times the rate by switching API; each `queue.status` inside a
//! `system.multicall` counts as one request. Every caller is counted, with a token or
//! without. A refusal is answered here, once per face: REST 429 with `Retry-After`, XML-RPC
//! a fault with code 429 (the service's faults carry the HTTP status), gRPC
//! `RESOURCE_EXHAUSTED` with `retry-after` metadata.
//!
//! The address is the TCP peer's. Behind a reverse proxy every client shares the proxy's
//! address and so one bucket; `X-Forwarded-For` is not read, since without a list of
//! trusted proxies any client could name itself anyone.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use callfleet_core::config::ControlPlaneConfig;
use tokio::time::Instant;

use crate::xmlrpc::Fault;

/// The most client addresses whose buckets are kept (about 4 MiB).
pub const MAX_TRACKED: usize = 65_536;

/// The key an address is counted under: IPv4 as is (also when mapped into IPv6), IPv6 by
/// its /64.
pub fn client_key(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// Token buckets per client address.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    max_tracked: usize,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// When `tokens` was last brought up to date, which is also the last request.
    at: Instant,
}

impl Bucket {
    fn refilled(self, now: Instant, rate: f64, burst: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * rate).min(burst)
    }
}

impl RateLimit {
    /// `rate` requests per second after a first `burst`, for at most `max_tracked`
    /// addresses at a time.
    pub fn new(rate: f64, burst: u32, max_tracked: usize) -> Self {
        Self {
            rate,
            burst: f64::from(burst),
            max_tracked: max_tracked.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The public status's limit as configured (`status_rate`, `status_burst`).
    pub fn public_status(config: &ControlPlaneConfig) -> Self {
        Self::new(config.status_rate, config.status_burst, MAX_TRACKED)
    }

    /// Takes one request from the bucket of the peer the listener recorded. A request that
    /// did not come through the control plane's listener (an in-process `oneshot`) has no
    /// peer address and is not limited.
    ///
    /// # Errors
    ///
    /// [`Limited`] when the peer's bucket is empty.
    pub fn admit(&self, peer: Option<&ConnectInfo<SocketAddr>>) -> Result<(), Limited> {
        match peer {
            Some(ConnectInfo(address)) => self
                .check(address.ip(), Instant::now())
                .map_err(Limited::new),
            None => Ok(()),
        }
    }

    /// Takes one request from `client`'s bucket, or says how long until one is there.
    pub fn check(&self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = client_key(client);
        let mut buckets = self.buckets.lock().expect("rate limit lock");
        if !buckets.contains_key(&key) && buckets.len() >= self.max_tracked {
            self.make_room(&mut buckets, now);
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let tokens = bucket.refilled(now, self.rate, self.burst);
        bucket.at = now;
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            Ok(())
        } else {
            bucket.tokens = tokens;
            Err(Duration::try_from_secs_f64((1.0 - tokens) / self.rate).unwrap_or(Duration::MAX))
        }
    }

    /// How many addresses are tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().expect("rate limit lock").len()
    }

    /// Drops the full buckets, then, if that freed nothing, the older half: each call
    /// costs a pass over the table but frees at least half of it, so inserts stay O(1)
    /// amortised however many addresses come and go.
    fn make_room(&self, buckets: &mut HashMap<IpAddr, Bucket>, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        buckets.retain(|_, bucket| bucket.refilled(now, rate, burst) < burst);
        if buckets.len() < self.max_tracked / 2 + 1 {
            return;
        }
        let mut ages: Vec<(Instant, IpAddr)> = buckets.iter().map(|(k, b)| (b.at, *k)).collect();
        let half = ages.len() / 2;
        ages.select_nth_unstable(half);
        for (_, key) in &ages[..=half] {
            buckets.remove(key);
        }
    }
}

/// A public status request refused because its address used its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "too many queue status requests from this address (REST, XML-RPC and gRPC count together); retry after {retry_after} s, or cache the status for a second"
)]
pub struct Limited {
    /// Whole seconds until the next request is answered, rounded up (at least 1).
    pub retry_after: u64,
}

impl Limited {
    /// The refusal of a request whose bucket has a token again after `wait`.
    pub fn new(wait: Duration) -> Self {
        let retry_after = wait
            .as_secs()
            .saturating_add(u64::from(wait.subsec_nanos() > 0))
            .max(1);
        Self { retry_after }
    }
}

/// REST: 429 with `Retry-After` and the usual `{"error": ...}` body.
impl IntoResponse for Limited {
    fn into_response(self) -> Response {
        let mut response = (
            StatusCode::TOO_MANY_REQUESTS,
            axum::Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(self.retry_after));
        response
    }
}

/// gRPC: `RESOURCE_EXHAUSTED`, with the wait also as `retry-after` metadata (seconds).
impl From<Limited> for tonic::Status {
    fn from(limited: Limited) -> Self {
        let mut status = tonic::Status::resource_exhausted(limited.to_string());
        status.metadata_mut().insert(
            "retry-after",
            tonic::metadata::MetadataValue::from(limited.retry_after),
        );
        status
    }
}

/// XML-RPC: a fault whose code is the HTTP status REST answers (429), as for the service's
/// other errors ([`crate::error`]).
impl From<Limited> for Fault {
    fn from(limited: Limited) -> Self {
        Fault::new(
            i32::from(StatusCode::TOO_MANY_REQUESTS.as_u16()),
            limited.to_string(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_rate_per_address() {
        let limit = RateLimit::new(2.0, 3, 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limit.check(ip("192.0.2.1"), t0), Ok(()));
        }
        assert_eq!(
            limit.check(ip("192.0.2.1"), t0),
            Err(Duration::from_millis(500))
        );
        // Another address has its own bucket.
        assert_eq!(limit.check(ip("192.0.2.2"), t0), Ok(()));
        // Refused requests cost nothing: half a second later exactly one token is back.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(limit.check(ip("192.0.2.1"), t1), Ok(()));
        assert_eq!(
            limit.check(ip("192.0.2.1"), t1),
            Err(Duration::from_millis(500))
        );
        // A long pause refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(limit.check(ip("192.0.2.1"), t2), Ok(()));
        }
        assert!(limit.check(ip("192.0.2.1"), t2).is_err());
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa::1")),
            client_key(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            client_key(ip("2001:db8:1:2::1")),
            client_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(client_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(client_key(ip("192.0.2.7")), ip("192.0.2.7"));
    }

    #[tokio::test(start_paused = true)]
    async fn memory_stays_bounded_and_keeps_the_recent_limited_addresses() {
        let limit = RateLimit::new(1.0, 1, 8);
        let t0 = Instant::now();
        // Eight addresses that each used their one request: all are limited now.
        for i in 0..8u8 {
            let at = t0 + Duration::from_millis(u64::from(i));
            assert_eq!(limit.check(IpAddr::from([10, 0, 0, i]), at), Ok(()));
        }
        assert_eq!(limit.tracked(), 8);
        // A ninth: nothing has refilled, so the older half goes.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(limit.check(ip("10.0.1.1"), t1), Ok(()));
        assert!(limit.tracked() <= 5, "{}", limit.tracked());
        // The most recent ones are still limited; the oldest start afresh.
        assert!(limit.check(IpAddr::from([10, 0, 0, 7]), t1).is_err());
        assert_eq!(limit.check(IpAddr::from([10, 0, 0, 0]), t1), Ok(()));

        // Once buckets refill they are the first to go, and limited addresses stay.
        let limit = RateLimit::new(1.0, 1, 4);
        for i in 0..4u8 {
            assert_eq!(limit.check(IpAddr::from([10, 0, 0, i]), t0), Ok(()));
        }
        let later = t0 + Duration::from_secs(2);
        assert_eq!(limit.check(IpAddr::from([10, 0, 0, 0]), later), Ok(()));
        assert_eq!(limit.check(ip("10.0.1.1"), later), Ok(()));
        assert_eq!(limit.tracked(), 2);
        assert!(limit.check(IpAddr::from([10, 0, 0, 0]), later).is_err());

        // A flood of new addresses never grows the table past its bound.
        let limit = RateLimit::new(1.0, 1, 64);
        for i in 0..10_000u32 {
            let address = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            assert_eq!(limit.check(address, t0), Ok(()));
            assert!(limit.tracked() <= 64);
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        let header = |wait| {
            Limited::new(wait)
                .into_response()
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(header(Duration::from_millis(50)).as_deref(), Some("1"));
        assert_eq!(header(Duration::from_secs(1)).as_deref(), Some("1"));
        assert_eq!(header(Duration::from_millis(1001)).as_deref(), Some("2"));
        assert_eq!(header(Duration::from_secs(10)).as_deref(), Some("10"));
    }

    #[test]
    fn each_face_answers_the_same_refusal() {
        let limited = Limited::new(Duration::from_millis(2500));
        let fault = Fault::from(limited);
        assert_eq!(fault.code(), 429);
        assert!(
            fault.string().contains("retry after 3 s"),
            "{}",
            fault.string()
        );
        let status = tonic::Status::from(limited);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(status.message(), fault.string());
        assert_eq!(
            status
                .metadata()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("3")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_without_a_peer_is_not_limited() {
        let limit = RateLimit::new(1.0, 1, 8);
        let peer = ConnectInfo(SocketAddr::from(([192, 0, 2, 1], 5000)));
        assert_eq!(limit.admit(Some(&peer)), Ok(()));
        assert!(limit.admit(Some(&peer)).is_err());
        for _ in 0..3 {
            assert_eq!(limit.admit(None), Ok(()));
        }
        assert_eq!(limit.tracked(), 1);
    }
}
