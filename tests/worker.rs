//! The worker engine (SPEC §13) with the shipped engines/glmtts_worker.py,
//! unchanged, against the fake GLM-TTS checkout (tests/glmtts/): models
//! loaded once per worker, one record per task, and workers that crash,
//! hang, talk garbage on fd 3, close it or hit a CUDA error replaced
//! without doubling or losing a task.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// An env whose engine is the GLM-TTS worker on the fake checkout.
fn worker_env(engine: &str, tables: &str) -> Env {
    let mut env = Env::new(tables);
    let (root, _) = glmtts_checkout(&env);
    let load = if engine.contains("load_timeout") {
        ""
    } else {
        "load_timeout = \"20s\"\n"
    };
    env.engine_extra = format!(
        "kind = \"worker\"\nargv = [\"python3\", \"{}\", \"--root\", \"{}\"]\n{load}{engine}",
        repo().join("engines/glmtts_worker.py").display(),
        root.display()
    );
    env.vars.push((
        "FAKE_GLM_STATE".into(),
        env.root().join("state").display().to_string(),
    ));
    env.write_config();
    env
}

fn events(env: &Env, kind: &str) -> Vec<Value> {
    glm_runs(env)
        .into_iter()
        .filter(|e| e["event"] == kind)
        .collect()
}

fn by_id(recs: &[Value]) -> HashMap<String, Value> {
    let mut m = HashMap::new();
    for r in recs {
        let id = r["id"].as_str().unwrap().to_string();
        assert!(
            m.insert(id.clone(), r.clone()).is_none(),
            "two records for {id}"
        );
    }
    m
}

fn assert_one_record_each(
    env: &Env,
    ids: &[String],
) -> (HashMap<String, Value>, HashMap<String, Value>) {
    let done = by_id(&env.done());
    let failed = by_id(&env.failed());
    for id in ids {
        let n = done.contains_key(id) as usize + failed.contains_key(id) as usize;
        assert_eq!(n, 1, "{id}: {n} records");
    }
    assert_eq!(done.len() + failed.len(), ids.len());
    (done, failed)
}

#[test]
fn two_hundred_tasks_over_two_gpus_load_each_worker_once() {
    let env = worker_env(
        "",
        "[gpu]\ndevices = [\"0\", \"1\"]\n[retry]\nmax_attempts = 1\n",
    );
    let ids: Vec<String> = (0..200).map(|i| format!("w{i:03}")).collect();
    let content: String = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            // Every tenth task makes the model print junk on stdout, some
            // of it shaped like protocol lines.
            glm_line(
                id,
                if i % 10 == 3 {
                    "你好 JUNK"
                } else {
                    "你好世界"
                },
            )
        })
        .collect();
    env.drop_file("many.jsonl", &content);
    env.run_once();
    let (done, failed) = assert_one_record_each(&env, &ids);
    assert!(failed.is_empty(), "{failed:#?}");
    for r in done.values() {
        assert_eq!(r["status"], "completed");
        assert_eq!(r["attempts"], 1);
        assert_eq!(r["engine"], "worker:glmtts_worker.py");
        assert!(r["gpu"] == "0" || r["gpu"] == "1", "{r}");
        assert!(is_wav(Path::new(r["output"].as_str().unwrap())));
    }
    let loads = events(&env, "load");
    assert_eq!(loads.len(), 2, "one load per worker: {loads:#?}");
    let mut gpus: Vec<&str> = loads.iter().map(|l| l["cuda"].as_str().unwrap()).collect();
    gpus.sort();
    assert_eq!(gpus, ["0", "1"]);
    let items = events(&env, "item");
    assert_eq!(items.len(), 200, "each task synthesized once");
    // One voice: its features were extracted once per worker.
    assert_eq!(events(&env, "extract").len(), 2);
    // Both GPUs worked.
    let on0 = done.values().filter(|r| r["gpu"] == "0").count();
    assert!(on0 > 20 && on0 < 180, "{on0} of 200 on GPU 0");
}

#[test]
fn a_crash_a_hang_garbage_and_a_cuda_error_each_cost_one_worker_and_nothing_else() {
    let env = worker_env(
        "timeout = \"3s\"\n",
        "[gpu]\nmax_parallel = 1\n[retry]\nmax_attempts = 1\n",
    );
    let texts = [
        ("ok1", "你好"),
        ("crash", "CRASHONCE mid-task"),
        ("ok2", "你好"),
        ("hang", "HANGONCE forever"),
        ("garbage", "FD3JUNKONCE a library writes to fd 3"),
        ("cuda", "CUDAERRONCE device-side"),
        ("closed", "CLOSEFD3ONCE a library closes fd 3"),
        ("bad", "POISON bad prompt"),
        ("ok3", "你好"),
    ];
    let content: String = texts.iter().map(|(id, t)| glm_line(id, t)).collect();
    env.drop_file("faults.jsonl", &content);
    let out = env.run_once();
    let log = String::from_utf8_lossy(&out.stderr);
    let ids: Vec<String> = texts.iter().map(|(id, _)| id.to_string()).collect();
    let (done, failed) = assert_one_record_each(&env, &ids);
    // Each fault took one worker down and the task ran again, alone, on a
    // fresh one, within the same attempt.
    for id in [
        "ok1", "crash", "ok2", "hang", "garbage", "cuda", "closed", "ok3",
    ] {
        let r = done
            .get(id)
            .unwrap_or_else(|| panic!("{id} not done: {failed:#?}"));
        assert_eq!(r["attempts"], 1, "{r}");
    }
    // A task the model refuses (the worker says not retryable) fails once,
    // for good, as engine_rejected with its message, without a new worker.
    let bad = &failed["bad"];
    assert_eq!(bad["error"]["kind"], "engine_rejected");
    assert_eq!(bad["attempts"], 1);
    assert!(
        bad["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bad prompt audio"),
        "{bad}"
    );
    assert!(
        bad["stderr_tail"].as_str().unwrap().contains("Traceback"),
        "{bad}"
    );
    assert_eq!(events(&env, "load").len(), 6, "1 + 5 replacements\n{log}");
    for needle in [
        "exited (or closed fd 3) mid-task",
        "longer than engine.timeout",
        "is not {\"id\", \"ok\", …}",
        "reports a fatal error",
    ] {
        assert!(log.contains(needle), "no {needle:?} in the log:\n{log}");
    }
}

#[test]
fn a_poison_task_takes_down_two_workers_and_fails_alone() {
    let env = worker_env(
        "",
        "[gpu]\nmax_parallel = 1\n[retry]\nmax_attempts = 3\nbackoff = \"50ms\"\n",
    );
    let mut content = String::new();
    let mut ids = Vec::new();
    for i in 0..6 {
        let id = format!("p{i}");
        content.push_str(&glm_line(&id, if i == 2 { "CRASH always" } else { "你好" }));
        ids.push(id);
    }
    env.drop_file("poison.jsonl", &content);
    env.run_once();
    let (done, failed) = assert_one_record_each(&env, &ids);
    assert_eq!(done.len(), 5, "{failed:#?}");
    let f = &failed["p2"];
    assert_eq!(f["error"]["kind"], "engine_failed");
    assert_eq!(f["attempts"], 1, "not retried after two workers: {f}");
    assert!(
        f["error"]["message"]
            .as_str()
            .unwrap()
            .contains("took down 2 workers"),
        "{f}"
    );
    assert!(
        f["stderr_tail"]
            .as_str()
            .unwrap()
            .contains("segmentation fault"),
        "{f}"
    );
    let items: Vec<String> = events(&env, "item")
        .iter()
        .map(|e| e["uttid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(items.iter().filter(|u| *u == "p2").count(), 2, "{items:?}");
    assert_eq!(items.len(), 7, "the others ran once each: {items:?}");
    assert_eq!(events(&env, "load").len(), 3);
}

#[test]
fn max_tasks_recycles_the_worker() {
    let env = worker_env("max_tasks = 5\n", "[gpu]\nmax_parallel = 1\n");
    let ids: Vec<String> = (0..12).map(|i| format!("m{i}")).collect();
    let content: String = ids.iter().map(|id| glm_line(id, "你好")).collect();
    env.drop_file("m.jsonl", &content);
    env.run_once();
    let (done, _) = assert_one_record_each(&env, &ids);
    assert_eq!(done.len(), 12);
    let loads = events(&env, "load");
    assert_eq!(loads.len(), 3, "12 tasks at 5 per worker: {loads:#?}");
    let pids: std::collections::HashSet<_> = loads.iter().map(|l| l["pid"].clone()).collect();
    assert_eq!(pids.len(), 3);
}

/// Pids of the workers the fake logged loading.
fn worker_pids(env: &Env) -> Vec<i32> {
    events(env, "load")
        .iter()
        .map(|l| l["pid"].as_i64().unwrap() as i32)
        .collect()
}

fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

#[test]
fn workers_load_at_start_and_sigterm_stops_them_within_the_grace() {
    let env = worker_env(
        "kill_grace = \"1s\"\n",
        "[gpu]\nmax_parallel = 2\n[shutdown]\ngrace = \"5s\"\n",
    );
    let mut d = env.spawn("a");
    // Loaded before any task arrives.
    wait_until(30, "two workers loaded", || worker_pids(&env).len() == 2);
    env.drop_file("one.jsonl", &glm_line("t1", "你好"));
    wait_until(30, "the record", || env.done().len() == 1);
    assert_eq!(worker_pids(&env).len(), 2, "the task found a loaded worker");
    let began = std::time::Instant::now();
    sigterm(&d);
    let st = d.wait().unwrap();
    assert!(st.success(), "{st}");
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    for pid in worker_pids(&env) {
        assert!(!alive(pid), "worker {pid} outlived the daemon");
    }
}

#[test]
fn kill_9_of_the_daemon_leaves_no_worker_behind() {
    let env = worker_env("", "[gpu]\nmax_parallel = 2\n");
    let mut d = env.spawn("a");
    wait_until(30, "two workers loaded", || worker_pids(&env).len() == 2);
    sigkill(&d);
    d.wait().unwrap();
    let pids = worker_pids(&env);
    wait_until(10, "the workers gone", || pids.iter().all(|&p| !alive(p)));
}

#[test]
fn idle_workers_stop_and_the_next_task_starts_one() {
    let env = worker_env("idle_stop = \"500ms\"\n", "[gpu]\nmax_parallel = 1\n");
    let mut d = env.spawn("a");
    wait_until(30, "a worker loaded", || worker_pids(&env).len() == 1);
    let first = worker_pids(&env)[0];
    wait_until(10, "the idle worker stopped", || !alive(first));
    env.drop_file("late.jsonl", &glm_line("late", "你好"));
    wait_until(30, "the record", || env.done().len() == 1);
    assert_eq!(worker_pids(&env).len(), 2, "a new worker for the task");
    sigterm(&d);
    assert!(d.wait().unwrap().success());
}

#[test]
fn check_deep_starts_a_worker_and_reports_a_failed_load() {
    let mut env = worker_env("", "");
    let out = env.run(&["check", "--deep"], 60);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ok: worker script"), "{text}");
    assert!(text.contains("said it was ready"), "{text}");
    assert_eq!(events(&env, "load").len(), 1);

    env.vars.push(("FAKE_GLM_FAIL_LOAD".into(), "1".into()));
    let out = env.run(&["check", "--deep"], 60);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot load GLM-TTS"), "{err}");
    assert!(err.contains("failed to load models"), "{err}");

    // The script missing: found without starting anything.
    env.engine_extra = env
        .engine_extra
        .replace("glmtts_worker.py", "no_such_worker.py");
    env.write_config();
    let out = env.run(&["check"], 60);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no_such_worker.py does not exist"), "{err}");
}

#[test]
fn a_worker_config_with_placeholders_or_without_argv_is_refused() {
    let mut env = Env::new("");
    env.engine_extra =
        "kind = \"worker\"\nargv = [\"python3\", \"w.py\", \"{input_text}\"]\n".into();
    env.write_config();
    let out = env.run(&["check"], 30);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("engine.argv") && err.contains("placeholder"),
        "{err}"
    );
}

#[test]
fn a_reload_keeps_loaded_workers_unless_the_engine_changed() {
    let mut env = worker_env("", "[gpu]\nmax_parallel = 1\n");
    let mut d = env.spawn("a");
    wait_until(30, "a worker loaded", || worker_pids(&env).len() == 1);
    let first = worker_pids(&env)[0];
    let log = env.root().join("daemon-a.log");
    let reloads = || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("config reloaded")
            .count()
    };
    let hup = |d: &std::process::Child| {
        assert!(std::process::Command::new("kill")
            .args(["-HUP", &d.id().to_string()])
            .status()
            .unwrap()
            .success())
    };
    // Same engine: the loaded worker stays and takes the next task.
    hup(&d);
    wait_until(10, "the reload", || reloads() == 1);
    env.drop_file("a.jsonl", &glm_line("a", "你好"));
    wait_until(30, "the record", || env.done().len() == 1);
    assert_eq!(worker_pids(&env), vec![first]);
    // Another engine setting: a new worker, and the old one goes.
    env.engine_extra.push_str("max_tasks = 50\n");
    env.instance_config("a");
    hup(&d);
    wait_until(10, "the second reload", || reloads() == 2);
    wait_until(30, "a new worker", || worker_pids(&env).len() == 2);
    wait_until(10, "the old worker gone", || !alive(first));
    env.drop_file("b.jsonl", &glm_line("b", "你好"));
    wait_until(30, "the record", || env.done().len() == 2);
    assert_eq!(worker_pids(&env).len(), 2);
    sigterm(&d);
    assert!(d.wait().unwrap().success());
}

#[test]
fn a_worker_that_never_says_ready_fails_its_task_after_load_timeout() {
    let mut env = worker_env(
        "load_timeout = \"1s\"\n",
        "[gpu]\nmax_parallel = 1\n[retry]\nmax_attempts = 1\nbreak_after = 0\n",
    );
    env.vars.push(("FAKE_GLM_LOAD".into(), "60".into()));
    env.drop_file("slow.jsonl", &glm_line("slow", "你好"));
    let out = env.run(&["run", "--once"], 60);
    let log = String::from_utf8_lossy(&out.stderr);
    let failed = env.failed();
    assert_eq!(failed.len(), 1, "{log}");
    let f = &failed[0];
    assert_eq!(f["error"]["kind"], "engine_failed");
    assert!(
        f["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did not say it was ready within engine.load_timeout (1s)"),
        "{f}"
    );
    assert!(log.contains("worker did not start"), "{log}");
    assert!(events(&env, "load").is_empty());
}

#[test]
fn the_glmtts_worker_sorts_errors_into_retryable_and_fatal() {
    let script = r#"
import errno, sys
sys.path.insert(0, "engines")
from glmtts_worker import classify
assert classify(RuntimeError("CUDA error: an illegal memory access was encountered")) == (True, True)
assert classify(RuntimeError("CUDA error: device-side assert triggered")) == (True, True)
assert classify(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) == (True, False)
assert classify(OSError(errno.ENOSPC, "No space left on device")) == (True, False)
assert classify(FileNotFoundError(errno.ENOENT, "prompt audio not found")) == (False, False)
assert classify(ValueError("the task needs prompt_audio")) == (False, False)
print("ok")
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stdout == b"ok\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
