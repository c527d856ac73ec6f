//! Webhooks end to end: a real receiver (tests/webhook/receiver.py) verifies
//! every delivery with the `standardwebhooks` library from PyPI.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::Value;

const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

struct Receiver {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Receiver {
    fn start(dir: &Path, port: u16) -> Receiver {
        let log = dir.join("received.jsonl");
        let mut child = Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/webhook/receiver.py"))
            .args(["--secret", SECRET, "--port", &port.to_string(), "--log"])
            .arg(&log)
            .arg("--flag")
            .arg(dir.join("flag"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| {
            panic!("receiver did not start (is the standardwebhooks package installed? `pip install standardwebhooks`): {line:?}")
        });
        Receiver { child, port, log }
    }
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
    fn requests(&self) -> Vec<Value> {
        read_jsonl(&self.log)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hook_env(url: &str, extra: &str) -> Env {
    Env::new(&format!(
        "[webhook]\nurl = \"{url}\"\nsecret = \"{SECRET}\"\nallow_cidrs = [\"127.0.0.1/32\"]\n{extra}\n"
    ))
}

fn outcomes(env: &Env) -> Vec<Value> {
    read_jsonl(&env.spool().join("webhooks.jsonl"))
}

#[test]
fn every_delivery_verifies_with_the_standardwebhooks_library() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(dir.path(), 0);
    let mut env = hook_env(&rx.url("/ok"), "headers = { \"x-api-key\" = \"k-123\" }\n");
    env.spool_extra = "settle = \"200ms\"".into();
    env.write_config();
    let lines = format!(
        "{}{}{}",
        r#"{"id":"w1","input_text":"a","output_name":"w1","metadata":{"order":1001}}"#.to_string()
            + "\n",
        task_line("w2", "EXIT1"),
        task_line("w3", "b"),
    );
    std::fs::create_dir_all(env.out()).unwrap();
    std::fs::write(env.out().join("w3.wav"), tiny_wav()).unwrap(); // skipped
    env.drop_file("hooks.jsonl", &lines);
    let mut d = env.spawn("a");
    wait_until(60, "4 webhooks", || rx.requests().len() >= 4);
    wait_until(30, "4 outcomes", || outcomes(&env).len() >= 4);
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 4, "{reqs:#?}");
    assert!(reqs
        .iter()
        .all(|r| r["verified"] == true && r["status"] == 200));
    assert!(reqs.iter().all(|r| r["api_key"] == "k-123"));
    let bodies: HashMap<String, Value> = reqs
        .iter()
        .map(|r| {
            let b: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
            (b["type"].as_str().unwrap().to_string(), b)
        })
        .collect();
    let c = &bodies["task.completed"]["data"];
    assert_eq!(c["id"], "w1");
    assert_eq!(c["status"], "completed");
    assert_eq!(c["metadata"]["order"], 1001);
    assert_eq!(c["source"]["line"], 1);
    assert!(c["output"].as_str().unwrap().ends_with("out/w1.wav"));
    let f = &bodies["task.failed"]["data"];
    assert_eq!(f["error"]["kind"], "engine_failed");
    assert_eq!(bodies["task.skipped"]["data"]["status"], "skipped");
    let fc = &bodies["file.completed"]["data"];
    assert_eq!(
        (
            fc["completed"].as_u64(),
            fc["skipped"].as_u64(),
            fc["failed"].as_u64()
        ),
        (Some(1), Some(1), Some(1))
    );
    assert!(reqs
        .iter()
        .all(|r| r["msg_id"].as_str().unwrap().starts_with("msg_")));
    // Outcomes: one delivered record per message, URL without query.
    let out = outcomes(&env);
    assert!(out
        .iter()
        .all(|o| o["status"] == "delivered" && o["attempts"] == 1));
    // A tampered body is refused by the receiver.
    let r = &reqs[0];
    let tampered = r["body"].as_str().unwrap().replace("\"id\"", "\"iD\"");
    let req = format!(
        "POST /ok HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nwebhook-id: {}\r\nwebhook-timestamp: {}\r\nwebhook-signature: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        r["msg_id"].as_str().unwrap(),
        r["timestamp"].as_str().unwrap(),
        r["signature"].as_str().unwrap(),
        tampered.len(),
        tampered
    );
    let mut s = TcpStream::connect(("127.0.0.1", rx.port)).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
}

fn run_to_outcome(env: &Env, n: usize) -> Vec<Value> {
    let mut d = env.spawn("a");
    wait_until(60, "webhook outcomes", || outcomes(env).len() >= n);
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    outcomes(env)
}

#[test]
fn a_receiver_that_fails_twice_gets_it_on_the_third_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(dir.path(), 0);
    let env = hook_env(
        &rx.url("/fail2"),
        "events = [\"task.completed\"]\nschedule = [\"100ms\", \"100ms\", \"100ms\"]\n",
    );
    env.drop_file("a.jsonl", &task_line("f1", "x"));
    let out = run_to_outcome(&env, 1);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0]["status"], "delivered");
    assert_eq!(out[0]["attempts"], 3);
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 3);
    let ids: HashSet<_> = reqs.iter().map(|r| r["msg_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1, "the same webhook-id on every attempt");
    let stamps: HashSet<_> = reqs
        .iter()
        .map(|r| r["signature"].as_str().unwrap())
        .collect();
    assert!(reqs.iter().all(|r| r["verified"] == true));
    assert!(!stamps.is_empty());
}

#[test]
fn gone_stops_after_one_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(dir.path(), 0);
    let env = hook_env(
        &rx.url("/gone"),
        "events = [\"task.completed\"]\nschedule = [\"100ms\", \"100ms\"]\n",
    );
    env.drop_file("a.jsonl", &task_line("g1", "x"));
    let out = run_to_outcome(&env, 1);
    assert_eq!(out[0]["status"], "gone");
    assert_eq!(out[0]["attempts"], 1);
    assert_eq!(out[0]["http_status"], 410);
    assert_eq!(rx.requests().len(), 1);
}

#[test]
fn retry_after_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(dir.path(), 0);
    // Without Retry-After the next attempt would come after 480-720 ms.
    let env = hook_env(
        &rx.url("/ratelimit"),
        "events = [\"task.completed\"]\nschedule = [\"600ms\", \"600ms\"]\n",
    );
    env.drop_file("a.jsonl", &task_line("r1", "x"));
    let out = run_to_outcome(&env, 1);
    assert_eq!(out[0]["status"], "delivered");
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 2);
    let gap = reqs[1]["t"].as_f64().unwrap() - reqs[0]["t"].as_f64().unwrap();
    assert!(gap >= 0.95, "waited only {gap:.3}s after Retry-After: 1");
}

#[test]
fn redirects_are_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(dir.path(), 0);
    let env = hook_env(
        &rx.url("/redirect"),
        "events = [\"task.completed\"]\nschedule = [\"100ms\"]\n",
    );
    env.drop_file("a.jsonl", &task_line("x1", "x"));
    let out = run_to_outcome(&env, 1);
    assert_eq!(out[0]["status"], "dead");
    assert_eq!(out[0]["attempts"], 2);
    assert_eq!(out[0]["http_status"], 302);
    assert!(out[0]["error"].as_str().unwrap().contains("redirect"));
    assert!(
        rx.requests().iter().all(|r| r["path"] != "/target"),
        "the redirect target was hit"
    );
}

#[test]
fn a_receiver_that_never_answers_times_out_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(dir.path(), 0);
    let env = hook_env(
        &rx.url("/hang"),
        "events = [\"task.completed\"]\nschedule = [\"100ms\"]\ntimeout = \"300ms\"\n",
    );
    env.drop_file("a.jsonl", &task_line("h1", "x"));
    let out = run_to_outcome(&env, 1);
    assert_eq!(out[0]["status"], "dead");
    assert_eq!(out[0]["attempts"], 2);
    assert!(
        out[0]["error"]
            .as_str()
            .unwrap()
            .contains("no answer within"),
        "{}",
        out[0]
    );
}

#[test]
fn dead_messages_can_be_replayed_with_their_id() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(dir.path(), 0);
    let env = hook_env(
        &rx.url("/flip"),
        "events = [\"task.completed\"]\nschedule = [\"100ms\"]\n",
    );
    env.drop_file("a.jsonl", &task_line("p1", "x"));
    let out = run_to_outcome(&env, 1);
    assert_eq!(out[0]["status"], "dead");
    let msg_id = out[0]["msg_id"].as_str().unwrap().to_string();
    std::fs::write(dir.path().join("flag"), "").unwrap();
    let r = env.cmd(&["webhook", "replay", "--dead"]).output().unwrap();
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let last = rx.requests().pop().unwrap();
    assert_eq!(last["msg_id"], msg_id.as_str());
    assert_eq!(last["status"], 200);
    assert_eq!(outcomes(&env).last().unwrap()["status"], "delivered");
    // Nothing dead is left to replay; an unknown id says so.
    let r = env
        .cmd(&["webhook", "replay", "msg_nope"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("no stored message msg_nope"));
}

#[test]
fn callback_format_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(dir.path(), 0);
    let env = hook_env(
        &rx.url("/ok"),
        "format = \"callback\"\naudio_base_url = \"https://cdn.example.com/tts/\"\nevents = [\"task.completed\", \"task.failed\"]\n",
    );
    env.drop_file(
        "a.jsonl",
        &(task_line("cb1", "x") + &task_line("cb2", "EXIT1")),
    );
    let _ = run_to_outcome(&env, 2);
    let bodies: Vec<Value> = rx
        .requests()
        .iter()
        .map(|r| serde_json::from_str(r["body"].as_str().unwrap()).unwrap())
        .collect();
    let ok = bodies.iter().find(|b| b["code"] == 200).unwrap();
    assert_eq!(ok["data"]["callbackType"], "complete");
    assert_eq!(ok["data"]["task_id"], "cb1");
    assert_eq!(
        ok["data"]["data"][0]["audio_url"],
        "https://cdn.example.com/tts/cb1.wav"
    );
    assert!(ok["data"]["data"][0]["duration"].as_f64().unwrap() > 0.0);
    let bad = bodies.iter().find(|b| b["code"] == 500).unwrap();
    assert_eq!(bad["data"]["callbackType"], "failed");
    assert!(bad["msg"].as_str().unwrap().contains("engine_failed"));
}

#[test]
fn private_and_local_destinations_are_blocked() {
    let env = Env::new(&format!(
        "[webhook]\nsecret = \"{SECRET}\"\nevents = [\"task.completed\"]\n"
    ));
    let lines: String = [
        ("m1", "http://169.254.169.254/latest/meta-data/"),
        ("m2", "http://10.1.2.3/hook"),
        ("m3", "http://[::ffff:127.0.0.1]:9/hook"),
        ("m4", "http://localhost:9/hook?token=secret-token"),
    ]
    .iter()
    .map(|(id, url)| format!("{{\"id\":\"{id}\",\"input_text\":\"x\",\"output_name\":\"{id}\",\"callback_url\":\"{url}\"}}\n"))
    .collect();
    env.drop_file("ssrf.jsonl", &lines);
    let out = run_to_outcome(&env, 4);
    assert_eq!(out.len(), 4);
    for o in &out {
        assert_eq!(o["status"], "blocked", "{o}");
        assert_eq!(o["attempts"], 1);
    }
    let err = |id: &str| {
        out.iter().find(|o| o["id"] == id).unwrap()["error"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(err("m1").contains("link-local"), "{}", err("m1"));
    assert!(err("m2").contains("private"));
    assert!(err("m3").contains("127.0.0.1") && err("m3").contains("loopback"));
    assert!(err("m4").contains("loopback"));
    let m4 = out.iter().find(|o| o["id"] == "m4").unwrap();
    assert!(
        !m4["url"].as_str().unwrap().contains("secret-token"),
        "query kept in {m4}"
    );
}

#[test]
fn kill_9_with_200_pending_webhooks_loses_none() {
    // A port nobody listens on yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/ok");
    let env = hook_env(
        &url,
        "events = [\"task.completed\"]\nschedule = [\"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\"]\n",
    );
    let content: String = (0..200).map(|i| task_line(&format!("k{i}"), "x")).collect();
    env.drop_file("k.jsonl", &content);
    let mut d = env.spawn("a");
    wait_until(120, "200 records", || env.records() >= 200);
    sigkill(&d);
    d.wait().unwrap();
    assert!(outcomes(&env).is_empty(), "nothing could be delivered yet");
    let rx = Receiver::start(dir.path(), port);
    let mut d = env.spawn("a");
    wait_until(120, "200 task webhooks", || {
        let ids: HashSet<String> = rx
            .requests()
            .iter()
            .map(|r| r["body"].as_str().unwrap().to_string())
            .filter_map(|b| {
                serde_json::from_str::<Value>(&b)
                    .ok()
                    .and_then(|v| v["data"]["id"].as_str().map(String::from))
            })
            .collect();
        ids.len() >= 200
    });
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    let reqs = rx.requests();
    assert!(reqs.iter().all(|r| r["verified"] == true));
    // One webhook-id per task: duplicates, if any, carry the same id.
    let mut per_task: HashMap<String, HashSet<String>> = HashMap::new();
    for r in &reqs {
        let b: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
        per_task
            .entry(b["data"]["id"].as_str().unwrap().to_string())
            .or_default()
            .insert(r["msg_id"].as_str().unwrap().to_string());
    }
    assert_eq!(per_task.len(), 200);
    assert!(
        per_task.values().all(|ids| ids.len() == 1),
        "a task got two different webhook-ids"
    );
}

#[test]
fn at_most_four_deliveries_at_once_per_host() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(dir.path(), 0);
    let env = hook_env(
        &rx.url("/slow"),
        "events = [\"task.completed\"]\nmax_in_flight = 16\n",
    );
    let content: String = (0..12).map(|i| task_line(&format!("c{i}"), "x")).collect();
    env.drop_file("c.jsonl", &content);
    let out = run_to_outcome(&env, 12);
    assert!(out.iter().all(|o| o["status"] == "delivered"));
    let peak = rx
        .requests()
        .iter()
        .filter_map(|r| r["concurrent"].as_u64())
        .max()
        .unwrap();
    assert!(peak <= 4, "{peak} requests at once to one host");
    assert!(peak >= 2, "deliveries are concurrent (peak {peak})");
}

#[test]
fn a_token_in_a_callback_url_reaches_the_receiver_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(dir.path(), 0);
    // A dead target for the line that fails, so webhooks.jsonl gets a `dead`.
    let env = hook_env(
        &rx.url("/ok"),
        "schedule = [\"100ms\"]\nheaders = { \"x-api-key\" = \"HEADERSECRET\" }\n",
    );
    let cb = |path: &str| {
        format!(
            "http://u:PASSSECRET@127.0.0.1:{}{path}?token=TOKENSECRET&x=1",
            rx.port
        )
    };
    let lines = format!(
        "{{\"id\":\"t1\",\"input_text\":\"a\",\"output_name\":\"t1\",\"callback_url\":\"{}\"}}\n\
         {{\"id\":\"t2\",\"input_text\":\"EXIT1\",\"output_name\":\"t2\",\"callback_url\":\"{}\"}}\n\
         {{\"id\":\"t3\",\"input_txt\":\"typo\",\"output_name\":\"t3\",\"callback_url\":\"{}\"}}\n",
        cb("/ok"),
        cb("/gone"),
        cb("/ok"),
    );
    env.drop_file("tok.jsonl", &lines);
    let mut d = env.spawn("a");
    wait_until(60, "3 records and their webhook outcomes", || {
        env.records() == 3 && outcomes(&env).len() >= 3
    });
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    // Delivery used the full URL.
    let reqs = rx.requests();
    let to_tasks: Vec<&Value> = reqs
        .iter()
        .filter(|r| r["path"] != "/ok" || r["query"] != "")
        .collect();
    assert!(
        to_tasks
            .iter()
            .any(|r| r["query"].as_str().unwrap().contains("token=TOKENSECRET")),
        "{reqs:#?}"
    );
    // Records, outcomes and the log hold none of the secrets.
    let spool = env.spool();
    for (name, text) in [
        (
            "done.jsonl",
            std::fs::read_to_string(spool.join("done.jsonl")).unwrap(),
        ),
        (
            "failed.jsonl",
            std::fs::read_to_string(spool.join("failed.jsonl")).unwrap(),
        ),
        (
            "webhooks.jsonl",
            std::fs::read_to_string(spool.join("webhooks.jsonl")).unwrap(),
        ),
        (
            "the log",
            std::fs::read_to_string(env.root().join("daemon-a.log")).unwrap(),
        ),
    ] {
        for secret in ["TOKENSECRET", "PASSSECRET", "HEADERSECRET"] {
            assert!(!text.contains(secret), "{secret} in {name}:\n{text}");
        }
    }
    let done = env.done();
    assert_eq!(
        done[0]["task"]["callback_url"],
        format!("http://127.0.0.1:{}/ok", rx.port)
    );
    // Where the full URL must live, only the daemon's user can read it.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let outbox = spool.join(".ttspool/outbox/a");
    assert_eq!(mode(&outbox), 0o700);
    let dead = spool.join(".ttspool/webhooks/dead");
    assert_eq!(mode(&dead), 0o700);
    let mut private = 0;
    for dir in [&outbox, &dead] {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
            private += 1;
        }
    }
    assert!(private > 0);
}
