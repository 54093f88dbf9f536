//! User-space cost of one redirected call: INVITE → 302 (transaction created) → ACK
//! (transaction ended), through `Engine::handle` with no sockets. The kernel's share of a
//! call (receive, send) is measured by `scripts/bench-balancer`; this isolates ours.
//!
//! `cargo bench -p callfleet-balancer --bench engine`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use callfleet_balancer::engine::{Action, Engine};
use callfleet_balancer::route::FleetView;
use callfleet_balancer::sip::Transport;
use callfleet_core::config::BalancerConfig;
use callfleet_core::testing::node_status;
use callfleet_core::{NodeId, NodeStatus};

fn node(i: usize) -> NodeStatus {
    NodeStatus {
        max_calls: u32::MAX,
        age_ms: 0,
        ..node_status(&format!("node-{i}"), &format!("sip:127.0.0.1:{}", 5071 + i))
    }
}

fn message(method: &str, call: u64, to_tag: &str) -> Vec<u8> {
    let body = if method == "INVITE" {
        "v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    } else {
        ""
    };
    format!(
        "{method} sip:5551234@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-3411-{call}-0\r\n\
From: \"bench\" <sip:bench@127.0.0.1:5061>;tag=3411SIPpTag00{call}\r\n\
To: <sip:5551234@127.0.0.1:5060>{to_tag}\r\n\
Call-ID: {call}-3411@127.0.0.1\r\n\
CSeq: 1 {method}\r\n\
Contact: <sip:bench@127.0.0.1:5061>\r\n\
Max-Forwards: 70\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn main() {
    let config = BalancerConfig {
        listen: "127.0.0.1:5060".into(),
        ..BalancerConfig::default()
    };
    let local = NodeId::new("lb").expect("id");
    // As `run` does: with the recorder in place each INVITE's decision time is recorded
    // for real, and its cost is part of the figure.
    callfleet_core::metrics::install();
    let engine = Engine::new(&config, local.clone()).expect("engine");
    engine.set_view(FleetView::from_nodes(
        (0..4).map(node).collect(),
        &local,
        None,
        Instant::now(),
    ));
    let source: SocketAddr = "127.0.0.1:5061".parse().expect("addr");
    // Calls go in rounds of 1,000 (INVITEs, then their ACKs), so the transaction table
    // stays as small as under a real load where ACKs follow within milliseconds.
    let calls = 200_000u64;
    let round = 1_000u64;
    let mut actions = Vec::new();
    let mut invite_time = Duration::ZERO;
    let mut ack_time = Duration::ZERO;
    let mut live = 0;
    for first in (0..calls).step_by(round as usize) {
        let invites: Vec<_> = (first..first + round)
            .map(|i| message("INVITE", i, ""))
            .collect();
        let started = Instant::now();
        for invite in &invites {
            engine.handle(
                invite,
                source,
                Transport::Udp,
                Instant::now(),
                Duration::ZERO,
                &mut actions,
            );
        }
        invite_time += started.elapsed();
        live = live.max(engine.transactions.len());
        let acks: Vec<_> = actions
            .drain(..)
            .zip(first..)
            .map(|(action, i)| {
                let Action::Reply { bytes, .. } = action else {
                    panic!("a 302 expected");
                };
                let text = String::from_utf8_lossy(&bytes);
                let tag = text
                    .lines()
                    .find_map(|l| l.strip_prefix("To: ").and_then(|to| to.split_once(";tag=")))
                    .map(|(_, tag)| format!(";tag={tag}"))
                    .expect("to-tag");
                message("ACK", i, &tag)
            })
            .collect();
        let started = Instant::now();
        for ack in &acks {
            engine.handle(
                ack,
                source,
                Transport::Udp,
                Instant::now(),
                Duration::ZERO,
                &mut actions,
            );
        }
        ack_time += started.elapsed();
    }
    assert_eq!(engine.transactions.len(), 0, "every ACK matched");
    let per = |d: Duration| d.as_nanos() as f64 / calls as f64;
    println!("engine, {calls} calls, {live} live transactions at the peak");
    println!("  INVITE -> 302:     {:>7.0} ns/call", per(invite_time));
    println!("  ACK absorbed:      {:>7.0} ns/call", per(ack_time));
    println!(
        "  user-space total:  {:>7.0} ns/call (the whole call incl. the kernel: goal <= 12,000 ns)",
        per(invite_time + ack_time)
    );
}
