//! Producer files as producers really leave them: only `*.jsonl` is a task
//! file, symlinks and FIFOs are never read (and never wedge the daemon), and
//! long CJK names that fit a file name work.

mod common;

use std::fs;

use common::*;

/// Names in `pending/` that are not task files.
const NOT_TASK_FILES: [&str; 5] = [
    "README",
    "notes.txt",
    "data.json",
    "x.jsonl~",
    "x.jsonl.swp",
];

#[test]
fn only_regular_jsonl_files_are_read() {
    let env = Env::new("");
    let pending = env.spool().join("pending");
    // Not task files: left alone, no records.
    for name in NOT_TASK_FILES {
        fs::write(pending.join(name), task_line(name, "x")).unwrap();
    }
    // A symlink to a private file: never followed, its content never copied.
    let secret = env.root().join("secret.jsonl");
    fs::write(
        &secret,
        "{\"input_text\":\"PRIVATE-TEXT\",\"output_name\":\"p\"}\nPRIVATE-JUNK\n",
    )
    .unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&secret, pending.join("link.jsonl")).unwrap();
    // A FIFO: opening it for reading would block until a writer came.
    let fifo = std::ffi::CString::new(pending.join("fifo.jsonl").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    // An 80-character CJK name: 240 bytes, fits a file name.
    let long = "订".repeat(80);
    env.drop_file(
        "good.jsonl",
        &(task_line("g1", "x") + &format!("{{\"input_text\":\"x\",\"output_name\":\"{long}\"}}\n")),
    );
    let mut d = env.spawn("a");
    wait_until(30, "the good file's records", || env.records() == 2);
    let status = env.run(&["status", "--json"], 30);
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(s["rejected_files"], 2, "{s}");
    sigterm(&d);
    assert!(
        d.wait().unwrap().success(),
        "the daemon must stop on SIGTERM"
    );
    let done = env.done();
    assert_eq!(done.len(), 2, "{done:#?} {:#?}", env.failed());
    assert!(env.out().join(format!("{long}.wav")).exists());
    for name in NOT_TASK_FILES {
        assert!(pending.join(name).exists(), "{name} was touched");
    }
    // Nothing of the private file anywhere ttspool writes.
    for f in ["done.jsonl", "failed.jsonl"] {
        let text = fs::read_to_string(env.spool().join(f)).unwrap_or_default();
        assert!(!text.contains("PRIVATE"), "{f}: {text}");
    }
    let log = fs::read_to_string(env.root().join("daemon-a.log")).unwrap();
    assert!(!log.contains("PRIVATE"), "{log}");
    assert!(
        log.contains("link.jsonl") && log.contains("symlink"),
        "{log}"
    );
    assert!(log.contains("fifo.jsonl"), "{log}");
}

#[test]
fn a_name_too_long_for_a_file_is_an_invalid_task_at_once() {
    let env = Env::new("");
    let long = "订".repeat(90);
    let line = format!("{{\"input_text\":\"x\",\"output_name\":\"{long}\"}}\n");
    let f = env.root().join("long.jsonl");
    fs::write(&f, &line).unwrap();
    for cmd in ["check", "submit"] {
        let out = env.run(&[cmd, f.to_str().unwrap()], 30);
        let err = String::from_utf8_lossy(&out.stderr) + String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{cmd}: {err}");
        assert!(err.contains("255"), "{cmd}: {err}");
    }
    env.drop_file("long.jsonl", &line);
    env.run_once();
    let failed = env.failed();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["error"]["kind"], "invalid_task");
    assert!(env.starts().is_empty(), "no engine run");
}

#[test]
fn small_mistakes_get_clear_messages() {
    let env = Env::new("");
    // `submit -` with nothing on stdin publishes nothing.
    let out = env
        .cmd(&["submit", "-"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no task lines"), "{err}");
    let published: Vec<_> = fs::read_dir(env.spool().join("pending"))
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(published.is_empty(), "{published:?}");
    // A spool.dir that is a file.
    let mut env = Env::new("");
    fs::write(env.root().join("afile"), "").unwrap();
    env.spool_extra = "dir = \"afile\"".into();
    env.write_config();
    let out = env.run(&["run", "--once"], 30);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is a file, not a folder") && !err.contains("os error"),
        "{err}"
    );
}
