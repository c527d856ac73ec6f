//! Our heartbeat, and how we judge the heartbeats of others.
//!
//! **Beating.** `<instance>.alive` holds `{"pid", "beat"}`; the beat counter
//! goes up every `lease/8`. The beats come from a thread of their own that
//! takes no lock the claim or record paths take, does no DNS and shares no
//! pool: a daemon busy claiming, fsyncing or resolving webhook hosts still
//! beats. The thread can still be stopped — by SIGSTOP, a frozen VM, or a
//! write that hangs on a dead NFS server — and then we may be judged dead.
//! So the daemon reads [`Heartbeat::age`] (time since our last *successful*
//! beat, on our own monotonic clock) and [`Heartbeat::stale_episodes`] (how
//! often a beat came later than `lease − margin` after the previous one)
//! before it claims or starts anything: a daemon that may have been judged
//! dead stops, checks which of its leases are still its own, and lets go of
//! the others (self-fencing).
//!
//! **Judging.** Another daemon is dead when its beat counter — read with a
//! fresh open, so an NFS client revalidates it (close-to-open) — has not
//! changed for `spool.lease` on *our* monotonic clock. No mtimes and no wall
//! clocks of different hosts are ever compared.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Writes our beats: owned by the heartbeat thread once it runs.
pub struct Beater {
    alive: File,
    alive_path: PathBuf,
    lock_path: PathBuf,
    /// (dev, ino) of the instance lock file we hold.
    lock_id: (u64, u64),
    beats: u64,
}

/// Why a beat failed.
#[derive(Debug, thiserror::Error)]
pub enum BeatError {
    #[error("the spool folder was removed or replaced under the running daemon ({} is no longer the file this daemon locked); stopping, so that no other daemon mistakes our claims for its own", .0.display())]
    LockLost(PathBuf),
    #[error("cannot write heartbeat {}: {}", .0.display(), crate::util::io_msg(.1))]
    Io(PathBuf, io::Error),
}

impl Beater {
    pub fn new(
        alive: File,
        alive_path: PathBuf,
        lock: &File,
        lock_path: PathBuf,
    ) -> io::Result<Beater> {
        let md = lock.metadata()?;
        Ok(Beater {
            alive,
            alive_path,
            lock_path,
            lock_id: (md.dev(), md.ino()),
            beats: 0,
        })
    }

    /// One beat: the lock file must still be ours, then the counter goes up.
    pub fn beat(&mut self) -> Result<(), BeatError> {
        // The instance lock only means something while its path still names
        // the file we locked: a spool folder deleted and made again would
        // let another daemon with our name lock the new file.
        match std::fs::metadata(&self.lock_path) {
            Ok(m) if (m.dev(), m.ino()) == self.lock_id => {}
            Ok(_) => return Err(BeatError::LockLost(self.lock_path.clone())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BeatError::LockLost(self.lock_path.clone()))
            }
            Err(_) => {} // unknown: keep going
        }
        self.beats += 1;
        // Always the same 64 bytes, overwritten in place: a beat allocates
        // nothing, so it goes on while the disk is full.
        let body = format!(
            "{:<63}\n",
            format!("{{\"pid\":{},\"beat\":{}}}", std::process::id(), self.beats)
        );
        (|| {
            if self.alive.metadata()?.len() != body.len() as u64 {
                self.alive.set_len(body.len() as u64)?;
            }
            self.alive.write_all_at(body.as_bytes(), 0)?;
            self.alive.sync_data()
        })()
        .map_err(|e| BeatError::Io(self.alive_path.clone(), e))
    }
}

#[derive(Default)]
struct State {
    /// Milliseconds since `epoch` of the last successful beat.
    last_ok_ms: AtomicU64,
    stale_episodes: AtomicU64,
    /// The stale episodes the daemon has dealt with (its leases checked).
    cleared_episodes: AtomicU64,
    lock_lost: AtomicBool,
    error: Mutex<Option<String>>,
}

/// The daemon's view of its own heartbeat thread.
#[derive(Clone)]
pub struct Heartbeat {
    state: Arc<State>,
    epoch: Instant,
    every: Duration,
}

impl Heartbeat {
    /// Starts beating every `every` on a thread of its own. A beat later
    /// than `stale_after` after the previous successful one counts as a
    /// stale episode.
    pub fn start(
        mut beater: Beater,
        every: Duration,
        stale_after: Duration,
    ) -> io::Result<Heartbeat> {
        let hb = Heartbeat {
            state: Arc::new(State::default()),
            epoch: Instant::now(),
            every,
        };
        let h = hb.clone();
        std::thread::Builder::new()
            .name("ttspool-heartbeat".into())
            .spawn(move || loop {
                match beater.beat() {
                    Ok(()) => {
                        let now = h.epoch.elapsed().as_millis() as u64;
                        let prev = h.state.last_ok_ms.load(Ordering::SeqCst);
                        if now.saturating_sub(prev) > stale_after.as_millis() as u64 {
                            // Counted before the fresh beat is published, so
                            // the daemon sees one or the other.
                            h.state.stale_episodes.fetch_add(1, Ordering::SeqCst);
                        }
                        h.state.last_ok_ms.store(now, Ordering::SeqCst);
                        *h.state.error.lock().expect("heartbeat error") = None;
                    }
                    Err(e @ BeatError::LockLost(_)) => {
                        *h.state.error.lock().expect("heartbeat error") = Some(e.to_string());
                        h.state.lock_lost.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => {
                        let mut err = h.state.error.lock().expect("heartbeat error");
                        if err.is_none() {
                            tracing::warn!("{e}");
                        }
                        *err = Some(e.to_string());
                    }
                }
                std::thread::sleep(every);
            })?;
        Ok(hb)
    }

    /// Time since our last successful beat.
    pub fn age(&self) -> Duration {
        let last = Duration::from_millis(self.state.last_ok_ms.load(Ordering::SeqCst));
        self.epoch.elapsed().saturating_sub(last)
    }

    pub fn every(&self) -> Duration {
        self.every
    }

    /// How often a beat came too late (we may have been judged dead).
    pub fn stale_episodes(&self) -> u64 {
        self.state.stale_episodes.load(Ordering::SeqCst)
    }

    /// The daemon has dealt with `episodes` stale episodes: its leases
    /// were checked after the last of them.
    pub fn cleared(&self, episodes: u64) {
        self.state
            .cleared_episodes
            .store(episodes, Ordering::SeqCst);
    }

    /// True while nobody can have judged us dead: our last beat is younger
    /// than `limit` and no late beat happened since the daemon last checked
    /// its leases. Asked right before a child starts, from any thread: a
    /// process stopped (SIGSTOP, a VM pause) after it decided to start a
    /// task must not start it for a lease another daemon may hold now.
    pub fn trusted(&self, limit: Duration) -> bool {
        self.age() <= limit
            && self.stale_episodes() == self.state.cleared_episodes.load(Ordering::SeqCst)
    }

    /// Set when the instance lock no longer guards the spool: stop.
    pub fn lock_lost(&self) -> Option<String> {
        if self.state.lock_lost.load(Ordering::SeqCst) {
            self.state.error.lock().expect("heartbeat error").clone()
        } else {
            None
        }
    }
}

/// What we last saw of another daemon's beat counter, and when it changed.
struct Seen {
    /// (pid, counter): a restart is a change even if the counter matches.
    beat: Option<(u64, u64)>,
    changed: Instant,
}

/// Judges other daemons by their beat counters on our own clock.
#[derive(Default)]
pub struct Liveness {
    seen: HashMap<String, Seen>,
}

impl Liveness {
    /// Reads `instance`'s counter (a fresh open) and says whether it has
    /// stood still for `lease`. Seen for the first time, a daemon gets a
    /// whole lease before it can be judged dead.
    pub fn is_dead(&mut self, alive: &std::path::Path, instance: &str, lease: Duration) -> bool {
        let beat = read_beat(alive);
        let now = Instant::now();
        let s = self
            .seen
            .entry(instance.to_string())
            .or_insert(Seen { beat, changed: now });
        if s.beat != beat {
            s.beat = beat;
            s.changed = now;
        }
        now.duration_since(s.changed) >= lease
    }
}

fn read_beat(p: &std::path::Path) -> Option<(u64, u64)> {
    let text = std::fs::read(p).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    Some((v.get("pid")?.as_u64()?, v.get("beat")?.as_u64()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_that_stands_still_for_the_lease_is_dead() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.alive");
        std::fs::write(&p, "{\"pid\":1,\"beat\":1}").unwrap();
        let mut l = Liveness::default();
        let lease = Duration::from_millis(200);
        assert!(!l.is_dead(&p, "x", lease), "first sight: a whole lease");
        std::thread::sleep(Duration::from_millis(120));
        std::fs::write(&p, "{\"pid\":1,\"beat\":2}").unwrap();
        assert!(!l.is_dead(&p, "x", lease));
        std::thread::sleep(Duration::from_millis(120));
        assert!(!l.is_dead(&p, "x", lease), "changed 120 ms ago");
        std::thread::sleep(Duration::from_millis(120));
        assert!(l.is_dead(&p, "x", lease), "still for 240 ms");
        // A restart (new pid) with a counter that happens to match is a change.
        std::fs::write(&p, "{\"pid\":2,\"beat\":2}").unwrap();
        assert!(!l.is_dead(&p, "x", lease));
    }

    #[test]
    fn a_late_beat_is_a_stale_episode() {
        let d = tempfile::tempdir().unwrap();
        let lock_path = d.path().join("i.lock");
        let lock = File::create(&lock_path).unwrap();
        let alive_path = d.path().join("i.alive");
        let alive = File::create(&alive_path).unwrap();
        let b = Beater::new(alive, alive_path.clone(), &lock, lock_path.clone()).unwrap();
        let hb =
            Heartbeat::start(b, Duration::from_millis(20), Duration::from_millis(500)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while read_beat(&alive_path).is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(hb.age() < Duration::from_secs(1));
        assert_eq!(hb.stale_episodes(), 0);
        // The lock file replaced: the thread stops with the reason.
        std::fs::remove_file(&lock_path).unwrap();
        File::create(&lock_path).unwrap();
        while hb.lock_lost().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(hb.lock_lost().unwrap().contains("removed or replaced"));
    }
}
