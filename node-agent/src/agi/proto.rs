//! Sans-IO parsing and printing of FastAGI, the protocol Asterisk's `res_agi` speaks over
//! TCP when the dialplan runs `AGI(agi://host:port/script?query,arg1,arg2…)`.
//!
//! A session has three parts, every line ended by a bare `\n` (res_agi never sends `\r`):
//!
//! 1. Asterisk connects and sends the **environment**: `agi_name: value` lines (channel,
//!    unique id, caller, context, extension, `agi_network_script`, then `agi_arg_1`…)
//!    closed by an empty line. [`parse_environment`] reads it.
//! 2. The server sends one **command** per line ([`Command`]); Asterisk answers each with a
//!    **reply**: `200 result=…`, `510` (unknown command), `511` (not permitted on a dead
//!    channel) or a multi-line `520-…`/`520 …` usage text. A command such as `EXEC Dial`
//!    blocks the session until the application returns.
//! 3. When the caller hangs up, Asterisk pushes a line `HANGUP` on its own — while the
//!    server is idle, or ahead of the reply to a command already sent — unless the dialplan
//!    set `AGISIGHUP=no`; it sends another when the session ends. [`parse_event`] reads
//!    replies and that line alike, as [`Event::Reply`] and [`Event::Hangup`].
//!
//! The parsers only look at bytes: `Ok(None)` means "need more bytes", `Err` means the peer
//! is not speaking AGI (or sends more than we buffer), and `Ok(Some((value, n)))` hands
//! back a value with the `n` bytes it used up. They are stateless: an I/O adapter keeps
//! the unread bytes and calls again once a read has added a line end.
//!
//! Printing follows how res_agi reads a command line (`parse_args` in `res/res_agi.c`):
//! words are split at blanks, `"` toggles quoting, `\` makes the next byte literal, and
//! the line ends at the first `\n`. [`Command::encode`] quotes every argument that needs it
//! and refuses bytes that would end the line early (so an argument can never smuggle in a
//! second command) or that Asterisk would misread.
//!
//! What the wire format cannot say, and this codec therefore cannot fix: Asterisk escapes
//! nothing it sends, so a variable value or caller name holding a line feed splits its
//! reply or environment line (the parsers then report the rest as malformed, they never
//! guess), and a `)` followed by a blank inside `(data)` is ambiguous when `key=value`
//! pairs follow (see [`Success`]). `EXEC` data is delivered to the application byte for
//! byte; how the application splits it (commas outside parentheses and quotes) is its own
//! business, one layer up.

use std::fmt::Write as _;

/// What every line of a FastAGI environment starts with; a peer whose first bytes differ
/// is refused at once.
const ENV_PREFIX: &[u8] = b"agi_";

/// The largest environment buffered: a real one is about 550 bytes plus the arguments.
pub const MAX_ENVIRONMENT: usize = 16 * 1024;

/// The most variable lines an environment may have (about 22 plus one per argument).
pub const MAX_ENVIRONMENT_LINES: usize = 256;

/// The largest reply buffered. Most are under 100 bytes; `GET VARIABLE` returns the whole
/// value on one line and usage texts run to a few kilobytes.
pub const MAX_REPLY: usize = 64 * 1024;

/// The most lines of a multi-line (`520-…`) reply.
pub const MAX_REPLY_LINES: usize = 256;

/// The longest command line, line feed included: res_agi reads a command with `fgets`
/// into an 8192-byte buffer, and a longer line would be cut there and its remainder read
/// as a second command.
pub const MAX_COMMAND_LINE: usize = 8191;

/// The most words (command words plus arguments) in one command line: res_agi keeps 128
/// argument slots, drops plain words past the 127th and overruns its array on a quoted one.
pub const MAX_COMMAND_WORDS: usize = 127;

/// What `agi_callerid` and `agi_calleridname` say when the channel has no valid number or
/// name.
const UNKNOWN: &str = "unknown";

/// Why bytes from Asterisk are not valid FastAGI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A line of the environment has no `agi_name: value` form, e.g. the connection comes
    /// from something other than Asterisk.
    #[error("expected an AGI environment line `agi_name: value`, got `{0}`")]
    NotAgi(String),
    /// A line where a reply was due is neither a reply nor `HANGUP`.
    #[error("expected an AGI reply (`200 result=…`, `5xx …` or `HANGUP`), got `{0}`")]
    MalformedReply(String),
    /// The peer sent more bytes than the bound without finishing the block or line.
    #[error("{what} longer than {limit} bytes")]
    TooLarge {
        /// `environment` or `reply`.
        what: &'static str,
        /// The bound that was exceeded.
        limit: usize,
    },
    /// The peer sent more lines than the bound without finishing the block.
    #[error("{what} has more than {limit} lines")]
    TooManyLines {
        /// `environment` or `reply`.
        what: &'static str,
        /// The bound that was exceeded.
        limit: usize,
    },
}

// ----- environment -----

/// The environment block Asterisk sends when a FastAGI session starts.
///
/// Every `agi_*` line is kept in order ([`Environment::fields`]); the ones the node-agent
/// routes on have accessors. Values are text: bytes that are not UTF-8 (a caller name in
/// Latin-1) are replaced rather than refused, so they cannot break a call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    fields: Vec<(String, String)>,
    args: Vec<String>,
    script: Option<Script>,
}

impl Environment {
    /// Builds an environment from `agi_name: value` fields in order, as Asterisk would
    /// send them.
    pub fn new(fields: Vec<(String, String)>) -> Self {
        let mut numbered: Vec<(usize, String)> = fields
            .iter()
            .filter_map(|(name, value)| {
                let n = name.strip_prefix("agi_arg_")?.parse::<usize>().ok()?;
                (n > 0).then(|| (n, value.clone()))
            })
            .collect();
        // Asterisk sends them in order; sorting keeps `args()` right if a proxy did not.
        numbered.sort_by_key(|(n, _)| *n);
        let script = fields
            .iter()
            .find(|(name, _)| name == "agi_network_script")
            .map(|(_, value)| Script::parse(value));
        Self {
            args: numbered.into_iter().map(|(_, value)| value).collect(),
            fields,
            script,
        }
    }

    /// Returns every field in the order it came, e.g. `("agi_channel", "PJSIP/1001-0001")`.
    pub fn fields(&self) -> &[(String, String)] {
        &self.fields
    }

    /// Returns the value of the first field named `name` (the whole name, `agi_` included).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Returns the script part of the AGI URL (`route?queue=sales` of
    /// `agi://host:4573/route?queue=sales`), split and percent-decoded; `None` when the URL
    /// has no script, in which case Asterisk sends no `agi_network_script` line.
    pub fn network_script(&self) -> Option<&Script> {
        self.script.as_ref()
    }

    /// Returns the full AGI URL the dialplan asked for (`agi_request`).
    pub fn request(&self) -> Option<&str> {
        self.get("agi_request")
    }

    /// Returns the channel name, e.g. `PJSIP/carrier-00000012` (`agi_channel`).
    pub fn channel(&self) -> Option<&str> {
        self.get("agi_channel")
    }

    /// Returns the channel's unique id (`agi_uniqueid`).
    pub fn uniqueid(&self) -> Option<&str> {
        self.get("agi_uniqueid")
    }

    /// Returns the caller's number (`agi_callerid`), or `None` when Asterisk has none and
    /// wrote `unknown`.
    pub fn callerid(&self) -> Option<&str> {
        self.get("agi_callerid").filter(|v| *v != UNKNOWN)
    }

    /// Returns the caller's name (`agi_calleridname`), or `None` when Asterisk has none
    /// and wrote `unknown`.
    pub fn calleridname(&self) -> Option<&str> {
        self.get("agi_calleridname").filter(|v| *v != UNKNOWN)
    }

    /// Returns the dialplan extension that ran `AGI()` (`agi_extension`).
    pub fn extension(&self) -> Option<&str> {
        self.get("agi_extension")
    }

    /// Returns the dialplan context that ran `AGI()` (`agi_context`).
    pub fn context(&self) -> Option<&str> {
        self.get("agi_context")
    }

    /// Returns the arguments after the URL in `AGI(url,arg1,arg2…)`, `agi_arg_1` first.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Prints the environment as Asterisk sends it, for tests and load generators playing
    /// Asterisk's side. Line feeds inside names or values become spaces.
    pub fn print(&self) -> Vec<u8> {
        let mut out = String::with_capacity(32 * self.fields.len() + 1);
        for (name, value) in &self.fields {
            push_line_safe(&mut out, name);
            out.push_str(": ");
            push_line_safe(&mut out, value);
            out.push('\n');
        }
        out.push('\n');
        out.into_bytes()
    }
}

/// The script part of a FastAGI URL: a path and query parameters, percent-decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Script {
    path: String,
    query: Vec<(String, String)>,
}

impl Script {
    /// Splits `path?name=value&…`, decoding `%XX` in both parts and `+` as a space in the
    /// query (as an HTML form would encode it). A malformed escape stays as written.
    pub fn parse(raw: &str) -> Self {
        let (path, query) = raw.split_once('?').unwrap_or((raw, ""));
        let query = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(name, true), percent_decode(value, true))
            })
            .collect();
        Self {
            path: percent_decode(path, false),
            query,
        }
    }

    /// Returns the decoded path, e.g. `route`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Returns the decoded query parameters in order.
    pub fn query(&self) -> &[(String, String)] {
        &self.query
    }

    /// Returns the value of the first query parameter named `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the environment block from the start of `buf` and returns it with the bytes
/// used, the closing empty line included.
///
/// Fails as soon as the first bytes cannot start an `agi_` line, so a connection from
/// something else (an HTTP client, a port scanner) is refused before it says more. Values
/// lose the one space Asterisk writes after the colon and keep everything else.
pub fn parse_environment(buf: &[u8]) -> Result<Option<(Environment, usize)>, ParseError> {
    let seen = buf.len().min(ENV_PREFIX.len());
    if buf[..seen] != ENV_PREFIX[..seen] {
        return Err(ParseError::NotAgi(excerpt(first_line(buf))));
    }
    let too_large = ParseError::TooLarge {
        what: "environment",
        limit: MAX_ENVIRONMENT,
    };
    let mut fields = Vec::new();
    let mut pos = 0;
    loop {
        let Some(newline) = find_newline(&buf[pos..]) else {
            // Checked against the whole buffer so that the verdict does not depend on how
            // the bytes were split into reads.
            return if buf.len() > MAX_ENVIRONMENT {
                Err(too_large)
            } else {
                Ok(None)
            };
        };
        let end = pos + newline + 1;
        if end > MAX_ENVIRONMENT {
            return Err(too_large);
        }
        let line = &buf[pos..end - 1];
        pos = end;
        if line.is_empty() {
            return Ok(Some((Environment::new(fields), pos)));
        }
        if fields.len() == MAX_ENVIRONMENT_LINES {
            return Err(ParseError::TooManyLines {
                what: "environment",
                limit: MAX_ENVIRONMENT_LINES,
            });
        }
        fields.push(parse_env_line(line)?);
    }
}

fn parse_env_line(line: &[u8]) -> Result<(String, String), ParseError> {
    let not_agi = || ParseError::NotAgi(excerpt(line));
    let colon = line.iter().position(|&b| b == b':').ok_or_else(not_agi)?;
    let name = &line[..colon];
    let valid_name = name.len() > ENV_PREFIX.len()
        && name.starts_with(ENV_PREFIX)
        && name[ENV_PREFIX.len()..]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid_name {
        return Err(not_agi());
    }
    let value = &line[colon + 1..];
    let value = value.strip_prefix(b" ").unwrap_or(value);
    Ok((
        String::from_utf8_lossy(name).into_owned(),
        String::from_utf8_lossy(value).into_owned(),
    ))
}

// ----- replies -----

/// What Asterisk sends after the environment: a reply to a command, or the line it
/// pushes when the channel hangs up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The answer to the oldest command not yet answered.
    Reply(Reply),
    /// `HANGUP`: the channel is gone (or the session ends). Not a reply: the answer to a
    /// command already sent still follows.
    Hangup,
}

impl Event {
    /// Prints the event as Asterisk sends it, for tests and load generators playing
    /// Asterisk's side.
    pub fn print(&self) -> Vec<u8> {
        match self {
            Event::Hangup => b"HANGUP\n".to_vec(),
            Event::Reply(reply) => reply.print(),
        }
    }
}

/// Asterisk's answer to one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `200 result=…`: the command ran; what it returned.
    Success(Success),
    /// `510 Invalid or unknown command`.
    UnknownCommand,
    /// `511 Command Not Permitted on a dead channel or intercept routine`: the caller hung
    /// up, and only commands that do not touch the channel still run.
    DeadChannel,
    /// `520`: the command's arguments do not fit its syntax. `usage` is the text between
    /// `520-Invalid command syntax.  Proper usage follows:` and `520 End of proper usage.`,
    /// `None` when Asterisk has none (`520 Invalid command syntax.  Proper usage not
    /// available.`).
    BadSyntax {
        /// The usage lines joined with `\n`.
        usage: Option<String>,
    },
    /// Any other status code, which this Asterisk does not send; `text` is the rest of the
    /// line, or of every line joined with `\n` for a multi-line reply.
    Other {
        /// The three-digit code.
        code: u16,
        /// What followed the code.
        text: String,
    },
}

impl Reply {
    /// Returns the `200` part of a successful reply.
    pub fn success(&self) -> Option<&Success> {
        match self {
            Reply::Success(success) => Some(success),
            _ => None,
        }
    }

    /// Prints the reply as Asterisk sends it. Line feeds inside values become spaces
    /// (except between the lines of a multi-line text).
    pub fn print(&self) -> Vec<u8> {
        let mut out = String::new();
        match self {
            Reply::Success(success) => {
                out.push_str("200 result=");
                push_line_safe(&mut out, &success.result);
                if let Some(data) = &success.data {
                    out.push_str(" (");
                    push_line_safe(&mut out, data);
                    out.push(')');
                }
                for (key, value) in &success.extras {
                    out.push(' ');
                    push_line_safe(&mut out, key);
                    // Quoted when a bare value would read differently: a blank would split
                    // it, and a final `)` would be taken for the end of the data.
                    if value.contains(' ') || value.ends_with(')') {
                        out.push_str("=\"");
                        push_line_safe(&mut out, value);
                        out.push('"');
                    } else if !value.is_empty() || key.is_empty() {
                        out.push('=');
                        push_line_safe(&mut out, value);
                    }
                }
                out.push('\n');
            }
            Reply::UnknownCommand => out.push_str("510 Invalid or unknown command\n"),
            Reply::DeadChannel => {
                out.push_str("511 Command Not Permitted on a dead channel or intercept routine\n");
            }
            Reply::BadSyntax { usage: None } => {
                out.push_str("520 Invalid command syntax.  Proper usage not available.\n");
            }
            Reply::BadSyntax { usage: Some(usage) } => {
                out.push_str("520-Invalid command syntax.  Proper usage follows:\n");
                out.push_str(usage);
                out.push_str("\n520 End of proper usage.\n");
            }
            Reply::Other { code, text } => {
                let lines: Vec<&str> = text.split('\n').collect();
                for (i, line) in lines.iter().enumerate() {
                    if i == 0 {
                        let sep = if lines.len() > 1 { '-' } else { ' ' };
                        let _ = write!(out, "{code:03}{sep}");
                    } else if i == lines.len() - 1 {
                        let _ = write!(out, "{code:03} ");
                    }
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out.into_bytes()
    }
}

/// A `200 result=<value> [(<data>)] [key=value…]` reply.
///
/// The data is free text that Asterisk does not escape (a variable's value may hold
/// parentheses and blanks). When the line ends with `)`, the data runs from the first `(`
/// to that last `)`, which reads every `GET VARIABLE` answer right; otherwise it ends at the
/// first `) ` and `key=value` pairs follow, as in `(timeout) endpos=1200`, where Asterisk
/// only ever puts a fixed word in the parentheses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Success {
    /// The value after `result=` as written: usually a number (`1`, `0`, `-1`), but the
    /// digits a caller typed for `GET DATA` (`0042`, or nothing).
    pub result: String,
    /// The text in parentheses: a variable's value, or a reason such as `timeout`.
    pub data: Option<String>,
    /// The `key=value` pairs after it, e.g. `endpos=8000`; a bare word has an empty value.
    pub extras: Vec<(String, String)>,
}

impl Success {
    /// Returns the result as a number, or `None` when it is not one (`GET DATA` digits
    /// such as `*1` or nothing).
    pub fn result_int(&self) -> Option<i64> {
        self.result.parse().ok()
    }

    /// Returns the value of the first extra named `key`.
    pub fn extra(&self, key: &str) -> Option<&str> {
        self.extras
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Returns `endpos`, the sample offset where playback stopped.
    pub fn endpos(&self) -> Option<i64> {
        self.extra("endpos")?.parse().ok()
    }
}

/// Parses one reply or `HANGUP` line from the start of `buf` and returns it with the bytes
/// used.
///
/// A reply is one line, except a code followed by `-` (`520-…`), which goes on until a
/// line that starts with the same code and a space. Lines end at `\n` only; an empty line
/// is not a reply and is an error.
pub fn parse_event(buf: &[u8]) -> Result<Option<(Event, usize)>, ParseError> {
    let too_large = ParseError::TooLarge {
        what: "reply",
        limit: MAX_REPLY,
    };
    let incomplete = |buf: &[u8]| {
        if buf.len() > MAX_REPLY {
            Err(too_large.clone())
        } else {
            Ok(None)
        }
    };
    let Some(newline) = find_newline(buf) else {
        return incomplete(buf);
    };
    if newline + 1 > MAX_REPLY {
        return Err(too_large);
    }
    let line = &buf[..newline];
    if line == b"HANGUP" {
        return Ok(Some((Event::Hangup, newline + 1)));
    }
    let malformed = || ParseError::MalformedReply(excerpt(line));
    let (code, continued, text) = status_line(line).ok_or_else(malformed)?;
    if !continued {
        let reply = single_line_reply(code, &text).ok_or_else(malformed)?;
        return Ok(Some((Event::Reply(reply), newline + 1)));
    }
    let mut body: Vec<String> = Vec::new();
    let mut pos = newline + 1;
    let mut lines = 1;
    loop {
        let Some(newline) = find_newline(&buf[pos..]) else {
            return incomplete(buf);
        };
        let end = pos + newline + 1;
        if end > MAX_REPLY {
            return Err(too_large);
        }
        lines += 1;
        if lines > MAX_REPLY_LINES {
            return Err(ParseError::TooManyLines {
                what: "reply",
                limit: MAX_REPLY_LINES,
            });
        }
        let line = &buf[pos..end - 1];
        pos = end;
        if let Some((last_code, false, last)) = status_line(line)
            && last_code == code
        {
            let reply = if code == 520 {
                Reply::BadSyntax {
                    usage: Some(body.join("\n")),
                }
            } else {
                let mut all = text;
                for line in body.iter().map(String::as_str).chain([last.as_str()]) {
                    all.push('\n');
                    all.push_str(line);
                }
                Reply::Other { code, text: all }
            };
            return Ok(Some((Event::Reply(reply), pos)));
        }
        body.push(String::from_utf8_lossy(line).into_owned());
    }
}

/// Splits `NNN text` or `NNN-text` into the code, whether it is continued, and the text.
fn status_line(line: &[u8]) -> Option<(u16, bool, String)> {
    let [a, b, c, sep, rest @ ..] = line else {
        return None;
    };
    if ![a, b, c].iter().all(|d| d.is_ascii_digit()) {
        return None;
    }
    let continued = match sep {
        b' ' => false,
        b'-' => true,
        _ => return None,
    };
    let code = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
    Some((code, continued, String::from_utf8_lossy(rest).into_owned()))
}

fn single_line_reply(code: u16, text: &str) -> Option<Reply> {
    Some(match code {
        200 => Reply::Success(parse_success(text)?),
        510 => Reply::UnknownCommand,
        511 => Reply::DeadChannel,
        520 => Reply::BadSyntax { usage: None },
        _ => Reply::Other {
            code,
            text: text.to_owned(),
        },
    })
}

/// Reads `result=<value> [(<data>)] [key=value…]` as [`Success`] describes.
fn parse_success(text: &str) -> Option<Success> {
    let rest = text.strip_prefix("result=")?;
    let (result, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let (data, rest) = match rest.strip_prefix('(') {
        None => (None, rest),
        Some(inner) => {
            if let Some(data) = inner.strip_suffix(')') {
                (Some(data), "")
            } else {
                let close = inner.find(") ")?;
                (Some(&inner[..close]), &inner[close + 2..])
            }
        }
    };
    Some(Success {
        result: result.to_owned(),
        data: data.map(str::to_owned),
        extras: parse_extras(rest),
    })
}

/// Splits `key=value key2="quoted value" word` into pairs.
fn parse_extras(mut rest: &str) -> Vec<(String, String)> {
    let mut extras = Vec::new();
    loop {
        rest = rest.trim_start_matches(' ');
        if rest.is_empty() {
            return extras;
        }
        let key_end = rest.find(['=', ' ']).unwrap_or(rest.len());
        let key = &rest[..key_end];
        rest = &rest[key_end..];
        let value = match rest.strip_prefix('=') {
            None => "",
            Some(after) => {
                if let Some(quoted) = after.strip_prefix('"') {
                    let close = quoted.find('"').unwrap_or(quoted.len());
                    rest = quoted.get(close + 1..).unwrap_or("");
                    &quoted[..close]
                } else {
                    let end = after.find(' ').unwrap_or(after.len());
                    rest = &after[end..];
                    &after[..end]
                }
            }
        };
        extras.push((key.to_owned(), value.to_owned()));
    }
}

// ----- commands -----

/// Why a command cannot be sent as one AGI line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// An argument holds a byte res_agi would not read back as part of it: a line feed
    /// (it would end the command and start another), a carriage return or a NUL.
    #[error(
        "argument {index} of `{command}` contains {what}, which cannot travel in an AGI command"
    )]
    ForbiddenByte {
        /// The command's name, e.g. `SET VARIABLE`.
        command: &'static str,
        /// The argument's position, from 1.
        index: usize,
        /// `a line feed`, `a carriage return` or `a NUL byte`.
        what: &'static str,
    },
    /// The command name is not uppercase words separated by single spaces.
    #[error("`{0}` is not an AGI command name")]
    InvalidName(&'static str),
    /// The command has more words than res_agi keeps.
    #[error("`{command}` has {words} words; res_agi reads at most {limit}")]
    TooManyWords {
        /// The command's name.
        command: &'static str,
        /// Command words plus arguments.
        words: usize,
        /// [`MAX_COMMAND_WORDS`].
        limit: usize,
    },
    /// The printed line is longer than res_agi reads at once.
    #[error("`{command}` is {len} bytes long; res_agi reads at most {limit} per line")]
    TooLong {
        /// The command's name.
        command: &'static str,
        /// The printed length, line feed included.
        len: usize,
        /// [`MAX_COMMAND_LINE`].
        limit: usize,
    },
}

/// One AGI command: its name (`GET VARIABLE`) and its arguments, printed by
/// [`Command::encode`].
///
/// Constructors never fail; whether the arguments can travel is checked when the command
/// is encoded, in one place, so nothing reaches the wire unchecked.
///
/// ```
/// use callfleet_node_agent::agi::proto::Command;
///
/// let dial = Command::exec("Dial", "PJSIP/1001,20,U(sub^arg)");
/// assert_eq!(dial.encode().unwrap(), b"EXEC Dial \"PJSIP/1001,20,U(sub^arg)\"\n");
/// let set = Command::set_variable("AGENT_DEVICE", "Local/200@default");
/// assert_eq!(set.encode().unwrap(), b"SET VARIABLE AGENT_DEVICE Local/200@default\n");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    name: &'static str,
    args: Vec<Arg>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Arg {
    value: String,
    /// Quoted even when it would read the same without, as free text conventionally is
    /// (`VERBOSE "x" 1`, `EXEC Set "A=1"`).
    always_quote: bool,
}

impl Command {
    /// Starts a command named `name` (`DATABASE GET`), without arguments.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            args: Vec::new(),
        }
    }

    /// Adds an argument, quoted only if res_agi would otherwise split or change it.
    #[must_use]
    pub fn arg(mut self, value: impl Into<String>) -> Self {
        self.args.push(Arg {
            value: value.into(),
            always_quote: false,
        });
        self
    }

    /// Adds an argument that is always written in quotes.
    #[must_use]
    pub fn quoted_arg(mut self, value: impl Into<String>) -> Self {
        self.args.push(Arg {
            value: value.into(),
            always_quote: true,
        });
        self
    }

    /// `ANSWER`: answers the channel.
    pub fn answer() -> Self {
        Self::new("ANSWER")
    }

    /// `HANGUP`: hangs up the session's own channel.
    pub fn hangup() -> Self {
        Self::new("HANGUP")
    }

    /// `CHANNEL STATUS`: the channel's state (6 = up).
    pub fn channel_status() -> Self {
        Self::new("CHANNEL STATUS")
    }

    /// `GET VARIABLE name`: answers `200 result=1 (value)`, or `200 result=0` when unset.
    /// `name` may be a function such as `CALLERID(num)`.
    pub fn get_variable(name: impl Into<String>) -> Self {
        Self::new("GET VARIABLE").arg(name)
    }

    /// `GET FULL VARIABLE expression`: evaluates `${…}` expressions, e.g.
    /// `${CALLERID(all)}`.
    pub fn get_full_variable(expression: impl Into<String>) -> Self {
        Self::new("GET FULL VARIABLE").arg(expression)
    }

    /// `SET VARIABLE name value`.
    pub fn set_variable(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self::new("SET VARIABLE").arg(name).arg(value)
    }

    /// `VERBOSE "message" level`: a line in Asterisk's log at verbosity `level` (1–4).
    pub fn verbose(message: impl Into<String>, level: u8) -> Self {
        Self::new("VERBOSE")
            .quoted_arg(message)
            .arg(level.to_string())
    }

    /// `EXEC app "data"`: runs a dialplan application and blocks the session until it
    /// returns. `data` is the application's whole argument string, delivered to it byte for
    /// byte (`PJSIP/1001,20,U(sub^arg)`); the application then splits it by its own rules
    /// (commas outside parentheses and quotes), which are not AGI's. Empty `data` is left
    /// out.
    pub fn exec(app: impl Into<String>, data: impl Into<String>) -> Self {
        let data = data.into();
        let command = Self::new("EXEC").arg(app);
        if data.is_empty() {
            command
        } else {
            command.quoted_arg(data)
        }
    }

    /// `EXEC Ringing`: signals ringing to the caller and returns at once.
    pub fn ringing() -> Self {
        Self::exec("Ringing", "")
    }

    /// `EXEC MusicOnHold "class"`: plays hold music and blocks the session until the
    /// caller hangs up. [`Command::start_music_on_hold`] plays it without blocking.
    pub fn music_on_hold(class: impl Into<String>) -> Self {
        Self::exec("MusicOnHold", class)
    }

    /// `EXEC StartMusicOnHold "class"`: starts hold music and returns at once, so the
    /// session can go on sending commands while the caller listens.
    pub fn start_music_on_hold(class: impl Into<String>) -> Self {
        Self::exec("StartMusicOnHold", class)
    }

    /// `EXEC StopMusicOnHold`.
    pub fn stop_music_on_hold() -> Self {
        Self::exec("StopMusicOnHold", "")
    }

    /// Returns the command's name, e.g. `SET VARIABLE`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Returns the arguments as res_agi will read them.
    pub fn args(&self) -> impl Iterator<Item = &str> {
        self.args.iter().map(|arg| arg.value.as_str())
    }

    /// Prints the command line, line feed included.
    pub fn encode(&self) -> Result<Vec<u8>, CommandError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Appends the command line to `out` and returns its length; on error `out` is left as
    /// it was.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<usize, CommandError> {
        self.check()?;
        let start = out.len();
        out.extend_from_slice(self.name.as_bytes());
        for arg in &self.args {
            out.push(b' ');
            push_arg(out, &arg.value, arg.always_quote);
        }
        out.push(b'\n');
        let len = out.len() - start;
        if len > MAX_COMMAND_LINE {
            out.truncate(start);
            return Err(CommandError::TooLong {
                command: self.name,
                len,
                limit: MAX_COMMAND_LINE,
            });
        }
        Ok(len)
    }

    fn check(&self) -> Result<(), CommandError> {
        let name = self.name;
        let valid_name = !name.is_empty()
            && name
                .split(' ')
                .all(|word| !word.is_empty() && word.bytes().all(|b| b.is_ascii_uppercase()))
            // res_agi ends the whole session on a line starting with `failure`, any case.
            && !name.starts_with("FAILURE");
        if !valid_name {
            return Err(CommandError::InvalidName(name));
        }
        let words = name.split(' ').count() + self.args.len();
        if words > MAX_COMMAND_WORDS {
            return Err(CommandError::TooManyWords {
                command: name,
                words,
                limit: MAX_COMMAND_WORDS,
            });
        }
        for (i, arg) in self.args.iter().enumerate() {
            let what = arg.value.bytes().find_map(|b| match b {
                b'\n' => Some("a line feed"),
                b'\r' => Some("a carriage return"),
                // res_agi measures the line with strlen: a NUL would cut it short.
                0 => Some("a NUL byte"),
                _ => None,
            });
            if let Some(what) = what {
                return Err(CommandError::ForbiddenByte {
                    command: name,
                    index: i + 1,
                    what,
                });
            }
        }
        Ok(())
    }
}

/// Writes one argument so that res_agi reads it back unchanged: bare when it has no blank,
/// quote or backslash (and is not empty), else in double quotes with `"` and `\` escaped.
fn push_arg(out: &mut Vec<u8>, value: &str, always_quote: bool) {
    let needs_quotes = always_quote
        || value.is_empty()
        || value
            .bytes()
            .any(|b| matches!(b, b' ' | b'\t' | b'"' | b'\\'));
    if !needs_quotes {
        out.extend_from_slice(value.as_bytes());
        return;
    }
    out.push(b'"');
    for b in value.bytes() {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

// ----- helpers -----

/// Decodes `%XX` escapes (and `+` as a space when `plus_is_space`); bytes that do not
/// form UTF-8 after decoding are replaced.
fn percent_decode(text: &str, plus_is_space: bool) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push((high << 4) | low);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

fn push_line_safe(out: &mut String, text: &str) {
    out.extend(text.chars().map(|c| if c == '\n' { ' ' } else { c }));
}

fn find_newline(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

fn first_line(buf: &[u8]) -> &[u8] {
    &buf[..find_newline(buf).unwrap_or(buf.len())]
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
