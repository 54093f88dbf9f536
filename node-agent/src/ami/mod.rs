//! The Asterisk Manager Interface (AMI), as far as the node-agent needs it: log in and ask
//! for the active call count.
//!
//! The call count goes into every heartbeat, so it is polled once per heartbeat interval.
//! Logging in each time would cost a TCP handshake, a login round trip and a line in
//! Asterisk's log per heartbeat, so the agent keeps one persistent connection and only
//! reconnects after an error.
//!
//! The login asks for `Events: off`. A busy call center emits thousands of events per
//! minute (channel state, queue members, device state); with events on, the agent would
//! have to read and throw all of them away just to find the reply to its one question, and
//! a slow agent would make Asterisk queue them. The client still skips any event, and any
//! reply to an action that timed out earlier, while it waits for its own reply.
//!
//! [`proto`] is the sans-IO parser and printer, tested against real captures; the client
//! is a thin tokio adapter over it.

mod client;
pub mod proto;
#[cfg(test)]
mod tests;

pub use client::{AmiClient, AmiError};
