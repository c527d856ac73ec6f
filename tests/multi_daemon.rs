//! Three daemons (separate processes, distinct instances) share one spool:
//! every line gets exactly one record and no task starts twice.

mod common;

use std::collections::HashMap;

use common::*;

#[test]
fn three_daemons_run_each_of_3000_tasks_once() {
    let env = Env::new("[gpu]\nmax_parallel = 2\n");
    let mut daemons: Vec<_> = ["alpha", "beta", "gamma"]
        .iter()
        .map(|i| env.spawn(i))
        .collect();
    // Three files, dropped while the daemons run.
    for f in 0..3 {
        let content: String = (0..1000)
            .map(|i| task_line(&format!("f{f}_{i}"), "same text"))
            .collect();
        env.drop_file(&format!("batch{f}.jsonl"), &content);
    }
    wait_until(300, "3000 records", || env.records() >= 3000);
    for d in &daemons {
        sigterm(d);
    }
    for d in &mut daemons {
        assert!(d.wait().unwrap().success());
    }
    let done = env.done();
    assert!(env.failed().is_empty(), "{:#?}", &env.failed()[..1]);
    assert_eq!(done.len(), 3000);
    let mut per_line: HashMap<(String, u64), usize> = HashMap::new();
    let mut per_instance: HashMap<String, usize> = HashMap::new();
    for d in &done {
        assert_eq!(d["status"], "completed");
        let key = (
            d["source"]["file"].as_str().unwrap().to_string(),
            d["source"]["line"].as_u64().unwrap(),
        );
        *per_line.entry(key).or_default() += 1;
        *per_instance
            .entry(d["instance"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(per_line.len(), 3000);
    assert!(per_line.values().all(|&n| n == 1));
    let starts = env.starts();
    assert_eq!(starts.len(), 3000);
    let twice: Vec<_> = starts.iter().filter(|(_, &n)| n != 1).collect();
    assert!(twice.is_empty(), "started more than once: {twice:?}");
    // All three took part.
    assert_eq!(per_instance.len(), 3, "{per_instance:?}");
}

#[test]
fn a_dead_daemons_claims_are_taken_over_by_another_within_the_lease() {
    let env = Env::new("");
    let content: String = (0..4)
        .map(|i| task_line(&format!("d{i}"), "HANGUNTILRELEASED"))
        .collect();
    env.drop_file("d.jsonl", &content);
    let mut a = env.spawn("a");
    wait_until(30, "a's children running", || env.starts().len() == 2);
    sigkill(&a);
    a.wait().unwrap();
    // a's engines died with it (PR_SET_PDEATHSIG).
    wait_until(10, "a's engines gone", || {
        survivors(&env.engine_pids()).is_empty()
    });
    std::fs::write(env.log().with_extension("log.release"), "").unwrap();
    let mut b = env.spawn("b");
    // spool.lease is 3s in tests: b takes over once a's heartbeat is that old.
    wait_until(30, "four records", || env.records() == 4);
    sigterm(&b);
    assert!(b.wait().unwrap().success());
    let done = env.done();
    assert!(done
        .iter()
        .all(|r| r["instance"] == "b" && r["status"] == "completed"));
    let blog = std::fs::read_to_string(env.root().join("daemon-b.log")).unwrap();
    assert!(
        blog.contains("took over lease") && blog.contains("from=a"),
        "{blog}"
    );
}

#[test]
fn a_second_daemon_with_the_same_instance_is_refused() {
    let env = Env::new("");
    let mut a = env.spawn("same");
    wait_until(10, "a started", || {
        std::fs::read_to_string(env.root().join("daemon-same.log"))
            .unwrap_or_default()
            .contains("ttspool started")
    });
    let out = env
        .cmd_with(&env.instance_config("same"), &["run"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already running") && err.contains("spool.instance"),
        "{err}"
    );
    sigterm(&a);
    assert!(a.wait().unwrap().success());
}

#[test]
fn a_daemon_whose_spool_folder_is_replaced_stops() {
    // Its instance lock would be in the deleted folder: a second daemon of
    // the same name could then lock the new one and take our claims as its
    // own, while our heartbeats went to a deleted file.
    let env = Env::new("");
    let mut a = env.spawn("same");
    let log = || std::fs::read_to_string(env.root().join("daemon-same.log")).unwrap_or_default();
    wait_until(10, "a started", || log().contains("ttspool started"));
    let spool = env.spool();
    std::fs::rename(&spool, env.root().join("old-spool")).unwrap();
    std::fs::create_dir_all(spool.join("pending")).unwrap();
    let mut status = None;
    wait_until(10, "a stopped", || {
        status = a.try_wait().unwrap();
        status.is_some()
    });
    assert!(!status.unwrap().success());
    assert!(
        log().contains("spool folder was removed or replaced"),
        "{}",
        log()
    );
    // A daemon of the same name now runs normally on the new folder.
    env.drop_file("t.jsonl", &task_line("t1", "hello"));
    env.run_once();
    assert_eq!(env.done().len(), 1);
}

#[test]
fn a_restart_kills_grandchildren_its_killed_predecessor_left_behind() {
    let env = Env::new("[shutdown]\ngrace = \"200ms\"\n");
    env.drop_file("h.jsonl", &task_line("h", "HANG"));
    let mut a = env.spawn("a");
    wait_until(30, "the engine running", || env.starts().len() == 1);
    sigkill(&a);
    a.wait().unwrap();
    // The shell died with the daemon; its `sleep 1000 &` did not.
    let pids = env.engine_pids();
    wait_until(10, "the shell gone", || {
        !std::path::Path::new(&format!("/proc/{}/cmdline", pids[0])).exists()
            || survivors(&pids).iter().all(|s| !s.contains("(fake.sh)"))
    });
    assert!(
        !survivors(&pids).is_empty(),
        "expected an orphaned grandchild"
    );
    let mut a2 = env.spawn("a");
    wait_until(10, "the orphans killed", || survivors(&pids).is_empty());
    sigterm(&a2);
    assert!(a2.wait().unwrap().success());
    let log = std::fs::read_to_string(env.root().join("daemon-a.log")).unwrap();
    assert!(log.contains("killed processes left behind"), "{log}");
}
