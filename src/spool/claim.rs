//! Claiming task lines so that several daemons sharing a spool run each line
//! once, and taking over the claims of daemons that died.
//!
//! # The protocol
//!
//! Each producer file has a sidecar folder `.ttspool/files/<key>/` (the key
//! includes the inode, so a replaced file is a new file) holding a `cursor`
//! (generation, byte offset and line count of the next unclaimed line) and one
//! `lease-<gen>-<first line>` per claimed range. Claiming happens under an
//! exclusive lock on `.ttspool/claim.lock` — our own file, never the
//! producer's — and in this order:
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
//! (records.rs). A lease whose owner died is taken over (rewritten with the
//! new owner) and then, under the records lock, the logs are read from the
//! sizes noted in the lease to find the lines that already have a record; only
//! the others run again. So a crash between "record durable" and "lease
//! deleted" produces no second record.
//!
//! # Liveness without synchronized clocks
//!
//! Each daemon holds `.ttspool/instances/<instance>.lock` for its whole life
//! and bumps the beat counter in `<instance>.alive` every `lease/8`, from a
//! thread of its own (heartbeat.rs). Another daemon is dead when its counter
//! has stood still for `spool.lease` on the observer's monotonic clock, so
//! the hosts' clocks never meet. Leases of our own instance name that we do
//! not hold in memory belong to a previous run of ours (we hold the instance
//! lock), so a restart takes them over at once.
//!
//! # Fencing
//!
//! A daemon can be judged dead while it is only paused, and wake up holding
//! leases that are another's now. Every record is written only if its lease
//! still carries the token it was claimed with (checked under the records
//! lock, which the taker also holds while it reads which lines have
//! records), and a lease is deleted or handed back only compare-and-set by
//! token under the claim lock ([`LeaseOwner`]). A fenced daemon forgets the
//! lease and touches nothing of it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::heartbeat::{BeatError, Beater, Heartbeat, Liveness};
use super::ident::{self, Ident, Probe};
use super::lines::{Line, LineReader, LongLine, Next};
use super::locks::{self, LockScope, Where};
use super::records::RecordLog;
use super::scan::{scan, scan_all, Entry};
use super::sidecar::{
    lease_name, lease_start, list_leases, read_cursor, write_cursor, write_ident,
};
pub use super::sidecar::{read_lease, Cursor, LeaseDoc};
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
    pub line: Result<Line, String>,
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

/// A file in `pending/`, matched with its sidecar (ident.rs), open.
pub(super) struct Found {
    pub entry: Entry,
    pub key: String,
    pub dir: PathBuf,
    pub file: File,
    pub size: u64,
    pub cursor: Cursor,
}

/// Bytes of one file read per claim round, at most (past one line): a huge
/// file does not hold up the others.
const ROUND_BYTES: u64 = 8 << 20;

pub struct Claimer {
    pub(super) spool: Spool,
    pub(super) log: RecordLog,
    instance: String,
    pub(super) max_line_bytes: usize,
    settle: Duration,
    /// A fully recorded file leaves `pending/` after this long unchanged.
    pub(super) consume_after: Duration,
    /// How often consumed files are looked at for growth, at least.
    pub(super) follow_every: Duration,
    pub(super) next_follow: Option<Instant>,
    pub(super) follow_due: HashMap<String, Instant>,
    lease_ttl: Duration,
    /// Which mount we see the spool through (ident.rs).
    pub(super) mount: String,
    rr: usize,
    pub(super) seen: HashMap<String, Seen>,
    /// Over-long lines read partly, per sidecar key (with the generation).
    long_lines: HashMap<String, (u64, LongLine)>,
    /// Our beats, until [`Claimer::start_heartbeat`] moves them to a thread.
    beater: Option<Beater>,
    liveness: Liveness,
    /// Leases this process holds; shared with the daemon, which removes a
    /// lease here after deleting its file.
    held: HeldSet,
    /// Files already reported as fully claimed but not fully recorded.
    pub(super) unrecorded_warned: HashSet<String>,
    /// Entries of `pending/` already reported as not read (symlinks, FIFOs...).
    rejected_warned: HashSet<String>,
    _instance_lock: File,
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

    /// Where locks on the spool's mount stay on this host (sshfs, NFS with
    /// nolock, ...), refuses to join a spool that a daemon on another host
    /// or mount is using: our locks would not keep it out. See locks.rs.
    fn check_lock_scope(&mut self) -> Result<(), ClaimError> {
        let root = &self.spool.root;
        let mount = locks::mount_of(root);
        let here = Where::here(root, mount.as_ref()).map_err(io_err("stat", root))?;
        let instances = self.spool.instances();
        let where_path = instances.join(format!("{}.where", self.instance));
        let res = self.refuse_foreign_daemons(root, &instances, &here, mount.as_ref());
        // Written after the check: a daemon with our name on another mount
        // (whose flock did not stop us) left its own `.where` here.
        if let Err(e) = atomic_write(&where_path, &serde_json::to_vec(&here).expect("where")) {
            tracing::warn!(
                "cannot write {}: {}",
                where_path.display(),
                crate::util::io_msg(&e)
            );
        }
        res
    }

    fn refuse_foreign_daemons(
        &self,
        root: &Path,
        instances: &Path,
        here: &Where,
        mount: Option<&locks::Mount>,
    ) -> Result<(), ClaimError> {
        let Some(mount) = mount else { return Ok(()) };
        let LockScope::HostLocal { why, fix } = mount.lock_scope() else {
            return Ok(());
        };
        tracing::warn!(
            "spool {} is on {}: {why}, so its locks stay on this host; run daemons on one host (and one mount) only, or {fix}",
            root.display(),
            mount.describe()
        );
        let rd = fs::read_dir(instances).map_err(io_err("list", instances))?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(other) = name.strip_suffix(".where") else {
                continue;
            };
            let Some(w) = fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<Where>(&b).ok())
            else {
                continue;
            };
            if here.shares_locks_with(&w) {
                continue;
            }
            if other == self.instance {
                tracing::warn!(
                    "a daemon named {other:?} ran on this spool from host {} via {}; if it still runs, stop one of the two",
                    w.host,
                    w.mount
                );
            }
            // Is it alive? Its beat counter moves within a beat or two.
            let alive = instances.join(format!("{other}.alive"));
            let wait = (self.lease_ttl / 8).max(Duration::from_millis(100)) * 3
                + Duration::from_millis(200);
            if beats_within(&alive, wait) {
                return Err(ClaimError::LocksDoNotSpan(Box::new(ForeignDaemon {
                    spool: root.to_path_buf(),
                    mount: mount.describe(),
                    why,
                    fix,
                    other: other.to_string(),
                    other_where: format!("host {} via {}", w.host, w.mount),
                })));
            }
        }
        Ok(())
    }

    /// A fully recorded file leaves `pending/` once unchanged this long
    /// (`spool.consume_after`); consumed files are looked at for growth at
    /// most every `follow_every` (the poll interval).
    pub fn set_consume(&mut self, consume_after: Duration, follow_every: Duration) {
        self.consume_after = consume_after;
        self.follow_every = follow_every;
    }

    /// Instances (other than us) whose beat counter stood still for the lease.
    pub fn dead_instances(&mut self, names: &[String]) -> Vec<String> {
        let mut dead = Vec::new();
        for n in names {
            if *n != self.instance && self.is_dead(n) {
                dead.push(n.clone());
            }
        }
        dead
    }

    /// Moves our beats to a thread of their own; see [`Heartbeat`].
    pub fn start_heartbeat(
        &mut self,
        every: Duration,
        stale_after: Duration,
    ) -> io::Result<Heartbeat> {
        let beater = self
            .beater
            .take()
            .ok_or_else(|| io::Error::other("the heartbeat runs already"))?;
        Heartbeat::start(beater, every, stale_after)
    }

    /// The leases this process holds.
    pub fn held(&self) -> HeldSet {
        self.held.clone()
    }

    /// One beat from this thread (before [`Claimer::start_heartbeat`];
    /// afterwards the heartbeat thread beats and this does nothing).
    pub fn heartbeat(&mut self) -> Result<(), ClaimError> {
        let Some(b) = self.beater.as_mut() else {
            return Ok(());
        };
        b.beat().map_err(|e| match e {
            BeatError::LockLost(p) => ClaimError::LockLost(p),
            BeatError::Io(path, source) => ClaimError::Io {
                action: "write heartbeat",
                path,
                source,
            },
        })
    }

    fn lock_claims(&self) -> Result<ClaimLock, ClaimError> {
        ClaimLock::take(&self.spool)
    }

    /// Claims up to `want` lines, spread round-robin over the pending files
    /// (oldest first within a file), moves fully consumed files away, and
    /// brings back consumed files that grew.
    pub fn claim(&mut self, want: usize) -> Result<Batch, ClaimError> {
        let pending = self.spool.pending();
        let found = scan_all(&pending).map_err(io_err("list", &pending))?;
        let names: HashSet<String> = found.rejected.iter().map(|r| r.name.clone()).collect();
        self.rejected_warned.retain(|n| names.contains(n));
        for r in &found.rejected {
            if self.rejected_warned.insert(r.name.clone()) {
                tracing::warn!(file = %r.name, "not read: {}", r.why);
            }
        }
        let mut batch = Batch::default();
        if found.files.is_empty() && !self.follow_is_due() {
            self.seen.clear();
            return Ok(batch);
        }
        let lock = self.lock_claims()?;
        let res = self.claim_locked(found.files, want, &mut batch);
        lock.release()?;
        match res {
            Err(err) if err.is_disk_full() => batch.disk_full = Some(err.to_string()),
            other => other?,
        }
        Ok(batch)
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
        let mut opened = Vec::new();
        for e in entries {
            let path = pending.join(&e.name);
            let probe = super::scan::open_regular(&path)
                .and_then(|f| Probe::read(&e.name, &f).map(|p| (f, p)));
            match probe {
                // Replaced since the scan: the next scan sees the new one.
                Ok((_, p)) if p.ino != e.ino => {}
                Ok((f, p)) => opened.push((e, f, p)),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => {
                    let err = io_err("open", &path)(err);
                    tracing::error!("{err}");
                    errors.push(err.to_string());
                }
            }
        }
        let known = self.idents()?;
        let probes: Vec<Probe> = opened.iter().map(|(_, _, p)| p.clone()).collect();
        let keys = ident::assign(&probes, &known, &self.mount);
        let files_dir = self.spool.files();
        let mut out = Vec::new();
        for ((entry, file, probe), key) in opened.into_iter().zip(keys) {
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
            let mut next = match &old {
                Some(o) if o.head_matches(&probe) => o.seen_as(&probe, &self.mount),
                _ => probe.ident(&self.mount),
            };
            next.consumed = None; // found in pending/: a move that did not happen
            let rewritten = match &old {
                None => false,
                Some(o) => {
                    !o.head_matches(&probe)
                        || probe.size < cursor.offset
                        || match &cursor.tail {
                            Some(t) => {
                                ident::tail_at(&file, cursor.offset)
                                    .map_err(io_err("read", &pending.join(&entry.name)))?
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
                cursor.since = Some(self.log.position());
            }
            out.push(Found {
                size: probe.size,
                entry,
                key,
                dir,
                file,
                cursor,
            });
        }
        Ok(out)
    }

    /// The idents of all sidecars in `.ttspool/files/`.
    fn idents(&self) -> Result<BTreeMap<String, Ident>, ClaimError> {
        let files = self.spool.files();
        let mut out = BTreeMap::new();
        for dent in fs::read_dir(&files).map_err(io_err("list", &files))? {
            let dent = dent.map_err(io_err("list", &files))?;
            let key = dent.file_name().to_string_lossy().into_owned();
            if let Some(id) = ident::read(&dent.path()).or_else(|| ident::legacy(&key, &self.mount))
            {
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
        let file = f.file.try_clone().map_err(io_err("read", &path))?;
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
        let tail = Some(ident::tail_at(&f.file, end_off).map_err(io_err("read", &path))?);
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
        };
        let lease_path = f.dir.join(lease_name(cur.gen, cur.line + 1));
        let body = serde_json::to_vec(&doc).expect("lease serializes");
        if !create_exclusive(&lease_path, &body).map_err(io_err("create", &lease_path))? {
            // A claim crashed between creating this lease and moving the
            // cursor: skip its range (or finish a torn lease) and retry later.
            match read_lease(&lease_path) {
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

    /// Takes over leases whose owner is gone (or that were handed back), and
    /// returns them with the lines that still need a record. Also writes our
    /// heartbeat and removes sidecar folders of files that are gone.
    pub fn take_over(&mut self) -> Result<Vec<(Held, Vec<Claimed>)>, ClaimError> {
        self.heartbeat()?;
        let pending = self.spool.pending();
        let entries = scan(&pending).map_err(io_err("list", &pending))?;
        let lock = self.lock_claims()?;
        let res = self.identify(entries, &mut Vec::new()).and_then(|found| {
            let present: HashSet<String> = found.into_iter().map(|f| f.key).collect();
            self.take_over_locked(&present)
        });
        lock.release()?;
        res
    }

    fn take_over_locked(
        &mut self,
        present: &HashSet<String>,
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
                if !present.contains(&key) {
                    self.drop_sidecar(&key, &dir)?;
                }
                continue;
            }
            for lp in leases {
                if held.contains(&lp) {
                    continue;
                }
                let Some(doc) = read_lease(&lp) else {
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

    fn is_dead(&mut self, instance: &str) -> bool {
        let p = self.spool.instances().join(format!("{instance}.alive"));
        self.liveness.is_dead(&p, instance, self.lease_ttl)
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
        if cur.gen == doc.gen && cur.offset < doc.end_off {
            write_cursor(&cursor_path, &cur.at(doc.end_off, doc.end_line, None))?;
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
                    Ok(map) => map
                        .get(&no)
                        .cloned()
                        .ok_or_else(|| format!("line {no} of {} could no longer be read: the file changed before it ran", doc.file)),
                    Err(e) => Err(e.clone()),
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

    /// Marks a lease as handed back, for any daemon to take at once — if it
    /// is still ours (`token`); see [`LeaseOwner`].
    pub fn hand_back(&self, lease: &Path, token: &str) -> Result<(), ClaimError> {
        self.held.lock().expect("held set").remove(lease);
        LeaseOwner::new(&self.spool)
            .hand_back(lease, token)
            .map(|_| ())
    }
}

/// True if the beat counter in `alive` changes within `wait`.
fn beats_within(alive: &Path, wait: Duration) -> bool {
    let read = || fs::read(alive).ok();
    let first = read();
    let until = Instant::now() + wait;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
        if read() != first {
            return true;
        }
    }
    false
}

/// How writing a record for a claimed line ended. Never a bare `bool`: a
/// lost-record bug once hid behind one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The record is on disk; the line is settled.
    Durable,
    /// The lease is no longer ours (another daemon took it over while this
    /// one was paused or judged dead): the record was not written, the new
    /// owner runs the line, and this daemon must forget the lease — never
    /// delete, rewrite or hand it back.
    Fenced,
}

/// True if `lease` still names us with `token` (nobody took it over).
pub fn still_ours(lease: &Path, token: &str) -> bool {
    read_lease(lease).is_some_and(|d| d.token == token)
}

/// What a compare-and-change of a lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseChange {
    /// The lease held our token and was changed.
    Done,
    /// Another daemon holds it now (or it is gone): left alone.
    NotOurs,
}

/// Changes to a lease that are compare-and-set by token under the spool's
/// claim lock, the lock takeovers hold: between reading our token and
/// deleting (or handing back) the file, no other daemon can take it over.
pub struct LeaseOwner<'a> {
    spool: &'a Spool,
}

impl<'a> LeaseOwner<'a> {
    pub fn new(spool: &'a Spool) -> LeaseOwner<'a> {
        LeaseOwner { spool }
    }

    fn locked<T>(
        &self,
        lease: &Path,
        token: &str,
        f: impl FnOnce(LeaseDoc) -> Result<T, ClaimError>,
    ) -> Result<Option<T>, ClaimError> {
        let lock = ClaimLock::take(self.spool)?;
        let res = match read_lease(lease) {
            Some(doc) if doc.token == token => f(doc).map(Some),
            _ => Ok(None),
        };
        lock.release()?;
        res
    }

    /// Deletes a lease whose lines all have durable records, if it is ours.
    pub fn delete(&self, lease: &Path, token: &str) -> Result<LeaseChange, ClaimError> {
        let done = self.locked(lease, token, |_| match fs::remove_file(lease) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove finished lease", lease)(e)),
        })?;
        Ok(if done.is_some() {
            LeaseChange::Done
        } else {
            LeaseChange::NotOurs
        })
    }

    /// Marks a lease of ours as handed back, for any daemon to take at once.
    pub fn hand_back(&self, lease: &Path, token: &str) -> Result<LeaseChange, ClaimError> {
        let done = self.locked(lease, token, |mut doc| {
            doc.released = true;
            atomic_write(lease, &serde_json::to_vec(&doc).expect("lease serializes"))
                .map_err(io_err("hand back", lease))
        })?;
        Ok(if done.is_some() {
            LeaseChange::Done
        } else {
            LeaseChange::NotOurs
        })
    }
}

/// Opens and locks one of our sidecar lock files (never a producer's file).
fn lock_file(p: &Path) -> Result<File, ClaimError> {
    let owner = p.with_file_name("claim.owner");
    crate::util::lock_sidecar(p, || {
        fs::read_to_string(&owner)
            .ok()
            .map(|t| t.trim().to_string())
    })
    .map_err(ClaimError::Sidecar)
}

/// The claim lock, held, with its canary: a token of ours in `claim.owner`
/// that must still be there when we let go (see locks.rs).
struct ClaimLock {
    _file: File,
    owner: PathBuf,
    token: String,
}

impl ClaimLock {
    fn take(spool: &Spool) -> Result<ClaimLock, ClaimError> {
        let file = lock_file(&spool.claim_lock())?;
        let owner = spool.state().join("claim.owner");
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let mut token = format!(
            "pid {} on {} ({})",
            std::process::id(),
            host.trim(),
            ulid::Ulid::new()
        );
        // Always 128 bytes, overwritten in place: nothing to allocate, so
        // it works on a full disk. No fsync: the canary only has to be seen
        // by whoever else is inside the lock now.
        token.truncate(127);
        let token = format!("{token:<127}\n");
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&owner)
            .and_then(|f| f.write_all_at(token.as_bytes(), 0))
            .map_err(io_err("write", &owner))?;
        Ok(ClaimLock {
            _file: file,
            owner,
            token,
        })
    }

    /// Lets go, and says whether anyone else was inside meanwhile.
    fn release(self) -> Result<(), ClaimError> {
        match fs::read_to_string(&self.owner) {
            Ok(t) if t.starts_with(&self.token) => Ok(()),
            Ok(_) => Err(ClaimError::LockBroken(self.owner)),
            Err(e) => Err(io_err("read", &self.owner)(e)),
        }
    }
}

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
    let mut opened = Vec::new();
    for e in entries {
        s.pending_files += 1;
        let Ok(f) = super::scan::open_regular(&pending.join(&e.name)) else {
            continue;
        };
        let Ok(p) = Probe::read(&e.name, &f) else {
            continue;
        };
        opened.push((e, f, p));
    }
    let probes: Vec<Probe> = opened.iter().map(|(_, _, p)| p.clone()).collect();
    let keys = ident::assign(&probes, &known, &mount);
    for ((e, f, p), key) in opened.into_iter().zip(keys) {
        let cur = key
            .filter(|k| known[k].head_matches(&p))
            .and_then(|k| read_cursor(&spool.files().join(k).join("cursor")).ok())
            .filter(|c| c.offset <= p.size)
            .unwrap_or_default();
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
    if let Ok(rd) = fs::read_dir(spool.files()) {
        for d in rd.flatten() {
            for lp in list_leases(&d.path()).unwrap_or_default() {
                if let Some(doc) = read_lease(&lp) {
                    let n = doc.lines.len() as u64;
                    s.in_flight += n;
                    *s.in_flight_by_instance.entry(doc.instance).or_default() += n;
                }
            }
        }
    }
    Ok(s)
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
