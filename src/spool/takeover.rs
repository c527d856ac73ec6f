//! Taking over the leases of daemons that died (or handed them back), and
//! our own previous run's: the lines without a record run again, read from
//! the producer file wherever its sidecar says it is now.
//!
//! A lease whose owner died is rewritten with a new owner and token; then,
//! under the records lock, the logs are read from the position noted in the
//! lease to find the lines that already have a record. So a crash between
//! "record durable" and "lease deleted" produces no second record, and a
//! record the old owner was writing is either seen here or refused (it
//! checks its token under the same lock; fence.rs).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::Path;

use super::claim::{io_err, ClaimError, Claimed, Claimer, Gone, Held};
use super::ident::{self, Probe};
use super::lines::{Line, LineReader, Next};
use super::scan::scan;
use super::sidecar::{
    lease_start, list_leases, load_lease, read_cursor, write_cursor, Cursor, LeaseDoc,
};
use crate::util::atomic_write;

/// The sidecar keys of the files in `pending/`, from a listing under the
/// claim lock; `complete` when every file there could be identified (else a
/// sidecar not named may still be some file's, and none is dropped).
struct Present {
    keys: HashSet<String>,
    complete: bool,
}

impl Claimer {
    /// Takes over leases whose owner is gone (or that were handed back), and
    /// returns them with the lines that still need a record. Also writes our
    /// heartbeat and removes sidecar folders of files that are gone.
    pub fn take_over(&mut self) -> Result<Vec<(Held, Vec<Claimed>)>, ClaimError> {
        self.take_over_with(|| {})
    }

    /// [`Claimer::take_over`], with `before_lock` run just before the claim
    /// lock is taken (see [`Claimer::claim_with`]).
    pub fn take_over_with(
        &mut self,
        before_lock: impl FnOnce(),
    ) -> Result<Vec<(Held, Vec<Claimed>)>, ClaimError> {
        self.heartbeat()?;
        let pending = self.spool.pending();
        before_lock();
        let lock = self.lock_claims()?;
        // Listed under the lock: a listing from before it may miss a file
        // another daemon brought back meanwhile, and its sidecar would look
        // orphaned.
        let res = scan(&pending)
            .map_err(io_err("list", &pending))
            .and_then(|entries| {
                let mut errors = Vec::new();
                let found = self.identify(entries, &mut errors)?;
                let present = Present {
                    keys: found.into_iter().map(|f| f.key).collect(),
                    complete: errors.is_empty(),
                };
                self.take_over_locked(&present)
            });
        lock.release()?;
        res
    }

    fn take_over_locked(
        &mut self,
        present: &Present,
    ) -> Result<Vec<(Held, Vec<Claimed>)>, ClaimError> {
        // Claims only happen under `&mut self`, so this snapshot is complete.
        let held = self.held.lock().expect("held set").clone();
        let mut out = Vec::new();
        let mut ages: HashMap<String, bool> = HashMap::new();
        let files = self.spool.files();
        for dent in fs::read_dir(&files).map_err(io_err("list", &files))? {
            let dent = dent.map_err(io_err("list", &files))?;
            let dir = dent.path();
            let key = dent.file_name().to_string_lossy().into_owned();
            let leases = list_leases(&dir)?;
            if leases.is_empty() {
                if present.complete && !present.keys.contains(&key) {
                    if let Err(e) = self.drop_sidecar(&key, &dir) {
                        tracing::warn!("{e}"); // kept; looked at again next time
                    }
                }
                continue;
            }
            for lp in leases {
                if held.contains(&lp) {
                    continue;
                }
                let doc = match load_lease(&lp) {
                    Ok(doc) => doc,
                    Err(e) => {
                        tracing::warn!("{e}; looked at again next time");
                        continue;
                    }
                };
                let Some(doc) = doc else {
                    let cur = read_cursor(&dir.join("cursor"))?;
                    if lease_start(&lp).is_some_and(|(g, l)| g != cur.gen || l > cur.line) {
                        tracing::warn!(lease = %lp.display(), "removing a lease torn by a crash while claiming");
                        let _ = fs::remove_file(&lp);
                    } else {
                        tracing::error!(lease = %lp.display(), "unreadable lease inside the claimed range; leaving it for an operator");
                    }
                    continue;
                };
                let take = if doc.released || doc.instance == self.instance {
                    true
                } else {
                    *ages
                        .entry(doc.instance.clone())
                        .or_insert_with(|| self.is_dead(&doc.instance))
                };
                if take {
                    match self.take_lease(&lp, &dir, doc) {
                        Ok(Some(t)) => out.push(t),
                        Ok(None) => {}
                        // What was taken so far is returned with the rest
                        // next time; a full disk is the daemon's to report.
                        Err(e) if e.is_disk_full() => return Ok(out),
                        Err(e) => tracing::error!("{e}"),
                    }
                }
            }
        }
        Ok(out)
    }

    fn take_lease(
        &mut self,
        lp: &Path,
        dir: &Path,
        old: LeaseDoc,
    ) -> Result<Option<(Held, Vec<Claimed>)>, ClaimError> {
        let doc = LeaseDoc {
            instance: self.instance.clone(),
            token: ulid::Ulid::new().to_string(),
            pid: std::process::id(),
            released: false,
            ..old.clone()
        };
        atomic_write(lp, &serde_json::to_vec(&doc).expect("lease serializes"))
            .map_err(io_err("take over", lp))?;
        self.held.lock().expect("held set").insert(lp.to_path_buf());
        tracing::info!(lease = %lp.display(), from = %old.instance, released = old.released, lines = doc.lines.len(), "took over lease");
        let cursor_path = dir.join("cursor");
        let cur = read_cursor(&cursor_path)?;
        // A cursor without its log position (the claim that wrote this lease
        // crashed before the cursor): the lease's position bounds the
        // file's records from below, never the logs' end now.
        let since = Some(cur.since.map_or(doc.pos, |s| s.earliest(doc.pos)));
        let mut next = Cursor {
            since,
            ..cur.clone()
        };
        if cur.gen == doc.gen && cur.offset < doc.end_off {
            next = next.at(doc.end_off, doc.end_line, None);
        }
        if next != cur {
            write_cursor(&cursor_path, &next)?;
        }
        // Which lines already have a record? Read under the records lock, so
        // a record the old owner was writing is either seen here or refused
        // (it checks its token under the same lock).
        let file_id = doc.file_id();
        let mut recorded = HashSet::new();
        {
            let _g = self.log.lock().map_err(ClaimError::Sidecar)?;
            self.log
                .read_since(doc.pos, |r, _, _| {
                    if r.file_id == file_id {
                        recorded.insert(r.source.line);
                    }
                })
                .map_err(io_err("read", &self.log.done))?;
        }
        let todo: Vec<u64> = doc
            .lines
            .iter()
            .copied()
            .filter(|l| !recorded.contains(l))
            .collect();
        if todo.is_empty() {
            let _ = fs::remove_file(lp);
            self.held.lock().expect("held set").remove(lp);
            return Ok(None);
        }
        let lines = self.reread(dir, &doc, &todo);
        let claimed = todo
            .iter()
            .map(|&no| Claimed {
                lease: lp.to_path_buf(),
                token: doc.token.clone(),
                file: doc.file.clone(),
                file_escaped: doc.file_escaped.clone(),
                file_id: file_id.clone(),
                no,
                line: match &lines {
                    Ok(map) => map.get(&no).cloned().ok_or_else(|| Gone {
                        why: format!("line {no} of {} could no longer be read: the file changed before it ran", doc.file),
                        raw: doc.raw_of(no),
                    }),
                    Err(e) => Err(Gone {
                        why: e.clone(),
                        raw: doc.raw_of(no),
                    }),
                },
            })
            .collect();
        Ok(Some((
            Held {
                path: lp.to_path_buf(),
                doc,
            },
            claimed,
        )))
    }

    /// Reads the lines `todo` of a lease's range again from the producer
    /// file, wherever its sidecar says it is now (it may have been renamed).
    fn reread(
        &self,
        dir: &Path,
        doc: &LeaseDoc,
        todo: &[u64],
    ) -> Result<BTreeMap<u64, Line>, String> {
        let gone = || format!("{} was replaced or removed before its lines ran", doc.file);
        let id = ident::read(dir).ok_or_else(gone)?;
        let name = id.os_name();
        let path = self.spool.pending().join(if name.is_empty() {
            doc.file.as_ref()
        } else {
            name.as_os_str()
        });
        let file = super::scan::open_regular(&path).map_err(|_| gone())?;
        let probe = Probe::read(&name, &file).map_err(|_| gone())?;
        let same = ident::assign(
            std::slice::from_ref(&probe),
            &BTreeMap::from([(doc.key.clone(), id)]),
            &self.mount,
        )[0]
        .is_some();
        let cur = read_cursor(&dir.join("cursor")).map_err(|e| e.to_string())?;
        if !same || cur.gen != doc.gen || probe.size < doc.end_off {
            return Err(gone());
        }
        let mut r = LineReader::open(file, doc.start_off, doc.start_line, self.max_line_bytes)
            .map_err(|e| e.to_string())?;
        let want: HashSet<u64> = todo.iter().copied().collect();
        let mut out = BTreeMap::new();
        while r.position() < doc.end_off {
            match r.next(true).map_err(|e| e.to_string())? {
                Next::Line(l) => {
                    if want.contains(&l.no()) {
                        out.insert(l.no(), l);
                    }
                }
                Next::Partial | Next::Eof | Next::Unfinished(_) => break,
            }
        }
        Ok(out)
    }
}
