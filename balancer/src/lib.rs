//! The carrier-facing SIP front door of a core node.
pub mod route;
pub mod sip;
pub mod transaction;
