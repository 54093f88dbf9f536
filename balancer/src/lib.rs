//! The carrier-facing SIP front door of a core node.
pub mod sip;
