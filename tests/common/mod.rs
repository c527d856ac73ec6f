//! Helpers for the end-to-end tests: a spool in a temp folder, a config that
//! points at a fake engine, the real binary, and waiting by polling against a
//! deadline.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_ttspool");

pub fn fake_engine() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/engines/fake.sh")
}

/// A minimal valid WAV: RIFF header, fmt chunk, 100 samples of silence.
pub fn tiny_wav() -> Vec<u8> {
    let data = vec![0u8; 200];
    let mut v = Vec::new();
    v.extend_from_slice(b"RIFF");
    v.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    v.extend_from_slice(b"WAVEfmt ");
    v.extend_from_slice(&16u32.to_le_bytes());
    v.extend_from_slice(&1u16.to_le_bytes());
    v.extend_from_slice(&1u16.to_le_bytes());
    v.extend_from_slice(&16000u32.to_le_bytes());
    v.extend_from_slice(&32000u32.to_le_bytes());
    v.extend_from_slice(&2u16.to_le_bytes());
    v.extend_from_slice(&16u16.to_le_bytes());
    v.extend_from_slice(b"data");
    v.extend_from_slice(&(data.len() as u32).to_le_bytes());
    v.extend_from_slice(&data);
    v
}

pub fn is_wav(p: &Path) -> bool {
    fs::read(p).is_ok_and(|b| b.len() >= 12 && &b[0..4] == b"RIFF" && &b[8..12] == b"WAVE")
}

/// A loopback port free a moment ago.
#[allow(dead_code)] // not every test binary listens
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns true or `secs` pass.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out after {secs}s waiting for {what}");
}

pub struct Env {
    pub dir: tempfile::TempDir,
    /// Lines added to [spool].
    pub spool_extra: String,
    /// Lines added to [engine].
    pub engine_extra: String,
    /// Whole tables appended ([gpu], [limits], [shutdown], ...).
    pub extra: String,
    /// Environment for the daemon (and so its engines).
    pub vars: Vec<(String, String)>,
}

impl Env {
    /// A spool with the fake engine; `extra` is appended TOML (whole tables).
    pub fn new(extra: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let e = Env {
            dir,
            spool_extra: String::new(),
            engine_extra: String::new(),
            extra: extra.to_string(),
            vars: Vec::new(),
        };
        fs::create_dir_all(e.root().join("voices")).unwrap();
        fs::create_dir_all(e.root().join("spool/pending")).unwrap();
        fs::write(e.root().join("voices/v.wav"), tiny_wav()).unwrap();
        fs::write(e.root().join("tiny.wav"), tiny_wav()).unwrap();
        e.write_config();
        e
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Writes ttspool.toml (and, per instance, ttspool-<instance>.toml).
    pub fn write_config(&self) {
        fs::write(self.config(), self.config_text("")).unwrap();
    }

    fn config_text(&self, instance: &str) -> String {
        let mut spool_extra = self.spool_extra.clone();
        if !instance.is_empty() {
            spool_extra = format!("instance = \"{instance}\"\n{spool_extra}");
        }
        // Base keys, left out where the test sets its own.
        let section = |base: &[(&str, String)], extra: &str| -> String {
            let mut out = String::new();
            for (k, v) in base {
                if !extra
                    .lines()
                    .any(|l| l.trim_start().starts_with(&format!("{k} ")))
                {
                    out.push_str(&format!("{k} = {v}\n"));
                }
            }
            out.push_str(extra);
            out
        };
        let spool = section(
            &[
                ("dir", "\"spool\"".into()),
                ("poll_interval", "\"200ms\"".into()),
                ("settle", "\"300ms\"".into()),
                ("consume_after", "\"1s\"".into()),
                ("lease", "\"3s\"".into()),
            ],
            &spool_extra,
        );
        let engine = section(
            &[
                (
                    "argv",
                    format!(
                        "[\"{}\", \"{{output}}\", \"{{input_text}}\", \"{{id}}\"]",
                        fake_engine().display()
                    ),
                ),
                ("timeout", "\"20s\"".into()),
                ("kill_grace", "\"300ms\"".into()),
                // The fake engines are steered by FAKE_* variables.
                (
                    "env_pass",
                    "[\"PATH\", \"HOME\", \"LANG\", \"FAKE_*\"]".into(),
                ),
            ],
            &self.engine_extra,
        );
        let retry = if self.extra.contains("[retry]") {
            ""
        } else {
            "[retry]\nmax_attempts = 2\nbackoff = \"100ms\"\n"
        };
        format!(
            "[spool]\n{spool}\n[output]\ndir = \"out\"\n\n[engine]\n{engine}\n{retry}\n{}\n",
            self.extra
        )
    }

    /// The config of a named instance.
    pub fn instance_config(&self, instance: &str) -> PathBuf {
        let p = self.root().join(format!("ttspool-{instance}.toml"));
        fs::write(&p, self.config_text(instance)).unwrap();
        p
    }

    pub fn config(&self) -> PathBuf {
        self.root().join("ttspool.toml")
    }
    pub fn log(&self) -> PathBuf {
        self.root().join("engine.log")
    }
    pub fn out(&self) -> PathBuf {
        self.root().join("out")
    }
    pub fn spool(&self) -> PathBuf {
        self.root().join("spool")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        self.cmd_with(&self.config(), args)
    }

    pub fn cmd_with(&self, config: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("-c").arg(config).args(args);
        c.env("FAKE_LOG", self.log())
            .env("FAKE_WAV", self.root().join("tiny.wav"))
            .env("FAKE_GLM_LOG", self.root().join("glm.log"))
            .env("TTSPOOL_LOG", "info")
            .envs(self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(self.root());
        c
    }

    /// Runs to completion with a deadline. Its output is read while it runs
    /// (a full pipe would stop a chatty run).
    pub fn run(&self, args: &[&str], secs: u64) -> Output {
        self.run_with(&self.config(), args, secs)
    }

    /// [`Env::run`] with another config file.
    pub fn run_with(&self, config: &Path, args: &[&str], secs: u64) -> Output {
        use std::io::Read;
        let mut child = self
            .cmd_with(config, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = r.read_to_end(&mut buf);
                buf
            })
        };
        let out = drain(Box::new(child.stdout.take().unwrap()));
        let err = drain(Box::new(child.stderr.take().unwrap()));
        let deadline = Instant::now() + Duration::from_secs(secs);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "ttspool {args:?} did not finish in {secs}s; stderr:\n{}",
                    String::from_utf8_lossy(&err.join().unwrap())
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Output {
            status,
            stdout: out.join().unwrap(),
            stderr: err.join().unwrap(),
        }
    }

    /// `run --once`, asserting exit 0.
    pub fn run_once(&self) -> Output {
        let out = self.run(&["run", "--once"], 120);
        assert!(
            out.status.success(),
            "run --once failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Starts the daemon in the background with an instance name.
    pub fn spawn(&self, instance: &str) -> Child {
        self.cmd_with(&self.instance_config(instance), &["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.root().join(format!("daemon-{instance}.log")))
                    .unwrap(),
            ))
            .spawn()
            .unwrap()
    }

    /// Publishes a task file atomically (write hidden, rename in).
    pub fn drop_file(&self, name: &str, content: &str) {
        let pending = self.spool().join("pending");
        let tmp = pending.join(format!(".{name}.tmp"));
        fs::write(&tmp, content).unwrap();
        fs::rename(&tmp, pending.join(name)).unwrap();
    }

    pub fn done(&self) -> Vec<Value> {
        read_jsonl(&self.spool().join("done.jsonl"))
    }
    pub fn failed(&self) -> Vec<Value> {
        read_jsonl(&self.spool().join("failed.jsonl"))
    }
    /// Records of `kind` ("done" / "failed") including rotated logs.
    pub fn all(&self, kind: &str) -> Vec<Value> {
        let mut files: Vec<PathBuf> = fs::read_dir(self.spool())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy();
                n.starts_with(&format!("{kind}.")) && n.ends_with(".jsonl")
            })
            .collect();
        files.sort();
        files.iter().flat_map(|f| read_jsonl(f)).collect()
    }

    pub fn records(&self) -> usize {
        self.done().len() + self.failed().len()
    }

    /// Engine starts per task id, from the fake's log.
    pub fn starts(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for l in fs::read_to_string(self.log()).unwrap_or_default().lines() {
            if let Some(id) = l.strip_prefix("start ").and_then(|r| r.split(' ').next()) {
                *m.entry(id.to_string()).or_default() += 1;
            }
        }
        m
    }

    /// pids the fake engine logged (each leads its own process group).
    pub fn engine_pids(&self) -> Vec<i32> {
        fs::read_to_string(self.log())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split("pid=").nth(1)?.split(' ').next()?.parse().ok())
            .collect()
    }
}

/// The complete lines of a JSONL file: a last line without its `\n` is
/// still being appended (the daemon may be writing while a test reads) and
/// is left for the next look.
pub fn read_jsonl(p: &Path) -> Vec<Value> {
    let text = fs::read_to_string(p).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad record {l:?}: {e}")))
        .collect()
}

/// Processes whose process group is one of `pgids` (left behind if any).
pub fn survivors(pgids: &[i32]) -> Vec<String> {
    let mut out = Vec::new();
    for ent in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = ent.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...
        let Some(rest) = stat.rsplit(')').next() else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 2 && f[0] != "Z" {
            if let Ok(pgrp) = f[2].parse::<i32>() {
                if pgids.contains(&pgrp) {
                    out.push(format!("{pid}: {stat}"));
                }
            }
        }
    }
    out
}

pub fn task_line(id: &str, text: &str) -> String {
    format!("{{\"id\":\"{id}\",\"input_text\":\"{text}\",\"output_name\":\"{id}\"}}\n")
}

pub fn sigterm(child: &Child) {
    unsafe_kill(child.id() as i32, 15);
}

pub fn sigkill(child: &Child) {
    unsafe_kill(child.id() as i32, 9);
}

fn unsafe_kill(pid: i32, sig: i32) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

pub fn append(path: &Path, s: &str) {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .unwrap();
    f.write_all(s.as_bytes()).unwrap();
}

/// A fake GLM-TTS checkout in the env (script, ckpt/, examples/), and the
/// [engine] lines that point at it.
pub fn glmtts_checkout(env: &Env) -> (PathBuf, String) {
    let root = env.root().join("GLM-TTS");
    fs::create_dir_all(root.join("ckpt")).unwrap();
    fs::create_dir_all(root.join("examples")).unwrap();
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/glmtts/glmtts_inference.py"),
        root.join("glmtts_inference.py"),
    )
    .unwrap();
    let engine = format!(
        "kind = \"glmtts\"\nroot = \"{}\"\nexp_name = \"_t\"\n",
        root.display()
    );
    (root, engine)
}

/// A GLM-TTS style task line (its field names) with the test voice.
pub fn glm_line(id: &str, text: &str) -> String {
    format!(
        "{{\"id\":\"{id}\",\"output_name\":\"{id}\",\"prompt_text\":\"hi\",\"prompt_audio\":\"v.wav\",\"input_text\":\"{text}\"}}\n"
    )
}

/// The runs the fake GLM-TTS logged.
pub fn glm_runs(env: &Env) -> Vec<Value> {
    read_jsonl(&env.root().join("glm.log"))
}

/// Sends `sig` ("STOP", "CONT", "KILL", ...) to a child.
pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

/// A small deterministic PRNG (xorshift), so a failure can be replayed.
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
