//! The durable outbox: `.ttspool/outbox/<instance>/<segment>.jsonl`.
//!
//! A segment holds the messages of one group of records. The committer writes
//! it as `<segment>.pending` (fsynced) *before* it appends the records, and
//! renames it to `.jsonl` after them. So:
//! - a crash before the records are durable leaves a `.pending` whose
//!   records may be missing: recovery keeps only the messages whose record is
//!   in the logs (read from the log sizes noted in its header), and the
//!   tasks without a record run again and get messages of their own;
//! - a crash after the records leaves a `.pending` whose records all exist:
//!   recovery promotes it.
//!
//! Either way a task with a record has exactly one message.
//!
//! Delivery progress is `<segment>.acks` (one message index per line per
//! final outcome); a segment whose messages are all acked is deleted. A lost
//! ack only means a redelivery with the same `webhook-id`. Each daemon
//! delivers only its own folder; the folder of a daemon that died is adopted
//! (renamed, so by exactly one daemon) by a live one.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Message;
use crate::spool::records::{Pos, RecordLog};
use crate::spool::Spool;
use crate::util::fsync_dir;
use crate::util::PRIVATE_FILE;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Header {
    /// Where the record logs ended before this segment's records.
    pos: Pos,
}

/// Where one undelivered message is: enough to read it again, little memory.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seg: Arc<PathBuf>,
    pub idx: u32,
    pub off: u64,
    pub len: u32,
}

pub struct Outbox {
    root: PathBuf,
    dir: PathBuf,
}

impl Outbox {
    pub fn root(spool: &Spool) -> PathBuf {
        spool.state().join("outbox")
    }

    pub fn open(spool: &Spool, instance: &str) -> io::Result<Outbox> {
        let root = Self::root(spool);
        let dir = root.join(instance);
        // Messages hold full URLs (tokens in queries) and signed bodies.
        crate::util::create_private_dir(&dir)?;
        Ok(Outbox { root, dir })
    }

    /// Writes a segment. With `logs` (the record log sizes before the
    /// records are appended) it is `.pending` until [`Outbox::promote`].
    pub fn write(&self, msgs: &[Message], logs: Option<Pos>) -> io::Result<PathBuf> {
        let name = ulid::Ulid::new().to_string();
        let mut body = serde_json::to_string(&Header {
            pos: logs.unwrap_or_default(),
        })
        .expect("header");
        body.push('\n');
        for m in msgs {
            body.push_str(&serde_json::to_string(m).expect("message"));
            body.push('\n');
        }
        let pending = self.dir.join(format!("{name}.pending"));
        let create = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(PRIVATE_FILE)
                .open(&pending)
        };
        let mut f = match create() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Our folder was adopted by a daemon that judged us dead (we
                // were paused past the lease): it delivers what was there;
                // we go on in a new folder.
                tracing::warn!(
                    folder = %self.dir.display(),
                    "our webhook outbox folder was adopted by another daemon (this one was judged dead); starting a new one"
                );
                crate::util::create_private_dir(&self.dir)?;
                create()?
            }
            other => other?,
        };
        if let Err(e) = f.write_all(body.as_bytes()).and_then(|()| f.sync_all()) {
            // A full disk: leave no half segment behind.
            let _ = fs::remove_file(&pending);
            return Err(e);
        }
        fsync_dir(&self.dir)?;
        if logs.is_some() {
            Ok(pending)
        } else {
            Self::promote(&pending)
        }
    }

    /// `.pending` → `.jsonl`: deliverable.
    pub fn promote(pending: &Path) -> io::Result<PathBuf> {
        let ready = pending.with_extension("jsonl");
        fs::rename(pending, &ready)?;
        Ok(ready)
    }

    /// Settles `.pending` segments left by a crash (see the module docs).
    pub fn recover(&self, log: &RecordLog) -> io::Result<usize> {
        let mut n = 0;
        for p in list(&self.dir, "pending")? {
            let (header, msgs) = read_segment(&p)?;
            let Some(h) = header else {
                fs::remove_file(&p)?; // torn before its header: nothing was promised
                continue;
            };
            let wanted: HashSet<(crate::vocab::FileId, u64)> =
                msgs.iter().map(|m| (m.file_id.clone(), m.line)).collect();
            let mut present = HashSet::new();
            {
                let _g = log.lock()?;
                log.read_since(h.pos, |r, _, _| {
                    let k = (r.file_id.clone(), r.source.line);
                    if wanted.contains(&k) {
                        present.insert(k);
                    }
                })?;
            }
            let keep: Vec<Message> = msgs
                .into_iter()
                .filter(|m| present.contains(&(m.file_id.clone(), m.line)))
                .collect();
            if !keep.is_empty() {
                self.write(&keep, None)?;
                n += keep.len();
            }
            fs::remove_file(&p)?;
        }
        Ok(n)
    }

    /// Other daemons' folders.
    pub fn others(&self) -> io::Result<Vec<String>> {
        let mine = self
            .dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let mut out = Vec::new();
        for d in fs::read_dir(&self.root)? {
            let d = d?;
            let name = d.file_name().to_string_lossy().into_owned();
            if name != mine && d.file_type()?.is_dir() {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// Moves a dead daemon's segments here; returns how many files moved.
    pub fn adopt(&self, instance: &str, log: &RecordLog) -> io::Result<usize> {
        let from = self.root.join(instance);
        let mut moved = 0;
        for ext in ["acks", "pending", "jsonl"] {
            for p in list(&from, ext)? {
                let to = self.dir.join(p.file_name().expect("file"));
                match fs::rename(&p, &to) {
                    Ok(()) => moved += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {} // another daemon was faster
                    Err(e) => return Err(e),
                }
            }
        }
        if moved > 0 {
            self.recover(log)?;
        }
        let _ = fs::remove_dir(&from);
        Ok(moved)
    }

    /// Our deliverable segments, oldest first.
    pub fn segments(&self) -> io::Result<Vec<PathBuf>> {
        list(&self.dir, "jsonl")
    }

    /// Drops a segment whose messages all have an outcome.
    pub fn remove(seg: &Path) {
        let _ = fs::remove_file(seg.with_extension("acks"));
        let _ = fs::remove_file(seg);
    }
}

/// The undelivered messages of a segment (acked ones left out).
pub fn entries(seg: &Path) -> io::Result<Vec<Entry>> {
    let acked: HashSet<u32> = fs::read_to_string(seg.with_extension("acks"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let seg_arc = Arc::new(seg.to_path_buf());
    let mut r = BufReader::new(File::open(seg)?);
    let mut off = 0u64;
    let mut line = Vec::new();
    let mut idx = 0u32;
    let mut out = Vec::new();
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        if idx > 0 && line.ends_with(b"\n") && !acked.contains(&idx) {
            out.push(Entry {
                seg: seg_arc.clone(),
                idx,
                off,
                len: n as u32,
            });
        }
        off += n as u64;
        idx += 1;
    }
    Ok(out)
}

/// Reads one message back.
pub fn read(e: &Entry) -> io::Result<Message> {
    let mut buf = vec![0u8; e.len as usize];
    File::open(&*e.seg)?.read_exact_at(&mut buf, e.off)?;
    serde_json::from_slice(&buf).map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))
}

/// Records that message `idx` of `seg` has its final outcome.
pub fn ack(seg: &Path, idxs: &[u32]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(PRIVATE_FILE)
        .open(seg.with_extension("acks"))?;
    let mut s = String::new();
    for i in idxs {
        s.push_str(&format!("{i}\n"));
    }
    f.write_all(s.as_bytes())
}

/// Undelivered messages across every daemon's folder (for `status`).
pub fn depth(spool: &Spool) -> u64 {
    let root = Outbox::root(spool);
    let Ok(rd) = fs::read_dir(&root) else {
        return 0;
    };
    let mut n = 0;
    for d in rd.flatten() {
        for seg in list(&d.path(), "jsonl").unwrap_or_default() {
            n += entries(&seg).map(|e| e.len() as u64).unwrap_or(0);
        }
    }
    n
}

fn read_segment(p: &Path) -> io::Result<(Option<Header>, Vec<Message>)> {
    let text = fs::read_to_string(p)?;
    let mut lines = text.split_inclusive('\n').filter(|l| l.ends_with('\n'));
    let header = lines.next().and_then(|l| serde_json::from_str(l).ok());
    let msgs = lines.filter_map(|l| serde_json::from_str(l).ok()).collect();
    Ok((header, msgs))
}

fn list(dir: &Path, ext: &str) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for d in rd {
        let p = d?.path();
        if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(file_id: &str, line: u64) -> Message {
        Message {
            msg_id: crate::webhook::new_msg_id(),
            event: "task.completed".into(),
            id: format!("t{line}"),
            url: "https://example.com/hook".into(),
            body: "{}".into(),
            file_id: file_id.to_string().into(),
            line,
        }
    }

    #[test]
    fn a_crash_before_the_records_keeps_only_recorded_messages() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        let log = RecordLog::new(&spool);
        let ob = Outbox::open(&spool, "a").unwrap();
        fs::write(&log.done, "{\"id\":\"old\",\"status\":\"completed\",\"source\":{\"file\":\"f\",\"line\":9},\"file_id\":\"k#0\"}\n").unwrap();
        let sizes = log.position();
        let pending = ob
            .write(&[msg("k#0", 1), msg("k#0", 2)], Some(sizes))
            .unwrap();
        assert!(pending.extension().unwrap() == "pending");
        // Only line 1's record made it before the crash.
        RecordLog::append_locked(&log.done, &["{\"id\":\"t1\",\"status\":\"completed\",\"source\":{\"file\":\"f\",\"line\":1},\"file_id\":\"k#0\"}\n".into()]).unwrap();
        assert_eq!(ob.recover(&log).unwrap(), 1);
        let segs = ob.segments().unwrap();
        assert_eq!(segs.len(), 1);
        let e = entries(&segs[0]).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(read(&e[0]).unwrap().line, 1);
        ack(&segs[0], &[1]).unwrap();
        assert!(entries(&segs[0]).unwrap().is_empty());
    }

    #[test]
    fn a_dead_daemons_folder_is_adopted_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        let log = RecordLog::new(&spool);
        let dead = Outbox::open(&spool, "dead").unwrap();
        dead.write(&[msg("", 0)], None).unwrap();
        let a = Outbox::open(&spool, "a").unwrap();
        let b = Outbox::open(&spool, "b").unwrap();
        assert_eq!(a.others().unwrap().len(), 2);
        assert_eq!(a.adopt("dead", &log).unwrap(), 1);
        assert_eq!(b.adopt("dead", &log).unwrap(), 0);
        assert_eq!(a.segments().unwrap().len(), 1);
        assert_eq!(depth(&spool), 1);
    }

    #[test]
    fn a_daemon_whose_folder_was_adopted_writes_into_a_new_one() {
        // Paused past its lease, it was judged dead and its folder adopted.
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        let log = RecordLog::new(&spool);
        let paused = Outbox::open(&spool, "paused").unwrap();
        paused.write(&[msg("", 0)], None).unwrap();
        let other = Outbox::open(&spool, "other").unwrap();
        assert_eq!(other.adopt("paused", &log).unwrap(), 1);
        // It wakes and writes: no "cannot write records", a fresh folder.
        paused.write(&[msg("", 0)], None).unwrap();
        assert_eq!(paused.segments().unwrap().len(), 1);
        assert_eq!(other.segments().unwrap().len(), 1);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(Outbox::root(&spool).join("paused"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
