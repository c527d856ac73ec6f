//! Engines that misbehave: each ends in the right record, no process is left
//! behind, nothing appears under the final output name, no temp file is left.

mod common;

use std::fs;

use common::*;

#[test]
fn misbehaving_engines_end_in_the_right_records() {
    // Many different tasks fail here on purpose, which is what the
    // breaker takes for a broken engine: it is off, so each failure kind
    // shows its own attempts.
    let mut env = Env::new(
        "[gpu]\nmax_parallel = 4\n[retry]\nmax_attempts = 2\nbackoff = \"100ms\"\nbreak_after = 0\n",
    );
    env.engine_extra = "timeout = \"1s\"\nkill_grace = \"300ms\"".into();
    env.write_config();
    let cases = [
        ("exit1", "EXIT1"),
        ("hang", "HANG"),
        ("ignoreterm", "IGNORETERM"),
        ("nooutput", "NOOUTPUT"),
        ("half", "HALF"),
        ("notwav", "NOTWAV"),
        ("flaky", "FAILONCE"),
        ("fine", "fine"),
    ];
    let content: String = cases.iter().map(|(id, text)| task_line(id, text)).collect();
    env.drop_file("bad.jsonl", &content);
    let out = env.run_once();
    let stderr = String::from_utf8_lossy(&out.stderr);

    let failed = env.failed();
    let done = env.done();
    assert_eq!(failed.len() + done.len(), cases.len(), "{stderr}");
    let rec = |id: &str| {
        failed
            .iter()
            .chain(done.iter())
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("no record for {id}"))
            .clone()
    };
    let expect = [
        ("exit1", "engine_failed", 2),
        ("hang", "timeout", 2),
        ("ignoreterm", "timeout", 2),
        ("nooutput", "missing_output", 2),
        ("half", "invalid_output", 1),
        ("notwav", "invalid_output", 1),
    ];
    for (id, kind, attempts) in expect {
        let r = rec(id);
        assert_eq!(r["status"], "failed", "{id}");
        assert_eq!(r["error"]["kind"], kind, "{id}: {r}");
        assert_eq!(r["attempts"], attempts, "{id}");
        assert_eq!(r["task"]["id"], id);
        assert!(
            !env.out().join(format!("{id}.wav")).exists(),
            "{id}: final output exists"
        );
    }
    assert!(rec("exit1")["stderr_tail"]
        .as_str()
        .unwrap()
        .contains("boom: this engine fails on purpose"));
    assert!(rec("hang")["stderr_tail"]
        .as_str()
        .unwrap()
        .contains("hanging"));
    assert_eq!(rec("flaky")["status"], "completed");
    assert_eq!(rec("flaky")["attempts"], 2);
    assert_eq!(rec("fine")["status"], "completed");
    assert!(is_wav(&env.out().join("fine.wav")));
    let starts = env.starts();
    assert_eq!(starts["half"], 1, "invalid_output is not retried");
    assert_eq!(starts["hang"], 2, "timeout is retried");

    // No child, grandchild or TERM-ignoring loop survives.
    let left = survivors(&env.engine_pids());
    assert!(left.is_empty(), "left behind: {left:#?}");
    // No temp outputs, hidden or not.
    let names: Vec<String> = fs::read_dir(env.out())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, ["fine.wav", "flaky.wav"], "{names:?}");
}

#[test]
fn a_missing_engine_is_spawn_failed_and_says_so() {
    let env = Env::new("");
    env.write_config();
    let cfg = fs::read_to_string(env.config()).unwrap().replace(
        &fake_engine().display().to_string(),
        "/nonexistent/tts-engine",
    );
    fs::write(env.config(), cfg).unwrap();
    env.drop_file("a.jsonl", &task_line("x", "y"));
    env.run_once();
    let f = env.failed();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0]["error"]["kind"], "spawn_failed");
    let msg = f[0]["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("/nonexistent/tts-engine") && msg.contains("not found"),
        "{msg}"
    );
}
