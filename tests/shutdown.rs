//! SIGTERM while children run: exit 0 within `shutdown.grace`, unfinished
//! tasks handed back, and a restart completes the rest with no duplicates.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn records_once_each(env: &Env, n: usize) {
    let done = env.done();
    let mut lines: Vec<u64> = done
        .iter()
        .map(|d| d["source"]["line"].as_u64().unwrap())
        .collect();
    lines.sort();
    lines.dedup();
    assert_eq!(lines.len(), done.len(), "duplicate records");
    assert_eq!(done.len(), n);
}

#[test]
fn sigterm_lets_running_children_finish_then_restart_completes_the_rest() {
    let mut env = Env::new("[shutdown]\ngrace = \"10s\"\n");
    env.engine_extra.clear();
    env.write_config();
    let content: String = (0..6)
        .map(|i| task_line(&format!("s{i}"), "SLOW"))
        .collect();
    env.drop_file("slow.jsonl", &content);
    let mut d = env.spawn("a");
    wait_until(30, "two children running", || env.starts().len() == 2);
    let t = Instant::now();
    sigterm(&d);
    let st = d.wait().unwrap();
    assert!(st.success(), "{st:?}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    // The two running tasks finished; nothing else started.
    assert_eq!(env.done().len(), 2);
    assert_eq!(env.starts().len(), 2);
    env.run_once();
    records_once_each(&env, 6);
    assert!(env.starts().values().all(|&n| n == 1), "{:?}", env.starts());
}

#[test]
fn sigterm_kills_children_after_the_grace_and_hands_their_tasks_back() {
    let env = Env::new("[shutdown]\ngrace = \"500ms\"\n");
    let content: String = (0..3)
        .map(|i| task_line(&format!("h{i}"), "HANGUNTILRELEASED"))
        .collect();
    env.drop_file("hang.jsonl", &content);
    let mut d = env.spawn("a");
    wait_until(30, "children running", || env.starts().len() == 2);
    let t = Instant::now();
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(env.records(), 0, "killed tasks are handed back, not failed");
    assert!(survivors(&env.engine_pids()).is_empty());
    // Another instance takes the handed-back claims at once (well before
    // spool.lease = 3s would let it take a dead daemon's), and the engine
    // now works: all three complete, once each.
    std::fs::write(env.log().with_extension("log.release"), "").unwrap();
    let t = Instant::now();
    let mut b = env.spawn("b");
    wait_until(60, "three records", || env.records() == 3);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "handed-back tasks waited {:?}",
        t.elapsed()
    );
    sigterm(&b);
    assert!(b.wait().unwrap().success());
    records_once_each(&env, 3);
    assert!(env.done().iter().all(|r| r["instance"] == "b"));
}

#[test]
fn a_second_signal_kills_children_at_once() {
    let env = Env::new("[shutdown]\ngrace = \"60s\"\n");
    env.drop_file("hang.jsonl", &task_line("h", "HANG"));
    let mut d = env.spawn("a");
    wait_until(30, "child running", || env.starts().len() == 1);
    sigterm(&d);
    let log = env.root().join("daemon-a.log");
    wait_until(30, "the first signal taken", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("stopping")
    });
    let t = Instant::now();
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(survivors(&env.engine_pids()).is_empty());
}

#[test]
fn engines_die_with_a_daemon_killed_by_sigkill() {
    // Children are started with clone(CLONE_VM | CLONE_VFORK) and
    // PR_SET_PDEATHSIG: nothing of the daemon is left to clean up after a
    // SIGKILL, and no restart is needed for the engines to go.
    let env = Env::new("");
    let content: String = (0..2)
        .map(|i| task_line(&format!("k{i}"), "IGNORETERM"))
        .collect();
    env.drop_file("stuck.jsonl", &content);
    let mut d = env.spawn("a");
    wait_until(30, "two engines running", || env.engine_pids().len() == 2);
    let pids = env.engine_pids();
    assert!(survivors(&pids).len() >= 2, "engines are running");
    sigkill(&d);
    d.wait().unwrap();
    wait_until(10, "the engines to die with the daemon", || {
        survivors(&pids).is_empty()
    });
    assert_eq!(env.records(), 0);
}
