//! Small file-system helpers shared by the spool and the engine: durable
//! atomic writes, folder fsyncs, and error text a person can read.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// A name made safe for a file name: letters and digits (any script),
/// `-`, `_` and `.` are kept, anything else becomes `_`, a leading `.`
/// too (no hidden files), and at most `max` characters are kept.
pub fn safe_name(raw: &str, max: usize) -> String {
    raw.chars()
        .enumerate()
        .map(|(i, c)| {
            if c.is_alphanumeric() || matches!(c, '-' | '_') || (c == '.' && i > 0) {
                c
            } else {
                '_'
            }
        })
        .take(max)
        .collect()
}

/// Opens our own lock file `path` (never a producer's) and takes an
/// exclusive lock on it, saying every 30 s while it waits (see
/// [`lock_noting`]). The error names the file.
pub fn lock_sidecar(path: &Path, holder: impl Fn() -> Option<String>) -> io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| with_path("open", path, e))?;
    lock_noting(&f, path, holder).map_err(|e| with_path("lock", path, e))?;
    Ok(f)
}

/// `e`, its message saying what was done to which file ("cannot lock
/// /srv/spool/.ttspool/claim.lock: permission denied"); the kind stays.
pub fn with_path(action: &str, path: &Path, e: io::Error) -> io::Error {
    let msg = format!("cannot {action} {}: {}", path.display(), io_msg(&e));
    io::Error::new(e.kind(), WithPath { msg, source: e })
}

/// An I/O error with what was done to which file; the OS error stays
/// reachable ([`os_error`]), so a full disk or a lack of descriptors is
/// still recognised after the context is added.
#[derive(Debug)]
struct WithPath {
    msg: String,
    source: io::Error,
}

impl std::fmt::Display for WithPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for WithPath {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// The OS error number of `e`, or of the error it wraps (see [`with_path`]).
pub fn os_error(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|r| r.downcast_ref::<WithPath>())
            .and_then(|w| os_error(&w.source))
    })
}

/// Takes an exclusive lock on `file` (our sidecar `path`), and while it
/// waits says so every 30 s, naming the holder when `holder` can tell,
/// instead of hanging silently behind a daemon that stalled holding it.
pub fn lock_noting(
    file: &File,
    path: &Path,
    holder: impl Fn() -> Option<String>,
) -> io::Result<()> {
    const NOTE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);
    match file.try_lock() {
        Ok(()) => return Ok(()),
        Err(fs::TryLockError::WouldBlock) => {}
        Err(fs::TryLockError::Error(e)) => return Err(e),
    }
    let started = std::time::Instant::now();
    let mut note_at = NOTE_EVERY;
    let mut nap = std::time::Duration::from_millis(1);
    loop {
        std::thread::sleep(nap);
        nap = (nap * 2).min(std::time::Duration::from_millis(20));
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        if started.elapsed() >= note_at {
            note_at += NOTE_EVERY;
            tracing::warn!(
                "waiting for {} for {} s (held by {})",
                path.display(),
                started.elapsed().as_secs(),
                holder().unwrap_or_else(|| "another process".into())
            );
        }
    }
}

/// True for "no space left" and "quota exceeded": the disk is full for us.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(os_error(e), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || matches!(
            e.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        )
}

/// Bytes free for us on the file system that holds `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the struct it is given; `c` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// An I/O error as a person reads it: "not found" rather than "No such
/// file or directory (os error 2)".
pub fn io_msg(e: &io::Error) -> String {
    if e.raw_os_error().is_none() {
        return e.to_string(); // ours, with its own words (see with_path)
    }
    match e.kind() {
        io::ErrorKind::NotFound => "not found".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        io::ErrorKind::AlreadyExists => "already exists".into(),
        _ => {
            let s = e.to_string();
            match s.find(" (os error") {
                Some(i) => s[..i].to_string(),
                None => s,
            }
        }
    }
}

/// `create_dir_all` at the cost of one stat when the folder exists (the
/// usual case, once per task).
pub fn ensure_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir)
}

/// Makes a folder's entries (creates, renames, removes) durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Write-temp-then-rename: `path` holds either the old or the new bytes after
/// a crash, never a mix. The temp file is hidden and in the same folder.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    atomic_write_mode(path, bytes, 0o666)
}

/// [`atomic_write`] for a file that may hold a secret (a webhook URL with
/// its token, a signed body): readable by the daemon's user only, whatever
/// the umask.
pub fn atomic_write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    atomic_write_mode(path, bytes, PRIVATE_FILE)
}

/// Mode of files that may hold secrets (the umask can only narrow it).
pub const PRIVATE_FILE: u32 = 0o600;

/// Creates `dir` (and its parents) for files that may hold secrets: the
/// last folder is 0700.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

fn atomic_write_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", ulid::Ulid::new()));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fsync_dir(dir)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Creates `path` only if absent, with `bytes`, durably. `Ok(false)` if it existed.
pub fn create_exclusive(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    let mut f = match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e),
    };
    if let Err(e) = f.write_all(bytes).and_then(|()| f.sync_all()) {
        // Leave no empty or half file behind (a full disk): the name is free
        // for the next try.
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(true)
}

/// RFC 3339 UTC timestamp with milliseconds.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Today's date in UTC, `YYYY-MM-DD`.
pub fn today_utc() -> String {
    let d = time::OffsetDateTime::now_utc().date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Keeps the last `cap` bytes written to it.
#[derive(Debug, Default, Clone)]
pub struct Tail {
    buf: Vec<u8>,
    cap: usize,
}

impl Tail {
    pub fn new(cap: usize) -> Tail {
        Tail {
            buf: Vec::new(),
            cap,
        }
    }
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > self.cap * 2 {
            let cut = self.buf.len() - self.cap;
            self.buf.drain(..cut);
        }
    }
    pub fn text(&self) -> String {
        let start = self.buf.len().saturating_sub(self.cap);
        String::from_utf8_lossy(&self.buf[start..]).into_owned()
    }
}

/// Cuts a string to at most `max` bytes on a char boundary.
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = max;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[..i]
}

/// A file someone may execute.
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The program `prog` names: as given when it holds a `/`, else the first
/// executable match in `path` (a `$PATH` value; the daemon's own when
/// `None`, `/usr/local/bin:/usr/bin:/bin` when neither is set). The one
/// place a program is looked up, for spawning and for `check` alike.
pub fn find_in_path(prog: &str, path: Option<&std::ffi::OsStr>) -> Option<std::path::PathBuf> {
    let is_exec = |p: &Path| is_executable(p);
    if prog.contains('/') {
        let p = std::path::PathBuf::from(prog);
        return is_exec(&p).then_some(p);
    }
    if prog.is_empty() {
        return None;
    }
    let own = std::env::var_os("PATH");
    let paths = path
        .or(own.as_deref())
        .unwrap_or(std::ffi::OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    std::env::split_paths(paths)
        .map(|d| d.join(prog))
        .find(|p| is_exec(p))
}

/// How much lower than the daemon's own priority its background threads
/// run (see [`run_in_background`]).
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority by [`BACKGROUND_NICE`] (Linux
/// keeps a nice value per thread). For threads whose work is not on the
/// path from a task's end to the next task's start — checking and moving
/// finished outputs, writing records: on a host whose cores are busy, the
/// engine's children and the loop that starts them come first, and this
/// work fills the gaps. It is a lower weight, not an idle class, so it is
/// never starved. Returns the new nice value, or why it could not be set.
pub fn run_in_background() -> io::Result<i32> {
    // SAFETY: gettid, getpriority and setpriority touch no memory of ours.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        // getpriority can return -1 as a value: errno tells them apart.
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        if now == -1 && *libc::__errno_location() != 0 {
            return Err(io::Error::last_os_error());
        }
        let want = (now + BACKGROUND_NICE).min(19);
        if libc::setpriority(libc::PRIO_PROCESS, tid, want) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(want)
    }
}

/// Raises our soft `RLIMIT_NOFILE` to the hard limit (a shell's or a
/// container's 1024 is a soft limit); returns the limit we run with.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit fill and read the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(io::Error::last_os_error());
            }
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Ok(lim.rlim_cur)
}

/// True when a process or system runs out of file descriptors: a pause
/// until some are closed, never a verdict about the file.
pub fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(os_error(e), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Says that descriptors ran out, at most once a minute for the whole
/// process: every file and every round fails alike meanwhile, and one
/// line says it (the daemon pauses and goes on when some close).
pub fn warn_out_of_descriptors(what: &str) {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().expect("descriptor warning");
    if last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(60)) {
        *last = Some(std::time::Instant::now());
        tracing::warn!(
            "out of file descriptors ({what}); waiting for some to close and trying again (said once a minute while it lasts)"
        );
    }
}

/// At most `max` bytes of a peer's answer body, as text; the rest is never
/// read into memory (a server may send an endless or huge error page).
pub async fn read_capped(mut resp: reqwest::Response, max: usize) -> String {
    let mut buf = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = max - buf.len();
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() >= max {
            break;
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Dies here, as a `kill -9` would, when `TTSPOOL_FAILPOINT` names `point`:
/// the crash tests stop a command at each step of a protocol this way.
pub fn failpoint(point: &str) {
    if std::env::var_os("TTSPOOL_FAILPOINT").is_some_and(|v| v == point) {
        // SAFETY: raising a signal on ourselves.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_bytes() {
        let mut t = Tail::new(4);
        t.push(b"hello ");
        t.push(b"world");
        assert_eq!(t.text(), "orld");
    }

    #[test]
    fn cut_respects_chars() {
        assert_eq!(cut("订单", 4), "订");
        assert_eq!(cut("ab", 4), "ab");
    }

    #[test]
    fn a_background_thread_runs_ten_nice_steps_lower_and_others_do_not() {
        // SAFETY: getpriority on our own thread ids.
        let nice =
            |tid: libc::pid_t| unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
        let main = unsafe { libc::gettid() };
        let before = nice(main);
        let (got, seen) = std::thread::spawn(move || {
            let got = run_in_background();
            (got, nice(unsafe { libc::gettid() }))
        })
        .join()
        .unwrap();
        let want = (before + BACKGROUND_NICE).min(19);
        assert_eq!(got.unwrap(), want);
        assert_eq!(seen, want, "the kernel's view of the thread");
        // Only that thread: the one that spawned it is untouched.
        assert_eq!(nice(main), before);
    }
}
