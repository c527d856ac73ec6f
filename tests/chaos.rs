//! The chaos run (issue 29): four daemons on one spool, many files,
//! producers that append slowly and rename their file while they do, and
//! for a while a random daemon is either killed (SIGKILL, then restarted)
//! or stopped past its lease (SIGSTOP, then SIGCONT). At the end: no line
//! lost, none recorded twice, and every extra engine run is explained by a
//! kill or a stop (at most one per slot of the daemon hit).
//!
//! CI runs a short version. The full one, as the issue describes it:
//! `CHAOS_SECS=180 CHAOS_FILES=50 CHAOS_LINES=400 cargo test --release --test chaos`.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const DAEMONS: usize = 4;
const SLOTS: usize = 2;

#[test]
fn four_daemons_killed_and_stopped_at_random_lose_and_double_nothing() {
    let secs = knob("CHAOS_SECS", 25);
    let files = knob("CHAOS_FILES", 20) as usize;
    let lines = knob("CHAOS_LINES", 100) as usize;
    let seed = knob("CHAOS_SEED", 0x9E37_79B9_7F4A_7C15);
    eprintln!("chaos: {secs}s, {files} files x {lines} lines, seed {seed}");
    let mut env = Env::new(&format!("[gpu]\nmax_parallel = {SLOTS}\n"));
    let lease = Duration::from_secs(3);
    env.spool_extra =
        "lease = \"3s\"\npoll_interval = \"200ms\"\nsettle = \"200ms\"\nconsume_after = \"1s\"\n"
            .into();
    env.write_config();
    let pending = env.spool().join("pending");
    let mut total = 0;
    for f in 0..files {
        let text: String = (0..lines)
            .map(|l| task_line(&format!("f{f}_{l}"), "x"))
            .collect();
        env.drop_file(&format!("bulk{f:03}.jsonl"), &text);
        total += lines;
    }
    // Slow appenders: a line every 30 ms through a descriptor kept open,
    // renaming their file half way (its claims go with it).
    let stop = Arc::new(AtomicBool::new(false));
    let appended = Arc::new(AtomicUsize::new(0));
    let appenders: Vec<_> = (0..2)
        .map(|a| {
            let (stop, appended, pending) = (stop.clone(), appended.clone(), pending.clone());
            std::thread::spawn(move || {
                let first = pending.join(format!("slow{a}.jsonl"));
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&first)
                    .unwrap();
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    file.write_all(task_line(&format!("s{a}_{n}"), "x").as_bytes())
                        .unwrap();
                    n += 1;
                    appended.fetch_add(1, Ordering::SeqCst);
                    if n == 200 {
                        // Renamed while in pending/ (if it still is).
                        let _ =
                            std::fs::rename(&first, pending.join(format!("slow{a}.renamed.jsonl")));
                    }
                    std::thread::sleep(Duration::from_millis(30));
                }
            })
        })
        .collect();
    let names: Vec<String> = (0..DAEMONS).map(|i| format!("c{i}")).collect();
    let mut daemons: Vec<Child> = names.iter().map(|n| env.spawn(n)).collect();
    let mut rng = Rng(seed);
    let (mut kills, mut stops) = (0usize, 0usize);
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(300 + rng.next() % 1200));
        let i = (rng.next() % DAEMONS as u64) as usize;
        if rng.next().is_multiple_of(2) {
            signal(&daemons[i], "KILL");
            daemons[i].wait().unwrap();
            daemons[i] = env.spawn(&names[i]);
            kills += 1;
        } else {
            signal(&daemons[i], "STOP");
            std::thread::sleep(lease + Duration::from_millis(500 + rng.next() % 1000));
            signal(&daemons[i], "CONT");
            stops += 1;
        }
    }
    stop.store(true, Ordering::SeqCst);
    for a in appenders {
        a.join().unwrap();
    }
    let total = total + appended.load(Ordering::SeqCst);
    let per_id = || {
        let mut m: HashMap<String, usize> = HashMap::new();
        for r in env.all("done").iter().chain(env.all("failed").iter()) {
            *m.entry(r["id"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
        m
    };
    let deadline = Instant::now() + Duration::from_secs(240);
    while per_id().len() < total && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    for d in &daemons {
        signal(d, "TERM");
    }
    for d in &mut daemons {
        d.wait().unwrap();
    }
    let per_id = per_id();
    let doubled: Vec<_> = per_id.iter().filter(|(_, &n)| n > 1).take(10).collect();
    let failed: Vec<_> = env.all("failed").into_iter().take(3).collect();
    eprintln!(
        "chaos: {total} lines, {} recorded, {kills} kills, {stops} stops",
        per_id.len()
    );
    assert!(doubled.is_empty(), "lines recorded twice: {doubled:?}");
    assert_eq!(per_id.len(), total, "lines lost (no record after 240 s)");
    assert!(failed.is_empty(), "{failed:#?}");
    // Extra engine runs: each kill or stop past the lease may cost the
    // tasks running on the daemon hit, one per slot; so may a daemon so
    // slow (a loaded machine) that its heartbeat came late and it was
    // judged dead — it says so in its log. Nothing else may.
    let late: usize = names
        .iter()
        .map(|n| {
            std::fs::read_to_string(env.root().join(format!("daemon-{n}.log")))
                .unwrap_or_default()
                .matches("our heartbeat was late")
                .count()
        })
        .sum();
    let starts = env.starts();
    let extra: usize = starts.values().map(|&n| n - 1).sum();
    eprintln!("chaos: {extra} extra engine run(s); {late} late heartbeat(s) logged");
    let unexplained_stops = stops.saturating_sub(late);
    assert!(
        extra <= (kills + late + unexplained_stops) * SLOTS,
        "{extra} extra engine runs for {kills} kills, {stops} stops and {late} late heartbeats"
    );
}
