//! A full disk is a pause, not a crash: a small tmpfs holds the spool, a
//! filler file takes its last byte, and ttspool must neither exit nor flood
//! its log, must not lose or double a record, and `run --once` must say
//! what it left undone.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A tmpfs mounted over a folder, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` to its last byte.
fn fill(dir: &Path) -> PathBuf {
    let p = dir.join("filler");
    let mut f = fs::File::create(&p).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    while f.write_all(&[0]).is_ok() {}
    let _ = f.sync_all();
    p
}

/// An env whose spool is a 1 MiB tmpfs holding 300 pending lines, full.
fn full_spool() -> Option<(Env, Tmpfs, PathBuf)> {
    let env = Env::new("");
    let Some(mnt) = Tmpfs::mount(&env.spool(), "1m") else {
        eprintln!("skipped: cannot mount a tmpfs (needs root)");
        return None;
    };
    fs::create_dir_all(env.spool().join("pending")).unwrap();
    let lines: String = (0..300).map(|i| task_line(&format!("d{i}"), "x")).collect();
    env.drop_file("d.jsonl", &lines);
    let filler = fill(&env.spool());
    Some((env, mnt, filler))
}

fn per_line(env: &Env) -> HashMap<u64, usize> {
    let mut out = HashMap::new();
    for r in env.done().into_iter().chain(env.failed()) {
        *out.entry(r["source"]["line"].as_u64().unwrap())
            .or_default() += 1;
    }
    out
}

#[test]
fn run_once_on_a_full_disk_fails_naming_what_it_left() {
    let Some((env, _mnt, filler)) = full_spool() else {
        return;
    };
    let out = env.run(&["run", "--once"], 60);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("without a record") && err.contains("disk full"),
        "{err}"
    );
    fs::remove_file(filler).unwrap();
    env.run_once();
    let lines = per_line(&env);
    assert_eq!(lines.len(), 300);
    assert!(lines.values().all(|&n| n == 1), "{lines:?}");
}

#[test]
fn a_daemon_on_a_full_disk_waits_quietly_and_resumes() {
    let Some((env, _mnt, filler)) = full_spool() else {
        return;
    };
    let mut d = env.spawn("a");
    let log = env.root().join("daemon-a.log");
    let text = || fs::read_to_string(&log).unwrap_or_default();
    wait_until(30, "the disk-full warning", || text().contains("disk full"));
    // Watch it for a while: alive, and a log that does not grow much.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        assert!(
            d.try_wait().unwrap().is_none(),
            "the daemon exited: {}",
            text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let lines_while_full = text().lines().count();
    assert!(
        lines_while_full < 40,
        "{lines_while_full} log lines:\n{}",
        text()
    );
    fs::remove_file(filler).unwrap();
    wait_until(60, "300 records once space returned", || {
        per_line(&env).len() == 300
    });
    sigterm(&d);
    assert!(d.wait().unwrap().success());
    let lines = per_line(&env);
    assert!(lines.values().all(|&n| n == 1), "{lines:?}");
    assert!(text().contains("space is back"), "{}", text());
}
