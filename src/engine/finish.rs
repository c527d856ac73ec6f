//! Finishing an engine's output: the temp file is checked (non-empty,
//! RIFF/WAVE), fsynced and renamed onto its final name, so a partial or
//! lost file never carries that name.
//!
//! This runs on one long-lived thread of its own, `ttspool-finish`, not on
//! tokio's blocking pool. fsync and rename block (for long, on a share that
//! hangs), so they stay off the event loop; and one thread that is usually
//! awake while outputs stream in costs fewer wake-ups per task than a pool
//! thread woken for each one — measured with the dispatch benchmark's cp
//! tasks, the daemon's own CPU per task went down by about a tenth (paired
//! runs, 2026-11-22). One thread finishes one output at a time: at this
//! disk's fsync latency that is thousands of outputs a second, far more than
//! TTS engines produce; on a share whose fsync takes 10 ms it is still 100.
//! A hung share stalls finishing (as it would stall the engine's own
//! writes), never the event loop or the spawner.
//!
//! The slot is free before its output comes here, so this thread runs at a
//! lower CPU priority ([`crate::util::run_in_background`]): where the cores
//! are busy, starting the next task comes first.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::OnceLock;

use tokio::sync::oneshot;

use super::has_wav_head;
use crate::util::io_msg;
use crate::vocab::ErrorKind;

type Finished = Result<(), (ErrorKind, String)>;
type Request = (PathBuf, PathBuf, oneshot::Sender<Finished>);

/// Checks `tmp`, makes it durable and moves it onto `output`, on the
/// finisher thread.
pub async fn finish_output(tmp: &Path, output: &Path) -> Finished {
    let (tx, rx) = oneshot::channel();
    let sent = finisher().send((tmp.to_path_buf(), output.to_path_buf(), tx));
    if sent.is_err() {
        return Err(stopped());
    }
    rx.await.unwrap_or_else(|_| Err(stopped()))
}

fn stopped() -> (ErrorKind, String) {
    (
        ErrorKind::SpawnFailed,
        "the output finisher thread stopped".into(),
    )
}

/// The finisher thread's queue, started on first use.
fn finisher() -> &'static mpsc::Sender<Request> {
    static FINISHER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    FINISHER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("ttspool-finish".into())
            .spawn(move || {
                // The slot was freed before its output came here.
                if let Err(e) = crate::util::run_in_background() {
                    tracing::debug!("cannot lower the finisher's priority: {e}");
                }
                while let Ok((tmp, output, reply)) = rx.recv() {
                    // A panic fails this output, not every later one.
                    let res = std::panic::catch_unwind(|| finish_now(&tmp, &output))
                        .unwrap_or_else(|_| {
                            Err((
                                ErrorKind::SpawnFailed,
                                format!("finishing {} panicked", output.display()),
                            ))
                        });
                    let _ = reply.send(res);
                }
            })
            .expect("the finisher thread starts");
        tx
    })
}

/// Validates the temp output, makes its bytes durable and renames it onto the
/// final path. The folder's fsync (which makes the rename durable) is left to
/// the record committer, which does it once per folder per group of records
/// and before the records: a record never says `completed` for an output
/// that a crash could still take back.
fn finish_now(tmp: &Path, output: &Path) -> Finished {
    // One open serves the size, the header check and the fsync.
    let mut f = match open_waiting_for_descriptors(tmp) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err((
                ErrorKind::MissingOutput,
                "engine exited 0 but wrote no output file".into(),
            ))
        }
        Err(e) => return Err(unreadable(&e)),
    };
    let len = f.metadata().map_err(|e| unreadable(&e))?.len();
    if len == 0 {
        return Err((
            ErrorKind::InvalidOutput,
            "engine wrote an empty output file".into(),
        ));
    }
    match has_wav_head(&mut f) {
        Ok(true) => {}
        Ok(false) => {
            return Err((
                ErrorKind::InvalidOutput,
                format!("engine output ({len} bytes) is not a RIFF/WAVE file"),
            ))
        }
        Err(e) => return Err(unreadable(&e)),
    }
    let moved = f
        .sync_all()
        .and_then(|()| super::move_into_place(tmp, output));
    moved.map_err(|e| {
        (
            ErrorKind::SpawnFailed,
            format!("cannot move output to {}: {}", output.display(), io_msg(&e)),
        )
    })
}

/// Opens `tmp`, waiting (up to a minute) while the process is out of file
/// descriptors: the engine's audio is fine, only we cannot look at it yet,
/// and running the engine again would not help.
fn open_waiting_for_descriptors(tmp: &Path) -> std::io::Result<std::fs::File> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut wait = std::time::Duration::from_millis(50);
    loop {
        match std::fs::File::open(tmp) {
            Err(e)
                if crate::util::is_out_of_descriptors(&e)
                    && std::time::Instant::now() + wait < deadline =>
            {
                std::thread::sleep(wait);
                wait = (wait * 2).min(std::time::Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

fn unreadable(e: &std::io::Error) -> (ErrorKind, String) {
    if crate::util::is_out_of_descriptors(e) {
        // Not the output's fault: the task runs again later.
        return (
            ErrorKind::SpawnFailed,
            format!("cannot open engine output: {}", io_msg(e)),
        );
    }
    (
        ErrorKind::InvalidOutput,
        format!("cannot read engine output: {}", io_msg(e)),
    )
}
