//! The supervisors' page at `/`: nodes, queues, agents, the autoscaler and the audit log,
//! live.
//!
//! A supervisor logs in with an API token (`POST /ui/login`), which is exchanged for a
//! session cookie (`HttpOnly`, `SameSite=Strict`): the token never stays in the browser.
//! The page reads one server-sent event stream (`GET /ui/events`) whose snapshots are
//! built once per [`FEED_EVERY`] for every open page together, only while one is open, so
//! 200 pages cost one snapshot, not 200.
//!
//! Actions go through the same service code as the API, under the token's name (so the
//! audit log says who), and need the role the API needs: pause, unpause and priorities
//! `write`, drain, undrain and the autoscaler's steering (pause, minimum and maximum of
//! extra nodes) `admin`; a `read` token sees and does nothing else. Every
//! request that changes something must carry the session's CSRF token in `X-CSRF-Token`:
//! a cross-site form cannot set a header, and `SameSite=Strict` keeps the cookie off
//! cross-site requests besides.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use callfleet_core::config::{ControlPlaneConfig, QueueAlert, Role};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;

use crate::auth::{Caller, random_hex};
use crate::error::ControlError;
use crate::service::Control;

/// How often the open pages get a fresh snapshot: a change reaches the screen within it
/// (and the page's own rendering).
pub const FEED_EVERY: Duration = Duration::from_millis(500);

/// The session cookie's name.
pub const COOKIE: &str = "callfleet_session";

/// How long a session lasts from its login (a supervisor's shift and some).
const SESSION_FOR: Duration = Duration::from_secs(12 * 3600);

/// The most sessions kept at once; the oldest goes first beyond it.
const MAX_SESSIONS: usize = 10_000;

/// Rows of the audit log a snapshot carries.
const AUDIT_ROWS: u32 = 20;

/// How far back the nodes' charts reach.
pub const HISTORY_WINDOW: Duration = Duration::from_secs(3 * 3600);

/// How long one read of the nodes' history serves every page: samples come every
/// `store.history_interval` (30 s by default), so a fresher read shows nothing new.
const HISTORY_FOR: Duration = Duration::from_secs(15);

const PAGE: &str = include_str!("dashboard.html");

#[derive(Debug, Clone)]
struct Session {
    caller: Caller,
    csrf: String,
    expires: Instant,
}

/// The page's state: sessions and the shared feed.
#[derive(Debug)]
pub struct Dashboard {
    control: Arc<Control>,
    sessions: Mutex<HashMap<String, Session>>,
    feed: watch::Sender<Arc<str>>,
    alerts: Alerts,
    history: tokio::sync::Mutex<Option<(Instant, Arc<str>)>>,
}

/// The queues' warning and critical thresholds.
#[derive(Debug)]
struct Alerts {
    default: QueueAlert,
    by_queue: std::collections::BTreeMap<String, QueueAlert>,
}

impl Alerts {
    fn of(&self, queue: &str) -> serde_json::Value {
        let alert = self.by_queue.get(queue).unwrap_or(&self.default);
        json!({
            "waiting_warning": alert.waiting_warning,
            "waiting_critical": alert.waiting_critical,
            "wait_warning_ms": alert.wait_warning.as_millis(),
            "wait_critical_ms": alert.wait_critical.as_millis(),
        })
    }
}

/// The routes of the page, with the queues' thresholds of `config`.
pub fn router(control: Arc<Control>, config: &ControlPlaneConfig) -> Router {
    let (feed, _) = watch::channel(Arc::<str>::from("{}"));
    let dashboard = Arc::new(Dashboard {
        control,
        sessions: Mutex::new(HashMap::new()),
        feed,
        alerts: Alerts {
            default: config.queue_alert,
            by_queue: config.queue_alerts.clone(),
        },
        history: tokio::sync::Mutex::new(None),
    });
    tokio::spawn(feed_loop(Arc::downgrade(&dashboard)));
    Router::new()
        .route("/", get(page))
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/session", get(session))
        .route("/ui/events", get(events))
        .route("/ui/history", get(history))
        .route("/ui/agents/{agent}/pause", post(pause))
        .route("/ui/agents/{agent}/unpause", post(unpause))
        .route("/ui/queues/{queue}/members/{agent}", put(set_priority))
        .route("/ui/nodes/{node}/drain", post(drain))
        .route("/ui/nodes/{node}/undrain", post(undrain))
        .route("/ui/autoscaler", put(set_autoscaler))
        .with_state(dashboard)
}

/// Builds a snapshot every [`FEED_EVERY`] while a page is open; ends with the router.
async fn feed_loop(dashboard: Weak<Dashboard>) {
    let mut ticker = tokio::time::interval(FEED_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(dashboard) = dashboard.upgrade() else {
            return;
        };
        if dashboard.feed.receiver_count() == 0 {
            continue;
        }
        match snapshot(&dashboard.control, &dashboard.alerts).await {
            Ok(json) => {
                dashboard.feed.send_replace(Arc::from(json));
            }
            Err(err) => {
                tracing::warn!(error = %err, "dashboard snapshot failed; pages keep the last one")
            }
        }
    }
}

/// Everything the page shows, as one JSON text.
///
/// The autoscaler's status adds three store reads and one question to the lock service,
/// asked together with the rest; the lock service's answer is bounded by the figures'
/// client deadline ([`crate::figures::LOCK_DEADLINE`]), after which the leader shows as
/// unknown rather than holding the snapshot back.
async fn snapshot(control: &Control, alerts: &Alerts) -> Result<String, ControlError> {
    let (nodes, audit, autoscaler) = tokio::join!(
        control.list_nodes(),
        control.audit(AUDIT_ROWS, None),
        control.autoscaler_status()
    );
    let view = control.view();
    let queues: Vec<serde_json::Value> = view
        .directory
        .queues
        .iter()
        .map(|queue| {
            let status = control.queue_status(&queue.id).ok();
            let members: Vec<serde_json::Value> = queue
                .members
                .iter()
                .map(|m| json!({ "agent": m.agent, "priority": m.priority }))
                .collect();
            json!({
                "id": queue.id,
                "name": queue.name,
                "status": status,
                "members": members,
                "alert": alerts.of(&queue.id),
            })
        })
        .collect();
    Ok(json!({
        "at_ms": view.now_ms(),
        "nodes": nodes?,
        "queues": queues,
        "agents": control.list_agents(),
        "audit": audit?,
        "autoscaler": autoscaler?,
    })
    .to_string())
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
            ),
        ],
        Html(PAGE),
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(dashboard): State<Arc<Dashboard>>,
    Json(form): Json<LoginForm>,
) -> Result<Response, ControlError> {
    let bearer = format!("Bearer {}", form.token.trim());
    let caller = dashboard
        .control
        .authorize(Some(bearer.as_bytes()), Role::Read)?;
    let id = random_hex(24).map_err(|err| ControlError::Unavailable(err.to_string()))?;
    let csrf = random_hex(24).map_err(|err| ControlError::Unavailable(err.to_string()))?;
    let answer = json!({ "name": caller.name, "role": caller.role, "csrf": csrf });
    {
        let now = Instant::now();
        let mut sessions = dashboard.sessions.lock().expect("sessions lock");
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            id.clone(),
            Session {
                caller,
                csrf,
                expires: now + SESSION_FOR,
            },
        );
    }
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_FOR.as_secs()
    );
    Ok(with_cookie(Json(answer).into_response(), &cookie))
}

fn with_cookie(mut response: Response, cookie: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

impl Dashboard {
    /// The session of the request's cookie, if it is live.
    fn session(&self, headers: &HeaderMap) -> Result<(String, Session), ControlError> {
        let id = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
            .ok_or(ControlError::NoSession)?;
        let sessions = self.sessions.lock().expect("sessions lock");
        let session = sessions
            .get(id)
            .filter(|s| s.expires > Instant::now())
            .ok_or(ControlError::NoSession)?;
        Ok((id.to_owned(), session.clone()))
    }

    /// The session, for a request that changes something: its CSRF token must come along,
    /// and its role must allow `needed`.
    fn acting(&self, headers: &HeaderMap, needed: Role) -> Result<(String, Caller), ControlError> {
        let (id, session) = self.session(headers)?;
        let presented = headers.get("x-csrf-token").and_then(|v| v.to_str().ok());
        if presented != Some(session.csrf.as_str()) {
            return Err(ControlError::CrossSite);
        }
        if !session.caller.role.allows(needed) {
            return Err(ControlError::Forbidden {
                name: session.caller.name,
                role: session.caller.role,
                needed,
            });
        }
        Ok((id, session.caller))
    }
}

async fn session(
    State(dashboard): State<Arc<Dashboard>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ControlError> {
    let (_, session) = dashboard.session(&headers)?;
    Ok(Json(json!({
        "name": session.caller.name,
        "role": session.caller.role,
        "csrf": session.csrf,
    })))
}

async fn logout(
    State(dashboard): State<Arc<Dashboard>>,
    headers: HeaderMap,
) -> Result<Response, ControlError> {
    let (id, _) = dashboard.acting(&headers, Role::Read)?;
    dashboard
        .sessions
        .lock()
        .expect("sessions lock")
        .remove(&id);
    let cookie = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    Ok(with_cookie(StatusCode::NO_CONTENT.into_response(), &cookie))
}

async fn events(
    State(dashboard): State<Arc<Dashboard>>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ControlError> {
    dashboard.session(&headers)?;
    let mut feed = dashboard.feed.subscribe();
    // The first event waits for a snapshot built for open pages, not the empty start.
    feed.mark_unchanged();
    let stream = futures_util::stream::unfold(feed, |mut feed| async move {
        feed.changed().await.ok()?;
        let json = feed.borrow_and_update().clone();
        Some((Ok::<_, Infallible>(Event::default().data(&*json)), feed))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Every node's calls and load of the last [`HISTORY_WINDOW`], for the charts: one read
/// per [`HISTORY_FOR`] serves every page.
async fn history(
    State(dashboard): State<Arc<Dashboard>>,
    headers: HeaderMap,
) -> Result<Response, ControlError> {
    dashboard.session(&headers)?;
    let mut cached = dashboard.history.lock().await;
    let fresh = cached
        .as_ref()
        .filter(|(at, _)| at.elapsed() < HISTORY_FOR)
        .map(|(_, json)| json.clone());
    let json = match fresh {
        Some(json) => json,
        None => {
            let nodes: serde_json::Map<String, serde_json::Value> = dashboard
                .control
                .node_history(HISTORY_WINDOW)
                .await?
                .into_iter()
                .map(|(node, samples)| {
                    // Columns rather than objects: a day of 100 nodes stays small.
                    let ago: Vec<u64> = samples.iter().map(|s| s.age_ms).collect();
                    let calls: Vec<u32> = samples.iter().map(|s| s.calls).collect();
                    let load: Vec<f64> = samples.iter().map(|s| s.load1).collect();
                    (
                        node.to_string(),
                        json!({ "ago_ms": ago, "calls": calls, "load1": load }),
                    )
                })
                .collect();
            let json: Arc<str> = Arc::from(
                json!({ "window_ms": HISTORY_WINDOW.as_millis(), "nodes": nodes }).to_string(),
            );
            *cached = Some((Instant::now(), json.clone()));
            json
        }
    };
    drop(cached);
    Ok((
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        json.to_string(),
    )
        .into_response())
}

#[derive(Deserialize)]
struct PauseForm {
    #[serde(default)]
    reason: String,
}

async fn pause(
    State(dashboard): State<Arc<Dashboard>>,
    Path(agent): Path<String>,
    headers: HeaderMap,
    Json(form): Json<PauseForm>,
) -> Result<StatusCode, ControlError> {
    let (_, caller) = dashboard.acting(&headers, Role::Write)?;
    let reason = if form.reason.trim().is_empty() {
        "supervisor"
    } else {
        form.reason.trim()
    };
    dashboard.control.pause(&caller, &agent, reason).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn unpause(
    State(dashboard): State<Arc<Dashboard>>,
    Path(agent): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ControlError> {
    let (_, caller) = dashboard.acting(&headers, Role::Write)?;
    dashboard.control.unpause(&caller, &agent).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct PriorityForm {
    priority: i32,
}

async fn set_priority(
    State(dashboard): State<Arc<Dashboard>>,
    Path((queue, agent)): Path<(String, String)>,
    headers: HeaderMap,
    Json(form): Json<PriorityForm>,
) -> Result<StatusCode, ControlError> {
    let (_, caller) = dashboard.acting(&headers, Role::Write)?;
    dashboard
        .control
        .set_priority(&caller, &agent, &queue, form.priority)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn drain(
    State(dashboard): State<Arc<Dashboard>>,
    Path(node): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ControlError> {
    set_drain(&dashboard, &node, &headers, true).await
}

async fn undrain(
    State(dashboard): State<Arc<Dashboard>>,
    Path(node): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ControlError> {
    set_drain(&dashboard, &node, &headers, false).await
}

async fn set_drain(
    dashboard: &Dashboard,
    node: &str,
    headers: &HeaderMap,
    drain: bool,
) -> Result<Json<serde_json::Value>, ControlError> {
    let (_, caller) = dashboard.acting(headers, Role::Admin)?;
    let state = dashboard.control.set_drain(&caller, node, drain).await?;
    Ok(Json(json!({ "node": node, "state": state })))
}

/// The whole steering, as `PUT /api/v1/autoscaler` takes it.
async fn set_autoscaler(
    State(dashboard): State<Arc<Dashboard>>,
    headers: HeaderMap,
    Json(steering): Json<callfleet_core::store::ScalerSteering>,
) -> Result<Json<crate::service::AutoscalerView>, ControlError> {
    let (_, caller) = dashboard.acting(&headers, Role::Admin)?;
    Ok(Json(
        dashboard.control.set_autoscaler(&caller, &steering).await?,
    ))
}
