//! Queued calls (issue 16, `docs/queued-calls.md`): the queue-call flow of a FastAGI
//! session ([`call`]), where a call's candidates come from ([`candidates`]), the
//! attributes the control plane's caller-number lists give a caller ([`callers`]), and how
//! what happened to an agent's ring reaches the control plane ([`events`]).

mod cache;
pub mod call;
pub mod callers;
pub mod candidates;
pub mod events;

pub use call::{QueueCalls, QueueError, QueueStats};
