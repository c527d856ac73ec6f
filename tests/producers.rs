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

/// Task lines `{prefix}{i}` for `i` in `range`, with `text`.
fn lines(prefix: &str, range: std::ops::Range<usize>, text: &str) -> String {
    range
        .map(|i| task_line(&format!("{prefix}{i}"), text))
        .collect()
}

/// Each of `ids` has exactly one record and ran the engine at most once;
/// no other record is an `invalid_task`.
fn once_each(env: &Env, ids: &[String]) {
    let mut recs: std::collections::HashMap<String, usize> = Default::default();
    for r in env.done().iter().chain(env.failed().iter()) {
        assert_ne!(
            r["error"]["kind"], "invalid_task",
            "a fragment was read: {r}"
        );
        *recs
            .entry(r["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let starts = env.starts();
    for id in ids {
        assert_eq!(recs.get(id), Some(&1), "{id}: {recs:?}");
        assert!(
            starts.get(id).copied().unwrap_or(0) <= 1,
            "{id} ran twice: {starts:?}"
        );
    }
}

fn ids(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

fn in_consumed(env: &Env) -> usize {
    fs::read_dir(env.spool().join("pending/.consumed"))
        .map(|rd| rd.count())
        .unwrap_or(0)
}

#[test]
fn appends_through_a_held_descriptor_after_the_file_was_consumed_are_recorded() {
    let env = Env::new("");
    let path = env.spool().join("pending/log.jsonl");
    let mut d = env.spawn("a");
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let mut all = Vec::new();
    for round in 0..3 {
        let range = round * 4..round * 4 + 4;
        std::io::Write::write_all(&mut file, lines("log", range.clone(), "x").as_bytes()).unwrap();
        all.extend(ids("log", range));
        wait_until(30, "the round's records", || env.records() == all.len());
        // The pause: longer than `settle` and `consume_after`, until the
        // daemon has moved the file out of pending/.
        wait_until(30, "the file consumed", || {
            !path.exists() && in_consumed(&env) > 0
        });
    }
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    once_each(&env, &all);
    let log = fs::read_to_string(env.root().join("daemon-a.log")).unwrap();
    assert!(log.contains("grew after it was moved"), "{log}");
}

#[test]
fn a_file_renamed_while_its_lines_run_is_one_file() {
    let env = Env::new("");
    let pending = env.spool().join("pending");
    env.drop_file("current.jsonl", &lines("r", 0..24, "NAP"));
    let mut d = env.spawn("a");
    wait_until(30, "the first records", || env.records() >= 2);
    // A logger rotates its file while lines run...
    fs::rename(
        pending.join("current.jsonl"),
        pending.join("current-1.jsonl"),
    )
    .unwrap();
    // ... and a downstream job moves the audio of finished tasks away, so
    // a line that ran again would not be skipped.
    let away = env.root().join("away");
    fs::create_dir_all(&away).unwrap();
    wait_until(60, "every record", || {
        let done = env.done();
        for r in &done {
            let wav = format!("{}.wav", r["id"].as_str().unwrap());
            let _ = fs::rename(env.out().join(&wav), away.join(&wav));
        }
        done.len() >= 24
    });
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    once_each(&env, &ids("r", 0..24));
    assert_eq!(env.records(), 24);
    let names: std::collections::HashSet<String> = env
        .done()
        .iter()
        .map(|r| r["source"]["file"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains("current.jsonl"), "{names:?}");
}

#[test]
fn a_part_file_is_read_only_once_renamed_into_place() {
    let env = Env::new("");
    let pending = env.spool().join("pending");
    let mut d = env.spawn("a");
    append(&pending.join("x.jsonl.part"), &lines("p", 0..12, "x"));
    // A file dropped after the .part one: once it has its record, the
    // daemon has looked at pending/ with the .part file in it.
    env.drop_file("marker.jsonl", &task_line("marker", "x"));
    wait_until(30, "the marker's record", || env.records() == 1);
    append(&pending.join("x.jsonl.part"), &lines("p", 12..24, "x"));
    fs::rename(pending.join("x.jsonl.part"), pending.join("x.jsonl")).unwrap();
    wait_until(30, "every record", || env.records() >= 25);
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    once_each(&env, &ids("p", 0..24));
    assert_eq!(env.records(), 25);
}

#[test]
fn a_file_rewritten_in_place_larger_has_every_new_line_recorded_once() {
    let mut env = Env::new("");
    // Keep fully recorded files in pending/ so the rewrite meets the cursor.
    env.spool_extra = "consume_after = \"1h\"".into();
    env.write_config();
    let pending = env.spool().join("pending");
    env.drop_file("aligned.jsonl", &lines("a", 10..20, "x"));
    env.drop_file("misaligned.jsonl", &lines("m", 0..10, "x"));
    let mut d = env.spawn("a");
    wait_until(30, "the first records", || env.records() == 20);
    // Truncate and write, same inode, larger. The new lines of
    // aligned.jsonl have the old ones' length (the old cursor falls on a
    // line start); those of misaligned.jsonl do not.
    for (name, text) in [
        ("aligned.jsonl", lines("b", 10..40, "x")),
        ("misaligned.jsonl", lines("mm", 0..30, "xyz")),
    ] {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(pending.join(name))
            .unwrap();
        f.set_len(0).unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    }
    wait_until(30, "the new records", || env.records() >= 80);
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    let mut want = ids("b", 10..40);
    want.extend(ids("mm", 0..30));
    once_each(&env, &want);
    assert_eq!(env.records(), 80);
}

#[test]
fn a_file_deleted_and_published_again_under_its_name_is_a_new_file() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new("[gpu]\nmax_parallel = 1\n");
    let path = env.spool().join("pending/f.jsonl");
    env.drop_file("f.jsonl", &lines("old", 0..20, "NAP"));
    let ino = fs::metadata(&path).unwrap().ino();
    let mut d = env.spawn("a");
    wait_until(30, "the first records", || env.records() >= 2);
    // Deleted while partly claimed; published again at once (ext4 gives
    // the new file the old inode), larger than the old one, so the old
    // cursor lies inside it.
    fs::remove_file(&path).unwrap();
    fs::write(&path, lines("new", 0..40, "x")).unwrap();
    let reused = fs::metadata(&path).unwrap().ino() == ino;
    println!("inode reused: {reused}");
    wait_until(60, "the new file's records", || {
        env.done()
            .iter()
            .filter(|r| r["id"].as_str().unwrap().starts_with("new"))
            .count()
            == 40
    });
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    once_each(&env, &ids("new", 0..40));
}

#[test]
fn a_name_that_is_not_utf8_is_read_and_shown_as_such() {
    use std::os::unix::ffi::OsStrExt;
    let env = Env::new("");
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9.jsonl");
    fs::write(
        env.spool().join("pending").join(name),
        lines("u", 0..2, "x"),
    )
    .unwrap();
    let out = env.run_once();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = env.done();
    assert_eq!(done.len(), 2, "{:#?}", env.failed());
    assert_eq!(done[0]["source"]["file"], "caf\u{fffd}.jsonl");
    assert_eq!(done[0]["source"]["file_escaped"], "caf\\xe9.jsonl");
}
