//! Keeping a lease alive from the holder's side.
//!
//! [`LeaseKeeper`] renews a granted lease every `renew` with a short deadline, and runs a
//! separate stop timer that fires [`LeaseKeeper::lost`] the moment the lease can no longer
//! be trusted: validity counted from when the last successful request was *sent*, on the
//! monotonic clock. The timer does not wait for the renew loop, so a renewal stuck on a
//! dead network cannot keep a holder acting past its validity.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use callfleet_proto::lock::v1 as pb;
use callfleet_proto::lock::v1::locks_client::LocksClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::warn;

use crate::lease::Lease;

/// Renews a lease until released, and says when it is lost.
#[derive(Debug)]
pub struct LeaseKeeper {
    lease: Lease,
    client: LocksClient<Channel>,
    lost: CancellationToken,
    stop: CancellationToken,
    deadline: Duration,
    base: Instant,
    valid_until_ms: Arc<AtomicU64>,
}

impl LeaseKeeper {
    /// Starts keeping `lease`, whose claim was sent at `sent_at`.
    pub fn start(
        client: LocksClient<Channel>,
        lease: Lease,
        sent_at: Instant,
        renew_every: Duration,
        deadline: Duration,
    ) -> Self {
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        let base = sent_at;
        let valid_until_ms = Arc::new(AtomicU64::new(lease.validity.as_millis() as u64));

        // The stop timer: sleeps until the validity ends, re-reading it after each wake.
        {
            let (lost, stop, valid_until_ms) = (lost.clone(), stop.clone(), valid_until_ms.clone());
            let resource = lease.resource.clone();
            tokio::spawn(async move {
                loop {
                    let until =
                        base + Duration::from_millis(valid_until_ms.load(Ordering::Acquire));
                    if Instant::now() >= until {
                        warn!(%resource, "lease lost: its validity ran out before a renewal got through");
                        lost.cancel();
                        return;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep_until(until.into()) => {}
                    }
                }
            });
        }

        // The renew loop.
        {
            let (lost, stop, valid_until_ms) = (lost.clone(), stop.clone(), valid_until_ms.clone());
            let mut client = client.clone();
            let lease = lease.clone();
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(renew_every);
                ticker.tick().await;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = lost.cancelled() => return,
                        _ = ticker.tick() => {}
                    }
                    let sent = Instant::now();
                    let request = pb::RenewRequest {
                        resource: lease.resource.clone(),
                        holder: lease.holder.clone(),
                        token: lease.token,
                        validity_ms: lease.validity.as_millis() as u64,
                    };
                    match tokio::time::timeout(deadline, client.renew(request)).await {
                        Ok(Ok(_)) => {
                            let until = sent.saturating_duration_since(base) + lease.validity;
                            valid_until_ms.store(until.as_millis() as u64, Ordering::Release);
                        }
                        Ok(Err(status))
                            if matches!(
                                status.code(),
                                tonic::Code::NotFound | tonic::Code::FailedPrecondition
                            ) =>
                        {
                            warn!(resource = %lease.resource, %status, "lease lost: the service no longer has it");
                            lost.cancel();
                            return;
                        }
                        // Unreachable or slow: keep trying while the stop timer runs.
                        Ok(Err(_)) | Err(_) => {}
                    }
                }
            });
        }
        Self {
            lease,
            client,
            lost,
            stop,
            deadline,
            base,
            valid_until_ms,
        }
    }

    /// When the lease stops being valid unless a renewal gets through first: validity
    /// counted from the sending of the last claim or renewal that succeeded.
    pub fn valid_until(&self) -> Instant {
        self.base + Duration::from_millis(self.valid_until_ms.load(Ordering::Acquire))
    }

    /// The lease as granted.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Cancelled when the lease can no longer be trusted; stop acting on it at once.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Stops renewing and releases the lease (best effort within the deadline).
    pub async fn release(mut self) -> Result<(), tonic::Status> {
        self.stop.cancel();
        let request = pb::ReleaseRequest {
            resource: self.lease.resource.clone(),
            holder: self.lease.holder.clone(),
            token: self.lease.token,
        };
        match tokio::time::timeout(self.deadline, self.client.release(request)).await {
            Ok(result) => result.map(|_| ()),
            Err(_) => Err(tonic::Status::deadline_exceeded("release timed out")),
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
