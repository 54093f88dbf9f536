//! The pending-writes file: registrations Asterisk wrote while the control plane could not
//! take them, kept on disk until delivered so that a node-agent restart loses none.
//!
//! One JSON object per line. A write is appended and fsynced before Asterisk hears `1`;
//! a delivery appends `{"delivered_through":SEQ}` (no fsync: at worst a write is delivered
//! twice, and every write replays harmlessly); when the queue drains the file is rewritten
//! (temporary file, fsync, rename) to what is still pending. Appends run on several
//! threads, so lines may be out of order or repeated: loading sorts by sequence number and
//! keeps each once, and skips a line torn by a crash.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One write as the file keeps it: what Asterisk sent, and its place in the order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JournalWrite {
    /// Order of the write among all writes of this node-agent.
    pub seq: u64,
    /// `ps_contacts`, …
    pub family: String,
    /// `store`, `update`, `update2` or `destroy`.
    pub operation: String,
    /// The query as Asterisk sent it (the row an `update` names).
    pub query: String,
    /// The form body as Asterisk sent it.
    pub body: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Line {
    Write(JournalWrite),
    Delivered { delivered_through: u64 },
}

/// What a previous run left.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Loaded {
    /// Writes not delivered yet, in order.
    pub pending: Vec<JournalWrite>,
    /// Every write up to this one was delivered.
    pub delivered_through: u64,
    /// Lines that could not be read (a crash in the middle of an append).
    pub skipped: usize,
}

/// The open file.
#[derive(Debug)]
pub(super) struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Opens (creating) the file at `path`, reads what a previous run left in it and writes
    /// that back compacted.
    pub(super) fn open(path: &Path) -> io::Result<(Self, Loaded)> {
        let loaded = match File::open(path) {
            Ok(file) => load(BufReader::new(file))?,
            Err(err) if err.kind() == io::ErrorKind::NotFound => Loaded::default(),
            Err(err) => return Err(err),
        };
        let mut journal = Self {
            path: path.to_owned(),
            file: open_append(path)?,
        };
        // Starts clean: a line torn by a crash would otherwise swallow the next append.
        journal.rewrite(loaded.delivered_through, &loaded.pending)?;
        Ok((journal, loaded))
    }

    /// Appends `write` and waits until it is on disk.
    pub(super) fn append(&mut self, write: &JournalWrite) -> io::Result<()> {
        self.line(&Line::Write(write.clone()))?;
        self.file.sync_data()
    }

    /// Notes that every write up to `seq` was delivered.
    pub(super) fn delivered(&mut self, seq: u64) -> io::Result<()> {
        self.line(&Line::Delivered {
            delivered_through: seq,
        })
    }

    /// Replaces the file by `pending` (after `delivered_through`), atomically.
    pub(super) fn rewrite(
        &mut self,
        delivered_through: u64,
        pending: &[JournalWrite],
    ) -> io::Result<()> {
        let mut temporary = self.path.clone().into_os_string();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        {
            let mut out = io::BufWriter::new(
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&temporary)?,
            );
            write_line(&mut out, &Line::Delivered { delivered_through })?;
            for write in pending {
                write_line(&mut out, &Line::Write(write.clone()))?;
            }
            out.into_inner()
                .map_err(io::IntoInnerError::into_error)?
                .sync_all()?;
        }
        std::fs::rename(&temporary, &self.path)?;
        if let Some(folder) = self
            .path
            .parent()
            .filter(|folder| !folder.as_os_str().is_empty())
        {
            File::open(folder)?.sync_all()?;
        }
        self.file = open_append(&self.path)?;
        Ok(())
    }

    fn line(&mut self, line: &Line) -> io::Result<()> {
        // One write(2) per line, so a concurrent reader or a crash sees whole lines or a
        // torn last one, never two lines interleaved.
        let mut text = serde_json::to_vec(line)?;
        text.push(b'\n');
        self.file.write_all(&text)
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    // The bodies are registrations (and whatever else Asterisk writes): the node-agent's own.
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

fn write_line(out: &mut impl io::Write, line: &Line) -> io::Result<()> {
    serde_json::to_writer(&mut *out, line)?;
    out.write_all(b"\n")
}

fn load(reader: impl BufRead) -> io::Result<Loaded> {
    let mut writes = BTreeMap::new();
    let mut delivered_through = 0;
    let mut skipped = 0;
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(&line) {
            Ok(Line::Write(write)) => {
                writes.insert(write.seq, write);
            }
            Ok(Line::Delivered {
                delivered_through: seq,
            }) => delivered_through = delivered_through.max(seq),
            Err(_) => skipped += 1,
        }
    }
    Ok(Loaded {
        pending: writes
            .split_off(&(delivered_through + 1))
            .into_values()
            .collect(),
        delivered_through,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(seq: u64) -> JournalWrite {
        JournalWrite {
            seq,
            family: "ps_contacts".into(),
            operation: "store".into(),
            query: String::new(),
            body: format!("id=200{seq}%3B%40abc"),
        }
    }

    #[test]
    fn lines_out_of_order_repeated_delivered_or_torn_load_as_what_is_pending() {
        let folder = tempfile::tempdir().expect("a temporary folder");
        let path = folder.path().join("pending.jsonl");
        let (mut journal, loaded) = Journal::open(&path).expect("opens");
        assert_eq!(loaded, Loaded::default());
        for seq in [3, 1, 2, 4, 3] {
            journal.append(&write(seq)).expect("appends");
        }
        journal.delivered(1).expect("notes");
        drop(journal);
        // A crash in the middle of an append.
        let mut file = open_append(&path).expect("opens");
        file.write_all(b"{\"seq\":5,\"fam").expect("writes");
        drop(file);

        let (mut journal, loaded) = Journal::open(&path).expect("opens");
        assert_eq!(
            loaded,
            Loaded {
                pending: vec![write(2), write(3), write(4)],
                delivered_through: 1,
                skipped: 1,
            }
        );
        journal.rewrite(3, &[write(4)]).expect("rewrites");
        journal.append(&write(5)).expect("appends");
        drop(journal);
        let text = std::fs::read_to_string(&path).expect("reads");
        assert_eq!(text.lines().count(), 3, "{text}");
        let (_, loaded) = Journal::open(&path).expect("opens");
        assert_eq!(loaded.pending, [write(4), write(5)]);
        assert_eq!(loaded.delivered_through, 3);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
