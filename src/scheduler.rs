//! Slots per GPU, the queue of claimed work, and retry backoff.
//!
//! The daemon's event loop is the only user, so this is plain data: which
//! slots are busy, which claimed tasks wait for one, and when a failed task
//! may run again. A task whose output another running task is writing waits,
//! so two lines with the same `output_name` never write one file at once.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::vocab::{Job, Slot};

/// Where a claimed line came from and which lease covers it.
#[derive(Debug, Clone)]
pub struct ClaimRef {
    pub lease: PathBuf,
    pub token: String,
    pub file: String,
    pub file_escaped: Option<String>,
    pub file_id: crate::vocab::FileId,
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
    /// Largest batch this task may run in (0: the engine's `batch_max`); 1
    /// after it failed inside a batch, halved after its batch crashed.
    pub cap: usize,
    /// When it entered the queue (a batch waits for more at most `batch_wait`).
    pub queued_at: Instant,
    /// The slot it last failed on: another one is preferred for its retry.
    pub avoid_slot: Option<usize>,
}

/// What the scheduler can start now.
pub enum Next {
    /// Run these on this slot.
    Start(Slot, Vec<Work>),
    /// A batch could start now but is waiting to fill until then.
    WaitUntil(Instant),
    /// No free slot or nothing runnable.
    Nothing,
}

pub struct Scheduler {
    slots: Vec<(Slot, bool)>,
    /// Slots the breaker paused (by index): given no work.
    paused: HashSet<usize>,
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
            paused: HashSet::new(),
            queue: VecDeque::new(),
            writing: HashSet::new(),
            last_file: String::new(),
        }
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Pauses (or resumes) a slot: a paused slot is given no work.
    pub fn set_paused(&mut self, index: usize, paused: bool) {
        if paused {
            self.paused.insert(index);
        } else {
            self.paused.remove(&index);
        }
    }

    /// Slots that are not paused.
    pub fn usable(&self) -> usize {
        self.slots
            .iter()
            .filter(|(s, _)| !self.paused.contains(&s.index))
            .count()
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

    /// The next batch and a free slot for it, marking both taken: at most
    /// `max` tasks, none of whose caps it exceeds, the first from another
    /// file than last time. With `hold`, a batch that is not full waits
    /// until its oldest task has been queued that long.
    pub fn next_batch(&mut self, max: usize, hold: Option<Duration>) -> Next {
        // A retried task waits for another slot than the one it failed on,
        // while there is another.
        let elsewhere = self.usable() > 1;
        let runnable_on = |w: &Work, here: usize| {
            let avoided = elsewhere && w.avoid_slot == Some(here);
            !avoided && !self.writing.contains(&w.job.output)
        };
        let Some((free, first)) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, (s, b))| !*b && !self.paused.contains(&s.index))
            .find_map(|(i, (s, _))| {
                let here = s.index;
                self.queue
                    .iter()
                    // The cheap test first: with one file, this scan finds nothing.
                    .position(|w| w.claim.file != self.last_file && runnable_on(w, here))
                    .or_else(|| self.queue.iter().position(|w| runnable_on(w, here)))
                    .map(|first| (i, first))
            })
        else {
            return Next::Nothing;
        };
        let here = self.slots[free].0.index;
        let runnable = |w: &Work| runnable_on(w, here);
        let cap_of = |w: &Work| if w.cap == 0 { max } else { w.cap.min(max) };
        let mut limit = cap_of(&self.queue[first]).max(1);
        let mut picked = vec![first];
        let mut outputs: HashSet<&PathBuf> = HashSet::from([&self.queue[first].job.output]);
        if limit > 1 {
            for (i, w) in self.queue.iter().enumerate() {
                if picked.len() >= limit {
                    break;
                }
                if i == first || !runnable(w) || cap_of(w) < 2 || outputs.contains(&w.job.output) {
                    continue;
                }
                limit = limit.min(cap_of(w));
                if picked.len() < limit {
                    picked.push(i);
                    outputs.insert(&w.job.output);
                }
            }
        }
        if let Some(hold) = hold {
            let oldest = picked
                .iter()
                .map(|&i| self.queue[i].queued_at)
                .min()
                .expect("one picked");
            if picked.len() < limit && oldest.elapsed() < hold {
                return Next::WaitUntil(oldest + hold);
            }
        }
        picked.sort_unstable();
        let mut works = Vec::with_capacity(picked.len());
        for &i in picked.iter().rev() {
            works.push(self.queue.remove(i).expect("index in queue"));
        }
        works.reverse();
        for w in &works {
            self.writing.insert(w.job.output.clone());
        }
        self.last_file.clone_from(&works[0].claim.file);
        self.slots[free].1 = true;
        Next::Start(self.slots[free].0.clone(), works)
    }

    /// New slots after a config reload. Slots that stay keep their state; a
    /// busy slot that is gone finishes its batch and is then forgotten.
    pub fn set_slots(&mut self, slots: Vec<Slot>) {
        let busy: Vec<Slot> = self
            .slots
            .iter()
            .filter(|(_, b)| *b)
            .map(|(s, _)| s.clone())
            .collect();
        self.slots = slots
            .into_iter()
            .map(|s| {
                let b = busy.contains(&s);
                (s, b)
            })
            .collect();
    }

    /// The output of a task that will not run after all (skipped).
    pub fn release_output(&mut self, output: &PathBuf) {
        self.writing.remove(output);
    }

    /// A slot whose batch turned out empty.
    pub fn free_slot(&mut self, slot: &Slot) {
        if let Some(s) = self.slots.iter_mut().find(|(s, _)| s == slot) {
            s.1 = false;
        }
    }

    /// Drops the queued work of a lease that is no longer ours; returns how
    /// many lines were dropped.
    pub fn drop_lease(&mut self, lease: &PathBuf) -> usize {
        let before = self.queue.len();
        self.queue.retain(|w| &w.claim.lease != lease);
        before - self.queue.len()
    }

    /// Pops queued work without a slot (for skips and hand-backs).
    pub fn take_queue(&mut self) -> Vec<Work> {
        self.queue.drain(..).collect()
    }

    /// A batch's outputs are settled: they may be written again. (Its slot
    /// was freed on its own, as soon as its children were gone.)
    pub fn finish(&mut self, works: &[Work]) {
        for w in works {
            self.writing.remove(&w.job.output);
        }
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
                file_escaped: None,
                file_id: Default::default(),
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
                trace_id: Default::default(),
            },
            claimed_at: String::new(),
            attempts: 0,
            cap: 0,
            queued_at: Instant::now(),
            avoid_slot: None,
        }
    }

    fn start(s: &mut Scheduler, max: usize) -> (Slot, Vec<Work>) {
        match s.next_batch(max, None) {
            Next::Start(slot, w) => (slot, w),
            _ => panic!("nothing started"),
        }
    }

    fn ids(w: &[Work]) -> Vec<&str> {
        w.iter().map(|w| w.job.task.id.as_str()).collect()
    }

    #[test]
    fn batches_respect_caps_outputs_and_the_wait() {
        let mut s = Scheduler::new(vec![
            Slot {
                index: 0,
                device: Some("0".into()),
            },
            Slot {
                index: 1,
                device: Some("1".into()),
            },
        ]);
        for i in 0..5 {
            s.push(work("f", &format!("a{i}")));
        }
        // Not full and young: wait.
        assert!(matches!(
            s.next_batch(8, Some(Duration::from_secs(60))),
            Next::WaitUntil(_)
        ));
        let (_, b) = start(&mut s, 4);
        assert_eq!(ids(&b), ["a0", "a1", "a2", "a3"]);
        let mut solo = work("f", "solo");
        solo.cap = 1;
        s.push_front(solo);
        let (_, b) = start(&mut s, 4);
        assert_eq!(ids(&b), ["solo"], "a capped task runs alone");
        assert!(
            matches!(s.next_batch(4, None), Next::Nothing),
            "both slots busy"
        );
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
        let (s0, first) = start(&mut s, 1);
        assert_eq!(ids(&first), ["b0"]);
        let (_, second) = start(&mut s, 1);
        assert_eq!(ids(&second), ["urgent"], "the small file goes next");
        assert!(
            matches!(s.next_batch(1, None), Next::Nothing),
            "no free slot"
        );
        s.free_slot(&s0);
        s.finish(&first);
        let (_, third) = start(&mut s, 1);
        assert_eq!(ids(&third), ["b1"]);
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
