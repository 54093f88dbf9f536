//! The HTTP twin for dialplans: form POSTs answered by one non-empty line.
//!
//! Asterisk's `CURL()` returns an empty string for every failure it sees (connection
//! refused, timeout, a status listed in `failurecodes`), so an empty answer must never mean
//! anything: every answer is `OK …`, `BUSY …`, `GONE` or `ERR …`, and the caller treats
//! anything else (including nothing) as "no lease".

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::FormRejection;
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
        .route("/lock/acquire", post(acquire).fallback(not_post))
        .route("/lock/claim-first", post(claim_first).fallback(not_post))
        .route("/lock/renew", post(renew).fallback(not_post))
        .route("/lock/release", post(release).fallback(not_post))
        .with_state(state)
}

async fn not_post() -> Line {
    Line(
        StatusCode::METHOD_NOT_ALLOWED,
        "ERR send a form with POST (CURL(url,form) does)".into(),
    )
}

/// A form, or the handler's answer: the `ERR` line that says why the body is not one (the
/// framework's own rejection text would reach the dialplan as if it were an answer).
fn form<T>(form: Result<Form<T>, FormRejection>) -> Result<T, Line> {
    form.map(|Form(form)| form).map_err(|rejection| {
        Line(
            StatusCode::BAD_REQUEST,
            format!(
                "ERR the body is not a form this endpoint reads ({}); send application/x-www-form-urlencoded fields, each once",
                one_line(&rejection.body_text())
            ),
        )
    })
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
        let err_text = err.to_string();
        match err {
            LockError::Held { holder, .. } => Line(StatusCode::CONFLICT, format!("BUSY {holder}")),
            LockError::Gone { .. } => Line(StatusCode::GONE, "GONE".into()),
            LockError::NotYours { resource } => Line(
                StatusCode::CONFLICT,
                format!("ERR {resource} is leased to another holder or token"),
            ),
            // The HTTP twin serves no order operation; these are here to be complete.
            LockError::NotWaiting { .. } => {
                Line(StatusCode::CONFLICT, format!("ERR {}", one_line(&err_text)))
            }
            LockError::QueueFull { .. } => Line(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("ERR {}", one_line(&err_text)),
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
// than the framework's own rejection body. The range is the backend's one check.
fn validity(ttl: Option<String>) -> Result<Option<Duration>, LockError> {
    let Some(ttl) = ttl.filter(|t| !t.trim().is_empty()) else {
        return Ok(None);
    };
    ttl.trim()
        .parse::<f64>()
        .ok()
        .filter(|seconds| *seconds > 0.0)
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .map(Some)
        .ok_or_else(|| {
            LockError::Invalid(format!(
                "`ttl` must be a number of seconds above 0, not {:?}",
                ttl.trim()
            ))
        })
}

fn token(token: Option<String>) -> Result<u64, LockError> {
    token
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| LockError::Invalid("`token` must be the number the claim returned".into()))
}

async fn acquire(
    State(state): State<HttpState>,
    body: Result<Form<ClaimForm>, FormRejection>,
) -> Result<Line, Line> {
    let form = form(body)?;
    let result = async {
        let claim = Claim {
            holder: &form.holder,
            attempt: &form.attempt,
            validity: validity(form.ttl)?.unwrap_or(state.default_validity),
        };
        state.locks.acquire(&form.resource, &claim).await
    }
    .await;
    Ok(match result {
        Ok(lease) => Line(StatusCode::OK, format!("OK {}", lease.token)),
        Err(err) => err.into(),
    })
}

async fn claim_first(
    State(state): State<HttpState>,
    body: Result<Form<ClaimForm>, FormRejection>,
) -> Result<Line, Line> {
    let form = form(body)?;
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
            validity: validity(form.ttl)?.unwrap_or(state.default_validity),
        };
        state.locks.claim_first(&candidates, &claim).await
    }
    .await;
    Ok(match result {
        Ok(Some(lease)) => Line(
            StatusCode::OK,
            format!("OK {} {}", lease.resource, lease.token),
        ),
        // Every candidate is held; there is no single holder to name.
        Ok(None) => Line(StatusCode::CONFLICT, "BUSY all".into()),
        Err(err) => err.into(),
    })
}

async fn renew(
    State(state): State<HttpState>,
    body: Result<Form<HeldForm>, FormRejection>,
) -> Result<Line, Line> {
    let form = form(body)?;
    let result = async {
        // Without a ttl a renewal keeps the lease's own validity.
        let validity = validity(form.ttl)?;
        state
            .locks
            .renew(&form.resource, &form.holder, token(form.token)?, validity)
            .await
    }
    .await;
    Ok(match result {
        Ok(lease) => Line(StatusCode::OK, format!("OK {}", lease.token)),
        Err(err) => err.into(),
    })
}

async fn release(
    State(state): State<HttpState>,
    body: Result<Form<HeldForm>, FormRejection>,
) -> Result<Line, Line> {
    let form = form(body)?;
    let result = async {
        state
            .locks
            .release(&form.resource, &form.holder, token(form.token)?)
            .await
    }
    .await;
    Ok(match result {
        Ok(()) => Line(StatusCode::OK, "OK released".into()),
        Err(err) => err.into(),
    })
}
