//! SIP messages as bytes: parsing and printing, no I/O.
//!
//! [`parse()`] splits a message into start line, headers and body; [`Request::from_message`]
//! extracts what a balancer needs to answer (top Via, From, To, Call-ID, CSeq, Max-Forwards,
//! Request-URI); [`print`] writes responses and forwarded messages. Everything borrows from
//! the received bytes, so the hot path copies only what it sends.

mod parse;
pub mod print;
#[cfg(test)]
mod tests;

pub use parse::{Framing, Header, Message, StartLine, parse};
use parse::{is_space, is_token, parse_u32, trim};

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
    /// The Request-URI cannot be read.
    #[error("malformed Request-URI")]
    BadUri,
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

/// The parts of a `sip:` or `sips:` URI a balancer routes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uri<'a> {
    /// `sips` instead of `sip`.
    pub secure: bool,
    /// The user part (the dialled number), if any.
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
    /// Parses a SIP URI; other schemes (e.g. `tel:`) are an error.
    pub fn parse(uri: &'a [u8]) -> Result<Self, ParseError> {
        let uri = trim(uri);
        let (secure, rest) = if uri.len() > 4 && uri[..4].eq_ignore_ascii_case(b"sip:") {
            (false, &uri[4..])
        } else if uri.len() > 5 && uri[..5].eq_ignore_ascii_case(b"sips:") {
            (true, &uri[5..])
        } else {
            return Err(ParseError::BadUri);
        };
        // Headers (`?…`) end the URI; the userinfo ends at the last `@` before them.
        let rest = &rest[..rest.iter().position(|b| *b == b'?').unwrap_or(rest.len())];
        let (user, hostpart) = match rest.iter().rposition(|b| *b == b'@') {
            Some(at) => {
                let userinfo = &rest[..at];
                let user = &userinfo[..userinfo
                    .iter()
                    .position(|b| *b == b':')
                    .unwrap_or(userinfo.len())];
                (Some(user), &rest[at + 1..])
            }
            None => (None, rest),
        };
        let params_at = hostpart
            .iter()
            .position(|b| *b == b';')
            .unwrap_or(hostpart.len());
        let (host, port) = split_host_port(&hostpart[..params_at]).ok_or(ParseError::BadUri)?;
        if host.is_empty() || host.iter().any(|b| is_space(*b)) {
            return Err(ParseError::BadUri);
        }
        let mut lr = false;
        let mut transport = None;
        for (name, value) in Params::new(&hostpart[params_at..]) {
            if name.eq_ignore_ascii_case(b"lr") {
                lr = true;
            } else if name.eq_ignore_ascii_case(b"transport") {
                transport = value;
            }
        }
        Ok(Self {
            secure,
            user: user.filter(|u| !u.is_empty()),
            host,
            port,
            lr,
            transport,
        })
    }
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
    /// CSeq number.
    pub cseq: u32,
    /// CSeq method.
    pub cseq_method: &'a [u8],
    /// Max-Forwards, if present and a number.
    pub max_forwards: Option<u32>,
    /// A fault that allows answering 400 but not processing: from the framing, or an
    /// unreadable Max-Forwards.
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
        let split = cseq_value
            .iter()
            .position(|b| is_space(*b))
            .ok_or(ParseError::BadHeader("CSeq"))?;
        let cseq = parse_u32(&cseq_value[..split]).ok_or(ParseError::BadHeader("CSeq"))?;
        let cseq_method = trim(&cseq_value[split..]);
        if cseq_method.is_empty() || !cseq_method.iter().all(|b| is_token(*b)) {
            return Err(ParseError::BadHeader("CSeq"));
        }
        let mut defect = message.defect;
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
            cseq,
            cseq_method,
            max_forwards,
            defect,
            message,
        })
    }
}
