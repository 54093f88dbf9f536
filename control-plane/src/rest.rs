//! REST/JSON under `/api/v1`, described by the OpenAPI document at `/api/v1/openapi.json`.
//!
//! Reads need a `read` token, changes a `write` token, node drains and the autoscaler's
//! steering an `admin` token; a
//! queue's candidates and a caller number's attributes may also be read with a `node` token
//! ([`crate::auth::CANDIDATE_READERS`], [`crate::auth::CALLER_LOOKUP`]), and what a node saw
//! when it rang an agent (`call-events`) or what became of a queued call (`call-outcomes`)
//! is written with a `node` token (or `admin`) only; only the public queue status is open,
//! because a website polls it (rate-limited per client address, [`crate::ratelimit`]).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use callfleet_core::config::Role;
use callfleet_core::store::directory::DEFAULT_SERVICE_LEVEL_MS;
use callfleet_core::store::{
    Agent, AgentState, CallEvent, CallEventOutcome, CallOutcome, Device, Queue, ScalerSteering,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::error::ControlError;
use crate::ratelimit::RateLimit;
use crate::service::{Control, CredentialsInput};

type Shared = State<Arc<Control>>;
type Reply = Result<Response, ControlError>;

fn caller(control: &Control, headers: &HeaderMap, role: Role) -> Result<Caller, ControlError> {
    control.authorize(
        headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
        role,
    )
}

fn ok(value: impl serde::Serialize) -> Reply {
    Ok(Json(value).into_response())
}

fn done() -> Reply {
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The JSON body, or a 400 that names what is wrong with it.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ControlError> {
    let hint = "send a JSON object as the OpenAPI document at /api/v1/openapi.json describes";
    let mut json = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut json).map_err(|err| {
        // The path names the field at fault (`priority`, `tags[2]`); `.` is the body
        // itself and `?` a place the parser never reached (truncated JSON).
        let path = err.path().to_string();
        let field = if path == "." || path.starts_with('?') {
            "body".to_owned()
        } else {
            path
        };
        ControlError::invalid(field, format!("{}; {hint}", err.inner()))
    })?;
    json.end()
        .map_err(|err| ControlError::invalid("body", format!("{err}; {hint}")))?;
    Ok(value)
}

/// The query parameters, or a 400 that names the one at fault (axum's own rejection is
/// plain text, and would come before the token check).
fn parameters<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ControlError> {
    query
        .map(|Query(value)| value)
        .map_err(|err| ControlError::invalid("query", err.body_text()))
}

/// The routes, under `/api/v1` (merged rather than nested: a nest rewrote every request's
/// URI and matched it twice); `status_limit` limits the public status. Unknown paths under
/// `/api/v1` get [`no_route`] from the control plane's fallback.
pub fn router(control: Arc<Control>, status_limit: Arc<RateLimit>) -> Router {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/agents", get(list_agents))
        .route(
            "/api/v1/agents/{agent}",
            get(get_agent).put(put_agent).delete(delete_agent),
        )
        .route("/api/v1/agents/{agent}/tags", put(set_tags))
        .route("/api/v1/agents/{agent}/daily-cap", put(set_daily_cap))
        .route("/api/v1/agents/{agent}/sales", post(record_sale))
        .route("/api/v1/agents/{agent}/login", post(login))
        .route("/api/v1/agents/{agent}/logout", post(logout))
        .route("/api/v1/agents/{agent}/pause", post(pause))
        .route("/api/v1/agents/{agent}/unpause", post(unpause))
        .route("/api/v1/agents/{agent}/call-events", post(call_event))
        .route("/api/v1/devices", get(list_devices))
        .route(
            "/api/v1/devices/{device}",
            put(put_device).delete(delete_device),
        )
        .route("/api/v1/queues", get(list_queues))
        .route(
            "/api/v1/queues/{queue}",
            put(put_queue).delete(delete_queue),
        )
        .route("/api/v1/queues/{queue}/members", get(list_members))
        .route(
            "/api/v1/queues/{queue}/members/{agent}",
            put(set_priority).delete(remove_member),
        )
        .route(
            "/api/v1/queues/{queue}/status",
            get(
                move |control: Shared, peer: Option<Extension<ConnectInfo<SocketAddr>>>, queue| {
                    queue_status(control, peer, queue, status_limit)
                },
            ),
        )
        .route("/api/v1/queues/{queue}/candidates", get(candidates))
        .route("/api/v1/queues/{queue}/call-outcomes", post(call_outcome))
        .route("/api/v1/nodes", get(list_nodes))
        .route("/api/v1/nodes/{node}/drain", post(drain))
        .route("/api/v1/nodes/{node}/undrain", post(undrain))
        .route("/api/v1/autoscaler", get(autoscaler).put(set_autoscaler))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/callers", get(list_callers))
        .route(
            "/api/v1/callers/{number}",
            get(get_caller).delete(remove_caller),
        )
        .route(
            "/api/v1/callers/{number}/attributes",
            put(set_caller_attributes),
        )
        .with_state(control)
}

/// A path under `/api/v1` that names no route.
pub fn no_route(method: &axum::http::Method, path: &str) -> Response {
    ControlError::NotFound(format!(
        "no route `{method} {path}`; the routes are listed in /api/v1/openapi.json"
    ))
    .into_response()
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::DOCUMENT,
    )
        .into_response()
}

async fn list_agents(State(control): Shared, headers: HeaderMap) -> Reply {
    caller(&control, &headers, Role::Read)?;
    ok(control.list_agents())
}

async fn get_agent(State(control): Shared, headers: HeaderMap, Path(agent): Path<String>) -> Reply {
    caller(&control, &headers, Role::Read)?;
    ok(control.get_agent(&agent).await?)
}

/// The body of `PUT /agents/{agent}`: the id comes from the path.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentBody {
    name: String,
    #[serde(default)]
    tags: BTreeSet<String>,
    #[serde(default)]
    daily_cap: Option<u32>,
    #[serde(default = "yes")]
    enabled: bool,
}

fn yes() -> bool {
    true
}

async fn put_agent(
    State(control): Shared,
    headers: HeaderMap,
    Path(agent): Path<String>,
    bytes: axum::body::Bytes,
) -> Reply {
    let caller = caller(&control, &headers, Role::Write)?;
    let body: AgentBody = body(&bytes)?;
    let agent = Agent {
        id: agent,
        name: body.name,
        tags: body.tags,
        daily_cap: body.daily_cap,
        enabled: body.enabled,
    };
    ok(control.put_agent(&caller, &agent).await?)
}

async fn delete_agent(
    State(control): Shared,
    headers: HeaderMap,
    Path(agent): Path<String>,
) -> Reply {
    let caller = caller(&control, &headers, Role::Write)?;
    control.delete_agent(&caller, &agent).await?;
    done()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TagsBody {
    tags: Vec<String>,
}

async fn set_tags(
    State(control): Shared,
    headers: HeaderMap,
    Path(agent): Path<String>,
    bytes: axum::body::Bytes,
) -> Reply {
    let caller = caller(&control, &headers, Role::Write)?;
    let body: TagsBody = body(&bytes)?;
    ok(control.set_tags(&caller, &agent, body.tags).await?)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CapBody {
    // Required: `null` removes the cap, but a body that forgot the field must not (serde
    // reads a missing plain `Option` as `None`; with `deserialize_with` it is an error).
    #[serde(deserialize_with = "Option::deserialize")]
    daily_cap: Option<u32>,
}

async fn set_daily_cap(
    State(control): Shared,
    headers: HeaderMap,
    Path(agent): Path<String>,
    bytes: axum::body::Bytes,
) -> Reply {
    let caller = caller(&control, &headers, Role::Write)?;
    let body: CapBody = body(&bytes)?;
    ok(control
        .set_daily_cap(&caller, &agent, body.daily_cap)
        .await?)
}

/// The `Idempotency-Key` header: with it, a retry (after a lost answer) counts once.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ControlError> {
    headers
        .get("idempotency-key")
        .map(|value| {
            value.to_str().map_err(|_| {
                ControlError::invalid("Idempotency-Key", "must be printable ASCII (a UUID fits)")
            })
        })
        .transpose()
}

async fn record_sale(
    State(control): Shared,
    headers: HeaderMap,
    Path(agent): Path<String>,
) -> Reply {
    let caller = caller(&control, &headers, Role::Write)?;
    let request_id = idempotency_key(&headers)?;
    let sales = control.record_sale(&caller, &agent, request_id).await?;
    ok(json!({ "agent": agent, "sales_today": sales }))
}

/// The body of `POST /agents/{agent}/call-events`. One flat object rather than a tagged
/// enum, so that a missing or stray field is named in the error with what its `event`
/// needs (serde's tagged enums report errors without the field's path).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallEventBody {
    event: CallEventKind,
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    wrap_up_ms: Option<u64>,
    #[serde(default)]
    max_misses: Option<u32>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum CallEventKind {
    Ringing,
    Answered,
    Ended,
    Missed,
    RingEnded,
}

impl CallEventBody {
    /// The event, or a 400 naming the field its kind lacks or does not take.
    fn event(self) -> Result<CallEvent, ControlError> {
        let (kind, fields) = match self.event {
            CallEventKind::Ringing => ("ringing", "queue"),
            CallEventKind::Answered => ("answered", "queue"),
            CallEventKind::Ended => ("ended", "wrap_up_ms"),
            CallEventKind::Missed => ("missed", "queue and max_misses"),
            CallEventKind::RingEnded => ("ring_ended", ""),
        };
        let stray = |field: &str| {
            let send = if fields.is_empty() {
                "send the event alone".to_owned()
            } else {
                format!("send {fields} only")
            };
            ControlError::invalid(
                field,
                format!("the `{kind}` event takes no {field}; {send}"),
            )
        };
        let missing = |field: &str, example: &str| {
            ControlError::invalid(
                field,
                format!("the `{kind}` event needs {field}, e.g. \"{field}\": {example}"),
            )
        };
        match self.event {
            CallEventKind::Ringing | CallEventKind::Answered => {
                if self.wrap_up_ms.is_some() {
                    return Err(stray("wrap_up_ms"));
                }
                if self.max_misses.is_some() {
                    return Err(stray("max_misses"));
                }
                let queue = self.queue.ok_or_else(|| missing("queue", "\"sales\""))?;
                if matches!(self.event, CallEventKind::Ringing) {
                    Ok(CallEvent::Ringing { queue })
                } else {
                    Ok(CallEvent::Answered { queue })
                }
            }
            CallEventKind::RingEnded => {
                if self.queue.is_some() {
                    return Err(stray("queue"));
                }
                if self.wrap_up_ms.is_some() {
                    return Err(stray("wrap_up_ms"));
                }
                if self.max_misses.is_some() {
                    return Err(stray("max_misses"));
                }
                Ok(CallEvent::RingEnded)
            }
            CallEventKind::Ended => {
                if self.queue.is_some() {
                    return Err(stray("queue"));
                }
                if self.max_misses.is_some() {
                    return Err(stray("max_misses"));
                }
                let ms = self
                    .wrap_up_ms
                    .ok_or_else(|| missing("wrap_up_ms", "30000 (0: available at once)"))?;
                Ok(CallEvent::Ended {
                    wrap_up: std::time::Duration::from_millis(ms),
                })
            }
            CallEventKind::Missed => {
                if self.wrap_up_ms.is_some() {
                    return Err(stray("wrap_up_ms"));
                }
                let queue = self.queue.ok_or_else(|| missing("queue", "\"sales\""))?;
                let max_misses = self.max_misses.ok_or_else(|| missing("max_misses", "3"))?;
                Ok(CallEvent::Missed { queue, max_misses })
            }
        }
    }
}

async fn call_event(
    State(control): Shared,
    headers: HeaderMap,
    Path(agent): Path<String>,
    bytes: axum::body::Bytes,
) -> Reply {
    // A node-agent's token (or an admin's): CRMs and supervisors change agents through
    // pause and unpause, and a CRM that could report calls could skew the ring order.
    let caller = caller(&control, &headers, Role::Node)?;
    let body: CallEventBody = body(&bytes)?;
    let event = body.event()?;
    let request_id = idempotency_key(&headers)?;
    let outcome = control
        .call_event(&caller, &agent, &event, request_id)
        .await?;
    ok(match outcome {
        CallEventOutcome::Answered { calls_today } => {
            json!({ "agent": agent, "calls_today": calls_today })
        }
        // The state as the agent views show it (`state`, `pause_reason`), with the end of a
        // wrap-up, which a node needs to know when the agent rings again.
        CallEventOutcome::Ended { state } => match state {
            AgentState::Paused { reason } => {
                json!({ "agent": agent, "state": "paused", "pause_reason": reason })
            }
            AgentState::WrapUp { until_ms } => {
                json!({ "agent": agent, "state": "wrap_up", "until_ms": until_ms })
            }
            other => json!({ "agent": agent, "state": other.as_str() }),
        },
        CallEventOutcome::Missed {
            missed_today,
            misses_in_row,
            paused,
        } => json!({
            "agent": agent,
            "missed_today": missed_today,
            "misses_in_row": misses_in_row,
            "paused": paused,
        }),
        // The ring as the agent views show it.
        CallEventOutcome::Ringing { since_ms } => {
            json!({ "agent": agent, "ringing_since_ms": since_ms })
        }
        CallEventOutcome::RingEnded => json!({ "agent": agent, "ringing_since_ms": null }),
    })
}

/// The body of `POST /queues/{queue}/call-outcomes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallOutcomeBody {
    /// `answered`, `abandoned` or `overflowed`.
    outcome: CallOutcome,
    /// How long the caller waited in the queue (to the answer, the hang-up or the
    /// overflow).
    waited_ms: u64,
}

async fn call_outcome(
    State(control): Shared,
    headers: HeaderMap,
    Path(queue): Path<String>,
    bytes: axum::body::Bytes,
) -> Reply {
    // A node-agent's token (or an admin's), as for call events: the figures are the
    // center's own record of its calls, not something a CRM reports.
    let caller = caller(&control, &headers, Role::Node)?;
    let body: CallOutcomeBody = body(&bytes)?;
    let request_id = idempotency_key(&headers)?;
    let counts = control
        .call_outcome(
            &caller,
            &queue,
            body.outcome,
            std::time::Duration::from_millis(body.waited_ms),
            request_id,
        )
        .await?;
    ok(json!({
        "queue": queue,
        "answered_today": counts.answered,
        "abandoned_today": counts.abandoned,
        "overflowed_today": counts.overflowed,
        "answered_within_sl_today": counts.answered_within_sl,
        "service_level_pct_today": counts.service_level_pct(),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    device: String,
}

async fn login(
    State(control): Shared,
    headers: HeaderMap,
    Path(agent): Path<String>,
    bytes: axum::body::Bytes,
) -> Reply {
    let caller = caller(&control, &headers, Role::Write)?;
    let body: LoginBody = body(&bytes)?;
    let (login, session) = control.login(&caller, &agent, &body.device).await?;
    let mut reply = serde_json::to_value(&session).unwrap_or(Value::Null);
    if let (Value::Object(map), Ok(Value::Object(extra))) =
        (&mut reply, serde_json::to_value(&login))
    {
        map.extend(extra);
    }
    ok(reply)
}

async fn logout(State(control): Shared, headers: HeaderMap, Path(agent): Path<String>) -> Reply {
    let caller = caller(&control, &headers, Role::Write)?;
    let left = control.logout(&caller, &agent).await?;
    ok(json!({ "agent": agent, "left_device": left }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PauseBody {
    reason: String,
}

async fn pause(
    State(control): Shared,
    headers: HeaderMap,
    Path(agent): Path<String>,
    bytes: axum::body::Bytes,
) -> Reply {
    let caller = caller(&control, &headers, Role::Write)?;
    let body: PauseBody = body(&bytes)?;
    control.pause(&caller, &agent, &body.reason).await?;
    done()
}

async fn unpause(State(control): Shared, headers: HeaderMap, Path(agent): Path<String>) -> Reply {
    let caller = caller(&control, &headers, Role::Write)?;
    control.unpause(&caller, &agent).await?;
    done()
}

async fn list_devices(State(control): Shared, headers: HeaderMap) -> Reply {
    caller(&control, &headers, Role::Read)?;
    ok(control.list_devices().await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceBody {
    endpoint: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    contact: Option<String>,
    /// Absent: keep the credentials; `null`: remove them; a string: set them.
    #[serde(default, deserialize_with = "present")]
    password: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    md5_cred: Option<Option<String>>,
    #[serde(default)]
    realm: Option<String>,
}

/// Tells a field sent as `null` (`Some(None)`) from one left out (`None`, the default).
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

async fn put_device(
    State(control): Shared,
    headers: HeaderMap,
    Path(device): Path<String>,
    bytes: axum::body::Bytes,
) -> Reply {
    let caller = caller(&control, &headers, Role::Write)?;
    let body: DeviceBody = body(&bytes)?;
    let device = Device {
        id: device,
        endpoint: body.endpoint,
        name: body.name,
        contact: body.contact,
        registers: false,
    };
    let credentials = CredentialsInput {
        password: body.password,
        md5_cred: body.md5_cred,
        realm: body.realm,
    };
    ok(control.put_device(&caller, &device, credentials).await?)
}

async fn delete_device(
    State(control): Shared,
    headers: HeaderMap,
    Path(device): Path<String>,
) -> Reply {
    let caller = caller(&control, &headers, Role::Write)?;
    control.delete_device(&caller, &device).await?;
    done()
}

async fn list_queues(State(control): Shared, headers: HeaderMap) -> Reply {
    caller(&control, &headers, Role::Read)?;
    ok(control.list_queues().await?)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueBody {
    name: String,
    /// Absent: the default, as PUT replaces the queue's settings.
    #[serde(default = "default_service_level_ms")]
    service_level_ms: u32,
}

fn default_service_level_ms() -> u32 {
    DEFAULT_SERVICE_LEVEL_MS
}

async fn put_queue(
    State(control): Shared,
    headers: HeaderMap,
    Path(queue): Path<String>,
    bytes: axum::body::Bytes,
) -> Reply {
    let caller = caller(&control, &headers, Role::Write)?;
    let body: QueueBody = body(&bytes)?;
    let queue = Queue {
        id: queue,
        name: body.name,
        service_level_ms: body.service_level_ms,
    };
    ok(control.put_queue(&caller, &queue).await?)
}

async fn delete_queue(
    State(control): Shared,
    headers: HeaderMap,
    Path(queue): Path<String>,
) -> Reply {
    let caller = caller(&control, &headers, Role::Write)?;
    control.delete_queue(&caller, &queue).await?;
    done()
}

async fn list_members(
    State(control): Shared,
    headers: HeaderMap,
    Path(queue): Path<String>,
) -> Reply {
    caller(&control, &headers, Role::Read)?;
    ok(control.list_members(&queue).await?)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriorityBody {
    priority: i32,
}

async fn set_priority(
    State(control): Shared,
    headers: HeaderMap,
    Path((queue, agent)): Path<(String, String)>,
    bytes: axum::body::Bytes,
) -> Reply {
    let caller = caller(&control, &headers, Role::Write)?;
    let body: PriorityBody = body(&bytes)?;
    control
        .set_priority(&caller, &agent, &queue, body.priority)
        .await?;
    ok(json!({ "queue": queue, "agent": agent, "priority": body.priority }))
}

async fn remove_member(
    State(control): Shared,
    headers: HeaderMap,
    Path((queue, agent)): Path<(String, String)>,
) -> Reply {
    let caller = caller(&control, &headers, Role::Write)?;
    control.remove_member(&caller, &agent, &queue).await?;
    done()
}

/// Public: no token. Served from memory, figures included (see [`crate::figures`]).
/// Rate-limited per client address by `limit`, here rather than in a middleware layer, which
/// cost the route an allocation per request.
async fn queue_status(
    State(control): Shared,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    Path(queue): Path<String>,
    limit: Arc<RateLimit>,
) -> Reply {
    if let Err(limited) = limit.admit(peer.as_ref().map(|Extension(peer)| peer)) {
        return Ok(limited.into_response());
    }
    let body = control.queue_status_json(&queue)?;
    // A website's visitors all ask the same: a cache in front (or the browser) may answer
    // for a second, which is also how often the directory is re-read.
    Ok((
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "public, max-age=1"),
        ],
        body,
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
struct CandidatesQuery {
    /// Comma-separated caller attributes, e.g. `vip,fr`.
    #[serde(default)]
    attributes: String,
    /// Also the agents whose wrap-up ends within this many ms, each with its `free_at_ms`
    /// (for a node that caches the answer that long).
    #[serde(default)]
    within_ms: u64,
}

async fn candidates(
    State(control): Shared,
    headers: HeaderMap,
    Path(queue): Path<String>,
    query: Result<Query<CandidatesQuery>, QueryRejection>,
) -> Reply {
    control.authorize_candidates(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()))?;
    let query = parameters(query)?;
    let attributes: Vec<String> = query
        .attributes
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect();
    /// Serialized straight from the candidates, without an intermediate JSON tree (the
    /// answer for a big queue has thousands of entries).
    #[derive(serde::Serialize)]
    struct Candidates<'a> {
        queue: &'a str,
        candidates: Vec<crate::service::Candidate>,
    }
    let candidates =
        control.candidates_ahead(&queue, &attributes, Duration::from_millis(query.within_ms))?;
    ok(Candidates {
        queue: &queue,
        candidates,
    })
}

async fn list_nodes(State(control): Shared, headers: HeaderMap) -> Reply {
    caller(&control, &headers, Role::Read)?;
    ok(control.list_nodes().await?)
}

async fn drain(State(control): Shared, headers: HeaderMap, Path(node): Path<String>) -> Reply {
    let caller = caller(&control, &headers, Role::Admin)?;
    let state = control.set_drain(&caller, &node, true).await?;
    ok(json!({ "node": node, "state": state }))
}

async fn undrain(State(control): Shared, headers: HeaderMap, Path(node): Path<String>) -> Reply {
    let caller = caller(&control, &headers, Role::Admin)?;
    let state = control.set_drain(&caller, &node, false).await?;
    ok(json!({ "node": node, "state": state }))
}

async fn autoscaler(State(control): Shared, headers: HeaderMap) -> Reply {
    caller(&control, &headers, Role::Read)?;
    ok(control.autoscaler_status().await?)
}

/// The body is the whole steering: a field left out takes its default (not paused, no
/// minimum, the configured maximum), as PUT replaces.
async fn set_autoscaler(
    State(control): Shared,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> Reply {
    let caller = caller(&control, &headers, Role::Admin)?;
    let steering: ScalerSteering = body(&bytes)?;
    ok(control.set_autoscaler(&caller, &steering).await?)
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    #[serde(default = "hundred")]
    limit: u32,
    #[serde(default)]
    before: Option<i64>,
}

fn hundred() -> u32 {
    100
}

async fn audit(
    State(control): Shared,
    headers: HeaderMap,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Reply {
    caller(&control, &headers, Role::Read)?;
    let query = parameters(query)?;
    ok(control.audit(query.limit, query.before).await?)
}

/// The body of `PUT /callers/{number}/attributes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerAttributesBody {
    attributes: Vec<String>,
}

async fn set_caller_attributes(
    State(control): Shared,
    headers: HeaderMap,
    Path(number): Path<String>,
    bytes: axum::body::Bytes,
) -> Reply {
    let caller = caller(&control, &headers, Role::Write)?;
    let body: CallerAttributesBody = body(&bytes)?;
    ok(control
        .set_caller_attributes(&caller, &number, body.attributes)
        .await?)
}

async fn remove_caller(
    State(control): Shared,
    headers: HeaderMap,
    Path(number): Path<String>,
) -> Reply {
    let caller = caller(&control, &headers, Role::Write)?;
    control.remove_caller(&caller, &number).await?;
    done()
}

/// A number no list names answers 200 with no attributes, not 404: it is an ordinary
/// caller, which is an answer (a node-agent caches it like any other), not a mistake.
async fn get_caller(
    State(control): Shared,
    headers: HeaderMap,
    Path(number): Path<String>,
) -> Reply {
    control.authorize_caller_lookup(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()))?;
    ok(control.caller_attributes(&number).await?)
}

#[derive(Debug, Deserialize)]
struct CallersQuery {
    #[serde(default = "hundred")]
    limit: u32,
    #[serde(default)]
    after: Option<String>,
}

async fn list_callers(
    State(control): Shared,
    headers: HeaderMap,
    query: Result<Query<CallersQuery>, QueryRejection>,
) -> Reply {
    caller(&control, &headers, Role::Read)?;
    let query = parameters(query)?;
    ok(control
        .list_callers(query.after.as_deref(), query.limit)
        .await?)
}
