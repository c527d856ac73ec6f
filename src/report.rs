//! The spool's figures, as `ttspool status --json` prints them and
//! `GET /v1/status` answers: pending and in-flight lines, records by
//! outcome, webhooks, what the sweeps removed. Reads only files, so it works
//! while daemons run and on any host that mounts the spool.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::Config;
use crate::spool::claim::summary;
use crate::spool::records::RecordLog;
use crate::spool::Spool;

#[derive(Debug, Default, Serialize)]
pub struct Counts {
    pub pending_files: u64,
    /// Entries of `pending/` that are never read (symlinks, FIFOs, ...).
    pub rejected_files: u64,
    pub pending: u64,
    /// The same as `pending` (unclaimed task lines), by its longer name.
    pub pending_lines: u64,
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
    /// Slots each daemon's breaker holds paused (their engine kept
    /// failing), by instance; daemons with none are left out.
    pub paused_slots: BTreeMap<String, Vec<u64>>,
    /// (completed + skipped) / all records; null before the first record.
    pub success_rate: Option<f64>,
    /// Records finished per minute over the last 5 minutes and the last hour.
    pub tasks_per_min_5m: f64,
    pub tasks_per_min_1h: f64,
    /// Age in seconds of the oldest pending file that still has unclaimed lines.
    pub oldest_pending_secs: Option<u64>,
    /// Temp files and engine scratch that killed runs left, removed by the
    /// sweeps of every daemon on the spool (in total, and their bytes).
    pub swept_files: u64,
    pub swept_bytes: u64,
}

pub fn counts(cfg: &Config) -> anyhow::Result<Counts> {
    let spool = Spool::new(&cfg.spool.dir);
    let s = summary(&spool, cfg.limits.max_line_bytes)?;
    let now = time::OffsetDateTime::now_utc();
    let (mut last5, mut last60) = (0u64, 0u64);
    let mut c = Counts {
        oldest_pending_secs: s
            .oldest_pending
            .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
            .map(|d| d.as_secs()),
        pending_files: s.pending_files,
        rejected_files: s.rejected_files,
        pending: s.pending_lines,
        pending_lines: s.pending_lines,
        in_flight: s.in_flight,
        in_flight_by_instance: s.in_flight_by_instance,
        ..Counts::default()
    };
    let log = RecordLog::new(&spool);
    c.unreadable_record_lines = log.read_all(|r, _, _| {
        if let Ok(t) = time::OffsetDateTime::parse(
            &r.finished_at,
            &time::format_description::well_known::Rfc3339,
        ) {
            let age = (now - t).whole_seconds();
            if age <= 300 {
                last5 += 1;
            }
            if age <= 3600 {
                last60 += 1;
            }
        }
        match r.status.as_str() {
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
        }
    })?;
    let all = c.completed + c.skipped + c.failed;
    c.success_rate = (all > 0).then(|| (c.completed + c.skipped) as f64 / all as f64);
    c.tasks_per_min_5m = last5 as f64 / 5.0;
    c.tasks_per_min_1h = last60 as f64 / 60.0;
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
    if let Ok(rd) = std::fs::read_dir(spool.instances()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(inst) = name.strip_suffix(".slots") else {
                continue;
            };
            let paused: Vec<u64> = std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| {
                    v["paused"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
                })
                .unwrap_or_default();
            if !paused.is_empty() {
                c.paused_slots.insert(inst.to_string(), paused);
            }
        }
    }
    for (_, st) in crate::engine::sweep::all_stats(&spool.root) {
        c.swept_files += st.total_files;
        c.swept_bytes += st.total_bytes;
    }
    Ok(c)
}
