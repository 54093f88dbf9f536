//! Supervisors see and steer the autoscaler on every face: REST `GET`/`PUT
//! /api/v1/autoscaler`, XML-RPC `autoscaler.status`/`autoscaler.set`, gRPC
//! `GetAutoscaler`/`SetAutoscaler` and the supervisors' page (`PUT /ui/autoscaler`, and the
//! view in every snapshot of the live feed). A `read` token reads, only `admin` steers,
//! every change is audited under the token's name with the values before, and a minimum or
//! maximum above the configured `max_extra` is refused naming the field. All against `run`
//! on loopback, on SQLite, with a real lock service where the leader is shown.

mod support;

use std::time::Instant;

use callfleet_core::config::{AutoscalerConfig, ControlPlaneConfig, Role};
use callfleet_proto::control::v1 as pb;
use callfleet_proto::control::v1::control_client::ControlClient;
use callfleet_proto::lock::v1 as lock_pb;
use serde_json::{Value, json};
use support::{
    Answer, Locks, Server, channel, connect_from, exchange, expect, feed_snapshot_where, send_api,
    token,
};

const ADMIN: &str = "admin-autoscaler-secret-0123456789a";
const CRM: &str = "crm-autoscaler-secret-0123456789abc";
const WALLBOARD: &str = "wallboard-autoscaler-secret-012345";

/// The configured ceiling of extra nodes in these tests.
const MAX_EXTRA: u32 = 5;

fn config(lock_service: &str) -> ControlPlaneConfig {
    ControlPlaneConfig {
        tokens: vec![
            token("ops", ADMIN, Role::Admin),
            token("crm", CRM, Role::Write),
            token("wallboard", WALLBOARD, Role::Read),
        ],
        lock_service: lock_service.to_owned(),
        autoscaler: AutoscalerConfig {
            max_extra: MAX_EXTRA,
            ..AutoscalerConfig::default()
        },
        ..ControlPlaneConfig::default()
    }
}

/// What a token of `name` and `role` is told when it tries to steer.
fn refused(name: &str, role: &str) -> String {
    format!("token `{name}` has role {role}; this operation needs Admin or above")
}

/// What a minimum or maximum above [`MAX_EXTRA`] is told.
fn above(field: &str, value: u32) -> String {
    format!(
        "invalid {field}: {value} is above the configured max_extra ({MAX_EXTRA}); raise control_plane.autoscaler.max_extra first"
    )
}

/// The view without its `recent` rows (their ids and times vary), and those rows as
/// (actor, action, subject, detail).
fn split(mut view: Value) -> (Value, Vec<(String, String, String, Value)>) {
    let recent = view
        .as_object_mut()
        .expect("an object")
        .remove("recent")
        .expect("recent");
    let rows = recent
        .as_array()
        .expect("recent is an array")
        .iter()
        .map(|r| {
            (
                r["actor"].as_str().expect("actor").to_owned(),
                r["action"].as_str().expect("action").to_owned(),
                r["subject"].as_str().expect("subject").to_owned(),
                r["detail"].clone(),
            )
        })
        .collect();
    (view, rows)
}

/// The view of an empty fleet (no nodes) with `steering` and `leader`.
fn view_of(steering: Value, leader: Value) -> Value {
    let min = steering["min_extra"].as_u64().expect("min");
    let max = steering["max_extra"]
        .as_u64()
        .unwrap_or(u64::from(MAX_EXTRA));
    json!({
        "enabled": false,
        "steering": steering,
        "figures": {
            "calls": 0,
            "capacity": 0,
            "utilisation": null,
            "extra_active": 0,
            "extra_booting": 0,
            "extra_draining": 0,
            "min_extra": min,
            "max_extra": max,
            "paused": steering["paused"],
        },
        "scale_out_above": 0.7,
        "scale_in_below": 0.5,
        "leader": leader,
    })
}

/// Takes the autoscaler's lease as `holder` would lead: its token.
async fn take_lease(locks: &Locks, holder: &str) -> u64 {
    let mut locks = locks.client().await;
    locks
        .acquire(lock_pb::AcquireRequest {
            resource: callfleet_control_plane::scale::LEASE.to_owned(),
            holder: holder.to_owned(),
            attempt: format!("{holder}/1"),
            validity_ms: 30_000,
        })
        .await
        .expect("the lease is granted")
        .into_inner()
        .token
}

#[tokio::test]
async fn rest_reads_with_read_and_steers_with_admin_only() {
    let locks = Locks::start().await;
    let server = Server::start(config(&locks.url()), CRM, "127.0.0.1").await;

    // Nobody leads yet: the view says so.
    let view = expect(
        send_api(&server, "GET", "/autoscaler", WALLBOARD, &[], None).await,
        200,
    );
    let none = json!({ "paused": false, "min_extra": 0, "max_extra": null });
    assert_eq!(split(view), (view_of(none.clone(), Value::Null), vec![]));

    let token = take_lease(&locks, "cp-a/42").await;
    let view = expect(
        send_api(&server, "GET", "/autoscaler", WALLBOARD, &[], None).await,
        200,
    );
    let leader = json!({ "holder": "cp-a/42", "token": token });
    assert_eq!(split(view).0, view_of(none.clone(), leader.clone()));

    // Read and write tokens may not steer; nothing is written.
    let steering = json!({ "paused": true, "min_extra": 1, "max_extra": 3 });
    for (secret, name, role) in [(WALLBOARD, "wallboard", "Read"), (CRM, "crm", "Write")] {
        let answer = expect(
            send_api(
                &server,
                "PUT",
                "/autoscaler",
                secret,
                &[],
                Some(steering.clone()),
            )
            .await,
            403,
        );
        assert_eq!(answer, json!({ "error": refused(name, role) }));
    }

    // Admin steers: the new view comes back, with its audit row.
    let view = expect(
        send_api(
            &server,
            "PUT",
            "/autoscaler",
            ADMIN,
            &[],
            Some(steering.clone()),
        )
        .await,
        200,
    );
    let (view, recent) = split(view);
    assert_eq!(view, view_of(steering.clone(), leader.clone()));
    let set = (
        "ops".to_owned(),
        "autoscaler.set".to_owned(),
        "autoscaler".to_owned(),
        json!({ "now": steering, "before": none }),
    );
    assert_eq!(recent, vec![set.clone()]);
    let audit = expect(
        send_api(&server, "GET", "/audit?limit=1", WALLBOARD, &[], None).await,
        200,
    );
    assert_eq!(
        (
            &audit[0]["actor"],
            &audit[0]["action"],
            &audit[0]["subject"],
            &audit[0]["detail"]
        ),
        (
            &json!("ops"),
            &json!("autoscaler.set"),
            &json!("autoscaler"),
            &set.3
        )
    );

    // Above the configured ceiling, either field: 400 naming it; nothing changes.
    for (body, field, value) in [
        (json!({ "min_extra": 6 }), "min_extra", 6),
        (json!({ "max_extra": 6 }), "max_extra", 6),
        (json!({ "min_extra": 1, "max_extra": 99 }), "max_extra", 99),
    ] {
        let answer = expect(
            send_api(&server, "PUT", "/autoscaler", ADMIN, &[], Some(body)).await,
            400,
        );
        assert_eq!(answer, json!({ "error": above(field, value) }));
    }
    // A misspelt field is named too, and so is a maximum below the minimum.
    let answer = expect(
        send_api(
            &server,
            "PUT",
            "/autoscaler",
            ADMIN,
            &[],
            Some(json!({ "max_extar": 2 })),
        )
        .await,
        400,
    );
    let error = answer["error"].as_str().expect("error");
    assert!(error.contains("unknown field `max_extar`"), "{error}");
    let answer = expect(
        send_api(
            &server,
            "PUT",
            "/autoscaler",
            ADMIN,
            &[],
            Some(json!({ "min_extra": 3, "max_extra": 2 })),
        )
        .await,
        400,
    );
    assert_eq!(
        answer,
        json!({ "error": "invalid max_extra: 2 is below min_extra (3)" })
    );
    let view = expect(
        send_api(&server, "GET", "/autoscaler", WALLBOARD, &[], None).await,
        200,
    );
    assert_eq!(split(view), (view_of(steering, leader), vec![set]));

    // The whole steering is replaced: an empty body resumes with no minimum and the
    // configured maximum.
    let view = expect(
        send_api(&server, "PUT", "/autoscaler", ADMIN, &[], Some(json!({}))).await,
        200,
    );
    assert_eq!(split(view).0["steering"], none);

    server.stop().await;
    locks.stop().await;
}

/// An XML-RPC call with the bearer `token`: the value, or the fault's (code, string).
async fn rpc2(
    server: &Server,
    token: &str,
    method: &str,
    params: &str,
) -> Result<Value, (i32, String)> {
    let body = format!(
        "<?xml version='1.0'?><methodCall><methodName>{method}</methodName><params>{params}</params></methodCall>"
    );
    let request = format!(
        "POST /RPC2 HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {token}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = connect_from("127.0.0.1", server.address).await;
    let answer = exchange(&mut stream, &request).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    if answer.body.contains("<fault>") {
        let fault = dxr::FaultResponse::from_xml(&answer.body)
            .expect("a fault response")
            .fault;
        return Err((fault.code(), fault.string().to_owned()));
    }
    let value = dxr::MethodResponse::from_xml(&answer.body)
        .expect("a method response")
        .value;
    Ok(json_of(&value))
}

/// An XML-RPC value as JSON, to compare with the REST view (an absent struct member is
/// what REST's null is).
fn json_of(value: &callfleet_control_plane::xmlrpc::Value) -> Value {
    use callfleet_control_plane::xmlrpc::Value as X;
    match value {
        X::Integer(i) => json!(i),
        X::Long(l) => json!(l),
        X::Boolean(b) => json!(b),
        X::String(s) => json!(s),
        X::Double(d) => json!(d),
        X::Array(items) => Value::Array(items.iter().map(json_of).collect()),
        X::Struct(members) => Value::Object(
            members
                .iter()
                .map(|(k, v)| (k.clone(), json_of(v)))
                .collect(),
        ),
        X::Nil => Value::Null,
        other => panic!("an unexpected value {other:?}"),
    }
}

fn member(name: &str, value: &str) -> String {
    format!("<member><name>{name}</name><value>{value}</value></member>")
}

#[tokio::test]
async fn xmlrpc_reads_with_read_and_steers_with_admin_only() {
    let server = Server::start(config(""), CRM, "127.0.0.1").await;
    let status = rpc2(&server, WALLBOARD, "autoscaler.status", "")
        .await
        .expect("a read token reads");
    // No lock service configured: nobody is shown leading; nulls are left out.
    let mut empty = view_of(json!({ "paused": false, "min_extra": 0 }), Value::Null);
    let object = empty.as_object_mut().expect("object");
    object.remove("leader");
    object["figures"]
        .as_object_mut()
        .expect("figures")
        .remove("utilisation");
    object.insert("recent".into(), json!([]));
    assert_eq!(status, empty);

    let steering = format!(
        "<param><value><struct>{}{}{}</struct></value></param>",
        member("paused", "<boolean>1</boolean>"),
        member("min_extra", "<int>2</int>"),
        member("max_extra", "<int>4</int>")
    );
    for (secret, name, role) in [(WALLBOARD, "wallboard", "Read"), (CRM, "crm", "Write")] {
        assert_eq!(
            rpc2(&server, secret, "autoscaler.set", &steering).await,
            Err((403, refused(name, role)))
        );
    }
    let view = rpc2(&server, ADMIN, "autoscaler.set", &steering)
        .await
        .expect("admin steers");
    assert_eq!(
        view["steering"],
        json!({ "paused": true, "min_extra": 2, "max_extra": 4 })
    );
    assert_eq!(
        (
            &view["figures"]["min_extra"],
            &view["figures"]["max_extra"],
            &view["figures"]["paused"]
        ),
        (&json!(2), &json!(4), &json!(true))
    );
    let recent = view["recent"].as_array().expect("recent");
    assert_eq!(recent.len(), 1);
    assert_eq!(
        (
            &recent[0]["actor"],
            &recent[0]["action"],
            &recent[0]["detail"]
        ),
        (
            &json!("ops"),
            &json!("autoscaler.set"),
            &json!({
                "now": { "paused": true, "min_extra": 2, "max_extra": 4 },
                "before": { "paused": false, "min_extra": 0 },
            })
        )
    );

    // max_extra left out (or nil) is none: the configured maximum.
    let resume = format!(
        "<param><value><struct>{}{}</struct></value></param>",
        member("paused", "<boolean>0</boolean>"),
        member("max_extra", "<nil/>")
    );
    let view = rpc2(&server, ADMIN, "autoscaler.set", &resume)
        .await
        .expect("admin steers");
    assert_eq!(view["steering"], json!({ "paused": false, "min_extra": 0 }));
    assert_eq!(view["figures"]["max_extra"], json!(MAX_EXTRA));

    let too_many = format!(
        "<param><value><struct>{}</struct></value></param>",
        member("max_extra", "<int>6</int>")
    );
    assert_eq!(
        rpc2(&server, ADMIN, "autoscaler.set", &too_many).await,
        Err((400, above("max_extra", 6)))
    );
    let typo = format!(
        "<param><value><struct>{}</struct></value></param>",
        member("minimum", "<int>1</int>")
    );
    assert_eq!(
        rpc2(&server, ADMIN, "autoscaler.set", &typo).await,
        Err((
            -32602,
            "autoscaler.set: parameter 1 (steering) has no member \"minimum\"; its members are paused, min_extra, max_extra".to_owned()
        ))
    );
    server.stop().await;
}

fn with_token<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}

#[tokio::test]
async fn grpc_reads_with_read_and_steers_with_admin_only() {
    let locks = Locks::start().await;
    let server = Server::start(config(&locks.url()), CRM, "127.0.0.1").await;
    let token = take_lease(&locks, "cp-b/7").await;
    let mut client = ControlClient::new(channel(&format!("http://{}", server.address)).await);

    let empty_figures = pb::AutoscalerFigures {
        max_extra: MAX_EXTRA,
        ..Default::default()
    };
    let leader = pb::AutoscalerLeader {
        holder: "cp-b/7".into(),
        token,
    };
    let view = client
        .get_autoscaler(with_token(WALLBOARD, pb::Empty {}))
        .await
        .expect("a read token reads")
        .into_inner();
    assert_eq!(
        view,
        pb::Autoscaler {
            enabled: false,
            steering: Some(pb::ScalerSteering::default()),
            figures: Some(empty_figures),
            scale_out_above: 0.7,
            scale_in_below: 0.5,
            leader: Some(leader.clone()),
            recent: vec![],
        }
    );

    let steering = pb::ScalerSteering {
        paused: false,
        min_extra: 1,
        max_extra: Some(3),
    };
    for (secret, name, role) in [(WALLBOARD, "wallboard", "Read"), (CRM, "crm", "Write")] {
        let status = client
            .set_autoscaler(with_token(secret, steering))
            .await
            .expect_err("refused");
        assert_eq!(
            (status.code(), status.message()),
            (tonic::Code::PermissionDenied, refused(name, role).as_str())
        );
    }
    let view = client
        .set_autoscaler(with_token(ADMIN, steering))
        .await
        .expect("admin steers")
        .into_inner();
    assert_eq!(view.steering, Some(steering));
    assert_eq!(
        view.figures,
        Some(pb::AutoscalerFigures {
            min_extra: 1,
            max_extra: 3,
            ..Default::default()
        })
    );
    assert_eq!(view.leader, Some(leader));
    assert_eq!(view.recent.len(), 1);
    let row = &view.recent[0];
    assert_eq!(
        (
            row.actor.as_str(),
            row.action.as_str(),
            row.subject.as_str()
        ),
        ("ops", "autoscaler.set", "autoscaler")
    );
    assert!(row.at_ms > 0 && row.id > 0, "{row:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&row.detail).expect("detail is JSON"),
        json!({
            "now": { "paused": false, "min_extra": 1, "max_extra": 3 },
            "before": { "paused": false, "min_extra": 0, "max_extra": null },
        })
    );

    let status = client
        .set_autoscaler(with_token(
            ADMIN,
            pb::ScalerSteering {
                min_extra: 9,
                ..Default::default()
            },
        ))
        .await
        .expect_err("above the ceiling");
    assert_eq!(
        (status.code(), status.message()),
        (tonic::Code::InvalidArgument, above("min_extra", 9).as_str())
    );
    server.stop().await;
    locks.stop().await;
}

// ---- the supervisors' page ---------------------------------------------------------------

fn ui(method: &str, path: &str, cookie: &str, csrf: Option<&str>, body: &str) -> String {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: cp\r\nContent-Type: application/json\r\nCookie: {cookie}\r\n"
    );
    if let Some(csrf) = csrf {
        head.push_str(&format!("X-CSRF-Token: {csrf}\r\n"));
    }
    format!("{head}Content-Length: {}\r\n\r\n{body}", body.len())
}

async fn request(server: &Server, request: String) -> Answer {
    let mut stream = connect_from("127.0.0.1", server.address).await;
    exchange(&mut stream, &request).await
}

/// Logs in with `secret`: the session cookie (`name=value`) and its CSRF token.
async fn login(server: &Server, secret: &str) -> (String, String) {
    let body = json!({ "token": secret }).to_string();
    let answer = request(
        server,
        format!(
            "POST /ui/login HTTP/1.1\r\nHost: cp\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let cookie = answer
        .header("set-cookie")
        .expect("a session cookie")
        .split("; ")
        .next()
        .expect("name=value")
        .to_owned();
    let session: Value = serde_json::from_str(&answer.body).expect("json");
    (cookie, session["csrf"].as_str().expect("csrf").to_owned())
}

#[tokio::test]
async fn the_page_shows_the_autoscaler_and_only_an_admin_steers_it_with_its_csrf_token() {
    let server = Server::start(config(""), CRM, "127.0.0.1").await;
    let (read_cookie, read_csrf) = login(&server, WALLBOARD).await;
    let (write_cookie, write_csrf) = login(&server, CRM).await;
    let (admin_cookie, admin_csrf) = login(&server, ADMIN).await;

    // Every page's snapshot carries the view, read sessions' too.
    let snapshot =
        feed_snapshot_where(&server, &read_cookie, |s| s["autoscaler"].is_object()).await;
    let none = json!({ "paused": false, "min_extra": 0, "max_extra": null });
    assert_eq!(
        split(snapshot["autoscaler"].clone()),
        (view_of(none.clone(), Value::Null), vec![])
    );

    let pause = json!({ "paused": true, "min_extra": 1, "max_extra": 2 }).to_string();
    // Read and write sessions, with their CSRF token: 403 naming the role; an admin
    // session without its CSRF token, or with another session's: 403.
    for (cookie, csrf, error) in [
        (
            &read_cookie,
            Some(read_csrf.as_str()),
            refused("wallboard", "Read"),
        ),
        (
            &write_cookie,
            Some(write_csrf.as_str()),
            refused("crm", "Write"),
        ),
        (
            &admin_cookie,
            None,
            "a change from the page must carry its X-CSRF-Token header; reload the page".to_owned(),
        ),
        (
            &admin_cookie,
            Some(read_csrf.as_str()),
            "a change from the page must carry its X-CSRF-Token header; reload the page".to_owned(),
        ),
    ] {
        let answer = request(&server, ui("PUT", "/ui/autoscaler", cookie, csrf, &pause)).await;
        assert_eq!(
            (
                answer.status,
                serde_json::from_str::<Value>(&answer.body).expect("json")
            ),
            (403, json!({ "error": error }))
        );
    }
    let answer = request(
        &server,
        ui(
            "PUT",
            "/ui/autoscaler",
            &admin_cookie,
            Some(&admin_csrf),
            &pause,
        ),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let steering = json!({ "paused": true, "min_extra": 1, "max_extra": 2 });
    let (view, recent) = split(serde_json::from_str(&answer.body).expect("json"));
    assert_eq!(view, view_of(steering.clone(), Value::Null));
    let set = (
        "ops".to_owned(),
        "autoscaler.set".to_owned(),
        "autoscaler".to_owned(),
        json!({ "now": steering, "before": none }),
    );
    assert_eq!(recent, vec![set.clone()]);

    // Above the ceiling: 400 naming the field, as over the API.
    let answer = request(
        &server,
        ui(
            "PUT",
            "/ui/autoscaler",
            &admin_cookie,
            Some(&admin_csrf),
            r#"{"max_extra":7}"#,
        ),
    )
    .await;
    assert_eq!(
        (
            answer.status,
            serde_json::from_str::<Value>(&answer.body).expect("json")
        ),
        (400, json!({ "error": above("max_extra", 7) }))
    );

    // The read session's feed shows the change.
    let snapshot = feed_snapshot_where(&server, &read_cookie, |s| {
        s["autoscaler"]["steering"]["paused"] == true
    })
    .await;
    assert_eq!(
        split(snapshot["autoscaler"].clone()),
        (view_of(steering, Value::Null), vec![set])
    );
    server.stop().await;
}

/// A lock service that accepts connections and never answers must not hold the status
/// (and with it every page's snapshot) back: the leader is unknown after the figures'
/// client deadline.
#[tokio::test]
async fn a_silent_lock_service_leaves_the_leader_unknown_within_its_deadline() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = silent.local_addr().expect("address");
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    let server = Server::start(config(&format!("http://{address}")), CRM, "127.0.0.1").await;
    for _ in 0..3 {
        let started = Instant::now();
        let view = expect(
            send_api(&server, "GET", "/autoscaler", WALLBOARD, &[], None).await,
            200,
        );
        let took = started.elapsed();
        assert_eq!(view["leader"], Value::Null);
        assert!(
            took < callfleet_control_plane::figures::LOCK_DEADLINE * 3,
            "the status took {took:?}"
        );
    }
    server.stop().await;
    held.abort();
}
