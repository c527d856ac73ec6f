//! Fuzzing what strangers and operators write: task lines, the bytes of a
//! producer's file, and config files. No input may panic, and every
//! rejection must be a clear one-line message that names what is wrong.
//!
//! In CI each target runs a bounded number of cases (`FUZZ_CASES`, default
//! 2000). For a long run, give a time per target:
//!
//! ```sh
//! TTSPOOL_FUZZ_SECS=200 cargo test --release --test fuzz -- --nocapture --test-threads 3
//! ```
//!
//! (three targets × 200 s = a 10-minute run); each prints its cases and time.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestCaseError, TestRunner};
use ttspool::config::Config;
use ttspool::spool::lines::{Line, LineReader, Next, RAW_KEEP};
use ttspool::task::{check_output_name, parse_line, TaskRules};

/// Runs `test` over `strategy`: a bounded number of cases, or for
/// `TTSPOOL_FUZZ_SECS` seconds in rounds with fresh seeds.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let secs: Option<u64> = std::env::var("TTSPOOL_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok());
    let cases: u32 = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let started = Instant::now();
    let mut total = 0u64;
    loop {
        let round = if secs.is_some() { 5000 } else { cases };
        let mut runner = TestRunner::new(PtConfig {
            cases: round,
            failure_persistence: None,
            ..PtConfig::default()
        });
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("{name}: {e}");
        }
        total += round as u64;
        match secs {
            Some(s) if started.elapsed() < Duration::from_secs(s) => continue,
            _ => break,
        }
    }
    println!(
        "fuzz {name}: {total} cases in {:.1} s, no panic",
        started.elapsed().as_secs_f64()
    );
}

fn rules() -> TaskRules {
    TaskRules {
        max_text_chars: 50,
        voices_dir: std::env::temp_dir(),
        needs_prompt_audio: false,
        needs_prompt_text: false,
    }
}

/// A JSON value of any kind, strings with the characters that break things.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        "\\PC{0,60}".prop_map(Value::String),
        "[a-z0-9/._-]{0,30}".prop_map(Value::String),
        "[-./ \u{0}\u{7}\u{202e}{}a]{0,12}".prop_map(Value::String),
        "(https?://[a-z:@.]{0,20}/[a-z?=&]{0,20})".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: &[&str] = &[
    "input_text",
    "syn_text",
    "output_name",
    "uttid",
    "id",
    "prompt_audio",
    "prompt_speech",
    "prompt_text",
    "callback_url",
    "metadata",
    "input_txt",
    "",
];

/// A task-like line: an object of known, aliased and unknown fields, or raw bytes.
fn task_line() -> impl Strategy<Value = Vec<u8>> {
    let object = prop::collection::vec((prop::sample::select(FIELDS), json_value()), 0..7)
        .prop_map(|fields| {
            let m: serde_json::Map<String, serde_json::Value> = fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            serde_json::Value::Object(m).to_string().into_bytes()
        });
    let valid = (
        "\\PC{1,60}",
        "[\\p{L}\\p{N}_.-]{1,20}(/[\\p{L}\\p{N}_.-]{1,20}){0,2}",
    )
        .prop_map(|(text, name)| {
            serde_json::json!({"input_text": text, "output_name": name})
                .to_string()
                .into_bytes()
        });
    prop_oneof![
        3 => object,
        2 => valid,
        1 => prop::collection::vec(any::<u8>(), 0..200),
        1 => "\\PC{0,100}".prop_map(String::into_bytes),
    ]
}

#[test]
fn task_lines() {
    let r = rules();
    fuzz("task lines", task_line(), |line| {
        match parse_line(&line, &r) {
            Ok(t) => {
                prop_assert!(check_output_name(&t.output_name).is_ok());
                prop_assert!(!t.input_text.trim().is_empty());
                prop_assert!(t.input_text.chars().count() <= r.max_text_chars);
                prop_assert!(!t.id.is_empty() && !t.id.chars().any(char::is_control));
                if t.callback_url.is_some() {
                    let shown = t.for_record()["callback_url"].as_str().unwrap().to_string();
                    prop_assert!(!shown.contains('?') && !shown.contains('@'), "{shown}");
                }
            }
            Err(e) => {
                let m = e.0;
                prop_assert!(!m.is_empty() && !m.contains('\n'), "{m:?}");
                let named = FIELDS
                    .iter()
                    .filter(|f| !f.is_empty())
                    .any(|f| m.starts_with(&format!("{f}:")))
                    || m.starts_with("unknown field")
                    || m.starts_with("invalid JSON")
                    || m.starts_with("a task line must be a JSON object")
                    || m.starts_with("line is not valid UTF-8");
                prop_assert!(named, "a message that names nothing: {m:?}");
            }
        }
        Ok(())
    });
}

/// Bytes of a producer's file: text, line ends of every kind, BOMs, NULs,
/// invalid UTF-8 and runs of a length around the line limit.
fn file_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        "[a-z{}\":, ]{0,20}".prop_map(String::into_bytes),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\r".to_vec()),
        Just("\u{feff}".as_bytes().to_vec()),
        Just(vec![0u8]),
        Just(vec![0xff, 0xc3]),
        (max - 2..max + 3).prop_map(|n| vec![b'a'; n]),
        prop::collection::vec(any::<u8>(), 0..40),
    ];
    prop::collection::vec(piece, 0..30).prop_map(|v| v.concat())
}

/// All lines from `offset` (which begins line `before + 1`), partial line taken.
fn read_all(bytes: &[u8], offset: u64, before: u64, max: usize) -> Vec<Line> {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(bytes).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut r = LineReader::open(f, offset, before, max).unwrap();
    let mut out = Vec::new();
    loop {
        match r.next(true).unwrap() {
            Next::Line(l) => out.push(l),
            Next::Partial | Next::Unfinished(_) => panic!("a partial line with take_partial"),
            Next::Eof => return out,
        }
    }
}

#[test]
fn producer_file_bytes() {
    let strategy = (64usize..200).prop_flat_map(|max| (Just(max), file_bytes(max)));
    fuzz("line reader", strategy, |(max, bytes)| {
        let lines = read_all(&bytes, 0, 0, max);
        let mut pos = 0u64;
        for (i, l) in lines.iter().enumerate() {
            prop_assert_eq!(l.no(), i as u64 + 1);
            match l {
                Line::Text {
                    start,
                    end,
                    bytes: b,
                    ..
                } => {
                    prop_assert_eq!(*start, pos);
                    let raw = &bytes[*start as usize..*end as usize];
                    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
                    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
                    let raw = if *start == 0 {
                        raw.strip_prefix("\u{feff}".as_bytes()).unwrap_or(raw)
                    } else {
                        raw
                    };
                    prop_assert_eq!(b.as_slice(), raw);
                    prop_assert!(b.len() <= max);
                    prop_assert!(!b.contains(&b'\n'));
                }
                Line::TooLong {
                    start, len, head, ..
                } => {
                    prop_assert_eq!(*start, pos);
                    prop_assert!(*len as usize > max);
                    prop_assert!(head.len() <= RAW_KEEP);
                }
            }
            pos = l.end();
        }
        prop_assert_eq!(pos, bytes.len() as u64, "every byte belongs to a line");
        // A cursor resumed at any line boundary reads the same lines.
        if !lines.is_empty() {
            let k = lines.len() / 2;
            let from = if k == 0 { 0 } else { lines[k - 1].end() };
            let again = read_all(&bytes, from, k as u64, max);
            prop_assert_eq!(&again[..], &lines[k..]);
        }
        Ok(())
    });
}

const KEYS: &[(&str, &[&str])] = &[
    (
        "spool",
        &[
            "dir",
            "watch",
            "poll_interval",
            "settle",
            "instance",
            "lease",
            "bogus",
        ],
    ),
    ("output", &["dir"]),
    (
        "engine",
        &[
            "kind",
            "argv",
            "voices_dir",
            "timeout",
            "kill_grace",
            "root",
            "python",
            "exp_name",
            "sample_rate",
            "use_phoneme",
            "batch_max",
            "batch_wait",
            "load_timeout",
            "env_pass",
            "env",
        ],
    ),
    (
        "gpu",
        &[
            "devices",
            "slots_per_device",
            "max_parallel",
            "min_free_mib",
        ],
    ),
    ("retry", &["max_attempts", "backoff"]),
    ("limits", &["max_text_chars", "max_line_bytes"]),
    ("shutdown", &["grace"]),
    (
        "webhook",
        &[
            "url",
            "events",
            "format",
            "secret",
            "timeout",
            "schedule",
            "headers",
            "allow_cidrs",
            "max_in_flight",
        ],
    ),
    ("metrics", &["listen", "textfile"]),
    ("log", &["level"]),
    ("nonsense", &["x"]),
];

fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "\"[a-z0-9 ./:*{}_-]{0,20}\"".prop_map(|s| s),
        "\"[0-9]{1,4}(ms|s|m|h|d|MiB|KB)?\"".prop_map(|s| s),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        Just("[\"a\", \"{output}\", \"{text}\", \"--\", \"{input_text}\"]".to_string()),
        Just("[\"::ffff:10.0.0.0/64\", \"10.0.0.0/8\", \"x/99\"]".to_string()),
        Just("{ a = \"b\", \"x=y\" = \"z\" }".to_string()),
        Just("[]".to_string()),
        Just("\"\"".to_string()),
        "[\\[\\]{}=\"a-z ]{0,10}".prop_map(|s| s),
    ]
}

fn toml_text() -> impl Strategy<Value = String> {
    let entry = (0..KEYS.len()).prop_flat_map(|i| {
        let (section, keys) = KEYS[i];
        (Just(section), prop::sample::select(keys), toml_value())
    });
    prop_oneof![
        4 => prop::collection::vec(entry, 0..8).prop_map(|entries| {
            let mut out = String::new();
            for (section, key, value) in entries {
                out.push_str(&format!("[{section}]\n{key} = {value}\n"));
            }
            out
        }),
        1 => "\\PC{0,200}",
    ]
}

#[test]
fn config_files() {
    let path = Path::new("/etc/ttspool/fuzz.toml");
    fuzz("config", toml_text(), |text| {
        if let Err(e) = Config::from_toml(&text, path) {
            let m = e.to_string();
            prop_assert!(m.starts_with("/etc/ttspool/fuzz.toml"), "{m:?}");
            prop_assert!(m.len() > path.as_os_str().len() + 5, "{m:?}");
            prop_assert!(!m.contains('\n'), "more than one line: {m:?}");
        }
        Ok(())
    });
}
