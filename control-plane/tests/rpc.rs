//! The CRM faces of the control plane, end to end: XML-RPC at `/RPC2` and gRPC
//! `callfleet.control.v1.Control`, each running one call-center scenario on SQLite and on
//! MariaDB.
//!
//! The XML-RPC bodies are written out literally, byte for byte as the clients the CRMs use
//! send them: PHP's `xmlrpc_encode_request` (an ISO-8859-1 declaration, one-space
//! indentation, `<string>` and `<int>`), Python's `xmlrpc.client` (`<?xml version='1.0'?>`,
//! a value per line), Apache XML-RPC for Java (one line, strings without a type element,
//! `<i4>`) and hand-written templates. What is asserted is what such a client reads back:
//! HTTP 200 with `text/xml`, and a `<methodResponse>` decoded by `dxr` (a value, or a fault
//! with its code and string). The router is called through `oneshot`, as a server would
//! call it; gRPC goes through a real listener on `127.0.0.1:0` and a tonic client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use callfleet_control_plane::xmlrpc::{self, Fault, Value};
use callfleet_control_plane::{Control, router};
use callfleet_core::config::{ApiToken, ControlPlaneConfig, Role, Secret};
use callfleet_core::store::{Agent, AgentState, Device, Queue};
use callfleet_core::{Heartbeat, NodeId, NodeRole, PoolName, Store, testing};
use callfleet_proto::control::v1 as pb;
use callfleet_proto::control::v1::control_client::ControlClient;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;
use tower::ServiceExt;

/// Role `admin`: may also drain nodes.
const ADMIN: &str = "admin-token-0123456789abcdef";
/// Role `write`: what a CRM gets.
const CRM: &str = "crm-token-0123456789abcdef";
/// Role `read`: a wallboard.
const WALLBOARD: &str = "wallboard-token-0123456789";

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    MariaDb,
}

/// A fresh, migrated store; the temporary folder (SQLite) lives as long as the guard.
async fn open(backend: Backend) -> (Store, Option<tempfile::TempDir>) {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temporary folder");
            let store = Store::connect(&testing::sqlite_config(dir.path()))
                .await
                .expect("open the SQLite store");
            (store, Some(dir))
        }
        Backend::MariaDb => {
            let config = testing::fresh_mysql_config().await;
            let store = Store::connect(&config)
                .await
                .expect("open the MariaDB store");
            (store, None)
        }
    }
}

fn config() -> ControlPlaneConfig {
    let token = |name: &str, token: &str, role| ApiToken {
        name: name.to_owned(),
        token: Secret::new(token),
        role,
    };
    ControlPlaneConfig {
        tokens: vec![
            token("admin", ADMIN, Role::Admin),
            token("crm", CRM, Role::Write),
            token("wallboard", WALLBOARD, Role::Read),
        ],
        ..ControlPlaneConfig::default()
    }
}

/// A heartbeat of a core node with `calls` calls up.
fn beat(id: &str, calls: u32) -> Heartbeat {
    Heartbeat {
        id: NodeId::new(id).expect("valid node id"),
        pool: PoolName::new("default").expect("valid pool"),
        role: NodeRole::Core,
        sip_uri: "sip:10.0.0.1:5060".into(),
        calls,
        pbx_up: true,
        max_calls: 100,
        load1: 0.5,
        cpu_pct: 10.0,
        mem_pct: 30.0,
        cores: 2,
        shed: Vec::new(),
        refusing_calls: false,
        interval: Duration::from_secs(2),
        first_of_run: true,
    }
}

/// Queue `sales`, phones 2001–2003, agents 1001 Alice, 1002 Bob, 1003 Chloé and node
/// `core-1` (3 calls up), written as an administrator would before the CRM starts calling:
/// XML-RPC has no methods for these.
async fn seed(store: &Store) {
    let queue = Queue {
        id: "sales".into(),
        name: "Sales".into(),
        service_level_ms: 20_000,
    };
    store.upsert_queue(&queue, "setup").await.expect("queue");
    for (n, name) in [(1, "Alice"), (2, "Bob"), (3, "Chloé")] {
        let device = Device {
            id: format!("200{n}"),
            endpoint: format!("PJSIP/200{n}"),
            name: Some(format!("desk {n}")),
            contact: None,
            registers: false,
        };
        store.upsert_device(&device, "setup").await.expect("device");
        let agent = Agent {
            id: format!("100{n}"),
            name: name.into(),
            tags: Default::default(),
            daily_cap: None,
            enabled: true,
        };
        store.upsert_agent(&agent, "setup").await.expect("agent");
    }
    store
        .heartbeat(&beat("core-1", 3))
        .await
        .expect("heartbeat");
}

// ---- XML-RPC helpers -------------------------------------------------------------------

/// POSTs `body` to `/RPC2` with `token` as bearer, checks the HTTP envelope every XML-RPC
/// answer must have, and decodes the `<methodResponse>`.
async fn rpc(app: &Router, token: Option<&str>, body: &str) -> Result<Value, Fault> {
    rpc_bytes(app, token, body.as_bytes()).await
}

/// [`rpc`] for a body that is not UTF-8 (PHP's ISO-8859-1).
async fn rpc_bytes(app: &Router, token: Option<&str>, body: &[u8]) -> Result<Value, Fault> {
    let mut request = Request::post("/RPC2")
        .header(header::CONTENT_TYPE, "text/xml")
        .header(header::USER_AGENT, "Python-xmlrpc/3.12");
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body.to_vec())).expect("request"))
        .await
        .expect("the router answers");
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().expect("ascii content type").to_owned());
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    let text = String::from_utf8(bytes.to_vec()).expect("a UTF-8 response");
    assert_eq!(status, StatusCode::OK, "XML-RPC answers 200, got: {text}");
    let content_type = content_type.unwrap_or_default();
    assert!(
        content_type.starts_with("text/xml"),
        "content type {content_type:?} for {text}"
    );
    assert!(text.starts_with("<?xml"), "no XML declaration: {text}");
    decode(&text)
}

fn decode(text: &str) -> Result<Value, Fault> {
    if text.contains("<fault>") {
        Err(dxr::FaultResponse::from_xml(text)
            .unwrap_or_else(|err| panic!("not a fault response ({err}): {text}"))
            .fault)
    } else {
        Ok(dxr::MethodResponse::from_xml(text)
            .unwrap_or_else(|err| panic!("not a method response ({err}): {text}"))
            .value)
    }
}

/// The value as JSON, to compare whole structs in one assertion.
fn json(value: &Value) -> serde_json::Value {
    match value {
        Value::Integer(i) => json!(i),
        Value::Long(l) => json!(l),
        Value::Boolean(b) => json!(b),
        Value::String(s) => json!(s),
        Value::Double(d) => json!(d),
        Value::Struct(members) => serde_json::Value::Object(
            members
                .iter()
                .map(|(name, value)| (name.clone(), json(value)))
                .collect(),
        ),
        Value::Array(items) => serde_json::Value::Array(items.iter().map(json).collect()),
        Value::Nil => serde_json::Value::Null,
        other => panic!("no value of this type is expected: {other:?}"),
    }
}

/// The successful result of a call, as JSON.
fn ok(result: Result<Value, Fault>) -> serde_json::Value {
    match result {
        Ok(value) => json(&value),
        Err(fault) => panic!(
            "expected a value, got fault {}: {}",
            fault.code(),
            fault.string()
        ),
    }
}

/// Checks that the call failed with `code` and a fault string containing every `needle`.
fn fault(result: Result<Value, Fault>, code: i32, needles: &[&str]) {
    let fault = match result {
        Ok(value) => panic!("expected fault {code}, got {value:?}"),
        Err(fault) => fault,
    };
    assert_eq!(fault.code(), code, "fault string: {}", fault.string());
    for needle in needles {
        assert!(
            fault.string().contains(needle),
            "fault string {:?} does not contain {needle:?}",
            fault.string()
        );
    }
}

/// The agent ids of a `queue.candidates` answer, in order.
fn order(candidates: &serde_json::Value) -> Vec<&str> {
    candidates
        .as_array()
        .unwrap_or_else(|| panic!("candidates are an array: {candidates}"))
        .iter()
        .map(|c| c["agent"].as_str().expect("agent id"))
        .collect()
}

/// Python: `ServerProxy(url).queue.candidates("sales")`.
const PY_CANDIDATES: &str = "<?xml version='1.0'?>
<methodCall>
<methodName>queue.candidates</methodName>
<params>
<param>
<value><string>sales</string></value>
</param>
</params>
</methodCall>
";

/// Python: `queue.candidates("sales", {"vip": True})`.
const PY_CANDIDATES_VIP: &str = "<?xml version='1.0'?>
<methodCall>
<methodName>queue.candidates</methodName>
<params>
<param>
<value><string>sales</string></value>
</param>
<param>
<value><struct>
<member>
<name>vip</name>
<value><boolean>1</boolean></value>
</member>
</struct></value>
</param>
</params>
</methodCall>
";

/// PHP: `xmlrpc_encode_request("queue.status", ["sales"])`.
const PHP_STATUS: &str = r#"<?xml version="1.0" encoding="iso-8859-1"?>
<methodCall>
<methodName>queue.status</methodName>
<params>
 <param>
  <value>
   <string>sales</string>
  </value>
 </param>
</params>
</methodCall>
"#;

async fn candidates(app: &Router) -> serde_json::Value {
    ok(rpc(app, Some(WALLBOARD), PY_CANDIDATES).await)
}

async fn status(app: &Router) -> serde_json::Value {
    // The website asks without a token.
    ok(rpc(app, None, PHP_STATUS).await)
}

/// The XML-RPC status of `queue` in a control plane without its figures loop (the lock
/// service unasked) and without calls today: `waiting`, `longest_wait_ms` and
/// `service_level_pct_today` are null, which XML-RPC leaves out of the struct.
fn status_json(queue: &str, served: bool, available: u32, logged_in: u32) -> serde_json::Value {
    json!({
        "queue": queue,
        "served": served,
        "available_agents": available,
        "logged_in_agents": logged_in,
        "waiting_unknown": true,
        "answered_today": 0,
        "abandoned_today": 0,
        "overflowed_today": 0,
        "answered_within_sl_today": 0,
    })
}

// ---- XML-RPC scenario ------------------------------------------------------------------

async fn xmlrpc_scenario(backend: Backend) {
    let (store, _dir) = open(backend).await;
    seed(&store).await;
    let control = Arc::new(
        Control::start(store.clone(), &config())
            .await
            .expect("start"),
    );
    let app = router(control);

    // Nobody logged in: the website hides the number.
    assert_eq!(status(&app).await, status_json("sales", false, 0, 0));

    // ---- hot-desking: three clients, three spellings -----------------------------------
    // PHP with string ids.
    let login = rpc(
        &app,
        Some(CRM),
        r#"<?xml version="1.0" encoding="iso-8859-1"?>
<methodCall>
<methodName>agent.login</methodName>
<params>
 <param>
  <value>
   <string>1001</string>
  </value>
 </param>
 <param>
  <value>
   <string>2001</string>
  </value>
 </param>
</params>
</methodCall>
"#,
    )
    .await;
    assert_eq!(
        ok(login),
        json!({"agent": "1001", "device": "2001", "endpoint": "PJSIP/2001"})
    );
    // PHP with integer ids: `xmlrpc_encode_request("agent.login", [1002, 2002])`.
    let login = rpc(
        &app,
        Some(CRM),
        r#"<?xml version="1.0" encoding="iso-8859-1"?>
<methodCall>
<methodName>agent.login</methodName>
<params>
 <param>
  <value>
   <int>1002</int>
  </value>
 </param>
 <param>
  <value>
   <int>2002</int>
  </value>
 </param>
</params>
</methodCall>
"#,
    )
    .await;
    assert_eq!(
        ok(login),
        json!({"agent": "1002", "device": "2002", "endpoint": "PJSIP/2002"})
    );
    // Apache XML-RPC (Java): one line, strings without a type element.
    let login = rpc(
        &app,
        Some(CRM),
        r#"<?xml version="1.0" encoding="UTF-8"?><methodCall><methodName>agent.login</methodName><params><param><value>1003</value></param><param><value>2003</value></param></params></methodCall>"#,
    )
    .await;
    assert_eq!(
        ok(login),
        json!({"agent": "1003", "device": "2003", "endpoint": "PJSIP/2003"})
    );

    // ---- priorities decide the order ---------------------------------------------------
    // Python: `agent.setPriority("1001", "sales", 5)`.
    let set = rpc(
        &app,
        Some(CRM),
        "<?xml version='1.0'?>
<methodCall>
<methodName>agent.setPriority</methodName>
<params>
<param>
<value><string>1001</string></value>
</param>
<param>
<value><string>sales</string></value>
</param>
<param>
<value><int>5</int></value>
</param>
</params>
</methodCall>
",
    )
    .await;
    assert_eq!(ok(set), json!(true));
    // Apache XML-RPC: `<i4>`.
    let set = rpc(
        &app,
        Some(CRM),
        r#"<?xml version="1.0" encoding="UTF-8"?><methodCall><methodName>agent.setPriority</methodName><params><param><value>1002</value></param><param><value>sales</value></param><param><value><i4>1</i4></value></param></params></methodCall>"#,
    )
    .await;
    assert_eq!(ok(set), json!(true));
    // PHP.
    let set = rpc(
        &app,
        Some(CRM),
        r#"<?xml version="1.0" encoding="iso-8859-1"?>
<methodCall>
<methodName>agent.setPriority</methodName>
<params>
 <param>
  <value>
   <string>1003</string>
  </value>
 </param>
 <param>
  <value>
   <string>sales</string>
  </value>
 </param>
 <param>
  <value>
   <int>3</int>
  </value>
 </param>
</params>
</methodCall>
"#,
    )
    .await;
    assert_eq!(ok(set), json!(true));

    assert_eq!(
        candidates(&app).await,
        json!([
            {"agent": "1002", "endpoint": "PJSIP/2002", "priority": 1, "demoted": false},
            {"agent": "1003", "endpoint": "PJSIP/2003", "priority": 3, "demoted": false},
            {"agent": "1001", "endpoint": "PJSIP/2001", "priority": 5, "demoted": false},
        ])
    );
    assert_eq!(status(&app).await, status_json("sales", true, 3, 3));

    // The CRM promotes Alice; the very next question sees it.
    let set = rpc(
        &app,
        Some(CRM),
        r#"<?xml version="1.0"?>
<methodCall>
  <methodName>agent.setPriority</methodName>
  <params>
    <param><value>1001</value></param>
    <param><value>sales</value></param>
    <param><value><i4>0</i4></value></param>
  </params>
</methodCall>
"#,
    )
    .await;
    assert_eq!(ok(set), json!(true));
    assert_eq!(order(&candidates(&app).await), ["1001", "1002", "1003"]);

    // ---- daily cap: a sale past the cap demotes ----------------------------------------
    let capped = rpc(
        &app,
        Some(CRM),
        r#"<?xml version="1.0" encoding="iso-8859-1"?>
<methodCall>
<methodName>agent.setDailyCap</methodName>
<params>
 <param>
  <value>
   <string>1001</string>
  </value>
 </param>
 <param>
  <value>
   <int>1</int>
  </value>
 </param>
</params>
</methodCall>
"#,
    )
    .await;
    let capped = ok(capped);
    // Since the agent was made, by the store's clock: a time of this run, not a constant.
    let since = &capped["state_since_ms"];
    assert!(
        since.as_i64().is_some_and(|ms| ms > 1_700_000_000_000),
        "{capped}"
    );
    assert_eq!(
        capped,
        json!({
            "id": "1001", "name": "Alice", "tags": [], "daily_cap": 1, "enabled": true,
            "state": "available", "device": "2001", "sales_today": 0, "calls_today": 0,
            "missed_today": 0, "state_since_ms": since,
        })
    );
    assert_eq!(order(&candidates(&app).await), ["1001", "1002", "1003"]);
    let sale = rpc(
        &app,
        Some(CRM),
        "<?xml version='1.0'?>
<methodCall>
<methodName>agent.recordSale</methodName>
<params>
<param>
<value><string>1001</string></value>
</param>
</params>
</methodCall>
",
    )
    .await;
    assert_eq!(ok(sale), json!(1));
    // With a request id, the same sale sent twice (its answer lost) counts once.
    let with_id = "<?xml version='1.0'?>
<methodCall>
<methodName>agent.recordSale</methodName>
<params>
<param><value><string>1003</string></value></param>
<param><value><string>crm-sale-42</string></value></param>
</params>
</methodCall>
";
    assert_eq!(ok(rpc(&app, Some(CRM), with_id).await), json!(1));
    assert_eq!(ok(rpc(&app, Some(CRM), with_id).await), json!(1));
    let ranked = candidates(&app).await;
    assert_eq!(order(&ranked), ["1002", "1003", "1001"]);
    assert_eq!(
        ranked[2],
        json!({"agent": "1001", "endpoint": "PJSIP/2001", "priority": 0, "demoted": true})
    );
    // A negative cap removes the cap (XML-RPC has no portable null); the answer then has
    // no `daily_cap` member at all.
    let uncapped = rpc(
        &app,
        Some(CRM),
        r#"<?xml version="1.0"?>
<methodCall>
  <methodName>agent.setDailyCap</methodName>
  <params>
    <param><value>1001</value></param>
    <param><value><int>-1</int></value></param>
  </params>
</methodCall>
"#,
    )
    .await;
    let uncapped = ok(uncapped);
    assert_eq!(uncapped.get("daily_cap"), None, "{uncapped}");
    assert_eq!(uncapped["sales_today"], json!(1));
    assert_eq!(order(&candidates(&app).await), ["1001", "1002", "1003"]);

    // ---- tags and caller attributes ----------------------------------------------------
    // Python: `agent.setTags("1003", ["vip", "fr"])`.
    let tagged = rpc(
        &app,
        Some(CRM),
        "<?xml version='1.0'?>
<methodCall>
<methodName>agent.setTags</methodName>
<params>
<param>
<value><string>1003</string></value>
</param>
<param>
<value><array><data>
<value><string>vip</string></value>
<value><string>fr</string></value>
</data></array></value>
</param>
</params>
</methodCall>
",
    )
    .await;
    let tagged = ok(tagged);
    assert_eq!(tagged["id"], json!("1003"));
    // Sent as `Chlo&#233;`, read back as what was stored.
    assert_eq!(tagged["name"], json!("Chloé"));
    assert_eq!(tagged["tags"], json!(["fr", "vip"]));
    // A VIP caller goes to the agents tagged `vip` only.
    let vip = ok(rpc(&app, Some(WALLBOARD), PY_CANDIDATES_VIP).await);
    assert_eq!(
        vip,
        json!([{"agent": "1003", "endpoint": "PJSIP/2003", "priority": 3, "demoted": false}])
    );
    // PHP: `["vip" => false]` is an attribute explicitly not set: every candidate.
    let not_vip = rpc(
        &app,
        Some(WALLBOARD),
        r#"<?xml version="1.0" encoding="iso-8859-1"?>
<methodCall>
<methodName>queue.candidates</methodName>
<params>
 <param>
  <value>
   <string>sales</string>
  </value>
 </param>
 <param>
  <value>
   <struct>
    <member>
     <name>vip</name>
     <value>
      <boolean>0</boolean>
     </value>
    </member>
   </struct>
  </value>
 </param>
</params>
</methodCall>
"#,
    )
    .await;
    assert_eq!(order(&ok(not_vip)), ["1001", "1002", "1003"]);
    // A template that writes the flag as an untyped "1".
    let vip = rpc(
        &app,
        Some(WALLBOARD),
        r#"<?xml version="1.0"?>
<methodCall>
  <methodName>queue.candidates</methodName>
  <params>
    <param><value>sales</value></param>
    <param><value><struct>
      <member><name>vip</name><value>1</value></member>
    </struct></value></param>
  </params>
</methodCall>
"#,
    )
    .await;
    assert_eq!(order(&ok(vip)), ["1003"]);

    // ---- pause and unpause -------------------------------------------------------------
    let paused = rpc(
        &app,
        Some(CRM),
        r#"<?xml version="1.0"?>
<methodCall>
  <methodName>agent.pause</methodName>
  <params>
    <param><value>1002</value></param>
    <param><value>lunch break</value></param>
  </params>
</methodCall>
"#,
    )
    .await;
    assert_eq!(ok(paused), json!(true));
    assert_eq!(order(&candidates(&app).await), ["1001", "1003"]);
    assert_eq!(status(&app).await, status_json("sales", true, 2, 3));
    let unpause_1002 = r#"<?xml version="1.0" encoding="iso-8859-1"?>
<methodCall>
<methodName>agent.unpause</methodName>
<params>
 <param>
  <value>
   <string>1002</string>
  </value>
 </param>
</params>
</methodCall>
"#;
    let unpaused = rpc(&app, Some(CRM), unpause_1002).await;
    assert_eq!(ok(unpaused), json!(true));
    assert_eq!(order(&candidates(&app).await), ["1001", "1002", "1003"]);
    // PHP's default: ISO-8859-1 bytes as declared (`é` is the single byte 0xE9).
    let mut latin1 = br#"<?xml version="1.0" encoding="iso-8859-1"?>
<methodCall>
<methodName>agent.pause</methodName>
<params>
 <param>
  <value>
   <string>1002</string>
  </value>
 </param>
 <param>
  <value>
   <string>Pause caf"#
        .to_vec();
    latin1.push(0xE9);
    latin1.extend_from_slice(
        b"</string>
  </value>
 </param>
</params>
</methodCall>
",
    );
    assert_eq!(ok(rpc_bytes(&app, Some(CRM), &latin1).await), json!(true));
    assert_eq!(
        store
            .availability("1002")
            .await
            .expect("availability")
            .state,
        AgentState::Paused {
            reason: "Pause café".into()
        }
    );
    assert_eq!(ok(rpc(&app, Some(CRM), unpause_1002).await), json!(true));

    // ---- logout: the only VIP agent leaves, VIP callers fall back to everyone ----------
    let logout = rpc(
        &app,
        Some(CRM),
        "<?xml version='1.0'?>
<methodCall>
<methodName>agent.logout</methodName>
<params>
<param>
<value><string>1003</string></value>
</param>
</params>
</methodCall>
",
    )
    .await;
    assert_eq!(ok(logout), json!(true));
    let vip = ok(rpc(&app, Some(WALLBOARD), PY_CANDIDATES_VIP).await);
    assert_eq!(order(&vip), ["1001", "1002"]);
    assert_eq!(status(&app).await, status_json("sales", true, 2, 2));

    // ---- faults of the service: 404, 409 -----------------------------------------------
    let unknown_agent = "<?xml version='1.0'?>
<methodCall>
<methodName>agent.recordSale</methodName>
<params>
<param>
<value><string>9999</string></value>
</param>
</params>
</methodCall>
";
    fault(rpc(&app, Some(CRM), unknown_agent).await, 404, &["9999"]);
    let priority_of_unknown = r#"<?xml version="1.0"?>
<methodCall>
  <methodName>agent.setPriority</methodName>
  <params>
    <param><value>9999</value></param>
    <param><value>sales</value></param>
    <param><value><int>1</int></value></param>
  </params>
</methodCall>
"#;
    fault(
        rpc(&app, Some(CRM), priority_of_unknown).await,
        404,
        &["9999"],
    );
    let unknown_queue = r#"<?xml version="1.0" encoding="iso-8859-1"?>
<methodCall>
<methodName>queue.status</methodName>
<params>
 <param>
  <value>
   <string>support</string>
  </value>
 </param>
</params>
</methodCall>
"#;
    fault(rpc(&app, None, unknown_queue).await, 404, &["support"]);
    // Carol tries Alice's phone.
    let taken = r#"<?xml version="1.0" encoding="iso-8859-1"?>
<methodCall>
<methodName>agent.login</methodName>
<params>
 <param>
  <value>
   <string>1003</string>
  </value>
 </param>
 <param>
  <value>
   <string>2001</string>
  </value>
 </param>
</params>
</methodCall>
"#;
    fault(rpc(&app, Some(CRM), taken).await, 409, &["2001", "1001"]);

    // ---- faults of the call: wrong types, arity ----------------------------------------
    // Python: `agent.setPriority("1001", "sales", "high")`.
    let wrong_type = "<?xml version='1.0'?>
<methodCall>
<methodName>agent.setPriority</methodName>
<params>
<param>
<value><string>1001</string></value>
</param>
<param>
<value><string>sales</string></value>
</param>
<param>
<value><string>high</string></value>
</param>
</params>
</methodCall>
";
    fault(
        rpc(&app, Some(CRM), wrong_type).await,
        -32602,
        &["parameter 3 (priority)", "high"],
    );
    let too_few = "<?xml version='1.0'?>
<methodCall>
<methodName>agent.setPriority</methodName>
<params>
<param>
<value><string>1001</string></value>
</param>
<param>
<value><string>sales</string></value>
</param>
</params>
</methodCall>
";
    fault(
        rpc(&app, Some(CRM), too_few).await,
        -32602,
        &["agent.setPriority", "priority", "got 2"],
    );
    // Tags as one string instead of an array.
    let tags_not_array = r#"<?xml version="1.0"?>
<methodCall>
  <methodName>agent.setTags</methodName>
  <params>
    <param><value>1001</value></param>
    <param><value>vip</value></param>
  </params>
</methodCall>
"#;
    fault(
        rpc(&app, Some(CRM), tags_not_array).await,
        -32602,
        &["parameter 2 (tags)"],
    );
    // A typo in a flag is not silently "not set".
    let typo = r#"<?xml version="1.0"?>
<methodCall>
  <methodName>queue.candidates</methodName>
  <params>
    <param><value>sales</value></param>
    <param><value><struct><member><name>vip</name><value>ture</value></member></struct></value></param>
  </params>
</methodCall>
"#;
    fault(
        rpc(&app, Some(WALLBOARD), typo).await,
        -32602,
        &["attributes", "vip", "ture"],
    );
    // A store validation error keeps the field's name (400, as REST).
    let bad_reason = format!(
        r#"<?xml version="1.0"?>
<methodCall>
  <methodName>agent.pause</methodName>
  <params>
    <param><value>1002</value></param>
    <param><value>{}</value></param>
  </params>
</methodCall>
"#,
        "x".repeat(10_000)
    );
    fault(rpc(&app, Some(CRM), &bad_reason).await, 400, &["reason"]);
    let unknown_method = "<?xml version='1.0'?>
<methodCall>
<methodName>agent.teleport</methodName>
<params>
<param>
<value><string>1001</string></value>
</param>
</params>
</methodCall>
";
    fault(
        rpc(&app, Some(CRM), unknown_method).await,
        -32601,
        &["agent.teleport"],
    );
    // A body cut off in transit.
    let truncated = "<?xml version='1.0'?>
<methodCall>
<methodName>agent.recordSale</methodName>
<params>
<param>
<value><string>1001</str";
    fault(rpc(&app, Some(CRM), truncated).await, -32700, &[]);
    fault(rpc(&app, Some(CRM), "").await, -32700, &[]);

    // ---- authentication and roles ------------------------------------------------------
    let sale = r#"<?xml version="1.0" encoding="iso-8859-1"?>
<methodCall>
<methodName>agent.recordSale</methodName>
<params>
 <param>
  <value>
   <string>1002</string>
  </value>
 </param>
</params>
</methodCall>
"#;
    fault(rpc(&app, None, sale).await, 401, &["Authorization: Bearer"]);
    fault(
        rpc(&app, Some("not-a-token-of-ours-at-all"), sale).await,
        401,
        &[],
    );
    fault(
        rpc(&app, Some(WALLBOARD), sale).await,
        403,
        &["wallboard", "Write"],
    );
    // Reading candidates needs a token too; only queue.status is public.
    fault(rpc(&app, None, PY_CANDIDATES).await, 401, &[]);
    // Nothing was counted by the refused calls.
    assert_eq!(
        store
            .daily_counts("1002", &today(&store).await)
            .await
            .expect("counts")
            .sales,
        0
    );

    // ---- nodes: admin only ---------------------------------------------------------------
    let drain = r#"<?xml version="1.0"?>
<methodCall>
  <methodName>node.drain</methodName>
  <params>
    <param><value>core-1</value></param>
  </params>
</methodCall>
"#;
    fault(rpc(&app, Some(CRM), drain).await, 403, &["crm", "Admin"]);
    // Three calls are still up: the node drains, it is not drained yet.
    assert_eq!(ok(rpc(&app, Some(ADMIN), drain).await), json!("draining"));
    let nodes = store.list_nodes().await.expect("nodes");
    assert!(nodes[0].drain_requested, "{nodes:?}");
    let undrain = r#"<?xml version="1.0"?>
<methodCall>
  <methodName>node.undrain</methodName>
  <params>
    <param><value>core-1</value></param>
  </params>
</methodCall>
"#;
    assert_eq!(ok(rpc(&app, Some(ADMIN), undrain).await), json!("active"));
    let unknown_node = r#"<?xml version="1.0"?>
<methodCall>
  <methodName>node.drain</methodName>
  <params>
    <param><value>core-9</value></param>
  </params>
</methodCall>
"#;
    fault(rpc(&app, Some(ADMIN), unknown_node).await, 404, &["core-9"]);

    // ---- system.multicall: one good entry, one failing -------------------------------
    // Python: `m = MultiCall(proxy); m.agent.setPriority("1002", "sales", 0);
    // m.agent.recordSale("9999"); m()`.
    let multicall = "<?xml version='1.0'?>
<methodCall>
<methodName>system.multicall</methodName>
<params>
<param>
<value><array><data>
<value><struct>
<member>
<name>methodName</name>
<value><string>agent.setPriority</string></value>
</member>
<member>
<name>params</name>
<value><array><data>
<value><string>1002</string></value>
<value><string>sales</string></value>
<value><int>-1</int></value>
</data></array></value>
</member>
</struct></value>
<value><struct>
<member>
<name>methodName</name>
<value><string>agent.recordSale</string></value>
</member>
<member>
<name>params</name>
<value><array><data>
<value><string>9999</string></value>
</data></array></value>
</member>
</struct></value>
</data></array></value>
</param>
</params>
</methodCall>
";
    let results = ok(rpc(&app, Some(CRM), multicall).await);
    let results = results.as_array().expect("an array of results");
    assert_eq!(results.len(), 2, "{results:?}");
    assert_eq!(results[0], json!([true]));
    assert_eq!(results[1]["faultCode"], json!(404), "{results:?}");
    assert!(
        results[1]["faultString"]
            .as_str()
            .is_some_and(|s| s.contains("9999")),
        "{results:?}"
    );
    // The good entry took effect, and is in the audit log under the token's name.
    assert_eq!(order(&candidates(&app).await), ["1002", "1001"]);
    let audit = store.list_audit(1, None).await.expect("audit");
    assert_eq!(audit[0].action, "agent.set_priority", "{audit:?}");
    assert_eq!(audit[0].actor, "crm", "{audit:?}");
    assert_eq!(audit[0].subject, "agent:1002", "{audit:?}");

    // ---- a large body is decoded off the async workers, with the same answer -----------
    let padded = format!(
        "<?xml version='1.0'?>
<methodCall>
<methodName>queue.status</methodName>
<params>{}
<param>
<value><string>sales</string></value>
</param>
</params>
</methodCall>
",
        " ".repeat(100_000)
    );
    assert_eq!(ok(rpc(&app, None, &padded).await)["logged_in_agents"], 2);

    // ---- system.listMethods --------------------------------------------------------------
    let listed = rpc(
        &app,
        None,
        "<?xml version='1.0'?>
<methodCall>
<methodName>system.listMethods</methodName>
<params>
</params>
</methodCall>
",
    )
    .await;
    let mut listed: Vec<String> = serde_json::from_value(ok(listed)).expect("strings");
    listed.sort();
    let mut expected = vec![
        "agent.login",
        "agent.logout",
        "agent.pause",
        "agent.recordSale",
        "agent.setDailyCap",
        "agent.setPriority",
        "agent.setTags",
        "agent.unpause",
        "autoscaler.set",
        "autoscaler.status",
        "caller.attributes",
        "caller.list",
        "caller.remove",
        "caller.setAttributes",
        "node.drain",
        "node.undrain",
        "queue.candidates",
        "queue.status",
        "system.listMethods",
        "system.multicall",
    ];
    expected.sort_unstable();
    assert_eq!(listed, expected);
}

/// Today in the control plane's time zone (UTC in these tests), on the database clock.
async fn today(store: &Store) -> String {
    let now = store.now_ms().await.expect("database clock");
    jiff::Timestamp::from_millisecond(now)
        .expect("a timestamp")
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date()
        .to_string()
}

#[tokio::test]
async fn xmlrpc_scenario_on_sqlite() {
    xmlrpc_scenario(Backend::Sqlite).await;
}

#[tokio::test]
async fn xmlrpc_scenario_on_mariadb() {
    xmlrpc_scenario(Backend::MariaDb).await;
}

/// The body cap answers a fault like every other bad call, not an HTTP error page that an
/// XML-RPC client cannot read.
#[tokio::test]
async fn xmlrpc_oversized_body_is_a_fault() {
    let (store, _dir) = open(Backend::Sqlite).await;
    let control = Arc::new(Control::start(store, &config()).await.expect("start"));
    let app = router(control);
    let body = format!(
        "<?xml version='1.0'?>
<methodCall>
<methodName>queue.status</methodName>
<params>{}
<param>
<value><string>sales</string></value>
</param>
</params>
</methodCall>
",
        " ".repeat(2 * 1024 * 1024)
    );
    fault(rpc(&app, None, &body).await, -32600, &["bytes"]);
}

/// One request cannot make an unbounded answer: a multicall of more than 1000 calls is a
/// fault, and once the answers of a multicall fill about 8 MiB the remaining calls are not
/// run and say so (here 1000 candidate lists of 80 agents, about 10 MB unbounded).
#[tokio::test]
async fn a_multicall_is_bounded_in_calls_and_answer_bytes() {
    let (store, _dir) = open(Backend::Sqlite).await;
    seed(&store).await;
    for n in 0..80 {
        let (agent, device) = (format!("3{n:03}"), format!("4{n:03}"));
        store
            .upsert_device(
                &Device {
                    id: device.clone(),
                    endpoint: format!("PJSIP/{device}"),
                    name: None,
                    contact: None,
                    registers: false,
                },
                "setup",
            )
            .await
            .expect("device");
        store
            .upsert_agent(
                &Agent {
                    id: agent.clone(),
                    name: format!("Agent number {n} with a long enough name"),
                    tags: Default::default(),
                    daily_cap: None,
                    enabled: true,
                },
                "setup",
            )
            .await
            .expect("agent");
        store.login(&agent, &device, "setup").await.expect("login");
        store
            .set_priority("sales", &agent, n, "setup")
            .await
            .expect("member");
    }
    let control = Arc::new(Control::start(store, &config()).await.expect("start"));
    let app = router(control.clone());
    let multicall = |calls: usize| {
        let entry = "<value><struct><member><name>methodName</name><value><string>queue.candidates</string></value></member>\
<member><name>params</name><value><array><data><value><string>sales</string></value></data></array></value></member></struct></value>";
        format!(
            "<?xml version='1.0'?><methodCall><methodName>system.multicall</methodName><params><param><value><array><data>{}</data></array></value></param></params></methodCall>",
            entry.repeat(calls)
        )
    };
    fault(
        rpc(&app, Some(WALLBOARD), &multicall(1001)).await,
        -32602,
        &["at most 1000 calls, got 1001"],
    );

    let Ok(xmlrpc::Value::Array(answers)) = rpc(&app, Some(WALLBOARD), &multicall(1000)).await
    else {
        panic!("a multicall answers an array");
    };
    assert_eq!(answers.len(), 1000);
    // Every candidate list is the same, so the bound falls after a computable number.
    let one = xmlrpc::encoded_size(&answers[0]);
    let one_list = match &answers[0] {
        xmlrpc::Value::Array(wrapped) => xmlrpc::encoded_size(&wrapped[0]),
        other => panic!("a success is a one-element array: {other:?}"),
    };
    assert!(one > one_list, "the wrapper counts too");
    let ran = (8 * 1024 * 1024) / one_list + 1;
    let not_run = answers
        .iter()
        .filter(|answer| {
            matches!(answer, xmlrpc::Value::Struct(fault)
                if matches!(fault.get("faultString"), Some(xmlrpc::Value::String(text)) if text.starts_with("not run:")))
        })
        .count();
    assert_eq!((1000 - not_run, not_run), (ran, 1000 - ran));
    assert!(ran < 1000, "the bound is reached in this scenario");
}

// ---- gRPC ----------------------------------------------------------------------------------

/// The control plane's router served on a loopback port.
struct Server {
    address: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(control: Arc<Control>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, router(control))
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .expect("serve");
        });
        Self {
            address,
            shutdown,
            task,
        }
    }

    async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.address))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    /// Stops the server; the clients must have been dropped.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the server stops")
            .expect("the server task ends cleanly");
    }
}

/// `message` with `authorization: Bearer <token>` when a token is given.
fn with_token<T>(token: Option<&str>, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii metadata"),
        );
    }
    request
}

fn crm<T>(message: T) -> tonic::Request<T> {
    with_token(Some(CRM), message)
}

fn status_of<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
) -> tonic::Status {
    match result {
        Ok(response) => panic!("expected an error, got {:?}", response.into_inner()),
        Err(status) => status,
    }
}

fn grpc_agents(candidates: &pb::CandidatesResponse) -> Vec<&str> {
    candidates
        .candidates
        .iter()
        .map(|c| c.agent.as_str())
        .collect()
}

fn queue_ref(queue: &str) -> pb::QueueRef {
    pb::QueueRef {
        queue: queue.into(),
    }
}

fn agent_ref(agent: &str) -> pb::AgentRef {
    pb::AgentRef {
        agent: agent.into(),
    }
}

async fn grpc_scenario(backend: Backend) {
    let (store, _dir) = open(backend).await;
    store
        .heartbeat(&beat("core-1", 0))
        .await
        .expect("heartbeat");
    let control = Arc::new(
        Control::start(store.clone(), &config())
            .await
            .expect("start"),
    );
    let server = Server::start(control).await;
    let mut client = ControlClient::new(server.channel().await);

    // ---- the directory, written over gRPC ----------------------------------------------
    let put = |service_level_ms| pb::Queue {
        id: "sales".into(),
        name: "Sales".into(),
        service_level_ms,
    };
    let queue = client
        .put_queue(crm(put(None)))
        .await
        .expect("put queue")
        .into_inner();
    assert_eq!(queue, put(Some(20_000)), "the default threshold");
    let queue = client
        .put_queue(crm(put(Some(15_000))))
        .await
        .expect("put queue")
        .into_inner();
    assert_eq!(queue, put(Some(15_000)));
    let refused = client
        .put_queue(crm(put(Some(0))))
        .await
        .expect_err("no threshold");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused
            .message()
            .starts_with("invalid service_level_ms: 0 is not between 1 and 3600000"),
        "{}",
        refused.message()
    );
    for n in 1..=2 {
        let device = pb::Device {
            id: format!("200{n}"),
            endpoint: format!("PJSIP/200{n}"),
            name: format!("desk {n}"),
            ..pb::Device::default()
        };
        let put = client
            .put_device(crm(device.clone()))
            .await
            .expect("put device")
            .into_inner();
        assert_eq!(put, device);
    }
    // Credentials go in write-only and come back as `registers`; absent fields keep them.
    let phone = pb::Device {
        id: "2009".into(),
        endpoint: "PJSIP/2009".into(),
        password: Some("s3cret".into()),
        ..pb::Device::default()
    };
    let put = client
        .put_device(crm(phone))
        .await
        .expect("put")
        .into_inner();
    assert!(
        put.registers && put.password.is_none() && put.md5_cred.is_none(),
        "{put:?}"
    );
    let renamed = pb::Device {
        id: "2009".into(),
        endpoint: "PJSIP/2009".into(),
        name: "hot desk".into(),
        ..pb::Device::default()
    };
    let put = client
        .put_device(crm(renamed.clone()))
        .await
        .expect("put")
        .into_inner();
    assert!(put.registers, "kept: {put:?}");
    let removed = pb::Device {
        remove_credentials: true,
        ..renamed
    };
    let put = client
        .put_device(crm(removed))
        .await
        .expect("put")
        .into_inner();
    assert!(!put.registers, "removed: {put:?}");
    client
        .delete_device(crm(pb::DeviceRef {
            device: "2009".into(),
        }))
        .await
        .expect("delete");
    // Left out, `enabled` is true as over REST: a new agent takes calls.
    let defaulted = client
        .put_agent(crm(pb::Agent {
            id: "1009".into(),
            name: "Dana".into(),
            ..Default::default()
        }))
        .await
        .expect("put agent")
        .into_inner();
    assert_eq!(defaulted.enabled, Some(true));
    client
        .delete_agent(crm(pb::AgentRef {
            agent: "1009".into(),
        }))
        .await
        .expect("delete");
    let alice = client
        .put_agent(crm(pb::Agent {
            id: "1001".into(),
            name: "Alice".into(),
            daily_cap: Some(1),
            enabled: Some(true),
            ..Default::default()
        }))
        .await
        .expect("put agent")
        .into_inner();
    // Available since it was made, by the store's clock.
    assert!(alice.state_since_ms > 1_700_000_000_000, "{alice:?}");
    assert_eq!(
        alice,
        pb::Agent {
            id: "1001".into(),
            name: "Alice".into(),
            daily_cap: Some(1),
            enabled: Some(true),
            state: "available".into(),
            state_since_ms: alice.state_since_ms,
            ..Default::default()
        }
    );
    client
        .put_agent(crm(pb::Agent {
            id: "1002".into(),
            name: "Bob".into(),
            enabled: Some(true),
            ..Default::default()
        }))
        .await
        .expect("put agent");

    // The public status needs no token.
    let status = client
        .queue_status(with_token(None, queue_ref("sales")))
        .await
        .expect("public status")
        .into_inner();
    assert_eq!(
        status,
        pb::QueueStatusResponse {
            queue: "sales".into(),
            served: false,
            available_agents: 0,
            logged_in_agents: 0,
            waiting: None,
            longest_wait_ms: None,
            waiting_unknown: true,
            answered_today: 0,
            abandoned_today: 0,
            overflowed_today: 0,
            answered_within_sl_today: 0,
            service_level_pct_today: None,
        }
    );

    // ---- login, priorities, candidates -------------------------------------------------
    for (agent, device) in [("1001", "2001"), ("1002", "2002")] {
        let session = client
            .login(crm(pb::LoginRequest {
                agent: agent.into(),
                device: device.into(),
            }))
            .await
            .expect("login")
            .into_inner();
        assert_eq!(
            session,
            pb::Session {
                agent: agent.into(),
                device: device.into(),
                endpoint: format!("PJSIP/{device}"),
            }
        );
    }
    for (agent, priority) in [("1001", 1), ("1002", 2)] {
        let member = client
            .set_priority(crm(pb::SetPriorityRequest {
                agent: agent.into(),
                queue: "sales".into(),
                priority,
            }))
            .await
            .expect("set priority")
            .into_inner();
        assert_eq!(
            member,
            pb::Member {
                queue: "sales".into(),
                agent: agent.into(),
                priority,
            }
        );
    }
    let ask = |attributes: &[&str]| {
        with_token(
            Some(WALLBOARD),
            pb::CandidatesRequest {
                queue: "sales".into(),
                attributes: attributes.iter().map(|a| (*a).to_owned()).collect(),
            },
        )
    };
    let ranked = client
        .candidates(ask(&[]))
        .await
        .expect("candidates")
        .into_inner();
    assert_eq!(
        ranked.candidates,
        [
            pb::Candidate {
                agent: "1001".into(),
                endpoint: "PJSIP/2001".into(),
                priority: 1,
                demoted: false,
            },
            pb::Candidate {
                agent: "1002".into(),
                endpoint: "PJSIP/2002".into(),
                priority: 2,
                demoted: false,
            },
        ]
    );

    // One sale reaches Alice's cap of 1: she rings last. Sent twice with its request id
    // (the CRM lost the first answer), it counts once.
    for _ in 0..2 {
        let sale = client
            .record_sale(crm(pb::RecordSaleRequest {
                agent: "1001".into(),
                request_id: "sale-7f3a".into(),
            }))
            .await
            .expect("record sale")
            .into_inner();
        assert_eq!(sale.sales_today, 1);
    }
    let ranked = client
        .candidates(ask(&[]))
        .await
        .expect("candidates")
        .into_inner();
    assert_eq!(grpc_agents(&ranked), ["1002", "1001"]);
    assert!(ranked.candidates[1].demoted, "{ranked:?}");
    let status = client
        .queue_status(with_token(None, queue_ref("sales")))
        .await
        .expect("public status")
        .into_inner();
    assert!(status.served, "{status:?}");
    assert_eq!((status.available_agents, status.logged_in_agents), (2, 2));

    // Tags and attributes; pause.
    let bob = client
        .set_tags(crm(pb::SetTagsRequest {
            agent: "1002".into(),
            tags: vec!["vip".into()],
        }))
        .await
        .expect("set tags")
        .into_inner();
    assert_eq!(bob.tags, ["vip"]);
    let vip = client
        .candidates(ask(&["vip"]))
        .await
        .expect("candidates")
        .into_inner();
    assert_eq!(grpc_agents(&vip), ["1002"]);
    client
        .pause(crm(pb::PauseRequest {
            agent: "1002".into(),
            reason: "lunch".into(),
        }))
        .await
        .expect("pause");
    let bob = client
        .get_agent(with_token(Some(WALLBOARD), agent_ref("1002")))
        .await
        .expect("get agent")
        .into_inner();
    assert_eq!(
        (bob.state.as_str(), bob.pause_reason.as_str()),
        ("paused", "lunch")
    );
    let ranked = client
        .candidates(ask(&["vip"]))
        .await
        .expect("candidates")
        .into_inner();
    assert_eq!(grpc_agents(&ranked), ["1001"], "VIP falls back to Alice");
    client
        .unpause(crm(agent_ref("1002")))
        .await
        .expect("unpause");

    // ---- errors and their codes --------------------------------------------------------
    let missing = status_of(
        client
            .get_agent(with_token(Some(WALLBOARD), agent_ref("9999")))
            .await,
    );
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert!(missing.message().contains("9999"), "{missing:?}");
    let missing = status_of(
        client
            .record_sale(crm(pb::RecordSaleRequest {
                agent: "9999".into(),
                request_id: String::new(),
            }))
            .await,
    );
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert!(missing.message().contains("9999"), "{missing:?}");

    let taken = status_of(
        client
            .login(crm(pb::LoginRequest {
                agent: "1002".into(),
                device: "2001".into(),
            }))
            .await,
    );
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
    assert!(
        taken.message().contains("1001"),
        "names the holder: {taken:?}"
    );

    let anonymous = status_of(
        client
            .put_agent(with_token(
                None,
                pb::Agent {
                    id: "1003".into(),
                    name: "Carol".into(),
                    enabled: Some(true),
                    ..Default::default()
                },
            ))
            .await,
    );
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");
    let anonymous = status_of(
        client
            .candidates(with_token(
                None,
                pb::CandidatesRequest {
                    queue: "sales".into(),
                    attributes: Vec::new(),
                },
            ))
            .await,
    );
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");
    let wrong = status_of(
        client
            .put_agent(with_token(
                Some("not-a-token-of-ours-at-all"),
                pb::Agent::default(),
            ))
            .await,
    );
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");

    let reader = status_of(
        client
            .set_priority(with_token(
                Some(WALLBOARD),
                pb::SetPriorityRequest {
                    agent: "1002".into(),
                    queue: "sales".into(),
                    priority: 0,
                },
            ))
            .await,
    );
    assert_eq!(reader.code(), Code::PermissionDenied, "{reader:?}");
    assert!(reader.message().contains("wallboard"), "{reader:?}");

    let bad_id = status_of(
        client
            .put_agent(crm(pb::Agent {
                id: "10 04".into(),
                name: "Dave".into(),
                enabled: Some(true),
                ..Default::default()
            }))
            .await,
    );
    assert_eq!(bad_id.code(), Code::InvalidArgument, "{bad_id:?}");
    assert!(bad_id.message().contains("agent id"), "{bad_id:?}");
    let bad_endpoint = status_of(
        client
            .put_device(crm(pb::Device {
                id: "2003".into(),
                endpoint: "PJSIP 2003".into(),
                ..pb::Device::default()
            }))
            .await,
    );
    assert_eq!(
        bad_endpoint.code(),
        Code::InvalidArgument,
        "{bad_endpoint:?}"
    );
    assert!(
        bad_endpoint.message().contains("endpoint"),
        "{bad_endpoint:?}"
    );

    // ---- nodes -----------------------------------------------------------------------------
    let node = || pb::NodeRef {
        node: "core-1".into(),
    };
    let not_admin = status_of(client.drain(crm(node())).await);
    assert_eq!(not_admin.code(), Code::PermissionDenied, "{not_admin:?}");
    client
        .drain(with_token(Some(ADMIN), node()))
        .await
        .expect("drain");
    let nodes = client
        .list_nodes(with_token(Some(WALLBOARD), pb::Empty {}))
        .await
        .expect("nodes")
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    // No calls up: drained at once.
    assert_eq!(
        (nodes[0].state.as_str(), nodes[0].drain_requested),
        ("drained", true)
    );
    client
        .undrain(with_token(Some(ADMIN), node()))
        .await
        .expect("undrain");
    let unknown = status_of(
        client
            .drain(with_token(
                Some(ADMIN),
                pb::NodeRef {
                    node: "core-9".into(),
                },
            ))
            .await,
    );
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    assert!(unknown.message().contains("core-9"), "{unknown:?}");

    // Logout frees the phone.
    client.logout(crm(agent_ref("1001"))).await.expect("logout");
    let status = client
        .queue_status(with_token(None, queue_ref("sales")))
        .await
        .expect("public status")
        .into_inner();
    assert_eq!((status.available_agents, status.logged_in_agents), (1, 1));
    let audit = store.list_audit(1, None).await.expect("audit");
    assert_eq!(
        (audit[0].actor.as_str(), audit[0].subject.as_str()),
        ("crm", "agent:1001"),
        "{audit:?}"
    );

    drop(client);
    server.stop().await;
}

#[tokio::test]
async fn grpc_scenario_on_sqlite() {
    grpc_scenario(Backend::Sqlite).await;
}

#[tokio::test]
async fn grpc_scenario_on_mariadb() {
    grpc_scenario(Backend::MariaDb).await;
}

#[tokio::test]
async fn grpc_health_and_reflection() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    let (store, _dir) = open(Backend::Sqlite).await;
    let control = Arc::new(Control::start(store, &config()).await.expect("start"));
    let server = Server::start(control).await;
    let channel = server.channel().await;

    // Health: the whole server and the Control service. The service's status is set by a
    // task the router spawns, so it may take a moment.
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "callfleet.control.v1.Control"] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let answer = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await;
            if let Ok(answer) = &answer
                && answer.get_ref().status == ServingStatus::Serving as i32
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "health of {service:?} never SERVING: {answer:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Reflection: what grpcurl asks first.
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tonic::codegen::tokio_stream::iter([request]))
        .await
        .expect("reflection answers")
        .into_inner();
    let answer: ServerReflectionResponse = answers
        .message()
        .await
        .expect("a message")
        .expect("not the end");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("ListServices gets a service list, got {answer:?}");
    };
    let mut names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    // Exactly what this port serves: not the other components' services.
    assert_eq!(
        names,
        [
            "callfleet.control.v1.Control",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection"
        ]
    );

    drop((health, reflection, answers));
    server.stop().await;
}

/// A multicall refreshes the directory once, yet a read that follows a write in the same
/// batch sees the write, and a plain call after the batch sees all of them.
#[tokio::test]
async fn a_multicall_read_sees_the_writes_before_it() {
    let (store, _dir) = open(Backend::Sqlite).await;
    seed(&store).await;
    for (agent, device) in [("1001", "2001"), ("1002", "2002")] {
        store.login(agent, device, "setup").await.expect("login");
        store
            .set_priority("sales", agent, 5, "setup")
            .await
            .expect("member");
    }
    let control = Arc::new(Control::start(store, &config()).await.expect("start"));
    let app = router(control);
    let entry = |method: &str, params: &str| {
        format!(
            "<value><struct><member><name>methodName</name><value>{method}</value></member>\
<member><name>params</name><value><array><data>{params}</data></array></value></member></struct></value>"
        )
    };
    let body = format!(
        "<?xml version=\"1.0\"?><methodCall><methodName>system.multicall</methodName><params><param>\
<value><array><data>{}{}{}{}</data></array></value></param></params></methodCall>",
        entry(
            "agent.setPriority",
            "<value>1002</value><value>sales</value><value><i4>1</i4></value>"
        ),
        entry("queue.candidates", "<value>sales</value>"),
        entry("agent.pause", "<value>1002</value><value>lunch</value>"),
        entry(
            "agent.setPriority",
            "<value>1001</value><value>sales</value><value><i4>9</i4></value>"
        ),
    );
    let results = ok(rpc(&app, Some(CRM), &body).await);
    let results = results.as_array().expect("results");
    assert_eq!(results.len(), 4, "{results:?}");
    // The read inside the batch sees 1002's new priority.
    assert_eq!(order(&results[1][0]), ["1002", "1001"], "{results:?}");
    // After the batch, the pause and the last priority are visible too.
    assert_eq!(order(&candidates(&app).await), ["1001"]);
}
