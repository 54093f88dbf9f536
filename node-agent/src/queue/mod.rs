//! Queued calls (issue 16, `docs/queued-calls.md`): the pieces the queue-call flow of a
//! FastAGI session is built from. So far: where a call's candidates come from
//! ([`candidates`]).

pub mod candidates;
