//! Accepted tasks become lines in a file in `pending/`, durably, before the
//! 202: a temp name, the lines, fsync, rename, fsync of the folder.
//!
//! Group commit: one thread writes whatever requests are waiting when it
//! comes round into one file with one fsync, so concurrent requests share
//! the cost, and no request waits for companions — a group is only what
//! queued up while the last one was being written.
//!
//! Idempotency keys live in `.ttspool/api/keys/<sha256 of key>` (shared by
//! every daemon on the spool): created with `O_EXCL` before the lines are
//! written (so two requests with one key, on any hosts, write once), then
//! completed with the answer.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;
use tracing::warn;

use crate::spool::Spool;
use crate::util::{atomic_write, create_exclusive, fsync_dir};

/// Where a request's lines went: the file and the number of its first line.
#[derive(Debug, Clone)]
pub struct Placed {
    pub file: String,
    pub first_line: u64,
}

type Job = (Vec<String>, oneshot::Sender<Result<Placed, String>>);

/// The group-commit writer.
#[derive(Clone)]
pub struct Publisher {
    tx: std::sync::mpsc::Sender<Job>,
}

impl Publisher {
    pub fn start(spool: &Spool) -> Publisher {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let pending = spool.pending();
        std::thread::Builder::new()
            .name("ttspool-api-writer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut group = vec![first];
                    while let Ok(j) = rx.try_recv() {
                        group.push(j);
                        if group.len() >= 4096 {
                            break;
                        }
                    }
                    let lines: Vec<&String> = group.iter().flat_map(|(l, _)| l).collect();
                    match write_group(&pending, &lines) {
                        Ok(file) => {
                            let mut line = 1;
                            for (l, reply) in group {
                                let n = l.len() as u64;
                                let _ = reply.send(Ok(Placed {
                                    file: file.clone(),
                                    first_line: line,
                                }));
                                line += n;
                            }
                        }
                        Err(e) => {
                            for (_, reply) in group {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                    }
                }
            })
            .expect("the API writer thread starts");
        Publisher { tx }
    }

    /// Writes `lines` (each one JSON object, no line end) durably into
    /// `pending/`, with whatever other requests are waiting.
    pub async fn publish(&self, lines: Vec<String>) -> Result<Placed, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((lines, tx))
            .map_err(|_| "the API writer stopped".to_string())?;
        rx.await.map_err(|_| "the API writer stopped".to_string())?
    }
}

/// One group: `pending/.api-<ulid>.tmp` → fsync → `pending/api-<ulid>.jsonl`
/// → fsync of the folder. Returns the file's name. On failure nothing is
/// left behind.
fn write_group(pending: &Path, lines: &[&String]) -> Result<String, String> {
    let id = ulid::Ulid::new().to_string().to_lowercase();
    let tmp = pending.join(format!(".api-{id}.tmp"));
    let name = format!("api-{id}.jsonl");
    let write = || -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for l in lines {
            buf.extend_from_slice(l.as_bytes());
            buf.push(b'\n');
        }
        // 0600: a task's callback_url may carry its receiver's token.
        let mut f = std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new().write(true).create_new(true),
            0o600,
        )
        .open(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, pending.join(&name))?;
        fsync_dir(pending)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!(
            "cannot write tasks into {}: {}",
            pending.display(),
            crate::util::io_msg(&e)
        )
    })?;
    Ok(name)
}

/// What an idempotency key's file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyDoc {
    /// SHA-256 of the body the key was first used with.
    body: String,
    /// Seconds since the epoch, when the key was first used.
    at: u64,
    /// The answer, once the lines are written.
    #[serde(default)]
    answer: Option<Value>,
}

/// Idempotency keys in the spool.
#[derive(Clone)]
pub struct Keys {
    dir: PathBuf,
    ttl: Duration,
}

/// What a key says about a request.
pub enum KeyState {
    /// First use: write the lines, then [`Keys::done`] (or [`Keys::forget`]).
    Fresh(PathBuf),
    /// Used before with this body: here is the answer.
    Answered(Value),
    /// Used before with another body.
    OtherBody,
}

/// How long a key may say "being written" before its writer is taken for
/// dead (a crash between the key and the answer).
const WRITING_STALE: Duration = Duration::from_secs(30);

impl Keys {
    pub fn new(spool: &Spool, ttl: Duration) -> Keys {
        Keys {
            dir: spool.state().join("api").join("keys"),
            ttl,
        }
    }

    /// Looks `key` up for a body with hash `body`; waits (bounded) while
    /// another request with the same key is being written.
    pub async fn begin(&self, key: &str, body: &str) -> Result<KeyState, String> {
        let path = self.dir.join(crate::spool::ident::digest(key.as_bytes()));
        let io = |e: std::io::Error| {
            format!(
                "cannot keep idempotency keys in {}: {}",
                self.dir.display(),
                crate::util::io_msg(&e)
            )
        };
        let fresh = KeyDoc {
            body: body.to_string(),
            at: now_secs(),
            answer: None,
        };
        for _ in 0..200 {
            let bytes = serde_json::to_vec(&fresh).expect("serializes");
            let created = match create_exclusive(&path, &bytes) {
                // The first key on this spool: make the folder once.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(&self.dir).map_err(io)?;
                    create_exclusive(&path, &bytes)
                }
                other => other,
            };
            if created.map_err(io)? {
                return Ok(KeyState::Fresh(path));
            }
            let doc: Option<KeyDoc> = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let Some(doc) = doc else {
                // Torn by a crash, or removed meanwhile: start over.
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let age = now_secs().saturating_sub(doc.at);
            if age > self.ttl.as_secs() {
                let _ = std::fs::remove_file(&path); // expired
                continue;
            }
            if doc.body != body {
                return Ok(KeyState::OtherBody);
            }
            if let Some(a) = doc.answer {
                return Ok(KeyState::Answered(a));
            }
            if age > WRITING_STALE.as_secs() {
                let _ = std::fs::remove_file(&path); // its writer died
                continue;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("another request with this Idempotency-Key is still being written; retry".into())
    }

    /// The lines are written: the key answers `answer` from now on.
    pub fn done(&self, path: &Path, body: &str, answer: &Value) {
        let doc = KeyDoc {
            body: body.to_string(),
            at: now_secs(),
            answer: Some(answer.clone()),
        };
        if let Err(e) = atomic_write(path, &serde_json::to_vec(&doc).expect("serializes")) {
            warn!(
                "cannot complete idempotency key {}: {}",
                path.display(),
                crate::util::io_msg(&e)
            );
        }
    }

    /// Nothing was written: the key is free again.
    pub fn forget(&self, path: &Path) {
        let _ = std::fs::remove_file(path);
    }

    /// Deletes keys older than the TTL; returns how many.
    pub fn expire(&self) -> usize {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let limit = SystemTime::now() - self.ttl;
        let mut n = 0;
        for e in rd.flatten() {
            if e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < limit)
                && std::fs::remove_file(e.path()).is_ok()
            {
                n += 1;
            }
        }
        n
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
