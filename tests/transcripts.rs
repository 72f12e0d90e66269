//! Replays every golden transcript in `tests/transcripts/*.txt` (the format is in
//! `tests/transcripts/README.md`) against a real session over an in-memory pipe
//! (`mailwarden::testing::InProcess`), with the built-in Maildir next hop in a temporary
//! directory standing in for the MTA. No socket, no binary: the protocol alone.
//!
//! A mismatch names the file and line of the step that failed; every file is run and
//! all failures are reported together.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mailwarden::config::Config;
use mailwarden::testing::InProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// How long the runner waits for one reply (or the end of a session) before it calls
/// the step failed. Generous: a correct transcript never comes near it.
const STEP_WAIT: Duration = Duration::from_secs(10);

/// Where one step was written, for error messages.
#[derive(Clone)]
struct At {
    file: String,
    line: usize,
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// One expected reply: `S: 250 2.1.0 "text" +KEYWORD !KEYWORD`.
#[derive(Debug, Default)]
struct ReplyPattern {
    code: u16,
    /// `S: 5xx`: any code of the class.
    class_only: bool,
    enhanced: Option<String>,
    contains: Vec<String>,
    has: Vec<String>,
    lacks: Vec<String>,
}

/// What the next hop must have received for one message.
#[derive(Debug, Default)]
struct Delivery {
    from: Option<String>,
    to: Vec<String>,
    /// The message as the client sent it (without the headers the proxy adds on top).
    message: Vec<Vec<u8>>,
}

enum Step {
    Send(Vec<u8>),
    Expect(ReplyPattern),
    Closed,
    Delivered(Delivery),
    Nothing,
    Shutdown,
    NewSession,
}

struct Transcript {
    name: String,
    role: String,
    peer: SocketAddr,
    config: Vec<String>,
    steps: Vec<(At, Step)>,
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

/// Decodes `\r \n \t \0 \\ \xHH` and expands `{{text*N}}` (text repeated N times).
fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        out.extend(unescape_plain(&rest[..start])?);
        let tail = &rest[start + 2..];
        let end = tail.find("}}").ok_or("unclosed {{")?;
        let (text, n) = tail[..end]
            .rsplit_once('*')
            .ok_or("{{text*N}} needs a count")?;
        let n: usize = n.trim().parse().map_err(|_| format!("bad count {n:?}"))?;
        out.extend(unescape_plain(text)?.repeat(n));
        rest = &tail[end + 2..];
    }
    out.extend(unescape_plain(rest)?);
    Ok(out)
}

fn unescape_plain(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('r') => out.push(b'\r'),
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some('0') => out.push(0),
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                out.push(u8::from_str_radix(&hex, 16).map_err(|_| format!("bad \\x{hex}"))?);
            }
            other => return Err(format!("unknown escape \\{}", other.unwrap_or(' '))),
        }
    }
    Ok(out)
}

fn parse_reply(s: &str) -> Result<ReplyPattern, String> {
    let s = s.trim();
    let (code, mut rest) = s.split_at(s.find(' ').unwrap_or(s.len()));
    let (code, class_only) = match code.strip_suffix("xx") {
        Some(class) => (format!("{class}00"), true),
        None => (code.to_string(), false),
    };
    let mut p = ReplyPattern {
        code: code
            .parse()
            .map_err(|_| format!("bad reply code {code:?}"))?,
        class_only,
        ..ReplyPattern::default()
    };
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        if let Some(q) = rest.strip_prefix('"') {
            let end = q.find('"').ok_or("unclosed quote")?;
            p.contains.push(q[..end].to_string());
            rest = &q[end + 1..];
            continue;
        }
        let (word, tail) = rest.split_at(rest.find(' ').unwrap_or(rest.len()));
        rest = tail;
        if let Some(k) = word.strip_prefix('+') {
            p.has.push(k.to_string());
        } else if let Some(k) = word.strip_prefix('!') {
            p.lacks.push(k.to_string());
        } else if word.split('.').count() == 3
            && word.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        {
            p.enhanced = Some(word.to_string());
        } else {
            return Err(format!("unexpected {word:?} in a reply pattern"));
        }
    }
    Ok(p)
}

/// `C*3:` → ("C", 3); `S:` → ("S", 1).
fn split_tag(tag: &str) -> Result<(&str, usize), String> {
    match tag.split_once('*') {
        Some((t, n)) => Ok((t, n.parse().map_err(|_| format!("bad repeat {n:?}"))?)),
        None => Ok((tag, 1)),
    }
}

fn parse(name: &str, text: &str) -> Result<Transcript, String> {
    let mut t = Transcript {
        name: name.to_string(),
        role: "inbound".into(),
        peer: "192.0.2.10:40000".parse().expect("default peer"),
        config: Vec::new(),
        steps: Vec::new(),
    };
    let mut delivery: Option<(At, Delivery)> = None;
    for (i, raw) in text.lines().enumerate() {
        let at = At {
            file: name.to_string(),
            line: i + 1,
        };
        let fail = |e: String| format!("{at}: {e}");
        let is_delivery_line =
            raw.starts_with("N|") || raw.starts_with("N: from ") || raw.starts_with("N: to ");
        if !is_delivery_line && let Some((at, d)) = delivery.take() {
            t.steps.push((at, Step::Delivered(d)));
        }
        if raw.trim().is_empty() || raw.starts_with('#') {
            continue;
        }
        // `N: from` (or `N: to` after message lines) starts the next message's block.
        let starts_next = raw.starts_with("N: from ") || raw.starts_with("N: to ");
        if starts_next
            && let Some((at, d)) = delivery.take_if(|(_, d)| {
                !d.message.is_empty()
                    || (raw.starts_with("N: from ") && (d.from.is_some() || !d.to.is_empty()))
            })
        {
            t.steps.push((at, Step::Delivered(d)));
        }
        if is_delivery_line {
            let d = &mut delivery
                .get_or_insert_with(|| (at.clone(), Delivery::default()))
                .1;
            if let Some(line) = raw.strip_prefix("N|") {
                let line = line.strip_prefix(' ').unwrap_or(line);
                d.message.push(unescape(line).map_err(fail)?);
            } else if let Some(addr) = raw.strip_prefix("N: from ") {
                d.from = Some(addr.trim().to_string());
            } else if let Some(addr) = raw.strip_prefix("N: to ") {
                d.to.push(addr.trim().to_string());
            }
            continue;
        }
        if raw == "-- new session" {
            t.steps.push((at, Step::NewSession));
            continue;
        }
        let Some((tag, body)) = raw.split_once([':', '-']) else {
            return Err(fail(format!("cannot read {raw:?}")));
        };
        let sep = raw.as_bytes()[tag.len()];
        let body = body.strip_prefix(' ').unwrap_or(body);
        let (tag, times) = split_tag(tag).map_err(fail)?;
        match (tag, sep) {
            ("listener", b':') => t.role = body.trim().to_string(),
            ("peer", b':') => {
                t.peer = body
                    .trim()
                    .parse()
                    .map_err(|e| fail(format!("peer {body:?}: {e}")))?
            }
            ("config", b':') => t.config.push(body.to_string()),
            ("C", b':') => {
                let mut bytes = unescape(body).map_err(fail)?;
                bytes.extend_from_slice(b"\r\n");
                t.steps.push((at, Step::Send(bytes.repeat(times))));
            }
            ("C", b'-') => {
                let bytes = unescape(body).map_err(fail)?;
                t.steps.push((at, Step::Send(bytes.repeat(times))));
            }
            ("S", b':') if body.trim() == "closed" => t.steps.push((at, Step::Closed)),
            ("S", b':') => {
                for _ in 0..times {
                    t.steps
                        .push((at.clone(), Step::Expect(parse_reply(body).map_err(fail)?)));
                }
            }
            ("N", b':') if body.trim() == "nothing" => t.steps.push((at, Step::Nothing)),
            ("do", b':') if body.trim() == "shutdown" => t.steps.push((at, Step::Shutdown)),
            _ => return Err(fail(format!("cannot read {raw:?}"))),
        }
    }
    if let Some((at, d)) = delivery.take() {
        t.steps.push((at, Step::Delivered(d)));
    }
    Ok(t)
}

// ---------------------------------------------------------------------------
// The configuration a transcript runs with
// ---------------------------------------------------------------------------

/// The base configuration (one listener of the transcript's role, the Maildir next hop,
/// checks off) followed by the transcript's `config:` lines.
fn config_text(t: &Transcript, maildir: &Path) -> String {
    let mut c = String::new();
    let _ = writeln!(c, "hostname = \"mx.test\"");
    let _ = writeln!(c, "local_domains = [\"example.com\"]");
    let _ = writeln!(c, "[[listener]]");
    // Never bound: sessions are started in memory.
    let _ = writeln!(c, "address = \"127.0.0.1:25\"");
    let _ = writeln!(c, "role = \"{}\"", t.role);
    let own_listener_keys: Vec<&String> = t
        .config
        .iter()
        .take_while(|l| !l.trim_start().starts_with('['))
        .collect();
    for l in own_listener_keys {
        let _ = writeln!(c, "{l}");
    }
    let _ = writeln!(c, "[next_hop]");
    let _ = writeln!(c, "address = \"maildir:{}\"", maildir.display());
    let _ = writeln!(c, "[auth]");
    let _ = writeln!(c, "enabled = false");
    let own_outbound = t.config.iter().any(|l| l.trim() == "[outbound]");
    if t.role == "submission" && !own_outbound {
        // As in the socket tests: the documentation range the transcripts' clients use
        // is trusted (accounted, never held), so submission works without AUTH.
        let _ = writeln!(c, "[outbound]");
        let _ = writeln!(c, "trusted_networks = [\"192.0.2.0/24\"]");
        let _ = writeln!(c, "action = \"alert\"");
        let _ = writeln!(c, "[outbound.from]");
        let _ = writeln!(c, "allow = \"any\"");
        let _ = writeln!(c, "action = \"alert\"");
    }
    for l in t
        .config
        .iter()
        .skip_while(|l| !l.trim_start().starts_with('['))
    {
        let _ = writeln!(c, "{l}");
    }
    c
}

// ---------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------

/// One reply as read: its code (of the last line) and its lines' text.
struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" | "))
    }
}

struct Client {
    stream: DuplexStream,
    buf: Vec<u8>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Reads one line (without CRLF); `None` at the end of the stream.
    async fn line(&mut self) -> Result<Option<String>, String> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).collect();
                return Ok(Some(String::from_utf8_lossy(&line[..pos]).into_owned()));
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(STEP_WAIT, self.stream.read(&mut chunk))
                .await
                .map_err(|_| format!("no reply within {STEP_WAIT:?}"))?
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(format!(
                    "stream ended inside a line: {:?}",
                    String::from_utf8_lossy(&self.buf)
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn reply(&mut self) -> Result<Option<Reply>, String> {
        let mut lines = Vec::new();
        loop {
            let Some(line) = self.line().await? else {
                return if lines.is_empty() {
                    Ok(None)
                } else {
                    Err("stream ended inside a multi-line reply".into())
                };
            };
            let code: u16 = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("not a reply line: {line:?}"))?;
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_string());
            if last {
                return Ok(Some(Reply { code, lines }));
            }
        }
    }

    /// Ends the client's side and checks the session said nothing more and ended.
    async fn finish(mut self) -> Result<(), String> {
        let _ = self.stream.shutdown().await;
        let mut extra = Vec::new();
        while let Some(r) = self.reply().await? {
            extra.push(r.to_string());
        }
        if !extra.is_empty() {
            return Err(format!("replies nobody expected: {extra:?}"));
        }
        tokio::time::timeout(STEP_WAIT, self.task)
            .await
            .map_err(|_| "the session did not end after the client left".to_string())?
            .map_err(|e| format!("the session panicked: {e}"))
    }
}

fn check_reply(p: &ReplyPattern, r: &Reply) -> Result<(), String> {
    let first = r.lines.first().map(String::as_str).unwrap_or("");
    let enhanced = first.split_whitespace().next().unwrap_or("");
    let full = r.lines.join("\n");
    let keyword = |k: &str| {
        r.lines.iter().skip(1).any(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case(k))
        })
    };
    let code_ok = if p.class_only {
        r.code / 100 == p.code / 100
    } else {
        r.code == p.code
    };
    let ok = code_ok
        && p.enhanced.as_deref().is_none_or(|e| e == enhanced)
        && p.contains.iter().all(|s| full.contains(s.as_str()))
        && p.has.iter().all(|k| keyword(k))
        && !p.lacks.iter().any(|k| keyword(k));
    if ok {
        Ok(())
    } else {
        Err(format!("expected {p:?}, got {r}"))
    }
}

/// The Maildir files delivered so far, in delivery order (the `Q<n>` sequence number
/// in each name counts up per process).
fn delivered(maildir: &Path) -> Vec<PathBuf> {
    let sequence = |p: &PathBuf| -> u64 {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        name.split_once('Q')
            .and_then(|(_, r)| r.split_once('P'))
            .and_then(|(n, _)| n.parse().ok())
            .unwrap_or(u64::MAX)
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(maildir.join("new"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort_by_key(sequence);
    files
}

/// Compares one stored message with what the transcript says the next hop receives:
/// `Return-Path` and `Delivered-To` (the envelope, as the Maildir next hop writes it),
/// then any header lines the proxy added, then exactly the client's message.
fn check_delivery(want: &Delivery, stored: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(stored);
    let mut rest: &str = &text;
    let mut from = None;
    let mut to = Vec::new();
    while let Some((line, tail)) = rest.split_once("\r\n") {
        if let Some(v) = line.strip_prefix("Return-Path: ") {
            from = Some(v.to_string());
        } else if let Some(v) = line.strip_prefix("Delivered-To: ") {
            to.push(format!("<{v}>"));
        } else {
            break;
        }
        rest = tail;
    }
    if let Some(f) = &want.from
        && from.as_deref() != Some(f.as_str())
    {
        return Err(format!("envelope sender {from:?}, expected {f}"));
    }
    if !want.to.is_empty() && to != want.to {
        return Err(format!(
            "envelope recipients {to:?}, expected {:?}",
            want.to
        ));
    }
    if want.message.is_empty() {
        return Ok(()); // no `N|` lines: the envelope alone is checked
    }
    let mut message = Vec::new();
    for line in &want.message {
        message.extend_from_slice(line);
        message.extend_from_slice(b"\r\n");
    }
    let rest = rest.as_bytes();
    let Some(added) = rest.strip_suffix(message.as_slice()) else {
        return Err(format!(
            "message differs:\n--- expected (end of)\n{}--- received\n{}",
            String::from_utf8_lossy(&message),
            String::from_utf8_lossy(rest)
        ));
    };
    // What comes before the client's message can only be header fields we added.
    let added = String::from_utf8_lossy(added);
    if let Some(bad) = added
        .split("\r\n")
        .find(|l| !l.is_empty() && !l.contains(':') && !l.starts_with([' ', '\t']))
    {
        return Err(format!(
            "more than added headers before the message: {bad:?}"
        ));
    }
    if !added.is_empty() && !added.ends_with("\r\n") {
        return Err("the message does not start on a line of its own".into());
    }
    Ok(())
}

async fn run(t: &Transcript) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let maildir = dir.path().join("Maildir");
    let source = config_text(t, &maildir);
    let config = Config::parse(&source, Path::new(&t.name))
        .map_err(|e| format!("{}: config: {e}\n{source}", t.name))?;
    let world = InProcess::new(config)
        .await
        .map_err(|e| format!("{}: {e}", t.name))?;
    let connect = || {
        let (stream, task) = world.connect(0, t.peer);
        Client {
            stream,
            buf: Vec::new(),
            task,
        }
    };
    let mut client = connect();
    let greeting = client
        .reply()
        .await
        .map_err(|e| format!("{}: greeting: {e}", t.name))?;
    if !matches!(&greeting, Some(r) if r.code == 220) {
        return Err(format!("{}: no 220 greeting", t.name));
    }
    let mut seen = 0;
    for (at, step) in &t.steps {
        let fail = |e: String| format!("{at}: {e}");
        match step {
            Step::Send(bytes) => {
                // A session that closed may refuse the write; the next S: line says so.
                let _ = client.stream.write_all(bytes).await;
            }
            Step::Expect(p) => match client.reply().await.map_err(fail)? {
                Some(r) => check_reply(p, &r).map_err(fail)?,
                None => return Err(fail(format!("connection closed, expected {}", p.code))),
            },
            Step::Closed => {
                if let Some(r) = client.reply().await.map_err(fail)? {
                    return Err(fail(format!("expected the end of the session, got {r}")));
                }
            }
            Step::Delivered(want) => {
                let files = delivered(&maildir);
                let Some(file) = files.get(seen) else {
                    return Err(fail("the next hop received no (further) message".into()));
                };
                let stored = std::fs::read(file).map_err(|e| fail(e.to_string()))?;
                check_delivery(want, &stored).map_err(fail)?;
                seen += 1;
            }
            Step::Nothing => {
                let n = delivered(&maildir).len();
                if n != seen {
                    return Err(fail(format!(
                        "the next hop received {} message(s) more",
                        n - seen
                    )));
                }
            }
            Step::Shutdown => world.shutdown(),
            Step::NewSession => {
                std::mem::replace(&mut client, connect())
                    .finish()
                    .await
                    .map_err(fail)?;
                match client.reply().await.map_err(fail)? {
                    Some(r) if r.code == 220 => {}
                    other => {
                        return Err(fail(format!(
                            "no 220 greeting: {:?}",
                            other.map(|r| r.to_string())
                        )));
                    }
                }
            }
        }
    }
    let end = At {
        file: t.name.clone(),
        line: 0,
    };
    client
        .finish()
        .await
        .map_err(|e| format!("{}: at the end: {e}", end.file))?;
    let n = delivered(&maildir).len();
    if n != seen {
        return Err(format!(
            "{}: at the end: the next hop received {} message(s) no N: block describes",
            end.file,
            n - seen
        ));
    }
    Ok(())
}

fn transcripts() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/transcripts");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/transcripts")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = format!(
                "tests/transcripts/{}",
                p.file_name().unwrap_or_default().to_string_lossy()
            );
            (name, std::fs::read_to_string(&p).expect("read transcript"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_transcripts() {
    let started = Instant::now();
    let files = transcripts();
    let mut failures = Vec::new();
    for (name, text) in &files {
        let one = Instant::now();
        let result = match parse(name, text) {
            Ok(t) if t.steps.is_empty() => Err(format!("{name}: no steps")),
            Ok(t) => run(&t).await,
            Err(e) => Err(e),
        };
        if one.elapsed() > Duration::from_millis(100) {
            eprintln!("{name}: {:?}", one.elapsed());
        }
        if let Err(e) = result {
            failures.push(e);
        }
    }
    eprintln!("{} transcripts in {:?}", files.len(), started.elapsed());
    assert!(
        failures.is_empty(),
        "{} transcript(s) failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    // Issue 12: the protocol's behaviour is pinned by at least 60 scenarios.
    assert!(files.len() >= 60, "only {} transcripts", files.len());
}

/// One message relayed, and no `N` block about it.
const DELIVER_ONE: &str = "C: EHLO c.example\nS: 250\nC: MAIL FROM:<a@sender.example>\nS: 250\n\
    C: RCPT TO:<b@example.com>\nS: 250\nC: DATA\nS: 354\nC: Subject: one\nC:\nC: x\nC: .\nS: 250\n";

/// The runner itself can fail: a wrong reply, a missing or unexpected delivery, a wrong
/// envelope or content, and an unexpected extra reply are each reported, with the file
/// and line where there is one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_reports_file_and_line() {
    let cases = [
        (
            "C: EHLO c.example\nS: 250\nC: NOOP\nS: 554\n".to_string(),
            ":4: expected",
        ),
        (
            "C: EHLO c.example\nS: 250\nC: NOOP\nS: 250\nN| x\n".to_string(),
            ":5: the next hop received no",
        ),
        (
            "C: EHLO c.example\nC: NOOP\nS: 250\n".to_string(),
            "replies nobody expected",
        ),
        (
            "C: EHLO c.example\nS: 250 +CHUNKING\n".to_string(),
            ":2: expected",
        ),
        ("C: NOOP\nS: 4xx\n".to_string(), ":2: expected"),
        (
            DELIVER_ONE.to_string(),
            "at the end: the next hop received 1 message(s) no N: block",
        ),
        (
            format!("{DELIVER_ONE}N| Subject: other\n"),
            "message differs",
        ),
        (
            format!("{DELIVER_ONE}N: from <x@sender.example>\n"),
            "envelope sender",
        ),
        (
            format!("{DELIVER_ONE}N: nothing\n"),
            "received 1 message(s) more",
        ),
    ];
    for (text, want) in cases {
        let t = parse("bad.txt", &text).expect("parses");
        let e = run(&t).await.expect_err(&text);
        assert!(e.contains(want), "{text:?}: {e}");
    }
}
