//! Webhooks (SPEC §9): what is sent, signed how, kept where, delivered when.
//!
//! - [`sign`]: Standard Webhooks signatures.
//! - [`guard`]: the SSRF guard and the resolver the client connects through.
//! - [`outbox`]: the durable outbox, written together with the records.
//! - [`deliver`]: concurrent delivery with retries, and `webhook replay`.
//!
//! A task's message is built in the record committer from the record itself,
//! written to an outbox segment before the records and made deliverable after
//! them (see outbox.rs), so a crash can neither lose a finished task's webhook
//! nor send one for a task whose record never made it to disk.

pub mod deliver;
pub mod dns;
pub mod guard;
pub mod outbox;
pub mod sign;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::config::{Config, WebhookFormat};
use crate::vocab::Record;

pub use crate::vocab::EVENTS;

/// One message: what is sent, to where, with the same id on every attempt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub msg_id: crate::vocab::MsgId,
    pub event: String,
    /// The task id (or the file name for `file.completed`).
    pub id: String,
    pub url: String,
    /// The exact bytes that are signed and sent.
    pub body: String,
    /// Which record this message belongs to (empty for file events).
    #[serde(default)]
    pub file_id: crate::vocab::FileId,
    #[serde(default)]
    pub line: u64,
}

/// The webhook part of the config, ready to use. (No `Debug`: it holds
/// header values and keys, which never reach a log.)
pub struct Settings {
    pub url: Option<String>,
    pub events: Vec<String>,
    pub format: WebhookFormat,
    /// Current secret first, then previous ones; empty: none configured.
    pub keys: Vec<sign::Key>,
    pub timeout: Duration,
    pub schedule: Vec<Duration>,
    pub headers: Vec<(String, String)>,
    pub guard: Arc<guard::Guard>,
    pub audio_base_url: Option<String>,
    pub max_in_flight: usize,
    /// Rotate webhooks.jsonl past this size (retention.rotate_size).
    pub rotate_size: Option<u64>,
}

impl Settings {
    /// Reads the secret (file, then `$TTSPOOL_WEBHOOK_SECRET`, then config).
    pub fn from_config(cfg: &Config) -> Result<Settings, String> {
        let w = &cfg.webhook;
        let current = if let Some(f) = &w.secret_file {
            Some(std::fs::read_to_string(f).map_err(|e| {
                format!(
                    "webhook.secret_file {}: {}",
                    f.display(),
                    crate::util::io_msg(&e)
                )
            })?)
        } else if let Some(s) = std::env::var("TTSPOOL_WEBHOOK_SECRET")
            .ok()
            .filter(|s| !s.is_empty())
        {
            Some(s)
        } else {
            w.secret.clone()
        };
        let mut keys = Vec::new();
        if let Some(s) = current {
            keys.push(sign::Key::parse(&s).map_err(|e| format!("webhook secret: {e}"))?);
        }
        for (i, s) in w.previous_secrets.split_whitespace().enumerate() {
            keys.push(
                sign::Key::parse(s)
                    .map_err(|e| format!("webhook.previous_secrets #{}: {e}", i + 1))?,
            );
        }
        if w.url.is_some() && keys.is_empty() {
            return Err("webhook.url is set but no secret is: set webhook.secret_file, $TTSPOOL_WEBHOOK_SECRET or webhook.secret (whsec_...)".into());
        }
        Ok(Settings {
            url: w.url.clone(),
            events: w.events.clone(),
            format: w.format,
            keys,
            timeout: w.timeout.0,
            schedule: w.schedule.iter().map(|d| d.0).collect(),
            headers: w
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            guard: Arc::new(guard::Guard::new(&w.allow_cidrs)),
            audio_base_url: w.audio_base_url.clone(),
            max_in_flight: w.max_in_flight,
            rotate_size: cfg.retention.rotate_size.map(|s| s.0),
        })
    }

    fn wants(&self, event: &str) -> bool {
        self.events.iter().any(|e| e == event)
    }

    /// The message for a finished task, if one is to be sent.
    pub fn for_record(&self, rec: &Record) -> Option<Message> {
        let event = match rec {
            Record::Done { skipped: false, .. } => "task.completed",
            Record::Done { skipped: true, .. } => "task.skipped",
            Record::Failed { .. } => "task.failed",
        };
        if !self.wants(event) {
            return None;
        }
        let task = match rec {
            Record::Done { task, .. } => Some(task),
            Record::Failed { task, .. } => task.as_ref(),
        };
        let url = task
            .and_then(|t| t.callback_url.clone())
            .or_else(|| self.url.clone())?;
        let c = rec.common();
        let body = match self.format {
            WebhookFormat::Standard => standard_body(event, rec),
            WebhookFormat::Callback => self.callback_body(rec),
        };
        Some(Message {
            msg_id: new_msg_id(),
            event: event.into(),
            id: c.id.clone(),
            url,
            body,
            file_id: c.file_id.clone(),
            line: c.source.line,
        })
    }

    /// The `file.completed` message of a fully recorded file.
    pub fn for_file(&self, f: &crate::spool::claim::FileDone) -> Option<Message> {
        if !self.wants("file.completed") {
            return None;
        }
        let url = self.url.clone()?;
        let body = json!({
            "type": "file.completed",
            "timestamp": crate::util::now_rfc3339(),
            "data": {
                "file": f.file,
                "lines": f.completed + f.skipped + f.failed,
                "completed": f.completed,
                "skipped": f.skipped,
                "failed": f.failed,
            }
        })
        .to_string();
        // The same id if a crash makes us announce this file twice.
        let id = ulid::Ulid::from(u128::from_be_bytes(sha2_16(
            format!("file.completed {}", f.file_id).as_bytes(),
        )));
        Some(Message {
            msg_id: crate::vocab::MsgId::from_ulid(id),
            event: "file.completed".into(),
            id: f.file.clone(),
            url,
            body,
            file_id: Default::default(),
            line: 0,
        })
    }

    fn callback_body(&self, rec: &Record) -> String {
        let c = rec.common();
        match rec {
            Record::Done { output, task, .. } => {
                let audio_url = self
                    .audio_base_url
                    .as_ref()
                    .map(|b| format!("{b}{}.wav", task.output_name));
                let mut item = Map::new();
                item.insert("output".into(), json!(output.to_string_lossy()));
                if let Some(u) = audio_url {
                    item.insert("audio_url".into(), json!(u));
                }
                if let Some(d) = wav_seconds(output) {
                    item.insert("duration".into(), json!((d * 1000.0).round() / 1000.0));
                }
                json!({
                    "code": 200,
                    "msg": format!("{} {}", c.id, rec.status()),
                    "data": {"callbackType": "complete", "task_id": c.id, "data": [item]},
                })
            }
            Record::Failed { kind, message, .. } => json!({
                "code": 500,
                "msg": format!("{}: {message}", kind.as_str()),
                "data": {"callbackType": "failed", "task_id": c.id, "data": []},
            }),
        }
        .to_string()
    }
}

fn standard_body(event: &str, rec: &Record) -> String {
    let c = rec.common();
    let mut data = Map::new();
    data.insert("id".into(), json!(c.id));
    data.insert("status".into(), json!(rec.status()));
    data.insert("source".into(), json!(c.source));
    data.insert("trace_id".into(), json!(c.trace_id));
    match rec {
        Record::Done {
            output,
            attempts,
            run_ms,
            task,
            ..
        } => {
            data.insert("output".into(), json!(output.to_string_lossy()));
            data.insert("attempts".into(), json!(attempts));
            data.insert("run_ms".into(), json!(run_ms));
            if let Some(m) = &task.metadata {
                data.insert("metadata".into(), json!(m));
            }
        }
        Record::Failed {
            kind,
            message,
            attempts,
            task,
            ..
        } => {
            data.insert("attempts".into(), json!(attempts));
            data.insert(
                "error".into(),
                json!({"kind": kind.as_str(), "message": message}),
            );
            if let Some(m) = task.as_ref().and_then(|t| t.metadata.as_ref()) {
                data.insert("metadata".into(), json!(m));
            }
        }
    }
    json!({"type": event, "timestamp": crate::util::now_rfc3339(), "data": Value::Object(data)})
        .to_string()
}

pub fn new_msg_id() -> crate::vocab::MsgId {
    crate::vocab::MsgId::new()
}

fn sha2_16(b: &[u8]) -> [u8; 16] {
    use sha2::Digest;
    let d = sha2::Sha256::digest(b);
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

/// Length of a PCM WAV in seconds, from its header.
fn wav_seconds(p: &std::path::Path) -> Option<f64> {
    use std::io::Read;
    let mut head = [0u8; 64];
    let n = std::fs::File::open(p).ok()?.read(&mut head).ok()?;
    let h = &head[..n];
    if n < 44 || &h[0..4] != b"RIFF" {
        return None;
    }
    let byte_rate = u32::from_le_bytes([h[28], h[29], h[30], h[31]]) as f64;
    let len = std::fs::metadata(p).ok()?.len() as f64;
    (byte_rate > 0.0).then(|| (len - 44.0).max(0.0) / byte_rate)
}
