//! Reading the client: bounded command lines, and message content that ends only at
//! `<CRLF>.<CRLF>`.
//!
//! The DATA reader is where SMTP smuggling is stopped. It splits content into lines,
//! removes dot-stuffing, and turns every line ending into CRLF, so the message handed to
//! the rest of the program is canonical. A `.` line counts as the end only when it and
//! the line before it both end in CRLF: `<LF>.<LF>`, `<LF>.<CRLF>`, `<CRLF>.<LF>` and
//! `<CR>.<CR>` are content. Whatever the next hop's idea of an end-of-data, it then
//! receives one message, re-stuffed by [`crate::relay::writer`].

use std::time::Duration;

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::memory::Reservation;
use super::reply::Reply;

/// Message content must keep arriving at this rate (bytes per second) on top of the data
/// timeout, or the session is cut (Postfix `smtpd_min_data_rate`).
pub const MIN_DATA_RATE: u64 = 500;
/// Room made in the read buffer for one read while reading commands: one system call
/// takes a whole pipelined group.
const READ_CHUNK: usize = 16 * 1024;
/// Room for one read while reading message content, once the message is past its first
/// [`READ_CHUNK`] bytes: a 100 KB message arrives in three or four reads instead of
/// seven. The buffer goes back to [`READ_CHUNK`] after the message, so an idle session
/// does not keep it. See [`data_read_room`] for why the first bytes get less.
const DATA_READ_CHUNK: usize = 64 * 1024;
/// A content line longer than this is passed on in pieces instead of being buffered whole.
const PARTIAL_LINE_FLUSH: usize = 8 * 1024;

/// Why reading from the client stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("client closed the connection")]
    Closed,
    #[error("client timed out")]
    Timeout,
    #[error("read error: {0}")]
    Io(#[from] std::io::Error),
}

/// One command line from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// The line, terminator included (`\r\n` or bare `\n`).
    Complete(Vec<u8>),
    /// The line was longer than allowed; it was read to its end and thrown away, so the
    /// session stays in step with the client.
    TooLong,
}

/// What the DATA reader saw besides the content.
#[derive(Debug, Default, Clone)]
pub struct DataStats {
    /// Canonical size (CRLF lines, dot-stuffing removed), counted even past the limit.
    pub size: usize,
    /// The content exceeded the size limit: it was read to the end and discarded.
    pub too_big: bool,
    /// Lines that ended in a bare LF.
    pub bare_lf: usize,
    /// CR bytes not followed by LF.
    pub bare_cr: usize,
    /// Lines longer than RFC 5321's 1000 octets (counted, never altered: signatures).
    pub long_lines: usize,
    /// The shared message memory budget had no room: the content was read to the end
    /// and dropped.
    pub over_budget: bool,
}

/// Client connection with a read buffer and a reply buffer (for PIPELINING, replies are
/// flushed only when the client has no complete command waiting).
pub struct SmtpStream<S> {
    io: S,
    rbuf: Vec<u8>,
    /// Start of unread bytes in `rbuf`.
    rpos: usize,
    wbuf: Vec<u8>,
}

impl<S> SmtpStream<S> {
    /// The stream underneath (e.g. to ask whether TLS is up).
    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> SmtpStream<S> {
    pub fn new(io: S) -> Self {
        SmtpStream {
            io,
            rbuf: Vec::with_capacity(1024),
            rpos: 0,
            wbuf: Vec::with_capacity(512),
        }
    }

    /// Hands back the transport, dropping any unread bytes (STARTTLS: whatever was
    /// pipelined before the handshake must never be read as commands, CVE-2011-0411).
    pub fn into_inner_discarding_input(self) -> S {
        self.io
    }

    /// Unread bytes, for tests and for the STARTTLS log line.
    pub fn buffered(&self) -> usize {
        self.rbuf.len() - self.rpos
    }

    fn unread(&self) -> &[u8] {
        &self.rbuf[self.rpos..]
    }

    fn consume(&mut self, n: usize) {
        self.rpos += n;
        if self.rpos == self.rbuf.len() {
            self.rbuf.clear();
            self.rpos = 0;
        } else if self.rpos > READ_CHUNK {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
        }
    }

    /// Reads more bytes into the buffer (at most `room`), flushing pending replies first
    /// so a client waiting for them is never deadlocked. Everything must happen before
    /// `deadline`. The read goes into the buffer's spare capacity: nothing is zeroed or
    /// copied first, and a command line costs one `read` however small it is.
    async fn fill(&mut self, deadline: Instant, room: usize) -> Result<(), ReadError> {
        match tokio::time::timeout_at(deadline, self.flush()).await {
            Err(_) => return Err(ReadError::Timeout),
            Ok(r) => r?,
        }
        self.rbuf.reserve(room);
        let mut limited = (&mut self.rbuf).limit(room);
        let n = match tokio::time::timeout_at(deadline, self.io.read_buf(&mut limited)).await {
            Err(_) => return Err(ReadError::Timeout),
            Ok(r) => r?,
        };
        if n == 0 {
            return Err(ReadError::Closed);
        }
        Ok(())
    }

    /// Whether an idle connection is still usable: nothing unread, and the peer neither
    /// closed it nor sent anything (a 421 before closing, say) while it sat idle. Polls
    /// the socket once without waiting; anything it reads makes the answer `false`, and
    /// the caller then drops the connection.
    pub fn is_quiet(&mut self) -> bool {
        if self.buffered() > 0 || !self.wbuf.is_empty() {
            return false;
        }
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        std::pin::Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut buf)
            .is_pending()
    }

    /// Whether a complete command line is already buffered (pipelined).
    pub fn has_pipelined_input(&self) -> bool {
        memchr(b'\n', self.unread()).is_some()
    }

    /// Reads one command line of at most `max` octets (terminator included). The whole
    /// line must arrive within `timeout` (a per-request deadline, not reset by each byte:
    /// a client trickling one byte at a time is cut like an idle one).
    pub async fn read_line(&mut self, max: usize, timeout: Duration) -> Result<Line, ReadError> {
        let deadline = Instant::now() + timeout;
        let mut too_long = false;
        loop {
            if let Some(i) = memchr(b'\n', self.unread()) {
                if too_long || i + 1 > max {
                    self.consume(i + 1);
                    return Ok(Line::TooLong);
                }
                let line = self.unread()[..=i].to_vec();
                self.consume(i + 1);
                return Ok(Line::Complete(line));
            }
            if self.buffered() >= max {
                // Over the limit without an end in sight: drop what we have, keep
                // reading until the LF so the next line starts in step.
                too_long = true;
                let n = self.buffered();
                self.consume(n);
            }
            self.fill(deadline, READ_CHUNK).await?;
        }
    }

    /// Reads message content up to `<CRLF>.<CRLF>` into `out` (canonical CRLF lines,
    /// dot-stuffing removed), keeping at most `limit` bytes; beyond it the rest is read
    /// and dropped so the client hears our answer in step. Bare LFs are normalised here;
    /// the `bare_lf = reject` policy is applied by the caller from the returned counts.
    /// `memory` must cover what `out` holds; when it cannot, `out` is emptied and the
    /// rest is read and dropped (`over_budget`).
    pub async fn read_data(
        &mut self,
        out: &mut Vec<u8>,
        limit: usize,
        timeout: Duration,
        memory: &mut Reservation,
    ) -> Result<DataStats, ReadError> {
        let mut reader = DataReader::new(limit);
        let start = Instant::now();
        loop {
            if !(reader.stats.too_big || reader.stats.over_budget) {
                make_room(out, self.buffered());
            }
            let (consumed, done) = reader.ingest(self.unread(), out);
            self.consume(consumed);
            if !reader.stats.over_budget && !memory.cover(out.capacity()) {
                reader.discard_rest();
                *out = Vec::new();
                memory.release();
            }
            if done {
                self.shrink_after_data();
                return Ok(reader.stats);
            }
            // Per-request deadline with a minimum data rate (Postfix
            // `smtpd_per_request_deadline` + `smtpd_min_data_rate`): `timeout`, plus one
            // second per MIN_DATA_RATE bytes received so far.
            let earned = Duration::from_secs_f64(reader.stats.size as f64 / MIN_DATA_RATE as f64);
            self.fill(start + timeout + earned, data_read_room(reader.stats.size))
                .await?;
        }
    }

    /// Capacity of the read buffer (tests).
    #[cfg(test)]
    fn read_capacity(&self) -> usize {
        self.rbuf.capacity()
    }

    /// After a message: the larger read buffer is not kept by a session that may now sit
    /// idle (what is unread, pipelined commands, is kept).
    fn shrink_after_data(&mut self) {
        if self.rbuf.capacity() > 2 * READ_CHUNK && self.buffered() <= READ_CHUNK {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
            self.rbuf.shrink_to(READ_CHUNK);
        }
    }

    /// Queues a reply; it is sent at the next [`flush`](Self::flush) or read.
    pub fn queue(&mut self, reply: &Reply) {
        reply.write_to(&mut self.wbuf);
    }

    /// Sends queued replies.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.wbuf.is_empty() {
            self.io.write_all(&self.wbuf).await?;
            self.io.flush().await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Queues and sends a reply now.
    pub async fn send(&mut self, reply: &Reply) -> std::io::Result<()> {
        self.queue(reply);
        self.flush().await
    }

    /// Writes bytes as they are (the relay client, whose bytes are built canonically).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Writes every slice as it is, in as few system calls as the socket allows (one
    /// `writev` for a message that fits its buffer): the relay sends its header block
    /// and the client's message this way, without first copying them into one buffer.
    /// Each call must make progress within `timeout` (`ErrorKind::TimedOut` otherwise).
    pub async fn write_all_vectored(
        &mut self,
        mut bufs: &mut [std::io::IoSlice<'_>],
        timeout: Duration,
    ) -> std::io::Result<()> {
        let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out");
        while !bufs.is_empty() {
            let n = tokio::time::timeout(timeout, self.io.write_vectored(bufs))
                .await
                .map_err(|_| timed_out())??;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            std::io::IoSlice::advance_slices(&mut bufs, n);
        }
        tokio::time::timeout(timeout, self.io.flush())
            .await
            .map_err(|_| timed_out())?
    }

    pub async fn shutdown(&mut self) {
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }
}

/// Makes room in the message for `incoming` more bytes before they are copied in: what
/// they need, or a quarter more than it holds for a message that keeps coming. `Vec`'s
/// own growth doubles, which held 128 KB for each 100 KB message the harness sends
/// without `SIZE=` (issue 18: with 50 sessions in DATA, over a megabyte of the peak).
/// A quarter keeps growth geometric (a message arriving in small reads is reallocated a
/// few dozen times, not once per read) while holding at most a quarter too much; a line
/// with a bare LF (one byte longer canonical) is left to `Vec`.
fn make_room(message: &mut Vec<u8>, incoming: usize) {
    let spare = message.capacity() - message.len();
    if spare < incoming {
        let wanted = (message.len() + incoming).max(message.capacity() + message.capacity() / 4);
        message.reserve_exact(wanted - message.len());
    }
}

/// Room for the next read of message content, `received` canonical bytes into it.
///
/// A message's first [`READ_CHUNK`] bytes are read with the room a command read has, so
/// a small message (most mail: the harness's is 4 KB) never grows the read buffer
/// beyond what the session already holds; only a message past that size gets
/// [`DATA_READ_CHUNK`]. Reserving 64 KB for every message grew each session's buffer to
/// about 80 KB in DATA and shrank it back after, which at 50 sessions kept megabytes of
/// the heap resident for 4 KB messages (issue 18). A large message costs one or two
/// more reads than before.
fn data_read_room(received: usize) -> usize {
    if received < READ_CHUNK {
        READ_CHUNK
    } else {
        DATA_READ_CHUNK
    }
}

use memchr::memchr;

/// What [`DataReader::line`] did with the start of its input.
enum Step {
    /// Consumed this many bytes (a line, or a piece of a long one).
    Line(usize),
    /// The end-of-data line, this many bytes long.
    End(usize),
    /// No complete line yet: wait for more input.
    NeedMore,
}

/// The sans-IO DATA state machine (kept apart from the socket so it can be tested and
/// fuzzed with any chunking).
pub struct DataReader {
    limit: usize,
    /// The previous line ended in CRLF (true at the start: DATA's own line did).
    prev_crlf: bool,
    /// Part of the current line was already emitted (a very long line).
    mid_line: bool,
    /// Length of the current line so far, for the long-line count.
    line_len: usize,
    pub stats: DataStats,
}

impl DataReader {
    pub fn new(limit: usize) -> Self {
        DataReader {
            limit,
            prev_crlf: true,
            mid_line: false,
            line_len: 0,
            stats: DataStats::default(),
        }
    }

    /// Consumes complete lines (and long partial lines) from `input`, appending canonical
    /// content to `out`. Returns bytes consumed and whether the end of data was reached.
    ///
    /// Most lines are already canonical: they end in CRLF, hold no other CR and do not
    /// start with a dot, so they come out exactly as they went in. Such lines are found
    /// with one search each (the first CR or LF) and a run of them is copied to `out` at
    /// once; every other line (a dot at its start, a bare LF, a stray CR, a line cut by
    /// the end of `input`) goes through [`Self::line`], one at a time (issue 18: the
    /// per-line searches and copies were a tenth of the CPU of a 100 KB message).
    pub fn ingest(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
        let mut pos = 0;
        // Start of the run of canonical lines not yet copied to `out`.
        let mut run = 0;
        while pos < input.len() {
            let rest = &input[pos..];
            if let Some(len) = self.canonical_line(rest) {
                if len - 2 > 998 {
                    self.stats.long_lines += 1;
                }
                self.prev_crlf = true;
                pos += len;
                continue;
            }
            self.push(&input[run..pos], false, out);
            match self.line(rest, out) {
                Step::Line(n) => pos += n,
                Step::End(n) => return (pos + n, true),
                Step::NeedMore => return (pos, false),
            }
            run = pos;
        }
        self.push(&input[run..pos], false, out);
        (pos, false)
    }

    /// The length (CRLF included) of the line at the start of `rest` when it is complete
    /// and already canonical: not the rest of a long line, no dot first (dot-stuffing, or
    /// the end of data), and its first CR is the one before its LF.
    fn canonical_line(&self, rest: &[u8]) -> Option<usize> {
        if self.mid_line || rest.first() == Some(&b'.') {
            return None;
        }
        let i = memchr::memchr2(b'\r', b'\n', rest)?;
        (rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n')).then_some(i + 2)
    }

    /// One line from the start of `rest`, any form: the end of data, dot-unstuffing,
    /// bare LF and stray CR handling, or a long line's next piece.
    fn line(&mut self, rest: &[u8], out: &mut Vec<u8>) -> Step {
        match memchr(b'\n', rest) {
            Some(i) => {
                let crlf = i > 0 && rest[i - 1] == b'\r';
                let content = &rest[..if crlf { i - 1 } else { i }];
                if !self.mid_line && crlf && self.prev_crlf && content == b"." {
                    return Step::End(i + 1);
                }
                self.emit(content, out);
                self.end_line(crlf, out);
                Step::Line(i + 1)
            }
            None if rest.len() >= PARTIAL_LINE_FLUSH => {
                // Keep a trailing CR back: it may be the first half of a CRLF.
                let take = if rest.ends_with(b"\r") {
                    rest.len() - 1
                } else {
                    rest.len()
                };
                self.emit(&rest[..take], out);
                self.mid_line = true;
                Step::Line(take)
            }
            None => Step::NeedMore,
        }
    }

    /// Appends part of a line: dot-unstuffing at its start, stray CRs replaced.
    fn emit(&mut self, mut content: &[u8], out: &mut Vec<u8>) {
        if !self.mid_line && content.len() > 1 && content[0] == b'.' {
            content = &content[1..];
        }
        self.line_len += content.len();
        let strays = memchr::memchr_iter(b'\r', content).count();
        self.stats.bare_cr += strays;
        self.push(content, strays > 0, out);
    }

    /// Keeps reading to the end of data but stores nothing more (no memory for it).
    pub fn discard_rest(&mut self) {
        self.stats.over_budget = true;
    }

    fn push(&mut self, bytes: &[u8], replace_cr: bool, out: &mut Vec<u8>) {
        self.stats.size += bytes.len();
        if self.stats.size > self.limit {
            self.stats.too_big = true;
        }
        if self.stats.too_big || self.stats.over_budget {
            return;
        }
        if replace_cr {
            // A CR alone is not a line ending anywhere we send it; Postfix's cleanup
            // replaces it with a space (`cleanup_replace_stray_cr_lf`), and so do we.
            out.extend(bytes.iter().map(|&b| if b == b'\r' { b' ' } else { b }));
        } else {
            out.extend_from_slice(bytes);
        }
    }

    fn end_line(&mut self, crlf: bool, out: &mut Vec<u8>) {
        if !crlf {
            self.stats.bare_lf += 1;
        }
        if self.line_len > 998 {
            self.stats.long_lines += 1;
        }
        self.push(b"\r\n", false, out);
        self.prev_crlf = crlf;
        self.mid_line = false;
        self.line_len = 0;
    }
}

/// Canonical form of a message read from a file (the `check` command): the same line
/// handling as the DATA reader (every line ending CRLF, a stray CR a space), without the
/// dot-unstuffing that only applies on the wire.
pub fn canonicalize(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 32);
    let mut lines = bytes.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let last = lines.peek().is_none();
        if last && line.is_empty() {
            break;
        }
        // Only a CR before an LF ends a line; a CR at the very end of the file is a
        // stray CR, as the DATA reader sees it.
        let content = if last {
            line
        } else {
            line.strip_suffix(b"\r").unwrap_or(line)
        };
        out.extend(content.iter().map(|&b| if b == b'\r' { b' ' } else { b }));
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonicalize_matches_the_data_reader() {
        let file = b"Subject: x\nA: b\r\n\r\nbo\rdy\nlast";
        let mut wire = file.to_vec();
        wire.extend_from_slice(b"\r\n.\r\n");
        let (out, _, done, _) = read_all(&wire);
        assert!(done);
        assert_eq!(canonicalize(file), out);
    }

    fn read_all(input: &[u8]) -> (Vec<u8>, usize, bool, DataStats) {
        let mut r = DataReader::new(1 << 20);
        let mut out = Vec::new();
        let (n, done) = r.ingest(input, &mut out);
        (out, n, done, r.stats)
    }

    #[test]
    fn ends_only_at_crlf_dot_crlf() {
        let (out, n, done, _) = read_all(b"Subject: x\r\n\r\nhello\r\n.\r\nMAIL FROM:<a@b>\r\n");
        assert!(done);
        assert_eq!(out, b"Subject: x\r\n\r\nhello\r\n");
        assert_eq!(n, 24);
    }

    #[test]
    fn smuggling_sequences_are_content() {
        for evil in [
            &b"a\n.\nMAIL FROM:<x@y>\r\n"[..],
            b"a\r\n.\nMAIL FROM:<x@y>\r\n",
            b"a\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r.\rMAIL FROM:<x@y>\r\n",
            b"a\r.\r\nMAIL FROM:<x@y>\r\n",
        ] {
            let (out, _, done, stats) = read_all(evil);
            assert!(!done, "{:?} ended the data", String::from_utf8_lossy(evil));
            assert!(stats.bare_lf + stats.bare_cr > 0);
            // Canonical: every CR is followed by LF and every LF preceded by CR.
            for (i, b) in out.iter().enumerate() {
                if *b == b'\n' {
                    assert_eq!(out[i - 1], b'\r');
                }
                if *b == b'\r' {
                    assert_eq!(out[i + 1], b'\n');
                }
            }
        }
    }

    #[test]
    fn dot_unstuffing_and_lone_dot_content() {
        let (out, _, done, _) = read_all(b"..leading\r\n.\n.\r\n");
        // "." ended by bare LF is content; the next "." follows a bare-LF line: content too.
        assert!(!done);
        assert_eq!(out, b".leading\r\n.\r\n.\r\n");
        let (out, _, done, _) = read_all(b"..leading\r\n.\n.\r\n.\r\n");
        assert!(done);
        assert_eq!(out, b".leading\r\n.\r\n.\r\n");
    }

    #[test]
    fn any_chunking_gives_the_same_result() {
        let input = b"From: a\r\nX: y\n\r\n..dot\r\nbare\rcr\r\nlast\r\n.\r\nQUIT\r\n";
        let (whole, n_whole, _, _) = read_all(input);
        for split in 0..input.len() {
            let mut r = DataReader::new(1 << 20);
            let mut out = Vec::new();
            let mut buf = input[..split].to_vec();
            let (n1, d1) = r.ingest(&buf, &mut out);
            assert!(!d1 || split >= n_whole);
            let n2 = if d1 {
                0
            } else {
                buf.drain(..n1);
                buf.extend_from_slice(&input[split..]);
                let (n2, d2) = r.ingest(&buf, &mut out);
                assert!(d2);
                n2
            };
            assert_eq!(out, whole, "split at {split}");
            assert_eq!(n1 + n2, n_whole, "split at {split}");
        }
    }

    /// RFC 5321 §4.5.2 and our line rules written the plain way, one line at a time: the
    /// oracle for the DATA reader's run-at-once fast path. Content, bytes up to and
    /// including the end line, bare LFs, stray CRs; `None` without an end.
    fn reference(input: &[u8]) -> Option<(Vec<u8>, usize, usize, usize)> {
        let (mut out, mut pos, mut bare_lf, mut bare_cr) = (Vec::new(), 0, 0, 0);
        let mut prev_crlf = true;
        while let Some(i) = input[pos..].iter().position(|&b| b == b'\n') {
            let line = &input[pos..pos + i];
            pos += i + 1;
            let crlf = line.last() == Some(&b'\r');
            let content = if crlf { &line[..line.len() - 1] } else { line };
            if crlf && prev_crlf && content == b"." {
                return Some((out, pos, bare_lf, bare_cr));
            }
            let content = match content {
                [b'.', rest @ ..] if !rest.is_empty() => rest,
                _ => content,
            };
            for &b in content {
                bare_cr += usize::from(b == b'\r');
                out.push(if b == b'\r' { b' ' } else { b });
            }
            bare_lf += usize::from(!crlf);
            out.extend_from_slice(b"\r\n");
            prev_crlf = crlf;
        }
        None
    }

    /// Random content made of the bytes that matter (CR, LF, dot) and ordinary text, fed
    /// whole and in random pieces: the reader agrees with [`reference`] every time.
    #[test]
    fn agrees_with_the_line_by_line_reference() {
        const PIECES: [&[u8]; 8] = [
            b"\r\n",
            b"\r",
            b"\n",
            b".",
            b"..",
            b"a",
            b"text ",
            b"\r\n.\r\n",
        ];
        for _ in 0..3000 {
            let mut input = Vec::new();
            for _ in 0..rand::random_range(0..60) {
                input.extend_from_slice(PIECES[rand::random_range(0..PIECES.len())]);
            }
            input.extend_from_slice(b"\r\n.\r\n");
            let (want, end, bare_lf, bare_cr) = reference(&input).unwrap();
            let mut reader = DataReader::new(1 << 20);
            let (mut out, mut buf, mut fed, mut consumed) = (Vec::new(), Vec::new(), 0, 0);
            let done = loop {
                let piece = rand::random_range(1..=16).min(input.len() - fed);
                buf.extend_from_slice(&input[fed..fed + piece]);
                fed += piece;
                let (n, done) = reader.ingest(&buf, &mut out);
                consumed += n;
                buf.drain(..n);
                if done || fed == input.len() {
                    break done;
                }
            };
            let shown = String::from_utf8_lossy(&input);
            assert!(done, "{shown:?}");
            assert_eq!(out, want, "{shown:?}");
            assert_eq!(consumed, end, "{shown:?}");
            assert_eq!(
                (reader.stats.bare_lf, reader.stats.bare_cr),
                (bare_lf, bare_cr),
                "{shown:?}"
            );
            assert_eq!(reader.stats.size, want.len(), "{shown:?}");
        }
    }

    #[test]
    fn a_large_message_is_held_in_about_its_size() {
        let mut out = Vec::with_capacity(4096);
        let mut left = 100_000;
        for chunk in [16 * 1024, 64 * 1024, 64 * 1024] {
            let n = chunk.min(left);
            make_room(&mut out, n);
            out.resize(out.len() + n, b'x');
            left -= n;
        }
        assert_eq!(out.len(), 100_000);
        assert!(out.capacity() < 110_000, "{}", out.capacity());
        // Growth stays geometric for a message that keeps coming in small reads.
        let mut out = Vec::new();
        let mut grown = 0;
        for _ in 0..10_000 {
            let before = out.capacity();
            make_room(&mut out, 1000);
            out.resize(out.len() + 1000, b'x');
            grown += usize::from(out.capacity() != before);
        }
        // 1.25 to the 41st is 10 000: about 41 growths, against 10 000 reads.
        assert!(grown < 50, "{grown} allocations for 10 MB");
    }

    #[test]
    fn long_lines_pass_through_in_pieces() {
        let mut input = vec![b'x'; 20_000];
        input.extend_from_slice(b"\r\n.\r\n");
        let (out, _, done, stats) = read_all(&input);
        assert!(done);
        assert_eq!(out.len(), 20_002);
        assert_eq!(stats.long_lines, 1);
    }

    #[test]
    fn size_limit_drains() {
        let mut r = DataReader::new(10);
        let mut out = Vec::new();
        let (_, done) = r.ingest(b"0123456789abcdef\r\n.\r\n", &mut out);
        assert!(done);
        assert!(r.stats.too_big);
        assert!(out.len() <= 10);
    }

    /// The read buffer's capacity once `size` bytes of message content (no end yet) have
    /// been read by `read_data`, which then waits for more.
    async fn read_capacity_mid_message(size: usize) -> usize {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut s = SmtpStream::new(server);
        let mut line = b"x".repeat(78);
        line.extend_from_slice(b"\r\n");
        client.write_all(&line.repeat(size / 80)).await.unwrap();
        let memory = crate::wire::memory::MessageMemory::new(1 << 30, Default::default());
        let mut reservation = Reservation::new(&memory);
        let mut out = Vec::new();
        let read = s.read_data(&mut out, 1 << 30, Duration::from_secs(60), &mut reservation);
        // Everything sent is read at once; then `read_data` waits for the end, which
        // never comes: stop it there.
        let waiting = tokio::time::timeout(Duration::from_millis(200), read).await;
        assert!(waiting.is_err(), "the message has no end yet");
        assert_eq!(out.len(), size / 80 * 80);
        s.read_capacity()
    }

    #[tokio::test]
    async fn a_small_message_does_not_grow_the_read_buffer() {
        assert!(read_capacity_mid_message(4000).await <= 2 * READ_CHUNK);
        // A large one gets the larger room (fewer reads).
        assert!(read_capacity_mid_message(100_000).await >= DATA_READ_CHUNK);
    }

    #[tokio::test]
    async fn line_reader_recovers_after_too_long() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut s = SmtpStream::new(server);
        let mut c = client;
        let long = vec![b'A'; 5000];
        c.write_all(&long).await.unwrap();
        c.write_all(b"\r\nNOOP\r\n").await.unwrap();
        let t = Duration::from_secs(5);
        assert_eq!(s.read_line(4096, t).await.unwrap(), Line::TooLong);
        assert_eq!(
            s.read_line(4096, t).await.unwrap(),
            Line::Complete(b"NOOP\r\n".to_vec())
        );
    }
}
