//! The `http` engine against a fake Fish Speech server that keeps the real
//! one's contract (tests/engines/fish_server.py: one request at a time,
//! base64 references, JSON errors) and misbehaves on purpose, and against
//! a fake OpenAI-style server.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A fake server process; killed on drop.
struct Server {
    child: Child,
    port: u16,
    stats: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server(dir: &Path, port: u16, args: &[&str]) -> Server {
    let stats = dir.join(format!("stats-{port}.json"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/engines/fish_server.py");
    let child = Command::new("python3")
        .arg(script)
        .args(["--port", &port.to_string(), "--stats"])
        .arg(&stats)
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .expect("python3");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the fake server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server { child, port, stats }
}

fn stats(s: &Server) -> serde_json::Value {
    fs::read(&s.stats)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// An env whose engine is the http engine on `servers`; `engine` adds
/// lines to [engine], `extra` lines to [retry] and then whole tables.
fn http_env(servers: &[&Server], engine: &str, extra: &str) -> Env {
    let mut env = Env::new(&format!("[retry]\nbackoff = \"100ms\"\n{extra}"));
    let urls: Vec<String> = servers
        .iter()
        .map(|s| format!("\"http://127.0.0.1:{}/v1/tts\"", s.port))
        .collect();
    env.engine_extra = format!(
        "kind = \"http\"\nurls = [{}]\ntimeout = \"3s\"\n{engine}",
        urls.join(", ")
    );
    env.write_config();
    env
}

fn kinds(env: &Env) -> Vec<String> {
    env.failed()
        .iter()
        .map(|r| r["error"]["kind"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn two_fish_speech_servers_take_a_backlog_one_request_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let voice = dir.path().join("voices");
    fs::create_dir_all(&voice).unwrap();
    let clip: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(voice.join("clerk.wav"), &clip).unwrap();
    let clip_path = voice.join("clerk.wav");
    let expect = ["--expect-ref", clip_path.to_str().unwrap()];
    let (a, b) = (
        server(dir.path(), free_port(), &expect),
        server(dir.path(), free_port(), &expect),
    );
    let env = http_env(
        &[&a, &b],
        &format!("voices_dir = \"{}\"", voice.display()),
        "",
    );
    let lines: String = (0..200)
        .map(|i| {
            format!(
                "{{\"id\":\"f{i}\",\"input_text\":\"您好 {i}\",\"output_name\":\"f{i}\",\"prompt_audio\":\"clerk.wav\",\"prompt_text\":\"您好\"}}\n"
            )
        })
        .collect();
    env.drop_file("fish.jsonl", &lines);
    let mut d = env.spawn("a");
    wait_until(120, "200 records", || env.records() >= 200);
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    let done = env.done();
    assert_eq!(done.len(), 200, "{:?}", kinds(&env));
    let mut ids: Vec<&str> = done.iter().map(|r| r["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200, "a task was recorded twice");
    assert!(is_wav(&env.out().join("f7.wav")));
    for s in [&a, &b] {
        let st = stats(s);
        assert_eq!(st["max_in_flight"], 1, "never two requests at once: {st}");
        assert!(
            st["requests"].as_u64().unwrap() > 20,
            "both servers work: {st}"
        );
    }
    assert_eq!(done[0]["engine"], "http:fish-speech");
}

#[test]
fn every_failure_ends_in_the_right_record() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), free_port(), &[]);
    // Several different tasks fail on purpose here: no breaker (its
    // line lands in [retry]).
    let env = http_env(&[&s], "", "break_after = 0\n");
    let lines = [
        ("rejected", "REJECT400"),
        ("garbage", "GARBAGE"),
        ("fails", "FAIL500"),
        ("closes", "CLOSEMID"),
        ("busy", "BUSY503"),
        ("good", "fine"),
    ]
    .iter()
    .map(|(id, text)| task_line(id, text))
    .collect::<String>();
    env.drop_file("f.jsonl", &lines);
    let out = env.run(&["run", "--once"], 180);
    let err = String::from_utf8_lossy(&out.stderr);
    let by_id = |id: &str| -> serde_json::Value {
        env.all("failed")
            .into_iter()
            .chain(env.all("done"))
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("no record for {id}: {err}"))
    };
    let rejected = by_id("rejected");
    assert_eq!(rejected["error"]["kind"], "engine_rejected");
    assert_eq!(rejected["attempts"], 1, "a refusal is not retried");
    assert!(
        rejected["error"]["message"]
            .as_str()
            .unwrap()
            .contains("text too long for this model"),
        "{rejected}"
    );
    assert_eq!(by_id("garbage")["error"]["kind"], "invalid_output");
    for id in ["fails", "closes", "busy"] {
        let r = by_id(id);
        assert_eq!(r["error"]["kind"], "engine_failed", "{r}");
    }
    assert_eq!(by_id("good")["status"], "completed");
    // A server that never answers (and, one request at a time like Fish
    // Speech, answers nobody else meanwhile): its own server.
    let h = server(dir.path(), free_port(), &[]);
    let env = http_env(&[&h], "", "break_after = 0\nmax_attempts = 1\n");
    env.drop_file("h.jsonl", &task_line("hangs", "HANG"));
    env.run(&["run", "--once"], 60);
    let f = env.failed();
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["error"]["kind"], "timeout", "{}", f[0]);
}

#[test]
fn a_broken_server_is_paused_while_the_other_takes_the_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let (broken, good) = (
        server(dir.path(), free_port(), &["--mode", "fail"]),
        server(dir.path(), free_port(), &[]),
    );
    let env = http_env(&[&broken, &good], "", "");
    let lines: String = (0..60).map(|i| task_line(&format!("t{i}"), "x")).collect();
    env.drop_file("f.jsonl", &lines);
    let mut d = env.spawn("a");
    wait_until(120, "60 records", || env.records() >= 60);
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    assert_eq!(env.done().len(), 60, "{:?}", kinds(&env));
    assert!(env.failed().is_empty());
    let log = fs::read_to_string(env.root().join("daemon-a.log")).unwrap();
    assert!(log.contains("pausing it"), "{log}");
    let tried = stats(&broken)["requests"].as_u64().unwrap();
    assert!(tried < 20, "the broken server was tried {tried} times");
}

#[test]
fn a_server_killed_and_restarted_mid_run_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let slow = ["--delay", "0.02"];
    let mut a = server(dir.path(), port, &slow);
    let b = server(dir.path(), free_port(), &slow);
    let env = http_env(&[&a, &b], "", "");
    let lines: String = (0..150).map(|i| task_line(&format!("k{i}"), "x")).collect();
    env.drop_file("f.jsonl", &lines);
    let mut d = env.spawn("a");
    wait_until(60, "some records", || env.records() >= 20);
    let _ = a.child.kill();
    let _ = a.child.wait();
    wait_until(60, "more records", || env.records() >= 60);
    a = server(dir.path(), port, &slow);
    wait_until(120, "150 records", || env.records() >= 150);
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    drop(a);
    let done = env.done();
    assert_eq!(done.len(), 150, "{:?}", kinds(&env));
    let mut ids: Vec<&str> = done.iter().map(|r| r["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 150);
}

#[test]
fn a_wrong_token_pauses_instead_of_failing() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), free_port(), &["--api-key", "right-key"]);
    let token = dir.path().join("token");
    fs::write(&token, "wrong-key\n").unwrap();
    let env = http_env(&[&s], &format!("token_file = \"{}\"", token.display()), "");
    let lines: String = (0..10).map(|i| task_line(&format!("w{i}"), "x")).collect();
    env.drop_file("f.jsonl", &lines);
    let mut d = env.spawn("a");
    let log = env.root().join("daemon-a.log");
    wait_until(60, "the pause", || {
        fs::read_to_string(&log).is_ok_and(|l| l.contains("every slot is paused"))
    });
    let st = env.run(&["status", "--json"], 30);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["paused_slots"]["a"], serde_json::json!([0]), "{v}");
    // When the pause is over the server is asked (POST /v1/health), not
    // given a task: the refused token costs no task an attempt.
    wait_until(30, "the probe", || {
        fs::read_to_string(&log).is_ok_and(|l| l.contains("probe failed"))
    });
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    assert!(env.failed().is_empty(), "{:?}", env.failed());
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("401") && text.contains("token"), "{text}");
    assert!(!text.contains("wrong-key"), "the token is never logged");
    // `check` says so too.
    let out = env.run(&["check"], 30);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("refuses our token"),
        "{err}"
    );
}

#[test]
fn an_openai_style_server_is_asked_not_to_stream() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), free_port(), &["--openai"]);
    let mut env = http_env(
        &[&s],
        "preset = \"openai\"\nbody = { model = \"kokoro\", voice = \"af_bella\" }",
        "",
    );
    env.engine_extra = env.engine_extra.replace("/v1/tts", "/v1/audio/speech");
    env.write_config();
    env.drop_file("f.jsonl", &task_line("oa1", "hello"));
    let out = env.run_once();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.done().len(), 1, "{:?}", env.failed());
    assert!(is_wav(&env.out().join("oa1.wav")));
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Issue 21, 5 and 9: a server's answer is read within bounds.
#[test]
fn a_huge_error_body_is_not_read_into_memory_and_a_huge_retry_after_is_capped() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), free_port(), &[]);
    let env = http_env(&[&s], "", "max_attempts = 2\nbreak_after = 0\n");
    let mut d = env.spawn("h");
    wait_until(30, "the daemon up", || {
        fs::read_to_string(env.root().join("daemon-h.log")).is_ok_and(|l| l.contains("ttspool"))
    });
    assert!(
        d.try_wait().unwrap().is_none(),
        "{}",
        fs::read_to_string(env.root().join("daemon-h.log")).unwrap()
    );
    let idle = rss_kib(d.id(), "VmRSS:");
    env.drop_file(
        "h.jsonl",
        &(task_line("huge", "HUGEERROR") + &task_line("forever", "RETRYFOREVER")),
    );
    wait_until(120, "the huge error recorded", || {
        env.failed().iter().any(|r| r["id"] == "huge")
    });
    let peak = rss_kib(d.id(), "VmHWM:");
    let huge = env
        .failed()
        .into_iter()
        .find(|r| r["id"] == "huge")
        .unwrap();
    assert_eq!(huge["error"]["kind"], "engine_rejected", "{huge}");
    assert!(
        peak < idle + 64 * 1024,
        "peak RSS {peak} KiB against {idle} KiB idle: the body was read"
    );
    // Retry-After: 1e9 is obeyed only up to the cap: the task is not left
    // claimed for 31 years.
    let log = fs::read_to_string(env.root().join("daemon-h.log")).unwrap();
    assert!(!log.contains("31years"), "an uncapped wait in the log");
    let waits: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("id=forever") && l.contains("wait="))
        .collect();
    assert!(
        waits
            .iter()
            .all(|l| l.contains("wait=5m") || l.contains("wait=4m")),
        "{waits:#?}"
    );
    assert!(!waits.is_empty(), "the task waits to be retried");
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    println!("idle RSS {idle} KiB, peak {peak} KiB");
}

/// Issue 21, 4: a server URL's credentials never reach a record or the log.
#[test]
fn credentials_in_an_engine_url_stay_out_of_records_and_logs() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), free_port(), &[]);
    let mut env = Env::new("[retry]\nbackoff = \"100ms\"\nmax_attempts = 1\n");
    env.engine_extra = format!(
        "kind = \"http\"\nurls = [\"http://user:S3CRETPASS@127.0.0.1:{}/v1/tts?api_key=S3CRETKEY\"]\ntimeout = \"3s\"\n",
        s.port
    );
    env.write_config();
    // One failing answer, and one server that is not there at all.
    env.drop_file("c.jsonl", &task_line("fails", "FAIL500"));
    let out = env.run(&["run", "--once"], 60);
    let failed = env.failed();
    assert_eq!(failed.len(), 1, "{}", String::from_utf8_lossy(&out.stderr));
    let text = serde_json::to_string(&failed).unwrap() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("127.0.0.1"),
        "the server is still named: {text}"
    );
    assert!(!text.contains("S3CRET"), "a secret leaked: {text}");
    drop(s);
    env.drop_file("d.jsonl", &task_line("down", "x"));
    let out = env.run(&["run", "--once"], 60);
    let text =
        serde_json::to_string(&env.failed()).unwrap() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("S3CRET"), "a secret leaked: {text}");
}

/// Issue 21, 10: a daemon whose TTS server is down hands back the lines it
/// claimed, and a daemon whose server works does them within a lease.
#[test]
fn a_host_whose_server_is_down_hands_its_claimed_lines_to_a_healthy_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), free_port(), &[]);
    let env = http_env(&[&s], "", "max_attempts = 5\n");
    let dead_port = free_port();
    let spawn = |name: &str, port: u16| {
        let path = env.instance_config(name);
        let text = fs::read_to_string(&path).unwrap().replace(
            &format!("127.0.0.1:{}/", s.port),
            &format!("127.0.0.1:{port}/"),
        );
        fs::write(&path, text).unwrap();
        env.cmd_with(&path, &["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                fs::File::create(env.root().join(format!("daemon-{name}.log"))).unwrap(),
            ))
            .spawn()
            .unwrap()
    };
    let mut down = spawn("down", dead_port);
    let content: String = (0..20).map(|i| task_line(&format!("h{i}"), "x")).collect();
    env.drop_file("h.jsonl", &content);
    let log = |name: &str| {
        fs::read_to_string(env.root().join(format!("daemon-{name}.log"))).unwrap_or_default()
    };
    wait_until(60, "the down host to hand its lines back", || {
        log("down").contains("handing the tasks claimed here back")
    });
    let started = Instant::now();
    let mut up = spawn("up", s.port);
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.done().len() < 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let notable = |name: &str| -> String {
        log(name)
            .lines()
            .filter(|l| !l.contains("stage=\"completed\"") && !l.contains("stage=\"started\""))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        env.done().len(),
        20,
        "down:\n{}\nup:\n{}",
        notable("down"),
        notable("up")
    );
    let took = started.elapsed();
    let lease = Duration::from_secs(3);
    assert!(
        took < lease + Duration::from_secs(5),
        "the healthy host took {took:?}:\n{}",
        log("down")
    );
    for d in [&mut down, &mut up] {
        sigterm(d);
        assert!(d.wait().unwrap().success());
    }
    assert!(env.failed().is_empty(), "{:?}", env.failed());
    let mut ids: Vec<String> = env
        .done()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20);
    assert!(env.done().iter().all(|r| r["instance"] == "up"));
}
