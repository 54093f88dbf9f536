//! `callfleet.lock.v1.Locks` over gRPC, and the one place lock errors become statuses.

use std::sync::Arc;
use std::time::Duration;

use callfleet_proto::lock::v1 as pb;
use tonic::{Request, Response, Status};

use crate::backend::{Locks, Next, Place};
use crate::lease::{Claim, Lease, LockError};

impl From<LockError> for Status {
    fn from(err: LockError) -> Self {
        let message = err.to_string();
        match err {
            LockError::Held { .. } => Status::already_exists(message),
            LockError::NotYours { .. } => Status::failed_precondition(message),
            LockError::Gone { .. } => Status::not_found(message),
            LockError::NotWaiting { .. } => Status::failed_precondition(message),
            LockError::QueueFull { .. } => Status::resource_exhausted(message),
            LockError::Unavailable(_) => Status::unavailable(message),
            LockError::Invalid(_) => Status::invalid_argument(message),
        }
    }
}

fn to_pb(lease: Lease) -> pb::Lease {
    pb::Lease {
        resource: lease.resource,
        holder: lease.holder,
        attempt: lease.attempt,
        token: lease.token,
        validity_ms: u64::try_from(lease.validity.as_millis()).unwrap_or(u64::MAX),
    }
}

fn place_to_pb(place: Place) -> pb::Place {
    pb::Place {
        position: place.position,
        enqueued_at_us: place.enqueued_at_us,
    }
}

/// The gRPC service over a backend.
#[derive(Debug, Clone)]
pub struct LocksService {
    locks: Arc<Locks>,
    default_validity: Duration,
}

impl LocksService {
    /// Serves `locks`; requests without a validity get `default_validity`.
    pub fn new(locks: Arc<Locks>, default_validity: Duration) -> Self {
        Self {
            locks,
            default_validity,
        }
    }

    /// A claim of `holder`'s `attempt` for `validity_ms` (0: the default validity).
    fn claim<'a>(&self, holder: &'a str, attempt: &'a str, validity_ms: u64) -> Claim<'a> {
        Claim {
            holder,
            attempt,
            validity: self.validity(validity_ms),
        }
    }

    fn validity(&self, ms: u64) -> Duration {
        if ms == 0 {
            self.default_validity
        } else {
            Duration::from_millis(ms)
        }
    }
}

#[tonic::async_trait]
impl pb::locks_server::Locks for LocksService {
    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let request = request.into_inner();
        let claim = self.claim(&request.holder, &request.attempt, request.validity_ms);
        let lease = self.locks.acquire(&request.resource, &claim).await?;
        Ok(Response::new(to_pb(lease)))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let request = request.into_inner();
        // Without a validity a renewal keeps the lease's own, not the service default.
        let validity =
            (request.validity_ms != 0).then(|| Duration::from_millis(request.validity_ms));
        let lease = self
            .locks
            .renew(&request.resource, &request.holder, request.token, validity)
            .await?;
        Ok(Response::new(to_pb(lease)))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let request = request.into_inner();
        self.locks
            .release(&request.resource, &request.holder, request.token)
            .await?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let lease = self.locks.get(&request.into_inner().resource).await?;
        Ok(Response::new(pb::GetResponse {
            lease: lease.map(to_pb),
        }))
    }

    async fn claim_first(
        &self,
        request: Request<pb::ClaimFirstRequest>,
    ) -> Result<Response<pb::ClaimFirstResponse>, Status> {
        let request = request.into_inner();
        let candidates: Vec<&str> = request.candidates.iter().map(String::as_str).collect();
        let claim = self.claim(&request.holder, &request.attempt, request.validity_ms);
        let lease = self.locks.claim_first(&candidates, &claim).await?;
        Ok(Response::new(pb::ClaimFirstResponse {
            lease: lease.map(to_pb),
        }))
    }

    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::Place>, Status> {
        let request = request.into_inner();
        let place = self
            .locks
            .join(
                &request.queue,
                &request.waiter,
                request.band,
                Duration::from_millis(request.ttl_ms),
            )
            .await?;
        Ok(Response::new(place_to_pb(place)))
    }

    async fn touch(
        &self,
        request: Request<pb::TouchRequest>,
    ) -> Result<Response<pb::Place>, Status> {
        let request = request.into_inner();
        // Without a TTL the entry keeps its own.
        let ttl = (request.ttl_ms != 0).then(|| Duration::from_millis(request.ttl_ms));
        let place = self
            .locks
            .touch(&request.queue, &request.waiter, ttl)
            .await?;
        Ok(Response::new(place_to_pb(place)))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let request = request.into_inner();
        self.locks.leave(&request.queue, &request.waiter).await?;
        Ok(Response::new(pb::LeaveResponse {}))
    }

    async fn requeue(
        &self,
        request: Request<pb::RequeueRequest>,
    ) -> Result<Response<pb::Place>, Status> {
        let request = request.into_inner();
        let place = self.locks.requeue(&request.queue, &request.waiter).await?;
        Ok(Response::new(place_to_pb(place)))
    }

    async fn order_status(
        &self,
        request: Request<pb::OrderStatusRequest>,
    ) -> Result<Response<pb::OrderStatusResponse>, Status> {
        let status = self.locks.order_status(&request.get_ref().queue).await?;
        Ok(Response::new(pb::OrderStatusResponse {
            waiting: status.waiting,
            ringing: status.ringing,
            oldest_wait_ms: status.oldest_wait_us / 1000,
        }))
    }

    async fn claim_next(
        &self,
        request: Request<pb::ClaimNextRequest>,
    ) -> Result<Response<pb::ClaimNextResponse>, Status> {
        use pb::claim_next_response::Outcome;
        let request = request.into_inner();
        let candidates: Vec<&str> = request.candidates.iter().map(String::as_str).collect();
        let claim = self.claim(&request.holder, &request.attempt, request.validity_ms);
        let next = self
            .locks
            .claim_next(&request.queue, &request.waiter, &candidates, &claim)
            .await?;
        let outcome = match next {
            Next::Granted(lease) => Outcome::Lease(to_pb(lease)),
            Next::NotFirst { position } => Outcome::NotFirst(pb::NotFirst { position }),
            Next::Busy => Outcome::Busy(pb::Busy {}),
        };
        Ok(Response::new(pb::ClaimNextResponse {
            outcome: Some(outcome),
        }))
    }
}
