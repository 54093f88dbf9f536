//! The HTTP twin for dialplans: form POSTs answered by one non-empty line.
//!
//! Asterisk's `CURL()` returns an empty string for every failure it sees (connection
//! refused, timeout, a status listed in `failurecodes`), so an empty answer must never mean
//! anything: every answer is `OK …`, `BUSY …`, `GONE` or `ERR …`, and the caller treats
//! anything else (including nothing) as "no lease".

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;

use crate::backend::Locks;
use crate::lease::{Claim, LockError};

/// What the HTTP twin needs.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// The backend.
    pub locks: Arc<Locks>,
    /// Validity when the form gives no `ttl`.
    pub default_validity: Duration,
}

/// The routes under `/lock/`.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/lock/acquire", post(acquire))
        .route("/lock/claim-first", post(claim_first))
        .route("/lock/renew", post(renew))
        .route("/lock/release", post(release))
        .with_state(state)
}

/// One answer line.
struct Line(StatusCode, String);

impl IntoResponse for Line {
    fn into_response(self) -> Response {
        (
            self.0,
            [("content-type", "text/plain; charset=utf-8")],
            format!("{}\n", self.1),
        )
            .into_response()
    }
}

impl From<LockError> for Line {
    fn from(err: LockError) -> Self {
        match err {
            LockError::Held { holder, .. } => Line(StatusCode::CONFLICT, format!("BUSY {holder}")),
            LockError::Gone { .. } => Line(StatusCode::GONE, "GONE".into()),
            LockError::NotYours { resource } => Line(
                StatusCode::CONFLICT,
                format!("ERR {resource} is leased to another holder or token"),
            ),
            LockError::Unavailable(reason) => Line(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("ERR {}", one_line(&reason)),
            ),
            LockError::Invalid(reason) => Line(
                StatusCode::BAD_REQUEST,
                format!("ERR {}", one_line(&reason)),
            ),
        }
    }
}

fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

#[derive(Debug, Deserialize)]
struct ClaimForm {
    #[serde(default)]
    resource: String,
    #[serde(default)]
    candidates: String,
    #[serde(default)]
    holder: String,
    #[serde(default)]
    attempt: String,
    /// Seconds (dialplans count in seconds); fractions allowed.
    ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
struct HeldForm {
    #[serde(default)]
    resource: String,
    #[serde(default)]
    holder: String,
    token: Option<String>,
    ttl: Option<String>,
}

// Fields arrive as text and are parsed here, so a malformed one gets an `ERR` line rather
// than the framework's own rejection body.
fn validity(ttl: Option<String>, default: Duration) -> Result<Duration, LockError> {
    let Some(ttl) = ttl.filter(|t| !t.trim().is_empty()) else {
        return Ok(default);
    };
    match ttl.trim().parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0 => {
            Ok(Duration::from_secs_f64(seconds))
        }
        _ => Err(LockError::Invalid(
            "`ttl` must be seconds between 0 and 3600".into(),
        )),
    }
}

fn token(token: Option<String>) -> Result<u64, LockError> {
    token
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| LockError::Invalid("`token` must be the number the claim returned".into()))
}

async fn acquire(State(state): State<HttpState>, Form(form): Form<ClaimForm>) -> Line {
    let result = async {
        let claim = Claim {
            holder: &form.holder,
            attempt: &form.attempt,
            validity: validity(form.ttl, state.default_validity)?,
        };
        state.locks.acquire(&form.resource, &claim).await
    }
    .await;
    match result {
        Ok(lease) => Line(StatusCode::OK, format!("OK {}", lease.token)),
        Err(err) => err.into(),
    }
}

async fn claim_first(State(state): State<HttpState>, Form(form): Form<ClaimForm>) -> Line {
    let result = async {
        let candidates: Vec<&str> = form
            .candidates
            // `|` as well as `,`: commas separate arguments in a dialplan.
            .split([',', '|'])
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        let claim = Claim {
            holder: &form.holder,
            attempt: &form.attempt,
            validity: validity(form.ttl, state.default_validity)?,
        };
        state.locks.claim_first(&candidates, &claim).await
    }
    .await;
    match result {
        Ok(Some(lease)) => Line(
            StatusCode::OK,
            format!("OK {} {}", lease.resource, lease.token),
        ),
        // Every candidate is held; there is no single holder to name.
        Ok(None) => Line(StatusCode::CONFLICT, "BUSY all".into()),
        Err(err) => err.into(),
    }
}

async fn renew(State(state): State<HttpState>, Form(form): Form<HeldForm>) -> Line {
    let result = async {
        let validity = validity(form.ttl, state.default_validity)?;
        state
            .locks
            .renew(&form.resource, &form.holder, token(form.token)?, validity)
            .await
    }
    .await;
    match result {
        Ok(lease) => Line(StatusCode::OK, format!("OK {}", lease.token)),
        Err(err) => err.into(),
    }
}

async fn release(State(state): State<HttpState>, Form(form): Form<HeldForm>) -> Line {
    let result = async {
        state
            .locks
            .release(&form.resource, &form.holder, token(form.token)?)
            .await
    }
    .await;
    match result {
        Ok(()) => Line(StatusCode::OK, "OK released".into()),
        Err(err) => err.into(),
    }
}
