//! The endpoint over real sockets, against a stand-in control plane.
//!
//! The stand-in is a small axum server used only to inject faults (answer, fail with 500,
//! hang past the deadline, refuse the token, stop listening) and to record what reaches it;
//! the real control plane's realtime API is exercised by the end-to-end tests.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use callfleet_core::config::Secret;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use super::*;

const TOKEN: &str = "node-token-for-tests";

/// A registration as res_sorcery_realtime stores it (id `2001;@abc`).
const CONTACT_STORE: &str =
    "id=2001%3B%40abc&uri=sip%3A2001%40127.0.0.1%3A5071&endpoint=2001&expiration_time=1764000000";
/// The same row as a read answers it.
const CONTACT_ROW: &str =
    "id=2001%3B%40abc&uri=sip%3A2001%40127.0.0.1%3A5071&endpoint=2001&expiration_time=1764000000\n";
/// What Asterisk asks when it dials 2001: its contacts, by id prefix.
const CONTACTS_OF_2001: &str = "id%20LIKE=2001%3B%40%25";
const ENDPOINT_2001: &str = "id=2001&transport=transport-udp&aors=2001&auth=2001\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Answer,
    /// Answers writes after 150 ms (within the deadline).
    SlowWrites,
    Fail,
    Hang,
    Refuse,
}

/// What the stand-in answers and what reached it.
#[derive(Debug)]
struct Seen {
    mode: Mutex<Mode>,
    /// `family/operation?query body` → answer of a read (default: no row).
    rows: Mutex<HashMap<String, String>>,
    /// Write bodies answered `-1`.
    reject: Mutex<Vec<String>>,
    /// Every request: `METHOD family/operation?query body`.
    requests: Mutex<Vec<String>>,
    /// Writes answered with 200, in the order they arrived.
    writes: Mutex<Vec<String>>,
    /// `Authorization` and `Content-Type` of every request.
    headers: Mutex<Vec<(String, String)>>,
}

impl Seen {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            mode: Mutex::new(Mode::Answer),
            rows: Mutex::new(HashMap::new()),
            reject: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            writes: Mutex::new(Vec::new()),
            headers: Mutex::new(Vec::new()),
        })
    }

    fn set(&self, mode: Mode) {
        *service::lock(&self.mode) = mode;
    }

    fn answer(&self, asked: &str, rows: &str) {
        service::lock(&self.rows).insert(asked.to_owned(), rows.to_owned());
    }

    fn attempts(&self) -> usize {
        service::lock(&self.requests).len()
    }

    fn writes(&self) -> Vec<String> {
        service::lock(&self.writes).clone()
    }
}

struct StandIn {
    address: SocketAddr,
    seen: Arc<Seen>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl StandIn {
    async fn start() -> Self {
        Self::serve(Seen::new(), "127.0.0.1:0".parse().expect("an address")).await
    }

    async fn serve(seen: Arc<Seen>, address: SocketAddr) -> Self {
        let listener = TcpListener::bind(address)
            .await
            .expect("the stand-in binds");
        let address = listener.local_addr().expect("bound");
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/asterisk/realtime/{family}/{operation}", any(stand_in))
            .with_state((seen.clone(), stop.clone()));
        let serving =
            axum::serve(listener, app).with_graceful_shutdown(stop.clone().cancelled_owned());
        let task = tokio::spawn(async move {
            let _ = serving.await;
        });
        Self {
            address,
            seen,
            stop,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Stops listening (connections refused from now on).
    async fn stop(self) -> (Arc<Seen>, SocketAddr) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the stand-in stops")
            .expect("the stand-in ran");
        (self.seen, self.address)
    }
}

async fn stand_in(
    State((seen, stop)): State<(Arc<Seen>, CancellationToken)>,
    method: Method,
    headers: HeaderMap,
    Path((family, operation)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let header = |name| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    service::lock(&seen.headers).push((header(AUTHORIZATION), header(CONTENT_TYPE)));
    let query = query.map(|query| format!("?{query}")).unwrap_or_default();
    let body = String::from_utf8(body.to_vec()).expect("a form");
    let asked = format!("{family}/{operation}{query} {body}");
    service::lock(&seen.requests).push(format!("{method} {asked}"));
    let write = ["store", "update", "update2", "destroy"].contains(&operation.as_str());
    let mode = *service::lock(&seen.mode);
    match mode {
        Mode::Hang => {
            stop.cancelled().await;
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        Mode::Fail => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        Mode::SlowWrites if write => tokio::time::sleep(Duration::from_millis(150)).await,
        Mode::Refuse => return StatusCode::UNAUTHORIZED.into_response(),
        Mode::Answer | Mode::SlowWrites => {}
    }
    if write {
        let rejected = service::lock(&seen.reject).contains(&body);
        service::lock(&seen.writes).push(asked);
        return if rejected { "-1\n" } else { "1\n" }.into_response();
    }
    service::lock(&seen.rows)
        .get(&asked)
        .cloned()
        .unwrap_or_default()
        .into_response()
}

fn config(deadline: Duration, retry_after: Duration) -> ProvisioningConfig {
    ProvisioningConfig {
        listen: "127.0.0.1:0".into(),
        control_plane: String::new(),
        token: Secret::new(TOKEN),
        deadline,
        stale_max: Duration::from_secs(3600),
        retry_after,
        pending_file: String::new(),
        // Off: the tests count every request the stand-in sees.
        prefetch: Duration::ZERO,
    }
}

const DEADLINE: Duration = Duration::from_millis(300);
/// Long enough that no test sees the control plane asked again unless it waits for it.
const LONG: Duration = Duration::from_secs(600);

/// Asterisk, as far as the tests need it: requests on kept-alive connections.
struct Asterisk {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Asterisk {
    fn of(provisioning: &Provisioning) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{}", provisioning.local_addr()),
        }
    }

    async fn request(&self, method: Method, path: &str, body: &str) -> (StatusCode, String) {
        let request = axum::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("a request");
        let answer = self.client.request(request).await.expect("an answer");
        let status = answer.status();
        let body = answer
            .into_body()
            .collect()
            .await
            .expect("a body")
            .to_bytes();
        (status, String::from_utf8(body.to_vec()).expect("text"))
    }

    /// `POST /realtime/<path>`, which must answer 200.
    async fn post(&self, path: &str, body: &str) -> String {
        let (status, answer) = self
            .request(Method::POST, &format!("/realtime/{path}"), body)
            .await;
        assert_eq!(status, StatusCode::OK, "{path}: {answer}");
        answer
    }
}

async fn start(
    config: &ProvisioningConfig,
    control_plane: &str,
) -> (Provisioning, CancellationToken) {
    let shutdown = CancellationToken::new();
    let provisioning = Provisioning::start(config, control_plane, shutdown.clone())
        .await
        .expect("the endpoint starts");
    (provisioning, shutdown)
}

/// Waits (at most 10 s) until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How long `work` takes.
async fn timed<T>(work: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let out = work.await;
    (out, started.elapsed())
}

#[tokio::test]
async fn fresh_answers_are_forwarded_with_the_token_and_cached() {
    let stand_in = StandIn::start().await;
    stand_in
        .seen
        .answer("ps_endpoints/single id=2001", ENDPOINT_2001);
    stand_in.seen.answer(
        "ps_endpoints/static?file=pjsip.conf ",
        "cat_metric=0&category=global&var_name=type&var_val=global\n",
    );
    let (provisioning, shutdown) = start(&config(DEADLINE, LONG), &stand_in.url()).await;
    let asterisk = Asterisk::of(&provisioning);

    assert_eq!(
        asterisk.post("ps_endpoints/single", "id=2001").await,
        ENDPOINT_2001
    );
    let (status, file) = asterisk
        .request(
            Method::GET,
            "/realtime/ps_endpoints/static?file=pjsip.conf",
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        file,
        "cat_metric=0&category=global&var_name=type&var_val=global\n"
    );
    // The same request, path, query and body, with the node's token.
    assert_eq!(
        *service::lock(&stand_in.seen.requests),
        [
            "POST ps_endpoints/single id=2001",
            "GET ps_endpoints/static?file=pjsip.conf ",
        ]
    );
    assert_eq!(
        *service::lock(&stand_in.seen.headers),
        vec![
            (
                format!("Bearer {TOKEN}"),
                "application/x-www-form-urlencoded".to_owned()
            );
            2
        ]
    );
    // While the control plane answers, it is asked every time: a change shows at once.
    let moved = "id=2001&transport=transport-tcp&aors=2001&auth=2001\n";
    stand_in.seen.answer("ps_endpoints/single id=2001", moved);
    assert_eq!(asterisk.post("ps_endpoints/single", "id=2001").await, moved);
    assert_eq!(
        provisioning.stats(),
        Stats {
            upstream: 3,
            cached: 2,
            ..Stats::default()
        }
    );
    let key = service::cache_key(Family::Endpoints, Operation::Single, "", b"id=2001");
    let cached = service::lock(&provisioning.shared.state)
        .cache
        .get(&key)
        .map(|entry| entry.body.clone());
    assert_eq!(cached.as_deref(), Some(moved.as_bytes()));
    shutdown.cancel();
    provisioning.stopped().await.expect("stops");
}

#[tokio::test]
async fn during_an_outage_cached_answers_are_served_and_counted_stale() {
    let stand_in = StandIn::start().await;
    stand_in
        .seen
        .answer("ps_endpoints/single id=2001", ENDPOINT_2001);
    stand_in
        .seen
        .answer("ps_aors/single id=2001", "id=2001&max_contacts=1\n");
    let (provisioning, shutdown) = start(&config(DEADLINE, LONG), &stand_in.url()).await;
    let asterisk = Asterisk::of(&provisioning);
    asterisk.post("ps_endpoints/single", "id=2001").await;
    asterisk.post("ps_aors/single", "id=2001").await;

    stand_in.stop().await;
    for _ in 0..3 {
        assert_eq!(
            asterisk.post("ps_endpoints/single", "id=2001").await,
            ENDPOINT_2001
        );
    }
    for _ in 0..2 {
        assert_eq!(
            asterisk.post("ps_aors/single", "id=2001").await,
            "id=2001&max_contacts=1\n"
        );
    }
    assert_eq!(
        provisioning.stats(),
        Stats {
            upstream: 2,
            stale: 5,
            // One refused connection opened the breaker; the other four never left.
            failures: 1,
            cached: 2,
            ..Stats::default()
        }
    );
    shutdown.cancel();
    provisioning.stopped().await.expect("stops");
}

#[tokio::test]
async fn nothing_cached_answers_no_row_and_require_zero() {
    let stand_in = StandIn::start().await;
    stand_in.seen.set(Mode::Fail);
    let (provisioning, shutdown) = start(&config(DEADLINE, LONG), &stand_in.url()).await;
    let asterisk = Asterisk::of(&provisioning);
    assert_eq!(asterisk.post("ps_endpoints/single", "id=2001").await, "");
    assert_eq!(
        asterisk
            .post(
                "ps_contacts/require",
                "uri=char%3A511&expiration_time=integer4%3A11"
            )
            .await,
        "0\n"
    );
    assert_eq!(stand_in.seen.attempts(), 1, "a 500 opened the breaker");
    assert_eq!(
        provisioning.stats(),
        Stats {
            misses: 2,
            failures: 1,
            ..Stats::default()
        }
    );
    shutdown.cancel();
    provisioning.stopped().await.expect("stops");
}

#[tokio::test]
async fn answers_older_than_stale_max_are_not_served() {
    let stand_in = StandIn::start().await;
    stand_in
        .seen
        .answer("ps_endpoints/single id=2001", ENDPOINT_2001);
    let config = ProvisioningConfig {
        stale_max: Duration::from_millis(300),
        ..config(DEADLINE, LONG)
    };
    let (provisioning, shutdown) = start(&config, &stand_in.url()).await;
    let asterisk = Asterisk::of(&provisioning);
    asterisk.post("ps_endpoints/single", "id=2001").await;
    stand_in.stop().await;
    assert_eq!(
        asterisk.post("ps_endpoints/single", "id=2001").await,
        ENDPOINT_2001
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(asterisk.post("ps_endpoints/single", "id=2001").await, "");
    let stats = provisioning.stats();
    assert_eq!((stats.upstream, stats.stale, stats.misses), (1, 1, 1));
    shutdown.cancel();
    provisioning.stopped().await.expect("stops");
}

#[tokio::test]
async fn the_breaker_spares_asterisk_the_deadline_during_an_outage() {
    let stand_in = StandIn::start().await;
    stand_in
        .seen
        .answer("ps_endpoints/single id=2001", ENDPOINT_2001);
    let retry_after = Duration::from_millis(1500);
    let (provisioning, shutdown) = start(&config(DEADLINE, retry_after), &stand_in.url()).await;
    let asterisk = Asterisk::of(&provisioning);
    asterisk.post("ps_endpoints/single", "id=2001").await;
    stand_in.seen.set(Mode::Hang);
    let margin = Duration::from_millis(150);

    // The first request of the outage waits for the deadline, and no longer.
    let (answer, took) = timed(asterisk.post("ps_endpoints/single", "id=2001")).await;
    let failed_at = Instant::now();
    assert_eq!(answer, ENDPOINT_2001);
    assert!(took >= DEADLINE - Duration::from_millis(20), "{took:?}");
    assert!(took < DEADLINE + margin, "{took:?}");
    assert_eq!(stand_in.seen.attempts(), 2);

    // Then the cache answers at once: twenty requests in less than one deadline.
    let (_, took) = timed(async {
        for _ in 0..20 {
            assert_eq!(
                asterisk.post("ps_endpoints/single", "id=2001").await,
                ENDPOINT_2001
            );
        }
    })
    .await;
    assert!(took < DEADLINE, "{took:?}");
    assert_eq!(
        stand_in.seen.attempts(),
        2,
        "nobody asked during retry_after"
    );
    // A write too: queued at once.
    let (answer, took) = timed(asterisk.post("ps_contacts/store", CONTACT_STORE)).await;
    assert_eq!(answer, "1\n");
    assert!(took < margin, "{took:?}");

    // After retry_after exactly one request (here the delivery of the write, or a read)
    // tries again; everyone else still gets the cache at once.
    tokio::time::sleep_until(failed_at + retry_after + Duration::from_millis(50)).await;
    let (_, took) = timed(async {
        for _ in 0..20 {
            let (answer, took) = timed(asterisk.post("ps_endpoints/single", "id=2001")).await;
            assert_eq!(answer, ENDPOINT_2001);
            assert!(took < DEADLINE + margin, "{took:?}");
        }
    })
    .await;
    assert!(took < DEADLINE + margin, "{took:?}");
    assert_eq!(
        stand_in.seen.attempts(),
        3,
        "one attempt per retry_after window"
    );
    let stats = provisioning.stats();
    assert_eq!(stats.stale, 41);
    assert_eq!(stats.pending, 1);
    shutdown.cancel();
    provisioning.stopped().await.expect("stops");
    stand_in.stop().await;
}

#[tokio::test]
async fn writes_never_wait_past_the_deadline() {
    let stand_in = StandIn::start().await;
    stand_in.seen.set(Mode::Hang);
    let (provisioning, shutdown) = start(&config(DEADLINE, LONG), &stand_in.url()).await;
    let asterisk = Asterisk::of(&provisioning);
    let (answer, took) = timed(asterisk.post("ps_contacts/store", CONTACT_STORE)).await;
    assert_eq!(answer, "1\n");
    assert!(took >= DEADLINE - Duration::from_millis(20), "{took:?}");
    assert!(took < DEADLINE + Duration::from_millis(150), "{took:?}");
    let (answer, took) = timed(asterisk.post("ps_contacts/destroy", "id=2001%3B%40abc&")).await;
    assert_eq!(answer, "1\n");
    assert!(took < Duration::from_millis(100), "{took:?}");
    assert_eq!(provisioning.stats().pending, 2);
    shutdown.cancel();
    provisioning.stopped().await.expect("stops");
    stand_in.stop().await;
}

#[tokio::test]
async fn writes_of_an_outage_are_delivered_in_order_exactly_once() {
    let stand_in = StandIn::start().await;
    stand_in.seen.set(Mode::Fail);
    let retry_after = Duration::from_millis(200);
    let (provisioning, shutdown) = start(&config(DEADLINE, retry_after), &stand_in.url()).await;
    let asterisk = Asterisk::of(&provisioning);
    let writes = [
        ("ps_contacts/store", CONTACT_STORE),
        (
            "ps_contacts/update?id=2001%3B%40abc",
            "expiration_time=1764000060",
        ),
        (
            "ps_contacts/store",
            "id=2002%3B%40def&uri=sip%3A2002%40127.0.0.1%3A5072&endpoint=2002",
        ),
        ("ps_contacts/destroy", "id=2001%3B%40abc&"),
    ];
    for (path, body) in writes {
        assert_eq!(asterisk.post(path, body).await, "1\n");
    }
    assert_eq!(provisioning.stats().pending, 4);
    assert!(stand_in.seen.writes().is_empty());

    stand_in.seen.set(Mode::Answer);
    eventually("the queue to drain", || provisioning.stats().pending == 0).await;
    let expected: Vec<String> = writes
        .iter()
        .map(|(path, body)| format!("{path} {body}"))
        .collect();
    assert_eq!(stand_in.seen.writes(), expected);
    // A write now goes straight through, after them.
    assert_eq!(
        asterisk
            .post("ps_contacts/destroy", "id=2002%3B%40def&")
            .await,
        "1\n"
    );
    assert_eq!(stand_in.seen.writes().len(), 5);
    assert_eq!(
        stand_in.seen.writes()[4],
        "ps_contacts/destroy id=2002%3B%40def&"
    );
    let stats = provisioning.stats();
    assert_eq!(
        (
            stats.delivered,
            stats.rejected,
            stats.pending,
            stats.upstream
        ),
        (4, 0, 0, 1)
    );
    shutdown.cancel();
    provisioning.stopped().await.expect("stops");
    stand_in.stop().await;
}

#[tokio::test]
async fn a_write_the_control_plane_cannot_make_is_dropped_and_the_next_delivered() {
    let stand_in = StandIn::start().await;
    stand_in.seen.set(Mode::Fail);
    let (provisioning, shutdown) = start(
        &config(DEADLINE, Duration::from_millis(200)),
        &stand_in.url(),
    )
    .await;
    let asterisk = Asterisk::of(&provisioning);
    let bad = "id=9999%3B%40bad&endpoint=9999";
    assert_eq!(asterisk.post("ps_contacts/store", bad).await, "1\n");
    assert_eq!(
        asterisk.post("ps_contacts/store", CONTACT_STORE).await,
        "1\n"
    );
    service::lock(&stand_in.seen.reject).push(bad.to_owned());
    stand_in.seen.set(Mode::Answer);
    eventually("the queue to drain", || provisioning.stats().pending == 0).await;
    assert_eq!(
        stand_in.seen.writes(),
        [
            format!("ps_contacts/store {bad}"),
            format!("ps_contacts/store {CONTACT_STORE}")
        ]
    );
    let stats = provisioning.stats();
    assert_eq!((stats.delivered, stats.rejected), (1, 1));
    // Not replayed over reads: the control plane did not make it.
    stand_in.stop().await;
    assert_eq!(
        asterisk
            .post("ps_contacts/multi", "id%20LIKE=9999%3B%40%25")
            .await,
        ""
    );
    shutdown.cancel();
    provisioning.stopped().await.expect("stops");
}

/// Before the outage Asterisk asked for 2001's contacts (none) and for the contact by id.
async fn cache_contacts_then_stop(asterisk: &Asterisk, stand_in: StandIn) {
    assert_eq!(
        asterisk.post("ps_contacts/multi", CONTACTS_OF_2001).await,
        ""
    );
    assert_eq!(
        asterisk
            .post("ps_contacts/single", "id=2001%3B%40abc")
            .await,
        ""
    );
    stand_in.stop().await;
}

#[tokio::test]
async fn a_registration_during_an_outage_is_seen_by_reads_until_it_is_destroyed() {
    let stand_in = StandIn::start().await;
    let (provisioning, shutdown) = start(&config(DEADLINE, LONG), &stand_in.url()).await;
    let asterisk = Asterisk::of(&provisioning);
    cache_contacts_then_stop(&asterisk, stand_in).await;

    assert_eq!(
        asterisk.post("ps_contacts/store", CONTACT_STORE).await,
        "1\n"
    );
    // The phone can be dialled on this node: its contact is found by prefix and by id.
    assert_eq!(
        asterisk.post("ps_contacts/multi", CONTACTS_OF_2001).await,
        CONTACT_ROW
    );
    assert_eq!(
        asterisk
            .post("ps_contacts/single", "id=2001%3B%40abc")
            .await,
        CONTACT_ROW
    );
    assert_eq!(
        asterisk
            .post("ps_contacts/multi", "id%20LIKE=2002%3B%40%25")
            .await,
        "",
        "another phone's contacts"
    );
    // The raw cached answer never had it: the overlay shows it.
    let key = service::cache_key(
        Family::Contacts,
        Operation::Multi,
        "",
        CONTACTS_OF_2001.as_bytes(),
    );
    let raw = service::lock(&provisioning.shared.state)
        .cache
        .get(&key)
        .map(|entry| entry.body.clone());
    assert_eq!(raw.as_deref(), Some(&b""[..]));

    // A re-registration updates it; an unregistration removes it.
    assert_eq!(
        asterisk
            .post(
                "ps_contacts/update?id=2001%3B%40abc",
                "expiration_time=1764000060"
            )
            .await,
        "1\n"
    );
    assert_eq!(
        asterisk.post("ps_contacts/multi", CONTACTS_OF_2001).await,
        CONTACT_ROW.replace("1764000000", "1764000060")
    );
    assert_eq!(
        asterisk
            .post("ps_contacts/destroy", "id=2001%3B%40abc&")
            .await,
        "1\n"
    );
    assert_eq!(
        asterisk.post("ps_contacts/multi", CONTACTS_OF_2001).await,
        ""
    );
    assert_eq!(
        asterisk
            .post("ps_contacts/single", "id=2001%3B%40abc")
            .await,
        ""
    );
    let stats = provisioning.stats();
    assert_eq!(
        (stats.pending, stats.stale, stats.misses, stats.upstream),
        (3, 5, 1, 2)
    );
    shutdown.cancel();
    provisioning.stopped().await.expect("stops");
}

#[tokio::test]
async fn without_the_overlay_a_registration_during_an_outage_is_not_seen() {
    // The negative control of the test above: the same steps with the overlay switched
    // off leave the phone unreachable, which is what the overlay is for.
    let stand_in = StandIn::start().await;
    let shutdown = CancellationToken::new();
    let provisioning = Provisioning::launch(
        &config(DEADLINE, LONG),
        &stand_in.url(),
        shutdown.clone(),
        false,
    )
    .await
    .expect("starts");
    let asterisk = Asterisk::of(&provisioning);
    cache_contacts_then_stop(&asterisk, stand_in).await;
    assert_eq!(
        asterisk.post("ps_contacts/store", CONTACT_STORE).await,
        "1\n"
    );
    assert_eq!(
        asterisk.post("ps_contacts/multi", CONTACTS_OF_2001).await,
        ""
    );
    assert_eq!(
        asterisk
            .post("ps_contacts/single", "id=2001%3B%40abc")
            .await,
        ""
    );
    shutdown.cancel();
    provisioning.stopped().await.expect("stops");
}

#[tokio::test]
async fn a_fresh_answer_shows_the_write_in_flight_and_not_once_it_is_delivered() {
    let stand_in = StandIn::start().await;
    stand_in.seen.set(Mode::SlowWrites);
    let (provisioning, shutdown) = start(&config(DEADLINE, LONG), &stand_in.url()).await;
    let asterisk = Asterisk::of(&provisioning);
    // The control plane answers the read before it has made the write: the answer has the
    // write replayed over it.
    let read = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        asterisk.post("ps_contacts/multi", CONTACTS_OF_2001).await
    };
    let (written, read) = tokio::join!(asterisk.post("ps_contacts/store", CONTACT_STORE), read);
    assert_eq!(written, "1\n");
    assert_eq!(read, CONTACT_ROW);
    // Once delivered, the control plane's answer is the truth (this stand-in keeps no
    // rows, so the contact is not in its answers).
    assert_eq!(
        asterisk.post("ps_contacts/multi", CONTACTS_OF_2001).await,
        ""
    );
    let stats = provisioning.stats();
    assert_eq!((stats.upstream, stats.stale, stats.misses), (3, 0, 0));
    shutdown.cancel();
    provisioning.stopped().await.expect("stops");
    stand_in.stop().await;
}

#[test]
fn a_fresh_answer_has_the_pending_writes_over_it_and_not_the_delivered_ones() {
    let body = CONTACT_STORE;
    let request = realtime::parse_request("/ps_contacts/store", body.as_bytes()).expect("a store");
    let mut memory = Memory::new(0);
    let write = memory.log(
        Family::Contacts,
        request,
        String::new(),
        Bytes::from(body),
        None,
    );
    memory.pending.insert(write.seq, write.clone());
    let base = memory.read_sent();
    memory.read_done(base);
    let plan = memory.fresh("key".into(), Family::Contacts, Bytes::new(), base, true);
    assert!(matches!(plan, state::Plan::Overlay { ref writes, .. } if writes.len() == 1));
    memory.delivered(&write, false);
    let base = memory.read_sent();
    memory.read_done(base);
    let plan = memory.fresh("key".into(), Family::Contacts, Bytes::new(), base, true);
    assert!(matches!(plan, state::Plan::Ready(ref body) if body.is_empty()));
}

#[tokio::test]
async fn pending_writes_survive_a_restart_through_the_pending_file() {
    let folder = tempfile::tempdir().expect("a temporary folder");
    let file = folder.path().join("provisioning-pending.jsonl");
    let (seen, address) = StandIn::start().await.stop().await;
    let config = ProvisioningConfig {
        pending_file: file.display().to_string(),
        ..config(DEADLINE, Duration::from_millis(200))
    };
    let url = format!("http://{address}");
    let (first, shutdown) = start(&config, &url).await;
    let asterisk = Asterisk::of(&first);
    assert_eq!(
        asterisk.post("ps_contacts/store", CONTACT_STORE).await,
        "1\n"
    );
    assert_eq!(
        asterisk
            .post(
                "ps_contacts/update?id=2001%3B%40abc",
                "expiration_time=1764000060"
            )
            .await,
        "1\n"
    );
    shutdown.cancel();
    first.stopped().await.expect("stops");
    let kept = std::fs::read_to_string(&file).expect("the pending file");
    assert_eq!(
        kept.lines().filter(|line| line.contains("\"seq\"")).count(),
        2,
        "{kept}"
    );

    let stand_in = StandIn::serve(seen, address).await;
    let (second, shutdown) = start(&config, &url).await;
    eventually("the queue of the last run to drain", || {
        second.stats().pending == 0
    })
    .await;
    assert_eq!(
        stand_in.seen.writes(),
        [
            format!("ps_contacts/store {CONTACT_STORE}"),
            "ps_contacts/update?id=2001%3B%40abc expiration_time=1764000060".to_owned()
        ]
    );
    assert_eq!(second.stats().delivered, 2);
    // Drained: rewritten to nothing pending, so a third start delivers nothing again.
    eventually("the file to be rewritten", || {
        std::fs::read_to_string(&file).is_ok_and(|text| !text.contains("\"seq\""))
    })
    .await;
    shutdown.cancel();
    second.stopped().await.expect("stops");
    let (third, shutdown) = start(&config, &url).await;
    assert_eq!(third.stats().pending, 0);
    shutdown.cancel();
    third.stopped().await.expect("stops");
    assert_eq!(stand_in.seen.writes().len(), 2);
    stand_in.stop().await;
}

#[tokio::test]
async fn a_refused_token_is_a_failure_and_the_cache_answers() {
    let stand_in = StandIn::start().await;
    stand_in
        .seen
        .answer("ps_auths/single id=2001", "id=2001&auth_type=md5\n");
    let (provisioning, shutdown) = start(&config(DEADLINE, LONG), &stand_in.url()).await;
    let asterisk = Asterisk::of(&provisioning);
    asterisk.post("ps_auths/single", "id=2001").await;
    stand_in.seen.set(Mode::Refuse);
    assert_eq!(
        asterisk.post("ps_auths/single", "id=2001").await,
        "id=2001&auth_type=md5\n"
    );
    let stats = provisioning.stats();
    assert_eq!((stats.upstream, stats.stale, stats.failures), (1, 1, 1));
    shutdown.cancel();
    provisioning.stopped().await.expect("stops");
    stand_in.stop().await;
}

#[tokio::test]
async fn unknown_families_operations_and_paths_get_404_with_a_reason() {
    let stand_in = StandIn::start().await;
    let (provisioning, shutdown) = start(&config(DEADLINE, LONG), &stand_in.url()).await;
    let asterisk = Asterisk::of(&provisioning);
    let (status, reason) = asterisk
        .request(Method::POST, "/realtime/sippeers/single", "name=2001")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        reason,
        "unknown realtime family `sippeers`; this endpoint serves ps_endpoints, ps_aors, ps_auths and ps_contacts\n"
    );
    let (status, reason) = asterisk
        .request(Method::POST, "/realtime/ps_endpoints/select", "id=2001")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        reason.starts_with("unknown realtime operation `select`"),
        "{reason}"
    );
    let (status, _) = asterisk
        .request(Method::POST, "/provision/ps_endpoints/single", "id=2001")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(stand_in.seen.attempts(), 0);

    let (status, json) = asterisk.request(Method::GET, "/stats", "").await;
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(
        json,
        serde_json::json!({
            "upstream": 0, "stale": 0, "misses": 0, "pending": 0, "delivered": 0,
            "rejected": 0, "failures": 0, "cached": 0
        })
    );
    shutdown.cancel();
    provisioning.stopped().await.expect("stops");
    stand_in.stop().await;
}

#[tokio::test]
async fn a_taken_address_says_what_to_do() {
    let stand_in = StandIn::start().await;
    let config = ProvisioningConfig {
        listen: stand_in.address.to_string(),
        ..config(DEADLINE, LONG)
    };
    let err = Provisioning::start(&config, &stand_in.url(), CancellationToken::new())
        .await
        .expect_err("the port is taken");
    assert!(matches!(err, ProvisioningError::Bind { .. }), "{err:?}");
    assert!(err.to_string().contains("set provisioning.listen"), "{err}");
    let err = Provisioning::start(
        &ProvisioningConfig {
            listen: "127.0.0.1:0".into(),
            ..config.clone()
        },
        "https://cp.example:8080",
        CancellationToken::new(),
    )
    .await
    .expect_err("plain http only");
    assert!(
        err.to_string().contains("provisioning.control_plane"),
        "{err}"
    );
    stand_in.stop().await;
}

#[test]
fn the_write_log_keeps_only_what_cached_answers_need() {
    let store = |id: &str| {
        let body = format!("id={id}&endpoint=2001");
        let request =
            realtime::parse_request("/ps_contacts/store", body.as_bytes()).expect("a store");
        (request, Bytes::from(body))
    };
    let mut memory = Memory::new(0);
    for id in ["a", "b", "c"] {
        let (request, body) = store(id);
        let write = memory.log(Family::Contacts, request, String::new(), body, None);
        memory.delivered(&write, false);
    }
    // An answer fetched after the first write was delivered needs the two after it.
    let plan = memory.fresh("key".into(), Family::Contacts, Bytes::new(), 1, true);
    assert!(matches!(plan, state::Plan::Overlay { ref writes, .. } if writes.len() == 2));
    let now = Instant::now();
    assert_eq!(memory.prune(now, LONG), 0);
    assert_eq!(memory.logged(Family::Contacts), 2);
    // A pending write stays whatever the cache holds.
    let (request, body) = store("d");
    let pending = memory.log(Family::Contacts, request, String::new(), body, None);
    memory.pending.insert(pending.seq, pending);
    memory.cache.clear();
    memory.prune(now, LONG);
    assert_eq!(memory.logged(Family::Contacts), 1);
    assert_eq!(memory.logged(Family::Endpoints), 0);
}

/// Every family is read whole at start (and every `prefetch`): through an outage, a device
/// this node never asked for (a phone that registered elsewhere, never dialled here) is
/// answered from the whole family, counted stale; without the prefetch it is a miss.
#[tokio::test]
async fn the_whole_families_answer_what_was_never_asked_before_an_outage() {
    const ENDPOINTS: &str = "id=2001&aors=2001\nid=2002&aors=2002&auth=2002\n";
    for prefetch in [Duration::from_secs(3600), Duration::ZERO] {
        let stand_in = StandIn::start().await;
        stand_in
            .seen
            .answer("ps_endpoints/multi id%20LIKE=%25", ENDPOINTS);
        let config = ProvisioningConfig {
            prefetch,
            ..config(DEADLINE, LONG)
        };
        let (provisioning, shutdown) = start(&config, &stand_in.url()).await;
        let asterisk = Asterisk::of(&provisioning);
        let families = if prefetch.is_zero() { 0 } else { 4 };
        let started = tokio::time::Instant::now();
        while stand_in.seen.attempts() < families {
            assert!(started.elapsed() < Duration::from_secs(5), "no prefetch");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stand_in.stop().await;
        let single = asterisk.post("ps_endpoints/single", "id=2002").await;
        let multi = asterisk
            .post("ps_endpoints/multi", "id%20LIKE=200%25")
            .await;
        let unknown = asterisk.post("ps_endpoints/single", "id=2009").await;
        if prefetch.is_zero() {
            assert_eq!(
                (single.as_str(), multi.as_str(), unknown.as_str()),
                ("", "", "")
            );
            assert_eq!(provisioning.stats().misses, 3);
        } else {
            assert_eq!(single, "id=2002&aors=2002&auth=2002\n");
            assert_eq!(multi, ENDPOINTS);
            assert_eq!(unknown, "");
            let stats = provisioning.stats();
            assert_eq!(
                (stats.upstream, stats.stale, stats.misses),
                (4, 3, 0),
                "{stats:?}"
            );
        }
        shutdown.cancel();
        provisioning.stopped().await.expect("stops");
    }
}
