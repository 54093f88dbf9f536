use std::net::SocketAddr;

use proptest::prelude::*;

use super::oracle;
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
    let read = oracle::read(text.as_bytes()).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    assert_eq!(read.status, Some(302));
    assert_eq!(read.contacts.len(), 1);
    assert_eq!(
        oracle::user(&read.contacts[0].uri.uri).as_deref(),
        Some("5551234")
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
    let read =
        oracle::read(&out).unwrap_or_else(|e| panic!("{e}:\n{}", String::from_utf8_lossy(&out)));
    assert_eq!(read.vias.len(), 2);
    assert_eq!(read.max_forwards, Some(69));
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
fn a_bare_cr_in_the_head_is_no_line_end_we_copy() {
    // Found by the fuzz target's oracle: the Call-ID (copied into every response) held a
    // bare CR, which ezk-sip-types, like many parsers, reads as the end of the line.
    let injected = b"OPTIONS sip:lb SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
From: <sip:a@h>;tag=1\r\nTo: <sip:lb>\r\nCall-ID: x\rContact: <sip:evil@203.0.113.66>\r\n\
CSeq: 1 OPTIONS\r\n\r\n";
    assert_eq!(
        parse(injected, Framing::Datagram),
        Err(ParseError::BadHeaderLine)
    );
    let cr_cr_lf = b"OPTIONS sip:lb SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\r\n\r\n";
    assert_eq!(
        parse(cr_cr_lf, Framing::Stream),
        Err(ParseError::BadHeaderLine)
    );
    // A CR in the body is the body's business.
    let body = b"OPTIONS sip:lb SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
Content-Length: 3\r\n\r\na\rb";
    assert_eq!(
        parse(body, Framing::Datagram).map(|m| m.map(|m| m.body)),
        Ok(Some(&b"a\rb"[..]))
    );
}

#[test]
fn control_bytes_in_the_head_are_refused_htab_is_whitespace() {
    // Found by `mutated_invites_never_panic`: a VT after the To value, which ezk-sip-types
    // reads as trailing whitespace, ended up between the value and the tag we append.
    let with = |byte: u8| {
        let mut text = b"OPTIONS sip:lb SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
From: <sip:a@h>;tag=1\r\nTo: <sip:lb>"
            .to_vec();
        text.push(byte);
        text.extend_from_slice(b"\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n\r\n");
        text
    };
    for byte in (0u8..0x20)
        .filter(|b| !matches!(b, b'\t' | b'\r' | b'\n'))
        .chain([0x7f])
    {
        assert_eq!(
            parse(&with(byte), Framing::Datagram),
            Err(ParseError::BadHeaderLine),
            "byte {byte:#04x}"
        );
    }
    for byte in [b'\t', b' '] {
        let bytes = with(byte);
        let message = parse(&bytes, Framing::Datagram)
            .expect("parses")
            .expect("complete");
        assert_eq!(
            message.header(HeaderName::To).map(|h| h.value),
            Some(&b"<sip:lb>"[..])
        );
    }
}

#[test]
fn uris_split_into_user_host_port() {
    let uri = Uri::parse(b"sip:+4930123;npdi@[2001:db8::1]:5070;transport=tcp?X=y").expect("uri");
    assert_eq!(uri.user, Some(&b"+4930123;npdi"[..]));
    assert_eq!(uri.host, b"2001:db8::1");
    assert_eq!(uri.port, Some(5070));
    assert_eq!(uri.transport, Some(&b"tcp"[..]));
    let tel = Uri::parse(b"tel:+49-30-123;phone-context=example.com").expect("tel uri");
    assert_eq!(
        (tel.tel, tel.user, tel.host),
        (
            true,
            Some(&b"+49-30-123;phone-context=example.com"[..]),
            &b""[..]
        )
    );
    let with_password = Uri::parse(b"sip:alice:secret@example.com").expect("uri");
    assert_eq!(with_password.user, Some(&b"alice"[..]));
    assert!(Uri::parse(b"SIPS:%41lice@EXAMPLE.com").expect("uri").secure);
    for (bad, fault) in [
        (&b"sip:evil.example>@lb"[..], ParseError::BadUri),
        (b"sip:@lb", ParseError::BadUri),
        (b"sip:a@b@lb", ParseError::BadUri),
        (b"sip:lb;;lr", ParseError::BadUri),
        (b"sip:lb?", ParseError::BadUri),
        (b"sip:[2001:db8::1", ParseError::BadUri),
        (b"tel:", ParseError::BadUri),
        (b"tel:+49#1", ParseError::BadUri),
        (b"tel:+49;=x", ParseError::BadUri),
        (b"5551234", ParseError::BadUri),
        (b"http://lb/5551234", ParseError::UnsupportedScheme),
        (b"urn:service:sos", ParseError::UnsupportedScheme),
        (b"http://lb/<x>", ParseError::BadUri),
    ] {
        assert_eq!(
            Uri::parse(bad),
            Err(fault),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    let bare = Uri::parse(b"sip:pbx.example.com").expect("uri");
    assert_eq!(
        (bare.user, bare.host, bare.port),
        (None, &b"pbx.example.com"[..], None)
    );
}

#[test]
fn redirect_contacts_keep_the_scheme_and_number_and_escape_the_rest() {
    let contact = |uri: Option<Uri<'_>>, q| {
        let mut out = Vec::new();
        print::contact(&mut out, uri.as_ref(), "10.0.0.2:5060", ";transport=tcp", q);
        String::from_utf8(out).expect("utf8")
    };
    let parsed = |text: &'static [u8]| Some(Uri::parse(text).expect("uri"));
    assert_eq!(
        contact(parsed(b"sips:5551234@lb"), None),
        "Contact: <sips:5551234@10.0.0.2:5060;transport=tcp>\r\n"
    );
    assert_eq!(
        contact(parsed(b"tel:+4930123;phone-context=x.example"), Some(10)),
        "Contact: <sip:+4930123;phone-context=x.example@10.0.0.2:5060;user=phone;transport=tcp>;q=1.0\r\n"
    );
    assert_eq!(
        contact(None, Some(9)),
        "Contact: <sip:10.0.0.2:5060;transport=tcp>;q=0.9\r\n"
    );
    // A user part that did not come through Uri::parse is escaped, never copied raw.
    let hostile = Uri {
        user: Some(b"evil.example>@x\r\nX: %4 %41"),
        ..Uri::parse(b"sip:lb").expect("uri")
    };
    let line = contact(Some(hostile), None);
    assert_eq!(
        line,
        "Contact: <sip:evil.example%3E%40x%0D%0AX%3A%20%254%20%41@10.0.0.2:5060;transport=tcp>\r\n"
    );
    let message = format!(
        "SIP/2.0 302 Moved Temporarily\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n\
From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n{line}\
Content-Length: 0\r\n\r\n"
    );
    let read = oracle::read(message.as_bytes()).unwrap_or_else(|e| panic!("{e}:\n{message}"));
    assert_eq!(read.contacts.len(), 1);
    assert_eq!(
        oracle::user(&read.contacts[0].uri.uri).as_deref(),
        Some("evil.example>@x\r\nX: %4 A"),
        "the same user, once unescaped"
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
            let mut response = Vec::new();
            print::response(&request, source(), 302, "Moved Temporarily", b"t", b"", &mut response);
            let mut forwarded = Vec::new();
            print::forward_request(&request, source(), b"SIP/2.0/UDP 127.0.0.1:5060", b"z9hG4bKx", None, true, &mut forwarded);
            // What the independent parser can read, we must not make unreadable.
            if oracle::read(&bytes).is_ok() {
                for out in [response, forwarded] {
                    prop_assert!(
                        oracle::read(&out).is_ok(),
                        "{:?}:\n{}",
                        oracle::read(&out).err(),
                        String::from_utf8_lossy(&out)
                    );
                }
            }
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
        let read = oracle::read(&out).map_err(TestCaseError::fail)?;
        prop_assert_eq!(read.cseq.cseq, cseq);
        prop_assert_eq!(read.top_via_param("rport"), Some("5061".to_owned()));
        prop_assert_eq!(read.top_via_param("received"), Some("127.0.0.1".to_owned()));
    }
}

// ---------------------------------------------------------------------------------------
// Hostile and unusual requests, through the whole engine, read back by an independent
// parser (ezk-sip-types, `oracle.rs`) rather than ours.
// ---------------------------------------------------------------------------------------

mod hostile {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use callfleet_core::config::BalancerConfig;
    use callfleet_core::testing::node_status;
    use callfleet_core::{NodeId, NodeStatus};
    use proptest::prelude::*;

    use super::super::oracle;
    use super::super::*;
    use crate::engine::{Action, Engine};
    use crate::route::FleetView;

    const CARRIER: &str = "198.51.100.7:5062";
    /// Where the balancer proxies the local node's calls (`local_pbx`).
    const PBX: &str = "127.0.0.1:5080";

    fn carrier() -> SocketAddr {
        CARRIER.parse().expect("addr")
    }

    /// A balancer at 192.0.2.10:5060 whose fleet view holds `node-a` (127.0.0.1:5071) and,
    /// with `local`, itself (`lb`, whose PBX is [`PBX`]) as the only node.
    fn engine(local: bool) -> Engine {
        let config = BalancerConfig {
            listen: "192.0.2.10:5060".into(),
            local_pbx: PBX.into(),
            ..BalancerConfig::default()
        };
        let id = NodeId::new("lb").expect("id");
        let engine = Engine::new(&config, id.clone()).expect("engine");
        let node = if local {
            node_status("lb", "sip:127.0.0.1:5080")
        } else {
            node_status("node-a", "sip:127.0.0.1:5071")
        };
        let node = NodeStatus {
            max_calls: u32::MAX,
            age_ms: 0,
            ..node
        };
        engine.set_view(FleetView::from_nodes(vec![node], &id, None, Instant::now()));
        engine
    }

    fn handle(engine: &Engine, bytes: &[u8]) -> Vec<Action> {
        let mut actions = Vec::new();
        engine.handle(
            bytes,
            carrier(),
            Transport::Udp,
            Instant::now(),
            Duration::ZERO,
            &mut actions,
        );
        actions
    }

    /// The one reply `bytes` get, as text; panics on anything else.
    fn reply(engine: &Engine, bytes: &[u8]) -> String {
        match &handle(engine, bytes)[..] {
            [Action::Reply { bytes, .. }] => String::from_utf8_lossy(bytes).into_owned(),
            other => panic!(
                "expected one reply to\n{}\ngot {other:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
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

    fn status_line(text: &str) -> &str {
        text.split("\r\n").next().unwrap_or("")
    }

    /// A carrier's request; `cseq` is the whole CSeq value.
    fn req(method: &str, uri: &str, cseq: &str) -> Vec<u8> {
        req_via(method, uri, cseq, "")
    }

    /// Like [`req`], with `via_params` appended to the top Via after its branch.
    fn req_via(method: &str, uri: &str, cseq: &str, via_params: &str) -> Vec<u8> {
        format!(
            "{method} {uri} SIP/2.0\r\n\
Via: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-h1{via_params}\r\n\
Max-Forwards: 70\r\n\
From: <sip:carrier@198.51.100.7>;tag=c1\r\n\
To: <sip:5551234@192.0.2.10>\r\n\
Call-ID: hostile-1@198.51.100.7\r\n\
CSeq: {cseq}\r\n\
Content-Length: 0\r\n\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn cseq_numbers_below_2_31_are_read_and_copied_as_written() {
        // 2**31 - 1: ten digits, the largest CSeq number RFC 3261 §8.1.1.5 allows.
        let bytes = req("INVITE", "sip:5551234@192.0.2.10", "2147483647 INVITE");
        let message = parse(&bytes, Framing::Datagram)
            .expect("parses")
            .expect("complete");
        let request = Request::from_message(message).expect("a ten-digit CSeq is readable");
        assert_eq!(request.cseq, 2_147_483_647);
        assert_eq!(request.defect, None);
        let moved = reply(&engine(false), &bytes);
        assert_eq!(status_line(&moved), "SIP/2.0 302 Moved Temporarily");
        let read = oracle::read(moved.as_bytes()).unwrap_or_else(|e| panic!("{e}:\n{moved}"));
        assert_eq!(read.cseq_number, "2147483647");
        assert_eq!(read.cseq.cseq, 2_147_483_647);
    }

    #[test]
    fn malformed_requests_get_400_and_never_a_routing_decision() {
        let too_large = "SIP/2.0 400 Bad Request (CSeq number of 2**31 or more)";
        let mismatch = "SIP/2.0 400 Bad Request (CSeq method is not the request's method)";
        let bad_uri = "SIP/2.0 400 Bad Request (malformed Request-URI)";
        let scheme = "SIP/2.0 416 Unsupported URI Scheme";
        let bad_cseq = "SIP/2.0 400 Bad Request (missing or malformed CSeq header)";
        let corpus: &[(&str, &str, &str, &str)] = &[
            (
                "INVITE",
                "sip:5551234@192.0.2.10",
                "2147483648 INVITE",
                too_large,
            ),
            (
                "INVITE",
                "sip:5551234@192.0.2.10",
                "4294967296 INVITE",
                too_large,
            ),
            (
                "INVITE",
                "sip:5551234@192.0.2.10",
                "99999999999999999999 INVITE",
                too_large,
            ),
            ("OPTIONS", "sip:192.0.2.10", "2147483648 OPTIONS", too_large),
            ("INVITE", "sip:5551234@192.0.2.10", "1 OPTIONS", mismatch),
            ("INVITE", "sip:5551234@192.0.2.10", "1 invite", mismatch),
            ("OPTIONS", "sip:192.0.2.10", "1 INVITE", mismatch),
            ("CANCEL", "sip:5551234@192.0.2.10", "1 INVITE", mismatch),
            ("INVITE", "5551234", "1 INVITE", bad_uri),
            (
                "INVITE",
                "sip:evil.example>@192.0.2.10",
                "1 INVITE",
                bad_uri,
            ),
            ("INVITE", "sip:a\"b@192.0.2.10", "1 INVITE", bad_uri),
            ("INVITE", "sip:5551234@", "1 INVITE", bad_uri),
            ("INVITE", "sip:5551234@192.0.2.10>", "1 INVITE", bad_uri),
            (
                "INVITE",
                "sip:5551234@192.0.2.10;x=<y>",
                "1 INVITE",
                bad_uri,
            ),
            ("INVITE", "sip:55%2@192.0.2.10", "1 INVITE", bad_uri),
            ("INVITE", "sip:a@b@192.0.2.10", "1 INVITE", bad_uri),
            ("INVITE", "tel:+49<30", "1 INVITE", bad_uri),
            ("INVITE", "http://192.0.2.10/5551234", "1 INVITE", scheme),
            ("INVITE", "urn:service:sos", "1 INVITE", scheme),
            ("OPTIONS", "im:alice@192.0.2.10", "1 OPTIONS", scheme),
            ("INVITE", "sip:5551234@192.0.2.10", "-1 INVITE", bad_cseq),
            ("INVITE", "sip:5551234@192.0.2.10", "abc INVITE", bad_cseq),
            ("INVITE", "sip:5551234@192.0.2.10", "1 INV<ITE", bad_cseq),
        ];
        let engine = engine(false);
        for (method, uri, cseq, expected) in corpus {
            let bytes = req(method, uri, cseq);
            let answer = reply(&engine, &bytes);
            assert_eq!(status_line(&answer), *expected, "{method} {uri} / {cseq}");
            assert!(!answer.contains("Contact:"), "{answer}");
            // The number is copied as written, whatever its size.
            assert!(
                answer.contains(&format!("\r\nCSeq: {cseq}\r\n")),
                "{answer}"
            );
        }
        // An ACK is never answered: a malformed one is dropped.
        let ack = req("ACK", "sip:5551234@192.0.2.10", "1 INVITE");
        assert_eq!(handle(&engine, &ack), Vec::new());
        let decisions = ["invites", "redirected", "local", "unavailable", "forwarded"];
        for name in decisions {
            assert_eq!(counter(&engine, name), 0, "{name}");
        }
        assert_eq!(counter(&engine, "malformed"), corpus.len() as u64 + 1);
    }

    #[test]
    fn tel_request_uris_keep_their_number_in_the_contact() {
        for (uri, contact) in [
            // RFC 3261 §19.1.6: a telephone number in a sip URI is marked `user=phone`.
            ("tel:+4930123", "<sip:+4930123@127.0.0.1:5071;user=phone>"),
            (
                "tel:030123;phone-context=+49",
                "<sip:030123;phone-context=+49@127.0.0.1:5071;user=phone>",
            ),
            ("sips:5551234@192.0.2.10", "<sips:5551234@127.0.0.1:5071>"),
        ] {
            let moved = reply(&engine(false), &req("INVITE", uri, "1 INVITE"));
            assert_eq!(
                status_line(&moved),
                "SIP/2.0 302 Moved Temporarily",
                "{uri}"
            );
            assert!(
                moved.contains(&format!("\r\nContact: {contact}\r\n")),
                "{uri}:\n{moved}"
            );
            oracle::read(moved.as_bytes()).unwrap_or_else(|e| panic!("{e}:\n{moved}"));
        }
    }

    #[test]
    fn forged_received_and_rport_are_overwritten_in_responses_and_forwarded_requests() {
        let forged = ";rport=9;received=203.0.113.66";
        let bytes = req_via("OPTIONS", "sip:192.0.2.10", "1 OPTIONS", forged);
        let ok = reply(&engine(false), &bytes);
        assert!(
            ok.contains(
                "\r\nVia: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-h1;rport=5062;received=198.51.100.7\r\n"
            ),
            "{ok}"
        );
        let read = oracle::read(ok.as_bytes()).unwrap_or_else(|e| panic!("{e}:\n{ok}"));
        assert_eq!(read.top_via_param_count("received"), 1, "{ok}");
        assert_eq!(read.top_via_param_count("rport"), 1, "{ok}");
        assert_eq!(
            read.top_via_param("received").as_deref(),
            Some("198.51.100.7")
        );
        assert_eq!(read.top_via_param("rport").as_deref(), Some("5062"));

        // Without rport and with the source's own address as host, a received that is
        // present is still rewritten (Kamailio does the same), never kept.
        let bytes = req_via(
            "INVITE",
            "sip:5551234@192.0.2.10",
            "1 INVITE",
            ";received=203.0.113.66",
        );
        let engine = engine(true);
        let forwarded = match &handle(&engine, &bytes)[..] {
            [Action::Forward { to, bytes, .. }] => {
                assert_eq!(*to, PBX.parse::<SocketAddr>().expect("addr"));
                String::from_utf8_lossy(bytes).into_owned()
            }
            other => panic!("expected the INVITE proxied to the PBX, got {other:?}"),
        };
        let read =
            oracle::read(forwarded.as_bytes()).unwrap_or_else(|e| panic!("{e}:\n{forwarded}"));
        assert_eq!(read.vias.len(), 2, "{forwarded}");
        let carrier_via = read.values(&ezk_sip_types::Name::VIA)[1];
        assert_eq!(
            carrier_via,
            "SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-h1;received=198.51.100.7"
        );
    }

    #[test]
    fn a_forged_via_does_not_send_the_pbx_s_answers_elsewhere() {
        let engine = engine(true);
        let bytes = req_via(
            "INVITE",
            "sip:5551234@192.0.2.10",
            "1 INVITE",
            ";rport=9;received=203.0.113.66",
        );
        let forwarded = match &handle(&engine, &bytes)[..] {
            [Action::Forward { bytes, .. }] => bytes.clone(),
            other => panic!("expected the INVITE proxied to the PBX, got {other:?}"),
        };
        // The PBX rings: its 180 echoes the Vias it got, ours on top.
        let message = parse(&forwarded, Framing::Datagram)
            .expect("parses")
            .expect("complete");
        let mut ringing = b"SIP/2.0 180 Ringing\r\n".to_vec();
        for via in message.headers_named(HeaderName::Via) {
            ringing.extend_from_slice(b"Via: ");
            ringing.extend_from_slice(via.value);
            ringing.extend_from_slice(b"\r\n");
        }
        ringing.extend_from_slice(
            b"From: <sip:carrier@198.51.100.7>;tag=c1\r\nTo: <sip:5551234@192.0.2.10>;tag=p1\r\n\
Call-ID: hostile-1@198.51.100.7\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
        );
        let mut actions = Vec::new();
        engine.handle(
            &ringing,
            PBX.parse().expect("addr"),
            Transport::Udp,
            Instant::now(),
            Duration::ZERO,
            &mut actions,
        );
        match &actions[..] {
            [Action::Forward { to, .. }] => assert_eq!(*to, carrier(), "the 180 goes back"),
            other => panic!("expected the 180 forwarded, got {other:?}"),
        }
    }

    #[test]
    fn a_proxy_refuses_proxy_require_and_a_redirect_server_ignores_it() {
        // Each request is a new transaction: its own branch.
        let branch = std::cell::Cell::new(0);
        let with = |extra: &str| {
            branch.set(branch.get() + 1);
            let plain = String::from_utf8(req("INVITE", "sip:5551234@192.0.2.10", "1 INVITE"))
                .expect("utf8");
            let headers = if extra.is_empty() {
                String::new()
            } else {
                format!("{extra}\r\n")
            };
            plain
                .replacen(
                    "Content-Length: 0",
                    &format!("{headers}Content-Length: 0"),
                    1,
                )
                .replacen(
                    "branch=z9hG4bK-h1",
                    &format!("branch=z9hG4bK-p{}", branch.get()),
                    1,
                )
                .into_bytes()
        };
        let proxy = engine(true);
        let refused = reply(
            &proxy,
            &with("Proxy-Require: foo, 100rel\r\nproxy-require: bar"),
        );
        assert_eq!(status_line(&refused), "SIP/2.0 420 Bad Extension");
        assert!(
            refused.contains("\r\nUnsupported: foo, 100rel, bar\r\n"),
            "{refused}"
        );
        oracle::read(refused.as_bytes()).unwrap_or_else(|e| panic!("{e}:\n{refused}"));
        // An option tag that is no token is not echoed into our answer.
        let hostile = reply(&proxy, &with("Proxy-Require: a\"b, ok"));
        assert_eq!(status_line(&hostile), "SIP/2.0 420 Bad Extension");
        assert!(hostile.contains("\r\nUnsupported: ok\r\n"), "{hostile}");
        assert_eq!(counter(&proxy, "forwarded"), 0);
        // Negative control: the same INVITE without the header is proxied.
        assert!(matches!(
            &handle(&proxy, &with(""))[..],
            [Action::Forward { .. }]
        ));
        // A 302 is a redirect server's (a UAS's) answer: Proxy-Require binds proxies only.
        let moved = reply(&engine(false), &with("Proxy-Require: foo"));
        assert_eq!(status_line(&moved), "SIP/2.0 302 Moved Temporarily");
    }

    #[test]
    fn an_ack_that_may_travel_no_further_is_dropped() {
        let proxy = engine(true);
        let invite = req("INVITE", "sip:5551234@192.0.2.10", "1 INVITE");
        assert!(matches!(
            &handle(&proxy, &invite)[..],
            [Action::Forward { .. }]
        ));
        let ack = |hops: &str| {
            String::from_utf8(req("ACK", "sip:5551234@192.0.2.10", "1 ACK"))
                .expect("utf8")
                .replace("Max-Forwards: 70", &format!("Max-Forwards: {hops}"))
                .into_bytes()
        };
        assert_eq!(handle(&proxy, &ack("0")), Vec::new());
        // Negative control: with a hop left, the ACK of the PBX's answer is relayed.
        match &handle(&proxy, &ack("1"))[..] {
            [Action::Forward { to, bytes, .. }] => {
                assert_eq!(*to, PBX.parse::<SocketAddr>().expect("addr"));
                let text = String::from_utf8_lossy(bytes);
                assert!(text.contains("\r\nMax-Forwards: 0\r\n"), "{text}");
            }
            other => panic!("expected the ACK relayed, got {other:?}"),
        }
        assert_eq!(counter(&proxy, "forwarded"), 2);
        assert_eq!(counter(&proxy, "acks"), 1);
    }

    /// RFC 3261 §25.1: `user = 1*( unreserved / escaped / user-unreserved )`.
    fn is_sip_user(user: &[u8]) -> bool {
        let mut i = 0;
        while i < user.len() {
            let b = user[i];
            if b == b'%' {
                let hex = |at: usize| user.get(at).is_some_and(u8::is_ascii_hexdigit);
                if !(hex(i + 1) && hex(i + 2)) {
                    return false;
                }
                i += 3;
                continue;
            }
            let unreserved = b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b);
            let user_unreserved = b"&=+$,;?/".contains(&b);
            if !(unreserved || user_unreserved) {
                return false;
            }
            i += 1;
        }
        !user.is_empty()
    }

    proptest! {
        /// Whatever the dialled user part, the 302's Contact reads as one URI with that user,
        /// or there is no 302: a user part that is not one per RFC 3261 gets a 400.
        #[test]
        fn the_dialled_user_reaches_the_contact_intact_or_not_at_all(
            // Not `:`, which would start a password (never copied to the Contact).
            user in "[a-zA-Z0-9%<>@\"' ,.;=+?/&$!~*()_#{}|^`\\[\\]\\\\-]{1,12}",
        ) {
            let engine = engine(false);
            let bytes = req("INVITE", &format!("sip:{user}@192.0.2.10"), "1 INVITE");
            let answers = handle(&engine, &bytes);
            let answer = match &answers[..] {
                [Action::Reply { bytes, .. }] => String::from_utf8_lossy(bytes).into_owned(),
                [] => {
                    // Only a user with a space splits the request line: not SIP at all.
                    prop_assert!(user.contains(' '), "no answer to {user:?}");
                    return Ok(());
                }
                other => panic!("{other:?}"),
            };
            if is_sip_user(user.as_bytes()) {
                prop_assert_eq!(status_line(&answer), "SIP/2.0 302 Moved Temporarily");
                let read = oracle::read(answer.as_bytes())
                    .map_err(|e| TestCaseError::fail(format!("{e}:\n{answer}")))?;
                prop_assert_eq!(read.contacts.len(), 1, "{}", answer);
                let contact = oracle::user(&read.contacts[0].uri.uri);
                let dialled = oracle::sip_uri(&format!("sip:{user}@h"))
                    .map(|uri| oracle::user(&uri))
                    .map_err(TestCaseError::fail)?;
                prop_assert_eq!(contact, dialled, "{}", answer);
                let line = format!("\r\nContact: <sip:{user}@127.0.0.1:5071>\r\n");
                prop_assert!(answer.contains(&line), "{}", answer);
            } else {
                prop_assert_eq!(
                    status_line(&answer),
                    "SIP/2.0 400 Bad Request (malformed Request-URI)",
                    "{:?}", user
                );
                prop_assert_eq!(oracle::contacts(answer.as_bytes()).map(|c| c.len()), Ok(0));
            }
        }
    }
}
