//! The REST face as its users see it, through the whole router (`oneshot`, no socket):
//!
//! - a day of a call center, run on SQLite and on MariaDB: queues, devices and agents,
//!   hot-desk logins, priorities, VIP callers, the daily cap, pauses, the public queue status,
//!   deletions, errors that name what is wrong, nodes and the audit log;
//! - the auth matrix, read from the OpenAPI document the router serves, and a check that
//!   the document and the router name the same routes;
//! - two CRMs changing one agent at the same moment, and agents racing for one phone.
//!
//! The MariaDB runs need `CALLFLEET_TEST_MYSQL_URL` (`./scripts/test` sets it) and fail with
//! instructions without it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use callfleet_control_plane::{Control, router};
use callfleet_core::config::{ApiToken, ControlPlaneConfig, Role, Secret, StoreConfig};
use callfleet_core::{Heartbeat, NodeId, NodeRole, PoolName, Store, testing};
use serde_json::{Value, json};
use tower::ServiceExt;

/// Write token of the main CRM, named `crm-main`.
const CRM: &str = "crm-main-secret-0123456789";
/// Write token of a second CRM, named `crm-backup`.
const CRM_B: &str = "crm-backup-secret-0123456789";
/// Read token of a wallboard, named `wallboard`.
const WALLBOARD: &str = "wallboard-secret-0123456789";
/// Admin token of the operators, named `ops`.
const OPS: &str = "ops-admin-secret-0123456789";
/// Node token of a node-agent, named `node:pbx-1`.
const NODE: &str = "node-pbx-1-secret-0123456789";

const SECRETS: [&str; 5] = [CRM, CRM_B, WALLBOARD, OPS, NODE];

fn control_config() -> ControlPlaneConfig {
    let token = |name: &str, secret: &str, role| ApiToken {
        name: name.to_owned(),
        token: Secret::new(secret),
        role,
    };
    ControlPlaneConfig {
        tokens: vec![
            token("crm-main", CRM, Role::Write),
            token("crm-backup", CRM_B, Role::Write),
            token("wallboard", WALLBOARD, Role::Read),
            token("ops", OPS, Role::Admin),
            token("node:pbx-1", NODE, Role::Node),
        ],
        ..ControlPlaneConfig::default()
    }
}

async fn sqlite_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = StoreConfig {
        url: format!("sqlite://{}/fleet.db", dir.path().display()),
        ..StoreConfig::default()
    };
    let store = Store::connect(&config).await.expect("sqlite store");
    (dir, store)
}

async fn mysql_store() -> Store {
    let config = testing::fresh_mysql_config().await;
    Store::connect(&config).await.expect("mariadb store")
}

/// An answer of the API, with what was asked for the failure messages.
#[derive(Debug)]
struct Reply {
    asked: String,
    status: StatusCode,
    headers: HeaderMap,
    text: String,
    json: Value,
}

impl Reply {
    /// Panics unless the status is `status`; returns the reply for more checks.
    #[track_caller]
    fn expect(self, status: StatusCode) -> Self {
        assert_eq!(
            self.status, status,
            "{} answered {} {}",
            self.asked, self.status, self.text
        );
        self
    }

    /// The `error` of a JSON error body (every REST error has one).
    #[track_caller]
    fn error(&self) -> &str {
        let is_json = self
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        assert!(is_json, "{}: error without a JSON content type", self.asked);
        self.json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no `error` in {}", self.asked, self.text))
    }

    /// Panics unless the status is `status` and the error mentions every one of `words`.
    #[track_caller]
    fn expect_error(self, status: StatusCode, words: &[&str]) -> Self {
        let reply = self.expect(status);
        let error = reply.error();
        for word in words {
            assert!(
                error.contains(word),
                "{}: error `{error}` does not mention `{word}`",
                reply.asked
            );
        }
        reply
    }
}

/// The router of a control plane on `store`, and the count of writes that succeeded (each
/// must have left exactly one audit row).
struct Api {
    app: Router,
    writes_ok: AtomicUsize,
}

impl Api {
    async fn start(store: Store) -> Self {
        let control = Control::start(store, &control_config())
            .await
            .expect("control plane starts");
        Self {
            app: router(Arc::new(control)),
            writes_ok: AtomicUsize::new(0),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Reply {
        let reply = call(self.app.clone(), method.clone(), path, token, body).await;
        if method != Method::GET && reply.status.is_success() {
            self.writes_ok.fetch_add(1, Ordering::Relaxed);
        }
        reply
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.send(Method::GET, path, token, None).await
    }

    async fn put(&self, path: &str, token: &str, body: Value) -> Reply {
        self.send(
            Method::PUT,
            path,
            Some(token),
            Some(body.to_string().into_bytes()),
        )
        .await
    }

    async fn post(&self, path: &str, token: &str, body: Option<Value>) -> Reply {
        let body = body.map(|b| b.to_string().into_bytes());
        self.send(Method::POST, path, Some(token), body).await
    }

    async fn delete(&self, path: &str, token: &str) -> Reply {
        self.send(Method::DELETE, path, Some(token), None).await
    }

    /// The agents `queue` would ring now for a caller with `attributes`, best first.
    async fn candidates(&self, queue: &str, attributes: &str) -> Vec<(String, i32, bool)> {
        let path = if attributes.is_empty() {
            format!("/queues/{queue}/candidates")
        } else {
            format!("/queues/{queue}/candidates?attributes={attributes}")
        };
        let reply = self
            .get(&path, Some(WALLBOARD))
            .await
            .expect(StatusCode::OK);
        assert_eq!(reply.json["queue"], queue);
        reply.json["candidates"]
            .as_array()
            .expect("candidates")
            .iter()
            .map(|c| {
                (
                    c["agent"].as_str().expect("agent").to_owned(),
                    i32::try_from(c["priority"].as_i64().expect("priority")).expect("i32"),
                    c["demoted"].as_bool().expect("demoted"),
                )
            })
            .collect()
    }

    /// The agent ids of [`Api::candidates`].
    async fn ring_order(&self, queue: &str, attributes: &str) -> Vec<String> {
        let found = self.candidates(queue, attributes).await;
        found.into_iter().map(|(agent, ..)| agent).collect()
    }

    /// The public status, asked without a token as a website does.
    async fn status(&self, queue: &str) -> (bool, u64, u64) {
        let reply = self
            .get(&format!("/queues/{queue}/status"), None)
            .await
            .expect(StatusCode::OK);
        assert_eq!(
            reply
                .headers
                .get(header::CACHE_CONTROL)
                .map(|v| v.as_bytes()),
            Some(&b"public, max-age=1"[..]),
            "a cache in front may answer for a second"
        );
        let keys: BTreeSet<&str> = reply
            .json
            .as_object()
            .expect("status object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from([
                "queue",
                "served",
                "available_agents",
                "logged_in_agents",
                "waiting",
                "longest_wait_ms",
                "waiting_unknown",
                "answered_today",
                "abandoned_today",
                "overflowed_today",
                "answered_within_sl_today",
                "service_level_pct_today",
            ]),
            "the public status shows exactly these fields"
        );
        assert_eq!(reply.json["queue"], queue);
        (
            reply.json["served"].as_bool().expect("served"),
            reply.json["available_agents"].as_u64().expect("available"),
            reply.json["logged_in_agents"].as_u64().expect("logged in"),
        )
    }

    /// The whole audit log, newest first, read in pages of `page` through `before`.
    async fn audit_all(&self, page: u32) -> Vec<Value> {
        let mut all: Vec<Value> = Vec::new();
        let mut before: Option<i64> = None;
        loop {
            let path = match before {
                Some(id) => format!("/audit?limit={page}&before={id}"),
                None => format!("/audit?limit={page}"),
            };
            let reply = self
                .get(&path, Some(WALLBOARD))
                .await
                .expect(StatusCode::OK);
            let rows = reply.json.as_array().expect("audit page").clone();
            assert!(
                rows.len() <= page as usize,
                "a page holds at most `limit` rows"
            );
            let Some(last) = rows.last() else { break };
            before = Some(last["id"].as_i64().expect("audit id"));
            all.extend(rows);
        }
        let ids: Vec<i64> = all.iter().map(|r| r["id"].as_i64().expect("id")).collect();
        assert!(
            ids.windows(2).all(|w| w[0] > w[1]),
            "pages follow each other newest first, without overlap: {ids:?}"
        );
        all
    }

    /// The newest audit id, 0 for an empty log.
    async fn last_audit_id(&self) -> i64 {
        let reply = self
            .get("/audit?limit=1", Some(WALLBOARD))
            .await
            .expect(StatusCode::OK);
        reply.json[0]["id"].as_i64().unwrap_or(0)
    }

    /// The audit rows newer than `after`, oldest first.
    async fn audit_since(&self, after: i64) -> Vec<Value> {
        let mut rows: Vec<Value> = self
            .audit_all(1000)
            .await
            .into_iter()
            .filter(|r| r["id"].as_i64().expect("id") > after)
            .collect();
        rows.reverse();
        rows
    }
}

async fn call(
    app: Router,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Reply {
    call_with(app, method, path, token, body, &[]).await
}

async fn call_with(
    app: Router,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> Reply {
    let uri = format!("/api/v1{path}");
    let asked = format!("{method} {uri}");
    let mut request = Request::builder().method(method).uri(&uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = match body {
        Some(bytes) => request
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(bytes)),
        None => request.body(Body::empty()),
    }
    .expect("request");
    let response = app
        .oneshot(request)
        .await
        .expect("the router is infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        asked,
        status,
        headers,
        text,
        json,
    }
}

fn heartbeat(id: &str, calls: u32) -> Heartbeat {
    Heartbeat {
        id: NodeId::new(id).expect("node id"),
        pool: PoolName::new("default").expect("pool"),
        role: NodeRole::Core,
        sip_uri: "sip:10.0.0.11:5060".to_owned(),
        calls,
        pbx_up: true,
        max_calls: 100,
        load1: 0.2,
        cpu_pct: 5.0,
        mem_pct: 30.0,
        cores: 2,
        shed: Vec::new(),
        refusing_calls: false,
        interval: Duration::from_secs(2),
        first_of_run: true,
    }
}

/// Logins restart idle time on the database clock (milliseconds); a pause between them
/// makes "longest idle first" an order the test can predict.
async fn tick() {
    tokio::time::sleep(Duration::from_millis(30)).await;
}

// ---- 1. a day of a call center ---------------------------------------------------------

#[tokio::test]
async fn call_center_day_on_sqlite() {
    let (_dir, store) = sqlite_store().await;
    call_center_day(store).await;
}

#[tokio::test]
async fn call_center_day_on_mariadb() {
    call_center_day(mysql_store().await).await;
}

async fn call_center_day(store: Store) {
    let api = Api::start(store.clone()).await;
    let ok = StatusCode::OK;

    // The morning set-up by the CRM: a queue, five desks, four agents.
    let queue = api
        .put("/queues/sales", CRM, json!({ "name": "Sales line" }))
        .await
        .expect(ok);
    assert_eq!(
        queue.json,
        json!({ "id": "sales", "name": "Sales line", "service_level_ms": 20000 })
    );
    let queue = api
        .put(
            "/queues/sales",
            CRM,
            json!({ "name": "Sales line", "service_level_ms": 15000 }),
        )
        .await
        .expect(ok);
    assert_eq!(
        queue.json,
        json!({ "id": "sales", "name": "Sales line", "service_level_ms": 15000 })
    );
    for bad in [json!(0), json!(3_600_001), json!(-1), json!("20s")] {
        api.put(
            "/queues/sales",
            CRM,
            json!({ "name": "Sales line", "service_level_ms": bad }),
        )
        .await
        .expect_error(StatusCode::BAD_REQUEST, &["service_level_ms"]);
    }
    for desk in 1..=5 {
        let device = api
            .put(
                &format!("/devices/200{desk}"),
                CRM,
                json!({ "endpoint": format!("PJSIP/200{desk}"), "name": format!("desk {desk}") }),
            )
            .await
            .expect(ok);
        assert_eq!(device.json["endpoint"], format!("PJSIP/200{desk}"));
    }
    let agents = [
        ("1001", json!({ "name": "Alice" })),
        ("1002", json!({ "name": "Bob", "tags": ["vip"] })),
        ("1003", json!({ "name": "Carol", "daily_cap": 2 })),
        ("1004", json!({ "name": "Dave", "tags": ["fr"] })),
    ];
    for (id, body) in &agents {
        let agent = api
            .put(&format!("/agents/{id}"), CRM, body.clone())
            .await
            .expect(ok);
        assert_eq!(agent.json["id"], *id);
        assert_eq!(agent.json["name"], body["name"]);
        assert_eq!(agent.json["state"], "available");
        assert_eq!(agent.json["enabled"], true);
        assert_eq!(agent.json["sales_today"], 0);
        assert!(agent.json.get("device").is_none(), "not logged in yet");
    }
    let devices = api.get("/devices", Some(WALLBOARD)).await.expect(ok);
    assert_eq!(devices.json.as_array().expect("devices").len(), 5);
    let listed = api.get("/agents", Some(WALLBOARD)).await.expect(ok);
    assert_eq!(listed.json.as_array().expect("agents").len(), 4);
    assert_eq!(listed.json[1]["tags"], json!(["vip"]));
    assert_eq!(listed.json[2]["daily_cap"], 2);

    // A queue without members is not served; the website asks without a token.
    assert_eq!(api.status("sales").await, (false, 0, 0));

    // Priorities, set by the second CRM: lower rings first.
    for (agent, priority) in [("1001", 1), ("1002", 2), ("1003", 1), ("1004", 1)] {
        let member = api
            .put(
                &format!("/queues/sales/members/{agent}"),
                CRM_B,
                json!({ "priority": priority }),
            )
            .await
            .expect(ok);
        assert_eq!(
            member.json,
            json!({ "queue": "sales", "agent": agent, "priority": priority })
        );
    }
    let members = api
        .get("/queues/sales/members", Some(WALLBOARD))
        .await
        .expect(ok);
    assert_eq!(
        members.json,
        json!([
            { "agent": "1001", "priority": 1 },
            { "agent": "1003", "priority": 1 },
            { "agent": "1004", "priority": 1 },
            { "agent": "1002", "priority": 2 },
        ])
    );
    // Members who are not logged in cannot be rung.
    assert_eq!(api.status("sales").await, (false, 0, 0));
    assert!(api.ring_order("sales", "").await.is_empty());

    // Hot-desking: agents arrive one after the other and sit at a desk.
    for (agent, device) in [
        ("1004", "2004"),
        ("1003", "2003"),
        ("1001", "2001"),
        ("1002", "2002"),
    ] {
        let login = api
            .post(
                &format!("/agents/{agent}/login"),
                CRM,
                Some(json!({ "device": device })),
            )
            .await
            .expect(ok);
        assert_eq!(login.json["agent"], agent);
        assert_eq!(login.json["device"], device);
        assert_eq!(login.json["endpoint"], format!("PJSIP/{device}"));
        assert_eq!(login.json["login"], "new");
        tick().await;
    }
    assert_eq!(api.status("sales").await, (true, 4, 4));
    // Priority first, then the longest idle (Dave sat down first), the VIP agent last.
    let expected = ["1004", "1003", "1001", "1002"];
    assert_eq!(api.ring_order("sales", "").await, expected);
    let candidates = api
        .get("/queues/sales/candidates", Some(WALLBOARD))
        .await
        .expect(ok);
    assert_eq!(candidates.json["candidates"][0]["endpoint"], "PJSIP/2004");

    // Alice tries Dave's phone: refused, naming Dave, and nothing changes.
    let audit_before = api.last_audit_id().await;
    api.post("/agents/1001/login", CRM, Some(json!({ "device": "2004" })))
        .await
        .expect_error(StatusCode::CONFLICT, &["`2004`", "`1004`"]);
    let alice = api.get("/agents/1001", Some(WALLBOARD)).await.expect(ok);
    assert_eq!(alice.json["device"], "2001");
    assert_eq!(
        api.last_audit_id().await,
        audit_before,
        "a refused change is not logged"
    );

    // Alice moves to the free desk 5; desk 1 is free again and her place in line is kept.
    let moved = api
        .post("/agents/1001/login", CRM, Some(json!({ "device": "2005" })))
        .await
        .expect(ok);
    assert_eq!(moved.json["login"], "moved");
    assert_eq!(moved.json["from"], "2001");
    assert_eq!(moved.json["endpoint"], "PJSIP/2005");
    let again = api
        .post("/agents/1001/login", CRM, Some(json!({ "device": "2005" })))
        .await
        .expect(ok);
    assert_eq!(again.json["login"], "unchanged");
    let listed = api.get("/agents", Some(WALLBOARD)).await.expect(ok);
    let seated: BTreeMap<&str, &str> = listed
        .json
        .as_array()
        .expect("agents")
        .iter()
        .map(|a| {
            (
                a["id"].as_str().expect("id"),
                a["device"].as_str().expect("device"),
            )
        })
        .collect();
    assert_eq!(
        seated,
        BTreeMap::from([
            ("1001", "2005"),
            ("1002", "2002"),
            ("1003", "2003"),
            ("1004", "2004")
        ])
    );
    assert_eq!(api.ring_order("sales", "").await, expected);
    let candidates = api.candidates("sales", "").await;
    assert_eq!(candidates[2], ("1001".to_owned(), 1, false));

    // A VIP caller goes to VIP agents only; a French VIP finds nobody serving both and
    // falls back to everyone.
    assert_eq!(api.ring_order("sales", "vip").await, ["1002"]);
    assert_eq!(api.ring_order("sales", "fr").await, ["1004"]);
    assert_eq!(api.ring_order("sales", "vip,fr").await, expected);

    // Bob pauses: he drops out, and VIP callers fall back to the others.
    api.post(
        "/agents/1002/pause",
        CRM,
        Some(json!({ "reason": "lunch" })),
    )
    .await
    .expect(StatusCode::NO_CONTENT);
    let bob = api.get("/agents/1002", Some(WALLBOARD)).await.expect(ok);
    assert_eq!(bob.json["state"], "paused");
    assert_eq!(bob.json["pause_reason"], "lunch");
    assert_eq!(api.ring_order("sales", "").await, ["1004", "1003", "1001"]);
    assert_eq!(
        api.ring_order("sales", "vip").await,
        ["1004", "1003", "1001"]
    );
    assert_eq!(api.status("sales").await, (true, 3, 4));
    api.post("/agents/1002/unpause", CRM, None)
        .await
        .expect(StatusCode::NO_CONTENT);
    let bob = api.get("/agents/1002", Some(WALLBOARD)).await.expect(ok);
    assert_eq!(bob.json["state"], "available");
    assert!(bob.json.get("pause_reason").is_none());
    assert_eq!(api.ring_order("sales", "vip").await, ["1002"]);
    assert_eq!(api.ring_order("sales", "").await, expected);

    // Carol's cap is 2 sales: after the second she rings after everyone, even priority 2.
    let sale = api.post("/agents/1003/sales", CRM, None).await.expect(ok);
    assert_eq!(sale.json, json!({ "agent": "1003", "sales_today": 1 }));
    assert_eq!(api.ring_order("sales", "").await, expected);
    // With an Idempotency-Key, a sale sent again (its answer lost) counts once.
    for _ in 0..2 {
        let sale = call_with(
            api.app.clone(),
            Method::POST,
            "/agents/1003/sales",
            Some(CRM_B),
            None,
            &[("Idempotency-Key", "3f1c8e2a-sale")],
        )
        .await
        .expect(ok);
        assert_eq!(sale.json["sales_today"], 2);
    }
    // Two answers, one write (one audit row): the replay changed nothing.
    api.writes_ok.fetch_add(1, Ordering::Relaxed);
    let candidates = api.candidates("sales", "").await;
    assert_eq!(
        candidates,
        [
            ("1004".to_owned(), 1, false),
            ("1001".to_owned(), 1, false),
            ("1002".to_owned(), 2, false),
            ("1003".to_owned(), 1, true),
        ]
    );
    let carol = api.get("/agents/1003", Some(WALLBOARD)).await.expect(ok);
    assert_eq!(carol.json["sales_today"], 2);
    // Raising the cap brings her back; removing it keeps her there.
    let carol = api
        .put("/agents/1003/daily-cap", CRM, json!({ "daily_cap": 3 }))
        .await
        .expect(ok);
    assert_eq!(carol.json["daily_cap"], 3);
    assert_eq!(api.ring_order("sales", "").await, expected);
    let carol = api
        .put("/agents/1003/daily-cap", CRM, json!({ "daily_cap": null }))
        .await
        .expect(ok);
    assert_eq!(carol.json["daily_cap"], Value::Null);
    assert_eq!(carol.json["name"], "Carol", "the cap alone changed");
    assert_eq!(api.ring_order("sales", "").await, expected);

    // Tags are replaced as a whole: Dave becomes the second VIP agent.
    let dave = api
        .put("/agents/1004/tags", CRM, json!({ "tags": ["vip", "fr"] }))
        .await
        .expect(ok);
    assert_eq!(dave.json["tags"], json!(["fr", "vip"]));
    assert_eq!(api.ring_order("sales", "vip").await, ["1004", "1002"]);
    // Copies of an attribute count once; more distinct attributes than an agent can carry
    // as tags are refused, whatever they would cost.
    let copies = vec!["vip"; 5_000].join(",");
    assert_eq!(api.ring_order("sales", &copies).await, ["1004", "1002"]);
    let too_many = (0..33)
        .map(|n| format!("a{n}"))
        .collect::<Vec<_>>()
        .join(",");
    let refused = api
        .get(
            &format!("/queues/sales/candidates?attributes={too_many}"),
            Some(WALLBOARD),
        )
        .await
        .expect(StatusCode::BAD_REQUEST);
    assert!(
        refused
            .error()
            .contains("33 different attributes; at most 32"),
        "{}",
        refused.error()
    );

    // A disabled agent keeps desk, membership and place but gets no calls.
    let disabled = api
        .put(
            "/agents/1002",
            CRM,
            json!({ "name": "Bob", "tags": ["vip"], "enabled": false }),
        )
        .await
        .expect(ok);
    assert_eq!(disabled.json["enabled"], false);
    assert_eq!(disabled.json["device"], "2002");
    assert_eq!(api.ring_order("sales", "").await, ["1004", "1003", "1001"]);
    assert_eq!(api.status("sales").await, (true, 3, 4));
    api.put(
        "/agents/1002",
        CRM,
        json!({ "name": "Bob", "tags": ["vip"] }),
    )
    .await
    .expect(ok);
    assert_eq!(api.ring_order("sales", "").await, expected);

    // Everyone on a break: the website hides the number, without needing a token.
    for agent in ["1001", "1002", "1003", "1004"] {
        api.post(
            &format!("/agents/{agent}/pause"),
            CRM,
            Some(json!({ "reason": "team meeting" })),
        )
        .await
        .expect(StatusCode::NO_CONTENT);
    }
    assert_eq!(api.status("sales").await, (false, 0, 4));
    assert!(api.ring_order("sales", "").await.is_empty());
    for agent in ["1004", "1003", "1001", "1002"] {
        api.post(&format!("/agents/{agent}/unpause"), CRM, None)
            .await
            .expect(StatusCode::NO_CONTENT);
        tick().await;
    }
    assert_eq!(api.status("sales").await, (true, 4, 4));

    // Dave goes home; a second logout finds nothing to do.
    let left = api.post("/agents/1004/logout", CRM, None).await.expect(ok);
    assert_eq!(left.json, json!({ "agent": "1004", "left_device": "2004" }));
    let left = api.post("/agents/1004/logout", CRM, None).await.expect(ok);
    assert_eq!(left.json["left_device"], Value::Null);
    assert_eq!(api.status("sales").await, (true, 3, 3));
    assert!(
        !api.ring_order("sales", "")
            .await
            .contains(&"1004".to_owned())
    );

    // Alice leaves the company: her membership and session go with her.
    api.delete("/agents/1001", CRM)
        .await
        .expect(StatusCode::NO_CONTENT);
    api.get("/agents/1001", Some(WALLBOARD))
        .await
        .expect_error(StatusCode::NOT_FOUND, &["`1001`"]);
    let members = api
        .get("/queues/sales/members", Some(WALLBOARD))
        .await
        .expect(ok);
    let member_ids: Vec<&str> = members
        .json
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["agent"].as_str().expect("agent"))
        .collect();
    assert_eq!(member_ids, ["1003", "1004", "1002"]);
    assert_eq!(api.status("sales").await, (true, 2, 2));
    // Her desk is free for Dave's return.
    let back = api
        .post("/agents/1004/login", CRM, Some(json!({ "device": "2005" })))
        .await
        .expect(ok);
    assert_eq!(back.json["login"], "new");
    assert_eq!(api.status("sales").await, (true, 3, 3));

    // Removing a member, and removing one who is not (any more).
    api.delete("/queues/sales/members/1002", CRM)
        .await
        .expect(StatusCode::NO_CONTENT);
    api.delete("/queues/sales/members/1002", CRM)
        .await
        .expect_error(StatusCode::NOT_FOUND, &["`1002`", "`sales`"]);
    assert_eq!(api.ring_order("sales", "vip").await, ["1004"]);

    // Unknown ids: 404 naming the id.
    let not_found = StatusCode::NOT_FOUND;
    api.get("/agents/ghost", Some(WALLBOARD))
        .await
        .expect_error(not_found, &["`ghost`"]);
    api.put("/agents/ghost/tags", CRM, json!({ "tags": [] }))
        .await
        .expect_error(not_found, &["`ghost`"]);
    api.put("/agents/ghost/daily-cap", CRM, json!({ "daily_cap": 1 }))
        .await
        .expect_error(not_found, &["`ghost`"]);
    api.post("/agents/ghost/sales", CRM, None)
        .await
        .expect_error(not_found, &["`ghost`"]);
    api.post("/agents/ghost/pause", CRM, Some(json!({ "reason": "x" })))
        .await
        .expect_error(not_found, &["`ghost`"]);
    api.post("/agents/ghost/logout", CRM, None)
        .await
        .expect_error(not_found, &["`ghost`"]);
    api.delete("/agents/ghost", CRM)
        .await
        .expect_error(not_found, &["`ghost`"]);
    api.post("/agents/1002/login", CRM, Some(json!({ "device": "9999" })))
        .await
        .expect_error(not_found, &["device", "`9999`"]);
    api.delete("/devices/9999", CRM)
        .await
        .expect_error(not_found, &["`9999`"]);
    api.put(
        "/queues/support/members/1002",
        CRM,
        json!({ "priority": 1 }),
    )
    .await
    .expect_error(not_found, &["queue", "`support`"]);
    api.put("/queues/sales/members/ghost", CRM, json!({ "priority": 1 }))
        .await
        .expect_error(not_found, &["agent", "`ghost`"]);
    api.get("/queues/support/members", Some(WALLBOARD))
        .await
        .expect_error(not_found, &["`support`"]);
    api.get("/queues/support/candidates", Some(WALLBOARD))
        .await
        .expect_error(not_found, &["`support`"]);
    api.get("/queues/support/status", None)
        .await
        .expect_error(not_found, &["`support`"]);
    api.delete("/queues/support", CRM)
        .await
        .expect_error(not_found, &["`support`"]);

    // Invalid input: 400 naming the field, and nothing changes.
    let audit_before = api.last_audit_id().await;
    let bad = StatusCode::BAD_REQUEST;
    api.put("/agents/10%2001", CRM, json!({ "name": "Space" }))
        .await
        .expect_error(bad, &["agent id"]);
    api.put("/agents/1005!", CRM, json!({ "name": "Bang" }))
        .await
        .expect_error(bad, &["agent id", "1005!"]);
    api.put(
        &format!("/agents/{}", "9".repeat(33)),
        CRM,
        json!({ "name": "Long" }),
    )
    .await
    .expect_error(bad, &["agent id"]);
    api.put("/devices/20%2F06", CRM, json!({ "endpoint": "PJSIP/2006" }))
        .await
        .expect_error(bad, &["device id"]);
    api.put("/queues/s%C3%A4les", CRM, json!({ "name": "Umlaut" }))
        .await
        .expect_error(bad, &["queue id"]);
    api.post("/agents/1002/pause", CRM, Some(json!({ "reason": "" })))
        .await
        .expect_error(bad, &["reason"]);
    api.post("/agents/1002/pause", CRM, Some(json!({ "reason": "   " })))
        .await
        .expect_error(bad, &["reason"]);
    api.send(
        Method::PUT,
        "/agents/1005",
        Some(CRM),
        Some(b"{\"name\": \"Eve\"".to_vec()),
    )
    .await
    .expect_error(bad, &["body"]);
    api.send(Method::POST, "/agents/1002/pause", Some(CRM), None)
        .await
        .expect_error(bad, &["body"]);
    api.put(
        "/agents/1005",
        CRM,
        json!({ "name": "Eve", "colour": "red" }),
    )
    .await
    .expect_error(bad, &["colour"]);
    api.put("/agents/1005", CRM, json!({ "name": "" }))
        .await
        .expect_error(bad, &["name"]);
    api.put(
        "/agents/1005",
        CRM,
        json!({ "name": "Eve", "tags": ["VIP"] }),
    )
    .await
    .expect_error(bad, &["tags"]);
    // The cap is required: `null` removes it, a forgotten field must not.
    api.put("/agents/1002/daily-cap", CRM, json!({}))
        .await
        .expect_error(bad, &["daily_cap"]);
    api.put("/agents/1002/daily-cap", CRM, json!({ "daily_cap": -1 }))
        .await
        .expect_error(bad, &["daily_cap"]);
    api.put("/devices/2006", CRM, json!({ "endpoint": "PJSIP 2006" }))
        .await
        .expect_error(bad, &["endpoint"]);
    api.put(
        "/queues/sales/members/1002",
        CRM,
        json!({ "priority": "high" }),
    )
    .await
    .expect_error(bad, &["invalid priority"]);
    api.get("/audit?limit=0", Some(WALLBOARD))
        .await
        .expect_error(bad, &["limit"]);
    api.get("/audit?limit=many", Some(WALLBOARD))
        .await
        .expect_error(bad, &["limit"]);
    api.get("/audit?before=yesterday", Some(WALLBOARD))
        .await
        .expect_error(bad, &["before"]);
    api.get("/audit?limit=many", None)
        .await
        .expect(StatusCode::UNAUTHORIZED);
    assert_eq!(
        api.last_audit_id().await,
        audit_before,
        "invalid input changed something"
    );
    api.get("/agents/1005", Some(WALLBOARD))
        .await
        .expect(not_found);

    // Nodes: none yet; draining an unknown one names it; a node that beats can be drained.
    let nodes = api.get("/nodes", Some(WALLBOARD)).await.expect(ok);
    assert_eq!(nodes.json, json!([]));
    api.post("/nodes/pbx-9/drain", OPS, None)
        .await
        .expect_error(not_found, &["`pbx-9`"]);
    api.post("/nodes/pbx%209/drain", OPS, None)
        .await
        .expect_error(bad, &["node"]);
    store
        .heartbeat(&heartbeat("pbx-1", 3))
        .await
        .expect("heartbeat");
    let nodes = api.get("/nodes", Some(WALLBOARD)).await.expect(ok);
    assert_eq!(nodes.json[0]["id"], "pbx-1");
    assert_eq!(nodes.json[0]["state"], "active");
    let drained = api.post("/nodes/pbx-1/drain", OPS, None).await.expect(ok);
    assert_eq!(
        drained.json,
        json!({ "node": "pbx-1", "state": "draining" })
    );
    let nodes = api.get("/nodes", Some(WALLBOARD)).await.expect(ok);
    assert_eq!(nodes.json[0]["drain_requested"], true);
    let undrained = api.post("/nodes/pbx-1/undrain", OPS, None).await.expect(ok);
    assert_eq!(
        undrained.json,
        json!({ "node": "pbx-1", "state": "active" })
    );

    // Deleting a device logs its agent out; deleting a queue takes its members.
    api.delete("/devices/2005", CRM)
        .await
        .expect(StatusCode::NO_CONTENT);
    let dave = api.get("/agents/1004", Some(WALLBOARD)).await.expect(ok);
    assert!(dave.json.get("device").is_none(), "{}", dave.text);
    api.delete("/queues/sales", CRM)
        .await
        .expect(StatusCode::NO_CONTENT);
    api.get("/queues/sales/status", None)
        .await
        .expect_error(not_found, &["`sales`"]);
    let queues = api.get("/queues", Some(WALLBOARD)).await.expect(ok);
    assert_eq!(queues.json, json!([]));

    // The audit log: one row per successful write, in pages, naming tokens by name only.
    let log = api.audit_all(7).await;
    assert_eq!(
        log.len(),
        api.writes_ok.load(Ordering::Relaxed),
        "every successful write left exactly one audit row"
    );
    let text = serde_json::to_string(&log).expect("audit text");
    for secret in SECRETS {
        assert!(!text.contains(secret), "the audit log shows a token");
    }
    let actors: BTreeSet<&str> = log
        .iter()
        .map(|r| r["actor"].as_str().expect("actor"))
        .collect();
    assert_eq!(actors, BTreeSet::from(["crm-backup", "crm-main", "ops"]));
    let find = |action: &str, subject: &str| -> Vec<&Value> {
        log.iter()
            .filter(|r| r["action"] == action && r["subject"] == subject)
            .collect()
    };
    let priorities = find("agent.set_priority", "agent:1003");
    assert_eq!(priorities.len(), 1);
    assert_eq!(priorities[0]["actor"], "crm-backup");
    assert_eq!(priorities[0]["detail"]["priority"], 1);
    let logins = find("agent.login", "agent:1001");
    assert_eq!(
        logins.len(),
        3,
        "new, moved and unchanged; not the refused one"
    );
    assert!(
        logins.iter().any(|r| r["detail"]["moved_from"] == "2001"),
        "{logins:?}"
    );
    let deleted = find("agent.delete", "agent:1001");
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0]["detail"]["memberships_removed"], 1);
    assert_eq!(deleted[0]["detail"]["logged_out_of"], "2005");
    let drains = find("node.drain", "node:pbx-1");
    assert_eq!(drains.len(), 1);
    assert_eq!(drains[0]["actor"], "ops");
    let sales = find("agent.record_sale", "agent:1003");
    assert_eq!(sales.len(), 2, "two sales of Carol");
    // A page of 3 and the page before the oldest id.
    let page = api.get("/audit?limit=3", Some(WALLBOARD)).await.expect(ok);
    let page = page.json.as_array().expect("page").clone();
    assert_eq!(page.len(), 3);
    assert_eq!(page[0], log[0]);
    let oldest = log.last().expect("rows")["id"].as_i64().expect("id");
    let none = api
        .get(&format!("/audit?before={oldest}"), Some(WALLBOARD))
        .await
        .expect(ok);
    assert_eq!(none.json, json!([]));
}

// ---- 2. the auth matrix and the routes, from the OpenAPI document -----------------------

/// Operations that need an admin token; the document says so in their description.
const ADMIN_OPERATIONS: [&str; 3] = ["drain", "undrain", "setAutoscaler"];
/// The one public operation: a website polls it.
const PUBLIC_OPERATIONS: [&str; 1] = ["queueStatus"];
/// The operations a `node` token may call here (besides the public one): a node-agent routes
/// its queued calls by a queue's candidates, the same on XML-RPC and gRPC
/// (`xmlrpc_roles.rs`, `grpc_roles.rs`): the faces serve the same operations, and refusing a
/// node token on one face would protect nothing it can read on another. And it reports
/// what happened when it rang an agent and what became of a queued call (REST only, so far).
/// It looks up a caller number's attributes to route VIP callers (but cannot list them all).
/// Everything else answers a node token 403.
const NODE_OPERATIONS: [&str; 4] = ["candidates", "callEvent", "callOutcome", "getCaller"];
/// Of those, the ones only a `node` token (or `admin`) may call: `read` and `write` tokens
/// get 403, so a CRM cannot skew the ring order or the queue's figures by reporting calls.
const NODE_ONLY_OPERATIONS: [&str; 2] = ["callEvent", "callOutcome"];
/// The document itself is served under `/api/v1` but does not describe itself.
const UNDOCUMENTED: [(&str, &str); 1] = [("GET", "/openapi.json")];
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

#[derive(Debug)]
struct Operation {
    method: Method,
    /// The path as the document writes it, `/agents/{agent}`.
    template: String,
    /// The path with every parameter `{x}` replaced by `missing-x`, or by the parameter's
    /// `example` when the document gives one (a caller number must be digits).
    path: String,
    id: String,
    public: bool,
    admin: bool,
    /// A body holding the required fields of the request schema, when there is one.
    body: Option<Value>,
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let pointer = reference.strip_prefix('#').expect("a local $ref");
            resolve(doc, doc.pointer(pointer).expect("the $ref resolves"))
        }
        None => schema,
    }
}

/// The smallest value `schema` accepts: every required property, of its type; the first
/// alternative of a `oneOf`, the value of a `const` and the first of an `enum`.
fn example(doc: &Value, schema: &Value) -> Value {
    let schema = resolve(doc, schema);
    if let Some(first) = schema["oneOf"].get(0) {
        return example(doc, first);
    }
    if let Some(value) = schema.get("const") {
        return value.clone();
    }
    if let Some(first) = schema["enum"].get(0) {
        return first.clone();
    }
    let kind = match &schema["type"] {
        Value::String(kind) => kind.clone(),
        Value::Array(kinds) => kinds
            .iter()
            .filter_map(Value::as_str)
            .find(|k| *k != "null")
            .expect("a non-null type")
            .to_owned(),
        _ => "object".to_owned(),
    };
    match kind.as_str() {
        "object" => {
            let mut object = serde_json::Map::new();
            for name in schema["required"].as_array().into_iter().flatten() {
                let name = name.as_str().expect("property name");
                let property = &schema["properties"][name];
                assert!(!property.is_null(), "required `{name}` has no schema");
                object.insert(name.to_owned(), example(doc, property));
            }
            Value::Object(object)
        }
        "string" => json!("example"),
        "integer" | "number" => json!(1),
        "boolean" => json!(true),
        "array" => json!([]),
        other => panic!("no example for type {other}"),
    }
}

fn operations(doc: &Value) -> Vec<Operation> {
    let mut found = Vec::new();
    for (template, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            let Some(op) = item.get(method) else { continue };
            let id = op["operationId"].as_str().expect("operationId").to_owned();
            let mut path = template.clone();
            while let Some(start) = path.find('{') {
                let end = start + path[start..].find('}').expect("closing brace");
                let name = path[start + 1..end].to_owned();
                let value = doc["components"]["parameters"][&name]["example"]
                    .as_str()
                    .map_or_else(|| format!("missing-{name}"), str::to_owned);
                path.replace_range(start..=end, &value);
            }
            let body = op
                .get("requestBody")
                .map(|body| example(doc, &body["content"]["application/json"]["schema"]));
            found.push(Operation {
                method: method.to_uppercase().parse().expect("method"),
                template: template.clone(),
                path,
                public: op.get("security") == Some(&json!([])),
                admin: ADMIN_OPERATIONS.contains(&id.as_str()),
                id,
                body,
            });
        }
    }
    found
}

/// The routes of `rest.rs`, read from its source: each `.route("path", get(..).put(..))`.
/// The test fails if the file routes in a way this does not read (nest, merge, services).
fn routes_in_source() -> BTreeSet<(String, String)> {
    let source = include_str!("../src/rest.rs");
    for unread in [
        "nest(",
        "nest_service(",
        "merge(",
        "route_service(",
        "fallback_service(",
    ] {
        assert!(
            !source.contains(unread),
            "rest.rs uses `{unread}`: teach routes_in_source to read it"
        );
    }
    let mut routes = BTreeSet::new();
    let mut rest = source;
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        let open = rest.find('"').expect("a path literal");
        let close = open + 1 + rest[open + 1..].find('"').expect("end of the path");
        // The document's paths are relative to its server, `/api/v1`.
        let path = rest[open + 1..close]
            .strip_prefix("/api/v1")
            .unwrap_or_else(|| panic!("rest.rs routes {} outside /api/v1", &rest[open..close]))
            .to_owned();
        // The method router runs to the parenthesis that closes `.route(`.
        let mut depth = 1;
        let mut end = close + 1;
        for (offset, c) in rest[close + 1..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                end = close + 1 + offset;
                break;
            }
        }
        let handlers = &rest[close + 1..end];
        for method in METHODS {
            let mut search = handlers;
            while let Some(hit) = search.find(&format!("{method}(")) {
                let before = search[..hit].chars().next_back();
                if before.is_none_or(|c| !(c.is_alphanumeric() || c == '_')) {
                    routes.insert((method.to_uppercase(), path.clone()));
                }
                search = &search[hit + method.len()..];
            }
        }
        assert!(
            !handlers.contains("any("),
            "route {path} answers any method; list them"
        );
        rest = &rest[end..];
    }
    routes
}

#[tokio::test]
async fn auth_matrix_and_routes_follow_the_openapi_document() {
    let (_dir, store) = sqlite_store().await;
    let api = Api::start(store).await;

    // The document is served as JSON, without a token.
    let served = api.get("/openapi.json", None).await.expect(StatusCode::OK);
    assert!(
        served
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
    );
    let doc = served.json;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    assert_eq!(doc["servers"][0]["url"], "/api/v1");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let ops = operations(&doc);
    assert!(
        ops.len() >= 20,
        "the document describes only {} operations",
        ops.len()
    );

    // Which operations are public and which are admin-only is what the issue says.
    let public: BTreeSet<&str> = ops
        .iter()
        .filter(|o| o.public)
        .map(|o| o.id.as_str())
        .collect();
    assert_eq!(public, BTreeSet::from(PUBLIC_OPERATIONS));
    for id in ADMIN_OPERATIONS {
        let op = ops
            .iter()
            .find(|o| o.id == id)
            .expect("admin operation documented");
        assert_ne!(op.method, Method::GET, "{id} is admin-only but reads");
        let description =
            doc["paths"][&op.template][op.method.as_str().to_lowercase()]["description"]
                .as_str()
                .unwrap_or_default();
        assert!(
            description.contains("Admin"),
            "{id} does not say it is admin-only"
        );
    }

    // The operations open to a node token are documented so, and exist.
    for id in NODE_OPERATIONS {
        let op = ops
            .iter()
            .find(|o| o.id == id)
            .expect("node operation documented");
        let description =
            doc["paths"][&op.template][op.method.as_str().to_lowercase()]["description"]
                .as_str()
                .unwrap_or_default();
        assert!(
            description.contains("`node`"),
            "{id} does not say a node token may call it"
        );
    }

    for op in &ops {
        let asked = format!("{} {} ({})", op.method, op.path, op.id);
        let body = op.body.as_ref().map(|b| b.to_string().into_bytes());
        let send = |token: Option<&'static str>, body: Option<Vec<u8>>| {
            call(api.app.clone(), op.method.clone(), &op.path, token, body)
        };
        if op.public {
            let reply = send(None, body.clone()).await;
            assert!(
                !matches!(
                    reply.status,
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
                ),
                "{asked} is public but answered {} without a token",
                reply.status
            );
        } else {
            // No token, a token of no one, and no token with a broken body: 401 first.
            for (token, body) in [
                (None, body.clone()),
                (Some("not-a-configured-token-000"), body.clone()),
                (None, Some(b"{".to_vec())),
            ] {
                let reply = send(token, body).await;
                assert_eq!(
                    reply.status,
                    StatusCode::UNAUTHORIZED,
                    "{asked} with token {token:?}: {}",
                    reply.text
                );
                reply.error();
                assert_eq!(
                    reply
                        .headers
                        .get(header::WWW_AUTHENTICATE)
                        .map(|v| v.as_bytes()),
                    Some(&b"Bearer"[..]),
                    "{asked}: 401 without WWW-Authenticate"
                );
            }
            let node = send(Some(NODE), body.clone()).await;
            if NODE_OPERATIONS.contains(&op.id.as_str()) {
                assert!(
                    node.status.is_success() || node.status == StatusCode::NOT_FOUND,
                    "{asked}: a node token may call it, got {} {}",
                    node.status,
                    node.text
                );
            } else {
                let reply = node.expect_error(StatusCode::FORBIDDEN, &["node:pbx-1", "Node"]);
                assert!(
                    !reply.error().contains(NODE),
                    "{asked}: the error shows the token"
                );
            }
            let read = send(Some(WALLBOARD), body.clone()).await;
            if op.method == Method::GET {
                assert!(
                    read.status.is_success() || read.status == StatusCode::NOT_FOUND,
                    "{asked}: a read token may read, got {} {}",
                    read.status,
                    read.text
                );
            } else {
                let reply = read.expect_error(StatusCode::FORBIDDEN, &["wallboard"]);
                assert!(
                    !reply.error().contains(WALLBOARD),
                    "{asked}: the error shows the token"
                );
                let write = send(Some(CRM), Some(b"{".to_vec())).await;
                if op.admin {
                    write.expect_error(StatusCode::FORBIDDEN, &["crm-main", "Admin"]);
                } else if NODE_ONLY_OPERATIONS.contains(&op.id.as_str()) {
                    write.expect_error(StatusCode::FORBIDDEN, &["crm-main", "Node"]);
                } else {
                    assert!(
                        !matches!(
                            write.status,
                            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
                        ),
                        "{asked}: a write token may write, got {} {}",
                        write.status,
                        write.text
                    );
                }
            }
        }

        // With every right and a body the document's schema asks for, the operation is
        // routed: no 405, no route-miss, and the body's shape is what the handler reads.
        let reply = send(Some(OPS), body).await;
        assert!(
            reply.headers.get("grpc-status").is_none(),
            "{asked} fell through to the gRPC fallback: {} {:?}",
            reply.status,
            reply.headers
        );
        match reply.status {
            status if status.is_success() => {}
            StatusCode::NOT_FOUND => {
                let error = reply.error();
                assert!(
                    error.contains("`missing-"),
                    "{asked}: 404 `{error}` names no missing entity"
                );
            }
            StatusCode::BAD_REQUEST => {
                let error = reply.error();
                assert!(
                    !error.starts_with("invalid body"),
                    "{asked}: the handler refuses the body the document describes: {error}"
                );
            }
            other => panic!(
                "{asked} with an admin token answered {other} {}",
                reply.text
            ),
        }
    }

    // The document and rest.rs name the same routes.
    let documented: BTreeSet<(String, String)> = ops
        .iter()
        .map(|o| (o.method.to_string(), o.template.clone()))
        .chain(
            UNDOCUMENTED
                .iter()
                .map(|(m, p)| ((*m).to_owned(), (*p).to_owned())),
        )
        .collect();
    let routed = routes_in_source();
    assert_eq!(
        routed.difference(&documented).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "routes of rest.rs the document lacks"
    );
    assert_eq!(
        documented.difference(&routed).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "documented routes rest.rs does not serve"
    );

    // And the router agrees: a method the document does not list on a path is 405, a path
    // it does not list is a JSON 404 (never the gRPC fallback's 200).
    let paths: BTreeMap<&str, &str> = ops
        .iter()
        .map(|o| (o.template.as_str(), o.path.as_str()))
        .collect();
    for (template, path) in paths {
        for method in ["GET", "PUT", "POST", "DELETE", "PATCH"] {
            if documented.contains(&(method.to_owned(), template.to_owned())) {
                continue;
            }
            let reply = call(
                api.app.clone(),
                method.parse().expect("method"),
                path,
                Some(OPS),
                None,
            )
            .await;
            assert_eq!(
                reply.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} is not documented but answered {} {}",
                reply.status,
                reply.text
            );
        }
    }
    for path in [
        "",
        "/",
        "/agent",
        "/agents/",
        "/agents/1001/nope",
        "/queues/sales/members/1001/x",
        "/v2/agents",
    ] {
        for method in [Method::GET, Method::POST] {
            let reply = call(api.app.clone(), method.clone(), path, Some(OPS), None).await;
            assert_eq!(
                reply.status,
                StatusCode::NOT_FOUND,
                "{method} /api/v1{path} is no route but answered {} {:?} {}",
                reply.status,
                reply.headers,
                reply.text
            );
            reply.error();
        }
    }
    // A CRM that leaves out the prefix is told so, not answered by the gRPC fallback.
    let outside = api
        .app
        .clone()
        .oneshot(
            Request::builder()
                .method(Method::POST)
                .uri("/agents/1001/sales")
                .header(header::AUTHORIZATION, format!("Bearer {OPS}"))
                .body(axum::body::Body::empty())
                .expect("request"),
        )
        .await
        .expect("answered");
    assert_eq!(outside.status(), StatusCode::NOT_FOUND);
    // A gRPC client calling a service this port lacks gets UNIMPLEMENTED, as gRPC expects.
    let grpc = api
        .app
        .clone()
        .oneshot(
            Request::builder()
                .method(Method::POST)
                .uri("/callfleet.lock.v1.Locks/Acquire")
                .header(header::CONTENT_TYPE, "application/grpc")
                .body(axum::body::Body::empty())
                .expect("request"),
        )
        .await
        .expect("answered");
    assert_eq!(grpc.status(), StatusCode::OK);
    assert_eq!(grpc.headers()["grpc-status"], "12");
}

// ---- 3. concurrent CRMs ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_crms_on_sqlite() {
    let (_dir, store) = sqlite_store().await;
    concurrent_crms(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_crms_on_mariadb() {
    concurrent_crms(mysql_store().await).await;
}

/// What one concurrent request does.
#[derive(Debug, Clone)]
enum Change {
    Tags(Vec<String>),
    Cap(u32),
    Priority(i32),
    Sale,
}

async fn concurrent_crms(store: Store) {
    let api = Arc::new(Api::start(store).await);
    let ok = StatusCode::OK;
    api.put("/queues/support", CRM, json!({ "name": "Support" }))
        .await
        .expect(ok);
    api.put("/devices/4001", CRM, json!({ "endpoint": "PJSIP/4001" }))
        .await
        .expect(ok);
    api.put(
        "/agents/3001",
        CRM,
        json!({ "name": "Erin", "tags": ["start"] }),
    )
    .await
    .expect(ok);
    api.put(
        "/queues/support/members/3001",
        CRM,
        json!({ "priority": 100 }),
    )
    .await
    .expect(ok);
    api.post("/agents/3001/login", CRM, Some(json!({ "device": "4001" })))
        .await
        .expect(ok);

    // 24 requests on one agent from two CRMs, released at once.
    let changes: Vec<Change> = (0..24)
        .map(|i| match i % 4 {
            0 => Change::Tags(vec![format!("t{i}"), "shared".to_owned()]),
            1 => Change::Cap(i),
            2 => Change::Priority(i32::try_from(i).expect("small")),
            _ => Change::Sale,
        })
        .collect();
    let before = api.last_audit_id().await;
    let barrier = Arc::new(tokio::sync::Barrier::new(changes.len()));
    let mut tasks = Vec::new();
    for (i, change) in changes.iter().cloned().enumerate() {
        let (api, barrier) = (api.clone(), barrier.clone());
        let token = if i % 2 == 0 { CRM } else { CRM_B };
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let reply = match &change {
                Change::Tags(tags) => {
                    api.put("/agents/3001/tags", token, json!({ "tags": tags }))
                        .await
                }
                Change::Cap(cap) => {
                    api.put("/agents/3001/daily-cap", token, json!({ "daily_cap": cap }))
                        .await
                }
                Change::Priority(priority) => {
                    api.put(
                        "/queues/support/members/3001",
                        token,
                        json!({ "priority": priority }),
                    )
                    .await
                }
                Change::Sale => api.post("/agents/3001/sales", token, None).await,
            };
            (change, reply.expect(StatusCode::OK))
        }));
    }
    let mut sale_counts = BTreeSet::new();
    for task in tasks {
        let (change, reply) = task.await.expect("request task");
        if let Change::Sale = change {
            let count = reply.json["sales_today"].as_u64().expect("sales_today");
            assert!(sale_counts.insert(count), "two sales saw count {count}");
        }
    }
    let sales = changes.iter().filter(|c| matches!(c, Change::Sale)).count() as u64;
    assert_eq!(
        sale_counts,
        (1..=sales).collect(),
        "each sale saw its own count"
    );

    // Every field holds one of the values written: the one written last.
    let agent = api
        .get("/agents/3001", Some(WALLBOARD))
        .await
        .expect(ok)
        .json;
    assert_eq!(agent["sales_today"], sales);
    assert_eq!(agent["name"], "Erin", "no change undid another");
    assert_eq!(agent["device"], "4001");
    let members = api
        .get("/queues/support/members", Some(WALLBOARD))
        .await
        .expect(ok)
        .json;
    let priority = members[0]["priority"].as_i64().expect("priority");
    let tags: Vec<String> = serde_json::from_value(agent["tags"].clone()).expect("tags");
    let cap = agent["daily_cap"].as_u64().expect("a cap was set");
    assert!(
        changes.iter().any(|c| matches!(c, Change::Tags(t) if {
            let mut t = t.clone();
            t.sort();
            t == tags
        })),
        "tags {tags:?} were never written"
    );
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, Change::Cap(v) if u64::from(*v) == cap))
    );
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, Change::Priority(v) if i64::from(*v) == priority))
    );

    // One audit row per request, by the CRM that sent it, and the last row of each kind
    // holds the value that stayed.
    let rows = api.audit_since(before).await;
    assert_eq!(rows.len(), changes.len(), "{rows:#?}");
    let mut by_actor: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_action: BTreeMap<String, usize> = BTreeMap::new();
    for row in &rows {
        *by_actor
            .entry(row["actor"].as_str().expect("actor").to_owned())
            .or_default() += 1;
        *by_action
            .entry(row["action"].as_str().expect("action").to_owned())
            .or_default() += 1;
        assert_eq!(row["subject"], "agent:3001");
    }
    assert_eq!(
        by_actor,
        BTreeMap::from([("crm-backup".to_owned(), 12), ("crm-main".to_owned(), 12)])
    );
    assert_eq!(by_action.len(), 4, "{by_action:?}");
    assert!(by_action.values().all(|n| *n == 6), "{by_action:?}");
    let last = |action: &str| -> &Value {
        rows.iter()
            .rev()
            .find(|r| r["action"] == action)
            .unwrap_or_else(|| panic!("no {action} row"))
    };
    let last_tags: Vec<String> =
        serde_json::from_value(last("agent.set_tags")["detail"]["tags"].clone()).expect("tags");
    assert_eq!(last_tags, tags, "the last tags written are the ones kept");
    assert_eq!(last("agent.set_daily_cap")["detail"]["daily_cap"], cap);
    assert_eq!(last("agent.set_priority")["detail"]["priority"], priority);

    // The in-memory view (list, routing) shows the same final state as the store.
    let listed = api.get("/agents", Some(WALLBOARD)).await.expect(ok).json;
    assert_eq!(listed[0], agent, "the view lags behind the store");
    let candidates = api.candidates("support", "").await;
    assert_eq!(
        candidates,
        [(
            "3001".to_owned(),
            i32::try_from(priority).expect("i32"),
            sales >= cap
        )]
    );

    // Ten agents race for one phone from both CRMs: one gets it, nine are told who.
    api.put("/devices/4002", CRM, json!({ "endpoint": "PJSIP/4002" }))
        .await
        .expect(ok);
    let racers: Vec<String> = (3002..3012).map(|n| n.to_string()).collect();
    for racer in &racers {
        api.put(
            &format!("/agents/{racer}"),
            CRM,
            json!({ "name": format!("Agent {racer}") }),
        )
        .await
        .expect(ok);
        api.put(
            &format!("/queues/support/members/{racer}"),
            CRM,
            json!({ "priority": 1 }),
        )
        .await
        .expect(ok);
    }
    let before = api.last_audit_id().await;
    let barrier = Arc::new(tokio::sync::Barrier::new(racers.len()));
    let mut tasks = Vec::new();
    for (i, racer) in racers.iter().cloned().enumerate() {
        let (api, barrier) = (api.clone(), barrier.clone());
        let token = if i % 2 == 0 { CRM } else { CRM_B };
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let reply = api
                .post(
                    &format!("/agents/{racer}/login"),
                    token,
                    Some(json!({ "device": "4002" })),
                )
                .await;
            (racer, reply)
        }));
    }
    let mut winners = Vec::new();
    let mut refusals = Vec::new();
    for task in tasks {
        let (racer, reply) = task.await.expect("login task");
        match reply.status {
            StatusCode::OK => winners.push(racer),
            StatusCode::CONFLICT => refusals.push(reply.error().to_owned()),
            other => panic!("login of {racer} answered {other} {}", reply.text),
        }
    }
    assert_eq!(winners.len(), 1, "one agent gets the phone: {winners:?}");
    let winner = &winners[0];
    for refusal in &refusals {
        assert!(
            refusal.contains(&format!("`{winner}`")) && refusal.contains("`4002`"),
            "the refusal `{refusal}` does not name {winner} on 4002"
        );
    }
    let rows = api.audit_since(before).await;
    assert_eq!(rows.len(), 1, "only the winning login is logged: {rows:#?}");
    assert_eq!(rows[0]["subject"], format!("agent:{winner}"));
    let listed = api.get("/agents", Some(WALLBOARD)).await.expect(ok).json;
    let on_phone: Vec<&str> = listed
        .as_array()
        .expect("agents")
        .iter()
        .filter(|a| a["device"] == "4002")
        .map(|a| a["id"].as_str().expect("id"))
        .collect();
    assert_eq!(on_phone, [winner.as_str()]);
    let (served, available, logged_in) = api.status("support").await;
    assert!(served);
    assert_eq!((available, logged_in), (2, 2));

    // One CRM moves an agent to a new desk while the other deletes the desk they leave:
    // whichever commits first, the other sees it, and the log tells one story.
    api.put("/agents/3100", CRM, json!({ "name": "Frank" }))
        .await
        .expect(ok);
    for round in 0..6 {
        let (old, new) = (format!("50{round}0"), format!("50{round}1"));
        for device in [&old, &new] {
            api.put(
                &format!("/devices/{device}"),
                CRM,
                json!({ "endpoint": format!("PJSIP/{device}") }),
            )
            .await
            .expect(ok);
        }
        api.post("/agents/3100/login", CRM, Some(json!({ "device": old })))
            .await
            .expect(ok);
        let before = api.last_audit_id().await;
        let moving = {
            let (api, new) = (api.clone(), new.clone());
            tokio::spawn(async move {
                api.post("/agents/3100/login", CRM, Some(json!({ "device": new })))
                    .await
            })
        };
        let deleting = {
            let (api, old) = (api.clone(), old.clone());
            tokio::spawn(async move { api.delete(&format!("/devices/{old}"), CRM_B).await })
        };
        let moved = moving.await.expect("move").expect(ok);
        deleting
            .await
            .expect("delete")
            .expect(StatusCode::NO_CONTENT);
        let frank = api.get("/agents/3100", Some(WALLBOARD)).await.expect(ok);
        assert_eq!(frank.json["device"], new.as_str(), "round {round}");
        let rows = api.audit_since(before).await;
        assert_eq!(rows.len(), 2, "round {round}: {rows:#?}");
        let login = rows
            .iter()
            .find(|r| r["action"] == "agent.login")
            .expect("login row");
        let deletion = rows
            .iter()
            .find(|r| r["action"] == "device.delete")
            .expect("delete row");
        let move_first = login["detail"]["moved_from"] == old.as_str();
        let delete_first = deletion["detail"]["logged_out"] == "3100";
        assert!(
            move_first != delete_first,
            "round {round}: exactly one order happened: {rows:#?}"
        );
        assert_eq!(
            moved.json["login"],
            if move_first { "moved" } else { "new" },
            "round {round}: the answer matches the log"
        );
        api.post("/agents/3100/logout", CRM, None).await.expect(ok);
    }

    assert_eq!(
        api.audit_all(1000).await.len(),
        api.writes_ok.load(Ordering::Relaxed),
        "every successful write left exactly one audit row"
    );
}

/// A change written by another control-plane instance (here: straight into the store)
/// reaches this one's in-memory directory within a refresh, and an unchanged directory is
/// not re-read.
#[tokio::test]
async fn changes_from_elsewhere_show_up_after_a_refresh() {
    let (_dir, store) = sqlite_store().await;
    store
        .upsert_queue(
            &callfleet_core::store::Queue {
                id: "sales".into(),
                name: "Sales".into(),
                service_level_ms: 20_000,
            },
            "setup",
        )
        .await
        .expect("queue");
    let control = Arc::new(
        Control::start(store.clone(), &control_config())
            .await
            .expect("control plane starts"),
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let refresher = {
        let (control, shutdown) = (control.clone(), shutdown.clone());
        tokio::spawn(async move {
            control
                .refresh_loop(Duration::from_millis(50), shutdown)
                .await;
        })
    };
    let before = control.view();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        Arc::ptr_eq(&before, &control.view()),
        "nothing changed, yet the directory was read again"
    );
    assert_eq!(
        control
            .queue_status("sales")
            .expect("status")
            .status
            .logged_in_agents,
        0
    );

    // Another instance seats an agent.
    let agent = callfleet_core::store::Agent {
        id: "1001".into(),
        name: "Ana".into(),
        tags: BTreeSet::new(),
        daily_cap: None,
        enabled: true,
    };
    store
        .upsert_agent(&agent, "elsewhere")
        .await
        .expect("agent");
    let device = callfleet_core::store::Device {
        id: "2001".into(),
        endpoint: "PJSIP/2001".into(),
        name: None,
        contact: None,
        registers: false,
    };
    store
        .upsert_device(&device, "elsewhere")
        .await
        .expect("device");
    store
        .login("1001", "2001", "elsewhere")
        .await
        .expect("login");
    store
        .set_priority("sales", "1001", 1, "elsewhere")
        .await
        .expect("member");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while control
        .queue_status("sales")
        .expect("status")
        .status
        .available_agents
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the change never reached the in-memory directory"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    refresher.await.expect("refresher stops");
}
