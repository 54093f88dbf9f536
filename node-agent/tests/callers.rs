//! The node-agent's caller directory against the real control plane
//! (`callfleet_control_plane::run` on SQLite on a loopback port), looked up with a `node`
//! token as a node-agent does:
//!
//! - a listed number answers its attributes, in any spelling; an unlisted number answers
//!   none; both are then served from the cache until `fresh`, and a list changed through
//!   the REST API shows on the first lookup after `fresh`, not before;
//! - a caller id that is no number (`anonymous`) is not asked about;
//! - with the control plane stopped, a lookup costs a call no more than a refused
//!   connection and then nothing at all for `retry_after`: cached answers are served stale
//!   up to `stale_max`, other numbers go on without list attributes; a control plane back
//!   is asked again;
//! - a control plane that accepts connections but never answers costs one call the
//!   deadline, and the calls after it nothing;
//! - a refused token is an outage, not an empty answer;
//! - the cache holds at most `cached` numbers, dropping the least recently asked.

mod support;

use std::time::Duration;

use axum::http::{Method, StatusCode};
use callfleet_core::config::Secret;
use callfleet_node_agent::queue::callers::{CallerDirectory, CallerLookup, Outcome, Settings};
use serde_json::json;
use support::{CRM, NODE, Plane, rest};
use tokio::net::TcpListener;
use tokio::time::Instant;

fn settings() -> Settings {
    Settings {
        fresh: Duration::from_millis(300),
        deadline: Duration::from_millis(200),
        stale_max: Duration::from_secs(600),
        retry_after: Duration::from_millis(500),
        cached: 64,
    }
}

impl Plane {
    fn directory(&self, token: &str, settings: Settings) -> CallerDirectory {
        CallerDirectory::new(&self.url(), token, settings).expect("directory")
    }

    /// Sets `number`'s attributes with the CRM's token.
    async fn list(&self, number: &str, attributes: &[&str]) {
        let (status, json) = rest(
            self.address,
            Method::PUT,
            &format!("/callers/{number}/attributes"),
            CRM,
            Some(json!({ "attributes": attributes })),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "PUT {number}: {json}");
    }
}

/// What a lookup gave: the number, the attributes and the outcome's kind.
fn seen(lookup: &CallerLookup) -> (Option<&str>, Vec<&str>, &'static str) {
    let kind = match lookup.outcome {
        Outcome::Fresh => "fresh",
        Outcome::Answered => "answered",
        Outcome::Stale { .. } => "stale",
        Outcome::Unavailable { .. } => "unavailable",
        Outcome::Refused { .. } => "refused",
        Outcome::NotANumber => "not a number",
    };
    (
        lookup.number.as_deref(),
        lookup.attributes.iter().map(String::as_str).collect(),
        kind,
    )
}

/// The lookup and how long it took.
async fn timed(directory: &CallerDirectory, number: &str) -> (CallerLookup, Duration) {
    let started = Instant::now();
    let lookup = directory.lookup(number).await;
    (lookup, started.elapsed())
}

#[tokio::test]
async fn listed_numbers_answer_their_attributes_and_the_cache_follows_a_change_after_fresh() {
    let plane = Plane::run().await;
    plane.list("+4930123456", &["vip", "gold"]).await;
    let directory = plane.directory(NODE, settings());

    let lookup = directory.lookup("+49 (30) 123-456").await;
    assert_eq!(
        seen(&lookup),
        (Some("+4930123456"), vec!["gold", "vip"], "answered")
    );
    assert_eq!(
        lookup.merged_with(&["fr".to_owned()]),
        ["fr", "gold", "vip"]
    );
    assert_eq!(
        seen(&directory.lookup("+4930123456").await),
        (Some("+4930123456"), vec!["gold", "vip"], "fresh")
    );
    assert_eq!(
        seen(&directory.lookup("+4930999").await),
        (Some("+4930999"), vec![], "answered"),
        "a number no list names is an ordinary caller"
    );
    assert_eq!(
        seen(&directory.lookup("+4930999").await),
        (Some("+4930999"), vec![], "fresh")
    );
    for not_a_number in ["anonymous", "", "unknown", "+49 30 abc"] {
        assert_eq!(
            seen(&directory.lookup(not_a_number).await),
            (None, vec![], "not a number"),
            "{not_a_number:?}"
        );
    }
    let stats = directory.stats();
    assert_eq!(
        (stats.requests, stats.fresh, stats.failures, stats.cached),
        (2, 2, 0, 2)
    );

    // A CRM changes the list: the cache answers the old attributes until `fresh` is over.
    plane.list("+4930123456", &["es"]).await;
    assert_eq!(
        seen(&directory.lookup("+4930123456").await),
        (Some("+4930123456"), vec!["gold", "vip"], "fresh")
    );
    tokio::time::sleep(settings().fresh + Duration::from_millis(50)).await;
    assert_eq!(
        seen(&directory.lookup("+4930123456").await),
        (Some("+4930123456"), vec!["es"], "answered")
    );
    let (status, _) = rest(
        plane.address,
        Method::DELETE,
        "/callers/+4930123456",
        CRM,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    tokio::time::sleep(settings().fresh + Duration::from_millis(50)).await;
    assert_eq!(
        seen(&directory.lookup("+4930123456").await),
        (Some("+4930123456"), vec![], "answered")
    );
    assert_eq!(directory.stats().requests, 4);
    plane.stop().await;
}

#[tokio::test]
async fn with_the_control_plane_down_calls_go_on_at_once_with_cached_or_no_list_attributes() {
    let plane = Plane::run().await;
    plane.list("+4930111", &["vip"]).await;
    let settings = settings();
    let directory = plane.directory(NODE, settings.clone());
    assert_eq!(
        seen(&directory.lookup("+4930111").await),
        (Some("+4930111"), vec!["vip"], "answered")
    );
    let (dir, address) = plane.stop().await;
    tokio::time::sleep(settings.fresh + Duration::from_millis(50)).await;

    // The first lookup finds the connection refused, well within the deadline, and serves
    // the cached answer; the next ones ask nobody.
    let (lookup, took) = timed(&directory, "+4930111").await;
    assert_eq!(seen(&lookup), (Some("+4930111"), vec!["vip"], "stale"));
    assert!(took < settings.deadline, "took {took:?}");
    let Outcome::Stale { age, reason } = &lookup.outcome else {
        unreachable!()
    };
    assert!(*age > settings.fresh, "{age:?}");
    assert!(!reason.is_empty());
    let (lookup, took) = timed(&directory, "+4930222").await;
    assert_eq!(seen(&lookup), (Some("+4930222"), vec![], "unavailable"));
    assert!(took < Duration::from_millis(20), "took {took:?}");
    assert_eq!(
        lookup.outcome,
        Outcome::Unavailable {
            reason: "a request failed less than 500ms ago".into()
        }
    );
    assert_eq!(
        seen(&directory.lookup("+4930111").await),
        (Some("+4930111"), vec!["vip"], "stale")
    );
    let stats = directory.stats();
    assert_eq!(
        (
            stats.requests,
            stats.failures,
            stats.stale,
            stats.unavailable
        ),
        (2, 1, 2, 1),
        "one request failed, then the cache answered alone"
    );

    // After the quiet period one lookup asks again (and fails), and the control plane
    // back is asked and answers.
    tokio::time::sleep(settings.retry_after).await;
    let (lookup, took) = timed(&directory, "+4930222").await;
    assert_eq!(seen(&lookup), (Some("+4930222"), vec![], "unavailable"));
    assert!(took < settings.deadline, "took {took:?}");
    assert_eq!(directory.stats().requests, 3);
    let plane = Plane::run_in(dir, &address.to_string()).await;
    tokio::time::sleep(settings.retry_after).await;
    assert_eq!(
        seen(&directory.lookup("+4930111").await),
        (Some("+4930111"), vec!["vip"], "answered")
    );
    assert_eq!(
        seen(&directory.lookup("+4930222").await),
        (Some("+4930222"), vec![], "answered")
    );
    plane.stop().await;
}

#[tokio::test]
async fn stale_answers_are_served_up_to_stale_max_and_not_after() {
    let plane = Plane::run().await;
    plane.list("+4930111", &["vip"]).await;
    let settings = Settings {
        fresh: Duration::from_millis(100),
        stale_max: Duration::from_millis(700),
        retry_after: Duration::from_millis(100),
        ..settings()
    };
    let directory = plane.directory(NODE, settings.clone());
    assert_eq!(
        seen(&directory.lookup("+4930111").await),
        (Some("+4930111"), vec!["vip"], "answered")
    );
    plane.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        seen(&directory.lookup("+4930111").await),
        (Some("+4930111"), vec!["vip"], "stale")
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        seen(&directory.lookup("+4930111").await),
        (Some("+4930111"), vec![], "unavailable"),
        "past stale_max the caller goes on without the list's attributes"
    );
}

#[tokio::test]
async fn a_control_plane_that_never_answers_costs_one_call_the_deadline_and_the_next_nothing() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            sockets.push(socket);
        }
    });
    let settings = settings();
    let directory = CallerDirectory::new(&format!("http://{address}"), NODE, settings.clone())
        .expect("directory");
    let (lookup, took) = timed(&directory, "+4930111").await;
    assert_eq!(
        lookup.outcome,
        Outcome::Unavailable {
            reason: "no answer within 200ms".into()
        }
    );
    assert!(
        took >= settings.deadline && took < settings.deadline + Duration::from_millis(300),
        "took {took:?}"
    );
    let (lookup, took) = timed(&directory, "+4930222").await;
    assert_eq!(seen(&lookup), (Some("+4930222"), vec![], "unavailable"));
    assert!(took < Duration::from_millis(20), "took {took:?}");
    assert_eq!(directory.stats().requests, 1);
    held.abort();
}

#[tokio::test]
async fn a_refused_token_is_an_outage_not_an_empty_answer() {
    let plane = Plane::run().await;
    plane.list("+4930111", &["vip"]).await;
    let directory = plane.directory("not-a-token-of-this-plane-0123", settings());
    let lookup = directory.lookup("+4930111").await;
    let Outcome::Unavailable { reason } = &lookup.outcome else {
        panic!("a refused token: {lookup:?}")
    };
    assert_eq!(
        reason,
        "token refused with status 401 Unauthorized: the bearer token is not known; check control_plane.tokens; provisioning.token needs a control-plane token with role \"node\""
    );
    assert_eq!(directory.stats().failures, 1);
    plane.stop().await;
}

#[tokio::test]
async fn the_cache_holds_at_most_cached_numbers_dropping_the_least_recently_asked() {
    let plane = Plane::run().await;
    let directory = plane.directory(
        NODE,
        Settings {
            fresh: Duration::from_secs(60),
            cached: 2,
            ..settings()
        },
    );
    for number in ["+4930001", "+4930002", "+4930001", "+4930003"] {
        directory.lookup(number).await;
    }
    assert_eq!(
        (directory.stats().requests, directory.stats().cached),
        (3, 2)
    );
    // `+4930002` was asked least recently: it went, the other two are fresh.
    assert_eq!(seen(&directory.lookup("+4930001").await).2, "fresh");
    assert_eq!(seen(&directory.lookup("+4930003").await).2, "fresh");
    assert_eq!(seen(&directory.lookup("+4930002").await).2, "answered");
    assert_eq!(directory.stats().requests, 4);
    plane.stop().await;
}

#[tokio::test]
async fn a_node_agent_s_config_makes_a_directory_of_its_control_plane() {
    let plane = Plane::run().await;
    plane.list("+4930111", &["vip"]).await;
    let mut config = callfleet_core::config::Config::default();
    config.provisioning.control_plane = format!("http://{}/", plane.address);
    config.provisioning.token = Secret::new(NODE);
    assert_eq!(
        Settings::from_config(&config.node.queue),
        Settings {
            fresh: Duration::from_secs(5),
            deadline: Duration::from_millis(200),
            stale_max: Duration::from_secs(600),
            retry_after: Duration::from_secs(2),
            cached: 10_000,
        }
    );
    assert_eq!(
        Settings::default(),
        Settings::from_config(&config.node.queue)
    );
    config.node.queue.callers_fresh = Duration::ZERO;
    let directory = CallerDirectory::from_config(&config).expect("directory");
    assert_eq!(
        seen(&directory.lookup("+4930111").await),
        (Some("+4930111"), vec!["vip"], "answered")
    );
    assert_eq!(
        seen(&directory.lookup("+4930111").await),
        (Some("+4930111"), vec!["vip"], "answered"),
        "callers_fresh = 0s: every lookup asks"
    );
    assert_eq!(directory.stats().requests, 2);
    plane.stop().await;
}
