//! The role matrix of gRPC `callfleet.control.v1.Control`: every method × every kind of
//! caller (no token, a token of no one, `node`, `read`, `write`, `admin`), with the exact
//! outcome: OK, `UNAUTHENTICATED` or `PERMISSION_DENIED`. A call that runs writes exactly
//! its audit row under the token's name; a refused one writes nothing.
//!
//! The methods come from the server: the service descriptor that its reflection serves
//! must list exactly the rows of [`rows`], so a method added to the proto without a row
//! fails here. Calls go through a tonic client to the router served on `127.0.0.1:0`, on
//! SQLite.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use callfleet_control_plane::{Control, router};
use callfleet_core::config::{ApiToken, ControlPlaneConfig, Role, Secret};
use callfleet_core::store::{Agent, Device, Queue};
use callfleet_core::{Heartbeat, NodeId, NodeRole, PoolName, Store, testing};
use callfleet_proto::control::v1 as pb;
use callfleet_proto::control::v1::control_client::ControlClient;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

mod roles;

use roles::*;

const SERVICE: &str = "callfleet.control.v1.Control";

/// The matrix: for each access, the status code for each of [`CALLERS`] in order (no
/// token, unknown token, node, read, write, admin).
const MATRIX: [(Access, [Code; 6]); 5] = {
    use Code::{Ok as R, PermissionDenied as F, Unauthenticated as U};
    [
        (Access::Public, [R, R, R, R, R, R]),
        (Access::Read, [U, U, F, R, R, R]),
        (Access::ReadOrNode, [U, U, R, R, R, R]),
        (Access::Write, [U, U, F, F, R, R]),
        (Access::Admin, [U, U, F, F, F, R]),
    ]
};

fn expected(access: Access, caller: Caller) -> Code {
    let column = CALLERS.iter().position(|c| *c == caller).expect("a caller");
    MATRIX
        .iter()
        .find(|(a, _)| *a == access)
        .expect("a matrix row")
        .1[column]
}

/// What must exist before each call of a row, so that every allowed call succeeds.
#[derive(Debug, Clone, Copy)]
enum Prepare {
    Nothing,
    Agent(&'static str),
    Device(&'static str),
    Queue(&'static str),
    Member {
        queue: &'static str,
        agent: &'static str,
    },
}

type Reply = Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>>;
type Call = Box<dyn Fn(ControlClient<Channel>, Option<&'static str>) -> Reply>;

/// A call of `$method` with `$message` (built anew for every call).
macro_rules! call {
    ($method:ident, $message:expr) => {
        Box::new(
            |mut client: ControlClient<Channel>, token: Option<&'static str>| -> Reply {
                Box::pin(async move { client.$method(with_token(token, $message)).await.map(drop) })
            },
        ) as Call
    };
}

/// One method: its name in the service, what it needs, what must exist before it, the
/// call, and the action of the one audit row a run writes (none: a read).
struct Row {
    name: &'static str,
    access: Access,
    prepare: Prepare,
    call: Call,
    audit: Option<&'static str>,
}

fn rows() -> Vec<Row> {
    let row = |name, access, prepare, call, audit| Row {
        name,
        access,
        prepare,
        call,
        audit,
    };
    fn agent(id: &str) -> pb::AgentRef {
        pb::AgentRef { agent: id.into() }
    }
    let nothing = Prepare::Nothing;
    vec![
        row(
            "ListAgents",
            Access::Read,
            nothing,
            call!(list_agents, pb::ListAgentsRequest {}),
            None,
        ),
        row(
            "GetAgent",
            Access::Read,
            nothing,
            call!(get_agent, agent("1001")),
            None,
        ),
        row(
            "PutAgent",
            Access::Write,
            nothing,
            call!(
                put_agent,
                pb::Agent {
                    id: "1003".into(),
                    name: "Carol".into(),
                    enabled: Some(true),
                    ..Default::default()
                }
            ),
            Some("agent.upsert"),
        ),
        row(
            "DeleteAgent",
            Access::Write,
            Prepare::Agent("1009"),
            call!(delete_agent, agent("1009")),
            Some("agent.delete"),
        ),
        row(
            "SetTags",
            Access::Write,
            nothing,
            call!(
                set_tags,
                pb::SetTagsRequest {
                    agent: "1001".into(),
                    tags: vec!["vip".into()],
                }
            ),
            Some("agent.set_tags"),
        ),
        row(
            "SetDailyCap",
            Access::Write,
            nothing,
            call!(
                set_daily_cap,
                pb::SetDailyCapRequest {
                    agent: "1001".into(),
                    daily_cap: Some(10),
                }
            ),
            Some("agent.set_daily_cap"),
        ),
        row(
            "RecordSale",
            Access::Write,
            nothing,
            call!(
                record_sale,
                pb::RecordSaleRequest {
                    agent: "1002".into(),
                    request_id: String::new(),
                }
            ),
            Some("agent.record_sale"),
        ),
        row(
            "Login",
            Access::Write,
            nothing,
            call!(
                login,
                pb::LoginRequest {
                    agent: "1001".into(),
                    device: "2001".into(),
                }
            ),
            Some("agent.login"),
        ),
        row(
            "Logout",
            Access::Write,
            nothing,
            call!(logout, agent("1002")),
            Some("agent.logout"),
        ),
        row(
            "Pause",
            Access::Write,
            nothing,
            call!(
                pause,
                pb::PauseRequest {
                    agent: "1002".into(),
                    reason: "lunch".into(),
                }
            ),
            Some("agent.pause"),
        ),
        row(
            "Unpause",
            Access::Write,
            nothing,
            call!(unpause, agent("1002")),
            Some("agent.unpause"),
        ),
        row(
            "ListDevices",
            Access::Read,
            nothing,
            call!(list_devices, pb::Empty {}),
            None,
        ),
        row(
            "PutDevice",
            Access::Write,
            nothing,
            call!(
                put_device,
                pb::Device {
                    id: "2003".into(),
                    endpoint: "PJSIP/2003".into(),
                    ..Default::default()
                }
            ),
            Some("device.upsert"),
        ),
        row(
            "DeleteDevice",
            Access::Write,
            Prepare::Device("2009"),
            call!(
                delete_device,
                pb::DeviceRef {
                    device: "2009".into()
                }
            ),
            Some("device.delete"),
        ),
        row(
            "ListQueues",
            Access::Read,
            nothing,
            call!(list_queues, pb::Empty {}),
            None,
        ),
        row(
            "PutQueue",
            Access::Write,
            nothing,
            call!(
                put_queue,
                pb::Queue {
                    id: "support".into(),
                    name: "Support".into(),
                    service_level_ms: None,
                }
            ),
            Some("queue.upsert"),
        ),
        row(
            "DeleteQueue",
            Access::Write,
            Prepare::Queue("q9"),
            call!(delete_queue, pb::QueueRef { queue: "q9".into() }),
            Some("queue.delete"),
        ),
        row(
            "ListMembers",
            Access::Read,
            nothing,
            call!(
                list_members,
                pb::QueueRef {
                    queue: "sales".into()
                }
            ),
            None,
        ),
        row(
            "SetPriority",
            Access::Write,
            nothing,
            call!(
                set_priority,
                pb::SetPriorityRequest {
                    agent: "1001".into(),
                    queue: "sales".into(),
                    priority: 1,
                }
            ),
            Some("agent.set_priority"),
        ),
        row(
            "RemoveMember",
            Access::Write,
            Prepare::Member {
                queue: "sales",
                agent: "1002",
            },
            call!(
                remove_member,
                pb::MemberRef {
                    queue: "sales".into(),
                    agent: "1002".into(),
                }
            ),
            Some("agent.remove_from_queue"),
        ),
        row(
            "QueueStatus",
            Access::Public,
            nothing,
            call!(
                queue_status,
                pb::QueueRef {
                    queue: "sales".into()
                }
            ),
            None,
        ),
        row(
            "Candidates",
            Access::ReadOrNode,
            nothing,
            call!(
                candidates,
                pb::CandidatesRequest {
                    queue: "sales".into(),
                    attributes: Vec::new(),
                }
            ),
            None,
        ),
        row(
            "SetCallerAttributes",
            Access::Write,
            nothing,
            call!(
                set_caller_attributes,
                pb::SetCallerAttributesRequest {
                    number: "+4930123456".into(),
                    attributes: vec!["vip".into()],
                }
            ),
            Some("caller.set_attributes"),
        ),
        row(
            "RemoveCaller",
            Access::Write,
            nothing,
            call!(
                remove_caller,
                pb::CallerRef {
                    number: "+4930999".into()
                }
            ),
            Some("caller.remove"),
        ),
        row(
            "GetCallerAttributes",
            Access::ReadOrNode,
            nothing,
            call!(
                get_caller_attributes,
                pb::CallerRef {
                    number: "+4930123456".into()
                }
            ),
            None,
        ),
        row(
            "ListCallers",
            Access::Read,
            nothing,
            call!(
                list_callers,
                pb::ListCallersRequest {
                    limit: 10,
                    after: String::new(),
                }
            ),
            None,
        ),
        row(
            "ListNodes",
            Access::Read,
            nothing,
            call!(list_nodes, pb::Empty {}),
            None,
        ),
        row(
            "Drain",
            Access::Admin,
            nothing,
            call!(
                drain,
                pb::NodeRef {
                    node: "core-1".into()
                }
            ),
            Some("node.drain"),
        ),
        row(
            "Undrain",
            Access::Admin,
            nothing,
            call!(
                undrain,
                pb::NodeRef {
                    node: "core-1".into()
                }
            ),
            Some("node.undrain"),
        ),
        row(
            "GetAutoscaler",
            Access::Read,
            nothing,
            call!(get_autoscaler, pb::Empty {}),
            None,
        ),
        row(
            "SetAutoscaler",
            Access::Admin,
            nothing,
            call!(
                set_autoscaler,
                pb::ScalerSteering {
                    paused: false,
                    min_extra: 1,
                    max_extra: Some(2),
                }
            ),
            Some("autoscaler.set"),
        ),
        row(
            "ListAudit",
            Access::Read,
            nothing,
            call!(
                list_audit,
                pb::ListAuditRequest {
                    limit: 10,
                    before: 0,
                }
            ),
            None,
        ),
    ]
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

async fn prepare(store: &Store, prepare: Prepare) {
    match prepare {
        Prepare::Nothing => {}
        Prepare::Agent(id) => store
            .upsert_agent(
                &Agent {
                    id: id.into(),
                    name: format!("Agent {id}"),
                    tags: Default::default(),
                    daily_cap: None,
                    enabled: true,
                },
                "setup",
            )
            .await
            .expect("agent"),
        Prepare::Device(id) => store
            .upsert_device(
                &Device {
                    id: id.into(),
                    endpoint: format!("PJSIP/{id}"),
                    name: None,
                    contact: None,
                    registers: false,
                },
                "setup",
            )
            .await
            .expect("device"),
        Prepare::Queue(id) => store
            .upsert_queue(
                &Queue {
                    id: id.into(),
                    name: format!("Queue {id}"),
                    service_level_ms: 20_000,
                },
                "setup",
            )
            .await
            .expect("queue"),
        Prepare::Member { queue, agent } => store
            .set_priority(queue, agent, 5, "setup")
            .await
            .expect("member"),
    }
}

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

async fn start() -> (Store, Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let store = Store::connect(&testing::sqlite_config(dir.path()))
        .await
        .expect("open the SQLite store");
    prepare(&store, Prepare::Queue("sales")).await;
    for n in 1..=2 {
        prepare(&store, Prepare::Device(["2001", "2002"][n - 1])).await;
        prepare(&store, Prepare::Agent(["1001", "1002"][n - 1])).await;
    }
    prepare(
        &store,
        Prepare::Member {
            queue: "sales",
            agent: "1001",
        },
    )
    .await;
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
    let server = Server::start(control).await;
    (store, server, dir)
}

// ---- the service descriptor, read with a minimal protobuf wire reader -------------------

fn varint(bytes: &mut &[u8]) -> u64 {
    let mut value = 0;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first().expect("a complete varint");
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return value;
        }
    }
    panic!("a varint longer than 64 bits")
}

/// The length-delimited fields numbered `number` of a protobuf message, in order.
fn fields(mut bytes: &[u8], number: u64) -> Vec<&[u8]> {
    let mut found = Vec::new();
    while !bytes.is_empty() {
        let key = varint(&mut bytes);
        match key & 7 {
            0 => {
                varint(&mut bytes);
            }
            1 => bytes = &bytes[8..],
            2 => {
                let len = usize::try_from(varint(&mut bytes)).expect("a length");
                let (value, rest) = bytes.split_at(len);
                if key >> 3 == number {
                    found.push(value);
                }
                bytes = rest;
            }
            5 => bytes = &bytes[4..],
            other => panic!("wire type {other} in a descriptor"),
        }
    }
    found
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("a UTF-8 name")
}

/// The methods of [`SERVICE`], as the server's reflection describes them.
async fn methods_served(channel: Channel) -> BTreeSet<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(SERVICE.into())),
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
    let Some(MessageResponse::FileDescriptorResponse(files)) = answer.message_response else {
        panic!("FileContainingSymbol gets files, got {answer:?}");
    };
    let (package, service) = SERVICE.rsplit_once('.').expect("package.Service");
    let mut methods = None;
    // FileDescriptorProto: package = 2, service = 6; ServiceDescriptorProto: name = 1,
    // method = 2; MethodDescriptorProto: name = 1.
    for file in &files.file_descriptor_proto {
        if fields(file, 2).first().map(|p| text(p)).as_deref() != Some(package) {
            continue;
        }
        for described in fields(file, 6) {
            if fields(described, 1).first().map(|n| text(n)).as_deref() == Some(service) {
                let names: BTreeSet<String> = fields(described, 2)
                    .into_iter()
                    .map(|method| text(fields(method, 1)[0]))
                    .collect();
                assert!(
                    methods.replace(names).is_none(),
                    "{SERVICE} described twice"
                );
            }
        }
    }
    methods.unwrap_or_else(|| panic!("reflection does not describe {SERVICE}"))
}

async fn last_audit_id(store: &Store) -> i64 {
    store
        .list_audit(1, None)
        .await
        .expect("audit")
        .first()
        .map_or(0, |row| row.id)
}

/// The audit rows (actor, action) written after `after` (an id), oldest first.
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

#[tokio::test]
async fn every_grpc_method_answers_every_role_as_the_matrix_says() {
    let (store, server, _dir) = start().await;
    let channel = server.channel().await;
    let rows = rows();
    let in_matrix: BTreeSet<String> = rows.iter().map(|row| row.name.to_owned()).collect();
    assert_eq!(in_matrix.len(), rows.len(), "a method has two rows");
    assert_eq!(
        methods_served(channel.clone()).await,
        in_matrix,
        "the methods {SERVICE} serves against the matrix"
    );

    for row in &rows {
        for caller in CALLERS {
            prepare(&store, row.prepare).await;
            let expect = expected(row.access, caller);
            let asked = format!("{} as {caller:?}", row.name);
            let before = last_audit_id(&store).await;
            let answer = (row.call)(ControlClient::new(channel.clone()), caller.token()).await;
            match (&answer, expect) {
                (Ok(()), Code::Ok) => {}
                (Err(status), code) if status.code() == code => {
                    let message = status.message();
                    for secret in [ADMIN, CRM, WALLBOARD, NODE, UNKNOWN] {
                        assert!(!message.contains(secret), "{asked}: shows a token");
                    }
                    let says = match (code, caller) {
                        (Code::Unauthenticated, Caller::Anonymous) => "needs a token".to_owned(),
                        (Code::Unauthenticated, _) => "not known".to_owned(),
                        _ => format!("`{}`", caller.name().expect("a named token")),
                    };
                    assert!(message.contains(&says), "{asked}: `{message}`");
                }
                (answer, expect) => {
                    panic!("{asked}: expected {expect:?}, got {answer:?}")
                }
            }
            let expected_rows = match (expect, row.audit, caller.name()) {
                (Code::Ok, Some(action), Some(name)) => {
                    vec![(name.to_owned(), action.to_owned())]
                }
                (Code::Ok, Some(action), None) => panic!("{action} ran without a token"),
                _ => Vec::new(),
            };
            assert_eq!(
                audit_after(&store, before).await,
                expected_rows,
                "{asked}: audit rows"
            );
        }
    }

    drop(channel);
    server.stop().await;
}
