//! FastAGI scripts: what the node-agent does with a session, chosen by the path of its AGI
//! URL (`queue` in `agi://127.0.0.1:4573/queue?queue=sales`).
//!
//! A script is a [`Handler`] registered under its path in [`Scripts`] before the server
//! starts; it gets the [`Session`] and owns it until it returns, when the connection is
//! closed and Asterisk goes on with the dialplan. Any `async fn(Session) -> Result<(),
//! SessionError>` is a handler.
//!
//! A script reports its outcome to the dialplan in [`RESULT_VARIABLE`]
//! (`CALLFLEET_RESULT`); `AGISTATUS` cannot say it (see there).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::session::{RESULT_VARIABLE, Session, SessionError};

/// The future a [`Handler`] returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), SessionError>> + Send>>;

/// What runs one session of a script.
pub trait Handler: Send + Sync + 'static {
    /// Drives `session` until the script is done with it.
    fn run(&self, session: Session) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(Session) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), SessionError>> + Send + 'static,
{
    fn run(&self, session: Session) -> HandlerFuture {
        Box::pin(self(session))
    }
}

/// The scripts a server serves, by path.
#[derive(Clone, Default)]
pub struct Scripts {
    handlers: BTreeMap<String, Arc<dyn Handler>>,
}

impl Scripts {
    /// Returns a set without scripts: every session is told its script is unknown.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns the scripts every node-agent serves: [`ping`] (for now the only one).
    pub fn builtin() -> Self {
        Self::new().with("ping", ping)
    }

    /// Adds (or replaces) the script at `path`, as the AGI URL names it without the
    /// leading `/` and the query: `queue` for `agi://host:4573/queue?queue=sales`.
    #[must_use]
    pub fn with(mut self, path: impl Into<String>, handler: impl Handler) -> Self {
        self.handlers.insert(path.into(), Arc::new(handler));
        self
    }

    /// Returns the handler of the script at `path`.
    pub fn get(&self, path: &str) -> Option<&Arc<dyn Handler>> {
        self.handlers.get(path)
    }

    /// Returns the paths served, in order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }
}

impl fmt::Debug for Scripts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.paths()).finish()
    }
}

/// The `ping` script: sets `CALLFLEET_RESULT=pong` and ends the session, so a dialplan
/// (and the real-Asterisk tests) can check that this node's FastAGI server answers:
///
/// ```text
/// same => n,Set(CALLFLEET_RESULT=)
/// same => n,AGI(agi://127.0.0.1:4573/ping)
/// same => n,GotoIf($["${CALLFLEET_RESULT}" = "pong"]?up:down)
/// ```
pub async fn ping(mut session: Session) -> Result<(), SessionError> {
    let reply = session.set_result("pong").await?;
    if reply.success().is_none() {
        tracing::debug!(
            ?reply,
            variable = RESULT_VARIABLE,
            "ping could not set its result"
        );
    }
    Ok(())
}
