//! What a sidecar folder `.ttspool/files/<key>/` holds: the `cursor` (where
//! the next unclaimed line starts), the `ident` (ident.rs) and one
//! `lease-<gen>-<first line>` per claimed range.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::claim::{io_err, ClaimError};
use super::records::Pos;
use crate::util::atomic_write;
use crate::vocab::FileId;

/// Where the next unclaimed line of a producer file starts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cursor {
    /// Bumped when the file is rewritten (it shrank, or its claimed bytes
    /// changed): it is then a new file under the same identity.
    pub gen: u64,
    pub offset: u64,
    /// Lines before `offset`.
    pub line: u64,
    /// Where the record logs ended when the file was first claimed from:
    /// its records come after, which bounds counting them.
    #[serde(default)]
    pub since: Option<Pos>,
    /// SHA-256 of the bytes just before `offset` (ident::TAIL of them),
    /// checked before every read: a rewrite that keeps the size is seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<String>,
}

impl Cursor {
    /// This cursor moved to `offset`, after `line` lines; `tail` as there.
    pub fn at(&self, offset: u64, line: u64, tail: Option<String>) -> Cursor {
        Cursor {
            offset,
            line,
            tail,
            ..self.clone()
        }
    }

    /// The next generation: the file is read again from its start.
    pub fn rewritten(&self) -> Cursor {
        Cursor {
            gen: self.gen + 1,
            since: self.since,
            ..Cursor::default()
        }
    }
}

/// A claimed range of lines, as stored in its lease file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseDoc {
    pub instance: String,
    pub token: String,
    pub pid: u32,
    /// The file's name when the range was claimed (lossy if not UTF-8).
    pub file: String,
    /// Its bytes, escaped (`\xe9`), when the name is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_escaped: Option<String>,
    pub key: String,
    pub gen: u64,
    pub start_off: u64,
    pub start_line: u64,
    pub end_off: u64,
    pub end_line: u64,
    /// Lines in the range that need a record (blank lines do not).
    pub lines: Vec<u64>,
    /// Where the record logs ended when claimed: its records come later.
    #[serde(default)]
    pub pos: Pos,
    /// Handed back by a daemon that stopped: anyone may take it at once.
    #[serde(default)]
    pub released: bool,
    /// What each of `lines` held when claimed (up to `RAW_KEEP` bytes):
    /// a line whose file is replaced before it runs is recorded with its
    /// own id and text, not a made-up one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub raw: Vec<String>,
}

impl LeaseDoc {
    pub fn file_id(&self) -> FileId {
        FileId::new(&self.key, self.gen)
    }

    /// What line `no` held when claimed, if the lease kept it.
    pub fn raw_of(&self, no: u64) -> Option<String> {
        let i = self.lines.iter().position(|&l| l == no)?;
        self.raw.get(i).cloned()
    }
}

/// A lease's content; `None` if it is gone or unreadable for any reason.
/// Only for what is shown: a decision uses [`load_lease`].
pub fn read_lease(p: &Path) -> Option<LeaseDoc> {
    load_lease(p).ok().flatten()
}

/// A lease's content: `Ok(None)` if it is gone or torn (a claim that died
/// while writing it); an error if it cannot be read now.
pub fn load_lease(p: &Path) -> io::Result<Option<LeaseDoc>> {
    match fs::read(p) {
        Ok(b) => Ok(serde_json::from_slice(&b).ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(crate::util::with_path("read", p, e)),
    }
}

/// Generation and first line (0-based) a lease's file name says.
pub fn lease_start(p: &Path) -> Option<(u64, u64)> {
    let name = p.file_name()?.to_str()?;
    let mut it = name.strip_prefix("lease-")?.split('-');
    let gen = it.next()?.parse().ok()?;
    let line: u64 = it.next()?.parse().ok()?;
    Some((gen, line.saturating_sub(1)))
}

pub fn lease_name(gen: u64, first_line: u64) -> String {
    format!("lease-{gen}-{first_line:012}")
}

pub fn list_leases(dir: &Path) -> Result<Vec<PathBuf>, ClaimError> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    for d in rd {
        let d = d.map_err(io_err("list", dir))?;
        if d.file_name().to_string_lossy().starts_with("lease-") {
            out.push(d.path());
        }
    }
    out.sort();
    Ok(out)
}

/// The earliest log position any lease in `dir` was claimed at.
pub fn earliest_lease_pos(dir: &Path) -> Result<Option<Pos>, ClaimError> {
    let mut out: Option<Pos> = None;
    for lp in list_leases(dir)? {
        if let Some(doc) = read_lease(&lp) {
            out = Some(out.map_or(doc.pos, |p| p.earliest(doc.pos)));
        }
    }
    Ok(out)
}

pub fn has_leases(dir: &Path) -> Result<bool, ClaimError> {
    Ok(!list_leases(dir)?.is_empty())
}

pub fn read_cursor(p: &Path) -> Result<Cursor, ClaimError> {
    match fs::read(p) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| ClaimError::Io {
            action: "parse",
            path: p.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Cursor::default()),
        Err(e) => Err(io_err("read", p)(e)),
    }
}

pub fn write_cursor(p: &Path, c: &Cursor) -> Result<(), ClaimError> {
    atomic_write(p, &serde_json::to_vec(c).expect("cursor serializes")).map_err(io_err("write", p))
}

pub fn write_ident(dir: &Path, id: &super::ident::Ident) -> Result<(), ClaimError> {
    let p = dir.join("ident");
    atomic_write(&p, &serde_json::to_vec(id).expect("ident serializes"))
        .map_err(io_err("write", &p))
}
