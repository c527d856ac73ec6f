//! Hostile input and secrets, end to end with the real binary: task text is
//! data (never an option, never a template), engines get an allow-listed
//! environment, killed runs leave no temp files, and idle connections to the
//! HTTP server cannot starve the spool.

mod common;

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

fn dump_engine() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/engines/dump.py")
}

/// An env whose engine is dump.py: argv `{output} {id} -- {input_text}`.
/// Run by the system's python3 itself: a launcher such as pyenv's shim is a
/// shell script that adds variables of its own.
fn dump_env(engine_extra: &str) -> Env {
    let mut env = Env::new("");
    fs::create_dir_all(env.root().join("dumps")).unwrap();
    env.engine_extra = format!(
        "argv = [\"/usr/bin/python3\", \"{}\", \"{{output}}\", \"{{id}}\", \"--\", \"{{input_text}}\"]\n\
         env = {{ DUMP_DIR = \"{}\", DUMP_WAV = \"{}\" }}\n{engine_extra}",
        dump_engine().display(),
        env.root().join("dumps").display(),
        env.root().join("tiny.wav").display(),
    );
    env.write_config();
    env
}

fn dump(env: &Env, id: &str) -> Value {
    let p = env.root().join("dumps").join(format!("{id}.json"));
    serde_json::from_slice(&fs::read(&p).unwrap()).unwrap()
}

#[test]
fn option_like_text_with_the_shipped_engine_line_is_spoken_not_obeyed() {
    if Command::new("espeak-ng").arg("--version").output().is_err() {
        eprintln!("skipped: espeak-ng is not installed (apt-get install espeak-ng)");
        return;
    }
    // The [engine] argv of the shipped config, as it is.
    let shipped =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ttspool.toml")).unwrap();
    let argv = shipped
        .lines()
        .find(|l| l.starts_with("argv = "))
        .unwrap()
        .to_string();
    let mut env = Env::new("");
    env.engine_extra = format!("{argv}\nenv_pass = [\"PATH\", \"HOME\", \"LANG\"]\n");
    env.write_config();
    // About 60 KB of text: read aloud, tens of minutes of audio.
    let secret = env.root().join("private.txt");
    fs::write(&secret, "the private text of an order. ".repeat(2000)).unwrap();
    env.drop_file(
        "inject.jsonl",
        &format!(
            "{{\"id\":\"inj\",\"input_text\":\"-f{}\",\"output_name\":\"inj\"}}\n",
            secret.display()
        ),
    );
    env.run_once();
    let done = env.done();
    assert_eq!(done.len(), 1, "{done:#?} {:#?}", env.failed());
    let wav = env.out().join("inj.wav");
    assert!(is_wav(&wav));
    // espeak-ng writes 22050 Hz 16-bit mono: 44100 bytes a second. The
    // option-like text itself is a few seconds of speech.
    let secs = fs::metadata(&wav).unwrap().len() as f64 / 44100.0;
    assert!(secs < 30.0, "{secs:.0} s of audio: the file was read aloud");
}

#[test]
fn placeholders_in_task_text_reach_the_engine_literally() {
    let env = dump_env("");
    env.drop_file(
        "t.jsonl",
        "{\"id\":\"{input_text}\",\"input_text\":\"say {output} and {id}\",\"output_name\":\"x1\"}\n",
    );
    env.run_once();
    assert_eq!(env.done().len(), 1, "{:#?}", env.failed());
    let d = dump(&env, "{input_text}");
    let argv: Vec<&str> = d["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(argv[1..], ["{input_text}", "--", "say {output} and {id}"]);
    assert!(argv[0].ends_with(".tmp.wav"), "{argv:?}");
}

#[test]
fn engines_get_only_allow_listed_variables_and_no_secrets() {
    let mut env = dump_env("");
    env.vars = vec![
        ("TTSPOOL_WEBHOOK_SECRET".into(), "whsec_SECRETVALUE1".into()),
        ("TTSPOOL_API_SECRET".into(), "whsec_SECRETVALUE2".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "SECRETVALUE3".into()),
        (
            "DATABASE_URL".into(),
            "postgres://u:SECRETVALUE4@db/x".into(),
        ),
        ("HF_HOME".into(), "/srv/hf".into()),
        ("LC_ALL".into(), "C.UTF-8".into()),
    ];
    // The default env_pass (not the tests' one), plus TTSPOOL_*: ttspool's
    // own variables never pass, whatever the list says.
    let mut pass = ttspool::config::default_env_pass();
    pass.push("TTSPOOL_*".into());
    env.engine_extra.push_str(&format!("env_pass = {pass:?}\n"));
    env.write_config();
    env.drop_file("t.jsonl", &task_line("e1", "hello"));
    env.run_once();
    assert_eq!(env.done().len(), 1, "{:#?}", env.failed());
    let d = dump(&env, "e1");
    let vars = d["env"].as_object().unwrap();
    let text = serde_json::to_string(vars).unwrap();
    assert!(!text.contains("SECRETVALUE"), "{text}");
    assert!(!vars.contains_key("TTSPOOL_WEBHOOK_SECRET"));
    assert_eq!(vars["HF_HOME"], "/srv/hf");
    assert_eq!(vars["LC_ALL"], "C.UTF-8");
    assert_eq!(
        vars["DUMP_DIR"].as_str().unwrap(),
        env.root().join("dumps").to_str().unwrap()
    );
    // What ttspool sets itself (SPEC §4 and the orphan marks), engine.env,
    // and the default allow-list.
    let set_by_us = [
        "TTSPOOL_TASK_ID",
        "TTSPOOL_OUTPUT",
        "TTSPOOL_SLOT",
        "TTSPOOL_TRACE_ID",
        "TTSPOOL_SPOOL",
        "TTSPOOL_INSTANCE",
        "TTSPOOL_DAEMON_PID",
        "DUMP_DIR",
        "DUMP_WAV",
    ];
    let defaults = ttspool::config::default_env_pass();
    let allowed = |k: &str| {
        set_by_us.contains(&k)
            || defaults.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => k.starts_with(prefix),
                None => p == k,
            })
    };
    for k in vars.keys() {
        assert!(allowed(k), "{k} is outside the allow-list: {text}");
    }
}

#[test]
fn unknown_placeholders_are_refused_by_check_and_run() {
    let mut env = Env::new("");
    env.engine_extra = format!(
        "argv = [\"{}\", \"{{output}}\", \"{{text}}\", \"{{id}}\"]\n",
        fake_engine().display()
    );
    env.write_config();
    for (args, code) in [(&["check"][..], 1), (&["run", "--once"][..], 2)] {
        let out = env.run(args, 30);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(
            err.contains("engine.argv") && err.contains("{text}") && err.contains("{input_text}"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn check_warns_when_task_text_could_be_an_option() {
    let mut env = Env::new("");
    env.engine_extra = format!(
        "argv = [\"{}\", \"{{output}}\", \"{{input_text}}\", \"{{id}}\"]\n",
        fake_engine().display()
    );
    env.write_config();
    let out = env.run(&["check"], 30);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning:") && err.contains("element 2") && err.contains("\"--\""),
        "{err}"
    );
}

#[test]
fn dash_leading_output_names_are_invalid_tasks() {
    let env = Env::new("");
    env.drop_file(
        "d.jsonl",
        "{\"input_text\":\"x\",\"output_name\":\"-rf\"}\n{\"input_text\":\"x\",\"output_name\":\"a/--help\"}\n",
    );
    env.run_once();
    let failed = env.failed();
    assert_eq!(failed.len(), 2);
    for f in &failed {
        assert_eq!(f["error"]["kind"], "invalid_task", "{f}");
        let m = f["error"]["message"].as_str().unwrap();
        assert!(m.contains("output_name:") && m.contains("'-'"), "{m}");
    }
    assert!(env.starts().is_empty(), "no engine ran");
}

fn hidden_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(hidden_files(&e.path()));
        } else if e.file_name().to_string_lossy().starts_with('.') {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn a_restart_after_kill_9_sweeps_the_killed_runs_temp_file() {
    let env = Env::new("");
    env.drop_file("k.jsonl", &task_line("k1", "PARTIALHANG"));
    let mut d = env.spawn("a");
    wait_until(30, "the half-written temp file", || {
        !hidden_files(&env.out()).is_empty()
    });
    sigkill(&d);
    d.wait().unwrap();
    let left = hidden_files(&env.out());
    assert_eq!(left.len(), 1, "{left:?}");
    fs::write(env.root().join("engine.log.release"), "").unwrap();
    let mut d = env.spawn("a");
    wait_until(30, "the task's record", || env.records() == 1);
    wait_until(10, "the sweep", || !left[0].exists());
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    assert_eq!(env.done().len(), 1, "{:#?}", env.failed());
    assert!(
        hidden_files(&env.out()).is_empty(),
        "{:?}",
        hidden_files(&env.out())
    );
    let out = env.run(&["status", "--json"], 30);
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["swept_files"], 1, "{s}");
}

#[test]
fn slow_clients_of_the_metrics_port_do_not_starve_the_spool() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = Env::new(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    // 128 descriptors for the daemon, as with a tight `ulimit -n`.
    let log = fs::File::create(env.root().join("daemon.log")).unwrap();
    let mut d = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 128 && exec {} -c {} run",
            BIN,
            env.instance_config("a").display()
        ))
        .env("FAKE_LOG", env.log())
        .env("FAKE_WAV", env.root().join("tiny.wav"))
        .current_dir(env.root())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_until(20, "the metrics port", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    // 300 slowloris clients: a request head that never ends, one byte at
    // a time, for as long as the test runs.
    let mut idle: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    assert!(idle.len() >= 100, "only {} connections", idle.len());
    for s in &mut idle {
        use std::io::Write;
        s.set_nonblocking(true).unwrap();
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n");
    }
    let mut lines = String::new();
    for i in 0..60 {
        lines.push_str(&task_line(&format!("c{i}"), "x"));
    }
    env.drop_file("c.jsonl", &lines);
    let mut trickle = || {
        use std::io::Write;
        for s in &mut idle {
            let _ = s.write_all(b"X");
        }
    };
    wait_until(60, "60 records while 300 clients trickle headers", || {
        trickle();
        std::thread::sleep(std::time::Duration::from_millis(500));
        env.records() == 60
    });
    // The clients go: the server answers again.
    drop(idle);
    wait_until(40, "a /metrics answer", || {
        use std::io::{Read, Write};
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        s.set_read_timeout(Some(std::time::Duration::from_secs(15)))
            .unwrap();
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("ttspool_tasks_total")
    });
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    let log = fs::read_to_string(env.root().join("daemon.log")).unwrap();
    assert!(
        log.lines().filter(|l| l.contains("accept error")).count() < 50,
        "accept errors in a loop:\n{log}"
    );
}

#[test]
fn nul_bytes_in_task_text_are_invalid_tasks_and_pause_no_slot() {
    let env = Env::new("[gpu]\nmax_parallel = 2\n");
    let mut content = String::new();
    for i in 0..200 {
        if i % 33 == 5 {
            content.push_str(&format!(
                "{{\"id\":\"nul{i}\",\"input_text\":\"x\\u0000y\",\"output_name\":\"nul{i}\"}}\n"
            ));
        } else {
            content.push_str(&task_line(&format!("ok{i}"), "x"));
        }
    }
    env.drop_file("mixed.jsonl", &content);
    let out = env.run_once();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let failed = env.failed();
    assert_eq!(failed.len(), 6, "{failed:#?}");
    for r in &failed {
        assert_eq!(r["error"]["kind"], "invalid_task", "{r}");
        assert_eq!(r["attempts"], 0, "never run: {r}");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("input_text: contains a NUL character"),
            "{msg}"
        );
    }
    assert_eq!(env.done().len(), 194);
    assert!(
        !stderr.contains("pausing it"),
        "the breaker paused a slot:\n{stderr}"
    );
    assert!(
        env.starts().keys().all(|id| id.starts_with("ok")),
        "a NUL task reached the engine"
    );
}
