//! The callers and access levels the role matrices of XML-RPC (`xmlrpc_roles.rs`) and
//! gRPC (`grpc_roles.rs`) share: the same tokens, configured alike, on both faces.

pub const ADMIN: &str = "admin-token-0123456789abcdef";
pub const CRM: &str = "crm-token-0123456789abcdef";
pub const WALLBOARD: &str = "wallboard-token-0123456789";
pub const NODE: &str = "node-token-0123456789abcdef";
pub const UNKNOWN: &str = "not-a-token-of-ours-at-all";

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// No `Authorization` header (gRPC: no `authorization` metadata).
    Anonymous,
    /// A bearer token that is not configured.
    Unknown,
    Node,
    Read,
    Write,
    Admin,
}

pub const CALLERS: [Caller; 6] = [
    Caller::Anonymous,
    Caller::Unknown,
    Caller::Node,
    Caller::Read,
    Caller::Write,
    Caller::Admin,
];

impl Caller {
    pub fn token(self) -> Option<&'static str> {
        match self {
            Self::Anonymous => None,
            Self::Unknown => Some(UNKNOWN),
            Self::Node => Some(NODE),
            Self::Read => Some(WALLBOARD),
            Self::Write => Some(CRM),
            Self::Admin => Some(ADMIN),
        }
    }

    /// The token's name, as the audit log and a 403 name it.
    pub fn name(self) -> Option<&'static str> {
        match self {
            Self::Anonymous | Self::Unknown => None,
            Self::Node => Some("node:core-1"),
            Self::Read => Some("wallboard"),
            Self::Write => Some("crm"),
            Self::Admin => Some("admin"),
        }
    }
}

/// What a method asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    Read,
    /// `read` and above, or `node`: a queue's candidates, which a node-agent routes its
    /// queued calls by, and a caller number's attributes, which it routes VIP callers by.
    /// The same on REST, XML-RPC and gRPC (control-plane `auth.rs`, `CANDIDATE_READERS`,
    /// `CALLER_LOOKUP`): the faces serve the same operations, and refusing a node token on
    /// one face would protect nothing it can read on another.
    ReadOrNode,
    Write,
    Admin,
}
