use callfleet_core::NodeStatus;
use callfleet_core::testing::node_status;

use super::*;

const CARRIER: &str = "198.51.100.7:5060";
const PBX: &str = "127.0.0.1:5080";

fn carrier() -> SocketAddr {
    CARRIER.parse().expect("addr")
}

fn pbx() -> SocketAddr {
    PBX.parse().expect("addr")
}

fn node(id: &str, sip_uri: &str) -> NodeStatus {
    NodeStatus {
        age_ms: 10,
        ..node_status(id, sip_uri)
    }
}

fn engine(config: BalancerConfig, nodes: Vec<NodeStatus>, read_at: Instant) -> Engine {
    let local = NodeId::new("lb").expect("id");
    let engine = Engine::new(&config, local.clone()).expect("engine");
    engine.set_view(FleetView::from_nodes(nodes, &local, None, read_at));
    engine
}

fn config() -> BalancerConfig {
    BalancerConfig {
        listen: "192.0.2.10:5060".into(),
        local_pbx: PBX.into(),
        ..BalancerConfig::default()
    }
}

fn invite(branch: &str) -> Vec<u8> {
    format!(
        "INVITE sip:5551234@192.0.2.10 SIP/2.0\r\n\
Via: SIP/2.0/UDP 198.51.100.7;branch=z9hG4bK{branch}\r\n\
From: <sip:carrier@198.51.100.7>;tag=c1\r\nTo: <sip:5551234@192.0.2.10>\r\n\
Call-ID: {branch}@carrier\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

fn handle(engine: &Engine, bytes: &[u8], source: SocketAddr, now: Instant) -> Vec<Action> {
    let mut actions = Vec::new();
    engine.handle(
        bytes,
        source,
        Transport::Udp,
        now,
        Duration::ZERO,
        &mut actions,
    );
    actions
}

fn text(action: &Action) -> String {
    match action {
        Action::Reply { bytes, .. } | Action::Forward { bytes, .. } => {
            String::from_utf8_lossy(bytes).into_owned()
        }
        Action::Close => "close".into(),
    }
}

#[test]
fn the_local_node_is_proxied_and_its_answers_come_back() {
    let now = Instant::now();
    let engine = engine(config(), vec![node("lb", "sip:127.0.0.1:5080")], now);
    let actions = handle(&engine, &invite("a1"), carrier(), now);
    let [
        Action::Forward {
            to,
            tcp: false,
            bytes,
        },
    ] = &actions[..]
    else {
        panic!("one forward expected: {actions:?}");
    };
    assert_eq!(*to, pbx());
    let forwarded = String::from_utf8_lossy(bytes);
    assert!(forwarded.starts_with(
        "INVITE sip:5551234@192.0.2.10 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKcf"
    ));
    assert!(forwarded.contains("Record-Route: <sip:192.0.2.10:5060;lr>\r\n"));
    assert!(
        forwarded.contains("Via: SIP/2.0/UDP 198.51.100.7;branch=z9hG4bKa1\r\n"),
        "the sender's Via needs no received: its host is the source"
    );
    assert!(forwarded.contains("Max-Forwards: 69\r\n"));

    // A retransmission is forwarded again with the same branch and counted once.
    let again = handle(&engine, &invite("a1"), carrier(), now);
    assert_eq!(text(&again[0]), forwarded);
    assert_eq!(engine.counters.invites.load(Ordering::Relaxed), 1);
    assert_eq!(engine.counters.retransmissions.load(Ordering::Relaxed), 1);

    // The PBX's 180 loses our Via and goes to the carrier's received address.
    let message = sip::parse(bytes, Framing::Datagram)
        .expect("parse")
        .expect("complete");
    let request = Request::from_message(message).expect("request");
    let ours = std::str::from_utf8(request.via.raw).expect("utf8");
    let ringing = format!(
        "SIP/2.0 180 Ringing\r\nVia: {ours}\r\nVia: SIP/2.0/UDP 198.51.100.7;branch=z9hG4bKa1;received=198.51.100.7\r\n\
From: <sip:carrier@198.51.100.7>;tag=c1\r\nTo: <sip:5551234@192.0.2.10>;tag=p1\r\nCall-ID: a1@carrier\r\n\
CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    );
    let back = handle(&engine, ringing.as_bytes(), pbx(), now);
    let [Action::Forward { to, bytes, .. }] = &back[..] else {
        panic!("one forward expected: {back:?}");
    };
    assert_eq!(*to, "198.51.100.7:5060".parse().expect("addr"));
    assert!(!String::from_utf8_lossy(bytes).contains("z9hG4bKcf"));

    // CANCEL of a proxied INVITE goes to the PBX with the same branch.
    let cancel = String::from_utf8(invite("a1"))
        .expect("utf8")
        .replace("INVITE sip", "CANCEL sip")
        .replace("1 INVITE", "1 CANCEL");
    let cancelled = handle(&engine, cancel.as_bytes(), carrier(), now);
    assert!(matches!(&cancelled[..], [Action::Forward { to, .. }] if *to == pbx()));
    let our_branch = &forwarded[forwarded.find("z9hG4bKcf").expect("ours")..][..25];
    assert!(text(&cancelled[0]).contains(our_branch));
}

#[test]
fn in_dialog_requests_follow_our_record_route_and_nothing_else() {
    let now = Instant::now();
    let engine = engine(config(), vec![node("lb", "sip:127.0.0.1:5080")], now);
    let bye = |route: &str| {
        format!(
            "BYE sip:pbx@127.0.0.1:5080 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.7;branch=z9hG4bKb1\r\n{route}\
From: <sip:carrier@198.51.100.7>;tag=c1\r\nTo: <sip:5551234@192.0.2.10>;tag=p1\r\n\
Call-ID: a1@carrier\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let routed = handle(
        &engine,
        bye("Route: <sip:192.0.2.10:5060;lr>\r\n").as_bytes(),
        carrier(),
        now,
    );
    assert!(matches!(&routed[..], [Action::Forward { to, .. }] if *to == pbx()));
    assert!(!text(&routed[0]).contains("Route:"), "our Route is removed");
    let foreign = handle(&engine, bye("").as_bytes(), carrier(), now);
    assert!(text(&foreign[0]).starts_with("SIP/2.0 481 "));

    // From the PBX towards the carrier: to the Request-URI, never to a name we would
    // have to resolve.
    let from_pbx = "BYE sip:carrier@198.51.100.7:5070 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bKp2\r\n\
Route: <sip:192.0.2.10:5060;lr>\r\nFrom: <sip:5551234@192.0.2.10>;tag=p1\r\nTo: <sip:carrier@198.51.100.7>;tag=c1\r\n\
Call-ID: a1@carrier\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n";
    let out = handle(&engine, from_pbx.as_bytes(), pbx(), now);
    assert!(
        matches!(&out[..], [Action::Forward { to, .. }] if *to == "198.51.100.7:5070".parse().expect("addr"))
    );
    let by_name = from_pbx.replace("198.51.100.7:5070", "carrier.example.net");
    let out = handle(&engine, by_name.as_bytes(), pbx(), now);
    assert!(text(&out[0]).starts_with("SIP/2.0 502 "));
}

#[test]
fn stray_responses_are_dropped() {
    let now = Instant::now();
    let engine = engine(config(), vec![], now);
    let stray = "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKzz\r\nFrom: <sip:a@b>;tag=1\r\n\
To: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
    assert!(handle(&engine, stray.as_bytes(), carrier(), now).is_empty());
    assert_eq!(engine.counters.malformed.load(Ordering::Relaxed), 1);
}

#[test]
fn without_the_store_past_the_grace_only_a_live_local_pbx_takes_calls() {
    let long_ago = Instant::now();
    let now = long_ago + Duration::from_secs(61);
    let mut config = config();
    config.heartbeat_ttl = Duration::from_secs(600);
    let engine = engine(
        config,
        vec![
            node("lb", "sip:127.0.0.1:5080"),
            node("other", "sip:192.0.2.20:5060"),
        ],
        long_ago,
    );
    engine.set_store_down(true);
    let refused = handle(&engine, &invite("s1"), carrier(), now);
    assert!(
        text(&refused[0]).starts_with("SIP/2.0 503 "),
        "PBX not yet seen alive"
    );

    let probe = engine.probe(1);
    let probe = String::from_utf8(probe).expect("utf8");
    let via = probe
        .lines()
        .find(|l| l.starts_with("Via: "))
        .expect("probe via");
    let answer = format!(
        "SIP/2.0 200 OK\r\n{via}\r\nFrom: <sip:callfleet@192.0.2.10:5060>;tag=probe\r\nTo: <sip:{PBX}>;tag=x\r\n\
Call-ID: probe-1@192.0.2.10:5060\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    );
    assert!(handle(&engine, answer.as_bytes(), pbx(), now).is_empty());
    let taken = handle(&engine, &invite("s2"), carrier(), now);
    assert!(
        matches!(&taken[..], [Action::Forward { to, .. }] if *to == pbx()),
        "{taken:?}"
    );
}

#[test]
fn redirect_mode_points_local_calls_at_the_pbx_and_others_at_their_node() {
    let now = Instant::now();
    let mut config = config();
    config.local_mode = LocalMode::Redirect;
    let engine = engine(config, vec![node("lb", "sip:127.0.0.1:5080")], now);
    let actions = handle(&engine, &invite("r1"), carrier(), now);
    assert!(text(&actions[0]).contains("Contact: <sip:5551234@127.0.0.1:5080>\r\n"));

    let busy_local = {
        let mut local = node("lb", "sip:127.0.0.1:5080");
        local.calls = 99;
        local
    };
    let engine = self::engine(
        self::config(),
        vec![busy_local, node("other", "sip:[2001:db8::5]:5070")],
        now,
    );
    let actions = handle(&engine, &invite("r2"), carrier(), now);
    let response = text(&actions[0]);
    assert!(response.starts_with("SIP/2.0 302 Moved Temporarily\r\n"));
    assert!(
        response.contains("Contact: <sip:5551234@[2001:db8::5]:5070>\r\n"),
        "{response}"
    );
}

#[test]
fn invites_that_queued_too_long_get_503_at_once() {
    let now = Instant::now();
    let engine = engine(config(), vec![node("other", "sip:192.0.2.20:5060")], now);
    let mut actions = Vec::new();
    engine.handle(
        &invite("o1"),
        carrier(),
        Transport::Udp,
        now,
        Duration::from_millis(250),
        &mut actions,
    );
    let response = text(&actions[0]);
    assert!(response.starts_with("SIP/2.0 503 "), "{response}");
    assert!(response.contains("Retry-After: 5\r\n"));
    assert_eq!(engine.counters.overload.load(Ordering::Relaxed), 1);
    assert_eq!(engine.counters.unavailable.load(Ordering::Relaxed), 0);
    let fresh = handle(&engine, &invite("o2"), carrier(), now);
    assert!(text(&fresh[0]).starts_with("SIP/2.0 302 "));
}

#[test]
fn within_the_grace_the_last_view_is_trusted_as_read() {
    let read_at = Instant::now();
    let engine = engine(
        config(),
        vec![node("other", "sip:192.0.2.20:5060")],
        read_at,
    );
    let later = read_at + Duration::from_secs(30);
    let stale = handle(&engine, &invite("g1"), carrier(), later);
    assert!(
        text(&stale[0]).starts_with("SIP/2.0 503 "),
        "the store answers but has no newer heartbeat: the node is stale"
    );
    engine.set_store_down(true);
    let trusted = handle(&engine, &invite("g2"), carrier(), later);
    assert!(
        text(&trusted[0]).contains("Contact: <sip:5551234@192.0.2.20:5060>"),
        "the store is away: its last word on the node stands for stale_grace"
    );
    let past_grace = handle(
        &engine,
        &invite("g3"),
        carrier(),
        read_at + Duration::from_secs(61),
    );
    assert!(text(&past_grace[0]).starts_with("SIP/2.0 503 "));
}
