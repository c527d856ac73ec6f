//! The daemon: one event loop that connects the spool, the scheduler, the
//! engine, the record logs and the webhooks.
//!
//! - core.rs decides: a state machine, `handle(Event)` then `pump()`,
//!   whose output is a list of effects; no I/O, so every decision is
//!   tested without processes.
//! - shell.rs does: it carries out the effects (claims and takeovers on
//!   the blocking pool, batches as tasks, timers, systemd notifications)
//!   and turns their results into events.
//! - committer.rs writes records, grouped, on a thread of its own.
//!
//! This file starts them and runs the loop.

mod committer;
pub mod core;
mod shell;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, warn};

use self::committer::Webhooks;
use self::core::{Core, Event};
use self::shell::{RealWorld, Shell};
use crate::config::Config;
use crate::engine::{self, Engine};
use crate::metrics::Metrics;
use crate::spool::claim::{self, Claimer};
use crate::spool::records::RecordLog;
use crate::spool::{watch as spool_watch, Spool};
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
    match crate::util::raise_open_files_limit() {
        Ok(n) if n < 4096 => warn!(
            open_files = n,
            "the open-files limit is low (its hard limit); the daemon keeps going when descriptors run out, but raise LimitNOFILE / ulimit -Hn for a busy API"
        ),
        Ok(n) => info!(open_files = n, "open-files limit"),
        Err(e) => warn!("cannot raise the open-files limit: {e}"),
    }
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
    // Workers start loading now (no orphan of ours is left to race them),
    // while the rest starts up and the first claims are made.
    let engine = Arc::new(Engine::from_config(&cfg));
    engine.warm_up();
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
    let api = match cfg.api.listen.as_str() {
        "" => None,
        listen => {
            let addr: std::net::SocketAddr = listen.parse()?;
            let state = crate::api::tasks::ApiState::new(&cfg)
                .map_err(|e| anyhow::anyhow!("{}: {e}", cfg.path.display()))?;
            let routes = crate::api::tasks::routes(
                state.clone(),
                metrics.clone(),
                cfg.api.max_body.0 as usize,
            );
            let bound = crate::api::serve(addr, routes)
                .await
                .map_err(|e| anyhow::anyhow!("api.listen {addr}: {}", crate::util::io_msg(&e)))?;
            metrics
                .served
                .store(true, std::sync::atomic::Ordering::Relaxed);
            info!(addr = %bound, "serving the task API on /v1/tasks (and /metrics)");
            Some(state)
        }
    };
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
    };
    let ctx = tx.clone();
    let w3 = webhooks.clone();
    std::thread::Builder::new()
        .name("ttspool-records".into())
        .spawn({
            let once = opts.once;
            move || committer::committer(log, commit_rx, ctx, w3, once)
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
    // Checked by the spawner thread right before each engine child starts.
    let trusted = heartbeat.clone();
    let limit = lease - fence_margin(lease);
    crate::process::set_spawn_gate(Box::new(move || trusted.trusted(limit)));
    let held = claimer.held();
    let world = Box::new(RealWorld {
        heartbeat,
        spool_dir: cfg.spool.dir.clone(),
    });
    let mut shell = Shell {
        tx,
        commit_tx,
        claimer: Arc::new(Mutex::new(claimer)),
        spool: spool.clone(),
        webhooks,
        metrics: metrics.clone(),
        cancels: HashMap::new(),
        api,
        instance: cfg.spool.instance.clone(),
    };
    // No slot is paused yet (a file a previous run left says otherwise).
    shell.execute(self::core::Effect::SlotHealth(Vec::new()));
    let mut d = Core::new(cfg, opts, engine, metrics, held, world);
    let mut poll = tokio::time::interval(d.cfg().spool.poll_interval.0);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let beat_every = takeover_interval(d.cfg().spool.lease.0);
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
        for fx in d.take_effects() {
            shell.execute(fx);
        }
        if let Some(f) = d.take_fatal() {
            if d.once() {
                let left = d.unfinished();
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
            Ok(()) = wh_busy.changed() => Event::WebhooksBusy(*wh_busy.borrow()),
            Some(sig) = signals.recv() => Event::Signal(sig),
            _ = poll.tick() => Event::Tick,
            _ = beat.tick() => Event::Beat,
            _ = dog.tick(), if watchdog.is_some() => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                continue;
            }
        };
        if let Event::Finished { batch_id, .. } = &ev {
            shell.finished(*batch_id);
        }
        d.handle(ev);
        for fx in d.take_effects() {
            shell.execute(fx);
        }
    }
    let unfinished = d.unfinished();
    shell.hand_back(d.take_leases());
    // A stopped daemon's breaker holds nothing paused.
    let slots = spool
        .instances()
        .join(format!("{}.slots", d.cfg().spool.instance));
    let _ = std::fs::remove_file(slots);
    // The staged shutdown's last stage: workers go after their last task.
    d.engine().stop().await;
    drop(hints);
    info!(instance = %d.cfg().spool.instance, "ttspool stopped");
    if d.once() && !d.stopping() {
        // `--once` promises to drain: say so when it did not.
        let unclaimed = claim::summary(&spool, d.cfg().limits.max_line_bytes)
            .map(|s| s.pending_lines)
            .unwrap_or(0);
        if unfinished + unclaimed > 0 {
            let why = d
                .last_error()
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
