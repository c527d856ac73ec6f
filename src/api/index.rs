//! Task ids → where their record is, kept by following the record logs
//! (rotated ones included, and whatever other daemons on the spool write),
//! so `GET /v1/tasks/{id}` never scans the logs. Tasks accepted over HTTP
//! and not yet finished are known from `.ttspool/api/accepted/<instance>.jsonl`
//! (one line per task: id, file, line), which every daemon's API appends to
//! and every daemon's index follows; whether such a task is running is read
//! from its file's leases.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::spool::records::{Follow, RecordAt, RecordLog};
use crate::spool::sidecar::{list_leases, read_lease};
use crate::spool::Spool;

/// Where an accepted task's line is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub id: String,
    pub file: String,
    pub line: u64,
}

/// What is known of a task id.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    /// Its record (the §3 JSON) and status.
    Finished {
        status: String,
        record: String,
    },
    /// Accepted, waiting to be claimed.
    Pending,
    /// Claimed: running, or waiting for a slot or a retry.
    Running,
    Unknown,
}

pub struct Index {
    spool: Spool,
    log: RecordLog,
    follow: Follow,
    records: HashMap<String, (String, RecordAt)>,
    accepted_dir: PathBuf,
    /// Per accepted list: (its inode, how far it was read).
    accepted_at: HashMap<PathBuf, (u64, u64)>,
    accepted: HashMap<String, (String, u64)>,
}

impl Index {
    pub fn new(spool: &Spool) -> Index {
        Index {
            spool: spool.clone(),
            log: RecordLog::new(spool),
            follow: Follow::default(),
            records: HashMap::new(),
            accepted_dir: accepted_dir(spool),
            accepted_at: HashMap::new(),
            accepted: HashMap::new(),
        }
    }

    /// Reads what was appended to the record logs and the accepted lists
    /// since the last call.
    pub fn refresh(&mut self) -> std::io::Result<()> {
        let mut fresh = Vec::new();
        self.log
            .follow(&mut self.follow, |r, at| fresh.push((r.id, r.status, at)))?;
        for (id, status, at) in fresh {
            self.accepted.remove(&id);
            self.records.insert(id, (status, at));
        }
        let Ok(rd) = std::fs::read_dir(&self.accepted_dir) else {
            return Ok(());
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(mut f) = std::fs::File::open(&p) else {
                continue;
            };
            // A list its daemon compacted is a new file: read it again.
            let ino = std::os::unix::fs::MetadataExt::ino(&f.metadata()?);
            let from = self
                .accepted_at
                .get(&p)
                .filter(|(i, _)| *i == ino)
                .map(|(_, at)| *at)
                .unwrap_or(0);
            f.seek(SeekFrom::Start(from))?;
            let mut r = BufReader::new(f);
            let mut at = from;
            let mut line = String::new();
            loop {
                line.clear();
                let n = r.read_line(&mut line)?;
                if n == 0 || !line.ends_with('\n') {
                    break;
                }
                at += n as u64;
                if let Ok(a) = serde_json::from_str::<Accepted>(&line) {
                    if !self.records.contains_key(&a.id) {
                        self.accepted.insert(a.id, (a.file, a.line));
                    }
                }
            }
            self.accepted_at.insert(p, (ino, at));
        }
        Ok(())
    }

    /// What is known of `id` (call [`Index::refresh`] first).
    pub fn lookup(&self, id: &str) -> std::io::Result<Found> {
        if let Some((status, at)) = self.records.get(id) {
            if let Some(record) = self.log.record_at(*at)? {
                return Ok(Found::Finished {
                    status: status.clone(),
                    record,
                });
            }
        }
        let Some((file, line)) = self.accepted.get(id) else {
            return Ok(Found::Unknown);
        };
        Ok(if self.claimed(file, *line) {
            Found::Running
        } else {
            Found::Pending
        })
    }

    /// Notes tasks this daemon accepted (so an id is known before its
    /// record, on every daemon that follows the list).
    pub fn note(&mut self, instance: &str, tasks: &[Accepted]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.accepted_dir)?;
        let mut buf = String::new();
        for t in tasks {
            buf.push_str(&serde_json::to_string(t).expect("serializes"));
            buf.push('\n');
            self.accepted.insert(t.id.clone(), (t.file.clone(), t.line));
        }
        let path = self.accepted_dir.join(format!("{instance}.jsonl"));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        f.write_all(buf.as_bytes())?;
        if f.metadata()?.len() > COMPACT_AT {
            drop(f);
            self.compact(&path)?;
        }
        Ok(())
    }

    /// Rewrites our accepted list without the tasks that have their record
    /// (the index follows every log from the start, so it knows them).
    /// Other daemons see the shorter file and read it again.
    fn compact(&mut self, path: &std::path::Path) -> std::io::Result<()> {
        self.refresh()?;
        let text = std::fs::read_to_string(path)?;
        let mut keep = String::new();
        for line in text.lines() {
            if let Ok(a) = serde_json::from_str::<Accepted>(line) {
                if !self.records.contains_key(&a.id) {
                    keep.push_str(line);
                    keep.push('\n');
                }
            }
        }
        crate::util::atomic_write(path, keep.as_bytes())?;
        self.accepted_at.remove(path);
        Ok(())
    }

    /// A lease of `file` covers `line`.
    fn claimed(&self, file: &str, line: u64) -> bool {
        let Ok(rd) = std::fs::read_dir(self.spool.files()) else {
            return false;
        };
        rd.flatten()
            .filter(|d| crate::spool::ident::read(&d.path()).is_some_and(|id| id.name == file))
            .any(|d| {
                list_leases(&d.path())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|l| read_lease(l))
                    .any(|doc| doc.lines.contains(&line))
            })
    }
}

/// An accepted list this long is compacted.
const COMPACT_AT: u64 = 4 << 20;

fn accepted_dir(spool: &Spool) -> PathBuf {
    spool.state().join("api").join("accepted")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(id: &str, line: u64) -> Accepted {
        Accepted {
            id: id.into(),
            file: "api-x.jsonl".into(),
            line,
        }
    }

    #[test]
    fn a_compacted_list_keeps_the_unfinished_and_is_read_again_by_others() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        let mut ours = Index::new(&spool);
        let mut theirs = Index::new(&spool);
        ours.note(
            "a",
            &[accepted("t1", 1), accepted("t2", 2), accepted("t3", 3)],
        )
        .unwrap();
        theirs.refresh().unwrap();
        assert_eq!(theirs.lookup("t3").unwrap(), Found::Pending);
        // t1 and t2 finish.
        let rec = |id: &str, line: u64| {
            format!(
                "{{\"id\":\"{id}\",\"status\":\"completed\",\"source\":{{\"file\":\"api-x.jsonl\",\"line\":{line}}}}}\n"
            )
        };
        std::fs::write(spool.done_log(), rec("t1", 1) + &rec("t2", 2)).unwrap();
        let path = accepted_dir(&spool).join("a.jsonl");
        ours.compact(&path).unwrap();
        let left = std::fs::read_to_string(&path).unwrap();
        assert_eq!(left.lines().count(), 1, "{left}");
        assert!(left.contains("t3"));
        // Another daemon that had read the old list sees the new one.
        ours.note("a", &[accepted("t4", 4)]).unwrap();
        theirs.refresh().unwrap();
        assert_eq!(theirs.lookup("t4").unwrap(), Found::Pending);
        assert!(matches!(
            theirs.lookup("t1").unwrap(),
            Found::Finished { .. }
        ));
    }
}
