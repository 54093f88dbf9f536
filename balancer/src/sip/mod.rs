//! SIP messages as bytes: parsing and printing, no I/O.
//!
//! [`parse()`] splits a message into start line, headers and body; [`Request::from_message`]
//! extracts what a balancer needs to answer (top Via, From, To, Call-ID, CSeq, Max-Forwards,
//! Request-URI); [`print`] writes responses and forwarded messages. Everything borrows from
//! the received bytes, so the hot path copies only what it sends.

#[cfg(test)]
mod oracle;
mod parse;
pub mod print;
#[cfg(test)]
mod tests;

pub use parse::{Framing, Header, Message, StartLine, parse};
use parse::{is_space, parse_u32};
pub(crate) use parse::{is_token, trim};

/// Why bytes are not a SIP message we can work with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Nothing but line breaks.
    #[error("empty message")]
    Empty,
    /// The header section never ends.
    #[error("no blank line after the headers")]
    NoBlankLine,
    /// Neither `METHOD URI SIP/2.0` nor `SIP/2.0 CODE REASON`.
    #[error("malformed start line")]
    BadStartLine,
    /// A request for a SIP version other than 2.0.
    #[error("unsupported SIP version")]
    UnsupportedVersion,
    /// A header line without a colon or with an invalid name.
    #[error("malformed header line")]
    BadHeaderLine,
    /// Content-Length is not a number, is repeated with other values, or exceeds the bytes.
    #[error("bad Content-Length")]
    BadContentLength,
    /// A header the request needs is missing or unreadable; the field names it.
    #[error("missing or malformed {0} header")]
    BadHeader(&'static str),
    /// The Request-URI cannot be read, or breaks RFC 3261's URI grammar (§25.1) somewhere,
    /// e.g. a `>` in the user part.
    #[error("malformed Request-URI")]
    BadUri,
    /// A well-formed Request-URI of a scheme other than `sip`, `sips` and `tel` (RFC 3261
    /// §8.2.2.1 asks for 416 Unsupported URI Scheme).
    #[error("unsupported Request-URI scheme")]
    UnsupportedScheme,
    /// The CSeq number is not below 2**31 (RFC 3261 §8.1.1.5).
    #[error("CSeq number of 2**31 or more")]
    CSeqOutOfRange,
    /// The CSeq method differs from the request line's (RFC 3261 §8.1.1.5, §20.16).
    #[error("CSeq method is not the request's method")]
    CSeqMethodMismatch,
}

/// Header names we act on; compact forms (RFC 3261 §7.3.3) map to the same variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderName {
    /// `Via`, `v`
    Via,
    /// `From`, `f`
    From,
    /// `To`, `t`
    To,
    /// `Call-ID`, `i`
    CallId,
    /// `CSeq`
    CSeq,
    /// `Max-Forwards`
    MaxForwards,
    /// `Content-Length`, `l`
    ContentLength,
    /// `Contact`, `m`
    Contact,
    /// `Route`
    Route,
    /// `Record-Route`
    RecordRoute,
    /// `Proxy-Require`
    ProxyRequire,
    /// Anything else; see [`Header::raw_name`].
    Other,
}

impl HeaderName {
    /// Classifies a header name, case-insensitively.
    pub fn from_bytes(name: &[u8]) -> Self {
        let is = |full: &str| name.eq_ignore_ascii_case(full.as_bytes());
        match name.len() {
            1 => match name[0].to_ascii_lowercase() {
                b'v' => Self::Via,
                b'f' => Self::From,
                b't' => Self::To,
                b'i' => Self::CallId,
                b'l' => Self::ContentLength,
                b'm' => Self::Contact,
                _ => Self::Other,
            },
            2 if is("to") => Self::To,
            3 if is("via") => Self::Via,
            4 if is("from") => Self::From,
            4 if is("cseq") => Self::CSeq,
            5 if is("route") => Self::Route,
            7 if is("call-id") => Self::CallId,
            7 if is("contact") => Self::Contact,
            12 if is("max-forwards") => Self::MaxForwards,
            12 if is("record-route") => Self::RecordRoute,
            13 if is("proxy-require") => Self::ProxyRequire,
            14 if is("content-length") => Self::ContentLength,
            _ => Self::Other,
        }
    }
}

/// Request methods the balancer distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `INVITE`
    Invite,
    /// `ACK`
    Ack,
    /// `CANCEL`
    Cancel,
    /// `OPTIONS`
    Options,
    /// `BYE`
    Bye,
    /// Any other method.
    Other,
}

impl Method {
    /// Classifies a method token (methods are case-sensitive, RFC 3261 §7.1).
    pub fn from_bytes(token: &[u8]) -> Self {
        match token {
            b"INVITE" => Self::Invite,
            b"ACK" => Self::Ack,
            b"CANCEL" => Self::Cancel,
            b"OPTIONS" => Self::Options,
            b"BYE" => Self::Bye,
            _ => Self::Other,
        }
    }
}

/// Transport named in a Via.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
    /// TLS, SCTP, WS…: we can read them but not send over them.
    Other,
}

/// One Via value: `SIP/2.0/UDP host:port;branch=…;rport;received=…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Via<'a> {
    /// The whole value, as written.
    pub raw: &'a [u8],
    /// The transport token.
    pub transport: Transport,
    /// `host` of sent-by (IPv6 without brackets).
    pub host: &'a [u8],
    /// `port` of sent-by, if given.
    pub port: Option<u16>,
    /// The `branch` parameter.
    pub branch: Option<&'a [u8]>,
    /// `rport` present: `Some(None)` when empty (asking us to fill it), `Some(Some(p))` filled.
    pub rport: Option<Option<u16>>,
    /// The `received` parameter.
    pub received: Option<&'a [u8]>,
    /// Offset in `raw` where the parameters start (at the first `;`), or `raw.len()`.
    pub params_at: usize,
}

impl<'a> Via<'a> {
    /// Parses one Via value.
    pub fn parse(raw: &'a [u8]) -> Result<Self, ParseError> {
        let bad = ParseError::BadHeader("Via");
        let raw = trim(raw);
        let params_at = raw.iter().position(|b| *b == b';').unwrap_or(raw.len());
        let (protocol_and_host, params) = raw.split_at(params_at);
        // sent-protocol is `SIP / 2.0 / UDP` with optional whitespace around the slashes;
        // the sent-by follows the last protocol token after whitespace.
        let mut parts = protocol_and_host.splitn(3, |b| *b == b'/');
        let name = trim(parts.next().ok_or(bad)?);
        let version = trim(parts.next().ok_or(bad)?);
        let rest = trim(parts.next().ok_or(bad)?);
        if !name.eq_ignore_ascii_case(b"SIP") || version != b"2.0" {
            return Err(bad);
        }
        let split = rest.iter().position(|b| is_space(*b)).ok_or(bad)?;
        let transport_token = &rest[..split];
        let sent_by = trim(&rest[split..]);
        let transport = if transport_token.eq_ignore_ascii_case(b"UDP") {
            Transport::Udp
        } else if transport_token.eq_ignore_ascii_case(b"TCP") {
            Transport::Tcp
        } else {
            Transport::Other
        };
        let (host, port) = split_host_port(sent_by).ok_or(bad)?;
        let mut via = Via {
            raw,
            transport,
            host,
            port,
            branch: None,
            rport: None,
            received: None,
            params_at,
        };
        for (name, value) in Params::new(params) {
            if name.eq_ignore_ascii_case(b"branch") {
                via.branch = Some(value.filter(|v| !v.is_empty()).ok_or(bad)?);
            } else if name.eq_ignore_ascii_case(b"rport") {
                via.rport = Some(match value {
                    None => None,
                    Some(port) => Some(parse_port(port).ok_or(bad)?),
                });
            } else if name.eq_ignore_ascii_case(b"received") {
                via.received = value;
            }
        }
        Ok(via)
    }

    /// The `sent-by` part as written (`host:port`).
    pub fn sent_by(&self) -> &'a [u8] {
        let before_params = &self.raw[..self.params_at];
        let split = before_params
            .iter()
            .rposition(|b| is_space(*b))
            .map_or(0, |i| i + 1);
        trim(&before_params[split..])
    }
}

/// `host[:port]` or `[v6][:port]` → host (without brackets) and port.
pub fn split_host_port(text: &[u8]) -> Option<(&[u8], Option<u16>)> {
    let text = trim(text);
    if text.is_empty() {
        return None;
    }
    if text[0] == b'[' {
        let close = text.iter().position(|b| *b == b']')?;
        let host = &text[1..close];
        return match &text[close + 1..] {
            [] => Some((host, None)),
            [b':', port @ ..] => Some((host, Some(parse_port(port)?))),
            _ => None,
        };
    }
    match text.iter().position(|b| *b == b':') {
        None => Some((text, None)),
        Some(colon) => Some((&text[..colon], Some(parse_port(&text[colon + 1..])?))),
    }
}

fn parse_port(text: &[u8]) -> Option<u16> {
    parse_u32(trim(text)).and_then(|port| u16::try_from(port).ok())
}

/// Iterator over `;name=value` parameters (whitespace around `;` and `=` allowed; quoted
/// values keep their quotes).
#[derive(Debug, Clone)]
pub struct Params<'a> {
    rest: &'a [u8],
}

impl<'a> Params<'a> {
    /// Parameters in `text`, which starts at (or before) the first `;`.
    pub fn new(text: &'a [u8]) -> Self {
        Self { rest: text }
    }
}

impl<'a> Iterator for Params<'a> {
    type Item = (&'a [u8], Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let start = memchr::memchr(b';', self.rest)?;
            let text = &self.rest[start + 1..];
            // Quoted values are rare: take the next `;` directly unless a quote comes first.
            let end = match memchr::memchr2(b';', b'"', text) {
                None => text.len(),
                Some(i) if text[i] == b';' => i,
                Some(_) => find_unquoted(text, |b| b == b';').unwrap_or(text.len()),
            };
            let param = &text[..end];
            self.rest = &text[end..];
            let (name, value) = match param.iter().position(|b| *b == b'=') {
                Some(eq) => (trim(&param[..eq]), Some(trim(&param[eq + 1..]))),
                None => (trim(param), None),
            };
            if !name.is_empty() {
                return Some((name, value));
            }
        }
    }
}

/// Index of the first byte outside quoted strings (backslash escapes inside them honoured)
/// for which `wanted` holds.
fn find_unquoted(text: &[u8], mut wanted: impl FnMut(u8) -> bool) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, &b) in text.iter().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            _ if !quoted && wanted(b) => return Some(i),
            _ => {}
        }
    }
    None
}

/// Splits a header value at commas that separate values (not inside quotes or `<>`).
pub fn split_values(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(value);
    std::iter::from_fn(move || {
        let text = rest?;
        if memchr::memchr(b',', text).is_none() {
            // One value (the common case): no need to walk it byte by byte.
            rest = None;
            return Some(trim(text));
        }
        let mut angle = false;
        let comma = find_unquoted(text, |b| {
            match b {
                b'<' => angle = true,
                b'>' => angle = false,
                _ => {}
            }
            b == b',' && !angle
        });
        if let Some(i) = comma {
            rest = Some(&text[i + 1..]);
            return Some(trim(&text[..i]));
        }
        rest = None;
        Some(trim(text))
    })
    .filter(|v| !v.is_empty())
}

/// The header parameters of a name-addr or addr-spec value (`From`, `To`, `Contact`,
/// `Route`): those after `>` when the URI is in angle brackets, else after the URI.
pub fn header_params(value: &[u8]) -> Params<'_> {
    Params::new(&value[addr_end(value)..])
}

/// The URI inside a name-addr or addr-spec value.
pub fn addr_uri(value: &[u8]) -> &[u8] {
    match angle_bounds(value) {
        Some((open, close)) => &value[open + 1..close],
        None => {
            let value = trim(value);
            &value[..value.iter().position(|b| *b == b';').unwrap_or(value.len())]
        }
    }
}

fn addr_end(value: &[u8]) -> usize {
    match angle_bounds(value) {
        Some((_, close)) => close + 1,
        None => value.iter().position(|b| *b == b';').unwrap_or(value.len()),
    }
}

/// Positions of `<` and `>` around the URI, skipping a quoted display name.
fn angle_bounds(value: &[u8]) -> Option<(usize, usize)> {
    // Without a quoted display name before it, the first `<` opens the URI.
    let open = match memchr::memchr2(b'<', b'"', value)? {
        i if value[i] == b'<' => i,
        _ => find_unquoted(value, |b| b == b'<')?,
    };
    let close = open + memchr::memchr(b'>', &value[open..])?;
    Some((open, close))
}

/// The `tag` parameter of a From or To value.
pub fn tag(value: &[u8]) -> Option<&[u8]> {
    header_params(value)
        .find(|(name, _)| name.eq_ignore_ascii_case(b"tag"))
        .and_then(|(_, value)| value)
        .filter(|v| !v.is_empty())
}

/// The parts of a `sip:`, `sips:` or `tel:` URI a balancer routes on.
///
/// Parsing checks the whole URI against RFC 3261's grammar (§25.1), not only the parts
/// kept: the user part ends up in a redirect's Contact and the Request-URI in forwarded
/// requests, so a `>`, a quote or a stray `@` must never get through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uri<'a> {
    /// `sips` instead of `sip`.
    pub secure: bool,
    /// A `tel:` URI (RFC 3966): `user` is the number with its parameters, `host` is empty.
    pub tel: bool,
    /// The user part (the dialled number), if any; a valid RFC 3261 `user`, escapes as
    /// written.
    pub user: Option<&'a [u8]>,
    /// The host (IPv6 without brackets).
    pub host: &'a [u8],
    /// The port, if given.
    pub port: Option<u16>,
    /// `;lr` is present (a loose router, RFC 3261 §19.1.1).
    pub lr: bool,
    /// The `transport` URI parameter.
    pub transport: Option<&'a [u8]>,
}

impl<'a> Uri<'a> {
    /// Parses a `sip:`, `sips:` or `tel:` URI. Another scheme is
    /// [`ParseError::UnsupportedScheme`] when the rest could be a URI at all, else
    /// [`ParseError::BadUri`].
    pub fn parse(uri: &'a [u8]) -> Result<Self, ParseError> {
        let uri = trim(uri);
        let colon = memchr::memchr(b':', uri).ok_or(ParseError::BadUri)?;
        let (scheme, rest) = (&uri[..colon], &uri[colon + 1..]);
        if scheme.eq_ignore_ascii_case(b"sip") {
            Self::parse_sip(rest, false)
        } else if scheme.eq_ignore_ascii_case(b"sips") {
            Self::parse_sip(rest, true)
        } else if scheme.eq_ignore_ascii_case(b"tel") {
            Self::parse_tel(rest)
        } else if is_scheme(scheme) && !rest.is_empty() && escaped_of(rest, URIC) {
            Err(ParseError::UnsupportedScheme)
        } else {
            Err(ParseError::BadUri)
        }
    }

    /// `[ user [ ":" password ] "@" ] hostport *( ";" param ) [ "?" headers ]`.
    fn parse_sip(rest: &'a [u8], secure: bool) -> Result<Self, ParseError> {
        let bad = ParseError::BadUri;
        // No part after the userinfo may hold an unescaped `@`, so the first one ends it
        // (and a user part may hold `?` and `;`, so it is split off first).
        let (user, rest) = match memchr::memchr(b'@', rest) {
            Some(at) => {
                let userinfo = &rest[..at];
                let (user, password) = match memchr::memchr(b':', userinfo) {
                    Some(colon) => (&userinfo[..colon], &userinfo[colon + 1..]),
                    None => (userinfo, &b""[..]),
                };
                if !is_user(user) || !escaped_of(password, PASSWORD) {
                    return Err(bad);
                }
                (Some(user), &rest[at + 1..])
            }
            None => (None, rest),
        };
        let (rest, headers) = match memchr::memchr(b'?', rest) {
            Some(q) => (&rest[..q], Some(&rest[q + 1..])),
            None => (rest, None),
        };
        if let Some(headers) = headers
            && (headers.is_empty() || !escaped_of(headers, HNV | HEADER_SEPARATOR))
        {
            return Err(bad);
        }
        let params_at = memchr::memchr(b';', rest).unwrap_or(rest.len());
        let hostport = &rest[..params_at];
        let (host, port) = split_host_port(hostport).ok_or(bad)?;
        let valid_host = if hostport.first() == Some(&b'[') {
            !host.is_empty()
                && host
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() || b":.".contains(b))
        } else {
            !host.is_empty() && host.iter().all(|b| CLASS[usize::from(*b)] & HOST != 0)
        };
        if !valid_host || hostport.iter().any(|b| is_space(*b)) {
            return Err(bad);
        }
        let mut lr = false;
        let mut transport = None;
        if params_at < rest.len() {
            for param in rest[params_at + 1..].split(|b| *b == b';') {
                let (name, value) = match memchr::memchr(b'=', param) {
                    Some(eq) => (&param[..eq], Some(&param[eq + 1..])),
                    None => (param, None),
                };
                if name.is_empty()
                    || !escaped_of(name, PARAM)
                    || value.is_some_and(|v| v.is_empty() || !escaped_of(v, PARAM))
                {
                    return Err(bad);
                }
                if name.eq_ignore_ascii_case(b"lr") {
                    lr = true;
                } else if name.eq_ignore_ascii_case(b"transport") {
                    transport = value;
                }
            }
        }
        Ok(Self {
            secure,
            tel: false,
            user,
            host,
            port,
            lr,
            transport,
        })
    }

    /// `telephone-subscriber` (RFC 3966 §3): a number, then `;name[=value]` parameters.
    /// In a redirect the whole of it becomes the user part of a SIP URI (RFC 3261
    /// §19.1.6), so what a SIP user part cannot hold unescaped (`#`, `[`, `:`…) is refused.
    fn parse_tel(subscriber: &'a [u8]) -> Result<Self, ParseError> {
        let bad = ParseError::BadUri;
        let number_end = memchr::memchr(b';', subscriber).unwrap_or(subscriber.len());
        let number = &subscriber[..number_end];
        let digits = number.strip_prefix(b"+").unwrap_or(number);
        let phone_digit = |b: &u8| b.is_ascii_hexdigit() || b"*-.()".contains(b);
        if !digits.iter().any(u8::is_ascii_alphanumeric)
            || !digits.iter().all(phone_digit)
            || !is_user(subscriber)
        {
            return Err(bad);
        }
        if number_end < subscriber.len() {
            for param in subscriber[number_end + 1..].split(|b| *b == b';') {
                let name_end = memchr::memchr(b'=', param).unwrap_or(param.len());
                if name_end == 0 || name_end + 1 == param.len() {
                    return Err(bad);
                }
            }
        }
        Ok(Self {
            secure: false,
            tel: true,
            user: Some(subscriber),
            host: b"",
            port: None,
            lr: false,
            transport: None,
        })
    }
}

/// Character classes of RFC 3261 §25.1, as bits of [`CLASS`].
const UNRESERVED: u8 = 1;
/// `user-unreserved`.
const USER_EXTRA: u8 = 2;
/// What a password may hold besides `unreserved`.
const PASSWORD_EXTRA: u8 = 4;
/// `param-unreserved`.
const PARAM_EXTRA: u8 = 8;
/// `hnv-unreserved`.
const HNV_EXTRA: u8 = 16;
/// `reserved`.
const RESERVED: u8 = 32;
/// Host names: letters, digits, `-`, `.` and (leniently, they are common) `_`.
const HOST: u8 = 64;
/// `&` and `=` between URI headers.
const HEADER_SEPARATOR: u8 = 128;

const USER: u8 = UNRESERVED | USER_EXTRA;
const PASSWORD: u8 = UNRESERVED | PASSWORD_EXTRA;
const PARAM: u8 = UNRESERVED | PARAM_EXTRA;
const HNV: u8 = UNRESERVED | HNV_EXTRA;
const URIC: u8 = UNRESERVED | RESERVED;

/// The classes of every byte: a URI is checked byte by byte on every request.
static CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        let mut class = 0;
        if c.is_ascii_alphanumeric() {
            class |= UNRESERVED | HOST;
        }
        let marks: &[u8] = b"-_.!~*'()";
        let classes: [(&[u8], u8); 6] = [
            (b"&=+$,;?/", USER_EXTRA),
            (b"&=+$,", PASSWORD_EXTRA),
            (b"[]/:&+$", PARAM_EXTRA),
            (b"[]/?:+$", HNV_EXTRA),
            (b";/?:@&=+$,", RESERVED),
            (b"-._", HOST),
        ];
        let mut m = 0;
        while m < marks.len() {
            if marks[m] == c {
                class |= UNRESERVED;
            }
            m += 1;
        }
        let mut k = 0;
        while k < classes.len() {
            let (chars, bit) = classes[k];
            let mut j = 0;
            while j < chars.len() {
                if chars[j] == c {
                    class |= bit;
                }
                j += 1;
            }
            k += 1;
        }
        if c == b'&' || c == b'=' {
            class |= HEADER_SEPARATOR;
        }
        table[i] = class;
        i += 1;
    }
    table
};

/// Whether `text` consists of bytes of `class` and `%HH` escapes.
fn escaped_of(text: &[u8], class: u8) -> bool {
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        if b == b'%' {
            let hex = |at: usize| text.get(at).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return false;
            }
            i += 3;
        } else if CLASS[usize::from(b)] & class == 0 {
            return false;
        } else {
            i += 1;
        }
    }
    true
}

/// RFC 3261 `user`: `1*( unreserved / escaped / user-unreserved )`.
pub fn is_user(text: &[u8]) -> bool {
    !text.is_empty() && escaped_of(text, USER)
}

/// Writes `user` as an RFC 3261 `user`: valid escapes and user characters as they are,
/// every other byte as `%HH`.
pub(crate) fn write_user(user: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut i = 0;
    while i < user.len() {
        let b = user[i];
        let escape = b == b'%'
            && user.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
            && user.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
        if escape {
            out.extend_from_slice(&user[i..i + 3]);
            i += 3;
            continue;
        }
        if CLASS[usize::from(b)] & USER != 0 {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        }
        i += 1;
    }
}

/// RFC 3986 `scheme`: `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`.
fn is_scheme(text: &[u8]) -> bool {
    text.first().is_some_and(u8::is_ascii_alphabetic)
        && text
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(b))
}

/// What a request carries that is needed to answer it, borrowed from its message.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The message itself.
    pub message: Message<'a>,
    /// Method token as written.
    pub method_token: &'a [u8],
    /// Method.
    pub method: Method,
    /// Request-URI as written.
    pub uri: &'a [u8],
    /// The top Via value.
    pub via: Via<'a>,
    /// From value.
    pub from: &'a [u8],
    /// To value.
    pub to: &'a [u8],
    /// The To-tag: present on in-dialog requests.
    pub to_tag: Option<&'a [u8]>,
    /// The From-tag.
    pub from_tag: Option<&'a [u8]>,
    /// Call-ID value.
    pub call_id: &'a [u8],
    /// CSeq number (`u32::MAX` when larger; then `defect` says so).
    pub cseq: u32,
    /// CSeq number as written, copied into responses (whatever it is when `defect` is set).
    pub cseq_number: &'a [u8],
    /// CSeq method.
    pub cseq_method: &'a [u8],
    /// Max-Forwards, if present and a number.
    pub max_forwards: Option<u32>,
    /// A fault that allows answering 400 but not processing: from the framing, a
    /// malformed or unsupported Request-URI, an unreadable CSeq, a CSeq number of 2**31 or
    /// more, a CSeq method other than the request's, or an unreadable Max-Forwards.
    pub defect: Option<ParseError>,
}

impl<'a> Request<'a> {
    /// Extracts the headers a response must copy; a request lacking one cannot be answered.
    pub fn from_message(message: Message<'a>) -> Result<Self, ParseError> {
        let StartLine::Request { method, uri } = message.start else {
            return Err(ParseError::BadStartLine);
        };
        let via_value = message
            .header(HeaderName::Via)
            .ok_or(ParseError::BadHeader("Via"))?
            .value;
        let via = Via::parse(
            split_values(via_value)
                .next()
                .ok_or(ParseError::BadHeader("Via"))?,
        )?;
        let single = |name: HeaderName, label: &'static str| {
            message
                .header(name)
                .map(|h| h.value)
                .filter(|v| !v.is_empty())
                .ok_or(ParseError::BadHeader(label))
        };
        let from = single(HeaderName::From, "From")?;
        let to = single(HeaderName::To, "To")?;
        let call_id = single(HeaderName::CallId, "Call-ID")?;
        let cseq_value = single(HeaderName::CSeq, "CSeq")?;
        // A CSeq we cannot read is still answered (400), copied as written: the sender can
        // be addressed, and a response must carry its CSeq (RFC 3261 §8.2.6.2).
        let (cseq_number, cseq_method) = match cseq_value.iter().position(|b| is_space(*b)) {
            Some(split) => (&cseq_value[..split], trim(&cseq_value[split..])),
            None => (cseq_value, &b""[..]),
        };
        let mut defect = message.defect;
        let readable = cseq_number.iter().all(u8::is_ascii_digit)
            && !cseq_method.is_empty()
            && cseq_method.iter().all(|b| is_token(*b));
        if !readable {
            defect = defect.or(Some(ParseError::BadHeader("CSeq")));
        }
        // Any number of digits is read, so one too large is answered (400), not dropped.
        let cseq = cseq_number
            .iter()
            .filter(|b| b.is_ascii_digit())
            .fold(0u64, |acc, digit| {
                acc.saturating_mul(10)
                    .saturating_add(u64::from(digit - b'0'))
            });
        if readable && cseq >= 1 << 31 {
            defect = defect.or(Some(ParseError::CSeqOutOfRange));
        }
        if readable && cseq_method != method {
            defect = defect.or(Some(ParseError::CSeqMethodMismatch));
        }
        if let Err(fault) = Uri::parse(uri) {
            defect = defect.or(Some(fault));
        }
        let max_forwards = match message.header(HeaderName::MaxForwards) {
            None => None,
            Some(header) => {
                let parsed = parse_u32(header.value);
                if parsed.is_none() {
                    defect = defect.or(Some(ParseError::BadHeader("Max-Forwards")));
                }
                parsed
            }
        };
        Ok(Self {
            method_token: method,
            method: Method::from_bytes(method),
            uri,
            via,
            from,
            to,
            to_tag: tag(to),
            from_tag: tag(from),
            call_id,
            cseq: u32::try_from(cseq).unwrap_or(u32::MAX),
            cseq_number,
            cseq_method,
            max_forwards,
            defect,
            message,
        })
    }
}
