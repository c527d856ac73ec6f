//! The vocabulary every stage shares, and nothing else: a task, a job, a
//! slot, a record and its parts, the ids that tie them together, and the
//! webhook event names. A leaf: it imports no other module of ttspool but
//! the leaf helpers (`util`, `redact`), so that every stage can import it
//! without importing a stage downstream of itself (see ARCHITECTURE.md).

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// A task as normalized: canonical field names, `id` defaulted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Task {
    pub id: String,
    pub input_text: String,
    pub output_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_audio: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
}

impl Task {
    /// The task as records show it: `callback_url` without query string
    /// and user info, which often carry a token (SPEC §8: secrets never
    /// appear in records). Delivery uses the full URL, kept in the outbox.
    pub fn for_record(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("a task serializes");
        if let (Some(u), Some(m)) = (&self.callback_url, v.as_object_mut()) {
            m.insert("callback_url".into(), Value::String(crate::redact::url(u)));
        }
        v
    }
}

/// One task to synthesize.
#[derive(Debug, Clone)]
pub struct Job {
    pub task: Task,
    /// The final output path.
    pub output: PathBuf,
    /// `prompt_audio` resolved inside the voices folder.
    pub prompt_audio: Option<PathBuf>,
    pub trace_id: TraceId,
}

/// A place to run children: pinned to a GPU, or one of `max_parallel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub index: usize,
    pub device: Option<String>,
}

/// Why a task failed for good (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    InvalidTask,
    EngineFailed,
    /// A TTS server refused this task (a 4xx), or a worker answered
    /// `retryable: false`: not retried.
    EngineRejected,
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
            ErrorKind::EngineRejected => "engine_rejected",
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
    /// The file's name when the line was claimed (lossy if not UTF-8).
    pub file: String,
    pub line: u64,
    /// The name's bytes, escaped (`caf\xe9.jsonl`), when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_escaped: Option<String>,
}

/// Fields every record has.
#[derive(Debug, Clone)]
pub struct Common {
    pub id: String,
    pub source: Source,
    pub trace_id: TraceId,
    pub instance: String,
    /// Our sidecar identity of the source file (`<key>#<generation>`), so a
    /// daemon taking over a lease can tell which of its lines have records.
    pub file_id: FileId,
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
                m.insert("task".into(), task.for_record());
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
                    m.insert("task".into(), t.for_record());
                }
                if let Some(r) = raw {
                    m.insert("raw".into(), json!(crate::redact::urls_in(r)));
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

/// Every event, in the order the README lists them.
pub const EVENTS: &[&str] = &[
    "task.completed",
    "task.skipped",
    "task.failed",
    "file.completed",
];

/// One run of one line through the daemon, from claim to record: in every
/// log line (`trace_id=`), the record, the webhook and the engine's
/// environment (`TTSPOOL_TRACE_ID`). A lowercase ULID.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TraceId(String);

impl TraceId {
    pub fn new() -> TraceId {
        TraceId(ulid::Ulid::new().to_string().to_lowercase())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A webhook message's id (`msg_<ULID>`): the `webhook-id` header, the
/// same on every attempt, so receivers can drop duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MsgId(String);

impl MsgId {
    /// A new id.
    pub fn new() -> MsgId {
        MsgId(format!("msg_{}", ulid::Ulid::new()))
    }
    /// The id for a ULID made from the message's content, so a message
    /// announced twice (a crash in between) keeps its id.
    pub fn from_ulid(id: ulid::Ulid) -> MsgId {
        MsgId(format!("msg_{id}"))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which file (sidecar key) and which generation of it a line came from:
/// `<key>#<gen>` in records, so a daemon taking over a lease can tell which
/// of its lines have records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub struct FileId {
    pub key: String,
    pub gen: u64,
}

impl FileId {
    pub fn new(key: &str, gen: u64) -> FileId {
        FileId {
            key: key.to_string(),
            gen,
        }
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.key, self.gen)
    }
}

/// Records written before file ids had generations (or by hand) read as
/// generation 0 of their key.
impl From<String> for FileId {
    fn from(s: String) -> FileId {
        match s.rsplit_once('#') {
            Some((key, gen)) if gen.parse::<u64>().is_ok() => FileId {
                key: key.to_string(),
                gen: gen.parse().expect("checked"),
            },
            _ => FileId { key: s, gen: 0 },
        }
    }
}

impl From<FileId> for String {
    fn from(id: FileId) -> String {
        id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_ids_round_trip_through_their_text() {
        let id = FileId::new("orders.jsonl.01M80", 3);
        assert_eq!(id.to_string(), "orders.jsonl.01M80#3");
        assert_eq!(FileId::from(id.to_string()), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"orders.jsonl.01M80#3\"");
        assert_eq!(serde_json::from_str::<FileId>(&json).unwrap(), id);
        assert_eq!(FileId::from("old".to_string()), FileId::new("old", 0));
    }
}
