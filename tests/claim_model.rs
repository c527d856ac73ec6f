//! A model test of the claim protocol: several simulated daemons, each a
//! real `Claimer` on one real spool folder plus the daemon's lease
//! bookkeeping (`LeaseBook`), driven through random interleavings of claim,
//! start, finish (commit), pause (no beats, no progress), resume, crash,
//! restart, takeover, and producers doing what producers do: appending
//! through a descriptor they keep open (also after the file was consumed and
//! moved away), renaming the file inside `pending/`, rewriting it in place,
//! deleting it and publishing another under the same name, and closing it to
//! start a new one. Any daemon may be judged dead at any moment
//! (`spool.lease` is zero here), which is exactly the case fencing must
//! survive.
//!
//! Every line a producer writes carries a unique `output_name`, and records
//! are counted by it. After every step: no lease vanishes while a line it
//! covers has no record, only its owner (or a daemon taking it over)
//! removes it, and no line has two records. At the end, with every daemon
//! resumed: every complete line of every file (in `pending/` or consumed)
//! has exactly one record.
//!
//! `the_model_finds_the_old_lost_record_bug` runs the same model with the
//! bookkeeping the daemon had before fencing (a fenced record still settled
//! its line, and a settled lease was unlinked without a token check) and
//! requires the model to find a counterexample.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestCaseError, TestRunner};
use ttspool::spool::claim::{
    read_lease, still_ours, ClaimError, Claimed, Claimer, CommitOutcome, Failpoint, LeaseDoc,
    LeaseOwner,
};
use ttspool::spool::lease::{LeaseBook, Settled};
use ttspool::spool::lines::Line;
use ttspool::spool::records::RecordLog;
use ttspool::spool::Spool;
use ttspool::vocab::{Common, ErrorKind, FileId, Record, Source, TraceId};

const DAEMONS: usize = 3;
const FILES: usize = 2;

#[derive(Debug, Clone)]
enum Op {
    Beat(usize),
    Claim(usize, usize),
    TakeOver(usize),
    Start(usize),
    Finish(usize),
    Pause(usize),
    Resume(usize),
    Crash(usize),
    Restart(usize),
    /// Producer `f` appends `n` lines (and blank ones) through its open file.
    Append(usize, usize, bool),
    /// Producer `f` renames its file within `pending/`.
    Rename(usize),
    /// Producer `f` truncates its file and writes `n` new lines (same inode).
    Rewrite(usize, usize),
    /// Producer `f` deletes its file and publishes `n` lines under the name.
    Republish(usize, usize),
    /// Producer `f` closes its file; its next lines go to a new one.
    Close(usize),
    /// Daemon `i` starts a claim round (`takeover`: a takeover pass), and
    /// while it waits for the claim lock producer `f` appends a line
    /// (wherever its file is now: a consumed file grows) and daemon `j`
    /// claims `n` lines (bringing that file back).
    Stalled {
        i: usize,
        j: usize,
        n: usize,
        f: usize,
        takeover: bool,
    },
    /// Daemon `i` claims `n` lines and dies after writing a lease, before
    /// moving the cursor past it.
    CrashMidClaim(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    let d = 0..DAEMONS;
    prop_oneof![
        2 => d.clone().prop_map(Op::Beat),
        3 => (d.clone(), 1usize..4).prop_map(|(i, n)| Op::Claim(i, n)),
        2 => d.clone().prop_map(Op::TakeOver),
        3 => d.clone().prop_map(Op::Start),
        4 => d.clone().prop_map(Op::Finish),
        1 => d.clone().prop_map(Op::Pause),
        1 => d.clone().prop_map(Op::Resume),
        1 => d.clone().prop_map(Op::Crash),
        1 => d.clone().prop_map(Op::Restart),
        3 => (0..FILES, 1usize..4, any::<bool>()).prop_map(|(f, n, b)| Op::Append(f, n, b)),
        1 => (0..FILES).prop_map(Op::Rename),
        1 => (0..FILES, 1usize..5).prop_map(|(f, n)| Op::Rewrite(f, n)),
        1 => (0..FILES, 1usize..4).prop_map(|(f, n)| Op::Republish(f, n)),
        1 => (0..FILES).prop_map(Op::Close),
        2 => (d.clone(), d.clone(), 1usize..4, 0..FILES, any::<bool>())
            .prop_map(|(i, j, n, f, takeover)| Op::Stalled { i, j, n, f, takeover }),
        1 => (d.clone(), 1usize..4).prop_map(|(i, n)| Op::CrashMidClaim(i, n)),
    ]
}

/// How a daemon keeps its leases: as today, or as before fencing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Fenced,
    Old,
}

/// The daemon's bookkeeping before fencing, reproduced: every commit settled
/// its line, whatever the outcome, and a settled lease was unlinked.
#[derive(Default)]
struct OldBook {
    leases: HashMap<PathBuf, Vec<u64>>,
}

struct Daemon {
    name: String,
    claimer: Option<Claimer>,
    book: LeaseBook,
    old: OldBook,
    queue: Vec<Claimed>,
    running: Vec<Claimed>,
    paused: bool,
}

/// A producer: the file it keeps open, and the name it gave it last.
struct Producer {
    file: Option<std::fs::File>,
    name: String,
}

struct World {
    mode: Mode,
    spool: Spool,
    log: RecordLog,
    daemons: Vec<Daemon>,
    producers: Vec<Producer>,
    /// Names given so far (each file name is new).
    named: usize,
    /// Lines written so far (each line's `output_name` is new).
    written: usize,
}

fn open_claimer(spool: &Spool, name: &str) -> Claimer {
    Claimer::open(spool, name, 4096, Duration::ZERO, Duration::ZERO).unwrap()
}

impl World {
    fn new(dir: &Path, mode: Mode) -> World {
        let spool = Spool::new(dir);
        std::fs::create_dir_all(spool.pending()).unwrap();
        let daemons = (0..DAEMONS)
            .map(|i| {
                let name = format!("d{i}");
                Daemon {
                    claimer: Some(open_claimer(&spool, &name)),
                    name,
                    book: LeaseBook::default(),
                    old: OldBook::default(),
                    queue: Vec::new(),
                    running: Vec::new(),
                    paused: false,
                }
            })
            .collect();
        World {
            mode,
            log: RecordLog::new(&spool),
            spool,
            daemons,
            producers: (0..FILES)
                .map(|_| Producer {
                    file: None,
                    name: String::new(),
                })
                .collect(),
            named: 0,
            written: 0,
        }
    }

    fn new_name(&mut self, f: usize) -> String {
        self.named += 1;
        format!("f{f}_{}.jsonl", self.named)
    }

    /// `n` task lines with new output names, each followed by a blank line
    /// if `blank`.
    fn lines_text(&mut self, n: usize, blank: bool) -> String {
        let mut text = String::new();
        for _ in 0..n {
            self.written += 1;
            text.push_str(&format!(
                "{{\"input_text\":\"x\",\"output_name\":\"u{}\"}}\n",
                self.written
            ));
            if blank {
                text.push('\n');
            }
        }
        text
    }

    /// True if producer `f`'s file is in `pending/` under its name.
    fn in_pending(&self, f: usize) -> bool {
        use std::os::unix::fs::MetadataExt;
        let p = &self.producers[f];
        let Some(file) = &p.file else { return false };
        let Ok(md) = std::fs::metadata(self.spool.pending().join(&p.name)) else {
            return false;
        };
        md.ino() == file.metadata().unwrap().ino()
    }

    fn publish(&mut self, f: usize, name: String, text: &str) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.spool.pending().join(&name))
            .unwrap();
        file.write_all(text.as_bytes()).unwrap();
        self.producers[f] = Producer {
            file: Some(file),
            name,
        };
    }

    fn hold(&mut self, i: usize, lease: PathBuf, token: String, lines: Vec<u64>) {
        let d = &mut self.daemons[i];
        d.old.leases.insert(lease.clone(), lines.clone());
        d.book.hold(lease, token, lines);
    }

    /// The committer: under the records lock, a record is written only if
    /// its lease still carries the token it was claimed with. The record's
    /// id is the line's `output_name`.
    fn commit(&self, i: usize, c: &Claimed) -> CommitOutcome {
        let _g = self.log.lock().unwrap();
        if !still_ours(&c.lease, &c.token).unwrap() {
            return CommitOutcome::Fenced;
        }
        let id = match &c.line {
            Ok(Line::Text { bytes, .. }) => {
                let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
                v["output_name"].as_str().unwrap().to_string()
            }
            // Taken over after its file was replaced: named by what its
            // lease kept of it.
            Err(gone) => {
                let raw = gone.raw.as_deref().expect("the lease kept the line");
                let v: serde_json::Value = serde_json::from_str(raw).unwrap();
                v["output_name"].as_str().unwrap().to_string()
            }
            Ok(Line::TooLong { .. }) => unreachable!("the model's lines are short"),
        };
        let rec = Record::Failed {
            common: Common {
                id,
                source: Source {
                    file: c.file.clone(),
                    line: c.no,
                    file_escaped: None,
                },
                trace_id: TraceId::new(),
                instance: self.daemons[i].name.clone(),
                file_id: c.file_id.clone(),
            },
            kind: ErrorKind::EngineFailed,
            message: "model".into(),
            attempts: 1,
            task: None,
            raw: None,
            stderr_tail: None,
        };
        RecordLog::append_locked(&self.log.failed, &[rec.to_line()]).unwrap();
        CommitOutcome::Durable
    }

    fn step(&mut self, op: &Op) {
        let alive = |w: &World, i: usize| !w.daemons[i].paused && w.daemons[i].claimer.is_some();
        match *op {
            Op::Beat(i) if alive(self, i) => {
                let _ = self.daemons[i].claimer.as_mut().unwrap().heartbeat();
            }
            Op::Claim(i, n) if alive(self, i) => {
                let batch = self.daemons[i].claimer.as_mut().unwrap().claim(n).unwrap();
                for h in batch.leases {
                    self.hold(i, h.path, h.doc.token, h.doc.lines);
                }
                self.daemons[i].queue.extend(batch.lines);
            }
            Op::TakeOver(i) if alive(self, i) => {
                let got = self.daemons[i]
                    .claimer
                    .as_mut()
                    .unwrap()
                    .take_over()
                    .unwrap();
                for (h, lines) in got {
                    self.hold(i, h.path, h.doc.token, lines.iter().map(|c| c.no).collect());
                    self.daemons[i].queue.extend(lines);
                }
            }
            Op::Start(i) if alive(self, i) => {
                let d = &mut self.daemons[i];
                if !d.queue.is_empty() {
                    let c = d.queue.remove(0);
                    d.running.push(c);
                }
            }
            Op::Finish(i) if alive(self, i) => {
                if self.daemons[i].running.is_empty() {
                    return;
                }
                let c = self.daemons[i].running.remove(0);
                let outcome = self.commit(i, &c);
                match self.mode {
                    Mode::Fenced => match self.daemons[i].book.committed(&c.lease, c.no, outcome) {
                        Settled::Finished { token } => {
                            LeaseOwner::new(&self.spool)
                                .delete(&c.lease, &token)
                                .unwrap();
                        }
                        Settled::Lost { .. } => {
                            let d = &mut self.daemons[i];
                            d.queue.retain(|q| q.lease != c.lease);
                            d.running.retain(|q| q.lease != c.lease);
                        }
                        Settled::Pending | Settled::Unknown => {}
                    },
                    Mode::Old => {
                        let d = &mut self.daemons[i];
                        if let Some(lines) = d.old.leases.get_mut(&c.lease) {
                            lines.retain(|&l| l != c.no);
                            if lines.is_empty() {
                                d.old.leases.remove(&c.lease);
                                let _ = std::fs::remove_file(&c.lease);
                            }
                        }
                    }
                }
            }
            Op::Stalled {
                i,
                j,
                n,
                f,
                takeover,
            } if alive(self, i) => {
                let mut c = self.daemons[i].claimer.take().unwrap();
                let meanwhile = |w: &mut World| {
                    w.step(&Op::Append(f, 1, false));
                    if j != i {
                        w.step(&Op::Claim(j, n));
                    }
                };
                if takeover {
                    let got = c.take_over_with(|| meanwhile(self)).unwrap();
                    self.daemons[i].claimer = Some(c);
                    for (h, lines) in got {
                        self.hold(i, h.path, h.doc.token, lines.iter().map(|c| c.no).collect());
                        self.daemons[i].queue.extend(lines);
                    }
                } else {
                    let batch = c.claim_with(n, || meanwhile(self)).unwrap();
                    self.daemons[i].claimer = Some(c);
                    for h in batch.leases {
                        self.hold(i, h.path, h.doc.token, h.doc.lines);
                    }
                    self.daemons[i].queue.extend(batch.lines);
                }
            }
            Op::CrashMidClaim(i, n) if alive(self, i) => {
                let c = self.daemons[i].claimer.as_mut().unwrap();
                c.fail_at(Some(Failpoint::AfterLease));
                match c.claim(n) {
                    Ok(b) => assert!(b.lines.is_empty(), "claimed past a failpoint"),
                    Err(e) => assert!(
                        matches!(e, ClaimError::Failpoint(_)),
                        "unexpected claim error: {e}"
                    ),
                }
                self.step(&Op::Crash(i));
            }
            Op::Pause(i) => self.daemons[i].paused = true,
            Op::Resume(i) => self.daemons[i].paused = false,
            Op::Crash(i) => {
                let d = &mut self.daemons[i];
                d.claimer = None;
                d.book = LeaseBook::default();
                d.old = OldBook::default();
                d.queue.clear();
                d.running.clear();
                d.paused = false;
            }
            Op::Restart(i) if self.daemons[i].claimer.is_none() => {
                let c = open_claimer(&self.spool, &self.daemons[i].name);
                self.daemons[i].claimer = Some(c);
            }
            Op::Append(f, n, blank) => {
                let text = self.lines_text(n, blank);
                match &mut self.producers[f].file {
                    // Wherever the file is now: in pending/, or consumed.
                    Some(file) => file.write_all(text.as_bytes()).unwrap(),
                    None => {
                        let name = self.new_name(f);
                        self.publish(f, name, &text);
                    }
                }
            }
            Op::Rename(f) if self.in_pending(f) => {
                let to = self.new_name(f);
                let pending = self.spool.pending();
                std::fs::rename(pending.join(&self.producers[f].name), pending.join(&to)).unwrap();
                self.producers[f].name = to;
            }
            Op::Rewrite(f, n) if self.in_pending(f) => {
                let text = self.lines_text(n, false);
                let file = self.producers[f].file.as_mut().unwrap();
                file.set_len(0).unwrap();
                file.write_all(text.as_bytes()).unwrap();
            }
            Op::Republish(f, n) if self.in_pending(f) => {
                let name = self.producers[f].name.clone();
                std::fs::remove_file(self.spool.pending().join(&name)).unwrap();
                let text = self.lines_text(n, false);
                self.publish(f, name, &text);
            }
            Op::Close(f) => self.producers[f].file = None,
            _ => {}
        }
    }

    fn leases(&self) -> HashMap<PathBuf, LeaseDoc> {
        let mut out = HashMap::new();
        let Ok(rd) = std::fs::read_dir(self.spool.root.join(".ttspool/files")) else {
            return out;
        };
        for dir in rd.flatten() {
            for f in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if f.file_name().to_string_lossy().starts_with("lease-") {
                    if let Some(doc) = read_lease(&f.path()) {
                        out.insert(f.path(), doc);
                    }
                }
            }
        }
        out
    }

    /// Records per line id (`output_name`), and per (file_id, line).
    fn records(&self) -> (HashMap<String, usize>, HashSet<(FileId, u64)>) {
        let mut ids = HashMap::new();
        let mut lines = HashSet::new();
        self.log
            .read_all(|r, _, _| {
                *ids.entry(r.id.clone()).or_default() += 1;
                lines.insert((r.file_id.clone(), r.source.line));
            })
            .unwrap();
        (ids, lines)
    }

    /// The ids of the complete lines of every file there is now, in
    /// `pending/` or consumed.
    fn lines(&self) -> HashSet<String> {
        let mut out = HashSet::new();
        for dir in [self.spool.pending(), self.spool.consumed()] {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                if !e.file_type().unwrap().is_file() {
                    continue;
                }
                let text = std::fs::read_to_string(e.path()).unwrap();
                let complete = text.rsplit_once('\n').map_or("", |(a, _)| a);
                for l in complete.split('\n').filter(|l| !l.trim().is_empty()) {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    out.insert(v["output_name"].as_str().unwrap().to_string());
                }
            }
        }
        out
    }

    fn check_step(
        &self,
        op: &Op,
        before: &HashMap<PathBuf, LeaseDoc>,
    ) -> Result<(), TestCaseError> {
        let after = self.leases();
        let (records, recorded) = self.records();
        if let Some((k, n)) = records.iter().find(|(_, &n)| n > 1) {
            return Err(TestCaseError::fail(format!(
                "line {k:?} has {n} records after {op:?}"
            )));
        }
        for (path, doc) in before {
            if after.contains_key(path) {
                continue;
            }
            let unrecorded: Vec<u64> = doc
                .lines
                .iter()
                .copied()
                .filter(|&l| !recorded.contains(&(doc.file_id(), l)))
                .collect();
            if !unrecorded.is_empty() {
                return Err(TestCaseError::fail(format!(
                    "{op:?} removed lease {} of {} while lines {unrecorded:?} had no record",
                    path.display(),
                    doc.instance
                )));
            }
            let actor = match op {
                Op::Finish(i)
                | Op::TakeOver(i)
                | Op::Claim(i, _)
                | Op::Stalled { i, .. }
                | Op::CrashMidClaim(i, _) => &self.daemons[*i].name,
                _ => {
                    return Err(TestCaseError::fail(format!(
                        "lease {} vanished on {op:?}",
                        path.display()
                    )))
                }
            };
            if matches!(op, Op::Finish(_)) && &doc.instance != actor {
                return Err(TestCaseError::fail(format!(
                    "{actor} deleted lease {} owned by {}",
                    path.display(),
                    doc.instance
                )));
            }
        }
        Ok(())
    }

    /// Everyone wakes up and works until nothing is left.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        for i in 0..DAEMONS {
            self.step(&Op::Resume(i));
            self.step(&Op::Restart(i));
        }
        for _ in 0..40 {
            for i in 0..DAEMONS {
                for op in [Op::Beat(i), Op::TakeOver(i), Op::Claim(i, 64)] {
                    let before = self.leases();
                    self.step(&op);
                    self.check_step(&op, &before)?;
                }
                while !self.daemons[i].queue.is_empty() || !self.daemons[i].running.is_empty() {
                    for op in [Op::Start(i), Op::Finish(i)] {
                        let before = self.leases();
                        self.step(&op);
                        self.check_step(&op, &before)?;
                    }
                }
            }
            let pending_left = std::fs::read_dir(self.spool.pending())
                .unwrap()
                .flatten()
                .any(|e| !e.file_name().to_string_lossy().starts_with('.'));
            if !pending_left && self.leases().is_empty() {
                break;
            }
        }
        let (records, _) = self.records();
        let lines = self.lines();
        let missing: Vec<_> = lines.iter().filter(|k| !records.contains_key(*k)).collect();
        if !missing.is_empty() {
            return Err(TestCaseError::fail(format!(
                "lines without a record at the end: {missing:?}"
            )));
        }
        if let Some((k, n)) = records.iter().find(|(_, &n)| n != 1) {
            return Err(TestCaseError::fail(format!("line {k:?} has {n} records")));
        }
        // Every line has its record, so every file has left pending/ (the
        // model's consume_after is zero): none is stuck there for good.
        let stuck: Vec<String> = std::fs::read_dir(self.spool.pending())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        if !stuck.is_empty() {
            return Err(TestCaseError::fail(format!(
                "files never consumed although every line has its record: {stuck:?}"
            )));
        }
        Ok(())
    }
}

fn run_model(mode: Mode, ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir_in(shm()).unwrap();
    let mut w = World::new(dir.path(), mode);
    for op in ops {
        let before = w.leases();
        w.step(op);
        w.check_step(op, &before)?;
    }
    w.drain()
}

/// A RAM-backed folder where one exists: the model does many fsyncs.
fn shm() -> PathBuf {
    let p = PathBuf::from("/dev/shm");
    if p.is_dir() {
        p
    } else {
        std::env::temp_dir()
    }
}

fn cases() -> u32 {
    std::env::var("MODEL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(96)
}

#[test]
fn every_line_gets_exactly_one_record_under_any_interleaving() {
    let mut runner = TestRunner::new(PtConfig {
        cases: cases(),
        failure_persistence: None,
        ..PtConfig::default()
    });
    let res = runner.run(&prop::collection::vec(op(), 1..80), |ops| {
        run_model(Mode::Fenced, &ops)
    });
    if let Err(e) = res {
        panic!("{e}");
    }
}

#[test]
fn the_model_finds_the_old_lost_record_bug() {
    let mut runner = TestRunner::new(PtConfig {
        cases: 2000,
        failure_persistence: None,
        max_shrink_iters: 200,
        ..PtConfig::default()
    });
    let res = runner.run(&prop::collection::vec(op(), 1..80), |ops| {
        run_model(Mode::Old, &ops)
    });
    match res {
        Err(e) => println!("the old bookkeeping fails as it should: {e}"),
        Ok(()) => panic!("the model did not find the bug the old bookkeeping had"),
    }
}

/// Regression (issue 29, 1): a takeover pass listed `pending/` before it
/// took the claim lock; meanwhile another daemon brought a consumed file
/// back, the stale listing lacked it, and its sidecar was dropped — the
/// file was then read again from line 1.
#[test]
fn a_file_brought_back_while_a_takeover_waits_for_the_lock_keeps_its_sidecar() {
    let ops = [
        Op::Append(0, 2, false),
        Op::Claim(0, 4),
        Op::Start(0),
        Op::Finish(0),
        Op::Start(0),
        Op::Finish(0),
        Op::Claim(0, 4), // consumed: moved to pending/.consumed/
        Op::Stalled {
            i: 1,
            j: 0,
            n: 4,
            f: 0,
            takeover: true,
        },
    ];
    if let Err(e) = run_model(Mode::Fenced, &ops) {
        panic!("{e}");
    }
}

/// Regression (issue 29, 2): a daemon died between writing a lease and
/// moving the cursor; its restart took the lease over and wrote a cursor
/// without its log position, so the file's records were never found and it
/// stayed in `pending/` for good.
#[test]
fn a_lease_taken_over_before_its_cursor_was_written_lets_the_file_be_consumed() {
    let ops = [
        Op::Append(0, 1, false),
        Op::CrashMidClaim(0, 1), // the file's first claim: no cursor yet
        Op::Restart(0),
        Op::TakeOver(0),
    ];
    if let Err(e) = run_model(Mode::Fenced, &ops) {
        panic!("{e}");
    }
}
