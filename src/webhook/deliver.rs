//! Delivery: concurrent (at most `webhook.max_in_flight`, at most
//! [`PER_HOST`] per destination host), signed afresh on every attempt with
//! the same `webhook-id`, retried on `webhook.schedule` with ±20 % jitter,
//! `Retry-After` honoured on 429/503 (clamped to the step and twice it), no
//! redirects followed, no proxy, response bodies read to 16 KiB at most.
//!
//! The queue keeps only where each message is (segment, offset), so an
//! outbox of 100,000 undelivered messages costs a few MiB; bodies are read
//! back when sent. Final outcomes are appended to `webhooks.jsonl` (fsynced,
//! grouped) before the message is acked in its segment.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::guard::{check_url, GuardedResolver};
use super::outbox::{self, Entry, Outbox};
use super::{sign, Message, Settings};
use crate::redact::url as redact_url;
use crate::spool::Spool;

/// Deliveries at once to one host.
pub const PER_HOST: usize = 4;
/// Response bytes read at most.
const MAX_RESPONSE: usize = 16 * 1024;

/// How one attempt went.
#[derive(Debug)]
pub enum Attempt {
    Delivered(u16),
    Gone(u16),
    Blocked(String),
    Failed {
        http_status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    },
}

pub fn client(settings: &Settings) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout)
        .dns_resolver(Arc::new(GuardedResolver(settings.guard.clone())))
        .user_agent(concat!("ttspool/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("HTTP client builds")
}

/// One signed POST.
pub async fn attempt(client: &reqwest::Client, s: &Settings, m: &Message) -> Attempt {
    let url = match reqwest::Url::parse(&m.url) {
        Ok(u) => u,
        Err(e) => return Attempt::Blocked(format!("invalid URL: {e}")),
    };
    if let Err(e) = check_url(&s.guard, &url) {
        return Attempt::Blocked(e);
    }
    if let Some(url::Host::Domain(host)) = url.host() {
        // Refused addresses are final; a failed lookup is retried.
        let port = url.port_or_known_default().unwrap_or(80);
        if let Err(e) = s.guard.resolve(host, port).await {
            if e.starts_with("cannot resolve") {
                return Attempt::Failed {
                    http_status: None,
                    error: e,
                    retry_after: None,
                };
            }
            return Attempt::Blocked(e);
        }
    }
    if s.keys.is_empty() {
        return Attempt::Blocked(
            "no webhook secret configured (webhook.secret_file, $TTSPOOL_WEBHOOK_SECRET or webhook.secret)".into(),
        );
    }
    let ts = time::OffsetDateTime::now_utc().unix_timestamp();
    let sig = sign::signature(&s.keys, m.msg_id.as_str(), ts, m.body.as_bytes());
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", m.msg_id.as_str())
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig);
    for (k, v) in &s.headers {
        req = req.header(k, v);
    }
    let resp = match req.body(m.body.clone()).send().await {
        Ok(r) => r,
        Err(e) => {
            let error = if e.is_timeout() {
                format!(
                    "no answer within webhook.timeout ({})",
                    humantime::format_duration(s.timeout)
                )
            } else if e.is_connect() {
                format!("cannot connect: {}", root_cause(&e))
            } else {
                root_cause(&e)
            };
            return Attempt::Failed {
                http_status: None,
                error,
                retry_after: None,
            };
        }
    };
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(redact_url);
    let text = read_capped(resp).await;
    match status {
        200..=299 => Attempt::Delivered(status),
        410 => Attempt::Gone(status),
        300..=399 => Attempt::Failed {
            http_status: Some(status),
            error: format!(
                "HTTP {status}: redirects are not followed (to {})",
                location.unwrap_or_else(|| "?".into())
            ),
            retry_after: None,
        },
        _ => Attempt::Failed {
            http_status: Some(status),
            error: format!("HTTP {status}: {}", crate::util::cut(text.trim(), 200)),
            retry_after: if matches!(status, 429 | 503) {
                retry_after
            } else {
                None
            },
        },
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg = s.to_string();
        src = s.source();
    }
    msg
}

async fn read_capped(resp: reqwest::Response) -> String {
    crate::util::read_capped(resp, MAX_RESPONSE).await
}

/// `Retry-After`: seconds, or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(s) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let fmt = time::format_description::well_known::Rfc2822;
    let t = time::OffsetDateTime::parse(v.trim(), &fmt).ok()?;
    let d = t - time::OffsetDateTime::now_utc();
    Some(Duration::from_secs_f64(d.as_seconds_f64().max(0.0)))
}

/// The wait before attempt `attempts + 1`: the schedule's step with ±20 %
/// jitter, or the server's `Retry-After` clamped to [step, 2 × step].
pub fn next_wait(
    schedule: &[Duration],
    attempts: u32,
    retry_after: Option<Duration>,
) -> Option<Duration> {
    let step = *schedule.get(attempts.checked_sub(1)? as usize)?;
    Some(match retry_after {
        Some(ra) => ra.clamp(step, step * 2),
        None => {
            let r = (ulid::Ulid::new().random() % 4001) as f64 / 10000.0; // 0..0.4
            step.mul_f64(0.8 + r)
        }
    })
}

/// A message waiting for its next attempt.
struct Queued {
    at: Instant,
    seq: u64,
    entry: Entry,
    attempts: u32,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// Commands to the delivery loop.
pub enum Cmd {
    /// A new deliverable segment.
    Segment(PathBuf),
    /// Load every segment of our folder not loaded yet (after an adoption).
    Rescan,
    /// New settings after a config reload (secrets, headers, schedule, ...).
    Settings(Arc<Settings>),
}

/// The daemon's handle on the delivery loop.
pub struct Handle {
    pub tx: mpsc::UnboundedSender<Cmd>,
    /// True while a delivery runs or one is due within the horizon (so
    /// `run --once` can wait for webhooks that are about to go out).
    pub busy: tokio::sync::watch::Receiver<bool>,
}

/// A final outcome on its way to `webhooks.jsonl`.
struct Outcome {
    line: String,
    dead: Option<Message>,
    seg: Arc<PathBuf>,
    idx: u32,
    seg_done: bool,
}

/// Starts the delivery loop on the current runtime; it loads every segment
/// of our outbox folder at once. `horizon`: how far ahead a due retry still
/// counts as busy.
pub fn spawn(
    settings: Arc<Settings>,
    spool: Spool,
    outbox: Arc<Outbox>,
    instance: String,
    horizon: Duration,
    metrics: Arc<crate::metrics::Metrics>,
) -> Handle {
    let (tx, rx) = mpsc::unbounded_channel();
    let (otx, orx) = std::sync::mpsc::channel::<Outcome>();
    let (btx, brx) = tokio::sync::watch::channel(false);
    let sp = spool.clone();
    let rotate = settings.rotate_size;
    std::thread::Builder::new()
        .name("ttspool-webhooks".into())
        .spawn(move || outcome_writer(sp, orx, rotate))
        .expect("thread");
    let _ = tx.send(Cmd::Rescan);
    tokio::spawn(run(
        rx,
        Ctx {
            settings,
            outcomes: otx,
            instance,
            outbox,
            busy: btx,
            horizon,
            metrics,
        },
    ));
    Handle { tx, busy: brx }
}

/// What the delivery loop works with.
struct Ctx {
    settings: Arc<Settings>,
    outcomes: std::sync::mpsc::Sender<Outcome>,
    instance: String,
    outbox: Arc<Outbox>,
    busy: tokio::sync::watch::Sender<bool>,
    horizon: Duration,
    metrics: Arc<crate::metrics::Metrics>,
}

async fn run(mut rx: mpsc::UnboundedReceiver<Cmd>, ctx: Ctx) {
    let Ctx {
        settings: mut s,
        outcomes,
        instance,
        outbox,
        busy,
        horizon,
        metrics,
    } = ctx;
    let mut client = client(&s);
    let mut heap: BinaryHeap<Reverse<Queued>> = BinaryHeap::new();
    let mut parked: HashMap<String, VecDeque<Queued>> = HashMap::new();
    let mut per_host: HashMap<String, usize> = HashMap::new();
    let mut remaining: HashMap<Arc<PathBuf>, usize> = HashMap::new();
    let mut in_flight = 0usize;
    let mut seq = 0u64;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Queued, Message, String, Attempt)>();
    loop {
        // Start what is due, within the limits.
        let now = Instant::now();
        while in_flight < s.max_in_flight {
            let Some(Reverse(q)) = heap.peek() else { break };
            if q.at > now {
                break;
            }
            let Reverse(q) = heap.pop().expect("peeked");
            let msg = match outbox::read(&q.entry) {
                Ok(m) => m,
                Err(e) => {
                    warn!(segment = %q.entry.seg.display(), "unreadable outbox message dropped: {e}");
                    let seg_done = settle(&mut remaining, &q.entry.seg);
                    let _ = outcomes.send(Outcome {
                        line: String::new(),
                        dead: None,
                        seg: q.entry.seg.clone(),
                        idx: q.entry.idx,
                        seg_done,
                    });
                    continue;
                }
            };
            let host = reqwest::Url::parse(&msg.url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_string))
                .unwrap_or_default();
            let busy = per_host.entry(host.clone()).or_default();
            if *busy >= PER_HOST {
                parked.entry(host).or_default().push_back(q);
                continue;
            }
            *busy += 1;
            in_flight += 1;
            let (c, s2, tx) = (client.clone(), s.clone(), done_tx.clone());
            tokio::spawn(async move {
                let a = attempt(&c, &s2, &msg).await;
                let _ = tx.send((q, msg, host, a));
            });
        }
        let next_at = heap.peek().map(|Reverse(q)| q.at);
        let now_busy = in_flight > 0
            || parked.values().any(|v| !v.is_empty())
            || next_at.is_some_and(|t| t <= Instant::now() + horizon);
        busy.send_if_modified(|b| std::mem::replace(b, now_busy) != now_busy);
        let waiting = heap.len() + in_flight + parked.values().map(VecDeque::len).sum::<usize>();
        metrics
            .outbox
            .store(waiting as u64, std::sync::atomic::Ordering::Relaxed);
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(Cmd::Rescan) => {
                    for p in outbox.segments().unwrap_or_default() {
                        if remaining.contains_key(&p) {
                            continue;
                        }
                        load(&p, &mut remaining, &mut heap, &mut seq);
                    }
                }
                Some(Cmd::Segment(p)) => load(&p, &mut remaining, &mut heap, &mut seq),
                Some(Cmd::Settings(new)) => {
                    client = self::client(&new);
                    s = new;
                }
                None => return,
            },
            Some((mut q, msg, host, a)) = done_rx.recv() => {
                in_flight -= 1;
                if let Some(n) = per_host.get_mut(&host) {
                    *n -= 1;
                }
                if let Some(p) = parked.get_mut(&host).and_then(|v| v.pop_front()) {
                    heap.push(Reverse(p));
                }
                q.attempts += 1;
                let fin = |status: &str, http: Option<u16>, error: Option<String>| {
                    metrics.webhook(status);
                    json!({
                        "v": 1,
                        "msg_id": msg.msg_id,
                        "event": msg.event,
                        "id": msg.id,
                        "url": redact_url(&msg.url),
                        "status": status,
                        "attempts": q.attempts,
                        "http_status": http,
                        "error": error,
                        "finished_at": crate::util::now_rfc3339(),
                        "instance": instance,
                    })
                    .to_string()
                };
                let (line, dead) = match a {
                    Attempt::Delivered(code) => {
                        info!(msg_id = %msg.msg_id, id = %msg.id, event = %msg.event, attempts = q.attempts, "webhook delivered");
                        (fin("delivered", Some(code), None), None)
                    }
                    Attempt::Gone(code) => {
                        warn!(msg_id = %msg.msg_id, id = %msg.id, "webhook receiver answered 410 Gone: not retried");
                        (fin("gone", Some(code), Some("HTTP 410 Gone".into())), Some(msg.clone()))
                    }
                    Attempt::Blocked(why) => {
                        warn!(msg_id = %msg.msg_id, id = %msg.id, "webhook blocked: {why}");
                        (fin("blocked", None, Some(why)), Some(msg.clone()))
                    }
                    Attempt::Failed { http_status, error, retry_after } => {
                        match next_wait(&s.schedule, q.attempts, retry_after) {
                            Some(wait) => {
                                warn!(msg_id = %msg.msg_id, id = %msg.id, attempt = q.attempts, wait = %humantime::format_duration(wait), "webhook failed: {error}; retrying");
                                q.at = Instant::now() + wait;
                                heap.push(Reverse(q));
                                continue;
                            }
                            None => {
                                warn!(msg_id = %msg.msg_id, id = %msg.id, attempts = q.attempts, "webhook dead after its last attempt: {error}");
                                (fin("dead", http_status, Some(error)), Some(msg.clone()))
                            }
                        }
                    }
                };
                let seg_done = settle(&mut remaining, &q.entry.seg);
                let _ = outcomes.send(Outcome { line, dead, seg: q.entry.seg.clone(), idx: q.entry.idx, seg_done });
            }
            _ = sleep_until(next_at) => {}
        }
    }
}

fn load(
    p: &Path,
    remaining: &mut HashMap<Arc<PathBuf>, usize>,
    heap: &mut BinaryHeap<Reverse<Queued>>,
    seq: &mut u64,
) {
    match outbox::entries(p) {
        Ok(es) if es.is_empty() => Outbox::remove(p),
        Ok(es) => {
            remaining.insert(es[0].seg.clone(), es.len());
            for entry in es {
                *seq += 1;
                heap.push(Reverse(Queued {
                    at: Instant::now(),
                    seq: *seq,
                    entry,
                    attempts: 0,
                }));
            }
        }
        Err(e) => warn!(segment = %p.display(), "cannot read outbox segment: {e}"),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

fn settle(remaining: &mut HashMap<Arc<PathBuf>, usize>, seg: &Arc<PathBuf>) -> bool {
    match remaining.get_mut(seg) {
        Some(n) => {
            *n -= 1;
            if *n == 0 {
                remaining.remove(seg);
                true
            } else {
                false
            }
        }
        None => false,
    }
}

/// Appends outcomes to `webhooks.jsonl` (grouped, fsynced, under the
/// webhooks lock), keeps dead messages for `webhook replay`, then acks.
fn outcome_writer(spool: Spool, rx: std::sync::mpsc::Receiver<Outcome>, rotate: Option<u64>) {
    let log = webhooks_log(&spool);
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(o) = rx.try_recv() {
            batch.push(o);
            if batch.len() >= 4096 {
                break;
            }
        }
        let lines: Vec<String> = batch
            .iter()
            .filter(|o| !o.line.is_empty())
            .map(|o| format!("{}\n", o.line))
            .collect();
        for o in &batch {
            if let Some(m) = &o.dead {
                if let Err(e) = keep_dead(&spool, m) {
                    warn!("cannot keep dead webhook {} for replay: {e}", m.msg_id);
                }
            }
        }
        if let Err(e) = append_outcomes(&spool, &log, &lines, rotate) {
            warn!("cannot write {}: {e}", log.display());
        }
        let mut per_seg: HashMap<Arc<PathBuf>, Vec<u32>> = HashMap::new();
        for o in &batch {
            per_seg.entry(o.seg.clone()).or_default().push(o.idx);
        }
        for (seg, idxs) in per_seg {
            if let Err(e) = outbox::ack(&seg, &idxs) {
                warn!(segment = %seg.display(), "cannot ack webhooks: {e}");
            }
        }
        for o in batch.iter().filter(|o| o.seg_done) {
            Outbox::remove(&o.seg);
        }
    }
}

pub fn webhooks_log(spool: &Spool) -> PathBuf {
    spool.root.join("webhooks.jsonl")
}

fn dead_dir(spool: &Spool) -> PathBuf {
    spool.state().join("webhooks").join("dead")
}

fn keep_dead(spool: &Spool, m: &Message) -> std::io::Result<()> {
    let d = dead_dir(spool);
    crate::util::create_private_dir(&d)?;
    crate::util::atomic_write_private(
        &d.join(format!("{}.json", m.msg_id)),
        &serde_json::to_vec(m).expect("message"),
    )
}

fn append_outcomes(
    spool: &Spool,
    log: &Path,
    lines: &[String],
    rotate: Option<u64>,
) -> std::io::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let _lock = crate::util::lock_sidecar(&spool.state().join("webhooks.lock"), || None)?;
    if let Some(max) = rotate {
        if std::fs::metadata(log).is_ok_and(|m| m.len() > max) {
            let to = spool.root.join(format!(
                "webhooks.{}.{}.jsonl",
                crate::util::today_utc(),
                ulid::Ulid::new()
            ));
            std::fs::rename(log, to)?;
        }
    }
    crate::spool::records::RecordLog::append_locked(log, lines)
}

/// `webhooks.jsonl` and its rotated files, oldest first.
pub fn webhooks_logs(spool: &Spool) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(&spool.root)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let n = p.file_name().unwrap_or_default().to_string_lossy();
                    n.starts_with("webhooks.") && n.ends_with(".jsonl") && n != "webhooks.jsonl"
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.push(webhooks_log(spool));
    out
}

/// `ttspool webhook replay`: sends dead (or given) messages again, once
/// each, with their original `webhook-id`. Returns (delivered, not).
/// `ttspool webhook replay`: sends again what is in the outbox (or, with
/// `dead`, what was given up on); exit 1 if any message was not delivered.
pub fn replay_command(
    hooks: &Settings,
    spool_dir: &std::path::Path,
    dead: bool,
    ids: &[String],
) -> anyhow::Result<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let spool = Spool::new(spool_dir);
    let (ok, bad) = rt.block_on(replay(hooks, &spool, dead, ids))?;
    println!(
        "replayed {} message(s): {ok} delivered, {bad} not",
        ok + bad
    );
    Ok(if bad == 0 { 0 } else { 1 })
}

pub async fn replay(
    s: &Settings,
    spool: &Spool,
    dead: bool,
    ids: &[String],
) -> anyhow::Result<(usize, usize)> {
    let dir = dead_dir(spool);
    let mut msgs = Vec::new();
    if dead {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if let Ok(m) = serde_json::from_slice::<Message>(&std::fs::read(e.path())?) {
                    msgs.push(m);
                }
            }
        }
    }
    for id in ids {
        let p = dir.join(format!("{id}.json"));
        let m: Message = serde_json::from_slice(&std::fs::read(&p).map_err(|_| {
            anyhow::anyhow!(
                "no stored message {id}: only dead, gone or blocked messages can be replayed"
            )
        })?)?;
        msgs.push(m);
    }
    let client = client(s);
    let (mut ok, mut bad) = (0, 0);
    let log = webhooks_log(spool);
    for m in msgs {
        let a = attempt(&client, s, &m).await;
        let (status, http, error) = match &a {
            Attempt::Delivered(c) => ("delivered", Some(*c), None),
            Attempt::Gone(c) => ("gone", Some(*c), Some("HTTP 410 Gone".to_string())),
            Attempt::Blocked(w) => ("blocked", None, Some(w.clone())),
            Attempt::Failed {
                http_status, error, ..
            } => ("dead", *http_status, Some(error.clone())),
        };
        println!(
            "{} {} {} {}",
            m.msg_id,
            m.event,
            status,
            error.clone().unwrap_or_default()
        );
        let line = json!({
            "v": 1, "msg_id": m.msg_id, "event": m.event, "id": m.id, "url": redact_url(&m.url),
            "status": status, "attempts": 1, "http_status": http, "error": error,
            "finished_at": crate::util::now_rfc3339(), "replay": true,
        })
        .to_string();
        append_outcomes(spool, &log, &[format!("{line}\n")], s.rotate_size)?;
        if status == "delivered" {
            ok += 1;
            let _ = std::fs::remove_file(dir.join(format!("{}.json", m.msg_id)));
        } else {
            bad += 1;
        }
    }
    Ok((ok, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_follow_the_schedule_and_clamp_retry_after() {
        let sch = [Duration::from_secs(5), Duration::from_secs(300)];
        for _ in 0..50 {
            let w = next_wait(&sch, 1, None).unwrap();
            assert!(
                w >= Duration::from_secs(4) && w <= Duration::from_secs(6),
                "{w:?}"
            );
        }
        assert_eq!(
            next_wait(&sch, 1, Some(Duration::from_secs(1))),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            next_wait(&sch, 1, Some(Duration::from_secs(7))),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            next_wait(&sch, 1, Some(Duration::from_secs(60))),
            Some(Duration::from_secs(10))
        );
        assert_eq!(next_wait(&sch, 3, None), None, "past the schedule: dead");
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
    }
}
