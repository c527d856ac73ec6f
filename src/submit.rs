//! `ttspool submit`: validate every line first, publish only if all are
//! valid. Each input is copied to a hidden temp file inside `pending/`
//! (so the final rename is atomic on the same file system), validated from
//! there line by line (never held in memory whole), then renamed to a unique
//! name that cannot replace a file still being consumed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Context;

use crate::config::Config;
use crate::spool::Spool;
use crate::task::validate_file;
use crate::util::{fsync_dir, io_msg};

pub fn submit(cfg: &Config, inputs: &[PathBuf], wait: bool) -> anyhow::Result<u8> {
    let spool = Spool::new(&cfg.spool.dir);
    let pending = spool.pending();
    fs::create_dir_all(&pending).with_context(|| format!("cannot create {}", pending.display()))?;
    let mut staged: Vec<(PathBuf, PathBuf, String, u64)> = Vec::new();
    let mut bad = 0usize;
    let cleanup = |staged: &[(PathBuf, PathBuf, String, u64)]| {
        for (tmp, ..) in staged {
            let _ = fs::remove_file(tmp);
        }
    };
    for input in inputs {
        let is_stdin = input.as_os_str() == "-";
        let shown = if is_stdin {
            "<stdin>".to_string()
        } else {
            input.display().to_string()
        };
        let id = ulid::Ulid::new().to_string();
        let tmp = pending.join(format!(".submit-{id}.tmp"));
        let copied = (|| -> io::Result<()> {
            let mut out = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            if is_stdin {
                io::copy(&mut io::stdin().lock(), &mut out)?;
            } else {
                io::copy(&mut File::open(input)?, &mut out)?;
            }
            out.flush()?;
            out.sync_all()
        })();
        if let Err(e) = copied {
            let _ = fs::remove_file(&tmp);
            cleanup(&staged);
            anyhow::bail!("cannot read {shown}: {}", io_msg(&e));
        }
        let v = validate_file(&tmp, &shown, cfg).with_context(|| format!("cannot read {shown}"))?;
        for e in &v.errors {
            eprintln!("{e}");
        }
        bad += v.errors.len();
        if v.tasks == 0 && v.errors.is_empty() {
            // An empty file (or empty standard input) is a mistake upstream,
            // not something to publish.
            eprintln!("{shown}: no task lines (empty or only blank lines); nothing to publish");
            bad += 1;
        }
        let stem = if is_stdin {
            "stdin".to_string()
        } else {
            input
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "tasks".into())
        };
        let stem = crate::util::safe_name(&stem, 100);
        let final_path = pending.join(format!(
            "{}-{}.jsonl",
            stem.trim_start_matches('_'),
            id.to_lowercase()
        ));
        staged.push((tmp, final_path, shown, v.tasks));
    }
    if bad > 0 {
        cleanup(&staged);
        eprintln!(
            "ttspool: {bad} problem(s) (invalid lines or empty inputs); nothing was submitted"
        );
        return Ok(1);
    }
    let mut total = 0;
    let start = crate::spool::records::RecordLog::new(&spool).position();
    for (tmp, final_path, shown, tasks) in &staged {
        fs::rename(tmp, final_path)
            .with_context(|| format!("cannot publish {}", final_path.display()))?;
        total += tasks;
        println!("{shown}: {tasks} task(s) -> {}", final_path.display());
    }
    fsync_dir(&pending).with_context(|| format!("cannot sync {}", pending.display()))?;
    println!("submitted {total} task(s) in {} file(s)", staged.len());
    if !wait {
        return Ok(0);
    }
    let names: Vec<String> = staged
        .iter()
        .filter_map(|(_, p, ..)| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    wait_for(&spool, start, &names, total)
}

/// Polls the record logs until every line of `files` has its record.
fn wait_for(
    spool: &Spool,
    start: crate::spool::records::Pos,
    files: &[String],
    total: u64,
) -> anyhow::Result<u8> {
    let log = crate::spool::records::RecordLog::new(spool);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} ({elapsed})")
                .expect("template"),
        );
        b
    });
    let mut last_print = std::time::Instant::now();
    let mut last_n = u64::MAX;
    loop {
        let (mut completed, mut skipped, mut failed) = (0u64, 0u64, 0u64);
        let mut seen = std::collections::HashSet::new();
        log.read_since(start, |r, _, _| {
            if files.contains(&r.source.file) && seen.insert((r.source.file.clone(), r.source.line))
            {
                match r.status.as_str() {
                    "completed" => completed += 1,
                    "skipped" => skipped += 1,
                    _ => failed += 1,
                }
            }
        })?;
        let n = completed + skipped + failed;
        let msg = format!("{completed} completed, {skipped} skipped, {failed} failed");
        match &bar {
            Some(b) => {
                b.set_position(n);
                b.set_message(msg.clone());
            }
            None => {
                if n != last_n
                    && (n >= total || last_print.elapsed() >= std::time::Duration::from_secs(2))
                {
                    eprintln!("{n}/{total} done: {msg}");
                    last_print = std::time::Instant::now();
                    last_n = n;
                }
            }
        }
        if n >= total {
            if let Some(b) = &bar {
                b.finish();
            }
            println!("all {total} task(s) finished: {msg}");
            return Ok(if failed > 0 { 1 } else { 0 });
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}
