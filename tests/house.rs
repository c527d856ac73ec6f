//! The house rule, checked: modules import only from layers below their
//! own, so data flows one way (spool → task → scheduler → engine → records
//! → webhook) and nothing imports a stage downstream of itself. The order
//! is written down here, once; ARCHITECTURE.md explains it.
//!
//! Reads `src/` as text: every `crate::<module>` outside `#[cfg(test)]`
//! code is an arrow from the file's top-level module to `<module>`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers, lowest first. A module may import modules of lower layers only —
/// not its own layer (commands do not import commands), not higher ones.
const LAYERS: &[&[&str]] = &[
    // Helpers that know nothing of the pipeline.
    &["util", "logging", "cli"],
    &["redact", "cidr", "template", "detach"],
    // The vocabulary every stage shares: task, job, slot, record, ids.
    &["vocab"],
    &["config"],
    &["metrics"],
    // The pipeline.
    &["spool"],
    &["task", "retention"],
    &["scheduler", "process"],
    &["engine"],
    &["webhook"],
    &["report"],
    &["api"],
    // The commands, and the daemon that wires the stages.
    &["daemon", "submit", "check", "status", "requeue"],
    // What the binary runs.
    &["app"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `crate::<name>` references in `text`, test modules left out.
fn imports(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

/// Arrows between top-level modules: (from, to) → files.
fn graph() -> BTreeMap<(String, String), Vec<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut arrows: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str();
        let from = first.to_string_lossy().trim_end_matches(".rs").to_string();
        if from == "lib" || from == "main" {
            continue; // the crate root wires everything
        }
        for to in imports(&std::fs::read_to_string(&f).unwrap()) {
            if to != from {
                arrows
                    .entry((from.clone(), to))
                    .or_default()
                    .push(rel.display().to_string());
            }
        }
    }
    arrows
}

#[test]
fn every_module_has_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut missing = Vec::new();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let name = e
            .file_name()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if name != "lib" && name != "main" && layer_of(&name).is_none() {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "modules without a layer in tests/house.rs: {missing:?}"
    );
}

#[test]
fn imports_run_down_the_layers_only() {
    let mut wrong = Vec::new();
    for ((from, to), files) in graph() {
        let (Some(a), Some(b)) = (layer_of(&from), layer_of(&to)) else {
            continue; // reported by every_module_has_a_layer
        };
        if b >= a {
            wrong.push(format!("{from} -> {to} (in {})", files.join(", ")));
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layer order:\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn the_check_finds_an_arrow_against_the_order() {
    // The checker itself: a config that imports the webhook stage is caught.
    let found = imports("use crate::webhook::EVENTS;\nfn f() { crate::util::x(); }\n#[cfg(test)]\nuse crate::daemon;");
    assert_eq!(found.into_iter().collect::<Vec<_>>(), ["util", "webhook"]);
    assert!(layer_of("webhook") > layer_of("config"));
}
