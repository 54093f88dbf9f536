//! Feeds arbitrary bytes to the FastAGI parsers the way a session reads them: the
//! environment first, then reply after reply (and `HANGUP` lines) until the parser wants
//! more bytes; and prints a command from the same bytes.
//!
//! Besides "never panics", it checks the promises a read loop relies on: a parsed value
//! claims at least one byte and never more than it was given; a strict prefix of a parsed
//! value reads as "need more bytes"; and what is read never depends on how the stream was
//! cut into reads (whole, in two pieces at a place the input picks, in pieces of a size it
//! picks). The command printer's output is read back with an independent reading of
//! res_agi's tokeniser (`node-agent/src/agi/oracle.rs`): one line, and exactly the words
//! that went in, unless the printer refused them for a reason that holds.

#![no_main]

use std::mem::{Discriminant, discriminant};

use callfleet_node_agent::agi::proto::{
    Command, CommandError, Environment, Event, MAX_COMMAND_LINE, MAX_COMMAND_WORDS, ParseError,
    parse_environment, parse_event,
};
use libfuzzer_sys::fuzz_target;

#[path = "../../node-agent/src/agi/oracle.rs"]
#[allow(dead_code)]
mod oracle;

/// A session's read side: the unread bytes and what was parsed from them.
#[derive(Default)]
struct Reader {
    buffer: Vec<u8>,
    environment: Option<Environment>,
    events: Vec<Event>,
    error: Option<ParseError>,
}

impl Reader {
    fn feed(&mut self, bytes: &[u8]) {
        if self.error.is_some() {
            return;
        }
        self.buffer.extend_from_slice(bytes);
        if self.environment.is_none() {
            match parse_environment(&self.buffer) {
                Ok(Some((environment, used))) => {
                    check_used(&self.buffer, used, |b| {
                        parse_environment(b).map(|r| r.map(|(_, n)| n))
                    });
                    let _ = environment.network_script().map(|s| s.param("queue"));
                    let _ = (environment.callerid(), environment.args());
                    self.environment = Some(environment);
                    self.buffer.drain(..used);
                }
                Ok(None) => return,
                Err(error) => {
                    self.error = Some(error);
                    return;
                }
            }
        }
        loop {
            match parse_event(&self.buffer) {
                Ok(Some((event, used))) => {
                    check_used(&self.buffer, used, |b| {
                        parse_event(b).map(|r| r.map(|(_, n)| n))
                    });
                    if let Event::Reply(reply) = &event
                        && let Some(success) = reply.success()
                    {
                        let _ = (success.result_int(), success.endpos());
                    }
                    self.events.push(event);
                    self.buffer.drain(..used);
                }
                Ok(None) => return,
                Err(error) => {
                    self.error = Some(error);
                    return;
                }
            }
        }
    }

    /// What was read, with errors compared by kind: the excerpt in an early `NotAgi` is
    /// whatever had arrived by then.
    fn outcome(
        &self,
    ) -> (
        &Option<Environment>,
        &[Event],
        Option<Discriminant<ParseError>>,
    ) {
        (
            &self.environment,
            &self.events,
            self.error.as_ref().map(discriminant),
        )
    }
}

fn check_used(buf: &[u8], used: usize, parse: impl Fn(&[u8]) -> Result<Option<usize>, ParseError>) {
    assert!(
        used > 0 && used <= buf.len(),
        "used {used} of {}",
        buf.len()
    );
    // A value cut short must read as "need more bytes", whatever the cut.
    for cut in [used - 1, used / 2] {
        let prefix = parse(&buf[..cut]);
        assert!(
            matches!(prefix, Ok(None)),
            "prefix of {cut} bytes gave {prefix:?}"
        );
    }
}

fn read(stream: &[u8], cuts: impl IntoIterator<Item = usize>) -> Reader {
    let mut reader = Reader::default();
    let mut offset = 0;
    for end in cuts.into_iter().chain([stream.len()]) {
        let end = end.clamp(offset, stream.len());
        reader.feed(&stream[offset..end]);
        offset = end;
    }
    reader
}

/// Prints `SET VARIABLE` with arguments cut from `data` at 0xFF bytes (never UTF-8, so the
/// cuts survive the conversion to text) and reads the line back as res_agi would.
fn command(data: &[u8]) {
    let args: Vec<String> = data
        .split(|&b| b == 0xFF)
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect();
    let built = args
        .iter()
        .enumerate()
        .fold(Command::new("SET VARIABLE"), |c, (i, a)| {
            if i % 2 == 0 {
                c.arg(a.clone())
            } else {
                c.quoted_arg(a.clone())
            }
        });
    let words = 2 + args.len();
    let forbidden = args
        .iter()
        .any(|a| a.bytes().any(|b| matches!(b, b'\n' | b'\r' | 0)));
    match built.encode() {
        Ok(line) => {
            assert!(!forbidden && words <= MAX_COMMAND_WORDS && line.len() <= MAX_COMMAND_LINE);
            let lines = oracle::lines(&line).expect("no NUL");
            assert_eq!(lines.len(), 1, "one command line: {line:?}");
            let read = oracle::words(lines[0]).expect("res_agi reads it");
            let mut expected: Vec<&[u8]> = vec![b"SET", b"VARIABLE"];
            expected.extend(args.iter().map(|a| a.as_bytes()));
            assert_eq!(read, expected, "{line:?}");
        }
        Err(CommandError::ForbiddenByte { .. }) => assert!(forbidden),
        Err(CommandError::TooManyWords { words: n, .. }) => {
            // Counted before the bytes are looked at.
            assert!(n == words && n > MAX_COMMAND_WORDS);
        }
        Err(CommandError::TooLong { len, .. }) => {
            assert!(!forbidden && words <= MAX_COMMAND_WORDS && len > MAX_COMMAND_LINE);
        }
        Err(other) => panic!("unexpected {other}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = read(data, []);
    if let [first, second, ..] = data {
        let cut = usize::from(*first) * data.len() / 255;
        assert_eq!(read(data, [cut]).outcome(), whole.outcome(), "cut at {cut}");
        // At most about 256 pieces: every call parses the buffer from its start.
        let size = (usize::from(*second % 16) + 1).max(data.len() / 256);
        let pieces = (1..).map(|i| i * size).take_while(|&end| end < data.len());
        assert_eq!(
            read(data, pieces).outcome(),
            whole.outcome(),
            "pieces of {size}"
        );
    }
    // Replies without an environment in front, as a reader that lost its place would see.
    let mut rest = data;
    while let Ok(Some((_, used))) = parse_event(rest) {
        assert!(used > 0 && used <= rest.len());
        rest = &rest[used..];
    }
    command(data);
});
