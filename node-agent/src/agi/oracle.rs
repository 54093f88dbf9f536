//! An independent reading of AGI command lines, for tests only: how res_agi (Asterisk
//! 22.10.1, `res/res_agi.c`) cuts the bytes it receives into lines and a line into words,
//! written afresh in Rust from reading `run_agi` and `parse_args`, sharing nothing with the
//! printer in `proto.rs`.
//!
//! What the C does, and this mirrors:
//! - A line is read with `fgets` into an 8192-byte buffer: it ends after a `\n` or after
//!   8191 bytes, whichever comes first, and the trailing `\n` is removed. Nothing else (no
//!   `\r`) is stripped.
//! - A blank or tab outside quotes and not escaped ends the current word.
//! - An unescaped `"` toggles quoting and is dropped; opening a quote between words starts
//!   a word, so `""` is an empty word. Opening one inside a word does not.
//! - An unescaped `\` is dropped and makes the next byte literal, whatever it is; a
//!   trailing one is dropped.
//! - Every other byte, and every escaped one, is part of the current word (starting one
//!   between words). Words past the 127th that start with such a byte are dropped with a
//!   warning, while one that starts with a quote is stored past the end of the 128-slot
//!   array: the oracle reports that as an error.
//!
//! `fuzz/fuzz_targets/agi_session.rs` compiles this file by path.

/// The line length `fgets` reads at once, line feed included.
pub const LINE: usize = 8191;

/// res_agi's argument slots less the terminating null.
pub const WORDS: usize = 127;

/// A command line res_agi would mishandle.
#[derive(Debug, PartialEq, Eq)]
pub enum Misread {
    /// A quoted word would start past the 127th, overrunning Asterisk's array.
    Overrun,
    /// A NUL byte: `strlen` would cut the line and the read loop would glue the next one on.
    Nul,
}

/// Cuts a byte stream into the command lines res_agi reads, without their `\n`; a last
/// line without `\n` is returned too (res_agi reads it at end of stream).
pub fn lines(mut stream: &[u8]) -> Result<Vec<&[u8]>, Misread> {
    let mut out = Vec::new();
    while !stream.is_empty() {
        let take = match stream.iter().take(LINE).position(|&b| b == b'\n') {
            Some(newline) => newline + 1,
            None => stream.len().min(LINE),
        };
        let (line, rest) = stream.split_at(take);
        if line.contains(&0) {
            return Err(Misread::Nul);
        }
        out.push(line.strip_suffix(b"\n").unwrap_or(line));
        stream = rest;
    }
    Ok(out)
}

/// Splits one command line (without its `\n`) into words as `parse_args` does.
pub fn words(line: &[u8]) -> Result<Vec<Vec<u8>>, Misread> {
    let mut words: Vec<Vec<u8>> = Vec::new();
    let mut quoted = false;
    let mut escaped = false;
    let mut between = true;
    for &byte in line {
        if byte == 0 {
            return Err(Misread::Nul);
        }
        let literal = match byte {
            b'"' if !escaped => {
                quoted = !quoted;
                if quoted && between {
                    if words.len() >= WORDS {
                        return Err(Misread::Overrun);
                    }
                    words.push(Vec::new());
                    between = false;
                }
                false
            }
            b' ' | b'\t' if !quoted && !escaped => {
                between = true;
                false
            }
            b'\\' if !escaped => {
                escaped = true;
                continue;
            }
            _ => true,
        };
        if literal {
            if between {
                if words.len() >= WORDS {
                    // Dropped, and the escape (if any) stays pending, as in the C.
                    continue;
                }
                words.push(Vec::new());
                between = false;
            }
            if let Some(word) = words.last_mut() {
                word.push(byte);
            }
        }
        escaped = false;
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(line: &str) -> Vec<String> {
        words(line.as_bytes())
            .expect("readable")
            .into_iter()
            .map(|w| String::from_utf8(w).expect("utf-8"))
            .collect()
    }

    #[test]
    fn reads_like_res_agi() {
        assert_eq!(
            read("GET VARIABLE CALLERID(num)"),
            ["GET", "VARIABLE", "CALLERID(num)"]
        );
        assert_eq!(
            read("STREAM FILE ref-tone \"\""),
            ["STREAM", "FILE", "ref-tone", ""]
        );
        assert_eq!(
            read("EXEC NoOp hello from agi"),
            ["EXEC", "NoOp", "hello", "from", "agi"]
        );
        assert_eq!(read("  a\t\tb  "), ["a", "b"]);
        assert_eq!(read(r#"a"b c"d"#), ["ab cd"], "a quote inside a word joins");
        assert_eq!(read(r#""a \"b\" \\c""#), [r#"a "b" \c"#]);
        assert_eq!(read(r"a\ b \x\"), ["a b", "x"], "escapes outside quotes");
        assert_eq!(read("\"unterminated x"), ["unterminated x"]);
        assert_eq!(read(""), Vec::<String>::new());
        assert_eq!(read("\"\" \"\""), ["", ""]);
    }

    #[test]
    fn word_limits() {
        let many = vec!["w"; 130].join(" ");
        assert_eq!(words(many.as_bytes()).expect("plain words").len(), WORDS);
        let quoted = [vec!["w"; WORDS].join(" "), "\"q\"".to_owned()].join(" ");
        assert_eq!(words(quoted.as_bytes()), Err(Misread::Overrun));
        assert_eq!(words(b"a\0b"), Err(Misread::Nul));
    }

    #[test]
    fn line_cutting() {
        assert_eq!(lines(b"A\nB\n").expect("lines"), [&b"A"[..], b"B"]);
        assert_eq!(lines(b"A\r\n").expect("lines"), [&b"A\r"[..]]);
        let long = vec![b'x'; LINE + 5];
        let cut = lines(&long).expect("lines");
        assert_eq!(cut.len(), 2);
        assert_eq!(cut[0].len(), LINE);
    }
}
