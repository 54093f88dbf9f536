//! What the network tests of the lock service share: the whole service
//! (`callfleet_lock_service::run`) on a loopback port, a gRPC client for it, and a raw
//! HTTP/1.1 exchange for its HTTP twin.
//!
//! Each test file keeps the exact bytes of its own HTTP requests (the HTTP twin is what a
//! dialplan's `CURL()` calls, and the tests speak bytes to see what it sees) and sends them
//! with [`Server::exchange`].
//!
//! Each test crate compiles its own copy of this module (`mod support;`), so an item here
//! that one of them does not use warns there as dead code: what only one test file needs
//! stays in that file.

use std::net::SocketAddr;
use std::time::Duration;

use callfleet_core::config::{LockServiceConfig, UnsafeLockSwitches};
use callfleet_proto::lock::v1::locks_client::LocksClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// The lock service, served by `run` on a loopback port until [`Server::stop`]; dropped
/// without it, the service runs on until the test's runtime ends.
pub struct Server {
    pub address: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Server {
    /// A memory-backed service that grants leases at once (the startup quarantine has
    /// tests of its own).
    pub async fn start() -> Self {
        Self::start_with(LockServiceConfig {
            unsafe_for_tests: UnsafeLockSwitches {
                no_startup_quarantine: true,
                ..UnsafeLockSwitches::default()
            },
            ..LockServiceConfig::default()
        })
        .await
    }

    /// The service with `config`; the task panics if `run` fails.
    pub async fn start_with(config: LockServiceConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            callfleet_lock_service::run(&config, listener, token)
                .await
                .expect("lock service runs");
        });
        Self {
            address,
            shutdown,
            task,
        }
    }

    /// A gRPC client connected to the service.
    pub async fn grpc(&self) -> LocksClient<Channel> {
        let channel = Endpoint::from_shared(format!("http://{}", self.address))
            .expect("endpoint")
            .connect()
            .await
            .expect("grpc connects");
        LocksClient::new(channel)
    }

    /// Sends the raw HTTP/1.1 `request` (which must ask for `Connection: close`) on a new
    /// connection and returns the answer's (status, body).
    #[allow(dead_code)] // Not every test crate speaks to the HTTP twin.
    pub async fn exchange(&self, request: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(self.address).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let status = response[9..12].parse().expect("status code");
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .expect("a body");
        (status, body)
    }

    /// Cancels the service and checks that its task ends, without a panic, within 5 s.
    #[allow(dead_code)] // Not every test crate stops its service: some leave it to the runtime.
    pub async fn stop(self) {
        self.stop_within(Duration::from_secs(5)).await;
    }

    /// Cancels the service and checks that its task ends, without a panic, within `limit`.
    #[allow(dead_code)] // Not every test crate stops its service: some leave it to the runtime.
    pub async fn stop_within(self, limit: Duration) {
        self.shutdown.cancel();
        tokio::time::timeout(limit, self.task)
            .await
            .expect("stops in time")
            .expect("no panic");
    }
}
