//! `ttspool requeue`: failed tasks go back into `pending/` as a new file,
//! and the fact goes into `requeued.jsonl`, so the records still tell the
//! whole story: line → failed record → requeued into file X → its new record.
//!
//! A failed record is requeued once (its `trace_id` is remembered); if the
//! task fails again, its new failed record can be requeued again. Lines that
//! did not parse (`invalid_task` without a `task`) cannot be run as they are
//! and are reported instead.
//!
//! # One step a crash cannot split
//!
//! Everything happens under `.ttspool/requeue.lock`, so two requeues at
//! once are one after the other and the second sees the first's notes. The
//! order is:
//!
//! 1. the new file is written in full as `pending/.requeue-<ulid>.jsonl.tmp`
//!    (a dotfile: no daemon reads it) and fsynced;
//! 2. the note naming it is appended to `requeued.jsonl` and fsynced — the
//!    commit point;
//! 3. the file is renamed to `pending/requeue-<ulid>.jsonl`.
//!
//! A run first puts right what a killed run left: a staged file whose note
//! exists is published (step 3 again); one without a note is removed (its
//! tasks were not requeued and are picked again). So a task is requeued
//! once however often a run is killed or started.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde_json::{json, Value};

use crate::config::Config;
use crate::spool::records::RecordLog;
use crate::spool::Spool;
use crate::util::{failpoint, fsync_dir, now_rfc3339};

/// The log of requeues, beside the record logs.
fn log_path(spool: &Spool) -> std::path::PathBuf {
    spool.root.join("requeued.jsonl")
}

/// The staged name of a requeue file (step 1 of the module doc).
fn staged(name: &str) -> String {
    format!(".{name}.tmp")
}

/// The published name a staged requeue file stands for.
fn published(staged: &str) -> Option<&str> {
    staged
        .strip_prefix(".requeue-")
        .and_then(|s| s.strip_suffix(".jsonl.tmp"))
        .map(|_| &staged[1..staged.len() - 4])
}

/// The file names and trace ids noted in `requeued.jsonl`.
fn read_notes(path: &Path) -> anyhow::Result<(HashSet<String>, HashSet<String>)> {
    let (mut files, mut traces) = (HashSet::new(), HashSet::new());
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((files, traces)),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    // A line torn by a crash does not parse: its requeue never committed.
    for v in text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        if let Some(f) = v["file"].as_str() {
            files.insert(f.to_string());
        }
        for t in v["tasks"].as_array().into_iter().flatten() {
            if let Some(tr) = t["trace_id"].as_str() {
                traces.insert(tr.to_string());
            }
        }
    }
    Ok((files, traces))
}

/// Finishes or undoes what a killed requeue left in `pending/`.
fn reconcile(pending: &Path, noted: &HashSet<String>) -> anyhow::Result<()> {
    let rd = match std::fs::read_dir(pending) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", pending.display())),
    };
    let mut changed = false;
    for ent in rd {
        let ent = ent.with_context(|| format!("cannot list {}", pending.display()))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(target) = published(name) else {
            continue;
        };
        if noted.contains(target) {
            std::fs::rename(ent.path(), pending.join(target))
                .with_context(|| format!("cannot publish {}", ent.path().display()))?;
            eprintln!("note: published pending/{target}, which a requeue that was stopped had noted but not yet published");
        } else {
            std::fs::remove_file(ent.path())
                .with_context(|| format!("cannot remove {}", ent.path().display()))?;
            eprintln!("note: removed {name}, left by a requeue stopped before it noted its tasks (they are picked again)");
        }
        changed = true;
    }
    if changed {
        fsync_dir(pending)?;
    }
    Ok(())
}

pub fn requeue(cfg: &Config, all: bool, kind: Option<&str>, ids: &[String]) -> anyhow::Result<u8> {
    let spool = Spool::new(&cfg.spool.dir);
    if !spool.root.is_dir() {
        anyhow::bail!(
            "spool.dir {} does not exist (or is not a folder); nothing was ever recorded there",
            spool.root.display()
        );
    }
    let log_path = log_path(&spool);
    let pending = spool.pending();
    std::fs::create_dir_all(spool.state())
        .with_context(|| format!("cannot create {}", spool.state().display()))?;
    // Held to the end: a second requeue waits, then sees our notes.
    let _lock = crate::util::lock_sidecar(&spool.state().join("requeue.lock"), || None)?;
    let (noted, done_before) = read_notes(&log_path)?;
    reconcile(&pending, &noted)?;
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut picked: Vec<Value> = Vec::new();
    let mut unrunnable = 0;
    let mut seen_ids = HashSet::new();
    RecordLog::new(&spool).read_all(|r, text, is_done| {
        if is_done || r.status != "failed" {
            return;
        }
        seen_ids.insert(r.id.clone());
        let kind_ok =
            kind.is_none_or(|k| r.error.as_ref().and_then(|e| e["kind"].as_str()) == Some(k));
        let id_ok = wanted.is_empty() || wanted.contains(r.id.as_str());
        if !(all || kind.is_some() || !wanted.is_empty()) || !kind_ok || !id_ok {
            return;
        }
        if done_before.contains(r.trace_id.as_str()) {
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return;
        };
        if v.get("task").is_none() {
            unrunnable += 1;
            return;
        }
        picked.push(v);
    })?;
    let unknown: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|i| !seen_ids.contains(*i))
        .collect();
    if !unknown.is_empty() {
        eprintln!(
            "ttspool: no failed record for task id(s): {}",
            unknown.join(", ")
        );
    }
    if unrunnable > 0 {
        eprintln!(
            "note: {unrunnable} failed line(s) did not parse as tasks (invalid_task); fix them and use `ttspool submit`"
        );
    }
    if picked.is_empty() {
        println!("nothing to requeue");
        return Ok(if unknown.is_empty() { 0 } else { 1 });
    }
    std::fs::create_dir_all(&pending)?;
    let name = format!(
        "requeue-{}.jsonl",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    let tmp = pending.join(staged(&name));
    let mut body = String::new();
    let mut lost_callbacks = 0;
    for v in &picked {
        let mut task = v["task"].clone();
        // Records keep callback_url without its query and user info (they
        // may hold a token); the full URL comes from the source line.
        if let Some(recorded) = task["callback_url"].as_str().map(String::from) {
            match original_callback(&spool, &v["source"], &recorded) {
                Some(full) => task["callback_url"] = Value::String(full),
                None => lost_callbacks += 1,
            }
        }
        body.push_str(&task.to_string());
        body.push('\n');
    }
    if lost_callbacks > 0 {
        eprintln!(
            "note: {lost_callbacks} task(s) keep callback_url as recorded, without a query string or credentials, \
             because their source line is gone from pending/ and pending/.consumed/"
        );
    }
    {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(body.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
    }
    fsync_dir(&pending)?;
    failpoint("requeue-staged");
    let entry = json!({
        "v": 1,
        "requeued_at": now_rfc3339(),
        "file": name,
        "tasks": picked.iter().enumerate().map(|(i, v)| json!({
            "id": v["id"],
            "trace_id": v["trace_id"],
            "kind": v["error"]["kind"],
            "from": v["source"],
            "line": i + 1,
        })).collect::<Vec<_>>(),
    });
    RecordLog::append_locked(&log_path, &[format!("{entry}\n")])
        .with_context(|| format!("cannot write {}", log_path.display()))?;
    failpoint("requeue-noted");
    std::fs::rename(&tmp, pending.join(&name))
        .with_context(|| format!("cannot publish {}", tmp.display()))?;
    fsync_dir(&pending)?;
    println!("requeued {} task(s) as pending/{name}", picked.len());
    Ok(if unknown.is_empty() { 0 } else { 1 })
}

/// The full `callback_url` of a record's source line, read from the file in
/// `pending/` or `pending/.consumed/`, if that line still holds a URL whose
/// redacted form is the recorded one.
fn original_callback(spool: &Spool, source: &Value, recorded: &str) -> Option<String> {
    use std::io::BufRead;
    let file = source["file"].as_str()?;
    let line = source["line"].as_u64()?;
    if file.contains('/') || line == 0 {
        return None;
    }
    [spool.pending().join(file), spool.consumed().join(file)]
        .iter()
        .find_map(|p| {
            let f = crate::spool::scan::open_regular(p).ok()?;
            let text = std::io::BufReader::new(f)
                .split(b'\n')
                .nth(line as usize - 1)?
                .ok()?;
            let v: Value = serde_json::from_slice(&text).ok()?;
            let full = v["callback_url"].as_str()?;
            (crate::redact::url(full) == recorded).then(|| full.to_string())
        })
}
