//! The wiring: one event loop that connects the spool, the scheduler, the
//! engine and the record logs.
//!
//! Everything that happens — a notification, a poll tick, a claim coming back
//! from the blocking pool, a child finishing, a record becoming durable, a
//! signal — becomes an [`Event`] handled by [`Daemon::handle`], followed by
//! [`Daemon::pump`], which starts what can start. Disk work that fsyncs
//! (claims, takeovers, checking and moving outputs) runs on the blocking
//! pool; record appends run on the committer thread, which groups whatever is
//! ready into one write and one fsync per log (and, while records stream in,
//! waits up to 2 ms for companions). Children are spawned only from the
//! runtime's main thread (see process/ for why). A slot is free again as soon
//! as its children are gone, before their outputs are checked and moved.
//!
//! Finishing a task is one place, [`Daemon::commit`]: the record goes to the
//! committer. When the committer reports it durable, the line is removed from
//! its lease, and an exhausted lease is deleted.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::engine::{self, Engine, Job, Outcome, Slot, SlotRelease};
use crate::metrics::Metrics;
use crate::scheduler::{backoff, ClaimRef, Next, Scheduler, Work};
use crate::spool::claim::{
    self, Batch, ClaimError, Claimed, Claimer, CommitOutcome, FileDone, Held, HeldSet, LeaseChange,
    LeaseOwner,
};
use crate::spool::heartbeat::Heartbeat;
use crate::spool::lease::{LeaseBook, Settled};
use crate::spool::lines::{Line, RAW_KEEP};
use crate::spool::records::RecordLog;
use crate::spool::{watch as spool_watch, Spool};
use crate::task::{self, parse_line, TaskRules};
use crate::util::{cut, now_rfc3339};
use crate::vocab::{Common, ErrorKind, Record, Source};
use crate::webhook::deliver;
use crate::webhook::outbox::Outbox;
use crate::webhook::Settings;

/// How often we beat: often enough that our beat is never older than a
/// quarter of the lease while we run (a beat is a 64-byte overwrite).
fn beat_interval(lease: Duration) -> Duration {
    (lease / 8).max(Duration::from_millis(100))
}

/// How often we look for abandoned claims (a scan of the spool's leases).
fn takeover_interval(lease: Duration) -> Duration {
    (lease / 4).max(Duration::from_millis(250))
}

/// A daemon whose last beat is older than `lease − margin` may be judged
/// dead soon (or was): it stops claiming and starting until its beat is
/// fresh and its leases are checked.
fn fence_margin(lease: Duration) -> Duration {
    lease / 4
}

/// The most lines one claim takes when claims bring no engine work.
const MAX_BURST: usize = 1024;

/// Signals the daemon reacts to (injected, so tests need no real handlers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    /// SIGTERM / SIGINT: staged stop; the second one kills children at once.
    Stop,
    /// SIGHUP.
    Reload,
}

/// Changes the log filter (on reload).
pub use crate::logging::SetLogLevel;

pub struct Options {
    /// Drain what is pending now, then exit.
    pub once: bool,
    pub set_level: SetLogLevel,
}

/// A record on its way to disk, with the lease it settles.
struct Commit {
    record: Record,
    lease: PathBuf,
    token: String,
    line: u64,
}

enum Event {
    Hint,
    Tick,
    Beat,
    Claimed(Result<Batch, ClaimError>),
    TakenOver(Result<Vec<(Held, Vec<Claimed>)>, ClaimError>),
    /// A batch's children are gone; its outputs are still being finished.
    SlotFree(Slot),
    Finished {
        batch_id: u64,
        slot: Slot,
        /// The engine already freed the slot (see SlotRelease).
        slot_freed: bool,
        works: Vec<Work>,
        outcomes: Vec<Outcome>,
        started_at: String,
    },
    RetryDue(Box<Work>),
    /// Records written, each `Durable`, or `Fenced` (left out because
    /// another daemon took its lease over).
    Committed(Vec<(Record, PathBuf, u64, CommitOutcome)>),
    /// A spool write failed for lack of space; `needed` bytes at least.
    DiskFull {
        what: String,
        needed: u64,
    },
    /// After a late heartbeat: the leases that are no longer ours.
    LeasesChecked(Vec<PathBuf>),
    /// A finished lease was deleted (or found to be another daemon's).
    LeaseDeleted(PathBuf, Result<LeaseChange, ClaimError>),
    CommitFailed(String),
    /// Consumed files' totals handed on (or why not: they are handed out
    /// again later).
    Announced(Result<(), String>),
    /// Work on the blocking pool panicked.
    Crashed(String),
    Signal(Sig),
    GraceOver,
    Reloaded(Box<Result<(Config, Settings), String>>),
}

pub struct Daemon {
    cfg: Config,
    opts: Options,
    rules: TaskRules,
    engine: Arc<Engine>,
    claimer: Arc<Mutex<Claimer>>,
    held: HeldSet,
    sched: Scheduler,
    tx: mpsc::UnboundedSender<Event>,
    commit_tx: std::sync::mpsc::Sender<Commit>,
    /// The leases we hold: their token and outstanding lines.
    leases: LeaseBook,
    /// Running batches: the leases their lines belong to, and their cancel.
    running: HashMap<u64, (Vec<PathBuf>, watch::Sender<bool>)>,
    next_batch_id: u64,
    /// Every running batch was told to stop (shutdown): later ones too.
    cancelled_all: bool,
    instance: String,
    dirty: bool,
    claiming: bool,
    /// Webhooks are being delivered or due soon (`--once` waits for them).
    webhooks_busy: bool,
    webhooks: Webhooks,
    metrics: Arc<Metrics>,
    /// Lines to claim at once when claims yield no engine work (all skipped
    /// or invalid): grows so a backlog of skips is not throttled by per-claim
    /// fsyncs; back to the slot count as soon as a claim brings real work, so
    /// daemons sharing a spool never hoard tasks another one could run.
    burst: usize,
    /// Moving average of engine run time, for how far ahead to claim.
    avg_run_ms: u64,
    /// When a timer will next wake the loop for a waiting batch.
    wake: Option<std::time::Instant>,
    taking_over: bool,
    recovered: bool,
    last_claim_empty: bool,
    waiting_partial: bool,
    retries: usize,
    /// Batches started and not yet finished (their slot may be free already).
    batches: usize,
    uncommitted: usize,
    /// Finished leases being deleted on the blocking pool.
    deleting: usize,
    stopping: u8,
    fatal: Option<String>,
    /// The last claim error, for `--once`'s verdict.
    last_error: Option<String>,
    heartbeat: Heartbeat,
    /// Stale episodes of our heartbeat already dealt with.
    stale_seen: u64,
    /// Our beat was late: nothing is claimed or started until our leases
    /// are checked (self-fencing).
    fenced: Fencing,
    /// Claims are paused: the spool's disk is full.
    disk_full: Option<DiskFull>,
}

/// Claims paused for lack of space.
struct DiskFull {
    since: std::time::Instant,
    next_claim: std::time::Instant,
    wait: Duration,
    logged: Option<std::time::Instant>,
    /// Bytes the failed writes needed, at least.
    needed: u64,
}

/// Self-fencing: where a daemon that may have been judged dead stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fencing {
    /// Beats are fresh.
    Clear,
    /// Beats are late: waiting for a fresh one.
    Stale,
    /// Beat fresh again; checking which leases are still ours.
    Checking,
}

/// `ttspool run`: the runtime, the signal plumbing, and [`run`] on it.
pub fn run_blocking(cfg: Config, once: bool, set_level: SetLogLevel) -> anyhow::Result<u8> {
    // One thread: children are spawned from the main thread, which lives as
    // long as the daemon, so PR_SET_PDEATHSIG fires only when the daemon dies.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .build()?;
    rt.block_on(async move {
        let (tx, rx) = mpsc::unbounded_channel();
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            loop {
                let s = tokio::select! {
                    _ = term.recv() => Sig::Stop,
                    _ = int.recv() => Sig::Stop,
                    _ = hup.recv() => Sig::Reload,
                };
                if tx.send(s).is_err() {
                    break;
                }
            }
        });
        run(cfg, Options { once, set_level }, rx).await
    })?;
    Ok(0)
}

/// Runs the daemon until it is told to stop (or, with `once`, runs dry).
pub async fn run(
    cfg: Config,
    opts: Options,
    mut signals: mpsc::UnboundedReceiver<Sig>,
) -> anyhow::Result<()> {
    // Temp files of this instance named before this instant are leftovers.
    let started_at = std::time::SystemTime::now();
    let spool = Spool::new(&cfg.spool.dir);
    let settings = Arc::new(
        Settings::from_config(&cfg).map_err(|e| anyhow::anyhow!("{}: {e}", cfg.path.display()))?,
    );
    let mut claimer = Claimer::open(
        &spool,
        &cfg.spool.instance,
        cfg.limits.max_line_bytes,
        cfg.spool.settle.0,
        cfg.spool.lease.0,
    )?;
    claimer.set_consume(cfg.spool.consume_after.0, cfg.spool.poll_interval.0);
    // We hold the instance lock: whatever our previous run left is orphaned.
    let orphans = crate::process::kill_orphans(&cfg.spool.dir, &cfg.spool.instance);
    if orphans > 0 {
        warn!(
            killed = orphans,
            "killed processes left behind by a previous run of this instance"
        );
    }
    std::fs::create_dir_all(&cfg.output.dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot create output.dir {}: {}",
            cfg.output.dir.display(),
            crate::util::io_msg(&e)
        )
    })?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (commit_tx, commit_rx) = std::sync::mpsc::channel();
    let log = RecordLog::new(&spool).with_rotation(
        cfg.retention.rotate_size.map(|s| s.0),
        cfg.retention.rotate_daily,
    );
    // The outbox: settle what a crash left, then deliver what is in it.
    let outbox = Arc::new(Outbox::open(&spool, &cfg.spool.instance)?);
    let recovered = outbox.recover(&log)?;
    if recovered > 0 {
        info!(
            messages = recovered,
            "recovered webhook messages written before a crash"
        );
    }
    let metrics = Arc::new(Metrics::default());
    metrics.set_slots(&engine::slots(&cfg));
    if let Some(addr) = &cfg.metrics.listen {
        let addr: std::net::SocketAddr = addr.parse()?;
        crate::api::serve(addr, crate::api::metrics_routes(metrics.clone()))
            .await
            .map_err(|e| anyhow::anyhow!("metrics.listen {addr}: {}", crate::util::io_msg(&e)))?;
        metrics
            .served
            .store(true, std::sync::atomic::Ordering::Relaxed);
        info!(%addr, "serving Prometheus metrics on /metrics");
    }
    let hooks = deliver::spawn(
        settings.clone(),
        spool.clone(),
        outbox.clone(),
        cfg.spool.instance.clone(),
        cfg.shutdown.grace.0,
        metrics.clone(),
    );
    let webhooks = Webhooks {
        settings: Arc::new(std::sync::RwLock::new(settings.clone())),
        outbox: outbox.clone(),
        tx: hooks.tx.clone(),
        spool_root: spool.root.clone(),
    };
    let ctx = tx.clone();
    let w3 = webhooks.clone();
    std::thread::Builder::new()
        .name("ttspool-records".into())
        .spawn({
            let once = opts.once;
            move || committer(log, commit_rx, ctx, w3, once)
        })?;
    let mut wh_busy = hooks.busy;
    let htx = tx.clone();
    let hints = spool_watch::watch(&spool.pending(), cfg.spool.watch, move || {
        let _ = htx.send(Event::Hint);
    });
    info!(
        instance = %cfg.spool.instance,
        spool = %spool.root.display(),
        watch = hints.mode,
        slots = cfg.slot_count(),
        engine = ?cfg.engine.kind,
        "ttspool started"
    );
    for w in cfg.warnings() {
        warn!("{w}");
    }
    crate::engine::sweep::start(crate::engine::sweep::Sweeper::new(&cfg, started_at));
    // Beats come from a thread of their own from now on.
    let lease = cfg.spool.lease.0;
    let heartbeat = claimer
        .start_heartbeat(beat_interval(lease), lease - fence_margin(lease))
        .map_err(|e| anyhow::anyhow!("cannot start the heartbeat thread: {e}"))?;
    let held = claimer.held();
    let mut d = Daemon {
        rules: TaskRules::from_config(&cfg),
        engine: Arc::new(Engine::from_config(&cfg)),
        sched: Scheduler::new(engine::slots(&cfg)),
        instance: cfg.spool.instance.clone(),
        claimer: Arc::new(Mutex::new(claimer)),
        held,
        tx,
        commit_tx,
        running: HashMap::new(),
        next_batch_id: 0,
        cancelled_all: false,
        deleting: 0,
        leases: LeaseBook::default(),
        dirty: true,
        claiming: false,
        webhooks_busy: false,
        webhooks,
        metrics,
        burst: 0,
        avg_run_ms: 1000,
        wake: None,
        taking_over: false,
        recovered: false,
        last_claim_empty: false,
        waiting_partial: false,
        retries: 0,
        batches: 0,
        uncommitted: 0,
        stopping: 0,
        fatal: None,
        last_error: None,
        heartbeat,
        stale_seen: 0,
        fenced: Fencing::Clear,
        disk_full: None,
        opts,
        cfg,
    };
    let mut poll = tokio::time::interval(d.cfg.spool.poll_interval.0);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let beat_every = takeover_interval(d.cfg.spool.lease.0);
    let mut beat = tokio::time::interval(beat_every);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // systemd's watchdog is pinged from this loop, so a wedged loop gets
    // the daemon restarted.
    let watchdog = sd_notify::watchdog_enabled();
    let mut dog = tokio::time::interval(
        watchdog
            .map(|w| w / 2)
            .unwrap_or(Duration::from_secs(3600))
            .max(Duration::from_millis(100)),
    );
    loop {
        d.pump();
        if let Some(f) = d.fatal.take() {
            if d.opts.once {
                let left = d.leases.unfinished();
                anyhow::bail!(
                    "{f}; run --once leaves at least {left} claimed line(s) without a record"
                );
            }
            anyhow::bail!(f);
        }
        if d.done() {
            break;
        }
        let ev = tokio::select! {
            Some(ev) = rx.recv() => ev,
            Ok(()) = wh_busy.changed() => {
                d.webhooks_busy = *wh_busy.borrow();
                Event::Hint
            }
            Some(sig) = signals.recv() => Event::Signal(sig),
            _ = poll.tick() => Event::Tick,
            _ = beat.tick() => Event::Beat,
            _ = dog.tick(), if watchdog.is_some() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                continue;
            }
        };
        d.handle(ev);
    }
    let unfinished = d.leases.unfinished();
    d.hand_back_all();
    drop(hints);
    info!(instance = %d.instance, "ttspool stopped");
    if d.opts.once && d.stopping == 0 {
        // `--once` promises to drain: say so when it did not.
        let unclaimed = claim::summary(&spool, d.cfg.limits.max_line_bytes)
            .map(|s| s.pending_lines)
            .unwrap_or(0);
        if unfinished + unclaimed > 0 {
            let why = d
                .last_error
                .as_deref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default();
            anyhow::bail!(
                "run --once left {} complete line(s) without a record: {unfinished} claimed and \
                 handed back unfinished, {unclaimed} not claimed{why}",
                unfinished + unclaimed
            );
        }
    }
    Ok(())
}

impl Daemon {
    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Hint | Event::Tick => self.dirty = true,
            Event::Beat => self.start_takeover(),
            Event::Claimed(res) => {
                self.claiming = false;
                match res {
                    Ok(batch) => self.claimed(batch),
                    Err(e @ ClaimError::LockBroken(_)) => self.fatal = Some(e.to_string()),
                    Err(e) if e.is_disk_full() => {
                        self.disk_is_full(&e.to_string(), 4096);
                        self.last_claim_empty = true;
                    }
                    Err(e) => {
                        error!("claiming failed: {e}");
                        self.last_error = Some(e.to_string());
                        self.last_claim_empty = true;
                    }
                }
            }
            Event::TakenOver(res) => {
                self.taking_over = false;
                if !self.recovered {
                    // The spool is open and our previous run's claims are
                    // back in hand: now systemd may call us started.
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                }
                self.recovered = true;
                match res {
                    Ok(list) => {
                        for (held, lines) in list {
                            self.adopt(held, lines);
                        }
                    }
                    Err(e @ (ClaimError::LockLost(_) | ClaimError::LockBroken(_))) => {
                        self.fatal = Some(e.to_string())
                    }
                    Err(e) if e.is_disk_full() => self.disk_is_full(&e.to_string(), 4096),
                    Err(e) => error!("checking for abandoned claims failed: {e}"),
                }
            }
            Event::SlotFree(slot) => {
                self.sched.free_slot(&slot);
                self.metrics.slot_finished(&slot);
                self.dirty = true;
            }
            Event::Finished {
                batch_id,
                slot,
                slot_freed,
                works,
                outcomes,
                started_at,
            } => {
                if !slot_freed {
                    self.sched.free_slot(&slot);
                    self.metrics.slot_finished(&slot);
                }
                self.sched.finish(&works);
                self.running.remove(&batch_id);
                self.batches -= 1;
                self.metrics
                    .in_flight
                    .fetch_sub(works.len() as u64, std::sync::atomic::Ordering::Relaxed);
                self.dirty = true;
                let n = works.len();
                let mut again = Vec::new();
                for (work, outcome) in works.into_iter().zip(outcomes) {
                    if !self.leases.holds(&work.claim.lease) {
                        // Its lease was lost meanwhile: the line is another
                        // daemon's, whatever happened here.
                        continue;
                    }
                    again.extend(self.finished(&slot, n, work, outcome, started_at.clone()));
                }
                // Split batches go first, in their order.
                for w in again.into_iter().rev() {
                    self.sched.push_front(w);
                }
            }
            Event::RetryDue(w) => {
                self.retries -= 1;
                if self.stopping == 0 && self.leases.holds(&w.claim.lease) {
                    self.sched.push_front(*w);
                }
            }
            Event::Committed(list) => {
                self.disk_has_space();
                for (rec, lease, line, outcome) in list {
                    self.uncommitted -= 1;
                    let written = outcome == CommitOutcome::Durable;
                    let c = rec.common();
                    if written {
                        let (kind, run) = match &rec {
                            Record::Done {
                                skipped: false,
                                run_ms,
                                ..
                            } => (None, Some(Duration::from_millis(*run_ms))),
                            Record::Done { .. } => (None, None),
                            Record::Failed { kind, attempts, .. } => (
                                Some(kind.as_str()),
                                (*attempts > 0).then_some(Duration::ZERO),
                            ),
                        };
                        self.metrics
                            .record(rec.status(), kind, run.filter(|d| !d.is_zero()));
                        info!(id = %c.id, trace_id = %c.trace_id, stage = rec.status(), file = %c.source.file, line = c.source.line, "{}", describe(&rec));
                    } else {
                        warn!(id = %c.id, trace_id = %c.trace_id, "record not written: another daemon took over this claim meanwhile and runs the line itself");
                    }
                    match self.leases.committed(&lease, line, outcome) {
                        Settled::Pending | Settled::Unknown => {}
                        Settled::Finished { token } => self.delete_lease(lease, token),
                        Settled::Lost { lines } => self.lose_lease(&lease, lines),
                    }
                }
                self.dirty = true;
            }
            Event::DiskFull { what, needed } => self.disk_is_full(&what, needed),
            Event::LeasesChecked(lost) => {
                for lease in &lost {
                    if let Some(lines) = self.leases.forget(lease) {
                        self.lose_lease(lease, lines);
                    }
                }
                info!(
                    lost = lost.len(),
                    "leases checked after a late heartbeat; claiming and starting again"
                );
                self.fenced = Fencing::Clear;
                self.dirty = true;
            }
            Event::LeaseDeleted(lease, res) => {
                self.deleting -= 1;
                self.held.lock().expect("held set").remove(&lease);
                match res {
                    Ok(LeaseChange::Done) => {}
                    Ok(LeaseChange::NotOurs) => {
                        warn!(lease = %lease.display(), "a finished lease had been taken over by another daemon; left it alone")
                    }
                    Err(e @ ClaimError::LockBroken(_)) => self.fatal = Some(e.to_string()),
                    Err(e) => warn!("{e}"),
                }
            }
            Event::CommitFailed(msg) => {
                self.fatal = Some(format!("cannot write records: {msg}"));
            }
            Event::Announced(Err(e)) => warn!("{e}; it is sent again in a few minutes"),
            Event::Announced(Ok(())) => {}
            Event::Crashed(msg) => {
                self.fatal = Some(format!("internal error, stopping: {msg}"));
            }
            Event::Signal(Sig::Stop) => {
                self.stopping += 1;
                if self.stopping == 1 {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                    info!(
                        running = self.batches,
                        grace = %humantime::format_duration(self.cfg.shutdown.grace.0),
                        "stopping: no new claims; waiting for running tasks"
                    );
                    let tx = self.tx.clone();
                    let grace = self.cfg.shutdown.grace.0;
                    tokio::spawn(async move {
                        tokio::time::sleep(grace).await;
                        let _ = tx.send(Event::GraceOver);
                    });
                } else {
                    warn!("second stop signal: killing running tasks now");
                    self.cancel_all();
                }
            }
            Event::Signal(Sig::Reload) => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
                let path = self.cfg.path.clone();
                self.blocking(
                    move || {
                        Box::new(
                            Config::load(&path)
                                .map_err(|e| e.to_string())
                                .and_then(|c| {
                                    Settings::from_config(&c)
                                        .map(|s| (c, s))
                                        .map_err(|e| format!("{}: {e}", path.display()))
                                }),
                        )
                    },
                    Event::Reloaded,
                );
            }
            Event::Reloaded(res) => {
                match *res {
                    Ok((new, settings)) => self.apply_config(new, settings),
                    Err(e) => error!("config reload refused, the running config stays: {e}"),
                }
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            }
            Event::GraceOver => {
                if self.batches > 0 {
                    warn!(
                        running = self.batches,
                        "shutdown.grace is over: killing running tasks; they are handed back"
                    );
                }
                self.cancel_all();
            }
        }
    }

    /// True when the loop may end.
    fn done(&self) -> bool {
        let idle = self.batches == 0
            && self.uncommitted == 0
            && self.deleting == 0
            && !self.claiming
            && !self.taking_over;
        if self.stopping > 0 {
            return idle;
        }
        if self.opts.once && self.disk_full.is_some() {
            // `--once` does not wait for space; its verdict names what is left.
            return idle;
        }
        self.opts.once
            && idle
            && self.recovered
            && self.sched.queued() == 0
            && self.retries == 0
            && !self.dirty
            && self.last_claim_empty
            && !self.waiting_partial
            && !self.webhooks_busy
    }

    /// Starts whatever can start: takeover at startup, runs, claims.
    fn pump(&mut self) {
        if !self.beat_is_fresh() {
            return;
        }
        if !self.recovered {
            self.start_takeover();
            return; // recover our own claims before claiming new lines
        }
        if self.stopping > 0 {
            for w in self.sched.take_queue() {
                drop(w); // its lease is handed back when we exit
            }
            return;
        }
        // A batch waits for more tasks only while more may come.
        let hold = (self.engine.batch_max() > 1 && (self.claiming || !self.last_claim_empty))
            .then_some(self.cfg.engine.batch_wait.0);
        loop {
            match self.sched.next_batch(self.engine.batch_max(), hold) {
                Next::Start(slot, works) => {
                    let mut run = Vec::with_capacity(works.len());
                    for w in works {
                        if w.job.output.exists() {
                            self.sched.release_output(&w.job.output);
                            self.skip(w);
                        } else {
                            run.push(w);
                        }
                    }
                    if run.is_empty() {
                        self.sched.free_slot(&slot);
                    } else {
                        self.start(slot, run);
                    }
                }
                Next::WaitUntil(at) => {
                    self.wake_at(at);
                    break;
                }
                Next::Nothing => break,
            }
        }
        // Claim about a second of work ahead per slot (at least two tasks):
        // long TTS tasks stay spread over the daemons sharing the spool, and
        // millisecond tasks are not throttled by one claim per task.
        let per_slot =
            ((1000 / self.avg_run_ms.max(1)).clamp(2, 256) as usize).max(self.engine.batch_max());
        let target = self.sched.slot_count() * per_slot;
        let have = self.sched.queued() + self.sched.busy();
        let want = target.saturating_sub(have).max(self.burst);
        // Backpressure: records waiting for the disk bound what is claimed,
        // so a fast backlog (all skips) cannot pile up in memory.
        let low = (have <= target / 2 || self.burst > 0) && self.uncommitted < 2 * MAX_BURST;
        if let Some(full) = &self.disk_full {
            if self.opts.once {
                // `--once` does not wait for space: it ends and says what
                // is left without a record.
                self.dirty = false;
                return;
            }
            // Try again when the wait is over, or at once when the file
            // system shows room again (statvfs is cheap; a failed claim is
            // not).
            let room = crate::util::free_bytes(&self.cfg.spool.dir)
                .is_some_and(|free| free > full.needed * 2 + 64 * 1024);
            if std::time::Instant::now() < full.next_claim && !room {
                let at = full
                    .next_claim
                    .min(std::time::Instant::now() + Duration::from_secs(1));
                self.wake_at(at);
                return;
            }
        }
        if self.dirty && !self.claiming && want > 0 && low {
            self.dirty = false;
            self.claiming = true;
            let c = self.claimer.clone();
            self.blocking(
                move || c.lock().expect("claimer").claim(want),
                Event::Claimed,
            );
        }
    }

    fn start_takeover(&mut self) {
        if self.taking_over {
            return;
        }
        self.taking_over = true;
        let c = self.claimer.clone();
        let w = self.webhooks.clone();
        let metrics = self.metrics.clone();
        let max_line = self.cfg.limits.max_line_bytes;
        let textfile = self.cfg.metrics.textfile.clone();
        let retention = self.cfg.retention.consumed.map(|d| d.0);
        let work = move || {
            refresh_gauges(
                &Spool::new(&w.spool_root),
                max_line,
                &metrics,
                textfile.as_deref(),
                retention,
            );
            let mut claimer = c.lock().expect("claimer");
            let res = claimer.take_over();
            // Webhooks of a dead daemon: adopt its outbox folder.
            let others = w.outbox.others().unwrap_or_default();
            let log = RecordLog::new(&Spool::new(&w.spool_root));
            let mut moved = 0;
            for dead in claimer.dead_instances(&others) {
                match w.outbox.adopt(&dead, &log) {
                    Ok(n) => moved += n,
                    Err(e) => error!("cannot adopt the webhook outbox of {dead}: {e}"),
                }
            }
            drop(claimer);
            if moved > 0 {
                info!(
                    files = moved,
                    "adopted webhook messages of a daemon that died"
                );
                let _ = w.tx.send(deliver::Cmd::Rescan);
            }
            res
        };
        self.blocking(work, Event::TakenOver);
    }

    /// Runs disk work on the blocking pool and hands its result back as an
    /// event. A panic there is a bug that may have left the claim state half
    /// changed: the daemon then stops with an error (under systemd it is
    /// restarted, and the restart takes its claims back) instead of waiting
    /// forever for an answer that will not come.
    fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
        event: fn(T) -> Event,
    ) {
        let done = tokio::task::spawn_blocking(work);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let ev = match done.await {
                Ok(v) => event(v),
                Err(e) => Event::Crashed(e.to_string()),
            };
            let _ = tx.send(ev);
        });
    }

    /// Hands on the totals of consumed files (`file.completed`, through
    /// the outbox), then tells the spool they went out (consume.rs). On
    /// failure the spool hands them out again later.
    fn announce(&self, files: Vec<FileDone>) {
        let w = self.webhooks.clone();
        let spool = Spool::new(&w.spool_root);
        self.blocking(
            move || {
                let settings = w.settings.read().expect("settings").clone();
                for f in files {
                    if let Some(m) = settings.for_file(&f) {
                        let seg = w.outbox.write(&[m], None).map_err(|e| {
                            format!(
                                "cannot write the file.completed webhook of {}: {}",
                                f.file,
                                crate::util::io_msg(&e)
                            )
                        })?;
                        let _ = w.tx.send(deliver::Cmd::Segment(seg));
                    }
                    crate::spool::consume::announced(&spool, &f.file_id.key)
                        .map_err(|e| e.to_string())?;
                }
                Ok(())
            },
            Event::Announced,
        );
    }

    /// A spool write failed for lack of space: claims pause (with a
    /// growing wait between tries) until space returns; running tasks go
    /// on and their records wait in memory. Logged once a minute.
    fn disk_is_full(&mut self, what: &str, needed: u64) {
        let now = std::time::Instant::now();
        let full = self.disk_full.get_or_insert(DiskFull {
            since: now,
            next_claim: now,
            wait: Duration::from_secs(1),
            logged: None,
            needed,
        });
        full.needed = full.needed.max(needed);
        full.next_claim = now + full.wait;
        full.wait = (full.wait * 2).min(Duration::from_secs(30));
        if full
            .logged
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            full.logged = Some(now);
            let free = crate::util::free_bytes(&self.cfg.spool.dir)
                .map(|b| format!("{b} bytes free"))
                .unwrap_or_else(|| "free space unknown".into());
            warn!(
                paused_for = %humantime::format_duration(Duration::from_secs(full.since.elapsed().as_secs())),
                "disk full: {what}; {free} on the spool's file system, at least {needed} bytes needed; \
                 not claiming until space returns (records of running tasks wait in memory)"
            );
        }
        self.last_error = Some(format!("disk full: {what}"));
    }

    fn disk_has_space(&mut self) {
        if let Some(full) = self.disk_full.take() {
            info!(
                paused_for = %humantime::format_duration(Duration::from_secs(full.since.elapsed().as_secs())),
                "space is back on the spool's file system: claiming again"
            );
            self.dirty = true;
        }
    }

    fn claimed(&mut self, mut batch: Batch) {
        match &batch.disk_full {
            Some(what) => self.disk_is_full(what, 4096),
            // Only a claim that wrote something proves there is room.
            None if !batch.leases.is_empty() || !batch.finished.is_empty() => self.disk_has_space(),
            None => {}
        }
        if let Some(e) = batch.errors.last() {
            self.last_error = Some(e.clone());
        }
        self.last_claim_empty = batch.lines.is_empty();
        if !batch.lines.is_empty() || batch.more || batch.returned > 0 {
            self.dirty = true; // there may be more
        }
        self.waiting_partial = batch.waiting;
        if batch.waiting {
            // Look again once the partial line may have settled.
            let tx = self.tx.clone();
            let settle = self.cfg.spool.settle.0 + Duration::from_millis(50);
            tokio::spawn(async move {
                tokio::time::sleep(settle).await;
                let _ = tx.send(Event::Hint);
            });
        }
        if !batch.finished.is_empty() {
            for f in &batch.finished {
                info!(file = %f.file, "file fully recorded; moved to pending/.consumed/");
            }
            self.announce(std::mem::take(&mut batch.finished));
        }
        for held in batch.leases {
            self.leases.hold(held.path, held.doc.token, held.doc.lines);
        }
        let before = self.sched.queued();
        let claimed = batch.lines.len();
        for c in batch.lines {
            self.accept(c);
        }
        let to_engine = self.sched.queued() - before;
        self.burst = if claimed > 0 && to_engine == 0 {
            (self.burst.max(self.sched.slot_count() * 2) * 2).min(MAX_BURST)
        } else {
            0
        };
    }

    fn adopt(&mut self, held: Held, lines: Vec<Claimed>) {
        self.leases.hold(
            held.path,
            held.doc.token,
            lines.iter().map(|c| c.no).collect(),
        );
        for c in lines {
            self.accept(c);
        }
    }

    /// A freshly claimed line: parse it, then fail, skip or queue it.
    fn accept(&mut self, c: Claimed) {
        let claimed_at = now_rfc3339();
        let trace_id = ulid::Ulid::new().to_string().to_lowercase();
        let cref = ClaimRef {
            lease: c.lease,
            token: c.token,
            file: c.file,
            file_escaped: c.file_escaped,
            file_id: c.file_id,
            line: c.no,
        };
        let invalid = |this: &mut Self,
                       id: String,
                       message: String,
                       raw: String,
                       task: Option<task::Task>| {
            warn!(id = %id, trace_id = %trace_id, stage = "failed", file = %cref.file, line = cref.line, "invalid task: {message}");
            let common = this.common(&cref, id, trace_id.clone());
            this.commit(
                cref.clone(),
                Record::Failed {
                    common,
                    kind: ErrorKind::InvalidTask,
                    message,
                    attempts: 0,
                    raw: if task.is_none() { Some(raw) } else { None },
                    task,
                    stderr_tail: None,
                },
            );
        };
        let bytes = match c.line {
            Err(msg) => {
                return invalid(
                    self,
                    format!("{}:{}", cref.file, cref.line),
                    msg,
                    String::new(),
                    None,
                )
            }
            Ok(Line::TooLong { len, head, .. }) => {
                let msg = format!(
                    "line is {len} bytes, more than limits.max_line_bytes = {}",
                    self.cfg.limits.max_line_bytes
                );
                let raw = String::from_utf8_lossy(&head).into_owned();
                return invalid(self, format!("{}:{}", cref.file, cref.line), msg, raw, None);
            }
            Ok(Line::Text { bytes, .. }) => bytes,
        };
        let task = match parse_line(&bytes, &self.rules) {
            Ok(t) => t,
            Err(e) => {
                let raw = cut(&String::from_utf8_lossy(&bytes), RAW_KEEP).to_string();
                let id = guess_id(&bytes).unwrap_or_else(|| format!("{}:{}", cref.file, cref.line));
                return invalid(
                    self,
                    id,
                    format!("{}:{}: {}", cref.file, cref.line, e.0),
                    raw,
                    None,
                );
            }
        };
        let prompt_audio = match &task.prompt_audio {
            Some(p) => match task::resolve_voice(&self.rules.voices_dir, p) {
                Ok(p) => Some(p),
                Err(m) => {
                    let id = task.id.clone();
                    return invalid(
                        self,
                        id,
                        format!("{}:{}: prompt_audio: {m}", cref.file, cref.line),
                        String::new(),
                        Some(task),
                    );
                }
            },
            None => None,
        };
        info!(id = %task.id, trace_id = %trace_id, stage = "claimed", file = %cref.file, line = cref.line, "claimed");
        let work = Work {
            claim: cref,
            job: Job {
                output: task::output_path(&self.cfg.output.dir, &task.output_name),
                task,
                prompt_audio,
                trace_id,
            },
            claimed_at,
            attempts: 0,
            cap: 0,
            queued_at: std::time::Instant::now(),
        };
        if work.job.output.exists() {
            self.skip(work);
        } else {
            self.sched.push(work);
        }
    }

    fn common(&self, c: &ClaimRef, id: String, trace_id: String) -> Common {
        Common {
            id,
            source: Source {
                file: c.file.clone(),
                line: c.line,
                file_escaped: c.file_escaped.clone(),
            },
            trace_id,
            instance: self.instance.clone(),
            file_id: c.file_id.clone(),
        }
    }

    fn skip(&mut self, w: Work) {
        let common = self.common(&w.claim, w.job.task.id.clone(), w.job.trace_id.clone());
        self.commit(
            w.claim.clone(),
            Record::Done {
                common,
                skipped: true,
                output: w.job.output,
                attempts: w.attempts,
                engine: self.engine.name().to_string(),
                gpu: None,
                claimed_at: w.claimed_at,
                started_at: None,
                run_ms: 0,
                task: w.job.task,
            },
        );
    }

    /// Applies a reloaded config: what can change live does; keys that need a
    /// restart keep their running values and are named in the log.
    fn apply_config(&mut self, mut new: Config, settings: Settings) {
        let old = &self.cfg;
        let mut restart = Vec::new();
        macro_rules! keep {
            ($($field:ident).+, $name:expr) => {
                if format!("{:?}", new.$($field).+) != format!("{:?}", old.$($field).+) {
                    restart.push($name);
                    new.$($field).+ = old.$($field).+.clone();
                }
            };
        }
        keep!(spool.dir, "spool.dir");
        keep!(spool.instance, "spool.instance");
        keep!(spool.watch, "spool.watch");
        keep!(spool.poll_interval, "spool.poll_interval");
        keep!(spool.settle, "spool.settle");
        keep!(spool.consume_after, "spool.consume_after");
        keep!(spool.lease, "spool.lease");
        keep!(output.dir, "output.dir");
        keep!(engine.kind, "engine.kind");
        keep!(engine.root, "engine.root");
        keep!(limits.max_line_bytes, "limits.max_line_bytes");
        keep!(metrics.listen, "metrics.listen");
        keep!(metrics.textfile, "metrics.textfile");
        if let Err(e) = (self.opts.set_level)(&new.log.level) {
            warn!("log.level {:?} not applied: {e}", new.log.level);
        }
        self.engine = Arc::new(Engine::from_config(&new));
        self.rules = TaskRules::from_config(&new);
        self.sched.set_slots(engine::slots(&new));
        self.metrics.set_slots(&engine::slots(&new));
        let settings = Arc::new(settings);
        *self.webhooks.settings.write().expect("settings") = settings.clone();
        let _ = self.webhooks.tx.send(deliver::Cmd::Settings(settings));
        self.cfg = new;
        if restart.is_empty() {
            info!(config = %self.cfg.path.display(), slots = self.cfg.slot_count(), "config reloaded");
        } else {
            warn!(config = %self.cfg.path.display(), "config reloaded; these keys changed but need a restart and keep their running values: {}", restart.join(", "));
        }
        self.dirty = true;
    }

    /// Makes the loop look again at `at` (a batch's wait running out).
    fn wake_at(&mut self, at: std::time::Instant) {
        if self
            .wake
            .is_some_and(|w| w <= at && w > std::time::Instant::now())
        {
            return;
        }
        self.wake = Some(at);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let _ = tx.send(Event::Hint);
        });
    }

    fn start(&mut self, slot: Slot, mut works: Vec<Work>) {
        let started_at = now_rfc3339();
        for w in &mut works {
            w.attempts += 1;
            info!(id = %w.job.task.id, trace_id = %w.job.trace_id, stage = "started", slot = slot.index, gpu = ?slot.device, attempt = w.attempts, "started");
        }
        self.metrics.slot_started(&slot);
        self.metrics
            .in_flight
            .fetch_add(works.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.batches += 1;
        let engine = self.engine.clone();
        let tx = self.tx.clone();
        let batch_id = self.next_batch_id;
        self.next_batch_id += 1;
        let (cancel_tx, cancel) = watch::channel(self.cancelled_all);
        self.running.insert(
            batch_id,
            (
                works.iter().map(|w| w.claim.lease.clone()).collect(),
                cancel_tx,
            ),
        );
        let (free_tx, free_slot) = (tx.clone(), slot.clone());
        let mut free = SlotRelease::new(move || {
            let _ = free_tx.send(Event::SlotFree(free_slot));
        });
        tokio::spawn(async move {
            let jobs: Vec<Job> = works.iter().map(|w| w.job.clone()).collect();
            let mut outcomes = engine.run_batch(&jobs, &slot, cancel, &mut free).await;
            outcomes.resize(works.len(), Outcome::Cancelled);
            let _ = tx.send(Event::Finished {
                batch_id,
                slot,
                slot_freed: free.released(),
                works,
                outcomes,
                started_at,
            });
        });
    }

    /// One task of a batch of `batch_len` ended. Returns it if it is to run
    /// again at once (its batch failed as a whole).
    fn finished(
        &mut self,
        slot: &Slot,
        batch_len: usize,
        mut work: Work,
        outcome: Outcome,
        started_at: String,
    ) -> Option<Work> {
        let id = work.job.task.id.clone();
        let trace = work.job.trace_id.clone();
        match outcome {
            Outcome::Cancelled if self.stopping == 0 => {
                // Stopped because its batch shared a lease that was lost:
                // not this task's attempt; it runs again.
                work.attempts -= 1;
                return Some(work);
            }
            Outcome::Cancelled => {
                info!(id = %id, trace_id = %trace, "stopped by shutdown; handed back");
            }
            Outcome::Split {
                retry_batch,
                message,
            } => {
                // The batch failed as a whole: not this task's attempt.
                work.attempts -= 1;
                work.cap = retry_batch;
                if self.stopping == 0 {
                    warn!(id = %id, trace_id = %trace, stage = "retrying", batch = batch_len, retry_batch, "{message}; retrying in a smaller batch");
                    return Some(work);
                }
            }
            Outcome::Completed { run_ms } => {
                self.avg_run_ms = (self.avg_run_ms * 7 + run_ms) / 8;
                let common = self.common(&work.claim, id, trace);
                self.commit(
                    work.claim.clone(),
                    Record::Done {
                        common,
                        skipped: false,
                        output: work.job.output,
                        attempts: work.attempts,
                        engine: self.engine.name().to_string(),
                        gpu: slot.device.clone(),
                        claimed_at: work.claimed_at,
                        started_at: Some(started_at),
                        run_ms,
                        task: work.job.task,
                    },
                );
            }
            Outcome::Failed {
                kind,
                message,
                stderr_tail,
                ..
            } => {
                if kind.retryable()
                    && work.attempts < self.cfg.retry.max_attempts
                    && self.stopping == 0
                {
                    if batch_len > 1 {
                        // Failed inside a batch: next time alone, so one bad
                        // line cannot sink its neighbours twice.
                        work.cap = 1;
                    }
                    let wait = backoff(self.cfg.retry.backoff.0, work.attempts);
                    warn!(id = %id, trace_id = %trace, stage = "retrying", kind = kind.as_str(), attempt = work.attempts, wait = %humantime::format_duration(wait), "{message}");
                    self.retries += 1;
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        let _ = tx.send(Event::RetryDue(Box::new(work)));
                    });
                    return None;
                }
                if kind.retryable()
                    && self.stopping > 0
                    && work.attempts < self.cfg.retry.max_attempts
                {
                    info!(id = %id, trace_id = %trace, "failed during shutdown; handed back for a retry");
                    return None;
                }
                let common = self.common(&work.claim, id, trace);
                self.commit(
                    work.claim.clone(),
                    Record::Failed {
                        common,
                        kind,
                        message,
                        attempts: work.attempts,
                        task: Some(work.job.task),
                        raw: None,
                        stderr_tail: Some(stderr_tail),
                    },
                );
            }
        };
        None
    }

    /// The one place a task is finished: its record goes to the committer.
    fn commit(&mut self, c: ClaimRef, record: Record) {
        self.uncommitted += 1;
        if self
            .commit_tx
            .send(Commit {
                record,
                lease: c.lease,
                token: c.token,
                line: c.line,
            })
            .is_err()
        {
            self.fatal = Some("the record writer stopped".into());
        }
    }

    /// Every line of a lease has its record: delete it — if it is still
    /// ours: compare-and-delete by token under the claim lock.
    fn delete_lease(&mut self, lease: PathBuf, token: String) {
        let spool = Spool::new(&self.cfg.spool.dir);
        self.deleting += 1;
        self.blocking(
            move || {
                let res = LeaseOwner::new(&spool).delete(&lease, &token);
                (lease, res)
            },
            |(lease, res)| Event::LeaseDeleted(lease, res),
        );
    }

    /// A commit was fenced: another daemon owns this lease now and runs its
    /// lines. Forget it here — never delete, rewrite or hand it back — drop
    /// its queued lines, and stop the children still running its lines, so
    /// a GPU is not busy twice for one line.
    fn lose_lease(&mut self, lease: &PathBuf, lines: usize) {
        self.held.lock().expect("held set").remove(lease);
        let queued = self.sched.drop_lease(lease);
        let mut stopped = 0;
        for (leases, cancel) in self.running.values() {
            if leases.contains(lease) {
                let _ = cancel.send(true);
                stopped += 1;
            }
        }
        warn!(
            lease = %lease.display(),
            lines,
            dropped_queued = queued,
            stopped_batches = stopped,
            "lost a lease to another daemon (this one was paused or judged dead past spool.lease); its lines are that daemon's now"
        );
    }

    /// Self-fencing. A daemon whose beats came late may have been judged
    /// dead and its leases taken over: it claims and starts nothing until
    /// its beat is fresh again and it has checked, lease by lease, which are
    /// still its own; the others are let go (their queued lines dropped,
    /// their running children stopped). Its commits are fenced by token in
    /// any case, so a record can never be doubled; this keeps a GPU from
    /// running a line twice for long.
    fn beat_is_fresh(&mut self) -> bool {
        if let Some(e) = self.heartbeat.lock_lost() {
            self.fatal = Some(e);
            return false;
        }
        let lease = self.cfg.spool.lease.0;
        let limit = lease - fence_margin(lease);
        let age = self.heartbeat.age();
        let episodes = self.heartbeat.stale_episodes();
        let late = age > limit || episodes != self.stale_seen;
        match self.fenced {
            Fencing::Clear if !late => return true,
            Fencing::Clear => {
                warn!(
                    beat_age = %humantime::format_duration(Duration::from_millis(age.as_millis() as u64)),
                    "our heartbeat was late (more than spool.lease − {}): not claiming or starting tasks until it is fresh and our leases are checked",
                    humantime::format_duration(fence_margin(lease))
                );
                self.fenced = Fencing::Stale;
            }
            Fencing::Stale | Fencing::Checking => {}
        }
        if self.fenced == Fencing::Stale && age <= limit {
            self.stale_seen = episodes;
            self.fenced = Fencing::Checking;
            let leases = self.leases.tokens();
            self.blocking(
                move || {
                    leases
                        .into_iter()
                        .filter(|(lease, token)| !claim::still_ours(lease, token))
                        .map(|(lease, _)| lease)
                        .collect::<Vec<_>>()
                },
                Event::LeasesChecked,
            );
        } else if self.fenced == Fencing::Stale {
            // Look again soon (one timer, however often we get here).
            let at = std::time::Instant::now() + self.heartbeat.every();
            self.wake_at(at);
        }
        false
    }

    /// Tells every running batch (and, from now on, every new one) to stop.
    fn cancel_all(&mut self) {
        self.cancelled_all = true;
        for (_, cancel) in self.running.values() {
            let _ = cancel.send(true);
        }
    }

    /// On exit: leases with unfinished lines go back for anyone to take.
    fn hand_back_all(&mut self) {
        if self.leases.is_empty() {
            return;
        }
        let c = self.claimer.lock().expect("claimer");
        let mut n = 0;
        let mut leases = std::mem::take(&mut self.leases);
        for (lease, held) in leases.drain() {
            n += held.lines.len();
            if let Err(e) = c.hand_back(&lease, &held.token) {
                error!("{e}");
            }
        }
        info!(tasks = n, "handed back unfinished tasks");
    }
}

fn describe(rec: &Record) -> String {
    match rec {
        Record::Done { skipped: true, .. } => "output exists; skipped".into(),
        Record::Done {
            run_ms, attempts, ..
        } => format!("completed in {run_ms} ms (attempt {attempts})"),
        Record::Failed { kind, message, .. } => format!("failed ({}): {message}", kind.as_str()),
    }
}

/// The id of an invalid line, if it has a usable one.
fn guess_id(bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let s = v
        .get("id")
        .or_else(|| v.get("output_name"))
        .or_else(|| v.get("uttid"))?
        .as_str()?;
    (!s.is_empty() && s.len() <= 200).then(|| s.to_string())
}

/// Heartbeat housekeeping: pending-line gauges, the metrics textfile, and
/// deleting consumed inputs older than `retention.consumed`.
fn refresh_gauges(
    spool: &Spool,
    max_line: usize,
    metrics: &Metrics,
    textfile: Option<&std::path::Path>,
    retention: Option<Duration>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    // Counting pending lines reads the pending files: only for metrics users.
    let wanted = textfile.is_some() || metrics.served.load(Relaxed);
    if let Some(s) = wanted
        .then(|| claim::summary(spool, max_line).ok())
        .flatten()
    {
        metrics.pending_lines.store(s.pending_lines, Relaxed);
        let age = s
            .oldest_pending
            .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
            .map(|d| d.as_secs())
            .unwrap_or(u64::MAX);
        metrics.oldest_pending_secs.store(age, Relaxed);
    }
    if let Some(path) = textfile {
        if let Err(e) = crate::util::atomic_write(path, metrics.render().as_bytes()) {
            warn!(
                "cannot write metrics.textfile {}: {}",
                path.display(),
                crate::util::io_msg(&e)
            );
        }
    }
    if let Some(keep) = retention {
        let n = crate::retention::prune_consumed(spool, keep);
        if n > 0 {
            info!(
                files = n,
                "deleted consumed input files older than retention.consumed"
            );
        }
    }
}

/// What the record committer needs to queue webhooks.
#[derive(Clone)]
struct Webhooks {
    settings: Arc<std::sync::RwLock<Arc<Settings>>>,
    outbox: Arc<Outbox>,
    tx: mpsc::UnboundedSender<deliver::Cmd>,
    spool_root: PathBuf,
}

/// How soon after the last group a record counts as part of a busy stream.
const GROUP_BUSY: Duration = Duration::from_millis(10);
/// How long a busy stream's record waits for others to share its fsyncs.
const GROUP_WAIT: Duration = Duration::from_millis(2);
/// A group at least this big does not wait for more.
const GROUP_ENOUGH: usize = 64;

/// The committer thread: group commit of records, then report them durable.
fn committer(
    log: RecordLog,
    rx: std::sync::mpsc::Receiver<Commit>,
    tx: mpsc::UnboundedSender<Event>,
    webhooks: Webhooks,
    once: bool,
) {
    let mut last_group: Option<std::time::Instant> = None;
    while let Ok(first) = rx.recv() {
        // A record that comes soon after the last group means tasks are
        // finishing fast: give its companions a moment to join, so a fast
        // engine pays a few fsyncs per group rather than per task (the idea
        // of PostgreSQL's commit_delay). After a quiet spell a record is
        // written at once.
        let busy = last_group.is_some_and(|t| t.elapsed() < GROUP_BUSY);
        let until = std::time::Instant::now() + if busy { GROUP_WAIT } else { Duration::ZERO };
        let mut batch = vec![first];
        while batch.len() < 4096 {
            // A group this big already shares its fsyncs well: take only
            // what is ready.
            let left = if batch.len() < GROUP_ENOUGH {
                until.saturating_duration_since(std::time::Instant::now())
            } else {
                Duration::ZERO
            };
            match rx.recv_timeout(left) {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        last_group = Some(std::time::Instant::now());
        // A full disk is a pause: the group stays in memory and is written
        // again (all or nothing) until it fits. `--once` gives up instead.
        let mut wait = Duration::from_secs(1);
        let res = loop {
            match write_batch(&log, &batch, &webhooks) {
                Err(e) if crate::util::is_disk_full(&e) && !once => {
                    let bytes = batch.iter().map(|c| c.record.to_line().len() as u64).sum();
                    let _ = tx.send(Event::DiskFull {
                        what: format!(
                            "cannot write records to {}: {}",
                            log.done.display(),
                            crate::util::io_msg(&e)
                        ),
                        needed: bytes,
                    });
                    // Until the wait is over, or the file system shows room.
                    let until = std::time::Instant::now() + wait;
                    let dir = log.done.parent().unwrap_or(std::path::Path::new("."));
                    while std::time::Instant::now() < until
                        && crate::util::free_bytes(dir).is_none_or(|f| f <= bytes * 2 + 64 * 1024)
                    {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
                other => break other,
            }
        };
        match res {
            Ok(written) => {
                let list = batch
                    .into_iter()
                    .zip(written)
                    .map(|(c, w)| (c.record, c.lease, c.line, w))
                    .collect();
                let _ = tx.send(Event::Committed(list));
            }
            Err(e) => {
                let _ = tx.send(Event::CommitFailed(format!(
                    "{} / {}: {}",
                    log.done.display(),
                    log.failed.display(),
                    crate::util::io_msg(&e)
                )));
                return;
            }
        }
    }
}

/// Appends a batch under the records lock, leaving out records whose lease
/// another daemon has taken over (it re-runs those lines itself). First the
/// folders of the batch's new outputs are fsynced, once each, so every
/// `completed` record points at a rename that is already durable.
fn write_batch(
    log: &RecordLog,
    batch: &[Commit],
    webhooks: &Webhooks,
) -> std::io::Result<Vec<CommitOutcome>> {
    let mut dirs: Vec<&std::path::Path> = batch
        .iter()
        .filter_map(|c| match &c.record {
            Record::Done {
                skipped: false,
                output,
                ..
            } => output.parent(),
            _ => None,
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        crate::util::fsync_dir(d)?;
    }
    let _g = log.lock()?;
    if log.maybe_rotate_locked()? {
        info!("record logs rotated");
    }
    let before = log.sizes();
    let mut ours: HashMap<&PathBuf, CommitOutcome> = HashMap::new();
    let mut done = Vec::new();
    let mut failed = Vec::new();
    let mut written = Vec::with_capacity(batch.len());
    let mut messages = Vec::new();
    let settings = webhooks.settings.read().expect("settings").clone();
    for c in batch {
        let outcome = *ours.entry(&c.lease).or_insert_with(|| {
            if claim::still_ours(&c.lease, &c.token) {
                CommitOutcome::Durable
            } else {
                CommitOutcome::Fenced
            }
        });
        written.push(outcome);
        if outcome == CommitOutcome::Durable {
            let line = c.record.to_line();
            if c.record.is_done() {
                done.push(line);
            } else {
                failed.push(line);
            }
            messages.extend(settings.for_record(&c.record));
        }
    }
    // The messages are durable before their records, and deliverable only
    // after them (see webhook/outbox.rs for why a crash in between is safe).
    let pending = if messages.is_empty() {
        None
    } else {
        Some(webhooks.outbox.write(&messages, Some(log.position()))?)
    };
    // All or nothing, so that a group written again after a full disk
    // cannot double a record: undo what half of it did.
    let appended = RecordLog::append_locked(&log.done, &done)
        .and_then(|()| RecordLog::append_locked(&log.failed, &failed));
    if let Err(e) = appended {
        let _ = RecordLog::truncate_locked(&log.done, before.0);
        if let Some(p) = &pending {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    if let Some(p) = pending {
        let seg = Outbox::promote(&p)?;
        let _ = webhooks.tx.send(deliver::Cmd::Segment(seg));
    }
    Ok(written)
}
