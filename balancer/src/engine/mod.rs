//! What the balancer does with one received message, independent of the transport.
//!
//! [`Engine::handle`] turns bytes from a source into [`Action`]s (a reply, a forwarded
//! message) that the UDP and TCP adapters carry out. It reads the fleet view and the
//! transaction table and never waits on anything else.
//!
//! As a proxy (`local_mode = "proxy"`) it is stateless (RFC 3261 §16.11): the local PBX is
//! the only place an INVITE is forwarded to, so a CANCEL or the ACK of a non-2xx response
//! that matches no live transaction (its INVITE's entry ended at Timer H while the PBX
//! kept ringing) is relayed there too, with the branch the INVITE got: our branch is a
//! hash of the request's transaction identity that is the same in every run. When the
//! carrier came over TCP, the PBX leg stays on UDP and we record-route twice (RFC 5658):
//! the PBX sees our UDP address first, the carrier our `transport=tcp` one, which names
//! the carrier's connection so in-dialog requests from the PBX go back over it.

use std::fmt::Write as _;
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use callfleet_core::config::{BalancerConfig, DenyMode, LocalMode};
use callfleet_core::net::Cidr;
use callfleet_core::{ConfigError, NodeId};

use crate::metrics::{Handled, Outcome, ResponseOutcome, Tally};
use crate::route::{Choice, FleetView, PoolMap, Scoring, Trust};
use crate::sip::{
    self, Framing, Header, HeaderName, Message, Method, ParseError, Request, StartLine, Transport,
    Uri, Via, addr_uri, print, split_values,
};
use crate::transaction::{Acked, Existing, Id, Kind, Room, Transaction, Transactions};

/// Branches of requests we forward start with this, so responses to them are recognised.
const OUR_BRANCH: &[u8] = b"z9hG4bKcf";
/// Branches of our OPTIONS probes to the local PBX.
const PROBE_BRANCH: &[u8] = b"z9hG4bKcfprobe";
/// Parameter of our Via, and of our carrier-side Record-Route, naming the TCP connection a
/// request came in on.
const CONN_PARAM: &str = "cfconn";
const ALLOW: &[u8] = b"Allow: INVITE, ACK, CANCEL, OPTIONS, BYE\r\n";
/// How long an answer to a probe keeps the local PBX counted alive (three probes).
const PBX_ALIVE_FOR: Duration = Duration::from_secs(6);

/// Something a transport must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Answer the requester: over UDP to `to`, over TCP on the connection it came on.
    Reply {
        /// UDP destination (RFC 3261 §18.2.2, RFC 3581).
        to: SocketAddr,
        /// The response.
        bytes: Vec<u8>,
    },
    /// Send a forwarded message.
    Forward {
        /// Destination; with `tcp`, the peer address of the connection to send it on.
        to: SocketAddr,
        /// Over the TCP connection from `to`.
        tcp: bool,
        /// With `tcp`, where to open a new connection when the one from `to` has closed
        /// (ours idle, the carrier's restarted): the peer's listening address, from its
        /// Contact or Route for a request (RFC 3261 §18.1.1), from its Via for a response
        /// (§18.2.2). `None`: no better address than `to` is known.
        reconnect: Option<SocketAddr>,
        /// The message.
        bytes: Vec<u8>,
    },
    /// The stream's framing is lost: close the connection after the replies.
    Close,
}

/// Counters of everything the balancer did; read for logs and metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// New INVITE transactions.
    pub invites: AtomicU64,
    /// 302 to another node.
    pub redirected: AtomicU64,
    /// Proxied or redirected to the local PBX.
    pub local: AtomicU64,
    /// 503 because no node could take the call.
    pub unavailable: AtomicU64,
    /// 486 because every node of the call's pool was at capacity.
    pub busy: AtomicU64,
    /// Retransmitted requests absorbed by a live or confirmed transaction.
    pub retransmissions: AtomicU64,
    /// Responses resent on Timer G.
    pub resent: AtomicU64,
    /// ACKs absorbed.
    pub acks: AtomicU64,
    /// CANCELs answered or forwarded.
    pub cancels: AtomicU64,
    /// OPTIONS answered.
    pub options: AtomicU64,
    /// Messages forwarded statelessly (requests and responses).
    pub forwarded: AtomicU64,
    /// Messages we could not parse or address, and stray responses.
    pub malformed: AtomicU64,
    /// Requests from outside the allow-list.
    pub denied: AtomicU64,
    /// Requests answered 503 because the balancer was behind.
    pub overload: AtomicU64,
    /// INVITEs answered 503 without state because the transaction table was full.
    pub table_full: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// `(name, value)` of every counter.
    pub fn snapshot(&self) -> [(&'static str, u64); 15] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("invites", get(&self.invites)),
            ("redirected", get(&self.redirected)),
            ("local", get(&self.local)),
            ("unavailable", get(&self.unavailable)),
            ("busy", get(&self.busy)),
            ("retransmissions", get(&self.retransmissions)),
            ("resent", get(&self.resent)),
            ("acks", get(&self.acks)),
            ("cancels", get(&self.cancels)),
            ("options", get(&self.options)),
            ("forwarded", get(&self.forwarded)),
            ("malformed", get(&self.malformed)),
            ("denied", get(&self.denied)),
            ("overload", get(&self.overload)),
            ("table_full", get(&self.table_full)),
        ]
    }
}

/// The configuration, prepared for the request path.
#[derive(Debug)]
struct Settings {
    local: NodeId,
    local_mode: LocalMode,
    local_pbx: SocketAddr,
    /// Where the local PBX's messages may come from (any port).
    pbx: Vec<Cidr>,
    /// `host:port` we put in Via and Record-Route.
    advertise: String,
    /// `SIP/2.0/UDP host:port`: our Via on what we send over UDP.
    via_udp: Vec<u8>,
    /// `SIP/2.0/TCP host:port`: our Via on what we send over TCP.
    via_tcp: Vec<u8>,
    /// `<sip:host:port;lr>`: our Record-Route towards the PBX (and a UDP carrier).
    record_route: Vec<u8>,
    contacts: usize,
    retry_after: Vec<u8>,
    max_message: usize,
    allow: Vec<Cidr>,
    deny_mode: DenyMode,
    scoring: Scoring,
    stale_grace: Duration,
    overload_delay: Duration,
    pools: PoolMap,
}

/// The balancer's state shared by all workers.
#[derive(Debug)]
pub struct Engine {
    settings: Settings,
    view: RwLock<Option<Arc<FleetView>>>,
    /// The last read of the store failed; set and cleared by the refresh task.
    store_down: AtomicBool,
    /// Until when (ms since `started`) the local PBX counts as alive.
    pbx_alive_until_ms: AtomicU64,
    started: Instant,
    /// Live INVITE transactions.
    pub transactions: Transactions,
    /// What happened so far.
    pub counters: Counters,
    /// Messages by method and outcome.
    pub tally: Tally,
    /// Time taken over each INVITE; made once, so recording looks nothing up.
    decision_time: metrics::Histogram,
    tags: std::hash::RandomState,
}

impl Engine {
    /// Prepares the engine; fails on configuration it cannot use, or that would send
    /// carriers or the PBX an address they cannot reach.
    pub fn new(config: &BalancerConfig, local: NodeId) -> Result<Self, ConfigError> {
        config.validate_for_serving()?;
        let local_pbx: SocketAddr = config.local_pbx.parse().map_err(|_| ConfigError::Value {
            key: "balancer.local_pbx".into(),
            reason: format!("`{}` must be ip:port", config.local_pbx),
        })?;
        let allow = config
            .allow
            .iter()
            .map(|entry| Cidr::parse(entry))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|reason| ConfigError::Value {
                key: "balancer.allow".into(),
                reason,
            })?;
        let pbx = pbx_networks(config, local_pbx)?;
        let advertise = config.advertised().to_owned();
        Ok(Self {
            settings: Settings {
                local,
                local_mode: config.local_mode,
                local_pbx,
                pbx,
                via_udp: format!("SIP/2.0/UDP {advertise}").into_bytes(),
                via_tcp: format!("SIP/2.0/TCP {advertise}").into_bytes(),
                record_route: format!("<sip:{advertise};lr>").into_bytes(),
                advertise,
                contacts: config.contacts as usize,
                retry_after: format!("Retry-After: {}\r\n", config.retry_after).into_bytes(),
                max_message: config.max_message,
                allow,
                deny_mode: config.deny_mode,
                scoring: Scoring {
                    heartbeat_ttl: config.heartbeat_ttl,
                    cpu_weight: config.cpu_weight,
                },
                stale_grace: config.stale_grace,
                overload_delay: config.overload_delay,
                pools: PoolMap::new(config.pools.clone()),
            },
            view: RwLock::new(None),
            store_down: AtomicBool::new(false),
            pbx_alive_until_ms: AtomicU64::new(0),
            started: Instant::now(),
            transactions: Transactions::new(config.max_transactions),
            counters: Counters::default(),
            tally: Tally::default(),
            decision_time: metrics::histogram!("callfleet_balancer_decision_duration_seconds"),
            tags: std::hash::RandomState::new(),
        })
    }

    /// The current fleet view.
    pub fn view(&self) -> Option<Arc<FleetView>> {
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Installs a freshly read fleet view.
    pub fn set_view(&self, view: FleetView) {
        *self.view.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(view));
    }

    /// Records whether the store answered the last refresh.
    pub fn set_store_down(&self, down: bool) {
        self.store_down.store(down, Ordering::Relaxed);
    }

    /// The local node's id.
    pub fn local_node(&self) -> &NodeId {
        &self.settings.local
    }

    /// Where OPTIONS probes and proxied calls go.
    pub fn local_pbx(&self) -> SocketAddr {
        self.settings.local_pbx
    }

    /// Whether `ip` is one the local PBX sends from (`balancer.pbx_addresses`): its
    /// messages pass the allow-list, its in-dialog requests may go to carriers, its answers
    /// to our probes count. Any port: a PBX answers from another transport, and over TCP
    /// from an ephemeral port.
    pub fn is_pbx(&self, ip: IpAddr) -> bool {
        self.settings.pbx.iter().any(|net| net.contains(ip))
    }

    /// An OPTIONS probe for the local PBX; its answer keeps the PBX counted alive, which
    /// matters once the store has been away longer than `stale_grace`.
    pub fn probe(&self, sequence: u64) -> Vec<u8> {
        let settings = &self.settings;
        let pbx = settings.local_pbx;
        let mut out = Vec::with_capacity(320);
        let _ = write!(
            Bytes(&mut out),
            "OPTIONS sip:{pbx} SIP/2.0\r\nVia: SIP/2.0/UDP {advertise};branch={branch}{sequence}\r\n\
             From: <sip:callfleet@{advertise}>;tag=probe\r\nTo: <sip:{pbx}>\r\n\
             Call-ID: probe-{sequence}@{advertise}\r\nCSeq: {sequence} OPTIONS\r\nMax-Forwards: 1\r\n\
             Content-Length: 0\r\n\r\n",
            advertise = settings.advertise,
            branch = String::from_utf8_lossy(PROBE_BRANCH),
        );
        out
    }

    fn mark_pbx_alive(&self, now: Instant, for_how_long: Duration) {
        let until = now.saturating_duration_since(self.started) + for_how_long;
        self.pbx_alive_until_ms
            .store(until.as_millis() as u64, Ordering::Relaxed);
    }

    fn trust(&self, view: &FleetView, now: Instant) -> Trust {
        if !self.store_down.load(Ordering::Relaxed) {
            Trust::Full
        } else if now.saturating_duration_since(view.read_at) <= self.settings.stale_grace {
            Trust::LastKnown
        } else {
            let now_ms = now.saturating_duration_since(self.started).as_millis() as u64;
            Trust::LocalOnly {
                pbx_alive: now_ms < self.pbx_alive_until_ms.load(Ordering::Relaxed),
            }
        }
    }

    /// Handles one message from `source` that arrived over `transport` and waited `queued`
    /// in the kernel before we saw it.
    pub fn handle(
        &self,
        bytes: &[u8],
        source: SocketAddr,
        transport: Transport,
        now: Instant,
        queued: Duration,
        actions: &mut Vec<Action>,
    ) {
        let handled = self.handle_message(bytes, source, transport, now, queued, actions);
        self.tally.count(handled);
        if let Handled::Request(Some(Method::Invite), _) = handled {
            // Timed from `now`, when the transport took the message (a UDP batch's last
            // message waited for the others, as its caller did), which saves a clock read
            // (50 ns on a VM). Only INVITEs: the wait a caller hears as post-dial delay.
            self.decision_time
                .record(Instant::now().saturating_duration_since(now));
        }
    }

    fn handle_message(
        &self,
        bytes: &[u8],
        source: SocketAddr,
        transport: Transport,
        now: Instant,
        queued: Duration,
        actions: &mut Vec<Action>,
    ) -> Handled {
        let settings = &self.settings;
        let allowed = settings.allow.is_empty()
            || settings.allow.iter().any(|net| net.contains(source.ip()))
            || self.is_pbx(source.ip());
        let malformed = |method| {
            Counters::bump(if allowed {
                &self.counters.malformed
            } else {
                &self.counters.denied
            });
            Handled::Request(method, Outcome::Dropped)
        };
        let message = match sip::parse(bytes, Framing::Datagram) {
            Ok(Some(message)) => message,
            Ok(None) | Err(_) => return malformed(None),
        };
        let method = match message.start {
            StartLine::Request { method, .. } => Method::from_bytes(method),
            StartLine::Response { .. } if allowed => {
                return Handled::Response(self.handle_response(&message, source, now, actions));
            }
            StartLine::Response { .. } => {
                Counters::bump(&self.counters.denied);
                return Handled::Response(ResponseOutcome::Dropped);
            }
        };
        let Ok(request) = Request::from_message(message) else {
            return malformed(Some(method));
        };
        let done = |outcome| Handled::Request(Some(method), outcome);
        let reply_to = reply_address(&request.via, source, transport);
        let mut ctx = Ctx {
            engine: self,
            request: &request,
            source,
            reply_to,
            transport,
            actions,
        };
        if !allowed {
            Counters::bump(&self.counters.denied);
            if settings.deny_mode == DenyMode::Reject && request.method != Method::Ack {
                ctx.reply(403, "Forbidden", b"");
                return done(Outcome::Forbidden);
            }
            return done(Outcome::Dropped);
        }
        if bytes.len() > settings.max_message {
            Counters::bump(&self.counters.malformed);
            let outcome = if request.method == Method::Ack {
                Outcome::Dropped
            } else {
                ctx.reply(513, "Message Too Large", b"");
                Outcome::TooLarge
            };
            if transport == Transport::Tcp {
                ctx.actions.push(Action::Close);
            }
            return done(outcome);
        }
        if let Some(defect) = request.defect {
            Counters::bump(&self.counters.malformed);
            let outcome = if request.method == Method::Ack {
                // Never answered.
                Outcome::Dropped
            } else if defect == ParseError::UnsupportedScheme {
                // RFC 3261 §8.2.2.1: the sender may retry with a sip: URI.
                ctx.reply(416, "Unsupported URI Scheme", b"");
                Outcome::UnsupportedScheme
            } else {
                let reason = format!("Bad Request ({defect})");
                ctx.reply(400, &reason, b"");
                Outcome::BadRequest
            };
            if transport == Transport::Tcp && request.message.defect.is_some() {
                ctx.actions.push(Action::Close);
            }
            return done(outcome);
        }
        let behind = queued > settings.overload_delay;
        done(ctx.dispatch(now, behind))
    }

    fn handle_response(
        &self,
        message: &Message<'_>,
        source: SocketAddr,
        now: Instant,
        actions: &mut Vec<Action>,
    ) -> ResponseOutcome {
        let mut vias = message
            .headers_named(HeaderName::Via)
            .flat_map(|h| split_values(h.value));
        let ours = vias.next().and_then(|v| Via::parse(v).ok()).filter(|via| {
            via.sent_by() == self.settings.advertise.as_bytes()
                && via.branch.is_some_and(|b| b.starts_with(OUR_BRANCH))
        });
        let Some(ours) = ours else {
            Counters::bump(&self.counters.malformed);
            return ResponseOutcome::Dropped;
        };
        if ours.branch.is_some_and(|b| b.starts_with(PROBE_BRANCH)) {
            // A PBX that answers 5xx (503 while it shuts down or is overloaded) cannot take
            // calls; any 2xx–4xx says its SIP stack is up and serving.
            let serving = matches!(message.start, StartLine::Response { code, .. } if (200..500).contains(&code));
            if serving && self.is_pbx(source.ip()) {
                self.mark_pbx_alive(now, PBX_ALIVE_FOR);
            }
            return ResponseOutcome::Probe;
        }
        let next = vias.next().and_then(|v| Via::parse(v).ok());
        if let Some(to) = conn_param(&ours.raw[ours.params_at..]) {
            let mut bytes = Vec::new();
            print::forward_response(message, &mut bytes);
            Counters::bump(&self.counters.forwarded);
            actions.push(Action::Forward {
                to,
                tcp: true,
                reconnect: next.as_ref().and_then(via_listener),
                bytes,
            });
            return ResponseOutcome::Forwarded;
        }
        let Some(next) = next else {
            Counters::bump(&self.counters.malformed);
            return ResponseOutcome::Dropped;
        };
        let Some(to) = via_destination(&next) else {
            Counters::bump(&self.counters.malformed);
            return ResponseOutcome::Dropped;
        };
        let mut bytes = Vec::new();
        print::forward_response(message, &mut bytes);
        Counters::bump(&self.counters.forwarded);
        let tcp = next.transport == Transport::Tcp;
        actions.push(Action::Forward {
            to,
            tcp,
            reconnect: if tcp { via_listener(&next) } else { None },
            bytes,
        });
        ResponseOutcome::Forwarded
    }

    fn is_us(&self, uri: &Uri<'_>) -> bool {
        let advertise = self.settings.advertise.as_bytes();
        let Some((host, port)) = sip::split_host_port(advertise) else {
            return false;
        };
        uri.host.eq_ignore_ascii_case(host) && uri.port.unwrap_or(5060) == port.unwrap_or(5060)
    }
}

/// The networks the local PBX sends from: `balancer.pbx_addresses`, or by default the
/// address of `local_pbx` and, when that is a loopback or wildcard address (a PBX on this
/// host), every address of this host: such a PBX answers from whichever of them routes
/// towards us (our advertised address, for instance), not from the one we send to.
fn pbx_networks(config: &BalancerConfig, local_pbx: SocketAddr) -> Result<Vec<Cidr>, ConfigError> {
    if !config.pbx_addresses.is_empty() {
        return config
            .pbx_addresses
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                Cidr::parse(entry).map_err(|reason| ConfigError::Value {
                    key: format!("balancer.pbx_addresses[{i}]"),
                    reason,
                })
            })
            .collect();
    }
    let ip = local_pbx.ip();
    let mut addresses = vec![ip];
    if ip.is_loopback() || ip.is_unspecified() {
        addresses.extend(host_addresses());
    }
    addresses.sort();
    addresses.dedup();
    Ok(addresses
        .into_iter()
        .filter_map(|ip| Cidr::parse(&ip.to_string()).ok())
        .collect())
}

/// The addresses of this host's interfaces (none if they cannot be listed).
pub fn host_addresses() -> Vec<IpAddr> {
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    interfaces
        .filter_map(|interface| {
            let address = interface.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .collect()
}

/// One request being handled.
struct Ctx<'e, 'r, 'a> {
    engine: &'e Engine,
    request: &'r Request<'a>,
    source: SocketAddr,
    reply_to: SocketAddr,
    transport: Transport,
    actions: &'e mut Vec<Action>,
}

impl Ctx<'_, '_, '_> {
    fn dispatch(&mut self, now: Instant, behind: bool) -> Outcome {
        let engine = self.engine;
        let request = self.request;
        let id = Id {
            branch: request.via.branch,
            sent_by: request.via.sent_by(),
            call_id: request.call_id,
            from_tag: request.from_tag,
            cseq: request.cseq,
        };
        let key = engine.transactions.key(&id);
        let ours = self.our_routes();
        match request.method {
            Method::Ack => {
                let timer_i = self.transport == Transport::Udp;
                let acked = engine.transactions.ack(key, now, timer_i);
                // An ACK that may travel no further is dropped: it gets no 483
                // (RFC 3261 §16.3 step 3, and an ACK is never answered).
                let spent = request.max_forwards == Some(0);
                match acked {
                    Acked::Ours => Self::absorb_ack(engine),
                    _ if spent => Self::absorb_ack(engine),
                    Acked::Proxied => self.forward_to_pbx(&id, ours),
                    Acked::Unknown if request.to_tag.is_some() && ours > 0 => {
                        self.forward_in_dialog(&id, ours)
                    }
                    // The ACK of a non-2xx answer from the PBX after its INVITE's entry
                    // ended: a stateless proxy relays it where the INVITE went.
                    Acked::Unknown if engine.proxies_calls() && !self.to_tag_is_ours() => {
                        self.forward_to_pbx(&id, ours)
                    }
                    // An ACK never gets a response; one for our own answer whose
                    // transaction has ended, or one we cannot place, is dropped.
                    Acked::Unknown => Self::absorb_ack(engine),
                }
            }
            _ if request.to_tag.is_some() && ours > 0 => {
                if request.max_forwards == Some(0) {
                    self.reply(483, "Too Many Hops", b"");
                    Outcome::TooManyHops
                } else if let Some(unsupported) = self.proxy_require() {
                    self.reply(420, "Bad Extension", &unsupported);
                    Outcome::BadExtension
                } else {
                    self.forward_in_dialog(&id, ours)
                }
            }
            Method::Cancel => {
                Counters::bump(&engine.counters.cancels);
                match engine.transactions.kind(key) {
                    Some(Kind::Answered { .. }) => {
                        self.reply(200, "OK", b"");
                        Outcome::Ok
                    }
                    // Relayed like its INVITE, without our Route (RFC 3261 §9.1: a CANCEL's
                    // Route is its INVITE's): the PBX matches it by our branch, or answers
                    // 481 if it never had the call.
                    Some(Kind::Proxied) => self.relay_cancel(&id, ours),
                    None if engine.proxies_calls() => self.relay_cancel(&id, ours),
                    None => {
                        self.reply(481, "Call/Transaction Does Not Exist", b"");
                        Outcome::NoTransaction
                    }
                }
            }
            Method::Options => {
                Counters::bump(&engine.counters.options);
                if engine.can_route(now) {
                    self.reply(200, "OK", ALLOW);
                    Outcome::Ok
                } else {
                    self.reply(503, "Service Unavailable", &engine.settings.retry_after);
                    Outcome::NoNode
                }
            }
            _ if request.to_tag.is_some() => {
                self.reply(481, "Call/Transaction Does Not Exist", b"");
                Outcome::NoTransaction
            }
            Method::Invite => {
                if request.max_forwards == Some(0) {
                    self.reply(483, "Too Many Hops", b"");
                    Outcome::TooManyHops
                } else {
                    self.invite(&id, key, now, behind, ours)
                }
            }
            Method::Bye | Method::Other => {
                self.reply(405, "Method Not Allowed", ALLOW);
                Outcome::NotAllowed
            }
        }
    }

    fn absorb_ack(engine: &Engine) -> Outcome {
        Counters::bump(&engine.counters.acks);
        Outcome::Absorbed
    }

    fn invite(
        &mut self,
        id: &Id<'_>,
        key: u64,
        now: Instant,
        behind: bool,
        ours: usize,
    ) -> Outcome {
        let engine = self.engine;
        let retransmit = self.transport == Transport::Udp;
        let destination = self.reply_to;
        let counters = &engine.counters;
        let (decision, outcome) = engine.transactions.invite(
            key,
            now,
            |existing| {
                Counters::bump(&counters.retransmissions);
                let decision = match existing {
                    Existing::Live(t) if t.kind == Kind::Proxied => Decision::Local,
                    Existing::Live(t) => Decision::Reply(t.response.to_vec()),
                    // ACKed: the INVITE is a late copy of one already answered.
                    Existing::Confirmed => Decision::Absorb,
                };
                (decision, Outcome::Retransmission)
            },
            |room| {
                if room == Room::Full {
                    // No state, no retransmissions: the carrier is told once to go
                    // elsewhere, as when the balancer is behind.
                    Counters::bump(&counters.table_full);
                    let refusal =
                        self.response(503, "Service Unavailable", &engine.settings.retry_after);
                    return (None, (Decision::Reply(refusal), Outcome::TableFull));
                }
                Counters::bump(&counters.invites);
                let (decision, outcome) = if behind {
                    // Sending the carrier elsewhere now beats a late answer after its
                    // retransmissions have doubled our load.
                    Counters::bump(&counters.overload);
                    let refusal =
                        self.response(503, "Service Unavailable", &engine.settings.retry_after);
                    (Decision::Reply(refusal), Outcome::Overload)
                } else {
                    self.decide(now)
                };
                let (kind, response) = match &decision {
                    Decision::Reply(bytes) => {
                        (Kind::Answered { retransmit }, Arc::from(&bytes[..]))
                    }
                    Decision::Local | Decision::Absorb => (Kind::Proxied, Arc::default()),
                };
                let transaction = Transaction::new(response, destination, kind, now);
                (Some(transaction), (decision, outcome))
            },
        );
        match decision {
            Decision::Local => {
                self.forward_to_pbx(id, ours);
            }
            Decision::Reply(bytes) => self.actions.push(Action::Reply {
                to: self.reply_to,
                bytes,
            }),
            Decision::Absorb => {}
        }
        outcome
    }

    /// Chooses where a new call goes: the response to send, or the local PBX to proxy to.
    fn decide(&self, now: Instant) -> (Decision, Outcome) {
        let engine = self.engine;
        let settings = &engine.settings;
        let uri = Uri::parse(self.request.uri).ok();
        let pool = settings
            .pools
            .pool_for(uri.map_or(&b""[..], |u| u.host), uri.and_then(|u| u.user));
        let mut chosen = [Choice { index: 0 }; 9];
        let wanted = settings.contacts.min(chosen.len());
        let Some(view) = engine.view() else {
            Counters::bump(&engine.counters.unavailable);
            let refusal = self.response(503, "Service Unavailable", &settings.retry_after);
            return (Decision::Reply(refusal), Outcome::NoNode);
        };
        let trust = engine.trust(&view, now);
        let found = view.choose(pool, settings.scoring, trust, now, &mut chosen[..wanted]);
        if found == 0 {
            return self.refuse(&view, pool, trust, now);
        }
        let first = &view.nodes[chosen[0].index];
        let transport_param = if self.transport == Transport::Tcp {
            ";transport=tcp"
        } else {
            ""
        };
        let mut contacts = Vec::with_capacity(64 * found);
        let outcome = if first.local {
            Counters::bump(&engine.counters.local);
            if settings.local_mode == LocalMode::Proxy {
                return match self.proxy_require() {
                    Some(unsupported) => (
                        Decision::Reply(self.response(420, "Bad Extension", &unsupported)),
                        Outcome::BadExtension,
                    ),
                    None => (Decision::Local, Outcome::Local),
                };
            }
            let pbx = settings.local_pbx.to_string();
            print::contact(&mut contacts, uri.as_ref(), &pbx, transport_param, None);
            Outcome::Local
        } else {
            Counters::bump(&engine.counters.redirected);
            for (rank, choice) in chosen[..found].iter().enumerate() {
                let node = &view.nodes[choice.index];
                let q = (found > 1).then(|| 10 - rank.min(9));
                print::contact(
                    &mut contacts,
                    uri.as_ref(),
                    &node.target,
                    transport_param,
                    q,
                );
            }
            Outcome::Redirected
        };
        let redirect = self.response(302, "Moved Temporarily", &contacts);
        (Decision::Reply(redirect), outcome)
    }

    /// The answer when no node of `pool` can take the call. `Retry-After` on a 503 tells
    /// an RFC 3261 client (§21.5.4) to send this balancer nothing at all for that long, so
    /// it is only given when the balancer could not serve any call (what OPTIONS answers
    /// 503 to). Nodes of the pool that are up but at capacity are the callee being busy:
    /// 486, which no client takes as a verdict on the server. A pool with no node up while
    /// others can take calls gets 503 without Retry-After: this call may be tried at the
    /// next balancer, the next call comes here again.
    fn refuse(
        &self,
        view: &FleetView,
        pool: &callfleet_core::PoolName,
        trust: Trust,
        now: Instant,
    ) -> (Decision, Outcome) {
        let engine = self.engine;
        let settings = &engine.settings;
        if view.pool_full(pool, settings.scoring, trust, now) {
            Counters::bump(&engine.counters.busy);
            let busy = self.response(486, "Busy Here", b"");
            return (Decision::Reply(busy), Outcome::Busy);
        }
        Counters::bump(&engine.counters.unavailable);
        let retry_after: &[u8] = if view.can_route(settings.scoring, trust, now) {
            b""
        } else {
            &settings.retry_after
        };
        let refusal = self.response(503, "Service Unavailable", retry_after);
        (Decision::Reply(refusal), Outcome::NoNode)
    }

    /// The To-tag we put in our responses to this request's transaction.
    fn our_tag(&self) -> [u8; 16] {
        let request = self.request;
        let tag =
            self.engine
                .tags
                .hash_one((request.call_id, request.from_tag, request.via.branch));
        let mut text = [0u8; 16];
        hex(tag, &mut text);
        text
    }

    fn to_tag_is_ours(&self) -> bool {
        self.request.to_tag == Some(&self.our_tag()[..])
    }

    /// The `Unsupported` header a proxy owes a request whose `Proxy-Require` names
    /// extensions (RFC 3261 §16.3 step 5): this balancer forwards statelessly and
    /// implements none. Option tags that are not tokens are left out, never echoed.
    fn proxy_require(&self) -> Option<Vec<u8>> {
        let mut tags = self
            .request
            .message
            .headers_named(HeaderName::ProxyRequire)
            .flat_map(|h| h.value.split(|b| *b == b','))
            .map(sip::trim)
            .filter(|tag| !tag.is_empty())
            .peekable();
        tags.peek()?;
        let mut out = b"Unsupported: ".to_vec();
        let mut first = true;
        for tag in tags.filter(|tag| tag.iter().all(|b| sip::is_token(*b))) {
            if !first {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(tag);
            first = false;
        }
        if first {
            return Some(Vec::new());
        }
        out.extend_from_slice(b"\r\n");
        Some(out)
    }

    fn response(&self, code: u16, reason: &str, extra: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        print::response(
            self.request,
            self.source,
            code,
            reason,
            &self.our_tag(),
            extra,
            &mut out,
        );
        out
    }

    fn reply(&mut self, code: u16, reason: &str, extra: &[u8]) {
        let bytes = self.response(code, reason, extra);
        self.actions.push(Action::Reply {
            to: self.reply_to,
            bytes,
        });
    }

    /// How many of the first Route values name this balancer: 0, 1, or 2 when we
    /// record-routed twice (RFC 5658).
    fn our_routes(&self) -> usize {
        self.request
            .message
            .headers_named(HeaderName::Route)
            .flat_map(|h| split_values(h.value))
            .take(2)
            .take_while(|value| {
                Uri::parse(addr_uri(value)).is_ok_and(|uri| self.engine.is_us(&uri))
            })
            .count()
    }

    /// An in-dialog request routed through us: from the PBX it goes to the next Route or
    /// the Request-URI (the carrier), over the carrier's TCP connection when our Route
    /// names one; from anywhere else to the local PBX, never further, so the balancer
    /// cannot be used as an open relay. When we record-routed twice, the order of our two
    /// values says which way the request goes, whatever its source: a carrier on the
    /// PBX's host puts our carrier-side value (the one naming its connection) first.
    fn forward_in_dialog(&mut self, id: &Id<'_>, ours: usize) -> Outcome {
        let engine = self.engine;
        let mut routes = self
            .request
            .message
            .headers_named(HeaderName::Route)
            .flat_map(|h| split_values(h.value));
        let mut our_values = routes.by_ref().take(ours).map(|v| conn_param(addr_uri(v)));
        let carrier_side_first = our_values.next().flatten().is_some();
        let connection = our_values.flatten().next();
        if carrier_side_first || !engine.is_pbx(self.source.ip()) {
            return self.forward_to_pbx(id, ours);
        }
        let target = routes.next().map_or(self.request.uri, addr_uri);
        let target = Uri::parse(target).ok();
        if let Some(connection) = connection {
            // Should the carrier's connection be gone, its own address takes a new one.
            let listener = target.as_ref().and_then(uri_destination).map(|(to, _)| to);
            return self.forward(
                id,
                connection,
                Leg::Tcp {
                    reconnect: listener,
                },
                ours,
            );
        }
        if target.is_some_and(|uri| engine.is_us(&uri)) {
            // Addressed to us: from a carrier on the PBX's host (the ACK of a non-2xx
            // answer keeps the INVITE's Request-URI, ours), on its way to the PBX.
            return self.forward_to_pbx(id, ours);
        }
        match target.and_then(|uri| uri_destination(&uri)) {
            Some((to, true)) => self.forward(
                id,
                to,
                Leg::Tcp {
                    reconnect: Some(to),
                },
                ours,
            ),
            Some((to, false)) => self.forward(id, to, Leg::Udp, ours),
            None => {
                self.reply(502, "Bad Gateway (next hop is not an IP address)", b"");
                Outcome::BadGateway
            }
        }
    }

    fn relay_cancel(&mut self, id: &Id<'_>, ours: usize) -> Outcome {
        if self.request.max_forwards == Some(0) {
            self.reply(483, "Too Many Hops", b"");
            Outcome::TooManyHops
        } else {
            self.forward_to_pbx(id, ours)
        }
    }

    fn forward_to_pbx(&mut self, id: &Id<'_>, ours: usize) -> Outcome {
        self.forward(id, self.engine.settings.local_pbx, Leg::Udp, ours)
    }

    /// Forwards the request statelessly to `to` (for a TCP leg, over the connection from
    /// `to`, or a new one to the address the leg holds), without its first `ours` Route
    /// values. Our branch is a stable hash of the request's transaction identity, so a
    /// retransmission, the CANCEL and the ACK of a non-2xx answer get the INVITE's branch,
    /// in this run or the next.
    fn forward(&mut self, id: &Id<'_>, to: SocketAddr, leg: Leg, ours: usize) -> Outcome {
        let (tcp, reconnect) = match leg {
            Leg::Udp => (false, None),
            Leg::Tcp { reconnect } => (true, reconnect),
        };
        let engine = self.engine;
        let settings = &engine.settings;
        let request = self.request;
        let mut branch = Vec::with_capacity(OUR_BRANCH.len() + 48);
        branch.extend_from_slice(OUR_BRANCH);
        let mut digits = [0u8; 16];
        hex(id.stable_hash(), &mut digits);
        branch.extend_from_slice(&digits);
        if self.transport == Transport::Tcp {
            // Stateless, we remember nothing: our Via carries the carrier's connection so
            // the PBX's responses, which echo it, find their way back onto it.
            let _ = write!(Bytes(&mut branch), ";{CONN_PARAM}=\"{}\"", self.source);
        }
        let initial_invite = request.method == Method::Invite && request.to_tag.is_none();
        let tcp_record_route;
        let record_route = match (initial_invite, self.transport) {
            (false, _) => None,
            (true, Transport::Tcp) => {
                // RFC 5658: the PBX (first in its route set) reaches us over UDP, the
                // carrier (ours is first in its reversed set) over TCP, and in-dialog
                // requests from the PBX go back on the connection named here.
                tcp_record_route = format!(
                    "{}, <sip:{};transport=tcp;lr;{CONN_PARAM}={}>",
                    String::from_utf8_lossy(&settings.record_route),
                    settings.advertise,
                    self.source
                );
                Some(tcp_record_route.as_bytes())
            }
            (true, _) => Some(settings.record_route.as_slice()),
        };
        let stripped;
        let (request, drop_top_route) = match ours {
            0 => (request, false),
            1 => (request, true),
            _ => {
                stripped = without_first_route(request);
                (&stripped, true)
            }
        };
        let mut bytes = Vec::new();
        print::forward_request(
            request,
            self.source,
            if tcp {
                &settings.via_tcp
            } else {
                &settings.via_udp
            },
            &branch,
            record_route,
            drop_top_route,
            &mut bytes,
        );
        Counters::bump(&engine.counters.forwarded);
        self.actions.push(Action::Forward {
            to,
            tcp,
            reconnect,
            bytes,
        });
        Outcome::Forwarded
    }
}

impl Engine {
    /// Whether this balancer forwards calls to a PBX (proxy mode, and its own node is in
    /// the fleet): then a CANCEL or ACK that matches nothing may belong to a call it
    /// proxied longer ago than Timer H. A balancer whose node is no PBX node has proxied
    /// nothing, and answers such a CANCEL 481 itself.
    fn proxies_calls(&self) -> bool {
        self.settings.local_mode == LocalMode::Proxy
            && self
                .view()
                .is_some_and(|view| view.nodes.iter().any(|node| node.local))
    }

    /// Whether any call could be routed now (OPTIONS answers 200).
    fn can_route(&self, now: Instant) -> bool {
        self.view()
            .is_some_and(|view| view.can_route(self.settings.scoring, self.trust(&view, now), now))
    }
}

/// How a forwarded request travels.
#[derive(Debug, Clone, Copy)]
enum Leg {
    Udp,
    /// Over the TCP connection from the destination, or a new one to `reconnect`.
    Tcp {
        reconnect: Option<SocketAddr>,
    },
}

/// Where a new call goes.
enum Decision {
    /// Send this response (302, 486 or 503).
    Reply(Vec<u8>),
    /// Proxy to the local PBX (only in `local_mode = "proxy"`).
    Local,
    /// Nothing: a retransmission of an INVITE already answered and ACKed.
    Absorb,
}

/// `request` with its first Route value removed (the first of two of ours; the printer
/// drops the second).
fn without_first_route<'a>(request: &Request<'a>) -> Request<'a> {
    let mut request = request.clone();
    let headers: &mut Vec<Header<'a>> = &mut request.message.headers;
    if let Some(at) = headers.iter().position(|h| h.name == HeaderName::Route) {
        let value = headers[at].value;
        let rest = split_values(value).nth(1).and_then(|second| {
            let offset = (second.as_ptr() as usize).wrapping_sub(value.as_ptr() as usize);
            value.get(offset..)
        });
        match rest {
            Some(rest) => headers[at].value = rest,
            None => {
                headers.remove(at);
            }
        }
    }
    request
}

/// The connection named by our `cfconn` parameter among `;`-parameters in `text` (a Via's
/// or a Route URI's).
fn conn_param(text: &[u8]) -> Option<SocketAddr> {
    let params = &text[memchr::memchr(b';', text)?..];
    sip::Params::new(params)
        .find(|(name, _)| name.eq_ignore_ascii_case(CONN_PARAM.as_bytes()))
        .and_then(|(_, value)| value)
        .and_then(|value| std::str::from_utf8(value).ok())
        .and_then(|value| value.trim_matches('"').parse::<SocketAddr>().ok())
}

/// Where a UDP response goes: the source address, and the source port only when the client
/// asked for it with `rport` (RFC 3581); otherwise the Via's port (RFC 3261 §18.2.2).
fn reply_address(via: &Via<'_>, source: SocketAddr, transport: Transport) -> SocketAddr {
    if transport == Transport::Tcp || via.rport.is_some() {
        return source;
    }
    SocketAddr::new(source.ip(), via.port.unwrap_or(5060))
}

/// Where a TCP client listens, for a response whose connection has closed (RFC 3261
/// §18.2.2): the address it sent from (`received`) on the port of its sent-by.
fn via_listener(via: &Via<'_>) -> Option<SocketAddr> {
    Some(SocketAddr::new(via_ip(via)?, via.port.unwrap_or(5060)))
}

/// Where a response goes next, from the Via below ours.
fn via_destination(via: &Via<'_>) -> Option<SocketAddr> {
    let port = via.rport.flatten().or(via.port).unwrap_or(5060);
    Some(SocketAddr::new(via_ip(via)?, port))
}

/// The address a Via's sender sent from: `received`, else its sent-by host (an IP only).
fn via_ip(via: &Via<'_>) -> Option<IpAddr> {
    let host = via.received.unwrap_or(via.host);
    std::str::from_utf8(host).ok()?.parse().ok()
}

/// The address of a URI with an IP host (no DNS on the request path), and whether it asks
/// for TCP.
fn uri_destination(uri: &Uri<'_>) -> Option<(SocketAddr, bool)> {
    let ip: IpAddr = std::str::from_utf8(uri.host).ok()?.parse().ok()?;
    let tcp = uri
        .transport
        .is_some_and(|t| t.eq_ignore_ascii_case(b"tcp"));
    Some((SocketAddr::new(ip, uri.port.unwrap_or(5060)), tcp))
}

fn hex(value: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, slot) in out.iter_mut().take(16).enumerate() {
        *slot = DIGITS[((value >> (60 - 4 * i)) & 0xf) as usize];
    }
}

/// `fmt::Write` into a byte vector.
struct Bytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests;
