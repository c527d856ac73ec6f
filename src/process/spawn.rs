//! Starting a child the way glibc's `posix_spawn` does —
//! `clone(CLONE_VM | CLONE_VFORK)` — plus the one step `posix_spawn` has no
//! attribute for: `PR_SET_PDEATHSIG`.
//!
//! Why not std's `Command`: with a `pre_exec` hook (the only way to set the
//! death signal) std falls back to `fork()`, which copies the daemon's page
//! tables and makes every page the daemon writes afterwards fault once. For
//! engines that finish in milliseconds that was half of the daemon's CPU per
//! task (measured with `perf`; see the dispatch benchmark). A `CLONE_VM`
//! child borrows the parent's memory until `execve`, and the parent is
//! suspended meanwhile (`CLONE_VFORK`), so nothing is copied.
//!
//! The child's code ([`child_main`]) runs on its own small stack *inside the
//! parent's memory*, so it only reads what the parent prepared, makes raw
//! system calls (`syscall(2)`, never the libc wrappers an `LD_PRELOAD`
//! library could hook and take locks in), writes one error word and ends in
//! `execve` or `_exit`: no allocation, no locks, no panics. Its stack is
//! mapped once, with a guard page below it, so an overflow faults instead of
//! writing over the daemon's memory.
//!
//! **A thread of its own.** `CLONE_VFORK` suspends the calling thread until
//! the child has exec'ed — and `chdir` or `execve` on a hung NFS mount can
//! take forever. So every child is started by one long-lived spawner thread
//! ([`spawn`] hands it the work and awaits the answer): the event loop never
//! waits on a child's start, and the spawner, living as long as the daemon,
//! is the thread whose exit `PR_SET_PDEATHSIG` watches. Children that must be
//! killed and reaped without a waiter (a dropped [`Child`]) go to a reaper
//! thread, because a child stuck in the kernel can take a while to die.
//!
//! Waiting uses a pidfd (`CLONE_PIDFD`, Linux ≥ 5.2) registered with the runtime, so a
//! child's exit wakes the event loop directly. A pidfd says "exited" without
//! reaping, so the caller can kill the rest of the process group while the
//! leader's pid is still reserved as a zombie, and only then reap it. Kernels
//! without `CLONE_PIDFD` get the same from `waitid(WNOWAIT)` on a blocking
//! thread.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::OnceLock;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::{BaseEnv, ChildSpec};

/// Stack for the child between `clone` and `execve`; it runs a handful of
/// system calls (glibc's posix_spawn uses 32 KiB plus the arguments).
const CHILD_STACK: usize = 64 * 1024;
const GUARD: usize = 4096;

/// The child stack: mapped once by the spawner thread (children start one
/// at a time), with a `PROT_NONE` guard page below it.
struct Stack {
    top: *mut libc::c_void,
}

impl Stack {
    fn map() -> io::Result<Stack> {
        // SAFETY: an anonymous private mapping; the guard page is the
        // lowest page of it.
        unsafe {
            let base = libc::mmap(
                ptr::null_mut(),
                CHILD_STACK + GUARD,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            if libc::mprotect(base, GUARD, libc::PROT_NONE) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The stack grows down from its end, 16-byte aligned.
            let top = ((base as usize + CHILD_STACK + GUARD) & !15) as *mut libc::c_void;
            Ok(Stack { top })
        }
    }
}

/// A started child before its pidfd is registered with the runtime.
struct Started {
    pid: libc::pid_t,
    pidfd: Option<OwnedFd>,
    stderr: OwnedFd,
    /// With [`ChildSpec::pipes`]: our ends of its stdin and its fd 3.
    pipes: Option<(OwnedFd, OwnedFd)>,
}

type Job = (ChildSpec, tokio::sync::oneshot::Sender<io::Result<Started>>);

type Gate = Box<dyn Fn() -> bool + Send + Sync>;

fn gate() -> &'static std::sync::RwLock<Option<Gate>> {
    static GATE: OnceLock<std::sync::RwLock<Option<Gate>>> = OnceLock::new();
    GATE.get_or_init(|| std::sync::RwLock::new(None))
}

/// Sets what the spawner asks right before it starts a per-task child:
/// the daemon's "nobody can have taken our leases" (its heartbeat is fresh).
pub fn set_spawn_gate(g: Gate) {
    *gate().write().expect("spawn gate") = Some(g);
}

fn gate_open() -> bool {
    gate()
        .read()
        .expect("spawn gate")
        .as_ref()
        .is_none_or(|g| g())
}

/// A child not started because the daemon may have been judged dead (see
/// [`set_spawn_gate`]); the task is handed back to the core, not failed.
#[derive(Debug)]
pub struct Untrusted;

impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "not started: our heartbeat was late, so another daemon may hold the task's lease now",
        )
    }
}

impl std::error::Error for Untrusted {}

/// True for the error of a child the gate kept from starting.
pub fn is_untrusted(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|r| r.is::<Untrusted>())
}

/// The spawner thread's queue.
fn spawner() -> &'static std::sync::Mutex<std::sync::mpsc::Sender<Job>> {
    static SPAWNER: OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Job>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("ttspool-spawner".into())
            .spawn(move || {
                let stack = Stack::map();
                while let Ok((spec, reply)) = rx.recv() {
                    let res = match &stack {
                        // A worker is not a task: only per-task children
                        // wait for the gate.
                        Ok(_) if !spec.pipes && !gate_open() => Err(io::Error::other(Untrusted)),
                        Ok(s) => start(&spec, s),
                        Err(e) => Err(io::Error::new(
                            e.kind(),
                            format!("cannot map a child stack: {e}"),
                        )),
                    };
                    if let Err(Ok(orphan)) = reply.send(res) {
                        // Nobody waits for it any more (shutdown).
                        reap_later(orphan.pid);
                    }
                }
            })
            .expect("the spawner thread starts");
        std::sync::Mutex::new(tx)
    })
}

/// Kills the group of `pid` and reaps it on the reaper thread.
fn reap_later(pid: libc::pid_t) {
    static REAPER: OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<libc::pid_t>>> =
        OnceLock::new();
    let tx = REAPER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<libc::pid_t>();
        let _ = std::thread::Builder::new()
            .name("ttspool-reaper".into())
            .spawn(move || {
                while let Ok(pid) = rx.recv() {
                    let mut st = 0;
                    // SAFETY: pid is our unreaped child.
                    while unsafe { libc::waitpid(pid, &mut st, 0) } < 0
                        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
                    {
                    }
                }
            });
        std::sync::Mutex::new(tx)
    });
    // SAFETY: the group is ours and its leader unreaped.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let _ = tx.lock().expect("reaper").send(pid);
}

/// Set once the kernel has refused `CLONE_PIDFD` (before Linux 5.2).
static NO_PIDFD: AtomicBool = AtomicBool::new(false);

/// A running child: the leader of its own process group.
pub struct Child {
    pid: libc::pid_t,
    pidfd: Option<AsyncFd<OwnedFd>>,
    stderr: Option<OwnedFd>,
    pipes: Option<(OwnedFd, OwnedFd)>,
    reaped: Option<ExitStatus>,
}

/// Everything the child reads, prepared by the parent before `clone`.
struct ChildArgs {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// Null: keep the daemon's working folder.
    cwd: *const libc::c_char,
    null_fd: libc::c_int,
    err_fd: libc::c_int,
    /// With pipes: the read end for its stdin and the write end for its fd
    /// 3; else -1.
    in_fd: libc::c_int,
    proto_fd: libc::c_int,
    parent: libc::pid_t,
    /// The errno of the step that failed, written by the child before `_exit`.
    error: AtomicI32,
}

/// Starts `spec.argv` with stdin and stdout on /dev/null and stderr on a
/// pipe (see [`Child::take_stderr`]), on the spawner thread. With
/// [`ChildSpec::pipes`] its stdin and its fd 3 are pipes to us instead (see
/// [`Child::take_pipes`]).
pub async fn spawn(spec: &ChildSpec) -> io::Result<Child> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    spawner()
        .lock()
        .expect("spawner")
        .send((spec.clone(), tx))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    let started = rx
        .await
        .map_err(|_| io::Error::other("the spawner thread stopped"))??;
    let pidfd = match started.pidfd {
        // SAFETY: an OwnedFd stays open and the same until the AsyncFd drops it.
        Some(fd) => match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
            Ok(fd) => Some(fd),
            Err(e) => {
                let (_, e) = e.into_parts();
                reap_later(started.pid);
                return Err(e);
            }
        },
        None => None,
    };
    Ok(Child {
        pid: started.pid,
        pidfd,
        stderr: Some(started.stderr),
        pipes: started.pipes,
        reaped: None,
    })
}

/// Prepares everything the child reads, then clones it: runs on the
/// spawner thread.
fn start(spec: &ChildSpec, stack: &Stack) -> io::Result<Started> {
    let path = resolve(&spec.argv[0], &spec.base, &spec.env)?;
    let path = cstring(path.as_os_str().as_bytes())?;
    let argv = spec
        .argv
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let (env, env_ptrs) = environment(&spec.base, &spec.env)?;
    let cwd = spec
        .cwd
        .as_ref()
        .map(|d| cstring(d.as_os_str().as_bytes()))
        .transpose()?;
    let argv_ptrs = nul_terminated(&argv);

    let null = dev_null()?;
    let (err_r, err_w) = pipe()?;
    // The child moves /dev/null onto 0 and 1 before the pipe onto 2, so the
    // pipe must not sit on 0 to 3 (a daemon started with stdio closed).
    let err_w = above_stdio(err_w)?;
    // Worker pipes: all four ends close on exec, so no other child ever
    // holds them (a worker must see EOF on its stdin when we close ours).
    let pipes = if spec.pipes {
        let (in_r, in_w) = pipe()?;
        let (proto_r, proto_w) = pipe()?;
        Some((above_stdio(in_r)?, in_w, proto_r, above_stdio(proto_w)?))
    } else {
        None
    };

    let args = ChildArgs {
        path: path.as_ptr(),
        argv: argv_ptrs.as_ptr(),
        envp: env_ptrs.as_ptr(),
        cwd: cwd.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
        null_fd: null.as_raw_fd(),
        err_fd: err_w.as_raw_fd(),
        in_fd: pipes.as_ref().map_or(-1, |p| p.0.as_raw_fd()),
        proto_fd: pipes.as_ref().map_or(-1, |p| p.3.as_raw_fd()),
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        error: AtomicI32::new(0),
    };
    let (pid, pidfd) = clone_child(&args, stack.top)?;
    drop(err_w); // the child holds its own copy now
    let pipes = pipes.map(|(in_r, in_w, proto_r, proto_w)| {
        drop((in_r, proto_w));
        (in_w, proto_r)
    });
    let failed = args.error.load(Ordering::Acquire);
    if failed != 0 {
        // The child has already _exit'ed; reap it before reporting.
        let mut st = 0;
        // SAFETY: pid is our unreaped child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        return Err(io::Error::from_raw_os_error(failed));
    }
    // These must outlive the clone call; the child has exec'ed by now.
    drop((argv_ptrs, env_ptrs, argv, env, path, cwd));
    Ok(Started {
        pid,
        pidfd,
        stderr: err_r,
        pipes,
    })
}

/// A pipe whose ends close on exec: (read, write).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds, owned at once.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `fd`, moved to a number above 3 if it is one of the numbers the child's
/// streams take (0–2, and 3 for a worker's answers).
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 3 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC returns a new fd, owned at once.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 4) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// /dev/null, opened once for every child's stdin and stdout.
fn dev_null() -> io::Result<&'static OwnedFd> {
    static NULL: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = NULL.get() {
        return Ok(fd);
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    Ok(NULL.get_or_init(|| f.into()))
}

/// Runs `clone` with every signal blocked, so that no handler of the daemon
/// can run in the child before it has put the defaults back.
fn clone_child(
    args: &ChildArgs,
    stack_top: *mut libc::c_void,
) -> io::Result<(libc::pid_t, Option<OwnedFd>)> {
    // SAFETY: the sigset_t values are initialised by sigfillset /
    // pthread_sigmask before use; clone gets a valid stack and an argument
    // that outlives the child's use of it (the parent is suspended until the
    // child execs or exits, CLONE_VFORK).
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let arg = args as *const ChildArgs as *mut libc::c_void;
        let base = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
        let mut pidfd: libc::c_int = -1;
        let mut pid = -1;
        let mut err = None;
        if !NO_PIDFD.load(Ordering::Relaxed) {
            pid = libc::clone(
                child_main,
                stack_top,
                base | libc::CLONE_PIDFD,
                arg,
                &mut pidfd as *mut libc::c_int,
            );
            if pid < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINVAL) {
                    NO_PIDFD.store(true, Ordering::Relaxed);
                } else {
                    err = Some(e);
                }
            }
        }
        if pid < 0 && err.is_none() {
            pidfd = -1;
            pid = libc::clone(child_main, stack_top, base, arg);
            if pid < 0 {
                err = Some(io::Error::last_os_error());
            }
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, ptr::null_mut());
        match err {
            Some(e) => Err(e),
            None => Ok((pid, (pidfd >= 0).then(|| OwnedFd::from_raw_fd(pidfd)))),
        }
    }
}

/// The kernel's `struct sigaction` (x86_64, aarch64): what `rt_sigaction`
/// takes when called without libc's translation.
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// The child between `clone` and `execve`. See the module comment for what
/// it may and may not do: raw system calls only.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: arg points at the parent's ChildArgs, alive while the parent
    // is suspended; only system calls follow.
    unsafe {
        let a = &*(arg as *const ChildArgs);
        let sys = |n: libc::c_long, x: usize, y: usize, z: usize| -> libc::c_long {
            libc::syscall(n, x, y, z, 0usize, 0usize)
        };
        let fail = |a: &ChildArgs| -> ! {
            a.error.store(*libc::__errno_location(), Ordering::Release);
            libc::syscall(libc::SYS_exit_group, 127);
            unreachable_exit()
        };
        // Default dispositions for every signal the daemon catches (its
        // handlers must never run here, in its memory) and for SIGPIPE,
        // which Rust programs ignore; ignored ones stay ignored, as exec
        // would leave them. Then the empty mask a fresh program expects.
        let dfl = KernelSigaction {
            handler: libc::SIG_DFL,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        let set = std::mem::size_of::<u64>();
        for sig in 1..=64usize {
            if sig == libc::SIGKILL as usize || sig == libc::SIGSTOP as usize {
                continue;
            }
            let mut old = KernelSigaction {
                handler: 0,
                flags: 0,
                restorer: 0,
                mask: 0,
            };
            let r = libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                ptr::null::<KernelSigaction>(),
                &mut old as *mut KernelSigaction,
                set,
            );
            if r != 0 {
                continue;
            }
            let caught = old.handler != libc::SIG_DFL && old.handler != libc::SIG_IGN;
            if caught || sig == libc::SIGPIPE as usize {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl as *const KernelSigaction,
                    ptr::null_mut::<KernelSigaction>(),
                    set,
                );
            }
        }
        if sys(libc::SYS_setpgid, 0, 0, 0) != 0 {
            fail(a);
        }
        if sys(
            libc::SYS_prctl,
            libc::PR_SET_PDEATHSIG as usize,
            libc::SIGKILL as usize,
            0,
        ) != 0
        {
            fail(a);
        }
        // The daemon may have died before the death signal was armed.
        if sys(libc::SYS_getppid, 0, 0, 0) != a.parent as libc::c_long {
            libc::syscall(libc::SYS_exit_group, 1);
        }
        let stdin = if a.in_fd >= 0 { a.in_fd } else { a.null_fd };
        for (from, to) in [(stdin, 0), (a.null_fd, 1), (a.err_fd, 2), (a.proto_fd, 3)] {
            if from < 0 {
                continue;
            }
            let r = if from == to {
                // keep it across exec
                sys(libc::SYS_fcntl, to as usize, libc::F_SETFD as usize, 0)
            } else {
                sys(libc::SYS_dup3, from as usize, to as usize, 0)
            };
            if r < 0 {
                fail(a);
            }
        }
        if !a.cwd.is_null() && sys(libc::SYS_chdir, a.cwd as usize, 0, 0) != 0 {
            fail(a);
        }
        let empty: u64 = 0;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const u64,
            ptr::null_mut::<u64>(),
            set,
        );
        sys(
            libc::SYS_execve,
            a.path as usize,
            a.argv as usize,
            a.envp as usize,
        );
        fail(a)
    }
}

/// After `exit_group`, which does not return.
fn unreachable_exit() -> ! {
    loop {
        std::hint::spin_loop();
    }
}

impl Child {
    pub fn id(&self) -> i32 {
        self.pid
    }

    /// The read end of the child's stderr.
    pub fn take_stderr(&mut self) -> Option<OwnedFd> {
        self.stderr.take()
    }

    /// With [`ChildSpec::pipes`]: (the write end of its stdin, the read end
    /// of its fd 3).
    pub fn take_pipes(&mut self) -> Option<(OwnedFd, OwnedFd)> {
        self.pipes.take()
    }

    /// Waits until the child has exited, without reaping it: its pid (and
    /// so its process group id) cannot be reused until [`Child::reap`].
    pub async fn exited(&mut self) -> io::Result<()> {
        if self.reaped.is_some() {
            return Ok(());
        }
        match &self.pidfd {
            Some(fd) => loop {
                let mut ready = fd.readable().await?;
                if self.has_exited()? {
                    return Ok(());
                }
                ready.clear_ready();
            },
            None => {
                // Old kernels: a thread of its own per waiting child, never
                // the runtime's blocking pool that the spool's work uses.
                let pid = self.pid;
                let (tx, rx) = tokio::sync::oneshot::channel();
                std::thread::Builder::new()
                    .name("ttspool-wait".into())
                    .spawn(move || {
                        // SAFETY: waitid fills a zeroed siginfo_t; WNOWAIT leaves
                        // the child to be reaped by its owner.
                        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                        loop {
                            let r = unsafe {
                                libc::waitid(
                                    libc::P_PID,
                                    pid as libc::id_t,
                                    &mut info,
                                    libc::WEXITED | libc::WNOWAIT,
                                )
                            };
                            let e = io::Error::last_os_error();
                            if r == 0 || e.kind() != io::ErrorKind::Interrupted {
                                let _ = tx.send(());
                                return;
                            }
                        }
                    })?;
                rx.await.map_err(io::Error::other)
            }
        }
    }

    /// True once the child is a zombie (or already reaped).
    fn has_exited(&self) -> io::Result<bool> {
        // SAFETY: as in `exited`.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                self.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ECHILD) => Ok(true),
                _ => Err(e),
            };
        }
        // SAFETY: waitid succeeded, so si_pid is meaningful (0: still running).
        Ok(unsafe { info.si_pid() } != 0)
    }

    /// Collects the exit status of a child that has exited (blocks until it
    /// does otherwise).
    pub fn reap(&mut self) -> io::Result<ExitStatus> {
        if let Some(st) = self.reaped {
            return Ok(st);
        }
        let mut st = 0;
        loop {
            // SAFETY: pid is our child, not yet reaped.
            let r = unsafe { libc::waitpid(self.pid, &mut st, 0) };
            if r == self.pid {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let st = ExitStatus::from_raw(st);
        self.reaped = Some(st);
        Ok(st)
    }
}

impl Drop for Child {
    /// A child is never left running or unreaped, even when its waiter is
    /// dropped half-way (runtime shutdown): killed at once, reaped on the
    /// reaper thread (a child stuck in the kernel takes a while to die).
    fn drop(&mut self) {
        if self.reaped.is_none() {
            reap_later(self.pid);
        }
    }
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "argument or variable contains a NUL byte",
        )
    })
}

fn nul_terminated(v: &[CString]) -> Vec<*const libc::c_char> {
    v.iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(ptr::null()))
        .collect()
}

/// The child's environment: `base`, except the variables `extra` sets, then
/// `extra`. Returns the new strings and the pointer array (which points into
/// both).
fn environment(
    base: &BaseEnv,
    extra: &[(String, String)],
) -> io::Result<(Vec<CString>, Vec<*const libc::c_char>)> {
    let own = extra
        .iter()
        .map(|(k, v)| var(OsStr::new(k), OsStr::new(v)))
        .collect::<io::Result<Vec<_>>>()?;
    let overridden = |c: &CString| {
        let b = c.as_bytes();
        extra
            .iter()
            .any(|(k, _)| b.len() > k.len() && b.starts_with(k.as_bytes()) && b[k.len()] == b'=')
    };
    let ptrs = base
        .vars()
        .iter()
        .filter(|c| !overridden(c))
        .chain(own.iter())
        .map(|c| c.as_ptr())
        .chain(std::iter::once(ptr::null()))
        .collect();
    Ok((own, ptrs))
}

fn var(k: &OsStr, v: &OsStr) -> io::Result<CString> {
    let mut b = Vec::with_capacity(k.len() + v.len() + 1);
    b.extend_from_slice(k.as_bytes());
    b.push(b'=');
    b.extend_from_slice(v.as_bytes());
    cstring(&b)
}

/// The program to exec: as given when it holds a `/`, else the first match in
/// the child's `$PATH` (the daemon's when the child has none).
fn resolve(prog: &str, base: &BaseEnv, extra: &[(String, String)]) -> io::Result<PathBuf> {
    if prog.contains('/') {
        return Ok(prog.into());
    }
    let path = extra
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| OsString::from(v))
        .or_else(|| base.get("PATH").map(OsString::from));
    crate::util::find_in_path(prog, path.as_deref())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(argv: &[&str]) -> ChildSpec {
        ChildSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            base: BaseEnv::new(&["PATH".into()], &Default::default(), &[]),
            env: vec![("TTSPOOL_TEST_VAR".into(), "x y".into())],
            cwd: Some("/tmp".into()),
            timeout: Duration::from_secs(5),
            kill_grace: Duration::from_secs(1),
            tail_bytes: 4096,
            pipes: false,
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn stderr_text(c: &mut Child) -> String {
        let mut f = std::fs::File::from(c.take_stderr().unwrap());
        let mut text = String::new();
        std::io::Read::read_to_string(&mut f, &mut text).unwrap();
        text
    }

    #[test]
    fn runs_with_env_cwd_group_and_stderr() {
        rt().block_on(async {
            let mut c = spawn(&spec(&[
                "sh",
                "-c",
                "echo \"$TTSPOOL_TEST_VAR $(pwd)\" >&2; \
                 test \"$(cut -d' ' -f5 /proc/$$/stat)\" = $$ && exit 3",
            ]))
            .await
            .unwrap();
            c.exited().await.unwrap();
            let st = c.reap().unwrap();
            assert_eq!(st.code(), Some(3), "the child leads its own group");
            assert_eq!(stderr_text(&mut c), "x y /tmp\n");
        });
    }

    #[test]
    fn without_pidfds_the_exit_is_seen_by_waitid() {
        // As on kernels before 5.2 (the flag stays set for this process;
        // both ways of waiting are correct for the other tests).
        NO_PIDFD.store(true, Ordering::Relaxed);
        rt().block_on(async {
            let mut c = spawn(&spec(&["sh", "-c", "sleep 0.2; exit 4"]))
                .await
                .unwrap();
            assert!(c.pidfd.is_none());
            assert!(!c.has_exited().unwrap());
            c.exited().await.unwrap();
            assert!(c.has_exited().unwrap());
            assert_eq!(c.reap().unwrap().code(), Some(4));
        });
    }

    #[test]
    fn missing_program_is_an_error_and_leaves_no_child() {
        let e = match rt().block_on(spawn(&spec(&["/nonexistent/engine"]))) {
            Err(e) => e,
            Ok(_) => panic!("spawned a missing program"),
        };
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        let e = match rt().block_on(spawn(&spec(&["no-such-engine-on-path"]))) {
            Err(e) => e,
            Ok(_) => panic!("spawned a missing program"),
        };
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn sigpipe_is_default_and_mask_empty_in_the_child() {
        rt().block_on(async {
            let mut c = spawn(&spec(&[
                "sh",
                "-c",
                "grep -E '^(SigBlk|SigIgn)' /proc/self/status >&2",
            ]))
            .await
            .unwrap();
            c.exited().await.unwrap();
            assert!(c.reap().unwrap().success());
            let text = stderr_text(&mut c);
            assert!(text.contains("SigBlk:\t0000000000000000"), "{text}");
            // SIGPIPE is bit 13 (mask 0x1000).
            let ign = text
                .lines()
                .find(|l| l.starts_with("SigIgn"))
                .and_then(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
                .unwrap();
            assert_eq!(ign & 0x1000, 0, "{text}");
        });
    }
}
