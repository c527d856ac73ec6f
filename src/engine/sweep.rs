//! Sweeping what killed engines leave behind, so months of crashes do not
//! fill a disk: hidden temp WAVs in the output folders and the GLM-TTS
//! engine's batch files and folders.
//!
//! A run normally removes its own temp file; only a `kill -9` (of the daemon
//! or the machine) leaves one. Several daemons may share the output folder,
//! so a temp file is only removed when it cannot belong to a live run:
//!
//! - it is ours (its name carries our `spool.instance`) and was made before
//!   this process started — the instance lock says the earlier process is
//!   dead and the restart killed its children; or
//! - it has not been written to for longer than the longest possible run
//!   (`engine.timeout`, or a whole batch's deadline, plus `kill_grace`) and a
//!   margin for clocks that differ between a file server and us.
//!
//! The sweep runs on a thread of its own, at start and then periodically;
//! its counts go to `.ttspool/sweep/<instance>.json` for `ttspool status`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::{Config, EngineKind};

/// Added to the longest possible run before someone else's file is stale.
const CLOCK_MARGIN: Duration = Duration::from_secs(600);
/// The GLM-TTS engine's batch names start with this.
pub const BATCH_PREFIX: &str = "ttspool_";
/// Temp outputs are `.ttspool.<instance>.<trace id>.tmp.wav`.
const TEMP_PREFIX: &str = ".ttspool.";
const TEMP_SUFFIX: &str = ".tmp.wav";

/// The hidden temp path an engine writes `output` to. Short and of a fixed
/// shape whatever the output name, and it names the instance, so a restart
/// can sweep its own leftovers at once.
pub fn temp_path(output: &Path, instance: &str, unique: &str) -> PathBuf {
    let dir = output.parent().unwrap_or(Path::new("."));
    dir.join(format!("{TEMP_PREFIX}{instance}.{unique}{TEMP_SUFFIX}"))
}

/// The instance and the ULID in a temp name of ours, if it is one.
fn parse_temp(name: &str) -> Option<(&str, ulid::Ulid)> {
    let mid = name.strip_prefix(TEMP_PREFIX)?.strip_suffix(TEMP_SUFFIX)?;
    let (inst, id) = mid.rsplit_once('.')?;
    Some((inst, ulid::Ulid::from_string(id).ok()?))
}

/// What the sweeps of one daemon removed, kept for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepStats {
    pub last_sweep_at: String,
    pub last_files: u64,
    pub total_files: u64,
    pub total_bytes: u64,
}

pub struct Sweeper {
    output_dir: PathBuf,
    instance: String,
    started: SystemTime,
    stale_after: Duration,
    /// GLM-TTS: `<root>/examples` and `<root>/outputs/pretrain<exp>`.
    glm: Option<(PathBuf, PathBuf)>,
    stats: PathBuf,
}

impl Sweeper {
    pub fn new(cfg: &Config, started: SystemTime) -> Sweeper {
        let e = &cfg.engine;
        let longest = match e.kind {
            EngineKind::Glmtts => e.load_timeout.0 + e.timeout.0 * e.batch_max as u32,
            _ => e.timeout.0,
        } + e.kill_grace.0;
        let glm = (e.kind == EngineKind::Glmtts)
            .then(|| e.root.clone())
            .flatten()
            .map(|r| {
                (
                    r.join("examples"),
                    r.join("outputs").join(format!("pretrain{}", e.exp_name)),
                )
            });
        Sweeper {
            output_dir: cfg.output.dir.clone(),
            instance: cfg.spool.instance.clone(),
            started,
            stale_after: longest + CLOCK_MARGIN,
            glm,
            stats: stats_path(&cfg.spool.dir, &cfg.spool.instance),
        }
    }

    /// How often to sweep: often enough that leftovers live about one
    /// longest run, rarely enough that a big output tree is not walked
    /// all the time.
    pub fn interval(&self) -> Duration {
        (self.stale_after / 2).clamp(Duration::from_secs(300), Duration::from_secs(3600))
    }

    /// One sweep; returns files (and folders) removed and their bytes.
    pub fn sweep(&self) -> (u64, u64) {
        let now = SystemTime::now();
        let mut removed = (0, 0);
        self.walk(&self.output_dir, now, &mut removed);
        if let Some((examples, outputs)) = &self.glm {
            self.sweep_batches(examples, outputs, now, &mut removed);
        }
        removed
    }

    /// [`Sweeper::sweep`], then the counts are added to the stats file.
    pub fn sweep_and_record(&self) -> std::io::Result<(u64, u64)> {
        let (files, bytes) = self.sweep();
        let mut s = read_stats(&self.stats).unwrap_or_default();
        s.last_sweep_at = crate::util::now_rfc3339();
        s.last_files = files;
        s.total_files += files;
        s.total_bytes += bytes;
        if let Some(d) = self.stats.parent() {
            std::fs::create_dir_all(d)?;
        }
        crate::util::atomic_write(&self.stats, &serde_json::to_vec(&s).expect("stats"))?;
        Ok((files, bytes))
    }

    fn is_stale(&self, modified: Option<SystemTime>, now: SystemTime) -> bool {
        modified
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age > self.stale_after)
    }

    fn walk(&self, dir: &Path, now: SystemTime, removed: &mut (u64, u64)) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let name = e.file_name();
            let name = name.to_string_lossy();
            if ft.is_dir() {
                // Output names never make hidden folders.
                if !name.starts_with('.') {
                    self.walk(&e.path(), now, removed);
                }
                continue;
            }
            if !ft.is_file() || !name.starts_with('.') || !name.ends_with(TEMP_SUFFIX) {
                continue;
            }
            let Ok(meta) = e.metadata() else { continue };
            let ours_from_before = parse_temp(&name)
                .is_some_and(|(inst, id)| inst == self.instance && id.datetime() < self.started);
            if (ours_from_before || self.is_stale(meta.modified().ok(), now))
                && std::fs::remove_file(e.path()).is_ok()
            {
                removed.0 += 1;
                removed.1 += meta.len();
            }
        }
    }

    fn sweep_batches(
        &self,
        examples: &Path,
        outputs: &Path,
        now: SystemTime,
        removed: &mut (u64, u64),
    ) {
        for dir in [examples, outputs] {
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name();
                if !name.to_string_lossy().starts_with(BATCH_PREFIX) {
                    continue;
                }
                let Ok(meta) = e.metadata() else { continue };
                if !self.is_stale(meta.modified().ok(), now) {
                    continue;
                }
                let gone = if meta.is_dir() {
                    std::fs::remove_dir_all(e.path())
                } else {
                    std::fs::remove_file(e.path())
                };
                if gone.is_ok() {
                    removed.0 += 1;
                    removed.1 += meta.len();
                }
            }
        }
    }
}

fn stats_path(spool_dir: &Path, instance: &str) -> PathBuf {
    spool_dir
        .join(".ttspool")
        .join("sweep")
        .join(format!("{instance}.json"))
}

fn read_stats(p: &Path) -> Option<SweepStats> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

/// Every daemon's sweep counts on this spool, for `status`.
pub fn all_stats(spool_dir: &Path) -> Vec<(String, SweepStats)> {
    let Ok(rd) = std::fs::read_dir(spool_dir.join(".ttspool").join("sweep")) else {
        return Vec::new();
    };
    let mut out: Vec<(String, SweepStats)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let inst = name.strip_suffix(".json")?.to_string();
            Some((inst, read_stats(&e.path())?))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Sweeps at once and then every [`Sweeper::interval`], on a thread of its
/// own (a big output tree on NFS can take a while to walk).
pub fn start(sweeper: Sweeper) {
    let spawned = std::thread::Builder::new()
        .name("ttspool-sweep".into())
        .spawn(move || loop {
            match sweeper.sweep_and_record() {
                Ok((0, _)) => {}
                Ok((files, bytes)) => tracing::info!(
                    files,
                    bytes,
                    "removed temp files and engine scratch that killed runs left behind"
                ),
                Err(e) => tracing::warn!(
                    "cannot record sweep counts in {}: {}",
                    sweeper.stats.display(),
                    crate::util::io_msg(&e)
                ),
            }
            std::thread::sleep(sweeper.interval());
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the sweep thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweeper(out: &Path, started: SystemTime) -> Sweeper {
        Sweeper {
            output_dir: out.to_path_buf(),
            instance: "me".into(),
            started,
            stale_after: Duration::from_secs(3600),
            glm: None,
            stats: out.join("stats.json"),
        }
    }

    #[test]
    fn temp_names_parse_back() {
        let id = ulid::Ulid::new();
        let p = temp_path(
            Path::new("/o/a/b.wav"),
            "host-1.x",
            &id.to_string().to_lowercase(),
        );
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(p.parent().unwrap(), Path::new("/o/a"));
        assert_eq!(parse_temp(&name), Some(("host-1.x", id)));
        assert_eq!(parse_temp(".b.wav"), None);
    }

    #[test]
    fn only_leftovers_are_swept() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("zh");
        std::fs::create_dir_all(&sub).unwrap();
        let before = ulid::Ulid::new().to_string().to_lowercase();
        std::thread::sleep(Duration::from_millis(5));
        let started = SystemTime::now();
        std::thread::sleep(Duration::from_millis(5));
        let after = ulid::Ulid::new().to_string().to_lowercase();
        let mine_old = temp_path(&sub.join("x.wav"), "me", &before);
        let mine_new = temp_path(&sub.join("x.wav"), "me", &after);
        let other = temp_path(&sub.join("x.wav"), "other", &before);
        let old_style = sub.join(".x.01abc.tmp.wav");
        let final_wav = sub.join("x.wav");
        for p in [&mine_old, &mine_new, &other, &old_style, &final_wav] {
            std::fs::write(p, b"RIFF").unwrap();
        }
        let s = sweeper(d.path(), started);
        assert_eq!(s.sweep(), (1, 4), "only our own file from before the start");
        assert!(!mine_old.exists() && mine_new.exists() && other.exists());
        // Hours later, everybody's leftovers go; never a final WAV.
        let later = SystemTime::now() + Duration::from_secs(7200);
        let mut n = (0, 0);
        s.walk(d.path(), later, &mut n);
        assert_eq!(n.0, 3);
        assert!(final_wav.exists());
    }
}
