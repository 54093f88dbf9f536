//! Feeds arbitrary bytes to the balancer the way its sockets do: as a datagram, as a TCP
//! stream framed message after message, and through the whole request path (parse,
//! decide, print) of an engine with one node in its fleet view.
//!
//! Besides "never panics": a framed message never claims more bytes than it was given, a
//! strict prefix of a framed message never parses as a complete one, and every response
//! or forwarded message the engine prints parses again.
//!
//! Parsing again with our own parser cannot see what our parser gets wrong (it read
//! `Contact: <sip:evil.example>@node>` as one URI), so an independent one
//! (ezk-sip-types, through `balancer/src/sip/oracle.rs`) reads the output too: every
//! Contact we print reads whole, whatever came in, and when the input itself reads as SIP
//! to it, so does everything we print in answer.

#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use callfleet_balancer::engine::{Action, Engine};
use callfleet_balancer::route::FleetView;
use callfleet_balancer::sip::{Framing, Request, Transport, parse};
use callfleet_core::config::BalancerConfig;
use callfleet_core::testing::node_status;
use callfleet_core::{NodeId, NodeStatus};
use libfuzzer_sys::fuzz_target;

#[path = "../../balancer/src/sip/oracle.rs"]
#[allow(dead_code)]
mod oracle;

/// A fresh engine per input, so what it prints depends on that input alone (a shared one
/// would answer a later input that matches an earlier one's transaction with the earlier
/// one's response) and every crash replays from its artifact.
fn engine() -> Engine {
    let config = BalancerConfig {
        listen: "127.0.0.1:5060".into(),
        ..BalancerConfig::default()
    };
    let local = NodeId::new("lb").expect("id");
    let engine = Engine::new(&config, local.clone()).expect("engine");
    let node = NodeStatus {
        max_calls: u32::MAX,
        age_ms: 0,
        ..node_status("node-a", "sip:127.0.0.1:5071")
    };
    engine.set_view(FleetView::from_nodes(
        vec![node],
        &local,
        None,
        Instant::now(),
    ));
    engine
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(message)) = parse(data, Framing::Datagram) {
        assert!(message.len <= data.len());
        let _ = Request::from_message(message);
    }
    let mut rest = data;
    while let Ok(Some(message)) = parse(rest, Framing::Stream) {
        assert!(message.len > 0 && message.len <= rest.len());
        if message.defect.is_some() {
            break;
        }
        let cut = message.len - 1;
        if let Ok(Some(prefix)) = parse(&rest[..cut], Framing::Stream) {
            assert!(prefix.len <= cut);
        }
        rest = &rest[message.len..];
    }
    let source: SocketAddr = "192.0.2.1:5060".parse().expect("addr");
    let input_reads = oracle::read(data).is_ok();
    let mut actions = Vec::new();
    for transport in [Transport::Udp, Transport::Tcp] {
        engine().handle(
            data,
            source,
            transport,
            Instant::now(),
            Duration::ZERO,
            &mut actions,
        );
        for action in actions.drain(..) {
            let (bytes, redirect) = match action {
                Action::Reply { bytes, .. } => {
                    let redirect = bytes.starts_with(b"SIP/2.0 3");
                    (bytes, redirect)
                }
                Action::Forward { bytes, .. } => (bytes, false),
                Action::Close => continue,
            };
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                matches!(parse(&bytes, Framing::Datagram), Ok(Some(_))),
                "we printed something we cannot parse: {text}"
            );
            // The Contacts of a redirect are ours (forwarded messages copy theirs).
            if redirect {
                let lines = text.lines().filter(|l| l.starts_with("Contact:")).count();
                match oracle::contacts(&bytes) {
                    Ok(contacts) => assert_eq!(
                        contacts.len(),
                        lines,
                        "one Contact per Contact line we print: {text}"
                    ),
                    Err(e) => panic!("a Contact we printed does not read: {e}\n{text}"),
                }
            }
            if input_reads && let Err(e) = oracle::read(&bytes) {
                panic!(
                    "SIP that ezk-sip-types reads got an answer it does not: {e}\n{}\n----\n{text}",
                    String::from_utf8_lossy(data)
                );
            }
        }
    }
});
