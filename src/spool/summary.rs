//! What `ttspool status` shows about the spool's unfinished lines: read
//! only, matching files with their sidecars as a claim would.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io;
use std::time::SystemTime;

use serde::Serialize;

use super::ident::{self, Probe};
use super::lines::{LineReader, Next};
use super::locks::Where;
use super::records::{Pos, RecordLog};
use super::scan::scan_all;
use super::sidecar::{list_leases, read_cursor, read_lease};
use super::Spool;
use crate::vocab::FileId;

/// What `status` shows about the spool's unfinished lines.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub pending_files: u64,
    /// Entries of `pending/` that are not read: symlinks, FIFOs, devices,
    /// folders.
    pub rejected_files: u64,
    pub pending_lines: u64,
    pub in_flight: u64,
    pub in_flight_by_instance: BTreeMap<String, u64>,
    /// Modification time of the oldest file that still has unclaimed lines.
    #[serde(skip)]
    pub oldest_pending: Option<SystemTime>,
}

/// Counts unclaimed lines (streaming) and claimed-but-unrecorded ones.
/// Reads only: files are matched with their sidecars as a claim would.
pub fn summary(spool: &Spool, max_line_bytes: usize) -> io::Result<Summary> {
    let mut s = Summary::default();
    let pending = spool.pending();
    let entries = match scan_all(&pending) {
        Ok(found) => {
            s.rejected_files = found.rejected.len() as u64;
            found.files
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let here = Where::here(&spool.root, None)?;
    let mount = ident::mount_tag(&here.boot_id, here.dev);
    let mut known = BTreeMap::new();
    if let Ok(rd) = fs::read_dir(spool.files()) {
        for d in rd.flatten() {
            let key = d.file_name().to_string_lossy().into_owned();
            if let Some(id) = ident::read(&d.path()).or_else(|| ident::legacy(&key, &mount)) {
                known.insert(key, id);
            }
        }
    }
    // One file open at a time, however many wait (a busy API asks often).
    let mut opened = Vec::new();
    for e in entries {
        s.pending_files += 1;
        let Ok(f) = super::scan::open_regular(&pending.join(&e.name)) else {
            continue;
        };
        let Ok(p) = Probe::read(&e.name, &f) else {
            continue;
        };
        opened.push((e, p));
    }
    let probes: Vec<Probe> = opened.iter().map(|(_, p)| p.clone()).collect();
    let keys = ident::assign(&probes, &known, &mount);
    for ((e, p), key) in opened.into_iter().zip(keys) {
        let Ok(Some(f)) = super::claim::reopen(&pending.join(&e.name), p.ino) else {
            continue; // gone or replaced meanwhile
        };
        let dir = key
            .filter(|k| known[k].head_matches(&p))
            .map(|k| spool.files().join(k));
        let mut cur = dir
            .as_ref()
            .and_then(|d| read_cursor(&d.join("cursor")).ok())
            .filter(|c| c.offset <= p.size)
            .unwrap_or_default();
        // A claim killed between its lease and its cursor: the lease's
        // lines are in flight, not pending.
        for lp in dir
            .map(|d| list_leases(&d).unwrap_or_default())
            .unwrap_or_default()
        {
            if let Some(doc) = read_lease(&lp).filter(|d| d.gen == cur.gen) {
                if doc.end_off > cur.offset && doc.end_off <= p.size {
                    (cur.offset, cur.line) = (doc.end_off, doc.end_line);
                }
            }
        }
        let mut r = LineReader::open(f, cur.offset, cur.line, max_line_bytes)?;
        let before = s.pending_lines;
        while let Next::Line(l) = r.next(true)? {
            if !l.is_blank() {
                s.pending_lines += 1;
            }
        }
        if s.pending_lines > before && s.oldest_pending.is_none_or(|t| e.mtime < t) {
            s.oldest_pending = Some(e.mtime);
        }
    }
    let mut leases = Vec::new();
    if let Ok(rd) = fs::read_dir(spool.files()) {
        for d in rd.flatten() {
            leases.extend(
                list_leases(&d.path())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|lp| read_lease(lp)),
            );
        }
    }
    // A daemon killed after a record and before deleting its lease leaves
    // lines that are done: only those without a record are in flight.
    let mut recorded = HashSet::new();
    if let Some(from) = leases.iter().map(|d| d.pos).reduce(Pos::earliest) {
        let wanted: HashSet<FileId> = leases.iter().map(|d| d.file_id()).collect();
        RecordLog::new(spool).read_since(from, |r, _, _| {
            if wanted.contains(&r.file_id) {
                recorded.insert((r.file_id, r.source.line));
            }
        })?;
    }
    for doc in leases {
        let id = doc.file_id();
        let n = doc
            .lines
            .iter()
            .filter(|&&l| !recorded.contains(&(id.clone(), l)))
            .count() as u64;
        if doc.released {
            // Handed back by a daemon that stopped: waiting for anyone.
            s.pending_lines += n;
        } else if n > 0 {
            s.in_flight += n;
            *s.in_flight_by_instance.entry(doc.instance).or_default() += n;
        }
    }
    Ok(s)
}
