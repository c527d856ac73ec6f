//! Descriptors running out (issue 21): a claim round holds one file open at
//! a time, an error reading a file's identity is never "a new file", and a
//! daemon started under `ulimit -n 256` with thousands of files waiting and
//! an API client posting meanwhile records every line exactly once and does
//! not exit.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const FILES: usize = 2000;

fn post(port: u16, body: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let req = format!(
        "POST /v1/tasks HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    answer.split(' ').nth(1)?.parse().ok()
}

fn spawn_limited(env: &Env, nofile: u32) -> Child {
    let bin = env!("CARGO_BIN_EXE_ttspool");
    let log = std::fs::File::create(env.root().join("daemon-limited.log")).unwrap();
    Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {nofile} && exec \"$0\" -c \"$1\" run"))
        .arg(bin)
        .arg(env.config())
        .env("FAKE_LOG", env.log())
        .env("FAKE_WAV", env.root().join("tiny.wav"))
        .env("TTSPOOL_LOG", "info")
        .current_dir(env.root())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap()
}

#[test]
fn two_thousand_files_and_an_api_client_under_ulimit_256_get_one_record_each() {
    files_and_an_api_client_under(256, FILES, 20);
}

/// So few descriptors that they do run out (the API's connections, the
/// engine's pipes, the claim lock): claims, records, spawns and outputs
/// wait for them and go on; nothing is doubled, lost, failed or flooded.
#[test]
fn descriptors_that_run_out_pause_and_recover() {
    files_and_an_api_client_under(30, 500, 10);
}

fn files_and_an_api_client_under(nofile: u32, files: usize, secs: u64) {
    let port = free_port();
    let mut env = Env::new(&format!(
        "[gpu]\nmax_parallel = 2\n[api]\nlisten = \"127.0.0.1:{port}\"\n"
    ));
    // API files stay in pending/ for 30 s, as in the field.
    env.spool_extra = "consume_after = \"30s\"\npoll_interval = \"200ms\"\n".into();
    env.write_config();
    let pending = env.spool().join("pending");
    for i in 0..files {
        let tmp = pending.join(format!(".d{i}.tmp"));
        std::fs::write(&tmp, task_line(&format!("d{i}"), "x")).unwrap();
        std::fs::rename(&tmp, pending.join(format!("d{i:05}.jsonl"))).unwrap();
    }
    let mut d = spawn_limited(&env, nofile);
    // 50 requests a second for 20 s.
    let mut posted = Vec::new();
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        let id = format!("api{n}");
        n += 1;
        // Refused or not up yet: the client tries a new task later.
        if post(port, task_line(&id, "x").trim_end()) == Some(202) {
            posted.push(id);
        }
        let due = start + Duration::from_millis(20 * n as u64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if let Some(st) = d.try_wait().unwrap() {
            let log = std::fs::read_to_string(env.root().join("daemon-limited.log")).unwrap();
            let notable: Vec<&str> = log.lines().filter(|l| !l.contains(" INFO ")).collect();
            let notable = &notable[notable.len().saturating_sub(12)..];
            panic!("the daemon exited ({st:?}):\n{}", notable.join("\n"));
        }
    }
    assert!(
        posted.len() > 300,
        "only {} requests were accepted",
        posted.len()
    );
    let expected: Vec<String> = (0..files)
        .map(|i| format!("d{i}"))
        .chain(posted.iter().cloned())
        .collect();
    // Read while the daemon appends: a last line still being written is
    // left for the next look.
    let per_id = || {
        let mut m: HashMap<String, usize> = HashMap::new();
        for log in ["done.jsonl", "failed.jsonl"] {
            let text = std::fs::read_to_string(env.spool().join(log)).unwrap_or_default();
            let complete = text.rsplit_once('\n').map_or("", |(a, _)| a);
            for l in complete.lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                *m.entry(v["id"].as_str().unwrap_or("?").to_string())
                    .or_default() += 1;
            }
        }
        m
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        let have = per_id();
        if expected.iter().all(|id| have.contains_key(id)) {
            break;
        }
        if let Some(st) = d.try_wait().unwrap() {
            let log = std::fs::read_to_string(env.root().join("daemon-limited.log")).unwrap();
            let notable: Vec<&str> = log.lines().filter(|l| !l.contains(" INFO ")).collect();
            let notable = &notable[notable.len().saturating_sub(12)..];
            panic!("the daemon exited ({st:?}):\n{}", notable.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    sigterm(&d);
    let st = d.wait().unwrap();
    let log = std::fs::read_to_string(env.root().join("daemon-limited.log")).unwrap();
    assert!(
        st.success(),
        "exit {st:?}\n{}",
        &log[log.len().saturating_sub(3000)..]
    );
    let per_id = per_id();
    let twice: Vec<_> = per_id.iter().filter(|(_, &c)| c > 1).take(10).collect();
    assert!(twice.is_empty(), "recorded twice: {twice:?}");
    for id in &expected {
        assert_eq!(per_id.get(id), Some(&1), "{id} has no record");
    }
    assert!(env.failed().is_empty(), "{:?}", env.failed().first());
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(
        errors.len() < 20,
        "{} ERROR lines: the log is flooded; the first:\n{}",
        errors.len(),
        errors[..10].join("\n")
    );
}
