//! HTTP API benchmark (`cargo bench --bench api`), side by side in one run:
//!
//! 1. 10,000 single-task POSTs at concurrency 16 against `api.listen`
//!    (durable: each 202 after fsync and rename), and against the receiver
//!    such systems usually get — a small Python HTTP handler that appends the
//!    line to a file without fsync. Accepted tasks/s, p50/p99 latency.
//! 2. End to end: POST → the task's webhook arrives at a local receiver,
//!    with a trivial engine (`cp` of a tiny WAV), one task at a time:
//!    p50/p99.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;
use common::tiny_wav;

const BIN: &str = env!("CARGO_BIN_EXE_ttspool");
const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
const N: usize = 10_000;
const CONCURRENCY: usize = 16;

use common::free_port;

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A daemon with the API on `port`, a `cp` engine, and `extra` config.
fn daemon(dir: &Path, port: u16, extra: &str) -> Child {
    fs::create_dir_all(dir.join("spool/pending")).unwrap();
    fs::create_dir_all(dir.join("out")).unwrap();
    fs::write(dir.join("tiny.wav"), tiny_wav()).unwrap();
    fs::write(
        dir.join("ttspool.toml"),
        format!(
            "[spool]\ndir = \"spool\"\n[output]\ndir = \"out\"\n[engine]\nargv = [\"cp\", \"{}\", \"{{output}}\"]\n\
             [gpu]\nmax_parallel = 2\n[api]\nlisten = \"127.0.0.1:{port}\"\n{extra}",
            dir.join("tiny.wav").display()
        ),
    )
    .unwrap();
    let child = Command::new(BIN)
        .arg("run")
        .current_dir(dir)
        .env("TTSPOOL_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(port);
    child
}

/// The usual receiver: Python's http.server, one line appended per POST,
/// no fsync.
fn python_baseline(dir: &Path, port: u16) -> Child {
    let script = dir.join("recv.py");
    fs::write(
        &script,
        r#"import sys, http.server
out = open(sys.argv[2], "ab")
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else 40 ms delayed-ACK stalls
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        out.write(body.strip() + b"\n"); out.flush()
        reply = b'{"accepted":1}'
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#,
    )
    .unwrap();
    let child = Command::new("python3")
        .arg(&script)
        .arg(port.to_string())
        .arg(dir.join("received.jsonl"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(port);
    child
}

/// `N` POSTs of one task each, `CONCURRENCY` at a time over keep-alive
/// connections; returns (tasks/s, sorted latencies).
fn hammer(url: &str, prefix: &str) -> (f64, Vec<Duration>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(CONCURRENCY)
            .build()
            .unwrap();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let t = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..CONCURRENCY {
            let (client, next, url, prefix) =
                (client.clone(), next.clone(), url.to_string(), prefix.to_string());
            workers.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= N {
                        return lat;
                    }
                    let body = format!(
                        "{{\"id\":\"{prefix}{i}\",\"input_text\":\"hello\",\"output_name\":\"{prefix}{i}\"}}"
                    );
                    let s = Instant::now();
                    let r = client
                        .post(&url)
                        .header("Content-Type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status().as_u16(), 202);
                    let _ = r.bytes().await;
                    lat.push(s.elapsed());
                }
            }));
        }
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.unwrap());
        }
        let rate = N as f64 / t.elapsed().as_secs_f64();
        all.sort();
        (rate, all)
    })
}

fn pct(v: &[Duration], p: f64) -> f64 {
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1000.0
}

fn row(name: &str, value: String, target: &str) {
    println!("| {name:<46} | {value:>30} | {target:<26} |");
}

fn lines_in(dir: &Path) -> usize {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
        .map(|e| fs::read_to_string(e.path()).unwrap().lines().count())
        .sum()
}

fn throughput() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut d = daemon(dir.path(), port, "");
    let (rate, lat) = hammer(&format!("http://127.0.0.1:{port}/v1/tasks"), "t");
    let spooled = lines_in(&dir.path().join("spool/pending"))
        + lines_in(&dir.path().join("spool/pending/.consumed"));
    assert_eq!(spooled, N, "every accepted task is a line in the spool");
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    let _ = d.wait();
    let bdir = tempfile::tempdir().unwrap();
    let bport = free_port();
    let mut py = python_baseline(bdir.path(), bport);
    let (brate, blat) = hammer(&format!("http://127.0.0.1:{bport}/"), "t");
    let _ = py.kill();
    let _ = py.wait();
    row(
        "POST /v1/tasks: ttspool (durable), 10k, c=16",
        format!(
            "{rate:.0} tasks/s, p50 {:.1} p99 {:.1} ms",
            pct(&lat, 0.5),
            pct(&lat, 0.99)
        ),
        ">= 2000/s, p99 < 50 ms",
    );
    row(
        "  baseline: Python http.server, no fsync",
        format!(
            "{brate:.0} tasks/s, p50 {:.1} p99 {:.1} ms",
            pct(&blat, 0.5),
            pct(&blat, 0.99)
        ),
        "",
    );
}

/// A receiver that notes when each task's webhook arrives.
fn hook_receiver() -> (u16, Arc<Mutex<HashMap<String, Instant>>>) {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let s = seen.clone();
    let port = common::receiver(move |body| {
        let now = Instant::now();
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
            if let Some(id) = v["data"]["id"].as_str() {
                s.lock().unwrap().insert(id.to_string(), now);
            }
        }
    });
    (port, seen)
}

fn end_to_end() {
    let (hport, seen) = hook_receiver();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut d = daemon(
        dir.path(),
        port,
        &format!(
            "[webhook]\nurl = \"http://127.0.0.1:{hport}/hook\"\nsecret = \"{SECRET}\"\nallow_cidrs = [\"127.0.0.1/32\"]\n"
        ),
    );
    let client = reqwest::blocking::Client::new();
    let n = 300;
    let mut lat = Vec::new();
    for i in 0..n {
        let id = format!("e{i}");
        let t = Instant::now();
        let r = client
            .post(format!("http://127.0.0.1:{port}/v1/tasks"))
            .header("Content-Type", "application/json")
            .body(format!(
                "{{\"id\":\"{id}\",\"input_text\":\"hello\",\"output_name\":\"{id}\"}}"
            ))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        let deadline = t + Duration::from_secs(10);
        loop {
            if let Some(at) = seen.lock().unwrap().get(&id) {
                lat.push(at.duration_since(t));
                break;
            }
            assert!(Instant::now() < deadline, "no webhook for {id}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    let _ = d.wait();
    lat.sort();
    row(
        "POST -> webhook arrives (cp engine, 300 tasks)",
        format!(
            "p50 {:.1} ms, p99 {:.1} ms",
            pct(&lat, 0.5),
            pct(&lat, 0.99)
        ),
        "p50 < 30 ms, p99 < 100 ms",
    );
}

fn main() {
    let want = common::selection(30);
    if want("throughput") {
        throughput();
    }
    if want("e2e") {
        end_to_end();
    }
}
