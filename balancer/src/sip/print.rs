//! Writing responses and forwarded messages.
//!
//! Responses copy Via, From, Call-ID and CSeq from the request value for value (RFC 3261
//! §8.2.6.2), fill in `received` and `rport` on the top Via (RFC 3581) and add a To-tag.
//! Forwarded messages keep every header but the ones a stateless proxy must change
//! (RFC 3261 §16.6, §16.11): its own Via on top, Max-Forwards decremented, its Route
//! removed, its Record-Route added.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};

use super::{HeaderName, Message, Params, Request, StartLine, Uri, Via, split_values};

/// Writes a response to `request`, received from `source`.
///
/// `to_tag` is added when the request's To has none and the response is not 100 Trying.
/// `extra` holds complete header lines (each ending in CRLF) put before Content-Length.
pub fn response(
    request: &Request<'_>,
    source: SocketAddr,
    code: u16,
    reason: &str,
    to_tag: &[u8],
    extra: &[u8],
    out: &mut Vec<u8>,
) {
    out.reserve(256 + request.message.head_len.min(2048));
    let _ = write!(out, "SIP/2.0 {code} {reason}\r\n");
    let mut first_via = true;
    for header in request.message.headers_named(HeaderName::Via) {
        out.extend_from_slice(b"Via: ");
        if first_via {
            first_via = false;
            write_received_via(header.value, &request.via, source, out);
        } else {
            out.extend_from_slice(header.value);
        }
        out.extend_from_slice(b"\r\n");
    }
    line(out, b"From: ", request.from);
    out.extend_from_slice(b"To: ");
    out.extend_from_slice(request.to);
    if request.to_tag.is_none() && code != 100 {
        out.extend_from_slice(b";tag=");
        out.extend_from_slice(to_tag);
    }
    out.extend_from_slice(b"\r\n");
    line(out, b"Call-ID: ", request.call_id);
    out.extend_from_slice(b"CSeq: ");
    out.extend_from_slice(request.cseq_number);
    out.push(b' ');
    out.extend_from_slice(request.cseq_method);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(extra);
    out.extend_from_slice(b"Content-Length: 0\r\n\r\n");
}

/// Writes a redirect's `Contact: <sip:USER@TARGET PARAMS>;q=…` line for the dialled
/// Request-URI `dialled`.
///
/// The scheme follows the dialled URI: `sips` stays `sips`, a `tel` number becomes the user
/// of a `sip` URI with `;user=phone` (RFC 3261 §19.1.6). The user part is written as an
/// RFC 3261 `user` whatever it holds (other bytes escaped as `%HH`), so it can never end the
/// URI or the header. `target` is `host:port`, `params` URI parameters such as
/// `;transport=tcp`; `q` (a rank from 10 down) gives `;q=1.0`, `;q=0.9`….
pub fn contact(
    out: &mut Vec<u8>,
    dialled: Option<&Uri<'_>>,
    target: &str,
    params: &str,
    q: Option<usize>,
) {
    let secure = dialled.is_some_and(|uri| uri.secure);
    out.extend_from_slice(if secure {
        b"Contact: <sips:"
    } else {
        b"Contact: <sip:"
    });
    if let Some(user) = dialled.and_then(|uri| uri.user) {
        super::write_user(user, out);
        out.push(b'@');
    }
    out.extend_from_slice(target.as_bytes());
    if dialled.is_some_and(|uri| uri.tel) {
        out.extend_from_slice(b";user=phone");
    }
    out.extend_from_slice(params.as_bytes());
    out.push(b'>');
    match q {
        Some(10..) => out.extend_from_slice(b";q=1.0"),
        Some(q) => out.extend_from_slice(&[b';', b'q', b'=', b'0', b'.', b'0' + q as u8]),
        None => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes `request` forwarded by a stateless proxy.
///
/// `our_via` is `SIP/2.0/UDP host:port` without parameters; `branch` (written as is, so it
/// may carry further parameters of our Via) must be derived deterministically from the
/// request so retransmissions and CANCELs match downstream.
/// `record_route`, if given, is the full value of the Record-Route we add;
/// `drop_top_route` removes the first Route value (ours).
pub fn forward_request(
    request: &Request<'_>,
    source: SocketAddr,
    our_via: &[u8],
    branch: &[u8],
    record_route: Option<&[u8]>,
    drop_top_route: bool,
    out: &mut Vec<u8>,
) {
    let message = &request.message;
    out.reserve(message.len + 256);
    out.extend_from_slice(request.method_token);
    out.push(b' ');
    out.extend_from_slice(request.uri);
    out.extend_from_slice(b" SIP/2.0\r\n");
    out.extend_from_slice(b"Via: ");
    out.extend_from_slice(our_via);
    out.extend_from_slice(b";branch=");
    out.extend_from_slice(branch);
    out.extend_from_slice(b"\r\n");
    if let Some(route) = record_route {
        line(out, b"Record-Route: ", route);
    }
    let mut first_via = true;
    let mut first_route = drop_top_route;
    let mut saw_max_forwards = false;
    for header in &message.headers {
        match header.name {
            HeaderName::Via if first_via => {
                first_via = false;
                out.extend_from_slice(b"Via: ");
                write_received_via(header.value, &request.via, source, out);
                out.extend_from_slice(b"\r\n");
            }
            HeaderName::Route if first_route => {
                first_route = false;
                write_without_first_value(b"Route: ", header.value, out);
            }
            HeaderName::MaxForwards => {
                saw_max_forwards = true;
                let hops = request.max_forwards.unwrap_or(70).saturating_sub(1);
                let _ = write!(out, "Max-Forwards: {hops}\r\n");
            }
            HeaderName::ContentLength => {}
            _ => copy_header(header, out),
        }
    }
    if !saw_max_forwards {
        out.extend_from_slice(b"Max-Forwards: 70\r\n");
    }
    finish_with_body(message.body, out);
}

/// Writes a response with its top Via (ours) removed, to be sent to the next Via.
pub fn forward_response(message: &Message<'_>, out: &mut Vec<u8>) {
    let StartLine::Response { code, reason } = message.start else {
        return;
    };
    out.reserve(message.len);
    let _ = write!(out, "SIP/2.0 {code} ");
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
    let mut first_via = true;
    for header in &message.headers {
        match header.name {
            HeaderName::Via if first_via => {
                first_via = false;
                write_without_first_value(b"Via: ", header.value, out);
            }
            HeaderName::ContentLength => {}
            _ => copy_header(header, out),
        }
    }
    finish_with_body(message.body, out);
}

fn finish_with_body(body: &[u8], out: &mut Vec<u8>) {
    let _ = write!(out, "Content-Length: {}\r\n\r\n", body.len());
    out.extend_from_slice(body);
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn copy_header(header: &super::Header<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(header.raw_name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(header.value);
    out.extend_from_slice(b"\r\n");
}

/// Writes `name` with the values of `value` after the first; nothing if there are none.
fn write_without_first_value(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    let mut rest = split_values(value).skip(1).peekable();
    if rest.peek().is_none() {
        return;
    }
    out.extend_from_slice(name);
    for (i, v) in rest.enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(v);
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes a Via header value whose first value gets `received` and a filled `rport`
/// (RFC 3261 §18.2.1, RFC 3581 §4); further values on the same line follow unchanged.
/// `top` is the request's already parsed top Via, a slice of `value`.
fn write_received_via(value: &[u8], top: &Via<'_>, source: SocketAddr, out: &mut Vec<u8>) {
    let start = (top.raw.as_ptr() as usize).wrapping_sub(value.as_ptr() as usize);
    let Some(rest) = value
        .get(start + top.raw.len()..)
        .filter(|_| start <= value.len())
    else {
        out.extend_from_slice(value);
        return;
    };
    write_received(top, source, out);
    // Further values on the line (`, SIP/2.0/UDP …`) follow as they were written.
    out.extend_from_slice(rest);
}

/// Writes `via` with `rport` and `received` set to where it really came from.
///
/// Values the sender put there are overwritten, as Kamailio does: a forged
/// `received=203.0.113.66;rport=9` would otherwise send the PBX's responses (routed back
/// by this Via) anywhere. `received` is added when the host is not the source address or
/// `rport` asks for it (RFC 3261 §18.2.1, RFC 3581 §4); `rport` only when asked for.
fn write_received(via: &Via<'_>, source: SocketAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&via.raw[..via.params_at]);
    let (mut wrote_rport, mut wrote_received) = (false, false);
    for (name, param) in Params::new(&via.raw[via.params_at..]) {
        if name.eq_ignore_ascii_case(b"rport") {
            // A repeated one says nothing more.
            if !std::mem::replace(&mut wrote_rport, true) {
                let _ = write!(out, ";rport={}", source.port());
            }
            continue;
        }
        if name.eq_ignore_ascii_case(b"received") {
            if !std::mem::replace(&mut wrote_received, true) {
                let _ = write!(out, ";received={}", source.ip());
            }
            continue;
        }
        out.push(b';');
        out.extend_from_slice(name);
        if let Some(param) = param {
            out.push(b'=');
            out.extend_from_slice(param);
        }
    }
    if !wrote_received && (via.rport.is_some() || !host_is(via.host, source.ip())) {
        let _ = write!(out, ";received={}", source.ip());
    }
}

/// Whether a Via host names exactly `ip` (a host name never does).
fn host_is(host: &[u8], ip: IpAddr) -> bool {
    std::str::from_utf8(host)
        .ok()
        .and_then(|h| h.parse::<IpAddr>().ok())
        .is_some_and(|h| h == ip)
}
