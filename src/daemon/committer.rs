//! The committer thread: records to disk, grouped.
//!
//! Whatever records are ready are appended under the records lock in one
//! write and one fsync per log (and, while records stream in, a record
//! waits up to 10 ms for companions, like PostgreSQL's `commit_delay`). A
//! record is written only if its lease still carries the token it was
//! claimed with (fencing); webhook messages go to the outbox with it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::info;

use super::core::{Commit, Event};
use crate::spool::claim::{self, CommitOutcome};
use crate::spool::records::RecordLog;
use crate::vocab::Record;
use crate::webhook::deliver;
use crate::webhook::outbox::Outbox;
use crate::webhook::Settings;

/// What the record committer (and the shell) need to queue webhooks.
#[derive(Clone)]
pub struct Webhooks {
    pub settings: Arc<std::sync::RwLock<Arc<Settings>>>,
    pub outbox: Arc<Outbox>,
    pub tx: mpsc::UnboundedSender<deliver::Cmd>,
}

/// How soon after the last group a record counts as part of a busy stream.
const GROUP_BUSY: Duration = Duration::from_millis(50);
/// How long a busy stream's record waits for others to share its fsyncs.
/// At 2 ms a group held one or two records of a millisecond engine; at 10
/// ms it holds about ten, and the daemon's own CPU per task went down by
/// about a fifteenth (paired runs of the dispatch benchmark's cp tasks,
/// 2026-11-22). Ten milliseconds more before a record is durable is nothing
/// next to a TTS task.
const GROUP_WAIT: Duration = Duration::from_millis(10);
/// A group at least this big does not wait for more.
const GROUP_ENOUGH: usize = 64;

/// The committer thread: group commit of records, then report them durable.
pub fn committer(
    log: RecordLog,
    rx: std::sync::mpsc::Receiver<Commit>,
    tx: mpsc::UnboundedSender<Event>,
    webhooks: Webhooks,
    once: bool,
) {
    // Records are not on the path to the next task's start.
    if let Err(e) = crate::util::run_in_background() {
        tracing::debug!("cannot lower the record writer's priority: {e}");
    }
    let mut last_group: Option<std::time::Instant> = None;
    while let Ok(first) = rx.recv() {
        // A record that comes soon after the last group means tasks are
        // finishing fast: give its companions a moment to join, so a fast
        // engine pays a few fsyncs per group rather than per task (the idea
        // of PostgreSQL's commit_delay). After a quiet spell a record is
        // written at once.
        let busy = last_group.is_some_and(|t| t.elapsed() < GROUP_BUSY);
        let until = std::time::Instant::now() + if busy { GROUP_WAIT } else { Duration::ZERO };
        let mut batch = vec![first];
        while batch.len() < 4096 {
            // A group this big already shares its fsyncs well: take only
            // what is ready.
            let left = if batch.len() < GROUP_ENOUGH {
                until.saturating_duration_since(std::time::Instant::now())
            } else {
                Duration::ZERO
            };
            match rx.recv_timeout(left) {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        last_group = Some(std::time::Instant::now());
        // A full disk is a pause: the group stays in memory and is written
        // again (all or nothing) until it fits. `--once` gives up instead.
        let mut wait = Duration::from_secs(1);
        let mut fd_wait: Option<Duration> = None;
        let res = loop {
            match write_batch(&log, &batch, &webhooks) {
                Err(e) if crate::util::is_disk_full(&e) && !once => {
                    let bytes = batch.iter().map(|c| c.record.to_line().len() as u64).sum();
                    let _ = tx.send(Event::DiskFull {
                        what: crate::util::io_msg(&e),
                        needed: bytes,
                    });
                    // Until the wait is over, or the file system shows room.
                    let until = std::time::Instant::now() + wait;
                    let dir = log.done.parent().unwrap_or(std::path::Path::new("."));
                    while std::time::Instant::now() < until
                        && crate::util::free_bytes(dir).is_none_or(|f| f <= bytes * 2 + 64 * 1024)
                    {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
                // Out of descriptors (a burst of API connections, say):
                // the group waits in memory and is written again; never an
                // exit with lines in flight.
                Err(e) if crate::util::is_out_of_descriptors(&e) => {
                    crate::util::warn_out_of_descriptors(&format!(
                        "cannot write records: {}",
                        crate::util::io_msg(&e)
                    ));
                    let w = fd_wait.get_or_insert(Duration::from_millis(100));
                    std::thread::sleep(*w);
                    *w = (*w * 2).min(Duration::from_secs(5));
                }
                other => break other,
            }
        };
        if fd_wait.take().is_some() && res.is_ok() {
            tracing::info!("records are written again");
        }
        match res {
            Ok(written) => {
                let list = batch
                    .into_iter()
                    .zip(written)
                    .map(|(c, w)| (c.record, c.lease, c.line, w))
                    .collect();
                let _ = tx.send(Event::Committed(list));
            }
            Err(e) => {
                let _ = tx.send(Event::CommitFailed(crate::util::io_msg(&e)));
                return;
            }
        }
    }
}

/// Appends a batch under the records lock, leaving out records whose lease
/// another daemon has taken over (it re-runs those lines itself). First the
/// folders of the batch's new outputs are fsynced, once each, so every
/// `completed` record points at a rename that is already durable.
fn write_batch(
    log: &RecordLog,
    batch: &[Commit],
    webhooks: &Webhooks,
) -> std::io::Result<Vec<CommitOutcome>> {
    let mut dirs: Vec<&std::path::Path> = batch
        .iter()
        .filter_map(|c| match &c.record {
            Record::Done {
                skipped: false,
                output,
                ..
            } => output.parent(),
            _ => None,
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        crate::util::fsync_dir(d)?;
    }
    let _g = log.lock()?;
    if log.maybe_rotate_locked()? {
        info!("record logs rotated");
    }
    let before = log.sizes();
    let mut ours: HashMap<&PathBuf, CommitOutcome> = HashMap::new();
    let mut done = Vec::new();
    let mut failed = Vec::new();
    let mut written = Vec::with_capacity(batch.len());
    let mut messages = Vec::new();
    let settings = webhooks.settings.read().expect("settings").clone();
    for c in batch {
        let outcome = match ours.get(&c.lease) {
            Some(o) => *o,
            None => {
                let o = if claim::still_ours(&c.lease, &c.token)? {
                    CommitOutcome::Durable
                } else {
                    CommitOutcome::Fenced
                };
                *ours.entry(&c.lease).or_insert(o)
            }
        };
        written.push(outcome);
        if outcome == CommitOutcome::Durable {
            let line = c.record.to_line();
            if c.record.is_done() {
                done.push(line);
            } else {
                failed.push(line);
            }
            messages.extend(settings.for_record(&c.record));
        }
    }
    // The messages are durable before their records, and deliverable only
    // after them (see webhook/outbox.rs for why a crash in between is safe).
    let pending = if messages.is_empty() {
        None
    } else {
        Some(webhooks.outbox.write(&messages, Some(log.position()))?)
    };
    // All or nothing, so that a group written again after a full disk
    // cannot double a record: undo what half of it did.
    let appended = RecordLog::append_locked(&log.done, &done)
        .and_then(|()| RecordLog::append_locked(&log.failed, &failed));
    if let Err(e) = appended {
        let _ = RecordLog::truncate_locked(&log.done, before.0);
        if let Some(p) = &pending {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    if let Some(p) = pending {
        let seg = Outbox::promote(&p)?;
        let _ = webhooks.tx.send(deliver::Cmd::Segment(seg));
    }
    Ok(written)
}
