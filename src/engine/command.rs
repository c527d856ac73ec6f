//! `engine.kind = "command"`: one child per task, argv with placeholders and
//! no shell, so text with quotes or `$(...)` is only ever an argument.
//!
//! The child writes to a hidden temporary path next to the final one; only a
//! non-empty RIFF/WAVE file from a child that exited 0 is fsynced and renamed
//! onto the final name, so a partial file never appears there.

use std::path::Path;

use tokio::sync::watch;

use super::{ChildEnv, Job, Outcome, Slot, SlotRelease};
use crate::config::Config;
use crate::process::{self, ChildSpec, Exit};
use crate::template::Template;
use crate::util::io_msg;
use crate::vocab::ErrorKind;

pub struct CommandEngine {
    /// `engine.argv`, parsed once; the program resolved in `$PATH`.
    argv: Vec<Template>,
    env: ChildEnv,
    /// Named in temp files, so a restart sweeps its own leftovers.
    instance: String,
    timeout: std::time::Duration,
    kill_grace: std::time::Duration,
    name: String,
}

impl CommandEngine {
    pub fn new(cfg: &Config) -> CommandEngine {
        let prog = Path::new(&cfg.engine.argv[0])
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| cfg.engine.argv[0].clone());
        // The config was validated, so every element parses.
        let mut argv = cfg.argv_templates().expect("validated config");
        // Resolve the program in $PATH once, not in every child (execvp
        // tries each $PATH folder in turn); if absent, spawning reports it.
        if let Some(p) = crate::util::find_in_path(&cfg.engine.argv[0], None) {
            if let Ok(t) = Template::parse(&p.to_string_lossy()) {
                argv[0] = t;
            }
        }
        CommandEngine {
            argv,
            env: ChildEnv::from_config(cfg),
            instance: cfg.spool.instance.clone(),
            timeout: cfg.engine.timeout.0,
            kill_grace: cfg.engine.kill_grace.0,
            name: format!("command:{prog}"),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs one job; `free` (when given) is released as soon as the child
    /// is gone, before its output is checked and moved into place.
    pub async fn run(
        &self,
        job: &Job,
        slot: &Slot,
        cancel: watch::Receiver<bool>,
        free: Option<&mut SlotRelease>,
    ) -> Outcome {
        if let Err(message) = super::ensure_output_dir(job) {
            return fail(ErrorKind::SpawnFailed, message, String::new(), 0);
        }
        // No stale file can hold this name: the trace id is new with every
        // claim, and a failed attempt removes its own temp file.
        let tmp = super::sweep::temp_path(&job.output, &self.instance, job.trace_id.as_str());
        let t = &job.task;
        let vars = super::Placeholders::new(job, &tmp);
        let argv: Vec<String> = self
            .argv
            .iter()
            .map(|a| a.render(|v| vars.get(job, v)))
            .collect();
        let env = self.env.for_task(
            &t.id,
            &tmp,
            slot,
            &[("TTSPOOL_TRACE_ID", job.trace_id.as_str())],
        );
        let spec = ChildSpec {
            argv,
            base: self.env.base().clone(),
            env,
            cwd: None,
            timeout: self.timeout,
            kill_grace: self.kill_grace,
            tail_bytes: process::TAIL_BYTES,
            pipes: false,
        };
        let res = process::run(&spec, cancel).await;
        if let Some(f) = free {
            f.release();
        }
        let run_ms = res.elapsed.as_millis() as u64;
        let outcome = match res.exit {
            Exit::Cancelled => Outcome::Cancelled,
            // The task's own text cannot be carried to a process (a NUL
            // that came through a placeholder, arguments over the kernel's
            // limit): its fault, not the engine's — never retried, never
            // counted by the breaker.
            Exit::SpawnFailed(e)
                if e.kind() == std::io::ErrorKind::InvalidInput
                    || crate::util::os_error(&e) == Some(libc::E2BIG) =>
            {
                Outcome::Failed {
                    kind: ErrorKind::InvalidTask,
                    message: format!(
                        "the task cannot be passed to {}: {}",
                        spec.argv[0],
                        io_msg(&e)
                    ),
                    stderr_tail: res.stderr_tail,
                    run_ms,
                    retry_after: None,
                    give_up: true,
                }
            }
            Exit::SpawnFailed(e) => fail(
                ErrorKind::SpawnFailed,
                format!("cannot start {}: {}", spec.argv[0], io_msg(&e)),
                res.stderr_tail,
                run_ms,
            ),
            Exit::TimedOut => fail(
                ErrorKind::Timeout,
                format!(
                    "engine ran longer than engine.timeout ({})",
                    humantime::format_duration(self.timeout)
                ),
                res.stderr_tail,
                run_ms,
            ),
            Exit::Exited(st) if !st.success() => fail(
                ErrorKind::EngineFailed,
                format!("engine exited with {}", describe(st)),
                res.stderr_tail,
                run_ms,
            ),
            Exit::Exited(_) => match super::finish::finish_output(&tmp, &job.output).await {
                Ok(()) => Outcome::Completed { run_ms },
                Err((kind, message)) => fail(kind, message, res.stderr_tail, run_ms),
            },
        };
        if !matches!(outcome, Outcome::Completed { .. }) {
            let _ = std::fs::remove_file(&tmp);
        }
        outcome
    }
}

fn fail(kind: ErrorKind, message: String, stderr_tail: String, run_ms: u64) -> Outcome {
    Outcome::Failed {
        kind,
        message,
        stderr_tail,
        run_ms,
        retry_after: None,
        give_up: false,
    }
}

fn describe(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => st.to_string(),
    }
}
