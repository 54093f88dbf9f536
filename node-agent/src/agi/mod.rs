//! FastAGI, the way a dialplan hands a call to the node-agent: `AGI(agi://node-agent/…)`
//! opens a TCP connection from Asterisk, which sends the call's environment and then runs
//! the commands the node-agent sends back, one at a time, until either side closes.
//!
//! Queued calls (issue 16) reach the node-agent this way: one TCP connection per call,
//! opened by the dialplan exactly where the call needs a decision.
//!
//! - [`proto`] is the sans-IO codec — environment, replies (and the unsolicited `HANGUP`),
//!   command printing with res_agi's quoting — tested against sessions captured from a
//!   real Asterisk 22.10.1 (`fixtures/asterisk/fastagi-session.*`).
//! - [`session`] is the I/O of one connection: send a command, get its reply, note the
//!   caller's hangup.
//! - [`server`] accepts connections within limits and hands each session to the script
//!   its URL names ([`scripts`]).

#[cfg(test)]
mod capture;
#[cfg(test)]
mod oracle;
pub mod proto;
pub mod scripts;
pub mod server;
pub mod session;
#[cfg(test)]
mod tests;

pub use scripts::{Handler, Scripts};
pub use server::{AgiError, AgiServer, Settings, Stats};
pub use session::{RESULT_VARIABLE, Session, SessionError};
