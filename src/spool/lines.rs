//! Reading task lines from a producer's file at a byte offset, with a hard cap
//! on how much of one line is held in memory.
//!
//! A line longer than `max_line_bytes` is skipped to its end while only its
//! first 4 KiB are kept (for the `raw` field of its failed record), so a 50 MiB
//! line costs 4 KiB of memory. A final line without `\n` is reported as
//! `Partial` unless the caller says the file has settled.
//!
//! With a limit ([`LineReader::limit`]), an over-long line is read only up
//! to it: the reader returns [`Next::Unfinished`] with what it knows of the
//! line, and [`LineReader::resume`] goes on from there later — so a 2 GiB
//! line costs each claim round a bounded amount of reading.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};

/// Bytes of an over-long line kept for its record.
pub const RAW_KEEP: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A complete line: its 1-based number, byte range (line end included) and
    /// content without the line end (and without a leading BOM).
    Text {
        no: u64,
        start: u64,
        end: u64,
        bytes: Vec<u8>,
    },
    /// A line over the limit: only its head is kept.
    TooLong {
        no: u64,
        start: u64,
        end: u64,
        len: u64,
        head: Vec<u8>,
    },
}

impl Line {
    /// What a record keeps of the line when it cannot run: up to
    /// [`RAW_KEEP`] bytes of it, lossily as text.
    pub fn kept(&self) -> String {
        let b = match self {
            Line::Text { bytes, .. } => bytes,
            Line::TooLong { head, .. } => head,
        };
        let b = &b[..b.len().min(RAW_KEEP)];
        crate::util::cut(&String::from_utf8_lossy(b), RAW_KEEP).to_string()
    }

    pub fn no(&self) -> u64 {
        match self {
            Line::Text { no, .. } | Line::TooLong { no, .. } => *no,
        }
    }
    pub fn end(&self) -> u64 {
        match self {
            Line::Text { end, .. } | Line::TooLong { end, .. } => *end,
        }
    }
    pub fn is_blank(&self) -> bool {
        matches!(self, Line::Text { bytes, .. } if is_blank(bytes))
    }
}

/// True for a line that holds nothing but white space (it gets no record).
pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(|b| b.is_ascii_whitespace())
}

#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Line(Line),
    /// Bytes after the last `\n` that are not taken (yet).
    Partial,
    Eof,
    /// An over-long line, read up to the limit (or to the end of a file
    /// that has not settled) without finding its end.
    Unfinished(LongLine),
}

/// How far an over-long line has been read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LongLine {
    pub no: u64,
    pub start: u64,
    /// Read up to here: no `\n` before.
    pub read_to: u64,
    pub head: Vec<u8>,
}

pub struct LineReader {
    inner: BufReader<File>,
    pos: u64,
    next_no: u64,
    max: usize,
    limit: u64,
    carry: Option<LongLine>,
}

impl LineReader {
    /// Starts at byte `offset`, where line number `line` (0-based count of
    /// lines before it) begins.
    pub fn open(mut file: File, offset: u64, lines_before: u64, max: usize) -> io::Result<Self> {
        file.seek(SeekFrom::Start(offset))?;
        Ok(LineReader {
            inner: BufReader::with_capacity(64 * 1024, file),
            pos: offset,
            next_no: lines_before + 1,
            max,
            limit: u64::MAX,
            carry: None,
        })
    }

    /// Goes on reading an over-long line where an earlier reader stopped.
    pub fn resume(file: File, line: LongLine, max: usize) -> io::Result<Self> {
        let mut r = LineReader::open(file, line.read_to, line.no - 1, max)?;
        r.carry = Some(line);
        Ok(r)
    }

    /// Stop reading an over-long line at byte `at` (see [`Next::Unfinished`]).
    pub fn limit(&mut self, at: u64) {
        self.limit = at;
    }

    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next line. `take_partial`: a final line without `\n` counts as a line.
    pub fn next(&mut self, take_partial: bool) -> io::Result<Next> {
        let (start, mut bytes, mut len, mut too_long) = match self.carry.take() {
            Some(c) => (c.start, c.head, c.read_to - c.start, true),
            None => (self.pos, Vec::new(), 0, false),
        };
        let unfinished = |r: &Self, bytes: Vec<u8>| LongLine {
            no: r.next_no,
            start,
            read_to: r.pos,
            head: bytes,
        };
        loop {
            if too_long && self.pos >= self.limit {
                return Ok(Next::Unfinished(unfinished(self, bytes)));
            }
            let buf = self.inner.fill_buf()?;
            if buf.is_empty() {
                if len == 0 {
                    return Ok(Next::Eof);
                }
                if too_long && !take_partial {
                    return Ok(Next::Unfinished(unfinished(self, bytes)));
                }
                if !take_partial {
                    // Rewind so a later call sees the whole line again.
                    self.inner.seek(SeekFrom::Start(start))?;
                    self.pos = start;
                    return Ok(Next::Partial);
                }
                break;
            }
            let (chunk, found) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..=i], true),
                None => (buf, false),
            };
            let n = chunk.len();
            len += n as u64;
            if !too_long {
                if bytes.len() + n > self.max + 2 {
                    too_long = true;
                    let keep = RAW_KEEP.saturating_sub(bytes.len()).min(n);
                    bytes.extend_from_slice(&chunk[..keep]);
                    bytes.truncate(RAW_KEEP);
                } else {
                    bytes.extend_from_slice(chunk);
                }
            }
            self.inner.consume(n);
            self.pos += n as u64;
            if found {
                break;
            }
        }
        let no = self.next_no;
        self.next_no += 1;
        let end = self.pos;
        if !too_long {
            if bytes.last() == Some(&b'\n') {
                bytes.pop();
            }
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
            if start == 0 && bytes.starts_with(b"\xEF\xBB\xBF") {
                bytes.drain(..3);
            }
            if bytes.len() > self.max {
                too_long = true;
                bytes.truncate(RAW_KEEP);
            }
        }
        if too_long {
            return Ok(Next::Line(Line::TooLong {
                no,
                start,
                end,
                len,
                head: bytes,
            }));
        }
        Ok(Next::Line(Line::Text {
            no,
            start,
            end,
            bytes,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn reader(content: &[u8], max: usize) -> LineReader {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(content).unwrap();
        LineReader::open(f, 0, 0, max).unwrap()
    }

    fn text(n: Next) -> Vec<u8> {
        match n {
            Next::Line(Line::Text { bytes, .. }) => bytes,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bom_crlf_blank_and_partial() {
        let mut r = reader(b"\xEF\xBB\xBFa\r\n\nb\nc", 100);
        assert_eq!(text(r.next(false).unwrap()), b"a");
        assert!(matches!(r.next(false).unwrap(), Next::Line(l) if l.is_blank() && l.no() == 2));
        assert_eq!(text(r.next(false).unwrap()), b"b");
        assert_eq!(r.next(false).unwrap(), Next::Partial);
        assert_eq!(r.position(), 9);
        assert_eq!(text(r.next(true).unwrap()), b"c");
        assert_eq!(r.next(true).unwrap(), Next::Eof);
    }

    #[test]
    fn a_long_line_is_read_a_bounded_amount_at_a_time() {
        let mut content = b"{\"a\":1}\n".to_vec();
        content.extend(std::iter::repeat_n(b'x', 400_000));
        content.extend_from_slice(b"\nok\n");
        let file = || {
            let mut f = tempfile::tempfile().unwrap();
            f.write_all(&content).unwrap();
            f
        };
        let mut r = LineReader::open(file(), 0, 0, 5000).unwrap();
        r.limit(30_000);
        assert_eq!(text(r.next(false).unwrap()), b"{\"a\":1}");
        let mut at = match r.next(false).unwrap() {
            Next::Unfinished(l) => l,
            other => panic!("{other:?}"),
        };
        assert_eq!((at.no, at.start), (2, 8));
        let mut rounds = 1;
        let line = loop {
            let mut r = LineReader::resume(file(), at.clone(), 5000).unwrap();
            r.limit(at.read_to + 30_000);
            match r.next(false).unwrap() {
                Next::Unfinished(l) => {
                    assert!(l.read_to > at.read_to);
                    at = l;
                    rounds += 1;
                }
                Next::Line(l) => {
                    assert_eq!(text(r.next(false).unwrap()), b"ok");
                    break l;
                }
                other => panic!("{other:?}"),
            }
        };
        // The limit is kept to within one buffer (64 KiB).
        assert!(rounds >= 4, "{rounds}");
        match line {
            Line::TooLong {
                no,
                start,
                end,
                len,
                head,
            } => {
                assert_eq!((no, start, end, len), (2, 8, 400_009, 400_001));
                assert_eq!(head.len(), RAW_KEEP);
                assert!(head.iter().all(|&b| b == b'x'));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn long_line_keeps_only_head() {
        let mut content = vec![b'x'; 100_000];
        content.push(b'\n');
        content.extend_from_slice(b"ok\n");
        let mut r = LineReader {
            inner: BufReader::with_capacity(1024, {
                let mut f = tempfile::tempfile().unwrap();
                f.write_all(&content).unwrap();
                f.seek(SeekFrom::Start(0)).unwrap();
                f
            }),
            pos: 0,
            next_no: 1,
            max: 5000,
            limit: u64::MAX,
            carry: None,
        };
        match r.next(false).unwrap() {
            Next::Line(Line::TooLong { len, head, end, .. }) => {
                assert_eq!(len, 100_001);
                assert_eq!(end, 100_001);
                assert_eq!(head.len(), RAW_KEEP);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(text(r.next(false).unwrap()), b"ok");
    }
}
