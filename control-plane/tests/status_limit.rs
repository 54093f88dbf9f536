//! The public queue status's rate limit on all three faces, as clients on the network meet
//! it: the whole service (`callfleet_control_plane::run` on SQLite) on a loopback port,
//! REST and XML-RPC spoken with raw HTTP/1 bytes, gRPC with a tonic client over HTTP/2.
//!
//! The status is public on every face (REST `GET /api/v1/queues/{queue}/status`, XML-RPC
//! `queue.status`, gRPC `QueueStatus`), so each must take from the same bucket per client
//! address; otherwise a poller gets three times the rate by switching API, and one
//! `system.multicall` of a thousand `queue.status` entries is a thousand probes for the
//! price of one request.
//!
//! - XML-RPC answers exactly `status_burst` calls, then a fault 429 (the service's faults
//!   carry the HTTP status, as REST answers 429);
//! - in a multicall each `queue.status` entry counts: the first `status_burst` are answered
//!   and the rest get the fault, while other methods in the batch still run;
//! - gRPC answers exactly `status_burst` calls, then `RESOURCE_EXHAUSTED` with the wait in
//!   the message and in `retry-after` metadata;
//! - half the burst over REST and half over gRPC leave nothing for XML-RPC;
//! - another address (127.0.0.2) has its own bucket on every face.
//!
//! The rate is one request per 10 s after a burst of 8, so no token comes back while a
//! test runs.

mod support;

use callfleet_control_plane::xmlrpc::{Fault, Value};
use callfleet_core::config::ControlPlaneConfig;
use callfleet_proto::control::v1 as pb;
use callfleet_proto::control::v1::control_client::ControlClient;
use support::{REST_STATUS, Server, connect_from, crm_token, exchange};
use tokio::net::TcpStream;
use tonic::transport::Channel;

/// Write token of a CRM.
const CRM: &str = "crm-status-limit-secret-0123456789";
/// The burst every test uses.
const BURST: u32 = 8;
/// What every limited answer says.
const LIMITED: &str = "too many queue status requests";

fn config() -> ControlPlaneConfig {
    ControlPlaneConfig {
        tokens: vec![crm_token(CRM)],
        // One request every 10 s after the burst: none comes back during a test.
        status_rate: 0.1,
        status_burst: BURST,
        ..ControlPlaneConfig::default()
    }
}

/// The server with the queue `sales`, written from 127.0.0.9, an address no test asks the
/// status from.
async fn start() -> Server {
    Server::start(config(), CRM, "127.0.0.9").await
}

impl Server {
    /// A gRPC channel from the loopback address `from`.
    async fn grpc_from(&self, from: &str) -> ControlClient<Channel> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.address))
            .expect("endpoint")
            .local_address(Some(from.parse().expect("loopback address")))
            .connect()
            .await
            .expect("connect over HTTP/2");
        ControlClient::new(channel)
    }
}

/// `queue.status("sales")` as Python's `xmlrpc.client` writes it.
const XMLRPC_STATUS: &str = "<?xml version='1.0'?>\n<methodCall>\n<methodName>queue.status</methodName>\n<params>\n<param>\n<value><string>sales</string></value>\n</param>\n</params>\n</methodCall>\n";

/// Posts an XML-RPC `body` to `/RPC2` (with `token`, if any) and decodes the answer.
async fn xmlrpc(stream: &mut TcpStream, token: Option<&str>, body: &str) -> Result<Value, Fault> {
    let authorization = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let answer = exchange(
        stream,
        &format!(
            "POST /RPC2 HTTP/1.1\r\nHost: cp\r\nContent-Type: text/xml\r\n{authorization}Content-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert_eq!(answer.status, 200, "XML-RPC answers 200: {}", answer.body);
    let text = answer.body;
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

/// Checks that `value` is the status of the queue `sales`.
fn is_sales_status(value: &Value, what: &str) {
    let Value::Struct(members) = value else {
        panic!("{what}: a struct, got {value:?}");
    };
    assert_eq!(
        members.get("queue"),
        Some(&Value::String("sales".to_owned())),
        "{what}: {value:?}"
    );
}

/// Checks that `result` is the rate limit's fault: code 429 and a message saying when to
/// retry.
fn is_limited(result: &Result<Value, Fault>, what: &str) {
    let fault = match result {
        Ok(value) => panic!("{what}: expected fault 429, got {value:?}"),
        Err(fault) => fault,
    };
    assert_eq!(fault.code(), 429, "{what}: {}", fault.string());
    assert!(
        fault.string().contains(LIMITED) && fault.string().contains("retry after 10 s"),
        "{what}: {}",
        fault.string()
    );
}

fn sales() -> pb::QueueRef {
    pb::QueueRef {
        queue: "sales".into(),
    }
}

/// Checks that a gRPC answer is the rate limit's `RESOURCE_EXHAUSTED`.
fn is_exhausted(
    result: Result<tonic::Response<pb::QueueStatusResponse>, tonic::Status>,
    what: &str,
) {
    let status = match result {
        Ok(answer) => panic!("{what}: expected RESOURCE_EXHAUSTED, got {answer:?}"),
        Err(status) => status,
    };
    assert_eq!(
        status.code(),
        tonic::Code::ResourceExhausted,
        "{what}: {status:?}"
    );
    assert!(
        status.message().contains(LIMITED) && status.message().contains("retry after 10 s"),
        "{what}: {}",
        status.message()
    );
    assert_eq!(
        status
            .metadata()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("10"),
        "{what}: {status:?}"
    );
}

#[tokio::test]
async fn xmlrpc_queue_status_answers_the_burst_then_a_429_fault_per_address() {
    let server = start().await;
    let mut client = connect_from("127.0.0.1", server.address).await;
    for i in 1..=BURST {
        let answer = xmlrpc(&mut client, None, XMLRPC_STATUS).await;
        match answer {
            Ok(value) => is_sales_status(&value, &format!("call {i}")),
            Err(fault) => panic!("call {i}: fault {}: {}", fault.code(), fault.string()),
        }
    }
    let limited = xmlrpc(&mut client, None, XMLRPC_STATUS).await;
    is_limited(&limited, &format!("call {} from 127.0.0.1", BURST + 1));
    // A token does not lift the limit, as over REST.
    let limited = xmlrpc(&mut client, Some(CRM), XMLRPC_STATUS).await;
    is_limited(&limited, "a call with a token from 127.0.0.1");

    // Another address has its own bucket.
    let mut other = connect_from("127.0.0.2", server.address).await;
    let answer = xmlrpc(&mut other, None, XMLRPC_STATUS).await;
    is_sales_status(
        &answer.unwrap_or_else(|fault| panic!("127.0.0.2: {}", fault.string())),
        "127.0.0.2",
    );
    server.stop().await;
}

#[tokio::test]
async fn each_queue_status_in_a_multicall_counts_as_one_request() {
    let server = start().await;
    let entry = "<value><struct><member><name>methodName</name><value><string>queue.status</string></value></member><member><name>params</name><value><array><data><value><string>sales</string></value></data></array></value></member></struct></value>";
    let list_methods = "<value><struct><member><name>methodName</name><value><string>system.listMethods</string></value></member><member><name>params</name><value><array><data></data></array></value></member></struct></value>";
    let calls = BURST as usize + 3;
    // The status entries, then one call of another method.
    let body = format!(
        "<?xml version=\"1.0\"?><methodCall><methodName>system.multicall</methodName><params><param><value><array><data>{}{list_methods}</data></array></value></param></params></methodCall>",
        entry.repeat(calls)
    );
    let mut client = connect_from("127.0.0.3", server.address).await;
    let answer = xmlrpc(&mut client, None, &body)
        .await
        .unwrap_or_else(|fault| {
            panic!("the multicall: fault {}: {}", fault.code(), fault.string())
        });
    let Value::Array(results) = answer else {
        panic!("an array of results: {answer:?}");
    };
    assert_eq!(results.len(), calls + 1, "{results:?}");
    for (i, result) in results[..calls].iter().enumerate() {
        let what = format!("entry {}", i + 1);
        if i < BURST as usize {
            // An answered entry is an array of one value.
            let Value::Array(value) = result else {
                panic!("{what}: an answer, got {result:?}");
            };
            is_sales_status(&value[0], &what);
        } else {
            let Value::Struct(fault) = result else {
                panic!("{what}: a fault struct, got {result:?}");
            };
            let code = fault.get("faultCode");
            let string = fault.get("faultString");
            assert_eq!(code, Some(&Value::Integer(429)), "{what}: {string:?}");
            let Some(Value::String(string)) = string else {
                panic!("{what}: a faultString: {fault:?}");
            };
            assert!(string.contains(LIMITED), "{what}: {string}");
        }
    }
    // Only the status is limited: the batch's other call runs.
    assert!(
        matches!(&results[calls], Value::Array(value) if matches!(value[0], Value::Array(_))),
        "system.listMethods after the limited entries: {:?}",
        results[calls]
    );
    // The bucket is spent for single calls too.
    is_limited(
        &xmlrpc(&mut client, None, XMLRPC_STATUS).await,
        "a single call after the multicall",
    );
    server.stop().await;
}

#[tokio::test]
async fn grpc_queue_status_answers_the_burst_then_resource_exhausted_per_address() {
    let server = start().await;
    let mut client = server.grpc_from("127.0.0.1").await;
    for i in 1..=BURST {
        let answer = client
            .queue_status(sales())
            .await
            .unwrap_or_else(|status| panic!("call {i}: {status:?}"))
            .into_inner();
        assert_eq!(answer.queue, "sales", "call {i}");
    }
    is_exhausted(
        client.queue_status(sales()).await,
        &format!("call {} from 127.0.0.1", BURST + 1),
    );

    // Another address has its own bucket.
    let mut other = server.grpc_from("127.0.0.2").await;
    let answer = other
        .queue_status(sales())
        .await
        .unwrap_or_else(|status| panic!("127.0.0.2: {status:?}"))
        .into_inner();
    assert_eq!(answer.queue, "sales");
    drop((client, other));
    server.stop().await;
}

#[tokio::test]
async fn rest_grpc_and_xmlrpc_take_from_one_bucket_per_address() {
    let server = start().await;
    let half = BURST / 2;
    let mut rest = connect_from("127.0.0.1", server.address).await;
    for i in 1..=half {
        let answer = exchange(&mut rest, REST_STATUS).await;
        assert_eq!(answer.status, 200, "REST request {i}: {}", answer.body);
    }
    let mut grpc = server.grpc_from("127.0.0.1").await;
    for i in 1..=BURST - half {
        grpc.queue_status(sales())
            .await
            .unwrap_or_else(|status| panic!("gRPC call {i} after {half} over REST: {status:?}"));
    }
    let mut rpc = connect_from("127.0.0.1", server.address).await;
    is_limited(
        &xmlrpc(&mut rpc, None, XMLRPC_STATUS).await,
        &format!(
            "XML-RPC after {half} over REST and {} over gRPC",
            BURST - half
        ),
    );
    // And the other two faces are limited as well.
    is_exhausted(grpc.queue_status(sales()).await, "gRPC after the burst");
    let answer = exchange(&mut rest, REST_STATUS).await;
    assert_eq!(answer.status, 429, "REST after the burst: {}", answer.body);
    assert_eq!(answer.header("retry-after"), Some("10"));

    // 127.0.0.2 is answered on every face.
    let mut other = connect_from("127.0.0.2", server.address).await;
    let answer = exchange(&mut other, REST_STATUS).await;
    assert_eq!(answer.status, 200, "REST from 127.0.0.2: {}", answer.body);
    let answer = xmlrpc(&mut other, None, XMLRPC_STATUS).await;
    is_sales_status(
        &answer.unwrap_or_else(|fault| panic!("XML-RPC from 127.0.0.2: {}", fault.string())),
        "XML-RPC from 127.0.0.2",
    );
    let mut other_grpc = server.grpc_from("127.0.0.2").await;
    other_grpc
        .queue_status(sales())
        .await
        .unwrap_or_else(|status| panic!("gRPC from 127.0.0.2: {status:?}"));
    drop((grpc, other_grpc));
    server.stop().await;
}
