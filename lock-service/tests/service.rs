//! The lock service over its real listener: gRPC through a tonic client and the HTTP twin
//! through raw HTTP/1.1, as a dialplan's `CURL()` sends it.

mod support;

use std::time::Duration;

use callfleet_core::config::LockServiceConfig;
use callfleet_proto::lock::v1 as pb;
use callfleet_proto::lock::v1::locks_client::LocksClient;
use support::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// The HTTP twin as a dialplan's `CURL()` calls it.
impl Server {
    /// POSTs a form and returns (status, body) the way CURL() sees it.
    async fn post(&self, path: &str, form: &str) -> (u16, String) {
        self.request(
            "POST",
            path,
            Some("application/x-www-form-urlencoded"),
            form,
        )
        .await
    }

    /// Sends `method path` with `body` and, when given, `content_type`; returns (status,
    /// body) as `post` does.
    async fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &str,
    ) -> (u16, String) {
        let content_type =
            content_type.map_or_else(String::new, |ct| format!("Content-Type: {ct}\r\n"));
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: asterisk-libcurl-agent/1.0\r\n\
Accept: */*\r\nContent-Length: {}\r\n{content_type}Connection: close\r\n\r\n{body}",
            body.len()
        );
        self.exchange(&request).await
    }
}

#[tokio::test]
async fn grpc_claims_are_fenced_and_errors_have_their_codes() {
    let server = Server::start().await;
    let mut client = server.grpc().await;
    let claim = |holder: &str, attempt: &str| pb::ClaimFirstRequest {
        candidates: vec!["agent:1".into(), "agent:2".into()],
        holder: holder.into(),
        attempt: attempt.into(),
        validity_ms: 5_000,
    };
    let first = client
        .claim_first(claim("pbx-1/c1", "a1"))
        .await
        .expect("ok")
        .into_inner()
        .lease
        .expect("agent:1 is free");
    assert_eq!(first.resource, "agent:1");
    let second = client
        .claim_first(claim("pbx-2/c2", "a2"))
        .await
        .expect("ok")
        .into_inner()
        .lease
        .expect("agent:2 is free");
    assert_eq!(second.resource, "agent:2");
    let none = client
        .claim_first(claim("pbx-3/c3", "a3"))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(none.lease, None, "both held");

    let held = client
        .acquire(pb::AcquireRequest {
            resource: "agent:1".into(),
            holder: "pbx-9/x".into(),
            attempt: "z".into(),
            validity_ms: 1000,
        })
        .await
        .expect_err("held");
    assert_eq!(held.code(), Code::AlreadyExists);
    assert!(held.message().contains("pbx-1/c1"), "{held:?}");

    let wrong = client
        .renew(pb::RenewRequest {
            resource: "agent:1".into(),
            holder: "pbx-1/c1".into(),
            token: first.token + 1,
            validity_ms: 1000,
        })
        .await
        .expect_err("wrong token");
    assert_eq!(wrong.code(), Code::FailedPrecondition);

    client
        .release(pb::ReleaseRequest {
            resource: "agent:1".into(),
            holder: "pbx-1/c1".into(),
            token: first.token,
        })
        .await
        .expect("released");
    let gone = client
        .release(pb::ReleaseRequest {
            resource: "agent:1".into(),
            holder: "pbx-1/c1".into(),
            token: first.token,
        })
        .await
        .expect_err("gone");
    assert_eq!(gone.code(), Code::NotFound);
    let invalid = client
        .acquire(pb::AcquireRequest::default())
        .await
        .expect_err("empty request");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert!(invalid.message().contains("resource"), "{invalid:?}");
    let got = client
        .get(pb::GetRequest {
            resource: "agent:2".into(),
        })
        .await
        .expect("ok")
        .into_inner()
        .lease
        .expect("live");
    assert_eq!((got.holder.as_str(), got.token), ("pbx-2/c2", second.token));
    server.stop().await;
}

#[tokio::test]
async fn the_http_twin_answers_one_line_that_is_never_empty() {
    let server = Server::start().await;
    let (status, body) = server
        .post(
            "/lock/acquire",
            "resource=agent:200&holder=pbx-1/1795429789.99&attempt=1795429789.99&ttl=30",
        )
        .await;
    assert_eq!(status, 200);
    let token: u64 = body
        .strip_prefix("OK ")
        .and_then(|t| t.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("OK <token>, got {body:?}"));
    assert!(
        body.ends_with('\n') && body.lines().count() == 1,
        "{body:?}"
    );

    let (status, body) = server
        .post(
            "/lock/acquire",
            "resource=agent:200&holder=someone-else&attempt=x&ttl=30",
        )
        .await;
    assert_eq!((status, body.as_str()), (409, "BUSY pbx-1/1795429789.99\n"));

    let (status, body) = server
        .post(
            "/lock/claim-first",
            "candidates=agent:200|agent:201&holder=pbx-2/c2&attempt=c2&ttl=30",
        )
        .await;
    assert_eq!(status, 200);
    assert!(body.starts_with("OK agent:201 "), "{body:?}");

    let (_, body) = server
        .post(
            "/lock/renew",
            &format!("resource=agent:200&holder=pbx-1/1795429789.99&token={token}&ttl=10"),
        )
        .await;
    assert_eq!(body, format!("OK {token}\n"));
    let (_, body) = server
        .post(
            "/lock/release",
            &format!("resource=agent:200&holder=pbx-1/1795429789.99&token={token}"),
        )
        .await;
    assert_eq!(body, "OK released\n");
    let (status, body) = server
        .post(
            "/lock/release",
            &format!("resource=agent:200&holder=pbx-1/1795429789.99&token={token}"),
        )
        .await;
    assert_eq!((status, body.as_str()), (410, "GONE\n"));
    let (status, body) = server
        .post("/lock/renew", "resource=agent:200&holder=h&token=abc")
        .await;
    assert_eq!(status, 400);
    assert!(
        body.starts_with("ERR ") && body.contains("token"),
        "{body:?}"
    );
    server.stop().await;
}

/// The whole body is one `ERR …` line: nothing of the framework's own answer around it.
fn assert_one_err_line(what: &str, body: &str) {
    assert!(
        body.starts_with("ERR ") && body.ends_with('\n') && body.lines().count() == 1,
        "{what}: {body:?}"
    );
}

#[tokio::test]
async fn a_body_that_is_not_a_form_answers_one_err_line() {
    let server = Server::start().await;
    let not_a_form = "ERR the body is not a form this endpoint reads (";
    let cases = [
        (
            "a field given twice",
            "/lock/acquire",
            Some("application/x-www-form-urlencoded"),
            "resource=agent:300&resource=agent:301&holder=h&attempt=x",
        ),
        (
            "a field given twice (claim-first)",
            "/lock/claim-first",
            Some("application/x-www-form-urlencoded"),
            "candidates=agent:300&holder=h&holder=g&attempt=x",
        ),
        (
            "a field given twice (renew)",
            "/lock/renew",
            Some("application/x-www-form-urlencoded"),
            "resource=agent:300&holder=h&token=1&token=2",
        ),
        (
            "a field given twice (release)",
            "/lock/release",
            Some("application/x-www-form-urlencoded"),
            "resource=agent:300&resource=agent:301&holder=h&token=1",
        ),
        (
            "JSON",
            "/lock/acquire",
            Some("application/json"),
            r#"{"resource":"agent:300","holder":"h","attempt":"x"}"#,
        ),
        (
            "a form without Content-Type",
            "/lock/acquire",
            None,
            "resource=agent:300&holder=h&attempt=x",
        ),
        (
            "a form sent as text/plain",
            "/lock/claim-first",
            Some("text/plain"),
            "candidates=agent:300&holder=h&attempt=x",
        ),
    ];
    for (what, path, content_type, body) in cases {
        let (status, answer) = server.request("POST", path, content_type, body).await;
        assert_eq!(status, 400, "{what}: {answer:?}");
        assert_one_err_line(what, &answer);
        assert!(answer.starts_with(not_a_form), "{what}: {answer:?}");
        assert!(
            answer.ends_with("); send application/x-www-form-urlencoded fields, each once\n"),
            "{what}: {answer:?}"
        );
    }
    // Nothing was leased by the refused bodies; the control: the same form, each field
    // once, is read.
    let (status, answer) = server
        .post("/lock/acquire", "resource=agent:300&holder=h&attempt=x")
        .await;
    assert_eq!(status, 200, "{answer:?}");
    assert!(answer.starts_with("OK "), "{answer:?}");
    let (status, answer) = server
        .post("/lock/acquire", "resource=agent:301&holder=g&attempt=y")
        .await;
    assert_eq!(status, 200, "{answer:?}");
    assert!(answer.starts_with("OK "), "{answer:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_method_other_than_post_answers_405_with_one_err_line() {
    let server = Server::start().await;
    for path in [
        "/lock/acquire",
        "/lock/claim-first",
        "/lock/renew",
        "/lock/release",
    ] {
        for method in ["GET", "PUT", "DELETE"] {
            let (status, body) = server.request(method, path, None, "").await;
            assert_eq!(
                (status, body.as_str()),
                (405, "ERR send a form with POST (CURL(url,form) does)\n"),
                "{method} {path}"
            );
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn a_ttl_that_is_not_a_positive_number_answers_err_invalid_request() {
    let server = Server::start().await;
    // Every answer is checked before the test fails, so a failure lists them all.
    let mut wrong = Vec::new();
    for ttl in ["-1", "abc", "0", "NaN", "inf"] {
        for (path, form) in [
            (
                "/lock/acquire",
                format!("resource=agent:400&holder=h&attempt=x&ttl={ttl}"),
            ),
            (
                "/lock/claim-first",
                format!("candidates=agent:400&holder=h&attempt=x&ttl={ttl}"),
            ),
            (
                "/lock/renew",
                format!("resource=agent:400&holder=h&token=1&ttl={ttl}"),
            ),
        ] {
            let (status, body) = server.post(path, &form).await;
            let expected = format!("ERR `ttl` must be a number of seconds above 0, not {ttl:?}\n");
            if (status, body.as_str()) != (400, expected.as_str()) {
                wrong.push(format!(
                    "{path} ttl={ttl}: got {status} {body:?}, expected 400 {expected:?}"
                ));
            }
        }
    }
    server.stop().await;
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn a_ttl_above_max_validity_answers_err_naming_max_validity() {
    let server = Server::start().await;
    for (path, form) in [
        (
            "/lock/acquire",
            "resource=agent:500&holder=h&attempt=x&ttl=3601",
        ),
        (
            "/lock/claim-first",
            "candidates=agent:500&holder=h&attempt=x&ttl=31",
        ),
    ] {
        let (status, body) = server.post(path, form).await;
        assert_eq!(status, 400, "{path}: {body:?}");
        assert_one_err_line(path, &body);
        assert!(
            body.ends_with(
                "`validity` must be between 100 ms and 30000 ms (lock_service.max_validity)\n"
            ),
            "{path}: {body:?}"
        );
    }
    // The control: max_validity itself (30 s, the default) is granted.
    let (status, body) = server
        .post(
            "/lock/acquire",
            "resource=agent:500&holder=h&attempt=x&ttl=30",
        )
        .await;
    assert_eq!(status, 200, "{body:?}");
    let token = body
        .strip_prefix("OK ")
        .and_then(|t| t.trim_end().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("OK <token>, got {body:?}"));
    let (status, body) = server
        .post(
            "/lock/renew",
            &format!("resource=agent:500&holder=h&token={token}&ttl=30.001"),
        )
        .await;
    assert_eq!(status, 400, "{body:?}");
    assert_one_err_line("renew", &body);
    assert!(
        body.ends_with(
            "`validity` must be between 100 ms and 30000 ms (lock_service.max_validity)\n"
        ),
        "renew: {body:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_kept_lease_outlives_its_validity_and_a_lost_one_is_reported_in_time() {
    use callfleet_lock_service::Lease;
    use callfleet_lock_service::client::LeaseKeeper;
    use std::time::Instant;

    let server = Server::start().await;
    let mut client = server.grpc().await;
    let sent = Instant::now();
    let granted = client
        .acquire(pb::AcquireRequest {
            resource: "agent:k".into(),
            holder: "pbx-1/k".into(),
            attempt: "k1".into(),
            validity_ms: 600,
        })
        .await
        .expect("free")
        .into_inner();
    let lease = Lease {
        resource: granted.resource.clone(),
        holder: granted.holder.clone(),
        attempt: granted.attempt.clone(),
        token: granted.token,
        validity: Duration::from_millis(granted.validity_ms),
    };
    let keeper = LeaseKeeper::start(
        client.clone(),
        lease.clone(),
        sent,
        Duration::from_millis(150),
        Duration::from_secs(1),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !keeper.lost().is_cancelled(),
        "renewed past the first 600 ms"
    );
    let live = client
        .get(pb::GetRequest {
            resource: "agent:k".into(),
        })
        .await
        .expect("get")
        .into_inner()
        .lease
        .expect("still leased");
    assert_eq!(live.token, granted.token);

    // Someone releases it behind the holder's back: the next renewal says so.
    client
        .release(pb::ReleaseRequest {
            resource: "agent:k".into(),
            holder: "pbx-1/k".into(),
            token: granted.token,
        })
        .await
        .expect("released");
    tokio::time::timeout(Duration::from_secs(1), keeper.lost().cancelled())
        .await
        .expect("lost reported after the release");

    // A service that accepts connections but never answers: the stop timer, not the
    // stuck renewal, ends the lease when its validity does.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_address = silent.local_addr().expect("addr");
    let _hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{silent_address}"))
        .expect("endpoint")
        .connect_lazy();
    let sent = Instant::now();
    let keeper = LeaseKeeper::start(
        LocksClient::new(channel),
        lease,
        sent,
        Duration::from_millis(100),
        Duration::from_secs(5),
    );
    tokio::time::timeout(Duration::from_secs(2), keeper.lost().cancelled())
        .await
        .expect("lost reported");
    let after = sent.elapsed();
    assert!(
        after >= Duration::from_millis(590) && after < Duration::from_millis(900),
        "lost {after:?} after the claim was sent; validity 600 ms"
    );
    server.stop().await;
}

async fn health_of(server: &Server) -> i32 {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.address))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "callfleet.lock.v1.Locks".into(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status
}

#[tokio::test]
async fn health_says_serving_only_while_leases_can_be_granted() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let memory = Server::start().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while health_of(&memory).await != ServingStatus::Serving as i32 {
        assert!(
            std::time::Instant::now() < deadline,
            "memory backend never serving"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    memory.stop().await;

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let config = LockServiceConfig {
        backend: callfleet_core::config::LockBackendKind::Redis,
        redis_url: format!("redis://127.0.0.1:{closed}/0"),
        deadline: Duration::from_millis(200),
        ..LockServiceConfig::default()
    };
    let no_redis = Server::start_with(config).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(health_of(&no_redis).await, ServingStatus::NotServing as i32);
    let mut client = no_redis.grpc().await;
    let refused = client
        .acquire(pb::AcquireRequest {
            resource: "agent:1".into(),
            holder: "h".into(),
            attempt: "a".into(),
            validity_ms: 1000,
        })
        .await
        .expect_err("fails closed without redis");
    assert_eq!(refused.code(), Code::Unavailable);
    no_redis.stop().await;
}

/// The fields of a `google.protobuf.FileDescriptorProto` this test reads (prost skips the
/// others), so it needs no descriptor crate of its own.
#[derive(Clone, PartialEq, prost::Message)]
struct FileDescriptor {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    package: String,
    #[prost(message, repeated, tag = "6")]
    service: Vec<ServiceDescriptor>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ServiceDescriptor {
    #[prost(string, tag = "1")]
    name: String,
}

#[tokio::test]
async fn reflection_lists_the_services_and_serves_their_descriptors() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    let server = Server::start().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.address))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = ServerReflectionClient::new(channel);
    // One request per stream: the answer is the stream's only message.
    let mut ask = async |request: MessageRequest| -> MessageResponse {
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        };
        let mut answers = client
            .server_reflection_info(tonic::codegen::tokio_stream::iter([request]))
            .await
            .expect("reflection answers")
            .into_inner();
        let answer: ServerReflectionResponse = answers
            .message()
            .await
            .expect("a message")
            .expect("not the end");
        answer.message_response.expect("a response")
    };

    let MessageResponse::ListServicesResponse(list) =
        ask(MessageRequest::ListServices(String::new())).await
    else {
        panic!("ListServices gets a service list");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in ["callfleet.lock.v1.Locks", "grpc.health.v1.Health"] {
        assert!(names.contains(&expected), "{expected} not in {names:?}");
    }
    assert!(
        !names.contains(&"callfleet.fleet.v1.Fleet"),
        "only what this server serves: {names:?}"
    );

    let answer = ask(MessageRequest::FileContainingSymbol(
        "callfleet.lock.v1.Locks".into(),
    ))
    .await;
    let MessageResponse::FileDescriptorResponse(files) = answer else {
        panic!("the file declaring Locks, got {answer:?}");
    };
    let files: Vec<FileDescriptor> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost::Message::decode(bytes.as_slice()).expect("a FileDescriptorProto"))
        .collect();
    let locks = files
        .iter()
        .find(|file| file.package == "callfleet.lock.v1")
        .unwrap_or_else(|| panic!("no callfleet.lock.v1 file in {files:?}"));
    assert_eq!(locks.name, "callfleet/lock/v1/lock.proto");
    assert!(
        locks.service.iter().any(|service| service.name == "Locks"),
        "{locks:?}"
    );
    server.stop().await;
}

/// Connections are dealt to the service's connection threads in turn: with more
/// connections than threads every one is served, all see one set of leases, and a stop
/// ends the service with clients still connected and closes the port.
#[tokio::test]
async fn connections_on_every_thread_share_the_leases_and_a_stop_closes_them() {
    let server = Server::start().await;
    let threads = std::thread::available_parallelism().map_or(2, usize::from);
    let mut clients = Vec::new();
    for _ in 0..2 * threads + 1 {
        clients.push(server.grpc().await);
    }
    let acquire = |holder: usize| pb::AcquireRequest {
        resource: "agent:7".into(),
        holder: format!("pbx-{holder}/c"),
        attempt: format!("a{holder}"),
        validity_ms: 5_000,
    };
    let lease = clients[0]
        .acquire(acquire(0))
        .await
        .expect("the first claim is granted")
        .into_inner();
    for (holder, client) in clients.iter_mut().enumerate().skip(1) {
        let refused = client
            .acquire(acquire(holder))
            .await
            .expect_err("held by pbx-0");
        assert_eq!(refused.code(), Code::AlreadyExists, "connection {holder}");
    }
    clients[2 * threads]
        .release(pb::ReleaseRequest {
            resource: "agent:7".into(),
            holder: "pbx-0/c".into(),
            token: lease.token,
        })
        .await
        .expect("released through another connection");
    assert_eq!(
        clients[1]
            .get(pb::GetRequest {
                resource: "agent:7".into()
            })
            .await
            .expect("get")
            .into_inner()
            .lease,
        None
    );

    // A kept-alive HTTP/1 connection, idle when the stop comes.
    let address = server.address;
    let mut idle = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    idle.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("write");
    let mut head = [0; 12];
    idle.read_exact(&mut head).await.expect("an answer");
    assert_eq!(&head, b"HTTP/1.1 200");

    server.stop().await;
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "the port is closed"
    );
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest))
        .await
        .expect("the idle connection is closed")
        .expect("read");
    let after = clients[0]
        .get(pb::GetRequest {
            resource: "agent:7".into(),
        })
        .await
        .expect_err("the service is gone");
    assert_eq!(after.code(), Code::Unavailable);
}
