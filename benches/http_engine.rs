//! The `http` engine against a TTS server (`cargo bench --bench http_engine`),
//! side by side in one run: the fake Fish Speech server
//! (tests/engines/fish_server.py) answering each request in a fixed 20 ms,
//! four at a time — a capacity of 200 requests/s — driven by
//!
//! 1. ttspool `run --once`, `max_in_flight = 4`, durable records;
//! 2. the client people write: asyncio + aiohttp with `Semaphore(4)`, each
//!    answer written to a file, no records, no fsync.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

const BIN: &str = env!("CARGO_BIN_EXE_ttspool");
const N: usize = 2000;
const DELAY: f64 = 0.02;
const IN_FLIGHT: usize = 4;

use common::free_port;

fn fake_server(port: u16) -> Child {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/engines/fish_server.py");
    let child = Command::new("python3")
        .arg(script)
        .args(["--port", &port.to_string(), "--delay", &DELAY.to_string()])
        .args(["--concurrency", &IN_FLIGHT.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the fake server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn ttspool(port: u16) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir_all(d.join("spool/pending")).unwrap();
    fs::write(
        d.join("ttspool.toml"),
        format!(
            "[spool]\ndir = \"spool\"\n[output]\ndir = \"out\"\n[engine]\nkind = \"http\"\n\
             urls = [\"http://127.0.0.1:{port}/v1/tts\"]\npreset = \"fish-speech\"\nmax_in_flight = {IN_FLIGHT}\n"
        ),
    )
    .unwrap();
    let tmp = d.join("spool/pending/.t.tmp");
    let mut w = BufWriter::new(fs::File::create(&tmp).unwrap());
    for i in 0..N {
        writeln!(
            w,
            "{{\"id\":\"t{i}\",\"input_text\":\"您好 {i}\",\"output_name\":\"t{i}\"}}"
        )
        .unwrap();
    }
    w.flush().unwrap();
    drop(w);
    fs::rename(&tmp, d.join("spool/pending/t.jsonl")).unwrap();
    let t = Instant::now();
    let st = Command::new(BIN)
        .args(["run", "--once"])
        .current_dir(d)
        .env("TTSPOOL_LOG", "warn")
        .status()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(st.success());
    let done = fs::read_to_string(d.join("spool/done.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(done, N);
    N as f64 / secs
}

/// What the server serves: the lightest client there is (4 loops of
/// POST-and-drop on keep-alive connections), no files.
fn capacity(port: u16) -> f64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let t = Instant::now();
        let mut loops = Vec::new();
        for _ in 0..IN_FLIGHT {
            let (client, next) = (client.clone(), next.clone());
            loops.push(tokio::spawn(async move {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < N {
                    let r = client
                        .post(format!("http://127.0.0.1:{port}/v1/tts"))
                        .header("Content-Type", "application/json")
                        .body(r#"{"text":"您好","format":"wav","streaming":false}"#)
                        .send()
                        .await
                        .unwrap();
                    let _ = r.bytes().await;
                }
            }));
        }
        for l in loops {
            l.await.unwrap();
        }
        N as f64 / t.elapsed().as_secs_f64()
    })
}

fn aiohttp_client(port: u16) -> Option<f64> {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("client.py");
    fs::write(
        &script,
        r#"import asyncio, sys, time, aiohttp
N, URL, OUT = int(sys.argv[1]), sys.argv[2], sys.argv[3]
async def one(session, sem, i):
    async with sem:
        for attempt in range(3):
            try:
                async with session.post(URL, json={"text": "您好 %d" % i, "format": "wav", "streaming": False}) as r:
                    if r.status == 200:
                        data = await r.read()
                        with open("%s/t%d.wav" % (OUT, i), "wb") as f:
                            f.write(data)
                        return True
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(2 ** attempt)
        return False
async def main():
    sem = asyncio.Semaphore(4)
    async with aiohttp.ClientSession() as session:
        t = time.time()
        ok = await asyncio.gather(*(one(session, sem, i) for i in range(N)))
        print(sum(ok), time.time() - t)
asyncio.run(main())
"#,
    )
    .unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .arg(N.to_string())
        .arg(format!("http://127.0.0.1:{port}/v1/tts"))
        .arg(dir.path())
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "aiohttp baseline skipped (pip install aiohttp): {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    let ok: usize = it.next()?.parse().ok()?;
    let secs: f64 = it.next()?.parse().ok()?;
    assert_eq!(ok, N);
    Some(N as f64 / secs)
}

fn main() {
    let want = common::selection(22);
    if !want("server") {
        return;
    }
    let port = free_port();
    let mut server = fake_server(port);
    let nominal = IN_FLIGHT as f64 / DELAY;
    let capacity = capacity(port);
    let ours = ttspool(port);
    let theirs = aiohttp_client(port);
    let _ = server.kill();
    let _ = server.wait();
    println!(
        "| {:<46} | {:>22} | {:<26} |",
        "server: nominal (4 at a time, 20 ms each)",
        format!("{nominal:.0} req/s"),
        ""
    );
    println!(
        "| {:<46} | {:>22} | {:<26} |",
        "server: measured (4 loops, answers dropped)",
        format!("{capacity:.0} req/s"),
        ""
    );
    println!(
        "| {:<46} | {:>22} | {:<26} |",
        format!("ttspool http engine, {N} tasks, durable"),
        format!("{ours:.0} tasks/s ({:.2} of meas.)", ours / capacity),
        ">= 0.95 of capacity"
    );
    if let Some(t) = theirs {
        println!(
            "| {:<46} | {:>22} | {:<26} |",
            "aiohttp + Semaphore(4), no records",
            format!("{t:.0} tasks/s"),
            ""
        );
        println!(
            "| {:<46} | {:>22} | {:<26} |",
            "ratio ttspool / aiohttp",
            format!("{:.2}x", ours / t),
            ">= 0.9x"
        );
    }
}
