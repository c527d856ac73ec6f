//! `ttspool requeue`: failed tasks go back into `pending/` as a new file,
//! and the fact goes into `requeued.jsonl`, so the records still tell the
//! whole story: line → failed record → requeued into file X → its new record.
//!
//! A failed record is requeued once (its `trace_id` is remembered); if the
//! task fails again, its new failed record can be requeued again. Lines that
//! did not parse (`invalid_task` without a `task`) cannot be run as they are
//! and are reported instead.

use std::collections::HashSet;
use std::io::Write;

use anyhow::Context;
use serde_json::{json, Value};

use crate::config::Config;
use crate::spool::records::RecordLog;
use crate::spool::Spool;
use crate::util::{fsync_dir, now_rfc3339};

pub fn requeue(cfg: &Config, all: bool, kind: Option<&str>, ids: &[String]) -> anyhow::Result<u8> {
    let spool = Spool::new(&cfg.spool.dir);
    let log_path = spool.root.join("requeued.jsonl");
    let mut done_before = HashSet::new();
    if let Ok(text) = std::fs::read_to_string(&log_path) {
        for line in text.lines() {
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                for t in v["tasks"].as_array().into_iter().flatten() {
                    if let Some(tr) = t["trace_id"].as_str() {
                        done_before.insert(tr.to_string());
                    }
                }
            }
        }
    }
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
    // Publish like `submit`: hidden temp in pending/, fsync, rename.
    let pending = spool.pending();
    std::fs::create_dir_all(&pending)?;
    let name = format!(
        "requeue-{}.jsonl",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    let tmp = pending.join(format!(".{name}.tmp"));
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
        f.write_all(body.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, pending.join(&name))?;
    fsync_dir(&pending)?;
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
    crate::spool::records::RecordLog::append_locked(&log_path, &[format!("{entry}\n")])
        .with_context(|| format!("cannot write {}", log_path.display()))?;
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
