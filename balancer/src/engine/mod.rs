//! What the balancer does with one received message, independent of the transport.
//!
//! [`Engine::handle`] turns bytes from a source into [`Action`]s (a reply, a forwarded
//! message) that the UDP and TCP adapters carry out. It reads the fleet view and the
//! transaction table and never waits on anything else.

use std::fmt::Write as _;
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use callfleet_core::config::{BalancerConfig, DenyMode, LocalMode};
use callfleet_core::net::Cidr;
use callfleet_core::{ConfigError, NodeId};

use crate::route::{Choice, FleetView, PoolMap, Scoring, Trust};
use crate::sip::{
    self, Framing, HeaderName, Message, Method, Request, StartLine, Transport, Uri, Via, addr_uri,
    print, split_values,
};
use crate::transaction::{Kind, Transaction, Transactions};

/// Branches of requests we forward start with this, so responses to them are recognised.
const OUR_BRANCH: &[u8] = b"z9hG4bKcf";
/// Branches of our OPTIONS probes to the local PBX.
const PROBE_BRANCH: &[u8] = b"z9hG4bKcfprobe";
/// Parameter of our Via naming the TCP connection a proxied request came in on.
const CONN_PARAM: &str = "cfconn";
const ALLOW: &[u8] = b"Allow: INVITE, ACK, CANCEL, OPTIONS, BYE\r\n";

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
        /// Destination.
        to: SocketAddr,
        /// Over a TCP connection from that address, if one is open (else UDP).
        tcp: bool,
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
    /// Retransmitted requests absorbed by a live transaction.
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
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// `(name, value)` of every counter.
    pub fn snapshot(&self) -> [(&'static str, u64); 13] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("invites", get(&self.invites)),
            ("redirected", get(&self.redirected)),
            ("local", get(&self.local)),
            ("unavailable", get(&self.unavailable)),
            ("retransmissions", get(&self.retransmissions)),
            ("resent", get(&self.resent)),
            ("acks", get(&self.acks)),
            ("cancels", get(&self.cancels)),
            ("options", get(&self.options)),
            ("forwarded", get(&self.forwarded)),
            ("malformed", get(&self.malformed)),
            ("denied", get(&self.denied)),
            ("overload", get(&self.overload)),
        ]
    }
}

/// The configuration, prepared for the request path.
#[derive(Debug)]
struct Settings {
    local: NodeId,
    local_mode: LocalMode,
    local_pbx: SocketAddr,
    /// `host:port` we put in Via and Record-Route.
    advertise: String,
    our_via: Vec<u8>,
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
    tags: std::hash::RandomState,
}

impl Engine {
    /// Prepares the engine; fails on configuration it cannot use.
    pub fn new(config: &BalancerConfig, local: NodeId) -> Result<Self, ConfigError> {
        let local_pbx = config.local_pbx.parse().map_err(|_| ConfigError::Value {
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
        let advertise = config.advertised().to_owned();
        Ok(Self {
            settings: Settings {
                local,
                local_mode: config.local_mode,
                local_pbx,
                our_via: format!("SIP/2.0/UDP {advertise}").into_bytes(),
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
            transactions: Transactions::default(),
            counters: Counters::default(),
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

    /// Where OPTIONS probes go.
    pub fn local_pbx(&self) -> SocketAddr {
        self.settings.local_pbx
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
        let settings = &self.settings;
        let from_pbx = source == settings.local_pbx;
        let allowed = from_pbx
            || settings.allow.is_empty()
            || settings.allow.iter().any(|net| net.contains(source.ip()));
        let message = match sip::parse(bytes, Framing::Datagram) {
            Ok(Some(message)) => message,
            Ok(None) | Err(_) => {
                Counters::bump(if allowed {
                    &self.counters.malformed
                } else {
                    &self.counters.denied
                });
                return;
            }
        };
        if let StartLine::Response { .. } = message.start {
            if allowed {
                self.handle_response(&message, source, now, actions);
            } else {
                Counters::bump(&self.counters.denied);
            }
            return;
        }
        let request = match Request::from_message(message) {
            Ok(request) => request,
            Err(_) => {
                Counters::bump(if allowed {
                    &self.counters.malformed
                } else {
                    &self.counters.denied
                });
                return;
            }
        };
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
            }
            return;
        }
        if bytes.len() > settings.max_message {
            Counters::bump(&self.counters.malformed);
            if request.method != Method::Ack {
                ctx.reply(513, "Message Too Large", b"");
            }
            if transport == Transport::Tcp {
                ctx.actions.push(Action::Close);
            }
            return;
        }
        if let Some(defect) = request.defect {
            Counters::bump(&self.counters.malformed);
            if request.method != Method::Ack {
                let reason = format!("Bad Request ({defect})");
                ctx.reply(400, &reason, b"");
            }
            if transport == Transport::Tcp && request.message.defect.is_some() {
                ctx.actions.push(Action::Close);
            }
            return;
        }
        let behind = queued > settings.overload_delay;
        ctx.dispatch(now, behind);
    }

    fn handle_response(
        &self,
        message: &Message<'_>,
        source: SocketAddr,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        let mut vias = message
            .headers_named(HeaderName::Via)
            .flat_map(|h| split_values(h.value));
        let ours = vias.next().and_then(|v| Via::parse(v).ok()).filter(|via| {
            via.sent_by() == self.settings.advertise.as_bytes()
                && via.branch.is_some_and(|b| b.starts_with(OUR_BRANCH))
        });
        let Some(ours) = ours else {
            Counters::bump(&self.counters.malformed);
            return;
        };
        if ours.branch.is_some_and(|b| b.starts_with(PROBE_BRANCH)) {
            if source == self.settings.local_pbx {
                self.mark_pbx_alive(now, Duration::from_secs(6));
            }
            return;
        }
        let connection = sip::Params::new(&ours.raw[ours.params_at..])
            .find(|(name, _)| name.eq_ignore_ascii_case(CONN_PARAM.as_bytes()))
            .and_then(|(_, value)| value)
            .and_then(|value| std::str::from_utf8(value).ok())
            .and_then(|value| value.trim_matches('"').parse::<SocketAddr>().ok());
        if let Some(to) = connection {
            let mut bytes = Vec::new();
            print::forward_response(message, &mut bytes);
            Counters::bump(&self.counters.forwarded);
            actions.push(Action::Forward {
                to,
                tcp: true,
                bytes,
            });
            return;
        }
        let Some(next) = vias.next().and_then(|v| Via::parse(v).ok()) else {
            Counters::bump(&self.counters.malformed);
            return;
        };
        let Some(to) = via_destination(&next) else {
            Counters::bump(&self.counters.malformed);
            return;
        };
        let mut bytes = Vec::new();
        print::forward_response(message, &mut bytes);
        Counters::bump(&self.counters.forwarded);
        actions.push(Action::Forward {
            to,
            tcp: next.transport == Transport::Tcp,
            bytes,
        });
    }
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
    fn dispatch(&mut self, now: Instant, behind: bool) {
        let engine = self.engine;
        let request = self.request;
        let key = engine.transactions.key(
            request.via.branch.unwrap_or(request.call_id),
            request.via.sent_by(),
        );
        let route_is_ours = self.top_route_is_ours();
        match request.method {
            Method::Ack => {
                if engine.transactions.ack(key) {
                    Counters::bump(&engine.counters.acks);
                } else if engine.transactions.kind(key) == Some(Kind::Proxied) {
                    self.forward(key, engine.settings.local_pbx, false, route_is_ours);
                } else if request.to_tag.is_some() && route_is_ours {
                    self.forward_in_dialog(key);
                } else {
                    // An ACK never gets a response; one we cannot place is dropped.
                    Counters::bump(&engine.counters.acks);
                }
            }
            _ if request.to_tag.is_some() && route_is_ours => {
                if request.max_forwards == Some(0) {
                    self.reply(483, "Too Many Hops", b"");
                } else {
                    self.forward_in_dialog(key);
                }
            }
            Method::Cancel => {
                Counters::bump(&engine.counters.cancels);
                match engine.transactions.kind(key) {
                    Some(Kind::Answered { .. }) => self.reply(200, "OK", b""),
                    Some(Kind::Proxied) => {
                        self.forward(key, engine.settings.local_pbx, false, false)
                    }
                    None => self.reply(481, "Call/Transaction Does Not Exist", b""),
                }
            }
            Method::Options => {
                Counters::bump(&engine.counters.options);
                let routable = engine.view().is_some_and(|view| {
                    view.can_route(engine.settings.scoring, engine.trust(&view, now), now)
                });
                if routable {
                    self.reply(200, "OK", ALLOW);
                } else {
                    self.reply(503, "Service Unavailable", &engine.settings.retry_after);
                }
            }
            _ if request.to_tag.is_some() => {
                self.reply(481, "Call/Transaction Does Not Exist", b"");
            }
            Method::Invite => {
                if request.max_forwards == Some(0) {
                    self.reply(483, "Too Many Hops", b"");
                } else {
                    self.invite(key, now, behind, route_is_ours);
                }
            }
            Method::Bye | Method::Other => self.reply(405, "Method Not Allowed", ALLOW),
        }
    }

    fn invite(&mut self, key: u64, now: Instant, behind: bool, drop_top_route: bool) {
        let engine = self.engine;
        let retransmit = self.transport == Transport::Udp;
        let destination = self.reply_to;
        let counters = &engine.counters;
        let (replay, decided) = engine.transactions.invite(
            key,
            now,
            |existing| {
                Counters::bump(&counters.retransmissions);
                (Some((existing.kind, existing.response.to_vec())), None)
            },
            || {
                Counters::bump(&counters.invites);
                let decision = if behind {
                    // Sending the carrier elsewhere now beats a late answer after its
                    // retransmissions have doubled our load.
                    Counters::bump(&counters.overload);
                    Decision::Reply(self.response(
                        503,
                        "Service Unavailable",
                        &engine.settings.retry_after,
                    ))
                } else {
                    self.decide(now)
                };
                let (kind, response) = match &decision {
                    Decision::Local => (Kind::Proxied, Box::default()),
                    Decision::Reply(bytes) => (
                        Kind::Answered { retransmit },
                        bytes.clone().into_boxed_slice(),
                    ),
                };
                let transaction = Transaction::new(response, destination, kind, now);
                (Some(transaction), (None, Some(decision)))
            },
        );
        match (replay, decided) {
            (Some((Kind::Proxied, _)), _) | (_, Some(Decision::Local)) => {
                self.forward(key, engine.settings.local_pbx, false, drop_top_route);
            }
            (Some((Kind::Answered { .. }, bytes)), _) | (_, Some(Decision::Reply(bytes))) => {
                self.actions.push(Action::Reply {
                    to: self.reply_to,
                    bytes,
                });
            }
            (None, None) => {}
        }
    }

    /// Chooses where a new call goes: the response to send, or the local PBX to proxy to.
    fn decide(&self, now: Instant) -> Decision {
        let engine = self.engine;
        let settings = &engine.settings;
        let uri = Uri::parse(self.request.uri).ok();
        let pool = settings
            .pools
            .pool_for(uri.map_or(&b""[..], |u| u.host), uri.and_then(|u| u.user));
        let mut chosen = [Choice { index: 0 }; 9];
        let wanted = settings.contacts.min(chosen.len());
        let (found, view) = match engine.view() {
            Some(view) => {
                let trust = engine.trust(&view, now);
                let found = view.choose(pool, settings.scoring, trust, now, &mut chosen[..wanted]);
                (found, Some(view))
            }
            None => (0, None),
        };
        let Some(view) = view.filter(|_| found > 0) else {
            Counters::bump(&engine.counters.unavailable);
            return Decision::Reply(self.response(
                503,
                "Service Unavailable",
                &settings.retry_after,
            ));
        };
        let first = &view.nodes[chosen[0].index];
        let user = uri.and_then(|u| u.user);
        let transport_param = if self.transport == Transport::Tcp {
            ";transport=tcp"
        } else {
            ""
        };
        let mut contacts = Vec::with_capacity(64 * found);
        if first.local {
            Counters::bump(&engine.counters.local);
            if settings.local_mode == LocalMode::Proxy {
                return Decision::Local;
            }
            let pbx = settings.local_pbx.to_string();
            push_contact(&mut contacts, user, &pbx, transport_param, None);
        } else {
            Counters::bump(&engine.counters.redirected);
            for (rank, choice) in chosen[..found].iter().enumerate() {
                let node = &view.nodes[choice.index];
                let q = (found > 1).then(|| 10 - rank.min(9));
                push_contact(&mut contacts, user, &node.target, transport_param, q);
            }
        }
        Decision::Reply(self.response(302, "Moved Temporarily", &contacts))
    }

    fn response(&self, code: u16, reason: &str, extra: &[u8]) -> Vec<u8> {
        let request = self.request;
        let tag =
            self.engine
                .tags
                .hash_one((request.call_id, request.from_tag, request.via.branch));
        let mut tag_text = [0u8; 16];
        hex(tag, &mut tag_text);
        let mut out = Vec::new();
        print::response(
            request,
            self.source,
            code,
            reason,
            &tag_text,
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

    /// Whether the first Route names this balancer.
    fn top_route_is_ours(&self) -> bool {
        let Some(route) = self.request.message.header(HeaderName::Route) else {
            return false;
        };
        let Some(first) = split_values(route.value).next() else {
            return false;
        };
        Uri::parse(addr_uri(first)).is_ok_and(|uri| self.engine.is_us(&uri))
    }

    /// An in-dialog request routed through us: from the PBX it goes to the next Route or
    /// the Request-URI (the carrier); from anywhere else to the local PBX, never further,
    /// so the balancer cannot be used as an open relay.
    fn forward_in_dialog(&mut self, key: u64) {
        let engine = self.engine;
        if self.source != engine.settings.local_pbx {
            self.forward(key, engine.settings.local_pbx, false, true);
            return;
        }
        let next_route = self
            .request
            .message
            .headers_named(HeaderName::Route)
            .flat_map(|h| split_values(h.value))
            .nth(1)
            .map(addr_uri);
        let target = next_route.unwrap_or(self.request.uri);
        match Uri::parse(target)
            .ok()
            .and_then(|uri| uri_destination(&uri))
        {
            Some((to, tcp)) => self.forward(key, to, tcp, true),
            None => self.reply(502, "Bad Gateway (next hop is not an IP address)", b""),
        }
    }

    /// Forwards the request statelessly; `key` (its transaction key) seeds our branch, so a
    /// retransmission or a CANCEL gets the same one.
    fn forward(&mut self, key: u64, to: SocketAddr, tcp: bool, drop_top_route: bool) {
        let engine = self.engine;
        let request = self.request;
        let mut branch = Vec::with_capacity(OUR_BRANCH.len() + 48);
        branch.extend_from_slice(OUR_BRANCH);
        let mut digits = [0u8; 16];
        hex(key, &mut digits);
        branch.extend_from_slice(&digits);
        if self.transport == Transport::Tcp {
            // Stateless, we remember nothing: our Via carries the carrier's connection so
            // the PBX's responses, which echo it, find their way back onto it.
            let _ = write!(Bytes(&mut branch), ";{CONN_PARAM}=\"{}\"", self.source);
        }
        let record_route = (request.method == Method::Invite && request.to_tag.is_none())
            .then_some(engine.settings.record_route.as_slice());
        let mut bytes = Vec::new();
        print::forward_request(
            request,
            self.source,
            &engine.settings.our_via,
            &branch,
            record_route,
            drop_top_route,
            &mut bytes,
        );
        Counters::bump(&engine.counters.forwarded);
        self.actions.push(Action::Forward { to, tcp, bytes });
    }
}

impl Engine {
    fn is_us(&self, uri: &Uri<'_>) -> bool {
        let advertise = self.settings.advertise.as_bytes();
        let Some((host, port)) = sip::split_host_port(advertise) else {
            return false;
        };
        uri.host.eq_ignore_ascii_case(host) && uri.port.unwrap_or(5060) == port.unwrap_or(5060)
    }
}

/// Where a new call goes.
enum Decision {
    /// Send this response (302 or 503).
    Reply(Vec<u8>),
    /// Proxy to the local PBX (only in `local_mode = "proxy"`).
    Local,
}

/// Appends `Contact: <sip:USER@TARGET PARAMS>;q=…` (q from 1.0 down by rank).
fn push_contact(
    out: &mut Vec<u8>,
    user: Option<&[u8]>,
    target: &str,
    params: &str,
    q: Option<usize>,
) {
    out.extend_from_slice(b"Contact: <sip:");
    if let Some(user) = user {
        out.extend_from_slice(user);
        out.push(b'@');
    }
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(params.as_bytes());
    out.push(b'>');
    match q {
        Some(10..) => out.extend_from_slice(b";q=1.0"),
        Some(q) => out.extend_from_slice(&[b';', b'q', b'=', b'0', b'.', b'0' + q as u8]),
        None => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Where a UDP response goes: the source address, and the source port only when the client
/// asked for it with `rport` (RFC 3581); otherwise the Via's port (RFC 3261 §18.2.2).
fn reply_address(via: &Via<'_>, source: SocketAddr, transport: Transport) -> SocketAddr {
    if transport == Transport::Tcp || via.rport.is_some() {
        return source;
    }
    SocketAddr::new(source.ip(), via.port.unwrap_or(5060))
}

/// Where a response goes next, from the Via below ours.
fn via_destination(via: &Via<'_>) -> Option<SocketAddr> {
    let host = via.received.unwrap_or(via.host);
    let ip: IpAddr = std::str::from_utf8(host).ok()?.parse().ok()?;
    let port = via.rport.flatten().or(via.port).unwrap_or(5060);
    Some(SocketAddr::new(ip, port))
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
