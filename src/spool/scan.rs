//! Listing `pending/`: which producer files exist now, with the identity
//! (inode) and size that tell a grown file from a replaced one.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::SystemTime;

/// One producer file as seen by a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub ino: u64,
    pub size: u64,
    pub mtime: SystemTime,
}

impl Entry {
    /// The name of this file's sidecar folder: a new inode is a new file.
    pub fn key(&self) -> String {
        let safe: String = self
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .take(80)
            .collect();
        format!("{safe}.{}", self.ino)
    }
}

/// True for names producers use while still writing.
pub fn ignored(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(".tmp")
}

/// Regular files in `pending/`, oldest first (then by name).
pub fn scan(pending: &Path) -> std::io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    for ent in std::fs::read_dir(pending)? {
        let ent = ent?;
        let Ok(name) = ent.file_name().into_string() else {
            continue;
        };
        if ignored(&name) {
            continue;
        }
        // A file can vanish between listing and stat (consumed by another daemon).
        let Ok(md) = std::fs::metadata(ent.path()) else {
            continue;
        };
        if !md.is_file() {
            continue;
        }
        out.push(Entry {
            name,
            ino: md.ino(),
            size: md.len(),
            mtime: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        });
    }
    out.sort_by(|a, b| a.mtime.cmp(&b.mtime).then_with(|| a.name.cmp(&b.name)));
    Ok(out)
}
