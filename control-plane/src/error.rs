//! What can go wrong with a control-plane operation, mapped to each API face in one place.
//!
//! REST answers the HTTP status, gRPC the matching code, and XML-RPC a fault whose
//! `faultCode` is that same HTTP status number (CRMs already branch on 404 and 409), with the
//! message as `faultString`. Every message says what was wrong and what to do.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use callfleet_core::StoreError;
use callfleet_core::config::Role;

/// A failed control-plane operation.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No token, or not a bearer token.
    #[error("this operation needs a token: send `Authorization: Bearer <token>`")]
    Unauthenticated,
    /// A bearer token that is not configured.
    #[error("the bearer token is not known; check control_plane.tokens")]
    BadToken,
    /// The token's role is too low.
    #[error("token `{name}` has role {role:?}; this operation needs {needed:?} or above")]
    Forbidden {
        /// The token's name.
        name: String,
        /// Its role.
        role: Role,
        /// The role needed.
        needed: Role,
    },
    /// An agent, device, queue, membership or node that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A change that collides with the current state (a device taken by another agent).
    #[error("{0}")]
    Conflict(String),
    /// Input that cannot be accepted; `field` names it.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field at fault.
        field: String,
        /// What is wrong and what would be right.
        reason: String,
    },
    /// The store cannot be reached or failed; nothing was changed.
    #[error("the store is unavailable, nothing was changed; retry later ({0})")]
    Unavailable(String),
    /// The change was sent to the store but its commit was not confirmed: it may or may
    /// not have been made.
    #[error("{0}")]
    OutcomeUnknown(String),
    /// A request of the supervisors' page without a live session cookie.
    #[error("no session: log in on the page with a token (POST /ui/login)")]
    NoSession,
    /// A change from the supervisors' page without its session's CSRF token.
    #[error("a change from the page must carry its X-CSRF-Token header; reload the page")]
    CrossSite,
}

impl ControlError {
    /// An invalid field.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The HTTP status of this error (also the XML-RPC `faultCode`).
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated | Self::BadToken | Self::NoSession => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } | Self::CrossSite => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Invalid { .. } => StatusCode::BAD_REQUEST,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            // Not 503: that says nothing was changed.
            Self::OutcomeUnknown(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The gRPC status of this error.
    pub fn grpc(&self) -> tonic::Status {
        let message = self.to_string();
        match self {
            Self::Unauthenticated | Self::BadToken | Self::NoSession => {
                tonic::Status::unauthenticated(message)
            }
            Self::Forbidden { .. } | Self::CrossSite => tonic::Status::permission_denied(message),
            Self::NotFound(_) => tonic::Status::not_found(message),
            Self::Conflict(_) => tonic::Status::already_exists(message),
            Self::Invalid { .. } => tonic::Status::invalid_argument(message),
            Self::Unavailable(_) => tonic::Status::unavailable(message),
            Self::OutcomeUnknown(_) => tonic::Status::unknown(message),
        }
    }
}

impl From<StoreError> for ControlError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Invalid { field, reason } => Self::invalid(field, reason),
            StoreError::NotFound { .. } | StoreError::NotMember { .. } => {
                Self::NotFound(err.to_string())
            }
            StoreError::UnknownNode(_) => Self::NotFound(err.to_string()),
            StoreError::Conflict { .. } => Self::Conflict(err.to_string()),
            StoreError::OutcomeUnknown(_) => Self::OutcomeUnknown(err.to_string()),
            other => Self::Unavailable(other.to_string()),
        }
    }
}

impl From<ControlError> for tonic::Status {
    fn from(err: ControlError) -> Self {
        err.grpc()
    }
}

/// The JSON body of every REST error: `{"error": "..."}`.
impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status(),
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        if matches!(self, Self::Unauthenticated | Self::BadToken) {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
