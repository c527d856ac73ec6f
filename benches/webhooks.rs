//! Webhook benchmark (`cargo bench --bench webhooks`): 10,000 events through
//! `run --once` to a local receiver (deliveries/s, peak RSS), and an outbox of
//! 100,000 undelivered messages (receiver down: peak RSS must stay bounded).

use std::fs;
use std::io::{BufWriter, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ttspool");

#[path = "common/mod.rs"]
mod common;
const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

/// First and last request times.
type Span = Arc<Mutex<(Option<Instant>, Option<Instant>)>>;

/// The receiver, counting deliveries and noting the first and last.
fn receiver() -> (u16, Arc<AtomicUsize>, Span) {
    let count = Arc::new(AtomicUsize::new(0));
    let span: Span = Arc::new(Mutex::new((None, None)));
    let (c, s) = (count.clone(), span.clone());
    let port = common::receiver(move |_| {
        let now = Instant::now();
        {
            let mut g = s.lock().unwrap();
            g.0.get_or_insert(now);
            g.1 = Some(now);
        }
        c.fetch_add(1, Ordering::SeqCst);
    });
    (port, count, span)
}

fn spool(n: usize, url: &str, schedule: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir_all(d.join("spool/pending")).unwrap();
    fs::create_dir_all(d.join("out")).unwrap();
    fs::write(d.join("out/same.wav"), b"RIFF\x24\0\0\0WAVEfmt ").unwrap();
    fs::write(
        d.join("ttspool.toml"),
        format!(
            "[spool]\ndir = \"spool\"\nsettle = \"100ms\"\n[output]\ndir = \"out\"\n\
             [engine]\nargv = [\"cp\", \"/nonexistent\", \"{{output}}\"]\n\
             [webhook]\nurl = \"{url}\"\nsecret = \"{SECRET}\"\nallow_cidrs = [\"127.0.0.1/32\"]\n\
             events = [\"task.skipped\"]\nschedule = {schedule}\ntimeout = \"2s\"\n\
             [shutdown]\ngrace = \"1s\"\n"
        ),
    )
    .unwrap();
    let tmp = d.join("spool/pending/.w.tmp");
    let mut w = BufWriter::new(fs::File::create(&tmp).unwrap());
    for i in 0..n {
        writeln!(
            w,
            "{{\"id\":\"w{i}\",\"input_text\":\"hi\",\"output_name\":\"same\"}}"
        )
        .unwrap();
    }
    w.flush().unwrap();
    drop(w);
    fs::rename(tmp, d.join("spool/pending/w.jsonl")).unwrap();
    dir
}

#[allow(clippy::zombie_processes)] // reaped by wait4
fn run_once(dir: &std::path::Path) -> (Duration, u64) {
    let t = Instant::now();
    let child = Command::new(BIN)
        .args(["run", "--once"])
        .current_dir(dir)
        .env("TTSPOOL_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: our child; valid out-pointers.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(r, child.id() as i32);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "run --once failed"
    );
    (t.elapsed(), ru.ru_maxrss as u64)
}

fn main() {
    println!(
        "| {:<52} | {:>20} | {:<12} |",
        "benchmark", "result", "target"
    );
    println!("|{}|{}|{}|", "-".repeat(54), "-".repeat(22), "-".repeat(14));

    let (port, count, span) = receiver();
    let n = 10_000;
    let dir = spool(n, &format!("http://127.0.0.1:{port}/hook"), "[\"1s\"]");
    let (wall, rss) = run_once(dir.path());
    let got = count.load(Ordering::SeqCst);
    assert_eq!(got, n, "every event delivered");
    let (first, last) = *span.lock().unwrap();
    let secs = (last.unwrap() - first.unwrap()).as_secs_f64().max(1e-3);
    println!(
        "| {:<52} | {:>20} | {:<12} |",
        "10k events to a local receiver: deliveries/s",
        format!("{:.0}/s", n as f64 / secs),
        ""
    );
    println!(
        "| {:<52} | {:>20} | {:<12} |",
        "  run --once wall time (10k tasks + 10k webhooks)",
        format!("{:.1} s", wall.as_secs_f64()),
        ""
    );
    println!(
        "| {:<52} | {:>20} | {:<12} |",
        "  peak RSS",
        format!("{:.1} MiB", rss as f64 / 1024.0),
        ""
    );

    // Receiver down: 100,000 messages wait in the outbox.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let n = 100_000;
    let dir = spool(n, &format!("http://127.0.0.1:{closed}/hook"), "[\"1h\"]");
    let (wall, rss) = run_once(dir.path());
    let out = Command::new(BIN)
        .args(["status", "--json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["webhook_outbox"], n, "all undelivered messages kept");
    println!(
        "| {:<52} | {:>20} | {:<12} |",
        "100k undelivered in the outbox (receiver down): peak RSS",
        format!("{:.1} MiB", rss as f64 / 1024.0),
        "< 64 MiB"
    );
    println!(
        "| {:<52} | {:>20} | {:<12} |",
        "  run --once wall time (100k tasks, 100k attempts)",
        format!("{:.1} s", wall.as_secs_f64()),
        ""
    );
}
