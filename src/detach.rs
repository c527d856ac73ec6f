//! `run --daemonize`: into the background, with a locked pid file.

use std::path::Path;

/// Forks into the background; call before any thread or runtime exists.
/// The pid file stays locked for the daemon's life: a second daemon on it
/// is refused with the holder's pid; a stale one (no holder) is taken over.
pub fn detach(pidfile: &Path) -> anyhow::Result<()> {
    let pidfile = std::path::absolute(pidfile)?;
    {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&pidfile)
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot open pid file {}: {}",
                    pidfile.display(),
                    crate::util::io_msg(&e)
                )
            })?;
        if let Err(std::fs::TryLockError::WouldBlock) = f.try_lock() {
            let holder = std::fs::read_to_string(&pidfile).unwrap_or_default();
            anyhow::bail!(
                "already running as pid {} (pid file {} is locked); stop it first or use another --pidfile",
                holder.trim(),
                pidfile.display()
            );
        }
    }
    daemonize::Daemonize::new()
        .pid_file(&pidfile)
        .working_directory("/")
        .stdout(daemonize::Stdio::devnull())
        .stderr(daemonize::Stdio::keep())
        .start()
        .map_err(|e| anyhow::anyhow!("cannot daemonize (pid file {}): {e}", pidfile.display()))?;
    Ok(())
}
