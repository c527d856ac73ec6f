//! `ttspool check`: is this config usable on this machine, and are these task
//! files valid? Every problem is one line; exit 1 if there was any.

use std::path::{Path, PathBuf};

use crate::config::{Config, EngineKind};
use crate::task::validate_file;
use crate::util::find_in_path;

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

pub fn check(cfg: &Config, files: &[PathBuf], deep: bool) -> anyhow::Result<u8> {
    let mut problems = Vec::new();
    let at = |key: &str, msg: String| format!("{}: {key}: {msg}", cfg.path.display());
    match cfg.engine.kind {
        EngineKind::Command => {
            let prog = &cfg.engine.argv[0];
            match find_in_path(prog, None) {
                Some(p) => println!("ok: engine {}", p.display()),
                None => problems.push(at(
                    "engine.argv",
                    format!(
                        "{prog:?} not found or not executable (install it, or fix engine.argv)"
                    ),
                )),
            }
        }
        EngineKind::Glmtts => problems.extend(check_glmtts(cfg)),
        EngineKind::Http => problems.extend(check_http(cfg)),
        EngineKind::Worker => problems.extend(check_worker(cfg, deep)),
    }
    if !cfg.api.listen.is_empty() {
        match crate::api::auth::Auth::load(&cfg.api) {
            Ok(a) if a.is_open() => println!(
                "ok: api.listen {} (loopback, no credentials needed)",
                cfg.api.listen
            ),
            Ok(a) => println!("ok: api.listen {}: {a:?}", cfg.api.listen),
            Err(e) => problems.push(format!("{}: {e}", cfg.path.display())),
        }
    }
    for w in cfg.warnings() {
        eprintln!("warning: {w}");
    }
    if let Some(m) = crate::spool::locks::mount_of(&cfg.spool.dir) {
        match m.lock_scope() {
            crate::spool::locks::LockScope::Shared => {
                println!(
                    "ok: spool.dir is on {}, whose locks reach every host",
                    m.describe()
                )
            }
            crate::spool::locks::LockScope::HostLocal { why, fix } => eprintln!(
                "warning: {}: spool.dir {} is on {}: {why}, so its locks stay on this host; \
                 run daemons on one host (and one mount) only, or {fix}",
                cfg.path.display(),
                cfg.spool.dir.display(),
                m.describe()
            ),
        }
    }
    if cfg.gpu.min_free_mib.is_some() {
        match find_in_path("nvidia-smi", None) {
            Some(p) => println!("ok: nvidia-smi {}", p.display()),
            None => problems.push(at(
                "gpu.min_free_mib",
                "is set but nvidia-smi is not in $PATH (install the NVIDIA driver tools, or remove the key)".into(),
            )),
        }
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
    let uses_voices = cfg.engine.kind == EngineKind::Glmtts
        || cfg.engine.argv.iter().any(|a| a.contains("{prompt_audio}"));
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

/// A GLM-TTS checkout: the script, its checkpoints, a writable `examples/`,
/// and a Python that runs.
fn check_glmtts(cfg: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let at = |key: &str, msg: String| format!("{}: {key}: {msg}", cfg.path.display());
    let root = cfg.engine.root.clone().unwrap_or_default();
    let script = root.join("glmtts_inference.py");
    if script.is_file() {
        println!("ok: engine {}", script.display());
    } else {
        problems.push(at(
            "engine.root",
            format!(
                "{} has no glmtts_inference.py (point it at a zai-org/GLM-TTS checkout)",
                root.display()
            ),
        ));
        return problems;
    }
    if !root.join("ckpt").is_dir() {
        problems.push(at(
            "engine.root",
            format!(
                "{} has no ckpt/ folder: download the model checkpoints into it",
                root.display()
            ),
        ));
    }
    match writable(&root.join("examples")) {
        Ok(()) => println!("ok: {}/examples is writable", root.display()),
        Err(e) => problems.push(at("engine.root", e)),
    }
    let py = &cfg.engine.python;
    match std::process::Command::new(py)
        .arg("--version")
        .current_dir(&root)
        .stdin(std::process::Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => {
            let v = String::from_utf8_lossy(if o.stdout.is_empty() {
                &o.stderr
            } else {
                &o.stdout
            })
            .trim()
            .to_string();
            println!("ok: engine.python {py} ({v})");
        }
        Ok(o) => problems.push(at(
            "engine.python",
            format!("{py} --version exited with {}", o.status),
        )),
        Err(e) => problems.push(at(
            "engine.python",
            format!("{py} cannot run: {}", crate::util::io_msg(&e)),
        )),
    }
    problems
}

/// Each server answers, and accepts our token: a request the server must
/// refuse or accept without synthesizing (Fish Speech's `POST /v1/health`,
/// else a `GET` of the URL); connection errors and 401/403 are problems.
fn check_http(cfg: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return vec!["cannot start a runtime to reach engine.urls".into()];
    };
    let _inside = rt.enter(); // the client's timers need the runtime
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .expect("an HTTP client builds");
    let token = crate::engine::http::token(cfg);
    for u in &cfg.engine.urls {
        let Ok(url) = reqwest::Url::parse(u) else {
            continue;
        };
        let probe = match cfg.engine.preset {
            crate::config::HttpPreset::FishSpeech => {
                let mut h = url.clone();
                h.set_path("/v1/health");
                client.post(h)
            }
            _ => client.get(url.clone()),
        };
        let probe = match &token {
            Some(t) => probe.bearer_auth(t),
            None => probe,
        };
        match rt.block_on(probe.send()) {
            Ok(r) if matches!(r.status().as_u16(), 401 | 403) => problems.push(format!(
                "{}: engine.urls: {u} refuses our token ({}); check engine.token_file / $TTSPOOL_ENGINE_TOKEN",
                cfg.path.display(),
                r.status()
            )),
            Ok(r) => println!("ok: engine server {u} answers ({})", r.status()),
            Err(e) => problems.push(format!(
                "{}: engine.urls: cannot reach {u}: {e}",
                cfg.path.display()
            )),
        }
    }
    problems
}

/// A worker config: the program (and the script an interpreter runs) exist;
/// with `--deep`, one worker starts and says it is ready.
fn check_worker(cfg: &Config, deep: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let at = |msg: String| format!("{}: engine.argv: {msg}", cfg.path.display());
    let cwd = crate::engine::worker::working_dir(cfg);
    let prog = &cfg.engine.argv[0];
    let found = if prog.contains('/') {
        let p = cwd.join(prog);
        crate::util::is_executable(&p).then_some(p)
    } else {
        find_in_path(prog, None)
    };
    match found {
        Some(p) => println!("ok: worker program {}", p.display()),
        None => problems.push(at(format!(
            "{prog:?} not found or not executable (relative paths are from {})",
            cwd.display()
        ))),
    }
    // `python3 engines/x.py`: the script too.
    let interpreter = Path::new(prog)
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("python"));
    if interpreter {
        if let Some(script) = cfg.engine.argv[1..]
            .iter()
            .find(|a| a.ends_with(".py") && !a.starts_with('-'))
        {
            let p = cwd.join(script);
            if p.is_file() {
                println!("ok: worker script {}", p.display());
            } else {
                problems.push(at(format!("script {} does not exist", p.display())));
            }
        }
    }
    if deep && problems.is_empty() {
        println!(
            "starting one worker (engine.load_timeout {}) ...",
            humantime::format_duration(cfg.engine.load_timeout.0)
        );
        match crate::engine::worker::try_start(cfg) {
            Ok(took) => println!(
                "ok: the worker loaded and said it was ready in {:.1} s",
                took.as_secs_f64()
            ),
            Err(e) => problems.push(format!("{}: engine: {e}", cfg.path.display())),
        }
    }
    problems
}
