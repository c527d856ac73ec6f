//! Prometheus metrics: counters the daemon updates as records become
//! durable, gauges refreshed on the heartbeat, served as text on
//! `metrics.listen` and written to `metrics.textfile` for node_exporter.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// Upper bounds of the run-time histogram, in seconds.
const BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Default)]
struct Hist {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Default)]
struct SlotTime {
    busy: Duration,
    slots: u64,
}

pub struct Metrics {
    started: Instant,
    start_time: SystemTime,
    tasks: Mutex<BTreeMap<&'static str, u64>>,
    failures: Mutex<BTreeMap<String, u64>>,
    webhooks: Mutex<BTreeMap<String, u64>>,
    hist: Mutex<Hist>,
    slots: Mutex<BTreeMap<String, SlotTime>>,
    busy_slots: Mutex<BTreeMap<usize, (String, Instant)>>,
    /// Per slot index: paused by its breaker.
    paused: Mutex<BTreeMap<usize, bool>>,
    pub in_flight: AtomicU64,
    pub pending_lines: AtomicU64,
    /// Seconds; u64::MAX: no pending line.
    pub oldest_pending_secs: AtomicU64,
    pub outbox: AtomicU64,
    /// `metrics.listen` is on (the pending-line gauges are worth computing).
    pub served: std::sync::atomic::AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            start_time: SystemTime::now(),
            tasks: Mutex::default(),
            failures: Mutex::default(),
            webhooks: Mutex::default(),
            hist: Mutex::new(Hist {
                counts: vec![0; BUCKETS.len()],
                ..Hist::default()
            }),
            slots: Mutex::default(),
            busy_slots: Mutex::default(),
            paused: Mutex::default(),
            in_flight: AtomicU64::new(0),
            pending_lines: AtomicU64::new(0),
            oldest_pending_secs: AtomicU64::new(u64::MAX),
            outbox: AtomicU64::new(0),
            served: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

fn device_label(d: &Option<String>) -> String {
    d.clone().unwrap_or_else(|| "none".into())
}

impl Metrics {
    /// The slots of each device (called at start and on reload).
    pub fn set_slots(&self, slots: &[crate::vocab::Slot]) {
        let mut m = self.slots.lock().expect("metrics");
        for v in m.values_mut() {
            v.slots = 0;
        }
        for s in slots {
            m.entry(device_label(&s.device)).or_default().slots += 1;
        }
    }

    /// A slot's breaker opened (or closed).
    pub fn slot_paused(&self, index: usize, paused: bool) {
        self.paused.lock().expect("metrics").insert(index, paused);
    }

    pub fn slot_started(&self, slot: &crate::vocab::Slot) {
        self.busy_slots
            .lock()
            .expect("metrics")
            .insert(slot.index, (device_label(&slot.device), Instant::now()));
    }

    pub fn slot_finished(&self, slot: &crate::vocab::Slot) {
        if let Some((dev, t)) = self.busy_slots.lock().expect("metrics").remove(&slot.index) {
            self.slots
                .lock()
                .expect("metrics")
                .entry(dev)
                .or_default()
                .busy += t.elapsed();
        }
    }

    /// A record became durable.
    pub fn record(&self, status: &'static str, kind: Option<&str>, run: Option<Duration>) {
        *self
            .tasks
            .lock()
            .expect("metrics")
            .entry(status)
            .or_default() += 1;
        if let Some(k) = kind {
            *self
                .failures
                .lock()
                .expect("metrics")
                .entry(k.to_string())
                .or_default() += 1;
        }
        if let Some(d) = run {
            let secs = d.as_secs_f64();
            let mut h = self.hist.lock().expect("metrics");
            for (i, b) in BUCKETS.iter().enumerate() {
                if secs <= *b {
                    h.counts[i] += 1;
                }
            }
            h.sum += secs;
            h.count += 1;
        }
    }

    pub fn webhook(&self, status: &str) {
        *self
            .webhooks
            .lock()
            .expect("metrics")
            .entry(status.to_string())
            .or_default() += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            &mut o,
            "ttspool_tasks_total",
            "counter",
            "Task lines finished by this daemon, by record status.",
        );
        let tasks = self.tasks.lock().expect("metrics").clone();
        for st in ["completed", "skipped", "failed"] {
            let _ = writeln!(
                o,
                "ttspool_tasks_total{{status=\"{st}\"}} {}",
                tasks.get(st).copied().unwrap_or(0)
            );
        }
        head(
            &mut o,
            "ttspool_task_failures_total",
            "counter",
            "Failed task lines by error kind.",
        );
        let failures = self.failures.lock().expect("metrics").clone();
        for k in [
            "invalid_task",
            "engine_failed",
            "engine_rejected",
            "timeout",
            "invalid_output",
            "missing_output",
            "spawn_failed",
        ] {
            let _ = writeln!(
                o,
                "ttspool_task_failures_total{{kind=\"{k}\"}} {}",
                failures.get(k).copied().unwrap_or(0)
            );
        }
        head(
            &mut o,
            "ttspool_tasks_in_flight",
            "gauge",
            "Tasks running in the engine now.",
        );
        let _ = writeln!(
            o,
            "ttspool_tasks_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        head(
            &mut o,
            "ttspool_pending_lines",
            "gauge",
            "Task lines in pending/ not claimed yet (all daemons).",
        );
        let _ = writeln!(
            o,
            "ttspool_pending_lines {}",
            self.pending_lines.load(Ordering::Relaxed)
        );
        head(
            &mut o,
            "ttspool_oldest_pending_seconds",
            "gauge",
            "Age of the oldest file with unclaimed lines (0: none).",
        );
        let oldest = self.oldest_pending_secs.load(Ordering::Relaxed);
        let _ = writeln!(
            o,
            "ttspool_oldest_pending_seconds {}",
            if oldest == u64::MAX { 0 } else { oldest }
        );
        head(
            &mut o,
            "ttspool_slot_busy_seconds_total",
            "counter",
            "Time engine slots spent running, by GPU device.",
        );
        let uptime = self.started.elapsed().as_secs_f64().max(1e-9);
        let running = self.busy_slots.lock().expect("metrics").clone();
        let slots = self.slots.lock().expect("metrics");
        let mut ratio = String::new();
        for (dev, t) in slots.iter() {
            let live: Duration = running
                .values()
                .filter(|(d, _)| d == dev)
                .map(|(_, s)| s.elapsed())
                .sum();
            let busy = (t.busy + live).as_secs_f64();
            let _ = writeln!(
                o,
                "ttspool_slot_busy_seconds_total{{device=\"{dev}\"}} {busy:.3}"
            );
            let r = if t.slots == 0 {
                0.0
            } else {
                busy / (uptime * t.slots as f64)
            };
            let _ = writeln!(
                ratio,
                "ttspool_slot_busy_ratio{{device=\"{dev}\"}} {:.4}",
                r.min(1.0)
            );
        }
        drop(slots);
        head(
            &mut o,
            "ttspool_slot_busy_ratio",
            "gauge",
            "Share of time the device's slots were busy since start.",
        );
        o.push_str(&ratio);
        head(
            &mut o,
            "ttspool_slot_paused",
            "gauge",
            "1 while a slot is paused by its breaker (its engine failed several times in a row).",
        );
        for (i, p) in self.paused.lock().expect("metrics").iter() {
            let _ = writeln!(o, "ttspool_slot_paused{{slot=\"{i}\"}} {}", u8::from(*p));
        }
        head(
            &mut o,
            "ttspool_task_run_seconds",
            "histogram",
            "Engine run time per task.",
        );
        let h = self.hist.lock().expect("metrics");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "ttspool_task_run_seconds_bucket{{le=\"{b}\"}} {}",
                h.counts[i]
            );
        }
        let _ = writeln!(
            o,
            "ttspool_task_run_seconds_bucket{{le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(o, "ttspool_task_run_seconds_sum {:.3}", h.sum);
        let _ = writeln!(o, "ttspool_task_run_seconds_count {}", h.count);
        drop(h);
        head(
            &mut o,
            "ttspool_webhooks_total",
            "counter",
            "Webhook messages finished by this daemon, by outcome.",
        );
        let w = self.webhooks.lock().expect("metrics").clone();
        for st in ["delivered", "gone", "dead", "blocked"] {
            let _ = writeln!(
                o,
                "ttspool_webhooks_total{{status=\"{st}\"}} {}",
                w.get(st).copied().unwrap_or(0)
            );
        }
        head(
            &mut o,
            "ttspool_webhook_outbox_messages",
            "gauge",
            "Webhook messages waiting in this daemon's outbox.",
        );
        let _ = writeln!(
            o,
            "ttspool_webhook_outbox_messages {}",
            self.outbox.load(Ordering::Relaxed)
        );
        head(
            &mut o,
            "ttspool_start_time_seconds",
            "gauge",
            "When this daemon started (Unix time).",
        );
        let st = self
            .start_time
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let _ = writeln!(o, "ttspool_start_time_seconds {}", st.as_secs());
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric() {
        let m = Metrics::default();
        m.set_slots(&[crate::vocab::Slot {
            index: 0,
            device: Some("0".into()),
        }]);
        m.record("completed", None, Some(Duration::from_millis(700)));
        m.record("failed", Some("timeout"), Some(Duration::from_secs(3)));
        m.webhook("delivered");
        let t = m.render();
        assert!(t.contains("ttspool_tasks_total{status=\"completed\"} 1"));
        assert!(t.contains("ttspool_task_failures_total{kind=\"timeout\"} 1"));
        assert!(t.contains("ttspool_task_run_seconds_bucket{le=\"1\"} 1"));
        assert!(t.contains("ttspool_task_run_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(t.contains("ttspool_slot_busy_ratio{device=\"0\"}"));
        assert!(t.contains("ttspool_webhooks_total{status=\"delivered\"} 1"));
    }
}
