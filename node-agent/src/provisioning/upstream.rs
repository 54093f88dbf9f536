//! The control plane as the provisioning endpoint asks it: the same request, forwarded over
//! kept-alive HTTP/1.1 connections, bounded by a deadline. The queue-call flow's candidates
//! source ([`crate::queue::candidates`]) and caller directory ([`crate::queue::callers`]) ask
//! through the same client ([`Upstream::get`]).

use std::fmt;
use std::time::Duration;

use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderValue, Method, Request, StatusCode, Uri};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use super::{Family, ProvisioningError, operation_name};
use callfleet_core::realtime::Operation;

/// Largest answer taken from the control plane (the whole of `ps_contacts` of a big site
/// fits many times over); a bigger one is a failure rather than memory for the taking.
const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// How long an idle connection to the control plane is kept for the next request.
const IDLE_KEPT: Duration = Duration::from_secs(60);

/// Why the control plane gave no answer to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// It answered with another status than 200.
    Status(StatusCode),
    /// It refused the token (401/403).
    Refused(StatusCode),
    /// No connection, or the connection broke.
    Transport(String),
    /// No whole answer within the deadline.
    Timeout(Duration),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(status) => write!(f, "status {status}"),
            Self::Refused(status) => write!(f, "token refused with status {status}"),
            Self::Transport(error) => f.write_str(error),
            Self::Timeout(deadline) => write!(f, "no answer within {deadline:?}"),
        }
    }
}

/// The HTTP client of one control plane.
pub(crate) struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    /// `http://host:port`, no trailing slash.
    root: String,
    /// `http://host:port/asterisk/realtime`, no trailing slash.
    base: String,
    authorization: HeaderValue,
    deadline: Duration,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.base)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// A client of the control plane at `control_plane` (`http://host:port`).
    pub(crate) fn new(
        control_plane: &str,
        token: &str,
        deadline: Duration,
    ) -> Result<Self, ProvisioningError> {
        let url_error = |reason: &str| ProvisioningError::ControlPlaneUrl {
            url: control_plane.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = control_plane.parse().map_err(|_| url_error("not a URL"))?;
        if uri.scheme_str() != Some("http") {
            return Err(url_error("only plain http:// is spoken"));
        }
        if uri
            .path_and_query()
            .is_some_and(|path| path.query().is_some())
        {
            return Err(url_error("a base URL has no query"));
        }
        let mut authorization = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| ProvisioningError::Token)?;
        authorization.set_sensitive(true);
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(deadline));
        // Small request/answer exchanges: Nagle would hold a request for a delayed ACK.
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(IDLE_KEPT)
            .build(connector);
        let root = control_plane.trim_end_matches('/').to_owned();
        Ok(Self {
            client,
            base: format!("{root}/asterisk/realtime"),
            root,
            authorization,
            deadline,
        })
    }

    /// Sends Asterisk's request for `family` on to the control plane and returns the body
    /// of its 200 answer, or why there is none by `deadline_at`.
    pub(super) async fn send(
        &self,
        method: Method,
        family: Family,
        operation: Operation,
        query: &str,
        body: Bytes,
        deadline_at: Instant,
    ) -> Result<Bytes, Failure> {
        let mut uri = format!(
            "{}/{}/{}",
            self.base,
            family.name(),
            operation_name(operation)
        );
        if !query.is_empty() {
            uri.push('?');
            uri.push_str(query);
        }
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(AUTHORIZATION, self.authorization.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::new(body))
            .map_err(|err| Failure::Transport(format!("cannot build the request: {err}")))?;
        match self.exchange(request, deadline_at).await? {
            (StatusCode::OK, body) => Ok(body),
            (status @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN), _) => {
                Err(Failure::Refused(status))
            }
            (status, _) => Err(Failure::Status(status)),
        }
    }

    /// `GET` of `path_and_query` (from `/`) on the control plane: the status and body of
    /// its answer, whatever the status, or why there is none by `deadline_at`.
    pub(crate) async fn get(
        &self,
        path_and_query: &str,
        deadline_at: Instant,
    ) -> Result<(StatusCode, Bytes), Failure> {
        let request = Request::builder()
            .method(Method::GET)
            .uri(format!("{}{path_and_query}", self.root))
            .header(AUTHORIZATION, self.authorization.clone())
            .body(Full::new(Bytes::new()))
            .map_err(|err| Failure::Transport(format!("cannot build the request: {err}")))?;
        self.exchange(request, deadline_at).await
    }

    /// `POST` of the JSON `body` to `path` (from `/`) with an `Idempotency-Key`, so a retry
    /// after a lost answer counts once: the status and body of the answer, whatever the
    /// status, or why there is none by `deadline_at`.
    pub(crate) async fn post_json(
        &self,
        path: &str,
        body: Bytes,
        idempotency_key: &str,
        deadline_at: Instant,
    ) -> Result<(StatusCode, Bytes), Failure> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{path}", self.root))
            .header(AUTHORIZATION, self.authorization.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("idempotency-key", idempotency_key)
            .body(Full::new(body))
            .map_err(|err| Failure::Transport(format!("cannot build the request: {err}")))?;
        self.exchange(request, deadline_at).await
    }

    async fn exchange(
        &self,
        request: Request<Full<Bytes>>,
        deadline_at: Instant,
    ) -> Result<(StatusCode, Bytes), Failure> {
        let exchange = async {
            let answer = self
                .client
                .request(request)
                .await
                .map_err(|err| Failure::Transport(describe(&err)))?;
            let status = answer.status();
            // Read (and so free) the connection whatever the status, for the next request.
            let body = Limited::new(answer.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|err| Failure::Transport(format!("answer cut off: {err}")))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout_at(deadline_at, exchange)
            .await
            .unwrap_or(Err(Failure::Timeout(self.deadline)))
    }
}

/// The error with its causes (hyper's own message is only "client error (Connect)").
fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
