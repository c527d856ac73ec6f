//! Listing `pending/`: which producer files exist now, with their size and
//! modification time (which files are idle). Which file is which is
//! ident.rs's business.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::SystemTime;

/// One producer file as seen by a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The name as the file system has it (not necessarily UTF-8).
    pub name: OsString,
    pub ino: u64,
    pub size: u64,
    pub mtime: SystemTime,
}

impl Entry {
    /// The name for messages (lossy if it is not UTF-8).
    pub fn shown(&self) -> String {
        self.name.to_string_lossy().into_owned()
    }
}

/// True for names producers use while still writing.
pub fn ignored(name: &OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let b = name.as_bytes();
    b.starts_with(b".") || b.ends_with(b".tmp")
}

/// Task files are `*.jsonl` (SPEC §1); `README`, `notes.txt`, `x.jsonl~`,
/// `x.jsonl.swp` or `data.json` are left alone. The name need not be UTF-8.
pub fn is_task_file(name: &OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    name.as_bytes().ends_with(b".jsonl") && !ignored(name)
}

/// An entry of `pending/` that looks like a task file but is never read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The name, lossily if it is not UTF-8.
    pub name: String,
    /// Why, and what to do about it.
    pub why: &'static str,
}

/// What a scan found: task files, oldest first (then by name), and entries
/// that are not read (symlinks, FIFOs, devices, folders).
#[derive(Debug, Default)]
pub struct Scan {
    pub files: Vec<Entry>,
    pub rejected: Vec<Rejected>,
}

/// True if `pending/` holds an entry named like a task file (stops at the
/// first): whether a claim round is worth the claim lock.
pub fn any_task_file(pending: &Path) -> std::io::Result<bool> {
    for ent in std::fs::read_dir(pending)? {
        if is_task_file(&ent?.file_name()) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Lists `pending/` without following symlinks or opening anything.
pub fn scan(pending: &Path) -> std::io::Result<Vec<Entry>> {
    scan_all(pending).map(|s| s.files)
}

/// [`scan`], with what was rejected and why.
pub fn scan_all(pending: &Path) -> std::io::Result<Scan> {
    let mut out = Scan::default();
    for ent in std::fs::read_dir(pending)? {
        let ent = ent?;
        let name = ent.file_name();
        if !is_task_file(&name) {
            if !ignored(&name) {
                tracing::debug!(file = %name.to_string_lossy(), "not a task file (only *.jsonl are); left alone");
            }
            continue;
        }
        // lstat: a symlink is never followed. A file can vanish between
        // listing and stat (consumed by another daemon).
        let Ok(md) = std::fs::symlink_metadata(ent.path()) else {
            continue;
        };
        let ft = md.file_type();
        if !ft.is_file() {
            out.rejected.push(Rejected {
                name: name.to_string_lossy().into_owned(),
                why: if ft.is_symlink() {
                    "a symlink, which is never followed; put the file itself in pending/"
                } else if ft.is_dir() {
                    "a folder; only files are read"
                } else {
                    "not a regular file (a FIFO, socket or device); only regular files are read"
                },
            });
            continue;
        }
        out.files.push(Entry {
            name,
            ino: md.ino(),
            size: md.len(),
            mtime: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        });
    }
    out.files
        .sort_by(|a, b| a.mtime.cmp(&b.mtime).then_with(|| a.name.cmp(&b.name)));
    Ok(out)
}

/// Opens a producer file for reading without following a symlink and
/// without blocking (a FIFO swapped in after the scan would otherwise block
/// `open` forever, under the claim lock), and only if it is a regular file.
pub fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_jsonl_files_are_task_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        for n in [
            "a.jsonl",
            "README",
            "notes.txt",
            "x.jsonl~",
            "x.jsonl.swp",
            "data.json",
            ".h.jsonl",
            "t.jsonl.tmp",
        ] {
            std::fs::write(p.join(n), "{}\n").unwrap();
        }
        std::fs::create_dir(p.join("dir.jsonl")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", p.join("link.jsonl")).unwrap();
        let fifo = std::ffi::CString::new(p.join("fifo.jsonl").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let s = scan_all(p).unwrap();
        let files: Vec<String> = s.files.iter().map(Entry::shown).collect();
        assert_eq!(files, ["a.jsonl"]);
        let mut rejected: Vec<&str> = s.rejected.iter().map(|r| r.name.as_str()).collect();
        rejected.sort();
        assert_eq!(rejected, ["dir.jsonl", "fifo.jsonl", "link.jsonl"]);
        // Opening the FIFO neither blocks nor succeeds; the symlink is refused.
        assert!(open_regular(&p.join("fifo.jsonl")).is_err());
        assert!(open_regular(&p.join("link.jsonl")).is_err());
        assert!(open_regular(&p.join("a.jsonl")).is_ok());
    }
}
