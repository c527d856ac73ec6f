//! The spool's own moves under crashes and races (issue 29): a `requeue`
//! killed at each step and at random instants, two at once; a consumed file
//! brought back while the claim lock is held from outside; a daemon killed
//! over and over while thousands of files are consumed.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Instant;

use common::*;
use serde_json::{json, Value};

const FAILURES: usize = 20_000;

/// `n` failed records that can be requeued, written as the daemon would.
fn write_failures(env: &Env, n: usize) {
    let mut text = String::with_capacity(n * 300);
    for i in 0..n {
        let id = format!("t{i}");
        let rec = json!({
            "id": id,
            "status": "failed",
            "source": {"file": "gone.jsonl", "line": i + 1},
            "file_id": "gone.0",
            "trace_id": format!("trace{i:08}"),
            "instance": "x",
            "finished_at": "2026-12-07T00:00:00Z",
            "attempts": 1,
            "error": {"kind": "engine_failed", "message": "model error"},
            "task": {"id": id, "input_text": "x", "output_name": id},
        });
        text.push_str(&rec.to_string());
        text.push('\n');
    }
    std::fs::write(env.spool().join("failed.jsonl"), text).unwrap();
}

/// Task ids in the published requeue files, with how often each appears;
/// and how often each trace id is noted in `requeued.jsonl`.
fn requeued(env: &Env) -> (HashMap<String, usize>, HashMap<String, usize>) {
    let mut ids = HashMap::new();
    let pending = env.spool().join("pending");
    for e in std::fs::read_dir(&pending).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("requeue-") && name.ends_with(".jsonl") {
            for v in read_jsonl(&e.path()) {
                *ids.entry(v["id"].as_str().unwrap().to_string())
                    .or_default() += 1;
            }
        }
    }
    let mut traces = HashMap::new();
    let log = env.spool().join("requeued.jsonl");
    if log.exists() {
        let text = std::fs::read_to_string(&log).unwrap();
        for v in text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            for t in v["tasks"].as_array().unwrap() {
                *traces
                    .entry(t["trace_id"].as_str().unwrap().to_string())
                    .or_default() += 1;
            }
        }
    }
    (ids, traces)
}

fn assert_each_requeued_once(env: &Env, n: usize) {
    let (ids, traces) = requeued(env);
    let twice: Vec<_> = ids.iter().filter(|(_, &c)| c > 1).take(5).collect();
    assert!(twice.is_empty(), "tasks queued more than once: {twice:?}");
    assert_eq!(ids.len(), n, "every failed task is queued again");
    assert!(traces.values().all(|&c| c == 1), "a failure noted twice");
    assert_eq!(traces.len(), n);
    let staged: Vec<_> = std::fs::read_dir(env.spool().join("pending"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(staged.is_empty(), "staged files left: {staged:?}");
}

fn requeue_all(env: &Env) -> std::process::Output {
    env.run(&["requeue", "--all"], 120)
}

#[test]
fn a_requeue_killed_at_each_step_requeues_each_task_once() {
    for point in ["requeue-staged", "requeue-noted"] {
        let env = Env::new("");
        write_failures(&env, 500);
        let out = env
            .cmd(&["requeue", "--all"])
            .env("TTSPOOL_FAILPOINT", point)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{point}: the failpoint killed it");
        let out = requeue_all(&env);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let again = requeue_all(&env);
        assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to requeue"));
        assert_each_requeued_once(&env, 500);
    }
}

#[test]
fn a_requeue_of_20000_failures_killed_at_ten_instants_requeues_each_once() {
    let env = Env::new("");
    write_failures(&env, FAILURES);
    // How long a whole run takes here, on a copy.
    let probe = Env::new("");
    write_failures(&probe, FAILURES);
    let t = Instant::now();
    assert!(requeue_all(&probe).status.success());
    let whole = t.elapsed();
    for k in 1..=10u32 {
        let mut child = env
            .cmd(&["requeue", "--all"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(whole * k / 11);
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(requeue_all(&env).status.success());
    assert_each_requeued_once(&env, FAILURES);
}

#[test]
fn two_requeues_at_once_requeue_each_task_once() {
    let env = Env::new("");
    write_failures(&env, FAILURES);
    let spawn = || {
        env.cmd(&["requeue", "--all"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success());
    let said: Vec<String> = [&a, &b]
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .collect();
    assert!(
        said.iter().any(|s| s.contains("nothing to requeue")),
        "one of them found everything requeued: {said:?}"
    );
    assert_each_requeued_once(&env, FAILURES);
}

#[test]
fn status_and_requeue_on_a_missing_spool_folder_say_so() {
    let env = Env::new("");
    std::fs::remove_dir_all(env.spool()).unwrap();
    for args in [&["status"][..], &["requeue", "--all"][..]] {
        let out = env.run(args, 30);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("spool.dir") && err.contains("does not exist"),
            "{args:?}: {err}"
        );
    }
    assert!(!env.spool().exists(), "nothing was created");
}

#[test]
fn run_once_ends_when_the_breaker_has_paused_every_slot_and_hands_the_rest_back() {
    // An engine that always fails (a GPU that is gone, say): the breaker
    // pauses both slots after 3 different tasks; `--once` does not wait
    // through pauses that double forever.
    let env = Env::new("[gpu]\nmax_parallel = 2\n[retry]\nmax_attempts = 5\nbackoff = \"50ms\"\n");
    let content: String = (0..8)
        .map(|i| task_line(&format!("b{i}"), "EXIT1"))
        .collect();
    env.drop_file("b.jsonl", &content);
    let t = Instant::now();
    let out = env.run(&["run", "--once"], 60);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("breaker paused every slot") && stderr.contains("without a record"),
        "{stderr}"
    );
    // Nothing was given up on: each line is failed at most once, the rest
    // is still there for the next run.
    let failed = env.failed();
    let mut ids: Vec<&str> = failed.iter().map(|r| r["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), failed.len(), "a line recorded twice");
    let status = env.run(&["status", "--json"], 30);
    let s: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(s["in_flight"], 0, "every claim was handed back: {s}");
    assert_eq!(
        s["pending_lines"].as_u64().unwrap() as usize + failed.len(),
        8,
        "the rest waits for the next run: {s}"
    );
    assert!(s["paused_slots"].as_object().unwrap().is_empty(), "{s}");
    println!("run --once ended in {:?}", t.elapsed());
}

/// Records per task id, over every log.
fn records_per_id(env: &Env) -> HashMap<String, usize> {
    let mut n = HashMap::new();
    for r in env.all("done").iter().chain(env.all("failed").iter()) {
        *n.entry(r["id"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    n
}

fn daemon_logs(env: &Env, names: &[&str]) -> String {
    names
        .iter()
        .map(|n| {
            std::fs::read_to_string(env.root().join(format!("daemon-{n}.log"))).unwrap_or_default()
        })
        .collect()
}

#[test]
fn a_consumed_file_that_grows_while_the_claim_lock_is_held_gets_one_record_per_line() {
    // Two daemons; a producer keeps its file open and appends to it after
    // it was consumed, while something (a stalled daemon, here the test)
    // holds the claim lock for 2 s. Both daemons queue up behind the lock;
    // the one that gets it first brings the file back.
    let mut env = Env::new("[gpu]\nmax_parallel = 2\n");
    env.spool_extra =
        "poll_interval = \"100ms\"\nsettle = \"100ms\"\nconsume_after = \"300ms\"\n".into();
    env.write_config();
    let mut a = env.spawn("a");
    let mut b = env.spawn("b");
    let path = env.spool().join("pending/grow.jsonl");
    let mut producer = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let consumed = env.spool().join("pending/.consumed");
    let lock_path = env.spool().join(".ttspool/claim.lock");
    let mut written = 0;
    let cycles = 20;
    for cycle in 0..cycles {
        // Wait until the file has been consumed (moved away).
        wait_until(60, "the file to be consumed", || {
            !path.exists() && consumed.read_dir().is_ok_and(|mut d| d.next().is_some())
                || cycle == 0
        });
        let lock = if cycle > 0 {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&lock_path)
                .unwrap();
            f.lock().unwrap();
            Some(f)
        } else {
            None
        };
        for _ in 0..5 {
            use std::io::Write;
            producer
                .write_all(task_line(&format!("g{written}"), "x").as_bytes())
                .unwrap();
            written += 1;
        }
        if let Some(f) = lock {
            std::thread::sleep(std::time::Duration::from_secs(2));
            f.unlock().unwrap();
        }
        wait_until(60, "a record for every line so far", || {
            records_per_id(&env).len() >= written
        });
    }
    sigterm(&a);
    sigterm(&b);
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    let per_id = records_per_id(&env);
    let twice: Vec<_> = per_id.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "lines recorded more than once: {twice:?}");
    assert_eq!(per_id.len(), written, "{per_id:?}");
    let logs = daemon_logs(&env, &["a", "b"]);
    assert!(
        logs.contains("moved it back into pending/"),
        "the file was brought back"
    );
}

#[test]
fn three_thousand_files_through_20_kill_9s_are_all_consumed_without_an_error() {
    let mut env = Env::new("[gpu]\nmax_parallel = 2\n");
    env.spool_extra = "poll_interval = \"200ms\"\nconsume_after = \"1s\"\nlease = \"2s\"\n".into();
    env.write_config();
    let pending = env.spool().join("pending");
    for i in 0..3000 {
        let tmp = pending.join(format!(".f{i}.tmp"));
        std::fs::write(&tmp, task_line(&format!("k{i}"), "x")).unwrap();
        std::fs::rename(&tmp, pending.join(format!("f{i:04}.jsonl"))).unwrap();
    }
    // A small deterministic spread of kill moments.
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    for _ in 0..20 {
        let d = env.spawn("k");
        std::thread::sleep(std::time::Duration::from_millis(150 + rng.next() % 600));
        sigkill(&d);
        let mut d = d;
        d.wait().unwrap();
    }
    let mut d = env.spawn("k");
    let left = || {
        std::fs::read_dir(&pending)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
            .count()
    };
    wait_until(240, "every file to be consumed", || left() == 0);
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    let per_id = records_per_id(&env);
    assert_eq!(per_id.len(), 3000);
    let twice: Vec<_> = per_id.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "lines recorded more than once: {twice:?}");
    let logs = daemon_logs(&env, &["k"]);
    let errors: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("ERROR"))
        .take(5)
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
}
