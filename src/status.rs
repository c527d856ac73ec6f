//! `ttspool status`: counts across the spool, or one task's records. Reads
//! only files (the logs, cursors and leases), so it works while daemons run
//! and on any host that mounts the spool.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::Config;
use crate::spool::claim::summary;
use crate::spool::records::RecordLog;
use crate::spool::Spool;

#[derive(Debug, Default, Serialize)]
pub struct Counts {
    pub pending_files: u64,
    pub pending: u64,
    pub in_flight: u64,
    pub in_flight_by_instance: BTreeMap<String, u64>,
    pub completed: u64,
    pub skipped: u64,
    pub failed: u64,
    pub failed_by_kind: BTreeMap<String, u64>,
    /// Lines in the logs that are not records (a torn write).
    pub unreadable_record_lines: u64,
    /// Webhook outcomes by status (delivered, gone, dead, blocked).
    pub webhooks: BTreeMap<String, u64>,
    /// Webhook messages not yet delivered (all daemons' outboxes).
    pub webhook_outbox: u64,
}

pub fn counts(cfg: &Config) -> anyhow::Result<Counts> {
    let spool = Spool::new(&cfg.spool.dir);
    let s = summary(&spool, cfg.limits.max_line_bytes)?;
    let mut c = Counts {
        pending_files: s.pending_files,
        pending: s.pending_lines,
        in_flight: s.in_flight,
        in_flight_by_instance: s.in_flight_by_instance,
        ..Counts::default()
    };
    let log = RecordLog::new(&spool);
    c.unreadable_record_lines = log.read_all(|r, _, _| match r.status.as_str() {
        "completed" => c.completed += 1,
        "skipped" => c.skipped += 1,
        "failed" => {
            c.failed += 1;
            let kind = r
                .error
                .as_ref()
                .and_then(|e| e.get("kind"))
                .and_then(|k| k.as_str())
                .unwrap_or("unknown")
                .to_string();
            *c.failed_by_kind.entry(kind).or_default() += 1;
        }
        _ => {}
    })?;
    for wlog in crate::webhook::deliver::webhooks_logs(&spool) {
        let Ok(f) = std::fs::File::open(&wlog) else {
            continue;
        };
        use std::io::BufRead;
        for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(st) = v.get("status").and_then(|s| s.as_str()) {
                    *c.webhooks.entry(st.to_string()).or_default() += 1;
                }
            }
        }
    }
    c.webhook_outbox = crate::webhook::outbox::depth(&spool);
    Ok(c)
}

pub fn status(cfg: &Config, json: bool, id: Option<&str>) -> anyhow::Result<u8> {
    let spool = Spool::new(&cfg.spool.dir);
    if let Some(id) = id {
        let mut found = Vec::new();
        RecordLog::new(&spool).read_all(|r, text, _| {
            if r.id == id {
                found.push(text.to_string());
            }
        })?;
        if found.is_empty() {
            eprintln!(
                "ttspool: no record for task id {id:?} in {}",
                spool.root.display()
            );
            return Ok(1);
        }
        for f in found {
            if json {
                println!("{f}");
            } else {
                let v: serde_json::Value = serde_json::from_str(&f)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
        return Ok(0);
    }
    let c = counts(cfg)?;
    if json {
        println!("{}", serde_json::to_string(&c)?);
        return Ok(0);
    }
    println!("spool      {}", spool.root.display());
    println!(
        "pending    {} line(s) in {} file(s)",
        c.pending, c.pending_files
    );
    println!("in flight  {}", c.in_flight);
    for (inst, n) in &c.in_flight_by_instance {
        println!("  {inst:<20} {n}");
    }
    println!("completed  {}", c.completed);
    println!("skipped    {}", c.skipped);
    println!("failed     {}", c.failed);
    for (k, n) in &c.failed_by_kind {
        println!("  {k:<20} {n}");
    }
    if c.webhook_outbox > 0 || !c.webhooks.is_empty() {
        println!("webhooks   {} waiting", c.webhook_outbox);
        for (k, n) in &c.webhooks {
            println!("  {k:<20} {n}");
        }
    }
    if c.unreadable_record_lines > 0 {
        println!(
            "warning: {} torn or unreadable line(s) in the record logs were skipped",
            c.unreadable_record_lines
        );
    }
    Ok(0)
}
