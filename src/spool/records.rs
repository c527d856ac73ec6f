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
use serde_json::{json, Value};

use crate::task::Task;

/// Why a task failed for good (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    InvalidTask,
    EngineFailed,
    Timeout,
    InvalidOutput,
    MissingOutput,
    SpawnFailed,
}

impl ErrorKind {
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::EngineFailed
                | ErrorKind::Timeout
                | ErrorKind::SpawnFailed
                | ErrorKind::MissingOutput
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidTask => "invalid_task",
            ErrorKind::EngineFailed => "engine_failed",
            ErrorKind::Timeout => "timeout",
            ErrorKind::InvalidOutput => "invalid_output",
            ErrorKind::MissingOutput => "missing_output",
            ErrorKind::SpawnFailed => "spawn_failed",
        }
    }
}

/// Where a task line came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub file: String,
    pub line: u64,
}

/// Fields every record has.
#[derive(Debug, Clone)]
pub struct Common {
    pub id: String,
    pub source: Source,
    pub trace_id: String,
    pub instance: String,
    /// Our sidecar identity of the source file (`<key>#<generation>`), so a
    /// daemon taking over a lease can tell which of its lines have records.
    pub file_id: String,
}

/// A finished task line.
#[derive(Debug, Clone)]
pub enum Record {
    Done {
        common: Common,
        skipped: bool,
        output: PathBuf,
        attempts: u32,
        engine: String,
        gpu: Option<String>,
        claimed_at: String,
        started_at: Option<String>,
        run_ms: u64,
        task: Task,
    },
    Failed {
        common: Common,
        kind: ErrorKind,
        message: String,
        attempts: u32,
        task: Option<Task>,
        raw: Option<String>,
        stderr_tail: Option<String>,
    },
}

impl Record {
    pub fn common(&self) -> &Common {
        match self {
            Record::Done { common, .. } | Record::Failed { common, .. } => common,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, Record::Done { .. })
    }

    pub fn status(&self) -> &'static str {
        match self {
            Record::Done { skipped: false, .. } => "completed",
            Record::Done { skipped: true, .. } => "skipped",
            Record::Failed { .. } => "failed",
        }
    }

    /// The record as one JSON line, `\n` included.
    pub fn to_line(&self) -> String {
        let c = self.common();
        let mut v = json!({
            "v": 1,
            "id": c.id,
            "status": self.status(),
            "source": c.source,
            "trace_id": c.trace_id,
            "instance": c.instance,
            "finished_at": crate::util::now_rfc3339(),
            "file_id": c.file_id,
        });
        let m = v.as_object_mut().expect("object");
        match self {
            Record::Done {
                output,
                attempts,
                engine,
                gpu,
                claimed_at,
                started_at,
                run_ms,
                task,
                ..
            } => {
                m.insert("output".into(), json!(output.to_string_lossy()));
                m.insert("attempts".into(), json!(attempts));
                m.insert("engine".into(), json!(engine));
                m.insert("gpu".into(), json!(gpu));
                m.insert("claimed_at".into(), json!(claimed_at));
                m.insert("started_at".into(), json!(started_at));
                m.insert("run_ms".into(), json!(run_ms));
                m.insert("task".into(), json!(task));
            }
            Record::Failed {
                kind,
                message,
                attempts,
                task,
                raw,
                stderr_tail,
                ..
            } => {
                m.insert(
                    "error".into(),
                    json!({"kind": kind.as_str(), "message": message}),
                );
                m.insert("attempts".into(), json!(attempts));
                if let Some(t) = task {
                    m.insert("task".into(), json!(t));
                }
                if let Some(r) = raw {
                    m.insert("raw".into(), json!(r));
                }
                if let Some(s) = stderr_tail.as_ref().filter(|s| !s.is_empty()) {
                    m.insert("stderr_tail".into(), json!(s));
                }
            }
        }
        let mut line = v.to_string();
        line.push('\n');
        line
    }
}

/// The two logs and the lock that serializes appends across daemons.
#[derive(Debug, Clone)]
pub struct RecordLog {
    pub done: PathBuf,
    pub failed: PathBuf,
    pub lock: PathBuf,
}

impl RecordLog {
    pub fn new(spool: &super::Spool) -> RecordLog {
        RecordLog {
            done: spool.done_log(),
            failed: spool.failed_log(),
            lock: spool.records_lock(),
        }
    }

    /// Takes the append lock; records written while it is held are not
    /// interleaved with another daemon's.
    pub fn lock(&self) -> io::Result<File> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock)?;
        f.lock()?;
        Ok(f)
    }

    /// Appends lines (each ending in `\n`) to the log and fsyncs it. The
    /// caller holds [`RecordLog::lock`].
    pub fn append_locked(path: &Path, lines: &[String]) -> io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
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
        f.write_all(&buf)?;
        f.sync_data()
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
    pub file_id: String,
    #[serde(default)]
    pub error: Option<Value>,
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
