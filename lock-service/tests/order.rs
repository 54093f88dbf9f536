//! The waiting order over the real listener: Join, Touch, ClaimNext, Requeue and Leave
//! through a tonic client, with their status codes.

mod support;

use std::time::Duration;

use callfleet_proto::lock::v1 as pb;
use callfleet_proto::lock::v1::claim_next_response::Outcome;
use support::Server;
use tonic::Code;

fn join(waiter: &str, band: u32) -> pb::JoinRequest {
    pb::JoinRequest {
        queue: "sales".into(),
        waiter: waiter.into(),
        band,
        ttl_ms: 30_000,
    }
}

fn next(waiter: &str, attempt: &str) -> pb::ClaimNextRequest {
    pb::ClaimNextRequest {
        queue: "sales".into(),
        waiter: waiter.into(),
        candidates: vec!["agent:1".into()],
        holder: waiter.into(),
        attempt: attempt.into(),
        validity_ms: 5_000,
    }
}

#[tokio::test]
async fn grpc_serves_the_waiting_order_with_its_codes() {
    let server = Server::start().await;
    let mut client = server.grpc().await;
    let first = client
        .join(join("pbx-1/c1", 1))
        .await
        .expect("join")
        .into_inner();
    let second = client
        .join(join("pbx-2/c2", 1))
        .await
        .expect("join")
        .into_inner();
    assert_eq!((first.position, second.position), (1, 2));
    assert!(first.enqueued_at_us < second.enqueued_at_us);
    let again = client
        .join(join("pbx-1/c1", 1))
        .await
        .expect("a retried join")
        .into_inner();
    assert_eq!(again, first, "a retried Join keeps its time and place");

    let outcome = |r: pb::ClaimNextResponse| r.outcome.expect("an outcome");
    let behind = client.claim_next(next("pbx-2/c2", "a2")).await.expect("ok");
    assert_eq!(
        outcome(behind.into_inner()),
        Outcome::NotFirst(pb::NotFirst { position: 2 })
    );
    let granted = client.claim_next(next("pbx-1/c1", "a1")).await.expect("ok");
    let Outcome::Lease(lease) = outcome(granted.into_inner()) else {
        panic!("the head gets the agent");
    };
    assert_eq!(
        (lease.resource.as_str(), lease.validity_ms),
        ("agent:1", 5_000)
    );
    let busy = client.claim_next(next("pbx-2/c2", "a3")).await.expect("ok");
    assert_eq!(
        outcome(busy.into_inner()),
        Outcome::Busy(pb::Busy {}),
        "the ringing head does not block, but the only agent is leased"
    );

    // The ring failed: c1 is back at the head and blocks c2 again.
    client
        .release(pb::ReleaseRequest {
            resource: "agent:1".into(),
            holder: "pbx-1/c1".into(),
            token: lease.token,
        })
        .await
        .expect("release");
    let requeued = client
        .requeue(pb::RequeueRequest {
            queue: "sales".into(),
            waiter: "pbx-1/c1".into(),
        })
        .await
        .expect("requeue")
        .into_inner();
    assert_eq!(requeued.position, 1);
    let blocked = client.claim_next(next("pbx-2/c2", "a4")).await.expect("ok");
    assert_eq!(
        outcome(blocked.into_inner()),
        Outcome::NotFirst(pb::NotFirst { position: 2 })
    );
    client
        .leave(pb::LeaveRequest {
            queue: "sales".into(),
            waiter: "pbx-1/c1".into(),
        })
        .await
        .expect("leave");
    let touched = client
        .touch(pb::TouchRequest {
            queue: "sales".into(),
            waiter: "pbx-2/c2".into(),
            ttl_ms: 0,
        })
        .await
        .expect("touch")
        .into_inner();
    assert_eq!(touched.position, 1, "Leave unblocks at once");

    let gone = client
        .claim_next(next("pbx-1/c1", "a5"))
        .await
        .expect_err("left");
    assert_eq!(gone.code(), Code::FailedPrecondition);
    assert!(gone.message().contains("not waiting"), "{}", gone.message());
    let touch_gone = client
        .touch(pb::TouchRequest {
            queue: "sales".into(),
            waiter: "pbx-1/c1".into(),
            ttl_ms: 1_000,
        })
        .await
        .expect_err("left");
    assert_eq!(touch_gone.code(), Code::FailedPrecondition);
    for (request, field) in [
        (join("pbx-3/c3", 10), "`band`"),
        (
            pb::JoinRequest {
                ttl_ms: 0,
                ..join("pbx-3/c3", 1)
            },
            "`ttl_ms`",
        ),
        (
            pb::JoinRequest {
                queue: String::new(),
                ..join("pbx-3/c3", 1)
            },
            "`queue`",
        ),
    ] {
        let err = client.join(request).await.expect_err("invalid");
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(err.message().contains(field), "{}", err.message());
    }

    server.stop().await;
}

#[tokio::test]
async fn grpc_serves_the_order_status() {
    let server = Server::start().await;
    let mut client = server.grpc().await;
    let status = |queue: &str| pb::OrderStatusRequest {
        queue: queue.into(),
    };
    let empty = client
        .order_status(status("sales"))
        .await
        .expect("status")
        .into_inner();
    assert_eq!(
        empty,
        pb::OrderStatusResponse {
            waiting: 0,
            ringing: 0,
            oldest_wait_ms: 0
        }
    );
    client.join(join("pbx-1/c1", 1)).await.expect("join");
    client.join(join("pbx-2/c2", 1)).await.expect("join");
    let granted = client.claim_next(next("pbx-1/c1", "a1")).await.expect("ok");
    assert!(matches!(
        granted.into_inner().outcome,
        Some(Outcome::Lease(_))
    ));
    tokio::time::sleep(Duration::from_millis(120)).await;
    let two = client
        .order_status(status("sales"))
        .await
        .expect("status")
        .into_inner();
    assert_eq!((two.waiting, two.ringing), (1, 1));
    assert!(
        (120..5_000).contains(&two.oldest_wait_ms),
        "c2 has waited since its join: {two:?}"
    );
    let bad = client.order_status(status("")).await.expect_err("no queue");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("`queue`"), "{}", bad.message());

    server.stop().await;
}
