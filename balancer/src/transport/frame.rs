//! Framing SIP on a stream (RFC 3261 §18.3), incrementally and without I/O.
//!
//! A [`Framer`] is fed the unconsumed bytes of one connection, always starting at a message
//! boundary, and says what the front of them is. It never looks at a byte twice while it
//! searches for the end of a header section (it remembers where the search stopped), and
//! it reads the head once, when it is complete, to learn Content-Length: a peer that sends
//! its message one byte at a time costs work in proportion to the bytes, not to their
//! square. After the head, the body is only counted.
//!
//! What it decides:
//! - Before a message, a double CRLF is a keep-alive ping (RFC 5626 §4.4.1) and gets a
//!   single CRLF pong; a lone CRLF (RFC 3261 §7.5) or stray line break is skipped.
//! - A message of at most `max_message` bytes is handed over whole.
//! - A message whose head fits in `max_message` but whose body makes it larger is still
//!   well framed: its first `max_message + 1` bytes are handed over (enough for the
//!   engine to answer 513 Message Too Large) and the rest of its Content-Length is
//!   discarded as it arrives, so the connection and every call on it survive.
//! - A header section that has not ended within `max_message` bytes cannot be framed
//!   without reading an unbounded head (Content-Length is in it), and the 513 could not be
//!   addressed if Via, From, To, Call-ID or CSeq lie beyond the limit: the stream is
//!   given up. A carrier never sends 8 KB of headers; a peer that does is broken or
//!   hostile.
//! - A head that does not parse, or whose Content-Length is unusable, loses the framing
//!   too; the latter is handed over (the engine answers 400) before the stream is given up.

use crate::sip::{self, Framing, HeaderName};

/// What the front of the unconsumed bytes is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// More bytes are needed.
    Incomplete,
    /// A keep-alive ping of this many bytes (a double CRLF): consume it, answer CRLF.
    Ping(usize),
    /// Bytes to consume and ignore: keep-alive line breaks, or body beyond the limit of a
    /// message already answered.
    Skip(usize),
    /// A whole message of this many bytes.
    Message(usize),
    /// The first `max_message + 1` bytes of a well-framed message that is larger: hand
    /// them over (the engine answers 513) and consume them; the rest follows as `Skip`.
    TooLarge(usize),
    /// The header section is complete but its Content-Length is missing a value, not a
    /// number, or repeated with another value: the head (this many bytes) can be answered
    /// 400, then the stream is lost.
    BadLength(usize),
    /// The head cannot be parsed, or has not ended within `max_message` bytes: the stream
    /// is lost.
    Lost,
}

/// Where the framer stands in the current message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Searching for the blank line that ends the head; bytes before `scanned` hold no
    /// head end. `started`: a byte other than a line break has arrived.
    Head { scanned: usize, started: bool },
    /// The head is read; the message is `total` bytes.
    Body { total: usize },
    /// The head is read; the message is larger than `max_message`.
    Large { total: usize },
    /// Body bytes of an answered oversized message still to discard.
    Discard { left: usize },
}

/// Frames one connection's byte stream; see the module docs.
#[derive(Debug, Clone)]
pub struct Framer {
    max_message: usize,
    state: State,
}

const PING: &[u8] = b"\r\n\r\n";

impl Framer {
    /// A framer for messages of at most `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message,
            state: State::Head {
                scanned: 0,
                started: false,
            },
        }
    }

    /// Whether a message has begun and not yet been consumed whole (its arrival is timed).
    pub fn mid_message(&self) -> bool {
        !matches!(self.state, State::Head { started: false, .. })
    }

    /// What the front of `buf` is; `buf` starts where the previous frame ended. Every
    /// frame but `Incomplete` and `Lost` must be consumed before the next call.
    pub fn next(&mut self, buf: &[u8]) -> Frame {
        match self.state {
            State::Head { scanned, started } => self.head(buf, scanned, started),
            State::Body { total } if buf.len() >= total => {
                self.reset();
                Frame::Message(total)
            }
            State::Body { .. } => Frame::Incomplete,
            State::Large { total } => {
                let sample = self.max_message + 1;
                if buf.len() < sample {
                    return Frame::Incomplete;
                }
                self.state = State::Discard {
                    left: total - sample,
                };
                Frame::TooLarge(sample)
            }
            State::Discard { left } => {
                if left == 0 {
                    self.reset();
                    return self.next(buf);
                }
                if buf.is_empty() {
                    return Frame::Incomplete;
                }
                let n = left.min(buf.len());
                if n == left {
                    self.reset();
                } else {
                    self.state = State::Discard { left: left - n };
                }
                Frame::Skip(n)
            }
        }
    }

    fn reset(&mut self) {
        self.state = State::Head {
            scanned: 0,
            started: false,
        };
    }

    fn head(&mut self, buf: &[u8], scanned: usize, started: bool) -> Frame {
        if !started {
            match buf.first() {
                None => return Frame::Incomplete,
                Some(b'\r' | b'\n') => return keep_alive(buf),
                Some(_) => {}
            }
        }
        let end = match head_end(buf, scanned) {
            Ok(end) => end,
            Err(resume) => {
                if buf.len() >= self.max_message {
                    return Frame::Lost;
                }
                self.state = State::Head {
                    scanned: resume,
                    started: true,
                };
                return Frame::Incomplete;
            }
        };
        if end > self.max_message {
            return Frame::Lost;
        }
        // The head alone, as a datagram: its Content-Length is read here, not checked
        // against the (absent) body.
        let headers = match sip::parse(&buf[..end], Framing::Datagram) {
            Ok(Some(message)) => message.headers,
            Ok(None) | Err(_) => return Frame::Lost,
        };
        let Some(body) = content_length(&headers) else {
            self.reset();
            return Frame::BadLength(end);
        };
        let total = end + body;
        self.state = if total > self.max_message {
            State::Large { total }
        } else {
            State::Body { total }
        };
        self.next(buf)
    }
}

/// `buf` starts with a line break before any message: a ping, a partial ping, or breaks
/// to skip.
fn keep_alive(buf: &[u8]) -> Frame {
    if buf.starts_with(PING) {
        return Frame::Ping(PING.len());
    }
    if PING.starts_with(buf) {
        // `\r`, `\r\n` or `\r\n\r`: a ping may be arriving in pieces.
        return Frame::Incomplete;
    }
    if buf.starts_with(b"\r\n") {
        Frame::Skip(2)
    } else {
        Frame::Skip(1)
    }
}

/// The end of the head (just past its blank line) in `buf`, searching from `from`; or
/// where to resume once more bytes have come. A line ends at LF, with or without CR, as
/// the parser reads it.
fn head_end(buf: &[u8], from: usize) -> Result<usize, usize> {
    let mut at = from;
    while let Some(found) = memchr::memchr(b'\n', buf.get(at..).unwrap_or_default()) {
        let lf = at + found;
        match buf.get(lf + 1..) {
            Some([b'\n', ..]) => return Ok(lf + 2),
            Some([b'\r', b'\n', ..]) => return Ok(lf + 3),
            // Not yet known whether a blank line follows this LF.
            Some([] | [b'\r']) | None => return Err(lf),
            Some(_) => {}
        }
        at = lf + 1;
    }
    Err(buf.len())
}

/// The body length the head announces: none is 0 (RFC 3261 §20.14 makes it mandatory on
/// streams; most implementations read a missing one as 0). `None` when a value is not a
/// number of at most 9 digits or two values differ, as the parser judges it.
fn content_length(headers: &[sip::Header<'_>]) -> Option<usize> {
    let mut length = None;
    for header in headers
        .iter()
        .filter(|h| h.name == HeaderName::ContentLength)
    {
        let value = header.value;
        if value.is_empty() || value.len() > 9 || !value.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let parsed = value
            .iter()
            .fold(0usize, |acc, digit| acc * 10 + usize::from(digit - b'0'));
        if length.is_some_and(|known| known != parsed) {
            return None;
        }
        length = Some(parsed);
    }
    Some(length.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MAX: usize = 1024;

    fn options(extra: &str, body: &str) -> Vec<u8> {
        format!(
            "OPTIONS sip:lb@192.0.2.10 SIP/2.0\r\nVia: SIP/2.0/TCP 198.51.100.7;branch=z9hG4bKx\r\n\
             From: <sip:c@198.51.100.7>;tag=1\r\nTo: <sip:lb@192.0.2.10>\r\nCall-ID: x@c\r\n\
             CSeq: 1 OPTIONS\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    /// Feeds `bytes` in pieces of `step` and consumes every frame, as the TCP adapter
    /// does; returns the frames with their bytes.
    fn run(framer: &mut Framer, bytes: &[u8], step: usize) -> Vec<(Frame, Vec<u8>)> {
        let mut buf = Vec::new();
        let mut frames = Vec::new();
        for piece in bytes.chunks(step.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                let frame = framer.next(&buf);
                let used = match frame {
                    Frame::Incomplete => break,
                    Frame::Lost => {
                        frames.push((frame, buf.clone()));
                        return frames;
                    }
                    Frame::Ping(n)
                    | Frame::Skip(n)
                    | Frame::Message(n)
                    | Frame::TooLarge(n)
                    | Frame::BadLength(n) => n,
                };
                frames.push((frame, buf.drain(..used).collect()));
                if let Frame::BadLength(_) = frame {
                    return frames;
                }
            }
        }
        frames
    }

    fn kinds(frames: &[(Frame, Vec<u8>)]) -> Vec<Frame> {
        frames.iter().map(|(frame, _)| *frame).collect()
    }

    #[test]
    fn messages_are_framed_by_content_length_whatever_the_pieces() {
        let first = options("", "hello");
        let second = options("X-Second: 1\r\n", "");
        let stream = [first.clone(), second.clone()].concat();
        for step in [1, 2, 3, 7, 64, stream.len()] {
            let frames = run(&mut Framer::new(MAX), &stream, step);
            assert_eq!(
                frames,
                vec![
                    (Frame::Message(first.len()), first.clone()),
                    (Frame::Message(second.len()), second.clone()),
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn a_double_crlf_is_a_ping_and_a_lone_crlf_is_skipped() {
        let message = options("", "");
        let stream = [
            b"\r\n\r\n".as_slice(),
            b"\r\n",
            &message,
            b"\r\n\r\n\r\n\r\n",
        ]
        .concat();
        for step in [1, 3, stream.len()] {
            let frames = run(&mut Framer::new(MAX), &stream, step);
            let expected = vec![
                Frame::Ping(4),
                Frame::Skip(2),
                Frame::Message(message.len()),
                Frame::Ping(4),
                Frame::Ping(4),
            ];
            assert_eq!(kinds(&frames), expected, "step {step}");
        }
        // Bare line feeds and a CR without LF are skipped one by one.
        let frames = run(&mut Framer::new(MAX), b"\n\rX", 3);
        assert_eq!(kinds(&frames), vec![Frame::Skip(1), Frame::Skip(1)]);
    }

    #[test]
    fn keep_alives_alone_do_not_start_a_message() {
        let mut framer = Framer::new(MAX);
        assert_eq!(framer.next(b"\r\n"), Frame::Incomplete);
        assert!(!framer.mid_message());
        assert_eq!(framer.next(b"\r\n\r\n"), Frame::Ping(4));
        assert!(!framer.mid_message());
        assert_eq!(framer.next(b"OPT"), Frame::Incomplete);
        assert!(framer.mid_message());
    }

    #[test]
    fn an_oversized_message_is_answered_from_its_first_bytes_and_its_body_skipped() {
        let body = "v".repeat(3000);
        let big = options("", &body);
        let next = options("X-Next: 1\r\n", "");
        let stream = [big.clone(), next.clone()].concat();
        for step in [1, 100, 1000, stream.len()] {
            let frames = run(&mut Framer::new(MAX), &stream, step);
            let (frame, sample) = &frames[0];
            assert_eq!(*frame, Frame::TooLarge(MAX + 1), "step {step}");
            assert_eq!(sample.as_slice(), &big[..=MAX]);
            let skipped: usize = frames
                .iter()
                .filter_map(|(frame, _)| match frame {
                    Frame::Skip(n) => Some(*n),
                    _ => None,
                })
                .sum();
            assert_eq!(skipped, big.len() - (MAX + 1), "step {step}");
            assert_eq!(
                frames.last(),
                Some(&(Frame::Message(next.len()), next.clone())),
                "step {step}"
            );
        }
    }

    /// An OPTIONS of exactly `len` bytes (padded with body).
    fn options_of_len(len: usize) -> Vec<u8> {
        let mut body = len - options("", "").len();
        loop {
            let message = options("", &"b".repeat(body));
            match message.len().cmp(&len) {
                std::cmp::Ordering::Equal => return message,
                std::cmp::Ordering::Greater => body -= message.len() - len,
                std::cmp::Ordering::Less => body += len - message.len(),
            }
        }
    }

    #[test]
    fn a_message_of_exactly_max_message_is_whole_and_one_more_is_too_large() {
        let exact = options_of_len(MAX);
        assert_eq!(Framer::new(MAX).next(&exact), Frame::Message(MAX));
        let over = options_of_len(MAX + 1);
        let mut framer = Framer::new(MAX);
        assert_eq!(framer.next(&over), Frame::TooLarge(MAX + 1));
        // Nothing is left to skip: the next message starts right after.
        assert_eq!(framer.next(b"\r\n\r\n"), Frame::Ping(4));
    }

    #[test]
    fn a_head_longer_than_max_message_loses_the_stream() {
        let fat = options(&"X-Pad: 0123456789\r\n".repeat(60), "");
        assert!(fat.len() > MAX);
        for step in [1, 500, fat.len()] {
            let frames = run(&mut Framer::new(MAX), &fat, step);
            assert_eq!(kinds(&frames), vec![Frame::Lost], "step {step}");
        }
        // Without any blank line, the search gives up at the limit, not later.
        let mut framer = Framer::new(MAX);
        let endless = "X: y\r\n".repeat(400);
        assert_eq!(
            framer.next(&endless.as_bytes()[..MAX - 1]),
            Frame::Incomplete
        );
        assert_eq!(framer.next(&endless.as_bytes()[..MAX]), Frame::Lost);
    }

    #[test]
    fn unusable_content_lengths_lose_the_stream_after_the_head() {
        for extra in [
            "Content-Length: abc\r\n",
            "Content-Length: 12\r\n",
            "l: 1234567890\r\n",
        ] {
            let head = options(extra, "");
            let mut framer = Framer::new(MAX);
            assert_eq!(framer.next(&head), Frame::BadLength(head.len()), "{extra}");
        }
        let garbage = b"\x01\x02 nonsense\r\nno colon here\r\n\r\n";
        assert_eq!(Framer::new(MAX).next(garbage), Frame::Lost);
    }

    #[test]
    fn the_head_search_resumes_where_it_stopped() {
        let mut framer = Framer::new(MAX);
        let message = options("", "");
        for end in 1..message.len() {
            assert_eq!(framer.next(&message[..end]), Frame::Incomplete, "at {end}");
            let State::Head { scanned, .. } = framer.state else {
                panic!("still in the head at {end}");
            };
            // At most the last two bytes are looked at again.
            assert!(scanned + 2 >= end, "scanned {scanned} of {end}");
        }
        assert_eq!(framer.next(&message), Frame::Message(message.len()));
    }

    proptest! {
        /// Any bytes in any pieces: no panic, every frame within the bytes, and a
        /// message the parser frames on a stream is framed the same here.
        #[test]
        fn agrees_with_the_parser_on_streams(
            bytes in proptest::collection::vec(
                prop_oneof![
                    Just(b'\r'), Just(b'\n'), Just(b':'), Just(b' '), Just(b'a'),
                    Just(b'1'), any::<u8>()
                ],
                0..600,
            ),
            step in 1usize..50,
        ) {
            let frames = run(&mut Framer::new(MAX), &bytes, step);
            let mut at = 0;
            for (frame, taken) in &frames {
                prop_assert!(at + taken.len() <= bytes.len());
                if let Frame::Message(len) = frame {
                    let parsed = sip::parse(&bytes[at..], Framing::Stream);
                    prop_assert_eq!(parsed.map(|m| m.map(|m| m.len)), Ok(Some(*len)));
                }
                at += taken.len();
            }
        }

        /// Real requests with random bodies and keep-alives between them, in random
        /// pieces: each comes out whole and in order.
        #[test]
        fn requests_come_out_whole(
            bodies in proptest::collection::vec("[a-z]{0,40}", 1..6),
            pings in proptest::collection::vec(0usize..3, 6),
            step in 1usize..80,
        ) {
            let mut stream = Vec::new();
            let mut expected = Vec::new();
            for (body, ping) in bodies.iter().zip(&pings) {
                for _ in 0..*ping {
                    stream.extend_from_slice(PING);
                    expected.push(Frame::Ping(4));
                }
                let message = options("", body);
                expected.push(Frame::Message(message.len()));
                stream.extend_from_slice(&message);
            }
            prop_assert_eq!(kinds(&run(&mut Framer::new(MAX), &stream, step)), expected);
        }
    }
}
