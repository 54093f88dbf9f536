//! FastAGI, the way a dialplan hands a call to the node-agent: `AGI(agi://node-agent/…)`
//! opens a TCP connection from Asterisk, which sends the call's environment and then runs
//! the commands the node-agent sends back, one at a time, until either side closes.
//!
//! Queued calls (issue 16) reach the node-agent this way: one TCP connection per call,
//! opened by the dialplan exactly where the call needs a decision.
//!
//! [`proto`] is the sans-IO codec — environment, replies (and the unsolicited `HANGUP`),
//! command printing with res_agi's quoting — tested against sessions captured from a real
//! Asterisk 22.10.1 (`fixtures/asterisk/fastagi-session.*`). The server that drives it
//! comes later.

#[cfg(test)]
mod oracle;
pub mod proto;
#[cfg(test)]
mod tests;
