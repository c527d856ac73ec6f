//! What runs the TTS. The interface is batch-shaped — a slot hands the engine
//! a list of jobs and gets one outcome per job — so an engine that pays a
//! model load per process (GLM-TTS) can take many tasks per child, while the
//! `command` engine simply runs one child per job.

pub mod command;

use std::path::{Path, PathBuf};

use tokio::sync::watch;

use crate::config::{Config, EngineKind};
use crate::spool::records::ErrorKind;
use crate::task::Task;

/// One task to synthesize.
#[derive(Debug, Clone)]
pub struct Job {
    pub task: Task,
    /// The final output path.
    pub output: PathBuf,
    /// `prompt_audio` resolved inside the voices folder.
    pub prompt_audio: Option<PathBuf>,
    pub trace_id: String,
}

/// A place to run children: pinned to a GPU, or one of `max_parallel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub index: usize,
    pub device: Option<String>,
}

/// Builds the slots of a config: devices × slots_per_device, or max_parallel.
pub fn slots(cfg: &Config) -> Vec<Slot> {
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
    },
    /// Stopped by shutdown: not a result, the task is handed back.
    Cancelled,
}

pub enum Engine {
    Command(command::CommandEngine),
}

impl Engine {
    pub fn from_config(cfg: &Config) -> Engine {
        match cfg.engine.kind {
            EngineKind::Command => Engine::Command(command::CommandEngine::new(cfg)),
        }
    }

    /// The engine's name in records.
    pub fn name(&self) -> &str {
        match self {
            Engine::Command(c) => c.name(),
        }
    }

    /// Jobs per batch at most.
    pub fn batch_max(&self) -> usize {
        match self {
            Engine::Command(_) => 1,
        }
    }

    /// Runs a batch on a slot; one outcome per job, in order.
    pub async fn run_batch(
        &self,
        jobs: &[Job],
        slot: &Slot,
        cancel: watch::Receiver<bool>,
    ) -> Vec<Outcome> {
        match self {
            Engine::Command(c) => {
                let mut out = Vec::with_capacity(jobs.len());
                for j in jobs {
                    out.push(c.run(j, slot, cancel.clone()).await);
                }
                out
            }
        }
    }
}

/// A WAV file starts with `RIFF....WAVE`.
pub fn is_wav(path: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut head = [0u8; 12];
    let mut f = std::fs::File::open(path)?;
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
