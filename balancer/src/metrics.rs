//! The balancer's Prometheus metrics (see `callfleet_core::metrics`).
//!
//! The request path only adds to plain atomics ([`Tally`], the engine's counters, each
//! node's `routed`) and records its decision time on a histogram handle made once: no
//! registry lookup per message. [`publish`] copies the atomics into the recorder every
//! second, so a scrape is at most that much behind.
//!
//! Exported:
//! - `callfleet_balancer_requests_total{method, outcome}`: requests by what was done with
//!   them ([`Outcome`]); `method` is one of [`METHODS`].
//! - `callfleet_balancer_responses_total{outcome}`: responses received ([`ResponseOutcome`]).
//! - `callfleet_balancer_calls_routed_total{node}`: new calls sent to each node of the fleet
//!   (302 or local).
//! - `callfleet_balancer_retransmissions_absorbed_total`: INVITE retransmissions answered
//!   from a live or confirmed transaction.
//! - `callfleet_balancer_responses_resent_total`: responses resent on Timer G.
//! - `callfleet_balancer_transactions`: live INVITE transactions.
//! - `callfleet_balancer_decision_duration_seconds`: from taking an INVITE (new or
//!   retransmitted) off the transport to its answer or forward being ready.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use callfleet_core::NodeId;
use metrics::{Counter, Gauge, counter, gauge};
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::sip::Method;

/// How often the atomics are copied into the recorder.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Values of the `method` label: the methods the balancer tells apart, `other` for any
/// other token, `unknown` for a message too broken to say whether it is a request.
pub const METHODS: [&str; 7] = [
    "INVITE", "ACK", "CANCEL", "OPTIONS", "BYE", "other", "unknown",
];

/// Index of [`METHODS`]' `unknown`.
const UNKNOWN_METHOD: usize = 6;

fn method_index(method: Method) -> usize {
    match method {
        Method::Invite => 0,
        Method::Ack => 1,
        Method::Cancel => 2,
        Method::Options => 3,
        Method::Bye => 4,
        Method::Other => 5,
    }
}

/// What the balancer did with a request: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 302 to another node.
    Redirected,
    /// A new call for the local node: proxied to the local PBX, or 302 to it.
    Local,
    /// 486: every node of the call's pool is at capacity.
    Busy,
    /// 503: no node can take the call (an OPTIONS answered 503 too).
    NoNode,
    /// 503: the request waited longer than `overload_delay`, the balancer is behind.
    Overload,
    /// 503: the transaction table is full.
    TableFull,
    /// A retransmitted INVITE absorbed by its transaction (answer resent, or nothing).
    Retransmission,
    /// 200 (OPTIONS, or a CANCEL of a call we answered).
    Ok,
    /// 400: a request we can answer but not process.
    BadRequest,
    /// 403: from outside `balancer.allow`, with `deny_mode = "reject"`.
    Forbidden,
    /// 405: a method the balancer does not serve outside a dialog.
    NotAllowed,
    /// 416: a Request-URI scheme other than sip:.
    UnsupportedScheme,
    /// 420: a `Proxy-Require` the proxy cannot honour.
    BadExtension,
    /// 481: a CANCEL or in-dialog request that matches nothing.
    NoTransaction,
    /// 483: Max-Forwards exhausted.
    TooManyHops,
    /// 502: an in-dialog request whose next hop is not an IP address.
    BadGateway,
    /// 513: larger than `max_message`.
    TooLarge,
    /// Relayed statelessly (in-dialog requests, CANCELs and ACKs of proxied calls).
    Forwarded,
    /// An ACK that ends our transaction or goes nowhere; never answered.
    Absorbed,
    /// Not answered: unparsable, from outside `allow` with `deny_mode = "drop"`, or a
    /// defective ACK.
    Dropped,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Self; 20] = [
        Self::Redirected,
        Self::Local,
        Self::Busy,
        Self::NoNode,
        Self::Overload,
        Self::TableFull,
        Self::Retransmission,
        Self::Ok,
        Self::BadRequest,
        Self::Forbidden,
        Self::NotAllowed,
        Self::UnsupportedScheme,
        Self::BadExtension,
        Self::NoTransaction,
        Self::TooManyHops,
        Self::BadGateway,
        Self::TooLarge,
        Self::Forwarded,
        Self::Absorbed,
        Self::Dropped,
    ];

    /// The `outcome` label: the status code answered, with the reason for a 503, or a
    /// word when no status code says it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Redirected => "302",
            Self::Local => "local",
            Self::Busy => "486",
            Self::NoNode => "503_no_node",
            Self::Overload => "503_overload",
            Self::TableFull => "503_table_full",
            Self::Retransmission => "retransmission",
            Self::Ok => "200",
            Self::BadRequest => "400",
            Self::Forbidden => "403",
            Self::NotAllowed => "405",
            Self::UnsupportedScheme => "416",
            Self::BadExtension => "420",
            Self::NoTransaction => "481",
            Self::TooManyHops => "483",
            Self::BadGateway => "502",
            Self::TooLarge => "513",
            Self::Forwarded => "forwarded",
            Self::Absorbed => "absorbed",
            Self::Dropped => "dropped",
        }
    }
}

/// What the balancer did with a response: the `outcome` label of
/// `callfleet_balancer_responses_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseOutcome {
    /// Relayed towards the carrier (a PBX's answer to a proxied request).
    Forwarded,
    /// The local PBX's answer to our OPTIONS probe.
    Probe,
    /// Not ours, not addressable, or from outside `allow`.
    Dropped,
}

impl ResponseOutcome {
    /// Every outcome, in label order.
    pub const ALL: [Self; 3] = [Self::Forwarded, Self::Probe, Self::Dropped];

    /// The `outcome` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Probe => "probe",
            Self::Dropped => "dropped",
        }
    }
}

/// What became of one message, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// A request, by method (`None`: not even its start line could be read).
    Request(Option<Method>, Outcome),
    /// A response.
    Response(ResponseOutcome),
}

/// Messages by method and outcome, counted on the request path.
#[derive(Debug, Default)]
pub struct Tally {
    requests: [[AtomicU64; Outcome::ALL.len()]; METHODS.len()],
    responses: [AtomicU64; ResponseOutcome::ALL.len()],
}

impl Tally {
    /// Counts one message.
    pub fn count(&self, handled: Handled) {
        let cell = match handled {
            Handled::Request(method, outcome) => {
                &self.requests[method.map_or(UNKNOWN_METHOD, method_index)][outcome as usize]
            }
            Handled::Response(outcome) => &self.responses[outcome as usize],
        };
        cell.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests of `method` (`None`: unknown) that ended in `outcome` so far.
    pub fn requests(&self, method: Option<Method>, outcome: Outcome) -> u64 {
        self.requests[method.map_or(UNKNOWN_METHOD, method_index)][outcome as usize]
            .load(Ordering::Relaxed)
    }

    /// Responses that ended in `outcome` so far.
    pub fn responses(&self, outcome: ResponseOutcome) -> u64 {
        self.responses[outcome as usize].load(Ordering::Relaxed)
    }
}

/// The recorder's handles for what [`publish`] copies, made once.
struct Published {
    requests: Vec<(Counter, usize, usize)>,
    responses: Vec<(Counter, usize)>,
    retransmissions: Counter,
    resent: Counter,
    transactions: Gauge,
    /// Per node: its counter, and the node's `routed` when last copied.
    routed: HashMap<NodeId, (Counter, u64)>,
}

impl Published {
    /// Registers every series whose labels are known before any traffic.
    fn register() -> Self {
        let mut requests = Vec::with_capacity(METHODS.len() * Outcome::ALL.len());
        for (m, method) in METHODS.iter().enumerate() {
            for outcome in Outcome::ALL {
                let handle = counter!(
                    "callfleet_balancer_requests_total",
                    "method" => *method,
                    "outcome" => outcome.label()
                );
                requests.push((handle, m, outcome as usize));
            }
        }
        let responses = ResponseOutcome::ALL
            .iter()
            .map(|outcome| {
                let handle =
                    counter!("callfleet_balancer_responses_total", "outcome" => outcome.label());
                (handle, *outcome as usize)
            })
            .collect();
        Self {
            requests,
            responses,
            retransmissions: counter!("callfleet_balancer_retransmissions_absorbed_total"),
            resent: counter!("callfleet_balancer_responses_resent_total"),
            transactions: gauge!("callfleet_balancer_transactions"),
            routed: HashMap::new(),
        }
    }

    fn copy(&mut self, engine: &Engine) {
        let tally = &engine.tally;
        for (handle, m, o) in &self.requests {
            handle.absolute(tally.requests[*m][*o].load(Ordering::Relaxed));
        }
        for (handle, o) in &self.responses {
            handle.absolute(tally.responses[*o].load(Ordering::Relaxed));
        }
        let counters = &engine.counters;
        self.retransmissions
            .absolute(counters.retransmissions.load(Ordering::Relaxed));
        self.resent
            .absolute(counters.resent.load(Ordering::Relaxed));
        self.transactions.set(engine.transactions.len() as f64);
        let Some(view) = engine.view() else {
            return;
        };
        // A node's `routed` lives in the view and restarts at 0 when the node leaves the
        // store and comes back: the exported counter adds what it grew by since the last
        // copy, so it never goes back.
        self.routed
            .retain(|id, _| view.nodes.iter().any(|node| node.id == *id));
        for node in &view.nodes {
            let routed = node.routed.load(Ordering::Relaxed);
            let (handle, last) = self.routed.entry(node.id.clone()).or_insert_with(|| {
                let handle =
                    counter!("callfleet_balancer_calls_routed_total", "node" => node.id.to_string());
                (handle, 0)
            });
            handle.increment(routed.saturating_sub(*last));
            *last = routed;
        }
    }
}

/// Copies the engine's counts into the recorder now and every second until `shutdown`.
pub async fn publish(engine: Arc<Engine>, shutdown: CancellationToken) {
    let mut published = Published::register();
    let mut ticker = tokio::time::interval(PUBLISH_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => published.copy(&engine),
        }
    }
}
