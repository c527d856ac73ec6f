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
        if done_before.contains(&r.trace_id) {
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
    for v in &picked {
        body.push_str(&v["task"].to_string());
        body.push('\n');
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
