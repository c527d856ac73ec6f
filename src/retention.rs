//! Keeping months of operation from filling the disk: consumed input files
//! older than `retention.consumed` are deleted (the record logs keep their
//! story), and the record logs are rotated (see spool/records.rs).

use std::time::{Duration, SystemTime};

use crate::spool::Spool;

/// Deletes files in `pending/.consumed/` older than `keep`; returns how many.
pub fn prune_consumed(spool: &Spool, keep: Duration) -> usize {
    let Ok(rd) = std::fs::read_dir(spool.consumed()) else {
        return 0;
    };
    let now = SystemTime::now();
    let mut n = 0;
    for e in rd.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > keep);
        if old && std::fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}
