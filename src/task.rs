//! The task line (SPEC §2): parsing, aliases, validation and output paths.
//!
//! Lines are parsed by hand from a `serde_json::Map` rather than with a derived
//! `Deserialize`, so every error names the field it is about ("input_text: must
//! be a string, got 5") — serde's derived messages lose the field for type
//! errors. The GLM-TTS names (`uttid`, `syn_text`, `prompt_speech`) are aliases,
//! so that project's example files are task files as they are.

use std::fs::File;
use std::io;
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use crate::config::Config;
use crate::spool::lines::{Line, LineReader, Next};

pub use crate::vocab::Task;

/// Why a line is not a task. The message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidTask(pub String);

/// What the parser needs to know from the config.
#[derive(Debug, Clone)]
pub struct TaskRules {
    pub max_text_chars: usize,
    pub voices_dir: PathBuf,
    /// The engine needs `prompt_audio` / `prompt_text`.
    pub needs_prompt_audio: bool,
    pub needs_prompt_text: bool,
}

impl TaskRules {
    pub fn from_config(cfg: &crate::config::Config) -> TaskRules {
        // GLM-TTS clones a voice: every task needs the clip and its transcript.
        let glm = cfg.engine.kind == crate::config::EngineKind::Glmtts;
        let uses = |p: &str| glm || cfg.engine.argv.iter().any(|a| a.contains(p));
        TaskRules {
            max_text_chars: cfg.limits.max_text_chars,
            voices_dir: cfg.engine.voices_dir.clone(),
            needs_prompt_audio: uses("{prompt_audio}"),
            needs_prompt_text: uses("{prompt_text}"),
        }
    }
}

/// Canonical field, and the alias that may stand for it.
const FIELDS: &[(&str, Option<&str>)] = &[
    ("input_text", Some("syn_text")),
    ("output_name", Some("uttid")),
    ("id", None),
    ("prompt_audio", Some("prompt_speech")),
    ("prompt_text", None),
    ("callback_url", None),
    ("metadata", None),
];

pub use crate::spool::lines::is_blank;

/// Parses and validates one line (without its line end).
pub fn parse_line(line: &[u8], rules: &TaskRules) -> Result<Task, InvalidTask> {
    let text = std::str::from_utf8(line).map_err(|e| {
        InvalidTask(format!(
            "line is not valid UTF-8 (bad byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| InvalidTask(format!("invalid JSON at column {}: {e}", e.column())))?;
    let Value::Object(mut obj) = value else {
        return Err(InvalidTask(format!(
            "a task line must be a JSON object, got {}",
            kind_of(&value)
        )));
    };
    for key in obj.keys() {
        if !FIELDS
            .iter()
            .any(|(name, alias)| key == name || Some(key.as_str()) == *alias)
        {
            let expected: Vec<&str> = FIELDS.iter().map(|(n, _)| *n).collect();
            return Err(InvalidTask(format!(
                "unknown field {key:?} (expected one of: {})",
                expected.join(", ")
            )));
        }
    }
    let mut take = |name: &'static str,
                    alias: Option<&'static str>|
     -> Result<Option<(&'static str, Value)>, InvalidTask> {
        let a = obj.remove(name);
        let b = alias.and_then(|al| obj.remove(al));
        match (a, b) {
            (Some(_), Some(_)) => Err(InvalidTask(format!(
                "{name}: both {name} and its alias {} are set; keep one",
                alias.unwrap_or_default()
            ))),
            (Some(v), None) => Ok(Some((name, v))),
            (None, Some(v)) => Ok(Some((alias.unwrap_or(name), v))),
            (None, None) => Ok(None),
        }
    };
    let mut string = |name: &'static str,
                      alias: Option<&'static str>|
     -> Result<Option<String>, InvalidTask> {
        match take(name, alias)? {
                None | Some((_, Value::Null)) => Ok(None),
                // A process's arguments and environment end at a NUL: the
                // engine would get another text than the task's (or none).
                Some((used, Value::String(s))) if s.contains('\0') => Err(InvalidTask(format!(
                    "{used}: contains a NUL character (\\u0000) at character {}, which no engine can be given (process arguments end there); remove it",
                    s.chars().position(|c| c == '\0').unwrap_or(0) + 1
                ))),
                Some((_, Value::String(s))) => Ok(Some(s)),
                Some((used, v)) => Err(InvalidTask(format!(
                    "{used}: must be a string, got {}",
                    kind_of(&v)
                ))),
            }
    };
    let input_text = string("input_text", Some("syn_text"))?;
    let output_name = string("output_name", Some("uttid"))?;
    let id = string("id", None)?;
    let prompt_audio = string("prompt_audio", Some("prompt_speech"))?;
    let prompt_text = string("prompt_text", None)?;
    let callback_url = string("callback_url", None)?;
    let metadata = match obj.remove("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(v) => {
            return Err(InvalidTask(format!(
                "metadata: must be an object, got {}",
                kind_of(&v)
            )))
        }
    };

    let input_text =
        input_text.ok_or_else(|| InvalidTask("input_text: missing (alias: syn_text)".into()))?;
    let chars = input_text.chars().count();
    if input_text.trim().is_empty() {
        return Err(InvalidTask("input_text: is empty".into()));
    }
    if chars > rules.max_text_chars {
        return Err(InvalidTask(format!(
            "input_text: {chars} characters, more than limits.max_text_chars = {}",
            rules.max_text_chars
        )));
    }
    let output_name =
        output_name.ok_or_else(|| InvalidTask("output_name: missing (alias: uttid)".into()))?;
    check_output_name(&output_name).map_err(|m| InvalidTask(format!("output_name: {m}")))?;
    let id = match id {
        Some(id) if id.is_empty() || id.len() > 200 || id.chars().any(char::is_control) => {
            return Err(InvalidTask(
                "id: must be 1-200 characters without control characters".into(),
            ))
        }
        Some(id) => id,
        None => output_name.clone(),
    };
    if let Some(p) = &prompt_audio {
        resolve_voice(&rules.voices_dir, p)
            .map_err(|m| InvalidTask(format!("prompt_audio: {m}")))?;
    } else if rules.needs_prompt_audio {
        return Err(InvalidTask(
            "prompt_audio: missing, and the engine needs it (alias: prompt_speech)".into(),
        ));
    }
    if prompt_text.is_none() && rules.needs_prompt_text {
        return Err(InvalidTask(
            "prompt_text: missing, and the engine needs it".into(),
        ));
    }
    if let Some(u) = &callback_url {
        if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() > 2048 {
            return Err(InvalidTask(
                "callback_url: must be an http:// or https:// URL".into(),
            ));
        }
    }
    Ok(Task {
        id,
        input_text,
        output_name,
        prompt_audio,
        prompt_text,
        callback_url,
        metadata,
    })
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// SPEC §2: 1–200 chars of letters, digits, `_ - .` and `/`; no empty, `.`,
/// `..`, dot-leading or dash-leading segment; not absolute; no control
/// characters.
pub fn check_output_name(name: &str) -> Result<(), String> {
    let n = name.chars().count();
    if n == 0 || n > 200 {
        return Err(format!("must be 1-200 characters, got {n}"));
    }
    if name.starts_with('/') {
        return Err(format!("{name:?} is an absolute path"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')))
    {
        return Err(format!(
            "{name:?} has {c:?}; only letters, digits, _ - . and / are allowed"
        ));
    }
    let last = name.split('/').count() - 1;
    for (i, seg) in name.split('/').enumerate() {
        if seg.is_empty() || seg.starts_with('.') {
            return Err(format!(
                "{name:?} has an empty or dot-leading path segment {seg:?}"
            ));
        }
        // A file name holds 255 bytes (NAME_MAX), and the last segment gets
        // ".wav": 80 CJK characters are 240 bytes and fit, 90 do not.
        let room = if i == last { 251 } else { 255 };
        if seg.len() > room {
            return Err(format!(
                "segment {:?}… is {} bytes; a file name holds at most 255 bytes ({room} before \".wav\")",
                seg.chars().take(10).collect::<String>(),
                seg.len()
            ));
        }
        if seg.starts_with('-') {
            // An engine could read `{output_name}` (or a path ending in it)
            // as an option.
            return Err(format!(
                "{name:?} has a path segment {seg:?} that starts with '-'"
            ));
        }
    }
    Ok(())
}

/// Resolves `prompt_audio` against the voices folder; it must exist and stay
/// inside that folder after symlinks are resolved.
pub fn resolve_voice(voices_dir: &Path, rel: &str) -> Result<PathBuf, String> {
    if rel.is_empty() || rel.chars().any(char::is_control) {
        return Err("must be a non-empty file name without control characters".into());
    }
    let p = Path::new(rel);
    if p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!(
            "{rel:?} must be a path inside engine.voices_dir, without .. or a leading /"
        ));
    }
    let root = voices_dir.canonicalize().map_err(|e| {
        format!(
            "engine.voices_dir {} cannot be opened: {}",
            voices_dir.display(),
            crate::util::io_msg(&e)
        )
    })?;
    let full = root.join(p).canonicalize().map_err(|e| {
        format!(
            "{rel:?} not found in {} ({})",
            root.display(),
            crate::util::io_msg(&e)
        )
    })?;
    if !full.starts_with(&root) {
        return Err(format!(
            "{rel:?} leads outside engine.voices_dir {} (through a symlink)",
            root.display()
        ));
    }
    if !full.is_file() {
        return Err(format!("{rel:?} is not a file"));
    }
    Ok(full)
}

/// The final output path of a task.
pub fn output_path(output_dir: &Path, output_name: &str) -> PathBuf {
    output_dir.join(format!("{output_name}.wav"))
}

/// Counts of one validated file.
#[derive(Debug, Default)]
pub struct Validation {
    pub tasks: u64,
    pub blank: u64,
    pub errors: Vec<String>,
}

/// Validates the task lines of `path`; `shown` is the name used in messages.
pub fn validate_file(path: &Path, shown: &str, cfg: &Config) -> io::Result<Validation> {
    let rules = TaskRules::from_config(cfg);
    let mut v = Validation::default();
    let mut r = LineReader::open(File::open(path)?, 0, 0, cfg.limits.max_line_bytes)?;
    while let Next::Line(line) = r.next(true)? {
        match line {
            Line::TooLong { no, len, .. } => v.errors.push(format!(
                "{shown}:{no}: line is {len} bytes, more than limits.max_line_bytes = {}",
                cfg.limits.max_line_bytes
            )),
            Line::Text { no, bytes, .. } => {
                if is_blank(&bytes) {
                    v.blank += 1;
                    continue;
                }
                match parse_line(&bytes, &rules) {
                    Ok(_) => v.tasks += 1,
                    Err(e) => v.errors.push(format!("{shown}:{no}: {e}")),
                }
            }
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rules() -> TaskRules {
        TaskRules {
            max_text_chars: 10,
            voices_dir: std::env::temp_dir(),
            needs_prompt_audio: false,
            needs_prompt_text: false,
        }
    }

    fn err(line: &str) -> String {
        parse_line(line.as_bytes(), &rules()).unwrap_err().0
    }

    #[test]
    fn glmtts_aliases_are_accepted() {
        let t = parse_line(
            br#"{"uttid":"a1","syn_text":"hi","prompt_text":"p"}"#,
            &rules(),
        )
        .unwrap();
        assert_eq!(t.output_name, "a1");
        assert_eq!(t.id, "a1");
        assert_eq!(t.input_text, "hi");
    }

    #[test]
    fn errors_name_the_field() {
        assert!(err(r#"{"input_txt":"x","output_name":"a"}"#).contains("\"input_txt\""));
        assert!(err(r#"{"input_text":5,"output_name":"a"}"#)
            .starts_with("input_text: must be a string"));
        assert!(err(r#"{"output_name":"a"}"#).starts_with("input_text: missing"));
        assert!(err(r#"{"input_text":"x"}"#).starts_with("output_name: missing"));
        assert!(err(r#"{"input_text":"01234567890","output_name":"a"}"#)
            .starts_with("input_text: 11 characters"));
        assert!(err(r#"{"input_text":"x","output_name":"../a"}"#).starts_with("output_name:"));
        assert!(
            err(r#"{"input_text":"x","output_name":"a","metadata":1}"#).starts_with("metadata:")
        );
        assert!(
            err(r#"{"input_text":"x","syn_text":"y","output_name":"a"}"#)
                .starts_with("input_text: both")
        );
        assert!(
            err(r#"{"input_text":"x","output_name":"a","prompt_audio":"../../etc/passwd"}"#)
                .starts_with("prompt_audio:")
        );
        assert!(
            err(r#"{"input_text":"x","output_name":"a","callback_url":"ftp://x"}"#)
                .starts_with("callback_url:")
        );
        assert!(err("[1]").contains("JSON object"));
        assert!(err("{\"input_text\":").contains("invalid JSON"));
        assert!(err(r#"{"input_text":"x\u0000y","output_name":"a"}"#)
            .starts_with("input_text: contains a NUL character (\\u0000) at character 2"));
        assert!(
            err(r#"{"input_text":"x","prompt_text":"\u0000","output_name":"a"}"#)
                .starts_with("prompt_text: contains a NUL")
        );
    }

    #[test]
    fn output_names() {
        for ok in ["a", "order_1001", "zh/订单-1.v2", "a/b/c"] {
            assert!(check_output_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/a", "a//b", "a/./b", "a/../b", ".hidden", "a/.b", "a b", "a\u{7}", "a\\b", "a/",
            "-f", "a/-rf", "--help",
        ] {
            assert!(check_output_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_output_name(&"x".repeat(201)).is_err());
        // NAME_MAX in bytes: 80 CJK characters (240 bytes) fit, 90 do not.
        assert!(check_output_name(&"订".repeat(80)).is_ok());
        let e = check_output_name(&"订".repeat(90)).unwrap_err();
        assert!(e.contains("270 bytes") && e.contains("255"), "{e}");
        assert!(check_output_name(&format!("{}/a", "订".repeat(85))).is_ok());
    }

    proptest! {
        #[test]
        fn valid_names_never_escape(name in "\\PC{0,40}") {
            if check_output_name(&name).is_ok() {
                let p = output_path(Path::new("/out"), &name);
                prop_assert!(p.starts_with("/out"));
                prop_assert!(!p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)));
            }
        }

        #[test]
        fn parser_never_panics(line in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_line(&line, &rules());
        }
    }
}
