//! A daemon wrongly judged dead — paused past its lease by SIGSTOP, as a
//! GC-like pause, a stalled NFS call or a frozen VM would — must never cost a
//! line its record. Real daemons, real signals.

mod common;

use std::collections::HashMap;
use std::process::Child;
use std::time::{Duration, Instant};

use common::*;

/// Every record, by (file, line): how many each line has.
fn per_line(env: &Env) -> HashMap<(String, u64), usize> {
    let mut out = HashMap::new();
    for r in env.done().into_iter().chain(env.failed()) {
        let key = (
            r["source"]["file"].as_str().unwrap().to_string(),
            r["source"]["line"].as_u64().unwrap(),
        );
        *out.entry(key).or_default() += 1;
    }
    out
}

#[test]
fn a_daemon_paused_past_its_lease_costs_no_line_its_record() {
    let mut env = Env::new("[gpu]\nmax_parallel = 2\n");
    env.spool_extra = "lease = \"3s\"".into();
    env.write_config();
    // Two lines run at once; two more wait in a's queue.
    let lines: String = (0..4)
        .map(|i| task_line(&format!("p{i}"), "SLEEP6"))
        .collect();
    env.drop_file("p.jsonl", &lines);
    let mut a = env.spawn("a");
    wait_until(30, "a starts two tasks", || env.starts().len() == 2);
    signal(&a, "STOP");
    let mut b = env.spawn("b");
    let started_twice = |env: &Env| env.starts().values().filter(|&&n| n == 2).count();
    wait_until(30, "b takes a's lines over and starts two", || {
        started_twice(&env) == 2
    });
    // a wakes while b runs the lines: its beat is late, so it checks its
    // leases, finds them lost, stops its children and starts nothing more;
    // its records, if any, are fenced, and it leaves b's lease alone.
    signal(&a, "CONT");
    wait_until(60, "a record for each line", || per_line(&env).len() == 4);
    wait_until(30, "the file consumed", || {
        std::fs::read_dir(env.spool().join("pending"))
            .unwrap()
            .flatten()
            .all(|e| e.file_name().to_string_lossy().starts_with('.'))
    });
    sigterm(&a);
    sigterm(&b);
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let lines = per_line(&env);
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines.values().all(|&n| n == 1), "{lines:?}");
    assert!(env.failed().is_empty(), "{:#?}", env.failed());
    let done = env.done();
    assert!(done.iter().all(|r| r["instance"] == "b"), "{done:#?}");
    // a started nothing after it woke: the queued lines ran once, on b.
    let starts = env.starts();
    assert_eq!(starts.values().sum::<usize>(), 6, "{starts:?}");
    let log_a = std::fs::read_to_string(env.root().join("daemon-a.log")).unwrap();
    assert!(log_a.contains("our heartbeat was late"), "{log_a}");
    assert!(log_a.contains("lost a lease to another daemon"), "{log_a}");
}

#[test]
fn three_daemons_under_random_pauses_record_each_line_once() {
    let mut env = Env::new("[gpu]\nmax_parallel = 2\n");
    env.spool_extra = "lease = \"2s\"".into();
    env.write_config();
    let names = ["x", "y", "z"];
    let mut daemons: Vec<Child> = names.iter().map(|n| env.spawn(n)).collect();
    let content: String = (0..300)
        .map(|i| task_line(&format!("r{i}"), "NAP"))
        .collect();
    env.drop_file("r.jsonl", &content);
    // A small deterministic generator: the same pauses on every run.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let started = Instant::now();
    let mut paused: Vec<Option<Instant>> = vec![None; 3];
    while started.elapsed() < Duration::from_secs(45) && per_line(&env).len() < 300 {
        let i = rand(3) as usize;
        match paused[i] {
            None if paused.iter().filter(|p| p.is_some()).count() < 2 => {
                signal(&daemons[i], "STOP");
                // 0.3 to 5 s
                paused[i] = Some(Instant::now() + Duration::from_millis(300 + rand(4700)));
            }
            _ => {}
        }
        for (j, p) in paused.iter_mut().enumerate() {
            if p.is_some_and(|until| until <= Instant::now()) {
                signal(&daemons[j], "CONT");
                *p = None;
            }
        }
        std::thread::sleep(Duration::from_millis(100 + rand(400)));
    }
    for (j, p) in paused.iter().enumerate() {
        if p.is_some() {
            signal(&daemons[j], "CONT");
        }
    }
    wait_until(120, "a record for each of 300 lines", || {
        per_line(&env).len() == 300
    });
    for d in &daemons {
        sigterm(d);
    }
    for d in &mut daemons {
        assert!(d.wait().unwrap().success());
    }
    let lines = per_line(&env);
    assert_eq!(lines.len(), 300);
    let twice: Vec<_> = lines.iter().filter(|(_, &n)| n != 1).collect();
    assert!(
        twice.is_empty(),
        "lines with more than one record: {twice:?}"
    );
    assert!(env.failed().is_empty(), "{:#?}", env.failed());
}

/// The beat counter in `<instance>.alive`.
fn beat(env: &Env, instance: &str) -> Option<u64> {
    let p = env
        .spool()
        .join(".ttspool/instances")
        .join(format!("{instance}.alive"));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    v["beat"].as_u64()
}

#[test]
fn a_dns_server_that_never_answers_holds_up_neither_beats_nor_claims() {
    // A name server that takes queries and never answers.
    let Ok(blackhole) = std::net::UdpSocket::bind("127.0.0.2:53") else {
        eprintln!("skipped: cannot bind 127.0.0.2:53 (needs root)");
        return;
    };
    if std::process::Command::new("unshare")
        .args(["--mount", "true"])
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        eprintln!("skipped: unshare --mount is not available (needs root)");
        return;
    }
    let mut env = Env::new(
        "[gpu]\nmax_parallel = 2\n[webhook]\nsecret = \"whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD\"\nmax_in_flight = 16\n",
    );
    env.spool_extra = "lease = \"2s\"".into();
    env.write_config();
    let resolv = env.root().join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 127.0.0.2\noptions timeout:5 attempts:2\n",
    )
    .unwrap();
    // 16 tasks whose webhooks need a lookup that hangs.
    let hooks: String = (0..16)
        .map(|i| {
            format!(
                "{{\"id\":\"h{i}\",\"input_text\":\"x\",\"output_name\":\"h{i}\",\"callback_url\":\"http://hook{i}.ttspool-test.invalid/cb\"}}\n"
            )
        })
        .collect();
    env.drop_file("hooks.jsonl", &hooks);
    let spawn = |name: &str| {
        let log = std::fs::File::create(env.root().join(format!("daemon-{name}.log"))).unwrap();
        std::process::Command::new("unshare")
            .arg("--mount")
            .arg("sh")
            .arg("-c")
            .arg(format!(
                "mount --bind {} /etc/resolv.conf && exec {} -c {} run",
                resolv.display(),
                BIN,
                env.instance_config(name).display()
            ))
            .env("FAKE_LOG", env.log())
            .env("FAKE_WAV", env.root().join("tiny.wav"))
            .current_dir(env.root())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    let mut daemons = [spawn("a"), spawn("b")];
    wait_until(30, "the 16 hooked tasks recorded", || {
        per_line(&env).len() == 16
    });
    // While the lookups hang: more work, and both daemons' beats watched.
    let work: String = (0..100)
        .map(|i| task_line(&format!("w{i}"), "NAP"))
        .collect();
    env.drop_file("work.jsonl", &work);
    let mut last: HashMap<&str, (Option<u64>, Instant)> = HashMap::new();
    let mut worst = Duration::ZERO;
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until || per_line(&env).len() < 116 {
        assert!(
            Instant::now() < until + Duration::from_secs(60),
            "the work did not finish while lookups hung"
        );
        for name in ["a", "b"] {
            let b = beat(&env, name);
            let e = last.entry(name).or_insert((b, Instant::now()));
            if e.0 != b {
                *e = (b, Instant::now());
            }
            worst = worst.max(e.1.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(env.root().join("daemon-a.log")).unwrap();
    drop(blackhole);
    for d in &daemons {
        sigterm(d);
    }
    for d in &mut daemons {
        assert!(d.wait().unwrap().success());
    }
    assert!(
        worst < Duration::from_secs(1),
        "a heartbeat stood still for {worst:?} (lease 2s): {log}"
    );
    let starts = env.starts();
    let twice: Vec<_> = starts.iter().filter(|(_, &n)| n != 1).collect();
    assert!(twice.is_empty(), "run twice: {twice:?}");
    assert_eq!(per_line(&env).len(), 116);
    assert!(per_line(&env).values().all(|&n| n == 1));
}
