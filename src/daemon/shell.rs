//! The daemon's I/O: carries out the core's effects (core.rs) and turns
//! their results into events. Disk work that fsyncs (claims, takeovers,
//! lease deletions) runs on the blocking pool; records go to the committer
//! thread; batches run as tasks on the event loop, their children spawned
//! by process/.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::committer::Webhooks;
use super::core::{Beat, Commit, Effect, Event, Housekeeping, Notify, Start, World};
use crate::api::tasks::ApiState;
use crate::config::Config;
use crate::engine::{Job, Outcome, SlotRelease};
use crate::metrics::Metrics;
use crate::spool::claim::{self, Claimer, FileDone, LeaseOwner};
use crate::spool::heartbeat::Heartbeat;
use crate::spool::records::RecordLog;
use crate::spool::Spool;
use crate::webhook::deliver;
use crate::webhook::Settings;

/// The world as the core sees it, for real.
pub struct RealWorld {
    pub heartbeat: Heartbeat,
    pub spool_dir: PathBuf,
}

impl World for RealWorld {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn output_exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn free_bytes(&self) -> Option<u64> {
        crate::util::free_bytes(&self.spool_dir)
    }
    fn beat(&self) -> Beat {
        Beat {
            age: self.heartbeat.age(),
            stale_episodes: self.heartbeat.stale_episodes(),
            every: self.heartbeat.every(),
            lock_lost: self.heartbeat.lock_lost(),
        }
    }
    fn cleared(&self, episodes: u64) {
        self.heartbeat.cleared(episodes);
    }
}

pub struct Shell {
    pub tx: mpsc::UnboundedSender<Event>,
    pub commit_tx: std::sync::mpsc::Sender<Commit>,
    pub claimer: Arc<Mutex<Claimer>>,
    pub spool: Spool,
    pub webhooks: Webhooks,
    pub metrics: Arc<Metrics>,
    /// Running batches' stop switches.
    pub cancels: HashMap<u64, watch::Sender<bool>>,
    /// The HTTP API, when `api.listen` is set.
    pub api: Option<Arc<ApiState>>,
    pub instance: String,
}

impl Shell {
    /// Carries out one effect.
    pub fn execute(&mut self, fx: Effect) {
        match fx {
            Effect::Claim { want } => {
                let c = self.claimer.clone();
                self.blocking(
                    move || c.lock().expect("claimer").claim(want),
                    Event::Claimed,
                );
            }
            Effect::TakeOver(h) => self.take_over(h),
            Effect::Start(s) => self.start(s),
            Effect::Cancel(id) => {
                if let Some(c) = self.cancels.get(&id) {
                    let _ = c.send(true);
                }
            }
            Effect::Commit(c) => {
                if self.commit_tx.send(*c).is_err() {
                    let _ = self
                        .tx
                        .send(Event::CommitFailed("the record writer stopped".into()));
                }
            }
            Effect::DeleteLease { lease, token } => {
                let spool = self.spool.clone();
                self.blocking(
                    move || {
                        let res = LeaseOwner::new(&spool).delete(&lease, &token);
                        (lease, res)
                    },
                    |(lease, res)| Event::LeaseDeleted(lease, res),
                );
            }
            Effect::HandBack(leases) => {
                let claimer = self.claimer.clone();
                self.blocking(
                    move || give_back(&claimer.lock().expect("claimer"), leases),
                    |_| Event::Hint,
                );
            }
            Effect::CheckLeases(leases) => self.blocking(
                move || {
                    leases
                        .into_iter()
                        // Unreadable now is not "taken over": asked again
                        // at the next check.
                        .filter(|(lease, token)| {
                            matches!(claim::still_ours(lease, token), Ok(false))
                        })
                        .map(|(lease, _)| lease)
                        .collect::<Vec<_>>()
                },
                Event::LeasesChecked,
            ),
            Effect::Announce(files) => self.announce(files),
            Effect::Reload(path) => self.blocking(
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
            ),
            Effect::Settings(settings) => {
                *self.webhooks.settings.write().expect("settings") = settings.clone();
                let _ = self.webhooks.tx.send(deliver::Cmd::Settings(settings));
            }
            Effect::Timer(at, ev) => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(at.into()).await;
                    let _ = tx.send(ev);
                });
            }
            Effect::Probe(slot, engine) => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let res = engine.probe(&slot).await;
                    let _ = tx.send(Event::Probed(slot.index, res));
                });
            }
            Effect::SlotHealth(paused) => {
                // `.ttspool/instances/<instance>.slots`: what `status` shows.
                let path = self
                    .spool
                    .instances()
                    .join(format!("{}.slots", self.instance));
                let body = serde_json::json!({ "paused": paused }).to_string();
                if let Err(e) = crate::util::atomic_write(&path, body.as_bytes()) {
                    warn!(
                        "cannot write {}: {}",
                        path.display(),
                        crate::util::io_msg(&e)
                    );
                }
            }
            Effect::WarmUp(engine) => engine.warm_up(),
            Effect::Reconfigured(cfg) => {
                if let Some(api) = &self.api {
                    api.reload(&cfg);
                }
            }
            Effect::Notify(n) => {
                if n == Notify::Ready {
                    if let Some(api) = &self.api {
                        api.ready.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                let state = match n {
                    Notify::Ready => sd_notify::NotifyState::Ready,
                    Notify::Stopping => sd_notify::NotifyState::Stopping,
                    Notify::Reloading => sd_notify::NotifyState::Reloading,
                };
                let _ = sd_notify::notify(&[state]);
            }
        }
    }

    /// A batch ended: its stop switch goes.
    pub fn finished(&mut self, batch_id: u64) {
        self.cancels.remove(&batch_id);
    }

    fn start(&mut self, s: Start) {
        let Start {
            batch_id,
            slot,
            works,
            started_at,
            engine,
            cancelled,
        } = s;
        let (cancel_tx, cancel) = watch::channel(cancelled);
        self.cancels.insert(batch_id, cancel_tx);
        let tx = self.tx.clone();
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

    fn take_over(&self, h: Housekeeping) {
        let c = self.claimer.clone();
        let w = self.webhooks.clone();
        let metrics = self.metrics.clone();
        let spool = self.spool.clone();
        let work = move || {
            refresh_gauges(&spool, &metrics, &h);
            let mut claimer = c.lock().expect("claimer");
            // While every slot is paused we could run nothing we took: the
            // leases stay for daemons whose engine works.
            let res = if h.adopt {
                claimer.take_over()
            } else {
                claimer.heartbeat().map(|()| Vec::new())
            };
            // Webhooks of a dead daemon: adopt its outbox folder.
            let others = w.outbox.others().unwrap_or_default();
            let log = RecordLog::new(&spool);
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

    /// Hands on the totals of consumed files (`file.completed`, through
    /// the outbox), then tells the spool they went out (consume.rs). On
    /// failure the spool hands them out again later.
    fn announce(&self, files: Vec<FileDone>) {
        let w = self.webhooks.clone();
        let spool = self.spool.clone();
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

    /// On exit: leases with unfinished lines go back for anyone to take.
    pub fn hand_back(&self, leases: Vec<(PathBuf, String, usize)>) {
        if leases.is_empty() {
            return;
        }
        let n = give_back(&self.claimer.lock().expect("claimer"), leases);
        info!(tasks = n, "handed back unfinished tasks");
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
}

/// Hands leases back to the spool (each only if it still has our token);
/// returns how many lines they held.
fn give_back(c: &Claimer, leases: Vec<(PathBuf, String, usize)>) -> usize {
    let mut n = 0;
    for (lease, token, lines) in leases {
        n += lines;
        if let Err(e) = c.hand_back(&lease, &token) {
            error!("{e}");
        }
    }
    n
}

/// Heartbeat housekeeping: pending-line gauges, the metrics textfile, and
/// deleting consumed inputs older than `retention.consumed`.
fn refresh_gauges(spool: &Spool, metrics: &Metrics, h: &Housekeeping) {
    let (max_line, textfile, retention) = (h.max_line_bytes, h.textfile.as_deref(), h.retention);
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
