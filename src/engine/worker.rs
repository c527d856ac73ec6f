//! `engine.kind = "worker"` (SPEC §13): one long-lived child per slot that
//! loads the model once and then synthesizes task after task.
//!
//! Each slot has an actor (a task on the runtime) that owns its worker: it
//! starts one when the daemon starts, so the first task finds a loaded
//! model; hands it one task at a time; and replaces it when it dies, hangs,
//! answers garbage, says `fatal` or has done `max_tasks`. `engine.run` only
//! sends the actor a request and, once the worker has answered, checks,
//! fsyncs and renames the output like every engine — with the slot already
//! free, so the worker's next task overlaps that.
//!
//! The protocol: the worker reads task lines on its stdin and answers on
//! fd 3 (stdout is /dev/null, stderr feeds the failed records' tail), so
//! whatever a library prints cannot corrupt it. First `{"ready": true}`
//! within `engine.load_timeout`; then per task one line `{"id", "ok": true}`
//! or `{"id", "ok": false, "error", "retryable", "fatal"}` within
//! `engine.timeout`.
//!
//! A worker that dies, hangs, answers garbage or says `fatal` is killed as a
//! group and the task is run again alone on a fresh one; a task that takes
//! down two workers fails for good (`give_up`), so a poison line costs two
//! worker starts and nothing else. An answer `retryable: false` is the
//! task's own failure: `engine_rejected`, like a TTS server's 4xx. Replacements wait a backoff that grows
//! with consecutive failures, so a worker that cannot load does not spin.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::{ChildEnv, Outcome, SlotRelease};
use crate::config::Config;
use crate::process::{self, Child, ChildSpec};
use crate::util::{io_msg, Tail};
use crate::vocab::{ErrorKind, Job, Slot};

/// Longest line a worker may write on fd 3.
const ANSWER_MAX: usize = 1 << 20;
/// After stdin is closed, how long a worker gets to exit on its own before
/// its group gets SIGTERM.
const EOF_GRACE: Duration = Duration::from_secs(1);
/// The first replacement after a failure waits this; each further one twice
/// as long, up to [`RESTART_MAX`].
const RESTART_FIRST: Duration = Duration::from_millis(250);
const RESTART_MAX: Duration = Duration::from_secs(60);
/// Workers a task may take down before it fails for good.
const STRIKES: u32 = 2;

/// What every worker of the engine shares.
struct Settings {
    argv: Vec<String>,
    env: ChildEnv,
    /// The config file's folder: relative paths in `engine.argv` mean what
    /// they say in the config.
    cwd: PathBuf,
    load_timeout: Duration,
    timeout: Duration,
    kill_grace: Duration,
    max_tasks: u64,
    idle_stop: Option<Duration>,
}

pub struct WorkerEngine {
    set: Arc<Settings>,
    slots: Vec<Slot>,
    instance: String,
    name: String,
    /// The actors, started on first use (inside the runtime).
    actors: Mutex<Option<Vec<mpsc::UnboundedSender<Request>>>>,
    handles: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// True: stop every worker (shutdown, or a reload that replaced us).
    stop: watch::Sender<bool>,
}

enum Request {
    Task(Box<TaskRequest>),
    /// Is the slot's worker up (starting one if need be)?
    Probe(oneshot::Sender<Result<(), String>>),
}

struct TaskRequest {
    job: Job,
    tmp: PathBuf,
    cancel: watch::Receiver<bool>,
    reply: oneshot::Sender<Reply>,
}

enum Reply {
    /// The worker says it wrote `tmp`.
    Wrote {
        run_ms: u64,
        stderr_tail: String,
    },
    Outcome(Outcome),
}

impl WorkerEngine {
    pub fn new(cfg: &Config) -> WorkerEngine {
        let e = &cfg.engine;
        let cwd = working_dir(cfg);
        let prog = Path::new(&e.argv[0])
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        // `python3 engines/x_worker.py`: name it by the script.
        let script = e
            .argv
            .iter()
            .skip(1)
            .find(|a| !a.starts_with('-'))
            .and_then(|a| Path::new(a).file_name())
            .map(|s| s.to_string_lossy().into_owned());
        let name = match script {
            Some(s) if prog.starts_with("python") => s,
            _ => prog,
        };
        WorkerEngine {
            set: Arc::new(Settings {
                argv: e.argv.clone(),
                env: ChildEnv::from_config(cfg),
                cwd,
                load_timeout: e.load_timeout.0,
                timeout: e.timeout.0,
                kill_grace: e.kill_grace.0,
                max_tasks: e.max_tasks,
                idle_stop: (!e.idle_stop.0.is_zero()).then_some(e.idle_stop.0),
            }),
            slots: super::slots(cfg),
            instance: cfg.spool.instance.clone(),
            name: format!("worker:{name}"),
            actors: Mutex::new(None),
            handles: Mutex::new(Vec::new()),
            stop: watch::channel(false).0,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts the slots' actors, and so their workers, if not yet done.
    /// Must run inside the daemon's runtime.
    pub fn warm_up(&self) {
        let mut actors = self.actors.lock().expect("actors");
        if actors.is_some() || *self.stop.borrow() {
            return;
        }
        let mut senders = Vec::with_capacity(self.slots.len());
        let mut handles = self.handles.lock().expect("handles");
        for slot in &self.slots {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            handles.push(tokio::spawn(actor(
                self.set.clone(),
                slot.clone(),
                rx,
                self.stop.subscribe(),
            )));
        }
        *actors = Some(senders);
    }

    fn send(&self, slot: &Slot, req: Request) -> Result<(), Request> {
        let actors = self.actors.lock().expect("actors");
        match actors.as_ref().and_then(|a| a.get(slot.index)) {
            Some(tx) => tx.send(req).map_err(|e| e.0),
            None => Err(req),
        }
    }

    /// Stops every worker: closes its stdin, then SIGTERM, then SIGKILL
    /// after `engine.kill_grace`. A task still running gets `Cancelled`.
    pub async fn stop(&self) {
        self.stop.send_replace(true);
        let handles = std::mem::take(&mut *self.handles.lock().expect("handles"));
        for h in handles {
            let _ = h.await;
        }
    }

    /// Stops the workers without waiting (a reload replaced this engine):
    /// each finishes its current task first.
    pub fn retire(&self) {
        self.stop.send_replace(true);
    }

    /// Whether the slot's worker is up, starting it if need be.
    pub async fn probe(&self, slot: &Slot) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        if self.send(slot, Request::Probe(tx)).is_err() {
            return Err("the worker engine is stopping".into());
        }
        rx.await
            .unwrap_or_else(|_| Err("the worker engine is stopping".into()))
    }

    /// Runs one job on the slot's worker; `free` is released as soon as the
    /// worker has answered, before the output is checked and moved.
    pub async fn run(
        &self,
        job: &Job,
        slot: &Slot,
        cancel: watch::Receiver<bool>,
        free: Option<&mut SlotRelease>,
    ) -> Outcome {
        if let Err(message) = super::ensure_output_dir(job) {
            return failed(ErrorKind::SpawnFailed, message, String::new(), 0, false);
        }
        let tmp = super::sweep::temp_path(&job.output, &self.instance, job.trace_id.as_str());
        let (tx, rx) = oneshot::channel();
        let req = Request::Task(Box::new(TaskRequest {
            job: job.clone(),
            tmp: tmp.clone(),
            cancel,
            reply: tx,
        }));
        // A slot without an actor: started lazily (a test driving the
        // engine without the daemon), or stopping (then handed back).
        if let Some(req) = self.send(slot, req).err() {
            if *self.stop.borrow() {
                return Outcome::Cancelled;
            }
            self.warm_up();
            if self.send(slot, req).is_err() {
                return Outcome::Cancelled;
            }
        }
        let reply = rx.await.unwrap_or(Reply::Outcome(Outcome::Cancelled));
        if let Some(f) = free {
            f.release();
        }
        let outcome = match reply {
            Reply::Outcome(o) => o,
            Reply::Wrote {
                run_ms,
                stderr_tail,
            } => match super::finish::finish_output(&tmp, &job.output).await {
                Ok(()) => Outcome::Completed { run_ms },
                Err((ErrorKind::MissingOutput, _)) => failed(
                    ErrorKind::MissingOutput,
                    "the worker answered ok but wrote no output file".into(),
                    stderr_tail,
                    run_ms,
                    false,
                ),
                Err((kind, message)) => failed(kind, message, stderr_tail, run_ms, false),
            },
        };
        if !matches!(outcome, Outcome::Completed { .. }) {
            let _ = std::fs::remove_file(&tmp);
        }
        outcome
    }
}

/// Where workers run: the config file's folder.
pub fn working_dir(cfg: &Config) -> PathBuf {
    let dir = cfg
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    std::path::absolute(&dir).unwrap_or(dir)
}

/// Starts one worker of `cfg` (on the first slot), waits until it is ready
/// and stops it: `ttspool check --deep`. Returns how long it took to load.
pub fn try_start(cfg: &Config) -> Result<Duration, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let engine = WorkerEngine::new(cfg);
    let slot = engine.slots.first().cloned().unwrap_or(Slot {
        index: 0,
        device: None,
    });
    rt.block_on(async {
        let began = Instant::now();
        match Worker::start(&engine.set, &slot).await {
            Ok(w) => {
                let took = began.elapsed();
                w.stop(engine.set.kill_grace).await;
                Ok(took)
            }
            Err(e) => Err(format!(
                "the worker did not start: {}{}",
                e.message,
                match last_lines(&e.stderr_tail) {
                    "" => String::new(),
                    t => format!("; its stderr ends:\n{t}"),
                }
            )),
        }
    })
}

impl Drop for WorkerEngine {
    /// Workers outlive no engine: their actors stop them.
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

fn failed(
    kind: ErrorKind,
    message: String,
    stderr_tail: String,
    run_ms: u64,
    give_up: bool,
) -> Outcome {
    Outcome::Failed {
        kind,
        message,
        stderr_tail,
        run_ms,
        retry_after: None,
        give_up,
    }
}

/// One running worker.
struct Worker {
    child: Child,
    pid: i32,
    stdin: Option<pipe::Sender>,
    answers: BufReader<pipe::Receiver>,
    tail: Arc<Mutex<Tail>>,
    drain: Option<tokio::task::JoinHandle<()>>,
    /// Tasks answered.
    tasks: u64,
}

/// Why a worker did not start.
struct StartError {
    message: String,
    stderr_tail: String,
    /// The program could not be run at all.
    spawn: bool,
}

/// What asking a worker one task came to.
enum Asked {
    Answer(Answer),
    /// Died, closed fd 3, or answered garbage: the message says which.
    Broken(String),
    TimedOut,
    Cancelled,
}

#[derive(Debug, Deserialize)]
struct Answer {
    id: String,
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default = "yes")]
    retryable: bool,
    #[serde(default)]
    fatal: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
struct Ready {
    ready: bool,
    #[serde(default)]
    error: Option<String>,
}

impl Worker {
    async fn start(set: &Settings, slot: &Slot) -> Result<Worker, StartError> {
        let mut env = vec![("TTSPOOL_SLOT".to_string(), slot.index.to_string())];
        if let Some(d) = &slot.device {
            env.push(("CUDA_VISIBLE_DEVICES".to_string(), d.clone()));
        }
        let spec = ChildSpec {
            argv: set.argv.clone(),
            base: set.env.base().clone(),
            env,
            cwd: Some(set.cwd.clone()),
            timeout: set.load_timeout,
            kill_grace: set.kill_grace,
            tail_bytes: process::TAIL_BYTES,
            pipes: true,
        };
        let mut child = process::spawn(&spec).await.map_err(|e| StartError {
            message: format!("cannot start {}: {}", set.argv[0], io_msg(&e)),
            stderr_tail: String::new(),
            spawn: true,
        })?;
        let pid = child.id();
        let tail = Arc::new(Mutex::new(Tail::new(process::TAIL_BYTES)));
        let drain = child
            .take_stderr()
            .and_then(|fd| pipe::Receiver::from_owned_fd(fd).ok())
            .map(|mut err| {
                let tail = tail.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 8192];
                    while let Ok(n) = err.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        tail.lock().expect("tail").push(&buf[..n]);
                    }
                })
            });
        let (stdin, answers) = child.take_pipes().expect("spawned with pipes");
        let pipes = (|| -> std::io::Result<_> {
            Ok((
                pipe::Sender::from_owned_fd(stdin)?,
                pipe::Receiver::from_owned_fd(answers)?,
            ))
        })();
        let (stdin, answers) = match pipes {
            Ok(p) => p,
            Err(e) => {
                process::signal_group(pid, libc::SIGKILL);
                return Err(StartError {
                    message: format!("cannot watch the worker's pipes: {}", io_msg(&e)),
                    stderr_tail: String::new(),
                    spawn: true,
                });
            }
        };
        let mut w = Worker {
            child,
            pid,
            stdin: Some(stdin),
            answers: BufReader::new(answers),
            tail,
            drain,
            tasks: 0,
        };
        let mut line = Vec::new();
        let read = tokio::time::timeout(set.load_timeout, async {
            tokio::select! {
                r = read_line(&mut w.answers, &mut line, ANSWER_MAX) => r,
                _ = w.child.exited() => Ok(false),
            }
        })
        .await;
        let problem = match read {
            Err(_) => format!(
                "the worker did not say it was ready within engine.load_timeout ({})",
                humantime::format_duration(set.load_timeout)
            ),
            Ok(Err(e)) => format!("cannot read the worker's fd 3: {e}"),
            Ok(Ok(false)) => "the worker exited (or closed fd 3) before it was ready".into(),
            Ok(Ok(true)) => match serde_json::from_slice::<Ready>(&line) {
                Ok(Ready { ready: true, .. }) => return Ok(w),
                Ok(Ready { error, .. }) => format!(
                    "the worker says it cannot load: {}",
                    error.as_deref().unwrap_or("(no error given)")
                ),
                Err(_) => format!(
                    "the worker's first line on fd 3 is not {{\"ready\": true}}: {}",
                    shown(&line)
                ),
            },
        };
        let stderr_tail = w.kill().await;
        Err(StartError {
            message: problem,
            stderr_tail,
            spawn: false,
        })
    }

    /// Sends one task and waits for its answer.
    async fn ask(&mut self, req: &TaskRequest, timeout: Duration) -> Asked {
        let t = &req.job.task;
        let mut line = serde_json::to_vec(&json!({
            "id": t.id,
            "input_text": t.input_text,
            "prompt_audio": req.job.prompt_audio.as_ref().map(|p| p.to_string_lossy()),
            "prompt_text": t.prompt_text,
            "output": req.tmp.to_string_lossy(),
            "output_name": t.output_name,
            "trace_id": req.job.trace_id.as_str(),
        }))
        .expect("a task line serializes");
        line.push(b'\n');
        let mut cancel = req.cancel.clone();
        let cancelled = process::cancelled(&mut cancel);
        let Worker {
            child,
            stdin,
            answers,
            ..
        } = self;
        let mut answer = Vec::new();
        let exchange = async {
            let Some(stdin) = stdin.as_mut() else {
                return Asked::Broken("the worker's stdin is closed".into());
            };
            if let Err(e) = stdin.write_all(&line).await {
                return Asked::Broken(format!("cannot write to the worker's stdin: {e}"));
            }
            // Its answer, unless it exits first (a child of its own may
            // hold fd 3 open, so EOF alone would not tell); an answer
            // written just before it exited still counts.
            let read = tokio::select! {
                r = read_line(answers, &mut answer, ANSWER_MAX) => r,
                _ = child.exited() => match tokio::time::timeout(
                    Duration::from_millis(200),
                    read_line(answers, &mut answer, ANSWER_MAX),
                ).await {
                    Ok(r) => r,
                    Err(_) => Ok(false),
                },
            };
            match read {
                Err(e) => Asked::Broken(format!("bad answer on fd 3: {e}")),
                Ok(false) => Asked::Broken("the worker exited (or closed fd 3) mid-task".into()),
                Ok(true) => match serde_json::from_slice::<Answer>(&answer) {
                    Ok(a) if a.id == t.id => Asked::Answer(a),
                    Ok(a) => Asked::Broken(format!(
                        "the worker answered for task {:?} while running {:?}",
                        a.id, t.id
                    )),
                    Err(e) => Asked::Broken(format!(
                        "the worker's answer is not {{\"id\", \"ok\", …}} ({e}): {}",
                        shown(&answer)
                    )),
                },
            }
        };
        tokio::select! {
            a = exchange => a,
            _ = tokio::time::sleep(timeout) => Asked::TimedOut,
            _ = cancelled => Asked::Cancelled,
        }
    }

    fn tail(&self) -> String {
        self.tail.lock().expect("tail").text()
    }

    /// Kills the whole group at once; returns the stderr tail.
    async fn kill(mut self) -> String {
        process::signal_group(self.pid, libc::SIGKILL);
        self.finish().await
    }

    /// Closes stdin (a worker's cue to exit), then SIGTERM, then SIGKILL
    /// after `grace`.
    async fn stop(mut self, grace: Duration) {
        self.stdin = None;
        if tokio::time::timeout(EOF_GRACE, self.child.exited())
            .await
            .is_err()
        {
            process::signal_group(self.pid, libc::SIGTERM);
            let _ = tokio::time::timeout(grace, self.child.exited()).await;
        }
        process::signal_group(self.pid, libc::SIGKILL);
        self.finish().await;
    }

    /// After the leader exited or was killed: the rest of its group goes
    /// (while the unreaped leader keeps the group id ours), then reaping.
    async fn finish(&mut self) -> String {
        let exited = tokio::time::timeout(Duration::from_secs(5), self.child.exited())
            .await
            .is_ok();
        process::signal_group(self.pid, libc::SIGKILL);
        if exited {
            let _ = self.child.reap();
        }
        // Not reaped: dropping the Child reaps it on the reaper thread.
        if let Some(d) = self.drain.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), d).await;
        }
        self.tail()
    }
}

/// Reads one line (without its `\n`) of at most `max` bytes. False at EOF
/// before any byte.
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    out: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<bool> {
    out.clear();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            if out.is_empty() {
                return Ok(false);
            }
            return Err(std::io::Error::other(
                "a line without its newline, then EOF",
            ));
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if out.len() + take > max + 1 {
            return Err(std::io::Error::other(format!(
                "a line longer than {max} bytes"
            )));
        }
        out.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            out.pop();
            return Ok(true);
        }
    }
}

/// A line of the worker's, cut for a message.
fn shown(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(line);
    format!("{:?}", crate::util::cut(&s, 200))
}

/// The wait before the next start after `fails` failures in a row.
fn restart_wait(fails: u32) -> Duration {
    if fails == 0 {
        return Duration::ZERO;
    }
    RESTART_FIRST
        .saturating_mul(1 << (fails - 1).min(16))
        .min(RESTART_MAX)
}

/// The last lines of a stderr tail, for a log line.
fn last_lines(tail: &str) -> &str {
    let t = tail.trim_end();
    let mut start = t.len();
    for _ in 0..5 {
        match t[..start].rfind('\n') {
            Some(i) => start = i,
            None => return t,
        }
    }
    t[start..].trim_start()
}

/// A slot's worker and what the actor knows about it.
struct SlotState {
    set: Arc<Settings>,
    slot: Slot,
    worker: Option<Worker>,
    /// Failures (deaths, failed starts) in a row.
    fails: u32,
    /// No start before this.
    next_start: Instant,
    /// Keep a worker loaded (false after `idle_stop`, until the next task).
    wanted: bool,
    /// Stop everything (shutdown or a reload).
    stop: watch::Receiver<bool>,
}

/// The actor of one slot: see the module comment.
async fn actor(
    set: Arc<Settings>,
    slot: Slot,
    mut rx: mpsc::UnboundedReceiver<Request>,
    stop: watch::Receiver<bool>,
) {
    let mut s = SlotState {
        set,
        slot,
        worker: None,
        fails: 0,
        next_start: Instant::now(),
        wanted: true,
        stop,
    };
    let mut idle_since = Instant::now();
    loop {
        if s.stopping() {
            break;
        }
        if s.worker.is_none() && s.wanted && Instant::now() >= s.next_start {
            // A failed start is logged; the next one waits its backoff.
            let _ = s.start().await;
            idle_since = Instant::now();
            continue;
        }
        let idle_at = match (&s.worker, s.set.idle_stop) {
            (Some(_), Some(d)) => Some(idle_since + d),
            _ => None,
        };
        let mut stop = s.stop.clone();
        let waiting = s.worker.is_none() && s.wanted;
        let next_start = s.next_start;
        let worker_exit = async {
            match s.worker.as_mut() {
                Some(w) => w.child.exited().await,
                None => std::future::pending().await,
            }
        };
        enum Wake {
            Req(Option<Request>),
            Died,
            Idle,
            Again,
        }
        let wake = tokio::select! {
            biased;
            _ = stop.changed() => Wake::Again,
            r = rx.recv() => Wake::Req(r),
            _ = worker_exit => Wake::Died,
            _ = sleep_until(idle_at) => Wake::Idle,
            _ = tokio::time::sleep_until(next_start.into()), if waiting => Wake::Again,
        };
        match wake {
            Wake::Again => {}
            Wake::Req(None) => break,
            Wake::Req(Some(Request::Probe(reply))) => {
                s.wanted = true;
                let res = match s.worker {
                    Some(_) => Ok(()),
                    None => s.start().await.map_err(|e| e.message),
                };
                let _ = reply.send(res);
            }
            Wake::Req(Some(Request::Task(req))) => {
                s.wanted = true;
                let reply = s.task(&req).await;
                let _ = req.reply.send(reply);
                idle_since = Instant::now();
            }
            Wake::Died => {
                let w = s.worker.take().expect("a worker exited");
                let tail = w.kill().await;
                s.failed();
                warn!(
                    slot = s.slot.index,
                    "the worker exited while idle; replacing it; its stderr ends: {}",
                    last_lines(&tail)
                );
            }
            Wake::Idle => {
                info!(
                    slot = s.slot.index,
                    "stopping the idle worker (engine.idle_stop); the next task starts one"
                );
                if let Some(w) = s.worker.take() {
                    w.stop(s.set.kill_grace).await;
                }
                s.wanted = false;
            }
        }
    }
    if let Some(w) = s.worker.take() {
        w.stop(s.set.kill_grace).await;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl SlotState {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// A worker died or did not start: the next start waits longer.
    fn failed(&mut self) {
        self.fails += 1;
        self.next_start = Instant::now() + restart_wait(self.fails);
    }

    /// Starts the slot's worker (unless the engine stops meanwhile).
    async fn start(&mut self) -> Result<(), StartError> {
        let began = Instant::now();
        let mut stop = self.stop.clone();
        let started = tokio::select! {
            w = Worker::start(&self.set, &self.slot) => w,
            _ = stop.wait_for(|s| *s) => Err(StartError {
                message: "the engine is stopping".into(),
                stderr_tail: String::new(),
                spawn: false,
            }),
        };
        match started {
            Ok(w) => {
                info!(
                    slot = self.slot.index,
                    gpu = self.slot.device.as_deref().unwrap_or("-"),
                    pid = w.pid,
                    load = %humantime::format_duration(Duration::from_millis(began.elapsed().as_millis() as u64)),
                    "worker ready"
                );
                self.worker = Some(w);
                Ok(())
            }
            Err(e) => {
                if !self.stopping() {
                    self.failed();
                    warn!(
                        slot = self.slot.index,
                        retry_in = %humantime::format_duration(restart_wait(self.fails)),
                        "worker did not start: {}; its stderr ends: {}",
                        e.message,
                        last_lines(&e.stderr_tail)
                    );
                }
                Err(e)
            }
        }
    }

    /// Runs one task: on a fresh worker again if it took one down, and
    /// failed for good if it took down [`STRIKES`] of them.
    async fn task(&mut self, req: &TaskRequest) -> Reply {
        let began = Instant::now();
        let ms = || began.elapsed().as_millis() as u64;
        let mut strikes = 0;
        let mut cancel = req.cancel.clone();
        loop {
            if *req.cancel.borrow() || self.stopping() {
                return Reply::Outcome(Outcome::Cancelled);
            }
            if self.worker.is_none() {
                let wait = tokio::time::sleep_until(self.next_start.into());
                let mut stop = self.stop.clone();
                tokio::select! {
                    _ = wait => {}
                    _ = process::cancelled(&mut cancel) => return Reply::Outcome(Outcome::Cancelled),
                    _ = stop.wait_for(|s| *s) => return Reply::Outcome(Outcome::Cancelled),
                }
                if let Err(e) = self.start().await {
                    if self.stopping() {
                        return Reply::Outcome(Outcome::Cancelled);
                    }
                    let kind = if e.spawn {
                        ErrorKind::SpawnFailed
                    } else {
                        ErrorKind::EngineFailed
                    };
                    return Reply::Outcome(failed(
                        kind,
                        format!("worker did not start: {}", e.message),
                        e.stderr_tail,
                        ms(),
                        false,
                    ));
                }
            }
            let w = self.worker.as_mut().expect("a worker");
            let asked = w.ask(req, self.set.timeout).await;
            let id = &req.job.task.id;
            let (kind, message) = match asked {
                Asked::Answer(a) => {
                    self.fails = 0;
                    w.tasks += 1;
                    let tail = w.tail();
                    let reply = if a.ok {
                        Reply::Wrote {
                            run_ms: ms(),
                            stderr_tail: tail,
                        }
                    } else {
                        let message = a.error.unwrap_or_else(|| "(no error given)".into());
                        if a.fatal {
                            warn!(slot = self.slot.index, id = %id, "the worker reports a fatal error; replacing it: {message}");
                            let w = self.worker.take().expect("a worker");
                            w.kill().await;
                            if a.retryable && strikes + 1 < STRIKES {
                                strikes += 1;
                                continue;
                            }
                        }
                        // A refusal (not retryable, the worker lives on)
                        // is the task's, as a TTS server's 4xx is.
                        let kind = if a.retryable || a.fatal {
                            ErrorKind::EngineFailed
                        } else {
                            ErrorKind::EngineRejected
                        };
                        Reply::Outcome(failed(kind, message, tail, ms(), a.fatal))
                    };
                    if let Some(w) = self.worker.take_if(|w| w.tasks >= self.set.max_tasks) {
                        info!(
                            slot = self.slot.index,
                            tasks = w.tasks,
                            "replacing the worker after engine.max_tasks"
                        );
                        w.stop(self.set.kill_grace).await;
                    }
                    return reply;
                }
                Asked::Cancelled => {
                    let w = self.worker.take().expect("a worker");
                    w.kill().await;
                    return Reply::Outcome(Outcome::Cancelled);
                }
                Asked::TimedOut => (
                    ErrorKind::Timeout,
                    format!(
                        "the worker ran task {id:?} longer than engine.timeout ({})",
                        humantime::format_duration(self.set.timeout)
                    ),
                ),
                Asked::Broken(m) => (ErrorKind::EngineFailed, m),
            };
            // Dead, hung or talking garbage: the group goes; the task runs
            // again alone on a fresh worker, unless it took down two.
            let w = self.worker.take().expect("a worker");
            if kind == ErrorKind::Timeout {
                process::signal_group(w.pid, libc::SIGTERM);
            }
            let tail = w.kill().await;
            self.failed();
            strikes += 1;
            if strikes < STRIKES {
                warn!(slot = self.slot.index, id = %id, kind = kind.as_str(), "{message}; replacing the worker and running the task again alone; its stderr ends: {}", last_lines(&tail));
                continue;
            }
            warn!(slot = self.slot.index, id = %id, kind = kind.as_str(), "{message}; this task took down {STRIKES} workers and fails");
            return Reply::Outcome(failed(
                kind,
                format!("{message} (the task took down {STRIKES} workers; not retried)"),
                tail,
                ms(),
                true,
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_capped_and_eof_is_told_apart() {
        let data: &[u8] = b"{\"ready\": true}\nabc";
        let mut r = BufReader::new(data);
        let mut out = Vec::new();
        assert!(read_line(&mut r, &mut out, 100).await.unwrap());
        assert_eq!(out, b"{\"ready\": true}");
        assert!(read_line(&mut r, &mut out, 100).await.is_err(), "torn");
        let mut r = BufReader::new(&b""[..]);
        assert!(!read_line(&mut r, &mut out, 100).await.unwrap());
        let long = vec![b'x'; 300];
        let mut r = BufReader::new(&long[..]);
        let e = read_line(&mut r, &mut out, 100).await.unwrap_err();
        assert!(e.to_string().contains("longer than 100"), "{e}");
    }

    #[test]
    fn restarts_back_off_to_a_minute() {
        assert_eq!(restart_wait(0), Duration::ZERO);
        assert_eq!(restart_wait(1), RESTART_FIRST);
        assert_eq!(restart_wait(3), RESTART_FIRST * 4);
        assert_eq!(restart_wait(40), RESTART_MAX);
    }

    #[test]
    fn last_lines_keeps_five() {
        let t = "1\n2\n3\n4\n5\n6\n7\n";
        assert_eq!(last_lines(t), "3\n4\n5\n6\n7");
        assert_eq!(last_lines("only"), "only");
    }
}
