//! The leases one daemon holds, and what each commit outcome means for them.
//!
//! Pure bookkeeping, no I/O: the daemon asks it what to do and does it, and
//! the claim protocol's model test (tests/claim_model.rs) drives it beside
//! real claimers. The rules it encodes are the ones a lost-record bug broke:
//!
//! - a `Durable` record settles its line; when a lease's last line settles,
//!   the lease is to be deleted — compare-and-delete by its token (see
//!   [`super::claim::LeaseOwner`]), never a plain unlink;
//! - a `Fenced` record means the lease is another daemon's now: it is
//!   forgotten here at once, with every line still outstanding in it, and
//!   nothing is done to its file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::claim::CommitOutcome;

/// A lease this daemon holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLease {
    pub token: String,
    /// Lines without a durable record yet.
    pub lines: Vec<u64>,
}

/// What a commit outcome asks the daemon to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Lines of the lease are still outstanding.
    Pending,
    /// Every line has its record: delete the lease if it still has `token`.
    Finished { token: String },
    /// The lease was taken over: forget it, drop its queued lines and stop
    /// its running ones. `lines` were outstanding here.
    Lost { lines: usize },
    /// Not a lease we hold (already finished or lost).
    Unknown,
}

#[derive(Debug, Default)]
pub struct LeaseBook {
    leases: HashMap<PathBuf, HeldLease>,
}

impl LeaseBook {
    pub fn hold(&mut self, lease: PathBuf, token: String, lines: Vec<u64>) {
        self.leases.insert(lease, HeldLease { token, lines });
    }

    pub fn holds(&self, lease: &Path) -> bool {
        self.leases.contains_key(lease)
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Lines claimed and not yet settled, over all leases.
    pub fn unfinished(&self) -> u64 {
        self.leases.values().map(|h| h.lines.len() as u64).sum()
    }

    /// The record for `line` of `lease` was committed with `outcome`.
    pub fn committed(&mut self, lease: &Path, line: u64, outcome: CommitOutcome) -> Settled {
        let Some(held) = self.leases.get_mut(lease) else {
            return Settled::Unknown;
        };
        match outcome {
            CommitOutcome::Fenced => {
                let held = self.leases.remove(lease).expect("held");
                Settled::Lost {
                    lines: held.lines.len(),
                }
            }
            CommitOutcome::Durable => {
                held.lines.retain(|&l| l != line);
                if held.lines.is_empty() {
                    let held = self.leases.remove(lease).expect("held");
                    Settled::Finished { token: held.token }
                } else {
                    Settled::Pending
                }
            }
        }
    }

    /// Every lease with its token (to check which are still ours).
    pub fn tokens(&self) -> Vec<(PathBuf, String)> {
        self.leases
            .iter()
            .map(|(p, h)| (p.clone(), h.token.clone()))
            .collect()
    }

    /// Forgets a lease found to be another daemon's; returns how many of its
    /// lines were outstanding here.
    pub fn forget(&mut self, lease: &Path) -> Option<usize> {
        self.leases.remove(lease).map(|h| h.lines.len())
    }

    /// Takes every lease out (to hand them back on exit).
    pub fn drain(&mut self) -> impl Iterator<Item = (PathBuf, HeldLease)> + '_ {
        self.leases.drain()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_records_settle_and_fenced_ones_lose_the_lease() {
        let mut b = LeaseBook::default();
        let (l1, l2) = (PathBuf::from("/l1"), PathBuf::from("/l2"));
        b.hold(l1.clone(), "t1".into(), vec![1, 2]);
        b.hold(l2.clone(), "t2".into(), vec![3, 4]);
        assert_eq!(b.unfinished(), 4);
        assert_eq!(
            b.committed(&l1, 1, CommitOutcome::Durable),
            Settled::Pending
        );
        assert_eq!(
            b.committed(&l1, 2, CommitOutcome::Durable),
            Settled::Finished { token: "t1".into() }
        );
        assert_eq!(
            b.committed(&l2, 3, CommitOutcome::Fenced),
            Settled::Lost { lines: 2 }
        );
        // A second fenced line of the lost lease changes nothing, and never
        // asks for a delete.
        assert_eq!(b.committed(&l2, 4, CommitOutcome::Fenced), Settled::Unknown);
        assert_eq!(
            b.committed(&l2, 4, CommitOutcome::Durable),
            Settled::Unknown
        );
        assert!(b.is_empty());
    }
}
