//! The HTTP API end to end: the real binary, real clients (curl, and
//! Python's `standardwebhooks` library to sign requests), real files.

mod common;

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A reply: status, headers (lowercase names), body.
struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// `curl` with `args`, against `url`; the body from `data` (bytes).
fn curl(url: &str, args: &[&str], data: Option<&[u8]>) -> Reply {
    let dir = tempfile::tempdir().unwrap();
    let (hfile, bfile, dfile) = (
        dir.path().join("h"),
        dir.path().join("b"),
        dir.path().join("d"),
    );
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "60", "-D"])
        .arg(&hfile)
        .arg("-o")
        .arg(&bfile)
        .args(["-w", "%{http_code}"])
        .args(args);
    if let Some(d) = data {
        fs::write(&dfile, d).unwrap();
        cmd.arg("--data-binary")
            .arg(format!("@{}", dfile.display()));
    }
    let out = cmd
        .arg(url)
        .output()
        .expect("curl runs (apt-get install curl)");
    Reply {
        status: String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0),
        headers: fs::read_to_string(&hfile)
            .unwrap_or_default()
            .to_lowercase(),
        body: fs::read_to_string(&bfile).unwrap_or_default(),
    }
}

struct Api {
    env: Env,
    base: String,
    daemon: Option<Child>,
}

impl Api {
    /// A daemon with the API on a free loopback port; `api` adds lines to
    /// `[api]`, `extra` whole tables.
    fn start(api: &str, extra: &str) -> Api {
        let port = free_port();
        let env = Env::new(&format!(
            "[api]\nlisten = \"127.0.0.1:{port}\"\n{api}\n{extra}"
        ));
        let mut a = Api {
            env,
            base: format!("http://127.0.0.1:{port}"),
            daemon: None,
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        self.daemon = Some(self.env.spawn("a"));
        wait_until(30, "the API ready", || {
            curl(&format!("{}/readyz", self.base), &[], None).status == 200
        });
    }

    fn post(&self, content_type: &str, body: &[u8], more: &[&str]) -> Reply {
        let ct = format!("Content-Type: {content_type}");
        let mut args = vec!["-X", "POST", "-H", &ct];
        args.extend_from_slice(more);
        curl(&format!("{}/v1/tasks", self.base), &args, Some(body))
    }

    fn get(&self, path: &str, more: &[&str]) -> Reply {
        curl(&format!("{}{path}", self.base), more, None)
    }

    /// Task lines in pending/ (consumed files included).
    fn spooled_lines(&self) -> usize {
        let mut n = 0;
        for dir in ["pending", "pending/.consumed"] {
            for e in fs::read_dir(self.env.spool().join(dir)).unwrap().flatten() {
                if e.file_type().unwrap().is_file()
                    && !e.file_name().to_string_lossy().starts_with('.')
                {
                    n += fs::read_to_string(e.path()).unwrap().lines().count();
                }
            }
        }
        n
    }

    fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            sigterm(&d);
            assert!(
                d.wait().unwrap().success(),
                "the daemon must stop on SIGTERM"
            );
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

fn task(id: &str, text: &str) -> String {
    task_line(id, text).trim_end().to_string()
}

#[test]
fn a_posted_task_is_run_and_its_status_says_completed() {
    let mut api = Api::start("", "");
    let r = api.post("application/json", task("o1", "hello").as_bytes(), &[]);
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(
        r.headers.contains("location: /v1/tasks/o1"),
        "{}",
        r.headers
    );
    let v = r.json();
    assert_eq!(v["accepted"], 1);
    assert_eq!(v["tasks"][0]["status_url"], "/v1/tasks/o1");
    let s = api.get("/v1/tasks/o1?wait=30s", &[]);
    assert_eq!(s.status, 200, "{}", s.body);
    let v = s.json();
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["record"]["id"], "o1");
    assert!(is_wav(&api.env.out().join("o1.wav")));
    // Unknown ids, wrong routes, the other endpoints.
    assert_eq!(api.get("/v1/tasks/nope", &[]).status, 404);
    assert_eq!(
        api.get("/v1/nothing", &[]).json()["error"]["kind"],
        "not_found"
    );
    assert_eq!(api.get("/healthz", &[]).status, 200);
    assert_eq!(api.get("/v1/status", &[]).json()["completed"], 1);
    assert!(api
        .get("/metrics", &[])
        .body
        .contains("ttspool_tasks_total"));
    api.stop();
}

#[test]
fn a_batch_is_accepted_whole_or_refused_whole_with_the_line_and_field() {
    let mut api = Api::start("", "");
    let good = format!("{}\n\n{}\n", task("b1", "x"), task("b2", "x"));
    let r = api.post("application/x-ndjson", good.as_bytes(), &[]);
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["accepted"], 2);
    let bad = format!(
        "{}\n{{\"input_txt\":\"x\",\"output_name\":\"b4\"}}\n",
        task("b3", "x")
    );
    let r = api.post("application/x-ndjson", bad.as_bytes(), &[]);
    assert_eq!(r.status, 422, "{}", r.body);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.starts_with("line 2: ") && msg.contains("input_txt"),
        "{msg}"
    );
    wait_until(30, "the batch's records", || api.env.records() == 2);
    assert_eq!(api.spooled_lines(), 2, "the refused batch wrote nothing");
    // Bodies that are not tasks.
    let r = api.post("text/plain", b"hello", &[]);
    assert_eq!(r.status, 415, "{}", r.body);
    assert_eq!(r.json()["error"]["kind"], "unsupported_media_type");
    assert_eq!(api.post("application/json", b"{not json", &[]).status, 400);
    let big = vec![b' '; 2 << 20];
    let r = api.post("application/json", &big, &[]);
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.json()["error"]["kind"], "too_large");
    api.stop();
}

#[test]
fn requests_without_valid_credentials_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    fs::write(&tokens, "orders:tok-0123456789abcdef\n").unwrap();
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let sfile = dir.path().join("secret");
    fs::write(&sfile, secret).unwrap();
    let mut api = Api::start(
        &format!(
            "tokens_file = \"{}\"\nverify_secret_file = \"{}\"",
            tokens.display(),
            sfile.display()
        ),
        "",
    );
    let body = task("s1", "x");
    assert_eq!(
        api.post("application/json", body.as_bytes(), &[]).status,
        401
    );
    let r = api.post(
        "application/json",
        body.as_bytes(),
        &["-H", "Authorization: Bearer tok-0123456789abcdeX"],
    );
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"]["kind"], "unauthorized");
    assert_eq!(api.get("/v1/tasks/s1", &[]).status, 401);
    let r = api.post(
        "application/json",
        body.as_bytes(),
        &["-H", "Authorization: Bearer tok-0123456789abcdef"],
    );
    assert_eq!(r.status, 202, "{}", r.body);
    // Signed by the standardwebhooks library: valid, tampered, old.
    let sign = |msg_id: &str, age_secs: i64, payload: &str| -> String {
        let out = Command::new("python3")
            .arg("-c")
            .arg(
                "import sys, datetime\nfrom standardwebhooks.webhooks import Webhook\n\
                 ts = datetime.datetime.now(tz=datetime.timezone.utc) - datetime.timedelta(seconds=int(sys.argv[3]))\n\
                 print(int(ts.timestamp()), Webhook(sys.argv[1]).sign(sys.argv[2], ts, sys.argv[4]))",
            )
            .args([secret, msg_id, &age_secs.to_string(), payload])
            .output()
            .expect("python3 with standardwebhooks (pip install standardwebhooks)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let post_signed = |msg_id: &str, signed: &str, sent: &str, age: i64| -> Reply {
        let s = sign(msg_id, age, signed);
        let (ts, sig) = s.split_once(' ').unwrap();
        api.post(
            "application/json",
            sent.as_bytes(),
            &[
                "-H",
                &format!("webhook-id: {msg_id}"),
                "-H",
                &format!("webhook-timestamp: {ts}"),
                "-H",
                &format!("webhook-signature: {sig}"),
            ],
        )
    };
    let signed = task("s2", "x");
    assert_eq!(post_signed("msg_a", &signed, &signed, 0).status, 202);
    // A captured signed request replayed with an Idempotency-Key nobody
    // signed (issue 21, 7): the same message, nothing new is published.
    let lines_before = api.spooled_lines();
    let s = sign("msg_a", 0, &signed);
    let (ts, sig) = s.split_once(' ').unwrap();
    for extra in ["replay-1", "replay-2", "replay-3"] {
        let r = api.post(
            "application/json",
            signed.as_bytes(),
            &[
                "-H",
                "webhook-id: msg_a",
                "-H",
                &format!("webhook-timestamp: {ts}"),
                "-H",
                &format!("webhook-signature: {sig}"),
                "-H",
                &format!("Idempotency-Key: {extra}"),
            ],
        );
        assert_eq!(r.status, 202, "{}", r.body);
    }
    assert_eq!(
        api.spooled_lines(),
        lines_before,
        "a replay published tasks"
    );
    let tampered = task("s3", "x");
    let r = post_signed("msg_b", &signed, &tampered, 0);
    assert_eq!(r.status, 401, "{}", r.body);
    let r = post_signed("msg_c", &tampered, &tampered, 600);
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("timestamp"), "{}", r.body);
    wait_until(30, "two records", || api.env.records() == 2);
    // Rotation: a new token in the file, a reload, the old one is refused.
    fs::write(&tokens, "orders:tok-new-0123456789abcdef\n").unwrap();
    unsafe { libc::kill(api.daemon.as_ref().unwrap().id() as i32, libc::SIGHUP) };
    wait_until(30, "the new token accepted", || {
        let r = api.post(
            "application/json",
            task("s4", "x").as_bytes(),
            &[
                "-H",
                "Authorization: Bearer tok-new-0123456789abcdef",
                "-H",
                "Idempotency-Key: s4",
            ],
        );
        r.status == 202
    });
    let r = api.post(
        "application/json",
        body.as_bytes(),
        &["-H", "Authorization: Bearer tok-0123456789abcdef"],
    );
    assert_eq!(r.status, 401, "{}", r.body);
    wait_until(30, "three records", || api.env.records() == 3);
    let log = fs::read_to_string(api.env.root().join("daemon-a.log")).unwrap();
    assert!(log.contains("who=orders"), "the token's name is logged");
    assert!(!log.contains("tok-0123456789abcdef"), "the token never is");
    api.stop();
}

#[test]
fn an_idempotency_key_writes_once_on_any_daemon_of_the_spool() {
    let mut api = Api::start("", "");
    let body = task("k1", "x");
    let key = ["-H", "Idempotency-Key: order-1001-shipped"];
    let first = api.post("application/json", body.as_bytes(), &key);
    assert_eq!(first.status, 202, "{}", first.body);
    let again = api.post("application/json", body.as_bytes(), &key);
    assert_eq!(again.status, 202);
    assert_eq!(again.json(), first.json());
    // A second daemon on the same spool, with its own API.
    let port = free_port();
    let conf = api.env.instance_config("b");
    let text = fs::read_to_string(&conf).unwrap();
    let start = text.find("listen = ").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    fs::write(
        &conf,
        format!(
            "{}listen = \"127.0.0.1:{port}\"{}",
            &text[..start],
            &text[end..]
        ),
    )
    .unwrap();
    let mut b = api
        .env
        .cmd_with(&conf, &["run"])
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(api.env.root().join("daemon-b.log")).unwrap())
        .spawn()
        .unwrap();
    let other = format!("http://127.0.0.1:{port}/v1/tasks");
    wait_until(30, "b's API", || {
        curl(&format!("http://127.0.0.1:{port}/readyz"), &[], None).status == 200
    });
    let third = curl(
        &other,
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            key[0],
            key[1],
        ],
        Some(body.as_bytes()),
    );
    assert_eq!(third.status, 202, "{}", third.body);
    assert_eq!(third.json(), first.json());
    // The same key with another body is an error, and writes nothing.
    let r = api.post("application/json", task("k2", "x").as_bytes(), &key);
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.json()["error"]["kind"], "idempotency_conflict");
    wait_until(30, "the record", || api.env.records() == 1);
    assert_eq!(api.spooled_lines(), 1);
    sigterm(&b);
    assert!(b.wait().unwrap().success());
    api.stop();
}

#[test]
fn a_task_accepted_just_before_a_kill_runs_once_after_the_restart() {
    let mut api = Api::start("", "");
    let r = api.post("application/json", task("kill1", "NAP").as_bytes(), &[]);
    assert_eq!(r.status, 202);
    sigkill(api.daemon.as_ref().unwrap());
    api.daemon.take().unwrap().wait().unwrap();
    api.spawn();
    let s = api.get("/v1/tasks/kill1?wait=30s", &[]);
    assert_eq!(s.json()["status"], "completed", "{}", s.body);
    assert_eq!(api.env.records(), 1);
    api.stop();
}

#[test]
fn a_backlog_over_max_pending_lines_is_429_with_retry_after() {
    let mut api = Api::start("max_pending_lines = 5", "[gpu]\nmax_parallel = 1\n");
    let batch: String = (0..10)
        .map(|i| task(&format!("h{i}"), "HANGUNTILRELEASED") + "\n")
        .collect();
    assert_eq!(
        api.post("application/x-ndjson", batch.as_bytes(), &[])
            .status,
        202
    );
    // The backlog is counted at most once a second: post until refused.
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let r = api.post("application/json", task("more", "x").as_bytes(), &[]);
        if r.status == 429 {
            break r;
        }
        assert_eq!(r.status, 202, "{}", r.body);
        assert!(Instant::now() < deadline, "never refused");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        refused.headers.contains("retry-after:"),
        "{}",
        refused.headers
    );
    assert_eq!(refused.json()["error"]["kind"], "too_many_pending");
    fs::write(format!("{}.release", api.env.log().display()), "").unwrap();
    api.stop();
}

#[test]
fn a_spool_that_cannot_be_written_is_503_and_nothing_is_left() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (a read-only mount over pending/)");
        return;
    }
    let mut api = Api::start("", "");
    let pending = api.env.spool().join("pending");
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
        .arg(&pending)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: cannot mount a read-only tmpfs here");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _m = Unmount(pending.clone());
    let r = api.post("application/json", task("ro1", "x").as_bytes(), &[]);
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["kind"], "unavailable");
    assert!(r.body.contains("pending"), "{}", r.body);
    drop(_m);
    let r = api.post("application/json", task("ro2", "x").as_bytes(), &[]);
    assert_eq!(r.status, 202, "{}", r.body);
    wait_until(30, "the record", || api.env.records() == 1);
    api.stop();
}

#[test]
fn idle_and_slow_clients_hold_up_neither_claims_nor_other_requests() {
    let mut api = Api::start("", "");
    let addr = api.base.trim_start_matches("http://").to_string();
    // 500 connections that never send a byte, and one that sends its
    // request head a byte at a time.
    let idle: Vec<_> = (0..500)
        .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
        .collect();
    assert!(idle.len() >= 400, "could open {} connections", idle.len());
    let slow_addr = addr.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let slow = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(&slow_addr).unwrap();
        for b in b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .cycle()
        {
            if stop2.load(std::sync::atomic::Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    // Claims go on: a dropped file is run.
    api.env.drop_file("f.jsonl", &task_line("dropped", "x"));
    wait_until(30, "the dropped file's record", || api.env.records() == 1);
    // Other requests are answered (within the header timeout at worst).
    let t = Instant::now();
    let r = api.post("application/json", task("during", "x").as_bytes(), &[]);
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    wait_until(30, "both records", || api.env.records() == 2);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(idle);
    slow.join().unwrap();
    api.stop();
}

/// Closed by default (issue 21, 2): credentials that hold none never open
/// the API, at start or at a reload.
#[test]
fn an_empty_or_deleted_tokens_file_never_opens_the_api() {
    // At start: refused as a config error, for a non-loopback listen.
    for content in ["", "# only a comment\n\n"] {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        fs::write(&tokens, content).unwrap();
        let port = free_port();
        let env = Env::new(&format!(
            "[api]\nlisten = \"0.0.0.0:{port}\"\ntokens_file = \"{}\"\n",
            tokens.display()
        ));
        let out = env.run(&["run"], 30);
        assert_eq!(out.status.code(), Some(2), "refused at start");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("holds no token"), "{err}");
        let out = env.run(&["check"], 30);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("holds no token")
                || String::from_utf8_lossy(&out.stderr).contains("holds no token")
        );
        let missing = env.root().join("nope");
        let env2 = Env::new(&format!(
            "[api]\nlisten = \"0.0.0.0:{port}\"\ntokens_file = \"{}\"\n",
            missing.display()
        ));
        assert_eq!(env2.run(&["run"], 30).status.code(), Some(2));
    }
    // At reload: emptying the file revokes every token; deleting it too;
    // a token in the file opens it again.
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    fs::write(&tokens, "orders:tok-0123456789abcdef\n").unwrap();
    let port = free_port();
    let env = Env::new(&format!(
        "[api]\nlisten = \"0.0.0.0:{port}\"\ntokens_file = \"{}\"\n",
        tokens.display()
    ));
    let mut api = Api {
        env,
        base: format!("http://127.0.0.1:{port}"),
        daemon: None,
    };
    api.spawn();
    let good = ["-H", "Authorization: Bearer tok-0123456789abcdef"];
    let post = |api: &Api, id: &str, auth: &[&str]| {
        api.post("application/json", task(id, "x").as_bytes(), auth)
            .status
    };
    assert_eq!(post(&api, "c1", &good), 202);
    assert_eq!(post(&api, "c2", &[]), 401);
    let hup =
        |api: &Api| unsafe { libc::kill(api.daemon.as_ref().unwrap().id() as i32, libc::SIGHUP) };
    for revoke in ["empty", "comments", "deleted"] {
        match revoke {
            "empty" => fs::write(&tokens, "").unwrap(),
            "comments" => fs::write(&tokens, "# revoked\n").unwrap(),
            _ => fs::remove_file(&tokens).unwrap(),
        }
        hup(&api);
        wait_until(30, "the old token revoked", || {
            post(&api, "x", &good) == 401
        });
        assert_eq!(post(&api, "c3", &[]), 401, "{revoke}: never open");
        let log = fs::read_to_string(api.env.root().join("daemon-a.log")).unwrap();
        assert!(log.contains("API closed"), "the log says why");
        fs::write(&tokens, "orders:tok-0123456789abcdef\n").unwrap();
        hup(&api);
        wait_until(30, "the token accepted again", || {
            post(&api, &format!("ok-{revoke}"), &good) == 202
        });
    }
    api.stop();
}

/// Issue 21, 4: a pending file written by the API is readable by the
/// daemon's user only (a callback_url may carry a token).
#[test]
fn pending_files_written_by_the_api_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mut api = Api::start("", "");
    let r = api.post("application/json", task("p1", "x").as_bytes(), &[]);
    assert_eq!(r.status, 202, "{}", r.body);
    let mut modes = Vec::new();
    for dir in ["pending", "pending/.consumed"] {
        for e in fs::read_dir(api.env.spool().join(dir)).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("api-") {
                modes.push(e.metadata().unwrap().permissions().mode() & 0o777);
            }
        }
    }
    assert!(!modes.is_empty());
    assert!(modes.iter().all(|&m| m == 0o600), "{modes:?}");
    api.stop();
}
