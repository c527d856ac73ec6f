//! The built-in default: the repo's ttspool.toml (espeak-ng engine) turns the
//! sample tasks into real WAV files. Needs espeak-ng installed (.ci/run does).

mod common;

use std::fs;
use std::path::Path;

use common::*;

#[test]
fn the_default_config_synthesizes_the_samples_with_espeak_ng() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = fs::read_to_string(repo.join("ttspool.toml")).unwrap();
    synthesizes_the_samples(&config, "command:espeak-ng");
}

/// The same with the resident worker engine and engines/espeak_worker.py.
#[test]
fn the_espeak_worker_synthesizes_the_samples() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = fs::read_to_string(repo.join("ttspool.toml")).unwrap();
    let worker = format!(
        "kind = \"worker\"\nargv = [\"python3\", \"{}\"]\n",
        repo.join("engines/espeak_worker.py").display()
    );
    let config = config
        .replace("kind = \"command\"\n", &worker)
        .lines()
        .filter(|l| !l.starts_with("argv = [\"espeak-ng\""))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(config.contains("kind = \"worker\""));
    synthesizes_the_samples(&config, "worker:espeak_worker.py");
}

fn synthesizes_the_samples(config: &str, engine: &str) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("ttspool.toml"), config).unwrap();
    fs::create_dir_all(dir.path().join("voices")).unwrap();
    fs::copy(
        repo.join("voices/support_female.wav"),
        dir.path().join("voices/support_female.wav"),
    )
    .unwrap();
    let samples: Vec<_> = fs::read_dir(repo.join("samples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let mut submit = vec!["submit"];
    let names: Vec<String> = samples.iter().map(|p| p.display().to_string()).collect();
    submit.extend(names.iter().map(String::as_str));
    run(&submit);
    run(&["run", "--once"]);
    let done = read_jsonl(&dir.path().join("spool/done.jsonl"));
    let expected: usize = samples
        .iter()
        .map(|p| {
            fs::read_to_string(p)
                .unwrap()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .count()
        })
        .sum();
    assert!(expected >= 4);
    assert_eq!(done.len(), expected, "{done:#?}");
    for r in &done {
        assert_eq!(r["status"], "completed");
        assert_eq!(r["engine"], engine);
        let out = Path::new(r["output"].as_str().unwrap());
        assert!(out.starts_with(dir.path().join("spool/outputs")));
        assert!(is_wav(out));
        // Real speech, not a header: espeak-ng writes tens of KB per phrase.
        assert!(
            fs::metadata(out).unwrap().len() > 10_000,
            "{}",
            out.display()
        );
    }
    let status = run(&["status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(s["completed"], expected);
    assert_eq!(s["failed"], 0);
}
