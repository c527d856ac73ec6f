//! GLM-TTS batching benchmark (run with `cargo bench --bench glmtts`): 400
//! tasks through the fake `glmtts_inference.py` with a 3 s model load and
//! 50 ms per utterance on 2 slots, for several `batch_max`. Prints wall time
//! and efficiency = ideal / measured, where ideal = batches per slot × load +
//! tasks per slot × 50 ms. `GLMTTS_BENCH_SIZES=4,16` picks the sizes.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_ttspool");
const TASKS: usize = 400;
const SLOTS: usize = 2;
const LOAD_S: f64 = 3.0;
const UTT_S: f64 = 0.05;

fn tiny_wav() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b"RIFF");
    v.extend_from_slice(&38u32.to_le_bytes());
    v.extend_from_slice(b"WAVEfmt ");
    v.extend_from_slice(&16u32.to_le_bytes());
    v.extend_from_slice(&[1, 0, 1, 0, 0x80, 0x3e, 0, 0, 0, 0x7d, 0, 0, 2, 0, 16, 0]);
    v.extend_from_slice(b"data");
    v.extend_from_slice(&2u32.to_le_bytes());
    v.extend_from_slice(&[0, 0]);
    v
}

fn run(batch_max: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root = d.join("GLM-TTS");
    fs::create_dir_all(root.join("ckpt")).unwrap();
    fs::create_dir_all(root.join("examples")).unwrap();
    fs::create_dir_all(d.join("voices")).unwrap();
    fs::create_dir_all(d.join("spool/pending")).unwrap();
    fs::write(d.join("voices/v.wav"), tiny_wav()).unwrap();
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/glmtts/glmtts_inference.py"),
        root.join("glmtts_inference.py"),
    )
    .unwrap();
    fs::write(
        d.join("ttspool.toml"),
        format!(
            "[spool]\ndir = \"spool\"\nsettle = \"100ms\"\n[output]\ndir = \"out\"\n\
             [engine]\nkind = \"glmtts\"\nroot = \"GLM-TTS\"\nbatch_max = {batch_max}\nbatch_wait = \"2s\"\n\
             env_pass = [\"PATH\", \"HOME\", \"LANG\", \"FAKE_*\"]\n\
             [gpu]\ndevices = [\"0\", \"1\"]\n"
        ),
    )
    .unwrap();
    let mut f = fs::File::create(d.join("spool/pending/.b.tmp")).unwrap();
    for i in 0..TASKS {
        writeln!(
            f,
            "{{\"input_text\":\"第{i}句话\",\"output_name\":\"b{i}\",\"prompt_audio\":\"v.wav\",\"prompt_text\":\"hi\"}}"
        )
        .unwrap();
    }
    drop(f);
    fs::rename(
        d.join("spool/pending/.b.tmp"),
        d.join("spool/pending/b.jsonl"),
    )
    .unwrap();
    let t = Instant::now();
    let st = Command::new(BIN)
        .args(["run", "--once"])
        .current_dir(d)
        .env("TTSPOOL_LOG", "warn")
        .env("FAKE_GLM_LOAD", LOAD_S.to_string())
        .env("FAKE_GLM_UTT", UTT_S.to_string())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let secs = t.elapsed().as_secs_f64();
    let done = fs::read_to_string(d.join("spool/done.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(done, TASKS);
    secs
}

fn main() {
    let sizes: Vec<usize> = std::env::var("GLMTTS_BENCH_SIZES")
        .unwrap_or_else(|_| "64,16,4,1".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let mut results = Vec::new();
    for &b in &sizes {
        let wall = run(b);
        let per_slot = TASKS / SLOTS;
        let batches = per_slot.div_ceil(b) as f64;
        let ideal = batches * LOAD_S + per_slot as f64 * UTT_S;
        eprintln!("batch_max = {b}: {wall:.1} s");
        results.push((b, wall, ideal));
    }
    let one = results.iter().find(|r| r.0 == 1).map(|r| r.1);
    println!("| batch_max | wall time | ideal | efficiency | speed-up vs batch_max = 1 |");
    println!("|---:|---:|---:|---:|---:|");
    for (b, wall, ideal) in &results {
        let speed = one
            .map(|o| format!("{:.1}x", o / wall))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {b} | {wall:.1} s | {ideal:.1} s | {:.2} | {speed} |",
            ideal / wall
        );
    }
}
