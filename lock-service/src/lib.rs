//! Fenced leases so that one agent is rung for one queued call across all nodes.
//!
//! Before a node's PBX rings an agent it claims the agent's lease; the lease carries a
//! fencing token that only ever grows per agent, so whatever acts on the lease can refuse a
//! holder whose lease was superseded. [`backend`] holds the rules, for Redis and for a
//! single box's memory.

pub mod backend;
pub mod lease;

pub use backend::{Locks, MemoryLocks, RedisLocks};
pub use lease::{Claim, Lease, LockError};
