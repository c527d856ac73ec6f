//! The daemon's decisions, without I/O: a state machine.
//!
//! Everything that happens — a hint that `pending/` changed, a poll tick, a
//! claim coming back, a batch finishing, records becoming durable, a
//! signal — is an [`Event`] given to [`Core::handle`]; [`Core::pump`] then
//! starts what can start. Neither touches a file, a socket or a timer:
//! what is to be done is queued as [`Effect`]s, which the shell
//! (shell.rs) carries out and whose results come back as events. What the
//! core needs to know of the world (does this output exist, how old is our
//! heartbeat, how much space is free, what time is it) it asks a [`World`],
//! which a test fakes — so every decision here runs in a unit test, without
//! processes.
//!
//! Finishing a task is one place, [`Core::commit`]: the record goes to the
//! committer. When the committer reports it durable (or fenced: the lease
//! is another daemon's now), the line is settled in the lease book, and an
//! exhausted lease is deleted, compare-and-delete by token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::{fence_margin, Options, Sig};
use crate::config::Config;
use crate::engine::{self, Engine, Job, Outcome, Slot};
use crate::metrics::Metrics;
use crate::scheduler::{backoff, ClaimRef, Next, Scheduler, Work};
use crate::spool::claim::{
    Batch, ClaimError, Claimed, CommitOutcome, FileDone, Held, HeldSet, LeaseChange,
};
use crate::spool::lease::{LeaseBook, Settled};
use crate::spool::lines::{Line, RAW_KEEP};
use crate::task::{self, parse_line, TaskRules};
use crate::util::{cut, now_rfc3339};
use crate::vocab::{Common, ErrorKind, Record, Source, TraceId};
use crate::webhook::Settings;

/// The most lines one claim takes when claims bring no engine work.
const MAX_BURST: usize = 1024;

/// The first pause; each failure after a pause doubles it, up to
/// [`PAUSE_MAX`].
const PAUSE_FIRST: Duration = Duration::from_secs(5);
const PAUSE_MAX: Duration = Duration::from_secs(300);

/// A slot's breaker: consecutive retryable failures, and its pause.
#[derive(Debug, Clone)]
struct Breaker {
    fails: u32,
    paused: bool,
    /// Its pause is over and it has not worked since: the next failure,
    /// whatever task it is, pauses it again.
    half_open: bool,
    next_pause: Duration,
    /// Tasks that failed on this slot in the current streak: a failure
    /// counts only if it brings a task not seen failing yet, so one
    /// poisoned line (or a batch split around it) does not pause a slot —
    /// only failures of different tasks do.
    seen: std::collections::HashSet<TraceId>,
}

impl Default for Breaker {
    fn default() -> Breaker {
        Breaker {
            fails: 0,
            paused: false,
            half_open: false,
            next_pause: PAUSE_FIRST,
            seen: Default::default(),
        }
    }
}

/// What happened.
pub enum Event {
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
    /// A slot's breaker pause is over: it may take a task again (after a
    /// probe, where the engine has one).
    SlotResume(usize),
    /// What the probe of a paused slot found.
    Probed(usize, Result<(), String>),
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
    /// Webhooks are being delivered or due soon (`--once` waits for them).
    WebhooksBusy(bool),
    /// Work on the blocking pool panicked.
    Crashed(String),
    Signal(Sig),
    GraceOver,
    Reloaded(Box<Result<(Config, Settings), String>>),
}

/// What the shell is asked to do.
pub enum Effect {
    /// Claim up to `want` lines (answer: [`Event::Claimed`]).
    Claim { want: usize },
    /// Take over abandoned leases, and the housekeeping that goes with it
    /// (answer: [`Event::TakenOver`]).
    TakeOver(Housekeeping),
    /// Run a batch (answers: [`Event::SlotFree`], [`Event::Finished`]).
    Start(Start),
    /// Tell a running batch to stop.
    Cancel(u64),
    /// Write a record (answer: [`Event::Committed`] with others).
    Commit(Box<Commit>),
    /// Delete a finished lease if it still carries `token` (answer:
    /// [`Event::LeaseDeleted`]).
    DeleteLease { lease: PathBuf, token: String },
    /// Which of these leases still carry our token? (answer:
    /// [`Event::LeasesChecked`] with those that do not).
    CheckLeases(Vec<(PathBuf, String)>),
    /// Hand on consumed files' totals (answer: [`Event::Announced`]).
    Announce(Vec<FileDone>),
    /// Load the config again (answer: [`Event::Reloaded`]).
    Reload(PathBuf),
    /// New webhook settings (after a reload).
    Settings(Arc<Settings>),
    /// The config as it runs after a reload (for the HTTP API).
    Reconfigured(Box<Config>),
    /// A new engine: get it ready (start its workers).
    WarmUp(Arc<Engine>),
    /// Deliver `Event` at `Instant`.
    Timer(Instant, Event),
    /// Tell systemd.
    Notify(Notify),
    /// The slots the breaker holds paused now (for `status`).
    SlotHealth(Vec<usize>),
    /// Ask the engine whether a paused slot works again, without a task
    /// (answer: [`Event::Probed`]).
    Probe(Slot, Arc<Engine>),
    /// Hand these leases back to the spool (compare-and-set by token), for
    /// any daemon to take at once: (lease, token, lines).
    HandBack(Vec<(PathBuf, String, usize)>),
}

/// What is done along with a takeover, every `spool.lease / 4`.
#[derive(Debug, Clone)]
pub struct Housekeeping {
    pub max_line_bytes: usize,
    pub textfile: Option<PathBuf>,
    /// Delete consumed files older than this.
    pub retention: Option<Duration>,
    /// Take over abandoned and handed-back leases (not while every slot is
    /// paused: we could run none of them).
    pub adopt: bool,
}

impl std::fmt::Debug for Effect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Effect::Claim { want } => write!(f, "Claim({want})"),
            Effect::TakeOver(_) => write!(f, "TakeOver"),
            Effect::Start(s) => write!(f, "Start(batch {}, {} work(s))", s.batch_id, s.works.len()),
            Effect::Cancel(id) => write!(f, "Cancel({id})"),
            Effect::HandBack(l) => write!(f, "HandBack({} lease(s))", l.len()),
            Effect::Commit(c) => write!(
                f,
                "Commit({} {}:{})",
                c.record.status(),
                c.lease.display(),
                c.line
            ),
            Effect::DeleteLease { lease, .. } => write!(f, "DeleteLease({})", lease.display()),
            Effect::CheckLeases(l) => write!(f, "CheckLeases({})", l.len()),
            Effect::Announce(files) => write!(f, "Announce({})", files.len()),
            Effect::Reload(p) => write!(f, "Reload({})", p.display()),
            Effect::Settings(_) => write!(f, "Settings"),
            Effect::Reconfigured(_) => write!(f, "Reconfigured"),
            Effect::WarmUp(_) => write!(f, "WarmUp"),
            Effect::Timer(_, _) => write!(f, "Timer"),
            Effect::Notify(n) => write!(f, "Notify({n:?})"),
            Effect::SlotHealth(p) => write!(f, "SlotHealth({p:?})"),
            Effect::Probe(s, _) => write!(f, "Probe({})", s.index),
        }
    }
}

/// A batch to run.
pub struct Start {
    pub batch_id: u64,
    pub slot: Slot,
    pub works: Vec<Work>,
    pub started_at: String,
    pub engine: Arc<Engine>,
    /// Stopped before it starts (shutdown).
    pub cancelled: bool,
}

/// A record on its way to disk, with the lease it settles.
#[derive(Debug)]
pub struct Commit {
    pub record: Record,
    pub lease: PathBuf,
    pub token: String,
    pub line: u64,
}

/// What systemd is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify {
    Ready,
    Stopping,
    Reloading,
}

/// Our heartbeat, as the core sees it.
#[derive(Debug, Clone, Default)]
pub struct Beat {
    /// Since our last successful beat.
    pub age: Duration,
    /// Times our beats were late so far.
    pub stale_episodes: u64,
    /// How often we beat.
    pub every: Duration,
    /// Our instance lock is gone (the spool was replaced): why.
    pub lock_lost: Option<String>,
}

/// What the core asks of the world.
pub trait World: Send {
    fn now(&self) -> Instant;
    fn output_exists(&self, path: &Path) -> bool;
    /// Bytes free on the spool's file system.
    fn free_bytes(&self) -> Option<u64>;
    fn beat(&self) -> Beat;
    /// The core has dealt with `episodes` late beats (see
    /// [`crate::spool::heartbeat::Heartbeat::trusted`]).
    fn cleared(&self, _episodes: u64) {}
}

/// The daemon's state.
pub struct Core {
    cfg: Config,
    opts: Options,
    rules: TaskRules,
    engine: Arc<Engine>,
    world: Box<dyn World>,
    fx: Vec<Effect>,
    /// Leases this process holds, shared with the claimer.
    held: HeldSet,
    sched: Scheduler,
    /// The leases we hold: their token and outstanding lines.
    leases: LeaseBook,
    /// Running batches: the leases their lines belong to.
    running: HashMap<u64, Vec<PathBuf>>,
    next_batch_id: u64,
    /// Every running batch was told to stop (shutdown): later ones too.
    cancelled_all: bool,
    instance: String,
    dirty: bool,
    claiming: bool,
    /// Webhooks are being delivered or due soon (`--once` waits for them).
    webhooks_busy: bool,
    metrics: Arc<Metrics>,
    /// Lines to claim at once when claims yield no engine work (all skipped
    /// or invalid): grows so a backlog of skips is not throttled by per-claim
    /// fsyncs; back to the slot count as soon as a claim brings real work, so
    /// daemons sharing a spool never hoard tasks another one could run.
    burst: usize,
    /// Moving average of engine run time, for how far ahead to claim.
    avg_run_ms: u64,
    /// When a timer will next wake the loop for a waiting batch.
    wake: Option<Instant>,
    taking_over: bool,
    recovered: bool,
    last_claim_empty: bool,
    waiting_partial: bool,
    retries: usize,
    /// Batches started and not yet finished (their slot may be free already).
    batches: usize,
    uncommitted: usize,
    /// Finished leases being deleted.
    deleting: usize,
    stopping: u8,
    fatal: Option<String>,
    /// The last claim error, for `--once`'s verdict.
    last_error: Option<String>,
    /// Stale episodes of our heartbeat already dealt with.
    stale_seen: u64,
    /// Our beat was late: nothing is claimed or started until our leases
    /// are checked (self-fencing).
    fenced: Fencing,
    /// Claims are paused: the spool's disk is full.
    disk_full: Option<DiskFull>,
    /// Per slot index: its breaker.
    breakers: HashMap<usize, Breaker>,
    /// Every slot is paused: logged once per episode.
    all_paused_logged: bool,
    /// The last claim error logged, and when.
    claim_error_logged: Option<(String, Instant)>,
    /// Every slot just paused: hand back what is not started, once the
    /// finishing batch's records are on their way.
    hand_back_due: bool,
    /// Records on their way to the logs, per lease (a lease with one is
    /// not handed back).
    committing: HashMap<PathBuf, usize>,
}

/// Claims paused for lack of space.
struct DiskFull {
    since: Instant,
    next_claim: Instant,
    wait: Duration,
    logged: Option<Instant>,
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

impl Core {
    pub fn new(
        cfg: Config,
        opts: Options,
        engine: Arc<Engine>,
        metrics: Arc<Metrics>,
        held: HeldSet,
        world: Box<dyn World>,
    ) -> Core {
        Core {
            rules: TaskRules::from_config(&cfg),
            sched: Scheduler::new(engine::slots(&cfg)),
            instance: cfg.spool.instance.clone(),
            engine,
            world,
            fx: Vec::new(),
            held,
            running: HashMap::new(),
            next_batch_id: 0,
            cancelled_all: false,
            deleting: 0,
            leases: LeaseBook::default(),
            dirty: true,
            claiming: false,
            webhooks_busy: false,
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
            stale_seen: 0,
            fenced: Fencing::Clear,
            disk_full: None,
            breakers: HashMap::new(),
            all_paused_logged: false,
            claim_error_logged: None,
            committing: HashMap::new(),
            hand_back_due: false,
            opts,
            cfg,
        }
    }

    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    /// The engine tasks start on now.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Why the daemon must stop, once.
    pub fn take_fatal(&mut self) -> Option<String> {
        self.fatal.take()
    }

    /// Claimed lines without a record yet.
    pub fn unfinished(&self) -> u64 {
        self.leases.unfinished()
    }

    pub fn once(&self) -> bool {
        self.opts.once
    }

    pub fn stopping(&self) -> bool {
        self.stopping > 0
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Decides what an event means; what to do about it is queued as
    /// effects ([`Core::take_effects`]).
    pub fn handle(&mut self, ev: Event) {
        match ev {
            Event::Hint | Event::Tick => self.dirty = true,
            Event::Beat => self.start_takeover(),
            Event::Claimed(res) => {
                self.claiming = false;
                match res {
                    Ok(batch) => {
                        self.claim_error_logged = None;
                        self.claimed(batch);
                        self.hand_back_if_all_paused();
                    }
                    Err(e @ ClaimError::LockBroken(_)) => self.fatal = Some(e.to_string()),
                    Err(e) if e.is_disk_full() => {
                        self.disk_is_full(&e.to_string(), 4096);
                        self.last_claim_empty = true;
                    }
                    Err(e) if e.is_out_of_descriptors() => {
                        crate::util::warn_out_of_descriptors(&e.to_string());
                        self.last_error = Some(e.to_string());
                        self.last_claim_empty = true;
                    }
                    Err(e) => {
                        // Said once a minute while it repeats.
                        let msg = e.to_string();
                        let now = self.world.now();
                        // Out of descriptors, every file's error differs:
                        // they are one condition.
                        let class = if e.is_out_of_descriptors() {
                            "out of file descriptors".to_string()
                        } else {
                            msg.clone()
                        };
                        let repeat = self.claim_error_logged.as_ref().is_some_and(|(m, t)| {
                            *m == class && now.duration_since(*t) < Duration::from_secs(60)
                        });
                        if !repeat {
                            error!("claiming failed (tried again every round): {msg}");
                            self.claim_error_logged = Some((class, now));
                        }
                        self.last_error = Some(msg);
                        self.last_claim_empty = true;
                    }
                }
            }
            Event::TakenOver(res) => {
                self.taking_over = false;
                if !self.recovered {
                    // The spool is open and our previous run's claims are
                    // back in hand: now systemd may call us started.
                    self.fx.push(Effect::Notify(Notify::Ready));
                }
                self.recovered = true;
                match res {
                    Ok(list) => {
                        for (held, lines) in list {
                            self.adopt(held, lines);
                        }
                        self.hand_back_if_all_paused();
                    }
                    Err(e @ (ClaimError::LockLost(_) | ClaimError::LockBroken(_))) => {
                        self.fatal = Some(e.to_string())
                    }
                    Err(e) if e.is_disk_full() => self.disk_is_full(&e.to_string(), 4096),
                    Err(e) if e.is_out_of_descriptors() => {
                        crate::util::warn_out_of_descriptors(&e.to_string())
                    }
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
                // The breaker counts a batch as one run of the engine.
                let opened = self.breaker(&slot, &works, &outcomes);
                let mut again = Vec::new();
                for (work, outcome) in works.into_iter().zip(outcomes) {
                    if !self.leases.holds(&work.claim.lease) {
                        // Its lease was lost meanwhile: the line is another
                        // daemon's, whatever happened here.
                        continue;
                    }
                    again.extend(self.finished(
                        &slot,
                        n,
                        work,
                        outcome,
                        started_at.clone(),
                        opened,
                    ));
                }
                // Split batches go first, in their order.
                for w in again.into_iter().rev() {
                    self.sched.push_front(w);
                }
                if std::mem::take(&mut self.hand_back_due) {
                    self.hand_back_if_all_paused();
                }
            }
            Event::SlotResume(index) if self.engine.can_probe() => {
                // Ask first: a broken server (or a refused token) costs no
                // task its attempt.
                let slot = Slot {
                    index,
                    device: None,
                };
                self.fx.push(Effect::Probe(slot, self.engine.clone()));
            }
            Event::Probed(index, Err(why)) => {
                let b = self.breakers.entry(index).or_default();
                let pause = b.next_pause;
                b.next_pause = (b.next_pause * 2).min(PAUSE_MAX);
                warn!(
                    slot = index,
                    pause = %humantime::format_duration(pause),
                    "the paused slot's probe failed: {why}; pausing again"
                );
                let at = self.world.now() + pause;
                self.fx.push(Effect::Timer(at, Event::SlotResume(index)));
            }
            Event::Probed(index, Ok(())) | Event::SlotResume(index) => {
                if let Some(b) = self.breakers.get_mut(&index) {
                    b.paused = false;
                    b.half_open = true;
                }
                self.sched.set_paused(index, false);
                self.metrics.slot_paused(index, false);
                self.fx.push(Effect::SlotHealth(self.paused_slots()));
                info!(slot = index, "slot's pause is over: trying it again");
                self.all_paused_logged = false;
                self.dirty = true;
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
                    if let Some(n) = self.committing.get_mut(&lease) {
                        *n -= 1;
                        if *n == 0 {
                            self.committing.remove(&lease);
                        }
                    }
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
            Event::WebhooksBusy(busy) => self.webhooks_busy = busy,
            Event::Crashed(msg) => {
                self.fatal = Some(format!("internal error, stopping: {msg}"));
            }
            Event::Signal(Sig::Stop) => {
                self.stopping += 1;
                if self.stopping == 1 {
                    self.fx.push(Effect::Notify(Notify::Stopping));
                    info!(
                        running = self.batches,
                        grace = %humantime::format_duration(self.cfg.shutdown.grace.0),
                        "stopping: no new claims; waiting for running tasks"
                    );
                    let at = self.world.now() + self.cfg.shutdown.grace.0;
                    self.fx.push(Effect::Timer(at, Event::GraceOver));
                } else {
                    warn!("second stop signal: killing running tasks now");
                    self.cancel_all();
                }
            }
            Event::Signal(Sig::Reload) => {
                self.fx.push(Effect::Notify(Notify::Reloading));
                self.fx.push(Effect::Reload(self.cfg.path.clone()));
            }
            Event::Reloaded(res) => {
                match *res {
                    Ok((new, settings)) => self.apply_config(new, settings),
                    Err(e) => error!("config reload refused, the running config stays: {e}"),
                }
                self.fx.push(Effect::Notify(Notify::Ready));
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
    pub fn done(&self) -> bool {
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
        if self.opts.once && self.sched.usable() == 0 {
            // Nor for a breaker: every slot is paused, what is left is
            // handed back for the next run (the verdict says why).
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
    pub fn pump(&mut self) {
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
                        if self.world.output_exists(&w.job.output) {
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
            let room = self
                .world
                .free_bytes()
                .is_some_and(|free| free > full.needed * 2 + 64 * 1024);
            let now = self.world.now();
            if now < full.next_claim && !room {
                let at = full.next_claim.min(now + Duration::from_secs(1));
                self.wake_at(at);
                return;
            }
        }
        if self.sched.usable() == 0 {
            if !self.all_paused_logged {
                self.all_paused_logged = true;
                warn!(
                    slots = self.sched.slot_count(),
                    "every slot is paused by its breaker: claiming nothing new until one works again (other daemons on the spool take the work)"
                );
            }
            return;
        }
        if self.dirty && !self.claiming && want > 0 && low {
            self.dirty = false;
            self.claiming = true;
            self.fx.push(Effect::Claim { want });
        }
    }

    fn start_takeover(&mut self) {
        if self.taking_over {
            return;
        }
        self.taking_over = true;
        self.fx.push(Effect::TakeOver(Housekeeping {
            max_line_bytes: self.cfg.limits.max_line_bytes,
            textfile: self.cfg.metrics.textfile.clone(),
            retention: self.cfg.retention.consumed.map(|d| d.0),
            adopt: !self.recovered || self.sched.usable() > 0,
        }));
    }

    /// Hands on the totals of consumed files (`file.completed`); see
    /// spool/consume.rs.
    fn announce(&mut self, files: Vec<FileDone>) {
        self.fx.push(Effect::Announce(files));
    }

    /// A spool write failed for lack of space: claims pause (with a
    /// growing wait between tries) until space returns; running tasks go
    /// on and their records wait in memory. Logged once a minute.
    fn disk_is_full(&mut self, what: &str, needed: u64) {
        let now = self.world.now();
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
            let free = self
                .world
                .free_bytes()
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
            let at = self.world.now() + self.cfg.spool.settle.0 + Duration::from_millis(50);
            self.fx.push(Effect::Timer(at, Event::Hint));
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
        let trace_id = TraceId::new();
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
            Err(gone) => {
                let raw = gone.raw.unwrap_or_default();
                let id = guess_id(raw.as_bytes())
                    .unwrap_or_else(|| format!("{}:{}", cref.file, cref.line));
                return invalid(self, id, gone.why, raw, None);
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
            avoid_slot: None,
        };
        if self.world.output_exists(&work.job.output) {
            self.skip(work);
        } else {
            self.sched.push(work);
        }
    }

    fn common(&self, c: &ClaimRef, id: String, trace_id: TraceId) -> Common {
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
        keep!(api.listen, "api.listen");
        keep!(api.max_body, "api.max_body");
        if let Err(e) = (self.opts.set_level)(&new.log.level) {
            warn!("log.level {:?} not applied: {e}", new.log.level);
        }
        let engine = Engine::reload(&self.engine, &self.cfg, &new);
        if !Arc::ptr_eq(&engine, &self.engine) {
            self.engine = engine;
            self.fx.push(Effect::WarmUp(self.engine.clone()));
        }
        self.rules = TaskRules::from_config(&new);
        self.sched.set_slots(engine::slots(&new));
        self.metrics.set_slots(&engine::slots(&new));
        self.fx.push(Effect::Settings(Arc::new(settings)));
        self.fx.push(Effect::Reconfigured(Box::new(new.clone())));
        self.cfg = new;
        if restart.is_empty() {
            info!(config = %self.cfg.path.display(), slots = self.cfg.slot_count(), "config reloaded");
        } else {
            warn!(config = %self.cfg.path.display(), "config reloaded; these keys changed but need a restart and keep their running values: {}", restart.join(", "));
        }
        self.dirty = true;
    }

    /// Makes the loop look again at `at` (a batch's wait running out).
    fn wake_at(&mut self, at: Instant) {
        if self.wake.is_some_and(|w| w <= at && w > self.world.now()) {
            return;
        }
        self.wake = Some(at);
        self.fx.push(Effect::Timer(at, Event::Hint));
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
        let batch_id = self.next_batch_id;
        self.next_batch_id += 1;
        self.running.insert(
            batch_id,
            works.iter().map(|w| w.claim.lease.clone()).collect(),
        );
        self.fx.push(Effect::Start(Start {
            batch_id,
            slot,
            works,
            started_at,
            engine: self.engine.clone(),
            cancelled: self.cancelled_all,
        }));
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
        opened: bool,
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
                retry_after,
                give_up,
                ..
            } => {
                let retryable = kind.retryable() && !give_up;
                if retryable {
                    work.avoid_slot = Some(slot.index);
                    if opened {
                        // The slot is broken, not the task: this attempt
                        // is not the task's.
                        work.attempts -= 1;
                    }
                }
                if retryable && work.attempts < self.cfg.retry.max_attempts && self.stopping == 0 {
                    if batch_len > 1 {
                        // Failed inside a batch: next time alone, so one bad
                        // line cannot sink its neighbours twice.
                        work.cap = 1;
                    }
                    let wait = backoff(self.cfg.retry.backoff.0, work.attempts)
                        .max(retry_after.unwrap_or_default());
                    warn!(id = %id, trace_id = %trace, stage = "retrying", kind = kind.as_str(), attempt = work.attempts, wait = %humantime::format_duration(wait), "{message}");
                    self.retries += 1;
                    let at = self.world.now() + wait;
                    self.fx
                        .push(Effect::Timer(at, Event::RetryDue(Box::new(work))));
                    return None;
                }
                if retryable && self.stopping > 0 && work.attempts < self.cfg.retry.max_attempts {
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

    /// The breaker: a slot whose engine fails (retryably) `retry.break_after`
    /// times in a row is paused, with growing waits, instead of failing the
    /// backlog; while every slot is paused nothing new is claimed (other
    /// hosts take the work). Returns true if this outcome opened (or found
    /// open) the slot's breaker.
    fn breaker(&mut self, slot: &Slot, works: &[Work], outcomes: &[Outcome]) -> bool {
        let b = self.breakers.entry(slot.index).or_default();
        // Any audio proves the slot works; a batch whose every task failed
        // retryably (or that failed as a whole) is one failure.
        let worked = outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Completed { .. }));
        // Missing output after a clean exit is the task's (a bad prompt
        // clip, say): the engine ran. A crash, a timeout, a failure to
        // start, a server's 5xx or refused token are the slot's — also
        // when the task is not retried (it took down two workers: once is
        // a poison line, on three different tasks it is the GPU).
        let failure = outcomes.iter().find_map(|o| match o {
            Outcome::Failed { kind, message, .. }
                if kind.retryable() && *kind != ErrorKind::MissingOutput =>
            {
                Some(message.clone())
            }
            Outcome::Split { message, .. } => Some(message.clone()),
            _ => None,
        });
        match (worked, failure) {
            (true, _) => {
                if b.next_pause > PAUSE_FIRST {
                    info!(slot = slot.index, "slot works again");
                }
                *b = Breaker::default();
                false
            }
            (false, Some(message)) => {
                let mut fresh = false;
                for w in works {
                    fresh |= b.seen.insert(w.job.trace_id.clone());
                }
                if b.paused {
                    return true; // ran while the pause began
                }
                if !fresh && !b.half_open {
                    return false; // the same task(s) again: theirs, not the slot's
                }
                b.fails += 1;
                let threshold = self.cfg.retry.break_after;
                if threshold == 0 || (b.fails < threshold && !b.half_open) {
                    return false;
                }
                // A trial after a pause that failed pauses the slot again,
                // and counts against the task (a line that always fails
                // must end, not wait forever).
                let charged = std::mem::take(&mut b.half_open);
                b.paused = true;
                let pause = b.next_pause;
                b.next_pause = (b.next_pause * 2).min(PAUSE_MAX);
                warn!(
                    slot = slot.index,
                    failures = b.fails,
                    pause = %humantime::format_duration(pause),
                    "the engine failed {} times in a row on this slot: pausing it instead of failing more tasks; last error: {message}",
                    b.fails
                );
                self.sched.set_paused(slot.index, true);
                self.metrics.slot_paused(slot.index, true);
                if self.sched.usable() == 0 {
                    self.last_error = Some(format!(
                        "the engine kept failing, so its breaker paused every slot: {message}"
                    ));
                    // After this batch's outcomes are committed (the
                    // Finished handler): see hand_back_if_all_paused.
                    self.hand_back_due = true;
                }
                let paused = self.paused_slots();
                self.fx.push(Effect::SlotHealth(paused));
                let at = self.world.now() + pause;
                self.fx
                    .push(Effect::Timer(at, Event::SlotResume(slot.index)));
                !charged
            }
            _ => false,
        }
    }

    /// A claim or takeover that was under way when the last slot paused
    /// brings lines we cannot run: they go back too.
    fn hand_back_if_all_paused(&mut self) {
        if self.sched.usable() == 0 && !self.opts.once && self.stopping == 0 && self.recovered {
            self.hand_back_unstarted();
        }
    }

    /// Every slot is paused (the engine or its servers are down here): the
    /// lines we claimed and have not started go back to the spool, so a
    /// daemon whose engine works takes them at once instead of after our
    /// pause. Leases with a running task stay ours.
    fn hand_back_unstarted(&mut self) {
        let running: std::collections::HashSet<PathBuf> =
            self.running.values().flatten().cloned().collect();
        let mut back = Vec::new();
        for (lease, token) in self.leases.tokens() {
            if running.contains(&lease) || self.committing.contains_key(&lease) {
                continue;
            }
            if let Some(lines) = self.leases.forget(&lease) {
                back.push((lease, token, lines));
            }
        }
        if back.is_empty() {
            return;
        }
        // Queued works of those leases go; retries waiting on a timer find
        // their lease gone and drop themselves.
        let keep: Vec<Work> = self
            .sched
            .take_queue()
            .into_iter()
            .filter(|w| self.leases.holds(&w.claim.lease))
            .collect();
        for w in keep.into_iter().rev() {
            self.sched.push_front(w);
        }
        let n: usize = back.iter().map(|(_, _, l)| l).sum();
        warn!(
            tasks = n,
            "every slot is paused: handing the tasks claimed here back to the spool, for daemons whose engine works"
        );
        self.fx.push(Effect::HandBack(back));
    }

    /// Slot indexes the breaker holds paused, in order.
    fn paused_slots(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .breakers
            .iter()
            .filter(|(_, b)| b.paused)
            .map(|(i, _)| *i)
            .collect();
        v.sort_unstable();
        v
    }

    /// The one place a task is finished: its record goes to the committer.
    fn commit(&mut self, c: ClaimRef, record: Record) {
        self.uncommitted += 1;
        *self.committing.entry(c.lease.clone()).or_default() += 1;
        self.fx.push(Effect::Commit(Box::new(Commit {
            record,
            lease: c.lease,
            token: c.token,
            line: c.line,
        })));
    }

    /// Every line of a lease has its record: delete it — if it is still
    /// ours: compare-and-delete by token under the claim lock.
    fn delete_lease(&mut self, lease: PathBuf, token: String) {
        self.deleting += 1;
        self.fx.push(Effect::DeleteLease { lease, token });
    }

    /// A commit was fenced: another daemon owns this lease now and runs its
    /// lines. Forget it here — never delete, rewrite or hand it back — drop
    /// its queued lines, and stop the children still running its lines, so
    /// a GPU is not busy twice for one line.
    fn lose_lease(&mut self, lease: &PathBuf, lines: usize) {
        self.held.lock().expect("held set").remove(lease);
        let queued = self.sched.drop_lease(lease);
        let mut stopped = 0;
        for (id, leases) in &self.running {
            if leases.contains(lease) {
                self.fx.push(Effect::Cancel(*id));
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
        let beat = self.world.beat();
        if let Some(e) = beat.lock_lost {
            self.fatal = Some(e);
            return false;
        }
        let lease = self.cfg.spool.lease.0;
        let limit = lease - fence_margin(lease);
        let (age, episodes) = (beat.age, beat.stale_episodes);
        let late = age > limit || episodes != self.stale_seen;
        match self.fenced {
            Fencing::Clear if !late => {
                self.world.cleared(episodes);
                return true;
            }
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
            self.fx.push(Effect::CheckLeases(self.leases.tokens()));
        } else if self.fenced == Fencing::Stale {
            // Look again soon (one timer, however often we get here).
            let at = self.world.now() + beat.every;
            self.wake_at(at);
        }
        false
    }

    /// Tells every running batch (and, from now on, every new one) to stop.
    fn cancel_all(&mut self) {
        self.cancelled_all = true;
        for id in self.running.keys() {
            self.fx.push(Effect::Cancel(*id));
        }
    }

    /// On exit: the leases still held, with their tokens and how many
    /// lines are unfinished, for the shell to hand back.
    pub fn take_leases(&mut self) -> Vec<(PathBuf, String, usize)> {
        let mut leases = std::mem::take(&mut self.leases);
        leases
            .drain()
            .map(|(lease, held)| (lease, held.token, held.lines.len()))
            .collect()
    }

    /// The queued effects, in order.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.fx)
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

#[cfg(test)]
mod tests {
    //! The daemon's decisions, driven event by event, without processes,
    //! files or timers: each test feeds events to a [`Core`] and reads the
    //! effects it asks for.

    use std::collections::HashSet;
    use std::sync::Mutex;

    use super::*;
    use crate::spool::claim::{Claimed, Held, LeaseDoc};
    use crate::spool::records::Pos;
    use crate::vocab::FileId;

    /// A world the test sets: the clock, our heartbeat, which outputs
    /// exist, how much space is free.
    #[derive(Clone)]
    struct Fake(Arc<Mutex<FakeState>>);

    struct FakeState {
        now: Instant,
        beat: Beat,
        outputs: HashSet<PathBuf>,
        free: Option<u64>,
    }

    impl World for Fake {
        fn now(&self) -> Instant {
            self.0.lock().unwrap().now
        }
        fn output_exists(&self, path: &Path) -> bool {
            self.0.lock().unwrap().outputs.contains(path)
        }
        fn free_bytes(&self) -> Option<u64> {
            self.0.lock().unwrap().free
        }
        fn beat(&self) -> Beat {
            self.0.lock().unwrap().beat.clone()
        }
    }

    impl Fake {
        fn set(&self, f: impl FnOnce(&mut FakeState)) {
            f(&mut self.0.lock().unwrap())
        }
    }

    struct Rig {
        core: Core,
        world: Fake,
        _dir: tempfile::TempDir,
    }

    /// A core with one slot (`max_parallel = 1`), a 60 s lease, and its
    /// own claims recovered.
    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("ttspool.toml");
        std::fs::write(
            &conf,
            "[spool]\ndir = \"spool\"\ninstance = \"core\"\nlease = \"60s\"\n\
             [engine]\nargv = [\"true\", \"{output}\", \"--\", \"{input_text}\"]\n\
             [gpu]\nmax_parallel = 1\n",
        )
        .unwrap();
        let cfg = Config::load(&conf).unwrap();
        let world = Fake(Arc::new(Mutex::new(FakeState {
            now: Instant::now(),
            beat: Beat {
                age: Duration::from_millis(10),
                stale_episodes: 0,
                every: Duration::from_secs(7),
                lock_lost: None,
            },
            outputs: HashSet::new(),
            free: Some(1 << 30),
        })));
        let opts = Options {
            once: false,
            set_level: Box::new(|_| Ok(())),
        };
        let engine = Arc::new(Engine::from_config(&cfg));
        let mut core = Core::new(
            cfg,
            opts,
            engine,
            Arc::new(Metrics::default()),
            HeldSet::default(),
            Box::new(world.clone()),
        );
        core.pump();
        assert!(matches!(core.take_effects()[..], [Effect::TakeOver(_)]));
        core.handle(Event::TakenOver(Ok(Vec::new())));
        core.take_effects();
        Rig {
            core,
            world,
            _dir: dir,
        }
    }

    /// A claim of `n` task lines under one lease.
    fn claim(lease: &str, token: &str, n: u64) -> Batch {
        let path = PathBuf::from(lease);
        let lines: Vec<u64> = (1..=n).collect();
        let doc = LeaseDoc {
            instance: "core".into(),
            token: token.into(),
            pid: 1,
            file: "f.jsonl".into(),
            file_escaped: None,
            key: "f.jsonl.K".into(),
            gen: 0,
            start_off: 0,
            start_line: 0,
            end_off: 100,
            end_line: n,
            lines: lines.clone(),
            pos: Pos::default(),
            released: false,
            raw: Vec::new(),
        };
        let claimed = lines
            .iter()
            .map(|&no| Claimed {
                lease: path.clone(),
                token: token.into(),
                file: "f.jsonl".into(),
                file_escaped: None,
                file_id: FileId::new("f.jsonl.K", 0),
                no,
                line: Ok(Line::Text {
                    no,
                    start: 0,
                    end: 0,
                    bytes: format!("{{\"input_text\":\"x\",\"output_name\":\"t{no}\"}}")
                        .into_bytes(),
                }),
            })
            .collect();
        Batch {
            leases: vec![Held { path, doc }],
            lines: claimed,
            ..Batch::default()
        }
    }

    fn step(core: &mut Core, ev: Event) -> Vec<Effect> {
        core.handle(ev);
        core.pump();
        core.take_effects()
    }

    /// The batch a `Start` effect began, and its works.
    fn started(fx: &mut Vec<Effect>) -> Option<(u64, Slot, Vec<Work>)> {
        let i = fx.iter().position(|e| matches!(e, Effect::Start(_)))?;
        match fx.remove(i) {
            Effect::Start(s) => Some((s.batch_id, s.slot, s.works)),
            _ => unreachable!(),
        }
    }

    /// The records the effects commit, with the line each settles.
    fn commits(fx: &[Effect]) -> Vec<(Record, PathBuf, u64)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Commit(c) => Some((c.record.clone(), c.lease.clone(), c.line)),
                _ => None,
            })
            .collect()
    }

    fn finish(
        core: &mut Core,
        (batch_id, slot, works): (u64, Slot, Vec<Work>),
        outcome: Outcome,
    ) -> Vec<Effect> {
        let outcomes = vec![outcome; works.len()];
        step(
            core,
            Event::Finished {
                batch_id,
                slot,
                slot_freed: false,
                works,
                outcomes,
                started_at: now_rfc3339(),
            },
        )
    }

    fn deletes(fx: &[Effect]) -> Vec<(PathBuf, String)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::DeleteLease { lease, token } => Some((lease.clone(), token.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_last_durable_record_of_a_lease_deletes_it_by_token() {
        let mut r = rig();
        let mut fx = step(&mut r.core, Event::Claimed(Ok(claim("L", "T", 2))));
        for _ in 0..2 {
            let run = started(&mut fx).expect("a line starts");
            fx = finish(&mut r.core, run, Outcome::Completed { run_ms: 5 });
            let recs = commits(&fx);
            assert_eq!(recs.len(), 1);
            let (rec, lease, line) = recs.into_iter().next().unwrap();
            fx.extend(step(
                &mut r.core,
                Event::Committed(vec![(rec, lease, line, CommitOutcome::Durable)]),
            ));
        }
        assert_eq!(deletes(&fx), [(PathBuf::from("L"), "T".to_string())]);
        assert_eq!(r.core.unfinished(), 0);
    }

    /// The bug fencing fixed: a record refused because another daemon took
    /// the lease over must not settle its line, and the lease — now the
    /// other daemon's — must never be deleted, rewritten or handed back.
    #[test]
    fn a_fenced_record_loses_the_lease_and_touches_nothing_of_it() {
        let mut r = rig();
        let mut fx = step(&mut r.core, Event::Claimed(Ok(claim("L", "T", 3))));
        let first = started(&mut fx).expect("line 1 starts");
        let mut fx = finish(&mut r.core, first, Outcome::Completed { run_ms: 5 });
        let (rec, lease, line) = commits(&fx).into_iter().next().unwrap();
        // The slot is free again: line 2 runs while line 1's record is
        // being written.
        let second = started(&mut fx).expect("line 2 starts");
        let fx = step(
            &mut r.core,
            Event::Committed(vec![(rec, lease, line, CommitOutcome::Fenced)]),
        );
        assert!(
            deletes(&fx).is_empty(),
            "deleted another daemon's lease: {fx:?}"
        );
        assert!(
            fx.iter()
                .any(|e| matches!(e, Effect::Cancel(id) if *id == second.0)),
            "line 2's child must be stopped: {fx:?}"
        );
        assert!(
            !fx.iter().any(|e| matches!(e, Effect::Start(_))),
            "line 3 must not start: {fx:?}"
        );
        assert_eq!(r.core.unfinished(), 0, "the lease is forgotten");
        // Line 2 ends (stopped): no record, no deletion, no hand-back.
        let fx = finish(&mut r.core, second, Outcome::Cancelled);
        assert!(commits(&fx).is_empty() && deletes(&fx).is_empty(), "{fx:?}");
        assert!(r.core.take_leases().is_empty());
    }

    #[test]
    fn a_late_heartbeat_stops_claims_and_starts_until_the_leases_are_checked() {
        let mut r = rig();
        let mut fx = step(&mut r.core, Event::Claimed(Ok(claim("L", "T", 2))));
        let run = started(&mut fx).expect("line 1 starts");
        // Paused past lease − margin (45 s of 60 s).
        r.world.set(|w| w.beat.age = Duration::from_secs(50));
        let fx = finish(&mut r.core, run, Outcome::Completed { run_ms: 5 });
        assert!(
            !fx.iter()
                .any(|e| matches!(e, Effect::Start(_) | Effect::Claim { .. })),
            "claimed or started while fenced: {fx:?}"
        );
        let fx = step(&mut r.core, Event::Tick);
        assert!(!fx
            .iter()
            .any(|e| matches!(e, Effect::Start(_) | Effect::Claim { .. })));
        // The beat is fresh again: the leases are checked first.
        r.world.set(|w| {
            w.beat.age = Duration::from_millis(10);
            w.beat.stale_episodes = 1;
        });
        let fx = step(&mut r.core, Event::Tick);
        let checked: Vec<_> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::CheckLeases(l) => Some(l.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(checked, [vec![(PathBuf::from("L"), "T".to_string())]]);
        assert!(!fx
            .iter()
            .any(|e| matches!(e, Effect::Start(_) | Effect::Claim { .. })));
        // L was taken over meanwhile: it is let go; claiming resumes.
        let fx = step(&mut r.core, Event::LeasesChecked(vec![PathBuf::from("L")]));
        assert!(
            fx.iter().any(|e| matches!(e, Effect::Claim { .. })),
            "{fx:?}"
        );
        assert!(
            !fx.iter().any(|e| matches!(e, Effect::Start(_))),
            "line 2 is not ours: {fx:?}"
        );
        assert_eq!(r.core.unfinished(), 0);
    }

    #[test]
    fn a_full_disk_pauses_claims_until_the_wait_is_over_or_space_returns() {
        let mut r = rig();
        r.world.set(|w| w.free = Some(0));
        let full = ClaimError::Io {
            action: "write",
            path: PathBuf::from("cursor"),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        let fx = step(&mut r.core, Event::Claimed(Err(full)));
        assert!(
            !fx.iter().any(|e| matches!(e, Effect::Claim { .. })),
            "{fx:?}"
        );
        let fx = step(&mut r.core, Event::Tick);
        assert!(
            !fx.iter().any(|e| matches!(e, Effect::Claim { .. })),
            "{fx:?}"
        );
        // The first wait is a second.
        r.world.set(|w| w.now += Duration::from_millis(1100));
        let fx = step(&mut r.core, Event::Tick);
        assert!(
            fx.iter().any(|e| matches!(e, Effect::Claim { .. })),
            "{fx:?}"
        );
    }

    #[test]
    fn a_line_whose_output_exists_is_skipped_without_a_run() {
        let mut r = rig();
        let out = crate::task::output_path(&r.core.cfg().output.dir, "t1");
        r.world.set(|w| {
            w.outputs.insert(out);
        });
        let fx = step(&mut r.core, Event::Claimed(Ok(claim("L", "T", 1))));
        assert!(!fx.iter().any(|e| matches!(e, Effect::Start(_))), "{fx:?}");
        let recs = commits(&fx);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].0.status(), "skipped");
    }

    fn failed_run() -> Outcome {
        Outcome::Failed {
            kind: ErrorKind::EngineFailed,
            message: "server answered 500".into(),
            stderr_tail: String::new(),
            run_ms: 1,
            retry_after: None,
            give_up: false,
        }
    }

    #[test]
    fn a_slot_failing_for_different_tasks_is_paused_and_nothing_is_claimed() {
        let mut r = rig();
        let mut fx = step(&mut r.core, Event::Claimed(Ok(claim("L", "T", 5))));
        // The same task failing again does not count; three different do.
        let mut resumes = Vec::new();
        for _ in 0..6 {
            let Some(run) = started(&mut fx) else { break };
            fx = finish(&mut r.core, run, failed_run());
            resumes.extend(fx.iter().filter_map(|e| match e {
                Effect::Timer(_, Event::SlotResume(i)) => Some(*i),
                _ => None,
            }));
            if !resumes.is_empty() {
                break;
            }
        }
        assert_eq!(resumes, [0], "the slot is paused once");
        assert!(commits(&fx).is_empty(), "no task failed for good: {fx:?}");
        // Its only slot paused, the daemon hands the lines it claimed back
        // to the spool for daemons whose engine works.
        let back: Vec<(PathBuf, String, usize)> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::HandBack(l) => Some(l.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(back, [(PathBuf::from("L"), "T".to_string(), 5)], "{fx:?}");
        let fx = step(&mut r.core, Event::Tick);
        assert!(
            !fx.iter()
                .any(|e| matches!(e, Effect::Start(_) | Effect::Claim { .. })),
            "every slot is paused: nothing starts, nothing is claimed: {fx:?}"
        );
        // The pause is over: lines are claimed, and one is the trial.
        let fx = step(&mut r.core, Event::SlotResume(0));
        assert!(
            fx.iter().any(|e| matches!(e, Effect::Claim { .. })),
            "{fx:?}"
        );
        let mut fx = step(&mut r.core, Event::Claimed(Ok(claim("L2", "T2", 3))));
        let trial = started(&mut fx).expect("a trial run");
        // It works: the slot is trusted again, the others follow.
        let fx = finish(&mut r.core, trial, Outcome::Completed { run_ms: 1 });
        assert!(fx.iter().any(|e| matches!(e, Effect::Start(_))), "{fx:?}");
    }

    #[test]
    fn a_task_the_engine_gives_up_on_is_recorded_at_once_and_counts_for_the_breaker() {
        let mut r = rig();
        let mut fx = step(&mut r.core, Event::Claimed(Ok(claim("L", "T", 5))));
        let given_up = || Outcome::Failed {
            kind: ErrorKind::EngineFailed,
            message: "the task took down 2 workers".into(),
            stderr_tail: String::new(),
            run_ms: 1,
            retry_after: None,
            give_up: true,
        };
        let mut recorded = 0;
        let mut paused = false;
        for _ in 0..3 {
            let run = started(&mut fx).expect("a run");
            fx = finish(&mut r.core, run, given_up());
            let recs = commits(&fx);
            assert_eq!(recs.len(), 1, "recorded at its first attempt: {fx:?}");
            assert_eq!(recs[0].0.status(), "failed");
            recorded += 1;
            paused |= fx
                .iter()
                .any(|e| matches!(e, Effect::Timer(_, Event::SlotResume(_))));
        }
        assert_eq!(recorded, 3);
        assert!(paused, "three different tasks took down the slot's engine");
    }

    #[test]
    fn one_line_that_always_fails_pauses_nothing() {
        let mut r = rig();
        let mut fx = step(&mut r.core, Event::Claimed(Ok(claim("L", "T", 1))));
        for _ in 0..3 {
            let run = started(&mut fx).expect("a run");
            fx = finish(&mut r.core, run, failed_run());
            assert!(
                !fx.iter()
                    .any(|e| matches!(e, Effect::Timer(_, Event::SlotResume(_)))),
                "{fx:?}"
            );
            // Its retry comes back after the backoff.
            if let Some(i) = fx
                .iter()
                .position(|e| matches!(e, Effect::Timer(_, Event::RetryDue(_))))
            {
                let Effect::Timer(_, ev) = fx.remove(i) else {
                    unreachable!()
                };
                fx.extend(step(&mut r.core, ev));
            }
        }
        let recs = commits(&fx);
        assert_eq!(recs.len(), 1, "{fx:?}");
        assert_eq!(recs[0].0.status(), "failed");
    }
}
