//! The end of a producer file's life in `pending/`, and what comes after.
//!
//! A file whose every line has its record, and that has not changed for
//! `spool.consume_after`, is moved to `pending/.consumed/`. A producer may
//! still hold it open and append to it later (a logger after a long pause):
//! so the moved file is *followed*. Its sidecar moves to
//! `.ttspool/followed/<key>/`, and the file is looked at for growth — often
//! at first, then less often (a tenth of its age, up to an hour apart) —
//! for as long as it is kept in `.consumed/` (`retention.consumed`). A file
//! that grew is moved back into `pending/`, sidecar and all, and its new
//! lines are claimed from where its cursor stopped: every complete line
//! gets its record, however long the pause.
//!
//! Each move is crash-safe: the ident notes where the file goes before it
//! moves, and a sidecar found on the wrong side is put right (claim.rs's
//! takeover pass, and `Claimer::identify` for a move that did not happen).
//!
//! Data flows one way: the spool does not call the webhook layer. A
//! consumed file's totals go out in the claim's [`Batch::finished`]; the
//! daemon hands them on (the `file.completed` webhook, written to the
//! outbox) and then calls [`announced`]. Until then the ident says
//! `announce`, and a followed file still saying so after
//! [`ANNOUNCE_AGAIN`] (its daemon died in between) is handed out again —
//! with the same message id, so receivers see one event.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use super::claim::{io_err, Batch, ClaimError, Claimer, FileDone, Found};
use super::ident::{self, Consumed};
use super::lines::{LineReader, Next};
use super::sidecar::{has_leases, read_cursor, write_ident, Cursor};
use super::Spool;
use crate::util::fsync_dir;
use crate::vocab::FileId;

/// Growth checks of a followed file are at most this far apart.
const FOLLOW_MAX: Duration = Duration::from_secs(3600);

/// A consumed file's totals not handed on after this long are handed out
/// again.
pub const ANNOUNCE_AGAIN: Duration = Duration::from_secs(300);

/// The daemon has handed on a consumed file's totals (see the module doc).
pub fn announced(spool: &Spool, key: &str) -> Result<(), ClaimError> {
    for dir in [spool.followed().join(key), spool.files().join(key)] {
        if let Some(mut id) = ident::read(&dir).filter(|id| id.announce) {
            id.announce = false;
            return match write_ident(&dir, &id) {
                // Moved meanwhile (a follow pass): the other place is tried.
                Err(ClaimError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    continue;
                }
                other => other,
            };
        }
    }
    Ok(())
}

impl Claimer {
    /// Moves a fully claimed, idle file whose leases are all gone (every
    /// line recorded) to `pending/.consumed/`, and its sidecar to
    /// `.ttspool/followed/`.
    pub(super) fn consume(&mut self, f: &Found, batch: &mut Batch) -> Result<(), ClaimError> {
        if has_leases(&f.dir)? {
            return Ok(());
        }
        let shown = f.entry.shown();
        let path = self.spool.pending().join(&f.entry.name);
        // The last line of defence: a file leaves pending/ only when every
        // line it holds has its record. If one has none, something lost it
        // (a bug, or a log edited by hand): keep the file, and say so.
        let Some(missing) = self.unrecorded(f, &path)? else {
            return Ok(());
        };
        if !missing.is_empty() {
            if self.unrecorded_warned.insert(f.key.clone()) {
                let listed: Vec<String> = missing.iter().take(10).map(u64::to_string).collect();
                tracing::error!(
                    file = %shown,
                    missing = missing.len(),
                    "every line is claimed and no lease is left, but line(s) {} have no record; \
                     the file stays in pending/ (run `ttspool status` and report this as a bug)",
                    listed.join(", ")
                );
            }
            return Ok(());
        }
        let consumed = self.spool.consumed();
        let mut target: OsString = f.entry.name.clone();
        if consumed.join(&target).exists() {
            target.push(format!(".{}", ulid::Ulid::new()));
        }
        let Some(mut id) = ident::read(&f.dir) else {
            return Ok(()); // identify wrote it; gone means another daemon acted
        };
        let done = self.file_done(&f.key, shown, &f.cursor)?;
        id.consumed = Some(Consumed::new(&target, unix_now()));
        id.announce = true;
        write_ident(&f.dir, &id)?;
        fs::rename(&path, consumed.join(&target)).map_err(io_err("move consumed file", &path))?;
        let _ = fsync_dir(&self.spool.pending());
        let _ = fsync_dir(&consumed);
        self.park(&f.key, &f.dir)?;
        self.seen.remove(&f.key);
        batch.finished.push(done);
        Ok(())
    }

    /// Moves a consumed file's sidecar to `followed/`.
    fn park(&mut self, key: &str, dir: &Path) -> Result<(), ClaimError> {
        let followed = self.spool.followed();
        fs::create_dir_all(&followed).map_err(io_err("create", &followed))?;
        let to = followed.join(key);
        fs::rename(dir, &to).map_err(io_err("move", dir))?;
        let _ = fsync_dir(&self.spool.files());
        let _ = fsync_dir(&followed);
        self.follow_due
            .insert(key.to_string(), Instant::now() + self.follow_every);
        Ok(())
    }

    /// A sidecar whose file is not in `pending/` and that holds no lease:
    /// parked if its file was being consumed, else removed (the file is gone).
    /// Call under the claim lock, with a complete listing of `pending/`
    /// taken under it that matched no file to this sidecar.
    pub(super) fn drop_sidecar(&mut self, key: &str, dir: &Path) -> Result<(), ClaimError> {
        let id = ident::load(dir).map_err(io_err("read the ident in", dir))?;
        let moving = id.and_then(|id| id.consumed);
        match moving {
            Some(c) => {
                let at = self.spool.consumed().join(c.os_name());
                match fs::symlink_metadata(&at) {
                    Ok(_) => self.park(key, dir),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        let _ = fs::remove_dir_all(dir);
                        Ok(())
                    }
                    Err(e) => Err(io_err("stat", &at)(e)),
                }
            }
            None => {
                let _ = fs::remove_dir_all(dir);
                Ok(())
            }
        }
    }

    pub(super) fn follow_is_due(&self) -> bool {
        self.next_follow.is_none_or(|t| Instant::now() >= t)
    }

    /// Looks at the consumed files that are due for it, and moves back into
    /// `pending/` any that grew. Call under the claim lock.
    pub(super) fn follow(&mut self, batch: &mut Batch) -> Result<(), ClaimError> {
        if !self.follow_is_due() {
            return Ok(());
        }
        let now = Instant::now();
        self.next_follow = Some(now + self.follow_every);
        let followed = self.spool.followed();
        let rd = match fs::read_dir(&followed) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("list", &followed)(e)),
        };
        let mut keys = Vec::new();
        for dent in rd {
            let dent = dent.map_err(io_err("list", &followed))?;
            keys.push(dent.file_name().to_string_lossy().into_owned());
        }
        self.follow_due.retain(|k, _| keys.contains(k));
        for key in keys {
            if self.follow_due.get(&key).is_some_and(|t| now < *t) {
                continue;
            }
            let dir = followed.join(&key);
            let id = match ident::load(&dir) {
                Ok(Some(id)) => id,
                Ok(None) => {
                    let _ = fs::remove_dir_all(&dir);
                    continue;
                }
                // Not "gone": looked at again next time.
                Err(e) => {
                    let err = io_err("read the ident in", &dir)(e);
                    tracing::warn!("{err}");
                    batch.errors.push(err.to_string());
                    continue;
                }
            };
            let Some(moved) = id.consumed.clone() else {
                let _ = fs::remove_dir_all(&dir);
                continue;
            };
            let path = self.spool.consumed().join(moved.os_name());
            let md = match fs::symlink_metadata(&path) {
                Ok(md) if md.is_file() => md,
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    let err = io_err("stat", &path)(e);
                    tracing::warn!("{err}");
                    batch.errors.push(err.to_string());
                    continue;
                }
                // Deleted (retention, or by hand): nothing more can come.
                _ => {
                    let _ = fs::remove_dir_all(&dir);
                    self.follow_due.remove(&key);
                    continue;
                }
            };
            let cur = read_cursor(&dir.join("cursor"))?;
            let age = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH + Duration::from_secs(moved.at))
                .unwrap_or_default();
            if id.announce && age >= ANNOUNCE_AGAIN {
                // Its daemon died before handing the totals on.
                let done = self.file_done(&key, id.name.clone(), &cur)?;
                batch.finished.push(done);
            }
            if md.len() == cur.offset {
                // No poll interval (tests, the model): look every time.
                let wait = if self.follow_every.is_zero() {
                    Duration::ZERO
                } else {
                    (age / 10).clamp(self.follow_every, FOLLOW_MAX)
                };
                self.follow_due.insert(key, now + wait);
                continue;
            }
            self.bring_back(&key, &dir, id, &path)?;
            batch.returned += 1;
        }
        Ok(())
    }

    /// A consumed file grew: back into `pending/` with its sidecar, so its
    /// new lines are claimed where its cursor stopped.
    fn bring_back(
        &mut self,
        key: &str,
        dir: &Path,
        mut id: ident::Ident,
        from: &Path,
    ) -> Result<(), ClaimError> {
        let pending = self.spool.pending();
        let mut name = id.os_name();
        if name.is_empty() || pending.join(&name).exists() {
            let (base, _) = ident::split_name(&name);
            let stem = base.strip_suffix(".jsonl").unwrap_or(&base).to_string();
            name = format!("{stem}.{}.jsonl", ulid::Ulid::new()).into();
        }
        (id.name, id.name_bytes) = ident::split_name(&name);
        write_ident(dir, &id)?;
        let files = self.spool.files();
        let back = files.join(key);
        fs::rename(dir, &back).map_err(io_err("move", dir))?;
        let _ = fsync_dir(&files);
        fs::rename(from, pending.join(&name)).map_err(io_err("move back", from))?;
        let _ = fsync_dir(&pending);
        let _ = fsync_dir(&self.spool.consumed());
        id.consumed = None;
        write_ident(&back, &id)?;
        self.follow_due.remove(key);
        tracing::warn!(
            file = %name.to_string_lossy(),
            "a consumed file grew after it was moved to pending/.consumed/ (its producer still appends to it): \
             moved it back into pending/ to read the new lines"
        );
        Ok(())
    }

    /// Line numbers of the file's current content (non-blank, complete)
    /// that have no record under its current generation.
    fn unrecorded(&self, f: &Found, path: &Path) -> Result<Option<Vec<u64>>, ClaimError> {
        let file_id = FileId::new(&f.key, f.cursor.gen);
        let mut recorded = std::collections::HashSet::new();
        self.log
            .read_since(f.cursor.since.unwrap_or_default(), |r, _, _| {
                if r.file_id == file_id {
                    recorded.insert(r.source.line);
                }
            })
            .map_err(io_err("read", &self.log.done))?;
        let Some(file) = f.open(&self.spool.pending())? else {
            return Ok(None); // gone or replaced meanwhile: not now
        };
        let mut reader =
            LineReader::open(file, 0, 0, self.max_line_bytes).map_err(io_err("read", path))?;
        // Only what the cursor covers: lines a producer appended since the
        // round's probe are not claimed yet, not lost.
        let mut missing = Vec::new();
        while reader.position() < f.cursor.offset {
            match reader.next(true).map_err(io_err("read", path))? {
                Next::Line(l) if !l.is_blank() && !recorded.contains(&l.no()) => {
                    missing.push(l.no())
                }
                Next::Line(_) => {}
                Next::Partial | Next::Eof | Next::Unfinished(_) => break,
            }
        }
        Ok(Some(missing))
    }

    /// Counts the records of a file (all its generations).
    fn file_done(&self, key: &str, file: String, cursor: &Cursor) -> Result<FileDone, ClaimError> {
        let mut done = FileDone {
            file,
            file_id: FileId::new(key, cursor.gen),
            completed: 0,
            skipped: 0,
            failed: 0,
        };
        self.log
            .read_since(cursor.since.unwrap_or_default(), |r, _, _| {
                if r.file_id.key == key {
                    match r.status.as_str() {
                        "completed" => done.completed += 1,
                        "skipped" => done.skipped += 1,
                        _ => done.failed += 1,
                    }
                }
            })
            .map_err(io_err("read", &self.log.done))?;
        Ok(done)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
