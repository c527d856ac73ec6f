//! `ttspool status`: counts across the spool, or one task's records. Reads
//! only files (the logs, cursors and leases), so it works while daemons run
//! and on any host that mounts the spool.

use crate::config::Config;
use crate::report::counts;
use crate::spool::records::RecordLog;
use crate::spool::Spool;

pub fn status(cfg: &Config, json: bool, watch: bool, id: Option<&str>) -> anyhow::Result<u8> {
    let root = &cfg.spool.dir;
    if !root.is_dir() {
        anyhow::bail!(
            "spool.dir {} does not exist (or is not a folder): no daemon has run on it yet, or the config names another spool",
            root.display()
        );
    }
    if !watch || id.is_some() {
        return status_once(cfg, json, id);
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        if tty {
            print!("\x1b[2J\x1b[H"); // clear the screen, cursor home
        }
        status_once(cfg, json, None)?;
        if !tty && !json {
            println!("--");
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

fn status_once(cfg: &Config, json: bool, id: Option<&str>) -> anyhow::Result<u8> {
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
    if c.rejected_files > 0 {
        println!(
            "rejected   {} entr(ies) in pending/ not read (symlinks, FIFOs, folders, ...; see the log)",
            c.rejected_files
        );
    }
    println!("in flight  {}", c.in_flight);
    for (inst, n) in &c.in_flight_by_instance {
        println!("  {inst:<20} {n}");
    }
    println!("completed  {}", c.completed);
    println!("skipped    {}", c.skipped);
    println!("failed     {}", c.failed);
    if let Some(r) = c.success_rate {
        println!("success    {:.1} %", r * 100.0);
    }
    println!(
        "rate       {:.1}/min (5 min), {:.1}/min (1 h)",
        c.tasks_per_min_5m, c.tasks_per_min_1h
    );
    if let Some(age) = c.oldest_pending_secs {
        println!(
            "oldest     pending line waiting {}",
            humantime::format_duration(std::time::Duration::from_secs(age))
        );
    }
    for (k, n) in &c.failed_by_kind {
        println!("  {k:<20} {n}");
    }
    if c.webhook_outbox > 0 || !c.webhooks.is_empty() {
        println!("webhooks   {} waiting", c.webhook_outbox);
        for (k, n) in &c.webhooks {
            println!("  {k:<20} {n}");
        }
    }
    for (inst, slots) in &c.paused_slots {
        println!("paused     {inst}: slot(s) {slots:?} (their engine kept failing; see the log)");
    }
    if c.swept_files > 0 {
        println!(
            "swept      {} leftover temp file(s) and engine scratch, {} bytes",
            c.swept_files, c.swept_bytes
        );
    }
    if c.unreadable_record_lines > 0 {
        println!(
            "warning: {} torn or unreadable line(s) in the record logs were skipped",
            c.unreadable_record_lines
        );
    }
    Ok(0)
}
