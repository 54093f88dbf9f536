//! Asterisk realtime over `res_config_curl`: what Asterisk asks and what it accepts back,
//! as bytes, with no I/O (the control plane serves it, the node-agent caches it).
//!
//! Asterisk sends `POST <url>/<operation>` with a form body (or, for `static`, a `GET`
//! with `?file=`), percent-encoding with `%20`, never `+`. A field's name may carry an
//! operator after a space (`name LIKE`, `uniqueid >`). `update` names its row in the query
//! (`update?agent_id=200`). Asterisk reads every answer with status 200: a row is one line
//! of `name=value` pairs joined by `&`, several rows are several lines, no row is an empty
//! body, and a write answers the number of rows it changed, `-1` for a failure. A
//! transport error or another status reads to Asterisk exactly like "no such row", which is
//! why the node-agent must never pass one on (see `fixtures/asterisk/res-config-curl-requests.txt`).

use std::fmt::Write as _;

/// What Asterisk asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// One row matching every condition.
    Single,
    /// Every row matching every condition.
    Multi,
    /// Insert a row.
    Store,
    /// Change the row named in the query.
    Update,
    /// Change rows matching lookup conditions (`update2`).
    Update2,
    /// Delete rows matching every condition.
    Destroy,
    /// Whether the table has these columns (`name=type:size`); answered with `0`.
    Require,
    /// A whole static configuration file (`GET …/static?file=NAME`).
    Static,
}

impl Operation {
    fn from_path(name: &str) -> Option<Self> {
        Some(match name {
            "single" => Self::Single,
            "multi" => Self::Multi,
            "store" => Self::Store,
            "update" => Self::Update,
            "update2" => Self::Update2,
            "destroy" => Self::Destroy,
            "require" => Self::Require,
            "static" => Self::Static,
            _ => return None,
        })
    }

    /// Whether the operation writes.
    pub fn writes(self) -> bool {
        matches!(
            self,
            Self::Store | Self::Update | Self::Update2 | Self::Destroy
        )
    }
}

/// One field of a request: a column, the operator Asterisk put after it (`LIKE`, `>`, …;
/// `None` for equality or a value to write) and the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The column.
    pub name: String,
    /// The comparison, if any.
    pub operator: Option<String>,
    /// The value, decoded.
    pub value: String,
}

/// A request from `res_config_curl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The path before the operation (`/provision/ps_endpoints`): which table.
    pub family: String,
    /// What is asked.
    pub operation: Operation,
    /// The query's fields: the row an `update` changes, the file `static` reads.
    pub query: Vec<Field>,
    /// The body's fields: conditions, or values to write.
    pub fields: Vec<Field>,
}

/// Why a request is not one `res_config_curl` sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RealtimeError {
    /// The path does not end in a known operation.
    #[error(
        "`{0}` does not end in a res_config_curl operation (single, multi, store, update, update2, destroy, require, static)"
    )]
    Operation(String),
    /// A `%` not followed by two hex digits, or a body that is not UTF-8.
    #[error("`{0}` is not valid percent-encoding")]
    Encoding(String),
}

/// Reads a request from its path with query (`/provision/agents/update?agent_id=200`) and
/// its body.
pub fn parse_request(target: &str, body: &[u8]) -> Result<Request, RealtimeError> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (family, operation) = path
        .rsplit_once('/')
        .ok_or_else(|| RealtimeError::Operation(path.to_owned()))?;
    let operation =
        Operation::from_path(operation).ok_or_else(|| RealtimeError::Operation(path.to_owned()))?;
    let body = std::str::from_utf8(body)
        .map_err(|_| RealtimeError::Encoding(String::from_utf8_lossy(body).into_owned()))?;
    Ok(Request {
        family: family.to_owned(),
        operation,
        query: parse_fields(query)?,
        fields: parse_fields(body)?,
    })
}

/// `name[%20op]=value` pairs joined by `&`; empty pairs (a trailing `&`) are skipped.
fn parse_fields(form: &str) -> Result<Vec<Field>, RealtimeError> {
    let mut fields = Vec::new();
    for pair in form.trim_end_matches(['\r', '\n']).split('&') {
        if pair.is_empty() {
            continue;
        }
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name)?;
        let (name, operator) = match name.split_once(' ') {
            Some((name, operator)) => (name.to_owned(), Some(operator.trim().to_owned())),
            None => (name, None),
        };
        fields.push(Field {
            name,
            operator,
            value: decode(value)?,
        });
    }
    Ok(fields)
}

/// Percent-decoding as Asterisk encodes: `%XX` only; `+` is a plus sign.
fn decode(text: &str) -> Result<String, RealtimeError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| RealtimeError::Encoding(text.to_owned()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    // Asterisk cuts long values at a byte limit, in the middle of a UTF-8 sequence if it
    // falls there (the capture's `f5=…%C3`): keep what is whole, mark the cut.
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Percent-encodes everything but unreserved characters, so a value never breaks a line,
/// a pair or a name (spaces are `%20`).
fn encode(text: &str, out: &mut String) {
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
}

/// One row as Asterisk reads it: `name=value&…`, one line.
pub fn print_row<'a>(row: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (i, (name, value)) in row.into_iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode(name, &mut out);
        out.push('=');
        encode(value, &mut out);
    }
    out.push('\n');
    out
}

/// The answer to a write: the rows it changed, or `-1` when it failed.
pub fn print_count(changed: Option<u64>) -> String {
    match changed {
        Some(rows) => format!("{rows}\n"),
        None => "-1\n".to_owned(),
    }
}

/// One row: its columns and values in the order they were written.
pub type Row = Vec<(String, String)>;

/// Reads an answer of rows (`name=value&…`, one per line) back into rows, as Asterisk
/// does; a line that is not valid percent-encoding is an error.
pub fn parse_rows(body: &str) -> Result<Vec<Row>, RealtimeError> {
    body.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            Ok(parse_fields(line)?
                .into_iter()
                .map(|field| (field.name, field.value))
                .collect())
        })
        .collect()
}

/// The value of `column` in `row`.
pub fn value<'a>(row: &'a [(String, String)], column: &str) -> Option<&'a str> {
    row.iter()
        .find(|(name, _)| name == column)
        .map(|(_, value)| value.as_str())
}

/// Whether `row` meets every condition, read as a SQL backend of Asterisk reads them: no
/// operator is equality, `LIKE` takes `%` (any run) and `_` (one character), `!=`, `<`,
/// `<=`, `>`, `>=` compare numerically when both sides are integers and as text otherwise.
/// A column the row lacks meets no condition (SQL's NULL). An operator Asterisk never sends
/// meets nothing rather than everything, so an unknown filter can only hide rows.
pub fn matches(row: &[(String, String)], conditions: &[Field]) -> bool {
    conditions.iter().all(|condition| {
        let Some(have) = value(row, &condition.name) else {
            return false;
        };
        let want = condition.value.as_str();
        let ordering = || match (have.trim().parse::<i64>(), want.trim().parse::<i64>()) {
            (Ok(have), Ok(want)) => have.cmp(&want),
            _ => have.cmp(want),
        };
        match condition
            .operator
            .as_deref()
            .map(str::to_ascii_uppercase)
            .as_deref()
        {
            None | Some("=") => have == want,
            Some("LIKE") => like(have.as_bytes(), want.as_bytes()),
            Some("!=") | Some("<>") => have != want,
            Some("<") => ordering().is_lt(),
            Some("<=") => ordering().is_le(),
            Some(">") => ordering().is_gt(),
            Some(">=") => ordering().is_ge(),
            Some(_) => false,
        }
    })
}

/// SQL `LIKE` on bytes, case-sensitive (the directory's ids are compared byte for byte).
fn like(text: &[u8], pattern: &[u8]) -> bool {
    // Iterative with one backtrack point: linear in practice, never exponential, whatever
    // number of `%` a request carries.
    let (mut t, mut p) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'%') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'_' || c == text[t] => {
                t += 1;
                p += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    p = star_p + 1;
                    t = star_t + 1;
                    star = Some((star_p, star_t + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'%')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request of the capture: (path with query, body), and the response body.
    fn captured() -> Vec<(String, String, String)> {
        let capture = include_str!("../../fixtures/asterisk/res-config-curl-requests.txt");
        let mut exchanges = Vec::new();
        for block in capture.split("\n>>> REQUEST (").skip(1) {
            let (request, response) = block.split_once("<<< RESPONSE").expect("a response");
            let request = request.split_once('\n').expect("marker line").1;
            let line = request.lines().next().expect("a request line");
            let target = line.split(' ').nth(1).expect("a target").to_owned();
            let body = request
                .split_once("\r\n\r\n")
                .map_or("", |(_, body)| body)
                .to_owned();
            let response = response
                .split_once("\r\n\r\n")
                .map_or("", |(_, body)| body)
                .split("=====")
                .next()
                .unwrap_or("")
                .split("\n#")
                .next()
                .unwrap_or("")
                .to_owned();
            exchanges.push((target, body, response));
        }
        exchanges
    }

    fn field(name: &str, operator: Option<&str>, value: &str) -> Field {
        Field {
            name: name.into(),
            operator: operator.map(Into::into),
            value: value.into(),
        }
    }

    fn row(pairs: &[(&str, &str)]) -> Row {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn conditions_match_as_a_sql_backend_reads_them() {
        let contact = row(&[
            ("id", "2001;@0f1e2d"),
            ("uri", "sip:2001@127.0.0.1:5071"),
            ("expiration_time", "1764000000"),
        ]);
        let holds = |name: &str, operator: Option<&str>, value: &str| {
            matches(&contact, &[field(name, operator, value)])
        };
        // What sorcery's realtime wizard sends: by id, by prefix, everything, and the
        // registrar's sweep of expired contacts.
        assert!(holds("id", None, "2001;@0f1e2d"));
        assert!(!holds("id", None, "2001"));
        assert!(holds("id", Some("LIKE"), "2001;@%"));
        assert!(!holds("id", Some("LIKE"), "200;@%"));
        assert!(holds("id", Some("LIKE"), "%"));
        assert!(holds("id", Some("LIKE"), "%;@%"));
        assert!(holds("id", Some("LIKE"), "2001;@0f1e2_"));
        assert!(!holds("id", Some("LIKE"), "2001;@0f1e2"));
        assert!(holds("expiration_time", Some("<="), "1764000000"));
        assert!(!holds("expiration_time", Some("<"), "1764000000"));
        // Numbers compare as numbers, not as text ("999" > "1764000000" as text).
        assert!(holds("expiration_time", Some(">"), "999"));
        assert!(holds("uri", Some("!="), "sip:other"));
        assert!(!holds("missing", Some("LIKE"), "%"));
        assert!(!holds("id", Some("REGEXP"), ".*"));
        assert!(matches(&contact, &[]));
        assert!(!like(b"a", b""));
        assert!(like(b"", b"%%"));
        assert!(like(
            &[b'a'; 64],
            &[b'%', b'a', b'%', b'a', b'%', b'b'][..5]
        ));
    }

    #[test]
    fn printed_rows_read_back() {
        let printed = [
            print_row([("id", "2001"), ("callerid", "Desk <2001>")]),
            print_row([("id", "2002"), ("callerid", "")]),
        ]
        .concat();
        assert_eq!(
            parse_rows(&printed).expect("reads"),
            [
                row(&[("id", "2001"), ("callerid", "Desk <2001>")]),
                row(&[("id", "2002"), ("callerid", "")])
            ]
        );
        assert_eq!(parse_rows("").expect("reads"), Vec::<Row>::new());
    }

    #[test]
    fn every_captured_request_parses() {
        let exchanges = captured();
        assert_eq!(exchanges.len(), 66, "requests in the capture");
        let mut operations = std::collections::BTreeMap::new();
        for (target, body, _) in &exchanges {
            let parsed = parse_request(target, body.as_bytes());
            let Ok(request) = parsed else {
                panic!("{target} {body:?}: {parsed:?}");
            };
            *operations
                .entry(format!("{:?}", request.operation))
                .or_insert(0) += 1;
        }
        let expected: std::collections::BTreeMap<String, i32> = [
            ("Destroy", 3),
            ("Multi", 20),
            ("Require", 1),
            ("Single", 25),
            ("Static", 2),
            ("Store", 9),
            ("Update", 6),
        ]
        .into_iter()
        .map(|(name, count)| (name.to_owned(), count))
        .collect();
        assert_eq!(operations, expected);
    }

    #[test]
    fn conditions_writes_and_the_update_key_come_apart_as_asterisk_meant_them() {
        let multi = parse_request(
            "/provision/queue_members/multi",
            b"interface%20LIKE=%25&queue_name%20LIKE=%25",
        )
        .expect("parses");
        assert_eq!(multi.family, "/provision/queue_members");
        assert_eq!(multi.operation, Operation::Multi);
        assert_eq!(
            multi.fields,
            [
                field("interface", Some("LIKE"), "%"),
                field("queue_name", Some("LIKE"), "%")
            ]
        );

        let store = parse_request(
            "/provision/agents/store",
            b"agent_id=201&status=idle%20with%20space%26amp&device=Local%2F201%40default",
        )
        .expect("parses");
        assert!(store.operation.writes());
        assert_eq!(
            store.fields[1],
            field("status", None, "idle with space&amp")
        );
        assert_eq!(store.fields[2], field("device", None, "Local/201@default"));

        let update =
            parse_request("/provision/agents/update?agent_id=200", b"status=busy").expect("parses");
        assert_eq!(update.query, [field("agent_id", None, "200")]);
        assert_eq!(update.fields, [field("status", None, "busy")]);

        // Asterisk ends a destroy's body with `&`.
        let destroy = parse_request("/provision/agents/destroy", b"agent_id=201&").expect("parses");
        assert_eq!(destroy.fields, [field("agent_id", None, "201")]);

        let require = parse_request(
            "/provision/queue_members/require",
            b"paused=integer1%3A1&uniqueid=uinteger2%3A5&reason_paused=char%3A80",
        )
        .expect("parses");
        assert_eq!(require.fields[1], field("uniqueid", None, "uinteger2:5"));

        let file = parse_request("/cfg/static?file=queuerules.conf", b"").expect("parses");
        assert_eq!(file.operation, Operation::Static);
        assert_eq!(file.query, [field("file", None, "queuerules.conf")]);
    }

    #[test]
    fn rows_print_byte_for_byte_as_the_capture_shows_asterisk_accepting_them() {
        let exchanges = captured();
        let (_, _, members) = exchanges
            .iter()
            .find(|(target, body, response)| {
                target.ends_with("/queue_members/multi")
                    && body.contains("queue_name%20LIKE")
                    && !response.is_empty()
            })
            .expect("the members answer");
        let printed = [("202", "0"), ("203", "1")]
            .iter()
            .map(|(agent, penalty)| {
                let uniqueid = format!("rt-{agent}");
                let interface = format!("Local/{agent}@default/n");
                let membername = format!("Agent {agent}");
                let state = format!("Local/{agent}@default");
                print_row([
                    ("uniqueid", uniqueid.as_str()),
                    ("queue_name", "support"),
                    ("interface", interface.as_str()),
                    ("membername", membername.as_str()),
                    ("state_interface", state.as_str()),
                    ("penalty", penalty),
                    ("paused", "0"),
                    ("reason_paused", ""),
                    ("ringinuse", "0"),
                    ("wrapuptime", "0"),
                ])
            })
            .collect::<String>();
        assert_eq!(&printed, members);
        assert_eq!(print_count(Some(1)), "1\n");
        assert_eq!(print_count(None), "-1\n");
    }

    #[test]
    fn malformed_requests_say_what_is_wrong() {
        assert_eq!(
            parse_request("/provision/agents/select", b""),
            Err(RealtimeError::Operation("/provision/agents/select".into()))
        );
        assert!(matches!(
            parse_request("/provision/agents/single", b"agent_id=%4"),
            Err(RealtimeError::Encoding(_))
        ));
        // A value cut inside a UTF-8 sequence keeps its whole characters.
        let cut = parse_request("/provision/agents/store", b"agent_id=900&f5=%C3%A9%2F%C3")
            .expect("parses");
        assert_eq!(cut.fields[1], field("f5", None, "\u{e9}/\u{fffd}"));
    }

    proptest::proptest! {
        #[test]
        fn a_printed_row_reads_back_as_the_same_fields(
            row in proptest::collection::vec(("[a-z_]{1,12}", "\\PC{0,20}"), 1..6)
        ) {
            let pairs: Vec<(&str, &str)> =
                row.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let printed = print_row(pairs.iter().copied());
            proptest::prop_assert_eq!(printed.matches('\n').count(), 1);
            let back = parse_fields(&printed).expect("reads back");
            let expected: Vec<Field> =
                row.iter().map(|(n, v)| field(n, None, v)).collect();
            proptest::prop_assert_eq!(back, expected);
        }
    }
}
