//! `ttspool check`: is this config usable on this machine, and are these task
//! files valid? Every problem is one line; exit 1 if there was any.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::submit::validate_file;

/// Finds an executable by name in `$PATH`, or checks a path.
pub fn find_executable(prog: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_exec = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if prog.contains('/') {
        let p = PathBuf::from(prog);
        return is_exec(&p).then_some(p);
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(prog))
        .find(|p| is_exec(p))
}

/// Can we create files in `dir` (or create `dir`)?
fn writable(dir: &Path) -> Result<(), String> {
    let mut probe_dir = dir;
    while !probe_dir.exists() {
        probe_dir = probe_dir
            .parent()
            .ok_or_else(|| format!("{} has no existing parent", dir.display()))?;
    }
    let probe = probe_dir.join(format!(".ttspool-check-{}", std::process::id()));
    match std::fs::write(&probe, b"") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!(
            "{} is not writable: {}",
            probe_dir.display(),
            crate::util::io_msg(&e)
        )),
    }
}

pub fn check(cfg: &Config, files: &[PathBuf]) -> anyhow::Result<u8> {
    let mut problems = Vec::new();
    let prog = &cfg.engine.argv[0];
    match find_executable(prog) {
        Some(p) => println!("ok: engine {}", p.display()),
        None => problems.push(format!(
            "{}: engine.argv: {prog:?} not found or not executable (install it, or fix engine.argv)",
            cfg.path.display()
        )),
    }
    for (key, dir) in [
        ("spool.dir", &cfg.spool.dir),
        ("output.dir", &cfg.output.dir),
    ] {
        match writable(dir) {
            Ok(()) => println!("ok: {key} {}", dir.display()),
            Err(e) => problems.push(format!("{}: {key}: {e}", cfg.path.display())),
        }
    }
    let uses_voices = cfg.engine.argv.iter().any(|a| a.contains("{prompt_audio}"));
    if !cfg.engine.voices_dir.is_dir() {
        let msg = format!(
            "{}: engine.voices_dir: {} is not a folder",
            cfg.path.display(),
            cfg.engine.voices_dir.display()
        );
        if uses_voices {
            problems.push(msg);
        } else {
            println!("note: {msg} (tasks with prompt_audio will fail)");
        }
    }
    let mut tasks = 0;
    for f in files {
        let shown = f.display().to_string();
        match validate_file(f, &shown, cfg) {
            Ok(v) => {
                tasks += v.tasks;
                problems.extend(v.errors);
            }
            Err(e) => problems.push(format!("{shown}: cannot read: {}", crate::util::io_msg(&e))),
        }
    }
    if !files.is_empty() {
        println!("{tasks} valid task line(s) in {} file(s)", files.len());
    }
    for p in &problems {
        eprintln!("{p}");
    }
    if problems.is_empty() {
        println!("ok: {}", cfg.path.display());
        Ok(0)
    } else {
        eprintln!("ttspool: {} problem(s) found", problems.len());
        Ok(1)
    }
}
