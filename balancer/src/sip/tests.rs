use std::net::SocketAddr;

use proptest::prelude::*;

use super::*;

/// An INVITE exactly as SIPp's `uac_302.xml` scenario sends it (captured with -trace_msg).
const SIPP_INVITE: &[u8] = b"INVITE sip:5551234@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-3411-1-0\r\n\
From: \"bench\" <sip:bench@127.0.0.1:5061>;tag=3411SIPpTag001\r\n\
To: <sip:5551234@127.0.0.1:5060>\r\n\
Call-ID: 1-3411@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:bench@127.0.0.1:5061>\r\n\
Max-Forwards: 70\r\n\
Content-Type: application/sdp\r\n\
Content-Length:   129\r\n\
\r\n\
v=0\r\n\
o=user1 53655765 2353687637 IN IP4 127.0.0.1\r\n\
s=-\r\n\
c=IN IP4 127.0.0.1\r\n\
t=0 0\r\n\
m=audio 6000 RTP/AVP 0\r\n\
a=rtpmap:0 PCMU/8000\r\n";

/// RFC 4475 §3.1.1.1 "wsinv" (short tortuous INVITE), typed in; `\\` is a backslash.
const RFC4475_WSINV: &[u8] = b"INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0\r\n\
TO :\r\n sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n\r\n\
from   : \"J Rosenberg \\\\\\\"\"       <sip:jdrosen@example.com>\r\n  ;\r\n  tag = 98asjd8\r\n\
MaX-fOrWaRdS: 0068\r\n\
Call-ID: wsinv.ndaksdj@192.0.2.1\r\n\
Content-Length   : 150\r\n\
cseq: 0009\r\n  INVITE\r\n\
Via  : SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;rport;branch=390skdjuw\r\n\
s :\r\n\
NewFangledHeader:   newfangled value\r\n continued newfangled value\r\n\
UnknownHeaderWithUnusualValue: ;;,,;;,;\r\n\
Content-Type: application/sdp\r\n\
Route:\r\n <sip:services.example.com;lr;unknownwith=value;unknown-no-value>\r\n\
v:  SIP  / 2.0  / TCP     spindle.example.com   ;\r\n  branch  =   z9hG4bK9ikj8  ,\r\n SIP  /    2.0   / UDP  192.168.255.111   ; branch=\r\n z9hG4bK30239\r\n\
m:\"Quoted string \\\"\\\"\" <sip:jdrosen@example.com> ; newparam =\r\n      newvalue ;\r\n  secondparam ; q = 0.33\r\n\
\r\n\
v=0\r\n\
o=mhandley 29739 7272939 IN IP4 192.0.2.3\r\n\
s=-\r\n\
c=IN IP4 192.0.2.4\r\n\
t=0 0\r\n\
m=audio 49217 RTP/AVP 0 12\r\n\
m=video 3227 RTP/AVP 31\r\n\
a=rtpmap:31 LPC\r\n";

fn source() -> SocketAddr {
    "127.0.0.1:5061".parse().expect("addr")
}

fn request(bytes: &[u8]) -> Request<'_> {
    let message = parse(bytes, Framing::Datagram)
        .expect("parses")
        .expect("complete");
    Request::from_message(message).expect("addressable")
}

#[test]
fn sipp_invite_parses() {
    let request = request(SIPP_INVITE);
    assert_eq!(request.method, Method::Invite);
    assert_eq!(request.via.branch, Some(&b"z9hG4bK-3411-1-0"[..]));
    assert_eq!(request.via.host, b"127.0.0.1");
    assert_eq!(request.via.port, Some(5061));
    assert_eq!(request.via.transport, Transport::Udp);
    assert_eq!(request.from_tag, Some(&b"3411SIPpTag001"[..]));
    assert_eq!(request.to_tag, None);
    assert_eq!(request.cseq, 1);
    assert_eq!(request.cseq_method, b"INVITE");
    assert_eq!(request.max_forwards, Some(70));
    assert_eq!(request.message.body.len(), 129);
    let uri = Uri::parse(request.uri).expect("uri");
    assert_eq!(uri.user, Some(&b"5551234"[..]));
    assert_eq!(uri.host, b"127.0.0.1");
    assert_eq!(uri.port, Some(5060));
}

#[test]
fn rfc4475_wsinv_parses() {
    let request = request(RFC4475_WSINV);
    assert_eq!(request.method, Method::Invite);
    assert_eq!(request.max_forwards, Some(68));
    assert_eq!(request.cseq, 9);
    assert_eq!(request.cseq_method, b"INVITE");
    assert_eq!(request.to_tag, Some(&b"1918181833n"[..]));
    assert_eq!(request.from_tag, Some(&b"98asjd8"[..]));
    assert_eq!(request.call_id, b"wsinv.ndaksdj@192.0.2.1");
    assert_eq!(request.via.host, b"192.0.2.2");
    assert_eq!(request.via.rport, Some(None));
    assert_eq!(request.via.branch, Some(&b"390skdjuw"[..]));
    assert_eq!(request.message.body.len(), 150);
    let vias: Vec<_> = request
        .message
        .headers_named(HeaderName::Via)
        .flat_map(|h| split_values(h.value))
        .map(|v| Via::parse(v).expect("via"))
        .collect();
    assert_eq!(vias.len(), 3, "two Via headers, the second with two values");
    assert_eq!(vias[1].transport, Transport::Tcp);
    assert_eq!(vias[1].host, b"spindle.example.com");
    assert_eq!(vias[1].branch, Some(&b"z9hG4bK9ikj8"[..]));
    assert_eq!(vias[2].branch, Some(&b"z9hG4bK30239"[..]));
    let route = request
        .message
        .header(HeaderName::Route)
        .expect("route header");
    let route_uri = Uri::parse(addr_uri(route.value)).expect("route uri");
    assert!(route_uri.lr);
    assert_eq!(route_uri.host, b"services.example.com");
    assert_eq!(
        request.message.header(HeaderName::Contact).map(|h| h.name),
        Some(HeaderName::Contact),
        "compact m is Contact"
    );
}

#[test]
fn compact_forms_map_to_full_names() {
    for (compact, full) in [
        ("v", HeaderName::Via),
        ("f", HeaderName::From),
        ("t", HeaderName::To),
        ("i", HeaderName::CallId),
        ("m", HeaderName::Contact),
        ("l", HeaderName::ContentLength),
        ("CALL-ID", HeaderName::CallId),
        ("k", HeaderName::Other),
        ("s", HeaderName::Other),
        ("c", HeaderName::Other),
    ] {
        assert_eq!(
            HeaderName::from_bytes(compact.as_bytes()),
            full,
            "{compact}"
        );
    }
}

#[test]
fn redirect_response_copies_and_tags() {
    let request = request(SIPP_INVITE);
    let mut out = Vec::new();
    print::response(
        &request,
        source(),
        302,
        "Moved Temporarily",
        b"abc123",
        b"Contact: <sip:5551234@10.0.0.2:5060>\r\n",
        &mut out,
    );
    let text = String::from_utf8(out).expect("utf8");
    assert_eq!(
        text,
        "SIP/2.0 302 Moved Temporarily\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-3411-1-0\r\n\
From: \"bench\" <sip:bench@127.0.0.1:5061>;tag=3411SIPpTag001\r\n\
To: <sip:5551234@127.0.0.1:5060>;tag=abc123\r\n\
Call-ID: 1-3411@127.0.0.1\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:5551234@10.0.0.2:5060>\r\n\
Content-Length: 0\r\n\r\n"
    );
    let reparsed = parse(text.as_bytes(), Framing::Datagram)
        .expect("our output parses")
        .expect("complete");
    assert_eq!(
        reparsed.start,
        StartLine::Response {
            code: 302,
            reason: b"Moved Temporarily"
        }
    );
}

#[test]
fn rport_and_received_are_filled_in() {
    let bytes = b"OPTIONS sip:lb.example.com SIP/2.0\r\n\
v: SIP/2.0/UDP carrier.example.net:5070;rport;branch=z9hG4bKx, SIP/2.0/UDP 10.9.9.9;branch=z9hG4bKy\r\n\
f: <sip:probe@carrier.example.net>;tag=1\r\n\
t: <sip:lb.example.com>\r\n\
i: opt-1\r\n\
CSeq: 7 OPTIONS\r\n\
Max-Forwards: 0\r\n\
\r\n";
    let request = request(bytes);
    let mut out = Vec::new();
    let from: SocketAddr = "198.51.100.7:40000".parse().expect("addr");
    print::response(&request, from, 200, "OK", b"t", b"", &mut out);
    let text = String::from_utf8(out).expect("utf8");
    assert!(
        text.contains(
            "Via: SIP/2.0/UDP carrier.example.net:5070;rport=40000;branch=z9hG4bKx;received=198.51.100.7, SIP/2.0/UDP 10.9.9.9;branch=z9hG4bKy\r\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("To: <sip:lb.example.com>;tag=t\r\n"),
        "{text}"
    );
}

#[test]
fn stateless_forward_and_response_pop() {
    let request = request(SIPP_INVITE);
    let mut out = Vec::new();
    print::forward_request(
        &request,
        source(),
        b"SIP/2.0/UDP 127.0.0.1:5060",
        b"z9hG4bKcf1",
        Some(b"<sip:127.0.0.1:5060;lr>"),
        false,
        &mut out,
    );
    let forwarded = parse(&out, Framing::Datagram)
        .expect("parses")
        .expect("complete");
    let forwarded = Request::from_message(forwarded).expect("addressable");
    assert_eq!(forwarded.via.branch, Some(&b"z9hG4bKcf1"[..]));
    assert_eq!(forwarded.max_forwards, Some(69));
    assert_eq!(forwarded.message.body, request.message.body);
    assert_eq!(forwarded.message.headers_named(HeaderName::Via).count(), 2);
    assert!(
        forwarded
            .message
            .headers
            .iter()
            .any(|h| h.name == HeaderName::RecordRoute)
    );

    // The PBX answers through us: its response carries both Vias; we pop ours.
    let answer = b"SIP/2.0 180 Ringing\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKcf1\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-3411-1-0\r\n\
From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n\
Content-Length: 0\r\n\r\n";
    let message = parse(answer, Framing::Datagram)
        .expect("parses")
        .expect("complete");
    let mut popped = Vec::new();
    print::forward_response(&message, &mut popped);
    let popped = parse(&popped, Framing::Datagram)
        .expect("parses")
        .expect("complete");
    let vias: Vec<_> = popped.headers_named(HeaderName::Via).collect();
    assert_eq!(vias.len(), 1);
    assert_eq!(
        Via::parse(vias[0].value).expect("via").branch,
        Some(&b"z9hG4bK-3411-1-0"[..])
    );
}

#[test]
fn streams_frame_by_content_length() {
    let two = [SIPP_INVITE, SIPP_INVITE].concat();
    let first = parse(&two, Framing::Stream)
        .expect("parses")
        .expect("complete");
    assert_eq!(first.len, SIPP_INVITE.len());
    let second = parse(&two[first.len..], Framing::Stream)
        .expect("parses")
        .expect("complete");
    assert_eq!(second.len, SIPP_INVITE.len());
    for cut in 0..SIPP_INVITE.len() {
        assert_eq!(
            parse(&SIPP_INVITE[..cut], Framing::Stream).map(|m| m.is_some()),
            Ok(false),
            "a prefix of {cut} bytes needs more"
        );
    }
}

#[test]
fn faults_are_classified() {
    assert_eq!(
        parse(b"hello world\r\n\r\n", Framing::Datagram),
        Err(ParseError::UnsupportedVersion)
    );
    assert_eq!(
        parse(b"\x16\x03\x01\x02\x00", Framing::Datagram),
        Err(ParseError::NoBlankLine)
    );
    let bad_length = b"INVITE sip:1@h SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
From: <sip:a@h>;tag=1\r\nTo: <sip:1@h>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\
Content-Length: abc\r\n\r\n";
    let request = request(bad_length);
    assert_eq!(request.defect, Some(ParseError::BadContentLength));
    let no_call_id = b"INVITE sip:1@h SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
From: <sip:a@h>;tag=1\r\nTo: <sip:1@h>\r\nCSeq: 1 INVITE\r\n\r\n";
    let message = parse(no_call_id, Framing::Datagram)
        .expect("parses")
        .expect("complete");
    assert_eq!(
        Request::from_message(message).map(|_| ()),
        Err(ParseError::BadHeader("Call-ID"))
    );
}

#[test]
fn uris_split_into_user_host_port() {
    let uri = Uri::parse(b"sip:+4930123;npdi@[2001:db8::1]:5070;transport=tcp?X=y").expect("uri");
    assert_eq!(uri.user, Some(&b"+4930123;npdi"[..]));
    assert_eq!(uri.host, b"2001:db8::1");
    assert_eq!(uri.port, Some(5070));
    assert_eq!(uri.transport, Some(&b"tcp"[..]));
    assert!(Uri::parse(b"tel:+4930123").is_err());
    let bare = Uri::parse(b"sip:pbx.example.com").expect("uri");
    assert_eq!(
        (bare.user, bare.host, bare.port),
        (None, &b"pbx.example.com"[..], None)
    );
}

proptest! {
    #[test]
    fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        for framing in [Framing::Datagram, Framing::Stream] {
            if let Ok(Some(message)) = parse(&bytes, framing) {
                prop_assert!(message.len <= bytes.len());
                let _ = Request::from_message(message);
            }
        }
    }

    #[test]
    fn mutated_invites_never_panic(cut in 0usize..SIPP_INVITE.len(), byte in any::<u8>()) {
        let mut bytes = SIPP_INVITE.to_vec();
        bytes[cut] = byte;
        if let Ok(Some(message)) = parse(&bytes, Framing::Datagram)
            && let Ok(request) = Request::from_message(message)
        {
            let mut out = Vec::new();
            print::response(&request, source(), 302, "Moved Temporarily", b"t", b"", &mut out);
            print::forward_request(&request, source(), b"SIP/2.0/UDP 127.0.0.1:5060", b"z9hG4bKx", None, true, &mut out);
        }
    }

    #[test]
    fn responses_round_trip(
        branch in "[a-zA-Z0-9.-]{1,24}",
        call_id in "[a-zA-Z0-9@.-]{1,40}",
        cseq in 0u32..1_000_000,
        port in 1u16..,
    ) {
        let text = format!(
            "INVITE sip:100@lb SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:{port};branch=z9hG4bK{branch};rport\r\n\
From: <sip:a@x>;tag=f\r\nTo: <sip:100@lb>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} INVITE\r\n\r\n"
        );
        let request = request(text.as_bytes());
        let mut out = Vec::new();
        print::response(&request, source(), 503, "Service Unavailable", b"t1", b"Retry-After: 5\r\n", &mut out);
        let message = parse(&out, Framing::Datagram).expect("parses").expect("complete");
        let via_value = message.header(HeaderName::Via).expect("via").value;
        let via = Via::parse(via_value).expect("via parses");
        let expected_branch = format!("z9hG4bK{branch}");
        prop_assert_eq!(via.branch, Some(expected_branch.as_bytes()));
        prop_assert_eq!(via.rport, Some(Some(5061)));
        prop_assert_eq!(message.header(HeaderName::CallId).expect("call-id").value, call_id.as_bytes());
        let expected_cseq = format!("{cseq} INVITE");
        prop_assert_eq!(message.header(HeaderName::CSeq).expect("cseq").value, expected_cseq.as_bytes());
        prop_assert_eq!(tag(message.header(HeaderName::To).expect("to").value), Some(&b"t1"[..]));
    }
}
