//! One FastAGI session: the I/O around [`proto`] for one call.
//!
//! A [`Session`] owns the connection and the bytes read but not yet parsed. A script sends
//! one command at a time ([`Session::send`]) and gets the reply to it; Asterisk answers
//! strictly in order, so the session never has more than one command in flight.
//!
//! What the I/O adds to the codec:
//!
//! - **`HANGUP` is a state, not a reply.** Asterisk pushes `HANGUP` when the caller hangs
//!   up, while the session is idle or ahead of the reply to a command already sent. The
//!   session records it ([`Session::hung_up`]) and goes on reading for the reply, which
//!   always follows. Commands on a dead channel are answered `511`, which is a reply like
//!   any other ([`Reply::DeadChannel`]), not an error.
//! - **Re-parse on line ends only.** The parsers are stateless and read their buffer from
//!   the start, so the buffer is parsed again only once a read has brought a line feed (or
//!   grown past the codec's bound, which the parser then reports): a reply trickling in a
//!   byte at a time costs one parse per line, not one per byte.
//! - **A reply that never comes.** A command Asterisk answers at once gets
//!   `node.agi.command_timeout`; one that blocks on the caller (`EXEC Dial` rings for
//!   minutes, `STREAM FILE` plays a prompt) gets no bound unless the script passes one
//!   ([`Session::send_within`]). After a timeout the reply may still arrive and would be
//!   taken for the answer to the next command, so the session refuses further commands
//!   ([`SessionError::Unusable`]); the script ends and the server closes the connection,
//!   after which Asterisk goes on with the dialplan. The same holds when a script drops a
//!   `send` before its reply was read (e.g. in a `select!`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::proto::{
    self, Command, CommandError, Environment, Event, MAX_ENVIRONMENT, MAX_REPLY, ParseError, Reply,
};
use super::server::Counters;

/// Bytes asked of the socket per read: an environment is about 550 bytes, a reply under 100.
const READ_CHUNK: usize = 4096;

/// The channel variable a script sets to say how it ended (`pong`, `queued`, …).
///
/// The dialplan must test this, not `AGISTATUS`: Asterisk reports `SUCCESS` for every
/// session the node-agent closes, including one it refused at the session cap, one whose
/// script is unknown and one closed at shutdown. Clear it before `AGI()`
/// (`Set(CALLFLEET_RESULT=)`), so a value from an earlier session of the channel is not
/// taken for this one's.
pub const RESULT_VARIABLE: &str = "CALLFLEET_RESULT";

/// Commands that can block until the caller does something (or a timer Asterisk runs
/// ends): they get no reply deadline unless the script passes one.
const BLOCKING: [&str; 10] = [
    "EXEC",
    "STREAM FILE",
    "CONTROL STREAM FILE",
    "GET DATA",
    "GET OPTION",
    "WAIT FOR DIGIT",
    "RECORD FILE",
    "SPEECH RECOGNIZE",
    "RECEIVE CHAR",
    "RECEIVE TEXT",
];

/// Why a command got no reply, or the session can no longer carry commands.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Asterisk closed the connection: the dialplan went on (the script ended its session,
    /// or the channel is gone and `AGI()` returned).
    #[error("Asterisk closed the FastAGI connection")]
    Closed,
    /// Asterisk did not send the environment within `node.agi.environment_timeout`.
    #[error("no FastAGI environment within {0:?}")]
    NoEnvironment(Duration),
    /// No reply within the deadline; the session is unusable from now on.
    #[error("no reply to `{command}` within {after:?}")]
    Timeout {
        /// The command's name, e.g. `GET VARIABLE`.
        command: &'static str,
        /// The deadline that passed.
        after: Duration,
    },
    /// The peer's bytes are not FastAGI; the session is unusable from now on.
    #[error("the peer does not speak FastAGI: {0}")]
    Protocol(#[from] ParseError),
    /// A reply came while no command was waiting for one; the session is unusable.
    #[error("Asterisk sent a reply to no command: {0:?}")]
    UnexpectedReply(Reply),
    /// The command cannot be sent as one AGI line; nothing was written, the session stays
    /// usable.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// Reading or writing the connection failed; the session is unusable.
    #[error("FastAGI connection failed: {0}")]
    Io(#[source] std::io::Error),
    /// An earlier command got no reply (timeout, or its `send` was dropped): its reply may
    /// still come and would be read as this command's, so nothing more is sent.
    #[error("the session carries no more commands: {0}")]
    Unusable(String),
}

impl SessionError {
    fn from_io(err: std::io::Error) -> Self {
        use std::io::ErrorKind;
        match err.kind() {
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
                Self::Closed
            }
            _ => Self::Io(err),
        }
    }
}

/// Where the conversation with Asterisk stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Between commands: the next one may be sent.
    Ready,
    /// A command was written (or was being written) and its reply not yet read: only the
    /// `send` that wrote it may go on, and if that was dropped, nobody.
    InFlight(&'static str),
    /// Closed by the peer.
    Closed,
    /// Broken for good, with the reason.
    Broken(String),
}

/// One FastAGI connection from Asterisk, for one call, after its environment was read.
///
/// Dropping it closes the connection, after which Asterisk goes on with the dialplan.
#[derive(Debug)]
pub struct Session {
    stream: TcpStream,
    peer: SocketAddr,
    /// Bytes read and not yet parsed.
    buffer: BytesMut,
    /// Whether `buffer` may hold a whole line the parser has not seen yet.
    parse_due: bool,
    environment: Environment,
    hung_up: bool,
    state: State,
    /// The encoded command being sent, kept to reuse its allocation.
    out: Vec<u8>,
    command_timeout: Duration,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
}

impl Session {
    /// Reads the environment from a new connection, at most `limit` long.
    pub(crate) async fn start(
        stream: TcpStream,
        peer: SocketAddr,
        limit: Duration,
        command_timeout: Duration,
        counters: Arc<Counters>,
        shutdown: CancellationToken,
    ) -> Result<Self, SessionError> {
        let mut session = Self {
            stream,
            peer,
            buffer: BytesMut::with_capacity(READ_CHUNK),
            parse_due: false,
            environment: Environment::default(),
            hung_up: false,
            state: State::Ready,
            out: Vec::with_capacity(256),
            command_timeout,
            counters,
            shutdown,
        };
        match tokio::time::timeout(limit, session.read_environment()).await {
            Ok(Ok(environment)) => {
                session.environment = environment;
                Ok(session)
            }
            Ok(Err(err)) => Err(err),
            Err(_) => Err(SessionError::NoEnvironment(limit)),
        }
    }

    async fn read_environment(&mut self) -> Result<Environment, SessionError> {
        loop {
            if self.parse_due {
                match proto::parse_environment(&self.buffer) {
                    Ok(Some((environment, used))) => {
                        self.consume(used);
                        return Ok(environment);
                    }
                    Ok(None) => self.parse_due = false,
                    Err(err) => {
                        self.counters.protocol_error();
                        return Err(err.into());
                    }
                }
            }
            self.fill(MAX_ENVIRONMENT).await?;
        }
    }

    /// Returns the environment Asterisk sent: channel, caller, script and arguments.
    pub fn environment(&self) -> &Environment {
        &self.environment
    }

    /// Returns the script's path from the AGI URL (`queue` of `agi://…/queue?queue=sales`),
    /// or `""` when the URL names none.
    pub fn script(&self) -> &str {
        self.environment
            .network_script()
            .map_or("", proto::Script::path)
    }

    /// Returns the address Asterisk connected from.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Returns whether Asterisk has said the channel hung up (its `HANGUP` line). Commands
    /// that touch the channel are then answered [`Reply::DeadChannel`]. With
    /// `AGISIGHUP=no` in the dialplan Asterisk never says so, and `511` replies are the
    /// only sign.
    pub fn hung_up(&self) -> bool {
        self.hung_up
    }

    /// Returns whether the node-agent is stopping: the script should end the session soon,
    /// and is cut off at the end of `node.agi.shutdown_grace`.
    pub fn is_stopping(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Completes when the node-agent starts stopping (see [`Session::is_stopping`]).
    pub fn stopping(&self) -> WaitForCancellationFuture<'_> {
        self.shutdown.cancelled()
    }

    /// Sends `command` and returns Asterisk's reply, recording a `HANGUP` that comes ahead
    /// of it.
    ///
    /// A command that blocks on the caller ([`blocks`]: `EXEC`, `STREAM FILE`, `GET DATA`…)
    /// waits for its reply as long as it takes; any other waits at most
    /// `node.agi.command_timeout`. [`Session::send_within`] chooses the deadline.
    pub async fn send(&mut self, command: &Command) -> Result<Reply, SessionError> {
        let deadline = (!blocks(command)).then_some(self.command_timeout);
        self.send_within(command, deadline).await
    }

    /// Sends `command` and returns Asterisk's reply, waiting at most `deadline` for it
    /// (`None`: as long as it takes). After a timeout the session is unusable.
    pub async fn send_within(
        &mut self,
        command: &Command,
        deadline: Option<Duration>,
    ) -> Result<Reply, SessionError> {
        self.check_ready()?;
        self.out.clear();
        command.encode_into(&mut self.out)?;
        self.state = State::InFlight(command.name());
        self.counters.command();
        let exchange = self.exchange();
        let result = match deadline {
            None => exchange.await,
            Some(after) => tokio::time::timeout(after, exchange)
                .await
                .unwrap_or_else(|_| {
                    Err(SessionError::Timeout {
                        command: command.name(),
                        after,
                    })
                }),
        };
        self.settle(&result);
        result
    }

    /// Sets [`RESULT_VARIABLE`] to `value`: what the dialplan reads after `AGI()` returns.
    pub async fn set_result(&mut self, value: &str) -> Result<Reply, SessionError> {
        self.send(&Command::set_variable(RESULT_VARIABLE, value))
            .await
    }

    /// Waits, with no command in flight, until Asterisk says the caller hung up; returns
    /// at once if it already has. [`SessionError::Closed`] when the connection closes
    /// first (with `AGISIGHUP=no`, that is all the session learns).
    ///
    /// Cancel-safe: dropping it loses nothing, so it can race a timer or another event.
    pub async fn wait_for_hangup(&mut self) -> Result<(), SessionError> {
        self.check_ready()?;
        while !self.hung_up {
            let event = self.read_event().await;
            match event {
                Ok(Event::Hangup) => self.hung_up = true,
                Ok(Event::Reply(reply)) => {
                    let err = SessionError::UnexpectedReply(reply);
                    self.state = State::Broken(err.to_string());
                    self.counters.protocol_error();
                    return Err(err);
                }
                Err(err) => {
                    self.settle_error(&err);
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    fn check_ready(&self) -> Result<(), SessionError> {
        match &self.state {
            State::Ready => Ok(()),
            State::Closed => Err(SessionError::Closed),
            State::InFlight(command) => Err(SessionError::Unusable(format!(
                "the reply to `{command}` was never read (its send was dropped)"
            ))),
            State::Broken(why) => Err(SessionError::Unusable(why.clone())),
        }
    }

    /// Writes the encoded command and reads events until its reply.
    async fn exchange(&mut self) -> Result<Reply, SessionError> {
        self.stream
            .write_all(&self.out)
            .await
            .map_err(SessionError::from_io)?;
        loop {
            match self.read_event().await? {
                Event::Hangup => self.hung_up = true,
                Event::Reply(reply) => return Ok(reply),
            }
        }
    }

    fn settle(&mut self, result: &Result<Reply, SessionError>) {
        match result {
            Ok(_) => self.state = State::Ready,
            Err(err) => self.settle_error(err),
        }
    }

    fn settle_error(&mut self, err: &SessionError) {
        match err {
            SessionError::Closed => self.state = State::Closed,
            SessionError::Timeout { .. } => {
                self.counters.timeout();
                self.state = State::Broken(err.to_string());
            }
            SessionError::Command(_) => {}
            _ => self.state = State::Broken(err.to_string()),
        }
    }

    /// Reads the next event (reply or `HANGUP`). Cancel-safe: bytes read stay in the
    /// buffer.
    async fn read_event(&mut self) -> Result<Event, SessionError> {
        loop {
            if self.parse_due {
                match proto::parse_event(&self.buffer) {
                    Ok(Some((event, used))) => {
                        self.consume(used);
                        return Ok(event);
                    }
                    Ok(None) => self.parse_due = false,
                    Err(err) => {
                        self.counters.protocol_error();
                        return Err(err.into());
                    }
                }
            }
            self.fill(MAX_REPLY).await?;
        }
    }

    /// Drops `used` parsed bytes; what is left may already hold the next line.
    fn consume(&mut self, used: usize) {
        self.buffer.advance(used);
        self.parse_due = !self.buffer.is_empty();
    }

    /// Reads once; marks the buffer for parsing when the read brought a line feed or the
    /// buffer outgrew `limit` (the parser then reports it as too large, so a peer that
    /// never sends a line feed cannot grow it further).
    async fn fill(&mut self, limit: usize) -> Result<(), SessionError> {
        let before = self.buffer.len();
        self.buffer.reserve(READ_CHUNK);
        let read = self
            .stream
            .read_buf(&mut self.buffer)
            .await
            .map_err(SessionError::from_io)?;
        if read == 0 {
            return Err(SessionError::Closed);
        }
        self.parse_due = self.buffer[before..].contains(&b'\n') || self.buffer.len() > limit;
        Ok(())
    }
}

/// Returns whether `command` can block until the caller acts or a timer in Asterisk ends,
/// so that [`Session::send`] gives it no deadline: `EXEC` (Dial, MusicOnHold, Wait…),
/// playing and recording (`STREAM FILE`, `RECORD FILE`, `SAY …`), reading digits (`GET
/// DATA`, `WAIT FOR DIGIT`…).
pub fn blocks(command: &Command) -> bool {
    let name = command.name();
    name.starts_with("SAY ") || BLOCKING.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_commands_are_those_that_wait_on_the_caller() {
        for command in [
            Command::exec("Dial", "PJSIP/1001,20"),
            Command::music_on_hold("default"),
            Command::new("STREAM FILE").arg("hello").arg(""),
            Command::new("GET DATA").arg("beep"),
            Command::new("SAY DIGITS").arg("123").arg(""),
            Command::new("WAIT FOR DIGIT").arg("5000"),
        ] {
            assert!(blocks(&command), "{}", command.name());
        }
        for command in [
            Command::set_variable("A", "1"),
            Command::get_variable("A"),
            Command::verbose("x", 1),
            Command::answer(),
            Command::hangup(),
            Command::channel_status(),
            Command::new("DATABASE GET").arg("a").arg("b"),
        ] {
            assert!(!blocks(&command), "{}", command.name());
        }
    }
}
