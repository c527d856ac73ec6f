//! Children in their own process group: timeouts, kills, and the stderr tail.
//!
//! Each child leads a new process group, so a timeout or a shutdown can signal
//! the whole tree (a shell's grandchildren included) with `kill(-pgid)`: first
//! SIGTERM, then SIGKILL after the grace. `PR_SET_PDEATHSIG` makes the kernel
//! kill the child if the daemon dies, even by SIGKILL, so a restarted daemon
//! never races an orphan writing the same output. That signal fires when the
//! *thread* that spawned the child exits, which is why the daemon runs a
//! current-thread runtime and spawns only from its main thread.
//!
//! stderr is drained while waiting (its tail goes into failed records), so a
//! chatty child never blocks on a full pipe; stdout goes to /dev/null. After
//! the child exits the rest of its group is killed — before the leader is
//! reaped, so the group id cannot have been reused — and a grandchild holding
//! stderr open cannot hang us. How a child is started is in spawn.rs.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::util::Tail;

mod spawn;

pub use spawn::{set_spawn_gate, spawn, Child};

/// Bytes of stderr kept for a failed record.
pub const TAIL_BYTES: usize = 4096;

/// Environment variables that mark a child (and its descendants, which
/// inherit them) as started by this daemon for this spool.
pub const MARK_SPOOL: &str = "TTSPOOL_SPOOL";
pub const MARK_INSTANCE: &str = "TTSPOOL_INSTANCE";
pub const MARK_DAEMON_PID: &str = "TTSPOOL_DAEMON_PID";

/// The marks every child of this daemon carries.
pub fn marks(spool: &std::path::Path, instance: &str) -> Vec<(String, String)> {
    vec![
        (MARK_SPOOL.into(), spool.to_string_lossy().into_owned()),
        (MARK_INSTANCE.into(), instance.into()),
        (MARK_DAEMON_PID.into(), std::process::id().to_string()),
    ]
}

/// Kills what a previous run of this instance left behind on this host.
///
/// `PR_SET_PDEATHSIG` kills our direct children when we die, but not their
/// children (a shell's `sleep &`, a Python worker pool). Those still carry our
/// marks in their environment, so a restart — which holds the instance lock,
/// so the previous run is surely dead — finds them in /proc and kills them
/// before it runs their tasks again. Returns how many were killed.
pub fn kill_orphans(spool: &std::path::Path, instance: &str) -> usize {
    let me = std::process::id().to_string();
    let want_spool = format!("{MARK_SPOOL}={}", spool.to_string_lossy());
    let want_inst = format!("{MARK_INSTANCE}={instance}");
    let pid_prefix = format!("{MARK_DAEMON_PID}=");
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for ent in rd.flatten() {
        let Ok(pid) = ent.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let mut spool_ok = false;
        let mut inst_ok = false;
        let mut other_daemon = false;
        for kv in env.split(|&b| b == 0) {
            let kv = String::from_utf8_lossy(kv);
            if kv == want_spool {
                spool_ok = true;
            } else if kv == want_inst {
                inst_ok = true;
            } else if let Some(p) = kv.strip_prefix(&pid_prefix) {
                other_daemon = p != me;
            }
        }
        if spool_ok && inst_ok && other_daemon {
            // SAFETY: kill(2) on a pid; no memory is touched.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
    }
    killed
}

/// Variables of the daemon's own that no child ever gets, whatever
/// `engine.env_pass` says: ttspool's secrets and settings (`TTSPOOL_*`; the
/// marks and task variables are set explicitly) and systemd's channels.
fn never_passed(name: &str) -> bool {
    name.starts_with("TTSPOOL_")
        || name == "NOTIFY_SOCKET"
        || name.starts_with("WATCHDOG_")
        || name.starts_with("LISTEN_")
}

/// True when `name` matches a pattern of `engine.env_pass`: a name, or a
/// prefix ending in `*`.
pub fn env_passes(patterns: &[String], name: &str) -> bool {
    !never_passed(name)
        && patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => p == name,
        })
}

/// The part of every child's environment that is the same for each task,
/// built once per engine: the daemon's variables that `engine.env_pass`
/// lets through, then `engine.env`, then `fixed` (our marks). The
/// environment is an allow-list because an engine is often third-party code
/// with third-party dependencies: it must not see the webhook signing key
/// or anything else the operator gave the daemon alone.
#[derive(Debug, Clone, Default)]
pub struct BaseEnv(std::sync::Arc<Vec<std::ffi::CString>>);

impl BaseEnv {
    pub fn new(
        pass: &[String],
        set: &std::collections::BTreeMap<String, String>,
        fixed: &[(String, String)],
    ) -> BaseEnv {
        use std::os::unix::ffi::OsStrExt;
        let mut vars: Vec<(Vec<u8>, Vec<u8>)> = std::env::vars_os()
            .filter(|(k, _)| k.to_str().is_some_and(|k| env_passes(pass, k)))
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        for (k, v) in set.iter().chain(fixed.iter().map(|(k, v)| (k, v))) {
            vars.retain(|(have, _)| have != k.as_bytes());
            vars.push((k.as_bytes().to_vec(), v.as_bytes().to_vec()));
        }
        BaseEnv(std::sync::Arc::new(
            vars.into_iter()
                .filter_map(|(mut k, v)| {
                    k.push(b'=');
                    k.extend_from_slice(&v);
                    std::ffi::CString::new(k).ok()
                })
                .collect(),
        ))
    }

    fn vars(&self) -> &[std::ffi::CString] {
        &self.0
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find_map(|c| {
            let s = c.to_str().ok()?;
            s.strip_prefix(name)?.strip_prefix('=')
        })
    }
}

#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub argv: Vec<String>,
    /// What every child of the engine gets.
    pub base: BaseEnv,
    /// Per child, on top of `base` (replacing a variable of the same name).
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub timeout: Duration,
    pub kill_grace: Duration,
    /// Bytes of stderr to keep (the end of it).
    pub tail_bytes: usize,
    /// stdin and fd 3 are pipes to us (a worker's protocol, SPEC §13), not
    /// /dev/null and nothing.
    pub pipes: bool,
}

#[derive(Debug)]
pub enum Exit {
    Exited(ExitStatus),
    TimedOut,
    /// Killed because the daemon is shutting down.
    Cancelled,
    SpawnFailed(io::Error),
}

#[derive(Debug)]
pub struct ChildResult {
    pub exit: Exit,
    pub stderr_tail: String,
    pub elapsed: Duration,
}

pub fn signal_group(pgid: i32, sig: i32) {
    if pgid > 0 {
        // SAFETY: kill(2) with a negative pid signals a process group; no memory is touched.
        unsafe {
            libc::kill(-pgid, sig);
        }
    }
}

/// Resolves once `cancel` is true; never if its sender is gone first.
pub async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    loop {
        if *cancel.borrow_and_update() {
            return;
        }
        if cancel.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Runs one child to its end. `cancel` turning true kills it at once.
pub async fn run(spec: &ChildSpec, mut cancel: watch::Receiver<bool>) -> ChildResult {
    let started = Instant::now();
    // Out of descriptors (pipes cannot be made): not the task's fault and
    // not the engine's; wait for some to close, within the task's timeout.
    let mut wait = Duration::from_millis(50);
    let spawned = loop {
        match spawn::spawn(spec).await {
            Err(e)
                if crate::util::is_out_of_descriptors(&e)
                    && started.elapsed() + wait < spec.timeout =>
            {
                crate::util::warn_out_of_descriptors(&format!(
                    "cannot start {}: {}",
                    spec.argv[0],
                    crate::util::io_msg(&e)
                ));
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            other => break other,
        }
    };
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) if spawn::is_untrusted(&e) => {
            tracing::warn!("{e}; the task waits until our leases are checked");
            return ChildResult {
                exit: Exit::Cancelled,
                stderr_tail: String::new(),
                elapsed: started.elapsed(),
            };
        }
        Err(e) => {
            return ChildResult {
                exit: Exit::SpawnFailed(e),
                stderr_tail: String::new(),
                elapsed: started.elapsed(),
            }
        }
    };
    let pgid = child.id();
    let tail_bytes = spec.tail_bytes;
    let drain_err = child
        .take_stderr()
        .and_then(|fd| tokio::net::unix::pipe::Receiver::from_owned_fd(fd).ok())
        .map(|mut err| {
            tokio::spawn(async move {
                let mut tail = Tail::new(tail_bytes);
                let mut buf = [0u8; 8192];
                while let Ok(n) = err.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    tail.push(&buf[..n]);
                }
                tail
            })
        });

    let deadline = tokio::time::sleep(spec.timeout);
    tokio::pin!(deadline);
    let cancelled = cancelled(&mut cancel);
    let ended = tokio::select! {
        r = child.exited() => r.map(|()| None),
        _ = &mut deadline => {
            signal_group(pgid, libc::SIGTERM);
            tokio::select! {
                _ = child.exited() => {}
                _ = tokio::time::sleep(spec.kill_grace) => {}
            }
            Ok(Some(Exit::TimedOut))
        }
        _ = cancelled => Ok(Some(Exit::Cancelled)),
    };
    // Whatever is left of the group (grandchildren, a child ignoring TERM)
    // goes now, while the unreaped leader keeps the group's id ours.
    signal_group(pgid, libc::SIGKILL);
    let status = child.reap();
    let exit = match (ended, status) {
        (Ok(Some(exit)), _) => exit,
        (Ok(None), Ok(st)) => Exit::Exited(st),
        (Err(e), _) | (Ok(None), Err(e)) => Exit::SpawnFailed(e),
    };
    let stderr_tail = match drain_err {
        Some(h) => match tokio::time::timeout(Duration::from_secs(2), h).await {
            Ok(Ok(t)) => t.text(),
            _ => String::new(),
        },
        None => String::new(),
    };
    ChildResult {
        exit,
        stderr_tail,
        elapsed: started.elapsed(),
    }
}
