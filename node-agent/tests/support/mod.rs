//! What the node-agent's tests against the real control plane share: its config with a
//! CRM's write token and a node's token, the control plane itself
//! (`callfleet_control_plane::run`) on a SQLite store in a temporary folder on a loopback
//! port, and REST calls to it.
//!
//! Each test crate compiles its own copy of this module (`mod support;`), so an item here
//! that one of them does not use warns there as dead code: what only one test file needs
//! stays in that file.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{Method, Request, StatusCode, header};
use bytes::Bytes;
use callfleet_core::Store;
use callfleet_core::config::{ApiToken, ControlPlaneConfig, Role, Secret, StoreConfig};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The CRM's write token, named `crm`.
pub const CRM: &str = "crm-secret-0123456789abcdef";
/// The node-agent's token, named `node:pbx-1`.
pub const NODE: &str = "node-secret-0123456789abcdef";

/// The control plane's config: its defaults with the tokens [`CRM`] and [`NODE`].
pub fn control_config() -> ControlPlaneConfig {
    let token = |name: &str, secret: &str, role| ApiToken {
        name: name.to_owned(),
        token: Secret::new(secret),
        role,
    };
    ControlPlaneConfig {
        tokens: vec![
            token("crm", CRM, Role::Write),
            token("node:pbx-1", NODE, Role::Node),
        ],
        ..ControlPlaneConfig::default()
    }
}

/// The SQLite store in `dir`, kept across restarts of the control plane.
pub async fn store(dir: &tempfile::TempDir) -> Store {
    Store::connect(&StoreConfig {
        url: format!("sqlite://{}/fleet.db", dir.path().display()),
        ..StoreConfig::default()
    })
    .await
    .expect("sqlite store")
}

/// The control plane on a loopback port, on a SQLite store kept across restarts.
pub struct Plane {
    pub address: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    dir: tempfile::TempDir,
}

impl Plane {
    /// `callfleet_control_plane::run` on a new store and a free port.
    pub async fn run() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::run_in(dir, "127.0.0.1:0").await
    }

    /// `callfleet_control_plane::run` on the store in `dir`, bound to `address` (a restart).
    pub async fn run_in(dir: tempfile::TempDir, address: &str) -> Self {
        let store = store(&dir).await;
        Self::serve(dir, address, move |listener, token| async move {
            callfleet_control_plane::run(&control_config(), store, listener, token)
                .await
                .expect("run ends cleanly");
        })
        .await
    }

    /// Binds `address` and spawns `serve` on its listener with the token that stops it;
    /// `dir` holds its store.
    pub async fn serve<F, Fut>(dir: tempfile::TempDir, address: &str, serve: F) -> Self
    where
        F: FnOnce(TcpListener, CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind(address).await.expect("bind");
        let address = listener.local_addr().expect("address");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, shutdown.clone()));
        Self {
            address,
            shutdown,
            task,
            dir,
        }
    }

    /// Its base URL, `http://address`.
    #[allow(dead_code)] // Not every test crate makes its client from a URL of its own.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Stops the control plane; returns its store's folder and address for a restart.
    pub async fn stop(self) -> (tempfile::TempDir, SocketAddr) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("stops within 10 s")
            .expect("server task");
        (self.dir, self.address)
    }
}

/// A REST call with `token`: the status and the JSON body (`null` when empty).
pub async fn rest(
    plane: SocketAddr,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{plane}/api/v1{path}"))
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .expect("request");
    let answer = client.request(request).await.expect("an answer");
    let status = answer.status();
    let bytes = answer.into_body().collect().await.expect("body").to_bytes();
    let json = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("a JSON body")
    };
    (status, json)
}

/// A REST call with the CRM's token; panics unless it succeeds. The JSON body.
#[allow(dead_code)] // Not every test crate calls as the CRM without looking at the status.
pub async fn crm(plane: SocketAddr, method: Method, path: &str, body: Option<Value>) -> Value {
    let (status, json) = rest(plane, method.clone(), path, CRM, body).await;
    assert!(status.is_success(), "{method} {path}: {status} {json}");
    json
}
