//! Queued calls (issue 16, `docs/queued-calls.md`): the queue-call flow of a FastAGI
//! session ([`call`]), where a call's candidates come from ([`candidates`]) and how what
//! happened to an agent's ring reaches the control plane ([`events`]).

pub mod call;
pub mod candidates;
pub mod events;

pub use call::{QueueCalls, QueueError, QueueStats};
