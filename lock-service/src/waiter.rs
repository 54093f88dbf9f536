//! A queued caller's place in its queue's waiting order, from the holder's side.
//!
//! [`Waiter::join`] enters the caller and keeps the entry alive (`Touch` every
//! `touch_every`, well inside its TTL) until [`Waiter::leave`] or drop: a node that dies
//! stops touching and its callers leave the order within one TTL. [`Waiter::claim_next`]
//! asks for an agent only in the caller's turn, and hands a granted lease to a
//! [`LeaseKeeper`] at once, counted from when the claim was sent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use callfleet_proto::lock::v1 as pb;
use callfleet_proto::lock::v1::claim_next_response::Outcome;
use callfleet_proto::lock::v1::locks_client::LocksClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::warn;

use crate::backend::MAX_CANDIDATES;
use crate::client::LeaseKeeper;
use crate::lease::Lease;

/// How a waiter talks to the lock service.
#[derive(Debug, Clone)]
pub struct WaitSettings {
    /// How long the entry lives without a touch.
    pub ttl: Duration,
    /// How often it is touched: a third of `ttl` survives two lost touches.
    pub touch_every: Duration,
    /// Deadline of each request (no hidden retries: the caller decides).
    pub deadline: Duration,
    /// Validity of a granted lease.
    pub validity: Duration,
    /// How often a granted lease is renewed.
    pub renew_every: Duration,
}

impl Default for WaitSettings {
    fn default() -> Self {
        // The lock service's defaults: validity 10 s, renew every 3 s, deadline 1 s.
        Self {
            ttl: Duration::from_secs(15),
            touch_every: Duration::from_secs(5),
            deadline: Duration::from_secs(1),
            validity: Duration::from_secs(10),
            renew_every: Duration::from_secs(3),
        }
    }
}

/// What one turn at the order gave.
#[derive(Debug)]
pub enum Turn {
    /// An agent, leased to this caller and kept alive until released.
    Granted(Box<LeaseKeeper>),
    /// Callers who can be served are ahead: this many, plus one.
    NotFirst(u64),
    /// This caller's turn, but every candidate is held.
    Busy,
}

/// A caller waiting in one queue.
#[derive(Debug)]
pub struct Waiter {
    client: LocksClient<Channel>,
    settings: WaitSettings,
    queue: String,
    id: String,
    attempts: AtomicU64,
    stop_touching: CancellationToken,
    left: bool,
}

impl Waiter {
    /// Enters `id` (`node/uniqueid`) into `queue`'s order in `band` (0 = VIP first) and
    /// keeps it alive. Joining again keeps the first place, so a retried join is safe.
    pub async fn join(
        client: LocksClient<Channel>,
        settings: WaitSettings,
        queue: &str,
        id: &str,
        band: u32,
    ) -> Result<(Self, pb::Place), tonic::Status> {
        let mut joiner = client.clone();
        let request = pb::JoinRequest {
            queue: queue.to_owned(),
            waiter: id.to_owned(),
            band,
            ttl_ms: millis(settings.ttl),
        };
        let place = within(settings.deadline, joiner.join(request)).await?;
        let stop_touching = CancellationToken::new();
        tokio::spawn(touch_loop(
            client.clone(),
            settings.clone(),
            queue.to_owned(),
            id.to_owned(),
            stop_touching.clone(),
        ));
        let waiter = Self {
            client,
            settings,
            queue: queue.to_owned(),
            id: id.to_owned(),
            attempts: AtomicU64::new(0),
            stop_touching,
            left: false,
        };
        Ok((waiter, place))
    }

    /// Asks for the first free of `candidates` (resources in priority order) if it is
    /// this caller's turn. Each call is a new attempt: a retry after an error is a new
    /// claim, and an attempt whose answer was lost expires unused. Only the best
    /// [`MAX_CANDIDATES`] are offered (what one claim may list): a queue with more free
    /// agents than that still rings its best ones, rather than none.
    pub async fn claim_next(&self, candidates: &[String]) -> Result<Turn, tonic::Status> {
        let attempt = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        let request = pb::ClaimNextRequest {
            queue: self.queue.clone(),
            waiter: self.id.clone(),
            candidates: candidates[..candidates.len().min(MAX_CANDIDATES)].to_vec(),
            holder: self.id.clone(),
            attempt: format!("{}#{attempt}", self.id),
            validity_ms: millis(self.settings.validity),
        };
        let sent = Instant::now();
        let mut client = self.client.clone();
        let answer = within(self.settings.deadline, client.claim_next(request)).await?;
        match answer.outcome {
            Some(Outcome::Lease(granted)) => {
                let lease = Lease {
                    resource: granted.resource,
                    holder: granted.holder,
                    attempt: granted.attempt,
                    token: granted.token,
                    validity: Duration::from_millis(granted.validity_ms),
                };
                Ok(Turn::Granted(Box::new(LeaseKeeper::start(
                    self.client.clone(),
                    lease,
                    sent,
                    self.settings.renew_every,
                    self.settings.deadline,
                ))))
            }
            Some(Outcome::NotFirst(not_first)) => Ok(Turn::NotFirst(not_first.position)),
            Some(Outcome::Busy(_)) => Ok(Turn::Busy),
            None => Err(tonic::Status::internal(
                "the lock service answered ClaimNext without an outcome",
            )),
        }
    }

    /// Where this caller stands now, without asking for an agent: the cheap ask of a
    /// caller behind the head, which a `ClaimNext` with every candidate would only answer
    /// `not_first`. Keeps the entry alive like a touch.
    pub async fn place(&self) -> Result<pb::Place, tonic::Status> {
        let request = pb::TouchRequest {
            queue: self.queue.clone(),
            waiter: self.id.clone(),
            ttl_ms: 0,
        };
        let mut client = self.client.clone();
        within(self.settings.deadline, client.touch(request)).await
    }

    /// The ring failed: back to this caller's original place.
    pub async fn requeue(&self) -> Result<pb::Place, tonic::Status> {
        let request = pb::RequeueRequest {
            queue: self.queue.clone(),
            waiter: self.id.clone(),
        };
        let mut client = self.client.clone();
        within(self.settings.deadline, client.requeue(request)).await
    }

    /// Leaves the order now (answered, hung up, overflowed).
    pub async fn leave(mut self) -> Result<(), tonic::Status> {
        self.left = true;
        self.stop_touching.cancel();
        let mut client = self.client.clone();
        within(self.settings.deadline, client.leave(self.leave_request()))
            .await
            .map(|_| ())
    }

    /// The lock service no longer has this entry (it expired, or the service lost it):
    /// stops touching it and sends no Leave, which could otherwise land after the caller
    /// joined again under the same id and take the new entry out.
    pub fn forget(mut self) {
        self.left = true;
        self.stop_touching.cancel();
    }

    fn leave_request(&self) -> pb::LeaveRequest {
        pb::LeaveRequest {
            queue: self.queue.clone(),
            waiter: self.id.clone(),
        }
    }
}

impl Drop for Waiter {
    /// A waiter dropped without `leave` (its call's task ended early) still leaves, in the
    /// background; if that fails too, its entry expires within one TTL.
    fn drop(&mut self) {
        self.stop_touching.cancel();
        if self.left {
            return;
        }
        let (mut client, request) = (self.client.clone(), self.leave_request());
        let deadline = self.settings.deadline;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = within(deadline, client.leave(request)).await;
            });
        }
    }
}

async fn touch_loop(
    mut client: LocksClient<Channel>,
    settings: WaitSettings,
    queue: String,
    id: String,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(settings.touch_every);
    ticker.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let request = pb::TouchRequest {
            queue: queue.clone(),
            waiter: id.clone(),
            ttl_ms: millis(settings.ttl),
        };
        match within(settings.deadline, client.touch(request)).await {
            Ok(_) => {}
            // Expired (or Redis lost it): the caller must decide whether to join again.
            // A touch sent before the caller left lands after its Leave: nothing is lost.
            Err(status)
                if status.code() == tonic::Code::FailedPrecondition && stop.is_cancelled() =>
            {
                return;
            }
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                warn!(%queue, waiter = %id, "waiting entry gone from the order");
                return;
            }
            Err(_) => {}
        }
    }
}

async fn within<T>(
    deadline: Duration,
    request: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(deadline, request).await {
        Ok(answer) => answer.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer from the lock service within {deadline:?}"
        ))),
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
