//! Task lines of every kind through a running daemon: one record per line,
//! the right error kind and a message naming the field, valid WAVs for the
//! valid ones, and the daemon keeps going.

mod common;

use std::fs;

use common::*;

#[test]
fn every_kind_of_line_gets_one_record_and_the_daemon_keeps_running() {
    let env = Env::new("[limits]\nmax_text_chars = 50\nmax_line_bytes = 4096\n");
    // A voice outside voices/ reachable through a symlink.
    fs::write(env.root().join("secret.wav"), tiny_wav()).unwrap();
    std::os::unix::fs::symlink(
        env.root().join("secret.wav"),
        env.root().join("voices/escape.wav"),
    )
    .unwrap();
    let long_line = format!(
        "{{\"input_text\":\"{}\",\"output_name\":\"big\"}}\n",
        "x".repeat(5 << 20)
    );
    let mut content = Vec::new();
    content.extend_from_slice(b"\xEF\xBB\xBF");
    content.extend_from_slice(br#"{"id":"ok1","input_text":"hello","output_name":"ok1","prompt_audio":"v.wav","prompt_text":"hi","metadata":{"k":[1,2]}}"#);
    content.extend_from_slice(b"\r\n\n   \n");
    let lines: Vec<&[u8]> = vec![
        br#"{"uttid":"ok2","syn_text":"GLM style","prompt_speech":"v.wav","prompt_text":"p"}"#, // 4
        br#"{"id":"typo","input_txt":"x","output_name":"typo"}"#,                                 // 5
        br#"{"id":"num","input_text":5,"output_name":"num"}"#,                                    // 6
        br#"{"id":"noname","input_text":"x"}"#,                                                   // 7
        br#"{"id":"dots","input_text":"x","output_name":"../etc/x"}"#,                            // 8
        br#"{"id":"toolong","input_text":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","output_name":"t"}"#, // 9
        br#"{"id":"escape","input_text":"x","output_name":"e","prompt_audio":"escape.wav"}"#,     // 10
        br#"{"id":"novoice","input_text":"x","output_name":"nv","prompt_audio":"missing.wav"}"#,  // 11
        br#"{"id":"meta","input_text":"x","output_name":"m","metadata":"nope"}"#,                 // 12
        br#"{"input_text": "unterminated"#,                                                       // 13
        br#"["not","an","object"]"#,                                                              // 14
        b"\xff\xfe not utf8",                                                                     // 15
    ];
    for l in &lines {
        content.extend_from_slice(l);
        content.push(b'\n');
    }
    content.extend_from_slice(long_line.as_bytes()); // 16
    content.extend_from_slice(
        br#"{"id":"ok3","input_text":"after the big one","output_name":"sub/ok3"}"#,
    );
    content.extend_from_slice(b"\n"); // 17
    let pending = env.spool().join("pending");
    fs::write(pending.join(".mixed.tmp"), &content).unwrap();
    fs::rename(pending.join(".mixed.tmp"), pending.join("mixed.jsonl")).unwrap();

    let mut daemon = env.spawn("a");
    wait_until(60, "15 records", || env.records() >= 15);

    let done = env.done();
    let failed = env.failed();
    assert_eq!(done.len(), 3, "{done:#?}");
    assert_eq!(failed.len(), 12, "{failed:#?}");
    for d in &done {
        assert_eq!(d["status"], "completed");
        assert_eq!(d["v"], 1);
        assert_eq!(d["source"]["file"], "mixed.jsonl");
        let out = d["output"].as_str().unwrap();
        assert!(is_wav(std::path::Path::new(out)), "{out}");
        assert!(d["trace_id"].as_str().unwrap().len() > 10);
        assert_eq!(d["instance"], "a");
        assert!(d["run_ms"].is_u64() && d["attempts"] == 1);
    }
    let by_line = |n: u64| {
        failed
            .iter()
            .find(|f| f["source"]["line"] == n)
            .unwrap_or_else(|| panic!("no record for line {n}: {failed:#?}"))
            .clone()
    };
    let ok1 = done.iter().find(|d| d["id"] == "ok1").unwrap();
    assert_eq!(ok1["source"]["line"], 1);
    assert_eq!(ok1["task"]["metadata"]["k"][1], 2);
    let ok2 = done.iter().find(|d| d["id"] == "ok2").unwrap();
    assert_eq!(ok2["task"]["output_name"], "ok2");
    assert_eq!(ok2["task"]["input_text"], "GLM style");
    assert!(env.out().join("sub/ok3.wav").exists());
    let expect = [
        (5, "input_txt"),
        (6, "input_text"),
        (7, "output_name"),
        (8, "output_name"),
        (9, "input_text"),
        (10, "prompt_audio"),
        (11, "prompt_audio"),
        (12, "metadata"),
        (13, "JSON"),
        (14, "object"),
        (15, "UTF-8"),
        (16, "max_line_bytes"),
    ];
    for (line, word) in expect {
        let r = by_line(line);
        assert_eq!(r["status"], "failed");
        assert_eq!(r["error"]["kind"], "invalid_task", "line {line}");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(word),
            "line {line}: {msg:?} should name {word}"
        );
        assert!(
            r.get("raw").is_some() || r.get("task").is_some(),
            "line {line}"
        );
    }
    assert_eq!(by_line(16)["raw"].as_str().unwrap().len(), 4096);
    assert_eq!(by_line(5)["id"], "typo");
    // Blank lines got no record; the engine never ran for invalid lines.
    let starts = env.starts();
    assert_eq!(starts.len(), 3, "{starts:?}");

    // Still running: a new file is taken.
    env.drop_file("later.jsonl", &task_line("later", "still alive"));
    wait_until(30, "the later file", || {
        env.done().iter().any(|d| d["id"] == "later")
    });
    // Fully recorded files move to pending/.consumed/.
    wait_until(30, "consumed files", || {
        env.spool().join("pending/.consumed/mixed.jsonl").exists()
            && env.spool().join("pending/.consumed/later.jsonl").exists()
    });
    sigterm(&daemon);
    let st = daemon.wait().unwrap();
    assert!(st.success(), "{st:?}");
}

#[test]
fn existing_output_is_skipped_without_running_the_engine() {
    let env = Env::new("");
    fs::create_dir_all(env.out().join("a")).unwrap();
    fs::write(env.out().join("a/exists.wav"), tiny_wav()).unwrap();
    env.drop_file(
        "skip.jsonl",
        &format!(
            "{}{}",
            r#"{"id":"s1","input_text":"x","output_name":"a/exists"}"#.to_string() + "\n",
            task_line("fresh", "y")
        ),
    );
    env.run_once();
    let done = env.done();
    assert_eq!(done.len(), 2);
    let s = done.iter().find(|d| d["id"] == "s1").unwrap();
    assert_eq!(s["status"], "skipped");
    assert_eq!(s["attempts"], 0);
    assert!(s["output"].as_str().unwrap().ends_with("out/a/exists.wav"));
    let starts = env.starts();
    assert_eq!(starts.get("s1"), None, "engine started for a skipped task");
    assert_eq!(starts.get("fresh"), Some(&1));
    // A second run over the same content (a new file) skips both.
    env.drop_file("again.jsonl", &task_line("fresh", "y"));
    env.run_once();
    let again = env.done();
    assert_eq!(again.last().unwrap()["status"], "skipped");
    assert_eq!(env.starts().get("fresh"), Some(&1));
}

#[test]
fn a_line_written_in_two_pieces_is_never_parsed_half() {
    let mut env = Env::new("");
    env.spool_extra = "settle = \"5s\"".into();
    env.write_config();
    let path = env.spool().join("pending/append.jsonl");
    let line = r#"{"id":"split","input_text":"the whole sentence arrives","output_name":"split"}"#;
    let (a, b) = line.split_at(30);
    append(&path, &task_line("first", "one"));
    append(&path, a);
    let mut daemon = env.spawn("a");
    // The daemon has read the file (and claimed the first line) while the
    // second line is still half written.
    wait_until(30, "the first line", || env.done().len() == 1);
    append(&path, b);
    append(&path, "\n");
    wait_until(30, "the second line", || env.records() == 2);
    sigterm(&daemon);
    assert!(daemon.wait().unwrap().success());
    assert!(env.failed().is_empty(), "{:#?}", env.failed());
    let d = env.done();
    assert_eq!(d[1]["id"], "split");
    assert_eq!(d[1]["task"]["input_text"], "the whole sentence arrives");
    assert_eq!(d[1]["source"]["line"], 2);
}

#[test]
fn a_final_line_without_newline_is_taken_once_settled() {
    let env = Env::new("");
    let path = env.spool().join("pending/nonl.jsonl");
    append(&path, task_line("n1", "a").trim_end());
    env.run_once();
    let d = env.done();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["id"], "n1");
}

#[test]
fn a_replaced_file_is_a_new_file() {
    let env = Env::new("");
    env.drop_file("same.jsonl", &task_line("r1", "a"));
    env.run_once();
    env.drop_file("same.jsonl", &task_line("r2", "b"));
    env.run_once();
    let ids: Vec<_> = env
        .done()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["r1", "r2"]);
}
