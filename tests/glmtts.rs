//! The GLM-TTS batch engine against a contract-faithful fake of
//! `glmtts_inference.py` (tests/glmtts/): batches, per-task outcomes decided
//! by files, isolation of poison and crashing lines, timeouts, truncated WAVs,
//! GPU slots, and cleanup.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use common::*;

fn glm_env(extra_engine: &str, tables: &str) -> (Env, std::path::PathBuf) {
    let mut env = Env::new(tables);
    let (root, engine) = glmtts_checkout(&env);
    env.engine_extra = format!("{engine}{extra_engine}");
    env.write_config();
    (env, root)
}

fn assert_clean(root: &Path) {
    let examples: Vec<_> = fs::read_dir(root.join("examples"))
        .unwrap()
        .flatten()
        .collect();
    assert!(examples.is_empty(), "batch inputs left: {examples:?}");
    if let Ok(rd) = fs::read_dir(root.join("outputs/pretrain_t")) {
        let left: Vec<_> = rd.flatten().collect();
        assert!(left.is_empty(), "batch outputs left: {left:?}");
    }
}

fn by_id(recs: &[serde_json::Value]) -> HashMap<String, serde_json::Value> {
    recs.iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r.clone()))
        .collect()
}

#[test]
fn a_batch_of_40_with_3_poisoned_lines() {
    let (env, root) = glm_env(
        "batch_max = 40\nbatch_wait = \"5s\"",
        "[gpu]\nmax_parallel = 1\n[retry]\nmax_attempts = 3\nbackoff = \"50ms\"\n",
    );
    let poisoned = [7, 19, 33];
    let content: String = (0..40)
        .map(|i| {
            glm_line(
                &format!("g{i}"),
                if poisoned.contains(&i) {
                    "POISON here"
                } else {
                    "你好世界"
                },
            )
        })
        .collect();
    env.drop_file("batch.jsonl", &content);
    env.run_once();
    let done = env.done();
    let failed = env.failed();
    assert_eq!(done.len(), 37, "{failed:#?}");
    assert_eq!(failed.len(), 3);
    for d in &done {
        assert_eq!(d["status"], "completed");
        assert_eq!(d["attempts"], 1);
        assert_eq!(d["engine"], "glmtts");
        assert!(is_wav(Path::new(d["output"].as_str().unwrap())));
    }
    for f in &failed {
        assert_eq!(f["error"]["kind"], "missing_output", "{f}");
        assert_eq!(f["attempts"], 3);
        let tail = f["stderr_tail"].as_str().unwrap();
        assert!(tail.contains("bad prompt audio"), "{tail}");
        assert!(
            tail.starts_with("") && tail.contains("Error processing t0000"),
            "{tail}"
        );
    }
    let runs = glm_runs(&env);
    assert_eq!(runs[0]["items"], 40, "one run for the whole batch first");
    let sizes: Vec<u64> = runs.iter().map(|r| r["items"].as_u64().unwrap()).collect();
    assert_eq!(
        runs.len(),
        1 + 3 * 2,
        "then each poisoned line alone, twice: {sizes:?}"
    );
    assert!(runs[1..].iter().all(|r| r["items"] == 1));
    // The engine saw our uttids, never the users' output names.
    assert_eq!(runs[0]["uttids"][0], "t0000");
    assert_clean(&root);
}

#[test]
fn a_crash_with_no_audio_splits_the_batch_until_the_line_is_isolated() {
    let (env, root) = glm_env(
        "batch_max = 8\nbatch_wait = \"5s\"",
        "[gpu]\nmax_parallel = 1\n[retry]\nmax_attempts = 2\nbackoff = \"50ms\"\n",
    );
    let content: String = (0..8)
        .map(|i| glm_line(&format!("c{i}"), if i == 0 { "CRASH now" } else { "fine" }))
        .collect();
    env.drop_file("crash.jsonl", &content);
    env.run_once();
    let done = by_id(&env.done());
    let failed = by_id(&env.failed());
    assert_eq!(done.len() + failed.len(), 8, "one record per line");
    assert_eq!(failed.len(), 1);
    let c0 = &failed["c0"];
    assert_eq!(c0["error"]["kind"], "engine_failed");
    assert_eq!(c0["attempts"], 2, "only runs alone count as attempts");
    assert!(c0["stderr_tail"]
        .as_str()
        .unwrap()
        .contains("segmentation fault"));
    for i in 1..8 {
        assert_eq!(done[&format!("c{i}")]["attempts"], 1);
    }
    let sizes: Vec<u64> = glm_runs(&env)
        .iter()
        .map(|r| r["items"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes[0], 8);
    assert_eq!(sizes[1], 4, "halves first: {sizes:?}");
    assert_eq!(sizes.iter().filter(|&&n| n == 4).count(), 2, "{sizes:?}");
    assert_eq!(sizes[2], 2, "the crashing half split again: {sizes:?}");
    assert!(sizes.iter().filter(|&&n| n == 1).count() >= 2, "{sizes:?}");
    assert_clean(&root);
}

#[test]
fn a_crash_after_some_audio_keeps_it_and_retries_the_rest_alone() {
    let (env, root) = glm_env(
        "batch_max = 6\nbatch_wait = \"5s\"",
        "[gpu]\nmax_parallel = 1\n[retry]\nmax_attempts = 2\nbackoff = \"50ms\"\n",
    );
    let content: String = (0..6)
        .map(|i| glm_line(&format!("m{i}"), if i == 3 { "CRASH here" } else { "fine" }))
        .collect();
    env.drop_file("mid.jsonl", &content);
    env.run_once();
    let done = by_id(&env.done());
    let failed = by_id(&env.failed());
    assert_eq!(done.len(), 5);
    assert_eq!(failed.len(), 1);
    for i in [0, 1, 2] {
        assert_eq!(
            done[&format!("m{i}")]["attempts"],
            1,
            "written before the crash"
        );
    }
    for i in [4, 5] {
        assert_eq!(done[&format!("m{i}")]["attempts"], 2, "retried alone");
    }
    assert_eq!(failed["m3"]["error"]["kind"], "engine_failed");
    let runs = glm_runs(&env);
    assert!(runs[1..].iter().all(|r| r["items"] == 1));
    assert_clean(&root);
}

#[test]
fn a_hanging_batch_times_out_is_killed_and_split() {
    let (env, root) = glm_env(
        "batch_max = 4\nbatch_wait = \"5s\"\ntimeout = \"500ms\"\nload_timeout = \"500ms\"\nkill_grace = \"200ms\"",
        "[gpu]\nmax_parallel = 1\n[retry]\nmax_attempts = 1\n",
    );
    let content: String = (0..4)
        .map(|i| {
            glm_line(
                &format!("h{i}"),
                if i == 0 { "HANG forever" } else { "fine" },
            )
        })
        .collect();
    env.drop_file("hang.jsonl", &content);
    env.run_once();
    let done = by_id(&env.done());
    let failed = by_id(&env.failed());
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(failed["h0"]["error"]["kind"], "timeout");
    assert_eq!(done.len(), 3);
    let runs = glm_runs(&env);
    let sizes: Vec<u64> = runs.iter().map(|r| r["items"].as_u64().unwrap()).collect();
    // 4 hangs; its halves go first, the hanging one splits again.
    assert_eq!(&sizes[..3], [4, 2, 1], "{sizes:?}");
    assert_eq!(sizes.iter().filter(|&&n| n == 2).count(), 2, "{sizes:?}");
    let pids: Vec<i32> = runs
        .iter()
        .map(|r| r["pid"].as_i64().unwrap() as i32)
        .collect();
    assert!(survivors(&pids).is_empty(), "the hung script survived");
    assert_clean(&root);
}

#[test]
fn a_truncated_wav_is_never_taken() {
    let (env, root) = glm_env(
        "batch_max = 3\nbatch_wait = \"5s\"\ntimeout = \"1s\"\nload_timeout = \"1s\"\nkill_grace = \"200ms\"",
        "[gpu]\nmax_parallel = 1\n[retry]\nmax_attempts = 2\nbackoff = \"50ms\"\n",
    );
    // t0: fine; t1: its WAV is cut short; t2: then the run hangs and is killed.
    let content =
        glm_line("ok", "fine") + &glm_line("cut", "TRUNCATE me") + &glm_line("stuck", "HANG");
    env.drop_file("t.jsonl", &content);
    env.run_once();
    let done = by_id(&env.done());
    let failed = by_id(&env.failed());
    assert_eq!(done["ok"]["status"], "completed");
    assert_eq!(
        failed["cut"]["error"]["kind"], "invalid_output",
        "{:#?}",
        failed["cut"]
    );
    assert_eq!(failed["stuck"]["error"]["kind"], "timeout");
    assert!(
        !env.out().join("cut.wav").exists(),
        "a truncated WAV was published"
    );
    assert!(!env.out().join("stuck.wav").exists());
    assert_clean(&root);
}

#[test]
fn cuda_out_of_memory_halves_the_batch() {
    let (mut env, root) = glm_env(
        "batch_max = 8\nbatch_wait = \"5s\"",
        "[gpu]\nmax_parallel = 1\n",
    );
    env.vars.push(("FAKE_GLM_OOM_OVER".into(), "2".into()));
    let content: String = (0..8).map(|i| glm_line(&format!("o{i}"), "fine")).collect();
    env.drop_file("oom.jsonl", &content);
    env.run_once();
    let done = env.done();
    assert_eq!(done.len(), 8);
    assert!(done.iter().all(|d| d["attempts"] == 1));
    let sizes: Vec<u64> = glm_runs(&env)
        .iter()
        .map(|r| r["items"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes[0], 8);
    assert!(sizes[1..].iter().all(|&n| n <= 4), "{sizes:?}");
    assert!(sizes.contains(&2), "{sizes:?}");
    assert_clean(&root);
}

#[test]
fn two_slots_on_two_devices_get_their_own_cuda_visible_devices() {
    let (mut env, root) = glm_env(
        "batch_max = 4\nbatch_wait = \"200ms\"",
        "[gpu]\ndevices = [\"0\", \"1\"]\nslots_per_device = 1\n",
    );
    env.vars.push(("FAKE_GLM_UTT".into(), "0.1".into()));
    let content: String = (0..16)
        .map(|i| glm_line(&format!("d{i}"), "fine"))
        .collect();
    env.drop_file("dev.jsonl", &content);
    env.run_once();
    let done = env.done();
    assert_eq!(done.len(), 16);
    let runs = glm_runs(&env);
    let devices: std::collections::HashSet<String> = runs
        .iter()
        .map(|r| r["cuda"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        devices,
        ["0".to_string(), "1".to_string()].into_iter().collect()
    );
    let gpus: std::collections::HashSet<String> = done
        .iter()
        .map(|d| d["gpu"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(gpus.len(), 2);
    assert!(runs
        .iter()
        .all(|r| r["cwd"].as_str().unwrap() == root.to_str().unwrap()));
    assert_clean(&root);
}

#[test]
fn glmtts_example_files_work_as_task_files() {
    let (env, root) = glm_env("batch_wait = \"100ms\"", "");
    let content = concat!(
        "{\"uttid\":\"zh/example_1\",\"prompt_text\":\"你好\",\"prompt_speech\":\"v.wav\",\"syn_text\":\"欢迎使用\"}\n",
        "{\"uttid\":\"example_2\",\"prompt_text\":\"hi\",\"prompt_speech\":\"v.wav\",\"syn_text\":\"welcome\"}\n",
    );
    env.drop_file("example_zh.jsonl", content);
    env.run_once();
    let done = env.done();
    assert_eq!(done.len(), 2, "{:#?}", env.failed());
    assert!(is_wav(&env.out().join("zh/example_1.wav")));
    assert!(is_wav(&env.out().join("example_2.wav")));
    let runs = glm_runs(&env);
    assert_eq!(runs[0]["uttids"], serde_json::json!(["t0000", "t0001"]));
    // prompt_speech reached the script as an absolute path inside voices/.
    let voice = fs::canonicalize(env.root().join("voices/v.wav")).unwrap();
    assert_eq!(runs[0]["prompts"][0], voice.to_str().unwrap());
    assert_clean(&root);
}

#[test]
fn check_validates_a_glmtts_checkout() {
    let (env, root) = glm_env("", "");
    let out = env.cmd(&["check"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::remove_dir(root.join("ckpt")).unwrap();
    let out = env.cmd(&["check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no ckpt/"));
    fs::remove_file(root.join("glmtts_inference.py")).unwrap();
    let out = env.cmd(&["check"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no glmtts_inference.py"));
}

#[test]
fn a_batch_waits_for_gpu_memory_when_min_free_mib_is_set() {
    let (mut env, root) = glm_env(
        "batch_max = 2\nbatch_wait = \"100ms\"",
        "[gpu]\ndevices = [\"0\"]\nmin_free_mib = 1000\n",
    );
    let fake_bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/engines");
    let path = format!("{}:{}", fake_bin.display(), std::env::var("PATH").unwrap());
    let free = env.root().join("gpu-free");
    env.vars.push(("PATH".into(), path));
    env.vars
        .push(("FAKE_GPU_FREE".into(), free.display().to_string()));
    env.vars.push((
        "FAKE_GPU_LOG".into(),
        env.root().join("smi.log").display().to_string(),
    ));
    env.drop_file("g.jsonl", &glm_line("gpu1", "fine"));
    let mut d = env.spawn("a");
    let log = env.root().join("daemon-a.log");
    wait_until(30, "the wait to be logged", || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("waiting for GPU memory")
    });
    assert!(glm_runs(&env).is_empty(), "the batch started on a full GPU");
    fs::write(&free, "").unwrap();
    wait_until(30, "the task", || env.done().len() == 1);
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    assert!(
        fs::read_to_string(env.root().join("smi.log"))
            .unwrap()
            .lines()
            .count()
            >= 2
    );
    assert_clean(&root);
    // check: nvidia-smi is required when the key is set.
    let out = env
        .cmd(&["check"])
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nvidia-smi"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
