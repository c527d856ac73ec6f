//! Running for months: systemd notification and watchdog, daemonize with a
//! pid file.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::*;

#[test]
fn systemd_hears_ready_and_watchdog_pings() {
    let env = Env::new("");
    let sock_path = env.root().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut d = env
        .cmd(&["run"])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !(seen.iter().any(|m: &String| m.contains("READY=1"))
        && seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2)
    {
        let n = sock.recv(&mut buf).expect("a notification within 20s");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    // READY comes once the spool is open and claims are recovered.
    assert!(seen.iter().position(|m| m.contains("READY=1")).is_some());
    let mut rest = Vec::new();
    while let Ok(n) = {
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        sock.recv(&mut buf)
    } {
        rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(rest.iter().any(|m| m.contains("STOPPING=1")), "{rest:?}");
}

#[test]
fn engines_never_inherit_the_notify_socket() {
    let mut env = Env::new("");
    // An engine that writes its environment into its output name's log.
    let script = env.root().join("envdump.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nenv > \"$FAKE_LOG.env\"\ncp \"$FAKE_WAV\" \"$1\"\n",
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    env.engine_extra = format!("argv = [\"{}\", \"{{output}}\"]", script.display());
    env.write_config();
    env.drop_file("a.jsonl", &task_line("e1", "x"));
    let out = env
        .cmd(&["run", "--once"])
        .env("NOTIFY_SOCKET", "/nonexistent/sock")
        .env("WATCHDOG_USEC", "1000000")
        .env("WATCHDOG_PID", "1")
        .output()
        .unwrap();
    assert!(out.status.success());
    let dump = std::fs::read_to_string(env.log().with_extension("log.env")).unwrap();
    assert!(
        !dump.contains("NOTIFY_SOCKET") && !dump.contains("WATCHDOG_"),
        "{dump}"
    );
    assert!(dump.contains("TTSPOOL_TASK_ID=e1") && dump.contains("TTSPOOL_SLOT="));
}

#[test]
fn daemonize_with_a_pidfile_refuses_a_second_and_takes_over_a_stale_one() {
    let env = Env::new("");
    let pidfile = env.root().join("ttspool.pid");
    let log = env.root().join("daemon.log");
    let start = || {
        env.cmd(&["run", "--daemonize", "--pidfile", pidfile.to_str().unwrap()])
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .status()
            .unwrap()
    };
    assert!(start().success());
    wait_until(10, "the pid file", || {
        std::fs::read_to_string(&pidfile).is_ok_and(|s| s.trim().parse::<i32>().is_ok())
    });
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    // It works in the background.
    env.drop_file("a.jsonl", &task_line("bg", "x"));
    wait_until(30, "the task", || env.done().len() == 1);
    // A second one is refused and names the pid.
    let second = env
        .cmd(&["run", "--daemonize", "--pidfile", pidfile.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains(&format!("already running as pid {pid}")),
        "{err}"
    );
    // Stop it; the pid file is left behind, stale.
    std::process::Command::new("kill")
        .arg(pid.to_string())
        .status()
        .unwrap();
    wait_until(30, "the daemon to exit", || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
    assert!(pidfile.exists());
    assert!(start().success(), "a stale pid file is taken over");
    wait_until(10, "a new pid", || {
        std::fs::read_to_string(&pidfile)
            .is_ok_and(|s| s.trim().parse::<i32>().is_ok_and(|p| p != pid))
    });
    let pid2: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::process::Command::new("kill")
        .arg(pid2.to_string())
        .status()
        .unwrap();
    wait_until(30, "the second daemon to exit", || {
        !std::path::Path::new(&format!("/proc/{pid2}")).exists()
    });
}

fn daemon_log(env: &Env, instance: &str) -> String {
    std::fs::read_to_string(env.root().join(format!("daemon-{instance}.log"))).unwrap_or_default()
}

fn sighup(child: &std::process::Child) {
    std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
}

#[test]
fn sighup_applies_a_good_config_and_refuses_a_broken_one() {
    let mut env = Env::new("[gpu]\nmax_parallel = 1\n");
    let mut d = env.spawn("a");
    wait_until(10, "started", || {
        daemon_log(&env, "a").contains("ttspool started")
    });
    // A broken config is refused; the daemon keeps running on the old one.
    let cfg = env.instance_config("a");
    let good = std::fs::read_to_string(&cfg).unwrap();
    assert!(good.contains("max_parallel = 1"));
    std::fs::write(&cfg, good.replace("max_parallel = 1", "max_paralel = 3")).unwrap();
    sighup(&d);
    wait_until(10, "the refusal", || {
        daemon_log(&env, "a").contains("config reload refused")
    });
    assert!(daemon_log(&env, "a").contains("max_paralel"));
    // A good one: 3 slots now, and a key that needs a restart is named.
    env.extra = "[gpu]\nmax_parallel = 3\n".into();
    env.spool_extra = "settle = \"5s\"".into();
    env.instance_config("a");
    sighup(&d);
    wait_until(10, "the reload", || {
        daemon_log(&env, "a").contains("config reloaded")
    });
    let log = daemon_log(&env, "a");
    assert!(
        log.contains("need a restart") && log.contains("spool.settle"),
        "{log}"
    );
    let content: String = (0..6)
        .map(|i| task_line(&format!("s{i}"), "SLOW"))
        .collect();
    env.drop_file("slow.jsonl", &content);
    wait_until(30, "three tasks at once, or a record", || {
        env.starts().len() >= 3 || env.records() > 0
    });
    assert!(
        env.starts().len() >= 3,
        "only {} ran at once after the reload",
        env.starts().len()
    );
    wait_until(60, "all six", || env.records() == 6);
    sigterm(&d);
    assert!(d.wait().unwrap().success());
}

#[test]
fn the_systemd_unit_verifies() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(repo.join("systemd/ttspool.service")).unwrap();
    assert!(
        unit.contains("Type=notify")
            && unit.contains("WatchdogSec=")
            && unit.contains("KillMode=mixed")
    );
    assert!(
        !unit.lines().any(|l| l.starts_with("PrivateDevices")),
        "CUDA needs /dev/nvidia*"
    );
    // TimeoutStopSec must outlast shutdown.grace (30s by default).
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim_end_matches('s').parse().ok())
        .unwrap();
    assert!(stop > 30);
    // systemd-analyze wants the ExecStart binary to exist: point it at ours.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ttspool.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/ttspool", BIN)).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        !err.contains("ttspool.service:"),
        "warnings about the unit: {err}"
    );
    // The installer at least parses.
    let st = std::process::Command::new("bash")
        .arg("-n")
        .arg(repo.join("systemd/install.sh"))
        .status()
        .unwrap();
    assert!(st.success());
}

fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// `name{labels}` → value, from the Prometheus text format.
fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (
                k.to_string(),
                v.parse::<f64>()
                    .unwrap_or_else(|_| panic!("bad value in {l:?}")),
            )
        })
        .collect()
}

#[test]
fn metrics_are_served_and_match_the_records() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = Env::new(&format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\ntextfile = \"metrics.prom\"\n"
    ));
    std::fs::create_dir_all(env.out()).unwrap();
    std::fs::write(env.out().join("old.wav"), tiny_wav()).unwrap();
    let lines = task_line("m1", "x")
        + &task_line("m2", "y")
        + &task_line("old", "skip me")
        + &task_line("bad", "EXIT1")
        + "{\"nope\":1}\n";
    env.drop_file("m.jsonl", &lines);
    let mut d = env.spawn("a");
    wait_until(60, "5 records", || env.records() == 5);
    wait_until(10, "the metrics to count them", || {
        parse_metrics(&scrape(port)).get("ttspool_tasks_total{status=\"failed\"}") == Some(&2.0)
    });
    let m = parse_metrics(&scrape(port));
    for name in [
        "ttspool_tasks_total{status=\"completed\"}",
        "ttspool_tasks_total{status=\"skipped\"}",
        "ttspool_tasks_total{status=\"failed\"}",
        "ttspool_task_failures_total{kind=\"engine_failed\"}",
        "ttspool_task_failures_total{kind=\"invalid_task\"}",
        "ttspool_tasks_in_flight",
        "ttspool_pending_lines",
        "ttspool_oldest_pending_seconds",
        "ttspool_slot_busy_seconds_total{device=\"none\"}",
        "ttspool_slot_busy_ratio{device=\"none\"}",
        "ttspool_task_run_seconds_bucket{le=\"+Inf\"}",
        "ttspool_task_run_seconds_count",
        "ttspool_task_run_seconds_sum",
        "ttspool_webhooks_total{status=\"delivered\"}",
        "ttspool_webhook_outbox_messages",
        "ttspool_start_time_seconds",
    ] {
        assert!(m.contains_key(name), "{name} missing");
    }
    let done = env.done();
    let count = |st: &str| {
        done.iter()
            .chain(env.failed().iter())
            .filter(|r| r["status"] == st)
            .count() as f64
    };
    assert_eq!(
        m["ttspool_tasks_total{status=\"completed\"}"],
        count("completed")
    );
    assert_eq!(
        m["ttspool_tasks_total{status=\"skipped\"}"],
        count("skipped")
    );
    assert_eq!(m["ttspool_tasks_total{status=\"failed\"}"], count("failed"));
    assert_eq!(
        m["ttspool_task_failures_total{kind=\"engine_failed\"}"],
        1.0
    );
    assert_eq!(m["ttspool_task_failures_total{kind=\"invalid_task\"}"], 1.0);
    assert_eq!(m["ttspool_tasks_in_flight"], 0.0);
    assert_eq!(
        m["ttspool_task_run_seconds_count"], 2.0,
        "two engine runs completed"
    );
    wait_until(10, "the textfile", || {
        env.root().join("metrics.prom").exists()
    });
    let tf = std::fs::read_to_string(env.root().join("metrics.prom")).unwrap();
    assert!(tf.contains("# TYPE ttspool_tasks_total counter"));
    sigterm(&d);
    assert!(d.wait().unwrap().success());
}

#[test]
fn submit_wait_exits_0_when_all_succeed_and_1_when_any_fails() {
    let env = Env::new("[retry]\nmax_attempts = 1\n");
    let mut d = env.spawn("a");
    let good = env.root().join("good.jsonl");
    std::fs::write(&good, task_line("w1", "x") + &task_line("w2", "y")).unwrap();
    let out = env.run(&["submit", "--wait", good.to_str().unwrap()], 60);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("all 2 task(s) finished: 2 completed, 0 skipped, 0 failed"),
        "{stdout}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("2/2 done"),
        "plain progress lines without a TTY"
    );
    let bad = env.root().join("bad.jsonl");
    std::fs::write(&bad, task_line("w3", "x") + &task_line("w4", "EXIT1")).unwrap();
    let out = env.run(&["submit", "--wait", bad.to_str().unwrap()], 60);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 failed"));
    sigterm(&d);
    assert!(d.wait().unwrap().success());
}

#[test]
fn requeue_round_trip() {
    let env = Env::new("[retry]\nmax_attempts = 1\n");
    env.drop_file(
        "a.jsonl",
        &(task_line("q1", "FAILONCE") + &task_line("q2", "x") + "{\"broken\":true}\n"),
    );
    env.run_once();
    assert_eq!(env.failed().len(), 2);
    // Only the engine failure can run again; the broken line is reported.
    let out = env
        .cmd(&["requeue", "--kind", "engine_failed"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("requeued 1 task(s)"));
    let log = read_jsonl(&env.spool().join("requeued.jsonl"));
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["tasks"][0]["id"], "q1");
    assert_eq!(log[0]["tasks"][0]["from"]["file"], "a.jsonl");
    env.run_once();
    let q1: Vec<_> = env.done().into_iter().filter(|r| r["id"] == "q1").collect();
    assert_eq!(q1.len(), 1, "requeued task completed");
    assert_eq!(q1[0]["source"]["file"], log[0]["file"]);
    // Already requeued: nothing more (the broken line cannot be requeued).
    let out = env.cmd(&["requeue", "--all"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to requeue"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not parse"));
    let out = env.cmd(&["requeue", "nosuchid"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn rotation_keeps_status_right() {
    let env = Env::new("[retention]\nrotate_size = \"1KB\"\n");
    let content: String = (0..30).map(|i| task_line(&format!("r{i}"), "x")).collect();
    env.drop_file("a.jsonl", &content);
    env.run_once();
    let rotated = std::fs::read_dir(env.spool())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("done.e"))
        .count();
    // How many depends on how records group (load): two show the point.
    assert!(rotated >= 2, "{rotated} rotations");
    let st = env.cmd(&["status", "--json"]).output().unwrap();
    let s: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(s["completed"], 30);
    assert_eq!(s["success_rate"], 1.0);
    assert!(s["tasks_per_min_5m"].as_f64().unwrap() >= 6.0);
    assert!(s.get("oldest_pending_secs").is_some());
    // One task's records are found in a rotated log too.
    let out = env.cmd(&["status", "r0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn status_watch_refreshes() {
    let env = Env::new("");
    let mut child = env
        .cmd(&["status", "--watch"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut r = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut seps = 0;
    let mut line = String::new();
    while seps < 2 {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0);
        if line.trim() == "--" {
            seps += 1;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn old_consumed_inputs_are_deleted() {
    let mut env = Env::new("[retention]\nconsumed = \"1s\"\n");
    env.spool_extra = "settle = \"100ms\"".into();
    env.write_config();
    env.drop_file("a.jsonl", &task_line("c1", "x"));
    let mut d = env.spawn("a");
    let consumed = env.spool().join("pending/.consumed/a.jsonl");
    wait_until(30, "the file consumed", || consumed.exists());
    wait_until(30, "the consumed file deleted", || !consumed.exists());
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    assert_eq!(env.done().len(), 1, "the records stay");
}
