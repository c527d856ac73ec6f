//! The resident worker engine against the `glmtts` batch engine, side by
//! side in one run (`cargo bench --bench worker`), both on the fake GLM-TTS
//! checkout (tests/glmtts/) with a 3 s model load and 50 ms per utterance on
//! 2 slots, the worker being the shipped engines/glmtts_worker.py:
//!
//! - throughput: 400 tasks already pending, start of `run --once` → the
//!   last record on disk;
//!   efficiency = ideal / measured, ideal = one load per slot + 50 ms × the
//!   tasks of a slot (13 s) for both engines;
//! - latency: one task renamed into `pending/` of an idle daemon whose
//!   workers are loaded → its record on disk (median of 5).

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ttspool");
const TASKS: usize = 400;
const SLOTS: usize = 2;
const LOAD_S: f64 = 3.0;
const UTT_S: f64 = 0.05;
const BATCH_WAIT: &str = "2s";

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Worker,
    Batch,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Worker => "worker (glmtts_worker.py)",
            Kind::Batch => "glmtts batches of 16",
        }
    }
}

/// The interpreter itself, as a deployment names its virtualenv's python
/// (not a wrapper such as a pyenv shim, which costs a start of its own).
fn python() -> String {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A spool and a fake checkout for `kind`.
fn setup(kind: Kind) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = d.join("GLM-TTS");
    fs::create_dir_all(root.join("ckpt")).unwrap();
    fs::create_dir_all(root.join("examples")).unwrap();
    fs::create_dir_all(d.join("voices")).unwrap();
    fs::create_dir_all(d.join("spool/pending")).unwrap();
    fs::write(d.join("voices/v.wav"), common::tiny_wav()).unwrap();
    fs::copy(
        repo.join("tests/glmtts/glmtts_inference.py"),
        root.join("glmtts_inference.py"),
    )
    .unwrap();
    let engine = match kind {
        Kind::Worker => format!(
            "kind = \"worker\"\nargv = [\"{}\", \"{}\", \"--root\", \"GLM-TTS\"]\n",
            python(),
            repo.join("engines/glmtts_worker.py").display()
        ),
        Kind::Batch => format!(
            "kind = \"glmtts\"\nroot = \"GLM-TTS\"\nbatch_max = 16\nbatch_wait = \"{BATCH_WAIT}\"\n"
        ),
    };
    fs::write(
        d.join("ttspool.toml"),
        format!(
            "[spool]\ndir = \"spool\"\nsettle = \"100ms\"\n[output]\ndir = \"out\"\n\
             [engine]\n{engine}env_pass = [\"PATH\", \"HOME\", \"LANG\", \"FAKE_*\"]\n\
             [gpu]\ndevices = [\"0\", \"1\"]\n"
        ),
    )
    .unwrap();
    dir
}

fn publish(d: &Path, name: &str, lines: impl Iterator<Item = String>) {
    let tmp = d.join(format!("spool/pending/.{name}.tmp"));
    let mut f = fs::File::create(&tmp).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
    drop(f);
    fs::rename(&tmp, d.join(format!("spool/pending/{name}"))).unwrap();
}

fn line(name: &str) -> String {
    format!(
        "{{\"input_text\":\"这句话{name}\",\"output_name\":\"{name}\",\"prompt_audio\":\"v.wav\",\"prompt_text\":\"hi\"}}"
    )
}

fn cmd(d: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .current_dir(d)
        .env("TTSPOOL_LOG", "warn")
        .env("FAKE_GLM_LOAD", LOAD_S.to_string())
        .env("FAKE_GLM_UTT", UTT_S.to_string())
        .stdout(Stdio::null());
    c
}

fn records(d: &Path) -> usize {
    fs::read_to_string(d.join("spool/done.jsonl"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// 400 pending tasks, `run --once`: seconds to the last record.
fn throughput(kind: Kind) -> f64 {
    let dir = setup(kind);
    let d = dir.path();
    publish(d, "b.jsonl", (0..TASKS).map(|i| line(&format!("b{i}"))));
    let t = Instant::now();
    let mut run = cmd(d, &["run", "--once"]).spawn().unwrap();
    // To the last record (not to the exit, which waits for the workers to
    // stop): polled by size, counted when it changed.
    let log = d.join("spool/done.jsonl");
    let mut seen = 0;
    wait("400 records", 600, || {
        let len = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        len != seen && {
            seen = len;
            records(d) == TASKS
        }
    });
    let secs = t.elapsed().as_secs_f64();
    assert!(run.wait().unwrap().success());
    secs
}

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// One task onto an idle, warm daemon, 5 times: the median seconds from
/// the rename into `pending/` to its record on disk.
fn latency(kind: Kind) -> f64 {
    let dir = setup(kind);
    let d = dir.path();
    let mut daemon: Child = cmd(d, &["run"]).spawn().unwrap();
    // Warm: the workers have loaded (the batch engine has nothing to warm;
    // it loads per batch).
    publish(d, "warm.jsonl", std::iter::once(line("warm")));
    wait("the warm-up task", 60, || records(d) == 1);
    std::thread::sleep(Duration::from_secs(1)); // idle
    let mut took = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        publish(
            d,
            &format!("l{i}.jsonl"),
            std::iter::once(line(&format!("l{i}"))),
        );
        wait("the record", 60, || records(d) == i + 2);
        took.push(t.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_millis(300));
    }
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    daemon.wait().unwrap();
    took.sort_by(f64::total_cmp);
    took[2]
}

fn main() {
    let ideal = LOAD_S + (TASKS / SLOTS) as f64 * UTT_S;
    let mut rows = Vec::new();
    for kind in [Kind::Worker, Kind::Batch] {
        let wall = throughput(kind);
        eprintln!("{}: 400 tasks in {wall:.2} s", kind.name());
        let lat = latency(kind);
        eprintln!("{}: one task in {:.0} ms", kind.name(), lat * 1000.0);
        rows.push((kind, wall, lat));
    }
    println!(
        "400 tasks, fake GLM-TTS (load {LOAD_S} s, {} ms per utterance), 2 slots; ideal = one load per slot + 50 ms x 200 = {ideal:.1} s",
        UTT_S * 1000.0
    );
    println!("| engine | 400 tasks | efficiency (ideal / measured) | one task on an idle, warm daemon (median of 5) |");
    println!("|---|---:|---:|---:|");
    for (kind, wall, lat) in &rows {
        println!(
            "| {} | {wall:.2} s | {:.3} | {:.0} ms |",
            kind.name(),
            ideal / wall,
            lat * 1000.0
        );
    }
    println!(
        "targets: worker efficiency >= 0.97; worker latency <= 50 ms + the utterance ({} ms); the batch engine pays load + batch_wait ({LOAD_S} s + {BATCH_WAIT})",
        UTT_S * 1000.0
    );
}
