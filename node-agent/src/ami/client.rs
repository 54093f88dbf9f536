//! A tokio TCP adapter over [`super::proto`]: one manager connection, one action at a time.
//!
//! The client owns the socket and a read buffer; [`AmiClient::read_message`] fills the
//! buffer until the parser has a whole message, like mini-redis's `Connection::read_frame`.
//! Replies are matched to the action by `ActionID`, so events and stale replies (to an
//! action that timed out earlier) are read and dropped rather than misread as the answer.

use std::fmt;
use std::future::Future;
use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::proto::{self, Message, ParseError};

/// The CLI command whose output carries the call count.
const CHANNELS_COUNT: &str = "core show channels count";

/// Why talking to the Asterisk manager failed.
#[derive(Debug, thiserror::Error)]
pub enum AmiError {
    /// The manager answered the login with an error: the credentials are wrong, or the
    /// user may not log in from this host. Retrying will not help.
    #[error(
        "asterisk manager at {address} refused the login for user {username}: {message}; \
         check node.calls.username and node.calls.secret against manager.conf"
    )]
    AuthFailed {
        /// `host:port` of the manager.
        address: String,
        /// The manager user that was refused.
        username: String,
        /// Asterisk's `Message`, e.g. `Authentication failed`.
        message: String,
    },
    /// The user may log in but not run the `Command` action the call count needs.
    /// Retrying will not help either.
    #[error(
        "asterisk manager at {address} lets user {username} log in but refuses it `core show channels count` \
         (permission denied); give the user `write = command` in manager.conf, as `callfleet asterisk-config` writes it"
    )]
    PermissionDenied {
        /// `host:port` of the manager.
        address: String,
        /// The manager user.
        username: String,
    },
    /// No connection, or the connection broke or was closed.
    #[error("asterisk manager at {address}: {source}")]
    Io {
        /// `host:port` of the manager.
        address: String,
        /// What the operating system (or the closed stream) reported.
        #[source]
        source: io::Error,
    },
    /// The peer does not speak AMI, or answered in a way the agent cannot use.
    #[error("asterisk manager at {address}: {detail}")]
    Protocol {
        /// `host:port` of the manager.
        address: String,
        /// What was wrong, quoting what came back.
        detail: String,
    },
    /// The manager did not answer in time.
    #[error("asterisk manager at {address} did not answer {operation} within {timeout:?}")]
    Timeout {
        /// `host:port` of the manager.
        address: String,
        /// What was waiting, e.g. `the login`.
        operation: &'static str,
        /// The configured deadline.
        timeout: Duration,
    },
}

/// A logged-in Asterisk manager connection that reads the active call count.
///
/// Logs in with `Events: off`, so the socket carries only replies to the agent's own
/// actions. After an error the connection may be mid-message; drop it and connect again.
pub struct AmiClient {
    address: String,
    username: String,
    stream: TcpStream,
    buffer: BytesMut,
    timeout: Duration,
    version: String,
    next_action: u64,
}

impl fmt::Debug for AmiClient {
    // By hand so buffered bytes are not dumped into logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmiClient")
            .field("address", &self.address)
            .field("version", &self.version)
            .field("timeout", &self.timeout)
            .field("buffered", &self.buffer.len())
            .finish_non_exhaustive()
    }
}

impl AmiClient {
    /// Connects to the manager at `address` (`host:port`), reads its greeting and logs in
    /// as `username`. The whole exchange is bounded by `timeout`, which also bounds every
    /// later query.
    pub async fn connect(
        address: &str,
        username: &str,
        secret: &str,
        timeout: Duration,
    ) -> Result<Self, AmiError> {
        bounded(address, "the connect and login", timeout, async {
            let stream = TcpStream::connect(address)
                .await
                .map_err(|source| io_error(address, source))?;
            let mut client = Self {
                address: address.to_owned(),
                username: username.to_owned(),
                stream,
                buffer: BytesMut::with_capacity(4096),
                timeout,
                version: String::new(),
                next_action: 1,
            };
            client.version = client.read_greeting().await?;
            client.login(username, secret).await?;
            tracing::debug!(
                address,
                username,
                version = %client.version,
                "logged in to the asterisk manager"
            );
            Ok(client)
        })
        .await
    }

    /// Returns the number of active calls, from `core show channels count`.
    pub async fn active_calls(&mut self) -> Result<u32, AmiError> {
        let address = self.address.clone();
        bounded(
            &address,
            "`core show channels count`",
            self.timeout,
            async {
                let reply = self
                    .request("Command", &[("Command", CHANNELS_COUNT)])
                    .await?;
                if reply.response() != Some("Success") {
                    if reply
                        .get("Message")
                        .is_some_and(|m| m.eq_ignore_ascii_case("Permission denied"))
                    {
                        return Err(AmiError::PermissionDenied {
                            address: self.address.clone(),
                            username: self.username.clone(),
                        });
                    }
                    let detail = format!("refused `{CHANNELS_COUNT}`: {}", reply.summary(200));
                    return Err(self.protocol(detail));
                }
                proto::active_calls(&reply).ok_or_else(|| {
                    self.protocol(format!(
                        "answered `{CHANNELS_COUNT}` without an `N active calls` line: {}",
                        reply.summary(200)
                    ))
                })
            },
        )
        .await
    }

    /// Hangs up `channel` (`PJSIP/701-0000002a`): how a ring is cancelled from outside the
    /// FastAGI session blocked in its Dial. Needs `write = call`. A channel that is already
    /// gone is not an error: what was to be ended has ended.
    pub async fn hangup(&mut self, channel: &str) -> Result<(), AmiError> {
        let address = self.address.clone();
        bounded(&address, "Hangup", self.timeout, async {
            let reply = self.request("Hangup", &[("Channel", channel)]).await?;
            match (reply.response(), reply.get("Message")) {
                (Some("Success"), _) => Ok(()),
                (_, Some(message)) if message.eq_ignore_ascii_case("No such channel") => Ok(()),
                (_, Some(message)) if message.eq_ignore_ascii_case("Permission denied") => {
                    Err(AmiError::PermissionDenied {
                        address: self.address.clone(),
                        username: self.username.clone(),
                    })
                }
                _ => Err(self.protocol(format!(
                    "refused to hang up {channel}: {}",
                    reply.summary(200)
                ))),
            }
        })
        .await
    }

    /// Returns the AMI version from the greeting, e.g. `11.0.0`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Returns the `host:port` this client is connected to.
    pub fn address(&self) -> &str {
        &self.address
    }

    async fn login(&mut self, username: &str, secret: &str) -> Result<(), AmiError> {
        let reply = self
            .request(
                "Login",
                &[
                    ("Username", username),
                    ("Secret", secret),
                    ("Events", "off"),
                ],
            )
            .await?;
        match reply.response() {
            Some("Success") => Ok(()),
            Some("Error") => Err(AmiError::AuthFailed {
                address: self.address.clone(),
                username: username.to_owned(),
                message: reply.get("Message").unwrap_or("no reason given").to_owned(),
            }),
            _ => Err(self.protocol(format!("answered the login with `{}`", reply.summary(200)))),
        }
    }

    /// Sends an action and returns the reply that carries its `ActionID`.
    async fn request(
        &mut self,
        action: &str,
        fields: &[(&str, &str)],
    ) -> Result<Message, AmiError> {
        let action_id = format!("callfleet-{}", self.next_action);
        self.next_action += 1;
        let bytes = proto::print_action(action, &action_id, fields);
        self.stream
            .write_all(&bytes)
            .await
            .map_err(|source| io_error(&self.address, source))?;
        loop {
            let msg = self.read_message().await?;
            if msg.is_response() && msg.action_id() == Some(action_id.as_str()) {
                return Ok(msg);
            }
            tracing::trace!(
                address = %self.address,
                event = msg.get("Event"),
                action_id = msg.action_id(),
                "skipped a manager message that is not the awaited reply"
            );
        }
    }

    async fn read_greeting(&mut self) -> Result<String, AmiError> {
        loop {
            match proto::parse_greeting(&self.buffer) {
                Ok(Some((version, used))) => {
                    self.buffer.advance(used);
                    return Ok(version);
                }
                Ok(None) => self.fill_buffer().await?,
                Err(err) => return Err(self.parse_error(err)),
            }
        }
    }

    /// Reads one whole message, waiting for more bytes as long as the parser needs them.
    async fn read_message(&mut self) -> Result<Message, AmiError> {
        loop {
            match proto::parse_message(&self.buffer) {
                Ok(Some((msg, used))) => {
                    self.buffer.advance(used);
                    return Ok(msg);
                }
                Ok(None) => self.fill_buffer().await?,
                Err(err) => return Err(self.parse_error(err)),
            }
        }
    }

    async fn fill_buffer(&mut self) -> Result<(), AmiError> {
        let read = self
            .stream
            .read_buf(&mut self.buffer)
            .await
            .map_err(|source| io_error(&self.address, source))?;
        if read == 0 {
            let what = if self.buffer.is_empty() {
                "connection closed by the asterisk manager"
            } else {
                "connection closed by the asterisk manager in the middle of a message"
            };
            return Err(io_error(
                &self.address,
                io::Error::new(io::ErrorKind::UnexpectedEof, what),
            ));
        }
        Ok(())
    }

    fn parse_error(&self, err: ParseError) -> AmiError {
        let detail = match err {
            ParseError::NotAmi(_) => format!("{err}; is this the manager port (usually 5038)?"),
            _ => err.to_string(),
        };
        self.protocol(detail)
    }

    fn protocol(&self, detail: String) -> AmiError {
        AmiError::Protocol {
            address: self.address.clone(),
            detail,
        }
    }
}

fn io_error(address: &str, source: io::Error) -> AmiError {
    AmiError::Io {
        address: address.to_owned(),
        source,
    }
}

/// Runs `work` under the deadline, turning an expiry into [`AmiError::Timeout`].
async fn bounded<T>(
    address: &str,
    operation: &'static str,
    timeout: Duration,
    work: impl Future<Output = Result<T, AmiError>>,
) -> Result<T, AmiError> {
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(AmiError::Timeout {
                address: address.to_owned(),
                operation,
                timeout,
            })
        })
}
