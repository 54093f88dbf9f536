//! The control plane's `GET /metrics` (see `callfleet_core::metrics`): its requests by
//! route and status with their latency, its directory reads, and the queue and agent
//! figures Asterisk's own `res_prometheus` has none of. The figures are set from the
//! directory and the queue figures as last read, when Prometheus scrapes: nothing is
//! counted twice, and a scrape costs one pass over the agents.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use callfleet_core::metrics::{CONTENT_TYPE, render};
use metrics::{Counter, Histogram, counter, gauge, histogram};
use tower::{Layer, Service};

use crate::service::Control;

/// The states an agent is counted in, by `callfleet_agents`; `ringing` is an agent being
/// rung for a queued call, whatever its state.
const AGENT_STATES: [&str; 5] = ["available", "paused", "on_call", "wrap_up", "ringing"];

/// `GET /metrics`.
pub fn router(control: Arc<Control>) -> Router {
    callfleet_core::metrics::install();
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(control)
}

async fn scrape(State(control): State<Arc<Control>>) -> impl IntoResponse {
    record_figures(&control);
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], render())
}

/// Sets the queue and agent gauges from what the control plane knows now.
fn record_figures(control: &Control) {
    let agents = control.list_agents();
    let mut state_of: BTreeMap<&str, &str> = BTreeMap::new();
    let mut totals: BTreeMap<&str, u64> = AGENT_STATES.iter().map(|s| (*s, 0)).collect();
    for agent in &agents {
        let state = if agent.ringing_since_ms.is_some() {
            "ringing"
        } else {
            agent.state
        };
        state_of.insert(agent.agent.id.as_str(), state);
        *totals.entry(state).or_default() += 1;
    }
    for (state, count) in &totals {
        gauge!("callfleet_agents", "state" => *state).set(*count as f64);
    }
    let view = control.view();
    for queue in &view.directory.queues {
        let id = queue.id.clone();
        let mut members: BTreeMap<&str, u64> = AGENT_STATES.iter().map(|s| (*s, 0)).collect();
        for member in &queue.members {
            if let Some(state) = state_of.get(member.agent.as_str()) {
                *members.entry(state).or_default() += 1;
            }
        }
        for (state, count) in members {
            gauge!("callfleet_queue_agents", "queue" => id.clone(), "state" => state)
                .set(count as f64);
        }
        let Ok(status) = control.queue_status(&id) else {
            continue;
        };
        let known = |value: Option<u64>| value.map_or(f64::NAN, |v| v as f64);
        gauge!("callfleet_queue_waiting", "queue" => id.clone()).set(known(status.waiting));
        gauge!("callfleet_queue_longest_wait_seconds", "queue" => id.clone())
            .set(known(status.longest_wait_ms) / 1000.0);
        let today = [
            ("callfleet_queue_answered_today", status.answered_today),
            ("callfleet_queue_abandoned_today", status.abandoned_today),
            ("callfleet_queue_overflowed_today", status.overflowed_today),
            (
                "callfleet_queue_answered_within_sl_today",
                status.answered_within_sl_today,
            ),
        ];
        for (name, value) in today {
            gauge!(name, "queue" => id.clone()).set(f64::from(value));
        }
    }
}

/// Counts every request by its route's pattern (never its path: an agent id or a phone
/// number is not a label), method and status, and observes its latency. A layer of its
/// own rather than `middleware::from_fn`, which boxed the rest of the stack and its future
/// on every request.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrackLayer;

impl<S> Layer<S> for TrackLayer {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Track<S> {
        Track { inner }
    }
}

/// The service [`TrackLayer`] wraps a route in.
#[derive(Debug, Clone)]
pub struct Track<S> {
    inner: S,
}

impl<S> Service<Request> for Track<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Tracked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let route = request.extensions().get::<MatchedPath>().cloned();
        let method: &'static str = match request.method().as_str() {
            "GET" => "GET",
            "POST" => "POST",
            "PUT" => "PUT",
            "DELETE" => "DELETE",
            "HEAD" => "HEAD",
            "OPTIONS" => "OPTIONS",
            "PATCH" => "PATCH",
            _ => "other",
        };
        Tracked {
            answer: self.inner.call(request),
            route,
            method,
            started: Instant::now(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's answer in progress, recorded when it is ready.
    pub struct Tracked<F> {
        #[pin]
        answer: F,
        route: Option<MatchedPath>,
        method: &'static str,
        started: Instant,
    }
}

impl<F, E> Future for Tracked<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let answer = std::task::ready!(this.answer.poll(cx));
        if let Ok(response) = &answer {
            let route = this.route.as_ref().map_or("unmatched", MatchedPath::as_str);
            record_request(
                route,
                this.method,
                response.status().as_u16(),
                this.started.elapsed(),
            );
        }
        Poll::Ready(answer)
    }
}

/// One route's request metrics, made on its first request on each thread: a handle made
/// from labels builds the key and looks it up in the registry every time, which cost the
/// public status (answered from memory) a tenth of its time.
struct RouteMetrics {
    duration: Histogram,
    requests: HashMap<(&'static str, u16), Counter>,
}

thread_local! {
    /// Bounded by the routes' patterns, their methods and statuses.
    static ROUTES: RefCell<HashMap<Box<str>, RouteMetrics>> = RefCell::new(HashMap::new());
}

fn record_request(route: &str, method: &'static str, status: u16, took: Duration) {
    ROUTES.with_borrow_mut(|routes| {
        if !routes.contains_key(route) {
            let duration = histogram!(
                "callfleet_control_plane_request_duration_seconds",
                "route" => route.to_owned()
            );
            routes.insert(
                route.into(),
                RouteMetrics {
                    duration,
                    requests: HashMap::new(),
                },
            );
        }
        let Some(metrics) = routes.get_mut(route) else {
            return;
        };
        metrics.duration.record(took.as_secs_f64());
        metrics
            .requests
            .entry((method, status))
            .or_insert_with(|| {
                counter!(
                    "callfleet_control_plane_requests_total",
                    "route" => route.to_owned(),
                    "method" => method,
                    "status" => status.to_string()
                )
            })
            .increment(1);
    });
}
