//! What runs the TTS. The interface is batch-shaped — a slot hands the engine
//! a list of jobs and gets one outcome per job — so an engine that pays a
//! model load per process (GLM-TTS) can take many tasks per child, while the
//! `command` engine simply runs one child per job.

pub mod command;
pub mod finish;
pub mod glmtts;
pub mod http;
pub mod sweep;
pub mod worker;

use std::path::Path;

use tokio::sync::watch;

use crate::config::{Config, EngineKind};
use crate::process;
use crate::vocab::ErrorKind;

pub use crate::vocab::{Job, Slot};

/// Builds the slots of a config: devices × slots_per_device, or max_parallel.
pub fn slots(cfg: &Config) -> Vec<Slot> {
    if cfg.engine.kind == EngineKind::Http {
        // Each server is a group of max_in_flight slots (slot i talks to
        // server i mod n).
        let n = cfg.engine.urls.len().max(1) * cfg.engine.max_in_flight;
        return (0..n)
            .map(|index| Slot {
                index,
                device: None,
            })
            .collect();
    }
    if cfg.gpu.devices.is_empty() {
        (0..cfg.gpu.max_parallel)
            .map(|index| Slot {
                index,
                device: None,
            })
            .collect()
    } else {
        let mut out = Vec::new();
        for s in 0..cfg.gpu.slots_per_device {
            for d in &cfg.gpu.devices {
                out.push(Slot {
                    index: out.len(),
                    device: Some(d.clone()),
                });
            }
            let _ = s;
        }
        out
    }
}

/// The environment of an engine's children (SPEC §4): the allow-listed
/// part built once, plus per child what SPEC §4 promises, and the slot's GPU.
#[derive(Debug, Clone)]
pub struct ChildEnv {
    base: process::BaseEnv,
}

impl ChildEnv {
    pub fn from_config(cfg: &Config) -> ChildEnv {
        ChildEnv {
            base: process::BaseEnv::new(
                &cfg.engine.env_pass,
                &cfg.engine.env,
                &process::marks(&cfg.spool.dir, &cfg.spool.instance),
            ),
        }
    }

    pub fn base(&self) -> &process::BaseEnv {
        &self.base
    }

    /// The per-child variables for a task (or a batch's first task).
    pub fn for_task(
        &self,
        task_id: &str,
        output: &Path,
        slot: &Slot,
        extra: &[(&str, &str)],
    ) -> Vec<(String, String)> {
        let mut env = vec![
            ("TTSPOOL_TASK_ID".to_string(), task_id.to_string()),
            (
                "TTSPOOL_OUTPUT".to_string(),
                output.to_string_lossy().into_owned(),
            ),
            ("TTSPOOL_SLOT".to_string(), slot.index.to_string()),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        if let Some(d) = &slot.device {
            env.push(("CUDA_VISIBLE_DEVICES".to_string(), d.clone()));
        }
        env
    }
}

/// How one job ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Completed {
        run_ms: u64,
    },
    Failed {
        kind: ErrorKind,
        message: String,
        stderr_tail: String,
        run_ms: u64,
        /// The engine asked to wait at least this long before a retry (an
        /// HTTP server's `Retry-After`).
        retry_after: Option<std::time::Duration>,
        /// Not to be run again whatever the kind says: the task itself is
        /// at fault (a worker said `retryable: false`, or the task took
        /// down two workers).
        give_up: bool,
    },
    /// The batch failed as a whole (crash, timeout or CUDA out of memory,
    /// with no audio at all): run the task again in a batch of at most
    /// `retry_batch`. Not a failure of the task, so no attempt is counted.
    Split {
        retry_batch: usize,
        message: String,
    },
    /// Stopped by shutdown: not a result, the task is handed back.
    Cancelled,
}

/// Frees the slot a batch runs on before the batch is finished. An engine
/// releases it as soon as its children are gone: checking, fsyncing and
/// renaming the outputs needs no GPU, so the slot's next batch starts
/// meanwhile. A slot not released here is freed with the batch's outcomes.
pub struct SlotRelease(Option<Box<dyn FnOnce() + Send>>);

impl SlotRelease {
    pub fn new(release: impl FnOnce() + Send + 'static) -> SlotRelease {
        SlotRelease(Some(Box::new(release)))
    }

    pub fn release(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }

    pub fn released(&self) -> bool {
        self.0.is_none()
    }
}

pub enum Engine {
    Command(command::CommandEngine),
    Glmtts(glmtts::GlmttsEngine),
    Http(http::HttpEngine),
    Worker(worker::WorkerEngine),
}

impl Engine {
    pub fn from_config(cfg: &Config) -> Engine {
        match cfg.engine.kind {
            EngineKind::Command => Engine::Command(command::CommandEngine::new(cfg)),
            EngineKind::Glmtts => Engine::Glmtts(glmtts::GlmttsEngine::new(cfg)),
            EngineKind::Http => Engine::Http(http::HttpEngine::new(cfg)),
            EngineKind::Worker => Engine::Worker(worker::WorkerEngine::new(cfg)),
        }
    }

    /// The engine for a reloaded config: `old` itself when the new config
    /// would give the same engine and it keeps state worth keeping (loaded
    /// workers), else a new one — and then `old`'s workers are retired.
    pub fn reload(
        old: &std::sync::Arc<Engine>,
        old_cfg: &Config,
        new: &Config,
    ) -> std::sync::Arc<Engine> {
        let same = format!("{:?}{:?}", old_cfg.engine, old_cfg.gpu)
            == format!("{:?}{:?}", new.engine, new.gpu)
            && old_cfg.spool.instance == new.spool.instance;
        match &**old {
            Engine::Worker(_) if same => old.clone(),
            Engine::Worker(w) => {
                w.retire();
                std::sync::Arc::new(Engine::from_config(new))
            }
            _ => std::sync::Arc::new(Engine::from_config(new)),
        }
    }

    /// Gets the engine ready before the first task: a worker engine starts
    /// its workers, so the first task finds a loaded model.
    pub fn warm_up(&self) {
        if let Engine::Worker(w) = self {
            w.warm_up();
        }
    }

    /// Stops what the engine keeps running between tasks (the staged
    /// shutdown, after the last task).
    pub async fn stop(&self) {
        if let Engine::Worker(w) = self {
            w.stop().await;
        }
    }

    /// The engine's name in records.
    pub fn name(&self) -> &str {
        match self {
            Engine::Command(c) => c.name(),
            Engine::Glmtts(_) => "glmtts",
            Engine::Http(h) => h.name(),
            Engine::Worker(w) => w.name(),
        }
    }

    /// The engine can tell whether a slot works without running a task.
    pub fn can_probe(&self) -> bool {
        matches!(self, Engine::Http(_) | Engine::Worker(_))
    }

    /// Whether the slot's engine works, without a task (see
    /// [`Engine::can_probe`]).
    pub async fn probe(&self, slot: &Slot) -> Result<(), String> {
        let res = match self {
            Engine::Http(h) => h.probe(slot).await,
            Engine::Worker(w) => w.probe(slot).await,
            _ => Ok(()),
        };
        res.map_err(|why| crate::redact::urls_in(&why).into_owned())
    }

    /// Jobs per batch at most.
    pub fn batch_max(&self) -> usize {
        match self {
            Engine::Command(_) | Engine::Http(_) | Engine::Worker(_) => 1,
            Engine::Glmtts(g) => g.batch_max(),
        }
    }

    /// Runs a batch on a slot; one outcome per job, in order. `free` may be
    /// released once no child of the batch runs any more.
    pub async fn run_batch(
        &self,
        jobs: &[Job],
        slot: &Slot,
        cancel: watch::Receiver<bool>,
        free: &mut SlotRelease,
    ) -> Vec<Outcome> {
        let mut out = self.run_jobs(jobs, slot, cancel, free).await;
        // What an engine says goes into records, webhooks, API answers and
        // logs: URLs in it lose their user info and query (a server URL's
        // password or api_key, a reqwest error quoting the URL).
        let redact = |s: &mut String| {
            if let std::borrow::Cow::Owned(r) = crate::redact::urls_in(s) {
                *s = r;
            }
        };
        for o in &mut out {
            match o {
                Outcome::Failed {
                    message,
                    stderr_tail,
                    ..
                } => {
                    redact(message);
                    redact(stderr_tail);
                }
                Outcome::Split { message, .. } => redact(message),
                Outcome::Completed { .. } | Outcome::Cancelled => {}
            }
        }
        out
    }

    async fn run_jobs(
        &self,
        jobs: &[Job],
        slot: &Slot,
        cancel: watch::Receiver<bool>,
        free: &mut SlotRelease,
    ) -> Vec<Outcome> {
        // GLM-TTS runs the batch in one child; the others run its jobs one
        // by one, and the last one's end frees the slot.
        if let Engine::Glmtts(g) = self {
            return g.run(jobs, slot, cancel, free).await;
        }
        let mut out = Vec::with_capacity(jobs.len());
        let last = jobs.len().saturating_sub(1);
        for (i, j) in jobs.iter().enumerate() {
            let free = (i == last).then_some(&mut *free);
            let cancel = cancel.clone();
            out.push(match self {
                Engine::Command(c) => c.run(j, slot, cancel, free).await,
                Engine::Worker(w) => w.run(j, slot, cancel, free).await,
                Engine::Http(h) => h.run(j, slot, cancel, free).await,
                Engine::Glmtts(_) => unreachable!("returned above"),
            });
        }
        out
    }
}

/// The strings a task's placeholders (SPEC §4) stand for, `{output}` being
/// the temp path the engine writes.
pub struct Placeholders {
    output: String,
    prompt_audio: String,
}

impl Placeholders {
    pub fn new(job: &Job, output: &Path) -> Placeholders {
        Placeholders {
            output: output.to_string_lossy().into_owned(),
            prompt_audio: job
                .prompt_audio
                .as_deref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// The value of `v` for `job`.
    pub fn get<'a>(&'a self, job: &'a Job, v: crate::template::Var) -> &'a str {
        use crate::template::Var;
        let t = &job.task;
        match v {
            Var::InputText => &t.input_text,
            Var::Output => &self.output,
            Var::OutputName => &t.output_name,
            Var::Id => &t.id,
            Var::PromptAudio => &self.prompt_audio,
            Var::PromptText => t.prompt_text.as_deref().unwrap_or(""),
        }
    }
}

/// Creates the folder of a job's output (an `output_name` may hold
/// folders); the message for a `spawn_failed` record if it cannot.
pub fn ensure_output_dir(job: &Job) -> Result<(), String> {
    let dir = job.output.parent().unwrap_or(Path::new("."));
    crate::util::ensure_dir(dir).map_err(|e| {
        format!(
            "cannot create output folder {}: {}",
            dir.display(),
            crate::util::io_msg(&e)
        )
    })
}

/// A WAV file starts with `RIFF....WAVE`; read from where `f` stands.
pub fn has_wav_head(f: &mut impl std::io::Read) -> std::io::Result<bool> {
    let mut head = [0u8; 12];
    let mut n = 0;
    while n < 12 {
        let r = f.read(&mut head[n..])?;
        if r == 0 {
            return Ok(false);
        }
        n += r;
    }
    Ok(&head[0..4] == b"RIFF" && &head[8..12] == b"WAVE")
}

/// A WAV whose header agrees with its length: RIFF size + 8 is the file size
/// and the `data` chunk lies inside the file. A writer killed mid-file (or
/// one that never patched the header) fails this, so a truncated file from a
/// killed run is never taken.
pub fn is_complete_wav(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut head = [0u8; 12];
    if len < 44 || f.read_exact(&mut head).is_err() {
        return Ok(false);
    }
    if &head[0..4] != b"RIFF" || &head[8..12] != b"WAVE" {
        return Ok(false);
    }
    let riff = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as u64;
    if riff + 8 != len && riff + 9 != len {
        return Ok(false);
    }
    // Walk the chunks to `data`.
    let mut pos = 12u64;
    let mut chunk = [0u8; 8];
    let mut seen_fmt = false;
    while pos + 8 <= len {
        f.read_exact(&mut chunk)?;
        let size = u32::from_le_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]) as u64;
        if &chunk[0..4] == b"fmt " {
            seen_fmt = true;
        }
        if &chunk[0..4] == b"data" {
            return Ok(seen_fmt && size > 0 && pos + 8 + size <= len);
        }
        pos += 8 + size + (size & 1);
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(pos))?;
    }
    Ok(false)
}

/// Makes `src`'s bytes durable and moves it onto `dst` (see [`move_into_place`]).
pub fn publish(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::File::open(src)?.sync_all()?;
    move_into_place(src, dst)
}

/// Renames a durable `src` onto `dst`, creating `dst`'s folder if needed;
/// across file systems: copy to a hidden temp next to `dst`, fsync, rename.
/// The folder fsync that makes the rename durable is the record committer's.
pub fn move_into_place(src: &Path, dst: &Path) -> std::io::Result<()> {
    let mut res = std::fs::rename(src, dst);
    if matches!(&res, Err(e) if e.kind() == std::io::ErrorKind::NotFound) && src.exists() {
        if let Some(d) = dst.parent() {
            std::fs::create_dir_all(d)?;
        }
        res = std::fs::rename(src, dst);
    }
    match res {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            // "~copy" is no instance name: only the age rule sweeps it.
            let tmp = sweep::temp_path(dst, "~copy", &ulid::Ulid::new().to_string());
            let res = (|| {
                std::fs::copy(src, &tmp)?;
                std::fs::File::open(&tmp)?.sync_all()?;
                std::fs::rename(&tmp, dst)
            })();
            if res.is_err() {
                let _ = std::fs::remove_file(&tmp);
            } else {
                let _ = std::fs::remove_file(src);
            }
            res
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(data: usize) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(b"RIFF");
        v.extend_from_slice(&(36 + data as u32).to_le_bytes());
        v.extend_from_slice(b"WAVEfmt ");
        v.extend_from_slice(&16u32.to_le_bytes());
        v.extend_from_slice(&[1, 0, 1, 0, 0x80, 0x3e, 0, 0, 0, 0x7d, 0, 0, 2, 0, 16, 0]);
        v.extend_from_slice(b"data");
        v.extend_from_slice(&(data as u32).to_le_bytes());
        v.extend(std::iter::repeat_n(0u8, data));
        v
    }

    #[test]
    fn complete_and_truncated_wavs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.wav");
        std::fs::write(&p, wav(100)).unwrap();
        assert!(is_complete_wav(&p).unwrap());
        let mut cut = wav(100);
        cut.truncate(90);
        std::fs::write(&p, &cut).unwrap();
        assert!(!is_complete_wav(&p).unwrap(), "truncated");
        let mut f = std::fs::File::open(&p).unwrap();
        assert!(
            has_wav_head(&mut f).unwrap(),
            "the loose check still passes"
        );
        std::fs::write(&p, wav(0)).unwrap();
        assert!(!is_complete_wav(&p).unwrap(), "no audio");
        std::fs::write(&p, b"RIFF....WAVE").unwrap();
        assert!(!is_complete_wav(&p).unwrap());
    }
}
