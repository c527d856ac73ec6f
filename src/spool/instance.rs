//! A daemon's place on the spool: its instance lock and heartbeat, the
//! other daemons' liveness, and whether locks on this mount reach them.
//!
//! Each daemon holds `.ttspool/instances/<instance>.lock` for its whole life
//! and bumps the beat counter in `<instance>.alive` every `lease/8`, from a
//! thread of its own (heartbeat.rs). Another daemon is dead when its counter
//! has stood still for `spool.lease` on the observer's monotonic clock, so
//! the hosts' clocks never meet.

use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use super::claim::{io_err, ClaimError, Claimer, ForeignDaemon};
use super::heartbeat::{BeatError, Heartbeat};
use super::locks::{self, LockScope, Where};
use crate::util::atomic_write;

impl Claimer {
    /// Where locks on the spool's mount stay on this host (sshfs, NFS with
    /// nolock, ...), refuses to join a spool that a daemon on another host
    /// or mount is using: our locks would not keep it out. See locks.rs.
    pub(super) fn check_lock_scope(&mut self) -> Result<(), ClaimError> {
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

    pub(super) fn is_dead(&mut self, instance: &str) -> bool {
        let p = self.spool.instances().join(format!("{instance}.alive"));
        self.liveness.is_dead(&p, instance, self.lease_ttl)
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
