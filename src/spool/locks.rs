//! Do the spool's locks lock? Everything that keeps two daemons from
//! claiming the same line rests on `flock` of our sidecar files excluding
//! other hosts. On some mounts it silently does not: NFS mounted with
//! `nolock` or `local_lock=flock|all`, FUSE file systems such as sshfs or
//! rclone (the kernel keeps their locks local), SMB mounted with `nobrl`.
//! There every daemon gets every lock and every line runs on every host.
//!
//! Two defences:
//!
//! - **At start**, `/proc/self/mountinfo` tells the file system and its
//!   options. Where locks are host-local, a daemon refuses to join a spool
//!   on which another daemon beats from another host or another mount of
//!   the share (told apart by boot id and device number, written to
//!   `.ttspool/instances/<instance>.where`), with an error that names the
//!   mount, the option and the fix. A single daemon still works.
//! - **At run time**, a canary: the holder of the claim lock writes a token
//!   of its own to `claim.owner` and checks, before it lets go, that the
//!   token is still there. Another daemon inside the same lock at the same
//!   time overwrites it, and the daemon stops instead of running lines twice.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`, the parts we need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub point: PathBuf,
    pub fstype: String,
    pub source: String,
    /// Per-mount and per-superblock options together.
    pub options: Vec<String>,
}

/// Whether locks taken on a mount exclude other hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockScope {
    Shared,
    /// Locks are local to this host (or this mount): `why` names the file
    /// system or option, `fix` what to do.
    HostLocal {
        why: String,
        fix: String,
    },
}

/// File systems run through FUSE that do pass locks to their cluster.
const FUSE_WITH_LOCKS: &[&str] = &[
    "glusterfs",
    "ceph-fuse",
    "ceph",
    "mfs",
    "lizardfs",
    "beegfs",
];

impl Mount {
    pub fn lock_scope(&self) -> LockScope {
        let has = |o: &str| self.options.iter().any(|x| x == o);
        let fs = self.fstype.as_str();
        let local = |why: String, fix: &str| LockScope::HostLocal {
            why,
            fix: fix.to_string(),
        };
        if fs.starts_with("nfs") {
            if has("nolock") {
                return local(
                    format!("{fs} mounted with nolock"),
                    "mount it without nolock (NFSv3 needs rpc.statd), or use NFSv4",
                );
            }
            if let Some(o) = self
                .options
                .iter()
                .find(|o| *o == "local_lock=flock" || *o == "local_lock=all")
            {
                return local(
                    format!("{fs} mounted with {o}"),
                    "mount it with local_lock=none (the default)",
                );
            }
            return LockScope::Shared;
        }
        if fs == "fuse" || fs == "fuseblk" || fs.starts_with("fuse.") {
            let sub = fs.strip_prefix("fuse.").unwrap_or(fs);
            if FUSE_WITH_LOCKS.contains(&sub) {
                return LockScope::Shared;
            }
            return local(
                format!("a FUSE file system ({fs}), whose locks stay on this host"),
                "mount the share with a kernel client whose locks reach the server (NFSv4, or SMB without nobrl)",
            );
        }
        if (fs == "cifs" || fs == "smb3") && has("nobrl") {
            return local(format!("{fs} mounted with nobrl"), "mount it without nobrl");
        }
        LockScope::Shared
    }

    /// "/mnt/share (fuse.sshfs root@host:/srv/spool)".
    pub fn describe(&self) -> String {
        format!("{} ({} {})", self.point.display(), self.fstype, self.source)
    }
}

/// `\040` and friends in mountinfo fields.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            let point = unescape(pre.get(4)?);
            let mut options: Vec<String> = pre.get(5)?.split(',').map(String::from).collect();
            options.extend(post.get(2).unwrap_or(&"").split(',').map(String::from));
            Some(Mount {
                point: PathBuf::from(point),
                fstype: post.first()?.to_string(),
                source: unescape(post.get(1).unwrap_or(&"")),
                options,
            })
        })
        .collect()
}

/// The mount that holds `path` (the last, longest mount point above it).
pub fn mount_of(path: &Path) -> Option<Mount> {
    let path = path.canonicalize().ok()?;
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&text)
        .into_iter()
        .filter(|m| path.starts_with(&m.point))
        .fold(None, |best: Option<Mount>, m| match &best {
            Some(b) if b.point.as_os_str().len() > m.point.as_os_str().len() => best,
            _ => Some(m),
        })
}

/// Where a daemon runs, as far as locks are concerned: two daemons whose
/// `Where` differ do not share locks on a host-local mount.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Where {
    pub host: String,
    pub boot_id: String,
    /// Device number of the spool folder as this daemon sees it.
    pub dev: u64,
    pub mount: String,
}

impl Where {
    pub fn here(spool_root: &Path, mount: Option<&Mount>) -> io::Result<Where> {
        Ok(Where {
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_default()
                .trim()
                .to_string(),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .unwrap_or_default()
                .trim()
                .to_string(),
            dev: std::fs::metadata(spool_root)?.dev(),
            mount: mount.map(Mount::describe).unwrap_or_default(),
        })
    }

    /// True when both see the same mount on the same running kernel, so
    /// their locks meet even where locks are host-local.
    pub fn shares_locks_with(&self, other: &Where) -> bool {
        self.boot_id == other.boot_id && !self.boot_id.is_empty() && self.dev == other.dev
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:1 / / rw,relatime - ext4 /dev/vda1 rw
43 27 0:40 / /mnt/a rw,nosuid,nodev,relatime - fuse.sshfs root@127.0.0.1:/srv/share rw,user_id=0,group_id=0
50 27 0:50 / /mnt/nfs rw,relatime - nfs4 fs:/export rw,vers=4.2,local_lock=none,addr=10.0.0.1
51 27 0:51 / /mnt/nfs3 rw,relatime - nfs fs:/export rw,vers=3,nolock,addr=10.0.0.1
52 27 0:52 / /mnt/nfsl rw,relatime - nfs4 fs:/export rw,local_lock=flock
53 27 0:53 / /mnt/smb rw,relatime - cifs //fs/share rw,nobrl
54 27 0:54 / /mnt/gl rw,relatime - fuse.glusterfs gl:/vol rw
55 27 0:55 / /mnt/with\\040space rw - ext4 /dev/vdb rw
";

    fn find(p: &str) -> Mount {
        parse_mountinfo(INFO)
            .into_iter()
            .find(|m| m.point == Path::new(p))
            .unwrap()
    }

    #[test]
    fn host_local_locks_are_recognised() {
        assert_eq!(find("/").lock_scope(), LockScope::Shared);
        assert_eq!(find("/mnt/nfs").lock_scope(), LockScope::Shared);
        assert_eq!(find("/mnt/gl").lock_scope(), LockScope::Shared);
        for (p, word) in [
            ("/mnt/a", "fuse.sshfs"),
            ("/mnt/nfs3", "nolock"),
            ("/mnt/nfsl", "local_lock=flock"),
            ("/mnt/smb", "nobrl"),
        ] {
            match find(p).lock_scope() {
                LockScope::HostLocal { why, fix } => {
                    assert!(why.contains(word), "{p}: {why}");
                    assert!(!fix.is_empty());
                }
                s => panic!("{p}: {s:?}"),
            }
        }
        assert_eq!(find("/mnt/with space").fstype, "ext4");
        assert_eq!(find("/mnt/a").source, "root@127.0.0.1:/srv/share");
    }

    #[test]
    fn the_mount_of_a_path_is_the_longest_prefix() {
        let m = mount_of(Path::new("/proc/self")).unwrap();
        assert_eq!(m.fstype, "proc");
        assert!(mount_of(Path::new("/")).is_some());
    }
}
