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
        // Not this machine's own addresses: the tests must not depend on the host.
        pbx_addresses: vec!["127.0.0.1".into()],
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
            reconnect: None,
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
    config.local_pbx = "192.0.2.11:5080".into();
    let engine = engine(config, vec![node("lb", "sip:192.0.2.11:5080")], now);
    let actions = handle(&engine, &invite("r1"), carrier(), now);
    assert!(text(&actions[0]).contains("Contact: <sip:5551234@192.0.2.11:5080>\r\n"));

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

/// A request from the carrier: `method` with `cseq`, the top Via's `branch` (`None`: no
/// branch parameter, as an RFC 2543 client may send), `to_tag`, and extra header lines.
fn request(
    method: &str,
    call: &str,
    branch: Option<&str>,
    cseq: u32,
    to_tag: Option<&str>,
    extra: &str,
) -> Vec<u8> {
    let branch = branch.map_or(String::new(), |b| format!(";branch={b}"));
    let to_tag = to_tag.map_or(String::new(), |t| format!(";tag={t}"));
    format!(
        "{method} sip:5551234@192.0.2.10 SIP/2.0\r\n\
Via: SIP/2.0/UDP 198.51.100.7{branch}\r\n{extra}\
From: <sip:carrier@198.51.100.7>;tag=c1\r\nTo: <sip:5551234@192.0.2.10>{to_tag}\r\n\
Call-ID: {call}@carrier\r\nCSeq: {cseq} {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

/// The To-tag of a response.
fn to_tag(response: &str) -> String {
    let to = response
        .lines()
        .find_map(|l| l.strip_prefix("To: "))
        .expect("To");
    to.split_once(";tag=").expect("a To-tag").1.to_owned()
}

/// The branch of the top Via of a forwarded request.
fn top_branch(forwarded: &str) -> String {
    let via = forwarded
        .lines()
        .find_map(|l| l.strip_prefix("Via: "))
        .expect("Via");
    via.split(';')
        .find_map(|p| p.strip_prefix("branch="))
        .expect("branch")
        .to_owned()
}

fn counter(engine: &Engine, name: &str) -> u64 {
    engine
        .counters
        .snapshot()
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no counter {name}"))
}

fn counters(engine: &Engine, names: &[&str]) -> Vec<(String, u64)> {
    names
        .iter()
        .map(|name| ((*name).to_owned(), counter(engine, name)))
        .collect()
}

fn expect(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
    pairs.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect()
}

#[test]
fn an_invite_retransmitted_after_its_ack_is_absorbed_not_a_second_call() {
    let now = Instant::now();
    let engine = engine(config(), vec![node("other", "sip:192.0.2.20:5060")], now);
    let invite = request("INVITE", "ti1", Some("z9hG4bKti1"), 1, None, "");
    let moved = handle(&engine, &invite, carrier(), now);
    assert!(text(&moved[0]).starts_with("SIP/2.0 302 "), "{moved:?}");
    let tag = to_tag(&text(&moved[0]));
    let ack = request("ACK", "ti1", Some("z9hG4bKti1"), 1, Some(&tag), "");
    let later = now + Duration::from_millis(100);
    assert_eq!(handle(&engine, &ack, carrier(), later), []);
    // The INVITE again, delayed in the network past its ACK (Timer I, RFC 3261 §17.2.1).
    let again = now + Duration::from_secs(2);
    assert_eq!(handle(&engine, &invite, carrier(), again), []);
    assert_eq!(
        handle(&engine, &ack, carrier(), again),
        [],
        "a late ACK too"
    );
    assert_eq!(
        counters(
            &engine,
            &["invites", "redirected", "retransmissions", "acks"]
        ),
        expect(&[
            ("invites", 1),
            ("redirected", 1),
            ("retransmissions", 1),
            ("acks", 2)
        ])
    );
}

#[test]
fn without_the_magic_cookie_the_next_invite_of_a_call_is_a_new_transaction() {
    let now = Instant::now();
    let engine = engine(config(), vec![node("other", "sip:192.0.2.20:5060")], now);
    for branch in [None, Some("1")] {
        let call = format!("rfc2543-{}", branch.unwrap_or("none"));
        let first = handle(
            &engine,
            &request("INVITE", &call, branch, 1, None, ""),
            carrier(),
            now,
        );
        assert!(text(&first[0]).contains("\r\nCSeq: 1 INVITE\r\n"));
        let next = request("INVITE", &call, branch, 2, None, "");
        let second = handle(&engine, &next, carrier(), now);
        assert!(
            text(&second[0]).contains("\r\nCSeq: 2 INVITE\r\n"),
            "the CSeq 2 INVITE gets its own answer, not the first one's:\n{}",
            text(&second[0])
        );
        // Its retransmission is still one.
        assert_eq!(handle(&engine, &next, carrier(), now), second);
    }
    assert_eq!(
        counters(&engine, &["invites", "retransmissions"]),
        expect(&[("invites", 4), ("retransmissions", 2)])
    );
}

/// Whether a message has a Route header line.
fn has_route(message: &str) -> bool {
    message.lines().any(|l| l.starts_with("Route:"))
}

/// A balancer that proxies its own node's calls to [`PBX`].
fn proxying(config: BalancerConfig, now: Instant) -> Engine {
    engine(config, vec![node("lb", "sip:127.0.0.1:5080")], now)
}

fn forwarded_to(actions: &[Action], expected: SocketAddr) -> String {
    match actions {
        [
            Action::Forward {
                to,
                tcp: false,
                reconnect: None,
                bytes,
            },
        ] if *to == expected => String::from_utf8_lossy(bytes).into_owned(),
        other => panic!("one UDP forward to {expected} expected, got {other:?}"),
    }
}

#[test]
fn a_cancel_or_a_late_ack_after_timer_h_still_reaches_the_pbx_with_the_invite_s_branch() {
    let now = Instant::now();
    let engine = proxying(config(), now);
    // The carrier preloads a Route to us: removed from the INVITE, so from its CANCEL too
    // (RFC 3261 §9.1: a CANCEL's Route is its INVITE's).
    let route = "Route: <sip:192.0.2.10:5060;lr>\r\n";
    let invite = request("INVITE", "late1", Some("z9hG4bKlate1"), 1, None, route);
    let forwarded = forwarded_to(&handle(&engine, &invite, carrier(), now), pbx());
    assert!(!has_route(&forwarded), "{forwarded}");
    let branch = top_branch(&forwarded);

    let cancel = request("CANCEL", "late1", Some("z9hG4bKlate1"), 1, None, route);
    let early = forwarded_to(&handle(&engine, &cancel, carrier(), now), pbx());
    assert!(!has_route(&early), "our Route removed:\n{early}");
    assert_eq!(top_branch(&early), branch);

    // The PBX rings for 40 s (its 180 does not keep our entry); Timer H ends the entry.
    engine
        .transactions
        .tick(now + Duration::from_secs(33), |_, _| {});
    assert_eq!(engine.transactions.len(), 0);
    let hangup = now + Duration::from_secs(40);
    let late = forwarded_to(&handle(&engine, &cancel, carrier(), hangup), pbx());
    assert!(
        late.starts_with("CANCEL sip:5551234@192.0.2.10 SIP/2.0\r\n"),
        "{late}"
    );
    assert!(!has_route(&late), "{late}");
    assert_eq!(
        top_branch(&late),
        branch,
        "the PBX matches it to its INVITE"
    );

    // The PBX answers 487; the carrier's ACK of it goes where the INVITE went.
    let ack = request(
        "ACK",
        "late1",
        Some("z9hG4bKlate1"),
        1,
        Some("pbx487"),
        route,
    );
    let acked = forwarded_to(&handle(&engine, &ack, carrier(), hangup), pbx());
    assert!(
        acked.starts_with("ACK sip:5551234@192.0.2.10 SIP/2.0\r\n"),
        "{acked}"
    );
    assert_eq!(top_branch(&acked), branch);
    assert!(!has_route(&acked), "{acked}");
    // The same from a carrier on the PBX's own host: its Request-URI is ours, so it is on
    // its way to the PBX, not to be sent back to us.
    let on_host: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
    let acked = forwarded_to(&handle(&engine, &ack, on_host, hangup), pbx());
    assert_eq!(top_branch(&acked), branch);
    assert_eq!(
        counters(&engine, &["invites", "local", "cancels", "forwarded"]),
        expect(&[
            ("invites", 1),
            ("local", 1),
            ("cancels", 2),
            ("forwarded", 5)
        ])
    );
}

#[test]
fn late_acks_of_our_own_answers_and_cancels_in_redirect_mode_go_nowhere() {
    let now = Instant::now();
    // Proxy mode, a call redirected elsewhere: its ACK after Timer H is ours, not the
    // PBX's (the To-tag says so).
    let engine = engine(config(), vec![node("other", "sip:192.0.2.20:5060")], now);
    let invite = request("INVITE", "own1", Some("z9hG4bKown1"), 1, None, "");
    let moved = handle(&engine, &invite, carrier(), now);
    let tag = to_tag(&text(&moved[0]));
    engine
        .transactions
        .tick(now + Duration::from_secs(33), |_, _| {});
    let ack = request("ACK", "own1", Some("z9hG4bKown1"), 1, Some(&tag), "");
    assert_eq!(
        handle(&engine, &ack, carrier(), now + Duration::from_secs(34)),
        []
    );

    // Nor does a balancer whose own node is no PBX node: it answers an unknown CANCEL.
    let cancel = request("CANCEL", "none", Some("z9hG4bKnone"), 1, None, "");
    let answer = handle(&engine, &cancel, carrier(), now);
    assert!(text(&answer[0]).starts_with("SIP/2.0 481 "), "{answer:?}");
    // One that proxies relays it, unless it may not be forwarded.
    let proxying = proxying(config(), now);
    let spent = String::from_utf8(cancel.clone())
        .expect("utf8")
        .replace("Max-Forwards: 70", "Max-Forwards: 0");
    let answer = handle(&proxying, spent.as_bytes(), carrier(), now);
    assert!(text(&answer[0]).starts_with("SIP/2.0 483 "), "{answer:?}");
    forwarded_to(&handle(&proxying, &cancel, carrier(), now), pbx());

    // Redirect mode proxies nothing: an unknown CANCEL is answered 481 here.
    let mut config = config();
    config.local_mode = LocalMode::Redirect;
    config.local_pbx = "192.0.2.11:5080".into();
    let engine = self::engine(config, vec![node("other", "sip:192.0.2.20:5060")], now);
    let cancel = request("CANCEL", "none", Some("z9hG4bKnone"), 1, None, "");
    let answer = handle(&engine, &cancel, carrier(), now);
    assert!(text(&answer[0]).starts_with("SIP/2.0 481 "), "{answer:?}");
}

#[test]
fn at_its_bound_the_table_takes_no_new_transaction_and_says_503() {
    let now = Instant::now();
    let mut config = config();
    config.max_transactions = 2;
    let engine = engine(config, vec![node("other", "sip:192.0.2.20:5060")], now);
    let invite = |call: &str| request("INVITE", call, Some(&format!("z9hG4bK{call}")), 1, None, "");
    let first = handle(&engine, &invite("b1"), carrier(), now);
    assert!(text(&first[0]).starts_with("SIP/2.0 302 "));
    assert!(text(&handle(&engine, &invite("b2"), carrier(), now)[0]).starts_with("SIP/2.0 302 "));
    for _ in 0..2 {
        let refused = text(&handle(&engine, &invite("b3"), carrier(), now)[0]);
        assert!(
            refused.starts_with("SIP/2.0 503 Service Unavailable\r\n"),
            "{refused}"
        );
        assert!(refused.contains("\r\nRetry-After: 5\r\n"), "{refused}");
    }
    assert_eq!(engine.transactions.len(), 2);
    // No state: nothing of b3 is ever resent.
    let mut resent_to = Vec::new();
    engine
        .transactions
        .tick(now + Duration::from_millis(600), |bytes, _| {
            resent_to.push(String::from_utf8_lossy(bytes).contains("b3@carrier"));
        });
    assert_eq!(resent_to, [false, false]);
    // An ACK makes room.
    let tag = to_tag(&text(&first[0]));
    let ack = request("ACK", "b1", Some("z9hG4bKb1"), 1, Some(&tag), "");
    assert_eq!(handle(&engine, &ack, carrier(), now), []);
    assert!(text(&handle(&engine, &invite("b3"), carrier(), now)[0]).starts_with("SIP/2.0 302 "));
    assert_eq!(
        counters(
            &engine,
            &["invites", "redirected", "table_full", "unavailable"]
        ),
        expect(&[
            ("invites", 3),
            ("redirected", 3),
            ("table_full", 2),
            ("unavailable", 0)
        ])
    );
}

/// A request from the PBX at `from` in the dialog of call `call`, routed by `route`
/// towards the carrier's Contact `target`.
fn from_pbx(method: &str, from: SocketAddr, route: &str, target: &str) -> Vec<u8> {
    format!(
        "{method} {target} SIP/2.0\r\nVia: SIP/2.0/UDP {from};branch=z9hG4bKpbx-{method}\r\n\
Route: {route}\r\nFrom: <sip:5551234@192.0.2.10>;tag=p1\r\nTo: <sip:carrier@198.51.100.7>;tag=c1\r\n\
Call-ID: pbx1@carrier\r\nCSeq: 2 {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

#[test]
fn the_pbx_is_recognised_by_its_address_on_any_port() {
    let now = Instant::now();
    let mut config = config();
    config.allow = vec!["198.51.100.0/24".into()];
    config.pbx_addresses = vec!["127.0.0.1".into(), "10.9.9.9".into()];
    let engine = proxying(config, now);
    let invite = request("INVITE", "pa1", Some("z9hG4bKpa1"), 1, None, "");
    let forwarded = forwarded_to(&handle(&engine, &invite, carrier(), now), pbx());
    let our_via = forwarded
        .lines()
        .find_map(|l| l.strip_prefix("Via: "))
        .expect("our Via");
    let ringing = format!(
        "SIP/2.0 180 Ringing\r\nVia: {our_via}\r\nVia: SIP/2.0/UDP 198.51.100.7;branch=z9hG4bKpa1\r\n\
From: <sip:carrier@198.51.100.7>;tag=c1\r\nTo: <sip:5551234@192.0.2.10>;tag=p1\r\nCall-ID: pa1@carrier\r\n\
CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    );
    // Asterisk answers from another transport or port than the one we send to, or from
    // its NAT or advertised address.
    for source in ["127.0.0.1:6000", "10.9.9.9:5080"] {
        let source: SocketAddr = source.parse().expect("addr");
        let back = handle(&engine, ringing.as_bytes(), source, now);
        assert!(
            matches!(&back[..], [Action::Forward { to, .. }] if *to == carrier()),
            "a 180 from {source}: {back:?}"
        );
        let bye = from_pbx(
            "BYE",
            source,
            "<sip:192.0.2.10:5060;lr>",
            "sip:carrier@198.51.100.7:5070",
        );
        let out = handle(&engine, &bye, source, now);
        assert!(
            matches!(&out[..], [Action::Forward { to, .. }] if *to == "198.51.100.7:5070".parse().expect("addr")),
            "the PBX's BYE from {source} reaches the carrier: {out:?}"
        );
    }
    // Negative control: the same BYE from an address that is neither the PBX nor an
    // allowed carrier is dropped.
    let stranger: SocketAddr = "203.0.113.5:5080".parse().expect("addr");
    let bye = from_pbx(
        "BYE",
        stranger,
        "<sip:192.0.2.10:5060;lr>",
        "sip:carrier@198.51.100.7:5070",
    );
    assert_eq!(handle(&engine, &bye, stranger, now), []);
    assert_eq!(
        counters(&engine, &["forwarded", "denied"]),
        expect(&[("forwarded", 5), ("denied", 1)])
    );

    // With no allow-list, a stranger's in-dialog request still goes to the PBX only,
    // never on to the address it names: no open relay.
    let mut open = self::config();
    open.pbx_addresses = vec!["127.0.0.1".into()];
    let engine = proxying(open, now);
    let out = handle(&engine, &bye, stranger, now);
    forwarded_to(&out, pbx());
}

#[test]
fn only_a_serving_answer_to_a_probe_counts_the_pbx_alive() {
    let long_ago = Instant::now();
    let now = long_ago + Duration::from_secs(61);
    let mut config = config();
    config.heartbeat_ttl = Duration::from_secs(600);
    let engine = engine(config, vec![node("lb", "sip:127.0.0.1:5080")], long_ago);
    engine.set_store_down(true);
    let probe = String::from_utf8(engine.probe(7)).expect("utf8");
    let via = probe
        .lines()
        .find(|l| l.starts_with("Via: "))
        .expect("probe via");
    let answer = |status: &str| {
        format!(
            "SIP/2.0 {status}\r\n{via}\r\nFrom: <sip:callfleet@192.0.2.10:5060>;tag=probe\r\nTo: <sip:{PBX}>;tag=x\r\n\
Call-ID: probe-7@192.0.2.10:5060\r\nCSeq: 7 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let other_port: SocketAddr = "127.0.0.1:6000".parse().expect("addr");
    assert_eq!(
        handle(
            &engine,
            answer("503 Service Unavailable").as_bytes(),
            pbx(),
            now
        ),
        []
    );
    let refused = handle(&engine, &invite("p1"), carrier(), now);
    assert!(
        text(&refused[0]).starts_with("SIP/2.0 503 "),
        "a PBX answering 503 is not alive"
    );
    assert_eq!(
        handle(&engine, answer("200 OK").as_bytes(), other_port, now),
        []
    );
    let taken = handle(&engine, &invite("p2"), carrier(), now);
    assert!(
        matches!(&taken[..], [Action::Forward { to, .. }] if *to == pbx()),
        "a 200 from the PBX's address on another port counts: {taken:?}"
    );
}

#[test]
fn a_carrier_on_tcp_gets_in_dialog_requests_on_its_connection() {
    let now = Instant::now();
    let engine = proxying(config(), now);
    let connection: SocketAddr = "198.51.100.7:40000".parse().expect("addr");
    let invite = String::from_utf8(invite("tcp1"))
        .expect("utf8")
        .replace("SIP/2.0/UDP 198.51.100.7", "SIP/2.0/TCP 198.51.100.7");
    let mut actions = Vec::new();
    engine.handle(
        invite.as_bytes(),
        connection,
        Transport::Tcp,
        now,
        Duration::ZERO,
        &mut actions,
    );
    let forwarded = forwarded_to(&actions, pbx());
    assert!(
        forwarded.starts_with(
            "INVITE sip:5551234@192.0.2.10 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5060;branch="
        ),
        "the PBX leg stays UDP:\n{forwarded}"
    );
    let carrier_side = "<sip:192.0.2.10:5060;transport=tcp;lr;cfconn=198.51.100.7:40000>";
    let record_route = format!("<sip:192.0.2.10:5060;lr>, {carrier_side}");
    assert!(
        forwarded.contains(&format!("\r\nRecord-Route: {record_route}\r\n")),
        "RFC 5658 double Record-Route:\n{forwarded}"
    );

    // The PBX hangs up: its route set is the Record-Route in order.
    let bye = from_pbx(
        "BYE",
        pbx(),
        &record_route,
        "sip:carrier@198.51.100.7:5060;transport=tcp",
    );
    let out = handle(&engine, &bye, pbx(), now);
    let [
        Action::Forward {
            to,
            tcp: true,
            reconnect,
            bytes,
        },
    ] = &out[..]
    else {
        panic!("one forward over TCP expected: {out:?}");
    };
    assert_eq!(
        (*to, *reconnect),
        (connection, Some("198.51.100.7:5060".parse().expect("addr"))),
        "on the carrier's connection, not to its Contact's port; should that one be gone, \
         a new one to its Contact"
    );
    let bye = String::from_utf8_lossy(bytes);
    assert!(
        bye.starts_with(
            "BYE sip:carrier@198.51.100.7:5060;transport=tcp SIP/2.0\r\nVia: SIP/2.0/TCP 192.0.2.10:5060;branch="
        ),
        "{bye}"
    );
    assert!(!has_route(&bye), "both of our Routes are removed:\n{bye}");

    // The carrier hangs up on a new connection: its route set is reversed.
    let theirs = format!(
        "BYE sip:5551234@127.0.0.1:5080 SIP/2.0\r\nVia: SIP/2.0/TCP 198.51.100.7;branch=z9hG4bKc-bye\r\n\
Route: {carrier_side}, <sip:192.0.2.10:5060;lr>\r\nFrom: <sip:carrier@198.51.100.7>;tag=c1\r\n\
To: <sip:5551234@192.0.2.10>;tag=p1\r\nCall-ID: tcp1@carrier\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    );
    let mut actions = Vec::new();
    engine.handle(
        theirs.as_bytes(),
        "198.51.100.7:40001".parse().expect("addr"),
        Transport::Tcp,
        now,
        Duration::ZERO,
        &mut actions,
    );
    let to_pbx = forwarded_to(&actions, pbx());
    assert!(!has_route(&to_pbx), "{to_pbx}");
    assert!(
        to_pbx.contains(";cfconn=\"198.51.100.7:40001\""),
        "{to_pbx}"
    );
    // The PBX's 200 goes back on that connection, or, should it be gone, on a new one to
    // the address the carrier's Via gives (RFC 3261 §18.2.2: received, sent-by's port).
    let vias: String = to_pbx
        .lines()
        .filter(|line| line.starts_with("Via: "))
        .map(|line| format!("{line}\r\n"))
        .collect();
    let ok = format!(
        "SIP/2.0 200 OK\r\n{vias}From: <sip:carrier@198.51.100.7>;tag=c1\r\n\
To: <sip:5551234@192.0.2.10>;tag=p1\r\nCall-ID: tcp1@carrier\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    );
    let back = handle(&engine, ok.as_bytes(), pbx(), now);
    assert!(
        matches!(
            &back[..],
            [Action::Forward { to, tcp: true, reconnect: Some(listener), .. }]
                if *to == "198.51.100.7:40001".parse().expect("addr")
                    && *listener == "198.51.100.7:5060".parse().expect("addr")
        ),
        "{back:?}"
    );
    // A carrier on the PBX's own address (an SBC on this host) is told apart by the
    // order of our two values: its request goes to the PBX, not back to itself.
    let mut actions = Vec::new();
    engine.handle(
        theirs.as_bytes(),
        "127.0.0.1:40002".parse().expect("addr"),
        Transport::Tcp,
        now,
        Duration::ZERO,
        &mut actions,
    );
    forwarded_to(&actions, pbx());
}

#[test]
fn a_full_pool_is_busy_and_only_a_balancer_that_can_route_nothing_says_retry_after() {
    let now = Instant::now();
    let mut config = config();
    config.pools = vec![
        callfleet_core::config::PoolRule {
            name: callfleet_core::PoolName::new("germany").expect("pool"),
            domains: Vec::new(),
            prefixes: vec!["49".into()],
        },
        callfleet_core::config::PoolRule {
            name: callfleet_core::PoolName::new("france").expect("pool"),
            domains: Vec::new(),
            prefixes: vec!["33".into()],
        },
    ];
    let full_de = NodeStatus {
        pool: callfleet_core::PoolName::new("germany").expect("pool"),
        calls: 50,
        max_calls: 50,
        ..node("de", "sip:192.0.2.49:5060")
    };
    let engine = engine(
        config,
        vec![full_de, node("other", "sip:192.0.2.20:5060")],
        now,
    );
    let call = |number: &str| {
        let invite = String::from_utf8(request(
            "INVITE",
            number,
            Some(&format!("z9hG4bK{number}")),
            1,
            None,
            "",
        ))
        .expect("utf8")
        .replace("sip:5551234@", &format!("sip:{number}@"));
        text(&handle(&engine, invite.as_bytes(), carrier(), now)[0])
    };
    let busy = call("4930123");
    assert!(busy.starts_with("SIP/2.0 486 Busy Here\r\n"), "{busy}");
    assert!(!busy.contains("Retry-After"), "{busy}");
    let nobody = call("3312345");
    assert!(
        nobody.starts_with("SIP/2.0 503 Service Unavailable\r\n"),
        "{nobody}"
    );
    assert!(
        !nobody.contains("Retry-After"),
        "other pools can be served: no Retry-After\n{nobody}"
    );
    assert!(call("5551234").starts_with("SIP/2.0 302 "));
    assert_eq!(
        counters(&engine, &["busy", "unavailable", "redirected"]),
        expect(&[("busy", 1), ("unavailable", 1), ("redirected", 1)])
    );

    // Nothing routable at all: 503 with Retry-After, as OPTIONS says.
    let engine = self::engine(self::config(), vec![], now);
    let refused = text(&handle(&engine, &invite("none"), carrier(), now)[0]);
    assert!(refused.starts_with("SIP/2.0 503 "), "{refused}");
    assert!(refused.contains("\r\nRetry-After: 5\r\n"), "{refused}");
}

#[test]
fn addresses_nobody_can_reach_are_refused_at_start() {
    let local = || NodeId::new("lb").expect("id");
    let error = |config: &BalancerConfig| {
        Engine::new(config, local())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let wildcard = BalancerConfig::default();
    let refused = error(&wildcard);
    assert!(
        refused.contains("balancer.advertise") && refused.contains("0.0.0.0:5060"),
        "{refused}"
    );
    let advertised = BalancerConfig {
        advertise: "192.0.2.10:5060".into(),
        ..BalancerConfig::default()
    };
    assert_eq!(
        error(&advertised),
        "",
        "with an advertised address it starts"
    );

    let redirect = BalancerConfig {
        local_mode: LocalMode::Redirect,
        ..advertised.clone()
    };
    let refused = error(&redirect);
    assert!(
        refused.contains("balancer.local_pbx") && refused.contains("127.0.0.1:5080"),
        "{refused}"
    );
    for reachable in [
        BalancerConfig {
            local_pbx: "192.0.2.11:5080".into(),
            ..redirect.clone()
        },
        BalancerConfig {
            allow: vec!["127.0.0.0/8".into(), "::1".into()],
            ..redirect.clone()
        },
        BalancerConfig {
            listen: "127.0.0.1:5060".into(),
            advertise: String::new(),
            ..redirect.clone()
        },
    ] {
        assert_eq!(error(&reachable), "", "{reachable:?}");
    }
    let nowhere = BalancerConfig {
        local_pbx: "0.0.0.0:5080".into(),
        listen: "127.0.0.1:5060".into(),
        ..redirect
    };
    assert!(error(&nowhere).contains("balancer.local_pbx"));
}

/// Every request and response cell of the engine's tally that is not zero.
fn tally(engine: &Engine) -> Vec<(&'static str, &'static str, u64)> {
    use crate::metrics::{METHODS, ResponseOutcome};
    let methods = [
        Some(Method::Invite),
        Some(Method::Ack),
        Some(Method::Cancel),
        Some(Method::Options),
        Some(Method::Bye),
        Some(Method::Other),
        None,
    ];
    let mut cells = Vec::new();
    for (method, label) in methods.into_iter().zip(METHODS) {
        for outcome in Outcome::ALL {
            let n = engine.tally.requests(method, outcome);
            if n > 0 {
                cells.push((label, outcome.label(), n));
            }
        }
    }
    for outcome in ResponseOutcome::ALL {
        let n = engine.tally.responses(outcome);
        if n > 0 {
            cells.push(("response", outcome.label(), n));
        }
    }
    cells
}

#[test]
fn every_message_is_tallied_once_by_method_and_outcome() {
    let now = Instant::now();
    let mut config = config();
    config.local_mode = LocalMode::Redirect;
    config.local_pbx = "192.0.2.11:5080".into();
    config.allow = vec!["198.51.100.0/24".into()];
    config.deny_mode = DenyMode::Reject;
    let pool = |name: &str, prefix: &str| callfleet_core::config::PoolRule {
        name: callfleet_core::PoolName::new(name).expect("pool"),
        domains: Vec::new(),
        prefixes: vec![prefix.into()],
    };
    config.pools = vec![pool("elsewhere", "7"), pool("empty", "9")];
    let other = NodeStatus {
        pool: callfleet_core::PoolName::new("elsewhere").expect("pool"),
        ..node("other", "sip:192.0.2.20:5060")
    };
    let engine = engine(config, vec![node("lb", "sip:192.0.2.11:5080"), other], now);
    let number = |bytes: Vec<u8>, number: &str| {
        String::from_utf8(bytes)
            .expect("utf8")
            .replace("sip:5551234@", &format!("sip:{number}@"))
            .into_bytes()
    };
    let send = |bytes: &[u8]| handle(&engine, bytes, carrier(), now);

    let local = send(&request("INVITE", "t1", Some("z9hG4bKt1"), 1, None, ""));
    let tag = to_tag(&text(&local[0]));
    send(&request("INVITE", "t1", Some("z9hG4bKt1"), 1, None, ""));
    send(&request("ACK", "t1", Some("z9hG4bKt1"), 1, Some(&tag), ""));
    send(&number(
        request("INVITE", "t2", Some("z9hG4bKt2"), 1, None, ""),
        "9000",
    ));
    send(&number(
        request("INVITE", "t9", Some("z9hG4bKt9"), 1, None, ""),
        "7000",
    ));
    send(&request("OPTIONS", "t3", Some("z9hG4bKt3"), 1, None, ""));
    send(&request("CANCEL", "t4", Some("z9hG4bKt4"), 1, None, ""));
    send(&request("BYE", "t5", Some("z9hG4bKt5"), 2, Some("x"), ""));
    send(&request("BYE", "t6", Some("z9hG4bKt6"), 2, None, ""));
    send(&request(
        "INVITE",
        "t7",
        Some("z9hG4bKt7"),
        1,
        None,
        "Max-Forwards: 0\r\n",
    ));
    send(b"INVITE sip:5551234@192.0.2.10 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.7\r\n\r\n");
    send(b"not sip at all\r\n\r\n");
    send(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 203.0.113.9;branch=z9hG4bKx\r\nContent-Length: 0\r\n\r\n");
    let outside: SocketAddr = "203.0.113.9:5060".parse().expect("addr");
    handle(
        &engine,
        &request("OPTIONS", "t8", Some("z9hG4bKt8"), 1, None, ""),
        outside,
        now,
    );

    assert_eq!(
        tally(&engine),
        [
            ("INVITE", "302", 1),
            ("INVITE", "local", 1),
            ("INVITE", "503_no_node", 1),
            ("INVITE", "retransmission", 1),
            ("INVITE", "483", 1),
            ("INVITE", "dropped", 1),
            ("ACK", "absorbed", 1),
            ("CANCEL", "481", 1),
            ("OPTIONS", "200", 1),
            ("OPTIONS", "403", 1),
            ("BYE", "405", 1),
            ("BYE", "481", 1),
            ("unknown", "dropped", 1),
            ("response", "dropped", 1),
        ]
    );
}
