//! The FastAGI captures in `fixtures/asterisk/fastagi-session.jsonl`, read for the codec's
//! unit tests (`tests.rs`) and the server's tests (`node-agent/tests/agi_server.rs`, which
//! includes this file by path): one JSON object per line, `{"session", "dir", "t", "data"}`,
//! where `dir` is `<<<` from Asterisk, `>>>` to Asterisk, `---` a note by whoever captured
//! it and `#####` the start of a session.
//!
//! Sessions are told apart by their `#####` rows, not by the `session` number: the file
//! joins two capture runs, and the fifth session is numbered 1 again.

use serde_json::Value;

pub(crate) const FROM_ASTERISK: &str = "<<<";
pub(crate) const TO_ASTERISK: &str = ">>>";
const NOTE: &str = "---";
const START: &str = "#####";

/// One captured FastAGI connection.
#[derive(Debug)]
pub(crate) struct Capture {
    /// The `#####` row, e.g. `session 2 from 127.0.0.1:48572`.
    pub(crate) header: String,
    /// `(dir, data)` of every row after it, notes included.
    pub(crate) rows: Vec<(String, String)>,
}

impl Capture {
    /// Every session in the capture file, in order: `route`, `hangup-test`,
    /// `self-hangup`, `hangup-test-nosighup`, `route-clean`.
    pub(crate) fn all() -> Vec<Capture> {
        let jsonl = include_str!("../../../fixtures/asterisk/fastagi-session.jsonl");
        let mut sessions: Vec<Capture> = Vec::new();
        for line in jsonl.lines().filter(|line| !line.trim().is_empty()) {
            let row: Value = serde_json::from_str(line).expect("capture line is JSON");
            let text = |key: &str| {
                row[key]
                    .as_str()
                    .unwrap_or_else(|| panic!("capture row without string `{key}`: {row}"))
                    .to_owned()
            };
            let (dir, data) = (text("dir"), text("data"));
            match dir.as_str() {
                START => sessions.push(Capture {
                    header: data,
                    rows: Vec::new(),
                }),
                FROM_ASTERISK | TO_ASTERISK | NOTE => sessions
                    .last_mut()
                    .expect("a session starts before its rows")
                    .rows
                    .push((dir, data)),
                other => panic!("unknown dir {other:?}"),
            }
        }
        assert_eq!(sessions.len(), 5, "the capture holds five sessions");
        sessions
    }

    /// The data of the rows in one direction, in order.
    pub(crate) fn rows<'a>(&'a self, dir: &'a str) -> impl Iterator<Item = &'a str> {
        self.rows
            .iter()
            .filter(move |(d, _)| d == dir)
            .map(|(_, data)| data.as_str())
    }

    /// The environment block: Asterisk's first row.
    pub(crate) fn environment(&self) -> &str {
        self.rows(FROM_ASTERISK).next().expect("an environment")
    }
}
