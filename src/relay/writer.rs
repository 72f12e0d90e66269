//! The canonical encoder for message content sent to the next hop.
//!
//! Whatever the input, the output is CRLF-terminated lines. After DATA it is dot-stuffed
//! (RFC 5321 §4.5.2) and followed by exactly one `.<CRLF>`: even if a bare CR or LF
//! slipped past the DATA reader, it cannot end the message early at the next hop (SMTP
//! smuggling, 2023). In a `BDAT` chunk (RFC 3030, [`Framing::Chunk`]) the size announced
//! before it is the framing: the same lines go as they are, nothing stuffed, no end line.

/// Encodes `headers` (lines without terminators, added at the top) and `message`
/// as the DATA payload, final `.<CRLF>` included.
#[cfg(test)]
pub fn encode_data(headers: &[String], message: &[u8]) -> Vec<u8> {
    encode_parts(headers, &[message])
}

/// Like `encode_data` for a message held as pieces (a message with some header
/// fields left out). Pieces must split at line boundaries.
pub fn encode_parts(headers: &[String], parts: &[&[u8]]) -> Vec<u8> {
    let extra: usize = headers.iter().map(|h| h.len() + 3).sum();
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(len + len / 64 + extra + 8);
    for h in headers
        .iter()
        .map(String::as_str)
        .chain(orphan_fold_guard(headers, parts))
    {
        push_content(h.as_bytes(), &mut out, Framing::Data);
        // A header that carried its own terminator got it from push_content.
        if !out.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
    }
    for part in parts {
        push_content(part, &mut out, Framing::Data);
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// How the message is delimited for the next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// After `DATA`: dot-stuffed lines and a final `.<CRLF>`.
    Data,
    /// One `BDAT <size> LAST` chunk (the next hop offers CHUNKING): the canonical lines
    /// as they are; the size says where the message ends.
    Chunk,
}

/// The payload as pieces to hand to one vectored write: the message's own bytes are
/// referenced, not copied. Only what must change is built here (the header block, and a
/// part that is not already canonical); after DATA, a line of the message that starts
/// with `.` is stuffed by putting a one-byte `.` piece in front of it.
pub struct Encoded<'a> {
    /// Bytes built here: the added header lines and any part that needed rewriting.
    owned: Vec<u8>,
    pieces: Vec<Piece<'a>>,
    framing: Framing,
}

#[derive(Clone)]
enum Piece<'a> {
    Borrowed(&'a [u8]),
    Owned(std::ops::Range<usize>),
}

const DOT: &[u8] = b".";
const CRLF: &[u8] = b"\r\n";
const END: &[u8] = b".\r\n";

impl<'a> Encoded<'a> {
    /// Same bytes as [`encode_parts`], same guarantees (canonical CRLF lines, stuffed,
    /// exactly one final `.<CRLF>`), without copying parts that are already canonical,
    /// which the message read by the DATA reader always is.
    pub fn new(headers: &[String], parts: &[&'a [u8]]) -> Encoded<'a> {
        Self::framed(headers, parts, Framing::Data)
    }

    /// The payload for `framing`: for [`Framing::Data`] what [`Encoded::new`] gives; for
    /// [`Framing::Chunk`] the same canonical lines unstuffed and without the end line.
    pub fn framed(headers: &[String], parts: &[&'a [u8]], framing: Framing) -> Encoded<'a> {
        let mut owned = Vec::with_capacity(headers.iter().map(|h| h.len() + 3).sum::<usize>());
        for h in headers
            .iter()
            .map(String::as_str)
            .chain(orphan_fold_guard(headers, parts))
        {
            push_content(h.as_bytes(), &mut owned, framing);
            if !owned.ends_with(CRLF) {
                owned.extend_from_slice(CRLF);
            }
        }
        let mut enc = Encoded {
            pieces: Vec::with_capacity(parts.len() + 4),
            owned,
            framing,
        };
        if !enc.owned.is_empty() {
            enc.pieces.push(Piece::Owned(0..enc.owned.len()));
        }
        // Whether the next byte starts a line (the header block always ends with CRLF).
        let mut at_line_start = true;
        for part in parts.iter().filter(|p| !p.is_empty()) {
            if !enc.push_canonical(part, at_line_start) {
                let from = enc.owned.len();
                let mut rewritten = Vec::with_capacity(part.len() + 8);
                if !at_line_start {
                    // push_content decides line starts from what precedes: say "mid-line".
                    rewritten.push(b'x');
                }
                push_content(part, &mut rewritten, framing);
                let skip = usize::from(!at_line_start);
                enc.owned.extend_from_slice(&rewritten[skip..]);
                enc.pieces.push(Piece::Owned(from..enc.owned.len()));
            }
            at_line_start = enc.last_byte() == Some(b'\n');
        }
        if !at_line_start {
            enc.pieces.push(Piece::Borrowed(CRLF));
        }
        if framing == Framing::Data {
            enc.pieces.push(Piece::Borrowed(END));
        }
        enc
    }

    /// Bytes in the payload (the size a `BDAT` command announces).
    pub fn size(&self) -> usize {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Borrowed(b) => b.len(),
                Piece::Owned(r) => r.len(),
            })
            .sum()
    }

    /// Adds `part` by reference when every line ending in it is CRLF and it has no other
    /// CR (what the DATA reader produces); after DATA, a line starting with `.` gets a
    /// `.` piece before it. Returns false, adding nothing, when the part needs rewriting.
    fn push_canonical(&mut self, part: &'a [u8], mut at_line_start: bool) -> bool {
        let mut cr = memchr::memchr_iter(b'\r', part);
        let canonical = memchr::memchr_iter(b'\n', part)
            .all(|i| i > 0 && part[i - 1] == b'\r' && cr.next() == Some(i - 1))
            && cr.next().is_none();
        if !canonical {
            return false;
        }
        if self.framing == Framing::Chunk {
            self.pieces.push(Piece::Borrowed(part));
            return true;
        }
        let mut from = 0;
        let mut line = 0;
        loop {
            if at_line_start && part.get(line) == Some(&b'.') {
                if line > from {
                    self.pieces.push(Piece::Borrowed(&part[from..line]));
                }
                self.pieces.push(Piece::Borrowed(DOT));
                from = line;
            }
            // The next line start: a '.' is only looked for right after an LF.
            match memchr::memmem::find(&part[line..], b"\n.") {
                Some(i) => {
                    line += i + 1;
                    at_line_start = true;
                }
                None => break,
            }
        }
        self.pieces.push(Piece::Borrowed(&part[from..]));
        true
    }

    fn last_byte(&self) -> Option<u8> {
        match self.pieces.last()? {
            Piece::Borrowed(b) => b.last().copied(),
            Piece::Owned(r) => self.owned[r.clone()].last().copied(),
        }
    }

    /// The pieces, in order, for a vectored write.
    pub fn io_slices(&self) -> Vec<std::io::IoSlice<'_>> {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Borrowed(b) => std::io::IoSlice::new(b),
                Piece::Owned(r) => std::io::IoSlice::new(&self.owned[r.clone()]),
            })
            .collect()
    }

    /// The whole payload in one buffer (tests and the fuzz targets, which check it is
    /// byte for byte what [`encode_parts`] gives).
    pub fn to_vec(&self) -> Vec<u8> {
        self.io_slices()
            .iter()
            .flat_map(|s| s.iter().copied())
            .collect()
    }
}

/// Appends `bytes` as canonical lines: every LF becomes CRLF, a CR not followed by LF
/// becomes a space, and after DATA a line starting with `.` gets a second one.
fn push_content(bytes: &[u8], out: &mut Vec<u8>, framing: Framing) {
    let mut at_line_start = out.is_empty() || out.ends_with(b"\r\n");
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if at_line_start && b == b'.' && framing == Framing::Data {
            out.push(b'.');
        }
        at_line_start = false;
        match b {
            b'\r' if bytes.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 1;
                at_line_start = true;
            }
            b'\r' => out.push(b' '),
            b'\n' => {
                out.extend_from_slice(b"\r\n");
                at_line_start = true;
            }
            _ => out.push(b),
        }
        i += 1;
    }
}

/// A message may (illegally) begin with a continuation line (SP or HTAB first). Put
/// right after the headers we add, it would continue our last one: the sender could append
/// `dkim=pass` to our `Authentication-Results`. This header absorbs it instead.
pub fn orphan_fold_guard(headers: &[String], parts: &[&[u8]]) -> Option<&'static str> {
    let first = parts.iter().find(|p| !p.is_empty())?;
    (!headers.is_empty() && matches!(first[0], b' ' | b'\t'))
        .then_some("X-Mailwarden-Malformed: message began with a folded line")
}

/// One change to a message on its way to the next hop: the bytes of `range` are replaced
/// by `with` (empty `with`: a field left out; empty range: bytes inserted). The message
/// itself is never copied or re-decoded, so 8-bit and encoded text stays as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub range: std::ops::Range<usize>,
    pub with: Vec<u8>,
}

impl Edit {
    /// Leaves `range` out.
    pub fn remove(range: std::ops::Range<usize>) -> Edit {
        Edit {
            range,
            with: Vec::new(),
        }
    }

    /// Inserts `bytes` before offset `at`.
    pub fn insert(at: usize, bytes: Vec<u8>) -> Edit {
        Edit {
            range: at..at,
            with: bytes,
        }
    }
}

/// The pieces of `message` with `edits` applied. Edits must be sorted by position and
/// not overlap; one that does (or lies outside the message) is ignored.
pub fn edited<'a>(message: &'a [u8], edits: &'a [Edit]) -> Vec<&'a [u8]> {
    let mut parts = Vec::with_capacity(2 * edits.len() + 1);
    let mut pos = 0;
    for e in edits {
        if e.range.start >= pos && e.range.start <= e.range.end && e.range.end <= message.len() {
            parts.push(&message[pos..e.range.start]);
            parts.push(e.with.as_slice());
            pos = e.range.end;
        }
    }
    parts.push(&message[pos..]);
    parts.retain(|p| !p.is_empty());
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuffs_and_terminates() {
        let out = encode_data(&["X-A: 1".into()], b"Subject: t\r\n\r\n.hidden\r\n.\r\nend");
        assert_eq!(
            out,
            b"X-A: 1\r\nSubject: t\r\n\r\n..hidden\r\n..\r\nend\r\n.\r\n"
        );
    }

    #[test]
    fn bare_endings_cannot_smuggle() {
        let out = encode_data(&[], b"a\n.\nMAIL FROM:<x@y>\r.\r\n");
        assert_eq!(out, b"a\r\n..\r\nMAIL FROM:<x@y> .\r\n.\r\n");
        // Exactly one end-of-data sequence, at the very end.
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("\r\n.\r\n").count(), 1);
        assert!(text.ends_with("\r\n.\r\n"));
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one range to strip, not a range of values
    fn leaves_out_ranges() {
        let m = b"A: 1\r\nB: 2\r\nC: 3\r\n\r\nbody\r\n";
        let edits = [Edit::remove(6..12)];
        let parts = edited(m, &edits);
        assert_eq!(parts.concat(), b"A: 1\r\nC: 3\r\n\r\nbody\r\n");
        assert_eq!(
            encode_parts(&[], &parts),
            b"A: 1\r\nC: 3\r\n\r\nbody\r\n.\r\n"
        );
    }

    #[test]
    fn inserts_bytes_in_place() {
        let m = b"A: 1\r\nSubject: Caf\xe9\r\n\r\nbody\r\n";
        let edits = [Edit::remove(0..6), Edit::insert(15, b"[X] ".to_vec())];
        assert_eq!(
            edited(m, &edits).concat(),
            b"Subject: [X] Caf\xe9\r\n\r\nbody\r\n"
        );
        // Overlapping or out-of-range edits are ignored, never panic.
        let bad = [
            Edit::remove(4..10),
            Edit::remove(6..8),
            Edit::insert(99, vec![b'x']),
        ];
        assert_eq!(edited(m, &bad).concat().len(), m.len() - 6);
    }

    /// The vectored encoding sends exactly the bytes of the copying one, for canonical
    /// parts (borrowed) and for parts that need rewriting (bare LF, stray CR, a CRLF
    /// split between parts), with and without added headers.
    #[test]
    fn vectored_encoding_matches_the_copy() {
        let samples: [&[u8]; 12] = [
            b"",
            b"A: 1\r\n\r\nbody\r\n",
            b".\r\n..\r\n.x\r\nend",
            b"a\n.\nMAIL FROM:<x@y>\r.\r\n",
            b"\tfolded start\r\n\r\nb\r\n",
            b"no final newline",
            b"\r\n.\r\n",
            b".",
            b"x\r",
            b"\n",
            b"line\r\n.dot\r\n\r\n.\r\nlast.\r\n",
            b"\r",
        ];
        let header_sets: [Vec<String>; 3] = [
            vec![],
            vec!["X-A: 1".into()],
            vec!["Received: from x\r\n\tby y".into(), ".dotted: h".into()],
        ];
        for headers in &header_sets {
            for a in samples {
                for b in samples {
                    let parts = [a, b];
                    let want = encode_parts(headers, &parts);
                    let got = Encoded::new(headers, &parts).to_vec();
                    assert_eq!(
                        String::from_utf8_lossy(&got),
                        String::from_utf8_lossy(&want),
                        "headers {headers:?} parts {a:?} + {b:?}"
                    );
                }
            }
        }
    }

    /// A `BDAT` chunk is exactly what a receiver makes of the DATA payload (the DATA
    /// reader as the receiver: unstuffed, up to the end line), for every awkward pair.
    #[test]
    fn chunk_is_the_unstuffed_data_payload() {
        let samples: [&[u8]; 8] = [
            b"",
            b"A: 1\r\n\r\nbody\r\n",
            b".\r\n..\r\n.x\r\nend",
            b"a\n.\nMAIL FROM:<x@y>\r.\r\n",
            b"no final newline",
            b"\r\n.\r\n",
            b"x\r",
            b"line\r\n.dot\r\n\r\n.\r\nlast.\r\n",
        ];
        let headers = vec!["Received: from x\r\n\tby y".to_string(), "X-A: 1".into()];
        for a in samples {
            for b in samples {
                let parts = [a, b];
                let chunk = Encoded::framed(&headers, &parts, Framing::Chunk);
                let data = Encoded::framed(&headers, &parts, Framing::Data).to_vec();
                let mut reader = crate::wire::codec::DataReader::new(1 << 20);
                let mut received = Vec::new();
                let (used, done) = reader.ingest(&data, &mut received);
                assert!(done && used == data.len(), "{a:?} + {b:?}");
                assert_eq!(chunk.to_vec(), received, "{a:?} + {b:?}");
                assert_eq!(chunk.size(), received.len());
            }
        }
    }

    #[test]
    fn canonical_message_is_not_copied() {
        let m = b"Subject: t\r\n\r\n.hidden\r\nline\r\n";
        let parts = [&m[..]];
        let enc = Encoded::new(&["X-A: 1".into()], &parts);
        // Header block, the part up to the dot line, the stuffing dot, the rest, the end.
        assert!(enc.owned.len() <= "X-A: 1\r\n".len());
        let borrowed: usize = enc
            .pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Borrowed(b)
                    if b.as_ptr() >= m.as_ptr() && b.as_ptr() < m.as_ptr_range().end =>
                {
                    Some(b.len())
                }
                _ => None,
            })
            .sum();
        assert_eq!(borrowed, m.len());
        assert_eq!(
            enc.to_vec(),
            b"X-A: 1\r\nSubject: t\r\n\r\n..hidden\r\nline\r\n.\r\n"
        );
    }

    #[test]
    fn empty_message_is_just_the_dot() {
        assert_eq!(encode_data(&[], b""), b".\r\n");
    }
}
