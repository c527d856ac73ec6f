//! What the bench binaries share.

/// A WAV header with no samples: enough for the engine's RIFF/WAVE check.
#[allow(dead_code)] // not every bench binary runs an engine
pub fn tiny_wav() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b"RIFF");
    v.extend_from_slice(&36u32.to_le_bytes());
    v.extend_from_slice(b"WAVEfmt ");
    v.extend_from_slice(&16u32.to_le_bytes());
    v.extend_from_slice(&[1, 0, 1, 0]);
    v.extend_from_slice(&16000u32.to_le_bytes());
    v.extend_from_slice(&32000u32.to_le_bytes());
    v.extend_from_slice(&[2, 0, 16, 0]);
    v.extend_from_slice(b"data");
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

/// A minimal HTTP/1.1 keep-alive receiver on a free loopback port that
/// answers 200 to every request and hands each body to `on_body` as it
/// arrives. Returns the port.
#[allow(dead_code)] // not every bench binary receives webhooks
pub fn receiver(on_body: impl Fn(&[u8]) + Send + Sync + 'static) -> u16 {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let on_body = std::sync::Arc::new(on_body);
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let on_body = on_body.clone();
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    on_body(&body);
                    if w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// `cargo bench -- NAME`: whether the benchmark `name` was asked for (all
/// when none was named); prints the table's head.
#[allow(dead_code)]
pub fn selection(result_width: usize) -> impl Fn(&str) -> bool {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    println!(
        "| {:<46} | {:>w$} | {:<26} |",
        "benchmark",
        "result",
        "target",
        w = result_width
    );
    println!(
        "|{}|{}|{}|",
        "-".repeat(48),
        "-".repeat(result_width + 2),
        "-".repeat(28)
    );
    move |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()))
}

/// A loopback port free a moment ago.
#[allow(dead_code)]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
