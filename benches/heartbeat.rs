//! Heartbeat age under load (run with `cargo bench --bench heartbeat`).
//!
//! A daemon with `spool.lease = 4s` runs 20,000 millisecond tasks (`cp` of a
//! small WAV) on 2 slots while 100 webhook lookups hang: its name server (a
//! UDP socket on 127.0.0.2:53, bound into a private mount namespace's
//! resolv.conf) takes queries and never answers. The beat counter in its
//! `.alive` file is sampled every 5 ms from outside; the age of a sample is
//! the time since the counter last changed. Figures: p50, p99 and max age,
//! against the target of lease/4. The baseline in the same run is the same
//! daemon with no webhooks at all.
//!
//! Needs root (port 53, `unshare --mount`); without it, says so and skips.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ttspool");
const LEASE_S: u64 = 4;
const TASKS: usize = 20_000;

#[path = "common/mod.rs"]
mod common;
use common::tiny_wav;

fn beat(alive: &Path) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(&fs::read(alive).ok()?).ok()?;
    v["beat"].as_u64()
}

/// Runs the daemon over the tasks; returns the sampled ages (ms) and the
/// run's length.
fn run(hang: bool) -> (Vec<u64>, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir_all(d.join("spool/pending")).unwrap();
    fs::write(d.join("tiny.wav"), tiny_wav()).unwrap();
    let wav = d.join("tiny.wav");
    fs::write(
        d.join("ttspool.toml"),
        format!(
            "[spool]\ndir = \"spool\"\nsettle = \"100ms\"\nlease = \"{LEASE_S}s\"\ninstance = \"bench\"\n\
             [output]\ndir = \"out\"\n[engine]\nargv = [\"cp\", \"{}\", \"{{output}}\"]\n\
             [gpu]\nmax_parallel = 2\n[webhook]\nsecret = \"whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD\"\n\
             max_in_flight = 100\ntimeout = \"60s\"\n",
            wav.display()
        ),
    )
    .unwrap();
    fs::write(
        d.join("resolv.conf"),
        "nameserver 127.0.0.2\noptions timeout:30 attempts:5\n",
    )
    .unwrap();
    let tmp = d.join("spool/pending/.t.tmp");
    let mut w = BufWriter::new(fs::File::create(&tmp).unwrap());
    for i in 0..TASKS {
        if hang && i < 100 {
            writeln!(
                w,
                "{{\"input_text\":\"x\",\"output_name\":\"t{i}\",\"callback_url\":\"http://h{i}.ttspool-bench.invalid/cb\"}}"
            )
            .unwrap();
        } else {
            writeln!(w, "{{\"input_text\":\"x\",\"output_name\":\"t{i}\"}}").unwrap();
        }
    }
    w.into_inner().unwrap().sync_all().unwrap();
    let mut child = Command::new("unshare")
        .arg("--mount")
        .arg("sh")
        .arg("-c")
        .arg(format!(
            "mount --bind {}/resolv.conf /etc/resolv.conf && exec {BIN} -c {}/ttspool.toml run",
            d.display(),
            d.display()
        ))
        .env("TTSPOOL_LOG", "warn")
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let alive = d.join("spool/.ttspool/instances/bench.alive");
    let started = Instant::now();
    while beat(&alive).is_none() {
        assert!(started.elapsed() < Duration::from_secs(20), "no heartbeat");
        std::thread::sleep(Duration::from_millis(5));
    }
    fs::rename(&tmp, d.join("spool/pending/t.jsonl")).unwrap();
    let t0 = Instant::now();
    let done = d.join("spool/done.jsonl");
    let mut ages = Vec::new();
    let (mut last, mut changed) = (beat(&alive), Instant::now());
    let lines = loop {
        let b = beat(&alive);
        if b != last {
            last = b;
            changed = Instant::now();
        }
        ages.push(changed.elapsed().as_millis() as u64);
        std::thread::sleep(Duration::from_millis(5));
        if ages.len() % 100 == 0 {
            let lines = fs::read(&done)
                .map(|t| t.iter().filter(|&&c| c == b'\n').count())
                .unwrap_or(0);
            if lines >= TASKS || t0.elapsed() > Duration::from_secs(300) {
                break lines;
            }
        }
    };
    let took = t0.elapsed();
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    assert!(lines >= TASKS, "only {lines} of {TASKS} records");
    (ages, took)
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn main() {
    let Ok(_blackhole) = std::net::UdpSocket::bind("127.0.0.2:53") else {
        println!("heartbeat bench skipped: cannot bind 127.0.0.2:53 (needs root)");
        return;
    };
    println!(
        "| {:<52} | {:>30} | {:<14} |",
        "benchmark", "result", "target"
    );
    println!("|{}|{}|{}|", "-".repeat(54), "-".repeat(32), "-".repeat(16));
    for (name, hang) in [
        ("heartbeat age, 20k ms tasks, no webhooks (baseline)", false),
        ("heartbeat age, 20k ms tasks, 100 lookups hanging", true),
    ] {
        let (mut ages, took) = run(hang);
        let (p50, p99, max) = (
            pct(&mut ages, 0.5),
            pct(&mut ages, 0.99),
            *ages.iter().max().unwrap(),
        );
        println!(
            "| {name:<52} | {:>30} | {:<14} |",
            format!("p50 {p50} ms, p99 {p99} ms, max {max} ms"),
            format!("p99 < {} ms", LEASE_S * 1000 / 4)
        );
        println!(
            "|   ({} samples over {:.1} s, {:.0} tasks/s){:<12} | {:>30} | {:<14} |",
            ages.len(),
            took.as_secs_f64(),
            TASKS as f64 / took.as_secs_f64(),
            "",
            "",
            ""
        );
    }
}
