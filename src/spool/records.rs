//! The record logs `done.jsonl` and `failed.jsonl` (SPEC §3).
//!
//! Appends are group commits: whatever records are ready are appended under
//! the spool's `records.lock` (so daemons on other NFS clients never interleave
//! bytes), each log gets one write and one fsync, and only then are the
//! records reported durable. If a crash tore the last line, the next append
//! starts with a `\n`, so the torn bytes stay a line of their own that readers
//! skip and report, and never glue onto a good record.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::vocab::FileId;
pub use crate::vocab::{Common, ErrorKind, Record, Source};

/// A point in the record logs: records appended later come after it, even
/// across rotations (each rotation starts a new epoch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pos {
    #[serde(default)]
    pub epoch: u64,
    pub done: u64,
    pub failed: u64,
}

impl Pos {
    /// A point at or before both: reading from it sees what either sees.
    pub fn earliest(self, other: Pos) -> Pos {
        match self.epoch.cmp(&other.epoch) {
            std::cmp::Ordering::Less => self,
            std::cmp::Ordering::Greater => other,
            std::cmp::Ordering::Equal => Pos {
                epoch: self.epoch,
                done: self.done.min(other.done),
                failed: self.failed.min(other.failed),
            },
        }
    }
}

/// The two logs and the lock that serializes appends across daemons.
///
/// Rotation (by size, or at the first write of a new UTC day) happens under
/// the records lock: `done.jsonl` becomes `done.e<epoch>.<date>.jsonl` (and
/// `failed.jsonl` likewise), then `.ttspool/records.epoch` moves to the next
/// epoch. Readers go through [`RecordLog::read_since`], which reads rotated
/// files of later epochs from their start, so a position taken before a
/// rotation still finds every record written after it.
#[derive(Debug, Clone)]
pub struct RecordLog {
    pub done: PathBuf,
    pub failed: PathBuf,
    pub lock: PathBuf,
    root: PathBuf,
    epoch_file: PathBuf,
    rotate_size: Option<u64>,
    rotate_daily: bool,
}

impl RecordLog {
    pub fn new(spool: &super::Spool) -> RecordLog {
        RecordLog {
            done: spool.done_log(),
            failed: spool.failed_log(),
            lock: spool.records_lock(),
            root: spool.root.clone(),
            epoch_file: spool.state().join("records.epoch"),
            rotate_size: None,
            rotate_daily: false,
        }
    }

    /// Rotates past `size` bytes, and/or daily.
    pub fn with_rotation(mut self, size: Option<u64>, daily: bool) -> RecordLog {
        self.rotate_size = size;
        self.rotate_daily = daily;
        self
    }

    /// (epoch, the UTC date it began).
    fn epoch(&self) -> (u64, Option<String>) {
        let text = std::fs::read_to_string(&self.epoch_file).unwrap_or_default();
        let mut it = text.split_whitespace();
        let e = it.next().and_then(|e| e.parse().ok()).unwrap_or(0);
        (e, it.next().map(str::to_string))
    }

    /// Where the logs end now.
    pub fn position(&self) -> Pos {
        let (epoch, _) = self.epoch(); // first: a rotation in between only makes readers read more
        let (done, failed) = self.sizes();
        Pos {
            epoch,
            done,
            failed,
        }
    }

    fn rotated_name(kind: &str, epoch: u64, date: &str) -> String {
        format!("{kind}.e{epoch:06}.{date}.jsonl")
    }

    /// Rotated files of `kind` ("done" / "failed") with their epochs, oldest first.
    pub fn rotated(&self, kind: &str) -> Vec<(u64, PathBuf)> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(rest) = name.strip_prefix(&format!("{kind}.e")) else {
                    continue;
                };
                if !name.ends_with(".jsonl") {
                    continue;
                }
                if let Some(ep) = rest.split('.').next().and_then(|n| n.parse().ok()) {
                    out.push((ep, e.path()));
                }
            }
        }
        out.sort();
        out
    }

    /// Reads every record written after `pos` (and possibly some before),
    /// rotated files included. `f` gets the record, its JSON, and whether it
    /// is from the done log. Returns the count of unreadable lines.
    pub fn read_since(
        &self,
        pos: Pos,
        mut f: impl FnMut(StoredRecord, &str, bool),
    ) -> io::Result<u64> {
        let (current, _) = self.epoch();
        let mut bad = 0;
        for (kind, path, from, is_done) in [
            ("done", &self.done, pos.done, true),
            ("failed", &self.failed, pos.failed, false),
        ] {
            for (ep, p) in self.rotated(kind) {
                if ep >= pos.epoch {
                    let start = if ep == pos.epoch { from } else { 0 };
                    bad += read_records(&p, start, |r, t| f(r, t, is_done))?;
                }
            }
            let start = if current == pos.epoch { from } else { 0 };
            bad += read_records(path, start, |r, t| f(r, t, is_done))?;
        }
        Ok(bad)
    }

    /// Reads the records appended since `at` (rotated files included) and
    /// moves `at` past them; `f` gets each record and where it is. Lines
    /// not yet complete are left for the next call. If a rotation happens
    /// meanwhile, nothing is reported and `at` stays: call again.
    pub fn follow(
        &self,
        at: &mut Follow,
        mut f: impl FnMut(StoredRecord, RecordAt),
    ) -> io::Result<()> {
        let (current, _) = self.epoch();
        let mut next = at.clone();
        let mut seen = Vec::new();
        for (done, path, kind) in [(true, &self.done, "done"), (false, &self.failed, "failed")] {
            let st = if done {
                &mut next.done
            } else {
                &mut next.failed
            };
            for (ep, p) in self.rotated(kind) {
                if ep >= st.0 && ep < current {
                    let from = if ep == st.0 { st.1 } else { 0 };
                    read_records_at(&p, from, |r, offset| {
                        seen.push((
                            r,
                            RecordAt {
                                done,
                                epoch: ep,
                                offset,
                            },
                        ))
                    })?;
                    *st = (ep + 1, 0);
                }
            }
            if st.0 < current {
                *st = (current, 0);
            }
            st.1 = read_records_at(path, st.1, |r, offset| {
                seen.push((
                    r,
                    RecordAt {
                        done,
                        epoch: current,
                        offset,
                    },
                ))
            })?;
        }
        if self.epoch().0 != current {
            return Ok(()); // rotated under us: read again next time
        }
        *at = next;
        for (r, w) in seen {
            f(r, w);
        }
        Ok(())
    }

    /// The JSON of the record at `at` (see [`RecordLog::follow`]).
    pub fn record_at(&self, at: RecordAt) -> io::Result<Option<String>> {
        let (kind, current) = if at.done {
            ("done", &self.done)
        } else {
            ("failed", &self.failed)
        };
        let path = if at.epoch == self.epoch().0 {
            current.clone()
        } else {
            match self.rotated(kind).into_iter().find(|(e, _)| *e == at.epoch) {
                Some((_, p)) => p,
                None => return Ok(None), // deleted by hand
            }
        };
        let mut f = File::open(&path)?;
        f.seek(SeekFrom::Start(at.offset))?;
        let mut line = Vec::new();
        BufReader::new(f).read_until(b'\n', &mut line)?;
        Ok(Some(String::from_utf8_lossy(&line).trim().to_string()))
    }

    /// Every record, rotated files included.
    pub fn read_all(&self, f: impl FnMut(StoredRecord, &str, bool)) -> io::Result<u64> {
        self.read_since(Pos::default(), f)
    }

    /// Rotates if a log is past the size limit or the day changed. The
    /// caller holds [`RecordLog::lock`]. Also finishes a rotation that a
    /// crash interrupted.
    pub fn maybe_rotate_locked(&self) -> io::Result<bool> {
        let today = crate::util::today_utc();
        let (epoch, date) = self.epoch();
        let Some(date) = date else {
            crate::util::atomic_write(&self.epoch_file, format!("{epoch} {today}\n").as_bytes())?;
            return Ok(false);
        };
        let rot = |kind: &str| self.root.join(Self::rotated_name(kind, epoch, &date));
        let interrupted = rot("done").exists() || rot("failed").exists();
        let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let big = self
            .rotate_size
            .is_some_and(|max| len(&self.done) > max || len(&self.failed) > max);
        let new_day =
            self.rotate_daily && date != today && (len(&self.done) > 0 || len(&self.failed) > 0);
        if !(interrupted || big || new_day) {
            return Ok(false);
        }
        for (kind, cur) in [("done", &self.done), ("failed", &self.failed)] {
            if cur.exists() && !rot(kind).exists() {
                std::fs::rename(cur, rot(kind))?;
            }
        }
        crate::util::fsync_dir(&self.root)?;
        crate::util::atomic_write(
            &self.epoch_file,
            format!("{} {today}\n", epoch + 1).as_bytes(),
        )?;
        Ok(true)
    }

    /// Takes the append lock; records written while it is held are not
    /// interleaved with another daemon's.
    pub fn lock(&self) -> io::Result<File> {
        crate::util::lock_sidecar(&self.lock, || None)
    }

    /// Appends lines (each ending in `\n`) to the log and fsyncs it. The
    /// caller holds [`RecordLog::lock`].
    pub fn append_locked(path: &Path, lines: &[String]) -> io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        Self::append(path, lines).map_err(|e| crate::util::with_path("append to", path, e))
    }

    fn append(path: &Path, lines: &[String]) -> io::Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let len = f.metadata()?.len();
        let mut buf = Vec::with_capacity(lines.iter().map(String::len).sum::<usize>() + 1);
        if len > 0 {
            let mut last = [0u8; 1];
            f.read_exact_at(&mut last, len - 1)?;
            if last[0] != b'\n' {
                buf.push(b'\n');
            }
        }
        for l in lines {
            buf.extend_from_slice(l.as_bytes());
        }
        let res = f.write_all(&buf).and_then(|()| f.sync_data());
        if res.is_err() {
            // All or nothing: a group that did not fit (a full disk) leaves
            // no part of itself behind, so writing it again later cannot
            // double a record.
            let _ = f.set_len(len);
        }
        res
    }

    /// Cuts a log back to `len` (undoing a group whose other half failed).
    /// The caller holds [`RecordLog::lock`].
    pub fn truncate_locked(path: &Path, len: u64) -> io::Result<()> {
        let cut = || {
            let f = OpenOptions::new().write(true).open(path)?;
            f.set_len(len)?;
            f.sync_data()
        };
        cut().map_err(|e| crate::util::with_path("truncate", path, e))
    }

    /// Current sizes of (done, failed); records appended later start there.
    pub fn sizes(&self) -> (u64, u64) {
        let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        (len(&self.done), len(&self.failed))
    }
}

/// The parts of a stored record that readers need.
#[derive(Debug, Clone, Deserialize)]
pub struct StoredRecord {
    pub id: String,
    pub status: String,
    pub source: Source,
    #[serde(default)]
    pub file_id: FileId,
    #[serde(default)]
    pub error: Option<Value>,
    #[serde(default)]
    pub finished_at: String,
    #[serde(default)]
    pub instance: String,
    #[serde(default)]
    pub trace_id: crate::vocab::TraceId,
}

/// How far a follower has read each log: (epoch, offset) for done and failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Follow {
    done: (u64, u64),
    failed: (u64, u64),
}

/// Where a record is: which log, which epoch of it, at which byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordAt {
    pub done: bool,
    pub epoch: u64,
    pub offset: u64,
}

/// Reads the complete records of `path` from byte `from`, with the offset
/// of each; returns where the last complete line ends.
fn read_records_at(
    path: &Path,
    from: u64,
    mut f: impl FnMut(StoredRecord, u64),
) -> io::Result<u64> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(from),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let from = if from > len { 0 } else { from }; // replaced by a smaller file
    file.seek(SeekFrom::Start(from))?;
    let mut r = BufReader::with_capacity(64 * 1024, file);
    let mut line = Vec::new();
    let mut at = from;
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Ok(at); // the end, or a line still being written
        }
        if let Ok(rec) = serde_json::from_slice::<StoredRecord>(line.trim_ascii()) {
            f(rec, at);
        }
        at += n as u64;
    }
}

/// Reads records from `path` starting at byte `from`, calling `f` with each
/// record and its full JSON. Returns how many lines were skipped as torn or
/// unreadable.
pub fn read_records(
    path: &Path,
    from: u64,
    mut f: impl FnMut(StoredRecord, &str),
) -> io::Result<u64> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    file.seek(SeekFrom::Start(from))?;
    let mut r = BufReader::with_capacity(64 * 1024, file);
    let mut line = Vec::new();
    let mut bad = 0;
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_str::<StoredRecord>(text) {
            Ok(rec) => f(rec, text),
            Err(_) => bad += 1,
        }
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_last_line_is_kept_apart() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("done.jsonl");
        std::fs::write(&p, "{\"id\":\"a\",\"status\":\"completed\",\"source\":{\"file\":\"f\",\"line\":1}}\n{\"id\":\"b\",\"sta").unwrap();
        RecordLog::append_locked(
            &p,
            &[
                "{\"id\":\"c\",\"status\":\"failed\",\"source\":{\"file\":\"f\",\"line\":3}}\n"
                    .into(),
            ],
        )
        .unwrap();
        let mut ids = Vec::new();
        let bad = read_records(&p, 0, |r, _| ids.push(r.id)).unwrap();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(bad, 1);
    }
}
