//! Noticing new files: inotify where it works, a periodic rescan always.
//!
//! Notifications are only hints that make the next scan come sooner: inotify
//! overflows, and it sees nothing that other NFS/SMB clients write, so the
//! daemon rescans every `spool.poll_interval` regardless. `watch = "auto"`
//! asks statfs what the spool is on and does not even try inotify on network
//! and FUSE file systems.

use std::path::Path;

use notify::{RecursiveMode, Watcher};

use crate::config::WatchMode;

/// Keeps the watcher alive; dropping it stops the notifications.
pub struct Hints {
    _watcher: Option<notify::RecommendedWatcher>,
    pub mode: &'static str,
}

/// File systems on which inotify misses other clients' writes.
pub fn is_remote(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` is a writable statfs.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    const NFS: i64 = 0x6969;
    const SMB: i64 = 0x517B;
    const CIFS: i64 = 0xFF53_4D42;
    const SMB2: i64 = 0xFE53_4D42;
    const FUSE: i64 = 0x6573_5546;
    const CEPH: i64 = 0x00C3_6400;
    const NINEP: i64 = 0x0102_1997;
    #[allow(clippy::unnecessary_cast)]
    let t = st.f_type as i64;
    matches!(t, NFS | SMB | CIFS | SMB2 | FUSE | CEPH | NINEP)
}

/// Only events that mean "something changed": a file made, renamed, written
/// or closed after writing. Opens, reads and closes after reading — which
/// our own scans cause — are not, or every scan would start the next one
/// and an idle daemon would burn a core.
fn means_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    use notify::EventKind;
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) | EventKind::Any | EventKind::Other => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
    }
}

/// Starts watching `pending` according to `mode`; `hint` is called on a change.
pub fn watch(pending: &Path, mode: WatchMode, hint: impl Fn() + Send + 'static) -> Hints {
    let use_notify = match mode {
        WatchMode::Poll => false,
        WatchMode::Notify => true,
        WatchMode::Auto => !is_remote(pending),
    };
    if !use_notify {
        return Hints {
            _watcher: None,
            mode: "poll",
        };
    }
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok_and(|e| means_change(&e.kind)) {
            hint();
        }
    });
    match watcher {
        Ok(mut w) => match w.watch(pending, RecursiveMode::NonRecursive) {
            Ok(()) => Hints {
                _watcher: Some(w),
                mode: "notify",
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch {}; polling only", pending.display());
                Hints {
                    _watcher: None,
                    mode: "poll",
                }
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "file notifications unavailable; polling only");
            Hints {
                _watcher: None,
                mode: "poll",
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, ModifyKind, RenameMode};
    use notify::EventKind;

    #[test]
    fn our_own_reads_are_not_changes() {
        assert!(!means_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!means_change(&EventKind::Access(AccessKind::Read)));
        assert!(!means_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(means_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(means_change(&EventKind::Create(CreateKind::File)));
        assert!(means_change(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
        assert!(means_change(&EventKind::Modify(ModifyKind::Data(
            DataChange::Any
        ))));
    }
}
