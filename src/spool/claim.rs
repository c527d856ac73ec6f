//! Claiming task lines so that several daemons sharing a spool run each line
//! once.
//!
//! # The protocol
//!
//! Each producer file has a sidecar folder `.ttspool/files/<key>/`
//! (sidecar.rs; which file is which is ident.rs's business) holding a
//! `cursor` (generation, byte offset and line count of the next unclaimed
//! line) and one `lease-<gen>-<first line>` per claimed range. Claiming
//! happens under an exclusive lock on `.ttspool/claim.lock` — our own file,
//! never the producer's — and in this order:
//!
//! 1. read the cursor and the next lines from the producer's file;
//! 2. create the lease with `O_EXCL`, fsync it and the folder;
//! 3. write the new cursor atomically (temp, fsync, rename, fsync folder).
//!
//! A crash after 2 and before 3 leaves a lease whose range the cursor does not
//! cover: the next claimer's `O_EXCL` create of the same name fails, it reads
//! that lease and moves the cursor past it instead of claiming the lines
//! twice. A crash before 2 leaves nothing. So a line is either unclaimed or
//! covered by exactly one lease.
//!
//! A lease is deleted only after every line in it has a durable record
//! (records.rs), compare-and-delete by token (fence.rs). The rest of the
//! story has a file each:
//!
//! - instance.rs: our instance lock, heartbeat and the others' liveness;
//! - takeover.rs: the leases of daemons that died, and of our last run;
//! - fence.rs: the claim lock and its canary, tokens, [`LeaseOwner`];
//! - consume.rs: files whose every line has a record, and late appends;
//! - summary.rs: what `status` shows.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::fence::ClaimLock;
pub use super::fence::{still_ours, CommitOutcome, LeaseChange, LeaseOwner};
use super::heartbeat::{Beater, Liveness};
use super::ident::{self, Ident, Probe};
use super::lines::{Line, LineReader, LongLine, Next};
use super::locks::Where;
use super::records::RecordLog;
use super::scan::{any_task_file, scan_all, Entry};
use super::sidecar::{lease_name, read_cursor, write_cursor, write_ident};
pub use super::sidecar::{read_lease, Cursor, LeaseDoc};
pub use super::summary::{summary, Summary};
use super::Spool;
use crate::util::{atomic_write, create_exclusive, fsync_dir};
use crate::vocab::FileId;

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("instance {instance:?} is already running on spool {spool} ({holder}); give each daemon its own spool.instance")]
    InstanceBusy {
        instance: String,
        spool: PathBuf,
        holder: String,
    },
    #[error("the spool folder was removed or replaced under the running daemon ({} is no longer the file this daemon locked); stopping, so that no other daemon mistakes our claims for its own", .0.display())]
    LockLost(PathBuf),
    #[error("{0}")]
    LocksDoNotSpan(Box<ForeignDaemon>),
    #[error("spool.dir {} is a file, not a folder; point spool.dir at a folder (it is made if missing)", .0.display())]
    NotAFolder(PathBuf),
    #[error("the claim lock {} did not keep another daemon out (its owner token changed while we held it): locks on this spool do not work across hosts or mounts; stopping so that no line runs twice (see `ttspool check`)", .0.display())]
    LockBroken(PathBuf),
    /// A test stopped the claim here ([`Claimer::fail_at`]).
    #[error("stopped at failpoint {0:?}")]
    Failpoint(Failpoint),
    /// An error that already names its file and action.
    #[error("{0}")]
    Sidecar(io::Error),
    #[error("cannot {action} {}: {}", .path.display(), crate::util::io_msg(.source))]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// Another daemon on a spool whose locks would not keep it out.
#[derive(Debug, thiserror::Error)]
#[error("spool {} is on {mount}: {why}, so its locks do not reach other hosts or mounts, and daemon {other:?} already runs on it from {other_where}; two daemons there would run every line twice. Run daemons on one host (and one mount) only, or {fix}", .spool.display())]
pub struct ForeignDaemon {
    pub spool: PathBuf,
    pub mount: String,
    pub why: String,
    pub fix: String,
    pub other: String,
    pub other_where: String,
}

impl ClaimError {
    /// The disk (or our quota) is full: a pause, not a failure.
    pub fn is_disk_full(&self) -> bool {
        match self {
            ClaimError::Io { source, .. } | ClaimError::Sidecar(source) => {
                crate::util::is_disk_full(source)
            }
            _ => false,
        }
    }

    /// The process ran out of file descriptors: a pause until some close.
    pub fn is_out_of_descriptors(&self) -> bool {
        match self {
            ClaimError::Io { source, .. } | ClaimError::Sidecar(source) => {
                crate::util::is_out_of_descriptors(source)
            }
            _ => false,
        }
    }
}

pub(super) fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> ClaimError + 'a {
    move |source| ClaimError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A lease this daemon holds.
#[derive(Debug, Clone)]
pub struct Held {
    pub path: PathBuf,
    pub doc: LeaseDoc,
}

/// One claimed line, ready to be parsed and run.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub lease: PathBuf,
    pub token: String,
    /// The file's name when the line was claimed (lossy if not UTF-8).
    pub file: String,
    /// The name's bytes, escaped, when it is not UTF-8.
    pub file_escaped: Option<String>,
    pub file_id: FileId,
    pub no: u64,
    /// The line, or why it could no longer be read (taken over from a file
    /// that was replaced meanwhile).
    pub line: Result<Line, Gone>,
}

/// A claimed line that can no longer be read from its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gone {
    pub why: String,
    /// What the line held when claimed, as its lease kept it.
    pub raw: Option<String>,
}

#[derive(Debug, Default)]
pub struct Batch {
    pub leases: Vec<Held>,
    pub lines: Vec<Claimed>,
    /// Some file has a final line without `\n` that has not settled yet.
    pub waiting: bool,
    /// Files moved to `pending/.consumed/`, with their totals: the daemon
    /// hands them on (`file.completed`) and then calls
    /// [`super::consume::announced`]. Also files whose totals were not
    /// handed on in time (a crash), again.
    pub finished: Vec<FileDone>,
    /// Consumed files that grew, moved back into `pending/`.
    pub returned: usize,
    /// Some file has more to read than one round reads: claim again soon.
    pub more: bool,
    /// Why some file could not be claimed from (also logged).
    pub errors: Vec<String>,
    /// Claiming stopped because the disk is full (a lease or cursor could
    /// not be written); what is in this batch was claimed before.
    pub disk_full: Option<String>,
}

impl Batch {
    /// Lines or leases were claimed, or files consumed: the daemon must see
    /// this batch whatever else went wrong in the round.
    pub fn claimed_anything(&self) -> bool {
        !self.lines.is_empty() || !self.leases.is_empty() || !self.finished.is_empty()
    }
}

/// When a file last changed, as this daemon saw it.
pub(super) struct Seen {
    size: u64,
    mtime: SystemTime,
    since: Instant,
}

/// A file whose every line has its record, as it is moved away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDone {
    pub file: String,
    pub file_id: FileId,
    pub completed: u64,
    pub skipped: u64,
    pub failed: u64,
}

/// A file in `pending/`, matched with its sidecar (ident.rs). Not held
/// open: a round holds one descriptor at a time however many files wait.
pub(super) struct Found {
    pub entry: Entry,
    pub key: String,
    pub dir: PathBuf,
    pub ino: u64,
    pub size: u64,
    pub cursor: Cursor,
}

impl Found {
    /// Opens the file again, if it is still the one identified.
    pub(super) fn open(&self, pending: &Path) -> Result<Option<File>, ClaimError> {
        reopen(&pending.join(&self.entry.name), self.ino)
    }
}

/// `path` opened, if it is still inode `ino`; `None` if it is gone or was
/// replaced (the next round sees the new one). Other errors are errors.
pub(super) fn reopen(path: &Path, ino: u64) -> Result<Option<File>, ClaimError> {
    use std::os::unix::fs::MetadataExt;
    let file = match super::scan::open_regular(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let md = file.metadata().map_err(io_err("stat", path))?;
    Ok((md.ino() == ino).then_some(file))
}

/// Bytes of one file read per claim round, at most (past one line): a huge
/// file does not hold up the others.
const ROUND_BYTES: u64 = 8 << 20;

pub struct Claimer {
    pub(super) spool: Spool,
    pub(super) log: RecordLog,
    pub(super) instance: String,
    pub(super) max_line_bytes: usize,
    pub(super) settle: Duration,
    /// A fully recorded file leaves `pending/` after this long unchanged.
    pub(super) consume_after: Duration,
    /// How often consumed files are looked at for growth, at least.
    pub(super) follow_every: Duration,
    pub(super) next_follow: Option<Instant>,
    pub(super) follow_due: HashMap<String, Instant>,
    pub(super) lease_ttl: Duration,
    /// Which mount we see the spool through (ident.rs).
    pub(super) mount: String,
    pub(super) rr: usize,
    pub(super) seen: HashMap<String, Seen>,
    /// Over-long lines read partly, per sidecar key (with the generation).
    pub(super) long_lines: HashMap<String, (u64, LongLine)>,
    /// Our beats, until [`Claimer::start_heartbeat`] moves them to a thread.
    pub(super) beater: Option<Beater>,
    pub(super) liveness: Liveness,
    /// Leases this process holds; shared with the daemon, which removes a
    /// lease here after deleting its file.
    pub(super) held: HeldSet,
    /// Files already reported as fully claimed but not fully recorded.
    pub(super) unrecorded_warned: HashSet<String>,
    /// Entries of `pending/` already reported as not read (symlinks, FIFOs...).
    pub(super) rejected_warned: HashSet<String>,
    /// Files of `pending/` that could not be opened last round (logged
    /// once, not per round).
    pub(super) open_errors: OpenErrors,
    /// Where a claim stops as if the process died there (tests only).
    pub(super) failpoint: Option<Failpoint>,
    pub(super) _instance_lock: File,
}

#[derive(Debug, Default)]
pub(super) struct OpenErrors {
    count: usize,
    logged: Option<Instant>,
}

/// A point inside a claim where the model test makes a daemon die.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// A lease is durable, its cursor not yet moved.
    AfterLease,
}

/// The set of lease paths a process holds.
pub type HeldSet = std::sync::Arc<std::sync::Mutex<HashSet<PathBuf>>>;

impl Claimer {
    /// Opens the spool for `instance`: creates the folders, takes the
    /// instance lock and writes the first heartbeat.
    pub fn open(
        spool: &Spool,
        instance: &str,
        max_line_bytes: usize,
        settle: Duration,
        lease_ttl: Duration,
    ) -> Result<Claimer, ClaimError> {
        if spool.root.exists() && !spool.root.is_dir() {
            return Err(ClaimError::NotAFolder(spool.root.clone()));
        }
        spool
            .create_dirs()
            .map_err(io_err("create spool folders in", &spool.root))?;
        let lock_path = spool.instances().join(format!("{instance}.lock"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        let alive_path = spool.instances().join(format!("{instance}.alive"));
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&alive_path)
                    .ok()
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                    .and_then(|v| v.get("pid").and_then(|p| p.as_u64()))
                    .map(|p| format!("pid {p}"))
                    .unwrap_or_else(|| "another process".into());
                return Err(ClaimError::InstanceBusy {
                    instance: instance.into(),
                    spool: spool.root.clone(),
                    holder,
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err("lock", &lock_path)(e)),
        }
        let alive = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&alive_path)
            .map_err(io_err("open", &alive_path))?;
        let here = Where::here(&spool.root, None).map_err(io_err("stat", &spool.root))?;
        let mut c = Claimer {
            log: RecordLog::new(spool),
            spool: spool.clone(),
            instance: instance.into(),
            max_line_bytes,
            settle,
            consume_after: settle,
            follow_every: Duration::ZERO,
            next_follow: None,
            follow_due: HashMap::new(),
            lease_ttl,
            mount: ident::mount_tag(&here.boot_id, here.dev),
            rr: 0,
            seen: HashMap::new(),
            long_lines: HashMap::new(),
            beater: Some(
                Beater::new(alive, alive_path.clone(), &lock, lock_path.clone())
                    .map_err(io_err("stat", &lock_path))?,
            ),
            liveness: Liveness::default(),
            held: HeldSet::default(),
            unrecorded_warned: HashSet::new(),
            rejected_warned: HashSet::new(),
            open_errors: OpenErrors::default(),
            failpoint: None,
            _instance_lock: lock,
        };
        match c.heartbeat() {
            // A full disk does not stop a daemon from starting: the
            // heartbeat thread tries again, and claims wait for space.
            Err(e) if e.is_disk_full() => tracing::warn!("{e}"),
            other => other?,
        }
        c.check_lock_scope()?;
        Ok(c)
    }

    /// A fully recorded file leaves `pending/` once unchanged this long
    /// (`spool.consume_after`); consumed files are looked at for growth at
    /// most every `follow_every` (the poll interval).
    pub fn set_consume(&mut self, consume_after: Duration, follow_every: Duration) {
        self.consume_after = consume_after;
        self.follow_every = follow_every;
    }

    /// Makes claims stop at `at` as if the process died there (the claim
    /// model test); the claimer is to be dropped after.
    #[doc(hidden)]
    pub fn fail_at(&mut self, at: Option<Failpoint>) {
        self.failpoint = at;
    }

    /// The leases this process holds.
    pub fn held(&self) -> HeldSet {
        self.held.clone()
    }

    pub(super) fn lock_claims(&self) -> Result<ClaimLock, ClaimError> {
        ClaimLock::take(&self.spool)
    }

    /// Claims up to `want` lines, spread round-robin over the pending files
    /// (oldest first within a file), moves fully consumed files away, and
    /// brings back consumed files that grew.
    pub fn claim(&mut self, want: usize) -> Result<Batch, ClaimError> {
        self.claim_with(want, || {})
    }

    /// [`Claimer::claim`], with `before_lock` run just before the claim lock
    /// is taken: what other daemons and producers may do while we wait for
    /// it (the claim model test's interleavings).
    pub fn claim_with(
        &mut self,
        want: usize,
        before_lock: impl FnOnce(),
    ) -> Result<Batch, ClaimError> {
        let pending = self.spool.pending();
        let mut batch = Batch::default();
        // Whether to take the lock at all; what is claimed is decided on a
        // listing taken under it (another daemon may move files meanwhile).
        if !any_task_file(&pending).map_err(io_err("list", &pending))? && !self.follow_is_due() {
            self.seen.clear();
            return Ok(batch);
        }
        before_lock();
        let lock = self.lock_claims()?;
        let res = scan_all(&pending)
            .map_err(io_err("list", &pending))
            .and_then(|found| {
                self.note_rejected(&found.rejected);
                self.claim_locked(found.files, want, &mut batch)
            });
        lock.release()?;
        match res {
            Ok(()) => {}
            Err(err) if err.is_disk_full() => batch.disk_full = Some(err.to_string()),
            // What was claimed before the error is ours (its leases are
            // written and held): it goes out with the batch, never dropped.
            Err(err) if batch.claimed_anything() => {
                if err.is_out_of_descriptors() {
                    crate::util::warn_out_of_descriptors(&err.to_string());
                } else {
                    tracing::error!("{err}");
                }
                batch.errors.push(err.to_string());
            }
            Err(err) => return Err(err),
        }
        Ok(batch)
    }

    /// Logs files that could not be opened, once per change of the set or
    /// once a minute, not once per file per round (descriptors running out
    /// would otherwise flood the log).
    fn note_open_errors(&mut self, failed: &[(String, bool)]) {
        if !failed.is_empty() && failed.iter().all(|(_, fds)| *fds) {
            crate::util::warn_out_of_descriptors(&failed[0].0);
            return;
        }
        let failed: Vec<&String> = failed.iter().map(|(m, _)| m).collect();
        let now = Instant::now();
        let changed = failed.len() != self.open_errors.count;
        let due = self
            .open_errors
            .logged
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60));
        if failed.is_empty() {
            if self.open_errors.count > 0 {
                tracing::info!("every file in pending/ can be opened again");
            }
            self.open_errors = OpenErrors::default();
            return;
        }
        if changed || due {
            tracing::error!(
                files = failed.len(),
                "cannot open {} file(s) in pending/ (they are tried again every round): {}",
                failed.len(),
                failed[0]
            );
            self.open_errors.logged = Some(now);
        }
        self.open_errors.count = failed.len();
    }

    fn note_rejected(&mut self, rejected: &[super::scan::Rejected]) {
        let names: HashSet<&str> = rejected.iter().map(|r| r.name.as_str()).collect();
        self.rejected_warned.retain(|n| names.contains(n.as_str()));
        for r in rejected {
            if self.rejected_warned.insert(r.name.clone()) {
                tracing::warn!(file = %r.name, "not read: {}", r.why);
            }
        }
    }

    fn claim_locked(
        &mut self,
        entries: Vec<Entry>,
        want: usize,
        batch: &mut Batch,
    ) -> Result<(), ClaimError> {
        let files = self.identify(entries, &mut batch.errors)?;
        let now = Instant::now();
        let keys: HashSet<&str> = files.iter().map(|f| f.key.as_str()).collect();
        self.seen.retain(|k, _| keys.contains(k.as_str()));
        self.long_lines.retain(|k, _| keys.contains(k.as_str()));
        for f in &files {
            let e = &f.entry;
            let s = self.seen.entry(f.key.clone()).or_insert(Seen {
                size: e.size,
                mtime: e.mtime,
                since: now,
            });
            if s.size != e.size || s.mtime != e.mtime {
                *s = Seen {
                    size: e.size,
                    mtime: e.mtime,
                    since: now,
                };
            }
        }
        let n = files.len();
        let start = if n > 0 { self.rr % n } else { 0 };
        self.rr = self.rr.wrapping_add(1);
        let mut remaining = want;
        for i in 0..n {
            let f = &files[(start + i) % n];
            let quota = remaining.div_ceil(n - i).max(1).min(remaining);
            match self.claim_file(f, quota, batch) {
                Ok(got) => remaining -= got,
                // Every other file would fail the same way: stop, and let
                // the daemon pause claims until space returns.
                Err(err) if err.is_disk_full() => return Err(err),
                // Every other file would fail alike: stop, try next round.
                Err(err) if err.is_out_of_descriptors() => return Err(err),
                Err(err) => {
                    tracing::error!(file = %f.entry.shown(), "{err}");
                    batch.errors.push(format!("{}: {err}", f.entry.shown()));
                }
            }
        }
        self.follow(batch)
    }

    /// Matches the files found in `pending/` with their sidecars (see
    /// ident.rs), making sidecars for new files and noting renames. A file
    /// rewritten in place (it shrank, or the bytes it was claimed by
    /// changed) starts a new generation here. Call under the claim lock.
    pub(super) fn identify(
        &mut self,
        entries: Vec<Entry>,
        errors: &mut Vec<String>,
    ) -> Result<Vec<Found>, ClaimError> {
        let pending = self.spool.pending();
        // One file open at a time, whatever pending/ holds: each is opened
        // for its probe and closed, and opened again when it is read.
        let mut opened = Vec::new();
        let mut failed = Vec::new();
        for e in entries {
            let path = pending.join(&e.name);
            let probe = super::scan::open_regular(&path).and_then(|f| Probe::read(&e.name, &f));
            match probe {
                // Replaced since the scan: the next scan sees the new one.
                Ok(p) if p.ino != e.ino => {}
                Ok(p) => opened.push((e, p)),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => {
                    let fds = crate::util::is_out_of_descriptors(&err);
                    failed.push((io_err("open", &path)(err).to_string(), fds));
                }
            }
        }
        self.note_open_errors(&failed);
        errors.extend(failed.into_iter().map(|(m, _)| m));
        let known = self.idents()?;
        let probes: Vec<Probe> = opened.iter().map(|(_, p)| p.clone()).collect();
        let keys = ident::assign(&probes, &known, &self.mount);
        let files_dir = self.spool.files();
        let mut out = Vec::new();
        for ((entry, probe), key) in opened.into_iter().zip(keys) {
            let (key, old) = match key {
                Some(k) => {
                    let old = known[&k].clone();
                    (k, Some(old))
                }
                None => (ident::new_key(&probe.name), None),
            };
            let dir = files_dir.join(&key);
            let cursor_path = dir.join("cursor");
            let mut cursor = match &old {
                Some(_) => read_cursor(&cursor_path)?,
                None => {
                    fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
                    Cursor::default()
                }
            };
            let same_head = old.as_ref().is_some_and(|o| o.head_matches(&probe));
            let mut next = match &old {
                Some(o) if same_head => o.seen_as(&probe, &self.mount),
                _ => probe.ident(&self.mount),
            };
            next.consumed = None; // found in pending/: a move that did not happen
            let rewritten = match &old {
                None => false,
                Some(_) => {
                    !same_head
                        || probe.size < cursor.offset
                        || match &cursor.tail {
                            Some(t) => {
                                let path = pending.join(&entry.name);
                                let Some(file) = reopen(&path, probe.ino)? else {
                                    continue; // gone or replaced: next round
                                };
                                ident::tail_at(&file, cursor.offset)
                                    .map_err(io_err("read", &path))?
                                    != *t
                            }
                            None => false,
                        }
                }
            };
            if rewritten {
                tracing::warn!(
                    file = %entry.shown(),
                    "the file was rewritten (it shrank, or lines already claimed changed): reading it again from its start as a new file"
                );
                cursor = cursor.rewritten();
                write_cursor(&cursor_path, &cursor)?;
            }
            if let Some(o) = &old {
                if o.name != next.name || o.name_bytes != next.name_bytes {
                    tracing::info!(from = %o.name, to = %next.name, "a producer file was renamed; its claims and cursor go with it");
                }
            }
            if old.as_ref() != Some(&next) {
                write_ident(&dir, &next)?;
            }
            if cursor.since.is_none() {
                cursor.since = Some(self.repaired_since(&dir, &cursor_path, &cursor)?);
            }
            out.push(Found {
                size: probe.size,
                ino: probe.ino,
                entry,
                key,
                dir,
                cursor,
            });
        }
        Ok(out)
    }

    /// Where a file's records start, for a cursor that does not say: now,
    /// for a file never claimed from; else the earliest lease's position,
    /// or the start of the logs (a cursor written without it, by a crash
    /// or an older version). Never guessed later than a record it has.
    fn repaired_since(
        &self,
        dir: &Path,
        cursor_path: &Path,
        cursor: &Cursor,
    ) -> Result<super::records::Pos, ClaimError> {
        let leases = super::sidecar::earliest_lease_pos(dir)?;
        if leases.is_none() && *cursor == Cursor::default() {
            return Ok(self.log.position());
        }
        let since = leases.unwrap_or_default();
        tracing::info!(cursor = %cursor_path.display(), "a claim cursor without its log position: reading the file's records from {since:?}");
        let repaired = Cursor {
            since: Some(since),
            ..cursor.clone()
        };
        write_cursor(cursor_path, &repaired)?;
        Ok(since)
    }

    /// The idents of all sidecars in `.ttspool/files/`. One that cannot be
    /// read fails the round: a file whose sidecar is unknown for a moment
    /// must not look new (its lines would be claimed again).
    fn idents(&self) -> Result<BTreeMap<String, Ident>, ClaimError> {
        let files = self.spool.files();
        let mut out = BTreeMap::new();
        for dent in fs::read_dir(&files).map_err(io_err("list", &files))? {
            let dent = dent.map_err(io_err("list", &files))?;
            let key = dent.file_name().to_string_lossy().into_owned();
            let dir = dent.path();
            let id = ident::load(&dir).map_err(io_err("read the ident in", &dir))?;
            if let Some(id) = id.or_else(|| ident::legacy(&key, &self.mount)) {
                out.insert(key, id);
            }
        }
        Ok(out)
    }

    fn settled(&self, key: &str, after: Duration) -> bool {
        self.seen
            .get(key)
            .is_some_and(|s| s.since.elapsed() >= after)
    }

    /// Claims up to `quota` lines of one file; returns how many.
    fn claim_file(
        &mut self,
        f: &Found,
        quota: usize,
        batch: &mut Batch,
    ) -> Result<usize, ClaimError> {
        let path = self.spool.pending().join(&f.entry.name);
        let cursor_path = f.dir.join("cursor");
        let cur = &f.cursor;
        let settled = self.settled(&f.key, self.settle);
        if f.size == cur.offset {
            if self.settled(&f.key, self.consume_after) {
                self.consume(f, batch)?;
            }
            return Ok(0);
        }
        if quota == 0 {
            return Ok(0);
        }
        let Some(file) = f.open(&self.spool.pending())? else {
            return Ok(0);
        };
        let tail_file = file.try_clone().map_err(io_err("read", &path))?;
        // An over-long line is read ROUND_BYTES a round, from where the
        // last round stopped.
        let known = self
            .long_lines
            .remove(&f.key)
            .filter(|(gen, l)| *gen == cur.gen && l.start == cur.offset && l.read_to <= f.size);
        let mut reader = match known {
            Some((_, l)) => LineReader::resume(file, l, self.max_line_bytes),
            None => LineReader::open(file, cur.offset, cur.line, self.max_line_bytes),
        }
        .map_err(io_err("read", &path))?;
        let from = reader.position();
        reader.limit(from + ROUND_BYTES);
        let mut lines = Vec::new();
        let mut wanted = 0;
        while wanted < quota && reader.position() - from < ROUND_BYTES {
            match reader.next(settled).map_err(io_err("read", &path))? {
                Next::Unfinished(l) => {
                    if l.read_to < f.size {
                        batch.more = true; // go on next round, after the others
                    } else {
                        batch.waiting = true; // the file may still grow
                    }
                    self.long_lines.insert(f.key.clone(), (cur.gen, l));
                    break;
                }
                Next::Line(l) => {
                    if !l.is_blank() {
                        wanted += 1;
                    }
                    lines.push(l);
                }
                Next::Partial => {
                    batch.waiting = true;
                    break;
                }
                Next::Eof => break,
            }
        }
        let Some(last) = lines.last() else {
            return Ok(0);
        };
        let (end_off, end_line) = (last.end(), last.no());
        let tail = Some(ident::tail_at(&tail_file, end_off).map_err(io_err("read", &path))?);
        lines.retain(|l| !l.is_blank());
        if lines.is_empty() {
            write_cursor(&cursor_path, &cur.at(end_off, end_line, tail))?;
            return Ok(0);
        }
        let (file_name, file_escaped) = ident::shown(&f.entry.name);
        let doc = LeaseDoc {
            instance: self.instance.clone(),
            token: ulid::Ulid::new().to_string(),
            pid: std::process::id(),
            file: file_name.clone(),
            file_escaped: file_escaped.clone(),
            key: f.key.clone(),
            gen: cur.gen,
            start_off: cur.offset,
            start_line: cur.line,
            end_off,
            end_line,
            lines: lines.iter().map(Line::no).collect(),
            pos: self.log.position(),
            released: false,
            raw: lines.iter().map(Line::kept).collect(),
        };
        let lease_path = f.dir.join(lease_name(cur.gen, cur.line + 1));
        let body = serde_json::to_vec(&doc).expect("lease serializes");
        if !create_exclusive(&lease_path, &body).map_err(io_err("create", &lease_path))? {
            // A claim crashed between creating this lease and moving the
            // cursor: skip its range (or finish a torn lease) and retry later.
            match super::sidecar::load_lease(&lease_path).map_err(ClaimError::Sidecar)? {
                Some(other) => {
                    tracing::warn!(lease = %lease_path.display(), "found a lease the cursor missed (crash while claiming); moving the cursor past it");
                    let moved = Cursor {
                        gen: other.gen,
                        offset: other.end_off,
                        line: other.end_line,
                        since: cur.since,
                        tail: None,
                    };
                    write_cursor(&cursor_path, &moved)?;
                    return Ok(0);
                }
                None => {
                    atomic_write(&lease_path, &body).map_err(io_err("write", &lease_path))?;
                }
            }
        }
        fsync_dir(&f.dir).map_err(io_err("sync", &f.dir))?;
        if self.failpoint == Some(Failpoint::AfterLease) {
            return Err(ClaimError::Failpoint(Failpoint::AfterLease));
        }
        write_cursor(&cursor_path, &cur.at(end_off, end_line, tail))?;
        self.held
            .lock()
            .expect("held set")
            .insert(lease_path.clone());
        let file_id = doc.file_id();
        let n = lines.len();
        for l in lines {
            batch.lines.push(Claimed {
                lease: lease_path.clone(),
                token: doc.token.clone(),
                file: file_name.clone(),
                file_escaped: file_escaped.clone(),
                file_id: file_id.clone(),
                no: l.no(),
                line: Ok(l),
            });
        }
        batch.leases.push(Held {
            path: lease_path,
            doc,
        });
        Ok(n)
    }

    /// Marks a lease as handed back, for any daemon to take at once — if it
    /// is still ours (`token`); see [`LeaseOwner`].
    pub fn hand_back(&self, lease: &Path, token: &str) -> Result<(), ClaimError> {
        self.held.lock().expect("held set").remove(lease);
        LeaseOwner::new(&self.spool)
            .hand_back(lease, token)
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    #[test]
    fn the_claim_lock_canary_sees_another_holder() {
        let d = tempfile::tempdir().unwrap();
        let spool = Spool::new(d.path());
        spool.create_dirs().unwrap();
        let lock = ClaimLock::take(&spool).unwrap();
        lock.release().unwrap();
        // What a daemon on another mount does when flock does not exclude it.
        let lock = ClaimLock::take(&spool).unwrap();
        std::fs::write(spool.state().join("claim.owner"), "999 other\n").unwrap();
        assert!(matches!(lock.release(), Err(ClaimError::LockBroken(_))));
    }

    fn claimer(spool: &Spool, name: &str) -> Claimer {
        Claimer::open(
            spool,
            name,
            1 << 20,
            Duration::ZERO,
            Duration::from_secs(60),
        )
        .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Whatever the interleaving of claims by several daemons, the sizes
        /// they ask for, and producers appending lines meanwhile: every
        /// non-blank line is claimed exactly once.
        #[test]
        fn every_line_is_claimed_exactly_once(
            steps in proptest::collection::vec((0usize..3, 1usize..6, 0usize..4, any::<bool>()), 1..60)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let spool = Spool::new(dir.path());
            let mut cs: Vec<Claimer> = ["a", "b", "c"].iter().map(|n| claimer(&spool, n)).collect();
            let mut written = 0u64;
            let mut seen: HashMap<(String, u64), usize> = HashMap::new();
            for (who, want, append, second_file) in steps {
                let name = if second_file { "two.jsonl" } else { "one.jsonl" };
                let mut f = OpenOptions::new().create(true).append(true)
                    .open(spool.pending().join(name)).unwrap();
                for _ in 0..append {
                    written += 1;
                    // Every third line blank: it needs no claim.
                    if written.is_multiple_of(3) { writeln!(f, "  ").unwrap(); } else { writeln!(f, "{{\"n\":{written}}}").unwrap(); }
                }
                let b = cs[who].claim(want).unwrap();
                prop_assert!(b.lines.len() <= want);
                for l in b.lines {
                    *seen.entry((l.file.clone(), l.no)).or_default() += 1;
                }
            }
            // Drain what is left.
            loop {
                let b = cs[0].claim(100).unwrap();
                if b.lines.is_empty() { break; }
                for l in b.lines { *seen.entry((l.file.clone(), l.no)).or_default() += 1; }
            }
            prop_assert!(seen.values().all(|&n| n == 1), "a line was claimed twice: {seen:?}");
            let mut expected = 0;
            for name in ["one.jsonl", "two.jsonl"] {
                if let Ok(text) = fs::read_to_string(spool.pending().join(name)) {
                    expected += text.lines().filter(|l| !l.trim().is_empty()).count();
                }
            }
            prop_assert_eq!(seen.len(), expected);
        }
    }

    #[test]
    fn a_huge_line_is_read_a_bounded_amount_per_round_and_does_not_hold_up_others() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        let mut a = claimer(&spool, "a");
        let mut big = File::create(spool.pending().join("big.jsonl")).unwrap();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..40 {
            big.write_all(&chunk).unwrap();
        }
        big.write_all(b"\n{\"n\":2}\n").unwrap();
        fs::write(spool.pending().join("small.jsonl"), "{\"n\":1}\n").unwrap();
        let first = a.claim(10).unwrap();
        let files: Vec<&str> = first.lines.iter().map(|l| l.file.as_str()).collect();
        assert_eq!(files, ["small.jsonl"], "the small file waits for nothing");
        assert!(first.more, "the big file has more to read");
        let mut rounds = 1;
        let big_lines = loop {
            let b = a.claim(10).unwrap();
            rounds += 1;
            if !b.lines.is_empty() {
                break b.lines;
            }
            assert!(b.more && rounds < 20, "no progress after {rounds} rounds");
        };
        // 40 MiB at 8 MiB a round.
        assert!(rounds >= 5, "{rounds}");
        assert!(matches!(big_lines[0].line, Ok(Line::TooLong { no: 1, .. })));
        assert_eq!(big_lines.len(), 2);
    }

    #[test]
    fn a_lease_the_cursor_missed_is_not_claimed_again() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        let mut a = claimer(&spool, "a");
        fs::write(
            spool.pending().join("f.jsonl"),
            "{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n",
        )
        .unwrap();
        let b = a.claim(2).unwrap();
        assert_eq!(b.lines.len(), 2);
        // Simulate a crash between creating the lease and moving the cursor.
        let key_dir = b.leases[0].path.parent().unwrap().to_path_buf();
        fs::remove_file(key_dir.join("cursor")).unwrap();
        let mut c = claimer(&spool, "c");
        let again = c.claim(5).unwrap();
        assert!(again.lines.is_empty(), "claimed lines a lease covers");
        let rest = c.claim(5).unwrap();
        assert_eq!(rest.lines.iter().map(|l| l.no).collect::<Vec<_>>(), [3]);
    }

    /// Issue 29: `status` right after kills — a record written before the
    /// lease was deleted is done, not in flight; a lease whose cursor was
    /// never moved is in flight, not pending too.
    #[test]
    fn status_counts_a_killed_daemons_lines_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        fs::write(
            spool.pending().join("f.jsonl"),
            "{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n",
        )
        .unwrap();
        let mut a = claimer(&spool, "a");
        let b = a.claim(2).unwrap();
        let file_id = b.lines[0].file_id.clone();
        // Line 1 has its record; "a" died before deleting the lease.
        fs::write(
            spool.done_log(),
            format!("{{\"id\":\"x\",\"status\":\"completed\",\"source\":{{\"file\":\"f.jsonl\",\"line\":1}},\"file_id\":\"{file_id}\"}}\n"),
        )
        .unwrap();
        let s = summary(&spool, 1 << 20).unwrap();
        assert_eq!((s.in_flight, s.pending_lines), (1, 1), "{s:?}");
        // A claim killed between its lease and its cursor: line 3 is in a
        // lease the cursor does not cover.
        a.fail_at(Some(Failpoint::AfterLease));
        // (The failpoint fails that file's claim; the round goes on.)
        assert!(a.claim(5).is_ok_and(|b| b.lines.is_empty()));
        let s = summary(&spool, 1 << 20).unwrap();
        assert_eq!((s.in_flight, s.pending_lines), (2, 0), "{s:?}");
    }

    #[test]
    fn takeover_skips_lines_that_already_have_records() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path());
        spool.create_dirs().unwrap();
        fs::write(spool.pending().join("f.jsonl"), "{\"n\":1}\n{\"n\":2}\n").unwrap();
        let lease_path;
        let file_id;
        {
            let mut a = claimer(&spool, "a");
            let b = a.claim(5).unwrap();
            assert_eq!(b.lines.len(), 2);
            lease_path = b.leases[0].path.clone();
            file_id = b.lines[0].file_id.clone();
            // Line 1 got its record, then "a" died before deleting the lease.
            let rec = format!(
                "{{\"id\":\"x\",\"status\":\"completed\",\"source\":{{\"file\":\"f.jsonl\",\"line\":1}},\"file_id\":\"{file_id}\"}}\n"
            );
            fs::write(spool.done_log(), rec).unwrap();
        }
        // "a" restarts: its own lease is taken over at once.
        let mut a2 = claimer(&spool, "a");
        let taken = a2.take_over().unwrap();
        assert_eq!(taken.len(), 1);
        let lines: Vec<u64> = taken[0].1.iter().map(|c| c.no).collect();
        assert_eq!(lines, [2]);
        assert_eq!(taken[0].0.path, lease_path);
        // Another daemon does not take a live daemon's lease.
        let mut b = claimer(&spool, "b");
        assert!(b.take_over().unwrap().is_empty());
    }
}
