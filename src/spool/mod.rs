//! The spool on disk: where producers drop files, where our own state lives,
//! and the record logs.
//!
//! ```text
//! <spool.dir>/
//!   pending/                 producers' files (dotfiles and *.tmp ignored)
//!   pending/.consumed/       fully consumed files, moved here for audit
//!   done.jsonl failed.jsonl  the record logs (records.rs)
//!   .ttspool/claim.lock      held while claiming lines or taking over leases
//!   .ttspool/records.lock    held while appending records
//!   .ttspool/instances/      <instance>.lock (held for life), <instance>.alive (heartbeat)
//!   .ttspool/files/<key>/    per pending file: `ident`, `cursor`, and `lease-<gen>-<line>` files
//!   .ttspool/followed/<key>/ per consumed file that is still followed for growth
//! ```
//!
//! Only files under `.ttspool/` are ever locked; a producer's file is only
//! read, and renamed into `.consumed/` once every line has its record.

pub mod claim;
pub mod consume;
mod fence;
pub mod heartbeat;
pub mod ident;
mod instance;
pub mod lease;
pub mod lines;
pub mod locks;
pub mod records;
pub mod scan;
pub mod sidecar;
mod summary;
mod takeover;
pub mod watch;

use std::path::{Path, PathBuf};

/// Paths of one spool.
#[derive(Debug, Clone)]
pub struct Spool {
    pub root: PathBuf,
}

impl Spool {
    pub fn new(root: &Path) -> Spool {
        Spool {
            root: root.to_path_buf(),
        }
    }
    pub fn pending(&self) -> PathBuf {
        self.root.join("pending")
    }
    pub fn consumed(&self) -> PathBuf {
        self.pending().join(".consumed")
    }
    pub fn done_log(&self) -> PathBuf {
        self.root.join("done.jsonl")
    }
    pub fn failed_log(&self) -> PathBuf {
        self.root.join("failed.jsonl")
    }
    pub fn state(&self) -> PathBuf {
        self.root.join(".ttspool")
    }
    pub fn files(&self) -> PathBuf {
        self.state().join("files")
    }
    /// Sidecars of consumed files that are followed for growth (consume.rs).
    pub fn followed(&self) -> PathBuf {
        self.state().join("followed")
    }
    pub fn instances(&self) -> PathBuf {
        self.state().join("instances")
    }
    pub fn claim_lock(&self) -> PathBuf {
        self.state().join("claim.lock")
    }
    pub fn records_lock(&self) -> PathBuf {
        self.state().join("records.lock")
    }

    /// Creates the folders the daemon needs.
    pub fn create_dirs(&self) -> std::io::Result<()> {
        for d in [
            self.pending(),
            self.consumed(),
            self.files(),
            self.instances(),
        ] {
            std::fs::create_dir_all(&d)?;
        }
        Ok(())
    }
}
