//! The holder's side of the waiting order ([`Waiter`]) against the real service (memory
//! backend) over gRPC: turns, the lease handed to a keeper, touches that keep a caller's
//! place, and leaving on drop.

mod support;

use std::time::Duration;

use callfleet_lock_service::backend::MAX_CANDIDATES;
use callfleet_lock_service::waiter::{Turn, WaitSettings, Waiter};
use callfleet_proto::lock::v1 as pb;
use support::Server;

/// Entries that die 300 ms after their last touch, touched every 100 ms.
fn short() -> WaitSettings {
    WaitSettings {
        ttl: Duration::from_millis(300),
        touch_every: Duration::from_millis(100),
        ..WaitSettings::default()
    }
}

fn agents() -> Vec<String> {
    vec!["agent:w1".to_owned()]
}

fn position(turn: &Turn) -> Option<u64> {
    match turn {
        Turn::NotFirst(position) => Some(*position),
        _ => None,
    }
}

#[tokio::test]
async fn only_the_head_is_granted_and_the_lease_is_kept_until_released() {
    let server = Server::start().await;
    let client = server.grpc().await;
    let (a, place) = Waiter::join(client.clone(), short(), "sales", "pbx-1/a", 1)
        .await
        .expect("join a");
    assert_eq!(place.position, 1);
    let (b, place) = Waiter::join(client.clone(), short(), "sales", "pbx-2/b", 1)
        .await
        .expect("join b");
    assert_eq!(place.position, 2);

    assert_eq!(
        position(&b.claim_next(&agents()).await.expect("b")),
        Some(2)
    );
    let Turn::Granted(keeper) = a.claim_next(&agents()).await.expect("a") else {
        panic!("the head gets the free agent");
    };
    assert_eq!(keeper.lease().resource, "agent:w1");
    assert_eq!(keeper.lease().holder, "pbx-1/a");
    // A ringing head does not block b, but the only agent is held.
    assert!(matches!(
        b.claim_next(&agents()).await.expect("b"),
        Turn::Busy
    ));
    // The keeper holds the lease while the ring goes on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!keeper.lost().is_cancelled());

    // The ring failed: a goes back to its place, ahead of b.
    keeper.release().await.expect("release");
    assert_eq!(a.requeue().await.expect("requeue").position, 1);
    assert_eq!(
        position(&b.claim_next(&agents()).await.expect("b")),
        Some(2)
    );
    a.leave().await.expect("leave");
    let Turn::Granted(keeper) = b.claim_next(&agents()).await.expect("b") else {
        panic!("b is first once a left");
    };
    assert_eq!(keeper.lease().holder, "pbx-2/b");
}

/// More free agents than one claim may list (a big queue at the start of a shift): the
/// best of them is granted, not an error that rings nobody.
#[tokio::test]
async fn more_candidates_than_a_claim_may_list_still_grant_the_best() {
    let server = Server::start().await;
    let client = server.grpc().await;
    let (waiter, _) = Waiter::join(client.clone(), short(), "big", "pbx-1/a", 1)
        .await
        .expect("join");
    let many: Vec<String> = (0..=MAX_CANDIDATES).map(|n| format!("agent:{n}")).collect();
    let Turn::Granted(keeper) = waiter.claim_next(&many).await.expect("a turn") else {
        panic!("the best free agent is granted");
    };
    assert_eq!(keeper.lease().resource, "agent:0");
    // The negative control: the same list sent as is, which the waiter no longer does.
    let mut raw = client.clone();
    let refused = raw
        .claim_next(pb::ClaimNextRequest {
            queue: "big".to_owned(),
            waiter: "pbx-1/a".to_owned(),
            candidates: many,
            holder: "pbx-1/a".to_owned(),
            attempt: "pbx-1/a#raw".to_owned(),
            validity_ms: 10_000,
        })
        .await
        .expect_err("too many candidates");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        refused.message(),
        "invalid request: `candidates` must list 1–500 resources in priority order"
    );
}

#[tokio::test]
async fn touches_keep_a_place_an_untouched_entry_loses_it() {
    let server = Server::start().await;
    let mut client = server.grpc().await;
    let (touched, _) = Waiter::join(client.clone(), short(), "q-touch", "pbx-1/t", 1)
        .await
        .expect("join");
    // The same TTL, joined without a Waiter: nobody touches it.
    client
        .join(pb::JoinRequest {
            queue: "q-untouched".into(),
            waiter: "pbx-1/u".into(),
            band: 1,
            ttl_ms: 300,
        })
        .await
        .expect("raw join");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (later, _) = Waiter::join(client.clone(), short(), "q-touch", "pbx-2/l", 1)
        .await
        .expect("join");
    assert_eq!(
        position(&later.claim_next(&agents()).await.expect("later")),
        Some(2),
        "the touched caller kept its place 1 s (3 TTLs) after joining"
    );
    let (other, _) = Waiter::join(client.clone(), short(), "q-untouched", "pbx-2/o", 1)
        .await
        .expect("join");
    assert!(
        matches!(
            other.claim_next(&agents()).await.expect("other"),
            Turn::Granted(_)
        ),
        "the untouched entry expired"
    );
    drop(touched);
}

#[tokio::test]
async fn a_waiter_dropped_without_leave_leaves_at_once() {
    let server = Server::start().await;
    let client = server.grpc().await;
    let settings = WaitSettings::default(); // a 15 s TTL: only the drop can free the place
    let (first, _) = Waiter::join(client.clone(), settings.clone(), "q-drop", "pbx-1/f", 1)
        .await
        .expect("join");
    let (second, _) = Waiter::join(client.clone(), settings, "q-drop", "pbx-1/s", 1)
        .await
        .expect("join");
    assert_eq!(
        position(&second.claim_next(&agents()).await.expect("second")),
        Some(2)
    );
    drop(first);
    let start = std::time::Instant::now();
    loop {
        match second.claim_next(&agents()).await.expect("second") {
            Turn::Granted(_) => break,
            Turn::NotFirst(2) if start.elapsed() < Duration::from_secs(2) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("the dropped waiter still holds the head: {other:?}"),
        }
    }
}
