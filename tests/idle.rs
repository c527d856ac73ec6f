//! An idle daemon is idle: on an empty spool it must not react to its own
//! reads of `pending/` (an inotify event for every scan once made it rescan
//! in a loop, about 97 % of a core). A generous bound, so that only that
//! kind of loop fails it; the figure itself is a benchmark's.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// CPU ticks (user + system) of a process.
fn ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn an_idle_daemon_uses_almost_no_cpu_with_notify_and_with_poll() {
    for watch in ["notify", "poll"] {
        let mut env = Env::new("");
        env.spool_extra = format!("watch = \"{watch}\"\npoll_interval = \"2s\"");
        env.write_config();
        let mut d = env.spawn("idle");
        let log = env.root().join("daemon-idle.log");
        wait_until(30, "the daemon started", || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("ttspool started")
        });
        let before = ticks(d.id());
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            assert!(d.try_wait().unwrap().is_none());
            std::thread::sleep(Duration::from_millis(100));
        }
        let used = ticks(d.id()) - before;
        sigterm(&d);
        assert!(d.wait().unwrap().success());
        // 300 ticks would be a whole core; 30 is a tenth of one.
        assert!(
            used < 30,
            "watch = {watch}: {used} CPU ticks in 3 s while idle"
        );
    }
}
