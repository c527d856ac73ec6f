//! Which producer file is which, whatever producers do to it.
//!
//! A producer file's claims live in a sidecar folder `.ttspool/files/<key>/`
//! whose key is made once, when the file is first seen (`<name>.<ULID>`), and
//! never derived from the name or inode again. The folder's `ident` says how
//! to recognise the file: its name, its inode and birth time as one mount saw
//! them, and a fingerprint of its first bytes (up to [`HEAD`]). A file found
//! in `pending/` is the sidecar's file when, in this order:
//!
//! 1. the same mount (same kernel boot and device) saw the same inode and
//!    birth time: renamed or not, it is the same file;
//! 2. another mount (another host, a remount, a second sshfs mount, where
//!    inode numbers differ) saw it under the same name, and its first bytes
//!    are the fingerprinted ones;
//! 3. another mount saw it under a name that is gone now, and its first bytes
//!    (at least one whole line) are the fingerprinted ones: renamed there.
//!
//! Otherwise it is a new file. A file that matched but whose first bytes, or
//! the bytes just before the cursor, are not what was claimed was rewritten in
//! place: the caller starts a new generation of it (claim.rs).

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::Digest;

/// Bytes at the start of a file that identify it.
pub const HEAD: usize = 4096;
/// Bytes before the cursor that must not change while the file is claimed.
pub const TAIL: u64 = 64;

/// How a sidecar recognises its producer file. Stored as `ident` in the
/// sidecar folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ident {
    /// The file's name now (lossy if it is not UTF-8; see `name_bytes`).
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_bytes: Option<Vec<u8>>,
    /// The mount that saw `ino` and `btime` ([`mount_tag`]).
    pub mount: String,
    pub ino: u64,
    /// Birth time (ns since the epoch) where the file system has one.
    #[serde(default)]
    pub btime: Option<u128>,
    /// SHA-256 (hex) of the first `head_len` bytes.
    pub head: String,
    pub head_len: u64,
    /// Set while the file is being moved to `pending/.consumed/` (under this
    /// name there), and while it is followed there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumed: Option<Consumed>,
    /// The file was consumed and its `file.done` not yet handed on (see
    /// consume.rs): set with `consumed`, cleared by [`super::consume::announced`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub announce: bool,
}

/// Where a consumed file went, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consumed {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_bytes: Option<Vec<u8>>,
    /// Seconds since the epoch.
    pub at: u64,
}

impl Consumed {
    pub fn new(name: &OsStr, at: u64) -> Consumed {
        let (name, name_bytes) = split_name(name);
        Consumed {
            name,
            name_bytes,
            at,
        }
    }
    pub fn os_name(&self) -> OsString {
        join_name(&self.name, &self.name_bytes)
    }
}

/// A file as found in `pending/`: what identifies it.
#[derive(Debug, Clone)]
pub struct Probe {
    pub name: OsString,
    pub ino: u64,
    pub btime: Option<u128>,
    pub size: u64,
    /// Its first `min(size, HEAD)` bytes.
    pub head: Vec<u8>,
}

impl Probe {
    /// Reads what identifies `file` (opened as `name`).
    pub fn read(name: &OsStr, file: &File) -> io::Result<Probe> {
        use std::os::unix::fs::MetadataExt;
        let md = file.metadata()?;
        let mut head = vec![0; (md.len() as usize).min(HEAD)];
        let n = read_at_most(file, &mut head, 0)?;
        head.truncate(n);
        Ok(Probe {
            name: name.to_os_string(),
            ino: md.ino(),
            btime: birth_time(&md),
            size: md.len(),
            head,
        })
    }

    /// A fresh ident for this file as `mount` sees it.
    pub fn ident(&self, mount: &str) -> Ident {
        let (name, name_bytes) = split_name(&self.name);
        Ident {
            name,
            name_bytes,
            mount: mount.to_string(),
            ino: self.ino,
            btime: self.btime,
            head: digest(&self.head),
            head_len: self.head.len() as u64,
            consumed: None,
            announce: false,
        }
    }
}

impl Ident {
    pub fn os_name(&self) -> OsString {
        join_name(&self.name, &self.name_bytes)
    }

    /// The file's first bytes are the fingerprinted ones.
    pub fn head_matches(&self, p: &Probe) -> bool {
        let n = self.head_len as usize;
        p.head.len() >= n && digest(&p.head[..n]) == self.head
    }

    /// The same inode, born at the same time, as the same mount saw it.
    fn same_inode(&self, p: &Probe, mount: &str) -> bool {
        self.mount == mount
            && self.ino == p.ino
            && match (self.btime, p.btime) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    /// This ident, updated to what `p` shows now (name, inode, a longer
    /// fingerprint). Call only when `p` is this ident's file.
    pub fn seen_as(&self, p: &Probe, mount: &str) -> Ident {
        let mut next = self.clone();
        (next.name, next.name_bytes) = split_name(&p.name);
        next.mount = mount.to_string();
        next.ino = p.ino;
        next.btime = p.btime;
        if (p.head.len() as u64) > self.head_len && self.head_matches(p) {
            next.head = digest(&p.head);
            next.head_len = p.head.len() as u64;
        }
        next
    }
}

/// The tag of the mount this process sees the spool through: inode numbers
/// mean the same only under the same tag.
pub fn mount_tag(boot_id: &str, dev: u64) -> String {
    format!("{boot_id}:{dev}")
}

type Rule<'a> = dyn Fn(&Ident, &Probe) -> bool + 'a;

/// For each probe, the key of the sidecar that is its file (see the module
/// doc), or `None` for a new file. A sidecar is given to one probe at most.
pub fn assign(
    probes: &[Probe],
    known: &BTreeMap<String, Ident>,
    mount: &str,
) -> Vec<Option<String>> {
    let mut out: Vec<Option<String>> = vec![None; probes.len()];
    let mut taken: HashSet<&str> = HashSet::new();
    let names: HashSet<&OsStr> = probes.iter().map(|p| p.name.as_os_str()).collect();
    let rules: [&Rule; 3] = [
        &|s, p| s.same_inode(p, mount),
        &|s, p| s.mount != mount && s.os_name() == p.name && s.head_matches(p),
        &|s, p| {
            s.mount != mount
                && !names.contains(s.os_name().as_os_str())
                && s.head_len > 0
                && s.head_matches(p)
                && p.head[..s.head_len as usize].contains(&b'\n')
        },
    ];
    for rule in rules {
        for (i, p) in probes.iter().enumerate() {
            if out[i].is_some() {
                continue;
            }
            let hit = known
                .iter()
                .find(|(k, s)| !taken.contains(k.as_str()) && rule(s, p));
            if let Some((k, _)) = hit {
                taken.insert(k);
                out[i] = Some(k.clone());
            }
        }
    }
    out
}

/// A new sidecar key for a file named `name`: readable, and never reused.
pub fn new_key(name: &OsStr) -> String {
    let safe = crate::util::safe_name(&name.to_string_lossy(), 40);
    format!("{safe}.{}", ulid::Ulid::new())
}

/// The ident of a sidecar made before idents existed (`<name>.<inode>`):
/// its inode, as this mount saw it.
pub fn legacy(key: &str, mount: &str) -> Option<Ident> {
    let ino = key.rsplit('.').next()?.parse().ok()?;
    Some(Ident {
        name: String::new(),
        name_bytes: None,
        mount: mount.to_string(),
        ino,
        btime: None,
        head: digest(b""),
        head_len: 0,
        consumed: None,
        announce: false,
    })
}

/// SHA-256 (hex) of the up to [`TAIL`] bytes before `offset`.
pub fn tail_at(file: &File, offset: u64) -> io::Result<String> {
    let start = offset.saturating_sub(TAIL);
    let mut buf = vec![0; (offset - start) as usize];
    let n = read_at_most(file, &mut buf, start)?;
    buf.truncate(n);
    Ok(digest(&buf))
}

pub fn digest(b: &[u8]) -> String {
    let d = sha2::Sha256::digest(b);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_at_most(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn birth_time(md: &std::fs::Metadata) -> Option<u128> {
    md.created()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_nanos())
}

/// A name as JSON can hold it: the string, and the raw bytes when the name
/// is not UTF-8 (the string is then lossy).
pub fn split_name(name: &OsStr) -> (String, Option<Vec<u8>>) {
    match name.to_str() {
        Some(s) => (s.to_string(), None),
        None => (
            name.to_string_lossy().into_owned(),
            Some(name.as_bytes().to_vec()),
        ),
    }
}

fn join_name(name: &str, bytes: &Option<Vec<u8>>) -> OsString {
    match bytes {
        Some(b) => OsString::from_vec(b.clone()),
        None => OsString::from(name),
    }
}

/// A name for messages and records: lossy, plus its bytes escaped (`\xe9`)
/// when it is not UTF-8.
pub fn shown(name: &OsStr) -> (String, Option<String>) {
    match name.to_str() {
        Some(s) => (s.to_string(), None),
        None => (
            name.to_string_lossy().into_owned(),
            Some(name.as_bytes().escape_ascii().to_string()),
        ),
    }
}

/// Reads a sidecar's ident, if it has one; any error is `None`. Only for
/// what is shown (status, lookups): a decision about the file uses [`load`].
pub fn read(dir: &Path) -> Option<Ident> {
    load(dir).ok().flatten()
}

/// Reads a sidecar's ident: `Ok(None)` only when there is none. Any other
/// failure (descriptors running out, an I/O error, a damaged file) is an
/// error, never "a file not seen before": that would claim its lines again.
pub fn load(dir: &Path) -> std::io::Result<Option<Ident>> {
    let p = dir.join("ident");
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is damaged: {e}", p.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(name: &str, ino: u64, body: &[u8]) -> Probe {
        Probe {
            name: name.into(),
            ino,
            btime: None,
            size: body.len() as u64,
            head: body[..body.len().min(HEAD)].to_vec(),
        }
    }

    fn known(items: &[(&str, Ident)]) -> BTreeMap<String, Ident> {
        items
            .iter()
            .map(|(k, i)| (k.to_string(), i.clone()))
            .collect()
    }

    #[test]
    fn a_rename_on_the_same_mount_keeps_the_sidecar() {
        let old = probe("current.jsonl", 7, b"{\"a\":1}\n");
        let k = known(&[("k1", old.ident("m"))]);
        let moved = probe("current-1.jsonl", 7, b"{\"a\":1}\n{\"b\":2}\n");
        let fresh = probe("current.jsonl", 9, b"{\"c\":3}\n");
        assert_eq!(
            assign(&[fresh, moved], &k, "m"),
            [None, Some("k1".to_string())]
        );
    }

    #[test]
    fn another_mount_knows_the_file_by_name_and_first_bytes() {
        let body = b"{\"a\":1}\n{\"b\":2}\n";
        let k = known(&[("k1", probe("x.jsonl", 7, &body[..8]).ident("host-a"))]);
        // Other inode numbers on this mount; the first bytes agree.
        assert_eq!(
            assign(&[probe("x.jsonl", 1234, body)], &k, "host-b"),
            [Some("k1".to_string())]
        );
        // Same name, other first bytes: a new file.
        assert_eq!(
            assign(&[probe("x.jsonl", 1234, b"{\"z\":1}\n")], &k, "host-b"),
            [None]
        );
        // Renamed and seen from the other mount: known by its first line.
        assert_eq!(
            assign(&[probe("y.jsonl", 1234, body)], &k, "host-b"),
            [Some("k1".to_string())]
        );
    }

    #[test]
    fn an_inode_reused_with_another_birth_time_is_a_new_file() {
        let mut old = probe("x.jsonl", 7, b"{\"a\":1}\n");
        old.btime = Some(100);
        let k = known(&[("k1", old.ident("m"))]);
        let mut again = probe("x.jsonl", 7, b"{\"a\":1}\n");
        again.btime = Some(200);
        assert_eq!(assign(&[again], &k, "m"), [None]);
    }

    #[test]
    fn the_fingerprint_grows_only_over_the_same_bytes() {
        let first = probe("x.jsonl", 7, b"{\"a\"");
        let id = first.ident("m");
        let grown = probe("x.jsonl", 7, b"{\"a\":1}\n");
        let next = id.seen_as(&grown, "m");
        assert_eq!(next.head_len, 8);
        assert!(next.head_matches(&grown));
        let rewritten = probe("x.jsonl", 7, b"{\"zz\":1}\n");
        assert!(!next.head_matches(&rewritten));
        assert_eq!(id.seen_as(&rewritten, "m").head_len, 4);
    }

    #[test]
    fn names_that_are_not_utf8_keep_their_bytes() {
        let raw = OsString::from_vec(b"caf\xe9.jsonl".to_vec());
        let mut p = probe("x", 1, b"");
        p.name = raw.clone();
        let id = p.ident("m");
        assert_eq!(id.name, "caf\u{fffd}.jsonl");
        let back: Ident = serde_json::from_str(&serde_json::to_string(&id).unwrap()).unwrap();
        assert_eq!(back.os_name(), raw);
        assert_eq!(shown(&raw).1.as_deref(), Some("caf\\xe9.jsonl"));
    }
}
