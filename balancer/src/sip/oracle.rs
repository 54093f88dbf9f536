//! An independent reading of SIP messages, for tests only: ezk-sip-types' parsers, not ours.
//!
//! Re-reading what we print with our own parser shares our blind spots: it reads
//! `Contact: <sip:evil.example>@node>` as one harmless URI. This oracle frames a message
//! with ezk's `PullParser`, reads the start line and every header the balancer writes or
//! copies with ezk's typed parsers, and requires each of them to consume its whole value, so
//! a URI that ends early or a value with something left over is an error.
//!
//! ezk decodes `%HH` escapes into UTF-8 text and fails on the others, which RFC 3261
//! allows (`sip:%a0@host`); the oracle reads every escape of a byte above 0x7F as `%7F`,
//! which leaves the structure it checks as it was.
//!
//! It uses nothing of this crate: `fuzz/fuzz_targets/sip_message.rs` compiles the same file
//! (by path) to check everything the engine prints.

use std::str::FromStr;

use bytes::Bytes;
use ezk_sip_types::Name;
use ezk_sip_types::header::HeaderParse;
use ezk_sip_types::header::typed::{CSeq, CallID, Contact, FromTo, Routing, Via};
use ezk_sip_types::msg::{Line, PullParser, StatusLine};
use ezk_sip_types::uri::{SipUri, SipUriUserPart};

/// A message as the oracle read it.
#[derive(Debug)]
pub struct Read {
    /// `(method, Request-URI)` of a request.
    pub request: Option<(String, String)>,
    /// The status code of a response.
    pub status: Option<u16>,
    /// Every Via value, top first.
    pub vias: Vec<Via>,
    /// Every Contact value (none for `Contact: *`).
    pub contacts: Vec<Contact>,
    /// The CSeq.
    pub cseq: CSeq,
    /// The CSeq number as written.
    pub cseq_number: String,
    /// Max-Forwards, if present.
    pub max_forwards: Option<u32>,
    /// Every header line: name as ezk knows it, and value.
    pub headers: Vec<(Name, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Read {
    /// The values of every header line called `name`.
    pub fn values(&self, name: &Name) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value of the parameter `name` of the top Via (`Some("")` without a value).
    pub fn top_via_param(&self, name: &str) -> Option<String> {
        let via = self.vias.first()?;
        via.params.get(name).map(|param| {
            param
                .value
                .as_ref()
                .map_or_else(String::new, |v| v.as_str().to_owned())
        })
    }

    /// How many parameters called `name` the top Via has.
    pub fn top_via_param_count(&self, name: &str) -> usize {
        // Params::get finds the first; count by printing, which writes each one.
        self.vias.first().map_or(0, |via| {
            via.params
                .to_string()
                .split(';')
                .filter(|p| {
                    p.split('=')
                        .next()
                        .is_some_and(|n| n.trim().eq_ignore_ascii_case(name))
                })
                .count()
        })
    }
}

/// The user part of a SIP URI, percent-decoded; `None` without one.
pub fn user(uri: &SipUri) -> Option<String> {
    match &uri.user_part {
        SipUriUserPart::Empty => None,
        SipUriUserPart::User(user) => Some(user.as_str().to_owned()),
        SipUriUserPart::UserPw(user_pw) => Some(user_pw.user.as_str().to_owned()),
    }
}

/// A SIP URI as ezk reads it, whole.
pub fn sip_uri(text: &str) -> Result<SipUri, String> {
    let text = String::from_utf8(ascii_escapes(text.as_bytes())).map_err(|e| e.to_string())?;
    SipUri::from_str(&text).map_err(|e| format!("{text:?}: {e}"))
}

/// `bytes` with every `%HH` escape of a byte above 0x7F written `%7F`.
fn ascii_escapes(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for i in 0..out.len().saturating_sub(2) {
        if out[i] == b'%'
            && matches!(out[i + 1], b'8'..=b'9' | b'a'..=b'f' | b'A'..=b'F')
            && out[i + 2].is_ascii_hexdigit()
        {
            out[i + 1] = b'7';
            out[i + 2] = b'F';
        }
    }
    out
}

/// Reads a whole message; `Err` says what the oracle could not read.
pub fn read(bytes: &[u8]) -> Result<Read, String> {
    let src = Bytes::from(ascii_escapes(bytes));
    let mut lines = PullParser::new(&src, 0);
    let mut head = Vec::new();
    for line in lines.by_ref() {
        let line = line.map_err(|_| "the head never ends".to_owned())?;
        head.push(std::str::from_utf8(line).map_err(|_| "a line is not UTF-8".to_owned())?);
    }
    let body = src[lines.head_end()..].to_vec();
    let (first, header_lines) = head.split_first().ok_or("no start line")?;
    let mut read = Read {
        request: None,
        status: None,
        vias: Vec::new(),
        contacts: Vec::new(),
        cseq: CSeq::new(0, ezk_sip_types::Method::INVITE),
        cseq_number: String::new(),
        max_forwards: None,
        headers: Vec::new(),
        body,
    };
    if first.starts_with("SIP/2.0 ") {
        let status = StatusLine::from_str(first).map_err(|e| format!("status line: {e}"))?;
        read.status = Some(status.code.into_u16());
    } else {
        read.request = Some(request_line(first)?);
    }
    let mut cseq = None;
    let mut content_length = None;
    let single = |name: &str, seen: &mut bool| {
        if std::mem::replace(seen, true) {
            Err(format!("{name} twice"))
        } else {
            Ok(())
        }
    };
    let (mut from, mut to, mut call_id) = (false, false, false);
    for line in header_lines {
        let (rest, Line { name, value }) =
            Line::parse(&src, line).map_err(|e| format!("header line {line:?}: {e:?}"))?;
        if !rest.is_empty() {
            return Err(format!("header line {line:?}: {rest:?} left"));
        }
        let (vsrc, text) = (value.as_ref(), value.as_str());
        let context = |what: &str| format!("{what} in {line:?}");
        if name == Name::VIA {
            read.vias
                .extend(list::<Via>(vsrc, text).map_err(|e| context(&e))?);
        } else if name == Name::CONTACT {
            if text.trim() != "*" {
                read.contacts
                    .extend(list::<Contact>(vsrc, text).map_err(|e| context(&e))?);
            }
        } else if name == Name::ROUTE || name == Name::RECORD_ROUTE {
            list::<Routing>(vsrc, text).map_err(|e| context(&e))?;
        } else if name == Name::FROM || name == Name::TO {
            single(
                "From/To",
                if name == Name::FROM {
                    &mut from
                } else {
                    &mut to
                },
            )?;
            whole::<FromTo>(vsrc, text).map_err(|e| context(&e))?;
        } else if name == Name::CALL_ID {
            single("Call-ID", &mut call_id)?;
            whole::<CallID>(vsrc, text).map_err(|e| context(&e))?;
            if text.trim().is_empty() || text.trim().contains(char::is_whitespace) {
                return Err(context("a Call-ID with whitespace"));
            }
        } else if name == Name::CSEQ {
            if cseq.is_some() {
                return Err("CSeq twice".into());
            }
            let parsed = whole::<CSeq>(vsrc, text).map_err(|e| context(&e))?;
            if parsed.cseq >= 1 << 31 {
                return Err(context("a CSeq number of 2**31 or more"));
            }
            read.cseq_number = text.split_whitespace().next().unwrap_or("").to_owned();
            cseq = Some(parsed);
        } else if name == Name::MAX_FORWARDS {
            read.max_forwards = Some(number(text).ok_or_else(|| context("Max-Forwards"))?);
        } else if name == Name::CONTENT_LENGTH {
            content_length = Some(number(text).ok_or_else(|| context("Content-Length"))?);
        }
        read.headers.push((name, text.to_owned()));
    }
    if read.vias.is_empty() || !from || !to || !call_id {
        return Err("Via, From, To or Call-ID missing".into());
    }
    read.cseq = cseq.ok_or("no CSeq")?;
    if let Some((method, _)) = &read.request
        && read.cseq.method.to_string() != *method
    {
        return Err(format!(
            "CSeq method {} is not the request's {method}",
            read.cseq.method
        ));
    }
    if let Some(length) = content_length
        && length as usize != read.body.len()
    {
        return Err(format!(
            "Content-Length {length} but {} bytes of body",
            read.body.len()
        ));
    }
    Ok(read)
}

/// Only the Contact values of a message (the rest may be anything the sender wrote and we
/// copied): each Contact line must read whole, as one or more values.
pub fn contacts(bytes: &[u8]) -> Result<Vec<Contact>, String> {
    let src = Bytes::from(ascii_escapes(bytes));
    let mut contacts = Vec::new();
    for line in PullParser::new(&src, 0).skip(1) {
        let line = line.map_err(|_| "the head never ends".to_owned())?;
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        if let Ok((_, Line { name, value })) = Line::parse(&src, line)
            && name == Name::CONTACT
        {
            contacts.extend(
                list::<Contact>(value.as_ref(), value.as_str())
                    .map_err(|e| format!("{e} in {line:?}"))?,
            );
        }
    }
    Ok(contacts)
}

/// `METHOD SP Request-URI SP SIP/2.0`: a `sip:`/`sips:` URI read by ezk, a `tel:` one
/// checked against RFC 3966's characters (ezk reads SIP URIs only).
fn request_line(line: &str) -> Result<(String, String), String> {
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, uri, "SIP/2.0"] = parts[..] else {
        return Err(format!("request line {line:?}"));
    };
    ezk_sip_types::Method::from_str(method).map_err(|e| format!("method {method:?}: {e:?}"))?;
    let lower = uri.to_ascii_lowercase();
    if lower.starts_with("sip:") || lower.starts_with("sips:") {
        SipUri::from_str(uri).map_err(|e| format!("Request-URI {uri:?}: {e}"))?;
    } else if let Some(number) = lower.strip_prefix("tel:") {
        let ok = !number.is_empty()
            && number
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.()*#;=%[]/:&$_!~'".contains(&b));
        if !ok {
            return Err(format!("Request-URI {uri:?}"));
        }
    } else {
        return Err(format!(
            "Request-URI {uri:?} is neither sip:, sips: nor tel:"
        ));
    }
    Ok((method.to_owned(), uri.to_owned()))
}

/// One value that must take the whole of `text`.
fn whole<T: HeaderParse>(src: &Bytes, text: &str) -> Result<T, String> {
    let (rest, value) = T::parse(src, text).map_err(|e| format!("{e:?}"))?;
    if rest.trim().is_empty() {
        Ok(value)
    } else {
        Err(format!("{rest:?} left after the value"))
    }
}

/// Comma-separated values that together take the whole of `text`.
fn list<T: HeaderParse>(src: &Bytes, text: &str) -> Result<Vec<T>, String> {
    let mut values = Vec::new();
    let mut rest = text.trim_start();
    loop {
        let (left, value) = T::parse(src, rest).map_err(|e| format!("{e:?}"))?;
        values.push(value);
        let left = left.trim_start();
        if left.is_empty() {
            return Ok(values);
        }
        rest = left
            .strip_prefix(',')
            .ok_or_else(|| format!("{left:?} left after a value"))?
            .trim_start();
    }
}

fn number(text: &str) -> Option<u32> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}
