//! Caller attributes kept in the control plane (issue 16: VIP callers by caller-number
//! lists) on its three faces, as their users send them to the whole service
//! (`callfleet_control_plane::run` on SQLite) on a loopback port: REST and XML-RPC as raw
//! HTTP/1.1, gRPC through a tonic client.
//!
//! - a CRM's `write` token sets, replaces and removes a number's attributes; the number is
//!   normalised, the attributes sorted without copies, and each write has its audit row;
//! - a wallboard's `read` token and a node-agent's `node` token look a number up, and a
//!   number no list names answers no attributes (not 404); only `read` lists them all;
//! - `read` and `node` tokens cannot change a list (403, nothing changed), and a node token
//!   cannot copy the lists (403);
//! - an invalid number or attribute is a 400 (fault 400, `INVALID_ARGUMENT`) that says what
//!   a number or an attribute must be.

mod support;

use callfleet_control_plane::xmlrpc::Value as XmlValue;
use callfleet_core::config::ControlPlaneConfig;
use callfleet_proto::control::v1 as pb;
use callfleet_proto::control::v1::control_client::ControlClient;
use serde_json::{Value, json};
use support::{Reply, Server, crm_wallboard_node_config, expect, json_request, send_api};
use tonic::Code;
use tonic::transport::Channel;

/// Write token of a CRM, named `crm`.
const CRM: &str = "crm-callers-secret-0123456789";
/// Read token of a wallboard, named `wallboard`.
const WALLBOARD: &str = "wallboard-callers-secret-0123";
/// Node token of a node-agent, named `node:pbx-1`.
const NODE: &str = "node-pbx-1-callers-secret-0123";

/// What a number must be, as every face says it after the number quoted.
const NUMBER_RULE: &str = "must be 1–20 digits with an optional leading '+' (spaces, '-', '.', '(' and ')' are dropped), such as +4930123456";

fn config() -> ControlPlaneConfig {
    crm_wallboard_node_config(CRM, WALLBOARD, NODE)
}

/// Sends `method path` under `/api/v1` with `token` and a JSON body on a new connection.
async fn send(
    server: &Server,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> Reply {
    send_api(server, method, path, token, &[], body).await
}

/// The `error` of a REST error answer with `status`.
#[track_caller]
fn error(reply: Reply, status: u16) -> String {
    let json = expect(reply, status);
    json["error"].as_str().expect("an error message").to_owned()
}

/// The audit rows (actor, action, subject, detail) of caller writes, oldest first.
async fn caller_audit(server: &Server) -> Vec<(String, String, String, Value)> {
    let rows = expect(
        send(server, "GET", "/audit?limit=1000", WALLBOARD, None).await,
        200,
    );
    let mut rows: Vec<(String, String, String, Value)> = rows
        .as_array()
        .expect("audit rows")
        .iter()
        .filter(|row| {
            row["action"]
                .as_str()
                .is_some_and(|a| a.starts_with("caller."))
        })
        .map(|row| {
            (
                row["actor"].as_str().expect("actor").to_owned(),
                row["action"].as_str().expect("action").to_owned(),
                row["subject"].as_str().expect("subject").to_owned(),
                row["detail"].clone(),
            )
        })
        .collect();
    rows.reverse();
    rows
}

#[tokio::test]
async fn rest_sets_reads_lists_and_removes_caller_attributes_by_role() {
    let server = Server::start(config(), CRM, "127.0.0.1").await;

    // Set: normalised number, sorted attributes without copies.
    let set = send(
        &server,
        "PUT",
        "/callers/+49(30)1234-567/attributes",
        CRM,
        Some(json!({ "attributes": ["vip", "fr", "vip"] })),
    )
    .await;
    assert_eq!(
        expect(set, 200),
        json!({ "number": "+49301234567", "attributes": ["fr", "vip"] })
    );
    let set = send(
        &server,
        "PUT",
        "/callers/%2B4930%20999/attributes",
        CRM,
        Some(json!({ "attributes": ["gold"] })),
    )
    .await;
    assert_eq!(
        expect(set, 200),
        json!({ "number": "+4930999", "attributes": ["gold"] })
    );

    // Looked up by a wallboard and by a node, in any spelling; an unlisted number is an
    // ordinary caller.
    for token in [WALLBOARD, NODE, CRM] {
        assert_eq!(
            expect(
                send(&server, "GET", "/callers/+49.30.1234567", token, None).await,
                200
            ),
            json!({ "number": "+49301234567", "attributes": ["fr", "vip"] })
        );
        assert_eq!(
            expect(
                send(&server, "GET", "/callers/+4930555", token, None).await,
                200
            ),
            json!({ "number": "+4930555", "attributes": [] })
        );
    }

    // Listed by a read token, in pages; not by a node token.
    let all = json!([
        { "number": "+49301234567", "attributes": ["fr", "vip"] },
        { "number": "+4930999", "attributes": ["gold"] },
    ]);
    assert_eq!(
        expect(send(&server, "GET", "/callers", WALLBOARD, None).await, 200),
        all
    );
    assert_eq!(
        expect(
            send(&server, "GET", "/callers?limit=1", WALLBOARD, None).await,
            200
        ),
        json!([all[0]])
    );
    assert_eq!(
        expect(
            send(
                &server,
                "GET",
                "/callers?limit=1&after=%2B49301234567",
                WALLBOARD,
                None
            )
            .await,
            200
        ),
        json!([all[1]])
    );
    assert_eq!(
        error(send(&server, "GET", "/callers", NODE, None).await, 403),
        "token `node:pbx-1` has role Node; this operation needs Read or above"
    );
    assert_eq!(
        error(
            send(&server, "GET", "/callers?limit=0", WALLBOARD, None).await,
            400
        ),
        "invalid limit: must be at least 1"
    );
    assert_eq!(
        error(
            send(&server, "GET", "/callers?after=someone", WALLBOARD, None).await,
            400
        ),
        format!("invalid number: `someone` {NUMBER_RULE}")
    );

    // Read and node tokens change nothing.
    for (token, refusal) in [
        (
            WALLBOARD,
            "token `wallboard` has role Read; this operation needs Write or above",
        ),
        (
            NODE,
            "token `node:pbx-1` has role Node; this operation needs Write or above",
        ),
    ] {
        let put = send(
            &server,
            "PUT",
            "/callers/+4930999/attributes",
            token,
            Some(json!({ "attributes": ["vip"] })),
        )
        .await;
        assert_eq!(error(put, 403), refusal);
        assert_eq!(
            error(
                send(&server, "DELETE", "/callers/+4930999", token, None).await,
                403
            ),
            refusal
        );
    }

    // Invalid numbers and attributes: 400 saying what they must be; nothing changed.
    for (path, body, message) in [
        (
            "/callers/anonymous/attributes",
            json!({ "attributes": ["vip"] }),
            format!("invalid number: `anonymous` {NUMBER_RULE}"),
        ),
        (
            "/callers/+123456789012345678901/attributes",
            json!({ "attributes": ["vip"] }),
            format!("invalid number: `+123456789012345678901` {NUMBER_RULE}"),
        ),
        (
            "/callers/+4930999/attributes",
            json!({ "attributes": ["VIP"] }),
            "invalid attributes: attribute `VIP` must be 1–32 of a-z, 0-9, '-' and '_', starting with a letter or digit, as the agents' tags it is matched with (e.g. vip)".to_owned(),
        ),
        (
            "/callers/+4930999/attributes",
            json!({ "attributes": (0..33).map(|n| format!("a{n}")).collect::<Vec<_>>() }),
            "invalid attributes: 33 different attributes, at most 32 are allowed (an agent carries at most 32 tags)".to_owned(),
        ),
        (
            "/callers/+4930999/attributes",
            json!({ "attributes": "vip" }),
            "invalid attributes: invalid type: string \"vip\", expected a sequence at line 1 column 19; send a JSON object as the OpenAPI document at /api/v1/openapi.json describes".to_owned(),
        ),
        (
            "/callers/+4930999/attributes",
            json!({}),
            "invalid body: missing field `attributes` at line 1 column 2; send a JSON object as the OpenAPI document at /api/v1/openapi.json describes".to_owned(),
        ),
    ] {
        assert_eq!(
            error(send(&server, "PUT", path, CRM, Some(body)).await, 400),
            message,
            "PUT {path}"
        );
    }
    assert_eq!(
        error(send(&server, "GET", "/callers/12ab", NODE, None).await, 400),
        format!("invalid number: `12ab` {NUMBER_RULE}")
    );
    assert_eq!(
        error(
            send(&server, "DELETE", "/callers/+49-x", CRM, None).await,
            400
        ),
        format!("invalid number: `+49-x` {NUMBER_RULE}")
    );
    assert_eq!(
        expect(send(&server, "GET", "/callers", WALLBOARD, None).await, 200),
        all,
        "refused writes changed nothing"
    );

    // Replace, empty (removes), remove, and remove again (not listed: still 204).
    let replaced = send(
        &server,
        "PUT",
        "/callers/+4930999/attributes",
        CRM,
        Some(json!({ "attributes": ["es"] })),
    )
    .await;
    assert_eq!(
        expect(replaced, 200),
        json!({ "number": "+4930999", "attributes": ["es"] })
    );
    let emptied = send(
        &server,
        "PUT",
        "/callers/+4930999/attributes",
        CRM,
        Some(json!({ "attributes": [] })),
    )
    .await;
    assert_eq!(
        expect(emptied, 200),
        json!({ "number": "+4930999", "attributes": [] })
    );
    for _ in 0..2 {
        let mut stream = support::connect_from("127.0.0.1", server.address).await;
        let request = json_request("DELETE", "/api/v1/callers/+49301234567", CRM, &[], "");
        let removed = support::exchange(&mut stream, &request).await;
        assert_eq!((removed.status, removed.body.as_str()), (204, ""));
    }
    assert_eq!(
        expect(send(&server, "GET", "/callers", WALLBOARD, None).await, 200),
        json!([])
    );

    // One audit row per write that ran, under the token's name, with what was before.
    let row = |action: &str, number: &str, detail: Value| {
        (
            "crm".to_owned(),
            action.to_owned(),
            format!("caller:{number}"),
            detail,
        )
    };
    assert_eq!(
        caller_audit(&server).await,
        [
            row(
                "caller.set_attributes",
                "+49301234567",
                json!({ "attributes": ["fr", "vip"], "previous": [] })
            ),
            row(
                "caller.set_attributes",
                "+4930999",
                json!({ "attributes": ["gold"], "previous": [] })
            ),
            row(
                "caller.set_attributes",
                "+4930999",
                json!({ "attributes": ["es"], "previous": ["gold"] })
            ),
            row(
                "caller.set_attributes",
                "+4930999",
                json!({ "attributes": [], "previous": ["es"] })
            ),
            row(
                "caller.remove",
                "+49301234567",
                json!({ "removed": ["fr", "vip"] })
            ),
            row("caller.remove", "+49301234567", json!({ "removed": null })),
        ]
    );
    server.stop().await;
}

/// An XML-RPC value as JSON, to compare whole answers.
fn xml_json(value: &XmlValue) -> Value {
    match value {
        XmlValue::Integer(n) => json!(n),
        XmlValue::Boolean(b) => json!(b),
        XmlValue::String(s) => json!(s),
        XmlValue::Array(items) => Value::Array(items.iter().map(xml_json).collect()),
        XmlValue::Struct(members) => Value::Object(
            members
                .iter()
                .map(|(name, value)| (name.clone(), xml_json(value)))
                .collect(),
        ),
        other => panic!("an unexpected XML-RPC value: {other:?}"),
    }
}

/// Calls `method` with the (already encoded) `params` as `token`: the answer as JSON, or
/// the fault's code and string.
async fn rpc(
    server: &Server,
    token: &str,
    method: &str,
    params: &[&str],
) -> Result<Value, (i32, String)> {
    let params: String = params
        .iter()
        .map(|p| format!("<param><value>{p}</value></param>"))
        .collect();
    let body = format!(
        "<?xml version='1.0'?><methodCall><methodName>{method}</methodName><params>{params}</params></methodCall>"
    );
    let request = format!(
        "POST /RPC2 HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {token}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = support::connect_from("127.0.0.1", server.address).await;
    let answer = support::exchange(&mut stream, &request).await;
    assert_eq!(answer.status, 200, "XML-RPC always answers 200");
    if answer.body.contains("<fault>") {
        let fault = dxr::FaultResponse::from_xml(&answer.body)
            .unwrap_or_else(|err| panic!("a fault ({err}): {}", answer.body))
            .fault;
        Err((fault.code(), fault.string().to_owned()))
    } else {
        Ok(xml_json(
            &dxr::MethodResponse::from_xml(&answer.body)
                .unwrap_or_else(|err| panic!("a response ({err}): {}", answer.body))
                .value,
        ))
    }
}

fn s(text: &str) -> String {
    format!("<string>{text}</string>")
}

fn strings(items: &[&str]) -> String {
    let items: String = items
        .iter()
        .map(|i| format!("<value>{}</value>", s(i)))
        .collect();
    format!("<array><data>{items}</data></array>")
}

#[tokio::test]
async fn xmlrpc_sets_reads_lists_and_removes_caller_attributes_by_role() {
    let server = Server::start(config(), CRM, "127.0.0.1").await;
    assert_eq!(
        rpc(
            &server,
            CRM,
            "caller.setAttributes",
            &[&s("+49 30 777"), &strings(&["vip", "gold", "vip"])]
        )
        .await,
        Ok(json!({ "number": "+4930777", "attributes": ["gold", "vip"] }))
    );
    assert_eq!(
        rpc(
            &server,
            CRM,
            "caller.setAttributes",
            &[&s("+4930888"), &strings(&["fr"])]
        )
        .await,
        Ok(json!({ "number": "+4930888", "attributes": ["fr"] }))
    );
    for token in [NODE, WALLBOARD] {
        assert_eq!(
            rpc(&server, token, "caller.attributes", &[&s("+4930-777")]).await,
            Ok(json!({ "number": "+4930777", "attributes": ["gold", "vip"] }))
        );
        assert_eq!(
            rpc(&server, token, "caller.attributes", &[&s("+4930555")]).await,
            Ok(json!({ "number": "+4930555", "attributes": [] }))
        );
    }
    let all = json!([
        { "number": "+4930777", "attributes": ["gold", "vip"] },
        { "number": "+4930888", "attributes": ["fr"] },
    ]);
    assert_eq!(
        rpc(&server, WALLBOARD, "caller.list", &[]).await,
        Ok(all.clone())
    );
    assert_eq!(
        rpc(&server, WALLBOARD, "caller.list", &[&s(""), "<int>1</int>"]).await,
        Ok(json!([all[0]]))
    );
    assert_eq!(
        rpc(
            &server,
            WALLBOARD,
            "caller.list",
            &[&s("+4930777"), "<int>1</int>"]
        )
        .await,
        Ok(json!([all[1]]))
    );
    assert_eq!(
        rpc(&server, WALLBOARD, "caller.list", &[&s(""), "<int>0</int>"]).await,
        Err((
            -32602,
            "caller.list: parameter 2 (limit) must be between 1 and 1000, found 0".to_owned()
        ))
    );
    assert_eq!(
        rpc(&server, NODE, "caller.list", &[]).await,
        Err((
            403,
            "token `node:pbx-1` has role Node; this operation needs Read or above".to_owned()
        ))
    );
    assert_eq!(
        rpc(
            &server,
            WALLBOARD,
            "caller.setAttributes",
            &[&s("+4930888"), &strings(&["vip"])]
        )
        .await,
        Err((
            403,
            "token `wallboard` has role Read; this operation needs Write or above".to_owned()
        ))
    );
    assert_eq!(
        rpc(&server, NODE, "caller.remove", &[&s("+4930888")]).await,
        Err((
            403,
            "token `node:pbx-1` has role Node; this operation needs Write or above".to_owned()
        ))
    );
    assert_eq!(
        rpc(
            &server,
            CRM,
            "caller.setAttributes",
            &[&s("anonymous"), &strings(&["vip"])]
        )
        .await,
        Err((400, format!("invalid number: `anonymous` {NUMBER_RULE}")))
    );
    assert_eq!(
        rpc(&server, CRM, "caller.setAttributes", &[&s("+4930888"), &strings(&["v i p"])]).await,
        Err((
            400,
            "invalid attributes: attribute `v i p` must be 1–32 of a-z, 0-9, '-' and '_', starting with a letter or digit, as the agents' tags it is matched with (e.g. vip)".to_owned()
        ))
    );
    assert_eq!(
        rpc(
            &server,
            CRM,
            "caller.attributes",
            &[&s("+4930888"), &s("extra")]
        )
        .await
        .map_err(|(code, _)| code),
        Err(-32602)
    );
    assert_eq!(rpc(&server, WALLBOARD, "caller.list", &[]).await, Ok(all));
    assert_eq!(
        rpc(&server, CRM, "caller.remove", &[&s("+4930888")]).await,
        Ok(json!(true))
    );
    assert_eq!(
        rpc(&server, CRM, "caller.remove", &[&s("+4930888")]).await,
        Ok(json!(true))
    );
    assert_eq!(
        rpc(&server, WALLBOARD, "caller.attributes", &[&s("+4930888")]).await,
        Ok(json!({ "number": "+4930888", "attributes": [] }))
    );
    let actions: Vec<(String, String)> = caller_audit(&server)
        .await
        .into_iter()
        .map(|(actor, action, subject, _)| (actor, format!("{action} {subject}")))
        .collect();
    let crm = |what: &str| ("crm".to_owned(), what.to_owned());
    assert_eq!(
        actions,
        [
            crm("caller.set_attributes caller:+4930777"),
            crm("caller.set_attributes caller:+4930888"),
            crm("caller.remove caller:+4930888"),
            crm("caller.remove caller:+4930888"),
        ]
    );
    server.stop().await;
}

fn with_token<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii metadata"),
    );
    request
}

fn caller(number: &str, attributes: &[&str]) -> pb::CallerAttributes {
    pb::CallerAttributes {
        number: number.into(),
        attributes: attributes.iter().map(|a| (*a).to_owned()).collect(),
    }
}

#[tokio::test]
async fn grpc_sets_reads_lists_and_removes_caller_attributes_by_role() {
    let server = Server::start(config(), CRM, "127.0.0.1").await;
    let channel: Channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.address))
            .expect("endpoint")
            .connect()
            .await
            .expect("gRPC connects");
    let mut client = ControlClient::new(channel);
    let set = |number: &str, attributes: &[&str]| pb::SetCallerAttributesRequest {
        number: number.into(),
        attributes: attributes.iter().map(|a| (*a).to_owned()).collect(),
    };
    let number = |number: &str| pb::CallerRef {
        number: number.into(),
    };

    let answer = client
        .set_caller_attributes(with_token(
            CRM,
            set("+1 (212) 555-0100", &["vip", "en", "en"]),
        ))
        .await
        .expect("set");
    assert_eq!(answer.into_inner(), caller("+12125550100", &["en", "vip"]));
    for token in [NODE, WALLBOARD] {
        let got = client
            .get_caller_attributes(with_token(token, number("+1.212.555.0100")))
            .await
            .expect("lookup");
        assert_eq!(got.into_inner(), caller("+12125550100", &["en", "vip"]));
        let unknown = client
            .get_caller_attributes(with_token(token, number("+12125550199")))
            .await
            .expect("lookup of an unlisted number");
        assert_eq!(unknown.into_inner(), caller("+12125550199", &[]));
    }
    let listed = client
        .list_callers(with_token(
            WALLBOARD,
            pb::ListCallersRequest {
                limit: 0,
                after: String::new(),
            },
        ))
        .await
        .expect("list");
    assert_eq!(
        listed.into_inner().callers,
        [caller("+12125550100", &["en", "vip"])]
    );
    let after = client
        .list_callers(with_token(
            WALLBOARD,
            pb::ListCallersRequest {
                limit: 10,
                after: "+12125550100".into(),
            },
        ))
        .await
        .expect("list after");
    assert_eq!(after.into_inner().callers, []);

    let refused = client
        .list_callers(with_token(NODE, pb::ListCallersRequest::default()))
        .await
        .expect_err("node cannot list");
    assert_eq!(
        (refused.code(), refused.message()),
        (
            Code::PermissionDenied,
            "token `node:pbx-1` has role Node; this operation needs Read or above"
        )
    );
    let refused = client
        .set_caller_attributes(with_token(WALLBOARD, set("+12125550100", &[])))
        .await
        .expect_err("read cannot write");
    assert_eq!(
        (refused.code(), refused.message()),
        (
            Code::PermissionDenied,
            "token `wallboard` has role Read; this operation needs Write or above"
        )
    );
    let refused = client
        .remove_caller(with_token(NODE, number("+12125550100")))
        .await
        .expect_err("node cannot write");
    assert_eq!(refused.code(), Code::PermissionDenied);
    let invalid = client
        .set_caller_attributes(with_token(CRM, set("", &["vip"])))
        .await
        .expect_err("no number");
    assert_eq!(
        (invalid.code(), invalid.message().to_owned()),
        (
            Code::InvalidArgument,
            format!("invalid number: `` {NUMBER_RULE}")
        )
    );
    let invalid = client
        .set_caller_attributes(with_token(CRM, set("+12125550100", &["vip!"])))
        .await
        .expect_err("bad attribute");
    assert_eq!(
        (invalid.code(), invalid.message()),
        (
            Code::InvalidArgument,
            "invalid attributes: attribute `vip!` must be 1–32 of a-z, 0-9, '-' and '_', starting with a letter or digit, as the agents' tags it is matched with (e.g. vip)"
        )
    );
    let unchanged = client
        .get_caller_attributes(with_token(NODE, number("+12125550100")))
        .await
        .expect("lookup");
    assert_eq!(
        unchanged.into_inner(),
        caller("+12125550100", &["en", "vip"])
    );

    client
        .remove_caller(with_token(CRM, number("+12125550100")))
        .await
        .expect("remove");
    client
        .remove_caller(with_token(CRM, number("+12125550100")))
        .await
        .expect("remove again: not listed is no error");
    let gone = client
        .get_caller_attributes(with_token(NODE, number("+12125550100")))
        .await
        .expect("lookup");
    assert_eq!(gone.into_inner(), caller("+12125550100", &[]));
    assert_eq!(
        caller_audit(&server).await,
        [
            (
                "crm".to_owned(),
                "caller.set_attributes".to_owned(),
                "caller:+12125550100".to_owned(),
                json!({ "attributes": ["en", "vip"], "previous": [] })
            ),
            (
                "crm".to_owned(),
                "caller.remove".to_owned(),
                "caller:+12125550100".to_owned(),
                json!({ "removed": ["en", "vip"] })
            ),
            (
                "crm".to_owned(),
                "caller.remove".to_owned(),
                "caller:+12125550100".to_owned(),
                json!({ "removed": null })
            ),
        ]
    );
    server.stop().await;
}
