//! The node-agent's candidates source against the real control plane, on SQLite on a
//! loopback port, asked with a `node` token as a node-agent asks:
//!
//! - the answer is the control plane's, in its order; a priority changed through the REST
//!   API shows on the first ask after `fresh`, not before;
//! - with the control plane stopped, the cached answer is served marked stale, with exactly
//!   one request per `retry_after`; past `stale_max` there is none; a control plane back is
//!   asked again;
//! - 20 concurrent asks of one key send exactly one request;
//! - an asker that goes away mid-request (a caller hanging up) leaves the others answered;
//! - a slow answer is cut at the deadline and the cache answers;
//! - an unknown queue is an error, and a queue deleted loses its cached answer;
//! - the cache holds at most `cached` answers, dropping the least recently asked;
//! - a node token reads candidates and nothing else (the role change's negative control).
//!
//! Most tests run `callfleet_control_plane::run` itself. Counting the requests that reach
//! the control plane, and holding one back, `run` cannot do: those tests serve the control
//! plane's own router (`router_with`, the one `run` serves, with its refresh loop) behind a
//! middleware that counts and delays requests to `/candidates`. The answers are still the
//! control plane's.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::{Method, StatusCode};
use callfleet_control_plane::Control;
use callfleet_node_agent::queue::candidates::{
    Candidate, CandidatesError, CandidatesSource, Settings,
};
use serde_json::{Value, json};
use support::{NODE, Plane, control_config, crm, rest, store};
use tokio::time::Instant;

fn settings() -> Settings {
    Settings {
        fresh: Duration::from_millis(200),
        deadline: Duration::from_millis(500),
        stale_max: Duration::from_secs(600),
        retry_after: Duration::from_secs(2),
        cached: 64,
    }
}

/// Requests to `/candidates` that reached the control plane, and how long each is held.
#[derive(Default)]
struct Gate {
    seen: AtomicU64,
    delay_ms: AtomicU64,
}

impl Gate {
    fn seen(&self) -> u64 {
        self.seen.load(Ordering::SeqCst)
    }
}

impl Plane {
    /// The control plane's router, as `run` serves it, behind a counting, delaying gate.
    async fn gated() -> (Self, Arc<Gate>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = control_config();
        let control = Arc::new(
            Control::start(store(&dir).await, &config)
                .await
                .expect("control plane starts"),
        );
        let gate = Arc::new(Gate::default());
        let app = callfleet_control_plane::router_with(control.clone(), &config).layer(
            axum::middleware::from_fn_with_state(gate.clone(), count_and_hold),
        );
        let plane = Self::serve(dir, "127.0.0.1:0", |listener, shutdown| async move {
            let refresh = shutdown.clone();
            let refresher = tokio::spawn(async move {
                control.refresh_loop(Duration::from_secs(1), refresh).await;
            });
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
                .expect("serve");
            let _ = refresher.await;
        })
        .await;
        (plane, gate)
    }

    fn source(&self, settings: Settings) -> CandidatesSource {
        CandidatesSource::new(&self.url(), NODE, settings).expect("source")
    }
}

async fn count_and_hold(
    axum::extract::State(gate): axum::extract::State<Arc<Gate>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if request.uri().path().ends_with("/candidates") {
        gate.seen.fetch_add(1, Ordering::SeqCst);
        let delay = gate.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }
    next.run(request).await
}

/// Queue `sales` with four agents logged in: 1001 (priority 2), 1002 (1, tagged vip),
/// 1003 (1), 1004 (3), seated in that order.
async fn seed(plane: SocketAddr) {
    crm(
        plane,
        Method::PUT,
        "/queues/sales",
        Some(json!({ "name": "Sales" })),
    )
    .await;
    for (agent, priority, tags) in [
        ("1001", 2, json!([])),
        ("1002", 1, json!(["vip"])),
        ("1003", 1, json!([])),
        ("1004", 3, json!([])),
    ] {
        let device = format!("20{}", &agent[2..]);
        crm(
            plane,
            Method::PUT,
            &format!("/devices/{device}"),
            Some(json!({ "endpoint": format!("PJSIP/{device}") })),
        )
        .await;
        crm(
            plane,
            Method::PUT,
            &format!("/agents/{agent}"),
            Some(json!({ "name": format!("agent {agent}"), "tags": tags })),
        )
        .await;
        crm(
            plane,
            Method::PUT,
            &format!("/queues/sales/members/{agent}"),
            Some(json!({ "priority": priority })),
        )
        .await;
        crm(
            plane,
            Method::POST,
            &format!("/agents/{agent}/login"),
            Some(json!({ "device": device })),
        )
        .await;
        // Distinct idle times, so the order among equal priorities is fixed.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// The control plane's own answer over REST, as candidates.
async fn control_planes_answer(plane: SocketAddr, query: &str) -> Vec<Candidate> {
    let json = crm(
        plane,
        Method::GET,
        &format!("/queues/sales/candidates{query}"),
        None,
    )
    .await;
    json["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .map(|c| serde_json::from_value(c.clone()).expect("a candidate"))
        .collect()
}

fn agents(list: &[Candidate]) -> Vec<&str> {
    list.iter().map(|c| c.agent.as_str()).collect()
}

#[tokio::test]
async fn the_answer_is_the_control_planes_and_a_priority_change_shows_after_fresh() {
    let plane = Plane::run().await;
    seed(plane.address).await;
    // The default `fresh`, roomy enough to change a priority within it.
    let settings = Settings {
        fresh: Duration::from_secs(1),
        ..settings()
    };
    let source = plane.source(settings.clone());

    let fetched = Instant::now();
    let plain = source
        .candidates::<&str>("sales", &[])
        .await
        .expect("plain");
    assert!(!plain.stale);
    assert_eq!(agents(&plain.list), ["1002", "1003", "1001", "1004"]);
    assert_eq!(&*plain.list, control_planes_answer(plane.address, "").await);
    assert_eq!(
        plain.list[0],
        Candidate {
            agent: "1002".into(),
            endpoint: "PJSIP/2002".into(),
            priority: 1,
            demoted: false,
            free_at_ms: None,
        }
    );
    // A VIP caller: the vip agent alone while free. Order and copies make one key.
    let vip = source.candidates("sales", &["vip"]).await.expect("vip");
    assert_eq!(
        &*vip.list,
        control_planes_answer(plane.address, "?attributes=vip").await
    );
    assert_eq!(agents(&vip.list), ["1002"]);
    let again = source
        .candidates("sales", &["vip", " vip", ""])
        .await
        .expect("vip again");
    assert_eq!(again.list, vip.list);
    let stats = source.stats();
    assert_eq!((stats.requests, stats.fresh, stats.cached), (2, 1, 2));

    // 1004 becomes the first choice through the REST API: not seen while the answer is
    // fresh, seen on the first ask after.
    crm(
        plane.address,
        Method::PUT,
        "/queues/sales/members/1004",
        Some(json!({ "priority": 0 })),
    )
    .await;
    let expected = control_planes_answer(plane.address, "").await;
    assert_eq!(agents(&expected), ["1004", "1002", "1003", "1001"]);
    let fresh = source
        .candidates::<&str>("sales", &[])
        .await
        .expect("fresh");
    assert!(
        fetched.elapsed() < settings.fresh,
        "the change took longer than fresh; the check below would not hold"
    );
    assert_eq!(fresh.list, plain.list, "a fresh answer is served as cached");
    assert_eq!(source.stats().requests, 2);
    tokio::time::sleep_until(fetched + settings.fresh + Duration::from_millis(10)).await;
    let next = source.candidates::<&str>("sales", &[]).await.expect("next");
    assert!(!next.stale);
    assert_eq!(&*next.list, expected);
    assert_eq!(source.stats().requests, 3);
    plane.stop().await;
}

#[tokio::test]
async fn a_stopped_control_plane_leaves_the_cached_answer_served_stale_with_bounded_requests() {
    let plane = Plane::run().await;
    seed(plane.address).await;
    let settings = Settings {
        retry_after: Duration::from_secs(1),
        stale_max: Duration::from_secs(3),
        ..settings()
    };
    let source = plane.source(settings.clone());
    let cached = source
        .candidates::<&str>("sales", &[])
        .await
        .expect("first");
    let (dir, address) = plane.stop().await;

    // Past `fresh`: one request fails, the cached answer is served, marked stale.
    tokio::time::sleep(settings.fresh).await;
    let stale = source
        .candidates::<&str>("sales", &[])
        .await
        .expect("stale");
    assert!(stale.stale);
    assert_eq!(stale.list, cached.list);
    assert!(stale.age >= settings.fresh);
    assert_eq!((source.stats().requests, source.stats().failures), (2, 1));
    // Within `retry_after` of that failure nobody asks: 100 asks, no request.
    let started = Instant::now();
    for _ in 0..100 {
        let answer = source
            .candidates::<&str>("sales", &[])
            .await
            .expect("stale");
        assert!(answer.stale);
        assert_eq!(answer.list, cached.list);
    }
    // A key never answered has nothing to serve, and is not asked either.
    let never = source
        .candidates("sales", &["fr"])
        .await
        .expect_err("nothing cached");
    assert!(
        matches!(&never, CandidatesError::Unavailable { queue, .. } if queue == "sales"),
        "{never}"
    );
    assert!(
        started.elapsed() < settings.retry_after,
        "the asks took longer than retry_after; the count below would not hold"
    );
    let stats = source.stats();
    assert_eq!((stats.requests, stats.stale, stats.failures), (2, 101, 1));

    // Past `stale_max` the answer is too old to ring on: an error that says why.
    tokio::time::sleep_until(started + settings.stale_max).await;
    let gone = source
        .candidates::<&str>("sales", &[])
        .await
        .expect_err("too old");
    let text = gone.to_string();
    assert!(
        text.contains("`sales`") && text.contains("cannot answer") && text.contains("3s"),
        "{text}"
    );
    assert_eq!(source.stats().requests, 3);

    // The control plane back on its address and store: asked again after retry_after.
    let plane = Plane::run_in(dir, &address.to_string()).await;
    tokio::time::sleep(settings.retry_after).await;
    let back = source.candidates::<&str>("sales", &[]).await.expect("back");
    assert!(!back.stale);
    assert_eq!(back.list, cached.list);
    assert_eq!(source.stats().requests, 4);
    plane.stop().await;
}

#[tokio::test]
async fn twenty_concurrent_asks_share_one_request() {
    let (plane, gate) = Plane::gated().await;
    seed(plane.address).await;
    // Held long enough that all twenty ask while it is in flight.
    gate.delay_ms.store(200, Ordering::SeqCst);
    let source = plane.source(settings());
    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let asks: Vec<_> = (0..20)
        .map(|i| {
            let (source, barrier) = (source.clone(), barrier.clone());
            // Two spellings of one attribute set: one key.
            let attributes: Vec<&str> = if i % 2 == 0 {
                vec!["vip", "fr"]
            } else {
                vec!["fr", "vip", "fr"]
            };
            tokio::spawn(async move {
                barrier.wait().await;
                source.candidates("sales", &attributes).await
            })
        })
        .collect();
    let mut lists = Vec::new();
    for ask in asks {
        let answer = ask.await.expect("task").expect("candidates");
        assert!(!answer.stale);
        lists.push(answer.list);
    }
    assert_eq!(gate.seen(), 1, "requests that reached the control plane");
    assert_eq!(source.stats().requests, 1);
    gate.delay_ms.store(0, Ordering::SeqCst);
    let expected = control_planes_answer(plane.address, "?attributes=fr,vip").await;
    assert!(lists.iter().all(|list| **list == *expected));
    plane.stop().await;
}

#[tokio::test]
async fn a_slow_answer_is_cut_at_the_deadline_and_the_cache_answers() {
    let (plane, gate) = Plane::gated().await;
    seed(plane.address).await;
    let settings = Settings {
        deadline: Duration::from_millis(300),
        ..settings()
    };
    let source = plane.source(settings.clone());
    let cached = source
        .candidates::<&str>("sales", &[])
        .await
        .expect("first");
    tokio::time::sleep(settings.fresh).await;

    gate.delay_ms.store(3_000, Ordering::SeqCst);
    let asked = Instant::now();
    let stale = source
        .candidates::<&str>("sales", &[])
        .await
        .expect("stale");
    let waited = asked.elapsed();
    assert!(stale.stale);
    assert_eq!(stale.list, cached.list);
    assert!(
        waited >= settings.deadline && waited < settings.deadline + Duration::from_millis(400),
        "waited {waited:?} for a deadline of {:?}",
        settings.deadline
    );
    // Nothing cached for another key: a clear error, at once (the quiet period).
    let asked = Instant::now();
    let err = source
        .candidates("sales", &["vip"])
        .await
        .expect_err("nothing cached");
    assert!(asked.elapsed() < Duration::from_millis(50));
    assert!(matches!(err, CandidatesError::Unavailable { .. }), "{err}");
    assert_eq!(gate.seen(), 2);
    assert_eq!((source.stats().requests, source.stats().failures), (2, 1));
    gate.delay_ms.store(0, Ordering::SeqCst);
    plane.stop().await;
}

#[tokio::test]
async fn an_unknown_queue_is_an_error_and_a_deleted_queue_loses_its_cached_answer() {
    let plane = Plane::run().await;
    seed(plane.address).await;
    let source = plane.source(settings());

    let unknown = source
        .candidates::<&str>("nope", &[])
        .await
        .expect_err("unknown");
    assert!(
        matches!(&unknown, CandidatesError::UnknownQueue { queue, message }
            if queue == "nope" && message.contains("`nope`")),
        "{unknown:?}"
    );
    // A 404 is an answer, not an outage: the next queue is asked at once.
    crm(
        plane.address,
        Method::PUT,
        "/queues/support",
        Some(json!({ "name": "Support" })),
    )
    .await;
    let empty = source
        .candidates::<&str>("support", &[])
        .await
        .expect("support");
    assert!(empty.list.is_empty() && !empty.stale);
    assert_eq!(source.stats().cached, 1);

    crm(plane.address, Method::DELETE, "/queues/support", None).await;
    tokio::time::sleep(settings().fresh).await;
    let deleted = source
        .candidates::<&str>("support", &[])
        .await
        .expect_err("deleted");
    assert!(
        matches!(deleted, CandidatesError::UnknownQueue { .. }),
        "{deleted}"
    );
    assert_eq!(source.stats().cached, 0);
    // With the control plane gone, nothing of the deleted queue is served stale.
    plane.stop().await;
    let after = source
        .candidates::<&str>("support", &[])
        .await
        .expect_err("nothing to serve");
    assert!(
        matches!(after, CandidatesError::Unavailable { .. }),
        "{after}"
    );
    let stats = source.stats();
    assert_eq!((stats.requests, stats.stale, stats.failures), (4, 0, 1));
}

#[tokio::test]
async fn a_node_token_reads_candidates_and_nothing_else() {
    let plane = Plane::run().await;
    seed(plane.address).await;
    let (status, json) = rest(
        plane.address,
        Method::GET,
        "/queues/sales/candidates?attributes=vip",
        NODE,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["candidates"][0]["agent"], "1002");

    // The negative control: the same token can neither change nor read the directory.
    let (status, json) = rest(
        plane.address,
        Method::PUT,
        "/agents/1001",
        NODE,
        Some(json!({ "name": "Mallory" })),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{json}");
    assert!(
        json["error"]
            .as_str()
            .is_some_and(|e| e.contains("node:pbx-1") && e.contains("Node")),
        "{json}"
    );
    for (method, path) in [
        (Method::GET, "/agents"),
        (Method::GET, "/queues/sales/members"),
        (Method::PUT, "/queues/sales/members/1001"),
    ] {
        let body = (method == Method::PUT).then(|| json!({ "priority": 9 }));
        let (status, json) = rest(plane.address, method.clone(), path, NODE, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {json}");
    }
    assert_eq!(
        crm(plane.address, Method::GET, "/agents/1001", None).await["name"],
        "agent 1001"
    );

    // A token the control plane does not know: no candidates, and the error says which
    // token to give.
    let stranger = CandidatesSource::new(&plane.url(), "not-a-token-of-ours-at-all", settings())
        .expect("source");
    let refused = stranger
        .candidates::<&str>("sales", &[])
        .await
        .expect_err("refused");
    let text = refused.to_string();
    assert!(
        text.contains("401") && text.contains("role \"node\""),
        "{text}"
    );
    plane.stop().await;
}

/// `1002` and `1003` end calls: 1002's wrap-up ends within twice `fresh` (listed with its
/// end, and still first: priority ranks before idle time), 1003's in a minute (not listed).
#[tokio::test]
async fn agents_whose_wrap_up_ends_soon_are_listed_with_its_end() {
    let plane = Plane::run().await;
    seed(plane.address).await;
    let settings = Settings {
        fresh: Duration::from_secs(2),
        ..settings()
    };
    let source = plane.source(settings);
    let node = |agent: &'static str, event: Value| {
        let address = plane.address;
        async move {
            let path = format!("/agents/{agent}/call-events");
            let (status, json) = rest(address, Method::POST, &path, NODE, Some(event)).await;
            assert_eq!(status, StatusCode::OK, "{path}: {json}");
            json
        }
    };
    let mut ends = Vec::new();
    for (agent, wrap_up_ms) in [("1002", 3_000), ("1003", 60_000)] {
        node(agent, json!({ "event": "answered", "queue": "sales" })).await;
        let ended = node(agent, json!({ "event": "ended", "wrap_up_ms": wrap_up_ms })).await;
        ends.push(ended["until_ms"].as_u64().expect("until_ms"));
    }
    let answer = source
        .candidates::<&str>("sales", &[])
        .await
        .expect("candidates");
    let listed: Vec<(&str, Option<u64>)> = answer
        .list
        .iter()
        .map(|c| (c.agent.as_str(), c.free_at_ms))
        .collect();
    assert_eq!(
        listed,
        [("1002", Some(ends[0])), ("1001", None), ("1004", None)]
    );
    assert!(!answer.list[0].free_at(ends[0] - 1));
    assert!(answer.list[0].free_at(ends[0]));
    assert!(answer.list[1].free_at(0));
    plane.stop().await;
}

#[tokio::test]
async fn the_cache_keeps_at_most_cached_answers_and_drops_the_least_recently_asked() {
    let plane = Plane::run().await;
    seed(plane.address).await;
    let settings = Settings {
        fresh: Duration::from_secs(60),
        cached: 2,
        ..settings()
    };
    let source = plane.source(settings);
    for attributes in [&[][..], &["vip"], &[]] {
        source.candidates("sales", attributes).await.expect("asked");
    }
    // `[]` asked last; `fr` takes the place of `vip`, the least recently asked.
    source.candidates("sales", &["fr"]).await.expect("fr");
    let stats = source.stats();
    assert_eq!((stats.requests, stats.fresh, stats.cached), (3, 1, 2));
    source.candidates::<&str>("sales", &[]).await.expect("kept");
    source
        .candidates("sales", &["vip"])
        .await
        .expect("asked again");
    let stats = source.stats();
    assert_eq!((stats.requests, stats.fresh, stats.cached), (4, 2, 2));
    plane.stop().await;
}

#[tokio::test]
async fn an_asker_that_goes_away_mid_request_leaves_the_others_answered() {
    let (plane, gate) = Plane::gated().await;
    seed(plane.address).await;
    gate.delay_ms.store(300, Ordering::SeqCst);
    let source = plane.source(settings());
    // The first asker runs the request; its caller hangs up while it is held.
    let first = {
        let source = source.clone();
        tokio::spawn(async move { source.candidates::<&str>("sales", &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = {
        let source = source.clone();
        tokio::spawn(async move { source.candidates::<&str>("sales", &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    first.abort();
    let answer = second.await.expect("task").expect("answered");
    assert!(!answer.stale);
    assert_eq!(agents(&answer.list), ["1002", "1003", "1001", "1004"]);
    // The waiter ran the request again itself: two reached the control plane.
    assert_eq!(gate.seen(), 2);
    assert_eq!(source.stats().requests, 2);
    gate.delay_ms.store(0, Ordering::SeqCst);
    plane.stop().await;
}
