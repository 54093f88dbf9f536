//! Splitting bytes into a SIP message: start line, header lines, body.
//!
//! The parser borrows from the input and allocates only the header index. It is lenient
//! where RFC 3261 asks receivers to be (bare LF line ends, folded header lines, any case in
//! header names, compact names, whitespace around `:`), and strict where a mistake would
//! make us answer the wrong party, mis-frame a TCP stream, or copy a line break another
//! parser reads (a bare CR) into what we send.

use super::{HeaderName, ParseError};

/// One header line (or one folded group of lines) as it appeared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// Which header, compact forms mapped to their full names.
    pub name: HeaderName,
    /// The name as written, for headers we do not know.
    pub raw_name: &'a [u8],
    /// The value with surrounding whitespace trimmed; folded lines keep their line breaks.
    pub value: &'a [u8],
}

/// The first line of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartLine<'a> {
    /// `METHOD Request-URI SIP/2.0`
    Request {
        /// The method token, as written (methods are case-sensitive).
        method: &'a [u8],
        /// The Request-URI, unparsed.
        uri: &'a [u8],
    },
    /// `SIP/2.0 CODE Reason`
    Response {
        /// Status code, 100–699.
        code: u16,
        /// Reason phrase.
        reason: &'a [u8],
    },
}

/// A message split into its parts, borrowing from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    /// Request or status line.
    pub start: StartLine<'a>,
    /// Header lines in order.
    pub headers: Vec<Header<'a>>,
    /// The body (as long as Content-Length says, or the datagram's rest).
    pub body: &'a [u8],
    /// Bytes the message occupies in the input (start line to the end of the body).
    pub len: usize,
    /// Bytes of the start line and headers, up to and including the blank line.
    pub head_len: usize,
    /// A fault that still lets us answer (400) but not process the message, e.g. a bad
    /// Content-Length. On a stream such a fault also means the framing is lost.
    pub defect: Option<ParseError>,
}

/// How the bytes arrived: a datagram holds exactly one message; a stream is framed by
/// Content-Length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// UDP: the message is the whole datagram.
    Datagram,
    /// TCP: the message ends Content-Length bytes after the blank line.
    Stream,
}

impl<'a> Message<'a> {
    /// The first header called `name`.
    pub fn header(&self, name: HeaderName) -> Option<&Header<'a>> {
        self.headers.iter().find(|h| h.name == name)
    }

    /// Every header called `name`, in order.
    pub fn headers_named(&self, name: HeaderName) -> impl Iterator<Item = &Header<'a>> {
        self.headers.iter().filter(move |h| h.name == name)
    }
}

/// Parses one message from the front of `input`.
///
/// `Ok(None)` means more bytes are needed (streams only; for a datagram, missing bytes are
/// an error). Keep-alive CRLFs before a message (RFC 5626) are skipped and counted in `len`.
pub fn parse(input: &[u8], framing: Framing) -> Result<Option<Message<'_>>, ParseError> {
    let skipped = input
        .iter()
        .take_while(|b| **b == b'\r' || **b == b'\n')
        .count();
    let buf = &input[skipped..];
    if buf.is_empty() {
        return match framing {
            Framing::Stream => Ok(None),
            Framing::Datagram => Err(ParseError::Empty),
        };
    }
    // One pass over the head: each line is found once, the blank line ends it.
    let line_at = |from: usize| -> Option<(&[u8], usize)> {
        let end = from + memchr::memchr(b'\n', buf.get(from..)?)?;
        let line = &buf[from..end];
        Some((line.strip_suffix(b"\r").unwrap_or(line), end + 1))
    };
    let incomplete = || match framing {
        Framing::Stream => Ok(None),
        Framing::Datagram => Err(ParseError::NoBlankLine),
    };
    let Some((first, mut pos)) = line_at(0) else {
        return incomplete();
    };
    let start = parse_start_line(first)?;
    let mut headers: Vec<Header<'_>> = Vec::with_capacity(16);
    let mut content_length = None;
    let mut defect = None;
    let head_len = loop {
        let Some((line, next)) = line_at(pos) else {
            return incomplete();
        };
        if line.is_empty() {
            break next;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            // A folded continuation: the previous value now runs to the end of this line.
            let previous = headers.last_mut().ok_or(ParseError::BadHeaderLine)?;
            let value_start = offset_in(buf, previous.value);
            previous.value = trim(&buf[value_start..pos + line.len()]);
            pos = next;
            continue;
        }
        let colon = memchr::memchr(b':', line).ok_or(ParseError::BadHeaderLine)?;
        let raw_name = trim(&line[..colon]);
        if raw_name.is_empty() || !raw_name.iter().all(|b| is_token(*b)) {
            return Err(ParseError::BadHeaderLine);
        }
        headers.push(Header {
            name: HeaderName::from_bytes(raw_name),
            raw_name,
            value: trim(&line[colon + 1..]),
        });
        pos = next;
    };
    // A CR is only ever half of a line end here. Left inside a value, it would be copied
    // into our responses and forwarded requests, where parsers that end lines at a bare CR
    // (many do) would read the rest as a header line of its own. Other control bytes
    // (RFC 3261 allows only HTAB) are refused for the same reason: copied into what we
    // send, parsers disagree on where a value ends (a trailing VT is whitespace to some).
    if memchr::memchr_iter(b'\r', &buf[..head_len]).any(|i| buf.get(i + 1) != Some(&b'\n'))
        || buf[..head_len].iter().any(|&b| is_control(b))
    {
        return Err(ParseError::BadHeaderLine);
    }
    for header in &headers {
        if header.name == HeaderName::ContentLength {
            match parse_u32(header.value) {
                Some(length) if content_length.is_none_or(|known| known == length as usize) => {
                    content_length = Some(length as usize);
                }
                _ => defect = Some(ParseError::BadContentLength),
            }
        }
    }
    let rest = &buf[head_len..];
    let body_len = match (framing, content_length) {
        _ if defect.is_some() => 0,
        (Framing::Datagram, None) => rest.len(),
        (Framing::Datagram, Some(length)) if length <= rest.len() => length,
        (Framing::Datagram, Some(_)) => {
            defect = Some(ParseError::BadContentLength);
            0
        }
        // RFC 3261 §20.14: mandatory on streams; a missing one is read as 0, as most
        // implementations do, rather than waiting for bytes that never come.
        (Framing::Stream, length) => {
            let length = length.unwrap_or(0);
            if rest.len() < length {
                return Ok(None);
            }
            length
        }
    };
    Ok(Some(Message {
        start,
        headers,
        body: &rest[..body_len],
        len: skipped + head_len + body_len,
        head_len: skipped + head_len,
        defect,
    }))
}

/// Offset of `part` inside `whole`; `part` must be a subslice of `whole`.
fn offset_in(whole: &[u8], part: &[u8]) -> usize {
    (part.as_ptr() as usize).saturating_sub(whole.as_ptr() as usize)
}

fn parse_start_line(line: &[u8]) -> Result<StartLine<'_>, ParseError> {
    let mut parts = line.splitn(3, |b| *b == b' ');
    let first = parts.next().ok_or(ParseError::BadStartLine)?;
    let second = parts.next().ok_or(ParseError::BadStartLine)?;
    let third = parts.next().unwrap_or_default();
    if first.eq_ignore_ascii_case(b"SIP/2.0") {
        let code = parse_u32(second)
            .filter(|code| (100..=699).contains(code))
            .ok_or(ParseError::BadStartLine)?;
        return Ok(StartLine::Response {
            code: u16::try_from(code).map_err(|_| ParseError::BadStartLine)?,
            reason: third,
        });
    }
    if first.is_empty() || !first.iter().all(|b| is_token(*b)) || second.is_empty() {
        return Err(ParseError::BadStartLine);
    }
    if !third.eq_ignore_ascii_case(b"SIP/2.0") {
        return Err(ParseError::UnsupportedVersion);
    }
    Ok(StartLine::Request {
        method: first,
        uri: second,
    })
}

/// RFC 3261 `token` characters.
/// A control byte that may not appear in a SIP head: all but HTAB, CR and LF.
fn is_control(b: u8) -> bool {
    (b < 0x20 && !matches!(b, b'\t' | b'\r' | b'\n')) || b == 0x7f
}

pub(crate) fn is_token(b: u8) -> bool {
    TOKEN[usize::from(b)]
}

/// `is_token` as a table: it runs for every byte of every header name.
static TOKEN: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
            );
        b += 1;
    }
    table
};

/// Whitespace including the line breaks of folded values.
pub(crate) fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// `s` without leading and trailing whitespace.
pub(crate) fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| !is_space(*b)).unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !is_space(*b))
        .map_or(start, |e| e + 1);
    &s[start..end]
}

/// A decimal number of at most 9 digits (no sign, no spaces).
pub(crate) fn parse_u32(s: &[u8]) -> Option<u32> {
    if s.is_empty() || s.len() > 9 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        s.iter()
            .fold(0u32, |acc, digit| acc * 10 + u32::from(digit - b'0')),
    )
}
