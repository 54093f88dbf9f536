//! Sans-IO parsing and printing of Asterisk Manager Interface messages.
//!
//! AMI is line based: after a one-line greeting, every message in either direction is a
//! block of `Key: Value` lines closed by an empty line. The functions here only look at
//! bytes, so the client can feed them whatever a socket has delivered so far and tests can
//! feed them captures: `Ok(None)` means "need more bytes", `Err` means the peer is not
//! speaking AMI (or is sending something we refuse to buffer), and `Ok(Some((value, n)))`
//! hands back a value together with the `n` bytes it used up.
//!
//! Asterisk ends lines with `\r\n`; bare `\n` is accepted too, because hand-written test
//! servers and some proxies send it, and refusing it would buy nothing.

use std::fmt::Write as _;

/// What every Asterisk manager greeting starts with.
const GREETING_PREFIX: &[u8] = b"Asterisk Call Manager/";

/// A greeting is about 30 bytes; anything this long without a line end is not one.
const MAX_GREETING: usize = 1024;

/// The largest message buffered before giving up on the peer. The replies the agent asks
/// for are a few hundred bytes; events with many variables stay well under this.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Why bytes from the peer are not valid AMI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The first line is not an Asterisk manager greeting, e.g. the address points at
    /// another service.
    #[error("expected an `Asterisk Call Manager/…` greeting, got `{0}`")]
    NotAmi(String),
    /// A line inside a message has no `Key: Value` form.
    #[error("expected a `Key: Value` line, got `{0}`")]
    MalformedLine(String),
    /// The peer sent more than the bound without finishing a line or message.
    #[error("{what} longer than {limit} bytes")]
    TooLarge {
        /// `greeting` or `message`.
        what: &'static str,
        /// The bound that was exceeded.
        limit: usize,
    },
}

/// One AMI message: its `Key: Value` fields in the order they came.
///
/// Keys may repeat (a `Command` response has one `Output` line per line of CLI output),
/// hence a list rather than a map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    fields: Vec<(String, String)>,
}

impl Message {
    /// Builds a message from fields in order.
    pub fn new(fields: Vec<(String, String)>) -> Self {
        Self { fields }
    }

    /// Returns all fields in the order they came.
    pub fn fields(&self) -> &[(String, String)] {
        &self.fields
    }

    /// Returns the value of the first field named `key`, ignoring ASCII case as Asterisk
    /// does.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.get_all(key).next()
    }

    /// Returns the values of every field named `key` (ignoring ASCII case), in order.
    pub fn get_all<'a, 'k>(&'a self, key: &'k str) -> impl Iterator<Item = &'a str> + use<'a, 'k> {
        self.fields
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// Tells whether this is the reply to an action (first field `Response`).
    ///
    /// Only the first field counts: events such as `OriginateResponse` carry a `Response`
    /// field of their own and must not be mistaken for replies.
    pub fn is_response(&self) -> bool {
        self.first_key_is("Response")
    }

    /// Tells whether this is an unsolicited event (first field `Event`).
    pub fn is_event(&self) -> bool {
        self.first_key_is("Event")
    }

    /// Returns the status of a reply (`Success`, `Error`, `Goodbye`…), or `None` for events.
    pub fn response(&self) -> Option<&str> {
        self.is_response().then(|| self.fields[0].1.as_str())
    }

    /// Returns the `ActionID` that ties a reply (or an event list) to the action that asked.
    pub fn action_id(&self) -> Option<&str> {
        self.get("ActionID")
    }

    /// Returns a one-line rendering for error messages, cut to about `max` characters.
    pub fn summary(&self, max: usize) -> String {
        let mut out = String::new();
        for (key, value) in &self.fields {
            if !out.is_empty() {
                out.push_str("; ");
            }
            let _ = write!(out, "{key}: {value}");
            if out.len() > max {
                let mut cut = max;
                while !out.is_char_boundary(cut) {
                    cut -= 1;
                }
                out.truncate(cut);
                out.push('…');
                break;
            }
        }
        out
    }

    fn first_key_is(&self, key: &str) -> bool {
        self.fields
            .first()
            .is_some_and(|(k, _)| k.eq_ignore_ascii_case(key))
    }
}

/// Parses the greeting line Asterisk sends on connect, e.g. `Asterisk Call Manager/11.0.0`,
/// and returns the AMI version after the slash (`11.0.0`) with the bytes used.
///
/// Fails as soon as the bytes seen cannot start a greeting, so a connection to the wrong
/// port is reported at once instead of after a timeout (when that service talks first).
pub fn parse_greeting(buf: &[u8]) -> Result<Option<(String, usize)>, ParseError> {
    let seen = buf.len().min(GREETING_PREFIX.len());
    if buf[..seen] != GREETING_PREFIX[..seen] {
        return Err(ParseError::NotAmi(excerpt(first_line(buf))));
    }
    let Some(newline) = find_newline(buf) else {
        if buf.len() > MAX_GREETING {
            return Err(ParseError::TooLarge {
                what: "greeting",
                limit: MAX_GREETING,
            });
        }
        return Ok(None);
    };
    if newline + 1 > MAX_GREETING {
        return Err(ParseError::TooLarge {
            what: "greeting",
            limit: MAX_GREETING,
        });
    }
    let line = strip_cr(&buf[..newline]);
    let version = String::from_utf8_lossy(&line[GREETING_PREFIX.len()..])
        .trim()
        .to_owned();
    Ok(Some((version, newline + 1)))
}

/// Parses one message from the start of `buf`.
///
/// Empty lines before the first field are skipped (and counted in the bytes used), since
/// they carry nothing. Values lose the blanks after the colon but keep everything else;
/// bytes that are not UTF-8 are replaced rather than refused, because a caller name in
/// Latin-1 must not break the call count.
pub fn parse_message(buf: &[u8]) -> Result<Option<(Message, usize)>, ParseError> {
    let too_large = ParseError::TooLarge {
        what: "message",
        limit: MAX_MESSAGE,
    };
    let mut fields = Vec::new();
    let mut pos = 0;
    loop {
        let Some(newline) = find_newline(&buf[pos..]) else {
            // Checked against the whole buffer so the verdict does not depend on how the
            // bytes were split into reads.
            return if buf.len() > MAX_MESSAGE {
                Err(too_large)
            } else {
                Ok(None)
            };
        };
        let end = pos + newline + 1;
        if end > MAX_MESSAGE {
            return Err(too_large);
        }
        let line = strip_cr(&buf[pos..pos + newline]);
        pos = end;
        if line.is_empty() {
            if fields.is_empty() {
                continue;
            }
            return Ok(Some((Message { fields }, pos)));
        }
        fields.push(parse_field(line)?);
    }
}

/// Prints an action: `Action`, then `ActionID`, then `fields` in order, then the empty
/// line that ends it.
///
/// CR and LF inside keys and values become spaces, and `:` inside keys is dropped, so a
/// value taken from configuration can never start a header or an action of its own.
pub fn print_action(action: &str, action_id: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = String::with_capacity(64 + fields.len() * 32);
    push_field(&mut out, "Action", action);
    push_field(&mut out, "ActionID", action_id);
    for (key, value) in fields {
        push_field(&mut out, key, value);
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// Reads the active call count from the reply to `Command: core show channels count`,
/// whose output has a line `N active calls` (`1 active call` when there is one).
pub fn active_calls(msg: &Message) -> Option<u32> {
    msg.get_all("Output").find_map(|line| {
        let (count, rest) = line.trim().split_once(' ')?;
        matches!(rest.trim(), "active calls" | "active call")
            .then(|| count.parse().ok())
            .flatten()
    })
}

fn parse_field(line: &[u8]) -> Result<(String, String), ParseError> {
    let malformed = || ParseError::MalformedLine(excerpt(line));
    let colon = line.iter().position(|&b| b == b':').ok_or_else(malformed)?;
    let key = String::from_utf8_lossy(&line[..colon]).trim().to_owned();
    if key.is_empty() {
        return Err(malformed());
    }
    let value = String::from_utf8_lossy(&line[colon + 1..])
        .trim_start_matches([' ', '\t'])
        .to_owned();
    Ok((key, value))
}

fn push_field(out: &mut String, key: &str, value: &str) {
    out.extend(
        key.chars()
            .filter(|&c| c != ':')
            .map(|c| if c == '\r' || c == '\n' { ' ' } else { c }),
    );
    out.push_str(": ");
    out.extend(
        value
            .chars()
            .map(|c| if c == '\r' || c == '\n' { ' ' } else { c }),
    );
    out.push_str("\r\n");
}

fn find_newline(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn first_line(buf: &[u8]) -> &[u8] {
    strip_cr(&buf[..find_newline(buf).unwrap_or(buf.len())])
}

/// A short, printable rendering of untrusted bytes for error messages.
fn excerpt(bytes: &[u8]) -> String {
    const MAX: usize = 80;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]);
    let mut out: String = text.escape_debug().collect();
    if bytes.len() > MAX {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::ami::tests::fixture::{self, Capture};

    /// Parses a whole stream of messages, failing the test on anything left over.
    fn parse_all(bytes: &[u8]) -> Vec<Message> {
        let mut messages = Vec::new();
        let mut rest = bytes;
        while let Some((msg, used)) = parse_message(rest).expect("captured bytes are valid AMI") {
            assert!(
                used > 0 && used <= rest.len(),
                "used {used} of {}",
                rest.len()
            );
            messages.push(msg);
            rest = &rest[used..];
        }
        assert!(
            rest.is_empty(),
            "left over: {:?}",
            String::from_utf8_lossy(rest)
        );
        messages
    }

    /// Feeds `bytes` in chunks of the given sizes (cycled), the way reads would deliver
    /// them, parsing the greeting first and then messages as soon as they are complete.
    fn parse_chunked(bytes: &[u8], sizes: &[usize]) -> (String, Vec<Message>) {
        let mut buffer = Vec::new();
        let mut greeting = None;
        let mut messages = Vec::new();
        let mut offset = 0;
        for size in sizes.iter().cycle() {
            if offset == bytes.len() {
                break;
            }
            let end = (offset + size).min(bytes.len());
            buffer.extend_from_slice(&bytes[offset..end]);
            offset = end;
            if greeting.is_none() {
                match parse_greeting(&buffer).expect("captured greeting") {
                    Some((version, used)) => {
                        greeting = Some(version);
                        buffer.drain(..used);
                    }
                    None => continue,
                }
            }
            while let Some((msg, used)) = parse_message(&buffer).expect("captured message") {
                messages.push(msg);
                buffer.drain(..used);
            }
        }
        assert!(
            buffer.is_empty(),
            "left over: {:?}",
            String::from_utf8_lossy(&buffer)
        );
        (greeting.expect("a greeting"), messages)
    }

    /// The greeting's version and the messages after it, parsed from one stream.
    fn parse_stream(bytes: &[u8]) -> (String, Vec<Message>) {
        let (version, used) = parse_greeting(bytes)
            .expect("captured greeting")
            .expect("complete greeting");
        (version, parse_all(&bytes[used..]))
    }

    fn by_action_id<'a>(messages: &'a [Message], id: &str) -> &'a Message {
        messages
            .iter()
            .find(|m| m.is_response() && m.action_id() == Some(id))
            .unwrap_or_else(|| panic!("no response with ActionID {id}"))
    }

    #[test]
    fn greeting_from_capture() {
        let capture = Capture::login_and_core_show_channels();
        for conn in ["conn-badlogin", "conn-main"] {
            let stream = capture.sent_by_asterisk(conn);
            let (version, used) = parse_greeting(&stream)
                .expect("valid greeting")
                .expect("complete greeting");
            assert_eq!(version, "11.0.0");
            assert_eq!(&stream[..used], b"Asterisk Call Manager/11.0.0\r\n");
        }
    }

    #[test]
    fn greeting_needs_a_whole_line() {
        assert_eq!(parse_greeting(b""), Ok(None));
        assert_eq!(parse_greeting(b"Asterisk Call"), Ok(None));
        assert_eq!(parse_greeting(b"Asterisk Call Manager/2.10.4"), Ok(None));
        assert_eq!(
            parse_greeting(b"Asterisk Call Manager/2.10.4\nResponse"),
            Ok(Some(("2.10.4".to_owned(), 29)))
        );
    }

    #[test]
    fn non_ami_greeting_is_refused_early() {
        let err = parse_greeting(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n").expect_err("ssh");
        assert_eq!(
            err.to_string(),
            "expected an `Asterisk Call Manager/…` greeting, got `SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13`"
        );
        // No line end yet, but the first bytes already rule AMI out.
        assert!(matches!(
            parse_greeting(b"HTTP/1.1 4"),
            Err(ParseError::NotAmi(_))
        ));
        assert!(matches!(
            parse_greeting(b"\x16\x03\x01\x02\x00"),
            Err(ParseError::NotAmi(_))
        ));
        let long = [GREETING_PREFIX, &[b'1'; MAX_GREETING]].concat();
        assert!(matches!(
            parse_greeting(&long),
            Err(ParseError::TooLarge { .. })
        ));
    }

    #[test]
    fn captures_parse_message_by_message() {
        for capture in [
            Capture::login_and_core_show_channels(),
            Capture::originate_failures_and_queue_members(),
        ] {
            for conn in capture.connections() {
                let stream = capture.sent_by_asterisk(&conn);
                let (version, messages) = parse_stream(&stream);
                assert_eq!(version, "11.0.0");
                // Each captured read after the greeting happens to be exactly one message.
                let reads = capture.rows(&conn, fixture::FROM_ASTERISK).count() - 1;
                assert_eq!(messages.len(), reads, "{conn}");
                assert!(
                    messages.iter().all(|m| m.is_response() != m.is_event()),
                    "{conn}"
                );
            }
        }
    }

    #[test]
    fn captures_parse_the_same_in_small_chunks() {
        let capture = Capture::login_and_core_show_channels();
        let stream = capture.sent_by_asterisk("conn-main");
        let whole = parse_stream(&stream);
        for sizes in [
            &[1][..],
            &[2],
            &[3],
            &[7],
            &[64],
            &[1500],
            &[5, 1, 13, 2, 31, 1, 97, 8],
        ] {
            assert_eq!(
                parse_chunked(&stream, sizes),
                whole,
                "chunk sizes {sizes:?}"
            );
        }
        let capture = Capture::originate_failures_and_queue_members();
        let stream = capture.sent_by_asterisk("conn-main");
        assert_eq!(parse_chunked(&stream, &[3, 11, 1]), parse_stream(&stream));
    }

    #[test]
    fn bad_login_is_authentication_failed() {
        let capture = Capture::login_and_core_show_channels();
        let (_, messages) = parse_stream(&capture.sent_by_asterisk("conn-badlogin"));
        assert_eq!(messages.len(), 1);
        let reply = &messages[0];
        assert!(reply.is_response());
        assert_eq!(reply.response(), Some("Error"));
        assert_eq!(reply.action_id(), Some("bad-1"));
        assert_eq!(reply.get("Message"), Some("Authentication failed"));
    }

    #[test]
    fn login_accepted_then_events() {
        let capture = Capture::login_and_core_show_channels();
        let (_, messages) = parse_stream(&capture.sent_by_asterisk("conn-main"));
        assert_eq!(messages[0].response(), Some("Success"));
        assert_eq!(messages[0].action_id(), Some("1"));
        assert_eq!(messages[0].get("Message"), Some("Authentication accepted"));
        assert!(messages[1].is_event());
        assert_eq!(messages[1].get("Event"), Some("FullyBooted"));
        assert_eq!(
            messages[1].get("status"),
            Some("Fully Booted"),
            "keys ignore case"
        );
    }

    #[test]
    fn active_call_counts_from_core_show_channels() {
        let capture = Capture::login_and_core_show_channels();
        let (_, messages) = parse_stream(&capture.sent_by_asterisk("conn-main"));
        let counts: Vec<_> = ["cmd-1", "cmd-3", "cmd-4"]
            .into_iter()
            .map(|id| active_calls(by_action_id(&messages, id)))
            .collect();
        assert_eq!(counts, [Some(6), Some(11), Some(0)]);
        let cmd3 = by_action_id(&messages, "cmd-3");
        assert_eq!(
            cmd3.get_all("Output").collect::<Vec<_>>(),
            [
                "12 active channels",
                "11 active calls",
                "11 calls processed"
            ]
        );
        // A CLI error comes back as `Response: Error` with the CLI's complaint as output.
        let cmd2 = by_action_id(&messages, "cmd-2");
        assert_eq!(cmd2.response(), Some("Error"));
        assert_eq!(active_calls(cmd2), None);
        assert!(
            cmd2.get("Output")
                .expect("output")
                .starts_with("No such command 'core show nonsense'")
        );
        // Nothing else in the capture looks like a call count.
        let found = messages
            .iter()
            .filter(|m| active_calls(m).is_some())
            .count();
        assert_eq!(found, 3);
    }

    #[test]
    fn active_call_count_singular_and_malformed() {
        let parse = |text: &str| {
            parse_message(text.as_bytes())
                .expect("valid")
                .expect("whole")
                .0
        };
        let one = parse(
            "Response: Success\r\nActionID: x\r\nMessage: Command output follows\r\n\
             Output: 1 active channel\r\nOutput: 1 active call\r\nOutput: 5 calls processed\r\n\r\n",
        );
        assert_eq!(active_calls(&one), Some(1));
        let garbage = parse(
            "Response: Success\r\nOutput: many active calls\r\nOutput: -1 active calls\r\n\r\n",
        );
        assert_eq!(active_calls(&garbage), None);
        let processed = parse("Response: Success\r\nOutput: 7 calls processed\r\n\r\n");
        assert_eq!(active_calls(&processed), None);
    }

    #[test]
    fn events_interleave_between_responses() {
        let capture = Capture::login_and_core_show_channels();
        let (_, messages) = parse_stream(&capture.sent_by_asterisk("conn-main"));
        let position = |id: &str| {
            messages
                .iter()
                .position(|m| m.is_response() && m.action_id() == Some(id))
                .expect("response present")
        };
        let between = &messages[position("orig-3") + 1..position("cmd-1")];
        assert!(between.len() > 10, "{} messages", between.len());
        assert!(between.iter().any(|m| m.get("Event") == Some("Newchannel")));
        assert!(between.iter().any(|m| m.get("Event") == Some("DialEnd")));

        let capture = Capture::originate_failures_and_queue_members();
        let (_, messages) = parse_stream(&capture.sent_by_asterisk("conn-main"));
        // Two events arrive after the action was sent and before its reply.
        let reply = position_in(&messages, "o-nochan");
        assert_eq!(
            messages[reply].get("Message"),
            Some("Channel not specified")
        );
        assert_eq!(messages[reply - 1].get("Event"), Some("DeviceStateChange"));
        assert_eq!(messages[reply - 2].get("Event"), Some("DeviceStateChange"));
        // An event with a `Response` field and the action's ActionID is still an event.
        let originate = messages
            .iter()
            .find(|m| m.get("Event") == Some("OriginateResponse"))
            .expect("OriginateResponse event");
        assert!(originate.is_event());
        assert!(!originate.is_response());
        assert_eq!(originate.response(), None);
        assert_eq!(originate.get("Response"), Some("Failure"));
        assert_eq!(originate.action_id(), Some("o-async-bad"));
    }

    fn position_in(messages: &[Message], id: &str) -> usize {
        messages
            .iter()
            .position(|m| m.is_response() && m.action_id() == Some(id))
            .expect("response present")
    }

    #[test]
    fn empty_values_and_repeated_keys() {
        let capture = Capture::originate_failures_and_queue_members();
        let (_, messages) = parse_stream(&capture.sent_by_asterisk("conn-main"));
        let member = messages
            .iter()
            .find(|m| m.get("Event") == Some("QueueMemberAdded"))
            .expect("QueueMemberAdded event");
        assert_eq!(member.get("PausedReason"), Some(""));
        assert_eq!(member.get("MemberName"), Some("Agent 210"));
        assert_eq!(member.fields().len(), 18);

        let capture = Capture::login_and_core_show_channels();
        let (_, messages) = parse_stream(&capture.sent_by_asterisk("conn-main"));
        let cmd1 = by_action_id(&messages, "cmd-1");
        assert_eq!(cmd1.get_all("output").count(), 3);
        assert_eq!(cmd1.get("Output"), Some("6 active channels"), "first match");
    }

    #[test]
    fn printing_the_captured_login_reproduces_its_bytes() {
        let capture = Capture::login_and_core_show_channels();
        let login = capture
            .rows("conn-main", fixture::TO_ASTERISK)
            .next()
            .expect("a login action");
        let printed = print_action(
            "Login",
            "1",
            &[
                ("Username", "refadmin"),
                ("Secret", "refsecret"),
                ("Events", "call,agent,system,user"),
            ],
        );
        assert_eq!(String::from_utf8_lossy(&printed), login);
    }

    #[test]
    fn every_captured_action_prints_back_to_its_bytes() {
        for capture in [
            Capture::login_and_core_show_channels(),
            Capture::originate_failures_and_queue_members(),
        ] {
            for conn in capture.connections() {
                for sent in capture.rows(&conn, fixture::TO_ASTERISK) {
                    let (msg, used) = parse_message(sent.as_bytes())
                        .expect("valid action")
                        .expect("whole action");
                    assert_eq!(used, sent.len());
                    let [(action_key, action), (id_key, id), rest @ ..] = msg.fields() else {
                        panic!("action too short: {sent:?}");
                    };
                    assert_eq!(
                        (action_key.as_str(), id_key.as_str()),
                        ("Action", "ActionID")
                    );
                    let rest: Vec<_> = rest.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    assert_eq!(
                        String::from_utf8_lossy(&print_action(action, id, &rest)),
                        sent
                    );
                }
            }
        }
    }

    #[test]
    fn values_cannot_inject_headers() {
        let printed = print_action(
            "Command",
            "id\r\nAction: Logoff",
            &[
                (
                    "Command",
                    "core show channels count\r\n\r\nAction: Originate",
                ),
                ("Bad:\nKey", "v"),
            ],
        );
        let (msg, used) = parse_message(&printed).expect("valid").expect("whole");
        assert_eq!(
            used,
            printed.len(),
            "one message, nothing smuggled after it"
        );
        assert_eq!(msg.fields().len(), 4);
        assert_eq!(msg.get_all("Action").collect::<Vec<_>>(), ["Command"]);
        assert_eq!(msg.action_id(), Some("id  Action: Logoff"));
        assert_eq!(msg.get("Bad Key"), Some("v"));
    }

    #[test]
    fn incomplete_messages_need_more_bytes() {
        let whole = b"Response: Success\r\nActionID: 7\r\nPing: Pong\r\n\r\n";
        for end in 0..whole.len() {
            assert_eq!(
                parse_message(&whole[..end]),
                Ok(None),
                "prefix of {end} bytes"
            );
        }
        let (msg, used) = parse_message(whole).expect("valid").expect("whole");
        assert_eq!(used, whole.len());
        assert_eq!(msg.get("Ping"), Some("Pong"));
    }

    #[test]
    fn bare_line_feeds_and_leading_blank_lines() {
        let text =
            b"\r\n\nEvent: Hangup\nChannel: SIP/a-1\r\nCause-txt: Normal Clearing\n\nEvent: X\n";
        let (msg, used) = parse_message(text).expect("valid").expect("whole");
        assert_eq!(used, text.len() - b"Event: X\n".len());
        assert!(msg.is_event());
        assert_eq!(msg.get("Channel"), Some("SIP/a-1"));
        assert_eq!(msg.get("Cause-txt"), Some("Normal Clearing"));
        assert_eq!(parse_message(b"\r\n\r\n\n"), Ok(None));
    }

    #[test]
    fn invalid_messages_are_errors() {
        let err =
            parse_message(b"Response: Follows\r\n0 active calls\r\n\r\n").expect_err("no colon");
        assert_eq!(err, ParseError::MalformedLine("0 active calls".into()));
        // The bad line is reported before the message is complete.
        assert!(parse_message(b"Response: Success\r\nnonsense\r\nMore").is_err());
        assert!(matches!(
            parse_message(b": no key\r\n\r\n"),
            Err(ParseError::MalformedLine(_))
        ));

        let huge = [b"Event: Big\r\nData: ".as_slice(), &[b'x'; MAX_MESSAGE]].concat();
        assert_eq!(
            parse_message(&huge),
            Err(ParseError::TooLarge {
                what: "message",
                limit: MAX_MESSAGE
            })
        );
        let many_lines = b"Event: Many\r\n".repeat(MAX_MESSAGE / 13 + 1);
        assert!(matches!(
            parse_message(&many_lines),
            Err(ParseError::TooLarge { .. })
        ));
        let complete_but_huge = [&huge[..], b"\r\n\r\n"].concat();
        assert!(matches!(
            parse_message(&complete_but_huge),
            Err(ParseError::TooLarge { .. })
        ));
    }

    #[test]
    fn non_utf8_is_replaced_not_refused() {
        let (msg, _) = parse_message(b"Event: Newchannel\r\nCallerIDName: Jos\xe9\r\n\r\n")
            .expect("valid")
            .expect("whole");
        assert_eq!(msg.get("CallerIDName"), Some("Jos\u{fffd}"));
    }

    #[test]
    fn summary_is_one_short_line() {
        let msg = Message::new(vec![
            ("Response".into(), "Error".into()),
            ("Output".into(), "x".repeat(300)),
        ]);
        let summary = msg.summary(40);
        assert!(
            summary.starts_with("Response: Error; Output: xxx"),
            "{summary}"
        );
        assert!(summary.chars().count() <= 41, "{summary}");
    }

    fn field() -> impl Strategy<Value = (String, String)> {
        // Values keep no leading blanks: the parser drops those, as Asterisk does.
        (
            "[A-Za-z][A-Za-z0-9_-]{0,15}",
            "([!-~\u{a0}-\u{10ffff}][ -~\u{a0}-\u{10ffff}]{0,30})?",
        )
    }

    proptest! {
        #[test]
        fn parse_message_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_message(&bytes);
            let _ = parse_greeting(&bytes);
        }

        #[test]
        fn parse_message_never_panics_on_near_ami(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just(b"\r\n".to_vec()),
                    Just(b"\n".to_vec()),
                    Just(b": ".to_vec()),
                    Just(b"Response: Success".to_vec()),
                    Just(b"Asterisk Call Manager/".to_vec()),
                    proptest::collection::vec(any::<u8>(), 0..8),
                ],
                0..64,
            )
        ) {
            let bytes = parts.concat();
            if let Ok(Some((_, used))) = parse_message(&bytes) {
                prop_assert!(used > 0 && used <= bytes.len());
            }
            if let Ok(Some((_, used))) = parse_greeting(&bytes) {
                prop_assert!(used > 0 && used <= bytes.len());
            }
        }

        #[test]
        fn print_then_parse_round_trips(
            action in "[A-Za-z]{1,20}",
            action_id in "[A-Za-z0-9.-]{1,20}",
            fields in proptest::collection::vec(field(), 0..12),
            split in any::<prop::sample::Index>(),
        ) {
            let borrowed: Vec<_> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let printed = print_action(&action, &action_id, &borrowed);
            let (msg, used) = parse_message(&printed).expect("valid").expect("whole");
            prop_assert_eq!(used, printed.len());
            let mut expected = vec![("Action".to_owned(), action), ("ActionID".to_owned(), action_id)];
            expected.extend(fields);
            prop_assert_eq!(msg.fields(), &expected[..]);
            // Any strict prefix is incomplete, never an error.
            let cut = split.index(printed.len());
            prop_assert_eq!(parse_message(&printed[..cut]), Ok(None));
        }
    }
}
