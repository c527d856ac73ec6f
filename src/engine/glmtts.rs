//! `engine.kind = "glmtts"`: zai-org/GLM-TTS `glmtts_inference.py`, several
//! tasks per child, because loading its models costs about a minute per
//! process while one utterance takes seconds.
//!
//! A batch is one run of the script: its tasks are written to
//! `<root>/examples/<name>.jsonl` (a fresh name per batch; `uttid`s are ours,
//! never the user's `output_name`), the script writes
//! `<root>/outputs/pretrain<exp>/<name>/<uttid>.wav`, and each task's outcome
//! is decided by its own file, never by the exit code alone — the script logs
//! a bad item and still exits 0. Only WAVs whose header agrees with their
//! length are taken, so a file truncated by a kill is never published. When
//! the whole run fails (non-zero exit, timeout, CUDA out of memory) and left
//! no audio, every task is handed back to be run again in half the batch, so
//! a line that crashes the script is isolated in a few runs instead of failing
//! its neighbours. The batch's input file and output folder are removed after.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;

use super::{is_complete_wav, publish, ChildEnv, Job, Outcome, Slot, SlotRelease};
use crate::config::Config;
use crate::process::{self, ChildSpec, Exit};
use crate::util::{cut, io_msg};
use crate::vocab::ErrorKind;

/// Bytes of the batch's stderr kept to find each task's lines in.
const BATCH_TAIL: usize = 256 * 1024;

pub struct GlmttsEngine {
    root: PathBuf,
    python: String,
    exp_name: String,
    sample_rate: u32,
    use_phoneme: bool,
    batch_max: usize,
    timeout: Duration,
    load_timeout: Duration,
    kill_grace: Duration,
    min_free_mib: Option<u64>,
    env: ChildEnv,
}

impl GlmttsEngine {
    pub fn new(cfg: &Config) -> GlmttsEngine {
        let e = &cfg.engine;
        GlmttsEngine {
            root: e.root.clone().unwrap_or_default(),
            python: crate::util::find_in_path(&e.python, None)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|| e.python.clone()),
            exp_name: e.exp_name.clone(),
            sample_rate: e.glmtts_sample_rate(),
            use_phoneme: e.use_phoneme,
            batch_max: e.batch_max,
            timeout: e.timeout.0,
            load_timeout: e.load_timeout.0,
            kill_grace: e.kill_grace.0,
            min_free_mib: cfg.gpu.min_free_mib,
            env: ChildEnv::from_config(cfg),
        }
    }

    pub fn batch_max(&self) -> usize {
        self.batch_max
    }

    /// The uttid of the `i`-th task of a batch: safe in any file system.
    fn uttid(i: usize) -> String {
        format!("t{i:04}")
    }

    fn out_dir(&self, name: &str) -> PathBuf {
        self.root
            .join("outputs")
            .join(format!("pretrain{}", self.exp_name))
            .join(name)
    }

    pub async fn run(
        &self,
        jobs: &[Job],
        slot: &Slot,
        cancel: watch::Receiver<bool>,
        free: &mut SlotRelease,
    ) -> Vec<Outcome> {
        let n = jobs.len();
        let name = format!(
            "{}{}",
            super::sweep::BATCH_PREFIX,
            ulid::Ulid::new().to_string().to_lowercase()
        );
        let input = self.root.join("examples").join(format!("{name}.jsonl"));
        let out_dir = self.out_dir(&name);
        let all = |kind, message: String| -> Vec<Outcome> {
            (0..n)
                .map(|_| Outcome::Failed {
                    kind,
                    message: message.clone(),
                    stderr_tail: String::new(),
                    run_ms: 0,
                    retry_after: None,
                    give_up: false,
                })
                .collect()
        };
        if let Err(e) = write_input(&input, jobs) {
            return all(
                ErrorKind::SpawnFailed,
                format!(
                    "cannot write the batch file {}: {}",
                    input.display(),
                    io_msg(&e)
                ),
            );
        }
        if let (Some(min), Some(dev)) = (self.min_free_mib, &slot.device) {
            if wait_for_free_memory(dev, min, cancel.clone())
                .await
                .is_err()
            {
                let _ = std::fs::remove_file(&input);
                return vec![Outcome::Cancelled; n];
            }
        }
        let mut argv = vec![
            self.python.clone(),
            "glmtts_inference.py".into(),
            "--data".into(),
            name.clone(),
            "--exp_name".into(),
            self.exp_name.clone(),
            "--sample_rate".into(),
            self.sample_rate.to_string(),
        ];
        if self.use_phoneme {
            argv.push("--use_phoneme".into());
        }
        let ids: Vec<&str> = jobs.iter().map(|j| j.task.id.as_str()).collect();
        let env = self
            .env
            .for_task(&ids.join(","), &out_dir, slot, &[("TTSPOOL_BATCH", &name)]);
        let spec = ChildSpec {
            argv,
            base: self.env.base().clone(),
            env,
            cwd: Some(self.root.clone()),
            timeout: self.load_timeout + self.timeout * n as u32,
            kill_grace: self.kill_grace,
            tail_bytes: BATCH_TAIL,
            pipes: false,
        };
        let res = process::run(&spec, cancel).await;
        // A clean exit frees the GPU while the outputs are taken. A batch
        // that failed as a whole keeps its slot until its halves are queued
        // again, so the failing half is isolated before other work runs.
        if matches!(res.exit, Exit::Exited(st) if st.success()) {
            free.release();
        }
        let run_ms = res.elapsed.as_millis() as u64;
        let per_task_ms = run_ms / n as u64;
        let stderr = res.stderr_tail;
        let tail_for = |i: usize| task_tail(&stderr, &Self::uttid(i));

        let outcomes = match res.exit {
            Exit::Cancelled => vec![Outcome::Cancelled; n],
            Exit::SpawnFailed(e) => all(
                ErrorKind::SpawnFailed,
                format!("cannot start {}: {}", self.python, io_msg(&e)),
            ),
            exit => {
                let clean = matches!(&exit, Exit::Exited(st) if st.success());
                let (kind, why) = match &exit {
                    Exit::TimedOut => (
                        ErrorKind::Timeout,
                        format!(
                            "the batch of {n} ran longer than engine.load_timeout + engine.timeout x {n} ({})",
                            humantime::format_duration(spec.timeout)
                        ),
                    ),
                    Exit::Exited(st) => (ErrorKind::EngineFailed, format!("glmtts_inference.py exited with {st}")),
                    _ => unreachable!("handled above"),
                };
                // Which tasks got a complete WAV? Publish those.
                let mut outcomes = Vec::with_capacity(n);
                let mut any_audio = false;
                for (i, job) in jobs.iter().enumerate() {
                    let wav = out_dir.join(format!("{}.wav", Self::uttid(i)));
                    outcomes.push(match take(&wav, &job.output).await {
                        Taken::Published => {
                            any_audio = true;
                            Outcome::Completed { run_ms: per_task_ms }
                        }
                        Taken::Missing => Outcome::Failed {
                            kind: if clean { ErrorKind::MissingOutput } else { kind },
                            message: if clean {
                                "glmtts_inference.py exited 0 but wrote no audio for this task (see stderr_tail)".into()
                            } else {
                                why.clone()
                            },
                            stderr_tail: tail_for(i),
                            run_ms: per_task_ms,
                            retry_after: None,
                            give_up: false,
                        },
                        Taken::Incomplete => Outcome::Failed {
                            // A clean exit that left a broken WAV is the
                            // engine's output; after a kill it is only cut short.
                            kind: if clean { ErrorKind::InvalidOutput } else { kind },
                            message: if clean {
                                "the WAV GLM-TTS wrote is incomplete (header and length disagree)".into()
                            } else {
                                format!("{why}; its WAV was cut short and is not used")
                            },
                            stderr_tail: tail_for(i),
                            run_ms: per_task_ms,
                            retry_after: None,
                            give_up: false,
                        },
                        Taken::Error(m) => Outcome::Failed {
                            kind: ErrorKind::SpawnFailed,
                            message: m,
                            stderr_tail: tail_for(i),
                            run_ms: per_task_ms,
                            retry_after: None,
                            give_up: false,
                        },
                    });
                }
                if !clean && !any_audio && n > 1 {
                    let oom = is_oom(&stderr);
                    let message = if oom {
                        format!("CUDA out of memory with a batch of {n}")
                    } else {
                        why
                    };
                    outcomes = vec![
                        Outcome::Split {
                            retry_batch: if oom { (n / 2).max(1) } else { n.div_ceil(2) },
                            message,
                        };
                        n
                    ];
                }
                outcomes
            }
        };
        let _ = std::fs::remove_file(&input);
        let _ = std::fs::remove_dir_all(&out_dir);
        outcomes
    }
}

enum Taken {
    Published,
    Missing,
    Incomplete,
    Error(String),
}

async fn take(wav: &Path, output: &Path) -> Taken {
    let (wav, output) = (wav.to_path_buf(), output.to_path_buf());
    tokio::task::spawn_blocking(move || match is_complete_wav(&wav) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Taken::Missing,
        Err(e) => Taken::Error(format!("cannot read {}: {}", wav.display(), io_msg(&e))),
        Ok(false) => Taken::Incomplete,
        Ok(true) => match publish(&wav, &output) {
            Ok(()) => Taken::Published,
            Err(e) => Taken::Error(format!(
                "cannot move output to {}: {}",
                output.display(),
                io_msg(&e)
            )),
        },
    })
    .await
    .unwrap_or_else(|e| Taken::Error(e.to_string()))
}

fn write_input(path: &Path, jobs: &[Job]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut body = String::new();
    for (i, j) in jobs.iter().enumerate() {
        let line = json!({
            "uttid": GlmttsEngine::uttid(i),
            "prompt_text": j.task.prompt_text.as_deref().unwrap_or(""),
            "prompt_speech": j.prompt_audio.as_ref().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default(),
            "syn_text": j.task.input_text,
        });
        body.push_str(&line.to_string());
        body.push('\n');
    }
    let mut f = std::fs::File::create(path)?;
    f.write_all(body.as_bytes())
}

fn is_oom(stderr: &str) -> bool {
    stderr.contains("CUDA out of memory") || stderr.contains("OutOfMemoryError")
}

/// The stderr lines that mention this task's uttid first, then the tail of
/// the whole stderr, within 4 KiB.
fn task_tail(stderr: &str, uttid: &str) -> String {
    let mine: Vec<&str> = stderr.lines().filter(|l| l.contains(uttid)).collect();
    let mut out = String::new();
    for l in mine.iter().rev().take(20).rev() {
        out.push_str(l);
        out.push('\n');
    }
    let room = process::TAIL_BYTES.saturating_sub(out.len() + 8);
    if room > 0 {
        let start = stderr.len().saturating_sub(room);
        let mut start = start;
        while !stderr.is_char_boundary(start) {
            start += 1;
        }
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&stderr[start..]);
    }
    cut(&out, process::TAIL_BYTES).to_string()
}

/// Asks `nvidia-smi` for the device's free memory until it has `min` MiB.
/// Without `nvidia-smi` it says so once and goes on.
async fn wait_for_free_memory(
    device: &str,
    min: u64,
    mut cancel: watch::Receiver<bool>,
) -> Result<(), ()> {
    let mut warned = false;
    loop {
        if *cancel.borrow() {
            return Err(());
        }
        let out = tokio::process::Command::new("nvidia-smi")
            .args([
                "--query-gpu=index,memory.free",
                "--format=csv,noheader,nounits",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .await;
        let free = match out {
            Ok(o) if o.status.success() => parse_free(&String::from_utf8_lossy(&o.stdout), device),
            Ok(o) => {
                tracing::warn!(
                    device,
                    "nvidia-smi failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(
                    device,
                    "gpu.min_free_mib is set but nvidia-smi cannot run: {}",
                    io_msg(&e)
                );
                return Ok(());
            }
        };
        match free {
            Some(f) if f >= min => return Ok(()),
            Some(f) => {
                if !warned {
                    tracing::info!(
                        device,
                        free_mib = f,
                        min_free_mib = min,
                        "waiting for GPU memory"
                    );
                    warned = true;
                }
            }
            None => {
                tracing::warn!(device, "nvidia-smi does not list this device; not waiting");
                return Ok(());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = cancel.changed() => {}
        }
    }
}

/// Free MiB of `device` in `nvidia-smi --query-gpu=index,memory.free` output.
fn parse_free(csv: &str, device: &str) -> Option<u64> {
    csv.lines().find_map(|l| {
        let mut it = l.split(',').map(str::trim);
        let idx = it.next()?;
        let free = it.next()?.parse().ok()?;
        (idx == device).then_some(free)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_output() {
        let csv = "0, 1024\n1, 30000\n";
        assert_eq!(parse_free(csv, "1"), Some(30000));
        assert_eq!(parse_free(csv, "0"), Some(1024));
        assert_eq!(parse_free(csv, "2"), None);
    }

    #[test]
    fn task_tail_puts_the_tasks_lines_first() {
        let err = "load ok\nERROR - Error processing t0001: bad prompt audio\nTraceback\nother\n";
        let t = task_tail(err, "t0001");
        assert!(
            t.starts_with("ERROR - Error processing t0001: bad prompt audio\n---\n"),
            "{t}"
        );
        assert!(t.ends_with("other\n"));
    }
}
