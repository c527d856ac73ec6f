//! Fencing: a lease changes hands only compare-and-set by token, under the
//! spool's claim lock, whose canary (`claim.owner`) proves that the lock
//! kept everyone else out while we held it (see locks.rs).
//!
//! A daemon can be judged dead while it is only paused, and wake up holding
//! leases that are another's now. Every record is written only if its lease
//! still carries the token it was claimed with ([`still_ours`], checked
//! under the records lock, which the taker also holds while it reads which
//! lines have records), and a lease is deleted or handed back only through
//! [`LeaseOwner`]. A fenced daemon forgets the lease and touches nothing of
//! it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::claim::{io_err, ClaimError};
use super::sidecar::{read_lease, LeaseDoc};
use super::Spool;
use crate::util::atomic_write;

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

/// True if `lease` still names us with `token` (nobody took it over);
/// false if it names another token or is gone. A lease that cannot be read
/// (descriptors running out, an I/O error) is an error, not "taken over".
pub fn still_ours(lease: &Path, token: &str) -> std::io::Result<bool> {
    Ok(super::sidecar::load_lease(lease)?.is_some_and(|d| d.token == token))
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
pub(super) struct ClaimLock {
    _file: File,
    owner: PathBuf,
    token: String,
}

impl ClaimLock {
    pub(super) fn take(spool: &Spool) -> Result<ClaimLock, ClaimError> {
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
    pub(super) fn release(self) -> Result<(), ClaimError> {
        match fs::read_to_string(&self.owner) {
            Ok(t) if t.starts_with(&self.token) => Ok(()),
            Ok(_) => Err(ClaimError::LockBroken(self.owner)),
            Err(e) => Err(io_err("read", &self.owner)(e)),
        }
    }
}
