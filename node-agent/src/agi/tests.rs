//! Tests of the FastAGI codec against the sessions captured from a real Asterisk 22.10.1,
//! and of command printing against an independent reading of res_agi's tokeniser
//! ([`super::oracle`]).

use proptest::prelude::*;

use super::capture::{Capture, FROM_ASTERISK, TO_ASTERISK};
use super::oracle;
use super::proto::*;

/// What only the codec's tests read from a capture.
impl Capture {
    /// Everything Asterisk sent, as one byte stream.
    fn sent_by_asterisk(&self) -> Vec<u8> {
        self.rows(FROM_ASTERISK).collect::<String>().into_bytes()
    }

    /// Asterisk's rows after the environment: replies and `HANGUP` lines, one per row.
    fn events(&self) -> impl Iterator<Item = &str> {
        self.rows(FROM_ASTERISK).skip(1)
    }
}

/// Parses a whole stream: the environment, then events until the end, failing the test on
/// anything left over.
fn read_stream(stream: &[u8]) -> (Environment, Vec<Event>) {
    let (env, used) = parse_environment(stream)
        .expect("captured environment is valid")
        .expect("complete environment");
    let mut rest = &stream[used..];
    let mut events = Vec::new();
    while let Some((event, used)) = parse_event(rest).expect("captured events are valid") {
        assert!(
            used > 0 && used <= rest.len(),
            "used {used} of {}",
            rest.len()
        );
        events.push(event);
        rest = &rest[used..];
    }
    assert!(
        rest.is_empty(),
        "left over: {:?}",
        String::from_utf8_lossy(rest)
    );
    (env, events)
}

/// Feeds `stream` in pieces ending at `cuts` (ascending) and then the rest, as reads would
/// deliver it, parsing whatever is complete after each piece.
fn read_in_pieces(stream: &[u8], cuts: &[usize]) -> (Environment, Vec<Event>) {
    let mut buffer = Vec::new();
    let mut env = None;
    let mut events = Vec::new();
    let mut offset = 0;
    for &end in cuts.iter().chain([&stream.len()]) {
        buffer.extend_from_slice(&stream[offset..end]);
        offset = end;
        if env.is_none() {
            match parse_environment(&buffer).expect("valid environment") {
                Some((parsed, used)) => {
                    env = Some(parsed);
                    buffer.drain(..used);
                }
                None => continue,
            }
        }
        while let Some((event, used)) = parse_event(&buffer).expect("valid event") {
            events.push(event);
            buffer.drain(..used);
        }
    }
    assert!(
        buffer.is_empty(),
        "left over: {:?}",
        String::from_utf8_lossy(&buffer)
    );
    (env.expect("an environment"), events)
}

fn success(result: &str, data: Option<&str>, extras: &[(&str, &str)]) -> Event {
    Event::Reply(Reply::Success(Success {
        result: result.into(),
        data: data.map(Into::into),
        extras: extras
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }))
}

/// The usage text Asterisk sent for `GET VARIABLE` without a name.
const GET_VARIABLE_USAGE: &str = "Returns <literal>0</literal> if <replaceable>variablename</replaceable> is not set. \
Returns <literal>1</literal> if <replaceable>variablename</replaceable> is set and returns the variable in parentheses.\n\
Example return code: 200 result=1 (testvariable)";

// ----- environment -----

#[test]
fn capture_has_five_sessions() {
    let headers: Vec<String> = Capture::all().into_iter().map(|s| s.header).collect();
    assert_eq!(headers.len(), 5, "{headers:?}");
    assert!(
        headers[4].starts_with("session 1 "),
        "the second run restarts at 1"
    );
}

#[test]
fn environment_of_the_routed_call() {
    let sessions = Capture::all();
    let block = sessions[0].environment();
    let (env, used) = parse_environment(block.as_bytes())
        .expect("valid")
        .expect("whole");
    assert_eq!(used, block.len(), "the block ends with its empty line");
    let script = env.network_script().expect("agi_network_script");
    assert_eq!(script.path(), "route");
    assert_eq!(script.param("queue"), Some("sales"));
    assert_eq!(script.query(), [("queue".to_owned(), "sales".to_owned())]);
    assert_eq!(
        env.request(),
        Some("agi://127.0.0.1:4573/route?queue=sales")
    );
    assert_eq!(env.channel(), Some("Local/300@default-00000006;2"));
    assert_eq!(env.uniqueid(), Some("1795429622.24"));
    assert_eq!(env.callerid(), Some("5551234"));
    assert_eq!(env.calleridname(), Some("Ref AGI"));
    assert_eq!(env.extension(), Some("300"));
    assert_eq!(env.context(), Some("default"));
    assert_eq!(env.args(), ["first arg", "second-arg"]);
    // The rest is kept, in order, with empty values as they came.
    assert_eq!(env.fields().len(), 24);
    assert_eq!(
        env.fields()[0],
        ("agi_network".to_owned(), "yes".to_owned())
    );
    assert_eq!(env.get("agi_accountcode"), Some(""));
    assert_eq!(env.get("agi_threadid"), Some("140608606086848"));
    assert_eq!(env.get("agi_dnid"), Some("unknown"));
    assert_eq!(env.get("agi_arg_2"), Some("second-arg"));
    assert_eq!(env.get("agi_nothing"), None);
    // Printing gives back the captured bytes.
    assert_eq!(String::from_utf8_lossy(&env.print()), block);
}

#[test]
fn environment_of_every_session() {
    let expected = [
        ("route", Some("sales"), "300", 2),
        ("hangup-test", None, "301", 0),
        ("self-hangup", None, "302", 0),
        ("hangup-test-nosighup", None, "304", 0),
        ("route-clean", Some("sales"), "305", 0),
    ];
    for (session, (path, queue, exten, args)) in Capture::all().iter().zip(expected) {
        let block = session.environment();
        let (env, used) = parse_environment(block.as_bytes())
            .expect("valid")
            .expect("whole");
        assert_eq!(used, block.len());
        let script = env.network_script().expect("a script");
        assert_eq!(
            (script.path(), script.param("queue")),
            (path, queue),
            "{}",
            session.header
        );
        assert_eq!(env.extension(), Some(exten));
        assert_eq!(env.args().len(), args);
        assert_eq!(env.fields().len(), 22 + args);
        assert!(env.channel().is_some_and(|c| c.starts_with("Local/")));
        assert_eq!(String::from_utf8_lossy(&env.print()), block);
    }
}

#[test]
fn environment_needs_its_empty_line() {
    let sessions = Capture::all();
    let block = sessions[1].environment().as_bytes();
    for end in 0..block.len() {
        assert_eq!(
            parse_environment(&block[..end]),
            Ok(None),
            "prefix of {end} bytes"
        );
    }
    // What follows the block is left for the reply parser.
    let stream = [block, b"200 result=1\n"].concat();
    let (_, used) = parse_environment(&stream).expect("valid").expect("whole");
    assert_eq!(used, block.len());
}

#[test]
fn not_agi_is_refused_early() {
    for bytes in [
        &b"G"[..],
        b"GET / HTTP/1.1\r\n",
        b"\x16\x03\x01\x02\x00",
        b"\n",
        b"ag!",
        b"200 result=1\n",
    ] {
        assert!(
            matches!(parse_environment(bytes), Err(ParseError::NotAgi(_))),
            "{bytes:?}"
        );
    }
    let err = parse_environment(b"GET /route HTTP/1.1\r\nHost: x\r\n").expect_err("http");
    assert_eq!(
        err.to_string(),
        "expected an AGI environment line `agi_name: value`, got `GET /route HTTP/1.1\\r`"
    );
    for bad in [
        &b"agi_channel PJSIP/x\n"[..],
        b"agi_: x\n",
        b"agi_a b: x\n",
        b"agi_network: yes\nchannel: x\n",
    ] {
        assert!(
            matches!(parse_environment(bad), Err(ParseError::NotAgi(_))),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn environment_values_are_kept_as_sent() {
    let (env, _) = parse_environment(
        b"agi_callerid: unknown\nagi_calleridname: Jos\xe9\nagi_arg_1:  two spaces\nagi_x:\n\n",
    )
    .expect("valid")
    .expect("whole");
    assert_eq!(env.callerid(), None, "`unknown` is no number");
    assert_eq!(env.get("agi_callerid"), Some("unknown"));
    assert_eq!(env.calleridname(), Some("Jos\u{fffd}"));
    assert_eq!(
        env.args(),
        [" two spaces"],
        "only the one space after `:` goes"
    );
    assert_eq!(env.get("agi_x"), Some(""));
    assert!(env.network_script().is_none());
    assert_eq!(env.channel(), None);
}

#[test]
fn arguments_in_numeric_order() {
    let env = Environment::new(
        [
            ("agi_arg_10", "ten"),
            ("agi_arg_2", "two"),
            ("agi_arg_1", "one"),
            ("agi_arg_x", "not an argument"),
            ("agi_arg_0", "not an argument"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect(),
    );
    assert_eq!(env.args(), ["one", "two", "ten"]);
    assert_eq!(env.fields().len(), 5);
}

#[test]
fn scripts_are_percent_decoded() {
    // (script, path, query)
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
    let cases: &[Case] = &[
        ("route?queue=sales", "route", &[("queue", "sales")]),
        ("hangup-test", "hangup-test", &[]),
        ("?extension=300", "", &[("extension", "300")]),
        (
            "route%2Fvip?queue=sales%20team&vip=1&flag&&who=a+b%2Bc",
            "route/vip",
            &[
                ("queue", "sales team"),
                ("vip", "1"),
                ("flag", ""),
                ("who", "a b+c"),
            ],
        ),
        ("a+b?q=%C3%A9t%C3%A9", "a+b", &[("q", "été")]),
        ("bad%zz%4?q=%4&r=%", "bad%zz%4", &[("q", "%4"), ("r", "%")]),
        ("x?q=%FF", "x", &[("q", "\u{fffd}")]),
        ("x?a=1=2", "x", &[("a", "1=2")]),
    ];
    for (raw, path, query) in cases {
        let script = Script::parse(raw);
        assert_eq!(script.path(), *path, "{raw}");
        let query: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(script.query(), query, "{raw}");
    }
    assert_eq!(
        Script::parse("r?q=1&q=2").param("q"),
        Some("1"),
        "first wins"
    );
}

#[test]
fn environment_bounds() {
    let line = |i: usize| format!("agi_v{i}: {}\n", "x".repeat(40));
    // 256 lines fit (and stay under 16 KiB).
    let lines: String = (0..MAX_ENVIRONMENT_LINES).map(line).collect();
    let ok = format!("{lines}\n");
    assert!(ok.len() <= MAX_ENVIRONMENT);
    let (env, used) = parse_environment(ok.as_bytes())
        .expect("valid")
        .expect("whole");
    assert_eq!(
        (env.fields().len(), used),
        (MAX_ENVIRONMENT_LINES, ok.len())
    );
    // One more is refused, complete or not.
    let over = format!("{lines}{}", line(MAX_ENVIRONMENT_LINES));
    let too_many = ParseError::TooManyLines {
        what: "environment",
        limit: MAX_ENVIRONMENT_LINES,
    };
    assert_eq!(parse_environment(over.as_bytes()), Err(too_many.clone()));
    assert_eq!(
        parse_environment(format!("{over}\n").as_bytes()),
        Err(too_many)
    );
    assert_eq!(
        too_many_lines_message(),
        "environment has more than 256 lines"
    );

    // Exactly 16 KiB is accepted; a byte more is refused, with or without a line end.
    let head = "agi_big: ";
    let exact = format!("{head}{}\n\n", "v".repeat(MAX_ENVIRONMENT - head.len() - 2));
    assert_eq!(exact.len(), MAX_ENVIRONMENT);
    assert!(matches!(parse_environment(exact.as_bytes()), Ok(Some(_))));
    let too_large = ParseError::TooLarge {
        what: "environment",
        limit: MAX_ENVIRONMENT,
    };
    let big = format!("{head}{}", "v".repeat(MAX_ENVIRONMENT));
    assert_eq!(parse_environment(big.as_bytes()), Err(too_large.clone()));
    assert_eq!(
        parse_environment(format!("{big}\n\n").as_bytes()),
        Err(too_large.clone())
    );
    let just_over = format!("{head}{}\n\n", "v".repeat(MAX_ENVIRONMENT - head.len() - 1));
    assert_eq!(parse_environment(just_over.as_bytes()), Err(too_large));
    assert_eq!(
        parse_environment(&just_over.as_bytes()[..MAX_ENVIRONMENT]),
        Ok(None),
        "16 KiB without the end yet"
    );
}

fn too_many_lines_message() -> String {
    ParseError::TooManyLines {
        what: "environment",
        limit: MAX_ENVIRONMENT_LINES,
    }
    .to_string()
}

// ----- replies -----

#[test]
fn every_captured_reply_reads_as_expected() {
    let expected = |data: &str| -> Event {
        match data {
            "200 result=1 (5551234)\n" => success("1", Some("5551234"), &[]),
            "200 result=1 (\"Ref AGI\" <5551234>)\n" => {
                success("1", Some("\"Ref AGI\" <5551234>"), &[])
            }
            "200 result=0\n" => success("0", None, &[]),
            "200 result=1\n" => success("1", None, &[]),
            "200 result=6\n" => success("6", None, &[]),
            "200 result=1 (Local/200@default)\n" => success("1", Some("Local/200@default"), &[]),
            "200 result=1 (value with spaces)\n" => success("1", Some("value with spaces"), &[]),
            "200 result=1 (val1)\n" => success("1", Some("val1"), &[]),
            "200 result=1 (1)\n" => success("1", Some("1"), &[]),
            "200 result=0 endpos=8000\n" => success("0", None, &[("endpos", "8000")]),
            "200 result=-1 endpos=0\n" => success("-1", None, &[("endpos", "0")]),
            "510 Invalid or unknown command\n" => Event::Reply(Reply::UnknownCommand),
            "511 Command Not Permitted on a dead channel or intercept routine\n" => {
                Event::Reply(Reply::DeadChannel)
            }
            "HANGUP\n" => Event::Hangup,
            usage if usage.starts_with("520-") => Event::Reply(Reply::BadSyntax {
                usage: Some(GET_VARIABLE_USAGE.to_owned()),
            }),
            other => panic!("a captured reply this test does not know: {other:?}"),
        }
    };
    let mut kinds = std::collections::BTreeSet::new();
    let mut count = 0;
    for session in Capture::all() {
        for data in session.events() {
            let (event, used) = parse_event(data.as_bytes()).expect("valid").expect("whole");
            assert_eq!(used, data.len(), "{data:?}");
            assert_eq!(event, expected(data), "{data:?}");
            // Printing the event gives back the captured bytes.
            assert_eq!(String::from_utf8_lossy(&event.print()), data);
            // Every strict prefix is incomplete, never an error nor another reply.
            for end in 0..data.len() {
                assert_eq!(
                    parse_event(&data.as_bytes()[..end]),
                    Ok(None),
                    "{data:?} cut at {end}"
                );
            }
            kinds.insert(match &event {
                Event::Hangup => "hangup",
                Event::Reply(Reply::Success(s)) if s.data.is_some() => "200 with data",
                Event::Reply(Reply::Success(s)) if s.endpos().is_some() => "200 with endpos",
                Event::Reply(Reply::Success(_)) => "200",
                Event::Reply(Reply::UnknownCommand) => "510",
                Event::Reply(Reply::DeadChannel) => "511",
                Event::Reply(Reply::BadSyntax { .. }) => "520",
                Event::Reply(Reply::Other { .. }) => "other",
            });
            count += 1;
        }
    }
    assert_eq!(count, 42);
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        [
            "200",
            "200 with data",
            "200 with endpos",
            "510",
            "511",
            "520",
            "hangup"
        ]
    );
}

#[test]
fn replies_pair_with_commands_and_hangup_is_apart() {
    // What each session's events look like: `H` for a pushed HANGUP, else the reply's code.
    let expected = [
        "200 200 200 200 200 200 200 200 200 200 200 200 200 200 200 200 200 200 510 520 H",
        "200 H 200 511 511 511 200",
        "200 H 511 200 511",
        // AGISIGHUP=no: the caller hung up, and Asterisk said nothing.
        "200 200 511 511 511 200",
        "200 200 200",
    ];
    for (session, expected) in Capture::all().iter().zip(expected) {
        let (_, events) = read_stream(&session.sent_by_asterisk());
        let shape: Vec<String> = events
            .iter()
            .map(|event| match event {
                Event::Hangup => "H".to_owned(),
                Event::Reply(Reply::Success(_)) => "200".to_owned(),
                Event::Reply(Reply::UnknownCommand) => "510".to_owned(),
                Event::Reply(Reply::DeadChannel) => "511".to_owned(),
                Event::Reply(Reply::BadSyntax { .. }) => "520".to_owned(),
                Event::Reply(Reply::Other { code, .. }) => code.to_string(),
            })
            .collect();
        assert_eq!(shape.join(" "), expected, "{}", session.header);
        // One reply per command sent: HANGUP lines are not replies.
        let replies = events.iter().filter(|e| **e != Event::Hangup).count();
        assert_eq!(
            replies,
            session.rows(TO_ASTERISK).count(),
            "{}",
            session.header
        );
    }
}

#[test]
fn hangup_can_come_ahead_of_a_reply() {
    // Session 2 has HANGUP and then a reply in separate reads; in one read (a command
    // already sent when the caller hung up) they must still come apart.
    let sessions = Capture::all();
    let rows: Vec<&str> = sessions[1].events().collect();
    assert_eq!(rows[1], "HANGUP\n");
    let both = [rows[1], rows[3]].concat();
    let (first, used) = parse_event(both.as_bytes()).expect("valid").expect("whole");
    assert_eq!((first, used), (Event::Hangup, 7));
    let (second, used) = parse_event(&both.as_bytes()[7..])
        .expect("valid")
        .expect("whole");
    assert_eq!(second, Event::Reply(Reply::DeadChannel));
    assert_eq!(used, both.len() - 7);
}

#[test]
fn whole_sessions_split_at_every_offset() {
    for session in Capture::all() {
        let stream = session.sent_by_asterisk();
        let whole = read_stream(&stream);
        for cut in 0..=stream.len() {
            assert_eq!(
                read_in_pieces(&stream, &[cut]),
                whole,
                "{} cut at {cut}",
                session.header
            );
        }
        let every_byte: Vec<usize> = (1..stream.len()).collect();
        assert_eq!(read_in_pieces(&stream, &every_byte), whole);
    }
}

#[test]
fn replies_of_other_commands() {
    // Formats res_agi prints for commands the captures do not run.
    let cases: &[(&str, Event)] = &[
        // GET DATA: the digits typed, possibly none, possibly with a leading zero.
        ("200 result= (timeout)\n", success("", Some("timeout"), &[])),
        ("200 result=0042\n", success("0042", None, &[])),
        (
            "200 result=1 (timeout) endpos=1234\n",
            success("1", Some("timeout"), &[("endpos", "1234")]),
        ),
        (
            "200 result=1 (digit) digit=5 endpos=99\n",
            success("1", Some("digit"), &[("digit", "5"), ("endpos", "99")]),
        ),
        (
            "200 result=1 (speech) endpos=0 results=1 score0=900 text0=\"hello world\" grammar0=g\n",
            success(
                "1",
                Some("speech"),
                &[
                    ("endpos", "0"),
                    ("results", "1"),
                    ("score0", "900"),
                    ("text0", "hello world"),
                    ("grammar0", "g"),
                ],
            ),
        ),
        (
            "200 result=-1 (hangup)\n",
            success("-1", Some("hangup"), &[]),
        ),
        // Variable values are free text, parentheses and all.
        ("200 result=1 ()\n", success("1", Some(""), &[])),
        (
            "200 result=1 (a (b) c)\n",
            success("1", Some("a (b) c"), &[]),
        ),
        ("200 result=1 (x) y)\n", success("1", Some("x) y"), &[])),
        (
            "200 result=1 (endpos=5)\n",
            success("1", Some("endpos=5"), &[]),
        ),
        ("200 result=\n", success("", None, &[])),
        ("200 result=1 flag\n", success("1", None, &[("flag", "")])),
        (
            "520 Invalid command syntax.  Proper usage not available.\n",
            Event::Reply(Reply::BadSyntax { usage: None }),
        ),
        (
            "530 Something new\n",
            Event::Reply(Reply::Other {
                code: 530,
                text: "Something new".into(),
            }),
        ),
        (
            "530-first\nmiddle\n531 not the end\n530 last\n",
            Event::Reply(Reply::Other {
                code: 530,
                text: "first\nmiddle\n531 not the end\nlast".into(),
            }),
        ),
        (
            "520-Invalid command syntax.  Proper usage follows:\n520 End of proper usage.\n",
            Event::Reply(Reply::BadSyntax {
                usage: Some(String::new()),
            }),
        ),
        (
            "200 result=1 (Jos\u{e9})\n",
            success("1", Some("Jos\u{e9}"), &[]),
        ),
    ];
    for (text, expected) in cases {
        let (event, used) = parse_event(text.as_bytes()).expect("valid").expect("whole");
        assert_eq!(&event, expected, "{text:?}");
        assert_eq!(used, text.len(), "{text:?}");
    }
    let Event::Reply(reply) = &cases[3].1 else {
        panic!("a reply")
    };
    let digit = reply.success().expect("200");
    assert_eq!(
        (digit.result_int(), digit.extra("digit"), digit.endpos()),
        (Some(1), Some("5"), Some(99))
    );
    let typed = success("", Some("timeout"), &[]);
    let Event::Reply(Reply::Success(typed)) = typed else {
        panic!("a success")
    };
    assert_eq!(typed.result_int(), None);
    assert_eq!(Reply::DeadChannel.success(), None);
    // Non-UTF-8 data is replaced, not refused.
    let (event, _) = parse_event(b"200 result=1 (Jos\xe9)\n")
        .expect("valid")
        .expect("whole");
    assert_eq!(event, success("1", Some("Jos\u{fffd}"), &[]));
}

#[test]
fn usage_needs_its_last_line() {
    let text = "520-Invalid command syntax.  Proper usage follows:\nline one\n520 End";
    assert_eq!(parse_event(text.as_bytes()), Ok(None));
    let text = format!("{text} of proper usage.\n200 result=1\n");
    let (event, used) = parse_event(text.as_bytes()).expect("valid").expect("whole");
    assert_eq!(
        event,
        Event::Reply(Reply::BadSyntax {
            usage: Some("line one".into())
        })
    );
    assert_eq!(&text[used..], "200 result=1\n");
}

#[test]
fn malformed_replies_are_errors() {
    for bad in [
        &b"\n"[..],
        b"OK\n",
        b"20 result=1\n",
        b"2000 result=1\n",
        b"200\n",
        b"200 noresult\n",
        b"200 result=1 (unclosed\n",
        b"200 result=1 (a)b\n",
        b"HANGUP now\n",
        b"hangup\n",
        b"HANGUP\r\n",
        b"agi_channel: x\n",
    ] {
        assert!(
            matches!(parse_event(bad), Err(ParseError::MalformedReply(_))),
            "{:?} gave {:?}",
            String::from_utf8_lossy(bad),
            parse_event(bad)
        );
    }
    assert_eq!(
        parse_event(b"OK then\n")
            .expect_err("not a reply")
            .to_string(),
        "expected an AGI reply (`200 result=…`, `5xx …` or `HANGUP`), got `OK then`"
    );
    // A malformed line is only judged once it is whole.
    assert_eq!(parse_event(b"OK"), Ok(None));
}

#[test]
fn reply_bounds() {
    let too_large = ParseError::TooLarge {
        what: "reply",
        limit: MAX_REPLY,
    };
    // A line of exactly MAX_REPLY bytes is read; one more byte is refused.
    let head = "200 result=1 (";
    let fits = format!("{head}{})\n", "v".repeat(MAX_REPLY - head.len() - 2));
    assert_eq!(fits.len(), MAX_REPLY);
    assert!(matches!(parse_event(fits.as_bytes()), Ok(Some(_))));
    let over = format!("{head}{})\n", "v".repeat(MAX_REPLY - head.len() - 1));
    assert_eq!(parse_event(over.as_bytes()), Err(too_large.clone()));
    assert_eq!(parse_event(&over.as_bytes()[..MAX_REPLY]), Ok(None));
    assert_eq!(
        parse_event(&over.as_bytes()[..=MAX_REPLY]),
        Err(too_large.clone())
    );

    // A multi-line reply is bounded in bytes and in lines, ended or not.
    let start = "520-Invalid command syntax.  Proper usage follows:\n";
    let many = format!("{start}{}", "usage\n".repeat(MAX_REPLY_LINES));
    let too_many = ParseError::TooManyLines {
        what: "reply",
        limit: MAX_REPLY_LINES,
    };
    assert_eq!(parse_event(many.as_bytes()), Err(too_many.clone()));
    assert_eq!(
        parse_event(format!("{many}520 End of proper usage.\n").as_bytes()),
        Err(too_many)
    );
    let lines_fit = format!(
        "{start}{}520 End of proper usage.\n",
        "usage\n".repeat(MAX_REPLY_LINES - 2)
    );
    assert!(matches!(parse_event(lines_fit.as_bytes()), Ok(Some(_))));
    let long = format!("{start}{}", "u".repeat(MAX_REPLY));
    assert_eq!(parse_event(long.as_bytes()), Err(too_large));
}

// ----- commands -----

/// Reads a printed command back the way res_agi would, as text.
fn read_back(printed: &[u8]) -> Vec<String> {
    let lines = oracle::lines(printed).expect("no NUL");
    assert_eq!(lines.len(), 1, "one command line: {printed:?}");
    oracle::words(lines[0])
        .expect("res_agi reads it")
        .into_iter()
        .map(|word| String::from_utf8(word).expect("utf-8"))
        .collect()
}

fn encoded(command: &Command) -> String {
    String::from_utf8(command.encode().expect("printable")).expect("utf-8")
}

#[test]
fn captured_commands_print_back_to_their_bytes() {
    let built = [
        Command::get_variable("CALLERID(num)"),
        Command::get_full_variable("${CALLERID(all)}"),
        Command::get_variable("DOES_NOT_EXIST"),
        Command::set_variable("AGENT_DEVICE", "Local/200@default"),
        Command::set_variable("QUOTED", "value with spaces"),
        Command::get_variable("AGENT_DEVICE"),
        Command::get_variable("QUOTED"),
        Command::verbose("x", 1),
        Command::verbose("routing to queue sales", 1),
        Command::channel_status(),
        Command::new("DATABASE PUT")
            .arg("ref")
            .arg("key1")
            .arg("val1"),
        Command::new("DATABASE GET").arg("ref").arg("key1"),
        Command::new("DATABASE GET").arg("ref").arg("nokey"),
        Command::new("STREAM FILE").arg("ref-tone").arg(""),
        Command::new("STREAM FILE").arg("no-such-file").arg(""),
        Command::exec("Set", "FROMAGI=1"),
        Command::get_variable("FROMAGI"),
        Command::verbose("waiting for the caller to hang up", 1),
        Command::answer(),
        Command::verbose("still here", 1),
        Command::hangup(),
    ];
    let printed: Vec<String> = built.iter().map(encoded).collect();
    // Sent on purpose to provoke errors, or (the NoOp) to show how unquoted data is cut.
    let not_built = [
        "NONSENSE COMMAND\n",
        "GET VARIABLE\n",
        "EXEC NoOp hello from agi\n",
    ];
    let mut covered = 0;
    for session in Capture::all() {
        for sent in session.rows(TO_ASTERISK) {
            if not_built.contains(&sent) {
                continue;
            }
            assert!(
                printed.iter().any(|p| p == sent),
                "no builder prints {sent:?}"
            );
            covered += 1;
        }
    }
    assert_eq!(covered, 36, "39 commands sent, 3 not built");
    for (command, line) in built.iter().zip(&printed) {
        assert!(
            Capture::all()
                .iter()
                .any(|s| s.rows(TO_ASTERISK).any(|sent| sent == line)),
            "{line:?} is not in the capture"
        );
        // And res_agi reads back exactly the name and the arguments.
        let mut words: Vec<String> = command.name().split(' ').map(str::to_owned).collect();
        words.extend(command.args().map(str::to_owned));
        assert_eq!(read_back(line.as_bytes()), words);
    }
    // Data left unquoted loses all but its first word: why EXEC always quotes it.
    assert_eq!(
        read_back(b"EXEC NoOp hello from agi\n"),
        ["EXEC", "NoOp", "hello", "from", "agi"]
    );
    assert_eq!(
        read_back(
            &Command::exec("NoOp", "hello from agi")
                .encode()
                .expect("ok")
        ),
        ["EXEC", "NoOp", "hello from agi"]
    );
}

#[test]
fn queue_commands() {
    let cases = [
        (
            Command::exec("Dial", "PJSIP/1001,20,U(sub^arg)"),
            "EXEC Dial \"PJSIP/1001,20,U(sub^arg)\"\n",
        ),
        (
            Command::exec("Dial", "PJSIP/1001&PJSIP/1002,20,tU(check^lease 7^\"x\")"),
            "EXEC Dial \"PJSIP/1001&PJSIP/1002,20,tU(check^lease 7^\\\"x\\\")\"\n",
        ),
        (Command::ringing(), "EXEC Ringing\n"),
        (
            Command::music_on_hold("default"),
            "EXEC MusicOnHold \"default\"\n",
        ),
        (Command::music_on_hold(""), "EXEC MusicOnHold\n"),
        (
            Command::start_music_on_hold("sales queue"),
            "EXEC StartMusicOnHold \"sales queue\"\n",
        ),
        (Command::stop_music_on_hold(), "EXEC StopMusicOnHold\n"),
        (Command::answer(), "ANSWER\n"),
        (Command::hangup(), "HANGUP\n"),
        (Command::verbose("", 3), "VERBOSE \"\" 3\n"),
        (
            Command::set_variable("CALLFLEET_AGENT", "1001"),
            "SET VARIABLE CALLFLEET_AGENT 1001\n",
        ),
    ];
    for (command, line) in &cases {
        assert_eq!(encoded(command), *line);
        let mut words: Vec<String> = command.name().split(' ').map(str::to_owned).collect();
        words.extend(command.args().map(str::to_owned));
        assert_eq!(read_back(line.as_bytes()), words, "{line:?}");
    }
}

#[test]
fn arguments_are_quoted_when_res_agi_would_change_them() {
    // (value, how it is printed as a plain argument)
    let cases = [
        ("plain", "plain"),
        ("a,b|c^d", "a,b|c^d"),
        ("U(sub^arg1^arg2)", "U(sub^arg1^arg2)"),
        ("${CALLERID(num)}", "${CALLERID(num)}"),
        ("été", "été"),
        ("", "\"\""),
        ("with space", "\"with space\""),
        ("tab\there", "\"tab\there\""),
        ("say \"hi\"", "\"say \\\"hi\\\"\""),
        ("C:\\dir\\", "\"C:\\\\dir\\\\\""),
        ("\\", "\"\\\\\""),
        ("\"", "\"\\\"\""),
        ("a\"b", "\"a\\\"b\""),
        (" lead and trail ", "\" lead and trail \""),
        ("a, b | c ^ d", "\"a, b | c ^ d\""),
    ];
    for (value, printed) in cases {
        let command = Command::set_variable("X", value);
        assert_eq!(
            encoded(&command),
            format!("SET VARIABLE X {printed}\n"),
            "{value:?}"
        );
        assert_eq!(
            read_back(&command.encode().expect("ok")),
            ["SET", "VARIABLE", "X", value],
            "{value:?}"
        );
        let quoted = Command::new("VERBOSE").quoted_arg(value).arg("1");
        assert_eq!(
            read_back(&quoted.encode().expect("ok")),
            ["VERBOSE", value, "1"],
            "{value:?}"
        );
    }
}

#[test]
fn line_breaks_never_reach_the_wire() {
    for (value, what) in [
        ("1\nHANGUP", "a line feed"),
        ("x\n", "a line feed"),
        ("1\r", "a carriage return"),
        ("a\0b", "a NUL byte"),
    ] {
        let command = Command::new("SET VARIABLE").arg("X").arg(value);
        let mut out = b"ANSWER\n".to_vec();
        let err = command.encode_into(&mut out).expect_err("refused");
        assert_eq!(
            err,
            CommandError::ForbiddenByte {
                command: "SET VARIABLE",
                index: 2,
                what
            }
        );
        assert_eq!(out, b"ANSWER\n", "nothing written");
    }
    assert_eq!(
        Command::exec("Dial", "PJSIP/1\nHANGUP")
            .encode()
            .expect_err("refused")
            .to_string(),
        "argument 2 of `EXEC` contains a line feed, which cannot travel in an AGI command"
    );
}

#[test]
fn command_limits() {
    // The whole line, line feed included, may be 8191 bytes: what res_agi's fgets reads.
    let overhead = "SET VARIABLE X \n".len();
    let fits = Command::set_variable("X", "v".repeat(MAX_COMMAND_LINE - overhead));
    let mut out = Vec::new();
    assert_eq!(fits.encode_into(&mut out), Ok(MAX_COMMAND_LINE));
    assert_eq!(oracle::lines(&out).expect("lines").len(), 1);
    let long = Command::set_variable("X", "v".repeat(MAX_COMMAND_LINE - overhead + 1));
    let mut out = b"ANSWER\n".to_vec();
    assert_eq!(
        long.encode_into(&mut out),
        Err(CommandError::TooLong {
            command: "SET VARIABLE",
            len: MAX_COMMAND_LINE + 1,
            limit: MAX_COMMAND_LINE
        })
    );
    assert_eq!(out, b"ANSWER\n", "nothing written");
    // What it would have cost: res_agi reads the cut-off tail as a second command.
    let printed = format!(
        "SET VARIABLE X {}\n",
        "v".repeat(MAX_COMMAND_LINE - overhead + 1)
    );
    assert_eq!(oracle::lines(printed.as_bytes()).expect("lines").len(), 2);

    // Words: the name's plus the arguments', at most 127.
    let with_args = |n: usize| {
        (0..n).fold(Command::new("DATABASE PUT"), |c, i| {
            c.quoted_arg(i.to_string())
        })
    };
    let fits = with_args(MAX_COMMAND_WORDS - 2).encode().expect("fits");
    assert_eq!(read_back(&fits).len(), MAX_COMMAND_WORDS);
    assert_eq!(
        with_args(MAX_COMMAND_WORDS - 1).encode(),
        Err(CommandError::TooManyWords {
            command: "DATABASE PUT",
            words: MAX_COMMAND_WORDS + 1,
            limit: MAX_COMMAND_WORDS
        })
    );
}

#[test]
fn command_names_are_checked() {
    for name in [
        "",
        "get variable",
        "GET  VARIABLE",
        " ANSWER",
        "ANSWER ",
        "GET\nX",
        "FAILURE",
    ] {
        assert_eq!(
            Command::new(name).encode(),
            Err(CommandError::InvalidName(name)),
            "{name:?}"
        );
    }
    assert!(Command::new("SPEECH RECOGNIZE").encode().is_ok());
}

// ----- properties -----

/// Argument text: anything but the three refused bytes, weighted towards what res_agi and
/// dialplan applications treat specially.
fn argument() -> impl Strategy<Value = String> {
    prop_oneof![
        "[^\r\n\0]{0,24}",
        proptest::collection::vec(
            prop_oneof![
                Just(" "),
                Just("\t"),
                Just("\""),
                Just("\\"),
                Just(","),
                Just("|"),
                Just("^"),
                Just("("),
                Just(")"),
                Just("$"),
                Just("{"),
                Just("é"),
                Just("a"),
                Just("1"),
            ],
            0..16
        )
        .prop_map(|parts| parts.concat()),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    let key = "[a-z][a-z0-9]{0,7}";
    let value = prop_oneof!["[a-z0-9]{0,8}", "[a-z0-9 ]{0,8}"];
    let extras = proptest::collection::vec((key, value), 0..4);
    let result = "(-?[0-9]{1,6})?";
    let success = (
        result,
        prop_oneof![Just(None), "[ -~]{0,30}".prop_map(Some),],
    )
        .prop_map(|(result, data)| {
            Event::Reply(Reply::Success(Success {
                result,
                data,
                extras: Vec::new(),
            }))
        });
    let success_with_extras = (
        result,
        // Data without `)`: with extras after it, a `) ` in the data is ambiguous on the
        // wire, and Asterisk only sends fixed words there (`timeout`, `digit`).
        prop_oneof![Just(None), "[ -(*-~]{0,30}".prop_map(Some)],
        extras,
    )
        .prop_map(|(result, data, extras)| {
            Event::Reply(Reply::Success(Success {
                result,
                data,
                extras,
            }))
        });
    prop_oneof![
        Just(Event::Hangup),
        Just(Event::Reply(Reply::UnknownCommand)),
        Just(Event::Reply(Reply::DeadChannel)),
        Just(Event::Reply(Reply::BadSyntax { usage: None })),
        proptest::collection::vec("[a-zA-Z<>/ .]{0,40}", 1..5).prop_map(|lines| {
            Event::Reply(Reply::BadSyntax {
                usage: Some(lines.join("\n")),
            })
        }),
        success,
        success_with_extras,
        (100u16..1000, "[ -~]{0,30}")
            .prop_filter("not a known code", |(code, _)| {
                ![200, 510, 511, 520].contains(code)
            })
            .prop_map(|(code, text)| Event::Reply(Reply::Other { code, text })),
    ]
}

fn environment() -> impl Strategy<Value = Environment> {
    proptest::collection::vec(("agi_[a-z_0-9]{1,16}", "[^\n]{0,40}"), 0..30).prop_map(|fields| {
        Environment::new(
            [("agi_network".to_owned(), "yes".to_owned())]
                .into_iter()
                .chain(fields)
                .collect(),
        )
    })
}

/// A parser reduced to the bytes it used.
type UsedBytes = fn(&[u8]) -> Result<Option<usize>, ParseError>;

proptest! {
    #[test]
    fn printed_commands_read_back(
        name in prop_oneof![
            Just("SET VARIABLE"),
            Just("EXEC"),
            Just("VERBOSE"),
            Just("DATABASE PUT"),
        ],
        args in proptest::collection::vec((argument(), any::<bool>()), 0..8),
    ) {
        let command = args.iter().fold(Command::new(name), |c, (value, quote)| {
            if *quote { c.quoted_arg(value.clone()) } else { c.arg(value.clone()) }
        });
        let printed = command.encode().expect("printable");
        let mut expected: Vec<String> = name.split(' ').map(str::to_owned).collect();
        expected.extend(args.into_iter().map(|(value, _)| value));
        prop_assert_eq!(read_back(&printed), expected);
    }

    #[test]
    fn commands_with_any_bytes_never_smuggle_a_line(
        args in proptest::collection::vec(any::<String>(), 1..4),
    ) {
        let command = args.iter().fold(Command::new("SET VARIABLE"), |c, a| c.arg(a.clone()));
        match command.encode() {
            Ok(printed) => {
                prop_assert_eq!(oracle::lines(&printed).expect("no NUL").len(), 1);
                prop_assert_eq!(read_back(&printed).len(), 2 + args.len());
            }
            Err(err) => prop_assert!(
                matches!(err, CommandError::ForbiddenByte { .. }),
                "{err}"
            ),
        }
    }

    #[test]
    fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(Some((_, used))) = parse_environment(&bytes) {
            prop_assert!(used > 0 && used <= bytes.len());
        }
        if let Ok(Some((_, used))) = parse_event(&bytes) {
            prop_assert!(used > 0 && used <= bytes.len());
        }
    }

    #[test]
    fn parsers_never_panic_on_near_agi(
        parts in proptest::collection::vec(
            prop_oneof![
                Just(b"\n".to_vec()),
                Just(b"agi_".to_vec()),
                Just(b": ".to_vec()),
                Just(b"200 result=".to_vec()),
                Just(b"520-".to_vec()),
                Just(b"520 ".to_vec()),
                Just(b"HANGUP\n".to_vec()),
                Just(b" (".to_vec()),
                Just(b") ".to_vec()),
                Just(b"=\"".to_vec()),
                proptest::collection::vec(any::<u8>(), 0..8),
            ],
            0..64,
        )
    ) {
        let bytes = parts.concat();
        let parsers: [UsedBytes; 2] = [
            |b| parse_environment(b).map(|r| r.map(|(_, n)| n)),
            |b| parse_event(b).map(|r| r.map(|(_, n)| n)),
        ];
        for parse in parsers {
            if let Ok(Some(used)) = parse(&bytes) {
                prop_assert!(used > 0 && used <= bytes.len());
                prop_assert_eq!(parse(&bytes[..used - 1]), Ok(None));
            }
        }
    }

    #[test]
    fn sessions_round_trip_however_split(
        env in environment(),
        events in proptest::collection::vec(event(), 0..12),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
    ) {
        let mut stream = env.print();
        for event in &events {
            stream.extend(event.print());
        }
        let whole = read_stream(&stream);
        prop_assert_eq!(&whole.0, &env);
        prop_assert_eq!(&whole.1, &events);
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(read_in_pieces(&stream, &cuts), whole);
    }
}
