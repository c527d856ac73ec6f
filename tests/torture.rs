//! kill -9 torture: a daemon killed with SIGKILL at random moments, restarted
//! each time; at the end every line has exactly one record, every completed
//! output is a valid WAV, no engine survives its daemon, and no temp file is
//! in view.

mod common;

use std::collections::HashMap;
use std::fs;
use std::time::Duration;

use common::*;

#[test]
fn kill_9_at_random_moments_loses_and_duplicates_nothing() {
    // Tiny log rotation, so takeovers also have to look across rotated logs.
    let env = Env::new("[gpu]\nmax_parallel = 2\n[retention]\nrotate_size = \"16KB\"\n");
    let content: String = (0..500)
        .map(|i| task_line(&format!("t{i}"), "text"))
        .collect();
    env.drop_file("big.jsonl", &content);
    // A second file appended to while the kills go on.
    let live = env.spool().join("pending/live.jsonl");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut kills = 0;
    let mut appended = 0;
    while kills < 12 {
        let d = env.spawn("solo");
        // The moment: somewhere in the first few hundred milliseconds of work.
        std::thread::sleep(Duration::from_millis(20 + rng.next() % 250));
        sigkill(&d);
        let mut d = d;
        d.wait().unwrap();
        kills += 1;
        if appended < 50 {
            let more: String = (appended..appended + 10)
                .map(|i| task_line(&format!("l{i}"), "live"))
                .collect();
            append(&live, &more);
            appended += 10;
        }
    }
    let total = 500 + appended;
    let mut d = env.spawn("solo");
    let count = || env.all("done").len() + env.all("failed").len();
    // On a timeout, say which lines lack a record and what the daemon was
    // doing, so a rare hang can be diagnosed from CI's output alone.
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while count() < total {
        if std::time::Instant::now() > deadline {
            let have: std::collections::HashSet<String> = env
                .all("done")
                .iter()
                .chain(env.all("failed").iter())
                .filter_map(|r| r["id"].as_str().map(str::to_string))
                .collect();
            let missing: Vec<String> = (0..500)
                .map(|i| format!("t{i}"))
                .chain((0..appended).map(|i| format!("l{i}")))
                .filter(|id| !have.contains(id))
                .collect();
            let log =
                std::fs::read_to_string(env.root().join("daemon-solo.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            let status = env.cmd(&["status"]).output().unwrap();
            sigkill(&d);
            panic!(
                "timed out after 240s: {} of {total} records; missing {:?}\nstatus:\n{}\ndaemon log, last lines:\n{}",
                count(),
                missing,
                String::from_utf8_lossy(&status.stdout),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    sigterm(&d);
    assert!(d.wait().unwrap().success());

    let done = env.all("done");
    let failed = env.all("failed");
    assert!(failed.is_empty(), "{:#?}", failed.first());
    let rotated = std::fs::read_dir(env.spool())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("done.e"))
        .count();
    assert!(rotated >= 5, "only {rotated} rotations");
    // status counts across the rotated logs.
    let st = env.cmd(&["status", "--json"]).output().unwrap();
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(
        st["completed"].as_u64().unwrap() + st["skipped"].as_u64().unwrap(),
        total as u64
    );
    let mut per_line: HashMap<(String, u64), usize> = HashMap::new();
    for r in &done {
        let key = (
            r["source"]["file"].as_str().unwrap().to_string(),
            r["source"]["line"].as_u64().unwrap(),
        );
        *per_line.entry(key).or_default() += 1;
        let out = r["output"].as_str().unwrap();
        assert!(
            is_wav(std::path::Path::new(out)),
            "{out} is not a valid WAV"
        );
    }
    let dups: Vec<_> = per_line.iter().filter(|(_, &n)| n > 1).collect();
    assert!(dups.is_empty(), "duplicate records: {dups:?}");
    assert_eq!(per_line.len(), total);
    assert_eq!(done.len(), total);
    // Engines die with their daemon (PR_SET_PDEATHSIG).
    let left = survivors(&env.engine_pids());
    assert!(left.is_empty(), "{left:#?}");
    // Nothing but finished WAVs in view.
    for e in fs::read_dir(env.out()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(name.starts_with('.') || name.ends_with(".wav"), "{name}");
        if !name.starts_with('.') {
            assert!(is_wav(&env.out().join(&name)), "{name}");
        }
    }
    eprintln!(
        "kills: {kills}, engine starts: {}",
        env.starts().values().sum::<usize>()
    );
}
