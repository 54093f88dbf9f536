//! The role matrix of XML-RPC (`/RPC2`): every method × every kind of caller (no token, a
//! token of no one, `node`, `read`, `write`, `admin`), with the exact outcome: the call
//! runs, or fault 401, or fault 403. A call that runs writes exactly its audit rows under
//! the token's name; a refused one writes nothing. The same matrix runs again inside one
//! `system.multicall` per caller, where each entry is authorized on its own.
//!
//! The methods come from the server: `system.listMethods` and the method names that
//! `rpc2.rs` dispatches must both be exactly the rows of [`rows`], so a method added
//! without a row fails here. Bodies are posted through the whole router (`oneshot`), as
//! the other XML-RPC tests do, on SQLite.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use callfleet_control_plane::xmlrpc::{Fault, Value};
use callfleet_control_plane::{Control, router};
use callfleet_core::config::{ApiToken, ControlPlaneConfig, Role, Secret};
use callfleet_core::store::{Agent, Device, Queue};
use callfleet_core::{Heartbeat, NodeId, NodeRole, PoolName, Store, testing};
use tower::ServiceExt;

mod roles;

use roles::*;

/// What a call must end in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// A value, not a fault.
    Runs,
    /// Fault 401.
    Unauthenticated,
    /// Fault 403.
    Forbidden,
}

use Outcome::{Forbidden as F, Runs as R, Unauthenticated as U};

/// The matrix: for each access, the outcome for each of [`CALLERS`] in order
/// (no token, unknown token, node, read, write, admin).
const MATRIX: [(Access, [Outcome; 6]); 5] = [
    (Access::Public, [R, R, R, R, R, R]),
    (Access::Read, [U, U, F, R, R, R]),
    (Access::ReadOrNode, [U, U, R, R, R, R]),
    (Access::Write, [U, U, F, F, R, R]),
    (Access::Admin, [U, U, F, F, F, R]),
];

fn expected(access: Access, caller: Caller) -> Outcome {
    let column = CALLERS.iter().position(|c| *c == caller).expect("a caller");
    MATRIX
        .iter()
        .find(|(a, _)| *a == access)
        .expect("a matrix row")
        .1[column]
}

/// A parameter of a call.
enum Param {
    Str(&'static str),
    Int(i32),
    Strings(&'static [&'static str]),
    /// A `<value>` written out, for a struct.
    Raw(&'static str),
}

impl Param {
    fn xml(&self) -> String {
        match self {
            Self::Str(s) => format!("<value><string>{s}</string></value>"),
            Self::Int(i) => format!("<value><int>{i}</int></value>"),
            Self::Strings(items) => format!(
                "<value><array><data>{}</data></array></value>",
                items
                    .iter()
                    .map(|s| format!("<value><string>{s}</string></value>"))
                    .collect::<String>()
            ),
            Self::Raw(xml) => (*xml).to_owned(),
        }
    }
}

/// One method: what it needs, parameters that make it succeed on the seeded directory
/// (again and again), and the action of the one audit row a run writes (none: a read).
struct Row {
    method: &'static str,
    access: Access,
    params: Vec<Param>,
    audit: Option<&'static str>,
}

fn rows() -> Vec<Row> {
    use Param::{Int, Str, Strings};
    let row = |method, access, params, audit| Row {
        method,
        access,
        params,
        audit,
    };
    vec![
        row(
            "agent.setPriority",
            Access::Write,
            vec![Str("1001"), Str("sales"), Int(1)],
            Some("agent.set_priority"),
        ),
        row(
            "agent.setTags",
            Access::Write,
            vec![Str("1001"), Strings(&["vip"])],
            Some("agent.set_tags"),
        ),
        row(
            "agent.setDailyCap",
            Access::Write,
            vec![Str("1001"), Int(10)],
            Some("agent.set_daily_cap"),
        ),
        row(
            "agent.recordSale",
            Access::Write,
            vec![Str("1002")],
            Some("agent.record_sale"),
        ),
        row(
            "agent.login",
            Access::Write,
            vec![Str("1001"), Str("2001")],
            Some("agent.login"),
        ),
        row(
            "agent.logout",
            Access::Write,
            vec![Str("1002")],
            Some("agent.logout"),
        ),
        row(
            "agent.pause",
            Access::Write,
            vec![Str("1002"), Str("lunch")],
            Some("agent.pause"),
        ),
        row(
            "agent.unpause",
            Access::Write,
            vec![Str("1002")],
            Some("agent.unpause"),
        ),
        row("queue.status", Access::Public, vec![Str("sales")], None),
        row(
            "queue.candidates",
            Access::ReadOrNode,
            vec![Str("sales")],
            None,
        ),
        row(
            "caller.setAttributes",
            Access::Write,
            vec![Str("+4930123456"), Strings(&["vip"])],
            Some("caller.set_attributes"),
        ),
        row(
            "caller.remove",
            Access::Write,
            vec![Str("+4930999")],
            Some("caller.remove"),
        ),
        row(
            "caller.attributes",
            Access::ReadOrNode,
            vec![Str("+4930123456")],
            None,
        ),
        // Its parameters (after, limit) are optional: called without, it lists the first
        // 100.
        row("caller.list", Access::Read, vec![], None),
        row(
            "node.drain",
            Access::Admin,
            vec![Str("core-1")],
            Some("node.drain"),
        ),
        row(
            "node.undrain",
            Access::Admin,
            vec![Str("core-1")],
            Some("node.undrain"),
        ),
        row("autoscaler.status", Access::Read, vec![], None),
        row(
            "autoscaler.set",
            Access::Admin,
            vec![Param::Raw(
                "<value><struct><member><name>min_extra</name><value><int>1</int></value></member></struct></value>",
            )],
            Some("autoscaler.set"),
        ),
        row("system.listMethods", Access::Public, vec![], None),
        // The batch itself needs nothing; each entry is authorized on its own (below).
        row(
            "system.multicall",
            Access::Public,
            vec![Param::Strings(&[])],
            None,
        ),
    ]
}

fn body(method: &str, params: &[Param]) -> String {
    let params: String = params
        .iter()
        .map(|p| format!("<param>{}</param>", p.xml()))
        .collect();
    format!(
        "<?xml version='1.0'?><methodCall><methodName>{method}</methodName>\
         <params>{params}</params></methodCall>"
    )
}

/// A `system.multicall` of every row but itself, in the order of [`rows`].
fn multicall_body(rows: &[Row]) -> String {
    let entries: String = rows
        .iter()
        .filter(|row| row.method != "system.multicall")
        .map(|row| {
            let params: String = row.params.iter().map(Param::xml).collect();
            format!(
                "<value><struct><member><name>methodName</name><value><string>{}</string></value></member>\
                 <member><name>params</name><value><array><data>{params}</data></array></value></member></struct></value>",
                row.method
            )
        })
        .collect();
    format!(
        "<?xml version='1.0'?><methodCall><methodName>system.multicall</methodName><params>\
         <param><value><array><data>{entries}</data></array></value></param></params></methodCall>"
    )
}

async fn post(app: &Router, token: Option<&str>, body: String) -> Result<Value, Fault> {
    let mut request = Request::post("/RPC2").header(header::CONTENT_TYPE, "text/xml");
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body)).expect("request"))
        .await
        .expect("the router answers");
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "XML-RPC always answers 200"
    );
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    let text = String::from_utf8(bytes.to_vec()).expect("a UTF-8 response");
    for secret in [ADMIN, CRM, WALLBOARD, NODE, UNKNOWN] {
        assert!(!text.contains(secret), "the answer shows a token: {text}");
    }
    if text.contains("<fault>") {
        Err(dxr::FaultResponse::from_xml(&text)
            .unwrap_or_else(|err| panic!("not a fault response ({err}): {text}"))
            .fault)
    } else {
        Ok(dxr::MethodResponse::from_xml(&text)
            .unwrap_or_else(|err| panic!("not a method response ({err}): {text}"))
            .value)
    }
}

/// Checks one answer (a value or a fault's code and string) against the matrix.
#[track_caller]
fn check(asked: &str, caller: Caller, expect: Outcome, answer: Result<&Value, (i32, &str)>) {
    match (expect, answer) {
        (Outcome::Runs, Ok(_)) => {}
        (Outcome::Unauthenticated, Err((401, message))) => {
            // No token and an unknown token are told apart.
            let says = match caller {
                Caller::Anonymous => "needs a token",
                _ => "not known",
            };
            assert!(message.contains(says), "{asked}: 401 `{message}`");
        }
        (Outcome::Forbidden, Err((403, message))) => {
            let name = caller.name().expect("a named token");
            assert!(
                message.contains(&format!("`{name}`")),
                "{asked}: 403 `{message}` does not name `{name}`"
            );
        }
        (expect, answer) => panic!("{asked}: expected {expect:?}, got {answer:?}"),
    }
}

async fn start() -> (Store, Router, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let store = Store::connect(&testing::sqlite_config(dir.path()))
        .await
        .expect("open the SQLite store");
    let queue = Queue {
        id: "sales".into(),
        name: "Sales".into(),
        service_level_ms: 20_000,
    };
    store.upsert_queue(&queue, "setup").await.expect("queue");
    for n in 1..=2 {
        let device = Device {
            id: format!("200{n}"),
            endpoint: format!("PJSIP/200{n}"),
            name: None,
            contact: None,
            registers: false,
        };
        store.upsert_device(&device, "setup").await.expect("device");
        let agent = Agent {
            id: format!("100{n}"),
            name: format!("Agent {n}"),
            tags: Default::default(),
            daily_cap: None,
            enabled: true,
        };
        store.upsert_agent(&agent, "setup").await.expect("agent");
    }
    store
        .set_priority("sales", "1001", 1, "setup")
        .await
        .expect("member");
    store
        .heartbeat(&Heartbeat {
            id: NodeId::new("core-1").expect("node id"),
            pool: PoolName::new("default").expect("pool"),
            role: NodeRole::Core,
            sip_uri: "sip:10.0.0.1:5060".into(),
            calls: 0,
            pbx_up: true,
            max_calls: 100,
            load1: 0.1,
            cpu_pct: 1.0,
            mem_pct: 1.0,
            cores: 2,
            shed: Vec::new(),
            refusing_calls: false,
            interval: Duration::from_secs(2),
            first_of_run: true,
        })
        .await
        .expect("heartbeat");
    let token = |name: &str, token: &str, role| ApiToken {
        name: name.to_owned(),
        token: Secret::new(token),
        role,
    };
    let config = ControlPlaneConfig {
        tokens: vec![
            token("admin", ADMIN, Role::Admin),
            token("crm", CRM, Role::Write),
            token("wallboard", WALLBOARD, Role::Read),
            token("node:core-1", NODE, Role::Node),
        ],
        ..ControlPlaneConfig::default()
    };
    let control = Arc::new(Control::start(store.clone(), &config).await.expect("start"));
    (store, router(control), dir)
}

/// The audit rows written after `after` (an id), oldest first.
async fn audit_after(store: &Store, after: i64) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = store
        .list_audit(1000, None)
        .await
        .expect("audit")
        .into_iter()
        .filter(|row| row.id > after)
        .map(|row| (row.actor, row.action))
        .collect();
    rows.reverse();
    rows
}

/// The audit rows (actor, action) a call of `row` by `caller` writes: one under the
/// token's name when a write runs, none otherwise.
fn audit_of(row: &Row, caller: Caller, outcome: Outcome) -> Vec<(String, String)> {
    match (outcome, row.audit, caller.name()) {
        (Outcome::Runs, Some(action), Some(name)) => vec![(name.to_owned(), action.to_owned())],
        (Outcome::Runs, Some(action), None) => panic!("{action} ran without a token"),
        _ => Vec::new(),
    }
}

async fn last_audit_id(store: &Store) -> i64 {
    store
        .list_audit(1, None)
        .await
        .expect("audit")
        .first()
        .map_or(0, |row| row.id)
}

/// The method names that `dispatch` in rpc2.rs matches on, read from its source: the
/// string literals that start a match arm (`"x.y" =>` or `"x.y" |`).
fn dispatched_in_source() -> BTreeSet<String> {
    let source = include_str!("../src/rpc2.rs");
    let body = &source[source.find("async fn dispatch(").expect("fn dispatch")..];
    let mut names = BTreeSet::new();
    let mut rest = body;
    while let Some(open) = rest.find('"') {
        let after = &rest[open + 1..];
        let close = after.find('"').expect("a closing quote");
        let literal = &after[..close];
        let tail = after[close + 1..].trim_start();
        if tail.starts_with("=>") || tail.starts_with('|') {
            names.insert(literal.to_owned());
        }
        rest = &after[close + 1..];
    }
    assert!(
        body.contains("xmlrpc::LIST_METHODS =>"),
        "dispatch no longer answers system.listMethods through its constant: teach this test"
    );
    names.insert("system.listMethods".to_owned());
    // `handle` runs system.multicall before dispatch.
    names.insert("system.multicall".to_owned());
    names
}

#[tokio::test]
async fn every_xmlrpc_method_answers_every_role_as_the_matrix_says() {
    let (store, app, _dir) = start().await;
    let rows = rows();
    let in_matrix: BTreeSet<String> = rows.iter().map(|row| row.method.to_owned()).collect();
    assert_eq!(in_matrix.len(), rows.len(), "a method has two rows");

    // The server's own list, and the source's dispatch, are exactly the rows.
    let listed = post(&app, None, body("system.listMethods", &[]))
        .await
        .expect("system.listMethods");
    let Value::Array(listed) = listed else {
        panic!("system.listMethods answers an array: {listed:?}")
    };
    let listed: BTreeSet<String> = listed
        .iter()
        .map(|v| match v {
            Value::String(name) => name.clone(),
            other => panic!("a method name: {other:?}"),
        })
        .collect();
    assert_eq!(listed, in_matrix, "system.listMethods against the matrix");
    assert_eq!(
        dispatched_in_source(),
        in_matrix,
        "rpc2.rs dispatch against the matrix"
    );

    for row in &rows {
        let call = body(row.method, &row.params);
        for caller in CALLERS {
            let expect = expected(row.access, caller);
            let asked = format!("{} as {caller:?}", row.method);
            let before = last_audit_id(&store).await;
            let answer = post(&app, caller.token(), call.clone()).await;
            check(
                &asked,
                caller,
                expect,
                answer
                    .as_ref()
                    .map_err(|fault| (fault.code(), fault.string())),
            );
            assert_eq!(
                audit_after(&store, before).await,
                audit_of(row, caller, expect),
                "{asked}: audit rows"
            );
        }
    }
}

#[tokio::test]
async fn every_xmlrpc_method_inside_a_multicall_answers_every_role_as_the_matrix_says() {
    let (store, app, _dir) = start().await;
    let rows = rows();
    let entries: Vec<&Row> = rows
        .iter()
        .filter(|row| row.method != "system.multicall")
        .collect();
    let batch = multicall_body(&rows);
    for caller in CALLERS {
        let before = last_audit_id(&store).await;
        let answer = post(&app, caller.token(), batch.clone())
            .await
            .unwrap_or_else(|fault| {
                panic!(
                    "the batch as {caller:?} is a fault {}: {}",
                    fault.code(),
                    fault.string()
                )
            });
        let Value::Array(results) = answer else {
            panic!("a multicall answers an array: {answer:?}")
        };
        assert_eq!(results.len(), entries.len(), "as {caller:?}: {results:?}");
        let mut expected_rows = Vec::new();
        for (row, result) in entries.iter().zip(&results) {
            let expect = expected(row.access, caller);
            let asked = format!("{} in a multicall as {caller:?}", row.method);
            // An entry that ran is `[value]`; one that failed is `{faultCode, faultString}`.
            let answer = match result {
                Value::Array(one) if one.len() == 1 => Ok(&one[0]),
                Value::Struct(fault) => {
                    let code = match fault.get("faultCode") {
                        Some(Value::Integer(code)) => *code,
                        other => panic!("{asked}: faultCode {other:?}"),
                    };
                    let string = match fault.get("faultString") {
                        Some(Value::String(string)) => string.as_str(),
                        other => panic!("{asked}: faultString {other:?}"),
                    };
                    Err((code, string))
                }
                other => panic!("{asked}: neither [value] nor a fault: {other:?}"),
            };
            check(&asked, caller, expect, answer);
            expected_rows.extend(audit_of(row, caller, expect));
        }
        assert_eq!(
            audit_after(&store, before).await,
            expected_rows,
            "as {caller:?}: audit rows"
        );
    }
}

/// The token is checked before the parameters: called with none at all, a caller the
/// matrix refuses gets its 401 or 403, never the parameter fault that would tell it the
/// method's parameters; a caller it allows gets that fault (-32602).
#[tokio::test]
async fn a_refused_caller_learns_nothing_of_the_parameters() {
    let (_store, app, _dir) = start().await;
    for row in rows() {
        if row.params.is_empty() || row.access == Access::Public {
            continue;
        }
        for caller in CALLERS {
            let asked = format!("{}() as {caller:?}", row.method);
            let answer = post(&app, caller.token(), body(row.method, &[])).await;
            match expected(row.access, caller) {
                Outcome::Runs => match answer {
                    Err(fault) => assert_eq!(fault.code(), -32602, "{asked}: {}", fault.string()),
                    Ok(value) => panic!("{asked}: ran without its parameters: {value:?}"),
                },
                refused => check(
                    &asked,
                    caller,
                    refused,
                    answer
                        .as_ref()
                        .map_err(|fault| (fault.code(), fault.string())),
                ),
            }
        }
    }
}
