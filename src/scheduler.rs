//! Slots per GPU, the queue of claimed work, and retry backoff.
//!
//! The daemon's event loop is the only user, so this is plain data: which
//! slots are busy, which claimed tasks wait for one, and when a failed task
//! may run again. A task whose output another running task is writing waits,
//! so two lines with the same `output_name` never write one file at once.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use crate::engine::{Job, Slot};

/// Where a claimed line came from and which lease covers it.
#[derive(Debug, Clone)]
pub struct ClaimRef {
    pub lease: PathBuf,
    pub token: String,
    pub file: String,
    pub file_id: String,
    pub line: u64,
}

/// A claimed, valid task on its way through the engine.
#[derive(Debug, Clone)]
pub struct Work {
    pub claim: ClaimRef,
    pub job: Job,
    pub claimed_at: String,
    /// Engine runs so far.
    pub attempts: u32,
}

pub struct Scheduler {
    slots: Vec<(Slot, bool)>,
    queue: VecDeque<Work>,
    writing: HashSet<PathBuf>,
    /// The file the last started task came from: the next one comes from
    /// another file when one is waiting, so a small file dropped behind a
    /// big one's prefetched lines is not queued behind all of them.
    last_file: String,
}

impl Scheduler {
    pub fn new(slots: Vec<Slot>) -> Scheduler {
        Scheduler {
            slots: slots.into_iter().map(|s| (s, false)).collect(),
            queue: VecDeque::new(),
            writing: HashSet::new(),
            last_file: String::new(),
        }
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub fn busy(&self) -> usize {
        self.slots.iter().filter(|(_, b)| *b).count()
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn push(&mut self, w: Work) {
        self.queue.push_back(w);
    }

    /// Retried work goes first: it has waited its backoff already.
    pub fn push_front(&mut self, w: Work) {
        self.queue.push_front(w);
    }

    /// The next work and a free slot for it, marking both taken.
    pub fn next_ready(&mut self) -> Option<(Slot, Work)> {
        let free = self.slots.iter().position(|(_, b)| !*b)?;
        let runnable = |w: &Work| !self.writing.contains(&w.job.output);
        let i = self
            .queue
            .iter()
            .position(|w| runnable(w) && w.claim.file != self.last_file)
            .or_else(|| self.queue.iter().position(runnable))?;
        let w = self.queue.remove(i)?;
        self.last_file.clone_from(&w.claim.file);
        self.writing.insert(w.job.output.clone());
        self.slots[free].1 = true;
        Some((self.slots[free].0.clone(), w))
    }

    /// Pops queued work without a slot (for skips and hand-backs).
    pub fn take_queue(&mut self) -> Vec<Work> {
        self.queue.drain(..).collect()
    }

    pub fn finish(&mut self, slot: &Slot, output: &PathBuf) {
        if let Some(s) = self.slots.iter_mut().find(|(s, _)| s == slot) {
            s.1 = false;
        }
        self.writing.remove(output);
    }
}

/// Wait before run number `attempts + 1`: `backoff`, doubling, capped at an hour.
pub fn backoff(base: Duration, attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(16);
    base.saturating_mul(1 << exp).min(Duration::from_secs(3600))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Task;

    fn work(file: &str, name: &str) -> Work {
        Work {
            claim: ClaimRef {
                lease: PathBuf::new(),
                token: String::new(),
                file: file.into(),
                file_id: String::new(),
                line: 1,
            },
            job: Job {
                task: Task {
                    id: name.into(),
                    input_text: "x".into(),
                    output_name: name.into(),
                    prompt_audio: None,
                    prompt_text: None,
                    callback_url: None,
                    metadata: None,
                },
                output: PathBuf::from(format!("/out/{name}.wav")),
                prompt_audio: None,
                trace_id: String::new(),
            },
            claimed_at: String::new(),
            attempts: 0,
        }
    }

    #[test]
    fn files_take_turns_and_one_output_is_written_once_at_a_time() {
        let slot = |i| Slot {
            index: i,
            device: None,
        };
        let mut s = Scheduler::new(vec![slot(0), slot(1)]);
        for i in 0..5 {
            s.push(work("big", &format!("b{i}")));
        }
        s.push(work("small", "urgent"));
        s.push(work("small", "b0")); // same output as the first big task
        let (s0, first) = s.next_ready().unwrap();
        assert_eq!(first.job.task.id, "b0");
        let (_, second) = s.next_ready().unwrap();
        assert_eq!(second.job.task.id, "urgent", "the small file goes next");
        assert!(s.next_ready().is_none(), "no free slot");
        s.finish(&s0, &first.job.output);
        let (_, third) = s.next_ready().unwrap();
        assert_eq!(third.job.task.id, "b1");
    }

    #[test]
    fn backoff_doubles() {
        let b = Duration::from_secs(10);
        assert_eq!(backoff(b, 1), Duration::from_secs(10));
        assert_eq!(backoff(b, 2), Duration::from_secs(20));
        assert_eq!(backoff(b, 3), Duration::from_secs(40));
        assert_eq!(backoff(b, 40), Duration::from_secs(3600));
    }
}
