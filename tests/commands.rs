//! The commands a person types: exit codes and one-line errors (SPEC §7).

mod common;

use std::fs;

use common::*;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn submit_publishes_only_when_every_line_is_valid() {
    let env = Env::new("");
    let good = env.root().join("good.jsonl");
    let bad = env.root().join("bad.jsonl");
    fs::write(&good, task_line("a", "x") + "\n" + &task_line("b", "y")).unwrap();
    fs::write(
        &bad,
        task_line("c", "x") + "{\"input_txt\":\"x\",\"output_name\":\"d\"}\n",
    )
    .unwrap();
    let out = env
        .cmd(&["submit", good.to_str().unwrap(), bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.jsonl:2: unknown field \"input_txt\""),
        "{err}"
    );
    let pending: Vec<_> = fs::read_dir(env.spool().join("pending"))
        .unwrap()
        .flatten()
        .collect();
    assert!(
        pending.is_empty(),
        "published despite an invalid line: {pending:?}"
    );

    let out = env
        .cmd(&["submit", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("submitted 2 task(s) in 1 file(s)"));
    // From stdin too.
    let mut child = env
        .cmd(&["submit", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(task_line("s", "from stdin").as_bytes())
        .unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    env.run_once();
    let ids: Vec<_> = env
        .done()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
}

#[test]
fn check_reports_config_and_task_problems_as_lines() {
    let env = Env::new("");
    let out = env.cmd(&["check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let f = env.root().join("t.jsonl");
    fs::write(
        &f,
        task_line("a", "x") + "{\"input_text\":\"x\",\"output_name\":\"/abs\"}\n",
    )
    .unwrap();
    let out = env.cmd(&["check", f.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("t.jsonl:2: output_name:"),
        "{}",
        text(&out.stderr)
    );
    // An engine that does not exist.
    let cfg = fs::read_to_string(env.config())
        .unwrap()
        .replace(&fake_engine().display().to_string(), "no-such-tts-engine");
    fs::write(env.config(), cfg).unwrap();
    let out = env.cmd(&["check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("engine.argv: \"no-such-tts-engine\" not found"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn config_errors_name_the_key_and_file_and_exit_2() {
    let env = Env::new("[gpu]\nmax_paralel = 3\n");
    let out = env.cmd(&["run", "--once"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("max_paralel") && err.contains("ttspool.toml"),
        "{err}"
    );
    assert!(err.lines().count() <= 2, "{err}");
    // check says the same, with its own exit code.
    let out = env.cmd(&["check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = std::process::Command::new(BIN)
        .args(["-c", "/nonexistent/ttspool.toml", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cannot read config /nonexistent/ttspool.toml: not found"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn status_counts_and_finds_one_task() {
    let env = Env::new("");
    env.drop_file(
        "a.jsonl",
        &(task_line("good", "x") + &task_line("bad", "EXIT1") + "{\"nope\":1}\n"),
    );
    env.drop_file("later.jsonl", &task_line("queued", "x"));
    // Only run the first file: move the second aside, then back.
    fs::rename(
        env.spool().join("pending/later.jsonl"),
        env.root().join("later.jsonl"),
    )
    .unwrap();
    env.run_once();
    fs::rename(
        env.root().join("later.jsonl"),
        env.spool().join("pending/later.jsonl"),
    )
    .unwrap();
    let out = env.cmd(&["status", "--json"]).output().unwrap();
    assert!(out.status.success());
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["completed"], 1);
    assert_eq!(s["failed"], 2);
    assert_eq!(s["pending"], 1);
    assert_eq!(s["in_flight"], 0);
    assert_eq!(s["failed_by_kind"]["engine_failed"], 1);
    assert_eq!(s["failed_by_kind"]["invalid_task"], 1);
    let out = env.cmd(&["status", "good"]).output().unwrap();
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("\"completed\""));
    let out = env.cmd(&["status", "missing-id"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no record for task id \"missing-id\""));
    let out = env.cmd(&["status"]).output().unwrap();
    assert!(text(&out.stdout).contains("completed  1"));
}

#[test]
fn status_into_a_closed_pipe_ends_quietly() {
    // `ttspool status | head -0`: the reader is gone before status writes.
    let env = Env::new("");
    // The read end is closed before status starts (closing it after the
    // spawn races a fast status on a busy machine).
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    unsafe { libc::close(fds[0]) };
    let write_end =
        unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
    let child = env
        .cmd(&["status"])
        .stdout(std::process::Stdio::from(write_end))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}
