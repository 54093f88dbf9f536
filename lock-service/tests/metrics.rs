//! `GET /metrics` on the lock service's one listener, after a known set of operations
//! through gRPC and the HTTP twin: every operation series with its exact count, the
//! latency histogram's counts, the quarantine gauge and the backend errors.
//!
//! The recorder is process-wide and operation series carry no backend label, so the one
//! test runs its three services one after another and counts over all of them: a memory
//! service in its startup quarantine, one without it, and one on a Redis that is not there.

mod support;

use std::time::Duration;

use callfleet_core::config::{LockBackendKind, LockServiceConfig};
use callfleet_proto::lock::v1 as pb;
use support::Server;
use tokio::time::{Instant, sleep};
use tonic::Code;

/// `/metrics` and the HTTP twin, with the requests this test sends.
impl Server {
    /// Sends `method path` over HTTP/1.1 and returns (status, body).
    async fn http(&self, method: &str, path: &str, form: &str) -> (u16, String) {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        );
        self.exchange(&request).await
    }

    async fn scrape(&self) -> String {
        let (status, body) = self.http("GET", "/metrics", "").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Scrapes until `line` is in the text (the health watcher sets the quarantine gauge
    /// within a tick of the start), failing with the last text after 5 s.
    async fn scrape_until(&self, line: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = self.scrape().await;
            if text.lines().any(|l| l == line) {
                return text;
            }
            assert!(Instant::now() < deadline, "no `{line}` in:\n{text}");
            sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The lines of `text` whose name starts with `prefix`, sorted, comments left out.
fn series(text: &str, prefix: &str) -> Vec<String> {
    let mut lines: Vec<String> = text
        .lines()
        .filter(|line| line.starts_with(prefix))
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

fn acquire(resource: &str, holder: &str) -> pb::AcquireRequest {
    pb::AcquireRequest {
        resource: resource.into(),
        holder: holder.into(),
        attempt: holder.into(),
        validity_ms: 10_000,
    }
}

fn claim_first(holder: &str) -> pb::ClaimFirstRequest {
    pb::ClaimFirstRequest {
        candidates: vec!["agent:1".into(), "agent:2".into()],
        holder: holder.into(),
        attempt: holder.into(),
        validity_ms: 10_000,
    }
}

fn claim_next(waiter: &str) -> pb::ClaimNextRequest {
    pb::ClaimNextRequest {
        queue: "q1".into(),
        waiter: waiter.into(),
        candidates: vec!["agent:3".into()],
        holder: waiter.into(),
        attempt: waiter.into(),
        validity_ms: 10_000,
    }
}

fn entry(waiter: &str) -> (String, String) {
    ("q1".into(), waiter.into())
}

#[tokio::test]
async fn operations_are_counted_by_kind_and_result_with_the_quarantine_and_backend_errors() {
    // 1. A memory service in its startup quarantine refuses claims: 2 acquires (gRPC and
    //    the HTTP twin) unavailable, none of them a backend error.
    let quarantined = Server::start_with(LockServiceConfig::default()).await;
    quarantined
        .scrape_until("callfleet_lock_service_quarantined 1")
        .await;
    let mut grpc = quarantined.grpc().await;
    let refused = grpc.acquire(acquire("agent:1", "n/a")).await;
    assert_eq!(refused.expect_err("quarantined").code(), Code::Unavailable);
    let (status, _) = quarantined
        .http(
            "POST",
            "/lock/acquire",
            "resource=agent:1&holder=n/b&attempt=b",
        )
        .await;
    assert_eq!(status, 503);
    quarantined.stop_within(Duration::from_secs(10)).await;

    // 2. Without the quarantine, one operation of each result the memory backend gives.
    let service = Server::start().await;
    service
        .scrape_until("callfleet_lock_service_quarantined 0")
        .await;
    let mut grpc = service.grpc().await;
    let lease = grpc
        .acquire(acquire("agent:1", "n/1"))
        .await
        .expect("acquire")
        .into_inner();
    let busy = grpc.acquire(acquire("agent:1", "n/2")).await;
    assert_eq!(busy.expect_err("held").code(), Code::AlreadyExists);
    let invalid = grpc.acquire(acquire("agent:1", "")).await;
    assert_eq!(
        invalid.expect_err("no holder").code(),
        Code::InvalidArgument
    );
    let first = grpc
        .claim_first(claim_first("n/3"))
        .await
        .expect("claim_first")
        .into_inner()
        .lease
        .expect("agent:2 is free");
    assert_eq!(first.resource, "agent:2");
    let none = grpc.claim_first(claim_first("n/4")).await.expect("answer");
    assert_eq!(none.into_inner().lease, None);
    let renew = |token| pb::RenewRequest {
        resource: "agent:1".into(),
        holder: "n/1".into(),
        token,
        validity_ms: 0,
    };
    grpc.renew(renew(lease.token)).await.expect("renew");
    let not_held = grpc.renew(renew(lease.token + 1)).await;
    assert_eq!(
        not_held.expect_err("wrong token").code(),
        Code::FailedPrecondition
    );
    let release = || pb::ReleaseRequest {
        resource: "agent:2".into(),
        holder: "n/3".into(),
        token: first.token,
    };
    grpc.release(release()).await.expect("release");
    let gone = grpc.release(release()).await;
    assert_eq!(gone.expect_err("released").code(), Code::NotFound);
    grpc.get(pb::GetRequest {
        resource: "agent:1".into(),
    })
    .await
    .expect("get");
    for waiter in ["w1", "w2"] {
        let (queue, waiter) = entry(waiter);
        grpc.join(pb::JoinRequest {
            queue,
            waiter,
            band: 1,
            ttl_ms: 10_000,
        })
        .await
        .expect("join");
    }
    let behind = grpc.claim_next(claim_next("w2")).await.expect("claim_next");
    assert!(matches!(
        behind.into_inner().outcome,
        Some(pb::claim_next_response::Outcome::NotFirst(_))
    ));
    let head = grpc.claim_next(claim_next("w1")).await.expect("claim_next");
    assert!(matches!(
        head.into_inner().outcome,
        Some(pb::claim_next_response::Outcome::Lease(_))
    ));
    for waiter in ["w1", "nobody"] {
        let (queue, waiter) = entry(waiter);
        let _ = grpc
            .touch(pb::TouchRequest {
                queue,
                waiter,
                ttl_ms: 0,
            })
            .await;
    }
    let (queue, waiter) = entry("w1");
    grpc.requeue(pb::RequeueRequest { queue, waiter })
        .await
        .expect("requeue");
    for _ in 0..2 {
        let (queue, waiter) = entry("w1");
        grpc.leave(pb::LeaveRequest { queue, waiter })
            .await
            .expect("leave");
    }
    grpc.order_status(pb::OrderStatusRequest { queue: "q1".into() })
        .await
        .expect("order_status");
    let (status, body) = service
        .http(
            "POST",
            "/lock/acquire",
            "resource=agent:9&holder=n/9&attempt=9",
        )
        .await;
    assert!(status == 200 && body.starts_with("OK "), "{status} {body}");
    service.stop_within(Duration::from_secs(10)).await;

    // 3. Redis is not there: 2 acquires unavailable, each a backend error.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let redis = Server::start_with(LockServiceConfig {
        backend: LockBackendKind::Redis,
        redis_url: format!("redis://{closed}/0"),
        ..LockServiceConfig::default()
    })
    .await;
    let mut grpc = redis.grpc().await;
    for holder in ["n/r1", "n/r2"] {
        let failed = grpc.acquire(acquire("agent:1", holder)).await;
        assert_eq!(failed.expect_err("no redis").code(), Code::Unavailable);
    }
    let text = redis
        .scrape_until("callfleet_lock_service_backend_errors_total{backend=\"redis\"} 2")
        .await;
    redis.stop_within(Duration::from_secs(10)).await;

    let counted = |kind: &str, results: &[(&str, u64)]| {
        results
            .iter()
            .map(move |(result, n)| {
                format!(
                    "callfleet_lock_service_operations_total{{kind=\"{kind}\",result=\"{result}\"}} {n}"
                )
            })
            .collect::<Vec<_>>()
    };
    let mut expected: Vec<String> = [
        counted(
            "acquire",
            &[("ok", 2), ("busy", 1), ("invalid", 1), ("unavailable", 4)],
        ),
        counted(
            "claim_first",
            &[("ok", 1), ("busy", 1), ("invalid", 0), ("unavailable", 0)],
        ),
        counted(
            "claim_next",
            &[
                ("ok", 1),
                ("busy", 0),
                ("not_first", 1),
                ("not_waiting", 0),
                ("invalid", 0),
                ("unavailable", 0),
            ],
        ),
        counted(
            "renew",
            &[
                ("ok", 1),
                ("gone", 0),
                ("not_held", 1),
                ("invalid", 0),
                ("unavailable", 0),
            ],
        ),
        counted(
            "release",
            &[
                ("ok", 1),
                ("gone", 1),
                ("not_held", 0),
                ("invalid", 0),
                ("unavailable", 0),
            ],
        ),
        counted("get", &[("ok", 1), ("invalid", 0), ("unavailable", 0)]),
        counted(
            "join",
            &[
                ("ok", 2),
                ("queue_full", 0),
                ("invalid", 0),
                ("unavailable", 0),
            ],
        ),
        counted(
            "touch",
            &[
                ("ok", 1),
                ("not_waiting", 1),
                ("invalid", 0),
                ("unavailable", 0),
            ],
        ),
        counted(
            "leave",
            &[
                ("ok", 1),
                ("not_waiting", 1),
                ("invalid", 0),
                ("unavailable", 0),
            ],
        ),
        counted(
            "requeue",
            &[
                ("ok", 1),
                ("not_waiting", 0),
                ("invalid", 0),
                ("unavailable", 0),
            ],
        ),
        counted(
            "order_status",
            &[("ok", 1), ("invalid", 0), ("unavailable", 0)],
        ),
    ]
    .concat();
    expected.sort();
    assert_eq!(
        series(&text, "callfleet_lock_service_operations_total"),
        expected
    );

    let mut durations: Vec<String> = [
        ("acquire", 8),
        ("claim_first", 2),
        ("claim_next", 2),
        ("renew", 2),
        ("release", 2),
        ("get", 1),
        ("join", 2),
        ("touch", 2),
        ("leave", 2),
        ("requeue", 1),
        ("order_status", 1),
    ]
    .iter()
    .map(|(kind, n)| {
        format!("callfleet_lock_service_operation_duration_seconds_count{{kind=\"{kind}\"}} {n}")
    })
    .collect();
    durations.sort();
    assert_eq!(
        series(
            &text,
            "callfleet_lock_service_operation_duration_seconds_count"
        ),
        durations
    );
    // Every acquire took well under 10 s, the last finite bucket.
    assert!(
        text.lines().any(|l| l
            == "callfleet_lock_service_operation_duration_seconds_bucket{kind=\"acquire\",le=\"10\"} 8"),
        "{text}"
    );
    assert_eq!(
        series(&text, "callfleet_lock_service_backend_errors_total"),
        [
            "callfleet_lock_service_backend_errors_total{backend=\"memory\"} 0",
            "callfleet_lock_service_backend_errors_total{backend=\"redis\"} 2",
        ]
    );
    assert_eq!(
        series(&text, "callfleet_lock_service_quarantined"),
        ["callfleet_lock_service_quarantined 0"]
    );
}
